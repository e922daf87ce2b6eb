//! The replication worker of one node (`worker` command).
//!
//! Root: publishes sequence values ahead of use and otherwise waits.
//! Branch and leaf: read the provider's batches and apply them. A batch's rows and
//! the node's new position (`node_info.last_tick_id`) commit in one subscriber
//! transaction, then the batch is finished on the provider: after a crash between
//! the two, the same batch comes back and is recognised as done. A branch also
//! copies every event into its own queue and creates the same tick, so others can
//! subscribe to it. New tables are copied by copy threads (see `copy.rs`).

use crate::apply::{Applier, Event, TableRoute, local_name};
use crate::config::WorkerConfig;
use crate::copy;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::node::{self, NodeInfo};
use crate::record::Snapshot;
use crate::signals::Control;
use crossbeam_channel::Receiver;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Transaction};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
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
/// one, so fetching and applying overlap; at most two chunks are in memory.
pub fn for_each_chunk(
    p: &mut Client,
    batch_id: i64,
    stop: &(dyn Fn() -> bool + Sync),
    f: &mut dyn FnMut(&[Event]) -> Result<()>,
) -> Result<()> {
    let name = format!("{}.read", std::thread::current().name().unwrap_or("worker"));
    std::thread::scope(|scope| {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<Event>>(1);
        let reader = std::thread::Builder::new()
            .name(name)
            .spawn_scoped(scope, move || read_batch(p, batch_id, stop, &tx))
            .map_err(|e| Error::Io(format!("cannot start the batch reader thread: {e}")))?;
        let (mut t_apply, mut n) = (Duration::ZERO, 0usize);
        let mut applied: Result<()> = Ok(());
        for events in rx.iter() {
            let t0 = Instant::now();
            n += events.len();
            applied = f(&events);
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
) -> Result<()> {
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
    let sql = format!(
        "SELECT ev_id, ev_time::text, ev_txid, ev_retry, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4 FROM ({sql}) ev"
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
                data: r.get(5),
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
            bytes = 0;
            if out.send(std::mem::take(&mut chunk)).is_err() {
                // The applier failed; its error is the one to report.
                return Ok(());
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

struct CopyHandle {
    handle: JoinHandle<Result<()>>,
    stop: Arc<AtomicBool>,
}

pub struct Worker {
    cfg: WorkerConfig,
    local: Option<Client>,
    provider: Option<Client>,
    applier: Applier,
    replica_mode: bool,
    copies: HashMap<String, CopyHandle>,
    copy_retry_at: HashMap<String, Instant>,
    /// A stop or reload that arrived during a batch, acted on after it.
    after_batch: Option<Control>,
    /// Failing since: how many attempts failed, since when.
    failing: Option<(u32, Instant)>,
    stats_at: Instant,
    batches: u64,
    last_lag: f64,
}

impl Worker {
    pub fn new(cfg: WorkerConfig) -> Worker {
        Worker {
            cfg,
            local: None,
            provider: None,
            applier: Applier::new(),
            replica_mode: false,
            copies: HashMap::new(),
            copy_retry_at: HashMap::new(),
            after_batch: None,
            failing: None,
            stats_at: Instant::now(),
            batches: 0,
            last_lag: 0.0,
        }
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
    }

    fn local(&mut self) -> Result<&mut Client> {
        if self.local.is_none() {
            let mut c = db::connect(
                &self.cfg.db,
                &format!("londiste-rs {}", self.cfg.common.job_name),
            )?;
            crate::install::upgrade_if_installed(&mut c)?;
            self.replica_mode = prepare_apply_session(&mut c)?;
            self.local = Some(c);
        }
        Ok(self.local.as_mut().unwrap())
    }

    fn provider(&mut self, node: &NodeInfo) -> Result<&mut Client> {
        if self.provider.is_none() {
            let loc = node.provider_location.clone().ok_or_else(|| {
                Error::Other(
                    "this node has no provider location; recreate it with --provider".into(),
                )
            })?;
            let mut c = db::connect(
                &db::with_extra(&loc, &self.cfg.remote_extra_connstr),
                "londiste-rs worker",
            )?;
            c.batch_execute("LISTEN pgq_tick")
                .ctx(|| "cannot LISTEN on the provider".into())?;
            self.provider = Some(c);
        }
        Ok(self.provider.as_mut().unwrap())
    }

    /// Main loop: work while there are batches, wait for a tick otherwise; errors
    /// are logged, recorded for `status`, and retried after a growing pause.
    pub fn run(&mut self, ctl: &Receiver<Control>, ticks: Option<&Receiver<()>>) -> Result<()> {
        log::info!("worker for queue {} starting", self.cfg.queue_name);
        let mut backoff = Duration::from_secs(1);
        loop {
            let res = self.iteration(ctl);
            match res {
                Ok(true) => {
                    backoff = Duration::from_secs(1);
                    self.log_recovery();
                    match self.after_batch.take() {
                        Some(Control::Reload) => {
                            self.stop_copies();
                            return Ok(());
                        }
                        Some(_) => {
                            self.stop_copies();
                            return Err(Error::Stopped);
                        }
                        None => {}
                    }
                    if let Some(c) = self.poll_control(ctl)? {
                        return c;
                    }
                }
                Ok(false) => {
                    backoff = Duration::from_secs(1);
                    self.log_recovery();
                    if self.cfg.loop_delay <= 0.0 {
                        self.stop_copies();
                        return Ok(());
                    }
                    if let Some(c) = self.wait(ctl, ticks)? {
                        return c;
                    }
                }
                Err(Error::Stopped) => {
                    self.stop_copies();
                    return Err(Error::Stopped);
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.log_failure(&msg);
                    if e.is_transient() {
                        self.local = None;
                        self.provider = None;
                    }
                    // Shown by status and node-info; when this node's own
                    // database is the one down, it cannot be, and the log has it.
                    self.record_error(&msg);
                    self.applier.reset();
                    if let Some(c) = self.sleep(ctl, backoff)? {
                        return c;
                    }
                    backoff =
                        (backoff * 2).min(self.cfg.exception_sleep.max(Duration::from_secs(1)));
                }
            }
        }
    }

    /// Every attempt is logged (the backoff grows to exception_sleep, 20 s by
    /// default); the count goes into the line that reports the recovery.
    fn log_failure(&mut self, msg: &str) {
        log::error!("{msg}");
        match &mut self.failing {
            Some((n, _)) => *n += 1,
            None => self.failing = Some((1, Instant::now())),
        }
    }

    fn log_recovery(&mut self) {
        let Some((n, since)) = self.failing.take() else {
            return;
        };
        if n > 1 {
            log::info!(
                "working again after {n} failed attempts in {:.0}s",
                since.elapsed().as_secs_f64()
            );
        }
        // A batch clears the recorded error when it commits; an idle node
        // would otherwise show a cured error until the next one.
        let q = self.cfg.queue_name.clone();
        if let Ok(c) = self.local()
            && let Err(e) = node::set_error(c, &q, None)
        {
            log::debug!("cannot clear the recorded error: {e}");
        }
    }

    fn record_error(&mut self, msg: &str) {
        let q = self.cfg.queue_name.clone();
        if let Ok(c) = self.local()
            && let Err(e) = node::set_error(c, &q, Some(msg))
        {
            log::debug!("cannot record error: {e}");
        }
    }

    fn stop_copies(&mut self) {
        for (_, c) in self.copies.drain() {
            c.stop.store(true, Ordering::Relaxed);
            let _ = c.handle.join();
        }
    }

    /// Handles a pending control message. Some(result) means leave the loop.
    fn poll_control(&mut self, ctl: &Receiver<Control>) -> Result<Option<Result<()>>> {
        match ctl.try_recv() {
            Ok(Control::Stop) | Ok(Control::Kill) => {
                self.stop_copies();
                Ok(Some(Err(Error::Stopped)))
            }
            Ok(Control::Reload) => {
                self.stop_copies();
                Ok(Some(Ok(())))
            }
            Err(_) => Ok(None),
        }
    }

    fn sleep(&mut self, ctl: &Receiver<Control>, d: Duration) -> Result<Option<Result<()>>> {
        match ctl.recv_timeout(d) {
            Ok(Control::Stop) | Ok(Control::Kill) => {
                self.stop_copies();
                Ok(Some(Err(Error::Stopped)))
            }
            Ok(Control::Reload) => {
                self.stop_copies();
                Ok(Some(Ok(())))
            }
            Err(_) => Ok(None),
        }
    }

    /// Idle: wait up to loop_delay for a tick (NOTIFY from the provider, or a
    /// message from an in-process ticker) or a control message.
    fn wait(
        &mut self,
        ctl: &Receiver<Control>,
        ticks: Option<&Receiver<()>>,
    ) -> Result<Option<Result<()>>> {
        let deadline = Instant::now() + Duration::from_secs_f64(self.cfg.loop_delay);
        let queue = self.cfg.queue_name.clone();
        loop {
            if let Some(c) = self.poll_control(ctl)? {
                return Ok(Some(c));
            }
            if let Some(t) = ticks
                && t.try_recv().is_ok()
            {
                while t.try_recv().is_ok() {}
                return Ok(None);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let slice = (deadline - now).min(Duration::from_millis(25));
            match self.provider.as_mut() {
                Some(p) => {
                    let mut woke = false;
                    let mut n = p.notifications();
                    let mut it = n.timeout_iter(slice);
                    // Connection trouble shows up on the next query, not here.
                    while let Ok(Some(note)) = it.next() {
                        if note.payload() == queue {
                            woke = true;
                            break;
                        }
                    }
                    if woke {
                        return Ok(None);
                    }
                }
                None => std::thread::sleep(slice),
            }
        }
    }

    /// One round. Ok(true) if a batch was applied (look again at once).
    fn iteration(&mut self, ctl: &Receiver<Control>) -> Result<bool> {
        self.maybe_stats();
        let queue = self.cfg.queue_name.clone();
        let hint = self.cfg.command_hint();
        let node = node::require(self.local()?, &queue, &hint)?;
        self.local()?
            .execute(
                "UPDATE londiste.node_info SET worker_seen = now() WHERE queue_name = $1",
                &[&queue],
            )
            .ctx(|| "cannot update node_info".into())?;
        if node.is_root() {
            let buf = self.cfg.seq_buffer;
            self.local()?
                .query_one("SELECT londiste.root_check_seqs($1, $2)", &[&queue, &buf])
                .ctx(|| "cannot publish sequences".into())?;
            return Ok(false);
        }
        if node.paused {
            return Ok(false);
        }
        self.manage_copies(&node)?;
        let worker = node.worker_name.clone();
        let max = self.cfg.batch_max_events;
        let batch = match next_batch(self.provider(&node)?, &queue, &worker, Some(max))? {
            Some(b) => b,
            None => return Ok(false),
        };
        // Is it already applied? (crash after the subscriber commit, before finish)
        match node.last_tick_id {
            Some(t) if t == batch.cur_tick => {
                log::info!(
                    "batch {} (tick {}) was already applied; finishing it",
                    batch.id,
                    batch.cur_tick
                );
                self.finish(&node, &batch)?;
                return Ok(true);
            }
            Some(t) if t == batch.prev_tick => {}
            other => {
                return Err(Error::Other(format!(
                    "lost position: the provider offers batch {}..{} but this node is at tick {:?}; \
                     re-create the node or re-register its consumer at its tick",
                    batch.prev_tick, batch.cur_tick, other
                )));
            }
        }
        let started = Instant::now();
        self.apply_batch(&node, &batch, ctl)?;
        self.finish(&node, &batch)?;
        self.batches += 1;
        log::debug!(
            "batch {} (tick {}) applied in {:?}",
            batch.id,
            batch.cur_tick,
            started.elapsed()
        );
        self.maybe_stats();
        Ok(true)
    }

    fn maybe_stats(&mut self) {
        if self.stats_at.elapsed() >= self.cfg.stats_period {
            let secs = self.stats_at.elapsed().as_secs_f64();
            let s = self.applier.stats;
            log::info!(
                "{{batches: {}, events: {}, rows: {}, statements: {}, events/s: {:.0}, lag: {:.2}s}}",
                self.batches,
                s.events,
                s.rows,
                s.statements,
                s.events as f64 / secs,
                self.last_lag
            );
            self.applier.stats = Default::default();
            self.batches = 0;
            self.stats_at = Instant::now();
        }
    }

    fn finish(&mut self, node: &NodeInfo, batch: &Batch) -> Result<()> {
        let p = self.provider(node)?;
        p.query_one("SELECT pgq.finish_batch($1)", &[&batch.id])
            .ctx(|| format!("cannot finish batch {} on the provider", batch.id))?;
        let lag: f64 = p
            .query_one(
                "SELECT extract(epoch FROM now() - $1::text::timestamptz)::float8",
                &[&batch.cur_time],
            )
            .map(|r| r.get(0))
            .unwrap_or(0.0);
        self.last_lag = lag;
        Ok(())
    }

    fn apply_batch(
        &mut self,
        node: &NodeInfo,
        batch: &Batch,
        ctl: &Receiver<Control>,
    ) -> Result<()> {
        let queue = node.queue_name.clone();
        let is_branch = node.is_branch();
        let cur_snap = tick_snapshot(self.provider(node)?, &queue, batch.cur_tick)?;
        let mut provider = self.provider.take().unwrap();
        let mut local = self.local.take().unwrap();
        let res = (|| -> Result<()> {
            let mut tx = local
                .transaction()
                .ctx(|| "cannot begin the apply transaction".into())?;
            // Lock our position first: the copy threads' hand-over takes the same
            // lock, so the table states read below cannot change under this batch.
            let pos: Option<i64> = tx
                .query_one(
                    "SELECT last_tick_id FROM londiste.node_info WHERE queue_name = $1 FOR UPDATE",
                    &[&queue],
                )
                .ctx(|| "cannot lock node_info".into())?
                .get(0);
            if pos != Some(batch.prev_tick) {
                return Err(Error::Other(format!(
                    "position moved under the worker (at {:?}, batch starts at {}); is a second worker running?",
                    pos, batch.prev_tick
                )));
            }
            let states = node::tables(&mut tx, &queue)?;
            let mut routes: HashMap<String, TableRoute> = HashMap::new();
            let mut seqs_done = Vec::new();
            for t in &states {
                if t.local && t.merge_state.as_deref() == Some("ok") {
                    let skip = match &t.custom_snapshot {
                        Some(s) => Some(Snapshot::parse(s)?),
                        None => None,
                    };
                    routes.insert(
                        t.table_name.clone(),
                        TableRoute {
                            dest: local_name(&t.table_name, t.dest_table.as_deref())?,
                            skip_snapshot: skip,
                        },
                    );
                }
            }
            if !self.replica_mode {
                self.applier.reorder = !has_foreign_keys(&mut tx, &routes)?;
            } else {
                self.applier.reorder = true;
            }
            let ev_table: Option<String> = if is_branch {
                Some(
                    tx.query_one("SELECT pgq.current_event_table($1)", &[&queue])
                        .ctx(|| "cannot find the local queue table".into())?
                        .get(0),
                )
            } else {
                None
            };
            let applier = &mut self.applier;
            // Control messages during a batch: TERM aborts it (rolled back, safe),
            // INT and HUP take effect once it is committed.
            let kill = AtomicBool::new(false);
            let stop = || kill.load(Ordering::Relaxed);
            let mut after: Option<Control> = None;
            for_each_chunk(&mut provider, batch.id, &stop, &mut |events| {
                while let Ok(m) = ctl.try_recv() {
                    match m {
                        Control::Kill => {
                            kill.store(true, Ordering::Relaxed);
                            return Err(Error::Stopped);
                        }
                        Control::Stop => after = Some(Control::Stop),
                        Control::Reload => after = after.or(Some(Control::Reload)),
                    }
                }
                if let Some(t) = &ev_table {
                    copy_events(&mut tx, t, events)?;
                }
                let route = |t: &str| routes.get(t).cloned();
                let mut special = |tx: &mut Transaction, ev: &Event| -> Result<()> {
                    handle_special(tx, &queue, ev, &mut seqs_done)
                };
                applier.apply_chunk(&mut tx, events, &route, &mut special)
            })?;
            if is_branch {
                tx.query_one(
                    "SELECT pgq.ticker($1, $2, $3::text::timestamptz, $4)",
                    &[&queue, &batch.cur_tick, &batch.cur_time, &batch.cur_seq],
                )
                .ctx(|| "cannot create the tick in the local queue".into())?;
            }
            // Copy snapshots stop mattering once every transaction they saw is
            // visible in this tick: later batches cannot hold such events.
            for t in &states {
                if let (Some(s), Some("ok")) = (&t.custom_snapshot, t.merge_state.as_deref())
                    && cur_snap.covers(&Snapshot::parse(s)?)
                {
                    tx.execute(
                            "UPDATE londiste.table_info SET custom_snapshot = NULL WHERE queue_name = $1 AND table_name = $2",
                            &[&queue, &t.table_name],
                        )
                        .ctx(|| "cannot clear copy snapshot".into())?;
                }
            }
            tx.execute(
                "UPDATE londiste.node_info SET last_tick_id = $2, last_batch_time = now(), cur_error = NULL,
                        error_time = NULL, uptodate = true WHERE queue_name = $1",
                &[&queue, &batch.cur_tick],
            )
            .ctx(|| "cannot store the new position".into())?;
            tx.commit().ctx(|| "cannot commit the batch".into())?;
            self.after_batch = after;
            Ok(())
        })();
        self.provider = Some(provider);
        self.local = Some(local);
        if let Err(e) = &res
            && matches!(e, Error::Db(_) | Error::Other(_))
            && !self.applier.single
        {
            // Run the batch again one event per statement, to name the event.
            log::warn!(
                "batch {} failed ({}); retrying event by event to find the event",
                batch.id,
                e
            );
            self.applier.single = true;
            self.applier.reset();
            let again = self.apply_batch(node, batch, ctl);
            self.applier.single = false;
            return again;
        }
        res
    }

    /// Starts copy threads for tables waiting for a copy, at most parallel_copies.
    fn manage_copies(&mut self, node: &NodeInfo) -> Result<()> {
        let finished: Vec<String> = self
            .copies
            .iter()
            .filter(|(_, c)| c.handle.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for t in finished {
            let c = self.copies.remove(&t).unwrap();
            match c.handle.join() {
                Ok(Err(e)) if !matches!(e, Error::Stopped) => {
                    self.copy_retry_at
                        .insert(t.clone(), Instant::now() + Duration::from_secs(5));
                    let (q, msg) = (node.queue_name.clone(), e.to_string());
                    node::set_copy_error(self.local()?, &q, &t, Some(&msg))?;
                }
                Ok(Ok(())) => {
                    let q = node.queue_name.clone();
                    node::set_copy_error(self.local()?, &q, &t, None)?;
                }
                _ => {}
            }
        }
        let queue = node.queue_name.clone();
        let states = node::tables(self.local()?, &queue)?;
        if self.copies.is_empty()
            && states
                .iter()
                .all(|t| !t.local || t.merge_state.as_deref() == Some("ok"))
        {
            self.restore_fkeys()?;
        }
        for t in states {
            if !t.local
                || t.merge_state.as_deref() == Some("ok")
                || self.copies.contains_key(&t.table_name)
            {
                continue;
            }
            if self.copies.len() >= self.cfg.parallel_copies {
                break;
            }
            if self
                .copy_retry_at
                .get(&t.table_name)
                .is_some_and(|at| Instant::now() < *at)
            {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let cfg = self.cfg.clone();
            let table = t.table_name.clone();
            let st = stop.clone();
            let name = format!("{}.copy", self.cfg.common.job_name);
            log::info!("starting copy of {table}");
            let handle = crate::thread::spawn(&name, move || copy::run(&cfg, &table, &st));
            self.copies
                .insert(t.table_name.clone(), CopyHandle { handle, stop });
        }
        Ok(())
    }
}

impl Worker {
    /// Puts back the foreign keys dropped for copies, once nothing is copying.
    fn restore_fkeys(&mut self) -> Result<()> {
        let c = self.local()?;
        let rows = c
            .query(
                "SELECT from_table, fkey_name FROM londiste.pending_fkeys ORDER BY dropped_at",
                &[],
            )
            .ctx(|| "cannot read pending foreign keys".into())?;
        for r in rows {
            let (t, n): (String, String) = (r.get(0), r.get(1));
            match c.query_one("SELECT londiste.restore_table_fkey($1, $2)", &[&t, &n]) {
                Ok(_) => log::info!("foreign key {n} on {t} restored"),
                Err(e) => log::warn!(
                    "cannot restore foreign key {n} on {t}: {}; will try again",
                    crate::error::pg_message(&e)
                ),
            }
        }
        Ok(())
    }
}

/// Does any foreign key reference, or come from, a replicated table? Then events
/// are applied strictly in queue order.
fn has_foreign_keys(tx: &mut Transaction, routes: &HashMap<String, TableRoute>) -> Result<bool> {
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
fn copy_events(tx: &mut Transaction, table: &str, events: &[Event]) -> Result<()> {
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
fn handle_special(
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
    } else {
        log::debug!(
            "[ev_id={}] passing over event of type {}",
            ev.id,
            ev.ev_type
        );
    }
    Ok(())
}
