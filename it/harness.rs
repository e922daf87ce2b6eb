//! Test harness: real PostgreSQL clusters and the real binary, the way
//! PostgreSQL's own TAP tests work.
//!
//! Replication bugs hide in the server's behaviour (triggers, txid snapshots,
//! crashes), so tests run against throwaway clusters made by `initdb`, never
//! mocks. Starting one costs about a second, so each test binary shares one
//! cluster (`Cluster::shared`) and gives every test its own databases
//! (`unique_name`); tests that crash or restart the server start their own.
//! Ports are reserved with lock files so parallel test binaries never collide.
//! When a test fails the data directory (with its server log) is kept and its
//! path printed; `LONDISTE_TEST_KEEP=1` keeps everything.
#![allow(dead_code)]

use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid, User};
use postgres::{Client, NoTls, SimpleQueryMessage};

/// How long `run` lets one command take before killing it.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Set by a panic hook once any test in this binary has panicked, so the
/// shared cluster is kept for a post-mortem.
static ANY_PANIC: AtomicBool = AtomicBool::new(false);
static SHARED: OnceLock<Cluster> = OnceLock::new();
static BIN_DIR: OnceLock<PathBuf> = OnceLock::new();

fn keep_requested() -> bool {
    std::env::var("LONDISTE_TEST_KEEP").is_ok_and(|v| v == "1")
}

/// A throwaway PostgreSQL cluster on 127.0.0.1 and a free port, superuser
/// `postgres`, trust authentication.
pub struct Cluster {
    dir: PathBuf,
    port: u16,
    port_lock: PathBuf,
    pg_bin: PathBuf,
    /// initdb refuses to run as root, so as root the server runs as `postgres`.
    run_as: Option<(Uid, Gid)>,
    /// Harness clients use the Unix socket (a custom pg_hba.conf may refuse
    /// plain TCP, e.g. a TLS-only cluster; it must keep `local ... trust`).
    admin_socket: bool,
}

impl Cluster {
    /// initdb and start a new cluster; panics with the server log on failure.
    pub fn start() -> Cluster {
        Cluster::start_with("", None)
    }

    /// `start` with extra postgresql.conf lines and, if given, this pg_hba.conf
    /// (which must keep `local all all trust`: harness clients then use the
    /// socket). The server's own files must be readable by `run_as_user()`.
    pub fn start_with(extra_conf: &str, hba: Option<&str>) -> Cluster {
        Cluster::start_in(pg_bindir(), extra_conf, hba)
    }

    /// A new cluster of PostgreSQL `major` (10 to 18), from the builds that
    /// `scripts/pg-builds` fetches and caches (see `pg_build`).
    pub fn start_major(major: u32) -> Cluster {
        Cluster::start_in(pg_build(major), "", None)
    }

    /// `start_with`, run by the server binaries in `pg_bin`.
    pub fn start_in(pg_bin: PathBuf, extra_conf: &str, hba: Option<&str>) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("londiste-rs-pg-")
            .tempdir()
            .expect("create cluster temp dir")
            .keep();
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = User::from_name("postgres")
                .expect("look up OS user postgres")
                .expect("running as root: OS user `postgres` is needed to run initdb");
            nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).expect("chown cluster dir");
            Some((user.uid, user.gid))
        } else {
            None
        };
        let (port, port_lock) = reserve_port();
        let c = Cluster {
            dir,
            port,
            port_lock,
            pg_bin,
            run_as,
            admin_socket: hba.is_some(),
        };
        let d = c.dir.to_str().expect("utf-8 temp dir").to_owned();
        let mut initdb: Vec<&str> = "-A trust -N -U postgres -E UTF8 --locale=C -D"
            .split(' ')
            .collect();
        initdb.push(&d);
        c.pg_ok("initdb", &initdb);
        let conf = format!(
            "\n# londiste-rs test harness\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{d}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nmax_connections = 200\nwal_level = logical\n\
             max_wal_senders = 20\nmax_replication_slots = 20\nshared_buffers = 128MB\n\
             log_min_messages = warning\n{extra_conf}\n"
        );
        OpenOptions::new()
            .append(true)
            .open(c.dir.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .expect("append to postgresql.conf");
        if let Some(hba) = hba {
            fs::write(c.dir.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        }
        c.start_again();
        c
    }

    /// The cluster shared by all tests of this test binary, started on first
    /// use and stopped when the process exits.
    pub fn shared() -> &'static Cluster {
        SHARED.get_or_init(|| {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                ANY_PANIC.store(true, Ordering::SeqCst);
                prev(info)
            }));
            // Statics are never dropped, so stop the server from atexit.
            extern "C" fn stop_shared() {
                if let Some(c) = SHARED.get() {
                    c.teardown(ANY_PANIC.load(Ordering::SeqCst));
                }
            }
            unsafe { nix::libc::atexit(stop_shared) };
            Cluster::start()
        })
    }

    /// The server's `server_version_num` (e.g. 100023, 180004).
    pub fn version_num(&self) -> i32 {
        let v = self.psql("postgres", "SHOW server_version_num");
        v.parse()
            .unwrap_or_else(|e| panic!("server_version_num {v:?}: {e}"))
    }

    /// The server's major version (10, ..., 18).
    pub fn major(&self) -> u32 {
        (self.version_num() / 10000) as u32
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    pub fn base_connstr(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres", self.port)
    }

    pub fn connstr(&self, db: &str) -> String {
        format!("{} dbname={db}", self.base_connstr())
    }

    /// The OS user the server runs as (for files it must read).
    pub fn run_as_user(&self) -> Option<(Uid, Gid)> {
        self.run_as
    }

    pub fn client(&self, db: &str) -> Client {
        let cs = if self.admin_socket {
            format!(
                "host={} port={} user=postgres dbname={db}",
                self.dir.display(),
                self.port
            )
        } else {
            self.connstr(db)
        };
        Client::connect(&cs, NoTls).unwrap_or_else(|e| panic!("connect to {cs:?}: {e}"))
    }

    /// (Re)create an empty database and return its connection string.
    pub fn create_db(&self, name: &str) -> String {
        let q = format!("\"{}\"", name.replace('"', "\"\""));
        let mut c = self.client("postgres");
        // WITH (FORCE) is 13+; before that, end the sessions first.
        let force = if self.version_num() >= 130000 {
            " WITH (FORCE)"
        } else {
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .unwrap_or_else(|e| panic!("end sessions of {name}: {e}"));
            ""
        };
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {q}{force}"))
            .unwrap_or_else(|e| panic!("drop database {name}: {e}"));
        c.batch_execute(&format!("CREATE DATABASE {q}"))
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        self.connstr(name)
    }

    /// Run SQL with the simple protocol; rows as `a|b` lines (for debugging).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let msgs = self
            .client(db)
            .simple_query(sql)
            .unwrap_or_else(|e| panic!("psql {db}: {sql}: {e}"));
        let mut lines = Vec::new();
        for m in msgs {
            if let SimpleQueryMessage::Row(r) = m {
                let cols: Vec<&str> = (0..r.len()).map(|i| r.get(i).unwrap_or("")).collect();
                lines.push(cols.join("|"));
            }
        }
        lines.join("\n")
    }

    /// Crash the server (`pg_ctl -m immediate`): no checkpoint, recovery on start.
    pub fn stop_immediate(&self) {
        self.pg_ctl_ok("-m immediate -w stop");
    }

    /// Start a stopped cluster again, same data directory and port.
    pub fn start_again(&self) {
        self.pg_ctl_ok("-w -t 120 start");
    }

    /// Clean restart (`pg_ctl -m fast restart`).
    pub fn restart(&self) {
        self.pg_ctl_ok("-w -t 120 -m fast restart");
    }

    pub fn log_path(&self) -> String {
        self.dir.join("log").to_string_lossy().into_owned()
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `pg_ctl -D <dir> -l <log>` plus space-separated `args`.
    fn pg_ctl_ok(&self, args: &str) {
        let (d, log) = (self.dir.to_string_lossy(), self.log_path());
        let mut all = vec!["-D", &d, "-l", &log];
        all.extend(args.split(' '));
        self.pg_ok("pg_ctl", &all);
    }

    fn pg(&self, prog: &str, args: &[&str]) -> std::io::Result<Output> {
        let mut cmd = Command::new(self.pg_bin.join(prog));
        cmd.args(args).current_dir(&self.dir).stdin(Stdio::null());
        for var in ["PGDATA", "PGPORT", "PGHOST"] {
            cmd.env_remove(var);
        }
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd.output()
    }

    fn pg_ok(&self, prog: &str, args: &[&str]) {
        let out = self.pg(prog, args);
        if let Ok(o) = &out
            && o.status.success()
        {
            return;
        }
        let what = match out {
            Ok(o) => format!("{}\n{}{}", o.status, text(&o.stdout), text(&o.stderr)),
            Err(e) => e.to_string(),
        };
        panic!(
            "{prog} {} failed: {what}\n--- server log {} (tail) ---\n{}",
            args.join(" "),
            self.log_path(),
            self.log_tail(40)
        );
    }

    /// Stop (ignoring errors: it may be stopped already), release the port
    /// and remove the data directory unless it is to be kept.
    fn teardown(&self, failed: bool) {
        let d = self.dir.to_string_lossy().into_owned();
        let _ = self.pg("pg_ctl", &["-D", &d, "-m", "immediate", "-w", "stop"]);
        let _ = fs::remove_file(&self.port_lock);
        if failed || keep_requested() {
            eprintln!(
                "londiste-rs tests: keeping cluster data dir {d} (log: {})",
                self.log_path()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown(std::thread::panicking());
    }
}

/// `LONDISTE_TEST_PGBIN`, else `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin` that has `initdb`.
fn pg_bindir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("LONDISTE_TEST_PGBIN") {
            return PathBuf::from(d);
        }
        if let Ok(o) = Command::new("pg_config").arg("--bindir").output() {
            let d = PathBuf::from(text(&o.stdout).trim());
            if o.status.success() && d.join("initdb").exists() {
                return d;
            }
        }
        let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((v, bin))
            })
            .collect();
        found.sort();
        found
            .pop()
            .map(|(_, d)| d)
            .expect("no PostgreSQL server binaries: install postgresql or set LONDISTE_TEST_PGBIN")
    })
    .clone()
}

/// The bin dir of PostgreSQL `major`, fetched and cached on first use by
/// `scripts/pg-builds` (npm registry builds; see its header for the cache
/// dir). Panics with the script's output when it cannot be had.
pub fn pg_build(major: u32) -> PathBuf {
    static DIRS: std::sync::Mutex<Vec<(u32, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = dirs.iter().find(|(m, _)| *m == major) {
        return d.clone();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-builds");
    let out = Command::new(&script)
        .arg(major.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    let dir = PathBuf::from(text(&out.stdout).trim());
    if !out.status.success() || !dir.join("postgres").exists() {
        panic!(
            "cannot get PostgreSQL {major} ({} {major}: {}):\n{}{}",
            script.display(),
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    dirs.push((major, dir.clone()));
    dir
}

/// A free port, reserved across processes by `/tmp/londiste-rs-port-N.lock`
/// (holding our pid, so locks left by killed runs are reclaimed).
pub fn reserve_port() -> (u16, PathBuf) {
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let lock = PathBuf::from(format!("/tmp/londiste-rs-port-{port}.lock"));
        match OpenOptions::new().write(true).create_new(true).open(&lock) {
            Ok(mut f) => {
                let _ = write!(f, "{}", std::process::id());
                return (port, lock);
            }
            Err(_) => {
                let owner = fs::read_to_string(&lock)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                let dead = owner.is_some_and(|pid: i32| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                        == Err(nix::errno::Errno::ESRCH)
                });
                if dead {
                    let _ = fs::remove_file(&lock);
                }
            }
        }
    }
    panic!("could not reserve a free port (see /tmp/londiste-rs-port-*.lock)");
}

/// A database name unique within the machine: prefix, counter, pid.
/// xorshift64*: no dependency, reproducible from a printed seed (never 0).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// 0..n (0 for n = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub fn unique_name(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}_{n}_{}", std::process::id())
}

/// Poll `f` every 100 ms until it returns `Ok(true)`; on timeout panic with
/// `what` and the last value or error seen.
pub fn poll_until<F: FnMut() -> Result<bool, String>>(what: &str, timeout: Duration, f: F) {
    poll_eq(what, timeout, true, f)
}

/// Poll `f` every 100 ms until it returns `expected`; on timeout panic with
/// `what`, the expected and the last value or error seen.
pub fn poll_eq<T, F>(what: &str, timeout: Duration, expected: T, mut f: F)
where
    T: PartialEq + Debug,
    F: FnMut() -> Result<T, String>,
{
    let start = Instant::now();
    loop {
        let last = f();
        if last.as_ref() == Ok(&expected) {
            return;
        }
        if start.elapsed() >= timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n expected: {expected:?}\n last seen: {last:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_londiste-rs"))
}

/// A directory of symlinks `pgqd`, `londiste3`, `londiste`, `londiste-rs` to
/// the binary, which picks its mode from the name it is run as.
pub fn bin_dir() -> &'static Path {
    BIN_DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("londiste-rs-bin-")
            .tempdir()
            .expect("create bin temp dir")
            .keep();
        for name in ["pgqd", "londiste3", "londiste", "londiste-rs"] {
            std::os::unix::fs::symlink(bin(), dir.join(name)).expect("symlink binary");
        }
        extern "C" fn remove_bin_dir() {
            if let Some(d) = BIN_DIR.get() {
                let _ = fs::remove_dir_all(d);
            }
        }
        unsafe { nix::libc::atexit(remove_bin_dir) };
        dir
    })
}

fn command(name: &str, args: &[&str], cwd: &Path) -> Command {
    let mut cmd = Command::new(bin_dir().join(name));
    cmd.args(args)
        .current_dir(cwd)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null());
    cmd
}

/// Run the binary as `name` to completion (at most 120 s). Output goes to
/// unnamed temp files, not pipes, so a child that daemonizes and keeps them
/// open cannot hang the test.
pub fn run(name: &str, args: &[&str], cwd: &Path) -> Output {
    let mut out = tempfile::tempfile().expect("temp file");
    let mut err = tempfile::tempfile().expect("temp file");
    let mut cmd = command(name, args, cwd);
    cmd.stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"));
    let line = format!("{name} {}", args.join(" "));
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {line}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for child") {
            break Some(s);
        }
        if start.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let slurp = |f: &mut File| {
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.read_to_end(&mut v))
            .expect("read output");
        v
    };
    let (stdout, stderr) = (slurp(&mut out), slurp(&mut err));
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "`{line}` (in {}) timed out after {RUN_TIMEOUT:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            cwd.display(),
            text(&stdout),
            text(&stderr)
        ),
    }
}

/// Start the binary as `name` in the foreground (a daemon under test). Its
/// stdout and stderr are appended to `cwd/<name>.console`, never piped, so
/// an unread pipe cannot block it. Wrap it in `KillOnDrop`.
pub fn spawn(name: &str, args: &[&str], cwd: &Path) -> Child {
    let console = OpenOptions::new()
        .create(true)
        .append(true)
        .open(cwd.join(format!("{name}.console")))
        .expect("open console file");
    let mut cmd = command(name, args, cwd);
    cmd.stdout(console.try_clone().expect("dup"))
        .stderr(console);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawn {name} {}: {e}", args.join(" ")))
}

/// Owns a spawned daemon (`KillOnDrop(spawn(..))`): killed with SIGKILL and
/// reaped when dropped, so a failing test does not leave it running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A scratch directory for configs, pidfiles and logs; kept when the test
/// fails (or with `LONDISTE_TEST_KEEP=1`).
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    pub fn new() -> TestDir {
        let d = tempfile::Builder::new()
            .prefix("londiste-rs-test-")
            .tempdir();
        TestDir(Some(d.expect("create test dir")))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("live TestDir").path()
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path().join(name);
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// The tutorial's three job files for the queue named after the master
    /// database: ticker.ini, master.ini and slave.ini (loop_delay 0.2 plus
    /// `worker_extra`, ini lines), with log/ and pid/ directories.
    pub fn tutorial_inis(
        &self,
        base_connstr: &str,
        master: &str,
        mconn: &str,
        sconn: &str,
        worker_extra: &str,
    ) {
        fs::create_dir(self.path().join("log")).unwrap();
        fs::create_dir(self.path().join("pid")).unwrap();
        self.write(
            "ticker.ini",
            &format!(
                "[pgqd]\nbase_connstr = {base_connstr}\ndatabase_list = {master}\nlogfile = log/ticker.log\n"
            ),
        );
        for (name, conn) in [("master", mconn), ("slave", sconn)] {
            self.write(
                &format!("{name}.ini"),
                &format!(
                    "[londiste3]\ndb = {conn}\nqueue_name = {master}\nloop_delay = 0.2\n{worker_extra}\
                     logfile = log/{name}.log\npidfile = pid/{name}.pid\n"
                ),
            );
        }
    }

    pub fn read(&self, name: &str) -> String {
        let p = self.path().join(name);
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(d) = self.0.take()
            && (std::thread::panicking() || keep_requested())
        {
            eprintln!("londiste-rs tests: keeping test dir {}", d.keep().display());
        }
    }
}

/// Every row of `table` (an SQL name, e.g. `public.t`) as text, sorted, so
/// tables in two databases can be compared.
pub fn table_dump(client: &mut Client, table: &str) -> Vec<String> {
    // Byte order (collate "C") so the sort matches Rust's and other databases'.
    let sql = format!("select t::text from {table} t order by t::text collate \"C\"");
    client
        .query(&sql, &[])
        .unwrap_or_else(|e| panic!("dump {table}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Panic with `tables_diff` unless `table` has the same rows in both databases.
pub fn assert_tables_equal(src: &mut Client, dst: &mut Client, table: &str) {
    if let Some(diff) = tables_diff(src, dst, table) {
        panic!("{diff}");
    }
}

/// `None` if `table` has the same rows in both databases, else the row counts
/// and the first rows found only on one side (handy as `poll_until`'s error).
pub fn tables_diff(src: &mut Client, dst: &mut Client, table: &str) -> Option<String> {
    let (a, b) = (table_dump(src, table), table_dump(dst, table));
    if a == b {
        return None;
    }
    // Both dumps are sorted: walk them together to find rows only on one side.
    let (mut i, mut j, mut only_src, mut only_dst) = (0, 0, Vec::new(), Vec::new());
    while i < a.len() || j < b.len() {
        if j == b.len() || (i < a.len() && a[i] < b[j]) {
            only_src.push(&a[i]);
            i += 1;
        } else if i == a.len() || b[j] < a[i] {
            only_dst.push(&b[j]);
            j += 1;
        } else {
            i += 1;
            j += 1;
        }
    }
    let few = |v: &[&String]| {
        let mut s: Vec<String> = v.iter().take(5).map(|r| format!("    {r}")).collect();
        if v.len() > 5 {
            s.push(format!("    ... and {} more", v.len() - 5));
        }
        s.join("\n")
    };
    Some(format!(
        "table {table} differs: source has {} rows, destination {}\n  only in source ({}):\n{}\n  only in destination ({}):\n{}",
        a.len(),
        b.len(),
        only_src.len(),
        few(&only_src),
        only_dst.len(),
        few(&only_dst)
    ))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
