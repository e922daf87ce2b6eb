//! The `londiste3` mode's commands, one module per family of the man page:
//! `nodes` (create-root/branch/leaf, members, node-info, pause, wait-*),
//! `tables` (add-table, remove-table, resync, tables, missing), `seqs`,
//! `status`, `compare` and `repair`, `check` (pre-flight) and `fkeys`. Every command is safe to run twice: a
//! repeat says so and exits 0. This file holds what they share: the options and
//! the connections to this node and to others.

pub mod branch;
pub mod cascade;
pub mod check;
pub mod compare;
mod consolidate;
pub mod execute;
pub mod fkeys;
pub mod fleet;
pub mod nodes;
mod ready;
pub mod repair;
pub mod resurrect;
pub mod seqs;
pub mod status;
pub mod tables;
pub mod takeover;

use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::names::{fq_name, glob_match, split_qualified};
use postgres::Client;

/// Options of the table and node commands (parsed in cli.rs).
#[derive(Debug, Clone)]
pub struct Opts {
    pub provider: Option<String>,
    pub all: bool,
    pub expect_sync: bool,
    pub skip_truncate: bool,
    pub no_triggers: bool,
    pub wait_sync: bool,
    pub skip_non_existing: bool,
    pub create: bool,
    pub create_full: bool,
    pub dest_table: Option<String>,
    /// add-table: the schema here for the source's tables (else `dest_schema`).
    pub dest_schema: Option<String>,
    /// add-table: a merged table, for every queue of this database that has it.
    pub merge_all: bool,
    /// add-table: a merged table, this queue's part only.
    pub no_merge: bool,
    pub copy_node: Option<String>,
    pub keys: Option<Vec<String>>,
    pub names_only: bool,
    pub count_only: bool,
    pub apply: bool,
    /// add-table: do not register the sequences the table's columns own.
    pub no_seqs: bool,
    /// create-*: skip the check that the public connect string reaches this database.
    pub nocheck: bool,
    // takeover
    pub dead_root: bool,
    pub dead_branch: bool,
    pub force: bool,
    pub abort: bool,
    pub max_lag: std::time::Duration,
    pub wait_timeout: std::time::Duration,
    pub seq_margin: i64,
    /// takeover: after the checks, wait for "go" on stdin before fencing.
    pub wait_go: bool,
    /// resurrect: where the lost events go.
    pub file: Option<String>,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            provider: None,
            all: false,
            expect_sync: false,
            skip_truncate: false,
            no_triggers: false,
            wait_sync: false,
            skip_non_existing: false,
            create: false,
            create_full: false,
            dest_table: None,
            dest_schema: None,
            merge_all: false,
            no_merge: false,
            copy_node: None,
            keys: None,
            names_only: false,
            count_only: false,
            apply: false,
            no_seqs: false,
            nocheck: false,
            dead_root: false,
            dead_branch: false,
            force: false,
            abort: false,
            max_lag: std::time::Duration::from_secs(10),
            wait_timeout: std::time::Duration::from_secs(60),
            seq_margin: 1000,
            wait_go: false,
            file: None,
        }
    }
}

fn connect_local(cfg: &WorkerConfig) -> Result<Client> {
    let mut c = db::connect(&cfg.db, "londiste-rs admin")?;
    crate::queue::install::upgrade_if_installed(&mut c)?;
    Ok(c)
}

fn remote(cfg: &WorkerConfig, loc: &str) -> Result<Client> {
    db::connect(
        &db::with_extra(loc, &cfg.remote_extra_connstr),
        "londiste-rs admin",
    )
}

/// Turns command-line names and globs into canonical table names from `pool`.
fn resolve(args: &[String], pool: &[String], opts: &Opts, what: &str) -> Result<Vec<String>> {
    if opts.all {
        return Ok(pool.to_vec());
    }
    if args.is_empty() {
        return Err(Error::Usage(format!(
            "name the {what}s to use, or give --all"
        )));
    }
    let mut out = Vec::new();
    for a in args {
        if a.contains('*') || a.contains('?') {
            let pat = if a.contains('.') {
                a.clone()
            } else {
                format!("public.{a}")
            };
            let hits: Vec<&String> = pool.iter().filter(|t| glob_match(&pat, t)).collect();
            if hits.is_empty() {
                log::warn!("no {what} matches {a}");
            }
            out.extend(hits.into_iter().cloned());
        } else {
            let (s, t) = split_qualified(a)?;
            out.push(fq_name(&s, &t));
        }
    }
    out.dedup();
    Ok(out)
}

/// Table names as given on the command line, in the canonical stored form.
pub fn canonical_names(args: &[String]) -> Result<Vec<String>> {
    args.iter()
        .map(|a| split_qualified(a).map(|(s, t)| fq_name(&s, &t)))
        .collect()
}

/// Is `name` a sequence here? An error if it names something else.
fn seq_exists(c: &mut Client, name: &str) -> Result<bool> {
    let kind: Option<String> = c
        .query_one(
            "SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1))",
            &[&name],
        )
        .ctx(|| format!("cannot look up {name}"))?
        .get(0);
    match kind.as_deref() {
        None => Ok(false),
        Some("S") => Ok(true),
        Some(_) => Err(Error::Other(format!(
            "{name} is not a sequence: add tables with add-table"
        ))),
    }
}

fn table_exists(c: &mut Client, name: &str) -> Result<bool> {
    let r = c
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .ctx(|| format!("cannot look up {name}"))?;
    Ok(r.get(0))
}
