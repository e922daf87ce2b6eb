//! `status`: the tree of nodes with lag, position, errors and table states.

use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::replication::node::{self, NodeInfo};
use postgres::Client;

pub(super) fn remote(cfg: &WorkerConfig, loc: &str) -> Result<Client> {
    db::connect(
        &db::with_extra(loc, &cfg.remote_extra_connstr),
        "londiste-rs status",
    )
}

struct Row {
    info: Option<NodeInfo>,
    name: String,
    provider: Option<String>,
    lines: Vec<String>,
}

pub fn status(cfg: &WorkerConfig) -> Result<()> {
    let mut local = db::connect(&cfg.db, "londiste-rs status")?;
    let me = node::require(&mut local, &cfg.queue_name, &cfg.command_hint())?;
    // Find the root: walk up the providers.
    let mut root_loc = me.node_location.clone();
    let mut cur = me.clone();
    let mut root_client: Option<Client> = if me.is_root() { Some(local) } else { None };
    let mut walk = || -> Result<Client> {
        for _ in 0..32 {
            if cur.is_root() {
                break;
            }
            let loc = cur.provider_location.clone().unwrap_or_default();
            let mut c = remote(cfg, &loc)?;
            cur = node::load(&mut c, &cfg.queue_name)?.ok_or_else(|| {
                Error::Other(format!(
                    "{} is not a node of queue {}",
                    db::describe(&loc),
                    cfg.queue_name
                ))
            })?;
            root_loc = loc;
            root_client = Some(c);
        }
        match root_client.take() {
            Some(c) => Ok(c),
            None => remote(cfg, &root_loc),
        }
    };
    let mut root = match walk() {
        Ok(c) => c,
        // Without the way up, show what this node knows: its own state and
        // error are what the operator needs most then.
        Err(e) => return status_alone(cfg, &me, &e),
    };
    let members = root
        .query(
            "SELECT node_name, node_location, provider_node, dead FROM londiste.node_location WHERE queue_name = $1 ORDER BY 1",
            &[&cfg.queue_name],
        )
        .ctx(|| "cannot read members on the root".into())?;
    let root_tick = node::newest_tick(&mut root, &cfg.queue_name)?;
    let mut rows = Vec::new();
    for m in members {
        let (name, loc, prov, dead): (String, String, Option<String>, bool) =
            (m.get(0), m.get(1), m.get(2), m.get(3));
        let mut r = Row {
            info: None,
            name: name.clone(),
            provider: prov,
            lines: Vec::new(),
        };
        if dead {
            r.lines.push("DEAD".into());
            rows.push(r);
            continue;
        }
        match remote(cfg, &loc)
            .and_then(|mut c| node_lines(&mut c, &mut root, cfg, root_tick).map(|x| (x, c)))
        {
            Ok(((info, lines), _)) => {
                r.info = info;
                r.lines = lines;
            }
            Err(e) => r.lines.push(format!("ERR: cannot reach: {e}")),
        }
        rows.push(r);
    }
    println!("Queue: {}   Local node: {}\n", cfg.queue_name, me.node_name);
    let root_name = rows
        .iter()
        .find(|r| r.info.as_ref().is_some_and(|i| i.is_root()))
        .map(|r| r.name.clone());
    let Some(root_name) = root_name else {
        return Err(Error::Other(
            "the root node is not among the members".into(),
        ));
    };
    print_tree(&rows, &root_name, "", true, true);
    Ok(())
}

/// `status` when the provider chain cannot be followed to the root.
fn status_alone(cfg: &WorkerConfig, me: &NodeInfo, why: &Error) -> Result<()> {
    let mut a = db::connect(&cfg.db, "londiste-rs status")?;
    let mut b = db::connect(&cfg.db, "londiste-rs status")?;
    let (_, lines) = node_lines(&mut a, &mut b, cfg, None)?;
    println!("Queue: {}   Local node: {}\n", cfg.queue_name, me.node_name);
    println!("{} ({})", me.node_name, me.node_type);
    for l in lines {
        println!("    {l}");
    }
    println!("    ERR: cannot reach the rest of the set through the provider: {why}");
    Ok(())
}

fn print_tree(rows: &[Row], name: &str, prefix: &str, last: bool, top: bool) {
    let Some(r) = rows.iter().find(|r| r.name == name) else {
        return;
    };
    let kind = r
        .info
        .as_ref()
        .map(|i| i.node_type.clone())
        .unwrap_or_else(|| "?".into());
    if top {
        println!("{} ({})", r.name, kind);
    } else {
        println!("{}+--: {} ({})", prefix, r.name, kind);
    }
    let child_prefix = if top {
        String::new()
    } else {
        format!("{}{}", prefix, if last { "    " } else { "|   " })
    };
    let kids: Vec<&Row> = rows
        .iter()
        .filter(|k| k.provider.as_deref() == Some(name) && k.name != name)
        .collect();
    for l in &r.lines {
        println!(
            "{}{}    {}",
            child_prefix,
            if kids.is_empty() { " " } else { "|" },
            l
        );
    }
    for (i, k) in kids.iter().enumerate() {
        print_tree(rows, &k.name, &child_prefix, i + 1 == kids.len(), false);
    }
}

/// The lag of a subscriber at `tick`: the age of the oldest change it has
/// not applied, bounded by the time of the last tick up to which the queue
/// had no event beyond `tick` (the change came after it). A node whose
/// position is behind only by ticks without events is up to date: on an
/// idle queue the newest tick ages, the data does not. The tick age stays
/// shown.
fn subscriber_lag(
    root: &mut Client,
    queue: &str,
    tick: i64,
    root_tick: Option<i64>,
) -> Result<String> {
    let r = root
        .query_opt(
            "SELECT extract(epoch FROM now() - max(n.tick_time) FILTER (WHERE n.tick_event_seq = t.tick_event_seq))::float8,
                    bool_and(n.tick_event_seq = t.tick_event_seq),
                    extract(epoch FROM now() - max(n.tick_time))::float8
               FROM pgq.tick t JOIN pgq.queue q ON q.queue_id = t.tick_queue
               JOIN pgq.tick n ON n.tick_queue = t.tick_queue AND n.tick_id >= t.tick_id
              WHERE q.queue_name = $1 AND t.tick_id = $2",
            &[&queue, &tick],
        )
        .ctx(|| "cannot read ticks on the root".into())?;
    let behind = root_tick.map(|r| r - tick).unwrap_or(0);
    let behind = if behind > 0 {
        format!(" ({behind} ticks behind)")
    } else {
        String::new()
    };
    let Some(r) = r.filter(|r| r.get::<_, Option<bool>>(1).is_some()) else {
        return Ok(format!("Lag: ?, Tick: {tick}{behind}"));
    };
    let (since, idle, age): (Option<f64>, bool, Option<f64>) = (r.get(0), r.get(1), r.get(2));
    let age = age.map(|a| format!("{a:.1}s")).unwrap_or("-".into());
    Ok(if idle {
        format!("Lag: up to date, Tick: {tick}, last tick {age} ago")
    } else {
        format!(
            "Lag: {}, Tick: {tick}{behind}, last tick {age} ago",
            since.map(|l| format!("{l:.1}s")).unwrap_or("?".into())
        )
    })
}

fn node_lines(
    c: &mut Client,
    root: &mut Client,
    cfg: &WorkerConfig,
    root_tick: Option<i64>,
) -> Result<(Option<NodeInfo>, Vec<String>)> {
    let Some(n) = node::load(c, &cfg.queue_name)? else {
        return Ok((None, vec!["not initialised".into()]));
    };
    let mut lines = Vec::new();
    let tables = node::tables(c, &cfg.queue_name)?;
    let ok = tables
        .iter()
        .filter(|t| t.local && t.merge_state.as_deref() == Some("ok"))
        .count();
    let half = tables
        .iter()
        .filter(|t| t.local && t.merge_state.as_deref() != Some("ok"))
        .count();
    let ignored = tables.iter().filter(|t| !t.local).count();
    lines.push(format!("Tables: {ok}/{half}/{ignored}"));
    if n.is_root() {
        let lag: Option<f64> = c
            .query_one(
                "SELECT extract(epoch FROM now() - max(t.tick_time))::float8 FROM pgq.tick t JOIN pgq.queue q
                   ON q.queue_id = t.tick_queue WHERE q.queue_name = $1",
                &[&cfg.queue_name],
            )
            .ctx(|| "cannot read ticks".into())?
            .get(0);
        // The root is the source: it has no lag, only the age of its newest tick.
        lines.push(format!(
            "Tick: {}, last tick {} ago",
            root_tick.map(|t| t.to_string()).unwrap_or("-".into()),
            lag.map(|l| format!("{l:.1}s")).unwrap_or("-".into()),
        ));
    } else {
        let tick = n.last_tick_id.unwrap_or(0);
        lines.push(subscriber_lag(root, &cfg.queue_name, tick, root_tick)?);
        let seen: Option<f64> = c
            .query_one(
                "SELECT extract(epoch FROM now() - worker_seen)::float8 FROM londiste.node_info WHERE queue_name = $1",
                &[&cfg.queue_name],
            )
            .ctx(|| "cannot read node_info".into())?
            .get(0);
        if seen.is_none_or(|s| s > 60.0) {
            lines.push("NOT RUNNING? worker not seen for over a minute".into());
        }
    }
    if n.paused {
        lines.push("PAUSED".into());
    }
    if let Some(e) = &n.cur_error {
        lines.push(format!("ERR: {e}"));
    }
    for t in tables
        .iter()
        .filter(|t| t.local && t.merge_state.as_deref() != Some("ok"))
    {
        lines.push(format!(
            "  {}: {}",
            t.table_name,
            super::tables::human_state(t)
        ));
    }
    Ok((Some(n), lines))
}
