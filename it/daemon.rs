//! The daemon command line, as an operator meets it: `pgqd -V/--ini`,
//! foreground and `-d` starts, the pidfile (refusing a second instance,
//! taking over a stale one), `-s`/`-r` signalling, log reopening after a
//! rotation, and one-line config errors with exit code 78.

use crate::harness::{Cluster, KillOnDrop, TestDir, poll_until, run, spawn, unique_name};
use crate::tutorial::{PidGuard, ok, output_text, wait_pidfile_gone};
use londiste_rs::queue::install::install_pgq;
use std::path::Path;
use std::time::{Duration, Instant};

const EX_USAGE: i32 = 64;
const EX_CONFIG: i32 = 78;

/// A test dir with `log/`, `pid/` and a ticker.ini for a fresh database
/// (no pgq needed: the ticker just waits for it), logging stats every 0.2 s
/// so the log keeps growing.
fn ticker_dir() -> TestDir {
    let c = Cluster::shared();
    let db = unique_name("daemon");
    c.create_db(&db);
    let dir = TestDir::new();
    std::fs::create_dir(dir.path().join("log")).unwrap();
    std::fs::create_dir(dir.path().join("pid")).unwrap();
    dir.write(
        "ticker.ini",
        &format!(
            "[pgqd]\nbase_connstr = {}\ndatabase_list = {db}\nlogfile = log/ticker.log\n\
             pidfile = pid/ticker.pid\nstats_period = 0.2\n",
            c.base_connstr()
        ),
    );
    dir
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn read_or_empty(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn pgqd_version_ini_and_usage() {
    let dir = TestDir::new();
    let out = ok("pgqd", &["-V"], dir.path());
    assert!(out.contains("pgqd") && out.contains("version"), "{out}");
    let ini = ok("pgqd", &["--ini"], dir.path());
    assert!(
        ini.contains("[pgqd]") && ini.contains("base_connstr"),
        "{ini}"
    );
    // The sample is a valid config (up to the server it points at).
    dir.write("sample.ini", &ini);

    let out = run("pgqd", &["--no-such-option", "x.ini"], dir.path());
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", output_text(&out));
    let out = run("pgqd", &[], dir.path());
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", output_text(&out));

    // The tutorial's installation check.
    let out = run("londiste3", &[], dir.path());
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("need config file"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn pgqd_foreground_logs_and_stops_on_sigint() {
    let dir = ticker_dir();
    let d = dir.path();
    let mut p = KillOnDrop(spawn("pgqd", &["ticker.ini"], d));
    let log = d.join("log/ticker.log");
    poll_until("Starting in the logfile", Duration::from_secs(10), || {
        Ok(read_or_empty(&log).contains("Starting"))
    });
    let pidfile = d.join("pid/ticker.pid");
    assert_eq!(read_pid(&pidfile), Some(p.0.id() as i32), "pidfile content");

    // -s on the foreground process works too.
    ok("pgqd", &["-s", "ticker.ini"], d);
    poll_until("pgqd to exit", Duration::from_secs(10), || {
        Ok(p.0.try_wait().map_err(|e| e.to_string())?.is_some())
    });
    let status = p.0.wait().unwrap();
    assert!(status.success(), "exit status after -s: {status}");
    assert!(!pidfile.exists(), "pidfile left behind");
}

#[test]
fn pgqd_daemon_pidfile_reload_rotate_stop() {
    let dir = ticker_dir();
    let d = dir.path();
    let pidfile = d.join("pid/ticker.pid");
    let _guard = PidGuard(vec![pidfile.clone()]);
    let log = d.join("log/ticker.log");

    ok("pgqd", &["-d", "ticker.ini"], d);
    poll_until(
        "the pidfile names a live process",
        Duration::from_secs(10),
        || Ok(read_pid(&pidfile).is_some_and(alive)),
    );
    let pid = read_pid(&pidfile).unwrap();
    poll_until("Starting in the logfile", Duration::from_secs(10), || {
        Ok(read_or_empty(&log).contains("Starting"))
    });

    // A second instance on the same pidfile is refused, on the terminal.
    let out = run("pgqd", &["-d", "ticker.ini"], d);
    assert!(!out.status.success(), "second -d accepted: {out:?}");
    assert!(
        output_text(&out).contains("already running"),
        "{}",
        output_text(&out)
    );
    let out = run("pgqd", &["ticker.ini"], d);
    assert!(!out.status.success(), "second foreground start accepted");
    assert!(
        output_text(&out).contains("already running"),
        "{}",
        output_text(&out)
    );
    assert_eq!(
        read_pid(&pidfile),
        Some(pid),
        "the refused start took the pidfile"
    );
    assert!(alive(pid));

    // logrotate: move the log away, -r, and the daemon writes a new one.
    std::fs::rename(&log, d.join("log/ticker.log.1")).unwrap();
    ok("pgqd", &["-r", "ticker.ini"], d);
    poll_until("a new logfile with lines", Duration::from_secs(10), || {
        Ok(read_or_empty(&log).lines().count() >= 2)
    });
    assert!(alive(pid), "-r must not stop the daemon");
    assert_eq!(read_pid(&pidfile), Some(pid));
    let rotated = read_or_empty(&d.join("log/ticker.log.1"));
    assert!(rotated.contains("Starting"), "rotated log: {rotated}");

    ok("pgqd", &["-s", "ticker.ini"], d);
    wait_pidfile_gone(&pidfile);
    poll_until(
        "the daemon process to exit",
        Duration::from_secs(10),
        || Ok(!alive(pid)),
    );

    // Nothing running: -s, -k and -r fail with a clear message.
    for flag in ["-s", "-k", "-r"] {
        let out = run("pgqd", &[flag, "ticker.ini"], d);
        let text = output_text(&out);
        assert!(!out.status.success(), "{flag} with nothing running: {text}");
        assert!(text.contains("not running"), "{flag}: {text}");
    }
}

#[test]
fn pgqd_takes_over_stale_pidfile() {
    let dir = ticker_dir();
    let d = dir.path();
    let pidfile = d.join("pid/ticker.pid");
    // A pid that surely is dead: a child that has exited and been reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id() as i32;
    child.wait().unwrap();
    std::fs::write(&pidfile, format!("{dead}\n")).unwrap();
    let _guard = PidGuard(vec![pidfile.clone()]);

    let out = run("pgqd", &["-s", "ticker.ini"], d);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("not running"),
        "{}",
        output_text(&out)
    );

    ok("pgqd", &["-d", "ticker.ini"], d);
    poll_until("the pidfile taken over", Duration::from_secs(10), || {
        Ok(read_pid(&pidfile).is_some_and(|p| p != dead && alive(p)))
    });
    let log = d.join("log/ticker.log");
    poll_until("Starting in the logfile", Duration::from_secs(10), || {
        Ok(read_or_empty(&log).contains("Starting"))
    });
    ok("pgqd", &["-s", "ticker.ini"], d);
    wait_pidfile_gone(&pidfile);
}

/// Runs `name args`, expects exit 78 and one line on stderr containing all
/// of `needles`.
fn config_error(name: &str, args: &[&str], d: &Path, needles: &[&str]) {
    let out = run(name, args, d);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(EX_CONFIG),
        "`{name} {}`: {}",
        args.join(" "),
        output_text(&out)
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }
}

#[test]
fn config_errors_exit_78_with_one_line() {
    let dir = TestDir::new();
    let d = dir.path();
    config_error("pgqd", &["nosuch.ini"], d, &["nosuch.ini"]);
    config_error("pgqd", &["-d", "nosuch.ini"], d, &["nosuch.ini"]);

    dir.write("other.ini", "[londiste3]\ndb = dbname=x\nqueue_name = q\n");
    config_error("pgqd", &["other.ini"], d, &["other.ini", "[pgqd]"]);
    dir.write("ticker.ini", "[pgqd]\nbase_connstr = host=127.0.0.1\n");
    config_error(
        "londiste3",
        &["ticker.ini", "worker"],
        d,
        &["ticker.ini", "[londiste3]"],
    );

    dir.write(
        "bad.ini",
        "[pgqd]\nbase_connstr = host=127.0.0.1\nticker_period = abc\n",
    );
    config_error(
        "pgqd",
        &["bad.ini"],
        d,
        &["bad.ini", "ticker_period", "abc"],
    );
    config_error("pgqd", &["-d", "bad.ini"], d, &["bad.ini", "ticker_period"]);
    config_error("pgqd", &["-s", "bad.ini"], d, &["bad.ini", "ticker_period"]);
    dir.write(
        "bad2.ini",
        "[pgqd]\nbase_connstr = host=127.0.0.1 dbname=x\n",
    );
    config_error("pgqd", &["bad2.ini"], d, &["bad2.ini", "base_connstr"]);

    dir.write(
        "worker.ini",
        "[londiste3]\ndb = dbname=x\nqueue_name = q\nloop_delay = soon\n",
    );
    config_error(
        "londiste3",
        &["worker.ini", "worker"],
        d,
        &["worker.ini", "loop_delay"],
    );
    dir.write("noq.ini", "[londiste3]\ndb = dbname=x\n");
    config_error(
        "londiste3",
        &["noq.ini", "status"],
        d,
        &["noq.ini", "queue_name"],
    );

    // -d needs a pidfile; nothing may be started.
    let c = Cluster::shared();
    dir.write(
        "nopid.ini",
        &format!(
            "[londiste3]\ndb = {}\nqueue_name = q\n",
            c.connstr("postgres")
        ),
    );
    config_error("londiste3", &["-d", "nopid.ini", "worker"], d, &["pidfile"]);
    dir.write(
        "nopid_ticker.ini",
        &format!("[pgqd]\nbase_connstr = {}\n", c.base_connstr()),
    );
    config_error("pgqd", &["-d", "nopid_ticker.ini"], d, &["pidfile"]);
    // -s needs a pidfile too.
    config_error("pgqd", &["-s", "nopid_ticker.ini"], d, &["pidfile"]);
}

/// Inserts an event into queue `q` of `db` and waits (at most 10 s) until
/// consumer `c` gets it through next_batch / get_batch_events /
/// finish_batch, which needs a tick that only pgqd makes. Returns how long
/// that took.
fn delivered(cl: &Cluster, db: &str, data: &str) -> Duration {
    let mut c = cl.client(db);
    let start = Instant::now();
    c.execute("SELECT pgq.insert_event('q', 'x', $1)", &[&data])
        .unwrap();
    let mut seen = Vec::new();
    poll_until(
        &format!("event {data:?} in a batch of {db}"),
        Duration::from_secs(10),
        || {
            let batch: Option<i64> = c
                .query_one("SELECT pgq.next_batch('q', 'c')", &[])
                .map_err(|e| e.to_string())?
                .get(0);
            if let Some(b) = batch {
                for r in c
                    .query("SELECT ev_data FROM pgq.get_batch_events($1)", &[&b])
                    .map_err(|e| e.to_string())?
                {
                    seen.push(r.get::<_, String>(0));
                }
                c.execute("SELECT pgq.finish_batch($1)", &[&b])
                    .map_err(|e| e.to_string())?;
            }
            if seen.iter().any(|s| s == data) {
                Ok(true)
            } else {
                Err(format!("batches so far: {seen:?}"))
            }
        },
    );
    start.elapsed()
}

/// pgq installed, queue `q` with consumer `c`.
fn pgq_queue(cl: &Cluster, db: &str) {
    let mut c = cl.client(db);
    install_pgq(&mut c).expect("install pgq");
    c.batch_execute("SELECT pgq.create_queue('q'); SELECT pgq.register_consumer('q', 'c')")
        .unwrap();
}

fn errors(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .collect()
}

/// With an empty database_list pgqd ticks every database that accepts
/// connections and has the pgq schema, found on its own: those there at
/// start, one created while it runs and one where pgq is installed later
/// (both within check_period and a second); it installs nothing elsewhere,
/// leaves a database that does not accept connections alone without a
/// complaint, and forgets a dropped one while ticking the rest. On a private
/// cluster, so that it does not tick other tests' queues.
#[test]
fn pgqd_without_database_list_ticks_every_database_with_pgq() {
    let cl = Cluster::start();
    let (a, b, plain, closed, late) = (
        unique_name("auto_a"),
        unique_name("auto_b"),
        unique_name("auto_plain"),
        unique_name("auto_closed"),
        unique_name("auto_late"),
    );
    for db in [&a, &b, &plain, &closed] {
        cl.create_db(db);
    }
    pgq_queue(&cl, &a);
    pgq_queue(&cl, &b);
    pgq_queue(&cl, &closed);
    cl.client(&closed)
        .execute("SELECT pgq.insert_event('q', 'x', 'never')", &[])
        .unwrap();
    cl.client("postgres")
        .batch_execute(&format!(
            "ALTER DATABASE {closed} WITH ALLOW_CONNECTIONS false"
        ))
        .unwrap();

    let dir = TestDir::new();
    dir.write(
        "ticker.ini",
        &format!(
            "[pgqd]\nbase_connstr = {}\ndatabase_list =\nticker_period = 0.05\n\
             check_period = 0.5\nlogfile = pgqd.log\n",
            cl.base_connstr()
        ),
    );
    let mut p = KillOnDrop(spawn("pgqd", &["ticker.ini"], dir.path()));
    let log = dir.path().join("pgqd.log");

    for db in [&a, &b] {
        delivered(&cl, db, "first");
    }
    let has_pgq = |db: &str| cl.psql(db, "SELECT to_regnamespace('pgq') IS NOT NULL");
    assert_eq!(has_pgq(&plain), "f", "pgqd installed pgq in {plain}");

    // A database created while pgqd runs, and pgq installed after pgqd has
    // seen a database without it.
    cl.create_db(&late);
    pgq_queue(&cl, &late);
    let took = delivered(&cl, &late, "late");
    assert!(
        took < Duration::from_secs(15),
        "new database ticked after {took:?}"
    );
    pgq_queue(&cl, &plain);
    let took = delivered(&cl, &plain, "installed later");
    assert!(
        took < Duration::from_secs(15),
        "pgq installed later ticked after {took:?}"
    );
    let text = read_or_empty(&log);
    for db in [&a, &b, &late, &plain] {
        assert!(
            text.contains(&format!("database {db}: ticking")),
            "no 'ticking' line for {db}: {text}"
        );
    }
    assert!(errors(&text).is_empty(), "pgqd logged problems: {text}");
    assert!(!text.contains(&closed), "pgqd tried {closed}: {text}");

    // A dropped database is forgotten; the others keep being ticked.
    cl.client("postgres")
        .batch_execute(&format!("DROP DATABASE {b} WITH (FORCE)"))
        .unwrap();
    poll_until(
        "pgqd to forget the dropped database",
        Duration::from_secs(10),
        || Ok(read_or_empty(&log).contains(&format!("database {b} is no longer in the list"))),
    );
    for db in [&a, &late] {
        delivered(&cl, db, "after drop");
    }
    assert!(
        p.0.try_wait().unwrap().is_none(),
        "pgqd exited: {}",
        read_or_empty(&log)
    );
    let text = read_or_empty(&log);
    let others: Vec<&str> = errors(&text)
        .into_iter()
        .filter(|l| !l.contains(&b))
        .collect();
    assert!(others.is_empty(), "pgqd logged problems: {others:#?}");

    // The database that accepts no connections still has only its first
    // tick (from create_queue): pgqd never ticked it.
    drop(p);
    cl.client("postgres")
        .batch_execute(&format!(
            "ALTER DATABASE {closed} WITH ALLOW_CONNECTIONS true"
        ))
        .unwrap();
    assert_eq!(cl.psql(&closed, "SELECT count(*) FROM pgq.tick"), "1");
}
