//! Bad input and hostile conditions (issue 5), as an operator meets them:
//! unreachable or missing databases, commands run on the wrong node or twice,
//! tables that cannot be replicated, a subscriber table that lacks a column or
//! has an incompatible type, the queue or a table dropped under a running
//! worker, hostile identifiers and values, and passwords in connect strings.
//!
//! Every case asserts the line the user reads (the last line of stderr, or
//! the `ERR:` line of `status` and `node-info`) and that nothing is lost: a
//! worker that cannot apply an event keeps its position, retries, and carries
//! on once the cause is fixed.

use crate::harness::{
    Cluster, KillOnDrop, TestDir, poll_until, run, spawn, tables_diff, unique_name,
};
use crate::tutorial::{CHANGES, DATA, SCHEMA, TABLES, ok, output_text, wait_equal};
use std::path::Path;
use std::time::Duration;

const EX_UNAVAILABLE: i32 = 69;
const SECRET: &str = "s3cret";
use crate::repl::{QUEUE, Repl, worker_ini};

/// Runs `londiste3 args` in `d`, expects exit `code` and a last stderr line
/// `londiste3: ...` containing every needle, and no password anywhere in the
/// output; returns that line.
fn fails(args: &[&str], d: &Path, code: i32, needles: &[&str]) -> String {
    let out = run("londiste3", args, d);
    let all = output_text(&out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "`londiste3 {}`:\n{all}",
        args.join(" ")
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim_end().lines().last().unwrap_or("").to_string();
    assert!(
        last.starts_with("londiste3: "),
        "the error is not the last line of stderr:\n{all}"
    );
    // No error output of this file may show a password.
    assert!(!all.contains(SECRET), "password shown:\n{all}");
    // Shown with --nocapture: the messages as users read them.
    println!("$ londiste3 {}\n{last}", args.join(" "));
    for n in needles {
        assert!(
            last.contains(n),
            "{n:?} missing from the error line:\n{last}\n--- all output ---\n{all}"
        );
    }
    last
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
    // dropped here: the port is closed again
}

#[test]
fn unreachable_or_missing_provider() {
    let c = Cluster::shared();
    let db = unique_name("bad_unreach");
    let conn = c.create_db(&db);
    let dir = TestDir::new();
    let d = dir.path();
    std::fs::create_dir(d.join("log")).unwrap();
    dir.write("x.ini", &worker_ini(&conn, "x"));

    // Nothing listens on the port: exit 69, host and port named, no password.
    let port = closed_port();
    let prov = format!(
        "--provider=host=127.0.0.1 port={port} user=postgres password={SECRET} dbname=nowhere"
    );
    let line = fails(
        &["x.ini", "create-leaf", "leaf", &prov],
        d,
        EX_UNAVAILABLE,
        &["127.0.0.1", &format!("port={port}"), "password=***"],
    );
    assert!(line.contains("is the server running"), "{line}");

    // A database that does not exist on a live server.
    let prov = format!(
        "--provider={} password={SECRET} dbname=nope_{port}",
        c.base_connstr()
    );
    fails(
        &["x.ini", "create-leaf", "leaf", &prov],
        d,
        EX_UNAVAILABLE,
        &[
            &format!("database \"nope_{port}\" does not exist"),
            "dbname=",
        ],
    );

    // The node's own database is missing.
    dir.write(
        "gone.ini",
        &worker_ini(
            &format!("{} password={SECRET} dbname=gone_{port}", c.base_connstr()),
            "gone",
        ),
    );
    for cmd in ["status", "add-table", "node-info"] {
        fails(
            &["gone.ini", cmd, "t"],
            d,
            EX_UNAVAILABLE,
            &[&format!("gone_{port}"), "does not exist"],
        );
    }
    // Nor in the logfiles.
    for f in ["log/x.log", "log/gone.log"] {
        let log = std::fs::read_to_string(d.join(f)).unwrap_or_default();
        assert!(!log.contains(SECRET), "{f}: {log}");
    }

    // The failed create-leaf left no node behind: it still says how to make one.
    fails(&["x.ini", "tables"], d, 1, &["create-root", "create-leaf"]);
}

#[test]
fn wrong_node_and_repeated_commands() {
    let c = Cluster::shared();
    let names: Vec<String> = ["root", "leaf1", "leaf2", "plain"]
        .iter()
        .map(|n| unique_name(&format!("bad_node_{n}")))
        .collect();
    let conns: Vec<String> = names.iter().map(|n| c.create_db(n)).collect();
    c.client(&names[0])
        .batch_execute("create table t (id int primary key)")
        .unwrap();
    let dir = TestDir::new();
    let d = dir.path();
    std::fs::create_dir(d.join("log")).unwrap();
    for (i, conn) in conns.iter().enumerate() {
        dir.write(&format!("n{i}.ini"), &worker_ini(conn, &format!("n{i}")));
    }

    // Not a node yet: every node command says how to make it one.
    for cmd in [
        "add-table",
        "tables",
        "status",
        "node-info",
        "members",
        "add-seq",
    ] {
        fails(
            &["n0.ini", cmd, "t"],
            d,
            1,
            &["not a node of queue", "create-root", "create-leaf"],
        );
    }

    // create-root twice: the second says so and exits 0.
    let first = ok(
        "londiste3",
        &["n0.ini", "create-root", "root", &conns[0]],
        d,
    );
    assert!(first.contains("Done"), "{first}");
    let again = ok(
        "londiste3",
        &["n0.ini", "create-root", "root", &conns[0]],
        d,
    );
    assert!(again.contains("already initialized"), "{again}");
    // add-table twice, likewise.
    ok("londiste3", &["n0.ini", "add-table", "t"], d);
    let again = ok("londiste3", &["n0.ini", "add-table", "t"], d);
    assert!(again.contains("already added"), "{again}");

    // A provider that is not a node of the queue.
    let prov = format!("--provider={}", conns[3]);
    fails(
        &["n1.ini", "create-leaf", "leaf1", &conns[1], &prov],
        d,
        1,
        &["is not a node of queue", "create-root"],
    );

    let prov = format!("--provider={}", conns[0]);
    ok(
        "londiste3",
        &["n1.ini", "create-leaf", "leaf1", &conns[1], &prov],
        d,
    );
    let again = ok(
        "londiste3",
        &["n1.ini", "create-leaf", "leaf1", &conns[1], &prov],
        d,
    );
    assert!(again.contains("already initialized"), "{again}");
    // create-root on a leaf: already a node, nothing changes.
    let again = ok("londiste3", &["n1.ini", "create-root", "x", &conns[1]], d);
    assert!(again.contains("already initialized"), "{again}");

    // Subscribing to a leaf is refused, naming the leaf.
    let prov = format!("--provider={}", conns[1]);
    fails(
        &["n2.ini", "create-leaf", "leaf2", &conns[2], &prov],
        d,
        1,
        &["Cannot subscribe to leaf node leaf1"],
    );
    // The provider's own name is refused too.
    let prov = format!("--provider={}", conns[0]);
    fails(
        &["n2.ini", "create-leaf", "root", &conns[2], &prov],
        d,
        1,
        &["root", "choose another"],
    );
    // Still not a node after the refusals.
    fails(&["n2.ini", "node-info"], d, 1, &["create-leaf"]);
    // resync belongs on subscribers.
    fails(&["n0.ini", "resync", "t"], d, 1, &["subscriber"]);
}

#[test]
fn table_errors_name_the_table_and_the_fix() {
    let r = Repl::new(
        "bad_tables",
        "create table t_ok (id int primary key, v text);
         create table t_nopk (a int, b text);
         create table only_root (id int primary key);
         create table key_here (id int primary key);
         create sequence s_both; create sequence s_root;",
        "create table t_ok (id int primary key, v text);
         create sequence s_both; create sequence s_slave;
         create table only_slave (id int primary key);
         create table key_here (id int);",
        "",
    );
    let d = r.d();
    r.nodes();

    // Root: a missing table, a table without primary key.
    fails(
        &["master.ini", "add-table", "nosuch"],
        d,
        1,
        &["public.nosuch", "does not exist"],
    );
    fails(
        &["master.ini", "add-table", "t_nopk"],
        d,
        1,
        &["public.t_nopk", "primary key", "--key"],
    );
    // An unterminated quote in a name.
    fails(
        &["master.ini", "add-table", "\"t_ok"],
        d,
        64,
        &["unterminated quote", "\"t_ok"],
    );
    r.londiste(&["master.ini", "add-table", "t_ok", "only_root", "key_here"]);
    // With --key the keyless table can be added.
    r.londiste(&["master.ini", "add-table", "t_nopk", "--key=a"]);

    // Leaf: tables the root did not add, whether or not they exist here.
    for t in ["nosuch", "only_slave"] {
        fails(
            &["slave.ini", "add-table", t],
            d,
            1,
            &[
                &format!("public.{t}"),
                "not replicated on the provider",
                "add-table",
            ],
        );
    }
    // A table the root has but this node does not.
    fails(
        &["slave.ini", "add-table", "only_root"],
        d,
        1,
        &[
            "public.only_root",
            "does not exist on this node",
            "--create",
        ],
    );
    // A table without the primary key here.
    fails(
        &["slave.ini", "add-table", "key_here"],
        d,
        1,
        &["key_here", "no primary key on this node"],
    );
    let out = r.londiste(&["slave.ini", "add-table", "t_ok"]);
    assert!(out.contains("Table added"), "{out}");
    let again = r.londiste(&["slave.ini", "add-table", "t_ok"]);
    assert!(again.contains("already added"), "{again}");
    // Nothing half-added by the refusals.
    let tables = r.londiste(&["slave.ini", "tables", "--names-only"]);
    assert_eq!(tables.trim(), "public.t_ok", "{tables}");

    // Sequences: a table is not one, a missing one is named, the leaf can
    // only add what the root publishes.
    fails(
        &["master.ini", "add-seq", "t_ok"],
        d,
        1,
        &["public.t_ok", "not a sequence"],
    );
    fails(
        &["master.ini", "add-seq", "nosuch_seq"],
        d,
        1,
        &["public.nosuch_seq", "does not exist", "--create"],
    );
    r.londiste(&["master.ini", "add-seq", "s_both", "s_root"]);
    for s in ["s_slave", "nosuch_seq"] {
        fails(
            &["slave.ini", "add-seq", s],
            d,
            1,
            &[
                &format!("public.{s}"),
                "not replicated on the provider",
                "add-seq",
            ],
        );
    }
    fails(
        &["slave.ini", "add-seq", "s_root"],
        d,
        1,
        &["public.s_root", "does not exist on this node", "--create"],
    );
    r.londiste(&["slave.ini", "add-seq", "s_both"]);
    let again = r.londiste(&["slave.ini", "add-seq", "s_both"]);
    assert!(again.contains("already added"), "{again}");
    let seqs = r.londiste(&["slave.ini", "seqs"]);
    assert!(
        seqs.contains("public.s_both") && !seqs.contains("s_slave") && !seqs.contains("nosuch"),
        "{seqs}"
    );
    // The root's worker still publishes (no table slipped in as a sequence).
    let seqs = r.londiste(&["master.ini", "seqs"]);
    assert!(!seqs.contains("t_ok"), "{seqs}");
}

#[test]
fn subscriber_lacks_a_column() {
    let schema = "create table widgets (id int primary key, a text);
                  insert into widgets select i, 'w' || i from generate_series(1, 20) i;";
    let mut r = Repl::new(
        "bad_col",
        schema,
        "create table widgets (id int primary key, a text);",
        "",
    );
    r.replicate_in_sync(false, &["widgets"]);
    let c = Cluster::shared();

    // A new column on the source, used at once.
    c.client(&r.master)
        .batch_execute(
            "alter table widgets add column b int;
             insert into widgets values (21, 'new', 21), (22, 'newer', 22);
             update widgets set b = id where id <= 5;",
        )
        .unwrap();
    let err = r.wait_error(&["ev_id=", "widgets", "\"b\"", "ADD COLUMN"]);
    // Nothing of the failing batch is applied.
    let pos = r.assert_batch_held("widgets", 20, &err);

    // The fix the message names: the rows arrive, the error clears.
    r.fix_and_converge("alter table widgets add column b int", "widgets");
    poll_until(
        "node-info to say Status: OK",
        Duration::from_secs(10),
        || {
            Ok(r.londiste(&["slave.ini", "node-info"])
                .contains("Status: OK"))
        },
    );
    assert!(r.pos() > pos);
    r.assert_running();
}

#[test]
fn subscriber_column_has_incompatible_type() {
    let mut r = Repl::new(
        "bad_type",
        "create table gadgets (id int primary key, v text);
         insert into gadgets select i, i::text from generate_series(1, 10) i;",
        "create table gadgets (id int primary key, v int);",
        "",
    );
    r.replicate_in_sync(false, &["gadgets"]);
    let c = Cluster::shared();

    c.client(&r.master)
        .batch_execute(
            "insert into gadgets values (11, '11');
             insert into gadgets values (12, 'abc');
             update gadgets set v = v || '0' where id = 1;",
        )
        .unwrap();
    let err = r.wait_error(&["ev_id=", "gadgets", "id=12", "abc", "integer"]);
    // Not even the good row before it in the same batch.
    r.assert_batch_held("gadgets", 10, &err);

    r.fix_and_converge("alter table gadgets alter column v type text", "gadgets");
    r.assert_running();
}

#[test]
fn queue_dropped_under_the_worker() {
    let mut r = Repl::new(
        "bad_dropq",
        "create table t (id int primary key); insert into t select generate_series(1, 5);",
        "create table t (id int primary key);",
        "",
    );
    r.replicate_in_sync(true, &["t"]);
    let c = Cluster::shared();

    c.client(&r.master)
        .query_one("select pgq.drop_queue($1, true)", &[&QUEUE])
        .unwrap();
    let line = r.wait_error(&["provider", QUEUE]);
    let pos = r.pos();
    // It retries, stays at its position, and does not crash.
    let tries = |s: &str| s.matches(line.trim_start_matches("ERR: ")).count();
    poll_until("a retry", Duration::from_secs(15), || {
        Ok(tries(&r.slave_log()) >= 2)
    });
    assert_eq!(r.pos(), pos);
    r.assert_running();
}

#[test]
fn table_dropped_on_the_source() {
    let mut r = Repl::new(
        "bad_dropt",
        "create table keep (id int primary key, v text);
         create table doomed (id int primary key, v text);
         create table late (id int primary key);
         insert into keep select i, 'k' || i from generate_series(1, 10) i;
         insert into doomed select i, 'd' || i from generate_series(1, 10) i;",
        "create table keep (id int primary key, v text);
         create table doomed (id int primary key, v text);
         create table late (id int primary key);",
        "",
    );
    r.replicate_in_sync(true, &["keep", "doomed"]);
    let c = Cluster::shared();

    // Changes to the table, then it is dropped, in one go with others.
    c.client(&r.master)
        .batch_execute(
            "insert into doomed values (11, 'last');
             drop table doomed;
             insert into keep values (11, 'after the drop');",
        )
        .unwrap();
    wait_equal(
        c,
        &r.master,
        &r.slave,
        &["public.keep"],
        Duration::from_secs(15),
    );
    // The changes made before the drop arrived.
    let n: i64 = c
        .client(&r.slave)
        .query_one("select count(*) from doomed", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 11);
    r.assert_running();

    // A table added on the root and dropped there before the leaf copies it:
    // the copy fails with a message naming the table, the rest goes on.
    r.londiste(&["master.ini", "add-table", "late"]);
    c.client(&r.master)
        .batch_execute("drop table late; insert into keep values (12, 'more')")
        .unwrap();
    r.londiste(&["slave.ini", "add-table", "late"]);
    poll_until("the copy error in the log", Duration::from_secs(15), || {
        Ok(r.slave_log().lines().any(|l| {
            l.contains(" ERROR ")
                && l.contains("cannot copy public.late")
                && l.contains("remove-table public.late")
        }))
    });
    let keep = ["public.keep"];
    wait_equal(c, &r.master, &r.slave, &keep, Duration::from_secs(15));
    // status names the table and why its copy fails.
    poll_until("the copy error in status", Duration::from_secs(15), || {
        let status = r.londiste(&["slave.ini", "status"]);
        Ok(status.lines().any(|l| {
            l.contains("public.late")
                && l.contains("last copy failed")
                && l.contains("remove-table public.late")
        }))
    });
    r.assert_running();
    // The fix the message names.
    r.londiste(&["slave.ini", "remove-table", "late"]);
    let status = r.londiste(&["slave.ini", "status"]);
    assert!(!status.contains("public.late"), "{status}");
    c.client(&r.master)
        .batch_execute("insert into keep values (13, 'still going')")
        .unwrap();
    wait_equal(c, &r.master, &r.slave, &keep, Duration::from_secs(15));
    r.assert_running();

    // The table dropped on the subscriber instead: the worker stops at the
    // event, names the table, and goes on once it is back (and resynced).
    c.client(&r.slave).batch_execute("drop table keep").unwrap();
    c.client(&r.master)
        .batch_execute(
            "update keep set v = 'changed' where id = 1; insert into keep values (14, 'x')",
        )
        .unwrap();
    r.wait_error(&["public", "keep", "does not exist"]);
    let pos = r.pos();
    r.assert_stuck_at(pos);
    r.assert_running();
    c.client(&r.slave)
        .batch_execute("create table keep (id int primary key, v text)")
        .unwrap();
    r.londiste(&["slave.ini", "resync", "keep"]);
    wait_equal(c, &r.master, &r.slave, &keep, Duration::from_secs(15));
    r.wait_synced(2);
    r.assert_running();
}

/// Every valid char from U+0001 to U+10FFFF, in strings of `n` chars.
fn all_chars(n: usize) -> Vec<String> {
    let chars: Vec<char> = (1..=0x10FFFFu32).filter_map(char::from_u32).collect();
    chars.chunks(n).map(|c| c.iter().collect()).collect()
}

const NASTY: &[&str] = &[
    "",
    " ",
    "\t",
    "\n",
    "\r\n",
    "\\",
    "\\\\",
    "\\N",
    "\\.",
    "NULL",
    "'",
    "''",
    "\"",
    "\"\"",
    "(",
    ")",
    "()",
    ",",
    "{}",
    "{\"a\",b,NULL}",
    "(1,\"x,y\",)",
    "'); DROP TABLE victim; --",
    "\"); DROP TABLE victim; --",
    "$$; DROP TABLE victim; $$",
    "\\'; DROP TABLE victim; --",
    "a\tb\nc\\d'e\"f",
    "\u{7f}\u{1}\u{1b}[31m",
    "\u{feff}\u{200b}\u{10ffff}",
    "ü ñ 日本語 🎉",
];

const WEIRD_SCHEMA: &str = r#"
create table victim (id int primary key);
insert into victim values (1);
create schema "My Schema";
create table "My Schema"."Order.Details ""x""" (
    "Key Col" int primary key,
    "select" text,
    "Größe" text,
    "a b" text,
    "MixedCase" int,
    "x""); DROP TABLE victim; --" text
);
create sequence "My Schema"."Seq ""q"". 1";
create schema "ünï.cødé";
create table "ünï.cødé"."select" ("from" text primary key, "Value" bytea);
"#;

const WEIRD: &str = r#""My Schema"."Order.Details ""x""""#;
const WEIRD2: &str = r#""ünï.cødé"."select""#;
/// Only on the root: the leaf creates it (and its schema) with `--create`.
const WEIRD3: &str = r#""new; schema"."T ""3""""#;
const WEIRD3_SCHEMA: &str = r#"
create schema "new; schema";
create table "new; schema"."T ""3""" (
    "select" text primary key,
    "Größe" numeric(10, 2) not null,
    "a b" timestamptz,
    "MixedCase" int[]
);
insert into "new; schema"."T ""3""" values
    (E'\\N', 1.5, '2020-01-01 00:00+00', '{1,NULL,3}'),
    (E'a\tb', -2, null, '{}'),
    ('''', 0, 'infinity', null);
"#;
const WEIRD_SEQ: &str = r#""My Schema"."Seq ""q"". 1""#;

/// Inserts rows `ids` into both weird tables, nasty values in every column.
fn insert_weird(client: &mut postgres::Client, ids: std::ops::Range<usize>, chunks: &[String]) {
    let mut tx = client.transaction().unwrap();
    let st = tx
        .prepare(&format!(
            "insert into {WEIRD} values ($1, $2, $3, $4, $5, $6)"
        ))
        .unwrap();
    let st2 = tx
        .prepare(&format!("insert into {WEIRD2} values ($1, $2)"))
        .unwrap();
    for i in ids {
        let nasty = NASTY[i % NASTY.len()];
        let ab: Option<&str> = (i % 3 != 0).then_some(NASTY[(i * 7) % NASTY.len()]);
        tx.execute(
            &st,
            &[
                &(i as i32),
                &chunks[i % chunks.len()],
                &nasty,
                &ab,
                &(i as i32 * 3),
                &NASTY[(i + 5) % NASTY.len()],
            ],
        )
        .unwrap();
        // Text keys made of nasty values.
        let key = format!("{nasty}·{i}·{}", NASTY[(i + 3) % NASTY.len()]);
        tx.execute(&st2, &[&key, &nasty.as_bytes()]).unwrap();
    }
    tx.commit().unwrap();
}

#[test]
fn hostile_identifiers_and_values() {
    let mut r = Repl::new(
        "bad_ident",
        &format!("{WEIRD_SCHEMA}{WEIRD3_SCHEMA}"),
        WEIRD_SCHEMA,
        "",
    );
    let c = Cluster::shared();
    let chunks = all_chars(16384);
    let half = chunks.len() / 2;
    let mut m = c.client(&r.master);
    // The first half of every char before the copy.
    {
        let mut tx = m.transaction().unwrap();
        let st = tx
            .prepare(&format!(
                "insert into {WEIRD} values ($1, $2, $3, $4, $5, $6)"
            ))
            .unwrap();
        for (i, ch) in chunks[..half].iter().enumerate() {
            let nasty = NASTY[i % NASTY.len()];
            tx.execute(&st, &[&(i as i32), ch, &nasty, &nasty, &(i as i32), &nasty])
                .unwrap();
        }
        tx.commit().unwrap();
    }
    r.nodes();
    r.start(true, false);
    r.add_tables(&[WEIRD, WEIRD2]);
    r.londiste(&["master.ini", "add-table", WEIRD3]);
    r.londiste(&["slave.ini", "add-table", WEIRD3, "--create"]);
    // The sequence: on the root first, and on the leaf only once the leaf
    // has applied the root's first published value (without using it).
    r.londiste(&["master.ini", "add-seq", WEIRD_SEQ]);
    let top = r.top_tick();
    poll_until(
        "the leaf past the seq event",
        Duration::from_secs(10),
        || Ok(r.pos().is_some_and(|p| p > top)),
    );
    r.londiste(&["slave.ini", "add-seq", WEIRD_SEQ]);
    let seq_val = |db: &str| -> i64 {
        c.client(db)
            .query_one(&format!("select last_value from {WEIRD_SEQ}"), &[])
            .unwrap()
            .get(0)
    };
    let published: i64 = m
        .query_one(
            "select last_value from londiste.seq_info where queue_name = $1",
            &[&QUEUE],
        )
        .unwrap()
        .get(0);
    assert!(
        seq_val(&r.slave) >= published,
        "add-seq on the leaf left the sequence behind the root's published {published}"
    );
    r.wait_synced(3);
    let tables = [WEIRD, WEIRD2, WEIRD3, "public.victim"];
    wait_equal(c, &r.master, &r.slave, &tables, Duration::from_secs(15));
    let listed = r.londiste(&["slave.ini", "tables"]);
    assert!(listed.contains("\"Order.Details \"\"x\"\"\""), "{listed}");

    // Live changes: the other half of every char, nasty values everywhere,
    // key updates, deletes, and a sequence that moves.
    for (i, ch) in chunks[half..].iter().enumerate() {
        let i = (half + i) as i32;
        m.execute(
            &format!(
                "insert into {WEIRD} (\"Key Col\", \"select\", \"Größe\", \"a b\") values ($1, $2, $3, $4)"
            ),
            &[&i, ch, &NASTY[i as usize % NASTY.len()], &None::<String>],
        )
        .unwrap();
    }
    insert_weird(&mut m, 1000..1000 + NASTY.len(), &chunks);
    for (i, n) in NASTY.iter().enumerate() {
        m.execute(
            &format!(
                "update {WEIRD} set \"Größe\" = $2, \"a b\" = $2 || $2 where \"Key Col\" = $1"
            ),
            &[&(i as i32), n],
        )
        .unwrap();
    }
    m.batch_execute(&format!(
        "update {WEIRD} set \"Key Col\" = -\"Key Col\" where \"Key Col\" % 5 = 1;
         delete from {WEIRD} where \"Key Col\" % 7 = 2;
         update {WEIRD2} set \"Value\" = \"Value\" || '\\x00ff'::bytea;
         delete from {WEIRD2} where \"from\" like '%DROP%';
         insert into {WEIRD3} values ('''); DROP TABLE victim; --', 3, now(), '{{4}}');
         update {WEIRD3} set \"select\" = \"select\" || E'\\\\n' where \"Größe\" < 0;
         select nextval('{}') from generate_series(1, 123);",
        WEIRD_SEQ.replace('\'', "''")
    ))
    .unwrap();
    wait_equal(c, &r.master, &r.slave, &tables, Duration::from_secs(20));
    // Every char arrived, byte for byte.
    let mut s = c.client(&r.slave);
    let mut checked = 0;
    for row in s
        .query(&format!("select \"Key Col\", \"select\" from {WEIRD}"), &[])
        .unwrap()
    {
        let (k, v): (i32, Option<String>) = (row.get(0), row.get(1));
        let k = k.unsigned_abs() as usize;
        if k < chunks.len() {
            assert_eq!(v.as_deref(), Some(chunks[k].as_str()), "row {k}");
            checked += 1;
        }
    }
    assert!(checked > chunks.len() / 2, "only {checked} rows of chars");
    // Nothing injected: the victim and every table are still there.
    for db in [&r.master, &r.slave] {
        let n: i64 = c
            .client(db)
            .query_one("select count(*) from victim", &[])
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "victim in {db}");
    }
    // The sequence is kept ahead of the source.
    let src = seq_val(&r.master);
    assert!(src >= 123);
    poll_until("the sequence on the leaf", Duration::from_secs(15), || {
        let dst = seq_val(&r.slave);
        if dst >= src {
            Ok(true)
        } else {
            Err(format!("leaf {dst} < source {src}"))
        }
    });
    // compare agrees.
    r.londiste(&["slave.ini", "compare"]);
    r.assert_running();
    assert!(!r.slave_log().contains(" ERROR "), "{}", r.slave_log());
}

#[test]
fn passwords_never_shown() {
    let extra = format!(" password={SECRET}");
    let mut r = Repl::new("bad_secret", &format!("{SCHEMA}{DATA}"), SCHEMA, &extra);
    let c = Cluster::shared();
    let d = r.d().to_path_buf();
    let mut seen = Vec::new();
    let mut keep = |s: String| seen.push(s);
    keep(ok(
        "londiste3",
        &["-v", "master.ini", "create-root", "master", &r.mconn],
        &d,
    ));
    let prov = format!("--provider={}", r.mconn);
    keep(ok(
        "londiste3",
        &["-v", "slave.ini", "create-leaf", "slave", &r.sconn, &prov],
        &d,
    ));
    r.start(true, true);
    keep(ok(
        "londiste3",
        &["-v", "master.ini", "add-table", "--all"],
        &d,
    ));
    keep(ok(
        "londiste3",
        &["-v", "slave.ini", "add-table", "--all"],
        &d,
    ));
    r.wait_synced(TABLES.len() as i64);
    wait_equal(c, &r.master, &r.slave, TABLES, Duration::from_secs(15));
    c.client(&r.master).batch_execute(CHANGES).unwrap();
    wait_equal(c, &r.master, &r.slave, TABLES, Duration::from_secs(20));

    // The provider refuses connections for a while: the worker logs connect
    // errors (with the connect string) and recovers.
    let mut pg = c.client("postgres");
    pg.batch_execute(&format!(
        "alter database \"{}\" allow_connections false",
        r.master
    ))
    .unwrap();
    pg.execute(
        "select pg_terminate_backend(pid) from pg_stat_activity where datname = $1",
        &[&r.master],
    )
    .unwrap();
    poll_until(
        "a connect error in the leaf's log",
        Duration::from_secs(15),
        || Ok(r.slave_log().contains("cannot connect to")),
    );
    // status and node-info while the provider is away.
    for cmd in ["status", "node-info", "members"] {
        let out = run("londiste3", &["slave.ini", cmd], &d);
        keep(output_text(&out));
    }
    pg.batch_execute(&format!(
        "alter database \"{}\" allow_connections true",
        r.master
    ))
    .unwrap();
    c.client(&r.master)
        .batch_execute("insert into accounts (name) values ('after the outage')")
        .unwrap();
    wait_equal(c, &r.master, &r.slave, TABLES, Duration::from_secs(20));

    for ini in ["master.ini", "slave.ini"] {
        for cmd in [
            "status",
            "members",
            "node-info",
            "tables",
            "seqs",
            "missing",
        ] {
            keep(ok("londiste3", &["-v", ini, cmd], &d));
        }
    }
    keep(ok("londiste3", &["-v", "slave.ini", "compare"], &d));
    // Errors that carry connect strings.
    let port = closed_port();
    let leaf = unique_name("bad_secret_leaf");
    let lconn = format!("{}{extra}", c.create_db(&leaf));
    std::fs::write(d.join("leaf.ini"), worker_ini(&lconn, "leaf")).unwrap();
    for prov in [
        format!("--provider=host=127.0.0.1 port={port} user=postgres{extra} dbname=x"),
        format!("--provider={} dbname=nope{extra}", c.base_connstr()),
    ] {
        let out = run(
            "londiste3",
            &["-v", "leaf.ini", "create-leaf", "leaf", &prov],
            &d,
        );
        assert!(!out.status.success());
        keep(output_text(&out));
    }
    std::fs::write(
        d.join("gone.ini"),
        worker_ini(&format!("{} dbname=gone{extra}", c.base_connstr()), "gone"),
    )
    .unwrap();
    let out = run("londiste3", &["-v", "gone.ini", "status"], &d);
    assert_eq!(out.status.code(), Some(EX_UNAVAILABLE));
    keep(output_text(&out));

    for s in &seen {
        assert!(!s.contains(SECRET), "password shown:\n{s}");
    }
    assert!(
        seen.iter().any(|s| s.contains("password=***")),
        "no redacted connect string seen at all"
    );
    // Every log and console file, including the daemons' debug output.
    r.assert_running();
    let mut files = 0;
    for e in std::fs::read_dir(d.join("log"))
        .unwrap()
        .chain(std::fs::read_dir(&d).unwrap())
    {
        let p = e.unwrap().path();
        if p.is_dir() || p.extension().is_some_and(|x| x == "ini") {
            continue;
        }
        let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
        assert!(
            !text.contains(SECRET),
            "password in {}:\n{text}",
            p.display()
        );
        files += 1;
    }
    assert!(files >= 5, "expected log and console files, found {files}");
    let log = r.slave_log();
    assert!(log.contains("password=***"), "{log}");
    // Sanity: the diff helper sees the tables as equal.
    let (mut a, mut b) = (c.client(&r.master), c.client(&r.slave));
    for t in TABLES {
        assert!(tables_diff(&mut a, &mut b, t).is_none());
    }
}

/// A role with a password, checked by the server (the shared cluster trusts
/// everyone else): a wrong password is named as such, and shown nowhere.
#[test]
fn wrong_password() {
    let c = Cluster::shared();
    let role = unique_name("bad_pw_role");
    let db = unique_name("bad_pw_db");
    c.create_db(&db);
    let mut pg = c.client("postgres");
    pg.batch_execute(&format!(
        "set password_encryption = 'scram-sha-256';
         create role {role} login password 'right-{SECRET}';
         grant all on database {db} to {role};"
    ))
    .unwrap();
    // First match wins: this role must authenticate with its password.
    let hba = c.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all {role} 127.0.0.1/32 scram-sha-256\n{old}"),
    )
    .unwrap();
    pg.batch_execute("select pg_reload_conf()").unwrap();

    let dir = TestDir::new();
    let d = dir.path();
    let conn = |pw: &str| {
        format!(
            "host=127.0.0.1 port={} user={role} password={pw} dbname={db}",
            c.port()
        )
    };
    let wrong = conn(&format!("wrong-{SECRET}"));
    dir.write("x.ini", &worker_ini(&wrong, "x"));
    std::fs::create_dir(d.join("log")).unwrap();
    // The reload is asynchronous: wait until the server asks for passwords.
    poll_until(
        "the server to ask for a password",
        Duration::from_secs(10),
        || {
            let out = run("londiste3", &["x.ini", "node-info"], d);
            let text = output_text(&out);
            Ok(text.contains("password authentication failed"))
        },
    );
    for cmd in ["status", "node-info", "add-table"] {
        fails(
            &["x.ini", cmd],
            d,
            EX_UNAVAILABLE,
            &[
                &format!("password authentication failed for user \"{role}\""),
                "password=***",
                "check the user and password",
            ],
        );
    }
    // The worker logs it and retries, with backoff.
    let mut w = KillOnDrop(spawn("londiste3", &["x.ini", "worker"], d));
    let tries = || {
        std::fs::read_to_string(d.join("log/x.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" ERROR ") && l.contains("password authentication failed"))
            .count()
    };
    poll_until("the worker to retry", Duration::from_secs(15), || {
        Ok(tries() >= 2)
    });
    assert!(w.0.try_wait().unwrap().is_none(), "the worker gave up");
    drop(w);
    // The right password gets in (and on to the next problem).
    dir.write(
        "right.ini",
        &worker_ini(&conn(&format!("right-{SECRET}")), "r"),
    );
    fails(&["right.ini", "node-info"], d, 1, &["create-root"]);
    // As a provider: the same.
    dir.write("ok.ini", &worker_ini(&c.connstr(&db), "ok"));
    let prov = format!("--provider={wrong}");
    fails(
        &["ok.ini", "create-leaf", "leaf", &prov],
        d,
        EX_UNAVAILABLE,
        &["password authentication failed", "password=***"],
    );
    // Now the schemas exist, owned by postgres: the role may not use them
    // (schema pgq, like PgQ's, lets PUBLIC read queue information; londiste's
    // state is the owner's).
    fails(
        &["right.ini", "node-info"],
        d,
        1,
        &[
            "permission denied for schema londiste",
            "grant the connecting role",
        ],
    );
    for f in ["log/x.log", "log/ok.log", "log/r.log", "londiste3.console"] {
        let text = std::fs::read_to_string(d.join(f)).unwrap_or_default();
        assert!(!text.contains(SECRET), "password in {f}:\n{text}");
    }
}

/// A typo in a key is an error (the real key would silently keep its
/// default); a Skytools key this tool does not use is only a warning; a
/// logfile that cannot be written stops the start, naming file and key.
#[test]
fn config_typos_and_unwritable_logfile() {
    let c = Cluster::shared();
    let dir = TestDir::new();
    let d = dir.path();
    let conn = c.connstr("postgres");
    const EX_CONFIG: i32 = 78;

    dir.write(
        "typo.ini",
        &format!("[londiste3]\ndb = {conn}\nqueue_nmae = q\nqueue_name = q\n"),
    );
    fails(
        &["typo.ini", "worker"],
        d,
        EX_CONFIG,
        &["typo.ini", "queue_nmae", "did you mean queue_name?"],
    );
    dir.write(
        "typo2.ini",
        &format!("[londiste3]\ndb = {conn}\nqueue_name = q\nloopdelay = 1\n"),
    );
    fails(
        &["typo2.ini", "status"],
        d,
        EX_CONFIG,
        &["typo2.ini", "loop_delay"],
    );
    dir.write(
        "tick.ini",
        "[pgqd]\nbase_connstr = host=127.0.0.1\nticker_perod = 1\n",
    );
    let out = run("pgqd", &["tick.ini"], d);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{text}");
    assert!(text.contains("did you mean ticker_period?"), "{text}");

    // Settings of the original this tool does not use: warned about, not fatal.
    dir.write(
        "skytools.ini",
        &format!("[londiste3]\ndb = {conn}\nqueue_name = q\npgq_lazy_fetch = 500\n"),
    );
    let out = run("londiste3", &["skytools.ini", "node-info"], d);
    let text = output_text(&out);
    assert_ne!(out.status.code(), Some(EX_CONFIG), "{text}");
    assert!(
        text.contains("unknown key pgq_lazy_fetch ignored"),
        "no warning:\n{text}"
    );

    // Logfile: missing directory, a file where the directory should be.
    dir.write("afile", "");
    for (log, needle) in [
        (
            "nodir/w.log",
            "nodir does not exist; create it or change logfile",
        ),
        ("afile/w.log", "afile is not a directory"),
    ] {
        dir.write(
            "log.ini",
            &format!(
                "[londiste3]\ndb = {conn}\nqueue_name = q\nlogfile = {log}\npidfile = w.pid\n"
            ),
        );
        for args in [&["log.ini", "worker"][..], &["-d", "log.ini", "worker"]] {
            fails(args, d, EX_CONFIG, &["log.ini", "key logfile", needle]);
        }
        assert!(!d.join("w.pid").exists(), "a daemon started");
    }
}

/// The provider becomes unreachable under a running worker (here: its
/// location points at a closed port): the worker keeps running, `node-info`,
/// `status` and the log name the host and port (no password), the position
/// stays; once the provider is back, the leaf catches up.
#[test]
fn provider_unreachable_under_a_running_worker() {
    let c = Cluster::shared();
    let mut r = Repl::new("unreach_run", SCHEMA, SCHEMA, "");
    c.client(&r.master).batch_execute(DATA).unwrap();
    r.replicate_in_sync(false, &["accounts", "order_lines", "events"]);
    let mut s = c.client(&r.slave);
    let good: String = s
        .query_one(
            "select provider_location from londiste.node_info where queue_name = $1",
            &[&QUEUE],
        )
        .unwrap()
        .get(0);
    let port = closed_port();
    let bad = format!("host=127.0.0.1 port={port} dbname=nowhere user=x password={SECRET}");
    s.execute(
        "update londiste.node_info set provider_location = $2 where queue_name = $1",
        &[&QUEUE, &bad],
    )
    .unwrap();
    // The worker reconnects to the new location when its connection breaks.
    c.psql(
        &r.master,
        "select pg_terminate_backend(pid) from pg_stat_activity where datname = current_database() and application_name like 'londiste-rs%' and pid <> pg_backend_pid()",
    );
    let pos = r.pos();
    c.client(&r.master).batch_execute(CHANGES).unwrap();
    let line = r.wait_error(&["cannot connect", &format!("port={port}")]);
    assert!(!line.contains(SECRET), "password shown: {line}");
    // status still shows this node (its state and error) without the root.
    let status = r.londiste(&["slave.ini", "status"]);
    assert!(
        status.contains("slave (leaf)") && status.contains("cannot reach the rest of the set"),
        "{status}"
    );
    assert!(!status.contains(SECRET), "password shown:\n{status}");
    r.assert_running();
    assert_eq!(r.pos(), pos, "the position moved without a provider");
    s.execute(
        "update londiste.node_info set provider_location = $2 where queue_name = $1",
        &[&QUEUE, &good],
    )
    .unwrap();
    wait_equal(
        c,
        &r.master,
        &r.slave,
        &["public.accounts", "public.order_lines", "public.events"],
        Duration::from_secs(30),
    );
    poll_until("the error to clear", Duration::from_secs(10), || {
        Ok(!r.londiste(&["slave.ini", "node-info"]).contains("ERR:"))
    });
}
