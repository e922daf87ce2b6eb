//! The cut-over: `takeover` under an application that writes all the time.
//! The writer below is such an application: it inserts (serial keys, so the
//! sequences must come along) and updates on the node it believes is the root,
//! and when a write is refused with "moved to node", it reconnects to the other
//! node, as an application pointed at the new server would. Every test checks
//! what an operator would: each committed transaction on both nodes, the old
//! root refusing writes, the tree as `status` shows it.

use crate::harness::{
    Cluster, KillOnDrop, TestDir, poll_until, run, spawn, tables_diff, unique_name,
};
use crate::tutorial::{ok, output_text};
use postgres::{Client, NoTls};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const Q: &str = "cutq";

pub const SCHEMA: &str = "
create table orders (id serial primary key, note text not null, n int not null default 0);
create table items (sku text primary key, qty int not null);
insert into orders (note) select 'seed ' || i from generate_series(1, 200) i;
insert into items select 'sku' || i, i from generate_series(1, 50) i;
";

/// Nodes of queue `Q` in databases of one or more clusters, with a test dir
/// holding ticker.ini and NAME.ini per node.
pub struct Rig {
    pub dir: TestDir,
    pub procs: Vec<(String, KillOnDrop)>,
    pub nodes: Vec<(String, String, String)>, // name, dbname, connstr
}

impl Rig {
    /// One database per node name in the shared cluster; the schema is created
    /// in each (the data only in the first, the root).
    pub fn new(names: &[&str]) -> Rig {
        Rig::new_on(&[], names)
    }

    /// Like `new`, with node i in `clusters[i]` where given (else the shared
    /// cluster); the ticker ticks the first node's cluster.
    pub fn new_on(clusters: &[&Cluster], names: &[&str]) -> Rig {
        let dir = TestDir::new();
        std::fs::create_dir(dir.path().join("log")).unwrap();
        let mut nodes = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let c: &Cluster = match clusters.get(i) {
                Some(c) => c,
                None => Cluster::shared(),
            };
            let db = unique_name(&format!("cut_{n}"));
            let conn = c.create_db(&db);
            let mut cl = c.client(&db);
            if i == 0 {
                cl.batch_execute(SCHEMA).unwrap();
            } else {
                let ddl: String = SCHEMA
                    .lines()
                    .filter(|l| l.starts_with("create"))
                    .collect::<Vec<_>>()
                    .join("\n");
                cl.batch_execute(&ddl).unwrap();
            }
            dir.write(&format!("{n}.ini"), &node_ini(&conn, n));
            nodes.push((n.to_string(), db, conn));
        }
        // The ticker knows only the first root: after a takeover the new
        // root's own worker ticks its queue.
        let c: &Cluster = match clusters.first() {
            Some(c) => c,
            None => Cluster::shared(),
        };
        dir.write(
            "ticker.ini",
            &format!(
                "[pgqd]\nbase_connstr = {}\ndatabase_list = {}\nlogfile = log/ticker.log\nticker_period = 0.05\n",
                c.base_connstr(),
                nodes[0].1
            ),
        );
        Rig {
            dir,
            procs: Vec::new(),
            nodes,
        }
    }

    /// master (root) and slave (branch) in sync, with the ticker and both
    /// workers running.
    pub fn root_and_branch() -> Rig {
        Rig::root_and_branch_on(&[])
    }

    /// `root_and_branch` with the nodes in the given clusters (see `new_on`).
    pub fn root_and_branch_on(clusters: &[&Cluster]) -> Rig {
        let mut r = Rig::new_on(clusters, &["master", "slave"]);
        r.create_root("master");
        r.create_sub("branch", "slave", "master");
        r.start_ticker();
        r.start_worker("master");
        r.start_worker("slave");
        r.add_all("master");
        r.add_all("slave");
        r.wait_synced("slave", 2);
        r
    }

    pub fn d(&self) -> &Path {
        self.dir.path()
    }

    pub fn start_bg(&mut self, name: &str, args: &[&str]) {
        let p = spawn("londiste3", args, self.d());
        self.procs.push((name.into(), KillOnDrop(p)));
    }

    pub fn conn(&self, name: &str) -> String {
        self.nodes.iter().find(|n| n.0 == name).unwrap().2.clone()
    }

    pub fn client(&self, name: &str) -> Client {
        let cs = self.conn(name);
        Client::connect(&cs, NoTls).unwrap()
    }

    pub fn ini(name: &str) -> String {
        format!("{name}.ini")
    }

    pub fn londiste(&self, args: &[&str]) -> String {
        ok("londiste3", args, self.d())
    }

    pub fn create_root(&self, name: &str) {
        self.londiste(&[&Rig::ini(name), "create-root", name, &self.conn(name)]);
    }

    pub fn create_sub(&self, kind: &str, name: &str, provider: &str) {
        let p = format!("--provider={}", self.conn(provider));
        self.londiste(&[
            &Rig::ini(name),
            &format!("create-{kind}"),
            name,
            &self.conn(name),
            &p,
        ]);
    }

    pub fn start_ticker(&mut self) {
        let p = spawn("pgqd", &["ticker.ini"], self.d());
        self.procs.push(("ticker".into(), KillOnDrop(p)));
    }

    pub fn start_worker(&mut self, name: &str) {
        let p = spawn("londiste3", &[&Rig::ini(name), "worker"], self.d());
        self.procs.push((name.into(), KillOnDrop(p)));
    }

    /// SIGKILL a node's worker.
    pub fn kill_worker(&mut self, name: &str) {
        self.procs.retain(|(n, _)| n != name);
    }

    pub fn add_all(&self, name: &str) {
        self.londiste(&[&Rig::ini(name), "add-table", "--all"]);
    }

    pub fn wait_synced(&self, name: &str, n: i64) {
        let mut c = self.client(name);
        poll_until(
            &format!("{n} tables ok on {name}"),
            Duration::from_secs(30),
            || {
                let got: i64 = c
                .query_one(
                    "select count(*) from londiste.table_info where queue_name = $1 and merge_state = 'ok'",
                    &[&Q],
                )
                .map_err(|e| e.to_string())?
                .get(0);
                if got == n {
                    Ok(true)
                } else {
                    Err(format!("{got} of {n} ok"))
                }
            },
        );
    }

    /// Waits until every table is equal on the two nodes.
    pub fn wait_equal(&self, a: &str, b: &str) {
        let (mut ca, mut cb) = (self.client(a), self.client(b));
        for t in ["public.orders", "public.items"] {
            poll_until(
                &format!("{t} equal on {a} and {b}"),
                Duration::from_secs(30),
                || match tables_diff(&mut ca, &mut cb, t) {
                    None => Ok(true),
                    Some(d) => Err(d),
                },
            );
        }
    }

    /// An order inserted on `from` shows up on `to`.
    pub fn write_reaches(&self, from: &str, to: &str) {
        let id: i32 = self
            .client(from)
            .query_one(
                "insert into orders (note) values ('marker') returning id",
                &[],
            )
            .unwrap()
            .get(0);
        let mut c = self.client(to);
        poll_until(
            &format!("a write on {from} to reach {to}"),
            Duration::from_secs(30),
            || {
                let n: i64 = c
                    .query_one("select count(*) from orders where id = $1", &[&id])
                    .map_err(|e| e.to_string())?
                    .get(0);
                if n == 1 {
                    Ok(true)
                } else {
                    Err("not there".into())
                }
            },
        );
    }

    /// A column of a node's node_info row, as text (a new connection each
    /// time: callers poll across server restarts).
    pub fn node_col(&self, name: &str, col: &str) -> Result<Option<String>, String> {
        let sql = format!("select {col}::text from londiste.node_info where queue_name = $1");
        Client::connect(&self.conn(name), NoTls)
            .and_then(|mut c| c.query_one(&sql, &[&Q]))
            .map(|r| r.get(0))
            .map_err(|e| e.to_string())
    }

    pub fn node_type(&self, name: &str) -> String {
        self.node_col(name, "node_type").unwrap().unwrap()
    }

    pub fn provider(&self, name: &str) -> String {
        self.node_col(name, "provider_node")
            .unwrap()
            .unwrap_or_default()
    }

    /// Waits until root `name` is fenced in favour of `to`.
    pub fn wait_fenced(&self, name: &str, to: &str) {
        poll_until(
            &format!("{name} to be fenced for {to}"),
            Duration::from_secs(30),
            || match self.node_col(name, "fenced_to")? {
                Some(f) if f == to => Ok(true),
                f => Err(format!("{f:?}")),
            },
        );
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.d().join(format!("log/{name}.log"))).unwrap_or_default()
    }
}

pub fn node_ini(conn: &str, name: &str) -> String {
    format!(
        "[londiste3]\njob_name = {name}\ndb = {conn}\nqueue_name = {Q}\nloop_delay = 0.2\nexception_sleep = 1\n\
         logfile = log/{name}.log\n"
    )
}

/// What the writer saw: the ids it committed, the errors that were not a
/// "moved" refusal, and the longest time between two of its commits.
pub struct Report {
    pub committed: Vec<i32>,
    pub errors: Vec<String>,
    pub switches: usize,
    /// Writes refused by a replica (not yet promoted) during the pause.
    pub refused: usize,
    pub max_gap: Duration,
}

pub struct Writer {
    stop: Arc<AtomicBool>,
    pub commits: Arc<AtomicUsize>,
    handle: JoinHandle<Report>,
}

impl Writer {
    /// Writes to `conns[0]` until refused with "moved to node", then to the
    /// other one, and so on. `pause` between transactions.
    pub fn start(conns: Vec<String>, pause: Duration) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicUsize::new(0));
        let (s, n) = (stop.clone(), commits.clone());
        let handle = std::thread::spawn(move || {
            let mut rep = Report {
                committed: Vec::new(),
                errors: Vec::new(),
                switches: 0,
                refused: 0,
                max_gap: Duration::ZERO,
            };
            let mut cur = 0;
            let mut c = Client::connect(&conns[cur], NoTls).unwrap();
            let mut last_commit = Instant::now();
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let res = (|| -> Result<i32, postgres::Error> {
                    let mut tx = c.transaction()?;
                    let id: i32 = tx
                        .query_one(
                            "insert into orders (note) values ($1) returning id",
                            &[&format!("w{i}")],
                        )?
                        .get(0);
                    tx.execute(
                        "update orders set n = n + 1 where id = $1",
                        &[&((i % 150) as i32 + 1)],
                    )?;
                    tx.execute(
                        "update items set qty = qty + 1 where sku = $1",
                        &[&format!("sku{}", i % 50 + 1)],
                    )?;
                    tx.commit()?;
                    Ok(id)
                })();
                match res {
                    Ok(id) => {
                        let now = Instant::now();
                        rep.max_gap = rep.max_gap.max(now - last_commit);
                        last_commit = now;
                        rep.committed.push(id);
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        let m = e
                            .as_db_error()
                            .map(|d| d.message().to_string())
                            .unwrap_or(e.to_string());
                        if m.contains("is replicated into this node") {
                            // Pointed at the new root before its promotion
                            // (inside the write pause): try again.
                            rep.refused += 1;
                        } else if m.contains("moved to node") {
                            cur = (cur + 1) % conns.len();
                            rep.switches += 1;
                            c = Client::connect(&conns[cur], NoTls).unwrap();
                        } else {
                            rep.errors.push(m);
                            if c.is_closed() {
                                c = Client::connect(&conns[cur], NoTls).unwrap();
                            }
                        }
                    }
                }
                std::thread::sleep(pause);
            }
            rep
        });
        Writer {
            stop,
            commits,
            handle,
        }
    }

    /// Waits until `more` transactions past now have committed.
    pub fn wait_commits(&self, more: usize) {
        let target = self.commits.load(Ordering::Relaxed) + more;
        poll_until("the writer to commit", Duration::from_secs(30), || {
            let n = self.commits.load(Ordering::Relaxed);
            if n >= target {
                Ok(true)
            } else {
                Err(format!("{n} of {target} commits"))
            }
        });
    }

    pub fn stop(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// Every id the writer committed is in `orders` on the node.
pub fn assert_has_ids(c: &mut Client, ids: &[i32], node: &str) {
    let got: i64 = c
        .query_one("select count(*) from orders where id = any($1)", &[&ids])
        .unwrap()
        .get(0);
    assert_eq!(got as usize, ids.len(), "{node} lacks committed rows");
}

/// The write pause `takeover` printed, in ms.
pub fn printed_pause(out: &str) -> f64 {
    let i = out
        .find("writes paused ")
        .unwrap_or_else(|| panic!("no pause printed:\n{out}"));
    out[i + 14..].split(' ').next().unwrap().parse().unwrap()
}

/// A branch takes over from the root with the application writing; the old
/// root follows the new one (a write there arrives back), and a second
/// takeover switches back. Nothing lost, nothing twice, no duplicate key.
#[test]
fn switchover_of_a_branch_and_back_under_writes() {
    let r = Rig::root_and_branch();
    let seqs = r.londiste(&["slave.ini", "seqs"]);
    assert!(
        seqs.contains("public.orders_id_seq"),
        "add-table did not bring the serial's sequence:\n{seqs}"
    );

    let w = Writer::start(
        vec![r.conn("master"), r.conn("slave")],
        Duration::from_millis(2),
    );
    w.wait_commits(50);
    let out = r.londiste(&["slave.ini", "takeover", "master"]);
    let pause = printed_pause(&out);
    eprintln!("switchover pause printed: {pause} ms");
    assert_eq!(r.node_type("slave"), "root");
    assert_eq!(r.node_type("master"), "branch");
    w.wait_commits(100);

    // The old root refuses writes, naming the new root.
    let err = r
        .client("master")
        .execute("insert into items values ('x', 1)", &[])
        .unwrap_err();
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("moved to node \"slave\""), "{msg}");
    // The rollback path: the old root follows the new one.
    r.write_reaches("slave", "master");
    let status = r.londiste(&["master.ini", "status"]);
    assert!(
        status.contains("\nslave (root)") && status.contains("master (branch)"),
        "status does not show the new tree:\n{status}"
    );

    // Switch back.
    let out = r.londiste(&["master.ini", "takeover", "slave"]);
    eprintln!("switch-back pause printed: {} ms", printed_pause(&out));
    assert_eq!(r.node_type("master"), "root");
    assert_eq!(r.node_type("slave"), "branch");
    w.wait_commits(100);
    let rep = w.stop();
    assert!(
        rep.errors.is_empty(),
        "the writer saw errors: {:?}",
        &rep.errors[..rep.errors.len().min(5)]
    );
    assert!(
        rep.switches >= 2,
        "the writer never switched ({})",
        rep.switches
    );
    eprintln!(
        "writer: {} commits, {} refused during the pauses, longest gap between commits {:?}",
        rep.committed.len(),
        rep.refused,
        rep.max_gap
    );
    r.wait_equal("master", "slave");
    assert_has_ids(&mut r.client("master"), &rep.committed, "master");
    assert_has_ids(&mut r.client("slave"), &rep.committed, "slave");
    let err = r
        .client("slave")
        .execute("delete from orders", &[])
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("moved to node \"master\"")
    );
}

/// A takeover onto a node that lacks a table, or whose worker is stopped, is
/// refused with the list of problems and their fixes; the root keeps working.
#[test]
fn takeover_refuses_a_node_that_is_not_ready() {
    let mut r = Rig::new(&["master", "slave"]);
    r.create_root("master");
    r.create_sub("leaf", "slave", "master");
    r.start_ticker();
    r.start_worker("master");
    r.start_worker("slave");
    r.add_all("master");
    r.londiste(&["slave.ini", "add-table", "public.orders"]);
    r.wait_synced("slave", 1);
    r.kill_worker("slave");
    std::thread::sleep(Duration::from_millis(200));
    let out = run(
        "londiste3",
        &["slave.ini", "takeover", "master", "--max-lag=0"],
        r.d(),
    );
    let text = output_text(&out);
    assert!(!out.status.success(), "takeover went ahead:\n{text}");
    assert!(
        text.contains("public.items is not replicated to this node"),
        "{text}"
    );
    assert!(text.contains("add-table public.items"), "{text}");
    assert_eq!(r.node_type("master"), "root");
    assert_eq!(r.node_type("slave"), "leaf");
    r.client("master")
        .execute("insert into items values ('still', 1)", &[])
        .unwrap();
    // Fixed: the table added and in sync, the worker running again.
    r.start_worker("slave");
    r.londiste(&["slave.ini", "add-table", "public.items"]);
    r.wait_synced("slave", 2);
    let out = r.londiste(&["slave.ini", "takeover", "master"]);
    assert!(out.contains("writes paused"), "{out}");
    assert_eq!(r.node_type("slave"), "root");
    assert_eq!(r.node_type("master"), "branch");
    r.client("slave")
        .execute("insert into orders (note) values ('on the new root')", &[])
        .unwrap();
    r.wait_equal("slave", "master");
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// The old root dies with transactions its subscribers never read. takeover
/// --dead-root makes the branch the root where it stands and moves the leaf
/// under it; the application goes on there. When the old root comes back,
/// resurrect writes the lost transactions to a file and makes it a branch of
/// the new root, its tables copied again: it converges to the new root.
#[test]
fn failover_with_the_root_killed_then_resurrect() {
    let a = Cluster::start();
    let mut r = Rig::new_on(&[&a], &["master", "slave", "leaf"]);
    r.create_root("master");
    r.create_sub("branch", "slave", "master");
    r.create_sub("leaf", "leaf", "master");
    r.start_ticker();
    for n in ["master", "slave", "leaf"] {
        r.start_worker(n);
        r.add_all(n);
    }
    r.wait_synced("slave", 2);
    r.wait_synced("leaf", 2);
    let w = Writer::start(vec![r.conn("master")], Duration::from_millis(2));
    w.wait_commits(100);
    let before = w.stop();
    assert!(before.errors.is_empty(), "{:?}", before.errors);
    r.wait_equal("master", "slave");
    // The subscribers stop reading; the root commits ten more transactions
    // and dies.
    r.kill_worker("slave");
    r.kill_worker("leaf");
    let mut m = r.client("master");
    for i in 0..10 {
        m.execute(
            "insert into orders (note) values ($1)",
            &[&format!("lost {i}")],
        )
        .unwrap();
    }
    // The harness runs with synchronous_commit off: make the ten durable.
    m.batch_execute("checkpoint").unwrap();
    drop(m);
    a.stop_immediate();
    r.start_worker("slave");
    r.start_worker("leaf");

    let out = r.londiste(&["slave.ini", "takeover", "master", "--dead-root"]);
    assert!(out.contains("failover: slave is the root"), "{out}");
    assert_eq!(r.node_type("slave"), "root");
    let members = r.londiste(&["slave.ini", "members"]);
    assert!(
        members
            .lines()
            .any(|l| l.contains("master") && l.contains("true")),
        "master not tagged dead:\n{members}"
    );
    assert_eq!(
        r.provider("leaf"),
        "slave",
        "the leaf did not move to the new root"
    );
    let w = Writer::start(vec![r.conn("slave")], Duration::from_millis(2));
    w.wait_commits(100);
    let after = w.stop();
    assert!(
        after.errors.is_empty(),
        "writes on the new root failed: {:?}",
        &after.errors[..after.errors.len().min(3)]
    );
    r.wait_equal("slave", "leaf");
    assert_has_ids(&mut r.client("leaf"), &after.committed, "leaf");

    // The old root comes back; its worker (running all along) sees that a
    // member took over and fences it: no second writable root.
    a.start_again();
    r.wait_fenced("master", "slave");
    let err = r
        .client("master")
        .execute("insert into items values ('split brain', 1)", &[])
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("moved to node \"slave\""),
        "{err:?}"
    );
    assert!(
        r.log("master").contains("took over from this node"),
        "{}",
        r.log("master")
    );
    r.kill_worker("master");
    let on_old = count(
        &mut r.client("master"),
        "select count(*) from orders where note like 'lost %'",
    );
    assert_eq!(on_old, 10);
    let out = r.londiste(&["master.ini", "resurrect"]);
    assert!(out.contains("10 lost event(s)"), "{out}");
    let lost = std::fs::read_to_string(r.d().join("resurrect-lost-events.json")).unwrap();
    let lost_rows = lost.lines().filter(|l| l.contains("lost ")).count();
    assert_eq!(
        lost_rows, 10,
        "the file does not hold the ten lost inserts:\n{out}\n{lost}"
    );
    for l in lost.lines() {
        assert!(
            l.starts_with('{') && l.ends_with('}') && l.contains("\"ev_type\":"),
            "not a JSON object: {l}"
        );
    }
    assert_eq!(r.node_type("master"), "branch");
    r.start_worker("master");
    r.wait_synced("master", 2);
    r.wait_equal("slave", "master");
    let mut m = r.client("master");
    assert_eq!(
        count(
            &mut m,
            "select count(*) from orders where note like 'lost %'"
        ),
        0
    );
    let err = m
        .execute("insert into items values ('y', 1)", &[])
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("moved to node \"slave\"")
    );
    let status = r.londiste(&["slave.ini", "status"]);
    assert!(status.contains("master (branch)"), "{status}");
    drop(r);
}

/// root -> branch -> leaf: the leaf moves to the root with the application
/// writing, then the branch, now without subscribers, is dropped.
#[test]
fn change_provider_in_a_chain_then_drop_node() {
    let mut r = Rig::new(&["a", "b", "c"]);
    r.create_root("a");
    r.create_sub("branch", "b", "a");
    r.create_sub("leaf", "c", "b");
    r.start_ticker();
    for n in ["a", "b", "c"] {
        r.start_worker(n);
        r.add_all(n);
    }
    r.wait_synced("c", 2);
    let w = Writer::start(vec![r.conn("a")], Duration::from_millis(2));
    w.wait_commits(50);
    let out = run(
        "londiste3",
        &["c.ini", "change-provider", "--provider=c"],
        r.d(),
    );
    assert!(
        !out.status.success() && output_text(&out).contains("cannot subscribe to itself"),
        "{}",
        output_text(&out)
    );
    r.londiste(&["c.ini", "change-provider", "--provider=a"]);
    w.wait_commits(100);
    // b has no subscribers left and can go.
    let out = run("londiste3", &["a.ini", "drop-node", "a"], r.d());
    assert!(
        !out.status.success(),
        "dropped the root with subscribers:\n{}",
        output_text(&out)
    );
    r.kill_worker("b");
    r.londiste(&["a.ini", "drop-node", "b"]);
    let members = r.londiste(&["a.ini", "members"]);
    assert!(!members.contains("\nb "), "b still a member:\n{members}");
    assert_eq!(
        count(
            &mut r.client("b"),
            "select count(*) from londiste.node_info"
        ),
        0
    );
    r.client("b")
        .execute("insert into items values ('free again', 1)", &[])
        .unwrap();
    w.wait_commits(50);
    let rep = w.stop();
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    r.wait_equal("a", "c");
    assert_has_ids(&mut r.client("c"), &rep.committed, "c");
    assert_eq!(r.provider("c"), "a");
}

/// The takeover is killed (SIGKILL) after the fence, before the promotion:
/// no node takes writes; re-running the command finishes the switch.
#[test]
fn takeover_rerun_after_sigkill_in_the_middle() {
    let mut r = Rig::root_and_branch();
    let w = Writer::start(
        vec![r.conn("master"), r.conn("slave")],
        Duration::from_millis(2),
    );
    w.wait_commits(50);
    // Without the new node's worker the takeover waits after the fence.
    r.kill_worker("slave");
    r.start_bg("takeover", &["slave.ini", "takeover", "master"]);
    let mut m = r.client("master");
    r.wait_fenced("master", "slave");
    r.kill_worker("takeover");
    // Neither node takes writes now.
    assert!(m.execute("insert into items values ('m', 1)", &[]).is_err());
    assert!(
        r.client("slave")
            .execute("insert into items values ('s', 1)", &[])
            .is_err()
    );
    assert_eq!(r.node_type("master"), "root");
    r.start_worker("slave");
    let out = r.londiste(&["slave.ini", "takeover", "master"]);
    assert!(out.contains("resuming the takeover"), "{out}");
    assert_eq!(r.node_type("slave"), "root");
    assert_eq!(r.node_type("master"), "branch");
    // A third run says it is done.
    let out = run("londiste3", &["slave.ini", "takeover", "master"], r.d());
    let text = output_text(&out);
    assert!(
        !out.status.success() && text.contains("already reads from slave"),
        "{text}"
    );
    w.wait_commits(100);
    let rep = w.stop();
    assert!(
        rep.errors.is_empty(),
        "{:?}",
        &rep.errors[..rep.errors.len().min(3)]
    );
    r.wait_equal("slave", "master");
    assert_has_ids(&mut r.client("master"), &rep.committed, "master");
    assert_has_ids(&mut r.client("slave"), &rep.committed, "slave");
}

/// A branch goes away: another branch takes over its subscriber
/// (takeover --dead-branch), and the leaf keeps following the root through it.
/// Then the live branch takes its place back (takeover of a live branch).
#[test]
fn takeover_of_a_dead_then_a_live_branch() {
    let mut r = Rig::new(&["a", "b", "c", "d"]);
    r.create_root("a");
    r.create_sub("branch", "b", "a");
    r.create_sub("leaf", "c", "b");
    r.create_sub("branch", "d", "a");
    r.start_ticker();
    for n in ["a", "b", "c", "d"] {
        r.start_worker(n);
        r.add_all(n);
    }
    r.wait_synced("c", 2);
    r.wait_synced("d", 2);
    let w = Writer::start(vec![r.conn("a")], Duration::from_millis(2));
    w.wait_commits(50);
    r.kill_worker("b");
    let out = r.londiste(&["d.ini", "takeover", "b", "--dead-branch"]);
    assert!(out.contains("d takes b's place"), "{out}");
    assert_eq!(r.provider("c"), "d");
    let members = r.londiste(&["d.ini", "members"]);
    assert!(
        members
            .lines()
            .any(|l| l.starts_with("b ") && l.contains("true")),
        "b not dead:\n{members}"
    );
    w.wait_commits(100);
    // b comes back; it takes its place again, live.
    r.londiste(&["d.ini", "tag-alive", "b"]);
    r.start_worker("b");
    let out = r.londiste(&["b.ini", "takeover", "d", "--all"]);
    assert_eq!(r.provider("c"), "b", "{out}");
    assert_eq!(r.provider("d"), "b", "{out}");
    w.wait_commits(50);
    let rep = w.stop();
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    r.wait_equal("a", "c");
    r.wait_equal("a", "d");
    assert_has_ids(&mut r.client("c"), &rep.committed, "c");
}
