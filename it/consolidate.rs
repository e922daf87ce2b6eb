//! Consolidation: three source servers under live writes into one target
//! server, every job (the three roots' workers and six subscriber workers) in
//! one `londiste-rs run` process. The three layouts of the man page at once:
//! - database per source: target databases t1, t2, t3, each a leaf of its source;
//! - schema per source: database hub, src1.accounts / src2.accounts / src3.accounts
//!   via --dest-schema, the job key dest_schema and --dest-schema --create;
//! - a merged table: hub's public.events fed by all three (--merge-all for q1
//!   and q2, q3 joining later with --no-merge), a TRUNCATE at one source that
//!   removes only its rows, a key sent by two sources that stops the second
//!   one's worker naming both and the key, and recovers once the row is gone.
//!
//! `compare` runs on every subscriber job; `fleet` shows the error; a stopped
//! source does not stall the others.

use crate::harness::{Cluster, KillOnDrop, TestDir, poll_until, run, spawn, table_dump};
use crate::tutorial::{ok, output_text};
use postgres::Client;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const SOURCE_SCHEMA: &str = "
create table accounts (id serial primary key, name text not null);
create table events (id bigint primary key, kind text, amount numeric);
";

fn job(conn: &str, queue: &str, log: &str, extra: &str) -> String {
    format!(
        "[londiste3]\ndb = {conn}\nqueue_name = {queue}\nloop_delay = 0.2\nexception_sleep = 1\n\
         {extra}logfile = log/{log}.log\n"
    )
}

/// Rows of an SQL relation (a table or a parenthesised query) as sorted text.
fn dump(c: &mut Client, rel: &str) -> Vec<String> {
    table_dump(c, rel)
}

fn same(a: &mut Client, arel: &str, b: &mut Client, brel: &str) -> Result<bool, String> {
    let (x, y) = (dump(a, arel), dump(b, brel));
    if x == y {
        Ok(true)
    } else {
        Err(format!(
            "{arel}: {} rows, {brel}: {} rows",
            x.len(),
            y.len()
        ))
    }
}

/// The rows of source `i` (1..3) in the merged table: ids i*1e6 ...
fn part(i: usize) -> String {
    format!("(select * from public.events where id / 1000000 = {i})")
}

fn writer(conn: String, i: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&conn, postgres::NoTls).unwrap();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            c.batch_execute(&format!(
                "insert into accounts (name) values ('w{i}-{n}');
                 insert into events values ({} + 1000 + {n}, 'live', {n});
                 update events set amount = amount + 1 where id = {} + 1 + {n} % 100;",
                i * 1_000_000,
                i * 1_000_000
            ))
            .unwrap_or_else(|e| panic!("writer {i}: {e}"));
            n += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        n
    })
}

fn cur_error(hub: &mut Client, q: &str) -> Option<String> {
    hub.query_one(
        "select cur_error from londiste.node_info where queue_name = $1",
        &[&q],
    )
    .unwrap()
    .get(0)
}

#[test]
fn three_sources_into_one_target() {
    let src: Vec<Cluster> = (0..3).map(|_| Cluster::start()).collect();
    let target = Cluster::start();
    let dir = TestDir::new();
    let d = dir.path();
    std::fs::create_dir(d.join("log")).unwrap();
    let hub = target.create_db("hub");
    let mut jobs: Vec<String> = Vec::new();
    let mut sconn = Vec::new();
    for (k, s) in src.iter().enumerate() {
        let i = k + 1;
        let conn = s.create_db("app");
        let mut c = s.client("app");
        c.batch_execute(SOURCE_SCHEMA).unwrap();
        c.batch_execute(&format!(
            "insert into accounts (name) select 'a' || g from generate_series(1, 50) g;
             insert into events select {} + g, 'old', g from generate_series(1, 200) g;",
            i * 1_000_000
        ))
        .unwrap();
        let q = format!("q{i}");
        dir.write(
            &format!("root{i}.ini"),
            &job(&conn, &q, &format!("root{i}"), ""),
        );
        let tconn = target.create_db(&format!("t{i}"));
        dir.write(&format!("t{i}.ini"), &job(&tconn, &q, &format!("t{i}"), ""));
        // Job 2 names its schema in the job file; the others on the command line.
        let extra = if i == 2 { "dest_schema = src2\n" } else { "" };
        dir.write(
            &format!("hub{i}.ini"),
            &job(&hub, &q, &format!("hub{i}"), extra),
        );
        ok(
            "londiste3",
            &[
                &format!("root{i}.ini"),
                "create-root",
                &format!("root{i}"),
                &conn,
            ],
            d,
        );
        ok(
            "londiste3",
            &[&format!("root{i}.ini"), "add-table", "--all"],
            d,
        );
        let prov = format!("--provider={conn}");
        ok(
            "londiste3",
            &[
                &format!("t{i}.ini"),
                "create-leaf",
                &format!("t{i}"),
                &tconn,
                &prov,
            ],
            d,
        );
        ok(
            "londiste3",
            &[
                &format!("hub{i}.ini"),
                "create-leaf",
                &format!("hub{i}"),
                &hub,
                &prov,
            ],
            d,
        );
        for j in ["root", "t", "hub"] {
            jobs.push(format!("{j}{i}.ini"));
        }
        sconn.push(conn);
    }
    let args: Vec<&str> = std::iter::once("run")
        .chain(jobs.iter().map(String::as_str))
        .collect();
    let _p = KillOnDrop(spawn("londiste-rs", &args, d));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = sconn
        .iter()
        .enumerate()
        .map(|(k, c)| writer(c.clone(), k + 1, stop.clone()))
        .collect();

    // Database per source, and a merged table that is not there yet: --create.
    for i in 1..=3 {
        ok(
            "londiste3",
            &[&format!("t{i}.ini"), "add-table", "--all", "--create"],
            d,
        );
    }
    // Two queues cannot write one table unless it is merged.
    let mut hubc = target.client("hub");
    hubc.batch_execute(
        "create table public.events (id bigint primary key, kind text, amount numeric)",
    )
    .unwrap();
    ok("londiste3", &["hub1.ini", "add-table", "events"], d);
    poll_until(
        "the unmerged table in sync",
        Duration::from_secs(30),
        || {
            let t = ok("londiste3", &["hub1.ini", "tables"], d);
            Ok(t.lines()
                .any(|l| l.starts_with("public.events") && l.trim_end().ends_with(" ok")))
        },
    );
    let out = run("londiste3", &["hub3.ini", "add-table", "events"], d);
    let text = output_text(&out);
    assert!(
        !out.status.success() && text.contains("--merge-all"),
        "{text}"
    );
    ok("londiste3", &["hub1.ini", "remove-table", "events"], d);
    // --merge-all from one job adds the merged table for q1 and q2 and q3.
    // q3 joins later: its part is removed again below and re-added.
    ok(
        "londiste3",
        &["hub1.ini", "add-table", "events", "--merge-all"],
        d,
    );
    let parts: i64 = hubc
        .query_one("select count(*) from londiste.table_info where table_name = 'public.events' and merged", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        parts, 3,
        "--merge-all adds the table for every queue of hub"
    );
    ok("londiste3", &["hub3.ini", "remove-table", "events"], d);
    // Schema per source: option, job key, option with --all on a name list.
    ok(
        "londiste3",
        &[
            "hub1.ini",
            "add-table",
            "accounts",
            "--dest-schema=src1",
            "--create",
        ],
        d,
    );
    ok(
        "londiste3",
        &["hub2.ini", "add-table", "accounts", "--create"],
        d,
    );
    ok(
        "londiste3",
        &[
            "hub3.ini",
            "add-table",
            "accounts",
            "--dest-schema=src3",
            "--create",
        ],
        d,
    );

    let mut s: Vec<Client> = src.iter().map(|c| c.client("app")).collect();
    let in_sync = |jobs: &[&str]| {
        for j in jobs {
            let out = run("londiste3", &[j, "tables"], d);
            let t = output_text(&out);
            if !out.status.success() || t.lines().skip(1).any(|l| !l.trim_end().ends_with(" ok")) {
                return Err(format!("{j}: {t}"));
            }
        }
        Ok(true)
    };
    poll_until(
        "q1, q2 parts and the other tables in sync",
        Duration::from_secs(60),
        || {
            in_sync(&[
                "t1.ini", "t2.ini", "t3.ini", "hub1.ini", "hub2.ini", "hub3.ini",
            ])
        },
    );
    // The late joiner copies its part while the others apply: no truncate.
    let before: i64 = hubc
        .query_one("select count(*) from public.events", &[])
        .unwrap()
        .get(0);
    assert!(before > 400, "q1 and q2 rows in the merged table: {before}");
    // Source 3 holds a key source 1 wrote: its copy fails naming both, and
    // leaves the merged table as it was.
    s[2].batch_execute("insert into events values (1000005, 'dup in copy', 3)")
        .unwrap();
    ok(
        "londiste3",
        &["hub3.ini", "add-table", "events", "--no-merge"],
        d,
    );
    poll_until(
        "q3's copy to report the duplicate key",
        Duration::from_secs(30),
        || {
            let e: Option<String> = hubc
            .query_one(
                "select copy_error from londiste.table_info where queue_name = 'q3' and table_name = 'public.events'",
                &[],
            )
            .unwrap()
            .get(0);
            match e {
                Some(e) if e.contains("q1") && e.contains("q3") && e.contains("1000005") => {
                    Ok(true)
                }
                other => Err(format!("{other:?}")),
            }
        },
    );
    let kind: String = hubc
        .query_one("select kind from public.events where id = 1000005", &[])
        .unwrap()
        .get(0);
    assert_eq!(kind, "old", "the failed copy changed source 1's row");
    s[2].batch_execute("delete from events where id = 1000005")
        .unwrap();
    poll_until("q3's part in sync", Duration::from_secs(60), || {
        in_sync(&["hub3.ini"])
    });

    stop.store(true, Ordering::Relaxed);
    let written: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(written.iter().all(|n| *n > 0), "writers wrote: {written:?}");
    let check_all = |s: &mut Vec<Client>, hubc: &mut Client| -> Result<bool, String> {
        for i in 1..=3 {
            let mut t = target.client(&format!("t{i}"));
            let sc = &mut s[i - 1];
            same(sc, "public.accounts", &mut t, "public.accounts")?;
            same(sc, "public.events", &mut t, "public.events")?;
            same(sc, "public.accounts", hubc, &format!("src{i}.accounts"))?;
            same(sc, "public.events", hubc, &part(i))?;
        }
        Ok(true)
    };
    poll_until(
        "every layout equal to its sources",
        Duration::from_secs(60),
        || check_all(&mut s, &mut hubc),
    );
    for j in [
        "t1.ini", "t2.ini", "t3.ini", "hub1.ini", "hub2.ini", "hub3.ini",
    ] {
        let out = ok("londiste3", &[j, "compare"], d);
        assert!(!out.contains("do not match"), "{j}: {out}");
    }

    // TRUNCATE at source 2: its rows go from the merged table, the others stay.
    s[1].batch_execute("truncate events; insert into events values (2999999, 'after', 1)")
        .unwrap();
    poll_until(
        "source 2's rows replaced in the merged table",
        Duration::from_secs(30),
        || same(&mut s[1], "public.events", &mut hubc, &part(2)),
    );
    check_all(&mut s, &mut hubc).unwrap();

    // A key at source 3 that source 1 already wrote: q3 stops with both names.
    let dup = 1_000_007i64;
    s[2].batch_execute(&format!("insert into events values ({dup}, 'dup', 3); insert into accounts (name) values ('behind dup')")).unwrap();
    poll_until(
        "q3's worker to report the duplicate key",
        Duration::from_secs(30),
        || match cur_error(&mut hubc, "q3") {
            Some(e) if e.contains("q1") && e.contains("q3") && e.contains(&dup.to_string()) => {
                Ok(true)
            }
            other => Err(format!("{other:?}")),
        },
    );
    let fleet = output_text(&run("londiste-rs", &["fleet", &hub], d));
    assert!(
        fleet.contains("queue q3") && fleet.contains("ERR:") && fleet.contains(&dup.to_string()),
        "{fleet}"
    );
    // Position held: the account inserted after the duplicate is not applied.
    let held: i64 = hubc
        .query_one(
            "select count(*) from src3.accounts where name = 'behind dup'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "q3 applied past the duplicate key");
    let row: String = hubc
        .query_one("select kind from public.events where id = $1", &[&dup])
        .unwrap()
        .get(0);
    assert_eq!(row, "old", "source 1's row was overwritten");
    // Removed at source 1: q1 deletes it, q3's retry then applies its row.
    s[0].batch_execute(&format!("delete from events where id = {dup}"))
        .unwrap();
    poll_until("q3 to recover", Duration::from_secs(30), || {
        let k: Vec<String> = hubc
            .query("select kind from public.events where id = $1", &[&dup])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(k == ["dup"] && cur_error(&mut hubc, "q3").is_none())
    });
    // Source 3's part has the key now; source 1's does not: compare agrees.
    s[2].batch_execute(&format!("delete from events where id = {dup}"))
        .unwrap();
    poll_until("every layout equal again", Duration::from_secs(30), || {
        check_all(&mut s, &mut hubc)
    });
    for j in ["hub1.ini", "hub2.ini", "hub3.ini"] {
        ok("londiste3", &[j, "compare"], d);
    }

    // repair of a merged table works on the source's part: a row of source 2
    // lost and one of source 1 changed here are found by their own jobs only.
    hubc.batch_execute(
        "set londiste.replay = on;
         delete from public.events where id = 2999999;
         update public.events set kind = 'changed' where id = 1000001;
         reset londiste.replay;",
    )
    .unwrap();
    let out = run("londiste3", &["hub3.ini", "repair", "public.events"], d);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = output_text(&run(
        "londiste3",
        &["hub2.ini", "repair", "public.events"],
        d,
    ));
    assert!(out.contains("1 missing, 0 different, 0 extra"), "{out}");
    ok(
        "londiste3",
        &["hub2.ini", "repair", "public.events", "--apply"],
        d,
    );
    let out = output_text(&run(
        "londiste3",
        &["hub1.ini", "repair", "public.events"],
        d,
    ));
    assert!(out.contains("0 missing, 1 different, 0 extra"), "{out}");
    ok(
        "londiste3",
        &["hub1.ini", "repair", "public.events", "--apply"],
        d,
    );
    check_all(&mut s, &mut hubc).unwrap();
    for j in ["hub1.ini", "hub2.ini"] {
        ok("londiste3", &[j, "compare", "public.events"], d);
    }

    // A stopped source: the others still apply, fleet names the one that is down.
    src[0].stop_immediate();
    s[1].batch_execute("insert into accounts (name) values ('while 1 is down')")
        .unwrap();
    poll_until(
        "source 2 applying while source 1 is down",
        Duration::from_secs(30),
        || same(&mut s[1], "public.accounts", &mut hubc, "src2.accounts"),
    );
    let fleet = output_text(&run("londiste-rs", &["fleet", &hub], d));
    assert!(fleet.contains("PROVIDER UNREACHABLE"), "{fleet}");
    src[0].start_again();
}
