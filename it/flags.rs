//! The options that change a command's own checks, from the reference's
//! list: add-table --force (a table the provider does not list) and
//! create-* --nocheck (the public connect string must lead to this
//! database). The audit of every other option is in `options.rs`.

use crate::harness::run;
use crate::repl::Repl;
use crate::tutorial::{ok, output_text};

/// add-table --force on a leaf: a table the provider does not replicate is
/// refused with a line that names --force, and added with it.
#[test]
fn add_table_force_accepts_a_table_the_provider_lacks() {
    let sql = "create table t (id int primary key);";
    let r = Repl::new("force", sql, sql, "");
    r.nodes();
    let out = run("londiste3", &["slave.ini", "add-table", "public.t"], r.d());
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("table public.t is not replicated on the provider")
            && text.contains("or add it here anyway with --force"),
        "{text}"
    );
    ok(
        "londiste3",
        &["slave.ini", "add-table", "public.t", "--force"],
        r.d(),
    );
    let tables = ok("londiste3", &["slave.ini", "tables", "--names-only"], r.d());
    assert!(tables.contains("public.t"), "{tables}");
}

/// create-*: the public connect string must lead to the database of `db`;
/// another database is refused (nothing created), the same one through
/// another spelling passes, and --nocheck skips the check.
#[test]
fn nocheck_skips_the_public_connect_string_check() {
    let r = Repl::new("nocheck", "", "", "");
    let d = r.d();
    let out = run(
        "londiste3",
        &["master.ini", "create-root", "master", &r.sconn],
        d,
    );
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("leads to database {}", r.slave))
            && text.contains("give --nocheck to skip this check"),
        "{text}"
    );
    let out = run("londiste3", &["master.ini", "node-info"], d);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a refused create-root made a node"
    );
    // The same database, written another way: passes.
    let same = format!("{} connect_timeout=10", r.mconn);
    ok(
        "londiste3",
        &["master.ini", "create-root", "master", &same],
        d,
    );
    // A leaf whose public string points elsewhere: refused, then --nocheck.
    let prov = format!("--provider={}", r.mconn);
    let out = run(
        "londiste3",
        &["slave.ini", "create-leaf", "slave", &r.mconn, &prov],
        d,
    );
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    ok(
        "londiste3",
        &[
            "slave.ini",
            "create-leaf",
            "slave",
            &r.mconn,
            &prov,
            "--nocheck",
        ],
        d,
    );
}
