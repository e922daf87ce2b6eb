//! `resurrect`: an old root that was failed over (`takeover --dead-root`) comes
//! back. Run with its own config. It fences itself first (writes refused, its
//! last tick taken), writes the events it captured after the tick the new root
//! started from (the transactions the failover lost) to a file of one JSON
//! object per line, then becomes a branch of the new root from that tick. If
//! there were lost events its tables hold changes the new root lacks, so they
//! are copied again from the new root: the node converges to the new root.

use super::cascade::{members, tag, unregister};
use super::takeover::gravestone_consumer;
use super::{Opts, connect_local, remote};
use crate::config::WorkerConfig;
use crate::error::{Context, Error, Result};
use crate::replication::node;
use std::collections::BTreeMap;
use std::io::Write;

pub fn resurrect(cfg: &WorkerConfig, opts: &Opts) -> Result<()> {
    let q = cfg.queue_name.clone();
    let mut c = connect_local(cfg)?;
    let me = node::require(&mut c, &q, &cfg.command_hint())?;
    if !me.is_root() {
        log::info!(
            "{} is a {} (provider {}): nothing to resurrect",
            me.node_name,
            me.node_type,
            me.provider_node.as_deref().unwrap_or("none")
        );
        return Ok(());
    }
    // Who took over? A live member that is root and knows this node as dead.
    let mut found = None;
    for m in members(&mut c, &q)?
        .into_iter()
        .filter(|m| m.name != me.node_name)
    {
        let Ok(mut r) = remote(cfg, &m.location) else {
            log::warn!("{} does not answer; skipped", m.name);
            continue;
        };
        let Ok(Some(n)) = node::load(&mut r, &q) else {
            continue;
        };
        if !n.is_root() {
            continue;
        }
        let tick: Option<i64> = r
            .query_opt(
                "SELECT failover_tick FROM londiste.node_location WHERE queue_name = $1 AND node_name = $2 AND dead",
                &[&q, &me.node_name],
            )
            .ctx(|| format!("cannot read the members of {}", n.node_name))?
            .and_then(|row| row.get(0));
        if let Some(t) = tick {
            found = Some((n, r, t));
            break;
        }
    }
    let Some((root, mut rc, start)) = found else {
        return Err(Error::Other(format!(
            "no other root of queue {q:?} has {} tagged dead: it was not failed over, nothing to resurrect",
            me.node_name
        )));
    };
    log::info!(
        "{} took over at tick {start}; fencing {} and collecting what it has after that tick",
        root.node_name,
        me.node_name
    );
    let mut tx = c.transaction().ctx(|| "cannot begin".into())?;
    let last: i64 = tx
        .query_one(
            "SELECT londiste.fence_root($1, $2, '10s')",
            &[&q, &root.node_name],
        )
        .ctx(|| "cannot fence this node".into())?
        .get(0);
    tx.commit().ctx(|| "cannot commit the fence".into())?;
    // The lost events: batches of this queue from the start tick to the last.
    let reader = format!(".{}.resurrect", me.node_name);
    let has_start: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pgq.tick t JOIN pgq.queue q ON q.queue_id = t.tick_queue
                             WHERE q.queue_name = $1 AND t.tick_id = $2)",
            &[&q, &start],
        )
        .ctx(|| "cannot read the ticks".into())?
        .get(0);
    let path = opts
        .file
        .clone()
        .unwrap_or_else(|| "resurrect-lost-events.json".into());
    let mut out = std::fs::File::create(&path).ctx(|| format!("cannot create {path}"))?;
    let mut lost = 0u64;
    let mut per_table: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    if has_start && last > start {
        c.query_one(
            "SELECT pgq.register_consumer_at($1, $2, $3)",
            &[&q, &reader, &start],
        )
        .ctx(|| "cannot register the reader of lost events".into())?;
        loop {
            let b: Option<i64> = c
                .query_one("SELECT pgq.next_batch($1, $2)", &[&q, &reader])
                .ctx(|| "cannot read the next batch".into())?
                .get(0);
            let Some(b) = b else { break };
            let rows = c
                .query(
                    "SELECT ev_id, ev_time::text, ev_txid, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4
                       FROM pgq.get_batch_events($1) ORDER BY ev_id",
                    &[&b],
                )
                .ctx(|| format!("cannot read batch {b}"))?;
            for r in &rows {
                let ev_type: String = r.get(3);
                let table: Option<String> = r.get(5);
                let line = format!(
                    "{{\"ev_id\":{},\"ev_time\":{},\"ev_txid\":{},\"ev_type\":{},\"ev_data\":{},\"ev_extra1\":{},\"ev_extra2\":{},\"ev_extra3\":{},\"ev_extra4\":{}}}\n",
                    r.get::<_, i64>(0),
                    json(Some(r.get::<_, String>(1).as_str())),
                    r.get::<_, i64>(2),
                    json(Some(&ev_type)),
                    json(r.get::<_, Option<&str>>(4)),
                    json(table.as_deref()),
                    json(r.get::<_, Option<&str>>(6)),
                    json(r.get::<_, Option<&str>>(7)),
                    json(r.get::<_, Option<&str>>(8)),
                );
                out.write_all(line.as_bytes())
                    .ctx(|| format!("cannot write {path}"))?;
                if !ev_type.starts_with("londiste.") && !ev_type.starts_with("pgq.") {
                    lost += 1;
                    *per_table
                        .entry(table.unwrap_or_default())
                        .or_default()
                        .entry(ev_type.chars().take(1).collect())
                        .or_default() += 1;
                }
            }
            c.query_one("SELECT pgq.finish_batch($1)", &[&b])
                .ctx(|| format!("cannot finish batch {b}"))?;
        }
        unregister(&mut c, &q, &reader)?;
    } else if !has_start && last > start {
        return Err(Error::Other(format!(
            "tick {start} is no longer in this node's queue: the lost events cannot be listed; \
             drop this node (drop-node {}) and create it again as a subscriber",
            me.node_name
        )));
    }
    out.flush().ctx(|| format!("cannot write {path}"))?;
    // Follow the new root from the tick it started at.
    c.query_one(
        "SELECT londiste.demote_root($1, $2, $3, $4, NULL)",
        &[&q, &root.node_name, &root.node_location, &start],
    )
    .ctx(|| "cannot make this node a branch".into())?;
    if lost > 0 {
        let n = c
            .execute(
                "UPDATE londiste.table_info SET merge_state = NULL, custom_snapshot = NULL WHERE queue_name = $1 AND local",
                &[&q],
            )
            .ctx(|| "cannot mark the tables for a new copy".into())?;
        log::info!("{n} table(s) will be copied again from {}", root.node_name);
    }
    rc.query_one(
        "SELECT pgq.register_consumer_at($1, $2, $3)",
        &[&q, &me.worker_name, &start],
    )
    .ctx(|| format!("cannot register {} on {}", me.worker_name, root.node_name))?;
    unregister(&mut rc, &q, &gravestone_consumer(&me.node_name))?;
    tag::dead(&mut rc, &q, &me.node_name, false, None)?;
    rc.execute(
        "UPDATE londiste.node_location SET node_type = 'branch', provider_node = $3 WHERE queue_name = $1 AND node_name = $2",
        &[&q, &me.node_name, &root.node_name],
    )
    .ctx(|| "cannot update the members".into())?;
    tag::dead(&mut c, &q, &me.node_name, false, None)?;
    let summary: Vec<String> = per_table
        .iter()
        .map(|(t, k)| {
            let parts: Vec<String> = k.iter().map(|(op, n)| format!("{op}:{n}")).collect();
            format!("{t} {}", parts.join(" "))
        })
        .collect();
    println!(
        "resurrect: {lost} lost event(s) written to {path}{}; {} is now a branch of {} from tick {start}{}",
        if summary.is_empty() {
            String::new()
        } else {
            format!(" ({})", summary.join(", "))
        },
        me.node_name,
        root.node_name,
        if lost > 0 {
            "; its tables are copied again by its worker"
        } else {
            ""
        }
    );
    Ok(())
}

/// A JSON string (or null), escaped per RFC 8259.
fn json(s: Option<&str>) -> String {
    let Some(s) = s else {
        return "null".into();
    };
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(super::json(None), "null");
        assert_eq!(
            super::json(Some("a\"b\\c\nd\u{1}")),
            "\"a\\\"b\\\\c\\nd\\u0001\""
        );
    }
}
