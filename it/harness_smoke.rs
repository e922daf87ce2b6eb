//! The harness itself: the shared cluster isolates tests by database, and a
//! private cluster survives a crash with its data, since crash tests rely on
//! both.

use crate::harness::{
    Cluster, TestDir, assert_tables_equal, poll_until, run, tables_diff, unique_name,
};
use std::time::Duration;

#[test]
fn shared_cluster_gives_isolated_databases() {
    let c = Cluster::shared();
    assert!(
        std::ptr::eq(c, Cluster::shared()),
        "one shared cluster per binary"
    );
    let (a, b) = (unique_name("smoke_a"), unique_name("smoke_b"));
    assert_ne!(a, b);
    assert_eq!(c.create_db(&a), c.connstr(&a));
    c.create_db(&b);

    let mut ca = c.client(&a);
    ca.batch_execute(
        "create table t (id int primary key, v text); insert into t values (1, 'x'), (2, null)",
    )
    .unwrap();
    assert_eq!(
        c.psql(&b, "select to_regclass('t') is null"),
        "t",
        "databases must not share tables"
    );

    let mut cb = c.client(&b);
    cb.batch_execute(
        "create table t (id int primary key, v text); insert into t values (2, null), (1, 'x')",
    )
    .unwrap();
    assert_tables_equal(&mut ca, &mut cb, "t");
    cb.batch_execute("update t set v = 'y' where id = 1")
        .unwrap();
    let msg = tables_diff(&mut ca, &mut cb, "public.t").expect("tables differ");
    assert!(msg.contains("only in source (1):\n    (1,x)"), "{msg}");
    assert!(msg.contains("only in destination (1):\n    (1,y)"), "{msg}");

    // create_db on an existing name starts over with an empty database.
    drop(ca);
    c.create_db(&a);
    assert_eq!(c.psql(&a, "select to_regclass('t') is null"), "t");

    // The binary runs under its symlinked names and in a test directory.
    let dir = TestDir::new();
    dir.write("x.ini", "[x]\n");
    assert_eq!(dir.read("x.ini"), "[x]\n");
    let out = run("pgqd", &["--version"], dir.path());
    assert!(out.status.code().is_some(), "killed by a signal: {out:?}");
}

#[test]
fn private_cluster_survives_immediate_stop() {
    let c = Cluster::start();
    assert_ne!(c.port(), Cluster::shared().port());
    let db = unique_name("smoke_crash");
    c.create_db(&db);
    // The harness sets synchronous_commit=off; ask for a durable commit so
    // the crash cannot lose it.
    c.client(&db)
        .batch_execute(
            "set synchronous_commit = on; create table t as select generate_series(1, 1000) as i",
        )
        .unwrap();

    c.stop_immediate();
    let cs = c.connstr(&db);
    assert!(
        postgres::Client::connect(&cs, postgres::NoTls).is_err(),
        "server still up"
    );
    c.start_again();
    assert_eq!(c.psql(&db, "select count(*), sum(i) from t"), "1000|500500");

    c.restart();
    poll_until(
        "the server accepts connections after restart",
        Duration::from_secs(30),
        || {
            postgres::Client::connect(&cs, postgres::NoTls)
                .map(|_| true)
                .map_err(|e| e.to_string())
        },
    );
}
