//! The cut-over across majors: the root on one version, a branch on another,
//! an application writing all the time; `takeover` makes the branch the root
//! (the upgrade), the old root follows it (the way back stays open), and a
//! second `takeover` switches back (the rollback). Nothing lost, nothing
//! twice, the old root refusing writes in between. Uses the rig and writer
//! of `cutover.rs`; its tables have no floats, so rows compare as text.

use super::Side;
use crate::cutover::{Rig, Writer, assert_has_ids};
use std::time::Duration;

/// Root on `old`, branch on `new` (None: the system server), switched over
/// and back under writes.
pub fn switchover_and_back(old: Option<u32>, new: Option<u32>) {
    let (a, b) = (Side::new(old), Side::new(new));
    let majors = (a.c().major(), b.c().major());
    let r = Rig::root_and_branch_on(&[a.c(), b.c()]);

    let w = Writer::start(
        vec![r.conn("master"), r.conn("slave")],
        Duration::from_millis(2),
    );
    w.wait_commits(50);
    r.londiste(&["slave.ini", "takeover", "master"]);
    assert_eq!(r.node_type("slave"), "root", "{majors:?}");
    assert_eq!(r.node_type("master"), "branch", "{majors:?}");
    w.wait_commits(100);
    // The old root, on the other major, follows the new one.
    r.write_reaches("slave", "master");
    // And back.
    r.londiste(&["master.ini", "takeover", "slave"]);
    assert_eq!(r.node_type("master"), "root", "{majors:?}");
    w.wait_commits(100);
    let rep = w.stop();
    assert!(
        rep.errors.is_empty(),
        "the writer saw errors ({majors:?}): {:?}",
        &rep.errors[..rep.errors.len().min(5)]
    );
    assert!(
        rep.switches >= 2,
        "the writer never switched ({})",
        rep.switches
    );
    r.wait_equal("master", "slave");
    assert_has_ids(&mut r.client("master"), &rep.committed, "master");
    assert_has_ids(&mut r.client("slave"), &rep.committed, "slave");
    eprintln!(
        "versions: takeover {} -> {} and back: {} commits",
        majors.0,
        majors.1,
        rep.committed.len()
    );
}

#[test]
fn takeover_10_to_18_and_back() {
    switchover_and_back(Some(10), Some(18));
}

#[test]
fn takeover_18_to_system_and_back() {
    switchover_and_back(Some(18), None);
}
