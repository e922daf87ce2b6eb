//! The root's worker rounds: it publishes sequences ahead of use and ticks its
//! own queue when a tick is due (pgq.ticker's rules), so that a queue keeps
//! ticking after a takeover made this node the root before any pgqd was pointed
//! at it (with pgqd running too, the queue row lock serialises the two). A root
//! that is handing over (fenced) does neither: its last tick is final.
//!
//! A root that was failed over (`takeover --dead-root` while it was down or cut
//! off) must not take writes when it comes back: the application may still
//! reach it, and two writable roots would diverge. Its worker asks the other
//! members, at start and every `CHECK_EVERY`, whether one of them is now the
//! root and has this node tagged dead; if so it fences this node (writes
//! refused, naming the new root) and says to run `resurrect`.

use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Result};
use crate::replication::node::NodeInfo;
use postgres::Client;
use std::time::{Duration, Instant};

pub const CHECK_EVERY: Duration = Duration::from_secs(30);

/// The name of the member that took over from this root, if any.
pub fn failed_over_to(
    cfg: &WorkerConfig,
    local: &mut Client,
    me: &NodeInfo,
) -> Result<Option<String>> {
    let rows = local
        .query(
            "SELECT node_name, node_location FROM londiste.node_location
              WHERE queue_name = $1 AND node_name <> $2 AND NOT dead",
            &[&me.queue_name, &me.node_name],
        )
        .ctx(|| "cannot read the members".into())?;
    for r in rows {
        let (name, loc): (String, String) = (r.get(0), r.get(1));
        // Short: an unreachable member must not hold up the root's worker.
        let cs = db::with_extra(
            &db::with_extra(&loc, &cfg.remote_extra_connstr),
            "connect_timeout=2",
        );
        let Ok(mut c) = db::connect(&cs, "londiste-rs worker") else {
            continue;
        };
        let row = c.query_opt(
            "SELECT 1 FROM londiste.node_info n JOIN londiste.node_location l ON l.queue_name = n.queue_name
              WHERE n.queue_name = $1 AND n.node_type = 'root' AND l.node_name = $2 AND l.dead",
            &[&me.queue_name, &me.node_name],
        );
        if let Ok(Some(_)) = row {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Fences this root in favour of `to`.
pub fn fence_self(local: &mut Client, me: &NodeInfo, to: &str) -> Result<()> {
    local
        .query_one(
            "SELECT londiste.fence_root($1, $2, '3s')",
            &[&me.queue_name, &to],
        )
        .ctx(|| "cannot fence this node".into())?;
    Ok(())
}

#[derive(Debug, Default)]
pub struct RootState {
    /// A fenced root (takeover in progress) is said once.
    pub fence_said: bool,
    /// When this root last asked the members whether it was failed over
    /// (None: at the next round, e.g. after an outage).
    pub failover_checked: Option<Instant>,
}

pub fn round(
    cfg: &WorkerConfig,
    c: &mut Client,
    node: &NodeInfo,
    st: &mut RootState,
) -> Result<()> {
    if let Some(to) = &node.fenced_to {
        if !st.fence_said {
            log::info!("root is handing over to node {to} (takeover); not ticking");
            st.fence_said = true;
        }
        return Ok(());
    }
    st.fence_said = false;
    if st
        .failover_checked
        .is_none_or(|t| t.elapsed() >= CHECK_EVERY)
    {
        st.failover_checked = Some(Instant::now());
        if let Some(to) = failed_over_to(cfg, c, node)? {
            fence_self(c, node, &to)?;
            log::error!(
                "node {to} took over from this node while it was away (takeover --dead-root): \
                 its tables now refuse writes; run `{} resurrect` to save what only this node has and follow {to}",
                cfg.command_hint()
            );
            return Ok(());
        }
    }
    let queue = &node.queue_name;
    c.query_one(
        "SELECT londiste.root_check_seqs($1, $2)",
        &[queue, &cfg.seq_buffer],
    )
    .ctx(|| "cannot publish sequences".into())?;
    if cfg.root_ticker {
        c.query(
            "SELECT pgq.ticker(queue_name) FROM pgq.queue WHERE queue_name = $1 \
             AND NOT queue_external_ticker AND NOT queue_ticker_paused",
            &[queue],
        )
        .ctx(|| "cannot tick the root's queue".into())?;
    }
    Ok(())
}
