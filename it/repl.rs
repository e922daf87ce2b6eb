//! A root and a leaf of one queue in two fresh databases of the shared
//! cluster, driven through the `londiste3` and `pgqd` links as an operator
//! would: the rig of the bad-input and command-option tests.

use crate::harness::{Cluster, KillOnDrop, TestDir, poll_until, run, spawn, unique_name};
use crate::tutorial::{ok, output_text, wait_equal};
use std::path::Path;
use std::time::Duration;

pub const QUEUE: &str = "badq";

/// A worker config for database `conn`.
pub fn worker_ini(conn: &str, log: &str) -> String {
    format!(
        "[londiste3]\ndb = {conn}\nqueue_name = {QUEUE}\nloop_delay = 0.2\nexception_sleep = 1\n\
         logfile = log/{log}.log\n"
    )
}

/// A root (`master`) and a leaf (`slave`) of queue `QUEUE` in two fresh
/// databases, with ticker.ini, master.ini and slave.ini in a test dir.
/// `extra` is appended to every connect string (e.g. a password).
pub struct Repl {
    pub dir: TestDir,
    pub master: String,
    pub slave: String,
    pub mconn: String,
    pub sconn: String,
    pub procs: Vec<KillOnDrop>,
}

impl Repl {
    /// A test dir with master.ini and slave.ini for databases elsewhere (other
    /// clusters), the root and the leaf created there.
    pub fn nodes_at(prefix: &str, mconn: &str, sconn: &str) -> Repl {
        let r = Repl::new(prefix, "", "", "");
        r.dir.write("master.ini", &worker_ini(mconn, "master"));
        r.dir.write("slave.ini", &worker_ini(sconn, "slave"));
        let d = r.d();
        crate::tutorial::ok(
            "londiste3",
            &["master.ini", "create-root", "master", mconn],
            d,
        );
        let prov = format!("--provider={mconn}");
        crate::tutorial::ok(
            "londiste3",
            &["slave.ini", "create-leaf", "slave", sconn, &prov],
            d,
        );
        r
    }

    pub fn new(prefix: &str, master_sql: &str, slave_sql: &str, extra: &str) -> Repl {
        let c = Cluster::shared();
        let (master, slave) = (
            unique_name(&format!("{prefix}_m")),
            unique_name(&format!("{prefix}_s")),
        );
        let mconn = format!("{}{extra}", c.create_db(&master));
        let sconn = format!("{}{extra}", c.create_db(&slave));
        if !master_sql.is_empty() {
            c.client(&master).batch_execute(master_sql).unwrap();
        }
        if !slave_sql.is_empty() {
            c.client(&slave).batch_execute(slave_sql).unwrap();
        }
        let dir = TestDir::new();
        std::fs::create_dir(dir.path().join("log")).unwrap();
        dir.write(
            "ticker.ini",
            &format!(
                "[pgqd]\nbase_connstr = {}{extra}\ndatabase_list = {master}\nlogfile = log/ticker.log\n",
                c.base_connstr()
            ),
        );
        dir.write("master.ini", &worker_ini(&mconn, "master"));
        dir.write("slave.ini", &worker_ini(&sconn, "slave"));
        Repl {
            dir,
            master,
            slave,
            mconn,
            sconn,
            procs: Vec::new(),
        }
    }

    pub fn d(&self) -> &Path {
        self.dir.path()
    }

    /// create-root and create-leaf, each with its location on the command line.
    pub fn nodes(&self) {
        ok(
            "londiste3",
            &["master.ini", "create-root", "master", &self.mconn],
            self.d(),
        );
        let prov = format!("--provider={}", self.mconn);
        ok(
            "londiste3",
            &["slave.ini", "create-leaf", "slave", &self.sconn, &prov],
            self.d(),
        );
    }

    /// Starts the ticker and the leaf's worker (and the root's, which
    /// publishes sequences), in the foreground, killed on drop.
    pub fn start(&mut self, master_worker: bool, verbose: bool) {
        let v: &[&str] = if verbose { &["-v"] } else { &[] };
        let with = |rest: &[&'static str]| -> Vec<&str> { v.iter().chain(rest).copied().collect() };
        self.procs
            .push(KillOnDrop(spawn("pgqd", &with(&["ticker.ini"]), self.d())));
        self.procs.push(KillOnDrop(spawn(
            "londiste3",
            &with(&["slave.ini", "worker"]),
            self.d(),
        )));
        if master_worker {
            self.procs.push(KillOnDrop(spawn(
                "londiste3",
                &with(&["master.ini", "worker"]),
                self.d(),
            )));
        }
    }

    /// add-table on the root, then on the leaf, each name as one argument.
    pub fn add_tables(&self, tables: &[&str]) {
        for ini in ["master.ini", "slave.ini"] {
            let mut args = vec![ini, "add-table"];
            args.extend(tables);
            ok("londiste3", &args, self.d());
        }
    }

    /// Waits until `n` tables are in state ok on the leaf.
    pub fn wait_synced(&self, n: i64) {
        let mut s = Cluster::shared().client(&self.slave);
        poll_until("tables ok on the leaf", Duration::from_secs(15), || {
            let got: i64 = s
                .query_one(
                    "select count(*) from londiste.table_info where queue_name = $1 and merge_state = 'ok'",
                    &[&QUEUE],
                )
                .map_err(|e| e.to_string())?
                .get(0);
            if got == n {
                Ok(true)
            } else {
                Err(format!("{got} of {n} ok"))
            }
        });
    }

    pub fn londiste(&self, args: &[&str]) -> String {
        ok("londiste3", args, self.d())
    }

    /// The leaf's position.
    pub fn pos(&self) -> Option<i64> {
        Cluster::shared()
            .client(&self.slave)
            .query_one(
                "select last_tick_id from londiste.node_info where queue_name = $1",
                &[&QUEUE],
            )
            .unwrap()
            .get(0)
    }

    pub fn slave_log(&self) -> String {
        std::fs::read_to_string(self.d().join("log/slave.log")).unwrap_or_default()
    }

    /// Waits until the leaf's `node-info` shows an `ERR:` line containing
    /// every needle, and checks `status` and the log show the same; returns
    /// the line.
    pub fn wait_error(&self, needles: &[&str]) -> String {
        let mut line = String::new();
        poll_until(
            &format!("node-info to show ERR with {needles:?}"),
            Duration::from_secs(15),
            || {
                let out = run("londiste3", &["slave.ini", "node-info"], self.d());
                let text = output_text(&out);
                match text.lines().find(|l| l.starts_with("ERR: ")) {
                    Some(l) if needles.iter().all(|n| l.contains(n)) => {
                        line = l.to_string();
                        Ok(true)
                    }
                    _ => Err(text),
                }
            },
        );
        let status = self.londiste(&["slave.ini", "status"]);
        assert!(
            status.contains(&line),
            "status does not show {line:?}:\n{status}"
        );
        let log = self.slave_log();
        assert!(
            log.lines()
                .any(|l| l.contains(" ERROR ") && l.ends_with(&line["ERR: ".len()..])),
            "the log does not show {line:?}:\n{log}"
        );
        line
    }

    /// Creates the nodes, starts the daemons (with the root worker if
    /// `master_worker`), adds `tables` on both and waits until the leaf has
    /// them in sync and equal to the master's.
    pub fn replicate_in_sync(&mut self, master_worker: bool, tables: &[&str]) {
        self.nodes();
        self.start(master_worker, false);
        self.add_tables(tables);
        self.wait_synced(tables.len() as i64);
        let qualified: Vec<String> = tables.iter().map(|t| format!("public.{t}")).collect();
        let qualified: Vec<&str> = qualified.iter().map(String::as_str).collect();
        wait_equal(
            Cluster::shared(),
            &self.master,
            &self.slave,
            &qualified,
            Duration::from_secs(10),
        );
    }

    /// A batch that fails to apply: the worker keeps its position, keeps
    /// running, and none of the batch is on the leaf (`table` still has
    /// `rows` rows). Returns the position.
    pub fn assert_batch_held(&mut self, table: &str, rows: i64, err: &str) -> Option<i64> {
        let pos = self.pos();
        self.assert_stuck_at(pos);
        self.assert_running();
        let n: i64 = Cluster::shared()
            .client(&self.slave)
            .query_one(&format!("select count(*) from {table}"), &[])
            .unwrap()
            .get(0);
        assert_eq!(n, rows, "rows of a failing batch were applied ({err})");
        pos
    }

    /// Applies `fix` on the leaf; the table converges to the master's and the
    /// error clears.
    pub fn fix_and_converge(&self, fix: &str, table: &str) {
        let c = Cluster::shared();
        c.client(&self.slave).batch_execute(fix).unwrap();
        wait_equal(
            c,
            &self.master,
            &self.slave,
            &[&format!("public.{table}")],
            Duration::from_secs(15),
        );
        poll_until("the error to clear", Duration::from_secs(10), || {
            Ok(!self.londiste(&["slave.ini", "node-info"]).contains("ERR:"))
        });
    }

    /// Panics unless every process started by `start` is still running.
    pub fn assert_running(&mut self) {
        for p in &mut self.procs {
            assert!(
                p.0.try_wait().unwrap().is_none(),
                "a daemon exited; console:\n{}",
                std::fs::read_to_string(self.dir.path().join("londiste3.console"))
                    .unwrap_or_default()
            );
        }
    }

    /// Waits until the leaf's worker has tried (and failed) the same batch
    /// at least twice more, then checks the position is still `pos`.
    pub fn assert_stuck_at(&self, pos: Option<i64>) {
        let tries = |s: &str| s.matches("retrying event by event").count();
        let before = tries(&self.slave_log());
        poll_until(
            "the worker to retry the failing batch",
            Duration::from_secs(15),
            || Ok(tries(&self.slave_log()) >= before + 2),
        );
        assert_eq!(self.pos(), pos, "the position moved past a failing event");
        // And there are ticks beyond it, so there was somewhere to move to.
        let top = self.top_tick();
        assert!(top > pos.unwrap(), "no tick after {pos:?}");
    }

    /// The root's newest tick.
    pub fn top_tick(&self) -> i64 {
        Cluster::shared()
            .client(&self.master)
            .query_one(
                "select max(tick_id) from pgq.tick t join pgq.queue q on q.queue_id = t.tick_queue where queue_name = $1",
                &[&QUEUE],
            )
            .unwrap()
            .get(0)
    }
}
