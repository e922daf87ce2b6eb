//! The queue layer (schema `pgq`, `src/sql/pgq.sql` + `capture.sql`) driven
//! only through its Skytools-compatible SQL API, the way any PgQ consumer
//! would use it: install, capture triggers, ticks, batches, retry, rotation.
//! Every test has its own database in the shared cluster.

use crate::harness::{Cluster, KillOnDrop, TestDir, spawn, table_dump, unique_name};
use londiste_rs::names::ident;
use londiste_rs::queue::install::install_pgq;
use londiste_rs::replication::record::{parse_columns, parse_record, parse_text_array, split_rows};
use postgres::{Client, NoTls};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The session settings a replica applies events under (see `src/db.rs`).
pub const EXACT_SETTINGS: &str = "SET datestyle = 'ISO, YMD'; SET intervalstyle = 'postgres'; \
     SET timezone = 'UTC'; SET extra_float_digits = 3; SET bytea_output = 'hex'";

/// Settings a writer might well have, all different from the capture's.
const ODD_SETTINGS: &str = "SET datestyle = 'SQL, DMY'; SET timezone = 'Asia/Kathmandu'; \
     SET intervalstyle = 'sql_standard'; SET extra_float_digits = 0; SET bytea_output = 'escape'";

/// A fresh database with the queue layer installed.
fn pgq_db(prefix: &str) -> (String, Client) {
    let c = Cluster::shared();
    let db = unique_name(prefix);
    c.create_db(&db);
    let mut client = c.client(&db);
    assert!(
        install_pgq(&mut client).expect("install pgq"),
        "first install must report a change"
    );
    (db, client)
}

/// Queue `q` with consumer `c`, and table `t (id int PRIMARY KEY, v text)`
/// captured into it.
fn queue_and_captured_t(c: &mut Client) {
    c.batch_execute(
        "SELECT pgq.create_queue('q');
         SELECT pgq.register_consumer('q', 'c');
         CREATE TABLE t (id int PRIMARY KEY, v text);
         SELECT pgq.capture_create('q', 't'::regclass);",
    )
    .unwrap();
}

#[derive(Debug, Clone)]
struct Ev {
    batch: i64,
    id: i64,
    txid: i64,
    retry: Option<i32>,
    typ: String,
    data: String,
    extra1: Option<String>,
    extra2: Option<String>,
    extra3: Option<String>,
}

/// One consumer step: next_batch, get_batch_events, finish_batch. `None` when
/// there is no batch.
fn take_batch(c: &mut Client, queue: &str, consumer: &str) -> Option<(i64, Vec<Ev>)> {
    let batch: Option<i64> = c
        .query_one("SELECT pgq.next_batch($1, $2)", &[&queue, &consumer])
        .expect("next_batch")
        .get(0);
    let batch = batch?;
    let evs = c
        .query(
            "SELECT ev_id, ev_txid, ev_retry, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3 \
             FROM pgq.get_batch_events($1)",
            &[&batch],
        )
        .expect("get_batch_events")
        .iter()
        .flat_map(|r| {
            // A multi-row event ('I*', 'U*', 'D*') stands for one event per row.
            let typ: String = r.get(3);
            let data: String = r.get(4);
            let rows: Vec<String> = if typ.ends_with('*') {
                split_rows(&data)
                    .expect("multi-row event data")
                    .into_iter()
                    .map(String::from)
                    .collect()
            } else {
                vec![data]
            };
            let typ = typ.trim_end_matches('*').to_string();
            rows.into_iter()
                .map(|data| Ev {
                    batch,
                    id: r.get(0),
                    txid: r.get(1),
                    retry: r.get(2),
                    typ: typ.clone(),
                    data,
                    extra1: r.get(5),
                    extra2: r.get(6),
                    extra3: r.get(7),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let done: i32 = c
        .query_one("SELECT pgq.finish_batch($1)", &[&batch])
        .expect("finish_batch")
        .get(0);
    assert_eq!(done, 1, "finish_batch({batch})");
    Some((batch, evs))
}

/// Force a tick and consume batches until there are none left.
fn drain(c: &mut Client, queue: &str, consumer: &str) -> Vec<Ev> {
    c.execute("SELECT pgq.force_tick($1)", &[&queue])
        .expect("force_tick");
    c.execute("SELECT pgq.ticker($1)", &[&queue])
        .expect("ticker");
    let mut out = Vec::new();
    for _ in 0..10_000 {
        match take_batch(c, queue, consumer) {
            Some((_, evs)) => out.extend(evs),
            None => return out,
        }
    }
    panic!("consumer {consumer} never ran out of batches");
}

fn db_message(e: &postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// The first field of a captured row (the `id` column of the load tests).
fn row_id(ev: &Ev) -> i64 {
    let f = parse_record(&ev.data).expect("parse ev_data");
    f[0].as_deref()
        .expect("id not null")
        .parse()
        .expect("integer id")
}

#[test]
fn install_is_idempotent_and_keeps_events() {
    let (db, mut c) = pgq_db("pgq_inst");
    assert!(
        !install_pgq(&mut c).unwrap(),
        "second install must be a no-op"
    );
    queue_and_captured_t(&mut c);
    c.batch_execute("INSERT INTO t VALUES (1, 'before')")
        .unwrap();
    c.batch_execute("SELECT pgq.insert_event('q', 'x', 'raw before')")
        .unwrap();

    // An upgrade re-runs the whole script over the live schema.
    c.batch_execute("DELETE FROM pgq.schema_info").unwrap();
    assert!(install_pgq(&mut c).unwrap(), "reinstall must run");
    assert!(!install_pgq(&mut c).unwrap());
    assert_eq!(
        Cluster::shared().psql(&db, "SELECT component, version FROM pgq.schema_info"),
        format!("pgq|{}", londiste_rs::queue::install::PGQ_VERSION)
    );

    // Events from before the reinstall are still there, and the capture
    // trigger still works.
    c.batch_execute("INSERT INTO t VALUES (2, 'after')")
        .unwrap();
    let evs = drain(&mut c, "q", "c");
    let got: Vec<(String, String)> = evs
        .iter()
        .map(|e| (e.typ.clone(), e.data.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("I".to_string(), "(1,before)".to_string()),
            ("x".to_string(), "raw before".to_string()),
            ("I".to_string(), "(2,after)".to_string()),
        ]
    );
    assert_eq!(
        Cluster::shared().psql(&db, "SELECT count(*) FROM pgq.queue"),
        "1"
    );

    // Two installers racing on an empty database: exactly one installs.
    let db2 = unique_name("pgq_inst_race");
    Cluster::shared().create_db(&db2);
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let db2 = db2.clone();
            thread::spawn(move || install_pgq(&mut Cluster::shared().client(&db2)).unwrap())
        })
        .collect();
    let results: Vec<bool> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|&&r| r).count(),
        1,
        "racing installs: {results:?}"
    );
}

#[test]
fn non_superuser_installs_and_replicates() {
    let cl = Cluster::shared();
    let role = unique_name("pgq_user");
    let db = unique_name("pgq_nosu");
    let mut admin = cl.client("postgres");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
        ))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db} OWNER {role}"))
        .unwrap();
    let cs = format!("host=127.0.0.1 port={} user={role} dbname={db}", cl.port());
    let mut c = Client::connect(&cs, NoTls).unwrap();
    let su: bool = c
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!su, "test role must not be a superuser");

    assert!(install_pgq(&mut c).unwrap());
    assert!(!install_pgq(&mut c).unwrap());
    queue_and_captured_t(&mut c);
    for sql in [
        "INSERT INTO t VALUES (1, 'a'), (2, 'b')",
        "UPDATE t SET v = 'c' WHERE id = 2",
        "DELETE FROM t WHERE id = 1",
    ] {
        c.batch_execute(sql).unwrap();
    }
    let evs = drain(&mut c, "q", "c");
    let got: Vec<(&str, &str)> = evs
        .iter()
        .map(|e| (e.typ.as_str(), e.data.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("I", "(1,a)"),
            ("I", "(2,b)"),
            ("U", "(2,c)"),
            ("D", "(1,a)")
        ]
    );
    assert_eq!(evs[0].extra1.as_deref(), Some("public.t"));
    assert_eq!(
        parse_columns(evs[0].extra2.as_deref().unwrap()).unwrap(),
        vec!["id", "v"]
    );
    assert_eq!(evs[0].extra3.as_deref(), Some("{id}"));
    // Rotation and retry maintenance work without superuser too.
    c.batch_execute(
        "SELECT pgq.set_queue_config('q', 'rotation_period', '0');
         SELECT pgq.maint_rotate_tables_step1('q');
         SELECT pgq.maint_rotate_tables_step2();
         SELECT pgq.maint_retry_events();",
    )
    .unwrap();
    drop(c);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .unwrap();
    admin.batch_execute(&format!("DROP ROLE {role}")).unwrap();
}

/// Who ticks and rotates the event tables during a load run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ticking {
    /// A thread calling `pgq.ticker()` every 10 ms; no rotation.
    Thread,
    /// The ticker thread, plus a thread rotating the event tables as often as
    /// the rotation rules let it (rotation_period 0).
    ThreadAndRotator,
    /// The real `pgqd` binary ticks and runs maintenance (rotation_period
    /// 0.1 s); the test itself never calls the ticker or the rotation steps.
    Pgqd,
}

/// Long transactions that write events while the ticker ticks.
#[derive(Debug, Clone, Copy, PartialEq)]
enum LongTx {
    None,
    /// One transaction spanning the whole run.
    One,
    /// One after the other, each about 0.4 s long (many ticks, and long
    /// enough to hold a rotation back).
    Repeated,
}

/// A long transaction of a load run.
struct LongTxResult {
    txid: i64,
    ids: BTreeSet<i64>,
    /// Ticks made while it was open.
    ticks: i64,
}

/// Shared state of a load run: concurrent writers (some transactions rolled
/// back), a ticker, a consumer, optionally rotation and long transactions
/// spanning many ticks.
struct LoadResult {
    committed: BTreeSet<i64>,
    rolled_back: BTreeSet<i64>,
    events: Vec<Ev>,
    long_txs: Vec<LongTxResult>,
    rotations: usize,
    /// The pgqd logfile, when pgqd ticked.
    pgqd_log: Option<String>,
}

fn run_load(db: &str, long_tx: LongTx, ticking: Ticking) -> LoadResult {
    let cl = Cluster::shared();
    let rotation_period = match ticking {
        Ticking::Thread => None,
        Ticking::ThreadAndRotator => Some("0"),
        Ticking::Pgqd => Some("0.1 s"),
    };
    {
        let mut c = cl.client(db);
        c.batch_execute(
            "SELECT pgq.create_queue('q');
             SELECT pgq.register_consumer('q', 'c');
             CREATE TABLE t (id bigint PRIMARY KEY, w int, pad text);
             SELECT pgq.capture_create('q', 't'::regclass);",
        )
        .unwrap();
        if let Some(p) = rotation_period {
            c.execute(
                "SELECT pgq.set_queue_config('q', 'rotation_period', $1)",
                &[&p],
            )
            .unwrap();
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers_stop = Arc::new(AtomicBool::new(false));
    let rotations = Arc::new(AtomicUsize::new(0));
    let events = Arc::new(Mutex::new(Vec::<Ev>::new()));
    let start = Instant::now();

    // pgqd, ticking this database only, maintenance every 0.1 s.
    let pgqd_dir = TestDir::new();
    let mut pgqd = (ticking == Ticking::Pgqd).then(|| {
        pgqd_dir.write(
            "ticker.ini",
            &format!(
                "[pgqd]\nbase_connstr = {}\ndatabase_list = {db}\nticker_period = 0.02\n\
                 maint_period = 0.1\nretry_period = 1\nstats_period = 1\nlogfile = pgqd.log\n",
                cl.base_connstr()
            ),
        );
        KillOnDrop(spawn("pgqd", &["ticker.ini"], pgqd_dir.path()))
    });
    let ticker = (ticking != Ticking::Pgqd).then(|| {
        let (db, stop) = (db.to_string(), stop.clone());
        thread::spawn(move || {
            let mut c = Cluster::shared().client(&db);
            while !stop.load(Ordering::SeqCst) {
                c.execute("SELECT pgq.ticker()", &[]).expect("ticker");
                thread::sleep(Duration::from_millis(10));
            }
        })
    });
    let consumer = {
        let (db, stop, events) = (db.to_string(), stop.clone(), events.clone());
        thread::spawn(move || {
            let mut c = Cluster::shared().client(&db);
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                match take_batch(&mut c, "q", "c") {
                    Some((_, evs)) => events.lock().unwrap().extend(evs),
                    None => thread::sleep(Duration::from_millis(3)),
                }
                n += 1;
                // Under pgqd the consumer falls behind now and then, for
                // longer than a rotation period: rotation must wait for it.
                if ticking == Ticking::Pgqd && n % 100 == 0 {
                    thread::sleep(Duration::from_millis(600));
                }
            }
        })
    };
    // Counts rotations as pgq.get_queue_info() shows them; with the rotator
    // thread, also does the rotating.
    let watcher = (ticking != Ticking::Thread).then(|| {
        let (db, stop, rotations) = (db.to_string(), stop.clone(), rotations.clone());
        thread::spawn(move || {
            let mut c = Cluster::shared().client(&db);
            let info = |c: &mut Client| -> (i32, String) {
                let r = c
                    .query_one(
                        "SELECT queue_cur_table, queue_switch_time::text FROM pgq.get_queue_info('q')",
                        &[],
                    )
                    .unwrap();
                (r.get(0), r.get(1))
            };
            let mut last = info(&mut c);
            while !stop.load(Ordering::SeqCst) {
                if ticking == Ticking::ThreadAndRotator {
                    c.execute("SELECT pgq.maint_rotate_tables_step1('q')", &[])
                        .expect("step1");
                    c.execute("SELECT pgq.maint_rotate_tables_step2()", &[])
                        .expect("step2");
                }
                let now = info(&mut c);
                if now.1 != last.1 {
                    let steps = (now.0 - last.0).rem_euclid(3) as usize;
                    if ticking == Ticking::ThreadAndRotator {
                        assert_eq!(steps, 1, "rotation must go to the next table");
                    }
                    // pgqd rotates at most every 0.1 s and this polls every
                    // 5 ms, but a stalled machine could see two at once.
                    rotations.fetch_add(if steps == 0 { 3 } else { steps }, Ordering::SeqCst);
                    last = now;
                }
                thread::sleep(Duration::from_millis(5));
            }
        })
    });
    let long = (long_tx != LongTx::None).then(|| {
        let (db, writers_stop) = (db.to_string(), writers_stop.clone());
        thread::spawn(move || {
            let mut c = Cluster::shared().client(&db);
            let max_tick = |c: &mut Client| -> i64 {
                c.query_one("SELECT max(tick_id) FROM pgq.tick", &[])
                    .unwrap()
                    .get(0)
            };
            let mut out = Vec::new();
            let mut k = 0i64;
            loop {
                let t0 = max_tick(&mut c);
                let mut tx = c.transaction().unwrap();
                let txid: i64 = tx.query_one("SELECT txid_current()", &[]).unwrap().get(0);
                let mut ids = BTreeSet::new();
                let mut i = 0i64;
                while i < 5
                    || !(writers_stop.load(Ordering::SeqCst)
                        || (long_tx == LongTx::Repeated && i >= 12))
                {
                    let id = 900_000_000 + k * 10_000 + i;
                    tx.execute("INSERT INTO t VALUES ($1, -1, 'long')", &[&id])
                        .unwrap();
                    ids.insert(id);
                    if i == 2 {
                        // A rolled-back subtransaction's events vanish with it.
                        tx.batch_execute("SAVEPOINT s").unwrap();
                        tx.execute("INSERT INTO t VALUES ($1, -1, 'sp')", &[&(990_000_000 + k)])
                            .unwrap();
                        tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
                    }
                    i += 1;
                    thread::sleep(Duration::from_millis(30));
                }
                tx.commit().unwrap();
                let t1 = max_tick(&mut c);
                out.push(LongTxResult {
                    txid,
                    ids,
                    ticks: t1 - t0,
                });
                if writers_stop.load(Ordering::SeqCst) {
                    return out;
                }
                k += 1;
            }
        })
    });
    let writers: Vec<_> = (0..3i64)
        .map(|w| {
            let (db, writers_stop) = (db.to_string(), writers_stop.clone());
            thread::spawn(move || {
                let mut c = Cluster::shared().client(&db);
                let (mut committed, mut rolled_back) = (BTreeSet::new(), BTreeSet::new());
                let mut next = w * 10_000_000;
                let mut n = 0usize;
                while !writers_stop.load(Ordering::SeqCst) && n < 20_000 {
                    let rows = 1 + (n % 7) as i64;
                    let ids: Vec<i64> = (next..next + rows).collect();
                    next += rows;
                    let mut tx = c.transaction().unwrap();
                    if n.is_multiple_of(2) {
                        tx.execute(
                            "INSERT INTO t SELECT i, $2, repeat('x', (i % 50)::int) FROM unnest($1::bigint[]) i",
                            &[&ids, &(w as i32)],
                        )
                        .unwrap();
                    } else {
                        for id in &ids {
                            tx.execute("INSERT INTO t VALUES ($1, $2, NULL)", &[id, &(w as i32)])
                                .unwrap();
                        }
                    }
                    if n % 5 == 3 {
                        tx.rollback().unwrap();
                        rolled_back.extend(ids);
                    } else {
                        tx.commit().unwrap();
                        committed.extend(ids);
                    }
                    n += 1;
                    if n.is_multiple_of(3) {
                        thread::sleep(Duration::from_millis(2));
                    }
                }
                (committed, rolled_back)
            })
        })
        .collect();

    // Let the writers run long enough: ~1.5 s, or until 4 rotations happened
    // (a loaded CI machine may need far longer than a quiet one).
    let want_rot = if ticking == Ticking::Thread { 0 } else { 4 };
    while start.elapsed() < Duration::from_millis(1500)
        || (rotations.load(Ordering::SeqCst) < want_rot
            && start.elapsed() < Duration::from_secs(30))
    {
        thread::sleep(Duration::from_millis(20));
    }
    writers_stop.store(true, Ordering::SeqCst);
    let (mut committed, mut rolled_back) = (BTreeSet::new(), BTreeSet::new());
    for h in writers {
        let (c, r) = h.join().expect("writer");
        committed.extend(c);
        rolled_back.extend(r);
    }
    let long_txs = long
        .map(|h| h.join().expect("long transactions"))
        .unwrap_or_default();
    for (k, l) in long_txs.iter().enumerate() {
        committed.extend(l.ids.iter().copied());
        rolled_back.insert(990_000_000 + k as i64);
    }

    // Everything committed must reach the consumer soon after a forced tick.
    let mut c = cl.client(db);
    c.execute("SELECT pgq.force_tick('q')", &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen: BTreeSet<i64> = events.lock().unwrap().iter().map(row_id).collect();
        if committed.is_subset(&seen) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "consumer still misses {} of {} committed rows, e.g. {:?}",
            committed.difference(&seen).count(),
            committed.len(),
            committed.difference(&seen).take(5).collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    if let Some(h) = ticker {
        h.join().expect("ticker");
    }
    consumer.join().expect("consumer");
    if let Some(h) = watcher {
        h.join().expect("rotation watcher");
    }
    let pgqd_log = pgqd.as_mut().map(|p| {
        let status = p.0.try_wait().expect("pgqd status");
        assert!(status.is_none(), "pgqd exited during the run: {status:?}");
        let _ = p.0.kill();
        let _ = p.0.wait();
        pgqd_dir.read("pgqd.log")
    });
    // Whatever is still queued (there should be nothing) counts too.
    let mut all = std::mem::take(&mut *events.lock().unwrap());
    all.extend(drain(&mut c, "q", "c"));
    eprintln!(
        "load ({ticking:?}): {} rows committed, {} rolled back, {} events, {} long transactions, {} rotations, {:.1}s",
        committed.len(),
        rolled_back.len(),
        all.len(),
        long_txs.len(),
        rotations.load(Ordering::SeqCst),
        start.elapsed().as_secs_f64()
    );
    LoadResult {
        committed,
        rolled_back,
        events: all,
        long_txs,
        rotations: rotations.load(Ordering::SeqCst),
        pgqd_log,
    }
}

/// Each committed row exactly once, no rolled-back row, nothing else.
fn assert_exactly_once(r: &LoadResult) {
    let mut count: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for e in &r.events {
        assert_eq!(e.typ, "I", "unexpected event {e:?}");
        count.entry(row_id(e)).or_default().push(e.batch);
    }
    let dups: Vec<_> = count.iter().filter(|(_, b)| b.len() > 1).take(5).collect();
    assert!(
        dups.is_empty(),
        "rows delivered more than once (id, batches): {dups:?}"
    );
    let ghosts: Vec<_> = count
        .keys()
        .filter(|id| r.rolled_back.contains(id))
        .take(5)
        .collect();
    assert!(ghosts.is_empty(), "rolled-back rows delivered: {ghosts:?}");
    let seen: BTreeSet<i64> = count.keys().copied().collect();
    assert_eq!(
        seen.difference(&r.committed).count(),
        0,
        "unknown rows delivered"
    );
    assert_eq!(seen, r.committed, "delivered rows != committed rows");
    assert!(
        !r.rolled_back.is_empty(),
        "the test must roll something back"
    );
    // Rows of one multi-row event share its ev_id; an event is in one batch only.
    let mut batch_of: HashMap<i64, i64> = HashMap::new();
    for e in &r.events {
        let b = *batch_of.entry(e.id).or_insert(e.batch);
        assert_eq!(b, e.batch, "event {} delivered in two batches", e.id);
    }
}

/// Every long transaction's events, and only they, in exactly one batch,
/// although the transaction stayed open over many ticks.
fn assert_long_txs_whole(r: &LoadResult) {
    assert!(!r.long_txs.is_empty(), "no long transaction ran");
    for l in &r.long_txs {
        // Two ticks while it was open is the case that matters (it sat in a
        // tick's xip); more depends on how busy the machine is.
        assert!(
            l.ticks >= 2,
            "long transaction {} spanned only {} ticks",
            l.txid,
            l.ticks
        );
        let evs: Vec<&Ev> = r.events.iter().filter(|e| e.txid == l.txid).collect();
        let ids: BTreeSet<i64> = evs.iter().map(|e| row_id(e)).collect();
        assert_eq!(ids, l.ids, "events of long transaction {}", l.txid);
        assert_eq!(
            evs.len(),
            l.ids.len(),
            "events of long transaction {}",
            l.txid
        );
        let batches: BTreeSet<i64> = evs.iter().map(|e| e.batch).collect();
        assert_eq!(
            batches.len(),
            1,
            "long transaction {} split over batches {batches:?}",
            l.txid
        );
    }
}

#[test]
fn batches_deliver_each_committed_event_exactly_once() {
    let (db, _c) = pgq_db("pgq_once");
    let r = run_load(&db, LongTx::One, Ticking::Thread);
    assert!(
        r.committed.len() > 200,
        "too little load: {}",
        r.committed.len()
    );
    assert_exactly_once(&r);
    assert_eq!(r.long_txs.len(), 1);
    assert_long_txs_whole(&r);
    let all_batches: BTreeSet<i64> = r.events.iter().map(|e| e.batch).collect();
    assert!(all_batches.len() > 5, "only {} batches", all_batches.len());
}

#[test]
fn rotation_under_load_loses_nothing() {
    let (db, _c) = pgq_db("pgq_rot");
    let r = run_load(&db, LongTx::None, Ticking::ThreadAndRotator);
    // Three rotations from table 0 end on table 0 again: the step that truncates
    // a table which held delivered events is the one that could lose any.
    assert!(
        r.rotations >= 3,
        "rotation never cycled through the tables: {} rotations",
        r.rotations
    );
    assert_exactly_once(&r);
}

/// The real daemon instead of test threads: `pgqd` ticks every 20 ms and
/// rotates the event tables (rotation_period 0.1 s, maint_period 0.1 s)
/// while writers commit and roll back, long transactions stay open over
/// many ticks and rotation periods, and the consumer now and then falls
/// behind for 0.6 s. A consumer using only next_batch / get_batch_events /
/// finish_batch gets every committed row exactly once.
#[test]
fn pgqd_ticking_and_rotating_delivers_each_event_exactly_once() {
    let (db, mut c) = pgq_db("pgq_pgqd_rot");
    let r = run_load(&db, LongTx::Repeated, Ticking::Pgqd);
    assert!(
        r.rotations >= 3,
        "pgqd never cycled through the event tables: {} rotations",
        r.rotations
    );
    assert!(
        r.committed.len() > 200,
        "too little load: {}",
        r.committed.len()
    );
    assert_exactly_once(&r);
    assert!(
        r.long_txs.len() >= 2,
        "only {} long transactions ran",
        r.long_txs.len()
    );
    assert_long_txs_whole(&r);
    let all_batches: BTreeSet<i64> = r.events.iter().map(|e| e.batch).collect();
    assert!(all_batches.len() > 5, "only {} batches", all_batches.len());
    // Rotation really emptied tables: fewer events are left than were delivered.
    let pfx: String = c
        .query_one(
            "SELECT queue_data_pfx FROM pgq.queue WHERE queue_name = 'q'",
            &[],
        )
        .unwrap()
        .get(0);
    let stored: i64 = c
        .query_one(&format!("SELECT count(*) FROM {pfx}"), &[])
        .unwrap()
        .get(0);
    let delivered: BTreeSet<i64> = r.events.iter().map(|e| e.id).collect();
    assert!(
        (stored as usize) < delivered.len(),
        "event tables still hold {stored} of {} delivered events",
        delivered.len()
    );
    let log = r.pgqd_log.as_deref().unwrap();
    assert!(
        log.contains(&format!("database {db}: ticking")),
        "pgqd log: {log}"
    );
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .collect();
    assert!(errors.is_empty(), "pgqd logged problems: {errors:#?}");
}

#[test]
fn retried_event_comes_back_to_its_consumer_only() {
    let (_db, mut c) = pgq_db("pgq_retry");
    c.batch_execute(
        "SELECT pgq.create_queue('q');
         SELECT pgq.register_consumer('q', 'c1');
         SELECT pgq.register_consumer('q', 'c2');",
    )
    .unwrap();
    c.batch_execute(
        "SELECT pgq.insert_event('q', 'a', 'one');
         SELECT pgq.insert_event('q', 'b', 'two');
         SELECT pgq.insert_event('q', 'c', 'three');",
    )
    .unwrap();
    c.execute("SELECT pgq.ticker('q')", &[]).unwrap();
    let (b1, evs1) = {
        let batch: i64 = c
            .query_one("SELECT pgq.next_batch('q', 'c1')", &[])
            .unwrap()
            .get(0);
        let evs: Vec<(i64, String)> = c
            .query(
                "SELECT ev_id, ev_data FROM pgq.get_batch_events($1)",
                &[&batch],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        (batch, evs)
    };
    assert_eq!(evs1.len(), 3);
    let two = evs1.iter().find(|e| e.1 == "two").unwrap().0;
    let n: i32 = c
        .query_one("SELECT pgq.event_retry($1, $2, 0)", &[&b1, &two])
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "event_retry");
    c.execute("SELECT pgq.finish_batch($1)", &[&b1]).unwrap();
    let evs2 = take_batch(&mut c, "q", "c2").expect("c2 batch").1;
    assert_eq!(evs2.len(), 3);

    let moved: i32 = c
        .query_one("SELECT pgq.maint_retry_events()", &[])
        .unwrap()
        .get(0);
    assert_eq!(moved, 1, "maint_retry_events");
    assert_eq!(
        c.query_one("SELECT count(*) FROM pgq.retry_queue", &[])
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    let again = drain(&mut c, "q", "c1");
    assert_eq!(again.len(), 1, "c1 gets the retried event again: {again:?}");
    assert_eq!(again[0].id, two, "same ev_id");
    assert_eq!(again[0].data, "two");
    assert_eq!(again[0].typ, "b");
    assert_eq!(again[0].retry, Some(1), "ev_retry counts the retries");
    let other = drain(&mut c, "q", "c2");
    assert!(other.is_empty(), "c2 must not see c1's retry: {other:?}");

    // A whole batch retried by c2 comes back to c2 only; c1 sees it once.
    c.execute("SELECT pgq.insert_event('q', 'd', 'four')", &[])
        .unwrap();
    c.execute("SELECT pgq.ticker('q')", &[]).unwrap();
    let batch: i64 = c
        .query_one("SELECT pgq.next_batch('q', 'c2')", &[])
        .unwrap()
        .get(0);
    let n: i32 = c
        .query_one("SELECT pgq.batch_retry($1, 0)", &[&batch])
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "batch_retry");
    c.execute("SELECT pgq.finish_batch($1)", &[&batch]).unwrap();
    c.execute("SELECT pgq.maint_retry_events()", &[]).unwrap();
    let c2: Vec<(String, Option<i32>)> = drain(&mut c, "q", "c2")
        .into_iter()
        .map(|e| (e.data, e.retry))
        .collect();
    assert_eq!(c2, vec![("four".to_string(), Some(1))]);
    let c1: Vec<(String, Option<i32>)> = drain(&mut c, "q", "c1")
        .into_iter()
        .map(|e| (e.data, e.retry))
        .collect();
    assert_eq!(c1, vec![("four".to_string(), None)]);
}

#[test]
fn key_change_emits_delete_then_update_and_pkless_update_fails() {
    let (_db, mut c) = pgq_db("pgq_keys");
    c.batch_execute(
        r#"SELECT pgq.create_queue('q');
         SELECT pgq.register_consumer('q', 'c');
         CREATE TABLE k (id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE, v text);
         INSERT INTO k VALUES (1, 'a'), (2, 'b'), (3, 'c');
         SELECT pgq.capture_create('q', 'k'::regclass);
         CREATE SCHEMA "Odd S";
         CREATE TABLE "Odd S"."Tab le" ("Id" int, "x,y" text, PRIMARY KEY ("Id"));
         SELECT pgq.capture_create('q', '"Odd S"."Tab le"'::regclass);
         CREATE TABLE nk (a int, b text);
         SELECT pgq.capture_create('q', 'nk'::regclass);"#,
    )
    .unwrap();
    c.batch_execute("UPDATE k SET v = 'bb' WHERE id = 2")
        .unwrap();
    // Keys {2,3} become {3,4}: only key 2 vanished.
    c.batch_execute("UPDATE k SET id = id + 1 WHERE id IN (2, 3)")
        .unwrap();
    c.batch_execute("UPDATE k SET id = 10 WHERE id = 1")
        .unwrap();
    c.batch_execute(r#"INSERT INTO "Odd S"."Tab le" VALUES (1, 'p"q')"#)
        .unwrap();
    c.batch_execute("INSERT INTO nk VALUES (1, 'x')").unwrap();
    for sql in ["UPDATE nk SET b = 'y'", "DELETE FROM nk"] {
        let e = c.batch_execute(sql).expect_err(sql);
        let msg = db_message(&e);
        assert!(msg.contains("no primary key"), "{sql}: {msg}");
    }
    // Statements that touch no row do not fail.
    c.batch_execute("UPDATE nk SET b = 'z' WHERE a = 42; DELETE FROM nk WHERE a = 42")
        .unwrap();
    assert_eq!(
        c.query_one("SELECT b FROM nk", &[])
            .unwrap()
            .get::<_, String>(0),
        "x"
    );

    let evs = drain(&mut c, "q", "c");
    // One statement per transaction: group by txid, in commit order. Within a
    // statement the row order is the executor's, but deletes come first.
    let mut groups: Vec<(i64, Vec<&Ev>)> = Vec::new();
    for e in &evs {
        match groups.last_mut() {
            Some((tx, g)) if *tx == e.txid => g.push(e),
            _ => groups.push((e.txid, vec![e])),
        }
    }
    let got: Vec<Vec<(&str, &str, Option<&str>)>> = groups
        .iter()
        .map(|(_, g)| {
            let types: Vec<&str> = g.iter().map(|e| e.typ.as_str()).collect();
            let mut sorted = types.clone();
            sorted.sort();
            assert_eq!(types, sorted, "deletes must precede updates: {g:?}");
            let mut v: Vec<_> = g
                .iter()
                .map(|e| (e.typ.as_str(), e.data.as_str(), e.extra1.as_deref()))
                .collect();
            v.sort();
            v
        })
        .collect();
    let k = Some("public.k");
    assert_eq!(
        got,
        vec![
            vec![("U", "(2,bb)", k)],
            vec![("D", "(2,bb)", k), ("U", "(3,bb)", k), ("U", "(4,c)", k)],
            vec![("D", "(1,a)", k), ("U", "(10,a)", k)],
            vec![("I", r#"(1,"p""q")"#, Some(r#""Odd S"."Tab le""#))],
            vec![("I", "(1,x)", Some("public.nk"))],
        ],
        "events: {evs:#?}"
    );
    let odd = &evs[6];
    assert_eq!(
        parse_columns(odd.extra2.as_deref().unwrap()).unwrap(),
        vec!["Id", "x,y"]
    );
    assert_eq!(
        parse_text_array(odd.extra3.as_deref().unwrap()).unwrap(),
        vec!["Id"]
    );
    assert_eq!(evs[7].extra3, None, "a pk-less table has no key columns");
}

#[test]
fn consumer_info_shows_pending_events_and_lag() {
    let (_db, mut c) = pgq_db("pgq_info");
    c.batch_execute(
        "SELECT pgq.create_queue('q');
         SELECT pgq.register_consumer('q', 'c');",
    )
    .unwrap();
    let info = |c: &mut Client| -> (i64, i64, Option<i64>) {
        let r = c
            .query_one(
                "SELECT last_tick, pending_events, current_batch FROM pgq.get_consumer_info('q', 'c')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    let (tick0, pending0, _) = info(&mut c);
    assert_eq!(pending0, 0);
    for i in 0..5 {
        c.execute("SELECT pgq.insert_event('q', 'x', $1)", &[&i.to_string()])
            .unwrap();
    }
    let (_, pending1, _) = info(&mut c);
    assert_eq!(pending1, 5, "pending before any tick");
    let tick: Option<i64> = c.query_one("SELECT pgq.ticker('q')", &[]).unwrap().get(0);
    assert!(tick.is_some(), "ticker must tick when there are events");
    let (qi_last, ev_new): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT last_tick_id, ev_new FROM pgq.get_queue_info('q')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(Some(qi_last), tick);
    assert_eq!(ev_new, 0);

    // The batch read through a cursor, as Skytools consumers do.
    let mut tx = c.transaction().unwrap();
    let r = tx
        .query_one(
            "SELECT batch_id, prev_tick_id, cur_tick_id FROM pgq.next_batch_info('q', 'c')",
            &[],
        )
        .unwrap();
    let (batch, prev, cur): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
    assert_eq!((prev, Some(cur)), (tick0, tick));
    let first: Vec<String> = tx
        .query(
            "SELECT ev_data FROM pgq.get_batch_cursor($1, 'bc', 2)",
            &[&batch],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(first, vec!["0", "1"]);
    let rest: Vec<String> = tx
        .query("FETCH ALL FROM bc", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(5))
        .collect();
    assert_eq!(rest, vec!["2", "3", "4"]);
    tx.commit().unwrap();
    let (_, _, open) = info(&mut c);
    assert_eq!(open, Some(batch), "current_batch while the batch is open");
    c.execute("SELECT pgq.finish_batch($1)", &[&batch]).unwrap();
    let (tick2, pending2, open2) = info(&mut c);
    assert_eq!(Some(tick2), tick, "last_tick advances to the batch end");
    assert!(tick2 > tick0);
    assert_eq!(pending2, 0);
    assert_eq!(open2, None);
}

/// One `pgq.ticker(queue)` call and what it decided on: the events counted
/// since the last tick, the lag since it and the gap between the last two
/// ticks (0 with one tick), all read in the ticker's own transaction, so
/// they are as of the same now().
#[derive(Debug, Clone)]
struct TickerCall {
    tick: Option<i64>,
    new_events: i64,
    lag: f64,
    gap: f64,
}

fn ticker_call(c: &mut Client, queue: &str) -> TickerCall {
    let mut tx = c.transaction().unwrap();
    let r = tx
        .query_one(
            "SELECT pgq._seq_last(q.queue_event_seq) - t.tick_event_seq,
                    extract(epoch FROM now() - t.tick_time)::float8,
                    coalesce(extract(epoch FROM t.tick_time - (
                        SELECT p.tick_time FROM pgq.tick p
                         WHERE p.tick_queue = q.queue_id AND p.tick_id < t.tick_id
                         ORDER BY p.tick_id DESC LIMIT 1))::float8, 0)
               FROM pgq.queue q JOIN pgq.tick t ON t.tick_queue = q.queue_id
              WHERE q.queue_name = $1 ORDER BY t.tick_id DESC LIMIT 1",
            &[&queue],
        )
        .unwrap();
    let tick: Option<i64> = tx
        .query_one("SELECT pgq.ticker($1)", &[&queue])
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    TickerCall {
        tick,
        new_events: r.get(0),
        lag: r.get(1),
        gap: r.get(2),
    }
}

/// The ticker's rules (see pgq.ticker in pgq.sql) when no transaction that
/// wrote events was open at the last tick: with pending events, tick once
/// there are ticker_max_count of them or ticker_max_lag has passed; on an
/// idle queue, not before max_lag / 2, then once ticker_idle_period has
/// passed or twice the previous gap between ticks (backoff).
fn tick_expected(t: &TickerCall, max_count: i64, max_lag: f64, idle: f64) -> bool {
    if t.new_events > 0 {
        t.new_events >= max_count || t.lag >= max_lag
    } else {
        t.lag >= max_lag / 2.0 && (t.lag >= idle || t.lag >= 2.0 * t.gap)
    }
}

/// Calls the ticker every 10 ms until it ticks (at most 10 s), checking each
/// decision against `tick_expected`; returns every call.
fn tick_until(
    c: &mut Client,
    queue: &str,
    max_count: i64,
    max_lag: f64,
    idle: f64,
) -> Vec<TickerCall> {
    let start = Instant::now();
    let mut calls = Vec::new();
    loop {
        let t = ticker_call(c, queue);
        assert_eq!(
            t.tick.is_some(),
            tick_expected(&t, max_count, max_lag, idle),
            "ticker decision for {t:?} (max_count {max_count}, max_lag {max_lag}s, idle_period {idle}s)"
        );
        let done = t.tick.is_some();
        calls.push(t);
        if done {
            return calls;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no tick after 10 s: {calls:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn set_config(c: &mut Client, queue: &str, param: &str, value: &str) {
    c.execute(
        "SELECT pgq.set_queue_config($1, $2, $3)",
        &[&queue, &param, &value],
    )
    .unwrap_or_else(|e| panic!("set_queue_config {param} = {value}: {}", db_message(&e)));
}

/// When `pgq.ticker(queue)` makes a tick: ticker_max_count pending events
/// tick at once, fewer wait for ticker_max_lag; an idle queue ticks with a
/// doubling backoff up to ticker_idle_period, never before max_lag / 2; and
/// a transaction that was open at the last tick and has committed since
/// makes a tick at once although no new event was counted.
#[test]
fn ticker_ticks_on_max_count_max_lag_and_idle_period() {
    let (db, mut c) = pgq_db("pgq_tickrules");
    c.batch_execute(
        "SELECT pgq.create_queue('q');
         SELECT pgq.register_consumer('q', 'c');",
    )
    .unwrap();
    set_config(&mut c, "q", "ticker_max_count", "5");
    set_config(&mut c, "q", "ticker_max_lag", "1 hour");
    set_config(&mut c, "q", "ticker_idle_period", "1 hour");
    let info: (i32, String, String) = {
        let r = c
            .query_one(
                "SELECT queue_ticker_max_count, queue_ticker_max_lag::text, \
                 queue_ticker_idle_period::text FROM pgq.get_queue_info('q')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(info, (5, "01:00:00".into(), "01:00:00".into()));
    let insert = |c: &mut Client, data: &str| {
        c.execute("SELECT pgq.insert_event('q', 'x', $1)", &[&data])
            .unwrap();
    };
    let batch_data = |c: &mut Client| -> Vec<String> {
        let (_, evs) = take_batch(c, "q", "c").expect("a batch");
        evs.into_iter().map(|e| e.data).collect()
    };

    // max_count: 4 pending events do not tick, the 5th does.
    let t = ticker_call(&mut c, "q");
    assert_eq!(t.tick, None, "an idle queue ticked: {t:?}");
    for i in 1..=4 {
        insert(&mut c, &format!("e{i}"));
    }
    let t = ticker_call(&mut c, "q");
    assert_eq!((t.tick, t.new_events), (None, 4), "{t:?}");
    insert(&mut c, "e5");
    let t = ticker_call(&mut c, "q");
    assert!(t.tick.is_some(), "5 events, max_count 5, no tick: {t:?}");
    assert!(t.lag < 60.0);
    assert_eq!(batch_data(&mut c), ["e1", "e2", "e3", "e4", "e5"]);
    assert!(take_batch(&mut c, "q", "c").is_none());

    // max_lag: 2 events (one of them in a transaction still open) wait for
    // 1.5 s since the last tick, then tick. The batch has the committed one.
    set_config(&mut c, "q", "ticker_max_lag", "1.5 s");
    let cl = Cluster::shared();
    let mut a = cl.client(&db);
    let mut open = a.transaction().unwrap();
    open.execute("SELECT pgq.insert_event('q', 'x', 'open')", &[])
        .unwrap();
    insert(&mut c, "late");
    let calls = tick_until(&mut c, "q", 5, 1.5, 3600.0);
    let (first, last) = (&calls[0], calls.last().unwrap());
    assert_eq!((first.tick, first.new_events), (None, 2), "{calls:?}");
    assert!(
        // Loose upper bounds: a busy CI machine may stall the polling loop.
        last.lag < 3.5,
        "ticked {}s after the last tick, max_lag 1.5 s",
        last.lag
    );
    assert_eq!(batch_data(&mut c), ["late"]);

    // No new event, but the open transaction commits: the next call ticks at
    // once (the idle rules alone would wait twice the 1.5 s gap).
    set_config(&mut c, "q", "ticker_max_lag", "0");
    let t = ticker_call(&mut c, "q");
    assert_eq!((t.tick, t.new_events), (None, 0), "{t:?}");
    assert!(t.gap >= 1.5 && t.lag < 2.0 * t.gap, "{t:?}");
    open.commit().unwrap();
    let t = ticker_call(&mut c, "q");
    assert!(
        t.tick.is_some(),
        "a committed transaction that was open at the last tick did not make a tick: {t:?}"
    );
    assert!(t.new_events == 0 && t.lag < 2.0 * t.gap, "{t:?}");
    assert_eq!(batch_data(&mut c), ["open"]);

    // An idle queue: ticks come with a doubling gap, capped at idle_period.
    c.batch_execute("SELECT pgq.create_queue('i')").unwrap();
    set_config(&mut c, "i", "ticker_max_count", "5");
    set_config(&mut c, "i", "ticker_max_lag", "0");
    set_config(&mut c, "i", "ticker_idle_period", "0.4 s");
    let idle = 0.4;
    let mut ticks = 0;
    while ticks < 12 {
        tick_until(&mut c, "i", 5, 0.0, idle);
        ticks += 1;
        let at_idle: i64 = c
            .query_one(
                "SELECT count(*) FROM (SELECT tick_time - lag(tick_time) OVER (ORDER BY tick_id) AS gap
                   FROM pgq.tick t JOIN pgq.queue q ON q.queue_id = t.tick_queue
                  WHERE q.queue_name = 'i') g WHERE gap >= '0.4 s'",
                &[],
            )
            .unwrap()
            .get(0);
        if at_idle >= 3 {
            break;
        }
    }
    let gaps: Vec<f64> = c
        .query(
            "SELECT extract(epoch FROM tick_time - lag(tick_time) OVER (ORDER BY tick_id))::float8
               FROM pgq.tick t JOIN pgq.queue q ON q.queue_id = t.tick_queue
              WHERE q.queue_name = 'i' ORDER BY tick_id OFFSET 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        gaps.iter().filter(|&&g| g >= idle).count() >= 3,
        "idle ticks never reached idle_period: gaps {gaps:?}"
    );
    for w in gaps.windows(2) {
        let due = (2.0 * w[0]).min(idle);
        assert!(
            w[1] >= due && w[1] < due + 1.0,
            "idle tick gap {} after a gap of {} (idle_period {idle}): gaps {gaps:?}",
            w[1],
            w[0]
        );
    }

    // max_lag 2 s: an idle queue does not tick before 1 s, idle_period or not.
    set_config(&mut c, "i", "ticker_max_lag", "2 s");
    let calls = tick_until(&mut c, "i", 5, 2.0, idle);
    let last = calls.last().unwrap();
    assert!(last.lag >= 1.0 && last.lag < 2.5, "{calls:?}");
    assert!(
        calls
            .iter()
            .any(|t| t.tick.is_none() && t.lag >= idle && t.lag >= 2.0 * t.gap),
        "no call was held back by max_lag / 2 alone: {calls:?}"
    );
}

/// txid_current_snapshot() leaves the calling transaction out of xip: a tick
/// taken in the same transaction as events (create_queue + insert_event, or
/// pgq.ticker() after writes) would count them as committed before the tick
/// once a later transaction has finished, and skip them. The tick records its
/// own txid as running (pgq._tick_snapshot).
#[test]
fn events_written_in_the_ticking_transaction_are_delivered() {
    let cl = Cluster::shared();
    let (db, mut a) = pgq_db("pgq_sametx");
    let mut b = cl.client(&db);
    // A transaction whose txid is below the snapshot's xmax (a later one has
    // finished): its tick must not count its own events as already done.
    let mut tx = a.transaction().unwrap();
    tx.execute("SELECT txid_current()", &[]).unwrap();
    b.execute("SELECT txid_current()", &[]).unwrap();
    tx.batch_execute(
        "SELECT pgq.create_queue('q');
         SELECT pgq.register_consumer('q', 'c');
         SELECT pgq.insert_event('q', 'x', 'with create_queue');",
    )
    .unwrap();
    tx.commit().unwrap();

    let mut tx = a.transaction().unwrap();
    tx.execute("SELECT txid_current()", &[]).unwrap();
    b.execute("SELECT txid_current()", &[]).unwrap();
    tx.batch_execute(
        "SELECT pgq.insert_event('q', 'x', 'before tick');
         SELECT pgq.force_tick('q');
         SELECT pgq.ticker('q');
         SELECT pgq.insert_event('q', 'x', 'after tick');",
    )
    .unwrap();
    tx.commit().unwrap();
    let got: Vec<String> = drain(&mut a, "q", "c")
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(got, vec!["with create_queue", "before tick", "after tick"]);
}

/// Column definitions of the type round-trip table (hstore appended when
/// the extension is available).
pub const RT_COLUMNS: &str =
    "id int PRIMARY KEY, n numeric, f8 float8, f4 float4, txt text, b bytea,
    d date, ts timestamp, tstz timestamptz, tm time, tmtz timetz, iv interval,
    ia int[], ta text[], comp pair, e mood, dom posint, r4 int4range, rtz tstzrange,
    mr int4multirange, j json, jb jsonb, ip inet, cid cidr, mac macaddr, pt point,
    bx box, pg polygon, ci circle, bt bit(5), vb varbit, x xml, u uuid, m money,
    m8 macaddr8, ln line, ls lseg, pa path, pc path";

/// A row with an odd value in every column (no id, no hstore).
pub const RT_ROW: &str = r#"
    '1234567890123456789012345678901234567890.123456789012345678901234567890123',
    '-0', '3.4028235e38',
    E'quote" apos'' back\\slash, comma (paren) {brace}\nnewline\ttab\r 😀 Ünï  ',
    '\x00ff5c2227225c'::bytea,
    'infinity', '2024-02-29 23:59:59.999999', '2024-06-01 12:34:56.789+05:45',
    '23:59:59.999999', '12:00:00.5+05:45', '1 year -2 mons 3 days -04:05:06.7',
    '[0:2]={1,NULL,3}', '{{a,"b c"},{"\"q\"",NULL}}', '(1,"x, \"y\" \\ z")',
    'happy ☺', 7, '[1,10)', '[2024-01-01 00:00+05:45,infinity)', '{[1,3),[5,8)}',
    '{ "a" :  [1, 2 ,3],"b":"x\u00e9" , "a": 0 }', '{"b": [1, {"c": null}], "a": "é"}',
    '192.168.1.5/24', '10.0.0.0/8', '08:00:2b:01:02:03', '(1.5,-2)', '(1,1),(0,0)',
    '((0,0),(1,1),(1,0))', '<(0,0),1.5>', B'10101', B'1', '<a b="1">t &amp; x</a>',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '12.34',
    '08:00:2b:01:02:03:04:05', '{1,-1,0.5}', '[(0,0),(1.5,-2)]', '[(0,0),(1,1),(2,0)]',
    '((0,0),(1,1),(2,0))'"#;

/// The network and geometric columns of rows 1 to 4 as PostgreSQL prints
/// them (extra_float_digits 3), then isopen(pa) and isclosed(pc).
const RT_GEO_EXPECTED: &[&str] = &[
    "1 | 08:00:2b:01:02:03:04:05 | {1,-1,0.5} | [(0,0),(1.5,-2)] | [(0,0),(1,1),(2,0)] | \
     ((0,0),(1,1),(2,0)) | (1.5,-2) | (1,1),(0,0) | ((0,0),(1,1),(1,0)) | <(0,0),1.5> | \
     192.168.1.5/24 | t | t",
    // A 6-byte MAC as macaddr8 gets ff:fe in the middle.
    "2 | 08:00:2b:ff:fe:01:02:03 | {0,1,-1e-310} | [(0.30000000000000004,1e+300),(-0,0)] | \
     [(0.1,0.2)] | ((1e-310,5e-324),(1.7976931348623157e+308,0)) | (-0,NaN) | \
     (Infinity,Infinity),(-Infinity,-Infinity) | ((0.30000000000000004,0)) | <(1e-310,-0),0> | \
     fe80::1/64 | t | t",
    // A line given by two points is stored as {A,B,C}.
    "3 | ff:ff:ff:ff:ff:ff:ff:ff | {1,-1,0} | [(Infinity,-Infinity),(1,1)] | \
     [(0,0),(-0,-0),(NaN,Infinity)] | ((0,0)) | (1e-310,-1.7976931348623157e+308) | \
     (0,0),(0,0) | ((0,0),(0,0),(0,0)) | <(0,0),1e-310> | ::ffff:1.2.3.4 | t | t",
    // Here pa holds a closed path and pc an open one; a box's corners are sorted.
    "4 | 08:00:2b:01:02:03:04:05 | {1,0,-0.30000000000000004} | [(1,1),(1,1)] | \
     ((1,2),(3,4),(5,6),(7,8),(9,10)) | [(-1e+308,1e+308)] | (0.1,0.2) | (3,4),(1,2) | \
     ((-1,-1),(1,1),(1,-1),(-1,1)) | <(0,0),Infinity> | 0.0.0.0/0 | f | f",
];

pub const RT_HSTORE: &str = r#"'"a"=>"1", "b c"=>NULL, "q\"k"=>"v,w"'"#;

/// Rows with special values in a few columns.
pub const RT_SPARSE: &[&str] = &[
    "(2, 'NaN', 'NaN', 'NaN', '', '\\x'::bytea, '4713-01-01 BC', '-infinity', 'infinity', '-178000000 years', '{}', '{}', '(,)', '[]', 'null', '',
      '08:00:2b:01:02:03', '{0,1,-1e-310}', '[(0.30000000000000004,1e300),(-0,0)]', '[(0.1,0.2)]', '((1e-310,5e-324),(1.7976931348623157e308,0))',
      '(-0,NaN)', '(Infinity,Infinity),(-Infinity,-Infinity)', '((0.30000000000000004,0))', '<(1e-310,-0),0>', 'fe80::1/64')",
    "(3, 'Infinity', '1e-310', '-0', 'NULL', NULL, '0001-01-01', '1999-12-31 23:59:59', '1970-01-01 00:00:00+00', '0', '{}', '{NULL,\"NULL\"}', '(,\"\")', '\"\"', '\"null\"', NULL,
      'ff:ff:ff:ff:ff:ff:ff:ff', '[(0,0),(1,1)]', '((Infinity,-Infinity),(1,1))', '[(0,0),(-0,-0),(NaN,Infinity)]', '((0,0))',
      '(1e-310,-1.7976931348623157e308)', '(0,0),(0,0)', '((0,0),(0,0),(0,0))', '<(0,0),1e-310>', '::ffff:1.2.3.4')",
    "(4, '-Infinity', 'Infinity', '1.4e-45', ' ', NULL, '5874897-12-31', '294276-12-31 23:59:59.999999', '-infinity', '-1 days +00:00:00.000001', '[-5:-4]={7,8}', '{\"\",\" \"}', '(-1,\"()\")', '  [ ]  ', '[]', '<x/>',
      '0800.2b01.0203.0405', '{1,0,-0.30000000000000004}', '[(1,1),(1,1)]', '((1,2),(3,4),(5,6),(7,8),(9,10))', '[(-1e308,1e308)]',
      '(0.1,0.2)', '(1,2),(3,4)', '((-1,-1),(1,1),(1,-1),(-1,1))', '<(0,0),Infinity>', '0.0.0.0/0')",
];
pub const RT_SPARSE_COLS: &str = "(id, n, f8, f4, txt, b, d, ts, tstz, iv, ia, ta, comp, j, jb, x,
    m8, ln, ls, pa, pc, pt, bx, pg, ci, ip)";

fn rt_setup(c: &mut Client) -> bool {
    let hstore = c
        .batch_execute("CREATE EXTENSION IF NOT EXISTS hstore")
        .is_ok();
    c.batch_execute(&format!(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy ☺');
         CREATE TYPE pair AS (a int, b text);
         CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE TABLE rt ({RT_COLUMNS}{});",
        if hstore { ", h hstore" } else { "" }
    ))
    .expect("create round-trip table");
    hstore
}

/// Column name -> type as SQL, of a table.
fn column_types(c: &mut Client, table: &str) -> HashMap<String, String> {
    c.query(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
        &[&table],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[test]
fn trigger_round_trips_every_type_family_exactly() {
    let cl = Cluster::shared();
    let (_src_db, mut src) = pgq_db("pgq_types_src");
    let hstore = rt_setup(&mut src);
    if !hstore {
        eprintln!("hstore extension unavailable: hstore column skipped");
    }
    src.batch_execute(
        "SELECT pgq.create_queue('q');
         SELECT pgq.register_consumer('q', 'c');
         SELECT pgq.capture_create('q', 'rt'::regclass);",
    )
    .unwrap();
    let full_row = |id: i32| {
        format!(
            "INSERT INTO rt VALUES ({id}, {RT_ROW}{})",
            if hstore {
                format!(", {RT_HSTORE}")
            } else {
                String::new()
            }
        )
    };
    // The writer's session settings are as odd as they get.
    src.batch_execute(ODD_SETTINGS).unwrap();
    src.batch_execute(&full_row(1)).unwrap();
    src.batch_execute(&format!(
        "INSERT INTO rt {RT_SPARSE_COLS} VALUES {}",
        RT_SPARSE.join(", ")
    ))
    .unwrap();
    src.batch_execute("INSERT INTO rt (id) VALUES (5)").unwrap();
    // The same values from a session with default settings.
    src.batch_execute("RESET ALL").unwrap();
    src.batch_execute(&full_row(6)).unwrap();

    let evs = drain(&mut src, "q", "c");
    assert_eq!(evs.len(), 6, "one event per row: {evs:#?}");
    let fields = |id: &str| -> Vec<Option<String>> {
        let e = evs
            .iter()
            .find(|e| row_id_str(e) == id)
            .unwrap_or_else(|| panic!("no event for row {id}"));
        parse_record(&e.data).unwrap()
    };
    // The text is the same whatever the writer's settings, except that a time
    // with time zone carries the writer's offset: the same instant either way.
    let cols = parse_columns(evs[0].extra2.as_deref().unwrap()).unwrap();
    let src_types = column_types(&mut src, "rt");
    src.batch_execute(EXACT_SETTINGS).unwrap();
    let (f1, f6) = (fields("1"), fields("6"));
    for (i, col) in cols.iter().enumerate().skip(1) {
        if f1[i] == f6[i] {
            continue;
        }
        let t = &src_types[col];
        assert!(
            t.contains("with time zone") || t.starts_with("tstz"),
            "event text of {col} ({t}) depends on the writer's session settings: {:?} vs {:?}",
            f1[i],
            f6[i]
        );
        let same: bool = src
            .query_one(
                &format!("SELECT ($1::text::{t})::text = ($2::text::{t})::text"),
                &[&f1[i], &f6[i]],
            )
            .unwrap()
            .get(0);
        assert!(
            same,
            "{col}: {:?} and {:?} are different values",
            f1[i], f6[i]
        );
    }
    // ... because it is written in exact forms.
    assert_eq!(f1[2].as_deref(), Some("-0"), "float8 -0");
    assert_eq!(f1[5].as_deref(), Some(r"\x00ff5c2227225c"), "bytea as hex");
    assert_eq!(f1[6].as_deref(), Some("infinity"));
    let ts: bool = src
        .query_one(
            "SELECT $1::text::timestamptz = '2024-06-01 06:49:56.789+00'",
            &[&f1[8]],
        )
        .unwrap()
        .get(0);
    assert!(ts, "timestamptz with its offset: {:?}", f1[8]);

    // A replica with the same table, fed by casting each field's text.
    let dst_db = unique_name("pgq_types_dst");
    cl.create_db(&dst_db);
    let mut dst = cl.client(&dst_db);
    assert_eq!(rt_setup(&mut dst), hstore);
    dst.batch_execute(EXACT_SETTINGS).unwrap();
    let types = column_types(&mut dst, "rt");
    for e in &evs {
        assert_eq!(e.typ, "I");
        assert_eq!(e.extra1.as_deref(), Some("public.rt"));
        assert_eq!(e.extra3.as_deref(), Some("{id}"));
        let cols = parse_columns(e.extra2.as_deref().unwrap()).unwrap();
        let vals = parse_record(&e.data).unwrap();
        assert_eq!(cols.len(), vals.len(), "{e:?}");
        let names: Vec<String> = cols.iter().map(|c| ident(c)).collect();
        let casts: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::text::{}", i + 1, types[c]))
            .collect();
        let sql = format!(
            "INSERT INTO rt ({}) SELECT {}",
            names.join(", "),
            casts.join(", ")
        );
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> = vals
            .iter()
            .map(|v| v as &(dyn postgres::types::ToSql + Sync))
            .collect();
        dst.execute(&sql, &params)
            .unwrap_or_else(|err| panic!("apply {}: {}", e.data, db_message(&err)));
    }

    // Same rows, compared exactly and as the odd session sees them.
    for settings in [EXACT_SETTINGS, ODD_SETTINGS] {
        src.batch_execute(settings).unwrap();
        dst.batch_execute(settings).unwrap();
        let (a, b) = (table_dump(&mut src, "rt"), table_dump(&mut dst, "rt"));
        assert_eq!(a.len(), 6);
        assert_eq!(a, b, "rows differ after the round trip ({settings})");
    }
    // Spot checks that the special values really are there.
    let check = |c: &mut Client, sql: &str| -> bool { c.query_one(sql, &[]).unwrap().get(0) };
    for c in [&mut src, &mut dst] {
        assert!(
            check(c, "SELECT f8 = 0 AND f8::text = '-0' FROM rt WHERE id = 1"),
            "-0"
        );
        assert!(
            check(c, "SELECT f8 > 0 AND f8 < 1e-300 FROM rt WHERE id = 3"),
            "subnormal"
        );
        assert!(check(c, "SELECT n = 'Infinity' FROM rt WHERE id = 3"));
        assert!(check(c, "SELECT d = '4713-01-01 BC' FROM rt WHERE id = 2"));
        assert!(check(
            c,
            "SELECT array_lower(ia, 1) = 0 FROM rt WHERE id = 1"
        ));
        assert!(check(
            c,
            "SELECT jb = 'null'::jsonb AND txt = '' FROM rt WHERE id = 2"
        ));
        assert!(check(
            c,
            "SELECT (comp).a IS NULL AND (comp).b = '' FROM rt WHERE id = 3"
        ));
    }
    // Network and geometric values, as text with exact floats.
    for c in [&mut src, &mut dst] {
        c.batch_execute(EXACT_SETTINGS).unwrap();
        let got: Vec<String> = c
            .query(
                "SELECT concat_ws(' | ', id, m8, ln, ls, pa, pc, pt, bx, pg, ci, ip, \
                 isopen(pa), isclosed(pc)) FROM rt WHERE id BETWEEN 1 AND 4 ORDER BY id",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(got, RT_GEO_EXPECTED, "network and geometric values");
    }
    let j: String = dst
        .query_one("SELECT j::text FROM rt WHERE id = 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(j, r#"{ "a" :  [1, 2 ,3],"b":"x\u00e9" , "a": 0 }"#);
}

fn row_id_str(e: &Ev) -> String {
    parse_record(&e.data).unwrap()[0]
        .clone()
        .unwrap_or_default()
}

/// Rows of a big statement travel in multi-row events of at most 1000 rows;
/// the column names follow ALTER TABLE in the writer's own session (whose
/// plans were made before the change); a renamed table keeps being captured
/// under the name it was added with.
#[test]
fn capture_handles_bulk_statements_ddl_and_rename() {
    let (_db, mut c) = pgq_db("pgq_ddl");
    queue_and_captured_t(&mut c);
    c.batch_execute("INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 2500) i")
        .unwrap();
    let n_events: i64 = c
        .query_one("SELECT count(*) FROM pgq.event_1 WHERE ev_type = 'I*'", &[])
        .unwrap()
        .get(0);
    assert_eq!(n_events, 3, "2500 rows make 3 multi-row events");
    c.batch_execute("UPDATE t SET id = id + 10000 WHERE id <= 1200")
        .unwrap();
    let evs = drain(&mut c, "q", "c");
    let count = |typ: &str| evs.iter().filter(|e| e.typ == typ).count();
    assert_eq!((count("I"), count("D"), count("U")), (2500, 1200, 1200));
    let inserted: BTreeSet<i64> = evs.iter().filter(|e| e.typ == "I").map(row_id).collect();
    assert_eq!(inserted, (1..=2500).collect());
    let deleted: BTreeSet<i64> = evs.iter().filter(|e| e.typ == "D").map(row_id).collect();
    assert_eq!(deleted, (1..=1200).collect());
    let updated: BTreeSet<i64> = evs.iter().filter(|e| e.typ == "U").map(row_id).collect();
    assert_eq!(updated, (10001..=11200).collect());

    let last = |c: &mut Client| -> (Vec<String>, String, String) {
        let e = drain(c, "q", "c").pop().expect("an event");
        (
            parse_columns(e.extra2.as_deref().unwrap()).unwrap(),
            e.data,
            e.extra1.unwrap(),
        )
    };
    c.batch_execute("ALTER TABLE t ADD COLUMN w int; INSERT INTO t VALUES (5000, 'a', 7)")
        .unwrap();
    assert_eq!(
        last(&mut c),
        (
            vec!["id".into(), "v".into(), "w".into()],
            "(5000,a,7)".into(),
            "public.t".into()
        )
    );
    c.batch_execute(
        r#"ALTER TABLE t DROP COLUMN v; ALTER TABLE t RENAME COLUMN w TO "odd ""w""";
           INSERT INTO t VALUES (5001, 8)"#,
    )
    .unwrap();
    assert_eq!(
        last(&mut c),
        (
            vec!["id".into(), "odd \"w\"".into()],
            "(5001,8)".into(),
            "public.t".into()
        )
    );
    c.batch_execute("ALTER TABLE t RENAME TO t2; INSERT INTO t2 VALUES (5002, 9)")
        .unwrap();
    assert_eq!(
        last(&mut c),
        (
            vec!["id".into(), "odd \"w\"".into()],
            "(5002,9)".into(),
            "public.t".into()
        )
    );
}
