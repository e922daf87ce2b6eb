//! Classic Unix daemon duties: pidfile (locked, so a second instance refuses to
//! start and a stale one is taken over), daemonizing before any thread or
//! connection exists, and -s/-k/-r: signalling the pidfile's process.

use crate::error::{Error, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// A held pidfile: the flock lives as long as this value (the process).
pub struct PidFile {
    path: PathBuf,
    _lock: Flock<File>,
}

fn read_pid(path: &Path) -> Option<i32> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    pid > 0 && kill(Pid::from_raw(pid), None).is_ok()
}

/// Fails with "already running" if a live process holds the pidfile lock.
/// Called before daemonizing, so that a refused `-d` start reports it on the
/// terminal with a non-zero exit instead of failing silently in the child.
pub fn check_not_running(path: &Path) -> Result<()> {
    let Ok(f) = File::open(path) else {
        return Ok(());
    };
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(_) => Ok(()),
        Err(_) => {
            let who = read_pid(path)
                .map(|p| format!(" as pid {p}"))
                .unwrap_or_default();
            Err(Error::Other(format!(
                "already running{} (pidfile {}); stop it first with -s, or use another pidfile",
                who,
                path.display()
            )))
        }
    }
}

/// The pidfile's directory must exist: say so plainly rather than fail to open it.
pub fn check_pidfile_dir(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(Error::Config(format!(
            "pidfile directory {} does not exist; create it or change pidfile",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

impl PidFile {
    /// Takes the pidfile for this process; fails if a live instance holds it.
    pub fn acquire(path: &Path) -> Result<PidFile> {
        check_pidfile_dir(path)?;
        let old = read_pid(path);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::Io(format!("cannot open pidfile {}: {}", path.display(), e)))?;
        let mut lock = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, _)) => {
                let who = old.map(|p| format!(" as pid {p}")).unwrap_or_default();
                return Err(Error::Other(format!(
                    "already running{} (pidfile {}); stop it first with -s, or use another pidfile",
                    who,
                    path.display()
                )));
            }
        };
        if let Some(p) = old
            && p != std::process::id() as i32
        {
            if alive(p) {
                log::warn!(
                    "pidfile {} named pid {}, which does not hold it; taking over",
                    path.display(),
                    p
                );
            } else {
                log::info!(
                    "stale pidfile {} (pid {} is gone); taking over",
                    path.display(),
                    p
                );
            }
        }
        lock.set_len(0)
            .map_err(|e| Error::Io(format!("cannot write pidfile {}: {}", path.display(), e)))?;
        lock.rewind().ok();
        writeln!(lock, "{}", std::process::id())
            .map_err(|e| Error::Io(format!("cannot write pidfile {}: {}", path.display(), e)))?;
        Ok(PidFile {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if read_pid(&self.path) == Some(std::process::id() as i32) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Detaches from the terminal: fork, setsid, fork, stdio to /dev/null. Must run
/// before any thread exists (fork copies only the calling thread).
pub fn daemonize() -> Result<()> {
    use nix::unistd::{ForkResult, fork, setsid};
    // SAFETY: called while the process is single-threaded, before any thread or
    // connection is created.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => std::process::exit(0),
        Ok(ForkResult::Child) => {}
        Err(e) => return Err(Error::Io(format!("cannot fork: {e}"))),
    }
    setsid().map_err(|e| Error::Io(format!("setsid failed: {e}")))?;
    // SAFETY: as above, still single-threaded.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => std::process::exit(0),
        Ok(ForkResult::Child) => {}
        Err(e) => return Err(Error::Io(format!("cannot fork: {e}"))),
    }
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Error::Io(format!("cannot open /dev/null: {e}")))?;
    use std::os::fd::AsRawFd;
    for target in 0..3 {
        // SAFETY: plain dup2 of an open descriptor onto the standard streams.
        unsafe {
            nix::libc::dup2(null.as_raw_fd(), target);
        }
    }
    Ok(())
}

/// -s, -k, -r: send a signal to the process named in the pidfile.
pub fn signal_pidfile(pidfile: Option<&Path>, sig: Signal) -> Result<()> {
    let Some(path) = pidfile else {
        return Err(Error::Config(
            "No pidfile configured: set pidfile in the config file to use -s, -k or -r".into(),
        ));
    };
    let Some(pid) = read_pid(path) else {
        return Err(Error::Other(format!(
            "not running: no pidfile {} (nothing to signal)",
            path.display()
        )));
    };
    if !alive(pid) {
        return Err(Error::Other(format!(
            "not running: old process {} from pidfile {} is gone",
            pid,
            path.display()
        )));
    }
    kill(Pid::from_raw(pid), sig)
        .map_err(|e| Error::Io(format!("cannot signal pid {pid}: {e}")))?;
    Ok(())
}
