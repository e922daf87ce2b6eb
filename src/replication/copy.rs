//! Initial copy of a table and its merge with the event stream (one thread per
//! table being copied, at most `parallel_copies`).
//!
//! 1. Register a copy consumer `<worker>.copy.<table>` on the copy source at its
//!    latest tick R, then open a REPEATABLE READ transaction there: its snapshot S
//!    sees everything tick R saw.
//! 2. COPY the rows connection to connection (no temp files, bounded memory) into
//!    the emptied local table, and in the same local transaction record state
//!    `catching-up`, S and copy_tick = R.
//! 3. Catch up: read the copy consumer's batches one tick at a time and apply this
//!    table's events that S did not see, each batch with copy_tick in one local
//!    transaction, until copy_tick equals the main worker's position.
//! 4. Hand over under the node_info row lock the worker also takes per batch: state
//!    `ok`; the worker goes on skipping events S saw until they cannot occur.
//!
//! The copy source is the provider if it has the table in sync, else the nearest
//! node up the chain that has. Tick ids are the same on every node of a set, so the
//! copy consumer can stop exactly at the worker's tick.

use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::names::{ident, split_qualified};
use crate::replication::apply::{Applier, TableRoute, local_name};
use crate::replication::batch::{for_each_chunk, next_batch, prepare_apply_session};
use crate::replication::node;
use crate::replication::record::Snapshot;
use postgres::Client;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub fn copy_consumer(worker: &str, table: &str) -> String {
    format!("{worker}.copy.{table}")
}

/// Finds a node that has `table` in sync: the provider or one above it.
pub fn find_copy_source(
    cfg: &WorkerConfig,
    provider_location: &str,
    table: &str,
) -> Result<String> {
    let mut loc = provider_location.to_string();
    for _ in 0..32 {
        let mut c = db::connect(
            &db::with_extra(&loc, &cfg.remote_extra_connstr),
            "londiste-rs copy",
        )?;
        let ok = c
            .query_opt(
                "SELECT 1 FROM londiste.table_info WHERE queue_name = $1 AND table_name = $2 AND local AND merge_state = 'ok'",
                &[&cfg.queue_name, &table],
            )
            .ctx(|| format!("cannot read table list on {}", db::describe(&loc)))?;
        if ok.is_some() {
            return Ok(loc);
        }
        let up = node::load(&mut c, &cfg.queue_name)?.and_then(|n| n.provider_location);
        match up {
            Some(u) => loc = u,
            None => break,
        }
    }
    Err(Error::Other(format!(
        "table {table} is not in sync on the provider nor above it: add it there first \
         (londiste-rs PROVIDER.ini add-table {table}) and wait for it"
    )))
}

fn stop_err(stop: &AtomicBool) -> Result<()> {
    if stop.load(Ordering::Relaxed) {
        Err(Error::Stopped)
    } else {
        Ok(())
    }
}

/// Runs the copy of one table to the end (state ok), or until stopped.
pub fn run(cfg: &WorkerConfig, table: &str, stop: &AtomicBool) -> Result<()> {
    let queue = cfg.queue_name.clone();
    let mut local = db::connect(&cfg.db, "londiste-rs copy")?;
    prepare_apply_session(&mut local)?;
    let nodeinfo = node::require(&mut local, &queue, &cfg.command_hint())?;
    let provider_loc = nodeinfo
        .provider_location
        .clone()
        .ok_or_else(|| Error::Other("node has no provider".into()))?;
    let consumer = copy_consumer(&nodeinfo.worker_name, table);
    let state = node::tables(&mut local, &queue)?
        .into_iter()
        .find(|t| t.table_name == table)
        .ok_or_else(|| Error::Other(format!("table {table} was removed during its copy")))?;
    let dest = local_name(table, state.dest_table.as_deref())?;
    // --copy-node: copy from that member instead of the nearest in-sync node.
    let copy_node = local
        .query_one(
            "SELECT substring(table_attrs FROM 'copy_node=([^&]+)') FROM londiste.table_info
              WHERE queue_name = $1 AND table_name = $2",
            &[&queue, &table],
        )
        .ctx(|| "cannot read table_info".into())?
        .get::<_, Option<String>>(0);
    let src_loc = match copy_node {
        Some(n) => {
            let loc: Option<String> = local
                .query_opt(
                    "SELECT node_location FROM londiste.node_location WHERE queue_name = $1 AND node_name = $2",
                    &[&queue, &n],
                )
                .ctx(|| "cannot read node_location".into())?
                .map(|r| r.get(0));
            let loc = loc.ok_or_else(|| {
                Error::Other(format!(
                    "--copy-node {n} of {table} is not a member of the set (see members)"
                ))
            })?;
            find_copy_source(cfg, &loc, table)?
        }
        None => find_copy_source(cfg, &provider_loc, table)?,
    };
    let mut src = db::connect(
        &db::with_extra(&src_loc, &cfg.remote_extra_connstr),
        "londiste-rs copy",
    )?;

    if state.merge_state.as_deref() != Some("catching-up") {
        log::info!("copy {table} from {}", db::describe(&src_loc));
        let done = full_copy(
            cfg,
            &mut local,
            &mut src,
            table,
            &dest,
            &consumer,
            state.skip_truncate,
            state.merged,
            stop,
        );
        if let (Err(e), true) = (&done, state.merged) {
            // A key another source wrote: say which, not just "duplicate key".
            let msg = e.to_string();
            if let Some(i) = msg.find("Key (")
                && let Some(j) = msg[i..].find(" already exists.")
            {
                let detail = &msg[i..i + j + " already exists.".len()];
                if let Some(c) = crate::replication::merge::copy_conflict(
                    &mut local, table, &dest, &queue, detail,
                ) {
                    return Err(c);
                }
            }
        }
        done?;
    }
    catch_up(
        &mut local,
        &mut src,
        &queue,
        table,
        &dest,
        &consumer,
        cfg.merge_truncate,
        stop,
    )?;
    // Statistics for the planner, after the hand-over: not on the way to "ok".
    if let Err(e) = local.batch_execute(&format!("ANALYZE {dest}")) {
        log::warn!(
            "cannot analyze {dest} after its copy: {}",
            crate::error::pg_message(&e)
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn full_copy(
    cfg: &WorkerConfig,
    local: &mut Client,
    src: &mut Client,
    table: &str,
    dest: &str,
    consumer: &str,
    skip_truncate: bool,
    merged: bool,
    stop: &AtomicBool,
) -> Result<()> {
    let queue = &cfg.queue_name;
    // Register the copy consumer at the source's latest tick.
    let tick = node::newest_tick(src, queue)?.ok_or_else(|| {
        Error::Other(format!(
            "the copy source has no ticks of queue {queue} (a leaf?): copy from a node above this one"
        ))
    })?;
    src.query_one(
        "SELECT pgq.register_consumer_at($1, $2, $3)",
        &[queue, &consumer, &tick],
    )
    .ctx(|| format!("cannot register copy consumer {consumer}"))?;
    local
        .execute(
            "UPDATE londiste.table_info SET merge_state = 'in-copy', copy_started = now(), copy_finished = NULL,
                    copy_rows = 0, copy_bytes = 0 WHERE queue_name = $1 AND table_name = $2",
            &[queue, &table],
        )
        .ctx(|| "cannot mark the table in-copy".into())?;

    let (s, t) = split_qualified(table)?;
    let src_table = format!("{}.{}", ident(&s), ident(&t));
    let mut stx = src
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .ctx(|| "cannot begin the copy transaction on the source".into())?;
    let snapshot: String = stx
        .query_one("SELECT txid_current_snapshot()::text", &[])
        .ctx(|| "cannot take the copy snapshot".into())?
        .get(0);
    let src_cols = columns(&mut stx, &src_table).map_err(|e| match e {
        Error::Db(m) => Error::Other(format!(
            "cannot copy {table} from the provider: {m}; if it was dropped there, remove it here ({} remove-table {table})", cfg.command_hint()
        )),
        other => other,
    })?;
    let estimate: i64 = stx
        .query_one(
            "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = $1::text::regclass",
            &[&src_table],
        )
        .map(|r| r.get(0))
        .unwrap_or(0);

    let mut ltx = local
        .transaction()
        .ctx(|| "cannot begin the local copy transaction".into())?;
    let dst_cols = columns(&mut ltx, dest).map_err(|_| {
        Error::Other(format!(
            "table {dest} does not exist on this node; create it, or re-add with --create"
        ))
    })?;
    // A column generated on the provider but plain here (an older server
    // here, or a table made that way) is copied like any other: its events
    // carry the value too. One generated here is computed here, as apply
    // does (a newer server here that computes what the old one stored).
    let is_plain = |c: &String| dst_cols.iter().any(|(d, g)| d == c && !g);
    let common: Vec<String> = src_cols
        .iter()
        .filter(|(c, _)| is_plain(c))
        .map(|(c, _)| c.clone())
        .collect();
    for (c, generated) in &src_cols {
        if !generated && !dst_cols.iter().any(|(d, _)| d == c) {
            return Err(Error::Other(format!(
                "table {dest} on this node has no column \"{c}\" that {table} has on the provider; add it, and the copy restarts"
            )));
        }
    }
    let local_major = crate::version::server_version_num(&mut ltx)? / 10000;
    crate::version::check_types_fit(&mut stx, &src_table, table, local_major)?;
    let dropped: i32 = ltx
        .query_one(
            "SELECT londiste.drop_table_fkeys($1::text::regclass)",
            &[&dest],
        )
        .ctx(|| format!("cannot drop the foreign keys of {dest} for the copy"))?
        .get(0);
    if dropped > 0 {
        log::info!(
            "{dest}: {dropped} foreign key(s) dropped for the copy; restored when all tables are in sync"
        );
    }
    // A partitioned table (10+) holds no rows itself: ONLY would copy none
    // out of one and refuses to truncate one, so its partitions go along.
    let is_partitioned = |c: &mut postgres::Transaction, t: &str| -> Result<bool> {
        Ok(c.query_one(
            "SELECT relkind = 'p' FROM pg_class WHERE oid = $1::text::regclass",
            &[&t],
        )
        .ctx(|| format!("cannot look up {t}"))?
        .get(0))
    };
    let partitioned = is_partitioned(&mut ltx, dest)?;
    let src_only = if is_partitioned(&mut stx, &src_table)? {
        ""
    } else {
        "ONLY "
    };
    // A merged table is emptied only by the first source's copy; a later one
    // replaces its own rows and leaves the other sources' alone.
    let truncate = if merged {
        crate::replication::merge::prepare_copy(&mut ltx, queue, dest)?
    } else {
        !skip_truncate
    };
    if truncate {
        let only = if partitioned { "" } else { "ONLY " };
        ltx.batch_execute(&format!("TRUNCATE {only}{dest} CASCADE"))
            .ctx(|| format!("cannot truncate {dest}"))?;
    }
    let collist: Vec<String> = common.iter().map(|c| ident(c)).collect();
    let collist = collist.join(", ");
    let started = Instant::now();
    let rows = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    {
        let mut reader = stx
            .copy_out(&format!(
                "COPY (SELECT {collist} FROM {src_only}{src_table}) TO STDOUT"
            ))
            .ctx(|| format!("cannot COPY {table} out of the source"))?;
        // Rows of a table truncated in this transaction can be written frozen:
        // no hint-bit writes or freezing vacuum later. Not for partitioned tables.
        let freeze = if !truncate || partitioned {
            ""
        } else {
            " (FREEZE)"
        };
        let mut writer = ltx
            .copy_in(&format!("COPY {dest} ({collist}) FROM STDIN{freeze}"))
            .ctx(|| format!("cannot COPY into {dest}"))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut last_report = Instant::now();
        let mut progress = db::connect(&cfg.db, "londiste-rs copy progress").ok();
        loop {
            stop_err(stop)?;
            let n = reader
                .read(&mut buf)
                .ctx(|| format!("reading {table} from the source"))?;
            if n == 0 {
                break;
            }
            writer
                .write_all(&buf[..n])
                .ctx(|| format!("writing {dest}"))?;
            rows.fetch_add(
                buf[..n].iter().filter(|b| **b == b'\n').count() as u64,
                Ordering::Relaxed,
            );
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            if last_report.elapsed() > Duration::from_secs(2) {
                last_report = Instant::now();
                let (r, b) = (
                    rows.load(Ordering::Relaxed) as i64,
                    bytes.load(Ordering::Relaxed) as i64,
                );
                if let Some(p) = progress.as_mut() {
                    let _ = p.execute(
                        "UPDATE londiste.table_info SET copy_rows = $3, copy_bytes = $4, copy_estimate = $5
                          WHERE queue_name = $1 AND table_name = $2",
                        &[queue, &table, &r, &b, &estimate],
                    );
                }
                let rate = r as f64 / started.elapsed().as_secs_f64();
                let eta = if estimate > r && rate > 0.0 {
                    (estimate - r) as f64 / rate
                } else {
                    0.0
                };
                log::info!(
                    "copy {table}: {r} rows, {} MB, {rate:.0} rows/s, ETA {eta:.0}s",
                    b / 1_000_000
                );
            }
        }
        writer
            .finish()
            .ctx(|| format!("cannot finish COPY into {dest}"))?;
    }
    let (r, b) = (
        rows.load(Ordering::Relaxed) as i64,
        bytes.load(Ordering::Relaxed) as i64,
    );
    if merged {
        crate::replication::merge::claim_copied(&mut ltx, queue, dest)?;
    }
    ltx.execute(
        "UPDATE londiste.table_info SET merge_state = 'catching-up', custom_snapshot = $3, copy_tick = $4,
                copy_rows = $5, copy_bytes = $6, copy_estimate = $7, copy_finished = now()
          WHERE queue_name = $1 AND table_name = $2",
        &[queue, &table, &snapshot, &tick, &r, &b, &estimate],
    )
    .ctx(|| "cannot record the copy".into())?;
    ltx.commit()
        .ctx(|| format!("cannot commit the copy of {table}"))?;
    stx.commit().ok();
    log::info!(
        "copied {table}: {r} rows, {} bytes in {:.1}s",
        b,
        started.elapsed().as_secs_f64()
    );
    // Make the next tick come now: the hand-over waits for ticks on idle queues.
    let _ = src.query("SELECT pgq.force_tick(queue_name) FROM pgq.queue WHERE queue_name = $1 AND NOT queue_external_ticker", &[queue]);
    Ok(())
}

/// The columns of a table, each with whether it is generated (12+).
fn columns<C: postgres::GenericClient>(c: &mut C, table: &str) -> Result<Vec<(String, bool)>> {
    let generated = crate::version::attgenerated_expr(crate::version::server_version_num(c)?, "a");
    let rows = c
        .query(
            &format!(
                "SELECT attname::text, {generated} FROM pg_attribute a WHERE attrelid = $1::text::regclass
                    AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
            ),
            &[&table],
        )
        .ctx(|| format!("cannot read the columns of {table}"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[allow(clippy::too_many_arguments)]
fn catch_up(
    local: &mut Client,
    src: &mut Client,
    queue: &str,
    table: &str,
    dest: &str,
    consumer: &str,
    merge_truncate: bool,
    stop: &AtomicBool,
) -> Result<()> {
    let mut applier = Applier::new();
    loop {
        stop_err(stop)?;
        let state = node::tables(local, queue)?
            .into_iter()
            .find(|t| t.table_name == table)
            .ok_or_else(|| Error::Other(format!("table {table} was removed during its copy")))?;
        let copy_tick = state
            .copy_tick
            .ok_or_else(|| Error::Other(format!("{table}: catching up without copy_tick")))?;
        let snapshot = Snapshot::parse(state.custom_snapshot.as_deref().unwrap_or(""))?;
        let main: Option<i64> = local
            .query_one(
                "SELECT last_tick_id FROM londiste.node_info WHERE queue_name = $1",
                &[&queue],
            )
            .ctx(|| "cannot read node position".into())?
            .get(0);
        let main = main.unwrap_or(0);
        // Hand over only once no later batch can hold a transaction the copy
        // saw: then the worker needs no filter, which matters because its events
        // may come from another node (a branch) whose txids differ from the copy
        // source's.
        let settled = copy_tick == main
            && crate::replication::batch::tick_snapshot(src, queue, copy_tick)?.covers(&snapshot);
        if settled {
            let mut tx = local
                .transaction()
                .ctx(|| "cannot begin hand-over".into())?;
            let pos: Option<i64> = tx
                .query_one(
                    "SELECT last_tick_id FROM londiste.node_info WHERE queue_name = $1 FOR UPDATE",
                    &[&queue],
                )
                .ctx(|| "cannot lock node_info".into())?
                .get(0);
            if pos == Some(copy_tick) {
                tx.execute(
                    "UPDATE londiste.table_info SET merge_state = 'ok', copy_tick = NULL, custom_snapshot = NULL
                      WHERE queue_name = $1 AND table_name = $2",
                    &[&queue, &table],
                )
                .ctx(|| "cannot hand the table over".into())?;
                tx.commit().ctx(|| "cannot commit the hand-over".into())?;
                let _ = src.query_one(
                    "SELECT pgq.unregister_consumer($1, $2)",
                    &[&queue, &consumer],
                );
                log::info!("table {table} is in sync (tick {copy_tick})");
                return Ok(());
            }
            continue;
        }
        if copy_tick > main {
            // The worker is behind the copy; it will get here.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let Some(batch) = next_batch(src, queue, consumer, None)? else {
            let _ = src.query("SELECT pgq.force_tick(queue_name) FROM pgq.queue WHERE queue_name = $1 AND NOT queue_external_ticker", &[&queue]);
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if batch.prev_tick != copy_tick {
            if batch.cur_tick == copy_tick {
                src.query_one("SELECT pgq.finish_batch($1)", &[&batch.id])
                    .ctx(|| "cannot finish batch".into())?;
                continue;
            }
            return Err(Error::Other(format!(
                "copy of {table} lost its position (batch {}..{}, copy at {copy_tick}); resync the table",
                batch.prev_tick, batch.cur_tick
            )));
        }
        let mut tx = local.transaction().ctx(|| "cannot begin catch-up".into())?;
        let route_snapshot = snapshot.clone();
        let merge = state.merged.then(|| crate::replication::merge::MergePart {
            queue: queue.to_string(),
            truncate: merge_truncate,
        });
        let dest_s = dest.to_string();
        let route = move |t: &str| {
            (t == table).then(|| TableRoute {
                dest: dest_s.clone(),
                skip_snapshot: Some(route_snapshot.clone()),
                merge: merge.clone(),
            })
        };
        let never = || stop.load(Ordering::Relaxed);
        for_each_chunk(src, batch.id, &never, &mut |events| {
            let mut special =
                |_: &mut postgres::Transaction, _: &crate::replication::apply::Event| Ok(());
            applier.apply_chunk(&mut tx, events, &route, &mut special)
        })?;
        tx.execute(
            "UPDATE londiste.table_info SET copy_tick = $3 WHERE queue_name = $1 AND table_name = $2 AND copy_tick = $4",
            &[&queue, &table, &batch.cur_tick, &copy_tick],
        )
        .ctx(|| "cannot store copy position".into())?;
        tx.commit().ctx(|| "cannot commit catch-up batch".into())?;
        src.query_one("SELECT pgq.finish_batch($1)", &[&batch.id])
            .ctx(|| "cannot finish batch".into())?;
    }
}
