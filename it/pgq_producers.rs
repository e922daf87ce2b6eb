//! PgQ compatibility beyond the consumer API: the producer triggers
//! (`pgq.logutriga`, `pgq.sqltriga`, `pgq.jsontriga`, src/sql/pgq_triggers.sql)
//! with every argument (the roles and the functions PgQ's suite checks are in
//! pgq_grants.rs; `scripts/pgq-regress` runs that suite itself). Events are
//! read back the way a PgQ consumer reads them: next_batch, get_batch_events,
//! finish_batch.

use crate::harness::{Cluster, unique_name};
use londiste_rs::queue::install::install_pgq;
use postgres::Client;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)
pub(crate) type Ev = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

pub(crate) fn pgq_db(prefix: &str) -> (String, Client) {
    let db = unique_name(prefix);
    Cluster::shared().create_db(&db);
    let mut c = Cluster::shared().client(&db);
    install_pgq(&mut c).expect("install pgq");
    (db, c)
}

/// Queue `name` with consumer `c`, ticking at once.
pub(crate) fn queue(c: &mut Client, name: &str) {
    c.execute("SELECT pgq.create_queue($1)", &[&name]).unwrap();
    c.execute("SELECT pgq.register_consumer($1, 'c')", &[&name])
        .unwrap();
    c.execute(
        "UPDATE pgq.queue SET queue_ticker_max_lag = '0', queue_ticker_idle_period = '0' WHERE queue_name = $1",
        &[&name],
    )
    .unwrap();
}

/// Ticks and returns every event of the next batch (empty when none).
pub(crate) fn events(c: &mut Client, q: &str) -> Vec<Ev> {
    c.execute("SELECT pgq.ticker($1)", &[&q]).unwrap();
    let batch: Option<i64> = c
        .query_one("SELECT pgq.next_batch($1, 'c')", &[&q])
        .unwrap()
        .get(0);
    let Some(batch) = batch else { return vec![] };
    let evs = c
        .query(
            "SELECT ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4
               FROM pgq.get_batch_events($1) ORDER BY ev_id",
            &[&batch],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    c.execute("SELECT pgq.finish_batch($1)", &[&batch]).unwrap();
    evs
}

pub(crate) fn ev(
    t: &str,
    d: &str,
    e1: Option<&str>,
    e2: Option<&str>,
    e3: Option<&str>,
    e4: Option<&str>,
) -> Ev {
    let s = |x: Option<&str>| x.map(String::from);
    (t.into(), d.into(), s(e1), s(e2), s(e3), s(e4))
}

pub(crate) fn err(c: &mut Client, sql: &str) -> String {
    match c.batch_execute(sql) {
        Ok(()) => panic!("{sql}: expected an error"),
        Err(e) => e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or(e.to_string()),
    }
}

/// The three formats for INSERT, UPDATE, DELETE and TRUNCATE, on a table
/// whose values need quoting and encoding.
#[test]
fn producer_triggers_write_pgq_event_formats() {
    let (_db, mut c) = pgq_db("prod_fmt");
    for (trig, q) in [("logutriga", "lq"), ("sqltriga", "sq"), ("jsontriga", "jq")] {
        queue(&mut c, q);
        c.batch_execute(&format!(
            "CREATE TABLE t_{q} (id int4 PRIMARY KEY, txt text, flag bool, at timestamptz, n numeric);
             CREATE TRIGGER p AFTER INSERT OR UPDATE OR DELETE ON t_{q}
                 FOR EACH ROW EXECUTE PROCEDURE pgq.{trig}('{q}');
             CREATE TRIGGER r AFTER TRUNCATE ON t_{q}
                 FOR EACH STATEMENT EXECUTE PROCEDURE pgq.{trig}('{q}');"
        ))
        .unwrap();
    }
    for q in ["lq", "sq", "jq"] {
        c.batch_execute(&format!(
            "SET timezone = 'UTC';
             INSERT INTO t_{q} VALUES (1, 'a b&c=d/é''\\', true, '2020-01-02 03:04:05+00', 1.50);
             INSERT INTO t_{q} (id) VALUES (2);
             UPDATE t_{q} SET txt = 'x', flag = false WHERE id = 2;
             UPDATE t_{q} SET n = n WHERE id = 2;
             DELETE FROM t_{q} WHERE id = 1;
             TRUNCATE t_{q};"
        ))
        .unwrap();
    }
    let t = |q: &str| Some(format!("public.t_{q}"));
    let lq: Vec<Ev> = vec![
        (
            "I:id",
            "id=1&txt=a+b%26c%3dd%2f%c3%a9%27%5c&flag=t&at=2020-01-02+03%3a04%3a05%2b00&n=1.50",
        ),
        ("I:id", "id=2&txt&flag&at&n"),
        ("U:id", "id=2&txt=x&flag=f&at&n"),
        ("U:id", "id=2&txt=x&flag=f&at&n"),
        (
            "D:id",
            "id=1&txt=a+b%26c%3dd%2f%c3%a9%27%5c&flag=t&at=2020-01-02+03%3a04%3a05%2b00&n=1.50",
        ),
        ("R", ""),
    ]
    .into_iter()
    .map(|(a, b)| (a.into(), b.into(), t("lq"), None, None, None))
    .collect();
    assert_eq!(events(&mut c, "lq"), lq);
    let sq: Vec<Ev> = vec![
        ("I", "(id,txt,flag,at,n) values ('1',E'a b&c=d/é''\\\\','t','2020-01-02 03:04:05+00','1.50')"),
        ("I", "(id,txt,flag,at,n) values ('2',null,null,null,null)"),
        ("U", "txt='x',flag='f' where id='2'"),
        // Nothing changed: the first key set to itself.
        ("U", "id='2' where id='2'"),
        ("D", "id='1'"),
        ("R", ""),
    ]
    .into_iter()
    .map(|(a, b)| (a.into(), b.into(), t("sq"), None, None, None))
    .collect();
    assert_eq!(events(&mut c, "sq"), sq);
    let jt = |op: &str| format!(r#"{{"op":"{op}","table":["public","t_jq"],"pkey":["id"]}}"#);
    let row1 =
        r#"{"id":1,"txt":"a b&c=d/é'\\","flag":true,"at":"2020-01-02T03:04:05+00:00","n":"1.50"}"#;
    let jq: Vec<Ev> = vec![
        (jt("INSERT"), row1.to_string()),
        (
            jt("INSERT"),
            r#"{"id":2,"txt":null,"flag":null,"at":null,"n":null}"#.into(),
        ),
        (
            jt("UPDATE"),
            r#"{"id":2,"txt":"x","flag":false,"at":null,"n":null}"#.into(),
        ),
        (
            jt("UPDATE"),
            r#"{"id":2,"txt":"x","flag":false,"at":null,"n":null}"#.into(),
        ),
        (jt("DELETE"), row1.to_string()),
        (jt("TRUNCATE"), "{}".into()),
    ]
    .into_iter()
    .map(|(a, b)| (a, b, t("jq"), None, None, None))
    .collect();
    assert_eq!(events(&mut c, "jq"), jq);
}

/// backup, ignore, pkey, when, ev_* arguments and _pgq_ev_* columns.
#[test]
fn producer_trigger_arguments() {
    let (_db, mut c) = pgq_db("prod_args");
    queue(&mut c, "q");
    c.batch_execute(
        "CREATE TABLE b (id int PRIMARY KEY, v text);
         CREATE TRIGGER l AFTER UPDATE ON b FOR EACH ROW EXECUTE PROCEDURE pgq.logutriga('q', 'backup');
         CREATE TRIGGER s AFTER UPDATE ON b FOR EACH ROW EXECUTE PROCEDURE pgq.sqltriga('q', 'backup');
         CREATE TRIGGER z AFTER UPDATE ON b FOR EACH ROW EXECUTE PROCEDURE pgq.jsontriga('q', 'backup');
         INSERT INTO b VALUES (1, 'old');
         UPDATE b SET v = 'new';",
    )
    .unwrap();
    let tb = Some("public.b");
    assert_eq!(
        events(&mut c, "q"),
        vec![
            ev("U:id", "id=1&v=new", tb, Some("id=1&v=old"), None, None),
            ev(
                "U",
                "v='new' where id='1'",
                tb,
                Some("id=1&v=old"),
                None,
                None
            ),
            ev(
                r#"{"op":"UPDATE","table":["public","b"],"pkey":["id"]}"#,
                r#"{"id":1,"v":"new"}"#,
                tb,
                Some(r#"{"id":1,"v":"old"}"#),
                None,
                None
            ),
        ]
    );
    // ignore=: the column is not in the event; changing only it writes none.
    c.batch_execute(
        "CREATE TABLE i (id int PRIMARY KEY, v text, noise text);
         CREATE TRIGGER l AFTER INSERT OR UPDATE ON i FOR EACH ROW EXECUTE PROCEDURE pgq.logutriga('q', 'ignore=noise');
         INSERT INTO i VALUES (1, 'a', 'n1');
         UPDATE i SET noise = 'n2';
         UPDATE i SET v = 'b', noise = 'n3';",
    )
    .unwrap();
    let ti = Some("public.i");
    assert_eq!(
        events(&mut c, "q"),
        vec![
            ev("I:id", "id=1&v=a", ti, None, None, None),
            ev("U:id", "id=1&v=b", ti, None, None, None),
        ]
    );
    // pkey= on a table without a primary key; when= filters rows.
    c.batch_execute(
        "CREATE TABLE k (a int, b text, c text);
         CREATE TRIGGER s AFTER INSERT OR UPDATE OR DELETE ON k FOR EACH ROW
             EXECUTE PROCEDURE pgq.sqltriga('q', 'pkey=a,b', 'when=c <> ''skip''');
         INSERT INTO k VALUES (1, 'x', 'keep'), (2, 'y', 'skip');
         UPDATE k SET c = 'kept' WHERE a = 1;
         DELETE FROM k;",
    )
    .unwrap();
    let tk = Some("public.k");
    assert_eq!(
        events(&mut c, "q"),
        vec![
            ev("I", "(a,b,c) values ('1','x','keep')", tk, None, None, None),
            ev("U", "c='kept' where a='1' and b='x'", tk, None, None, None),
            ev("D", "a='1' and b='x'", tk, None, None, None),
        ]
    );
    // ev_* arguments are SQL on the row and win over _pgq_ev_* columns,
    // which are not data.
    c.batch_execute(
        "CREATE TABLE x (id int PRIMARY KEY, v text, _pgq_ev_extra3 text DEFAULT 'col3',
                         _pgq_ev_type text DEFAULT 'coltype');
         CREATE TRIGGER j AFTER INSERT ON x FOR EACH ROW EXECUTE PROCEDURE
             pgq.jsontriga('q', 'ev_extra1=v || ''!''', 'ev_extra4=(id * 10)::text', 'ev_type=''argtype''');
         INSERT INTO x (id, v) VALUES (7, 'hi');",
    )
    .unwrap();
    assert_eq!(
        events(&mut c, "q"),
        vec![ev(
            "argtype",
            r#"{"id":7,"v":"hi"}"#,
            Some("hi!"),
            None,
            Some("col3"),
            Some("70")
        )]
    );
}

/// deny, SKIP, session_replication_role and the errors.
#[test]
fn producer_trigger_refusals_and_roles() {
    let (_db, mut c) = pgq_db("prod_deny");
    queue(&mut c, "q");
    c.batch_execute(
        "CREATE TABLE d (id int PRIMARY KEY);
         CREATE TRIGGER d AFTER INSERT OR UPDATE OR DELETE ON d FOR EACH ROW EXECUTE PROCEDURE pgq.logutriga('q', 'deny');
         CREATE TRIGGER r AFTER TRUNCATE ON d FOR EACH STATEMENT EXECUTE PROCEDURE pgq.logutriga('q', 'deny');",
    )
    .unwrap();
    assert_eq!(
        err(&mut c, "INSERT INTO d VALUES (1)"),
        "Table 'public.d' to queue 'q': change not allowed (INSERT)"
    );
    assert_eq!(
        err(&mut c, "TRUNCATE d"),
        "Table 'public.d' to queue 'q': change not allowed (TRUNCATE)"
    );
    // 'local' writes pass without events, even through deny.
    c.batch_execute("SET session_replication_role = 'local'; INSERT INTO d VALUES (2); RESET session_replication_role")
        .unwrap();
    // SKIP in a BEFORE trigger: the event is written, the row is not.
    c.batch_execute(
        "CREATE TABLE s (id int PRIMARY KEY, v text);
         CREATE TRIGGER s BEFORE INSERT ON s FOR EACH ROW EXECUTE PROCEDURE pgq.logutriga('q', 'SKIP');
         INSERT INTO s VALUES (1, 'only in the queue');",
    )
    .unwrap();
    let n: i64 = c.query_one("SELECT count(*) FROM s", &[]).unwrap().get(0);
    assert_eq!(n, 0, "SKIP must skip the insert itself");
    assert_eq!(
        events(&mut c, "q"),
        vec![ev(
            "I:id",
            "id=1&v=only+in+the+queue",
            Some("public.s"),
            None,
            None,
            None
        )]
    );
    c.batch_execute(
        "CREATE TABLE e (id int PRIMARY KEY, v text);
         CREATE TABLE nk (v text);
         CREATE TRIGGER a AFTER INSERT OR UPDATE ON e FOR EACH ROW EXECUTE PROCEDURE pgq.sqltriga('q');
         CREATE TRIGGER a AFTER INSERT OR UPDATE ON nk FOR EACH ROW EXECUTE PROCEDURE pgq.jsontriga('q');
         INSERT INTO e VALUES (1, 'a'); INSERT INTO nk VALUES ('a');",
    )
    .unwrap();
    assert_eq!(
        err(&mut c, "UPDATE e SET id = 2"),
        "primary key update not allowed"
    );
    assert_eq!(
        err(&mut c, "UPDATE nk SET v = 'b'"),
        "Update/Delete on table without pkey"
    );
    for (args, msg) in [
        (
            "'q', 'colour=blue'",
            "bad param to pgq trigger: colour=blue",
        ),
        (
            "'q', 'pkey=nosuch'",
            "column \"nosuch\" of pkey= or ignore= is not a column of table public.e",
        ),
        ("'q', 'SKIP'", "SKIP does not work in AFTER trigger."),
        ("", "pgq trigger must have destination queue as argument"),
    ] {
        c.batch_execute(&format!(
            "DROP TRIGGER IF EXISTS b ON e;
             CREATE TRIGGER b AFTER INSERT ON e FOR EACH ROW EXECUTE PROCEDURE pgq.logutriga({args})"
        ))
        .unwrap();
        assert_eq!(
            err(&mut c, "INSERT INTO e VALUES (9, 'z')"),
            msg,
            "args {args}"
        );
    }
    // A disabled queue refuses the trigger's insert_event.
    c.batch_execute("DROP TRIGGER b ON e; UPDATE pgq.queue SET queue_disable_insert = true")
        .unwrap();
    assert_eq!(
        err(&mut c, "INSERT INTO e VALUES (3, 'c')"),
        "Insert into queue disallowed"
    );
}

/// A table captured with pgq.logutriga feeds a consumer written against the
/// PgQ API (next_batch / get_batch_events / finish_batch), with writers and a
/// ticker running concurrently and the event tables rotating: every change
/// arrives exactly once.
#[test]
fn logutriga_feeds_a_pgq_consumer_exactly_once() {
    let (db, mut c) = pgq_db("prod_once");
    queue(&mut c, "q");
    c.batch_execute(
        "UPDATE pgq.queue SET queue_rotation_period = '0';
         CREATE TABLE acct (id int PRIMARY KEY, n int NOT NULL);
         CREATE TRIGGER l AFTER INSERT OR UPDATE OR DELETE ON acct
             FOR EACH ROW EXECUTE PROCEDURE pgq.logutriga('q');",
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    const WRITERS: i32 = 3;
    const ROWS: i32 = 60;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = db.clone();
            thread::spawn(move || {
                let mut c = Cluster::shared().client(&db);
                for i in 0..ROWS {
                    let id = w * 1000 + i;
                    let mut tx = c.transaction().unwrap();
                    tx.execute("INSERT INTO acct VALUES ($1, 0)", &[&id])
                        .unwrap();
                    tx.execute("UPDATE acct SET n = 1 WHERE id = $1", &[&id])
                        .unwrap();
                    if i % 3 == 0 {
                        tx.execute("DELETE FROM acct WHERE id = $1", &[&id])
                            .unwrap();
                    }
                    tx.commit().unwrap();
                }
            })
        })
        .collect();
    let ticker = {
        let (db, stop) = (db.clone(), stop.clone());
        thread::spawn(move || {
            let mut c = Cluster::shared().client(&db);
            let (mut rotations, mut last) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                c.batch_execute("SELECT pgq.ticker()").unwrap();
                // Rotation as pgqd runs it: each step in its own transaction.
                c.batch_execute("SELECT pgq.maint_rotate_tables_step1('q')")
                    .unwrap();
                c.batch_execute("SELECT pgq.maint_rotate_tables_step2()")
                    .unwrap();
                let cur: i32 = c
                    .query_one(
                        "SELECT queue_cur_table FROM pgq.queue WHERE queue_name = 'q'",
                        &[],
                    )
                    .unwrap()
                    .get(0);
                if cur != last {
                    (rotations, last) = (rotations + 1, cur);
                }
                thread::sleep(Duration::from_millis(5));
            }
            rotations
        })
    };
    // The consumer: (id, op, n) -> times seen.
    let mut seen: BTreeMap<(i32, String, Option<i32>), usize> = BTreeMap::new();
    let want = (WRITERS * ROWS * 2 + WRITERS * ((ROWS + 2) / 3)) as usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut total = 0;
    while total < want {
        assert!(
            Instant::now() < deadline,
            "only {total} of {want} events arrived"
        );
        let b: Option<i64> = c
            .query_one("SELECT pgq.next_batch('q', 'c')", &[])
            .unwrap()
            .get(0);
        let Some(b) = b else {
            thread::sleep(Duration::from_millis(5));
            continue;
        };
        for r in c
            .query(
                "SELECT ev_type, ev_data, ev_extra1 FROM pgq.get_batch_events($1)",
                &[&b],
            )
            .unwrap()
        {
            let (t, d, e1): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            assert_eq!(e1, "public.acct");
            let fields: BTreeMap<&str, &str> = d
                .split('&')
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .collect();
            let id: i32 = fields["id"].parse().unwrap();
            let n: Option<i32> = fields.get("n").and_then(|v| v.parse().ok());
            *seen.entry((id, t, n)).or_default() += 1;
            total += 1;
        }
        c.execute("SELECT pgq.finish_batch($1)", &[&b]).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let rotations = ticker.join().unwrap();
    assert!(
        rotations >= 2,
        "the event tables rotated only {rotations} times"
    );
    // Nothing more arrives, and every change arrived exactly once.
    c.batch_execute("SELECT pgq.force_tick('q'); SELECT pgq.ticker('q')")
        .unwrap();
    while let Some(b) = c
        .query_one("SELECT pgq.next_batch('q', 'c')", &[])
        .unwrap()
        .get::<_, Option<i64>>(0)
    {
        let n: i64 = c
            .query_one("SELECT count(*) FROM pgq.get_batch_events($1)", &[&b])
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "events beyond the expected ones");
        c.execute("SELECT pgq.finish_batch($1)", &[&b]).unwrap();
    }
    let dup: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(dup.is_empty(), "events seen more than once: {dup:?}");
    for w in 0..WRITERS {
        for i in 0..ROWS {
            let id = w * 1000 + i;
            assert!(
                seen.contains_key(&(id, "I:id".into(), Some(0))),
                "insert of {id}"
            );
            assert!(
                seen.contains_key(&(id, "U:id".into(), Some(1))),
                "update of {id}"
            );
            assert_eq!(
                seen.contains_key(&(id, "D:id".into(), Some(1))),
                i % 3 == 0,
                "delete of {id}"
            );
        }
    }
}
