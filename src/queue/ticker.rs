//! The ticker (`pgqd` mode): for every database with our `pgq` schema, call
//! `pgq.ticker()` every `ticker_period`, run maintenance (table rotation) every
//! `maint_period`, re-queue due retry events every `retry_period`, re-read the
//! database list every `check_period`, and log a stats line every `stats_period`.
//! Each database has an explicit connection state; any error drops the connection
//! and retries with backoff, logging once per outage rather than once per try.

use crate::config::TickerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::process::signals::Control;
use crossbeam_channel::{Receiver, Sender};
use postgres::Client;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Sent to in-process workers after a round that made ticks, so they fetch the
/// batch at once instead of waiting for their loop_delay.
#[derive(Debug, Clone)]
pub struct TickNotice {
    pub database: String,
}

// One per database, so the size of the connected variant does not matter.
#[allow(clippy::large_enum_variant)]
enum State {
    /// Not connected; try again at the instant.
    Down {
        retry_at: Instant,
        since: Instant,
        failures: u32,
    },
    /// The database has no pgq schema (or an old one). Not connected meanwhile:
    /// an idle session would keep DROP DATABASE and CREATE DATABASE ... TEMPLATE
    /// from using it.
    NoPgq { recheck_at: Instant },
    Ready {
        client: Client,
        connected_at: Instant,
    },
}

struct Database {
    name: String,
    state: State,
    /// "no pgq schema" was logged once (at info; then at debug).
    told_nopgq: bool,
    next_maint: Instant,
    next_retry: Instant,
}

#[derive(Default)]
struct Stats {
    ticks: u64,
    maint: u64,
    retry: u64,
}

pub struct Ticker {
    cfg: TickerConfig,
    dbs: BTreeMap<String, Database>,
    stats: Stats,
    notify: Option<Sender<TickNotice>>,
}

fn connstr(cfg: &TickerConfig, db: &str) -> String {
    db::with_dbname(&cfg.base_connstr, db)
}

impl Ticker {
    pub fn new(cfg: TickerConfig, notify: Option<Sender<TickNotice>>) -> Ticker {
        Ticker {
            cfg,
            dbs: BTreeMap::new(),
            stats: Stats::default(),
            notify,
        }
    }

    /// The databases to tick: the configured list, or every connectable one.
    fn database_names(&self) -> Result<Vec<String>> {
        if !self.cfg.database_list.is_empty() {
            return Ok(self.cfg.database_list.clone());
        }
        let cs = connstr(&self.cfg, &self.cfg.initial_database);
        let mut c = db::connect(&cs, "londiste-rs ticker")?;
        let rows = c
            .query("SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1", &[])
            .ctx(|| "cannot list databases".into())?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn refresh_databases(&mut self) {
        match self.database_names() {
            Ok(names) => {
                let now = Instant::now();
                for n in &names {
                    self.dbs.entry(n.clone()).or_insert_with(|| Database {
                        told_nopgq: false,
                        name: n.clone(),
                        state: State::Down {
                            retry_at: now,
                            since: now,
                            failures: 0,
                        },
                        next_maint: now,
                        next_retry: now,
                    });
                }
                let gone: Vec<String> = self
                    .dbs
                    .keys()
                    .filter(|k| !names.contains(k))
                    .cloned()
                    .collect();
                for g in gone {
                    log::info!("database {g} is no longer in the list; not ticking it");
                    self.dbs.remove(&g);
                }
            }
            Err(e) => log::warn!("cannot list databases: {e}; keeping the current list"),
        }
    }

    /// Runs until a stop message; `ctl` carries signals from the supervisor.
    pub fn run(&mut self, ctl: &Receiver<Control>) -> Result<()> {
        log::info!(
            "Starting londiste-rs ticker {} (pgqd mode)",
            env!("CARGO_PKG_VERSION")
        );
        let mut next_check = Instant::now();
        let mut next_stats = Instant::now() + self.cfg.stats_period;
        loop {
            let now = Instant::now();
            if now >= next_check {
                self.refresh_databases();
                next_check = now + self.cfg.check_period;
            }
            let mut ticked = Vec::new();
            for db in self.dbs.values_mut() {
                if let Some(n) = step(&self.cfg, db, &mut self.stats)
                    && n > 0
                {
                    ticked.push(db.name.clone());
                }
            }
            if let Some(tx) = &self.notify {
                for d in ticked {
                    let _ = tx.try_send(TickNotice { database: d });
                }
            }
            if Instant::now() >= next_stats {
                log::info!(
                    "{{ticks: {}, maint: {}, retry: {}, databases: {}}}",
                    self.stats.ticks,
                    self.stats.maint,
                    self.stats.retry,
                    self.dbs.len()
                );
                self.stats = Stats::default();
                next_stats = Instant::now() + self.cfg.stats_period;
            }
            match ctl.recv_timeout(self.cfg.ticker_period) {
                Ok(Control::Stop) | Ok(Control::Kill) => return Err(Error::Stopped),
                Ok(Control::Reload) => return Ok(()),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Stopped);
                }
            }
        }
    }
}

/// One round for one database: connect if due, tick, maintain. Returns the number
/// of queues ticked, or None when the database is not usable now.
fn step(cfg: &TickerConfig, db: &mut Database, stats: &mut Stats) -> Option<i64> {
    let now = Instant::now();
    // A database named in database_list is usually about to get pgq (pgqd is
    // started before create-root): look again every second. One found by
    // scanning the cluster is looked at every check_period, as pgqd does.
    let nopgq_wait = if cfg.database_list.is_empty() {
        cfg.check_period
    } else {
        cfg.check_period.min(Duration::from_secs(1))
    };
    if let State::NoPgq { recheck_at } = &db.state {
        if now < *recheck_at {
            return None;
        }
        db.state = State::Down {
            retry_at: now,
            since: now,
            failures: 0,
        };
    }
    match &mut db.state {
        State::Down {
            retry_at,
            since,
            failures,
        } => {
            if now < *retry_at {
                return None;
            }
            match db::connect(&connstr(cfg, &db.name), "londiste-rs ticker") {
                Ok(mut client) => {
                    if *failures > 0 {
                        log::info!(
                            "database {}: connected again after {:.0?}",
                            db.name,
                            since.elapsed()
                        );
                    }
                    match client
                        .query_one("SELECT to_regprocedure('pgq.ticker()') IS NOT NULL", &[])
                    {
                        Ok(r) if r.get::<_, bool>(0) => {
                            log::info!("database {}: ticking", db.name);
                            db.state = State::Ready {
                                client,
                                connected_at: now,
                            };
                        }
                        Ok(_) => {
                            let level = if db.told_nopgq || cfg.database_list.is_empty() {
                                log::Level::Debug
                            } else {
                                log::Level::Info
                            };
                            db.told_nopgq = true;
                            log::log!(
                                level,
                                "database {}: no pgq schema yet (create-root or install adds it); checking every {:?}",
                                db.name,
                                nopgq_wait
                            );
                            db.state = State::NoPgq {
                                recheck_at: now + nopgq_wait,
                            };
                            return None;
                        }
                        Err(e) => {
                            fail(db, &e.to_string());
                            return None;
                        }
                    }
                }
                Err(e) => {
                    if *failures == 0 {
                        log::error!("database {}: {}; retrying in the background", db.name, e);
                    } else {
                        log::debug!("database {}: still down: {}", db.name, e);
                    }
                    *failures += 1;
                    // Backoff 1 s doubling, capped at check_period.
                    let wait = Duration::from_secs(1 << (*failures).min(6))
                        .min(cfg.check_period.max(Duration::from_secs(1)));
                    *retry_at = now + wait;
                    return None;
                }
            }
        }
        State::NoPgq { .. } => return None,
        State::Ready { .. } => {}
    }
    let State::Ready {
        client,
        connected_at,
    } = &mut db.state
    else {
        return None;
    };
    if connected_at.elapsed() > cfg.connection_lifetime {
        log::debug!(
            "database {}: connection_lifetime reached, reconnecting",
            db.name
        );
        db.state = State::Down {
            retry_at: now,
            since: now,
            failures: 0,
        };
        return None;
    }
    let res = (|| -> std::result::Result<i64, postgres::Error> {
        let n: i64 = client.query_one("SELECT pgq.ticker()", &[])?.get(0);
        stats.ticks += n as u64;
        if now >= db.next_retry {
            loop {
                let r: i32 = client
                    .query_one("SELECT pgq.maint_retry_events()", &[])?
                    .get(0);
                stats.retry += r as u64;
                if r == 0 {
                    break;
                }
            }
            db.next_retry = now + cfg.retry_period;
        }
        if now >= db.next_maint {
            stats.maint += maintain(client)?;
            db.next_maint = now + cfg.maint_period;
        }
        Ok(n)
    })();
    match res {
        Ok(n) => Some(n),
        Err(e) => {
            let msg = crate::error::pg_message(&e);
            if e.code()
                .map(|c| c.code() == "42883" || c.code() == "3F000")
                .unwrap_or(false)
            {
                // The schema was dropped under us: wait for it to come back.
                log::warn!(
                    "database {}: pgq is gone ({}); checking again later",
                    db.name,
                    msg
                );
                db.state = State::NoPgq {
                    recheck_at: now + nopgq_wait,
                };
            } else {
                fail(db, &msg);
            }
            None
        }
    }
}

fn fail(db: &mut Database, msg: &str) {
    log::error!("database {}: {}; reconnecting", db.name, msg);
    let now = Instant::now();
    db.state = State::Down {
        retry_at: now + Duration::from_secs(1),
        since: now,
        failures: 1,
    };
}

/// Runs `pgq.maint_operations()`: each returned function is called again while it
/// returns non-zero; `vacuum` entries are run as statements.
fn maintain(client: &mut Client) -> std::result::Result<u64, postgres::Error> {
    let ops = client.query(
        "SELECT func_name, func_arg FROM pgq.maint_operations()",
        &[],
    )?;
    let mut n = 0;
    for op in ops {
        let func: String = op.get(0);
        let arg: Option<String> = op.get(1);
        if func.eq_ignore_ascii_case("vacuum") || func.eq_ignore_ascii_case("vacuum analyze") {
            if let Some(t) = arg {
                let t = t
                    .split('.')
                    .map(crate::names::ident)
                    .collect::<Vec<_>>()
                    .join(".");
                client.batch_execute(&format!("{func} {t}"))?;
            }
            n += 1;
            continue;
        }
        if !func
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            log::warn!("skipping maintenance function with an odd name: {func}");
            continue;
        }
        for _ in 0..100 {
            let sql = match &arg {
                Some(_) => format!("SELECT ({func}($1))::text"),
                None => format!("SELECT ({func}())::text"),
            };
            let row = match &arg {
                Some(a) => client.query_one(&sql, &[a])?,
                None => client.query_one(&sql, &[])?,
            };
            n += 1;
            let v: Option<String> = row.get(0);
            if v.as_deref()
                .map(|s| s == "0" || s.is_empty())
                .unwrap_or(true)
            {
                break;
            }
        }
    }
    Ok(n)
}
