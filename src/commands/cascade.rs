//! Cascade commands: change-provider, drop-node, tag-dead, tag-alive, and the
//! moves `takeover` is made of (re-pointing a subscriber, the members list).
//!
//! A position is a tick id, and tick ids are the same on every node that
//! carries the queue, so a subscriber moves to another provider by registering
//! its worker there at the tick it stands on. The subscriber's node_info row is
//! locked while it moves: its worker cannot apply a batch from the old provider
//! meanwhile, and one that was read before is dropped (the worker checks the
//! provider under the same lock).

use super::{Opts, connect_local, remote};
use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::replication::node::{self, NodeInfo};
use postgres::{Client, GenericClient};
use std::time::{Duration, Instant};

/// A member of the set, as one node's `londiste.node_location` knows it.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub location: String,
    pub node_type: Option<String>,
    pub provider: Option<String>,
    pub dead: bool,
}

pub fn members<C: GenericClient>(c: &mut C, q: &str) -> Result<Vec<Member>> {
    let rows = c
        .query(
            "SELECT node_name, node_location, node_type, provider_node, dead FROM londiste.node_location
              WHERE queue_name = $1 ORDER BY node_name",
            &[&q],
        )
        .ctx(|| "cannot read the members (londiste.node_location)".into())?;
    Ok(rows
        .iter()
        .map(|r| Member {
            name: r.get(0),
            location: r.get(1),
            node_type: r.get(2),
            provider: r.get(3),
            dead: r.get(4),
        })
        .collect())
}

/// A node given by name (a member) or by connect string.
fn locate(c: &mut Client, q: &str, given: &str) -> Result<String> {
    if let Some(m) = members(c, q)?.into_iter().find(|m| m.name == given) {
        return Ok(m.location);
    }
    if given.contains('=') || given.contains("://") {
        return Ok(given.to_string());
    }
    Err(Error::Other(format!(
        "no member named {given} in queue {q:?}: give a node name from `members`, or a connect string"
    )))
}

pub fn change_provider(cfg: &WorkerConfig, opts: &Opts) -> Result<()> {
    let target = opts.provider.clone().ok_or_else(|| {
        Error::Usage("change-provider needs --provider=NODE (a node name or connect string)".into())
    })?;
    let mut c = connect_local(cfg)?;
    let me = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    if me.is_root() {
        return Err(Error::Other(format!(
            "{} is the root: it has no provider (use takeover to make another node the root)",
            me.node_name
        )));
    }
    let loc = locate(&mut c, &cfg.queue_name, &target)?;
    let mut t = remote(cfg, &loc)?;
    let tn = node::require(&mut t, &cfg.queue_name, "its config")?;
    repoint(cfg, &mut c, &me, &tn.node_name, &tn.node_location)?;
    log::info!("{} now subscribes to {}", me.node_name, tn.node_name);
    log::info!("Done");
    Ok(())
}

/// Moves the subscriber at `sub_loc` under `target`.
pub fn move_subscriber(
    cfg: &WorkerConfig,
    sub_loc: &str,
    target: &str,
    target_loc: &str,
) -> Result<()> {
    let mut c = remote(cfg, sub_loc)?;
    let n = node::require(&mut c, &cfg.queue_name, "its config")?;
    repoint(cfg, &mut c, &n, target, target_loc)
}

/// Registers node `n` (connected as `c`) on `target` at its own position and
/// makes `target` its provider; then unregisters it from the old provider.
pub fn repoint(
    cfg: &WorkerConfig,
    c: &mut Client,
    n: &NodeInfo,
    target: &str,
    target_loc: &str,
) -> Result<()> {
    repoint_at(cfg, c, n, target, target_loc, None)
}

/// `repoint`, optionally moving the node's position to `at` (a failover moves
/// a subscriber that was ahead only by empty ticks back to the new root's start).
pub fn repoint_at(
    cfg: &WorkerConfig,
    c: &mut Client,
    n: &NodeInfo,
    target: &str,
    target_loc: &str,
    at: Option<i64>,
) -> Result<()> {
    let q = n.queue_name.clone();
    let mut t = remote(cfg, target_loc)?;
    let tn = node::require(&mut t, &q, "its config")?;
    if tn.node_name == n.node_name {
        return Err(Error::Other(format!(
            "{} cannot subscribe to itself",
            n.node_name
        )));
    }
    if tn.node_type == "leaf" {
        return Err(Error::Other(format!(
            "Cannot subscribe to leaf node {}: choose the root or a branch",
            tn.node_name
        )));
    }
    // No loops: the target must not be below this node.
    let mut up = tn.provider_location.clone();
    for _ in 0..32 {
        let Some(l) = up else { break };
        // An unreachable node up there (a dead root in a failover) ends the walk.
        let Ok(mut rc) = remote(cfg, &l) else { break };
        let Ok(Some(x)) = node::load(&mut rc, &q) else {
            break;
        };
        if x.node_name == n.node_name {
            return Err(Error::Other(format!(
                "{} is below {} (it reads from it): subscribing to it would make a loop",
                tn.node_name, n.node_name
            )));
        }
        up = x.provider_location;
    }
    if n.provider_node.as_deref() == Some(target) {
        log::info!("{} already subscribes to {target}", n.node_name);
        return Ok(());
    }
    let old_loc = n.provider_location.clone();
    let mut tx = c.transaction().ctx(|| "cannot begin".into())?;
    let pos: Option<i64> = tx
        .query_one(
            "SELECT last_tick_id FROM londiste.node_info WHERE queue_name = $1 FOR UPDATE",
            &[&q],
        )
        .ctx(|| "cannot lock node_info".into())?
        .get(0);
    let pos = pos.ok_or_else(|| Error::Other(format!("{} has no position yet", n.node_name)))?;
    let pos = at.unwrap_or(pos);
    wait_for_tick_on(&mut t, &q, pos, &tn.node_name)?;
    t.query_one(
        "SELECT pgq.register_consumer_at($1, $2, $3)",
        &[&q, &n.worker_name, &pos],
    )
    .ctx(|| format!("cannot register {} on {}", n.worker_name, tn.node_name))?;
    upsert_member(
        &mut t,
        &q,
        &n.node_name,
        &n.node_location,
        &n.node_type,
        Some(target),
    )?;
    tx.execute(
        "UPDATE londiste.node_info SET provider_node = $2, provider_location = $3, cur_error = NULL,
                last_tick_id = $4 WHERE queue_name = $1",
        &[&q, &target, &target_loc, &pos],
    )
    .ctx(|| "cannot store the new provider".into())?;
    upsert_member(
        &mut tx,
        &q,
        &n.node_name,
        &n.node_location,
        &n.node_type,
        Some(target),
    )?;
    tx.commit()
        .ctx(|| "cannot commit the new provider".into())?;
    if let Err(e) = announce(cfg, target_loc, &q, n, target) {
        log::warn!(
            "cannot announce the move of {} to the root: {e}",
            n.node_name
        );
    }
    if let Some(ol) = old_loc
        && ol != target_loc
    {
        match remote(cfg, &ol) {
            Ok(mut oc) => {
                if let Err(e) = unregister(&mut oc, &q, &n.worker_name) {
                    log::warn!(
                        "cannot unregister {} from its old provider: {e}",
                        n.worker_name
                    );
                }
                let _ = upsert_member(
                    &mut oc,
                    &q,
                    &n.node_name,
                    &n.node_location,
                    &n.node_type,
                    Some(target),
                );
            }
            Err(e) => log::warn!(
                "old provider {} unreachable ({e}); its registration of {} stays until drop-node or it is reachable",
                db::describe(&ol),
                n.worker_name
            ),
        }
    }
    Ok(())
}

/// Records node `n` under `provider` on the root (found from `from_loc` up) and
/// queues a londiste.member event there, so every member learns of the move.
fn announce(
    cfg: &WorkerConfig,
    from_loc: &str,
    q: &str,
    n: &NodeInfo,
    provider: &str,
) -> Result<()> {
    let mut loc = from_loc.to_string();
    for _ in 0..32 {
        let mut c = remote(cfg, &loc)?;
        let x = node::require(&mut c, q, "its config")?;
        if x.is_root() {
            upsert_member(
                &mut c,
                q,
                &n.node_name,
                &n.node_location,
                &n.node_type,
                Some(provider),
            )?;
            c.query_one(
                "SELECT londiste.announce_member($1, $2)",
                &[&q, &n.node_name],
            )
            .ctx(|| "cannot queue the member event".into())?;
            return Ok(());
        }
        match x.provider_location {
            Some(l) => loc = l,
            None => break,
        }
    }
    Err(Error::Other("no root found above the new provider".into()))
}

/// The target must hold the tick: wait a little if it is behind, refuse if the
/// tick was rotated away.
fn wait_for_tick_on(t: &mut Client, q: &str, pos: i64, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = t
            .query_one(
                "SELECT bool_or(t.tick_id = $2), min(t.tick_id), max(t.tick_id)
                   FROM pgq.tick t JOIN pgq.queue q ON q.queue_id = t.tick_queue WHERE q.queue_name = $1",
                &[&q, &pos],
            )
            .ctx(|| format!("cannot read the ticks of {name}"))?;
        let (has, lo, hi): (Option<bool>, Option<i64>, Option<i64>) =
            (r.get(0), r.get(1), r.get(2));
        if has == Some(true) {
            return Ok(());
        }
        match hi {
            Some(h) if h < pos && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {
                return Err(Error::Other(format!(
                    "{name} does not hold tick {pos} (its ticks: {}..{}): it is behind, or it rotated that tick away; \
                     choose another provider or re-create this node",
                    lo.unwrap_or(0),
                    hi.unwrap_or(0)
                )));
            }
        }
    }
}

fn upsert_member<C: GenericClient>(
    c: &mut C,
    q: &str,
    name: &str,
    loc: &str,
    kind: &str,
    provider: Option<&str>,
) -> Result<()> {
    c.execute(
        "INSERT INTO londiste.node_location (queue_name, node_name, node_location, node_type, provider_node)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (queue_name, node_name) DO UPDATE SET node_location = EXCLUDED.node_location,
             node_type = EXCLUDED.node_type, provider_node = EXCLUDED.provider_node",
        &[&q, &name, &loc, &kind, &provider],
    )
    .ctx(|| format!("cannot record member {name}"))?;
    Ok(())
}

pub fn unregister<C: GenericClient>(c: &mut C, q: &str, consumer: &str) -> Result<()> {
    c.query(
        "SELECT pgq.unregister_consumer($1, $2) FROM pgq.subscription s
           JOIN pgq.consumer co ON co.co_id = s.sub_consumer JOIN pgq.queue qq ON qq.queue_id = s.sub_queue
          WHERE qq.queue_name = $1 AND co.co_name = $2",
        &[&q, &consumer],
    )
    .ctx(|| format!("cannot unregister consumer {consumer}"))?;
    Ok(())
}

/// Member-table updates that every node of the set gets.
pub mod tag {
    use crate::error::{Context, Result};
    use postgres::GenericClient;

    pub fn dead<C: GenericClient>(
        c: &mut C,
        q: &str,
        node: &str,
        dead: bool,
        failover_tick: Option<i64>,
    ) -> Result<u64> {
        c.execute(
            "UPDATE londiste.node_location SET dead = $3, failover_tick = CASE WHEN $3 THEN coalesce($4, failover_tick) END
              WHERE queue_name = $1 AND node_name = $2",
            &[&q, &node, &dead, &failover_tick],
        )
        .ctx(|| format!("cannot tag {node}"))
    }

    /// After a takeover: `root` is the root, `old` a branch of it.
    pub fn set_roles<C: GenericClient>(c: &mut C, q: &str, root: &str, old: &str) -> Result<()> {
        c.execute(
            "UPDATE londiste.node_location SET node_type = 'root', provider_node = NULL
              WHERE queue_name = $1 AND node_name = $2",
            &[&q, &root],
        )
        .ctx(|| "cannot update members".into())?;
        c.execute(
            "UPDATE londiste.node_location SET node_type = 'branch', provider_node = $3
              WHERE queue_name = $1 AND node_name = $2",
            &[&q, &old, &root],
        )
        .ctx(|| "cannot update members".into())?;
        Ok(())
    }
}

/// tag-dead / tag-alive NODE...: on this node and every other live member.
pub fn tag_nodes(cfg: &WorkerConfig, args: &[String], dead: bool) -> Result<()> {
    let what = if dead { "tag-dead" } else { "tag-alive" };
    if args.is_empty() {
        return Err(Error::Usage(format!("usage: {what} NODE...")));
    }
    let q = cfg.queue_name.clone();
    let mut c = connect_local(cfg)?;
    let me = node::require(&mut c, &q, &cfg.command_hint())?;
    let all = members(&mut c, &q)?;
    for a in args {
        if !all.iter().any(|m| m.name == *a) {
            return Err(Error::Other(format!(
                "no member named {a} in queue {q:?} (see members)"
            )));
        }
        if *a == me.node_name && dead {
            return Err(Error::Other(format!(
                "{a} is this node: tag it dead from another member"
            )));
        }
    }
    for a in args {
        tag::dead(&mut c, &q, a, dead, None)?;
        for m in all
            .iter()
            .filter(|m| m.name != me.node_name && !args.contains(&m.name))
        {
            match remote(cfg, &m.location) {
                Ok(mut r) => {
                    if let Err(e) = tag::dead(&mut r, &q, a, dead, None) {
                        log::warn!("cannot tag {a} on {}: {e}", m.name);
                    }
                }
                Err(e) => log::warn!("{} not reached ({e}); tag it there later", m.name),
            }
        }
        log::info!("{a} tagged {}", if dead { "dead" } else { "alive" });
    }
    Ok(())
}

/// drop-node NAME: removes a node that has no subscribers from the set; on the
/// node itself (when reachable) the node state, its queue and its triggers go.
pub fn drop_node(cfg: &WorkerConfig, args: &[String]) -> Result<()> {
    let [name] = args else {
        return Err(Error::Usage("usage: drop-node NODE".into()));
    };
    let q = cfg.queue_name.clone();
    let mut c = connect_local(cfg)?;
    node::require(&mut c, &q, &cfg.command_hint())?;
    let all = members(&mut c, &q)?;
    let Some(target) = all.iter().find(|m| m.name == *name).cloned() else {
        log::info!("{name} is not a member of queue {q:?}; nothing to drop");
        return Ok(());
    };
    let subs: Vec<&str> = all
        .iter()
        .filter(|m| !m.dead && m.provider.as_deref() == Some(name.as_str()))
        .map(|m| m.name.as_str())
        .collect();
    if !subs.is_empty() {
        return Err(Error::Other(format!(
            "{name} still has subscribers ({}): move them first (change-provider on each)",
            subs.join(", ")
        )));
    }
    // On the node itself.
    let mut provider_loc = None;
    let mut worker = None;
    match remote(cfg, &target.location) {
        Ok(mut t) => {
            if let Some(n) = node::load(&mut t, &q)? {
                provider_loc = n.provider_location.clone();
                worker = Some(n.worker_name.clone());
                t.query_one("SELECT londiste.drop_local_node($1)", &[&q])
                    .ctx(|| format!("cannot remove the node state on {name}"))?;
                log::info!("node state, queue and triggers removed on {name}");
            }
        }
        Err(e) => log::warn!("{name} not reached ({e}); removing it from the others only"),
    }
    // Its registration on its provider, and its member row everywhere.
    let provider_loc = provider_loc.or_else(|| {
        target
            .provider
            .as_ref()
            .and_then(|p| all.iter().find(|m| m.name == *p))
            .map(|m| m.location.clone())
    });
    if let (Some(pl), Some(w)) = (provider_loc, worker)
        && let Ok(mut p) = remote(cfg, &pl)
    {
        let _ = unregister(&mut p, &q, &w);
    }
    for m in all.iter().filter(|m| m.name != *name) {
        let r = if m.location == cfg.db {
            c.execute(
                "DELETE FROM londiste.node_location WHERE queue_name = $1 AND node_name = $2",
                &[&q, &name],
            )
            .ctx(|| "cannot remove the member".into())
        } else {
            remote(cfg, &m.location).and_then(|mut r| {
                r.execute(
                    "DELETE FROM londiste.node_location WHERE queue_name = $1 AND node_name = $2",
                    &[&q, &name],
                )
                .ctx(|| "cannot remove the member".into())
            })
        };
        if let Err(e) = r {
            log::warn!("cannot remove {name} from {}: {e}", m.name);
        }
    }
    c.execute(
        "DELETE FROM londiste.node_location WHERE queue_name = $1 AND node_name = $2",
        &[&q, &name],
    )
    .ctx(|| "cannot remove the member".into())?;
    log::info!("node {name} dropped");
    log::info!("Done");
    Ok(())
}
