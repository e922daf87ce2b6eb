//! Command line: the binary is `londiste-rs`, and behaves as `pgqd` or `londiste3`
//! when called through links of those names. Parsing is two-stage: raw words into
//! flags and positionals, then a typed, validated command. `main` prints one line
//! `NAME: error` and exits with the error's code.

use crate::commands::status;
use crate::commands::{
    Opts, cascade, check, compare, execute, fkeys, nodes, repair, resurrect, seqs, tables, takeover,
};
use crate::config::{self, TickerConfig, WorkerConfig};
use crate::error::{Error, Result};
use crate::process::daemon;
use crate::process::logging::{self, Verbosity};
use crate::process::supervisor;
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Raw parse: flags (with optional values) and positional words, in order.
#[derive(Debug, Default)]
struct Raw {
    flags: Vec<(String, Option<String>)>,
    words: Vec<String>,
}

/// Long options that take a value (`--opt=V` or `--opt V`).
const VALUED: &[&str] = &[
    "--set",
    "--provider",
    "--dest-table",
    "--dest-schema",
    "--copy-node",
    "--trigger-arg",
    "--trigger-flags",
    "--handler",
    "--handler-arg",
    "--key",
    "--ini-file",
    "--target",
    "--merge",
    "--dead",
    "--max-parallel-copy",
    "--file",
];

fn parse_raw(args: &[String]) -> Result<Raw> {
    let mut raw = Raw::default();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        if a == "--" {
            raw.words.extend(it.by_ref().cloned());
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, val) = match long.split_once('=') {
                Some((n, v)) => (format!("--{n}"), Some(v.to_string())),
                None => (a.clone(), None),
            };
            if VALUED.contains(&name.as_str()) && val.is_none() {
                let v = it
                    .next()
                    .ok_or_else(|| Error::Usage(format!("{name} needs a value")))?;
                raw.flags.push((name, Some(v.clone())));
            } else {
                raw.flags.push((name, val));
            }
        } else if a.len() > 1 && a.starts_with('-') && !a.starts_with("--") {
            for ch in a[1..].chars() {
                raw.flags.push((format!("-{ch}"), None));
            }
        } else {
            raw.words.push(a.clone());
        }
    }
    Ok(raw)
}

/// Flags every daemon mode shares.
#[derive(Debug, Default)]
struct Common {
    daemon: bool,
    stop: bool,
    kill: bool,
    reload: bool,
    verbosity: i32,
    quiet: bool,
    ini: bool,
    version: bool,
    help: bool,
    sets: Vec<(String, String)>,
}

fn take_common(raw: &mut Raw) -> Result<Common> {
    let mut c = Common::default();
    let mut rest = Vec::new();
    for (f, v) in raw.flags.drain(..) {
        match f.as_str() {
            "-d" | "--daemon" => c.daemon = true,
            "-s" | "--stop" => c.stop = true,
            "-k" | "--kill" => c.kill = true,
            "-r" | "--reload" => c.reload = true,
            "-v" | "--verbose" => c.verbosity += 1,
            "-q" | "--quiet" => c.quiet = true,
            "--ini" => c.ini = true,
            "-V" | "--version" => c.version = true,
            "-h" | "--help" => c.help = true,
            "--set" => {
                let v = v.unwrap_or_default();
                let (k, val) = v
                    .split_once('=')
                    .ok_or_else(|| Error::Usage(format!("--set wants KEY=VALUE, got {v:?}")))?;
                c.sets.push((k.trim().to_string(), val.trim().to_string()));
            }
            _ => rest.push((f, v)),
        }
    }
    raw.flags = rest;
    Ok(c)
}

fn verbosity(c: &Common) -> Verbosity {
    if c.quiet {
        Verbosity::Quiet
    } else if c.verbosity >= 2 {
        Verbosity::Trace
    } else if c.verbosity == 1 {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    }
}

/// Entry point: returns the process exit code.
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().collect();
    let argv0 = args
        .first()
        .map(|a| {
            Path::new(a)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let rest = &args[1.min(args.len())..];
    let (name, res) = if argv0.starts_with("pgqd") {
        ("pgqd", run_pgqd(rest))
    } else if argv0.starts_with("londiste") && argv0 != "londiste-rs" {
        (
            if argv0.starts_with("londiste3") {
                "londiste3"
            } else {
                "londiste"
            },
            run_londiste(rest),
        )
    } else {
        match rest.first().map(String::as_str) {
            Some("ticker") | Some("pgqd") => ("londiste-rs", run_pgqd(&rest[1..])),
            Some("run") => ("londiste-rs", run_multi(&rest[1..])),
            Some("fleet") => ("londiste-rs", run_fleet(&rest[1..])),
            _ => ("londiste-rs", run_londiste(rest)),
        }
    };
    match res {
        Ok(()) | Err(Error::Stopped) => 0,
        Err(e) => {
            log::logger().flush();
            eprintln!("{name}: {e}");
            e.exit_code()
        }
    }
}

const PGQD_USAGE: &str =
    "usage: pgqd [-qvd] CONFIG.ini | pgqd -s|-k|-r CONFIG.ini | pgqd --ini | pgqd -V
  -d  run in the background (needs pidfile)   -s  stop (SIGINT)   -k  kill (SIGTERM)
  -r  reload config (SIGHUP)   -q  quiet   -v  verbose   --ini  print a sample config";

fn run_pgqd(args: &[String]) -> Result<()> {
    let mut raw = parse_raw(args)?;
    let c = take_common(&mut raw)?;
    if let Some((f, _)) = raw.flags.first() {
        return Err(Error::Usage(format!("unknown option {f}\n{PGQD_USAGE}")));
    }
    if c.version {
        println!("pgqd version 3.5 (londiste-rs {VERSION})");
        return Ok(());
    }
    if c.help {
        println!("{PGQD_USAGE}");
        return Ok(());
    }
    if c.ini {
        print!("{}", crate::samples::TICKER_INI);
        return Ok(());
    }
    let [file] = raw.words.as_slice() else {
        return Err(Error::Usage(format!("need one config file\n{PGQD_USAGE}")));
    };
    logging::init(verbosity(&c));
    let file = PathBuf::from(file);
    let load = {
        let file = file.clone();
        let sets = c.sets.clone();
        move || -> Result<TickerConfig> {
            let s = config::load_section(&file, &["pgqd"], &sets)?;
            TickerConfig::from_section(&s)
        }
    };
    if let Some(sig) = signal_flag(&c) {
        return signal(&[file], &c.sets, sig);
    }
    load()?;
    supervisor::run(supervisor::Jobs::Ticker(Box::new(load)), c.daemon, c.quiet)
}

/// -s, -k, -r: only the pidfile is needed. A config that no longer validates
/// (edited, about to be reloaded) must not stop the signal: its pidfile key is
/// read from the raw section, and the error is only reported if that fails too.
fn signal(files: &[PathBuf], sets: &[(String, String)], sig: Signal) -> Result<()> {
    let err = match supervisor::load_jobs(files, sets) {
        Ok(set) => return daemon::signal_pidfile(set.pidfile.as_deref(), sig),
        Err(e) => e,
    };
    for f in files {
        if let Ok(s) =
            config::load_section(f, &["londiste-rs", "pgqd", "londiste3", "londiste"], sets)
            && let Some(p) = s.path("pidfile")
        {
            log::warn!("{err}; signalling pidfile {} anyway", p.display());
            return daemon::signal_pidfile(Some(&p), sig);
        }
    }
    Err(err)
}

fn signal_flag(c: &Common) -> Option<Signal> {
    if c.stop {
        Some(Signal::SIGINT)
    } else if c.kill {
        Some(Signal::SIGTERM)
    } else if c.reload {
        Some(Signal::SIGHUP)
    } else {
        None
    }
}

const LONDISTE_USAGE: &str = "usage: londiste3 [options] CONFIG.ini COMMAND [args]

Node commands:
  create-root NAME [CONNSTR] [--nocheck]        make this database the root (source)
  create-branch NAME [CONNSTR] --provider=CONNSTR [--nocheck]
  create-leaf NAME [CONNSTR] --provider=CONNSTR [--nocheck]
  worker                                        run the replication worker
  status  members  node-info                    show the set
  pause  resume                                 stop/restart applying on this node
  wait-sync  wait-provider  wait-root           wait for copies or catch-up
Cut-over and cascade commands:
  takeover OLDNODE [--all] [--force] [--max-lag=S] [--seq-margin=N] [--wait-timeout=S] [--wait-go] [--abort]
                                                make this node the root (switchover; old root follows it)
  takeover OLDNODE --dead-root                  failover: the old root is gone
  change-provider --provider=NODE               read from another node
  drop-node NODE  tag-dead NODE...  tag-alive NODE...
  resurrect                                     (on a failed-over old root) save lost events, rejoin
Table and sequence commands:
  add-table TABLE... | --all  [--create] [--expect-sync] [--skip-truncate]
            [--dest-table=NAME] [--dest-schema=NAME] [--merge-all | --no-merge]
            [--copy-node=NODE] [--no-triggers] [--wait-sync] [--skip-non-existing] [--key=COL,...] [--no-sequences] [--force]
  remove-table TABLE... | --all      resync TABLE... | --all
  add-seq SEQ... | --all [--create]  remove-seq SEQ...
  tables [--names-only]  seqs  missing
Schema changes:
  execute FILE...                               (on the root) run SQL files here and on every node, in queue order
Checks:
  check [TABLE...]                              pre-flight: what would break a copy or cut-over (exit 1)
  fkeys [TABLE...]                              foreign keys dropped for copies: waiting and restored
  compare [TABLE...] [--count-only]             row count and checksum, provider vs this node
  repair [TABLE...] [--apply]                   print (and with --apply run) the SQL that fixes this node
Options:
  -d daemon  -s stop  -k kill  -r reload  -q quiet  -v verbose  --ini sample config
  --set KEY=VALUE  -V version

londiste-rs run FILE.ini...   runs several jobs (ticker and workers) in one process.
londiste-rs fleet CONNSTR | JOB.ini...   every queue a target database subscribes to: lag, tables, errors.
See man londiste-rs.";

fn run_londiste(args: &[String]) -> Result<()> {
    let mut raw = parse_raw(args)?;
    let c = take_common(&mut raw)?;
    if c.version {
        println!("londiste version 3.12 (londiste-rs {VERSION})");
        return Ok(());
    }
    if c.help {
        println!("{LONDISTE_USAGE}");
        return Ok(());
    }
    if c.ini {
        print!("{}", crate::samples::WORKER_INI);
        return Ok(());
    }
    if raw.words.is_empty() {
        return Err(Error::Usage(
            "need config file, use --help for help.".into(),
        ));
    }
    let file = PathBuf::from(&raw.words[0]);
    let cmd = raw.words.get(1).cloned();
    let args: Vec<String> = raw.words.iter().skip(2).cloned().collect();
    logging::init(verbosity(&c));
    let sets = c.sets.clone();
    let load = {
        let file = file.clone();
        move || -> Result<WorkerConfig> {
            let s = config::load_section(&file, &["londiste3", "londiste", "londiste-rs"], &sets)?;
            WorkerConfig::from_section(&s)
        }
    };
    if let Some(sig) = signal_flag(&c) {
        return signal(std::slice::from_ref(&file), &c.sets, sig);
    }
    let cfg = load()?;
    let Some(cmd) = cmd else {
        return Err(Error::Usage(format!(
            "need a command after the config file\n{LONDISTE_USAGE}"
        )));
    };
    let given: Vec<String> = raw.flags.iter().map(|(f, _)| f.clone()).collect();
    let opts = take_opts(&mut raw)?;
    if let Some((f, _)) = raw.flags.first() {
        return Err(Error::Usage(format!(
            "unknown option {f} for {cmd}; see --help"
        )));
    }
    check_flags_apply(&cmd, &given, c.daemon)?;
    let name1 = args.first().map(String::as_str);
    let name2 = args.get(1).map(String::as_str);
    match cmd.as_str() {
        "worker" | "replay" => {
            supervisor::run(supervisor::Jobs::Worker(Box::new(load)), c.daemon, c.quiet)
        }
        "create-root" => nodes::create_root(&cfg, name1, name2, &opts),
        "create-branch" => nodes::create_subscriber(&cfg, "branch", name1, name2, &opts),
        "create-leaf" => nodes::create_subscriber(&cfg, "leaf", name1, name2, &opts),
        "add-table" => tables::add_table(&cfg, &args, &opts),
        "remove-table" => tables::remove_table(&cfg, &args, &opts),
        "resync" => tables::resync(&cfg, &args, &opts),
        "add-seq" => seqs::add_seq(&cfg, &args, &opts),
        "remove-seq" => seqs::remove_seq(&cfg, &args, &opts),
        "tables" => tables::tables(&cfg, &opts),
        "seqs" => seqs::seqs(&cfg),
        "missing" => tables::show_missing(&cfg),
        "members" => nodes::members(&cfg),
        "node-info" => nodes::node_info(&cfg),
        "status" => status::status(&cfg),
        "pause" => nodes::pause(&cfg, true),
        "resume" => nodes::pause(&cfg, false),
        "wait-sync" => nodes::wait_sync(&cfg),
        "wait-provider" => nodes::wait_upstream(&cfg, false),
        "wait-root" => nodes::wait_upstream(&cfg, true),
        "takeover" => takeover::takeover(&cfg, &args, &opts),
        "change-provider" => cascade::change_provider(&cfg, &opts),
        "drop-node" => cascade::drop_node(&cfg, &args),
        "tag-dead" => cascade::tag_nodes(&cfg, &args, true),
        "tag-alive" => cascade::tag_nodes(&cfg, &args, false),
        "resurrect" => resurrect::resurrect(&cfg, &opts),
        "execute" => execute::execute(&cfg, &args),
        "compare" => compare::compare(&cfg, &args, &opts),
        "check" => check::check(&cfg, &args, c.quiet),
        "fkeys" => fkeys::fkeys(&cfg, &args),
        "repair" => repair::repair(&cfg, &args, &opts, opts.apply),
        "install" => {
            let mut cl = crate::db::connect(&cfg.db, "londiste-rs admin")?;
            crate::queue::install::install_all(&mut cl)?;
            // The permission model's roles: say what is missing and how to fix it.
            for line in crate::queue::install::missing_grants(&mut cl)? {
                log::warn!("{line}");
            }
            log::info!("Done");
            Ok(())
        }
        other => Err(Error::Usage(format!(
            "unknown command {other:?}; see --help for the list"
        ))),
    }
}

fn take_opts(raw: &mut Raw) -> Result<Opts> {
    let mut o = Opts::default();
    let mut rest = Vec::new();
    for (f, v) in raw.flags.drain(..) {
        match f.as_str() {
            "--provider" => o.provider = v,
            "--all" => o.all = true,
            "--expect-sync" => o.expect_sync = true,
            "--skip-truncate" => o.skip_truncate = true,
            "--no-triggers" => o.no_triggers = true,
            "--wait-sync" => o.wait_sync = true,
            "--skip-non-existing" => o.skip_non_existing = true,
            "--create" => o.create = true,
            "--create-full" => o.create_full = true,
            "--dest-table" => o.dest_table = v,
            "--dest-schema" => {
                o.dest_schema = Some(
                    v.filter(|x| !x.is_empty())
                        .ok_or_else(|| Error::Usage("--dest-schema wants a schema name".into()))?,
                )
            }
            "--merge-all" => o.merge_all = true,
            "--no-merge" => o.no_merge = true,
            "--copy-node" => o.copy_node = v,
            "--names-only" => o.names_only = true,
            "--count-only" => o.count_only = true,
            "--apply" => o.apply = true,
            "--no-sequences" => o.no_seqs = true,
            "--dead-root" => o.dead_root = true,
            "--dead-branch" => o.dead_branch = true,
            "--force" => o.force = true,
            "--nocheck" => o.nocheck = true,
            "--abort" => o.abort = true,
            "--wait-go" => o.wait_go = true,
            "--file" => o.file = v,
            "--max-lag" => o.max_lag = seconds_flag("--max-lag", v)?,
            "--wait-timeout" => o.wait_timeout = seconds_flag("--wait-timeout", v)?,
            "--seq-margin" => {
                o.seq_margin = v
                    .as_deref()
                    .and_then(|x| x.parse().ok())
                    .filter(|x: &i64| *x >= 0)
                    .ok_or_else(|| Error::Usage("--seq-margin wants a number >= 0".into()))?
            }
            "--key" => {
                let keys: Vec<String> = v
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if keys.is_empty() {
                    return Err(Error::Usage("--key wants COL[,COL...]".into()));
                }
                o.keys = Some(keys);
            }
            // Skytools' --find-copy-node is what add-table always does (the
            // copy source is found automatically).
            "--find-copy-node" => {}
            "--compact" => {
                return Err(Error::Usage(
                    "--compact: status has one format; run status without it".into(),
                ));
            }
            _ => rest.push((f, v)),
        }
    }
    raw.flags = rest;
    if o.merge_all && o.no_merge {
        return Err(Error::Usage(
            "--merge-all and --no-merge exclude each other: --merge-all adds the table for every queue of this database, --no-merge for this queue only".into(),
        ));
    }
    Ok(o)
}

/// The options each command acts on. One given to a command that does not
/// use it is refused: accepted and ignored would be a lie.
const FLAGS_OF: &[(&str, &[&str])] = &[
    (
        "add-table",
        &[
            "--all",
            "--expect-sync",
            "--skip-truncate",
            "--no-triggers",
            "--wait-sync",
            "--skip-non-existing",
            "--create",
            "--create-full",
            "--dest-table",
            "--copy-node",
            "--key",
            "--no-sequences",
            "--find-copy-node",
            "--force",
            "--merge-all",
            "--no-merge",
            "--dest-schema",
        ],
    ),
    ("remove-table", &["--all"]),
    ("resync", &["--all"]),
    (
        "add-seq",
        &["--all", "--create", "--create-full", "--skip-non-existing"],
    ),
    ("remove-seq", &["--all"]),
    ("tables", &["--names-only"]),
    ("create-root", &["--nocheck"]),
    ("create-branch", &["--provider", "--nocheck"]),
    ("create-leaf", &["--provider", "--nocheck"]),
    ("change-provider", &["--provider"]),
    (
        "takeover",
        &[
            "--all",
            "--dead-root",
            "--dead-branch",
            "--force",
            "--abort",
            "--wait-go",
            "--max-lag",
            "--wait-timeout",
            "--seq-margin",
        ],
    ),
    ("resurrect", &["--file"]),
    // Skytools' --force on compare and repair ignores the lag; these always
    // work at one tick whatever the lag, so it changes nothing by design.
    ("compare", &["--count-only", "--force"]),
    ("repair", &["--apply", "--force"]),
];

fn check_flags_apply(cmd: &str, given: &[String], daemon: bool) -> Result<()> {
    if daemon && !matches!(cmd, "worker" | "replay") {
        return Err(Error::Usage(format!(
            "-d: only the worker runs in the background; run {cmd} without -d"
        )));
    }
    let allowed = FLAGS_OF
        .iter()
        .find(|(c, _)| *c == cmd)
        .map(|(_, f)| *f)
        .unwrap_or(&[]);
    match given.iter().find(|f| !allowed.contains(&f.as_str())) {
        Some(f) => Err(Error::Usage(format!(
            "{f} does not apply to {cmd}; see --help for the options of each command"
        ))),
        None => Ok(()),
    }
}

fn seconds_flag(flag: &str, v: Option<String>) -> Result<std::time::Duration> {
    v.as_deref()
        .and_then(|x| x.parse::<f64>().ok())
        .filter(|x| x.is_finite() && *x >= 0.0)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| Error::Usage(format!("{flag} wants seconds, e.g. {flag}=10")))
}

/// `londiste-rs fleet CONNSTR | JOB.ini...`: the consolidation's one place to look.
fn run_fleet(args: &[String]) -> Result<()> {
    let mut raw = parse_raw(args)?;
    let c = take_common(&mut raw)?;
    if let Some((f, _)) = raw.flags.first() {
        return Err(Error::Usage(format!("unknown option {f} for fleet")));
    }
    if raw.words.is_empty() {
        return Err(Error::Usage(
            "usage: londiste-rs fleet CONNSTR | JOB.ini... (a target database, or the job files of one process)".into(),
        ));
    }
    logging::init(verbosity(&c));
    crate::commands::fleet::fleet(&raw.words, &c.sets)
}

/// `londiste-rs run FILE...`: several jobs in one process.
fn run_multi(args: &[String]) -> Result<()> {
    let mut raw = parse_raw(args)?;
    let c = take_common(&mut raw)?;
    if let Some((f, _)) = raw.flags.first() {
        return Err(Error::Usage(format!("unknown option {f} for run")));
    }
    if raw.words.is_empty() {
        return Err(Error::Usage("usage: londiste-rs run [-d] [-q] [-v] JOB.ini... (each file a [pgqd] or [londiste3] job)".into()));
    }
    logging::init(verbosity(&c));
    let files: Vec<PathBuf> = raw.words.iter().map(PathBuf::from).collect();
    let sets = c.sets.clone();
    if let Some(sig) = signal_flag(&c) {
        return signal(&files, &c.sets, sig);
    }
    let load = move || supervisor::load_jobs(&files, &sets);
    load()?;
    supervisor::run(supervisor::Jobs::Multi(Box::new(load)), c.daemon, c.quiet)
}
