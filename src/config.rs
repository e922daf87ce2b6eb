//! Configuration: INI files read raw, interpolated (`%(job_name)s`, as Skytools
//! does), then validated into typed structs with defaults from one table per mode.
//! Unknown keys are warned about, bad values are one-line errors naming the file,
//! the key and the problem (exit code 78).

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One section of an INI file after interpolation, with where it came from.
#[derive(Debug, Clone)]
pub struct Section {
    pub file: PathBuf,
    pub name: String,
    pub values: BTreeMap<String, String>,
}

/// Default keys every section can interpolate, as in Skytools.
fn builtin_defaults(file: &Path, section: &str) -> BTreeMap<String, String> {
    let mut d = BTreeMap::new();
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    d.insert("job_name".into(), stem.clone());
    d.insert("config_name".into(), stem);
    d.insert("service_name".into(), section.to_string());
    let dir = file.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    d.insert("config_dir".into(), dir.to_string_lossy().into_owned());
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    d.insert("host_name".into(), host);
    d
}

/// Keys every section has, set by the loader (as Skytools does) or usable in
/// interpolation.
const BUILTIN: &[&str] = &[
    "job_name",
    "config_name",
    "service_name",
    "config_dir",
    "host_name",
];

/// Reads `file` and returns the first of `sections` it has, interpolated, with
/// `overrides` (from `--set KEY=VAL`) applied.
pub fn load_section(
    file: &Path,
    sections: &[&str],
    overrides: &[(String, String)],
) -> Result<Section> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        let fix = match e.kind() {
            std::io::ErrorKind::NotFound => "check the path (print a sample with --ini)",
            std::io::ErrorKind::PermissionDenied => "make it readable by this user",
            _ => "check the file",
        };
        Error::Config(format!(
            "cannot read config file {}: {e}; {fix}",
            file.display()
        ))
    })?;
    let mut ini = configparser::ini::Ini::new();
    let map = ini.read(text).map_err(|e| {
        Error::Config(format!(
            "{}: cannot parse: {e}; the file must be INI: [section] and key = value lines",
            file.display()
        ))
    })?;
    let found = sections.iter().find(|s| map.contains_key(**s));
    let Some(name) = found else {
        let list: Vec<String> = sections.iter().map(|s| format!("[{s}]")).collect();
        return Err(Error::Config(format!(
            "{}: no {} section; the file must start with one (see --ini for a sample)",
            file.display(),
            list.join(" or ")
        )));
    };
    let raw = &map[*name];
    let mut values: BTreeMap<String, String> = builtin_defaults(file, name);
    // A [DEFAULT]-style section of Skytools configs is not used by londiste; plain keys only.
    for (k, v) in raw {
        values.insert(k.clone(), v.clone().unwrap_or_default());
    }
    for (k, v) in overrides {
        values.insert(k.to_lowercase(), v.clone());
    }
    let mut out = BTreeMap::new();
    for (k, v) in &values {
        out.insert(k.clone(), interpolate(file, k, v, &values, 0)?);
    }
    Ok(Section {
        file: file.to_path_buf(),
        name: name.to_string(),
        values: out,
    })
}

fn interpolate(
    file: &Path,
    key: &str,
    v: &str,
    all: &BTreeMap<String, String>,
    depth: u32,
) -> Result<String> {
    if depth > 10 {
        return Err(Error::Config(format!(
            "{}: key {}: interpolation loop",
            file.display(),
            key
        )));
    }
    let mut out = String::new();
    let mut rest = v;
    while let Some(pos) = rest.find("%(") {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let Some(end) = after.find(")s") else {
            return Err(Error::Config(format!(
                "{}: key {}: bad interpolation in {:?}",
                file.display(),
                key,
                v
            )));
        };
        let name = after[..end].to_lowercase();
        let Some(val) = all.get(&name) else {
            return Err(Error::Config(format!(
                "{}: key {}: %({})s refers to an unknown key",
                file.display(),
                key,
                name
            )));
        };
        out.push_str(&interpolate(file, &name, val, all, depth + 1)?);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    // "%%" is a literal percent sign in Python's ConfigParser.
    Ok(out.replace("%%", "%"))
}

/// Typed access with errors that name the file and the key.
impl Section {
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::Config(format!(
            "{}: [{}] key {}: {}",
            self.file.display(),
            self.name,
            key,
            msg
        ))
    }

    pub fn str_opt(&self, key: &str) -> Option<String> {
        self.values
            .get(key)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    pub fn required(&self, key: &str) -> Result<String> {
        self.str_opt(key)
            .ok_or_else(|| self.err(key, "missing; it is required"))
    }

    pub fn seconds(&self, key: &str, default: f64) -> Result<Duration> {
        match self.str_opt(key) {
            None => Ok(Duration::from_secs_f64(default)),
            Some(v) => {
                let n = parse_seconds(&v)
                    .ok_or_else(|| self.err(key, format!("{v:?} is not a number of seconds")))?;
                Ok(Duration::from_secs_f64(n))
            }
        }
    }

    /// Seconds that may be negative or zero (loop_delay: <= 0 means run once).
    pub fn seconds_signed(&self, key: &str, default: f64) -> Result<f64> {
        match self.str_opt(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<f64>()
                .map_err(|_| self.err(key, format!("{v:?} is not a number of seconds"))),
        }
    }

    pub fn int(&self, key: &str, default: i64, min: i64) -> Result<i64> {
        match self.str_opt(key) {
            None => Ok(default),
            Some(v) => {
                let n: i64 = v
                    .parse()
                    .map_err(|_| self.err(key, format!("{v:?} is not a whole number")))?;
                if n < min {
                    return Err(self.err(key, format!("{n} is too small (at least {min})")));
                }
                Ok(n)
            }
        }
    }

    pub fn boolean(&self, key: &str, default: bool) -> Result<bool> {
        match self.str_opt(key).map(|s| s.to_lowercase()) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(self.err(key, format!("{v:?} is not a boolean (use 1/0, true/false)"))),
            },
        }
    }

    pub fn list(&self, key: &str) -> Vec<String> {
        self.str_opt(key)
            .map(|v| {
                v.split([',', ' ', '\t', '\n'])
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A file path; relative paths are taken from the current directory, as
    /// Skytools does, and made absolute now so that daemonizing cannot change them.
    pub fn path(&self, key: &str) -> Option<PathBuf> {
        self.str_opt(key).map(|v| {
            let p = if let Some(rest) = v.strip_prefix("~/") {
                std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_default()
                    .join(rest)
            } else {
                PathBuf::from(v)
            };
            if p.is_absolute() {
                p
            } else {
                std::env::current_dir().unwrap_or_default().join(p)
            }
        })
    }

    /// Rejects a key that is a near miss of a known one (`queue_nmae`): a
    /// typo would otherwise silently leave the real key at its default. Other
    /// unknown keys (Skytools settings this tool does not use) only warn, so
    /// existing configuration files keep working.
    pub fn check_keys(&self, known: &[&str]) -> Result<()> {
        let mut keys: Vec<&String> = self.values.keys().collect();
        keys.sort();
        for k in keys {
            if known.contains(&k.as_str()) || BUILTIN.contains(&k.as_str()) {
                continue;
            }
            if let Some(near) = known.iter().find(|n| near_miss(k, n)) {
                return Err(self.err(
                    k,
                    format!("unknown key; did you mean {near}? (see man londiste-rs.ini)"),
                ));
            }
            log::warn!(
                "{}: [{}] unknown key {} ignored",
                self.file.display(),
                self.name,
                k
            );
        }
        Ok(())
    }
}

/// Whether `a` is one or two edits (insert, delete, substitute, swap of
/// neighbours) away from `b`, ignoring case: a typo rather than another word.
fn near_miss(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (
        a.to_lowercase().chars().collect(),
        b.to_lowercase().chars().collect(),
    );
    if a == b {
        return true;
    }
    if a.len().abs_diff(b.len()) > 2 || a.len().min(b.len()) < 4 {
        return false;
    }
    // Optimal string alignment distance.
    let (n, m) = (a.len(), b.len());
    let mut d = vec![vec![0usize; m + 1]; n + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, v) in d[0].iter_mut().enumerate() {
        *v = j;
    }
    for i in 1..=n {
        for j in 1..=m {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[n][m] <= 2
}

fn parse_seconds(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, mult) = if let Some(n) = v.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = v.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (v, 1.0)
    };
    let n: f64 = num.trim().parse().ok()?;
    if n < 0.0 || !n.is_finite() {
        return None;
    }
    Some(n * mult)
}

/// Settings shared by every daemon mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    /// The file this job was read from (for messages that name the command to run).
    pub file: PathBuf,
    pub job_name: String,
    pub logfile: Option<PathBuf>,
    pub pidfile: Option<PathBuf>,
    pub syslog: bool,
    pub syslog_ident: String,
    pub syslog_facility: String,
}

impl Common {
    fn from(s: &Section, syslog_default: bool, ident_default: &str) -> Result<Common> {
        Ok(Common {
            file: s.file.clone(),
            job_name: s.required("job_name")?,
            logfile: s.path("logfile"),
            pidfile: s.path("pidfile"),
            syslog: s.boolean("syslog", syslog_default)?,
            syslog_ident: s
                .str_opt("syslog_ident")
                .unwrap_or_else(|| ident_default.to_string()),
            syslog_facility: s
                .str_opt("syslog_facility")
                .unwrap_or_else(|| "daemon".into()),
        })
    }
}

pub const TICKER_KEYS: &[&str] = &[
    "base_connstr",
    "initial_database",
    "database_list",
    "logfile",
    "pidfile",
    "syslog",
    "syslog_ident",
    "syslog_facility",
    "ticker_period",
    "check_period",
    "retry_period",
    "maint_period",
    "stats_period",
    "connection_lifetime",
];

/// The ticker (`pgqd` mode).
#[derive(Debug, Clone, PartialEq)]
pub struct TickerConfig {
    pub common: Common,
    pub base_connstr: String,
    pub initial_database: String,
    pub database_list: Vec<String>,
    pub ticker_period: Duration,
    pub check_period: Duration,
    pub retry_period: Duration,
    pub maint_period: Duration,
    pub stats_period: Duration,
    pub connection_lifetime: Duration,
}

impl TickerConfig {
    pub fn from_section(s: &Section) -> Result<TickerConfig> {
        s.check_keys(TICKER_KEYS)?;
        let c = TickerConfig {
            common: Common::from(s, false, "pgqd")?,
            base_connstr: s.str_opt("base_connstr").unwrap_or_default(),
            initial_database: s
                .str_opt("initial_database")
                .unwrap_or_else(|| "template1".into()),
            database_list: s.list("database_list"),
            // pgqd ticks once a second; 50 ms keeps commit-to-replica latency low
            // for the price of a cheap query 20 times a second per database.
            ticker_period: s.seconds("ticker_period", 0.05)?,
            check_period: s.seconds("check_period", 60.0)?,
            retry_period: s.seconds("retry_period", 30.0)?,
            maint_period: s.seconds("maint_period", 120.0)?,
            stats_period: s.seconds("stats_period", 30.0)?,
            connection_lifetime: s.seconds("connection_lifetime", 3600.0)?,
        };
        if c.ticker_period.is_zero() {
            return Err(s.err("ticker_period", "must be more than 0"));
        }
        if crate::db::names_database(&c.base_connstr) {
            return Err(s.err(
                "base_connstr",
                "must not contain dbname= (the ticker adds it per database)",
            ));
        }
        Ok(c)
    }
}

pub const WORKER_KEYS: &[&str] = &[
    "db",
    "queue_name",
    "pgq_queue_name",
    "loop_delay",
    "logfile",
    "pidfile",
    "parallel_copies",
    "node_name",
    "public_node_location",
    "initial_provider_location",
    "consumer_name",
    "pgq_consumer_id",
    "remote_extra_connstr",
    "lock_timeout",
    "exception_sleep",
    "syslog",
    "syslog_ident",
    "syslog_facility",
    "batch_max_events",
    "connection_lifetime",
    "use_skylog",
    "seq_buffer",
    "root_ticker",
    "keepalive_stats",
    "stats_period",
    "dest_schema",
    "merge_truncate",
];

/// The replication worker and admin commands (`londiste3` mode).
impl WorkerConfig {
    /// How the user runs a command for this job, for messages that say what to
    /// do next: `londiste3 /etc/londiste/leaf.ini`.
    pub fn command_hint(&self) -> String {
        let prog = std::env::args()
            .next()
            .map(|a| a.rsplit('/').next().unwrap_or(&a).to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "londiste-rs".into());
        format!("{} {}", prog, self.common.file.display())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    pub common: Common,
    pub db: String,
    pub queue_name: String,
    pub consumer_name: String,
    pub loop_delay: f64,
    pub parallel_copies: usize,
    pub node_name: Option<String>,
    pub public_node_location: Option<String>,
    pub initial_provider_location: Option<String>,
    pub remote_extra_connstr: String,
    pub lock_timeout: Duration,
    pub exception_sleep: Duration,
    pub batch_max_events: i64,
    pub seq_buffer: i64,
    /// The root's worker ticks its queue when due (no pgqd needed for ticks).
    pub root_ticker: bool,
    pub stats_period: Duration,
    /// add-table puts the source's tables into this schema here (`--dest-schema`).
    pub dest_schema: Option<String>,
    /// A source's TRUNCATE of a merged table removes that source's rows (true)
    /// or is ignored (`merge_truncate = skip`).
    pub merge_truncate: bool,
}

impl WorkerConfig {
    pub fn from_section(s: &Section) -> Result<WorkerConfig> {
        s.check_keys(WORKER_KEYS)?;
        let common = Common::from(s, false, "londiste3")?;
        let queue_name = s
            .str_opt("queue_name")
            .or_else(|| s.str_opt("pgq_queue_name"))
            .ok_or_else(|| {
                s.err(
                    "queue_name",
                    "missing; it is required (the queue/set name, same on every node)",
                )
            })?;
        let consumer_name = s
            .str_opt("consumer_name")
            .or_else(|| s.str_opt("pgq_consumer_id"))
            .unwrap_or_else(|| common.job_name.clone());
        Ok(WorkerConfig {
            db: s.required("db")?,
            queue_name,
            consumer_name,
            loop_delay: s.seconds_signed("loop_delay", 1.0)?,
            parallel_copies: s.int("parallel_copies", 4, 1)? as usize,
            node_name: s.str_opt("node_name"),
            public_node_location: s.str_opt("public_node_location"),
            initial_provider_location: s.str_opt("initial_provider_location"),
            remote_extra_connstr: s.str_opt("remote_extra_connstr").unwrap_or_default(),
            lock_timeout: s.seconds("lock_timeout", 10.0)?,
            exception_sleep: s.seconds("exception_sleep", 20.0)?,
            batch_max_events: s.int("batch_max_events", 200_000, 1)?,
            seq_buffer: s.int("seq_buffer", 10_000, 1)?,
            root_ticker: s.boolean("root_ticker", true)?,
            stats_period: s.seconds("stats_period", 30.0)?,
            dest_schema: s.str_opt("dest_schema").filter(|x| !x.is_empty()),
            merge_truncate: match s.str_opt("merge_truncate").as_deref() {
                None | Some("own") => true,
                Some("skip") => false,
                Some(_) => {
                    return Err(s.err(
                        "merge_truncate",
                        "must be own (a source's TRUNCATE removes its rows) or skip",
                    ));
                }
            },
            common,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample config that ships (printed by --ini, installed as docs) loads
    /// and validates.
    #[test]
    fn shipped_samples_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/conf");
        let t = load_section(&dir.join("ticker.ini"), &["pgqd"], &[]).unwrap();
        let tc = TickerConfig::from_section(&t).unwrap();
        assert_eq!(tc.common.job_name, "ticker");
        let w = load_section(&dir.join("worker.ini"), &["londiste3", "londiste"], &[]).unwrap();
        let wc = WorkerConfig::from_section(&w).unwrap();
        assert_eq!(wc.queue_name, "myqueue");
        for k in w.values.keys() {
            assert!(
                WORKER_KEYS.contains(&k.as_str()) || BUILTIN.contains(&k.as_str()),
                "unknown key {k}"
            );
        }
    }

    #[test]
    fn near_misses_are_typos_other_words_are_not() {
        for (a, b) in [
            ("queue_nmae", "queue_name"),
            ("loopdelay", "loop_delay"),
            ("ticker_perod", "ticker_period"),
            ("LOGFILE", "logfile"),
            ("pidfiel", "pidfile"),
        ] {
            assert!(near_miss(a, b), "{a} ~ {b}");
        }
        for (a, b) in [
            ("pgq_lazy_fetch", "batch_max_events"),
            ("db", "dbx"),
            ("use_skylog", "syslog"),
            ("check_period", "stats_period"),
        ] {
            assert!(!near_miss(a, b), "{a} !~ {b}");
        }
    }

    #[test]
    fn interpolation_and_types() {
        let dir = std::env::temp_dir().join(format!("lrs-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("slave.ini");
        std::fs::write(
            &f,
            "[londiste3]\ndb = dbname=x\nqueue_name = q\nlogfile = log/%(job_name)s.log\nloop_delay = 0.5\n",
        )
        .unwrap();
        let s = load_section(&f, &["londiste3", "londiste"], &[]).unwrap();
        let c = WorkerConfig::from_section(&s).unwrap();
        assert_eq!(c.common.job_name, "slave");
        assert!(c.common.logfile.unwrap().ends_with("log/slave.log"));
        assert_eq!(c.loop_delay, 0.5);
        std::fs::write(
            &f,
            "[londiste3]\ndb = x\nqueue_name = q\nloop_delay = abc\n",
        )
        .unwrap();
        let s = load_section(&f, &["londiste3"], &[]).unwrap();
        let e = WorkerConfig::from_section(&s).unwrap_err().to_string();
        assert!(e.contains("loop_delay") && e.contains("slave.ini"), "{e}");
        assert!(
            load_section(&f, &["pgqd"], &[])
                .unwrap_err()
                .to_string()
                .contains("[pgqd]")
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
