//! The replication worker of one node (`worker` command).
//!
//! Root: publishes sequence values ahead of use and otherwise waits.
//! Branch and leaf: read the provider's batches and apply them. A batch's rows and
//! the node's new position (`node_info.last_tick_id`) commit in one subscriber
//! transaction, then the batch is finished on the provider: after a crash between
//! the two, the same batch comes back and is recognised as done. A branch also
//! copies every event into its own queue and creates the same tick, so others can
//! subscribe to it. New tables are copied by copy threads (see `copy.rs`).

use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::process::signals::Control;
use crate::replication::apply::{Applier, Event, TableRoute, local_name};
use crate::replication::batch::{
    Batch, copy_events, for_each_chunk, handle_special, has_foreign_keys, next_batch,
    prepare_apply_session, tick_snapshot,
};
use crate::replication::copy;
use crate::replication::node::{self, NodeInfo};
use crate::replication::record::Snapshot;
use crate::replication::root;
use crossbeam_channel::Receiver;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Transaction};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct CopyHandle {
    handle: JoinHandle<Result<()>>,
    stop: Arc<AtomicBool>,
}

pub struct Worker {
    cfg: WorkerConfig,
    local: Option<Client>,
    provider: Option<Client>,
    /// The location `provider` is connected to: a change-provider or takeover
    /// changes node_info, and the worker follows without a restart.
    provider_loc: Option<String>,
    /// What a root's rounds remember (see root.rs).
    root: root::RootState,
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
            provider_loc: None,
            root: Default::default(),
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
            crate::queue::install::upgrade_if_installed(&mut c)?;
            self.replica_mode = prepare_apply_session(&mut c)?;
            self.local = Some(c);
        }
        Ok(self.local.as_mut().unwrap())
    }

    fn provider(&mut self, node: &NodeInfo) -> Result<&mut Client> {
        if self.provider.is_some() && self.provider_loc != node.provider_location {
            log::info!(
                "provider changed to {}; reconnecting",
                node.provider_node.as_deref().unwrap_or("?")
            );
            self.provider = None;
        }
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
            self.provider_loc = Some(loc);
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
                        // Back from an outage: was this root failed over meanwhile?
                        self.root.failover_checked = None;
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
            return self.root_round(&node);
        }
        self.root.fence_said = false;
        if node.paused {
            return Ok(false);
        }
        self.manage_copies(&node)?;
        let worker = node.worker_name.clone();
        // A branch takes one tick per batch: it re-creates each tick of its
        // provider, so that every node carrying the queue has every tick and
        // a subscriber can move to any of them at its own (change-provider,
        // takeover). A leaf may merge ticks when behind.
        let max = (!node.is_branch()).then_some(self.cfg.batch_max_events);
        let batch = match next_batch(self.provider(&node)?, &queue, &worker, max)? {
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
        if !self.apply_batch(&node, &batch, ctl)? {
            log::info!(
                "this node's provider changed; batch {} left to the old provider",
                batch.id
            );
            self.provider = None;
            self.provider_loc = None;
            return Ok(true);
        }
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

    fn root_round(&mut self, node: &NodeInfo) -> Result<bool> {
        // A former subscriber's provider connection is of no use any more.
        self.provider = None;
        self.provider_loc = None;
        let cfg = self.cfg.clone();
        let mut state = std::mem::take(&mut self.root);
        let res = root::round(&cfg, self.local()?, node, &mut state);
        self.root = state;
        res.map(|_| false)
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
    ) -> Result<bool> {
        let queue = node.queue_name.clone();
        let is_branch = node.is_branch();
        let cur_snap = tick_snapshot(self.provider(node)?, &queue, batch.cur_tick)?;
        let mut provider = self.provider.take().unwrap();
        let mut local = self.local.take().unwrap();
        let res = (|| -> Result<bool> {
            let mut tx = local
                .transaction()
                .ctx(|| "cannot begin the apply transaction".into())?;
            // Lock our position first: the copy threads' hand-over takes the same
            // lock, so the table states read below cannot change under this batch.
            let row = tx
                .query_one(
                    "SELECT last_tick_id, provider_location, node_type FROM londiste.node_info WHERE queue_name = $1 FOR UPDATE",
                    &[&queue],
                )
                .ctx(|| "cannot lock node_info".into())?;
            let pos: Option<i64> = row.get(0);
            // change-provider or takeover moved this node while the batch was
            // read: it came from the old provider, whose position no longer
            // counts. Drop it; the next round reads from the new one.
            let (ploc, ntype): (Option<String>, String) = (row.get(1), row.get(2));
            if ploc != node.provider_location || ntype != node.node_type {
                return Ok(false);
            }
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
                            merge: t.merged.then(|| crate::replication::merge::MergePart {
                                queue: queue.clone(),
                                truncate: self.cfg.merge_truncate,
                            }),
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
                "UPDATE londiste.node_info SET last_tick_id = $2, last_tick_seq = $3, last_batch_time = now(), cur_error = NULL,
                        error_time = NULL, uptodate = true WHERE queue_name = $1",
                &[&queue, &batch.cur_tick, &batch.cur_seq],
            )
            .ctx(|| "cannot store the new position".into())?;
            tx.commit().ctx(|| "cannot commit the batch".into())?;
            self.after_batch = after;
            Ok(true)
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
            let handle = crate::process::thread::spawn(&name, move || copy::run(&cfg, &table, &st));
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
                // Not while a part of a merged table is still being copied
                // by some queue's worker: its keys come back after all parts.
                "SELECT from_table, fkey_name FROM londiste.pending_fkeys
                  WHERE NOT EXISTS (SELECT 1 FROM londiste.table_info
                                     WHERE merged AND local AND merge_state IS DISTINCT FROM 'ok')
                  ORDER BY dropped_at",
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
