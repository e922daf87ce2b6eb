//! The cut-over behind pgbouncer: `scripts/cutover-pgbouncer` with a real
//! pgbouncer and real pgbench writing through it during the switch.
//!
//! pgbouncer runs in transaction pool mode: PAUSE waits only for in-flight
//! transactions to end, then holds the next ones, while the clients stay
//! connected (in session mode PAUSE would wait for pgbench to log out). pgbench
//! inserts into `orders` (serial key) and updates `items`, both replicated; its
//! clients must see no error at all: no failed and no aborted transaction.
//! Afterwards both nodes hold every committed row, the old root refuses direct
//! writes, and pgbouncer sends new writes to the new root.

use crate::cutover::Rig;
use crate::harness::{KillOnDrop, bin_dir, poll_until, reserve_port};
use postgres::{Client, NoTls, SimpleQueryMessage};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// pgbench's transaction: a serial insert and a hot-row update, both on
/// replicated tables.
const PGBENCH_SCRIPT: &str = "\\set sku random(1, 50)
BEGIN;
INSERT INTO orders (note) VALUES ('pgbench ' || :client_id);
UPDATE items SET qty = qty + 1 WHERE sku = 'sku' || :sku;
END;
";

/// A pgbouncer of our own on a reserved port, in front of one database
/// alias `app`; its files live in a directory it can read as its OS user.
pub struct Bouncer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    port_lock: PathBuf,
    _proc: KillOnDrop,
}

pub const ALIAS: &str = "app";

impl Bouncer {
    /// Starts pgbouncer with `app` pointing at `target` ("host=.. port=..
    /// dbname=..") and waits until its admin console answers.
    pub fn start(target: &str) -> Bouncer {
        let exe = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("pgbouncer not installed: apt-get install pgbouncer (.ci/run does)");
        let dir = tempfile::Builder::new()
            .prefix("londiste-rs-pgbouncer-")
            .tempdir()
            .unwrap();
        let (port, port_lock) = reserve_port();
        let d = dir.path().display();
        fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\n{ALIAS} = {target}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                 listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {d}/users.txt\n\
                 admin_users = postgres\npool_mode = transaction\ndefault_pool_size = 10\n\
                 logfile = {d}/pgbouncer.log\n"
            ),
        )
        .unwrap();
        let console = fs::File::create(dir.path().join("pgbouncer.console")).unwrap();
        let mut cmd = Command::new(exe);
        // pgbouncer refuses to run as root; -u makes it switch to postgres,
        // which must then read its ini (also after the script rewrote it)
        // and write its log.
        if nix::unistd::geteuid().is_root() {
            let pg = nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("running as root: OS user postgres is needed for pgbouncer -u");
            for entry in fs::read_dir(dir.path()).unwrap() {
                nix::unistd::chown(&entry.unwrap().path(), Some(pg.uid), Some(pg.gid)).unwrap();
            }
            nix::unistd::chown(dir.path(), Some(pg.uid), Some(pg.gid)).unwrap();
            cmd.args(["-u", "postgres"]);
        }
        cmd.arg(dir.path().join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .process_group(0);
        let child = cmd.spawn().expect("spawn pgbouncer");
        let b = Bouncer {
            dir,
            port,
            port_lock,
            _proc: KillOnDrop(child),
        };
        poll_until(
            "pgbouncer's admin console to answer",
            Duration::from_secs(20),
            || {
                let o = b.admin("SHOW VERSION");
                if o.status.success() {
                    Ok(true)
                } else {
                    Err(format!("{}{}", text(&o.stderr), b.log()))
                }
            },
        );
        b
    }

    pub fn ini(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.ini")
    }

    /// One admin console command through psql (it speaks only the simple
    /// protocol).
    pub fn admin(&self, sql: &str) -> Output {
        Command::new("psql")
            .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &self.port.to_string(), "-d", "pgbouncer", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    }

    /// One statement through the `app` alias; the first row's columns. The
    /// simple protocol, as pgbouncer 1.18 in transaction mode does not keep a
    /// prepared statement (the extended protocol's) on one server connection.
    pub fn query(&self, sql: &str) -> Vec<String> {
        let cs = format!(
            "host=127.0.0.1 port={} user=postgres dbname={ALIAS}",
            self.port
        );
        let mut c = Client::connect(&cs, NoTls)
            .unwrap_or_else(|e| panic!("connect through pgbouncer: {e}"));
        let msgs = c
            .simple_query(sql)
            .unwrap_or_else(|e| panic!("through pgbouncer: {sql}: {e}"));
        msgs.iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("").to_string())
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.port_lock);
        if std::thread::panicking() {
            eprintln!("--- pgbouncer log (tail) ---\n{}", tail(&self.log(), 30));
        }
    }
}

/// `host=.. port=.. dbname=..` of a node's connection string.
pub fn target_of(conn: &str) -> String {
    conn.split_whitespace()
        .filter(|kv| {
            ["host=", "port=", "dbname="]
                .iter()
                .any(|k| kv.starts_with(k))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `pgbench` through pgbouncer's `port` with `PGBENCH_SCRIPT`; `extra`
/// are options such as `-T 8 --rate=500`.
pub fn pgbench(port: u16, dir: &Path, extra: &[&str]) -> Output {
    let script = dir.join("cutover.pgbench");
    fs::write(&script, PGBENCH_SCRIPT).unwrap();
    Command::new("pgbench")
        .args([
            "-n",
            "-c",
            "4",
            "-j",
            "2",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-p", &port.to_string(), "-f", script.to_str().unwrap()])
        .args(extra)
        .arg(ALIAS)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run pgbench")
}

/// A number pgbench printed after `label` (e.g. "number of failed transactions: ").
pub fn pgbench_figure(out: &str, label: &str) -> Option<f64> {
    let i = out.find(label)?;
    out[i + label.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs the cut-over script as an operator would, from the directory of the
/// node configs, with the binary's links on PATH.
pub fn cutover(r: &Rig, b: &Bouncer, new: &str, old: &str) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cutover-pgbouncer");
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(script)
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", ALIAS])
        .args(["-p", &b.port.to_string(), "-c", b.ini().to_str().unwrap()])
        .args([&Rig::ini(new), old])
        .current_dir(r.d())
        .env("PATH", path)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/cutover-pgbouncer")
}

/// The client-seen pause the script printed, in ms.
pub fn printed_client_pause(out: &str) -> u64 {
    let i = out
        .find("clients paused ")
        .unwrap_or_else(|| panic!("the script printed no pause:\n{out}"));
    out[i + 15..].split(' ').next().unwrap().parse().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

const PGBENCH_ROWS: &str = "select count(*) from orders where note like 'pgbench %'";
const QTY_SUM: &str = "select sum(qty)::bigint from items";

/// pgbench writes through pgbouncer while the script switches the root from
/// master to slave: no client error, every transaction on both nodes.
#[test]
fn pgbouncer_cutover_under_pgbench_loses_nothing_and_fails_nothing() {
    let r = Rig::root_and_branch();
    let b = Bouncer::start(&target_of(&r.conn("master")));
    let qty0 = count(&mut r.client("master"), QTY_SUM);

    let dir = r.d().to_path_buf();
    let port = b.port;
    let bench = std::thread::spawn(move || pgbench(port, &dir, &["-T", "8", "--rate=500"]));
    // Switch once pgbench is well under way on the old root.
    let mut m = r.client("master");
    poll_until(
        "pgbench to commit 300 rows on master",
        Duration::from_secs(30),
        || {
            let n = count(&mut m, PGBENCH_ROWS);
            if n >= 300 {
                Ok(true)
            } else {
                Err(format!("{n} rows"))
            }
        },
    );
    // A takeover that fails its checks (here: no such node) stops before
    // pgbouncer is paused; pgbouncer stays on the old root, its ini untouched.
    let ini_before = fs::read_to_string(b.ini()).unwrap();
    let bad = cutover(&r, &b, "slave", "nosuchnode");
    let bad_text = format!("{}{}", text(&bad.stdout), text(&bad.stderr));
    assert_eq!(bad.status.code(), Some(1), "{bad_text}");
    assert!(
        bad_text.contains("before pgbouncer was paused: nothing was changed"),
        "{bad_text}"
    );
    assert_eq!(fs::read_to_string(b.ini()).unwrap(), ini_before);
    let db = b.query("select current_database()");
    assert_eq!(db[0], r.nodes[0].1, "pgbouncer left the old root");

    let out = cutover(&r, &b, "slave", "master");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "cutover-pgbouncer failed:\n{all}\n--- slave log ---\n{}",
        tail(&r.log("slave"), 30)
    );
    let pause = printed_client_pause(&all);
    eprintln!("pgbouncer cut-over: {}", all.trim_end());
    eprintln!("client-seen pause reported by the script: {pause} ms");
    assert_eq!(r.node_type("slave"), "root");
    assert_eq!(r.node_type("master"), "branch");

    // pgbench goes on, now on the new root.
    let mut s = r.client("slave");
    let before = count(&mut s, PGBENCH_ROWS);
    poll_until(
        "pgbench to write on the new root",
        Duration::from_secs(30),
        || {
            let n: i64 = s
                .query_one(PGBENCH_ROWS, &[])
                .map_err(|e| e.to_string())?
                .get(0);
            if n > before + 100 {
                Ok(true)
            } else {
                Err(format!("{n} rows, {before} at the switch"))
            }
        },
    );
    let bo = bench.join().unwrap();
    let report = format!("{}{}", text(&bo.stdout), text(&bo.stderr));
    eprintln!("pgbench:\n{}", report.trim_end());
    assert!(bo.status.success(), "pgbench failed:\n{report}");
    assert!(
        !report.contains("aborted"),
        "a pgbench client aborted:\n{report}"
    );
    assert_eq!(
        pgbench_figure(&report, "number of failed transactions: "),
        Some(0.0),
        "pgbench saw failed transactions:\n{report}"
    );
    let done = pgbench_figure(&report, "number of transactions actually processed: ")
        .unwrap_or_else(|| panic!("no transaction count in:\n{report}")) as i64;
    if let Some(max) = pgbench_figure(&report, "latency max = ") {
        eprintln!("pgbench max latency {max} ms, {done} transactions");
    }

    // Every committed transaction is on both nodes once the old root caught up.
    r.wait_equal("slave", "master");
    for name in ["slave", "master"] {
        let mut c = r.client(name);
        assert_eq!(count(&mut c, PGBENCH_ROWS), done, "pgbench rows on {name}");
        assert_eq!(
            count(&mut c, QTY_SUM) - qty0,
            done,
            "items updates on {name}"
        );
    }

    // The old root refuses direct writes, naming the new root.
    let err = r
        .client("master")
        .execute("insert into orders (note) values ('direct')", &[])
        .unwrap_err();
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("moved to node \"slave\""), "{msg}");

    // pgbouncer points at the new root: a write through it lands there.
    let slave_db = r.nodes.iter().find(|n| n.0 == "slave").unwrap().1.clone();
    let row = b.query(
        "insert into orders (note) values ('via pgbouncer') returning id, current_database()",
    );
    let (id, db): (i32, &str) = (row[0].parse().unwrap(), &row[1]);
    assert_eq!(db, slave_db, "pgbouncer still sends writes elsewhere");
    let n: i64 = r
        .client("slave")
        .query_one("select count(*) from orders where id = $1", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let ini = fs::read_to_string(b.ini()).unwrap();
    assert!(ini.contains(&format!("dbname={slave_db}")), "{ini}");

    // Re-running after the switch is safe: nothing to take over, pgbouncer
    // stays on the new root.
    let again = cutover(&r, &b, "slave", "master");
    let again_text = format!("{}{}", text(&again.stdout), text(&again.stderr));
    assert!(again.status.success(), "re-run failed:\n{again_text}");
    assert!(again_text.contains("root already"), "{again_text}");
    assert_eq!(r.node_type("slave"), "root");
    let log = b.log();
    assert!(!log.contains("FATAL"), "pgbouncer logged FATAL:\n{log}");
}

/// Not part of the suite (`scripts/bench-cutover` runs it): pgbench at
/// `BENCH_RATE` transactions/s (default 1000; 0 = unthrottled) through
/// pgbouncer for the whole run while the root is switched `BENCH_RUNS` times
/// (default 5) back and forth. Prints one `bench-cutover run` line per switch
/// and a `bench-cutover pgbench` line with the failures and the max latency of
/// any client transaction (from pgbench's per-transaction log).
#[test]
#[ignore]
fn bench_cutovers_under_pgbench() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (rate, runs) = (env("BENCH_RATE", 1000), env("BENCH_RUNS", 5));
    let r = Rig::root_and_branch();
    let b = Bouncer::start(&target_of(&r.conn("master")));
    let dir = r.d().to_path_buf();
    let port = b.port;
    let secs = (runs * 5 + 5).to_string();
    let rate_opt = format!("--rate={rate}");
    let bench = std::thread::spawn(move || {
        let mut extra = vec!["-T", &secs, "-l", "--log-prefix=bench"];
        if rate > 0 {
            extra.push(&rate_opt);
        }
        pgbench(port, &dir, &extra)
    });
    let (mut old, mut new) = ("master", "slave");
    for i in 1..=runs {
        // Let the load settle on the current root (about 3 s of it).
        let mut c = r.client(old);
        let start = count(&mut c, PGBENCH_ROWS);
        let want = if rate > 0 { rate as i64 * 3 } else { 1000 };
        poll_until(
            "pgbench to write on the root",
            Duration::from_secs(60),
            || {
                let n = count(&mut c, PGBENCH_ROWS);
                if n >= start + want {
                    Ok(true)
                } else {
                    Err(format!("{} of {want} rows", n - start))
                }
            },
        );
        let out = cutover(&r, &b, new, old);
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "cut-over {i} failed:\n{all}");
        let tk = all
            .find("writes paused ")
            .map(|p| all[p + 14..].split(' ').next().unwrap().to_string())
            .unwrap_or_default();
        eprintln!(
            "bench-cutover run {i} {old}->{new}: clients paused {} ms, takeover writes paused {tk} ms",
            printed_client_pause(&all)
        );
        (old, new) = (new, old);
    }
    let bo = bench.join().unwrap();
    let report = format!("{}{}", text(&bo.stdout), text(&bo.stderr));
    let mut max_us = 0u64;
    for e in fs::read_dir(r.d()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("bench.") {
            for l in fs::read_to_string(e.path()).unwrap().lines() {
                let us = l.split(' ').nth(2).and_then(|v| v.parse().ok());
                max_us = max_us.max(us.unwrap_or(0));
            }
        }
    }
    eprintln!(
        "bench-cutover pgbench: exit {}, {} transactions, failed {}, aborted clients {}, tps {}, max latency {:.1} ms",
        bo.status.code().unwrap_or(-1),
        pgbench_figure(&report, "number of transactions actually processed: ").unwrap_or(-1.0),
        pgbench_figure(&report, "number of failed transactions: ").unwrap_or(-1.0),
        report.matches("aborted in command").count(),
        pgbench_figure(&report, "tps = ").unwrap_or(-1.0),
        max_us as f64 / 1000.0
    );
    if !bo.status.success() {
        eprintln!("pgbench output:\n{report}");
    }
}
