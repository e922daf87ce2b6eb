//! Crash safety of the subscriber: while a workload of random transactions
//! (inserts, updates, deletes, primary-key changes, rollbacks) runs on the
//! master, the slave worker is killed with SIGKILL at random moments, once
//! in the middle of the initial copy of a large table, and restarted each
//! time. Whatever it had half done must be redone exactly once: in the end
//! every table on the slave equals the master.

use crate::harness::{Cluster, KillOnDrop, Rng, TestDir, poll_until, spawn, unique_name};
use crate::tutorial::{ok, wait_equal};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TABLES: &[&str] = &["public.big", "public.acct", "public.pairs"];

const SCHEMA: &str = "
create table big (id bigint primary key, v int not null, pad text);
create table acct (id serial primary key, v int not null, note text);
create table pairs (k1 int, k2 int, v text, primary key (k1, k2));
create sequence pair_k2 start 100000;
";

const DATA: &str = "
insert into big select i, i % 1000, repeat(md5(i::text), 3) from generate_series(1, 400000) i;
insert into acct (v, note) select i, 'n' || i from generate_series(1, 500) i;
insert into pairs select a, b, a || '/' || b from generate_series(1, 30) a, generate_series(1, 10) b;
";

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    t | 1
}

/// One random transaction's statements, committed or rolled back.
fn random_tx(rng: &mut Rng) -> (Vec<String>, bool) {
    let mut stmts = Vec::new();
    for _ in 0..1 + rng.below(6) {
        let a = 1 + rng.below(600);
        let b = rng.below(1000);
        let k1 = 1 + rng.below(40);
        let s = match rng.below(12) {
            0 => format!("insert into acct (v, note) values ({b}, 'w{b}')"),
            1 => format!("update acct set v = v + 1, note = note || '+' where id = {a}"),
            2 => format!("delete from acct where id = {a}"),
            3 => format!("update acct set id = nextval('acct_id_seq') where id = {a}"),
            4 => format!(
                "insert into pairs values ({k1}, {b}, 'p{b}') on conflict (k1, k2) do update set v = excluded.v || '!'"
            ),
            5 => format!("update pairs set v = coalesce(v, '') || 'u' where k1 = {k1}"),
            6 => format!(
                "delete from pairs where (k1, k2) in (select k1, k2 from pairs where k1 = {k1} limit 1)"
            ),
            7 => format!(
                "update pairs set k2 = nextval('pair_k2') where (k1, k2) in (select k1, k2 from pairs where k1 = {k1} limit 1)"
            ),
            8 => format!(
                "update pairs set k1 = k1 + 1000 where (k1, k2) in (select k1, k2 from pairs where k1 = {k1} limit 1) \
                 and not exists (select 1 from pairs p where p.k1 = {k1} + 1000)"
            ),
            9 => {
                let id = 1 + rng.below(400_000);
                format!("update big set v = v + 1, pad = null where id between {id} and {id} + 20")
            }
            10 => {
                let id = 1 + rng.below(400_000);
                format!("delete from big where id = {id}")
            }
            _ => {
                let id = 400_000 + rng.below(1_000_000);
                format!(
                    "insert into big values ({id}, {b}, 'new') on conflict (id) do update set v = big.v - 1"
                )
            }
        };
        stmts.push(s);
    }
    (stmts, rng.below(10) != 0)
}

/// Kill the worker with SIGKILL and reap it.
fn kill9(p: &mut KillOnDrop) {
    p.0.kill().expect("SIGKILL the worker");
    p.0.wait().expect("reap the worker");
}

#[test]
fn slave_worker_killed_repeatedly_under_load() {
    let c = Cluster::shared();
    let (master, slave) = (unique_name("crash_master"), unique_name("crash_slave"));
    let mconn = c.create_db(&master);
    let sconn = c.create_db(&slave);
    c.client(&master)
        .batch_execute(&format!("{SCHEMA}{DATA}"))
        .unwrap();
    c.client(&slave).batch_execute(SCHEMA).unwrap();

    let dir = TestDir::new();
    let d = dir.path();
    dir.tutorial_inis(&c.base_connstr(), &master, &mconn, &sconn, "");
    ok(
        "londiste3",
        &["master.ini", "create-root", "master", &mconn],
        d,
    );
    ok(
        "londiste3",
        &[
            "slave.ini",
            "create-branch",
            "slave",
            &sconn,
            &format!("--provider={mconn}"),
        ],
        d,
    );
    ok("londiste3", &["master.ini", "add-table", "--all"], d);
    let _ticker = KillOnDrop(spawn("pgqd", &["ticker.ini"], d));
    let _root = KillOnDrop(spawn("londiste3", &["master.ini", "worker"], d));
    let mut worker = KillOnDrop(spawn("londiste3", &["slave.ini", "worker"], d));

    let seed = seed();
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);

    // The workload runs from before the copy until the end of the kills.
    let stop = Arc::new(AtomicBool::new(false));
    let txs = Arc::new(AtomicU64::new(0));
    let workload = {
        let (stop, txs) = (stop.clone(), txs.clone());
        let mut client = c.client(&master);
        let mut rng = Rng(seed.rotate_left(17) | 1);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let (stmts, commit) = random_tx(&mut rng);
                let end = if commit { "commit" } else { "rollback" };
                let sql = format!("begin; {}; {end};", stmts.join("; "));
                client
                    .batch_execute(&sql)
                    .unwrap_or_else(|e| panic!("workload: {sql}: {e}"));
                txs.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(rng.below(8)));
            }
        })
    };
    let started = Instant::now();

    // Kill 1: during the initial copy of `big` (a COPY running on the slave).
    ok("londiste3", &["slave.ini", "add-table", "--all"], d);
    let mut sc = c.client("postgres");
    let copying = |sc: &mut postgres::Client| -> bool {
        sc.query_one(
            "select count(*) from pg_stat_activity where datname = $1 and query ilike 'copy%big%'",
            &[&slave],
        )
        .map(|r| r.get::<_, i64>(0) > 0)
        .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !copying(&mut sc) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        copying(&mut sc),
        "never saw the copy of big running on the slave"
    );
    kill9(&mut worker);
    let mut kills = 1;
    // The killed COPY's backend may linger a moment; the restarted worker
    // must cope either way.
    worker = KillOnDrop(spawn("londiste3", &["slave.ini", "worker"], d));

    // Kills 2..5: at random moments while the workload runs (~10 s).
    while kills < 5 {
        std::thread::sleep(Duration::from_millis(800 + rng.below(1500)));
        kill9(&mut worker);
        kills += 1;
        worker = KillOnDrop(spawn("londiste3", &["slave.ini", "worker"], d));
    }
    let until = started + Duration::from_secs(10);
    if let Some(rest) = until.checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
    stop.store(true, Ordering::SeqCst);
    workload.join().expect("workload thread");
    let n = txs.load(Ordering::SeqCst);
    assert!(n > 100, "workload ran only {n} transactions");
    eprintln!("crash test: {kills} kills, {n} transactions");

    // The last worker runs on: the slave must converge to the master.
    wait_equal(c, &master, &slave, TABLES, Duration::from_secs(30));
    poll_until("slave tables all ok", Duration::from_secs(10), || {
        let out = crate::harness::run("londiste3", &["slave.ini", "tables"], d);
        let text = crate::tutorial::output_text(&out);
        let all = TABLES.iter().all(|t| {
            text.lines()
                .any(|l| l.starts_with(t) && l.split_whitespace().nth(1) == Some("ok"))
        });
        if all { Ok(true) } else { Err(text) }
    });
    ok("londiste3", &["slave.ini", "compare"], d);
}
