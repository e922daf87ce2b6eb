//! compare and repair on a replica with injected differences: rows missing,
//! extra and changed on the slave (written behind the worker's back with
//! londiste.replay set) are found by compare, listed by repair, and fixed by
//! repair --apply, after which compare agrees and the tables are equal.

use crate::harness::{Cluster, run};
use crate::tutorial::{PidGuard, TABLES, Tutorial, ok, output_text, wait_equal};
use std::time::Duration;

#[test]
fn compare_finds_and_repair_fixes_missing_extra_and_changed_rows() {
    let c = Cluster::shared();
    let t = Tutorial::new(c, "repair");
    let d = t.path();
    let _guard = PidGuard(t.pidfiles());
    ok("pgqd", &["-d", "ticker.ini"], d);
    t.setup_nodes();
    crate::harness::poll_until("slave tables ok", Duration::from_secs(20), || {
        t.tables_ok("slave.ini")
    });
    wait_equal(c, &t.master, &t.slave, TABLES, Duration::from_secs(20));
    ok("londiste3", &["slave.ini", "compare"], d);

    c.client(&t.slave)
        .batch_execute(
            "set londiste.replay = on;
             delete from accounts where id in (5, 6, 7);
             insert into accounts (id, name, balance) values (90001, 'extra', 1);
             update order_lines set item = 'changed', qty = 999 where order_id = 3 and line_no = 2;
             update events set note = E'changed\\ttab', at = null where id = 42;",
        )
        .unwrap();

    let out = run("londiste3", &["slave.ini", "compare"], d);
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "compare must fail on a difference:\n{text}"
    );
    assert!(text.contains("Results do not match!"), "{text}");

    // Without --apply: the SQL is printed, nothing changes, exit status 1.
    let out = run(
        "londiste3",
        &["slave.ini", "repair", "accounts", "order_lines", "events"],
        d,
    );
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "repair without --apply must report differences:\n{text}"
    );
    assert!(
        text.contains("public.accounts: 3 missing, 0 different, 1 extra"),
        "{text}"
    );
    assert!(
        text.contains("public.order_lines: 0 missing, 1 different, 0 extra"),
        "{text}"
    );
    assert!(
        text.contains("public.events: 0 missing, 1 different, 0 extra"),
        "{text}"
    );
    assert!(text.contains("DELETE FROM"), "{text}");
    assert!(text.contains("INSERT INTO"), "{text}");
    assert!(
        crate::harness::tables_diff(
            &mut c.client(&t.master),
            &mut c.client(&t.slave),
            "public.accounts"
        )
        .is_some()
    );

    // With --apply the slave is fixed, and replication goes on.
    ok("londiste3", &["slave.ini", "repair", "--apply"], d);
    wait_equal(c, &t.master, &t.slave, TABLES, Duration::from_secs(10));
    ok("londiste3", &["slave.ini", "compare"], d);
    c.client(&t.master)
        .batch_execute("update accounts set balance = balance + 5 where id < 20")
        .unwrap();
    wait_equal(c, &t.master, &t.slave, TABLES, Duration::from_secs(20));
    let out = ok("londiste3", &["slave.ini", "repair"], d);
    assert!(out.contains("0 missing, 0 different, 0 extra"), "{out}");
    for f in ["slave.ini", "master.ini"] {
        ok("londiste3", &["-s", f], d);
    }
    ok("pgqd", &["-s", "ticker.ini"], d);
}
