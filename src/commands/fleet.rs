//! `londiste-rs fleet CONNSTR | JOB.ini...`: one view of a consolidation, every
//! queue a target database subscribes to (from its `londiste.node_info` and
//! `table_info`), each with its provider, lag, table states and last error. Given
//! job files, the target databases are the ones their `db` keys name.
//!
//! Each provider is asked for the time of the tick the node is at (that is the
//! lag); one that cannot be reached is reported on its queue's line and the
//! others are still shown. Exit status 0 when every queue is in sync and without
//! error, else 1 after printing everything.

use crate::config::{self, WorkerConfig};
use crate::db;
use crate::error::{Context, Error, Result};
use crate::replication::node;
use postgres::Client;
use std::path::Path;

pub fn fleet(words: &[String], sets: &[(String, String)]) -> Result<()> {
    // (target connstr, remote_extra_connstr); job files of tickers are skipped.
    let mut targets: Vec<(String, String)> = Vec::new();
    for w in words {
        let is_file = w.ends_with(".ini") || Path::new(w).is_file();
        let t = if is_file {
            let s = match config::load_section(
                Path::new(w),
                &["londiste3", "londiste", "londiste-rs"],
                sets,
            ) {
                Ok(s) => s,
                Err(_) if config::load_section(Path::new(w), &["pgqd"], sets).is_ok() => {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let cfg = WorkerConfig::from_section(&s)?;
            (cfg.db, cfg.remote_extra_connstr)
        } else {
            (w.clone(), String::new())
        };
        if !targets.iter().any(|x| x.0 == t.0) {
            targets.push(t);
        }
    }
    let mut bad = 0;
    let mut total = 0;
    for (loc, extra) in &targets {
        println!("target {}", db::describe(loc));
        let mut c = match db::connect(loc, "londiste-rs fleet") {
            Ok(c) => c,
            Err(e) => {
                println!("  UNREACHABLE: {e}");
                bad += 1;
                continue;
            }
        };
        let (t, b) = one_target(&mut c, extra)?;
        total += t;
        bad += b;
    }
    println!(
        "{total} queue(s), {} in sync without errors",
        total - bad.min(total)
    );
    if bad > 0 {
        return Err(Error::Other(format!(
            "{bad} queue(s) or target(s) need attention (see above)"
        )));
    }
    Ok(())
}

/// Prints the queues of one target database: (queues, queues needing attention).
fn one_target(c: &mut Client, extra: &str) -> Result<(usize, usize)> {
    let has: bool = c
        .query_one("SELECT to_regclass('londiste.node_info') IS NOT NULL", &[])
        .ctx(|| "cannot look for the londiste schema".into())?
        .get(0);
    if !has {
        println!("  no londiste schema here: not a node of any queue");
        return Ok((0, 0));
    }
    let queues: Vec<String> = c
        .query(
            "SELECT queue_name FROM londiste.node_info WHERE node_type <> 'root' ORDER BY 1",
            &[],
        )
        .ctx(|| "cannot read londiste.node_info".into())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut bad = 0;
    for q in &queues {
        let Some(n) = node::load(c, q)? else { continue };
        let seen: Option<f64> = c
            .query_one(
                "SELECT extract(epoch FROM now() - worker_seen)::float8 FROM londiste.node_info WHERE queue_name = $1",
                &[q],
            )
            .ctx(|| "cannot read node_info".into())?
            .get(0);
        println!(
            "  queue {q}: node {} ({}), provider {}",
            n.node_name,
            n.node_type,
            n.provider_node.as_deref().unwrap_or("-")
        );
        let tick = n.last_tick_id.unwrap_or(0);
        let mut trouble = false;
        let ploc = n.provider_location.clone().unwrap_or_default();
        match provider_lag(&ploc, extra, q, tick) {
            Ok((lag, newest)) => {
                let behind = newest.map(|x| x - tick).unwrap_or(0);
                println!(
                    "    Lag: {}, Tick: {tick}{}",
                    lag.map(|l| format!("{l:.1}s")).unwrap_or("?".into()),
                    if behind > 0 {
                        format!(" ({behind} ticks behind)")
                    } else {
                        String::new()
                    }
                );
            }
            Err(e) => {
                trouble = true;
                println!("    PROVIDER UNREACHABLE: {e}");
            }
        }
        if seen.is_none_or(|s| s > 60.0) {
            trouble = true;
            println!("    NOT RUNNING? worker not seen for over a minute");
        }
        if n.paused {
            trouble = true;
            println!("    PAUSED");
        }
        if let Some(e) = &n.cur_error {
            trouble = true;
            println!("    ERR: {e}");
        }
        let tables = node::tables(c, q)?;
        let ok = tables
            .iter()
            .filter(|t| t.local && t.merge_state.as_deref() == Some("ok"))
            .count();
        let merged = tables.iter().filter(|t| t.merged).count();
        println!(
            "    Tables: {ok} ok of {}{}",
            tables.iter().filter(|t| t.local).count(),
            if merged > 0 {
                format!(", {merged} merged")
            } else {
                String::new()
            }
        );
        for t in tables
            .iter()
            .filter(|t| t.local && t.merge_state.as_deref() != Some("ok"))
        {
            trouble = true;
            let name = match &t.dest_table {
                Some(d) => format!("{} -> {d}", t.table_name),
                None => t.table_name.clone(),
            };
            println!("      {name}: {}", super::tables::human_state(t));
        }
        if trouble {
            bad += 1;
        }
    }
    if queues.is_empty() {
        println!("  subscribes to no queue");
    }
    Ok((queues.len(), bad))
}

/// Seconds since the provider made the tick the node is at, and its newest tick.
fn provider_lag(loc: &str, extra: &str, q: &str, tick: i64) -> Result<(Option<f64>, Option<i64>)> {
    let mut p = db::connect(&db::with_extra(loc, extra), "londiste-rs fleet")?;
    let r = p
        .query_one(
            "SELECT (SELECT extract(epoch FROM now() - t.tick_time)::float8 FROM pgq.tick t
                      WHERE t.tick_queue = q.queue_id AND t.tick_id = $2),
                    (SELECT max(t.tick_id) FROM pgq.tick t WHERE t.tick_queue = q.queue_id)
               FROM pgq.queue q WHERE q.queue_name = $1",
            &[&q, &tick],
        )
        .ctx(|| format!("cannot read the ticks of queue {q} on the provider"))?;
    Ok((r.get(0), r.get(1)))
}
