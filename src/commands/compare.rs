//! `compare`: row count and checksum of each table on the provider and on this
//! node at the same queue position; also the locking and syncing that `repair`
//! shares with it.

use super::Opts;
use super::status::remote;
use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::names::ident;
use crate::replication::node;
use crate::replication::node::{force_new_tick, is_root_at};
use postgres::Client;
use std::time::{Duration, Instant};

/// Row count and checksum of a table over the given columns; of a merged
/// table, `part` = (queue, filter on alias t, $1 = queue) keeps that queue's rows.
fn checksum(
    c: &mut impl postgres::GenericClient,
    table: &str,
    cols: &[String],
    count_only: bool,
    part: Option<(&str, &str)>,
) -> Result<(i64, i64)> {
    let mut sql = if count_only {
        format!("SELECT count(*), 0::int8 FROM ONLY {table} t")
    } else {
        let list: Vec<String> = cols.iter().map(|c| format!("t.{}", ident(c))).collect();
        format!(
            "SELECT count(*), coalesce(sum(hashtext(ROW({})::text)::int8), 0)::int8 FROM ONLY {table} t",
            list.join(", ")
        )
    };
    let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = Vec::new();
    if let Some((queue, filter)) = &part {
        sql.push_str(&format!(" WHERE {filter}"));
        params.push(queue);
    }
    let r = c
        .query_one(sql.as_str(), &params)
        .ctx(|| format!("cannot checksum {table}"))?;
    Ok((r.get(0), r.get(1)))
}

pub fn columns(c: &mut impl postgres::GenericClient, table: &str) -> Result<Vec<String>> {
    let rows = c
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&table],
        )
        .ctx(|| format!("cannot read the columns of {table}"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// compare: for each table, lock it briefly on the provider (writes wait), make a
/// tick, wait until this node has applied it, then checksum both sides.
pub fn compare(cfg: &WorkerConfig, args: &[String], opts: &Opts) -> Result<()> {
    let mut local = db::connect(&cfg.db, "londiste-rs compare")?;
    let me = node::require(&mut local, &cfg.queue_name, &cfg.command_hint())?;
    if me.is_root() {
        return Err(Error::Other(
            "compare runs on a subscriber node: it compares it with its provider".into(),
        ));
    }
    let ploc = me.provider_location.clone().unwrap_or_default();
    let mut p = remote(cfg, &ploc)?;
    let mut ticker = remote(cfg, &ploc)?;
    let mut reader = remote(cfg, &ploc)?;
    let root = is_root_at(&mut p, &cfg.queue_name)?;
    let tables = selected_tables(&mut local, &cfg.queue_name, args)?;
    let mut differ = 0;
    for t in tables {
        if t.merge_state.as_deref() != Some("ok") {
            println!(
                "{}: not in sync yet ({}), skipped",
                t.table_name,
                t.merge_state.as_deref().unwrap_or("waiting for copy")
            );
            differ += 1;
            continue;
        }
        let dest = crate::replication::apply::local_name(&t.table_name, t.dest_table.as_deref())?;
        let src = crate::replication::apply::local_name(&t.table_name, None)?;
        let mut tx = p
            .transaction()
            .ctx(|| "cannot begin on the provider".into())?;
        lock_and_sync(
            cfg,
            &mut tx,
            &mut ticker,
            &mut local,
            &src,
            &t.table_name,
            root,
        )?;
        // Both sides are at the same point now: take a snapshot of each and
        // let the provider go on while the checksums run (at the same time).
        let mut ptx = snapshot_now(&mut reader, "the provider")?;
        let mut ltx = snapshot_now(&mut local, "this node")?;
        tx.commit().ok();
        let scols = columns(&mut ptx, &src)?;
        let dcols = columns(&mut ltx, &dest)?;
        let common: Vec<String> = scols
            .iter()
            .filter(|c| dcols.contains(c))
            .cloned()
            .collect();
        if common.len() != scols.len() || common.len() != dcols.len() {
            println!("{}: comparing common columns only", t.table_name);
        }
        let count_only = opts.count_only;
        // A merged table: this source against the rows it wrote, not all.
        let key: Option<String> = if t.merged {
            Some(
                ltx.query_one("SELECT londiste.merge_part_filter($1, 't')", &[&dest])
                    .ctx(|| format!("cannot read the key of merged table {dest}"))?
                    .get(0),
            )
        } else {
            None
        };
        let part = key.as_deref().map(|k| (cfg.queue_name.as_str(), k));
        let (src_sum, dst_sum) = std::thread::scope(|s| {
            let h = s.spawn(|| checksum(&mut ptx, &src, &common, count_only, None));
            let d = checksum(&mut ltx, &dest, &common, count_only, part);
            (h.join().expect("checksum thread"), d)
        });
        let ((sn, ss), (dn, ds)) = (src_sum?, dst_sum?);
        ptx.commit().ok();
        ltx.commit().ok();
        println!("{}: provider {} rows, checksum={}", t.table_name, sn, ss);
        if t.merged {
            println!(
                "{}: this node {} rows from queue {} (merged into {}), checksum={}",
                t.table_name, dn, cfg.queue_name, dest, ds
            );
        } else {
            println!("{}: this node {} rows, checksum={}", t.table_name, dn, ds);
        }
        if sn != dn || ss != ds {
            println!("{}: Results do not match!", t.table_name);
            differ += 1;
        } else {
            println!("{}: OK", t.table_name);
        }
    }
    if differ > 0 {
        return Err(Error::Other(format!(
            "{differ} table(s) differ or are not in sync"
        )));
    }
    Ok(())
}

/// The node's replicated tables named on the command line (all when none is
/// named); a name that is not replicated here is an error.
pub fn selected_tables(
    local: &mut Client,
    queue: &str,
    args: &[String],
) -> Result<Vec<node::TableState>> {
    let wanted = super::canonical_names(args)?;
    let tables: Vec<node::TableState> = node::tables(local, queue)?
        .into_iter()
        .filter(|t| t.local && (args.is_empty() || wanted.contains(&t.table_name)))
        .collect();
    if let Some(w) = wanted
        .iter()
        .find(|w| !tables.iter().any(|t| &t.table_name == *w))
    {
        return Err(Error::Other(format!(
            "table {w} is not replicated on this node (see the tables command)"
        )));
    }
    Ok(tables)
}

/// Brings the provider's table and this node to the same point, holding it
/// there until `tx` ends.
///
/// A root provider: lock the table (writes to it wait, up to lock_timeout),
/// make a tick that covers every committed change, and wait until this node
/// has applied it. A branch provider cannot tick and must keep applying its
/// own batches, which the table lock would block: instead hold its position
/// (the row its worker locks for each batch), so the branch stands still, and
/// wait until this node has applied the branch's last tick. Both locks go with
/// the connection if this process dies: nothing stays paused.
pub fn lock_and_sync(
    cfg: &WorkerConfig,
    tx: &mut postgres::Transaction,
    ticker: &mut Client,
    local: &mut Client,
    src: &str,
    table_name: &str,
    provider_is_root: bool,
) -> Result<()> {
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        cfg.lock_timeout.as_millis()
    ))
    .ctx(|| "cannot set lock_timeout".into())?;
    let tick = if provider_is_root {
        tx.batch_execute(&format!("LOCK TABLE {src} IN SHARE MODE"))
            .ctx(|| format!("cannot lock {src} on the provider (busy? raise lock_timeout)"))?;
        force_new_tick(ticker, &cfg.queue_name)?
    } else {
        let t: Option<i64> = tx
            .query_one(
                "SELECT last_tick_id FROM londiste.node_info WHERE queue_name = $1 FOR UPDATE",
                &[&cfg.queue_name],
            )
            .ctx(|| "cannot hold the provider's position (busy? raise lock_timeout)".into())?
            .get(0);
        // The branch may be copying the table again (resync): its rows are then
        // no reference. Its copy hands over under the lock held now.
        let state: Option<Option<String>> = tx
            .query_opt(
                "SELECT merge_state FROM londiste.table_info WHERE queue_name = $1 AND table_name = $2 AND local",
                &[&cfg.queue_name, &table_name],
            )
            .ctx(|| "cannot read the provider's table state".into())?
            .map(|r| r.get(0));
        if state.as_ref().and_then(|s| s.as_deref()) != Some("ok") {
            return Err(Error::Other(format!(
                "{table_name} is not in sync on the provider ({}); try again once it is (status)",
                state
                    .flatten()
                    .unwrap_or_else(|| "not replicated there".into())
            )));
        }
        t.unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = node::require(local, &cfg.queue_name, &cfg.command_hint())?;
        if n.last_tick_id.unwrap_or(0) >= tick {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Other(format!(
                "this node did not reach tick {tick} within 120s; is its worker running?"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A read-only transaction whose snapshot is taken now.
pub fn snapshot_now<'a>(c: &'a mut Client, what: &str) -> Result<postgres::Transaction<'a>> {
    let mut tx = c
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .ctx(|| format!("cannot begin on {what}"))?;
    tx.batch_execute("SELECT 1")
        .ctx(|| format!("cannot take a snapshot on {what}"))?;
    Ok(tx)
}
