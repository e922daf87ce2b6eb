//! Every supported major as source and target: a root on one PostgreSQL
//! version, a branch or leaf on another, fed by the tutorial's jobs while a
//! writer keeps changing the root, then the tutorial's changes (key updates,
//! deletes), a TRUNCATE and the type round-trip rows of `pgq.rs` that both
//! versions can hold. The servers come from `scripts/pg-builds` (npm builds,
//! cached); "system" is the shared cluster of the machine's own server.
//!
//! CI runs the oldest and newest majors into and out of the system server,
//! 10 into 18, the cut-over of `cutover` and the edge cases of `limits`;
//! `scripts/test-versions` runs every pair, replication and cut-over,
//! through the ignored `versions::pair` test.
//!
//! Rows are compared across versions by reading the source's rows (exact
//! text settings) into the target's row type on the target, so both sides
//! are printed by one server: 10 and 11 print floats with 17 digits, 12+
//! with the shortest exact form.

mod cutover;
pub(crate) mod limits;

use crate::harness::{Cluster, KillOnDrop, TestDir, poll_until, run, spawn, unique_name};
use crate::pgq::{EXACT_SETTINGS, RT_COLUMNS, RT_HSTORE, RT_ROW, RT_SPARSE, RT_SPARSE_COLS};
use crate::tutorial::{CHANGES, DATA, SCHEMA, ok, output_text};
use postgres::Client;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The round-trip table and the tutorial's, as the other tests name them.
const ALL_TABLES: &[&str] = &[
    "public.accounts",
    "public.order_lines",
    "public.events",
    "public.rt",
];

/// A cluster of the given major, or the shared system one for `None`.
pub enum Side {
    System,
    Own(Cluster),
}

impl Side {
    pub fn new(major: Option<u32>) -> Side {
        match major {
            None => Side::System,
            Some(m) => Side::Own(Cluster::start_major(m)),
        }
    }

    pub fn c(&self) -> &Cluster {
        match self {
            Side::System => Cluster::shared(),
            Side::Own(c) => c,
        }
    }
}

/// What the target node is.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Branch,
    Leaf,
}

/// The round-trip table's columns on a server of `major` with or without
/// hstore: multiranges only from 14.
fn rt_columns(major: u32, hstore: bool) -> String {
    let mut cols = RT_COLUMNS.to_string();
    if major < 14 {
        cols = cols.replace("mr int4multirange, ", "");
    }
    if hstore {
        cols.push_str(", h hstore");
    }
    cols
}

/// The round-trip rows as INSERTs that both majors (the older is `major`)
/// can hold: before 12 a float cannot be subnormal, before 14 a numeric
/// cannot be infinite, so those values are replaced by ordinary ones.
fn rt_inserts(major: u32, hstore: bool) -> Vec<String> {
    let mut full = RT_ROW.to_string();
    if major < 14 {
        full = full.replace(", '{[1,3),[5,8)}'", "");
    }
    if hstore {
        full = format!("{full}, {RT_HSTORE}");
    }
    let mut rows = vec![format!("INSERT INTO rt VALUES (1, {full})")];
    for r in RT_SPARSE {
        let mut r = r.to_string();
        if major < 12 {
            for (from, to) in [
                ("1e-310", "1e-300"),
                ("5e-324", "5e-300"),
                ("1.4e-45", "1.4e-30"),
            ] {
                r = r.replace(from, to);
            }
        }
        if major < 14 {
            r = r
                .replace("(3, 'Infinity',", "(3, 'NaN',")
                .replace("(4, '-Infinity',", "(4, 'NaN',");
        }
        rows.push(format!("INSERT INTO rt {RT_SPARSE_COLS} VALUES {r}"));
    }
    rows.push("INSERT INTO rt (id) VALUES (5)".into());
    rows.push(format!("INSERT INTO rt VALUES (6, {full})"));
    rows
}

/// The round-trip table's types and table (`major` is the older of the two
/// servers, so both get the same columns).
fn rt_schema(c: &mut Client, major: u32, hstore: bool) {
    if hstore {
        c.batch_execute("CREATE EXTENSION IF NOT EXISTS hstore")
            .expect("create extension hstore");
    }
    c.batch_execute(&format!(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy ☺');
         CREATE TYPE pair AS (a int, b text);
         CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE TABLE rt ({});",
        rt_columns(major, hstore)
    ))
    .expect("create the round-trip table");
}

/// Can hstore be created? (Not from pg_available_extensions: the npm build
/// of 10 ships control files with keys of newer servers, which that view
/// then fails to read.)
fn has_hstore(c: &Cluster) -> bool {
    let mut cl = c.client("postgres");
    let mut tx = cl.transaction().unwrap();
    tx.batch_execute("CREATE EXTENSION hstore").is_ok()
}

/// `table`'s rows of `src` as `dst` prints them: each source row read into
/// the target's row type there. Sorted, like `harness::table_dump`.
fn dump_via(src: &mut Client, dst: &mut Client, table: &str) -> Result<Vec<String>, String> {
    let rows: Vec<String> = src
        .query(&format!("SELECT t::text FROM {table} t"), &[])
        .map_err(|e| format!("dump {table}: {}", message(&e)))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let sql = format!(
        "SELECT v FROM (SELECT (x::{table})::text AS v FROM unnest($1::text[]) x) s ORDER BY v COLLATE \"C\""
    );
    Ok(dst
        .query(&sql, &[&rows])
        .map_err(|e| format!("read {table} rows into the target's type: {}", message(&e)))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

fn message(e: &postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

/// `None` when every table has the same rows on both servers.
fn cross_diff(
    src: &mut Client,
    dst: &mut Client,
    tables: &[&str],
) -> Result<Option<String>, String> {
    let mut diffs = Vec::new();
    for t in tables {
        let a = dump_via(src, dst, t)?;
        let b = crate::harness::table_dump(dst, t);
        if a != b {
            let only_a: Vec<&String> = a.iter().filter(|r| !b.contains(r)).take(3).collect();
            let only_b: Vec<&String> = b.iter().filter(|r| !a.contains(r)).take(3).collect();
            diffs.push(format!(
                "{t}: source {} rows, target {}; only in source {only_a:?}; only in target {only_b:?}",
                a.len(),
                b.len()
            ));
        }
    }
    Ok((!diffs.is_empty()).then(|| diffs.join("\n")))
}

fn exact(c: &Cluster, db: &str) -> Client {
    let mut cl = c.client(db);
    cl.batch_execute(EXACT_SETTINGS).unwrap();
    cl.batch_execute("SET lc_monetary = 'C'").unwrap();
    cl
}

fn wait_cross_equal(s: &Cluster, sdb: &str, t: &Cluster, tdb: &str, tables: &[&str], what: &str) {
    let (mut a, mut b) = (exact(s, sdb), exact(t, tdb));
    poll_until(what, Duration::from_secs(30), || {
        match cross_diff(&mut a, &mut b, tables)? {
            None => Ok(true),
            Some(d) => Err(d),
        }
    });
}

/// `londiste3 <ini> tables` lists every table as `ok`.
pub fn tables_ok(dir: &TestDir, ini: &str, tables: &[&str]) -> Result<bool, String> {
    let out = run("londiste3", &[ini, "tables"], dir.path());
    let text = output_text(&out);
    let all = tables.iter().all(|t| {
        text.lines()
            .any(|l| l.starts_with(t) && l.split_whitespace().nth(1) == Some("ok"))
    });
    if out.status.success() && all {
        Ok(true)
    } else {
        Err(text)
    }
}

/// The scenario: root on `source`, `kind` on `target` (None: the system
/// server), through the tutorial with a live writer, its changes, a
/// TRUNCATE and the type round trip.
fn replicate(source: Option<u32>, target: Option<u32>, kind: Kind) {
    let started = Instant::now();
    let (s, t) = (Side::new(source), Side::new(target));
    let (s, t) = (s.c(), t.c());
    let (smaj, tmaj) = (s.major(), t.major());
    let older = smaj.min(tmaj);
    let hstore = has_hstore(s) && has_hstore(t);
    if !hstore {
        eprintln!("hstore is missing on PostgreSQL {smaj} or {tmaj}: its column is left out");
    }
    let master = unique_name(&format!("v{smaj}_{tmaj}_master"));
    let slave = unique_name(&format!("v{smaj}_{tmaj}_target"));
    let (mconn, sconn) = (s.create_db(&master), t.create_db(&slave));
    let mut m = s.client(&master);
    m.batch_execute(&format!("{SCHEMA}{DATA}")).unwrap();
    rt_schema(&mut m, older, hstore);
    let mut sl = t.client(&slave);
    sl.batch_execute(SCHEMA).unwrap();
    rt_schema(&mut sl, older, hstore);

    let dir = TestDir::new();
    dir.tutorial_inis(&s.base_connstr(), &master, &mconn, &sconn, "");
    let d = dir.path();
    let (kind_cmd, node) = match kind {
        Kind::Branch => ("create-branch", "target"),
        Kind::Leaf => ("create-leaf", "target"),
    };
    let out = ok(
        "londiste3",
        &["master.ini", "create-root", "master", &mconn],
        d,
    );
    assert!(
        out.contains("Done"),
        "create-root on PostgreSQL {smaj}:\n{out}"
    );
    let provider = format!("--provider={mconn}");
    ok(
        "londiste3",
        &["slave.ini", kind_cmd, node, &sconn, &provider],
        d,
    );
    let _jobs = KillOnDrop(spawn(
        "londiste-rs",
        &["run", "ticker.ini", "master.ini", "slave.ini"],
        d,
    ));

    // A writer changes the root from before add-table until the copy is done.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, mut w) = (stop.clone(), s.client(&master));
        std::thread::spawn(move || {
            let mut i: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                w.batch_execute(&format!(
                    "insert into events values ({}, 'live', {i}, now(), true);
                     update accounts set balance = balance + 1 where id = {};",
                    5000 + i,
                    1 + i % 200
                ))
                .unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            i
        })
    };
    ok("londiste3", &["master.ini", "add-table", "--all"], d);
    ok("londiste3", &["slave.ini", "add-table", "--all"], d);
    poll_until(
        &format!("tables ok on the {tmaj} target"),
        Duration::from_secs(30),
        || tables_ok(&dir, "slave.ini", ALL_TABLES),
    );
    stop.store(true, Ordering::Relaxed);
    assert!(
        writer.join().unwrap() > 5,
        "the writer did not run during the copy"
    );
    wait_cross_equal(
        s,
        &master,
        t,
        &slave,
        ALL_TABLES,
        "the copy and live changes",
    );

    // Key changes, deletes, TRUNCATE, the round-trip types.
    m.batch_execute(CHANGES).unwrap();
    m.batch_execute(
        "truncate order_lines; insert into order_lines values (1, 1, 'after truncate', 1)",
    )
    .unwrap();
    for ins in rt_inserts(older, hstore) {
        m.batch_execute(&ins)
            .unwrap_or_else(|e| panic!("PostgreSQL {smaj}: {ins}: {e}"));
    }
    m.batch_execute("update rt set id = id + 100 where id = 6; delete from rt where id = 5")
        .unwrap();
    wait_cross_equal(
        s,
        &master,
        t,
        &slave,
        ALL_TABLES,
        "changes, truncate and types",
    );
    assert_eq!(
        t.psql(&slave, "select count(*) from rt"),
        "5",
        "round-trip rows on the target"
    );
    eprintln!(
        "versions: PostgreSQL {smaj} -> {tmaj} ({}) passed in {:.1} s",
        if kind == Kind::Branch {
            "branch"
        } else {
            "leaf"
        },
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn source_10_into_system() {
    replicate(Some(10), None, Kind::Branch);
}

#[test]
fn source_18_into_system() {
    replicate(Some(18), None, Kind::Branch);
}

#[test]
fn system_into_target_10_leaf() {
    replicate(None, Some(10), Kind::Leaf);
}

#[test]
fn system_into_target_18() {
    replicate(None, Some(18), Kind::Branch);
}

#[test]
fn source_10_into_18() {
    replicate(Some(10), Some(18), Kind::Branch);
}
/// One pair of the matrix, from `LONDISTE_VERSIONS_PAIR=SOURCE:TARGET`
/// (majors, or `system`); run by `scripts/test-versions`.
#[test]
#[ignore = "run by scripts/test-versions with LONDISTE_VERSIONS_PAIR=SOURCE:TARGET"]
fn pair() {
    let spec = std::env::var("LONDISTE_VERSIONS_PAIR")
        .expect("set LONDISTE_VERSIONS_PAIR=SOURCE:TARGET, e.g. 10:18");
    let major = |s: &str| -> Option<u32> {
        (s != "system").then(|| s.parse().unwrap_or_else(|_| panic!("bad major {s:?}")))
    };
    let (a, b) = spec.split_once(':').expect("SOURCE:TARGET");
    replicate(major(a), major(b), Kind::Branch);
    cutover::switchover_and_back(major(a), major(b));
}
