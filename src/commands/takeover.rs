//! `takeover OLDNODE`: the cut-over. Run with the config of the node that takes
//! over.
//!
//! Switchover (the old root alive), in three transactions on two nodes (see
//! `sql/cascade.sql`): fence the old root (its tables refuse writes, its last
//! tick is taken), wait until this node has applied that tick, promote this
//! node, demote the old root to a branch that follows this node. Writes are
//! refused from the fence to the promotion; that pause is measured and printed.
//! Every step is idempotent and the old root's row says how far a takeover got,
//! so re-running the command after a crash finishes it; `--abort` undoes a
//! fence no node was promoted after.
//!
//! Failover (`--dead-root`): the old root is unreachable. The most advanced
//! surviving branch's position is used, the old root is tagged dead on every
//! survivor, this node is promoted where it stands, and the dead root's other
//! subscribers move here. See `resurrect` for the old root's return.

use super::cascade::{Member, members, move_subscriber, tag};
use super::{Opts, connect_local, remote};
use crate::config::WorkerConfig;
use crate::error::{Context, Error, Result};
use crate::replication::node::{self, NodeInfo};
use postgres::Client;
use std::time::{Duration, Instant};

/// How long the fence may wait for the locks of transactions writing the
/// replicated tables; writers queue behind it meanwhile, so it is short.
const FENCE_LOCK_TIMEOUT: Duration = Duration::from_secs(3);

pub fn takeover(cfg: &WorkerConfig, args: &[String], opts: &Opts) -> Result<()> {
    let old_name = match args {
        [n] => n.clone(),
        _ => {
            return Err(Error::Usage(
                "usage: takeover OLDNODE [--all] [--dead-root | --dead-branch] [--force] [--abort]"
                    .into(),
            ));
        }
    };
    let q = cfg.queue_name.clone();
    let mut me_c = connect_local(cfg)?;
    let me = node::require(&mut me_c, &q, &cfg.command_hint())?;
    if me.node_name == old_name {
        return Err(Error::Usage(format!(
            "this node is {old_name}: run takeover with the config of the node that takes over"
        )));
    }
    let all = members(&mut me_c, &q)?;
    let old_m = all
        .iter()
        .find(|m| m.name == old_name)
        .cloned()
        .ok_or_else(|| {
            Error::Other(format!(
                "node {old_name} is not a member of queue {q:?} as this node knows it (members: {}); see members",
                all.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?;
    if opts.dead_branch {
        return super::branch::takeover_branch(cfg, opts, me_c, me, &old_m, None);
    }
    if opts.dead_root {
        return failover(cfg, opts, me_c, me, &old_m, &all);
    }
    let mut old_c = remote(cfg, &old_m.location).map_err(|e| {
        Error::Unavailable(format!(
            "{e}; if node {old_name} is down for good, fail over instead: takeover {old_name} --dead-root"
        ))
    })?;
    let old = node::require(&mut old_c, &q, "its config")?;
    if !old.is_root() {
        if old.provider_node.as_deref() == Some(me.node_name.as_str()) {
            return Err(Error::Other(format!(
                "node {old_name} already reads from {}: nothing to take over",
                me.node_name
            )));
        }
        if me.is_root() {
            return Err(Error::Other(format!(
                "{} is the root and {old_name} a {}: make it follow the root with change-provider",
                me.node_name, old.node_type
            )));
        }
        return super::branch::takeover_branch(cfg, opts, me_c, me, &old_m, Some((old_c, old)));
    }
    if opts.abort {
        return abort(&me, &mut old_c, &old);
    }
    switchover(cfg, opts, me_c, me, old_c, old)
}

/// Undo a fence that no promotion followed: the old root takes writes again.
fn abort(me: &NodeInfo, old_c: &mut Client, old: &NodeInfo) -> Result<()> {
    if me.is_root() {
        return Err(Error::Other(format!(
            "node {} is already the root: the takeover passed the point of no return; run takeover {} again to finish it",
            me.node_name, old.node_name
        )));
    }
    let n: i32 = old_c
        .query_one("SELECT londiste.unfence_root($1)", &[&old.queue_name])
        .ctx(|| format!("cannot lift the fence on {}", old.node_name))?
        .get(0);
    if n == 0 {
        log::info!("node {} was not fenced; nothing to undo", old.node_name);
    } else {
        log::info!(
            "fence lifted: node {} takes writes again and stays the root",
            old.node_name
        );
    }
    Ok(())
}

fn switchover(
    cfg: &WorkerConfig,
    opts: &Opts,
    mut me_c: Client,
    me: NodeInfo,
    mut old_c: Client,
    old: NodeInfo,
) -> Result<()> {
    let q = cfg.queue_name.clone();
    let started = Instant::now();
    let resuming = old.fenced_to.as_deref() == Some(me.node_name.as_str());
    if let Some(to) = &old.fenced_to
        && !resuming
    {
        return Err(Error::Other(format!(
            "node {} is handing over to node {to}: finish that takeover first (run it with {to}'s config)",
            old.node_name
        )));
    }
    if me.is_root() && !resuming {
        return Err(Error::Other(format!(
            "nodes {} and {} are both roots of queue {q:?} and neither is handing over; \
             compare them and drop one (drop-node) before a takeover",
            me.node_name, old.node_name
        )));
    }
    if resuming {
        log::info!(
            "resuming the takeover from {} (fenced at tick {})",
            old.node_name,
            old.fence_tick.unwrap_or(0)
        );
    } else {
        let problems = super::ready::check(cfg, opts, &mut me_c, &me, &mut old_c, &old)?;
        if !problems.is_empty() {
            let list = problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n");
            if !opts.force {
                return Err(Error::Other(format!(
                    "node {} is not ready to take over from {}:\n{list}\nfix these and run takeover again (--force switches anyway)",
                    me.node_name, old.node_name
                )));
            }
            log::warn!("switching over although (--force):\n{list}");
        }
        log::info!("checks passed: tables in sync, worker running, lag within bounds");
    }

    if opts.wait_go {
        // Everything slow (connections, checks) is done: a caller that holds
        // its clients (scripts/cutover-pgbouncer) pauses them now.
        println!("ready to fence {}", old.node_name);
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .ctx(|| "cannot read standard input (--wait-go)".into())?;
        if line.trim() != "go" {
            return Err(Error::Other(format!(
                "takeover stopped before the fence (--wait-go got {:?}, not \"go\"): nothing was changed",
                line.trim()
            )));
        }
    }
    // Step 1: the fence. From here until the promotion no node takes writes.
    let t_fence = Instant::now();
    let tick = fence(&mut old_c, &q, &me.node_name, &old.node_name)?;
    let fence_ms = t_fence.elapsed().as_secs_f64() * 1e3;
    log::info!(
        "fenced {}: writes refused, last tick {tick} ({fence_ms:.0} ms)",
        old.node_name
    );
    let seqs = old_c
        .query(
            "SELECT seq_name, last_value FROM londiste.seq_values($1)",
            &[&q],
        )
        .ctx(|| format!("cannot read the sequences of {}", old.node_name))?;
    let seq_names: Vec<String> = seqs.iter().map(|r| r.get(0)).collect();
    let seq_vals: Vec<i64> = seqs.iter().map(|r| r.get(1)).collect();

    // Step 2: wait for this node to apply the last tick, then promote it.
    let t_wait = Instant::now();
    if !me.is_root() {
        wait_for_tick(
            &mut me_c,
            &q,
            tick,
            opts.wait_timeout,
            &me.node_name,
            &old.node_name,
        )?;
    }
    let wait_ms = t_wait.elapsed().as_secs_f64() * 1e3;
    let t_promote = Instant::now();
    me_c.query_one(
        "SELECT londiste.promote_root($1, $2, $3, $4, $5, $6, $7)",
        &[
            &q,
            &tick,
            &old.node_name,
            &old.worker_name,
            &seq_names,
            &seq_vals,
            &opts.seq_margin,
        ],
    )
    .ctx(|| format!("cannot promote {} to root", me.node_name))?;
    let promote_ms = t_promote.elapsed().as_secs_f64() * 1e3;
    let pause_ms = t_fence.elapsed().as_secs_f64() * 1e3;
    // A line of its own, at once: scripts/cutover-pgbouncer resumes its
    // clients on it instead of waiting for the rest of the command.
    println!("promoted {}: it takes writes", me.node_name);
    log::info!(
        "{} is the root: {} sequence(s) moved to the old root's values + {}",
        me.node_name,
        seq_names.len(),
        opts.seq_margin
    );

    // Step 3: the old root follows the new one.
    old_c
        .query_one(
            "SELECT londiste.demote_root($1, $2, $3, $4, $5)",
            &[&q, &me.node_name, &me.node_location, &tick, &me.worker_name],
        )
        .ctx(|| format!("cannot make {} a branch of {}", old.node_name, me.node_name))?;
    log::info!(
        "{} is a branch of {} from tick {tick}: its worker follows without a restart",
        old.node_name,
        me.node_name
    );
    // Tell every member what the tree is now.
    let all = members(&mut me_c, &q)?;
    for m in all.iter().filter(|m| !m.dead && m.name != me.node_name) {
        if let Ok(mut c) = remote(cfg, &m.location) {
            let _ = tag::set_roles(&mut c, &q, &me.node_name, &old.node_name);
        }
    }
    if opts.all {
        move_old_subscribers(cfg, &me, &old.node_name, tick, &all);
    }
    println!(
        "takeover {} -> {}: writes paused {pause_ms:.0} ms (fence {fence_ms:.0} ms, catch-up {wait_ms:.0} ms, promote {promote_ms:.0} ms); command took {:.0} ms",
        old.node_name,
        me.node_name,
        started.elapsed().as_secs_f64() * 1e3
    );
    log::info!("Done");
    Ok(())
}

/// The fence transaction, with a short lock wait: a long one would hold every
/// writer of the tables behind it. On timeout nothing changed.
fn fence(c: &mut Client, q: &str, new_node: &str, old_node: &str) -> Result<i64> {
    let mut tx = c.transaction().ctx(|| "cannot begin the fence".into())?;
    let wait = format!("{} ms", FENCE_LOCK_TIMEOUT.as_millis());
    let tick: i64 = tx
        .query_one(
            "SELECT londiste.fence_root($1, $2, $3::text::interval)",
            &[&q, &new_node, &wait],
        )
        .map_err(|e| {
            let m = crate::error::pg_message(&e);
            if e.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                Error::Other(format!(
                    "cannot fence {old_node}: {m}; nothing was changed: find the transaction in \
                     pg_stat_activity on {old_node}, end it, and run takeover again"
                ))
            } else {
                Error::Db(format!("cannot fence {old_node}: {m}"))
            }
        })?
        .get(0);
    tx.commit()
        .ctx(|| format!("cannot commit the fence on {old_node}"))?;
    Ok(tick)
}

/// Polls this node's position (5 ms steps: this is inside the write pause).
fn wait_for_tick(
    c: &mut Client,
    q: &str,
    tick: i64,
    timeout: Duration,
    me: &str,
    old: &str,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let stmt = c
        .prepare("SELECT last_tick_id, cur_error FROM londiste.node_info WHERE queue_name = $1")
        .ctx(|| "cannot prepare the position query".into())?;
    loop {
        let r = c
            .query_one(&stmt, &[&q])
            .ctx(|| "cannot read this node's position".into())?;
        let (pos, err): (Option<i64>, Option<String>) = (r.get(0), r.get(1));
        if pos == Some(tick) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Other(format!(
                "node {me} did not reach the last tick {tick} of {old} within {timeout:?} (it is at {}{}); \
                 {old} stays fenced (no node takes writes): fix the worker and run takeover again to finish, \
                 or takeover {old} --abort to give {old} its writes back",
                pos.map(|p| p.to_string())
                    .unwrap_or_else(|| "no tick".into()),
                err.map(|e| format!(", worker error: {e}"))
                    .unwrap_or_default()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `--all`: the old root's other subscribers move to the new root, each once it
/// has read up to the last tick (the old root carries nothing new before it
/// follows the new root, so that is quick). Without `--all` they stay: the old
/// root is a branch now and keeps feeding them.
fn move_old_subscribers(cfg: &WorkerConfig, me: &NodeInfo, old: &str, tick: i64, all: &[Member]) {
    for m in all
        .iter()
        .filter(|m| !m.dead && m.name != me.node_name && m.provider.as_deref() == Some(old))
    {
        let moved = remote(cfg, &m.location).and_then(|mut c| {
            wait_for_tick_at_least(
                &mut c,
                &cfg.queue_name,
                tick,
                Duration::from_secs(60),
                &m.name,
            )?;
            move_subscriber(cfg, &m.location, &me.node_name, &me.node_location)
        });
        match moved {
            Ok(()) => log::info!("{} now subscribes to {}", m.name, me.node_name),
            Err(e) => log::warn!(
                "cannot move {} to {}: {e}; it keeps following {old}",
                m.name,
                me.node_name
            ),
        }
    }
}

fn wait_for_tick_at_least(
    c: &mut Client,
    q: &str,
    tick: i64,
    timeout: Duration,
    name: &str,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pos: Option<i64> = c
            .query_one(
                "SELECT last_tick_id FROM londiste.node_info WHERE queue_name = $1",
                &[&q],
            )
            .ctx(|| format!("cannot read the position of {name}"))?
            .get(0);
        if pos.is_some_and(|p| p >= tick) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Other(format!(
                "{name} did not reach tick {tick} within {timeout:?} (at {pos:?}); is its worker running?"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--dead-root`: the old root is gone.
fn failover(
    cfg: &WorkerConfig,
    opts: &Opts,
    mut me_c: Client,
    me: NodeInfo,
    old: &Member,
    all: &[Member],
) -> Result<()> {
    let q = cfg.queue_name.clone();
    if let Ok(mut c) = remote(cfg, &old.location)
        && let Ok(Some(n)) = node::load(&mut c, &q)
        && n.is_root()
        && n.fenced_to.is_none()
        && !opts.force
    {
        return Err(Error::Other(format!(
            "node {} answers and is a working root: switch over without --dead-root (nothing lost), \
             or add --force if it must be abandoned anyway",
            old.name
        )));
    }
    if me.is_root() {
        log::info!("{} already is the root", me.node_name);
    } else {
        // The most advanced survivor that carries the queue.
        let mut best: Option<(String, String, i64)> = None;
        for m in all.iter().filter(|m| !m.dead && m.name != old.name) {
            let Ok(mut c) = remote(cfg, &m.location) else {
                log::warn!("node {} does not answer; left out", m.name);
                continue;
            };
            let Ok(Some(n)) = node::load(&mut c, &q) else {
                continue;
            };
            if n.node_type == "branch" || n.node_name == me.node_name {
                let pos = n.last_tick_id.unwrap_or(0);
                if best.as_ref().is_none_or(|b| pos > b.2) {
                    best = Some((n.node_name.clone(), m.location.clone(), pos));
                }
            }
        }
        let my_pos = node::require(&mut me_c, &q, "")?.last_tick_id.unwrap_or(0);
        if let Some((name, loc, pos)) = best
            && pos > my_pos
            && name != me.node_name
        {
            log::info!(
                "{name} is ahead (tick {pos}, this node {my_pos}): catching up from it first"
            );
            super::cascade::repoint(cfg, &mut me_c, &me, &name, &loc)?;
            wait_for_tick(&mut me_c, &q, pos, opts.wait_timeout, &me.node_name, &name)?;
        }
    }
    let me_now = node::require(&mut me_c, &q, "")?;
    let start = me_now.last_tick_id.unwrap_or(0);
    let start_seq: Option<i64> = me_c
        .query_one(
            "SELECT last_tick_seq FROM londiste.node_info WHERE queue_name = $1",
            &[&q],
        )
        .ctx(|| "cannot read this node's position".into())?
        .get(0);
    // Every member any survivor knows of.
    let mut all: Vec<Member> = all.to_vec();
    for m in all
        .clone()
        .iter()
        .filter(|m| !m.dead && m.name != old.name && m.name != me.node_name)
    {
        if let Ok(mut c) = remote(cfg, &m.location)
            && let Ok(theirs) = members(&mut c, &q)
        {
            for t in theirs {
                if !all.iter().any(|x| x.name == t.name) {
                    all.push(t);
                }
            }
        }
    }
    // Tag the old root dead everywhere first: nothing must follow it any more.
    let survivors: Vec<Member> = all.iter().filter(|m| m.name != old.name).cloned().collect();
    for m in &survivors {
        let r = if m.name == me.node_name {
            tag::dead(&mut me_c, &q, &old.name, true, Some(start))
        } else {
            remote(cfg, &m.location)
                .and_then(|mut c| tag::dead(&mut c, &q, &old.name, true, Some(start)))
        };
        if let Err(e) = r {
            log::warn!("cannot tag {} dead on {}: {e}", old.name, m.name);
        }
    }
    let seqs = me_c
        .query(
            "SELECT seq_name, last_value FROM londiste.seq_values($1)",
            &[&q],
        )
        .ctx(|| "cannot read this node's sequences".into())?;
    let names: Vec<String> = seqs.iter().map(|r| r.get(0)).collect();
    let vals: Vec<i64> = seqs.iter().map(|r| r.get(1)).collect();
    let gravestone = gravestone_consumer(&old.name);
    if !me_now.is_root() {
        me_c.query_one(
            "SELECT londiste.promote_root($1, $2, $3, $4, $5, $6, $7)",
            &[
                &q,
                &start,
                &old.name,
                &gravestone,
                &names,
                &vals,
                &opts.seq_margin,
            ],
        )
        .ctx(|| format!("cannot promote {} to root", me.node_name))?;
    }
    let start_time: Option<String> = me_c
        .query_opt(
            "SELECT t.tick_time::text FROM pgq.tick t JOIN pgq.queue q ON q.queue_id = t.tick_queue
              WHERE q.queue_name = $1 AND t.tick_id = $2",
            &[&q, &start],
        )
        .ctx(|| "cannot read the start tick".into())?
        .map(|r| r.get(0));
    for m in &survivors {
        if m.name == me.node_name || m.dead {
            continue;
        }
        if let Ok(mut c) = remote(cfg, &m.location) {
            let _ = tag::set_roles(&mut c, &q, &me.node_name, &old.name);
        }
    }
    // The dead root's other subscribers move here (--all is implied).
    let mut behind = Vec::new();
    for m in survivors
        .iter()
        .filter(|m| !m.dead && m.name != me.node_name)
    {
        let moved = (|| -> Result<bool> {
            let mut c = remote(cfg, &m.location)?;
            let Some(sn) = node::load(&mut c, &q)? else {
                return Ok(false);
            };
            if sn.provider_node.as_deref() != Some(old.name.as_str()) {
                return Ok(false);
            }
            let pos = sn.last_tick_id.unwrap_or(0);
            let seq: Option<i64> = c
                .query_one(
                    "SELECT last_tick_seq FROM londiste.node_info WHERE queue_name = $1",
                    &[&q],
                )
                .ctx(|| "cannot read its position".into())?
                .get(0);
            if pos <= start {
                super::cascade::repoint(cfg, &mut c, &sn, &me.node_name, &me.node_location)?;
            } else if seq.is_some() && seq == start_seq {
                log::info!(
                    "{} was ahead only by empty ticks; it continues from tick {start}",
                    m.name
                );
                super::cascade::repoint_at(
                    cfg,
                    &mut c,
                    &sn,
                    &me.node_name,
                    &me.node_location,
                    Some(start),
                )?;
            } else {
                return Err(Error::Other(format!(
                    "it applied events of ticks {start}..{pos} that {} never received: \
                     its tables differ from the new root; resync them after moving it \
                     (change-provider --provider={} then resync --all)",
                    me.node_name, me.node_name
                )));
            }
            Ok(true)
        })();
        match moved {
            Ok(true) => log::info!("{} now subscribes to {}", m.name, me.node_name),
            Ok(false) => {}
            Err(e) => behind.push(format!("{}: {e}", m.name)),
        }
    }
    println!(
        "failover: {} is the root from tick {start} (committed on {} at {}); {} is tagged dead. \
         Transactions committed on {} after that tick are not here; if it comes back, \
         `resurrect` with its config writes them to a file and makes it a branch of {}.",
        me.node_name,
        old.name,
        start_time.as_deref().unwrap_or("?"),
        old.name,
        old.name,
        me.node_name
    );
    for b in &behind {
        println!("not moved: {b}");
    }
    log::info!("Done");
    Ok(())
}

/// The consumer a failover leaves on the new root at its start tick, so the
/// queue keeps what a resurrected old root needs to follow from there.
pub fn gravestone_consumer(old: &str) -> String {
    format!(".{old}.gravestone")
}
