//! PgQ's permission model (src/sql/pgq_grants.sql): the roles pgq_reader,
//! pgq_writer and pgq_admin and their grants, an install that may not create
//! roles, and the queue functions PgQ's own regression suite checks beyond
//! the consumer API (helpers from pgq_producers.rs).

use crate::harness::{Cluster, TestDir, bin, unique_name};
use crate::pgq_producers::{err, ev, events, pgq_db, queue};
use postgres::{Client, NoTls};

/// The functions PgQ's suite checks: batch_event_tables, event_retry_raw,
/// seq_getval, next_batch_custom without a batch, maint_operations, the
/// per-transaction limit, and ids used up by refused inserts.
#[test]
fn pgq_functions_match_pgq() {
    let (_db, mut c) = pgq_db("prod_fns");
    queue(&mut c, "q");
    // The second batch: the first one spans the queue's creation.
    assert!(events(&mut c, "q").is_empty());
    c.batch_execute("SELECT pgq.ticker('q')").unwrap();
    let b: i64 = c
        .query_one("SELECT pgq.next_batch('q', 'c')", &[])
        .unwrap()
        .get(0);
    let tables: Vec<String> = c
        .query("SELECT pgq.batch_event_tables($1)", &[&b])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let qid: i32 = c
        .query_one("SELECT queue_id FROM pgq.queue", &[])
        .unwrap()
        .get(0);
    // The current table, and the previous one too while a transaction that
    // was running at the last rotation (here: the queue's creation; there may
    // be long transactions of other tests) can still be seen by the batch.
    let cur = format!("pgq.event_{qid}_0");
    assert!(
        tables.contains(&cur)
            && tables
                .iter()
                .all(|t| *t == cur || *t == format!("pgq.event_{qid}_2")),
        "{tables:?}"
    );
    c.execute("SELECT pgq.finish_batch($1)", &[&b]).unwrap();
    // No batch: every column NULL.
    let nulls: bool = c
        .query_one(
            "SELECT num_nonnulls(batch_id, cur_tick_id, prev_tick_id, cur_tick_time, prev_tick_time,
                                 cur_tick_event_seq, prev_tick_event_seq) = 0
               FROM pgq.next_batch_custom('q', 'c', '1 hour', NULL, NULL)",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(nulls, "next_batch_custom without a batch must be all NULL");
    // event_retry_raw: the event comes back to its consumer after the retry.
    let id: i64 = c
        .query_one(
            "SELECT pgq.event_retry_raw('q', 'c', now() - interval '1 s', 666, now(), 2, 'rt', 'data', 'x1', NULL, NULL, NULL)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(id, 666);
    let n: i32 = c
        .query_one("SELECT pgq.maint_retry_events()", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(
        events(&mut c, "q"),
        vec![ev("rt", "data", Some("x1"), None, None, None)]
    );
    // seq_getval is the sequence's last_value, as in PgQ.
    c.batch_execute("CREATE SEQUENCE s").unwrap();
    let v: i64 = c
        .query_one("SELECT pgq.seq_getval('s')", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, 1);
    // Per-transaction limit; refused events use up their ids.
    c.batch_execute("UPDATE pgq.queue SET queue_per_tx_limit = 2")
        .unwrap();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT pgq.insert_event('q', 'a', '1')", &[])
        .unwrap();
    let a2: i64 = tx
        .query_one("SELECT pgq.insert_event('q', 'a', '2')", &[])
        .unwrap()
        .get(0);
    let e = tx
        .batch_execute("SELECT pgq.insert_event('q', 'a', '3')")
        .unwrap_err();
    assert_eq!(
        e.as_db_error().unwrap().message(),
        "Queue 'q' allows max 2 events from one TX"
    );
    drop(tx);
    let ids: Vec<i64> = (0..2)
        .map(|_| {
            c.query_one("SELECT pgq.insert_event('q', 'b', 'x')", &[])
                .unwrap()
                .get(0)
        })
        .collect();
    // The refused event used up its id; each transaction has its own limit.
    assert_eq!(ids, vec![a2 + 2, a2 + 3]);
    // maint_operations: rotation step 1, then step 2, the extra operations.
    c.batch_execute(
        "UPDATE pgq.queue SET queue_rotation_period = '0', queue_extra_maint = ARRAY['x.y'];
         SELECT pg_sleep(0.01);",
    )
    .unwrap();
    let ops: Vec<(String, Option<String>)> = c
        .query(
            "SELECT func_name, func_arg FROM pgq.maint_operations()",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        ops[..3],
        [
            ("pgq.maint_rotate_tables_step1".into(), Some("q".into())),
            ("pgq.maint_rotate_tables_step2".into(), None),
            ("x.y".into(), Some("q".into())),
        ]
    );
}

/// Grants: the three roles exist (the shared cluster's installs run as a
/// superuser), producers cannot consume, consumers cannot produce, PUBLIC only
/// reads queue information; a writer's logutriga'd table writes events.
#[test]
fn roles_separate_producers_consumers_and_admins() {
    let cl = Cluster::shared();
    let (db, mut c) = pgq_db("prod_roles");
    let rows = c.query("SELECT pgq.missing_grants()", &[]).unwrap();
    let missing: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert!(missing.is_empty(), "{missing:?}");
    let tag = unique_name("r");
    let (adm, prod, cons, nobody) = (
        format!("{tag}_adm"),
        format!("{tag}_prod"),
        format!("{tag}_cons"),
        format!("{tag}_nobody"),
    );
    c.batch_execute(&format!(
        "CREATE ROLE {adm} LOGIN IN ROLE pgq_admin; CREATE ROLE {prod} LOGIN IN ROLE pgq_writer;
         CREATE ROLE {cons} LOGIN IN ROLE pgq_reader; CREATE ROLE {nobody} LOGIN;
         CREATE TABLE w (id int PRIMARY KEY, v text);
         CREATE TRIGGER l AFTER INSERT ON w FOR EACH ROW EXECUTE PROCEDURE pgq.logutriga('pq');
         GRANT INSERT ON w TO {prod}, {nobody};"
    ))
    .unwrap();
    let connect = |role: &str| {
        Client::connect(
            &format!("host=127.0.0.1 port={} user={role} dbname={db}", cl.port()),
            NoTls,
        )
        .unwrap()
    };
    let denied = |c: &mut Client, sql: &str, func: &str| {
        let m = err(c, sql);
        assert_eq!(m, format!("permission denied for function {func}"), "{sql}");
    };
    let mut a = connect(&adm);
    a.batch_execute("SELECT pgq.create_queue('pq')").unwrap();
    let mut k = connect(&cons);
    denied(&mut k, "SELECT pgq.create_queue('x')", "create_queue");
    denied(
        &mut k,
        "SELECT pgq.insert_event('pq', 't', 'd')",
        "insert_event",
    );
    denied(&mut k, "SELECT pgq.ticker()", "ticker");
    k.batch_execute("SELECT pgq.register_consumer('pq', 'k')")
        .unwrap();
    let mut p = connect(&prod);
    denied(&mut p, "SELECT pgq.create_queue('x')", "create_queue");
    denied(
        &mut p,
        "SELECT pgq.register_consumer('pq', 'p')",
        "register_consumer",
    );
    denied(&mut p, "SELECT pgq.next_batch('pq', 'k')", "next_batch");
    p.batch_execute(
        "SELECT pgq.insert_event('pq', 'direct', 'd'); INSERT INTO w VALUES (1, 'via trigger')",
    )
    .unwrap();
    // Events are read through the functions only, not from the tables.
    let e = err(&mut p, "SELECT * FROM pgq.event_template");
    assert!(e.starts_with("permission denied"), "{e}");
    a.batch_execute("SELECT pgq.ticker('pq')").unwrap();
    let mut n = connect(&nobody);
    // PUBLIC reads queue information but cannot produce, even through a trigger.
    let (qn, ticks): (String, i64) = {
        let r = n
            .query_one(
                "SELECT queue_name, last_tick_id FROM pgq.get_queue_info('pq')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((qn.as_str(), ticks > 0), ("pq", true));
    denied(&mut n, "INSERT INTO w VALUES (2, 'x')", "insert_event");
    denied(&mut n, "SELECT pgq.next_batch('pq', 'k')", "next_batch");
    // The consumer reads what the producer wrote.
    let b: i64 = k
        .query_one("SELECT pgq.next_batch('pq', 'k')", &[])
        .unwrap()
        .get(0);
    let got: Vec<(String, String)> = k
        .query(
            "SELECT ev_type, ev_data FROM pgq.get_batch_events($1) ORDER BY ev_id",
            &[&b],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("direct".to_string(), "d".to_string()),
            ("I:id".to_string(), "id=1&v=via+trigger".to_string())
        ]
    );
    // A cursor's extra_where runs with the consumer's rights, not the owner's.
    let mut tx = k.transaction().unwrap();
    let n_direct: i64 = tx
        .query_one(
            "SELECT count(*) FROM pgq.get_batch_cursor($1, 'cur', 10, 'ev_type = ''direct''')",
            &[&b],
        )
        .unwrap()
        .get(0);
    assert_eq!(n_direct, 1);
    let e = tx
        .batch_execute(&format!(
            "CLOSE cur; SELECT * FROM pgq.get_batch_cursor({b}, 'c2', 10, 'pgq.create_queue(''evil'') > 0')"
        ))
        .unwrap_err();
    assert_eq!(
        e.as_db_error().unwrap().message(),
        "permission denied for function create_queue"
    );
    drop(tx);
    k.execute("SELECT pgq.finish_batch($1)", &[&b]).unwrap();
    a.batch_execute("SELECT pgq.drop_queue('pq', true)")
        .unwrap();
    drop((a, p, k, n));
    c.batch_execute(&format!(
        "DROP TABLE w; DROP OWNED BY {adm}, {prod}, {cons}, {nobody}"
    ))
    .unwrap();
    drop(c);
    let mut su = cl.client("postgres");
    su.batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .unwrap();
    su.batch_execute(&format!("DROP ROLE {adm}, {prod}, {cons}, {nobody}"))
        .unwrap();
}

/// An installer that may not create roles: `install` says what to create,
/// pgq.missing_grants() lists it; once the roles exist, pgq.grant_roles()
/// completes the model. Its own cluster: roles are cluster-wide.
#[test]
fn install_without_createrole_says_what_to_grant() {
    let cl = Cluster::start();
    let mut su = cl.client("postgres");
    su.batch_execute("CREATE ROLE owner LOGIN NOSUPERUSER NOCREATEROLE")
        .unwrap();
    su.batch_execute("CREATE DATABASE d OWNER owner").unwrap();
    let dir = TestDir::new();
    let cs = format!("host=127.0.0.1 port={} user=owner dbname=d", cl.port());
    dir.write(
        "i.ini",
        &format!("[londiste3]\njob_name = i\nqueue_name = i\ndb = {cs}\n"),
    );
    let out = std::process::Command::new(bin())
        .args(["i.ini", "install"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    for r in ["pgq_reader", "pgq_writer", "pgq_admin"] {
        assert!(
            text.contains(&format!("role {r} does not exist"))
                && text.contains("SELECT pgq.grant_roles()"),
            "install output must say what to create:\n{text}"
        );
    }
    let mut c = Client::connect(&cs, NoTls).unwrap();
    let missing = |c: &mut Client| -> Vec<String> {
        c.query("SELECT pgq.missing_grants()", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(missing(&mut c).len(), 3, "{:?}", missing(&mut c));
    // Even without the roles, PUBLIC cannot produce or consume.
    su.batch_execute("CREATE ROLE someone LOGIN").unwrap();
    let mut s = Client::connect(
        &format!("host=127.0.0.1 port={} user=someone dbname=d", cl.port()),
        NoTls,
    )
    .unwrap();
    assert_eq!(
        err(&mut s, "SELECT pgq.insert_event('q', 't', 'd')"),
        "permission denied for function insert_event"
    );
    su.batch_execute(
        "CREATE ROLE pgq_reader; CREATE ROLE pgq_writer; CREATE ROLE pgq_admin IN ROLE pgq_reader, pgq_writer",
    )
    .unwrap();
    let v: Vec<String> = missing(&mut c);
    assert!(v.iter().all(|l| l.contains("lacks EXECUTE")), "{v:?}");
    c.batch_execute("SELECT pgq.grant_roles()").unwrap();
    assert!(missing(&mut c).is_empty(), "{:?}", missing(&mut c));
    su.batch_execute("GRANT pgq_writer TO someone").unwrap();
    let id: i64 = {
        c.batch_execute("SELECT pgq.create_queue('q')").unwrap();
        s.query_one("SELECT pgq.insert_event('q', 't', 'd')", &[])
            .unwrap()
            .get(0)
    };
    assert_eq!(id, 1);
}
