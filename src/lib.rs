//! londiste-rs: trigger-based, table-granular asynchronous replication for
//! PostgreSQL, a Rust Londiste 3 and pgqd. See `man londiste-rs`.
//!
//! The layers, top to bottom (imports only run downward):
//! - `cli`: the command line, parsed and dispatched;
//! - `commands`: one module per command family of the man page (nodes, tables,
//!   sequences, status, compare, repair);
//! - `replication`: the worker, the initial copy, batches, the set-based apply,
//!   node state and the text formats of events;
//! - `queue`: the ticker (pgqd mode), the installer of the SQL in `sql/`, and the
//!   queue operations commands need;
//! - beside them, `process` (supervisor, daemon, signals, logging, threads) and
//!   the shared ground: `db`, `config`, `error`, `names`, `version` (the supported
//!   servers and where they differ).

pub mod cli;
pub mod commands;
pub mod config;
pub mod db;
pub mod error;
pub mod names;
pub mod process;
pub mod queue;
pub mod replication;
pub mod samples;
pub mod version;
