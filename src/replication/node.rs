//! A node's own view of itself: the `londiste.node_info` row of its queue, and the
//! table states. Short queries only; the schema is in `sql/londiste.sql`.

use crate::error::{Context, Error, Result};
use postgres::{Client, GenericClient};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub queue_name: String,
    pub node_type: String,
    pub node_name: String,
    pub worker_name: String,
    pub node_location: String,
    pub provider_node: Option<String>,
    pub provider_location: Option<String>,
    pub last_tick_id: Option<i64>,
    pub paused: bool,
    pub cur_error: Option<String>,
    /// On a root handing over (takeover): the node it hands over to.
    pub fenced_to: Option<String>,
    /// The last tick the fenced root took; the new root starts there.
    pub fence_tick: Option<i64>,
}

impl NodeInfo {
    pub fn is_root(&self) -> bool {
        self.node_type == "root"
    }
    pub fn is_branch(&self) -> bool {
        self.node_type == "branch"
    }
}

// The takeover columns are read through jsonb so that a node whose schema an
// older version installed (not upgraded until its own worker or a command
// connects to it) still reads.
const SELECT: &str = "SELECT queue_name, node_type, node_name, worker_name, node_location, provider_node, \
                      provider_location, last_tick_id, paused, cur_error, to_jsonb(n) ->> 'fenced_to', \
                      (to_jsonb(n) ->> 'fence_tick')::bigint FROM londiste.node_info n WHERE queue_name = $1";

/// The node row, or None if this database is not a node of the queue (or has
/// no londiste schema at all).
pub fn load<C: GenericClient>(c: &mut C, queue: &str) -> Result<Option<NodeInfo>> {
    let has = c
        .query_one("SELECT to_regclass('londiste.node_info') IS NOT NULL", &[])
        .ctx(|| "cannot look for the londiste schema".into())?;
    if !has.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = c
        .query_opt(SELECT, &[&queue])
        .ctx(|| "cannot read londiste.node_info".into())?;
    Ok(row.map(|r| NodeInfo {
        queue_name: r.get(0),
        node_type: r.get(1),
        node_name: r.get(2),
        worker_name: r.get(3),
        node_location: r.get(4),
        provider_node: r.get(5),
        provider_location: r.get(6),
        last_tick_id: r.get(7),
        paused: r.get(8),
        cur_error: r.get(9),
        fenced_to: r.get(10),
        fence_tick: r.get(11),
    }))
}

/// Like `load`, but a missing node is an error that says how to create it.
pub fn require<C: GenericClient>(c: &mut C, queue: &str, config: &str) -> Result<NodeInfo> {
    load(c, queue)?.ok_or_else(|| {
        Error::Other(format!(
            "this database is not a node of queue {queue:?} yet: run `{config} create-root NAME` \
             or `{config} create-leaf NAME --provider=CONNSTR` first"
        ))
    })
}

/// One table's replication state on a node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TableState {
    pub table_name: String,
    pub dest_table: Option<String>,
    pub local: bool,
    pub merge_state: Option<String>,
    pub custom_snapshot: Option<String>,
    pub copy_tick: Option<i64>,
    pub skip_truncate: bool,
    pub copy_rows: Option<i64>,
    pub copy_bytes: Option<i64>,
    pub copy_estimate: Option<i64>,
    pub copy_seconds: Option<f64>,
    pub key_columns: Option<Vec<String>>,
    pub copy_error: Option<String>,
    /// A part of a merged table (several queues write into the destination).
    pub merged: bool,
}

pub fn tables<C: GenericClient>(c: &mut C, queue: &str) -> Result<Vec<TableState>> {
    let rows = c
        .query(
            "SELECT table_name, dest_table, local, merge_state, custom_snapshot, copy_tick, skip_truncate,
                    copy_rows, copy_bytes, copy_estimate,
                    extract(epoch FROM coalesce(copy_finished, now()) - copy_started)::float8, key_columns,
                    copy_error, coalesce((to_jsonb(t) ->> 'merged')::bool, false)
               FROM londiste.table_info t WHERE queue_name = $1 ORDER BY table_name",
            &[&queue],
        )
        .ctx(|| "cannot read londiste.table_info".into())?;
    Ok(rows
        .iter()
        .map(|r| TableState {
            table_name: r.get(0),
            dest_table: r.get(1),
            local: r.get(2),
            merge_state: r.get(3),
            custom_snapshot: r.get(4),
            copy_tick: r.get(5),
            skip_truncate: r.get(6),
            copy_rows: r.get(7),
            copy_bytes: r.get(8),
            copy_estimate: r.get(9),
            copy_seconds: r.get(10),
            key_columns: r.get(11),
            copy_error: r.get(12),
            merged: r.get(13),
        })
        .collect())
}

/// Records the last error of a table's copy (NULL clears it), shown by `status`.
pub fn set_copy_error<C: GenericClient>(
    c: &mut C,
    queue: &str,
    table: &str,
    err: Option<&str>,
) -> Result<()> {
    c.execute(
        "UPDATE londiste.table_info SET copy_error = $3
          WHERE queue_name = $1 AND table_name = $2 AND copy_error IS DISTINCT FROM $3",
        &[&queue, &table, &err],
    )
    .ctx(|| format!("cannot record the copy error of {table}"))?;
    Ok(())
}

/// Records the worker's last error (NULL clears it), shown by `status`.
pub fn set_error<C: GenericClient>(c: &mut C, queue: &str, err: Option<&str>) -> Result<()> {
    c.execute(
        "UPDATE londiste.node_info SET cur_error = $2, error_time = CASE WHEN $2 IS NULL THEN NULL ELSE now() END
          WHERE queue_name = $1 AND cur_error IS DISTINCT FROM $2",
        &[&queue, &err],
    )
    .ctx(|| "cannot record the worker error".into())?;
    Ok(())
}

/// The newest tick of the queue in this database; None where there is none
/// (a leaf has no queue of its own).
pub fn newest_tick<C: GenericClient>(c: &mut C, queue: &str) -> Result<Option<i64>> {
    Ok(c.query_one(
        "SELECT max(t.tick_id) FROM pgq.tick t JOIN pgq.queue q ON q.queue_id = t.tick_queue WHERE q.queue_name = $1",
        &[&queue],
    )
    .ctx(|| format!("cannot read the ticks of queue {queue}"))?
    .get(0))
}

/// Whether the node on this connection is the root.
pub fn is_root_at(c: &mut Client, queue: &str) -> Result<bool> {
    Ok(load(c, queue)?.is_some_and(|n| n.is_root()))
}

/// Makes a tick now (when this process may tick the queue) or waits for the
/// ticker to make one; returns its id.
pub fn force_new_tick(c: &mut Client, queue: &str) -> Result<i64> {
    let last: i64 = c
        .query_one("SELECT pgq.force_tick($1)", &[&queue])
        .ctx(|| "cannot force a tick".into())?
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = c.query_one("SELECT pgq.ticker($1)", &[&queue]);
        let cur = newest_tick(c, queue)?.unwrap_or(0);
        if cur > last {
            return Ok(cur);
        }
        if Instant::now() > deadline {
            return Err(Error::Other(
                "no new tick within 30s; is the ticker running?".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
