//! The Skytools 3 tutorial (`/work/shared/seed/londiste3-tutorial.txt`) run
//! verbatim through the `pgqd` and `londiste3` links: ticker, root, branch,
//! `add-table --all` on both, then live changes on the master must show up on
//! the slave. The same setup also runs as one `londiste-rs run` process, and
//! as a root → branch → leaf chain.

use crate::harness::{
    Cluster, KillOnDrop, TestDir, poll_until, run, spawn, tables_diff, unique_name,
};
use postgres::Client;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// The three tables of the tutorial tests: serial key, composite key, and a
/// table of assorted types.
pub const TABLES: &[&str] = &["public.accounts", "public.order_lines", "public.events"];

pub const SCHEMA: &str = "
create table accounts (id serial primary key, name text not null, balance numeric(12,2) not null default 0);
create table order_lines (order_id int, line_no int, item text, qty int not null, primary key (order_id, line_no));
create table events (id bigint primary key, note text, amount numeric, at timestamptz, flag boolean);
";

pub const DATA: &str = "
insert into accounts (name, balance) select 'acct ' || i, i * 1.25 from generate_series(1, 200) i;
insert into order_lines select o, l, 'item ' || o || '/' || l, o + l from generate_series(1, 50) o, generate_series(1, 4) l;
insert into events select i, case when i % 7 = 0 then null else E'note \\t''' || i || '''\\n' end,
  i / 3.0, timestamptz '2020-01-01 00:00:00+00' + i * interval '1 hour 1 second', i % 2 = 0
  from generate_series(1, 300) i;
";

/// Live changes after the initial copy, including primary-key updates.
pub const CHANGES: &str = "
insert into accounts (name, balance) values ('new one', 10), ('new two', 20.5);
update accounts set balance = balance + 1 where id % 10 = 0;
update accounts set id = id + 10000 where id in (3, 4);
delete from accounts where id between 100 and 110;
insert into order_lines values (999, 1, 'late', 1), (999, 2, null, 2);
update order_lines set line_no = line_no + 100 where order_id = 2;
update order_lines set qty = qty * 2, item = 'ü ñ \"quoted\"' where order_id = 5;
delete from order_lines where order_id = 7;
update events set note = null, amount = -0.5 where id = 1;
update events set at = null, flag = null where id = 2;
update events set id = -id where id between 10 and 12;
delete from events where id > 290;
insert into events values (1000, E'multi\\nline', 1e20, now(), true);
";

/// Runs `name args` in `cwd` and panics with its output unless it succeeds;
/// returns stdout followed by stderr.
pub fn ok(name: &str, args: &[&str], cwd: &Path) -> String {
    let out = run(name, args, cwd);
    let all = output_text(&out);
    assert!(
        out.status.success(),
        "`{name} {}` failed ({}):\n{all}",
        args.join(" "),
        out.status
    );
    all
}

pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `None` when every table in `tables` is the same in both databases.
pub fn all_diff(src: &mut Client, dst: &mut Client, tables: &[&str]) -> Option<String> {
    let diffs: Vec<String> = tables
        .iter()
        .filter_map(|t| tables_diff(src, dst, t))
        .collect();
    (!diffs.is_empty()).then(|| diffs.join("\n"))
}

/// Poll until every table is equal on both sides.
pub fn wait_equal(c: &Cluster, src: &str, dst: &str, tables: &[&str], timeout: Duration) {
    let (mut a, mut b) = (c.client(src), c.client(dst));
    poll_until(
        &format!("tables of {dst} to equal {src}"),
        timeout,
        || match all_diff(&mut a, &mut b, tables) {
            None => Ok(true),
            Some(d) => Err(d),
        },
    );
}

/// On drop, SIGKILLs the processes named in these pidfiles (daemons started
/// with `-d` by this test), so a failing test leaves nothing running.
pub struct PidGuard(pub Vec<PathBuf>);

impl Drop for PidGuard {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Some(pid) = std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The tutorial's config files, in a directory with `log/` and `pid/`.
pub struct Tutorial {
    pub dir: TestDir,
    pub master: String,
    pub slave: String,
    pub mconn: String,
    pub sconn: String,
}

impl Tutorial {
    /// Master with schema and data, slave with the schema only, and the
    /// tutorial's ticker.ini, master.ini and slave.ini.
    pub fn new(c: &Cluster, prefix: &str) -> Tutorial {
        let (master, slave) = (
            unique_name(&format!("{prefix}_master")),
            unique_name(&format!("{prefix}_slave")),
        );
        let mconn = c.create_db(&master);
        let sconn = c.create_db(&slave);
        c.client(&master)
            .batch_execute(&format!("{SCHEMA}{DATA}"))
            .expect("master schema and data");
        c.client(&slave)
            .batch_execute(SCHEMA)
            .expect("slave schema");
        let dir = TestDir::new();
        std::fs::create_dir(dir.path().join("log")).unwrap();
        std::fs::create_dir(dir.path().join("pid")).unwrap();
        dir.write(
            "ticker.ini",
            &format!(
                "[pgqd]\n# libpq connect string without dbname=\nbase_connstr = {}\n\n\
                 # limit ticker to specific databases\ndatabase_list = {master}\n\n\
                 # where to log\nlogfile = log/ticker.log\n\n# pidfile\npidfile = pid/ticker.pid\n",
                c.base_connstr()
            ),
        );
        dir.write(
            "master.ini",
            &format!(
                "[londiste3]\n# target database\ndb = {mconn}\n\n# queue name\nqueue_name = {master}\n\n\
                 # how many seconds to sleep between work loops\n\
                 # if missing or 0, then instead sleeping, the script will exit\nloop_delay = 0.5\n\n\
                 # where to log\nlogfile = log/master.log\npidfile = pid/master.pid\n"
            ),
        );
        dir.write(
            "slave.ini",
            &format!(
                "[londiste3]\n# target database\ndb = {sconn}\n\n# queue name to read from\nqueue_name = {master}\n\n\
                 # how many seconds to sleep between work loops\n\
                 # if missing or 0, then instead sleeping, the script will exit\nloop_delay = 0.5\n\n\
                 # where to log\nlogfile = log/yourdocs_slave.log\npidfile = pid/yourdocs_slave.pid\n"
            ),
        );
        Tutorial {
            dir,
            master,
            slave,
            mconn,
            sconn,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pidfiles(&self) -> Vec<PathBuf> {
        ["ticker", "master", "yourdocs_slave"]
            .iter()
            .map(|n| self.path().join(format!("pid/{n}.pid")))
            .collect()
    }

    /// `londiste3 X.ini tables` lists every table as `ok`.
    pub fn tables_ok(&self, ini: &str) -> Result<bool, String> {
        let out = run("londiste3", &[ini, "tables"], self.path());
        let text = output_text(&out);
        if !out.status.success() {
            return Err(text);
        }
        let all_ok = TABLES.iter().all(|t| {
            text.lines()
                .any(|l| l.starts_with(t) && l.split_whitespace().nth(1) == Some("ok"))
        });
        if all_ok { Ok(true) } else { Err(text) }
    }

    /// The replication steps of the tutorial, from create-root to the
    /// slave's add-table; returns when the last add-table finished.
    pub fn setup_nodes(&self) -> Instant {
        let d = self.path();
        let root = format!("--provider={}", self.mconn);
        let out = ok(
            "londiste3",
            &["master.ini", "create-root", "master", &self.mconn],
            d,
        );
        assert!(out.contains("Done"), "create-root should say Done:\n{out}");
        ok("londiste3", &["-d", "master.ini", "worker"], d);
        ok(
            "londiste3",
            &["slave.ini", "create-branch", "slave", &self.sconn, &root],
            d,
        );
        ok("londiste3", &["-d", "slave.ini", "worker"], d);
        ok("londiste3", &["master.ini", "add-table", "--all"], d);
        ok("londiste3", &["slave.ini", "add-table", "--all"], d);
        Instant::now()
    }
}

/// Waits until the pidfile is gone (the daemon exited cleanly).
pub fn wait_pidfile_gone(p: &Path) {
    poll_until(
        &format!("pidfile {} to disappear", p.display()),
        Duration::from_secs(20),
        || Ok(!p.exists()),
    );
}

/// Waits until the ticker (logging to `dir`/log/ticker.log) has looked at `db`
/// and found no pgq in it yet.
pub fn wait_ticker_checked(dir: &Path, db: &str) {
    let log = dir.join("log/ticker.log");
    let line = format!("database {db}: no pgq schema yet");
    poll_until(
        &format!("the ticker to check {db} for pgq"),
        Duration::from_secs(10),
        || {
            Ok(std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&line))
        },
    );
}

#[test]
fn tutorial_verbatim_with_daemons() {
    let c = Cluster::shared();
    let t = Tutorial::new(c, "tut");
    let d = t.path();
    let _guard = PidGuard(t.pidfiles());

    // "londiste3" alone: the tutorial's installation check.
    let out = run("londiste3", &[], d);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("need config file"),
        "{}",
        output_text(&out)
    );

    ok("pgqd", &["-d", "ticker.ini"], d);
    // As in the tutorial, the ticker is up before create-root: wait until it
    // has connected and found no pgq schema yet, so it must notice the
    // install later on its own.
    wait_ticker_checked(d, &t.master);
    let synced_from = t.setup_nodes();

    // Initial copy: every table in sync within 10 s of the last add-table.
    poll_until(
        "slave tables to be ok and equal to master",
        Duration::from_secs(10),
        || {
            t.tables_ok("slave.ini")?;
            let (mut a, mut b) = (c.client(&t.master), c.client(&t.slave));
            match all_diff(&mut a, &mut b, TABLES) {
                None => Ok(true),
                Some(diff) => Err(diff),
            }
        },
    );
    assert!(synced_from.elapsed() < Duration::from_secs(10));

    // Live changes replicate.
    c.client(&t.master).batch_execute(CHANGES).unwrap();
    wait_equal(c, &t.master, &t.slave, TABLES, Duration::from_secs(20));

    // The admin views agree.
    let status = ok("londiste3", &["slave.ini", "status"], d);
    assert!(status.contains("slave"), "status:\n{status}");
    ok("londiste3", &["slave.ini", "compare"], d);
    c.client(&t.slave)
        .batch_execute("alter table events disable trigger all; delete from events where id = 1000")
        .unwrap();
    let out = run("londiste3", &["slave.ini", "compare"], d);
    assert!(
        !out.status.success(),
        "compare must fail on a differing table:\n{}",
        output_text(&out)
    );

    for (ini, pid) in [("slave.ini", "yourdocs_slave"), ("master.ini", "master")] {
        ok("londiste3", &["-s", ini], d);
        wait_pidfile_gone(&d.join(format!("pid/{pid}.pid")));
    }
    ok("pgqd", &["-s", "ticker.ini"], d);
    wait_pidfile_gone(&d.join("pid/ticker.pid"));
    assert!(
        t.dir.read("log/ticker.log").contains("Starting"),
        "ticker log"
    );
}

#[test]
fn tutorial_in_one_process() {
    let c = Cluster::shared();
    let t = Tutorial::new(c, "tut1p");
    let d = t.path();
    // Nodes first (the admin commands need no daemon), then one process for
    // all three jobs.
    let root = format!("--provider={}", t.mconn);
    ok(
        "londiste3",
        &["master.ini", "create-root", "master", &t.mconn],
        d,
    );
    ok(
        "londiste3",
        &["slave.ini", "create-branch", "slave", &t.sconn, &root],
        d,
    );
    let mut p = KillOnDrop(spawn(
        "londiste-rs",
        &["run", "ticker.ini", "master.ini", "slave.ini"],
        d,
    ));
    ok("londiste3", &["master.ini", "add-table", "--all"], d);
    ok("londiste3", &["slave.ini", "add-table", "--all"], d);
    poll_until("slave tables ok", Duration::from_secs(10), || {
        t.tables_ok("slave.ini")
    });
    wait_equal(c, &t.master, &t.slave, TABLES, Duration::from_secs(10));
    c.client(&t.master).batch_execute(CHANGES).unwrap();
    wait_equal(c, &t.master, &t.slave, TABLES, Duration::from_secs(20));
    ok("londiste3", &["slave.ini", "compare"], d);

    // SIGINT stops the whole process cleanly.
    let pid = nix::unistd::Pid::from_raw(p.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "londiste-rs run did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status after SIGINT: {status}");
}

#[test]
fn branch_to_leaf_chain() {
    let c = Cluster::shared();
    let t = Tutorial::new(c, "tutleaf");
    let d = t.path();
    let leaf = unique_name("tutleaf_leaf");
    let lconn = c.create_db(&leaf);
    c.client(&leaf).batch_execute(SCHEMA).unwrap();
    // The branch has its own queue, so the ticker ticks both databases.
    t.dir.write(
        "ticker.ini",
        &format!(
            "[pgqd]\nbase_connstr = {}\ndatabase_list = {}, {}\nlogfile = log/ticker.log\npidfile = pid/ticker.pid\n",
            c.base_connstr(),
            t.master,
            t.slave
        ),
    );
    t.dir.write(
        "leaf.ini",
        &format!(
            "[londiste3]\ndb = {lconn}\nqueue_name = {}\nloop_delay = 0.5\nlogfile = log/leaf.log\npidfile = pid/leaf.pid\n",
            t.master
        ),
    );
    let mut pids = t.pidfiles();
    pids.push(d.join("pid/leaf.pid"));
    let _guard = PidGuard(pids);

    ok("pgqd", &["-d", "ticker.ini"], d);
    wait_ticker_checked(d, &t.master);
    wait_ticker_checked(d, &t.slave);
    t.setup_nodes();
    // The branch has the tables in sync first: the leaf copies from it.
    poll_until("branch tables ok", Duration::from_secs(15), || {
        t.tables_ok("slave.ini")
    });
    let branch = format!("--provider={}", t.sconn);
    ok(
        "londiste3",
        &["leaf.ini", "create-leaf", "leaf", &lconn, &branch],
        d,
    );
    ok("londiste3", &["-d", "leaf.ini", "worker"], d);
    // One table copied straight from the root (--copy-node), the others from
    // the leaf's provider, the branch.
    ok(
        "londiste3",
        &[
            "leaf.ini",
            "add-table",
            "--copy-node=master",
            "public.accounts",
        ],
        d,
    );
    ok("londiste3", &["leaf.ini", "add-table", "--all"], d);
    // A member that is not above the leaf cannot serve its copy.
    let out = run(
        "londiste3",
        &["leaf.ini", "add-table", "--copy-node=leaf", "public.events"],
        d,
    );
    assert!(
        !out.status.success() && output_text(&out).contains("leaf is not above this node"),
        "{}",
        output_text(&out)
    );
    poll_until("leaf tables ok", Duration::from_secs(15), || {
        t.tables_ok("leaf.ini")
    });
    let log = t.dir.read("log/leaf.log");
    let copied_from = |table: &str| {
        log.lines()
            .find(|l| l.contains(&format!("copy {table} from")))
            .unwrap_or_else(|| panic!("no copy line for {table} in the leaf's log:\n{log}"))
            .to_string()
    };
    assert!(
        copied_from("public.accounts").contains(&t.master),
        "accounts was not copied from the root"
    );
    assert!(
        copied_from("public.events").contains(&t.slave),
        "events was not copied from the branch"
    );
    wait_equal(c, &t.master, &leaf, TABLES, Duration::from_secs(10));
    c.client(&t.master).batch_execute(CHANGES).unwrap();
    wait_equal(c, &t.master, &t.slave, TABLES, Duration::from_secs(20));
    wait_equal(c, &t.master, &leaf, TABLES, Duration::from_secs(20));
    ok("londiste3", &["leaf.ini", "compare"], d);
    // compare on the leaf while the root takes writes: the branch is held
    // still (not its tables locked, which would block its own worker) and
    // the leaf compared with it at the same point.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, mut m) = (stop.clone(), c.client(&t.master));
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                m.execute(
                    "insert into events values (2000 + $1::int8, 'live', $1::int8, now(), true)",
                    &[&(i as i64)],
                )
                .unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            i
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let out = ok("londiste3", &["leaf.ini", "compare"], d);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(
        out.contains("public.events: OK"),
        "compare under writes:\n{out}"
    );
    assert!(written > 10, "the writer did not run during compare");
    wait_equal(c, &t.master, &leaf, TABLES, Duration::from_secs(20));

    for (prog, ini, pid) in [
        ("londiste3", "leaf.ini", "leaf"),
        ("londiste3", "slave.ini", "yourdocs_slave"),
        ("londiste3", "master.ini", "master"),
        ("pgqd", "ticker.ini", "ticker"),
    ] {
        ok(prog, &["-s", ini], d);
        wait_pidfile_gone(&d.join(format!("pid/{pid}.pid")));
    }
}
