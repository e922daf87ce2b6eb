//! One process, many jobs, driven as an init script would: `londiste-rs run -d`
//! over a process file (`[londiste-rs] jobs = ...`), then `kill -HUP` (via `-r`)
//! after editing the files: a job added to the list starts, a job whose settings
//! changed restarts, a broken file is logged and the running jobs carry on, and
//! `-s` (SIGINT) stops everything with nothing lost.

use crate::harness::{Cluster, poll_until};
use crate::tutorial::{PidGuard, TABLES, Tutorial, ok, wait_equal, wait_pidfile_gone};
use std::time::Duration;

fn log_has(t: &Tutorial, what: &str) -> Result<bool, String> {
    let log = std::fs::read_to_string(t.path().join("log/daemon.log")).unwrap_or_default();
    if log.contains(what) {
        Ok(true)
    } else {
        Err(format!("log so far:\n{log}"))
    }
}

#[test]
fn hup_starts_new_jobs_restarts_changed_ones_and_survives_a_broken_config() {
    let c = Cluster::shared();
    let t = Tutorial::new(c, "reload");
    let d = t.path();
    let root = format!("--provider={}", t.mconn);
    ok(
        "londiste3",
        &["master.ini", "create-root", "master", &t.mconn],
        d,
    );
    ok(
        "londiste3",
        &["slave.ini", "create-leaf", "slave", &t.sconn, &root],
        d,
    );
    ok("londiste3", &["master.ini", "add-table", "--all"], d);
    ok("londiste3", &["slave.ini", "add-table", "--all"], d);

    // First only the ticker and the root worker.
    let process = "[londiste-rs]\nlogfile = log/daemon.log\npidfile = pid/daemon.pid\njobs = ticker.ini master.ini\n";
    t.dir.write("daemon.ini", process);
    let _guard = PidGuard(vec![d.join("pid/daemon.pid")]);
    ok("londiste-rs", &["run", "-d", "daemon.ini"], d);
    poll_until(
        "ticker and master jobs running",
        Duration::from_secs(10),
        || log_has(&t, "worker for queue"),
    );
    let mut m = c.client(&t.master);
    m.batch_execute("insert into accounts (name) values ('before slave job')")
        .unwrap();

    // A new job in the list starts on HUP, and catches up (copy + events).
    t.dir.write(
        "daemon.ini",
        &process.replace("master.ini", "master.ini slave*.ini"),
    );
    ok("londiste-rs", &["run", "-r", "daemon.ini"], d);
    poll_until("the slave job to start", Duration::from_secs(10), || {
        log_has(&t, "job slave: new in config, started")
    });
    wait_equal(c, &t.master, &t.slave, TABLES, Duration::from_secs(20));

    // A changed setting restarts only that job.
    let slave_ini = std::fs::read_to_string(d.join("slave.ini")).unwrap();
    t.dir.write(
        "slave.ini",
        &slave_ini.replace("loop_delay = 0.5", "loop_delay = 0.2"),
    );
    ok("londiste-rs", &["run", "-r", "daemon.ini"], d);
    poll_until("the slave job to restart", Duration::from_secs(10), || {
        log_has(&t, "job slave: config changed, restarted")
    });
    let log = std::fs::read_to_string(d.join("log/daemon.log")).unwrap();
    assert!(
        !log.contains("job master: config changed"),
        "unchanged job was restarted:\n{log}"
    );

    // A broken file on HUP is reported and the running jobs keep replicating.
    t.dir.write(
        "slave.ini",
        &slave_ini.replace("loop_delay = 0.5", "loop_delay = soon"),
    );
    let out = crate::harness::run("londiste-rs", &["run", "-r", "daemon.ini"], d);
    assert!(
        out.status.success(),
        "-r with a broken job file must still signal: {out:?}"
    );
    poll_until(
        "the failed reload to be logged",
        Duration::from_secs(10),
        || log_has(&t, "reload failed, keeping the running config"),
    );
    m.batch_execute("insert into accounts (name) values ('after broken reload')")
        .unwrap();
    wait_equal(c, &t.master, &t.slave, TABLES, Duration::from_secs(20));

    // INT stops everything; the pidfile goes away and nothing is lost.
    t.dir.write("slave.ini", &slave_ini);
    m.batch_execute("update accounts set balance = balance + 1")
        .unwrap();
    wait_equal(c, &t.master, &t.slave, TABLES, Duration::from_secs(20));
    ok("londiste-rs", &["run", "-s", "daemon.ini"], d);
    wait_pidfile_gone(&d.join("pid/daemon.pid"));
}
