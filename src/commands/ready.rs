//! The checklist a switchover enforces before it fences anything: every table
//! of the old root in sync here, this node's worker running and current, the
//! lag within bounds, the sequences the tables use replicated. Each problem is
//! one line naming the fix; `takeover` refuses while there is any (unless
//! `--force`).

use super::Opts;
use crate::config::WorkerConfig;
use crate::error::{Context, Result};
use crate::replication::node::{self, NodeInfo};
use postgres::Client;
use std::collections::HashMap;

pub fn check(
    cfg: &WorkerConfig,
    opts: &Opts,
    me_c: &mut Client,
    me: &NodeInfo,
    old_c: &mut Client,
    old: &NodeInfo,
) -> Result<Vec<String>> {
    let q = &cfg.queue_name;
    let me_ini = cfg.command_hint();
    let mut out = Vec::new();

    // Does this node replicate from the old root at all?
    let chain = super::nodes::provider_chain(cfg, me)?;
    if !chain.contains(&old.node_name) {
        out.push(format!(
            "{} does not replicate from {} (its providers: {}): a takeover needs a node below the root",
            me.node_name,
            old.node_name,
            if chain.is_empty() {
                "none".into()
            } else {
                chain.join(" <- ")
            }
        ));
    }

    // Tables.
    let mine: HashMap<String, node::TableState> = node::tables(me_c, q)?
        .into_iter()
        .map(|t| (t.table_name.clone(), t))
        .collect();
    for t in node::tables(old_c, q)?.into_iter().filter(|t| t.local) {
        let name = &t.table_name;
        match mine.get(name) {
            None => out.push(format!(
                "table {name} is not replicated to this node: {me_ini} add-table {name}"
            )),
            Some(m) if !m.local => out.push(format!(
                "table {name} is registered but not added here: {me_ini} add-table {name}"
            )),
            Some(m) if m.merge_state.as_deref() != Some("ok") => out.push(format!(
                "table {name} is not in sync ({}): wait for it with {me_ini} wait-sync",
                m.merge_state.as_deref().unwrap_or("waiting for its copy")
            )),
            Some(m) if m.dest_table.is_some() => out.push(format!(
                "table {name} is replicated into {} here (--dest-table): this node cannot become its source under another name",
                m.dest_table.as_deref().unwrap_or("")
            )),
            Some(_) => {}
        }
    }

    // The worker.
    let r = me_c
        .query_one(
            "SELECT paused, cur_error, extract(epoch FROM now() - worker_seen)::float8 FROM londiste.node_info WHERE queue_name = $1",
            &[q],
        )
        .ctx(|| "cannot read this node's worker state".into())?;
    let (paused, err, seen): (bool, Option<String>, Option<f64>) = (r.get(0), r.get(1), r.get(2));
    if paused {
        out.push(format!(
            "the worker of this node is paused: {me_ini} resume"
        ));
    }
    if let Some(e) = err {
        out.push(format!(
            "the worker of this node reports an error: {e} (see {me_ini} status)"
        ));
    }
    let stale = (3.0 * cfg.loop_delay).max(10.0);
    match seen {
        Some(s) if s <= stale => {}
        Some(s) => out.push(format!(
            "the worker of this node is not running (last seen {s:.0} s ago): start it with {}",
            start_hint(cfg)
        )),
        None => out.push(format!(
            "the worker of this node has never run: start it with {}",
            start_hint(cfg)
        )),
    }

    // Lag: how far behind the old root's newest tick this node's position is.
    let r = old_c
        .query_one(
            "SELECT max(t.tick_id), extract(epoch FROM now() - (SELECT t2.tick_time FROM pgq.tick t2 WHERE t2.tick_queue = q.queue_id AND t2.tick_id = $2))::float8
               FROM pgq.tick t JOIN pgq.queue q ON q.queue_id = t.tick_queue WHERE q.queue_name = $1 GROUP BY q.queue_id",
            &[q, &me.last_tick_id],
        )
        .ctx(|| "cannot read the old root's ticks".into())?;
    let (newest, age): (Option<i64>, Option<f64>) = (r.get(0), r.get(1));
    if newest != me.last_tick_id {
        match age {
            Some(a) if a <= opts.max_lag.as_secs_f64() => {}
            Some(a) => out.push(format!(
                "this node is {a:.1} s behind {} (bound {:?}, --max-lag): let it catch up (wait-provider)",
                old.node_name, opts.max_lag
            )),
            None => out.push(format!(
                "this node's position (tick {:?}) is no longer on {}: it is far behind",
                me.last_tick_id, old.node_name
            )),
        }
    }

    // Sequences the replicated tables use.
    let rows = old_c
        .query(
            "SELECT DISTINCT t, s, EXISTS (SELECT 1 FROM londiste.seq_info si WHERE si.queue_name = $1 AND si.seq_name = s AND si.local)
               FROM londiste._local_tables($1) t, londiste.owned_sequences(t::regclass) s ORDER BY 1, 2",
            &[q],
        )
        .ctx(|| "cannot read the sequences of the old root's tables".into())?;
    for r in rows {
        let (t, s, replicated): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        if !replicated {
            out.push(format!(
                "sequence {s} (used by {t}) is not replicated: add it on both nodes (add-seq {s}); \
                 takeover sets it anyway, but until then the replica's value lags"
            ));
        }
    }
    let rows = old_c
        .query("SELECT seq_name FROM londiste.seq_values($1)", &[q])
        .ctx(|| "cannot read the old root's sequences".into())?;
    for r in rows {
        let s: String = r.get(0);
        let here: bool = me_c
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&s])
            .ctx(|| format!("cannot look up {s}"))?
            .get(0);
        if !here {
            out.push(format!(
                "sequence {s} does not exist on this node: create it (add-seq {s} --create)"
            ));
        }
    }
    Ok(out)
}

fn start_hint(cfg: &WorkerConfig) -> String {
    let h = cfg.command_hint();
    match h.split_once(' ') {
        Some((prog, file)) => format!("{prog} -d {file} worker"),
        None => format!("{h} worker"),
    }
}
