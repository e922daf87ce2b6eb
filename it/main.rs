//! Integration tests: the real `londiste-rs` binary against real PostgreSQL
//! clusters (see `harness.rs`). Each module below is one commented scenario;
//! tests share one cluster per binary and create their own databases with
//! `harness::unique_name`, so they can run in parallel.
//!
//! Run with `cargo test --release -- --test-threads=4`; set
//! `LONDISTE_TEST_KEEP=1` to keep every cluster and test directory.

mod harness;

mod harness_smoke;

mod badinput;
mod bouncer;
mod check;
mod connect;
mod consolidate;
mod crash;
mod cutover;
mod daemon;
mod execute;
mod fkeys;
mod flags;
mod options;
mod partitioned;
mod pgq;
mod pgq_grants;
mod pgq_producers;
mod random;
mod reload;
mod repair;
mod repl;
mod seqs;
mod size;
mod tutorial;
mod versions;
