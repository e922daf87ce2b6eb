//! The subscriber's command options, each used the way an operator would and
//! checked by what they would look at afterwards: the replica's rows.
//!
//! add-table with --dest-table, --create, --create-full, --expect-sync,
//! --skip-truncate, --no-triggers, --skip-non-existing and --wait-sync;
//! wait-root and wait-provider right after writes (no polling: the command
//! itself must wait long enough); pause and resume; resync; remove-table;
//! add-seq, remove-seq and seqs; missing, members and node-info.

use crate::harness::{Cluster, poll_until, run};
use crate::repl::Repl;
use crate::tutorial::{all_diff, ok, output_text};
use postgres::Client;
use std::time::Duration;

const MASTER: &str = "
    CREATE TABLE plain (id int PRIMARY KEY, v text);
    CREATE TABLE renamed (id int PRIMARY KEY, v text);
    CREATE TABLE created (id int PRIMARY KEY, v text NOT NULL, n numeric(10,2));
    CREATE TABLE created_full (id int PRIMARY KEY, v text);
    CREATE INDEX created_full_v ON created_full (v);
    CREATE TABLE presync (id int PRIMARY KEY, v text);
    CREATE TABLE kept (id int PRIMARY KEY, v text);
    CREATE TABLE open_local (id int PRIMARY KEY, v text);
    CREATE TABLE only_master (id int PRIMARY KEY);
    CREATE TABLE later (id int PRIMARY KEY);
    CREATE TABLE mapped (id int PRIMARY KEY, a text, b int);
    INSERT INTO mapped SELECT g, 'a' || g, g FROM generate_series(1, 50) g;
    CREATE SEQUENCE s1;
    CREATE SEQUENCE s2;
    INSERT INTO plain SELECT g, 'p' || g FROM generate_series(1, 100) g;
    INSERT INTO renamed SELECT g, 'r' || g FROM generate_series(1, 100) g;
    INSERT INTO created SELECT g, 'c' || g, g / 4.0 FROM generate_series(1, 100) g;
    INSERT INTO created_full SELECT g, 'f' || g FROM generate_series(1, 100) g;
    INSERT INTO presync SELECT g, 's' || g FROM generate_series(1, 100) g;
    INSERT INTO kept SELECT g, 'k' || g FROM generate_series(1, 100) g;
    INSERT INTO open_local SELECT g, 'o' || g FROM generate_series(1, 100) g;
    SELECT nextval('s1') FROM generate_series(1, 50);
";

/// The replica: columns of renamed_copy in another order plus one of its own;
/// mapped has its columns in another order, one of its own, a generated one
/// and the key as an identity ALWAYS column;
/// presync already equal (a restored dump); kept holds a row of its own.
const SLAVE: &str = "
    CREATE TABLE plain (id int PRIMARY KEY, v text);
    CREATE TABLE renamed_copy (note text DEFAULT 'local', v text, id int PRIMARY KEY);
    CREATE TABLE presync (id int PRIMARY KEY, v text);
    CREATE TABLE kept (id int PRIMARY KEY, v text);
    CREATE TABLE open_local (id int PRIMARY KEY, v text);
    CREATE TABLE later (id int PRIMARY KEY);
    CREATE TABLE mapped (b int, extra text DEFAULT 'x', twice int GENERATED ALWAYS AS (b * 2) STORED,
                         id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, a text);
    CREATE SEQUENCE s1;
    CREATE SEQUENCE s2;
    INSERT INTO presync SELECT g, 's' || g FROM generate_series(1, 100) g;
    INSERT INTO kept VALUES (1000, 'mine');
";

const CHANGES: &str = "
    INSERT INTO plain SELECT g, 'p' || g FROM generate_series(101, 120) g;
    UPDATE plain SET v = v || '!' WHERE id % 7 = 0;
    DELETE FROM plain WHERE id % 11 = 0;
    INSERT INTO renamed VALUES (101, 'r101');
    UPDATE renamed SET v = 'changed' WHERE id = 5;
    DELETE FROM renamed WHERE id = 6;
    UPDATE created SET n = n + 1 WHERE id < 10;
    INSERT INTO created_full VALUES (101, 'f101');
    UPDATE presync SET v = 'upd' WHERE id % 3 = 0;
    DELETE FROM presync WHERE id = 1;
    INSERT INTO kept VALUES (101, 'k101');
    DELETE FROM kept WHERE id = 2;
    UPDATE open_local SET v = 'o' WHERE id = 3;
    INSERT INTO mapped VALUES (51, 'a51', 51);
    UPDATE mapped SET b = b + 100, a = NULL WHERE id % 5 = 0;
    DELETE FROM mapped WHERE id = 7;
    UPDATE mapped SET id = 1007 WHERE id = 8;
";

/// The rows of `sql` as text, sorted.
fn rows(c: &mut Client, sql: &str) -> Vec<String> {
    let mut v: Vec<String> = c
        .query(&format!("SELECT x::text FROM ({sql}) x"), &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    v.sort();
    v
}

/// Every table as the operator expects it on the replica, right now.
fn assert_replica(r: &Repl) {
    let c = Cluster::shared();
    let (mut m, mut s) = (c.client(&r.master), c.client(&r.slave));
    let same = [
        "public.plain",
        "public.created",
        "public.created_full",
        "public.presync",
        "public.open_local",
    ];
    if let Some(d) = all_diff(&mut m, &mut s, &same) {
        panic!("{d}");
    }
    assert_eq!(
        rows(&mut m, "SELECT id, v, 'local' FROM renamed"),
        rows(&mut s, "SELECT id, v, note FROM renamed_copy"),
        "--dest-table: renamed_copy differs from renamed"
    );
    assert_eq!(
        rows(&mut m, "SELECT id, a, b, 'x', b * 2 FROM mapped"),
        rows(&mut s, "SELECT id, a, b, extra, twice FROM mapped"),
        "columns mapped by name: mapped differs"
    );
    let mut want = rows(&mut m, "SELECT id, v FROM kept");
    want.push("(1000,mine)".into());
    want.sort();
    assert_eq!(
        rows(&mut s, "SELECT id, v FROM kept"),
        want,
        "--skip-truncate: kept should hold the master's rows and its own"
    );
}

fn state(c: &mut Client, table: &str) -> Option<String> {
    c.query_opt(
        "SELECT coalesce(merge_state, 'none') FROM londiste.table_info WHERE table_name = $1",
        &[&table],
    )
    .unwrap()
    .map(|r| r.get(0))
}

#[test]
fn subscriber_options_do_what_they_say() {
    let c = Cluster::shared();
    let mut r = Repl::new("opts", MASTER, SLAVE, "");
    r.nodes();
    r.start(true, false);
    r.londiste(&["master.ini", "add-table", "--all"]);
    r.londiste(&["master.ini", "add-seq", "--all"]);
    let mut s = c.client(&r.slave);

    // missing: every table of the provider, before any is added here.
    let missing = r.londiste(&["slave.ini", "missing"]);
    for t in ["public.plain", "public.renamed", "public.only_master"] {
        assert!(missing.contains(t), "missing does not list {t}:\n{missing}");
    }

    // --skip-non-existing: adds what it can, names what it skipped.
    let out = r.londiste(&[
        "slave.ini",
        "add-table",
        "--skip-non-existing",
        "public.plain",
        "public.only_master",
    ]);
    assert!(
        out.contains("only_master") && out.contains("skipped"),
        "no word of the skipped table:\n{out}"
    );
    assert_eq!(state(&mut s, "public.only_master"), None);
    assert!(state(&mut s, "public.plain").is_some());

    r.londiste(&[
        "slave.ini",
        "add-table",
        "--dest-table=public.renamed_copy",
        "public.renamed",
    ]);
    r.londiste(&["slave.ini", "add-table", "--create", "public.created"]);
    r.londiste(&[
        "slave.ini",
        "add-table",
        "--create-full",
        "public.created_full",
    ]);
    r.londiste(&["slave.ini", "add-table", "--expect-sync", "public.presync"]);
    assert_eq!(
        state(&mut s, "public.presync").as_deref(),
        Some("ok"),
        "--expect-sync: in sync at once, without a copy"
    );
    r.londiste(&["slave.ini", "add-table", "--skip-truncate", "public.kept"]);
    r.londiste(&["slave.ini", "add-table", "public.mapped"]);
    // --wait-sync returns once every table is in sync: no polling here.
    r.londiste(&[
        "slave.ini",
        "add-table",
        "--no-triggers",
        "--wait-sync",
        "public.open_local",
    ]);
    let states = rows(
        &mut s,
        "SELECT table_name, merge_state FROM londiste.table_info",
    );
    assert!(
        states.iter().all(|l| l.ends_with(",ok)")),
        "--wait-sync returned before every table was in sync: {states:?}"
    );
    assert_replica(&r);

    // --create made the provider's columns and key; --create-full its index too.
    let cols = rows(
        &mut s,
        "SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute
          WHERE attrelid = 'created'::regclass AND attnum > 0",
    );
    assert_eq!(
        cols,
        ["(id,integer,t)", "(n,\"numeric(10,2)\",f)", "(v,text,t)"]
    );
    let idx = rows(
        &mut s,
        "SELECT indexname FROM pg_indexes WHERE tablename IN ('created', 'created_full')",
    );
    assert_eq!(
        idx,
        ["(created_full_pkey)", "(created_full_v)", "(created_pkey)"]
    );

    // wait-root right after the writes: the command waits for them.
    c.client(&r.master).batch_execute(CHANGES).unwrap();
    r.londiste(&["slave.ini", "wait-root"]);
    assert_replica(&r);

    // Local writes: refused on a replicated table, allowed with --no-triggers.
    let err = s
        .execute("INSERT INTO plain VALUES (5000, 'local')", &[])
        .unwrap_err();
    let msg = err.as_db_error().map(|e| e.message().to_string());
    assert!(
        msg.as_deref()
            .is_some_and(|m| m.contains("replicated into this node")),
        "{err:?}"
    );
    s.execute("INSERT INTO open_local VALUES (5000, 'local')", &[])
        .unwrap();
    s.execute("DELETE FROM open_local WHERE id = 5000", &[])
        .unwrap();

    // pause: nothing applied, position kept; resume + wait-provider: caught up.
    r.londiste(&["slave.ini", "pause"]);
    let info = r.londiste(&["slave.ini", "node-info"]);
    assert!(info.contains("Status: PAUSED"), "{info}");
    // Let a batch the worker may have had in hand finish.
    std::thread::sleep(Duration::from_millis(500));
    let pos = r.pos();
    c.client(&r.master)
        .batch_execute("INSERT INTO plain VALUES (200, 'while paused')")
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(r.pos(), pos, "a paused node moved on");
    assert_eq!(rows(&mut s, "SELECT 1 FROM plain WHERE id = 200").len(), 0);
    r.londiste(&["slave.ini", "resume"]);
    r.londiste(&["slave.ini", "wait-provider"]);
    assert_replica(&r);

    // resync: a damaged table is copied again.
    s.batch_execute(
        "BEGIN; SET LOCAL londiste.replay = on; DELETE FROM plain WHERE id < 50; COMMIT;",
    )
    .unwrap();
    r.londiste(&["slave.ini", "resync", "public.plain"]);
    r.londiste(&["slave.ini", "wait-sync"]);
    r.londiste(&["slave.ini", "wait-root"]);
    assert_replica(&r);

    // remove-table: no longer replicated, and the local table is writable.
    r.londiste(&["slave.ini", "remove-table", "public.open_local"]);
    let tables = r.londiste(&["slave.ini", "tables"]);
    assert!(!tables.contains("open_local"), "{tables}");
    c.client(&r.master)
        .batch_execute(
            "UPDATE open_local SET v = 'after remove'; INSERT INTO plain VALUES (201, 'x')",
        )
        .unwrap();
    r.londiste(&["slave.ini", "wait-root"]);
    assert_eq!(
        rows(&mut s, "SELECT 1 FROM open_local WHERE v = 'after remove'").len(),
        0,
        "a removed table still receives changes"
    );
    s.execute("INSERT INTO open_local VALUES (5001, 'local')", &[])
        .unwrap();
    assert_eq!(rows(&mut s, "SELECT v FROM plain WHERE id = 201"), ["(x)"]);

    // Sequences: added, listed, kept ahead of the root, removed.
    r.londiste(&["slave.ini", "add-seq", "--all"]);
    let seqs = r.londiste(&["slave.ini", "seqs"]);
    assert!(
        seqs.contains("public.s1") && seqs.contains("public.s2"),
        "{seqs}"
    );
    poll_until("s1 ahead of the root", Duration::from_secs(15), || {
        let v: i64 = s
            .query_one("SELECT last_value FROM s1", &[])
            .map_err(|e| e.to_string())?
            .get(0);
        if v >= 50 {
            Ok(true)
        } else {
            Err(format!("s1 at {v}"))
        }
    });
    r.londiste(&["slave.ini", "remove-seq", "public.s2"]);
    let seqs = r.londiste(&["slave.ini", "seqs"]);
    assert!(
        seqs.contains("public.s1") && !seqs.contains("public.s2"),
        "{seqs}"
    );

    // members and node-info: both nodes, the provider named.
    let members = r.londiste(&["slave.ini", "members"]);
    assert!(
        members.contains("master") && members.contains("slave"),
        "{members}"
    );
    let info = r.londiste(&["slave.ini", "node-info"]);
    assert!(
        info.contains("Type: leaf")
            && info.contains("Provider: master")
            && info.contains("Status: OK"),
        "{info}"
    );

    // --copy-node must name a member of the set.
    let out = run(
        "londiste3",
        &[
            "slave.ini",
            "add-table",
            "--copy-node=nosuchnode",
            "public.later",
        ],
        r.d(),
    );
    let text = output_text(&out);
    assert!(
        !out.status.success() && text.contains("nosuchnode is not a member of the set"),
        "{text}"
    );
    assert_eq!(state(&mut s, "public.later"), None);
}

/// parallel_copies bounds how many tables are copied at once: the log's
/// "starting copy of" and "is in sync" lines never show more in flight.
#[test]
fn parallel_copies_bounds_concurrent_copies() {
    let schema: String = (1..=5)
        .map(|i| format!("CREATE TABLE t{i} (id int PRIMARY KEY, v text);"))
        .collect();
    let data: String = (1..=5)
        .map(|i| {
            format!("INSERT INTO t{i} SELECT g, md5(g::text) FROM generate_series(1, 20000) g;")
        })
        .collect();
    let r = Repl::new("pcopy", &format!("{schema}{data}"), &schema, "");
    let ini = r.dir.read("slave.ini");
    r.dir
        .write("slave.ini", &format!("{ini}parallel_copies = 2\n"));
    let mut r = r;
    let tables = ["t1", "t2", "t3", "t4", "t5"];
    r.replicate_in_sync(false, &tables);
    let log = r.dir.read("log/slave.log");
    let (mut running, mut most) = (0, 0);
    for l in log.lines() {
        if l.contains("starting copy of") {
            running += 1;
            most = most.max(running);
        } else if l.contains(" is in sync (tick") {
            running -= 1;
        }
    }
    assert_eq!(running, 0, "unbalanced copy lines:\n{log}");
    assert!(
        most <= 2,
        "{most} copies at once with parallel_copies = 2:\n{log}"
    );
    assert_eq!(
        most, 2,
        "the limit was not reached (tables added at once):\n{log}"
    );
}

/// A transaction left open anywhere in the source cluster (another
/// database, holding an xid) must not hold a newly copied table in
/// catching-up: the hand-over needs only that the copy's snapshot is
/// covered by a tick, not that every older transaction has ended.
#[test]
fn copy_hands_over_while_an_unrelated_transaction_stays_open() {
    let c = Cluster::shared();
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    let mut r = Repl::new(
        "openxact",
        &format!("{schema} INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 1000) g;"),
        schema,
        "",
    );
    let other = crate::harness::unique_name("openxact_other");
    c.create_db(&other);
    let mut idle = c.client(&other);
    idle.batch_execute("BEGIN; SELECT txid_current();").unwrap();
    r.nodes();
    r.start(false, false);
    r.add_tables(&["t"]);
    c.client(&r.master)
        .batch_execute("INSERT INTO t VALUES (1001, 'during'); UPDATE t SET v = 'x' WHERE id = 1")
        .unwrap();
    r.wait_synced(1);
    r.londiste(&["slave.ini", "wait-root"]);
    let (mut m, mut s) = (c.client(&r.master), c.client(&r.slave));
    if let Some(d) = all_diff(&mut m, &mut s, &["public.t"]) {
        panic!("{d}");
    }
    // Still open: the test did not pass by the transaction ending.
    idle.batch_execute("SELECT 1").unwrap();
    idle.batch_execute("COMMIT").unwrap();
}

/// Worker-mode flags and config keys an operator relies on: a `[londiste]`
/// section, node_name, public_node_location, consumer_name and
/// remote_extra_connstr; `--ini`, `--set`, `-q`, and `-d` / `-k` on a
/// running worker.
#[test]
fn worker_flags_and_config_keys() {
    let c = Cluster::shared();
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    let master = crate::harness::unique_name("flags_m");
    let slave = crate::harness::unique_name("flags_s");
    let (mconn, sconn) = (c.create_db(&master), c.create_db(&slave));
    c.client(&master)
        .batch_execute(&format!("{schema} INSERT INTO t VALUES (1, 'a');"))
        .unwrap();
    c.client(&slave).batch_execute(schema).unwrap();
    let dir = crate::harness::TestDir::new();
    let d = dir.path();
    std::fs::create_dir(d.join("log")).unwrap();
    dir.write(
        "ticker.ini",
        &format!(
            "[pgqd]\nbase_connstr = {}\ndatabase_list = {master}\nlogfile = log/ticker.log\n",
            c.base_connstr()
        ),
    );
    // The original's older section name, and the node named in the file.
    dir.write(
        "root.ini",
        &format!(
            "[londiste]\njob_name = rootjob\ndb = {mconn}\nqueue_name = fq\nnode_name = origin\n\
             public_node_location = {mconn}\nlogfile = log/%(job_name)s.log\n"
        ),
    );
    dir.write(
        "leaf.ini",
        &format!(
            "[londiste3]\ndb = {sconn}\nqueue_name = fq\nnode_name = copy1\nconsumer_name = copy1_consumer\n\
             remote_extra_connstr = application_name=flags_remote\nloop_delay = 0.2\n\
             logfile = log/leaf.log\npidfile = leaf.pid\n"
        ),
    );
    let out = ok("londiste3", &["--ini"], d);
    assert!(
        out.contains("[londiste3]") && out.contains("queue_name"),
        "{out}"
    );

    ok("londiste3", &["root.ini", "create-root"], d);
    ok(
        "londiste3",
        &["leaf.ini", "create-leaf", &format!("--provider={mconn}")],
        d,
    );
    let _ticker = crate::harness::KillOnDrop(crate::harness::spawn("pgqd", &["ticker.ini"], d));
    let _guard = crate::tutorial::PidGuard(vec![d.join("leaf.pid")]);
    ok("londiste3", &["-d", "leaf.ini", "worker"], d);
    // -q: a successful command prints nothing.
    let out = run("londiste3", &["-q", "root.ini", "add-table", "public.t"], d);
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "{}",
        output_text(&out)
    );
    ok(
        "londiste3",
        &["leaf.ini", "add-table", "--wait-sync", "public.t"],
        d,
    );
    let (mut m, mut s) = (c.client(&master), c.client(&slave));
    m.batch_execute("INSERT INTO t VALUES (2, 'b')").unwrap();
    ok("londiste3", &["leaf.ini", "wait-root"], d);
    if let Some(diff) = all_diff(&mut m, &mut s, &["public.t"]) {
        panic!("{diff}");
    }

    let info = ok("londiste3", &["leaf.ini", "node-info"], d);
    assert!(
        info.contains("Node: copy1")
            && info.contains("Provider: origin")
            && info.contains("Worker: copy1_consumer"),
        "{info}"
    );
    let members = ok("londiste3", &["leaf.ini", "members"], d);
    assert!(
        members.contains("origin") && members.contains("copy1"),
        "{members}"
    );
    // The worker's connection to the provider carries remote_extra_connstr.
    let remote: i64 = m
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'flags_remote'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        remote > 0,
        "no provider session with application_name=flags_remote"
    );
    // --set overrides a key for one command.
    let out = run(
        "londiste3",
        &["--set", "queue_name=otherq", "leaf.ini", "node-info"],
        d,
    );
    assert!(
        !out.status.success() && output_text(&out).contains("otherq"),
        "{}",
        output_text(&out)
    );

    // -k stops the daemon at once; the pidfile goes with it.
    ok("londiste3", &["-k", "leaf.ini"], d);
    crate::tutorial::wait_pidfile_gone(&d.join("leaf.pid"));
}

/// Skytools options that londiste-rs does not implement are refused with a
/// line that says so, before anything is done; never accepted and ignored.
#[test]
fn unimplemented_skytools_options_are_refused() {
    let r = Repl::new(
        "unimpl",
        "create table t (id int primary key);",
        "create table t (id int primary key);",
        "",
    );
    r.nodes();
    for (args, needle) in [
        (
            vec![
                "slave.ini",
                "add-table",
                "public.t",
                "--merge-all",
                "--no-merge",
            ],
            "--merge-all and --no-merge exclude each other",
        ),
        (
            vec!["slave.ini", "status", "--compact"],
            "--compact: status has one format",
        ),
        // An option of another command is refused, not ignored.
        (
            vec!["slave.ini", "status", "--force"],
            "--force does not apply to status",
        ),
        (
            vec!["slave.ini", "add-table", "public.t", "--apply"],
            "--apply does not apply to add-table",
        ),
        (
            vec!["slave.ini", "tables", "--all"],
            "--all does not apply to tables",
        ),
        (
            vec!["slave.ini", "remove-table", "public.t", "--nocheck"],
            "--nocheck does not apply to remove-table",
        ),
        (
            vec!["-d", "slave.ini", "add-table", "public.t"],
            "-d: only the worker runs in the background",
        ),
    ] {
        let out = run("londiste3", &args, r.d());
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {text}");
        assert!(text.contains(needle), "{args:?}: {text}");
    }
    let mut s = Cluster::shared().client(&r.slave);
    let n: i64 = s
        .query_one("select count(*) from londiste.table_info", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "a refused add-table added the table");
    // --find-copy-node is what add-table does anyway.
    ok("londiste3", &["master.ini", "add-table", "public.t"], r.d());
    ok(
        "londiste3",
        &["slave.ini", "add-table", "public.t", "--find-copy-node"],
        r.d(),
    );
    // repair --force: Skytools' "ignore the lag", which repair always does
    // (it works at one tick); accepted.
    ok("londiste3", &["slave.ini", "repair", "--force"], r.d());
}
