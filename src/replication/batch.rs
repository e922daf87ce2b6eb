//! Reading a batch from the provider: the next batch and its tick snapshot,
//! events fetched in chunks sized by their bytes, and the event-level helpers
//! the worker and the copy share.

use crate::error::{Context, Error, Result};
use crate::replication::apply::{Event, TableRoute};
use crate::replication::record::Snapshot;
use postgres::{Client, Transaction};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Events fetched from the provider per round trip: adapted to the events'
/// size so that one fetch holds about a quarter of CHUNK_BYTES (a multi-row
/// event can be 100 kB, a single-row one 100 bytes, one holding a huge value
/// 100 MB). A batch starts with one event and the fetch grows at most 8-fold
/// a step, so a batch of huge events is read one at a time.
const FETCH_MIN: usize = 1;

const FETCH_MAX: usize = 2_000;

const FETCH_FIRST: usize = 1;

const FETCH_GROWTH: usize = 8;

/// A chunk handed to the applier closes at this many events or bytes of row
/// text, whichever comes first: this bounds the worker's memory whether the
/// events carry one row or a thousand.
const CHUNK_EVENTS: usize = 10_000;

const CHUNK_BYTES: usize = 4 << 20;

/// What a batch looked like, from `pgq.next_batch_*`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub id: i64,
    pub cur_tick: i64,
    pub prev_tick: i64,
    pub cur_time: String,
    pub cur_seq: i64,
}

/// Asks the provider for the next batch of `consumer`.
pub fn next_batch(
    p: &mut Client,
    queue: &str,
    consumer: &str,
    max_events: Option<i64>,
) -> Result<Option<Batch>> {
    let row = match max_events {
        Some(m) => p.query_one(
            "SELECT batch_id, cur_tick_id, prev_tick_id, cur_tick_time::text, cur_tick_event_seq
               FROM pgq.next_batch_max($1, $2, $3)",
            &[&queue, &consumer, &m],
        ),
        None => p.query_one(
            "SELECT batch_id, cur_tick_id, prev_tick_id, cur_tick_time::text, cur_tick_event_seq
               FROM pgq.next_batch_info($1, $2)",
            &[&queue, &consumer],
        ),
    }
    .ctx(|| format!("cannot get the next batch of {consumer} on the provider"))?;
    let id: Option<i64> = row.get(0);
    Ok(id.map(|id| Batch {
        id,
        cur_tick: row.get(1),
        prev_tick: row.get(2),
        cur_time: row.get(3),
        cur_seq: row.get(4),
    }))
}

/// The snapshot of a tick on the provider.
pub fn tick_snapshot(p: &mut Client, queue: &str, tick: i64) -> Result<Snapshot> {
    let row = p
        .query_one(
            "SELECT t.tick_snapshot::text FROM pgq.tick t JOIN pgq.queue q ON q.queue_id = t.tick_queue
              WHERE q.queue_name = $1 AND t.tick_id = $2",
            &[&queue, &tick],
        )
        .ctx(|| format!("cannot read tick {tick} on the provider"))?;
    Snapshot::parse(&row.get::<_, String>(0))
}

/// Streams a batch's events from the provider in chunks (CHUNK_EVENTS, CHUNK_BYTES) and hands each
/// chunk to `f`. A scoped reader thread fetches the next chunk (in a read
/// transaction on the provider, through a portal) while `f` applies the current
/// one, so fetching and applying overlap; at most two chunks are in memory,
/// and a chunk with an event bigger than CHUNK_BYTES is the only one.
pub fn for_each_chunk(
    p: &mut Client,
    batch_id: i64,
    stop: &(dyn Fn() -> bool + Sync),
    f: &mut dyn FnMut(&[Event]) -> Result<()>,
) -> Result<()> {
    let name = format!("{}.read", std::thread::current().name().unwrap_or("worker"));
    std::thread::scope(|scope| {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<Event>>(1);
        let (ack_tx, ack_rx) = crossbeam_channel::unbounded::<()>();
        let reader = std::thread::Builder::new()
            .name(name)
            .spawn_scoped(scope, move || read_batch(p, batch_id, stop, &tx, &ack_rx))
            .map_err(|e| Error::Io(format!("cannot start the batch reader thread: {e}")))?;
        let (mut t_apply, mut n) = (Duration::ZERO, 0usize);
        let mut applied: Result<()> = Ok(());
        for events in rx.iter() {
            let t0 = Instant::now();
            n += events.len();
            applied = f(&events);
            drop(events);
            let _ = ack_tx.send(());
            t_apply += t0.elapsed();
            if applied.is_err() {
                break;
            }
        }
        // Dropping the receiver makes a blocked reader give up.
        drop(rx);
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(Error::Other("batch reader thread panicked".into())));
        log::debug!("batch {batch_id}: {n} events, apply {t_apply:?}");
        applied?;
        read
    })
}

fn read_batch(
    p: &mut Client,
    batch_id: i64,
    stop: &(dyn Fn() -> bool + Sync),
    out: &crossbeam_channel::Sender<Vec<Event>>,
    applied: &crossbeam_channel::Receiver<()>,
) -> Result<()> {
    let (mut sent, mut acked) = (0usize, 0usize);
    let mut ptx = p
        .transaction()
        .ctx(|| "cannot begin a read transaction on the provider".into())?;
    // The batch is sorted by ev_id; let a large batch sort in memory.
    ptx.batch_execute("SET LOCAL work_mem = '64MB'")
        .ctx(|| "cannot set work_mem on the provider".into())?;
    let sql: String = ptx
        .query_one("SELECT pgq.batch_event_sql($1)", &[&batch_id])
        .ctx(|| format!("cannot read batch {batch_id}"))?
        .get(0);
    // A huge ev_data comes in pieces (its length in characters instead of the
    // value): received whole, it would be in memory twice, once in the
    // connection's buffer and once as the event's string.
    let piece_sql = format!("SELECT substr(ev_data, $2, $3) FROM ({sql}) ev WHERE ev_id = $1");
    let sql = format!(
        "SELECT ev_id, ev_time::text, ev_txid, ev_retry, ev_type,
                CASE WHEN octet_length(ev_data) > {PIECE} THEN NULL ELSE ev_data END,
                ev_extra1, ev_extra2, ev_extra3, ev_extra4,
                CASE WHEN octet_length(ev_data) > {PIECE} THEN length(ev_data) END,
                CASE WHEN octet_length(ev_data) > {PIECE} THEN octet_length(ev_data) END
           FROM ({sql}) ev"
    );
    let portal = ptx
        .bind(sql.as_str(), &[])
        .ctx(|| format!("cannot open batch {batch_id}"))?;
    let mut chunk: Vec<Event> = Vec::new();
    let mut bytes = 0usize;
    let mut fetch = FETCH_FIRST;
    loop {
        if stop() {
            return Err(Error::Stopped);
        }
        let rows = ptx
            .query_portal(&portal, fetch as i32)
            .ctx(|| format!("cannot fetch events of batch {batch_id}"))?;
        let last = rows.len() < fetch;
        let before = bytes;
        for r in &rows {
            let ev = Event {
                id: r.get(0),
                time: r.get(1),
                txid: r.get(2),
                retry: r.get(3),
                ev_type: r.get(4),
                data: match r.get::<_, Option<i32>>(10) {
                    None => r.get(5),
                    Some(chars) => Some(read_pieces(
                        &mut ptx,
                        &piece_sql,
                        r.get(0),
                        chars,
                        r.get(11),
                    )?),
                },
                extra1: r.get(6),
                extra2: r.get(7),
                extra3: r.get(8),
                extra4: r.get(9),
            };
            bytes += ev.data.as_ref().map_or(0, |d| d.len());
            chunk.push(ev);
        }
        if !rows.is_empty() {
            let avg = ((bytes - before) / rows.len()).max(1);
            fetch = (CHUNK_BYTES / 4 / avg).clamp(FETCH_MIN, (fetch * FETCH_GROWTH).min(FETCH_MAX));
        }
        // The events own copies of the values: free the raw rows before the
        // chunk goes to the applier.
        drop(rows);
        if (last || chunk.len() >= CHUNK_EVENTS || bytes >= CHUNK_BYTES) && !chunk.is_empty() {
            let big = bytes > CHUNK_BYTES;
            bytes = 0;
            if out.send(std::mem::take(&mut chunk)).is_err() {
                // The applier failed; its error is the one to report.
                return Ok(());
            }
            sent += 1;
            // A chunk over the limit holds a huge event: read on only once it
            // is applied, so that one huge value is in memory once, not three
            // times (in the channel, being applied, being fetched).
            while big && acked < sent {
                if applied.recv().is_err() {
                    return Ok(());
                }
                acked += 1;
            }
        }
        if last {
            break;
        }
    }
    ptx.commit()
        .ctx(|| "cannot end the read transaction on the provider".into())?;
    Ok(())
}

/// Values above this many bytes are fetched in pieces of this many characters.
const PIECE: i32 = 8 << 20;

/// Reads one huge ev_data piece by piece into a string of its exact size.
fn read_pieces(
    ptx: &mut Transaction,
    sql: &str,
    id: i64,
    chars: i32,
    bytes: i32,
) -> Result<String> {
    let mut out = String::with_capacity(bytes.max(0) as usize);
    let mut from = 1;
    while from <= chars {
        let row = ptx
            .query_one(sql, &[&id, &from, &PIECE])
            .ctx(|| format!("cannot read event {id} from the provider"))?;
        out.push_str(row.get::<_, Option<&str>>(0).unwrap_or(""));
        from += PIECE;
    }
    Ok(out)
}

/// Session setup for applying: triggers of ours stay quiet (londiste.replay), and
/// replica mode when the role may set it (then user triggers and foreign keys do
/// not fire either, as with Skytools). Returns whether replica mode is on.
///
/// Commits are durable whatever the server's default: a batch is finished on
/// the provider right after the local commit, so an asynchronous commit lost in
/// a crash of this server would leave the node behind the provider's position
/// for good ("lost position").
pub fn prepare_apply_session(c: &mut Client) -> Result<bool> {
    c.batch_execute("SET londiste.replay = 'on'; SET synchronous_commit = on")
        .ctx(|| "cannot set londiste.replay and synchronous_commit".into())?;
    Ok(c.batch_execute("SET session_replication_role = 'replica'")
        .is_ok())
}

/// Does any foreign key reference, or come from, a replicated table? Then events
/// are applied strictly in queue order.
pub(super) fn has_foreign_keys(
    tx: &mut Transaction,
    routes: &HashMap<String, TableRoute>,
) -> Result<bool> {
    if routes.is_empty() {
        return Ok(false);
    }
    let names: Vec<String> = routes.values().map(|r| r.dest.clone()).collect();
    let row = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint c
                             WHERE c.contype = 'f'
                               AND (c.conrelid = ANY (SELECT to_regclass(n)::oid FROM unnest($1::text[]) n)
                                 OR c.confrelid = ANY (SELECT to_regclass(n)::oid FROM unnest($1::text[]) n)))",
            &[&names],
        )
        .ctx(|| "cannot look for foreign keys".into())?;
    Ok(row.get(0))
}

/// Branch: copy the provider's events into the local queue with their ids.
pub(super) fn copy_events(tx: &mut Transaction, table: &str, events: &[Event]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    let times: Vec<&str> = events.iter().map(|e| e.time.as_str()).collect();
    let retries: Vec<Option<i32>> = events.iter().map(|e| e.retry).collect();
    let types: Vec<&str> = events.iter().map(|e| e.ev_type.as_str()).collect();
    let data: Vec<Option<&str>> = events.iter().map(|e| e.data.as_deref()).collect();
    let e1: Vec<Option<&str>> = events.iter().map(|e| e.extra1.as_deref()).collect();
    let e2: Vec<Option<&str>> = events.iter().map(|e| e.extra2.as_deref()).collect();
    let e3: Vec<Option<&str>> = events.iter().map(|e| e.extra3.as_deref()).collect();
    let e4: Vec<Option<&str>> = events.iter().map(|e| e.extra4.as_deref()).collect();
    let sql = format!(
        "INSERT INTO {table} (ev_id, ev_time, ev_retry, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)
         SELECT * FROM unnest($1::bigint[], $2::text[]::timestamptz[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[])"
    );
    tx.execute(
        &sql,
        &[&ids, &times, &retries, &types, &data, &e1, &e2, &e3, &e4],
    )
    .ctx(|| "cannot copy events into the local queue".into())?;
    Ok(())
}

/// Events that are not row changes: sequence updates; the rest pass through.
pub(super) fn handle_special(
    tx: &mut Transaction,
    queue: &str,
    ev: &Event,
    done: &mut Vec<String>,
) -> Result<()> {
    if ev.ev_type == "londiste.update-seq" {
        let (Some(seq), Some(val)) = (ev.extra1.as_deref(), ev.data.as_deref()) else {
            return Ok(());
        };
        let val: i64 = val.parse().unwrap_or(0);
        let local: Option<bool> = tx
            .query_opt(
                "SELECT local FROM londiste.seq_info WHERE queue_name = $1 AND seq_name = $2",
                &[&queue, &seq],
            )
            .ctx(|| "cannot read seq_info".into())?
            .map(|r| r.get(0));
        if local == Some(true) {
            tx.query_one(
                "SELECT londiste.seq_push($1::text::regclass, $2)",
                &[&seq, &val],
            )
            .ctx(|| format!("[ev_id={}] cannot move sequence {} to {}", ev.id, seq, val))?;
            tx.execute(
                "UPDATE londiste.seq_info SET last_value = $3 WHERE queue_name = $1 AND seq_name = $2",
                &[&queue, &seq, &val],
            )
            .ctx(|| "cannot update seq_info".into())?;
            done.push(seq.to_string());
        }
    } else if ev.ev_type == "EXECUTE" {
        super::execute::apply_event(tx, queue, ev)?;
    } else if ev.ev_type == "londiste.member" {
        // A node joined or moved (create-branch/leaf, takeover): every node
        // keeps the full member list, which failover and takeover --all need.
        let (Some(name), Some(loc)) = (ev.data.as_deref(), ev.extra1.as_deref()) else {
            return Ok(());
        };
        tx.execute(
            "INSERT INTO londiste.node_location (queue_name, node_name, node_location, node_type, provider_node, dead)
             VALUES ($1, $2, $3, $4, $5, coalesce($6 = 't', false))
             ON CONFLICT (queue_name, node_name) DO UPDATE SET node_location = EXCLUDED.node_location,
                 node_type = EXCLUDED.node_type, provider_node = EXCLUDED.provider_node, dead = EXCLUDED.dead",
            &[&queue, &name, &loc, &ev.extra2, &ev.extra3, &ev.extra4],
        )
        .ctx(|| format!("[ev_id={}] cannot record member {name}", ev.id))?;
    } else {
        log::debug!(
            "[ev_id={}] passing over event of type {}",
            ev.id,
            ev.ev_type
        );
    }
    Ok(())
}
