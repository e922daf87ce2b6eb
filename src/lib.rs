//! londiste-rs: trigger-based, table-granular asynchronous replication for
//! PostgreSQL, a Rust Londiste 3 and pgqd. See `man londiste-rs`.
//!
//! Modules by role: `cli` (command line), `config`, `supervisor` (process, threads,
//! reload), `daemon` (pidfile, fork, -s/-k/-r), `signals`, `logging`, `ticker`
//! (pgqd mode), `worker` (root/branch/leaf), `copy` (initial copy and merge),
//! `apply` (set-based apply), `admin`, `status` and `repair` (commands), `install` and
//! `sql/` (the SQL layer), `record` (text formats), `db`, `error`.

pub mod admin;
pub mod apply;
pub mod cli;
pub mod config;
pub mod copy;
pub mod daemon;
pub mod db;
pub mod error;
pub mod install;
pub mod logging;
pub mod node;
pub mod record;
pub mod repair;
pub mod samples;
pub mod signals;
pub mod status;
pub mod supervisor;
pub mod thread;
pub mod ticker;
pub mod worker;
