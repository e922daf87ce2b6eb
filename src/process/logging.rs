//! Logging: `log` + `env_logger`, one line per message with millisecond timestamp,
//! pid, level and the job (the thread's name) on every line. Output goes to the
//! configured logfile (reopened on HUP, for logrotate), to stderr while in the
//! foreground, and optionally to syslog.

use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;

/// Where log lines go. Guarded by a mutex because every thread logs; the lock is
/// held only for one write.
struct Sinks {
    file: Option<(PathBuf, File)>,
    stderr: bool,
    syslog: Option<(UnixDatagram, String, u8)>,
}

static SINKS: OnceLock<Arc<Mutex<Sinks>>> = OnceLock::new();

fn sinks() -> &'static Arc<Mutex<Sinks>> {
    SINKS.get_or_init(|| {
        Arc::new(Mutex::new(Sinks {
            file: None,
            stderr: true,
            syslog: None,
        }))
    })
}

struct Writer;

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = sinks().lock();
        if let Some((_, f)) = s.file.as_mut() {
            let _ = f.write_all(buf);
        }
        if s.stderr {
            let _ = std::io::stderr().write_all(buf);
        }
        if let Some((sock, ident, facility)) = s.syslog.as_ref() {
            let line = String::from_utf8_lossy(buf);
            let prio = facility * 8 + syslog_severity(&line);
            let msg = format!(
                "<{}>{}[{}]: {}",
                prio,
                ident,
                std::process::id(),
                line.trim_end()
            );
            let _ = sock.send(msg.as_bytes());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn syslog_severity(line: &str) -> u8 {
    if line.contains(" ERROR ") {
        3
    } else if line.contains(" WARN ") {
        4
    } else if line.contains(" DEBUG ") || line.contains(" TRACE ") {
        7
    } else {
        6
    }
}

fn facility_code(name: &str) -> u8 {
    match name {
        "kern" => 0,
        "user" => 1,
        "mail" => 2,
        "daemon" => 3,
        "auth" => 4,
        "syslog" => 5,
        "lpr" => 6,
        "news" => 7,
        "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        _ => 3,
    }
}

/// Verbosity from the command line: -q, default, -v, -vv.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
    Trace,
}

/// Sets up the logger once per process.
pub fn init(verbosity: Verbosity) {
    let level = match verbosity {
        Verbosity::Quiet => log::LevelFilter::Warn,
        Verbosity::Normal => log::LevelFilter::Info,
        Verbosity::Verbose => log::LevelFilter::Debug,
        Verbosity::Trace => log::LevelFilter::Trace,
    };
    let mut b = env_logger::Builder::new();
    b.filter_level(level)
        // The postgres driver's own debug lines are noise for operators.
        .filter_module("tokio_postgres", log::LevelFilter::Warn)
        .filter_module("postgres", log::LevelFilter::Warn)
        .parse_env("LONDISTE_LOG")
        .target(env_logger::Target::Pipe(Box::new(Writer)))
        .format(|buf, rec| {
            let t = std::thread::current();
            let job = t.name().unwrap_or("main");
            writeln!(
                buf,
                "{} {} {} {}: {}",
                buf.timestamp_millis(),
                std::process::id(),
                rec.level(),
                job,
                rec.args()
            )
        });
    let _ = b.try_init();
}

/// Points the log at a file (or none) and says whether stderr gets lines too.
pub fn configure(logfile: Option<&Path>, stderr: bool) -> std::io::Result<()> {
    let file = match logfile {
        Some(p) => Some((p.to_path_buf(), open_log(p)?)),
        None => None,
    };
    let mut s = sinks().lock();
    s.file = file;
    s.stderr = stderr;
    Ok(())
}

pub fn configure_syslog(enabled: bool, ident: &str, facility: &str) {
    let mut s = sinks().lock();
    s.syslog = None;
    if enabled
        && let Ok(sock) = UnixDatagram::unbound()
        && sock.connect("/dev/log").is_ok()
    {
        s.syslog = Some((sock, ident.to_string(), facility_code(facility)));
    }
}

fn open_log(p: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot open logfile {}: {}", p.display(), e),
            )
        })
}

/// Reopens the logfile (after logrotate moved it away); on failure keeps the old one.
pub fn reopen() {
    let mut s = sinks().lock();
    if let Some((path, file)) = s.file.as_mut() {
        match open_log(path) {
            Ok(f) => *file = f,
            Err(e) => {
                let _ = writeln!(file, "cannot reopen logfile: {e}");
            }
        }
    }
}

/// Stops writing to stderr (after daemonizing, stderr is /dev/null anyway).
pub fn no_stderr() {
    sinks().lock().stderr = false;
}
