//! `fkeys` and `status` on a leaf: the foreign key a copy dropped is shown
//! waiting while another table's copy fails, and restored (and back in the
//! catalog) once that table is fixed and every table is in sync; `status` of
//! an idle, caught-up leaf says "up to date" however old the last tick is,
//! and a real lag with the ticks behind when the leaf is paused under a write.

use crate::harness::{Cluster, poll_until};
use crate::repl::Repl;
use crate::tutorial::{ok, wait_equal};
use std::time::Duration;

const SCHEMA: &str = "
    CREATE TABLE parent (id int PRIMARY KEY);
    CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent);
";

#[test]
fn fkeys_shows_keys_waiting_then_restored() {
    let master = format!(
        "{SCHEMA} CREATE TABLE broken (id int PRIMARY KEY, c int);
         INSERT INTO parent SELECT generate_series(1, 10);
         INSERT INTO child SELECT g, g FROM generate_series(1, 10) g;
         INSERT INTO broken VALUES (1, 1);"
    );
    // broken lacks a column here: its copy fails until it is added.
    let slave = format!("{SCHEMA} CREATE TABLE broken (id int PRIMARY KEY);");
    let mut r = Repl::new("fkeys", &master, &slave, "");
    r.nodes();
    r.start(false, false);
    r.add_tables(&["public.parent", "public.child", "public.broken"]);
    r.wait_synced(2);
    let fk_def = "FOREIGN KEY (parent_id) REFERENCES parent(id)";
    let out = ok("londiste3", &["slave.ini", "fkeys"], r.d());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], "public.child", "{out}");
    assert!(
        lines[1].starts_with("    child_parent_id_fkey: pending, dropped ")
            && lines[1].ends_with(&format!(
                " for a copy, restored once every table is in sync: {fk_def}"
            )),
        "{out}"
    );
    assert_eq!(
        lines[2],
        "1 foreign key(s) waiting to be restored, 0 restored"
    );
    let c = Cluster::shared();
    let in_catalog = || {
        c.psql(
            &r.slave,
            "select count(*) from pg_constraint where conname = 'child_parent_id_fkey' and convalidated",
        )
    };
    assert_eq!(in_catalog(), "0");
    // A table named that has none: only the summary.
    let out = ok("londiste3", &["slave.ini", "fkeys", "public.parent"], r.d());
    assert_eq!(out, "0 foreign key(s) waiting to be restored, 0 restored\n");

    c.client(&r.slave)
        .batch_execute("ALTER TABLE broken ADD COLUMN c int")
        .unwrap();
    r.wait_synced(3);
    let mut last = String::new();
    poll_until(
        "fkeys to show the key restored",
        Duration::from_secs(20),
        || {
            last = ok("londiste3", &["slave.ini", "fkeys"], r.d());
            Ok(last.ends_with("0 foreign key(s) waiting to be restored, 1 restored\n"))
        },
    );
    let lines: Vec<&str> = last.lines().collect();
    assert_eq!(lines[0], "public.child", "{last}");
    assert!(
        lines[1].starts_with("    child_parent_id_fkey: restored ")
            && lines[1].ends_with(&format!(": {fk_def}"))
            && lines[1].contains(" (dropped "),
        "{last}"
    );
    assert_eq!(in_catalog(), "1");
    wait_equal(
        c,
        &r.master,
        &r.slave,
        &["public.parent", "public.child", "public.broken"],
        Duration::from_secs(10),
    );
}

/// The leaf's status line (the one with "Lag:"), and the root's ("Tick:").
fn status_lines(r: &Repl) -> (String, String) {
    let out = ok("londiste3", &["slave.ini", "status"], r.d());
    let find = |p: &str| {
        out.lines()
            .map(str::trim_start)
            .map(|l| l.trim_start_matches(['|', ' ']))
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p} line in status:\n{out}"))
            .to_string()
    };
    (find("Lag: "), find("Tick: "))
}

/// The seconds of "last tick X.Ys ago" in a status line.
fn tick_age(line: &str) -> f64 {
    let rest = line.split("last tick ").nth(1).expect("last tick");
    rest.trim_end_matches("s ago").parse().expect("tick age")
}

#[test]
fn status_of_an_idle_leaf_is_up_to_date() {
    let sql = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    let mut r = Repl::new("idle", sql, sql, "");
    r.replicate_in_sync(false, &["t"]);
    let c = Cluster::shared();
    c.client(&r.master)
        .batch_execute("INSERT INTO t VALUES (1, 'a')")
        .unwrap();
    wait_equal(
        c,
        &r.master,
        &r.slave,
        &["public.t"],
        Duration::from_secs(10),
    );
    // Time passes without writes: the last tick ages, the leaf has it all.
    let mut lines = (String::new(), String::new());
    poll_until(
        "the last tick to be 4 s old",
        Duration::from_secs(30),
        || {
            lines = status_lines(&r);
            Ok(tick_age(&lines.0) >= 4.0)
        },
    );
    let (leaf, root) = lines;
    assert!(leaf.starts_with("Lag: up to date, Tick: "), "{leaf}");
    assert!(root.contains(", last tick "), "{root}");

    // Paused under a write: a real lag, and how many ticks behind.
    ok("londiste3", &["slave.ini", "pause"], r.d());
    std::thread::sleep(Duration::from_millis(500));
    c.client(&r.master)
        .batch_execute("INSERT INTO t VALUES (2, 'b')")
        .unwrap();
    let mut leaf = String::new();
    poll_until("the paused leaf to lag", Duration::from_secs(20), || {
        leaf = status_lines(&r).0;
        Ok(leaf.contains("ticks behind)"))
    });
    let lag: f64 = leaf
        .trim_start_matches("Lag: ")
        .split('s')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("a lag in seconds: {leaf}"));
    assert!((0.0..30.0).contains(&lag), "{leaf}");
    ok("londiste3", &["slave.ini", "resume"], r.d());
    wait_equal(
        c,
        &r.master,
        &r.slave,
        &["public.t"],
        Duration::from_secs(10),
    );
}
