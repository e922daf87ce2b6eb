//! `takeover BRANCH` (the old node a branch, alive) and `takeover BRANCH
//! --dead-branch`: this node takes the branch's place in the tree. No write
//! pause is involved (the root does not change): each move is a subscriber
//! registering at its own tick on another provider (see `cascade::repoint`).
//!
//! Alive: if this node reads from the branch, it first reads from the branch's
//! provider; the branch's subscribers move here (all of them with `--all`, as a
//! dead branch's always do); then the branch itself reads from this node.
//! Dead: the branch is tagged dead on every member and its subscribers move
//! here.

use super::cascade::{Member, members, move_subscriber, repoint, tag};
use super::{Opts, remote};
use crate::config::WorkerConfig;
use crate::error::{Error, Result};
use crate::replication::node::{self, NodeInfo};
use postgres::Client;

pub fn takeover_branch(
    cfg: &WorkerConfig,
    opts: &Opts,
    mut me_c: Client,
    me: NodeInfo,
    old: &Member,
    alive: Option<(Client, NodeInfo)>,
) -> Result<()> {
    let q = cfg.queue_name.clone();
    if me.node_type == "leaf" {
        return Err(Error::Other(format!(
            "{} is a leaf: it cannot feed {}'s subscribers; take over with a branch (or create one)",
            me.node_name, old.name
        )));
    }
    let all = members(&mut me_c, &q)?;
    if me.provider_node.as_deref() == Some(old.name.as_str()) {
        let up = match &alive {
            Some((_, o)) => o.provider_node.clone(),
            None => old.provider.clone(),
        }
        .ok_or_else(|| Error::Other(format!("{} has no provider to read from", old.name)))?;
        let up_loc = all
            .iter()
            .find(|m| m.name == up)
            .map(|m| m.location.clone())
            .ok_or_else(|| Error::Other(format!("{up} is not a known member")))?;
        repoint(cfg, &mut me_c, &me, &up, &up_loc)?;
        log::info!(
            "{} now reads from {up}, {}'s provider",
            me.node_name,
            old.name
        );
    }
    let me = node::require(&mut me_c, &q, "")?;
    if alive.is_none() {
        for m in all.iter().filter(|m| m.name != old.name) {
            let r = if m.name == me.node_name {
                tag::dead(&mut me_c, &q, &old.name, true, None).map(|_| ())
            } else {
                remote(cfg, &m.location)
                    .and_then(|mut c| tag::dead(&mut c, &q, &old.name, true, None).map(|_| ()))
            };
            if let Err(e) = r {
                log::warn!("cannot tag {} dead on {}: {e}", old.name, m.name);
            }
        }
    }
    let mut failed = Vec::new();
    if opts.all || alive.is_none() {
        // Who reads from the old node: the member lists may lag (they travel
        // in the queue), so ask each candidate itself.
        let mut cands = all.clone();
        if let Ok(mut oc) = remote(cfg, &old.location)
            && let Ok(theirs) = members(&mut oc, &q)
        {
            for t in theirs {
                if !cands.iter().any(|c| c.name == t.name) {
                    cands.push(t);
                }
            }
        }
        for m in cands
            .iter()
            .filter(|m| !m.dead && m.name != me.node_name && m.name != old.name)
        {
            let reads_old = remote(cfg, &m.location)
                .and_then(|mut c| node::load(&mut c, &q))
                .ok()
                .flatten()
                .is_some_and(|n| n.provider_node.as_deref() == Some(old.name.as_str()));
            if !reads_old {
                continue;
            }
            match move_subscriber(cfg, &m.location, &me.node_name, &me.node_location) {
                Ok(()) => log::info!("{} now reads from {}", m.name, me.node_name),
                Err(e) => failed.push(format!("{}: {e}", m.name)),
            }
        }
    }
    if let Some((mut oc, on)) = alive {
        repoint(cfg, &mut oc, &on, &me.node_name, &me.node_location)?;
        log::info!("{} now reads from {}", old.name, me.node_name);
    }
    for f in &failed {
        log::warn!("not moved: {f}");
    }
    println!(
        "takeover {} -> {}: {} takes {}'s place in the tree{}",
        old.name,
        me.node_name,
        me.node_name,
        old.name,
        if failed.is_empty() {
            String::new()
        } else {
            format!("; {} subscriber(s) not moved (see above)", failed.len())
        }
    );
    Ok(())
}
