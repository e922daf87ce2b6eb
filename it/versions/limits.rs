//! The edges of the version matrix: install and upgrade on the oldest and
//! newest majors, generated columns across 12, and what an older target
//! cannot hold (a multirange type, an infinite numeric value).

use super::{Side, tables_ok};
use crate::harness::{Cluster, KillOnDrop, TestDir, poll_until, run, spawn, unique_name};
use crate::tutorial::{ok, output_text};
use std::time::Duration;

/// Install on a fresh database of `major`, then upgrade an installed schema
/// that says it is older: queued events survive, triggers are regenerated.
fn install_and_upgrade(major: u32) {
    let c = Cluster::start_major(major);
    let db = unique_name(&format!("v{major}_install"));
    let conn = c.create_db(&db);
    let mut cl = c.client(&db);
    cl.batch_execute("create table t (id int primary key, v text)")
        .unwrap();
    let dir = TestDir::new();
    dir.tutorial_inis(&c.base_connstr(), &db, &conn, &conn, "");
    let d = dir.path();
    // A role that may not create schemas is told so by the server's own
    // words, not a guess.
    cl.batch_execute("create role nocreate login").unwrap();
    let weak = conn.replace("user=postgres", "user=nocreate");
    dir.write(
        "weak.ini",
        &format!("[londiste3]\ndb = {weak}\nqueue_name = {db}\n"),
    );
    let out = run("londiste3", &["weak.ini", "create-root", "root", &weak], d);
    let text = output_text(&out);
    assert!(
        !out.status.success()
            && text.contains("cannot install the pgq schema: permission denied for database")
            && !text.contains("does this role"),
        "{text}"
    );
    ok(
        "londiste3",
        &["master.ini", "create-root", "root", &conn],
        d,
    );
    ok("londiste3", &["master.ini", "add-table", "public.t"], d);
    cl.batch_execute("insert into t values (1, 'queued before the upgrade')")
        .unwrap();
    let before = c.psql(&db, "select count(*) from pgq.event_template");
    cl.batch_execute("update pgq.schema_info set version = version - 1")
        .unwrap();
    let out = run("londiste3", &["master.ini", "tables"], d);
    assert!(
        out.status.success(),
        "tables on {major}:\n{}",
        output_text(&out)
    );
    let versions = c.psql(
        &db,
        "select string_agg(component || '=' || version, ',' order by component) from pgq.schema_info",
    );
    let expected = format!(
        "londiste={},pgq={}",
        londiste_rs::queue::install::LONDISTE_VERSION,
        londiste_rs::queue::install::PGQ_VERSION
    );
    assert_eq!(
        versions, expected,
        "schema versions after the upgrade on {major}"
    );
    assert_eq!(
        c.psql(&db, "select count(*) from pgq.event_template"),
        before,
        "queued events kept by the upgrade"
    );
    // The regenerated capture triggers still capture.
    cl.batch_execute("insert into t values (2, 'after')")
        .unwrap();
    assert_eq!(
        c.psql(
            &db,
            "select count(*) from pgq.event_template where ev_extra1 = 'public.t'"
        ),
        "2"
    );
}

#[test]
fn install_and_upgrade_on_10() {
    install_and_upgrade(10);
}

#[test]
fn install_and_upgrade_on_18() {
    install_and_upgrade(18);
}

/// A multirange column cannot go to a server older than 14: add-table stops
/// with table, column and type named, the target column left untouched.
#[test]
fn multirange_into_13_is_refused() {
    let (s, t) = (Side::new(Some(14)), Side::new(Some(13)));
    let (s, t) = (s.c(), t.c());
    let master = unique_name("v14_13_master");
    let slave = unique_name("v14_13_target");
    let (mconn, sconn) = (s.create_db(&master), t.create_db(&slave));
    s.client(&master)
        .batch_execute("create table mr (id int primary key, r int4multirange); insert into mr values (1, '{[1,3)}')")
        .unwrap();
    // The nearest the older server has: text, which would silently differ.
    t.client(&slave)
        .batch_execute("create table mr (id int primary key, r text)")
        .unwrap();
    let dir = root_and_leaf(s, &master, &mconn, &sconn);
    let d = dir.path();
    ok("londiste3", &["master.ini", "add-table", "public.mr"], d);
    // Refused at add-table already (the copy checks again, in case the
    // provider's table changes in between).
    let out = run("londiste3", &["slave.ini", "add-table", "public.mr"], d);
    let text = output_text(&out);
    assert!(!out.status.success(), "add-table must fail:\n{text}");
    assert!(
        text.contains(
            "cannot replicate public.mr: column \"r\" has type int4multirange, which PostgreSQL 13 does not have (multiranges came in 14)"
        ),
        "{text}"
    );
    assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
    assert_eq!(t.psql(&slave, "select count(*) from mr"), "0");
}

/// Generated columns (12+) across the 12 line: from 18, where `twice` is
/// generated, into 10, where it is a plain column that must get the values;
/// and from 10, where the application fills it, into 18, where it is
/// generated and computed there.
#[test]
fn generated_columns_across_12() {
    let (new, old) = (Side::new(Some(18)), Side::new(Some(10)));
    let (new, old) = (new.c(), old.c());
    let gen_t =
        "create table g (id int primary key, a int, twice int generated always as (a * 2) stored)";
    let plain_t = "create table g (id int primary key, a int, twice int)";
    for (s, t, s_sql, t_sql, ins) in [
        (new, old, gen_t, plain_t, "insert into g (id, a) values"),
        (
            old,
            new,
            plain_t,
            gen_t,
            "insert into g (id, a, twice) values",
        ),
    ] {
        let (smaj, tmaj) = (s.major(), t.major());
        let master = unique_name(&format!("gen{smaj}_master"));
        let slave = unique_name(&format!("gen{tmaj}_target"));
        let (mconn, sconn) = (s.create_db(&master), t.create_db(&slave));
        let mut m = s.client(&master);
        let row = |i: i32| {
            if ins.contains("twice") {
                format!("({i}, {i}, {})", i * 2)
            } else {
                format!("({i}, {i})")
            }
        };
        // Row 4 is only ever copied, never changed by an event.
        m.batch_execute(&format!(
            "{s_sql}; {ins} {}, {}, {}",
            row(1),
            row(2),
            row(4)
        ))
        .unwrap();
        t.client(&slave).batch_execute(t_sql).unwrap();
        let dir = root_and_leaf(s, &master, &mconn, &sconn);
        let d = dir.path();
        let _jobs = run_jobs(d);
        ok("londiste3", &["master.ini", "add-table", "public.g"], d);
        ok("londiste3", &["slave.ini", "add-table", "public.g"], d);
        poll_until("g ok on the target", Duration::from_secs(30), || {
            tables_ok(&dir, "slave.ini", &["public.g"])
        });
        m.batch_execute(&format!(
            "{ins} {}; update g set a = 10{} where id = 1; delete from g where id = 2",
            row(3),
            if ins.contains("twice") {
                ", twice = 20"
            } else {
                ""
            }
        ))
        .unwrap();
        poll_eq_target(
            t,
            &slave,
            "1|10|20,3|3|6,4|4|8",
            &format!("{smaj} -> {tmaj}"),
        );
    }
}

/// Waits until `g` on the target reads `expected` (rows as `id|a|twice`).
fn poll_eq_target(t: &Cluster, db: &str, expected: &str, what: &str) {
    crate::harness::poll_eq(
        &format!("g on the target ({what})"),
        Duration::from_secs(30),
        expected.to_string(),
        || {
            Ok(t.psql(
                db,
                "select string_agg(id || '|' || a || '|' || twice, ',' order by id) from g",
            ))
        },
    );
}

/// A value of a type both servers have that the older one cannot hold (an
/// infinite numeric, 14+, into 13) stops the batch with the target server's
/// own error naming table, type and value; the row is never changed into
/// another.
#[test]
fn infinite_numeric_into_13_stops_the_batch() {
    let (s, t) = (Side::new(Some(14)), Side::new(Some(13)));
    let (s, t) = (s.c(), t.c());
    let master = unique_name("vinf_master");
    let slave = unique_name("vinf_target");
    let (mconn, sconn) = (s.create_db(&master), t.create_db(&slave));
    let table = "create table n (id int primary key, v numeric)";
    let mut m = s.client(&master);
    m.batch_execute(&format!("{table}; insert into n values (1, 1.5)"))
        .unwrap();
    t.client(&slave).batch_execute(table).unwrap();
    let dir = root_and_leaf(s, &master, &mconn, &sconn);
    let d = dir.path();
    let _jobs = run_jobs(d);
    ok("londiste3", &["master.ini", "add-table", "public.n"], d);
    ok("londiste3", &["slave.ini", "add-table", "public.n"], d);
    poll_until("n ok on the target", Duration::from_secs(30), || {
        tables_ok(&dir, "slave.ini", &["public.n"])
    });
    m.batch_execute("insert into n values (2, 'Infinity'), (3, 3)")
        .unwrap();
    poll_until("the batch to fail on 13", Duration::from_secs(30), || {
        let log =
            std::fs::read_to_string(dir.path().join("londiste-rs.console")).unwrap_or_default();
        let hit = log
            .lines()
            .find(|l| l.contains("ERROR") && l.contains("Infinity"));
        match hit {
            Some(l)
                if l.contains("cannot insert into \"public\".\"n\"")
                    && l.contains("invalid input syntax for type numeric") =>
            {
                Ok(true)
            }
            Some(l) => Err(format!("error without the table: {l}")),
            None => Err(log.lines().rev().take(3).collect::<Vec<_>>().join("\n")),
        }
    });
    // Nothing of the failed batch is applied, nothing changed into another.
    assert_eq!(
        t.psql(
            &slave,
            "select string_agg(id || '=' || v, ',' order by id) from n"
        ),
        "1=1.5"
    );
}

/// A partitioned table on 10 cannot have a primary key on its parent (11+):
/// it replicates as one table with `--key`, into the system server, where
/// the target is a plain table with a key. (A key change that moves a row to
/// another partition is 11+, so the one here stays in its partition.)
#[test]
fn partitioned_table_from_10_with_key() {
    let (s, t) = (Side::new(Some(10)), Side::new(None));
    let (s, t) = (s.c(), t.c());
    let master = unique_name("vpart_master");
    let slave = unique_name("vpart_target");
    let (mconn, sconn) = (s.create_db(&master), t.create_db(&slave));
    let mut m = s.client(&master);
    m.batch_execute(
        "create table p (id int not null, v text) partition by range (id);
         create table p1 partition of p for values from (0) to (100);
         create table p2 partition of p for values from (100) to (1000);
         insert into p select i, 'v' || i from generate_series(1, 150) i;",
    )
    .unwrap();
    t.client(&slave)
        .batch_execute("create table p (id int primary key, v text)")
        .unwrap();
    let dir = root_and_leaf(s, &master, &mconn, &sconn);
    let d = dir.path();
    let _jobs = run_jobs(d);
    ok(
        "londiste3",
        &["master.ini", "add-table", "public.p", "--key=id"],
        d,
    );
    ok("londiste3", &["slave.ini", "add-table", "public.p"], d);
    poll_until("p ok on the target", Duration::from_secs(30), || {
        tables_ok(&dir, "slave.ini", &["public.p"])
    });
    m.batch_execute(
        "insert into p values (500, 'new'); update p set v = 'moved', id = id - 5 where id = 5;
         delete from p where id between 140 and 150; insert into p values (700, 'again')",
    )
    .unwrap();
    let sum = "select count(*) || '/' || sum(id) || '/' || string_agg(v, ',' order by id) from p";
    let want = s.psql(&master, sum);
    crate::harness::poll_eq(
        "p on the target to equal the partitioned source",
        Duration::from_secs(30),
        want,
        || Ok(t.psql(&slave, sum)),
    );
}

/// A root `master` in `mconn` (cluster `s`) and a leaf `target` in `sconn`,
/// with the tutorial's ini files.
pub(crate) fn root_and_leaf(s: &Cluster, master: &str, mconn: &str, sconn: &str) -> TestDir {
    let dir = TestDir::new();
    dir.tutorial_inis(&s.base_connstr(), master, mconn, sconn, "");
    let d = dir.path();
    ok(
        "londiste3",
        &["master.ini", "create-root", "master", mconn],
        d,
    );
    let provider = format!("--provider={mconn}");
    ok(
        "londiste3",
        &["slave.ini", "create-leaf", "target", sconn, &provider],
        d,
    );
    dir
}

/// The ticker and both workers in one process, killed on drop.
pub(crate) fn run_jobs(d: &std::path::Path) -> KillOnDrop {
    KillOnDrop(spawn(
        "londiste-rs",
        &["run", "ticker.ini", "master.ini", "slave.ini"],
        d,
    ))
}
