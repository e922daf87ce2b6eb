//! The process: daemonize, pidfile, logging, signals, and one thread per job
//! (the ticker and each worker). Jobs talk only over channels: signals arrive as
//! `Control` messages, the ticker's ticks are forwarded to in-process workers.
//! On HUP the config files are read again; jobs whose settings changed are
//! restarted, new ones started, removed ones stopped, the rest left alone. A config
//! that does not load is logged and the running one kept.

use crate::config::{self, TickerConfig, WorkerConfig};
use crate::error::{Error, Result};
use crate::process::daemon::{self, PidFile};
use crate::process::logging;
use crate::process::signals::{self, Control};
use crate::queue::ticker::{TickNotice, Ticker};
use crate::replication::worker::Worker;
use crossbeam_channel::{Sender, bounded, select, unbounded};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub enum JobSpec {
    Ticker(TickerConfig),
    Worker(WorkerConfig),
}

impl JobSpec {
    fn name(&self) -> &str {
        match self {
            JobSpec::Ticker(c) => &c.common.job_name,
            JobSpec::Worker(c) => &c.common.job_name,
        }
    }
    fn common(&self) -> &config::Common {
        match self {
            JobSpec::Ticker(c) => &c.common,
            JobSpec::Worker(c) => &c.common,
        }
    }
}

/// What one process runs, and its process-level settings (from the first job).
#[derive(Debug, Clone)]
pub struct JobSet {
    pub pidfile: Option<PathBuf>,
    pub logfile: Option<PathBuf>,
    /// The configuration file that set `logfile`, for error messages.
    pub logfile_source: Option<PathBuf>,
    pub jobs: Vec<JobSpec>,
}

type Loader<T> = Box<dyn Fn() -> Result<T>>;

pub enum Jobs {
    Ticker(Loader<TickerConfig>),
    Worker(Loader<WorkerConfig>),
    Multi(Loader<JobSet>),
}

impl Jobs {
    fn load(&self) -> Result<JobSet> {
        let one = |j: JobSpec| JobSet {
            pidfile: j.common().pidfile.clone(),
            logfile: j.common().logfile.clone(),
            logfile_source: Some(j.common().file.clone()),
            jobs: vec![j],
        };
        match self {
            Jobs::Ticker(f) => f().map(|c| one(JobSpec::Ticker(c))),
            Jobs::Worker(f) => f().map(|c| one(JobSpec::Worker(c))),
            Jobs::Multi(f) => f(),
        }
    }
}

/// Reads the files of `londiste-rs run`: each is a `[pgqd]` job, a `[londiste3]`
/// (or `[londiste]`) job, or a process file: a `[londiste-rs]` section with
/// `jobs = FILE...` (globs allowed, relative to that file) and the process's own
/// `pidfile` and `logfile`. On HUP the files are read again, so jobs added to or
/// removed from a process file start and stop without a restart.
pub fn load_jobs(files: &[PathBuf], sets: &[(String, String)]) -> Result<JobSet> {
    let mut jobs: Vec<JobSpec> = Vec::new();
    let (mut pidfile, mut logfile, mut logfile_source) = (None, None, None);
    let mut job_files: Vec<PathBuf> = Vec::new();
    for f in files {
        let s = config::load_section(f, &["londiste-rs", "pgqd", "londiste3", "londiste"], sets)?;
        if s.name == "londiste-rs" && s.values.contains_key("jobs") {
            s.check_keys(&["jobs", "pidfile", "logfile"])?;
            pidfile = pidfile.or(s.path("pidfile"));
            if logfile.is_none() && s.path("logfile").is_some() {
                logfile = s.path("logfile");
                logfile_source = Some(f.clone());
            }
            let base = f.parent().map(|p| p.to_path_buf()).unwrap_or_default();
            for pat in s.list("jobs") {
                job_files.extend(expand(&base, &pat).map_err(|e| {
                    Error::Config(format!("{}: [londiste-rs] key jobs: {e}", f.display()))
                })?);
            }
        } else {
            job_files.push(f.clone());
        }
    }
    for f in &job_files {
        let s = config::load_section(f, &["pgqd", "londiste3", "londiste", "londiste-rs"], sets)?;
        let j = if s.name == "pgqd" {
            JobSpec::Ticker(TickerConfig::from_section(&s)?)
        } else {
            JobSpec::Worker(WorkerConfig::from_section(&s)?)
        };
        if jobs.iter().any(|x| x.name() == j.name()) {
            return Err(Error::Config(format!(
                "{}: job name {:?} is used twice; set job_name in one of the files",
                f.display(),
                j.name()
            )));
        }
        jobs.push(j);
    }
    let pidfile = pidfile.or_else(|| jobs.iter().find_map(|j| j.common().pidfile.clone()));
    if logfile.is_none()
        && let Some(j) = jobs.iter().find(|j| j.common().logfile.is_some())
    {
        logfile = j.common().logfile.clone();
        logfile_source = Some(j.common().file.clone());
    }
    Ok(JobSet {
        pidfile,
        logfile,
        logfile_source,
        jobs,
    })
}

/// Expands one `jobs` entry: a path, or a pattern with `*`/`?` in its file name.
fn expand(base: &std::path::Path, pat: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let p = base.join(pat);
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains('*') && !name.contains('?') {
        if !p.is_file() {
            return Err(format!("{} does not exist", p.display()));
        }
        return Ok(vec![p]);
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| crate::names::glob_match(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

struct Running {
    spec: JobSpec,
    ctl: Sender<Control>,
    ticks: Option<Sender<()>>,
    handle: JoinHandle<Result<()>>,
}

fn start(spec: JobSpec, tick_tx: &Sender<TickNotice>) -> Running {
    let (ctl_tx, ctl_rx) = unbounded::<Control>();
    let name = spec.name().to_string();
    match spec.clone() {
        JobSpec::Ticker(cfg) => {
            let tt = tick_tx.clone();
            let handle = crate::process::thread::spawn(&name, move || {
                let mut t = Ticker::new(cfg, Some(tt));
                t.run(&ctl_rx)
            });
            Running {
                spec,
                ctl: ctl_tx,
                ticks: None,
                handle,
            }
        }
        JobSpec::Worker(cfg) => {
            let (wt_tx, wt_rx) = bounded::<()>(1);
            let handle = crate::process::thread::spawn(&name, move || {
                let mut w = Worker::new(cfg);
                w.run(&ctl_rx, Some(&wt_rx))
            });
            Running {
                spec,
                ctl: ctl_tx,
                ticks: Some(wt_tx),
                handle,
            }
        }
    }
}

/// Fails early, naming the configuration file and the key, when the logfile
/// cannot be written: after a daemon's fork the error would reach no one.
fn check_logfile(p: &Path, source: Option<&Path>) -> Result<()> {
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let problem = if !dir.exists() {
        format!(
            "directory {} does not exist; create it or change logfile",
            dir.display()
        )
    } else if !dir.is_dir() {
        format!("{} is not a directory; change logfile", dir.display())
    } else if p.is_dir() {
        format!("{} is a directory; name a file in logfile", p.display())
    } else {
        // Whether it can be written shows when logging opens it.
        return Ok(());
    };
    Err(logfile_error(source, &problem))
}

fn logfile_error(source: Option<&Path>, problem: &str) -> Error {
    let file = source
        .map(|s| format!("{}: ", s.display()))
        .unwrap_or_default();
    Error::Config(format!("{file}key logfile: {problem}"))
}

/// Runs the jobs until stopped.
pub fn run(jobs: Jobs, daemonize: bool, quiet: bool) -> Result<()> {
    let mut set = jobs.load()?;
    if daemonize && set.pidfile.is_none() {
        return Err(Error::Config(
            "Daemon needs pidfile: set pidfile in the config file to use -d".into(),
        ));
    }
    if let Some(p) = &set.logfile {
        check_logfile(p, set.logfile_source.as_deref())?;
    }
    // Everything that can fail is checked before daemonizing, while errors still
    // reach the terminal: after the fork they would only reach the log.
    if let Some(p) = &set.pidfile {
        daemon::check_pidfile_dir(p)?;
        daemon::check_not_running(p)?;
    }
    logging::configure(set.logfile.as_deref(), !daemonize && !quiet).map_err(|e| {
        logfile_error(
            set.logfile_source.as_deref(),
            &format!("{e}; fix the permissions or change logfile"),
        )
    })?;
    if daemonize {
        daemon::daemonize()?;
    }
    if let Some(j) = set.jobs.first() {
        let c = j.common();
        logging::configure_syslog(c.syslog, &c.syslog_ident, &c.syslog_facility);
    }
    let _pid = match &set.pidfile {
        Some(p) => Some(PidFile::acquire(p)?),
        None => None,
    };
    let sig =
        signals::listen().map_err(|e| Error::Io(format!("cannot set up signal handling: {e}")))?;
    let (tick_tx, tick_rx) = bounded::<TickNotice>(64);
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    for j in set.jobs.clone() {
        running.insert(j.name().to_string(), start(j, &tick_tx));
    }
    let mut restart_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut stopping = false;
    loop {
        select! {
            recv(sig) -> m => match m {
                Ok(Control::Reload) => {
                    logging::reopen();
                    match jobs.load() {
                        Ok(new) => {
                            reconcile(&mut running, &new, &tick_tx);
                            set = new;
                        }
                        Err(e) => log::error!("reload failed, keeping the running config: {e}"),
                    }
                }
                Ok(c) => {
                    stopping = true;
                    for r in running.values() {
                        let _ = r.ctl.send(c);
                    }
                }
                Err(_) => {}
            },
            recv(tick_rx) -> _ => {
                for r in running.values() {
                    if let Some(t) = &r.ticks {
                        let _ = t.try_send(());
                    }
                }
            },
            default(Duration::from_millis(500)) => {}
        }
        // Reap finished threads: restart failed jobs after a pause, unless stopping.
        let done: Vec<String> = running
            .iter()
            .filter(|(_, r)| r.handle.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for name in done {
            let r = running.remove(&name).unwrap();
            let res = r
                .handle
                .join()
                .unwrap_or_else(|_| Err(Error::Other("thread panicked".into())));
            if stopping {
                continue;
            }
            match res {
                Ok(()) => {
                    log::info!("job {name} finished");
                }
                Err(Error::Stopped) => {}
                Err(e) => {
                    log::error!("job {name} failed: {e}; restarting it in 5s");
                    restart_at.insert(name.clone(), Instant::now() + Duration::from_secs(5));
                }
            }
        }
        let due: Vec<String> = restart_at
            .iter()
            .filter(|(_, at)| Instant::now() >= **at)
            .map(|(k, _)| k.clone())
            .collect();
        for name in due {
            restart_at.remove(&name);
            if let Some(spec) = set.jobs.iter().find(|j| j.name() == name) {
                running.insert(name.clone(), start(spec.clone(), &tick_tx));
            }
        }
        if running.is_empty() && restart_at.is_empty() {
            log::info!("all jobs ended; exiting");
            return Ok(());
        }
    }
}

/// Applies a reloaded config: restart changed jobs, start new, stop removed.
fn reconcile(running: &mut BTreeMap<String, Running>, new: &JobSet, tick_tx: &Sender<TickNotice>) {
    let names: Vec<String> = running.keys().cloned().collect();
    for name in names {
        let keep = new.jobs.iter().find(|j| j.name() == name);
        let same = keep.is_some_and(|j| *j == running[&name].spec);
        if same {
            continue;
        }
        let r = running.remove(&name).unwrap();
        let _ = r.ctl.send(Control::Kill);
        let _ = r.handle.join();
        match keep {
            Some(j) => {
                log::info!("job {name}: config changed, restarted");
                running.insert(name.clone(), start(j.clone(), tick_tx));
            }
            None => log::info!("job {name}: removed from config, stopped"),
        }
    }
    for j in &new.jobs {
        if !running.contains_key(j.name()) {
            log::info!("job {}: new in config, started", j.name());
            running.insert(j.name().to_string(), start(j.clone(), tick_tx));
        }
    }
}
