//! Sequences added with add-seq are kept ahead of the root, never behind: after
//! a cut-over the new server cannot hand out an id the old one already used.

use crate::harness::{Cluster, poll_until};
use crate::tutorial::{Tutorial, ok};
use std::time::Duration;

fn last_value(c: &Cluster, db: &str) -> i64 {
    c.client(db)
        .query_one("select last_value from accounts_id_seq", &[])
        .unwrap()
        .get(0)
}

#[test]
fn sequences_stay_ahead_of_the_root() {
    let c = Cluster::shared();
    let t = Tutorial::new(c, "seqs");
    let d = t.path();
    t.setup_nodes();
    ok(
        "londiste3",
        &["master.ini", "add-seq", "accounts_id_seq"],
        d,
    );
    ok("londiste3", &["slave.ini", "add-seq", "--all"], d);
    let _guard = crate::tutorial::PidGuard(t.pidfiles());
    ok("pgqd", &["-d", "ticker.ini"], d);
    for round in 0..3 {
        c.client(&t.master)
            .batch_execute(
                "insert into accounts (name) select 'seq' from generate_series(1, 12000)",
            )
            .unwrap();
        let root = last_value(c, &t.master);
        poll_until(
            &format!("round {round}: slave sequence ahead of the root's {root}"),
            Duration::from_secs(20),
            || {
                let v = last_value(c, &t.slave);
                if v >= root {
                    Ok(true)
                } else {
                    Err(format!("slave at {v}"))
                }
            },
        );
    }
    let out = ok("londiste3", &["slave.ini", "seqs"], d);
    assert!(out.contains("public.accounts_id_seq"), "{out}");
    for f in ["slave.ini", "master.ini"] {
        ok("londiste3", &["-s", f], d);
    }
    ok("pgqd", &["-s", "ticker.ini"], d);
}
