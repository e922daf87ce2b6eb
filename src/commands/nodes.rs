//! Node commands: create-root, create-branch, create-leaf, members, node-info,
//! pause/resume and the wait-sync/wait-provider/wait-root waits.

use super::tables::human_state;
use super::{Opts, connect_local, remote};
use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::queue::install;
use crate::replication::node::{self, NodeInfo};
use postgres::Client;

pub fn create_root(
    cfg: &WorkerConfig,
    name: Option<&str>,
    location: Option<&str>,
    opts: &Opts,
) -> Result<()> {
    let name = name
        .map(String::from)
        .or_else(|| cfg.node_name.clone())
        .ok_or_else(|| {
            Error::Usage("create-root needs a node name: create-root NAME [CONNSTR]".into())
        })?;
    let Some((loc, mut c)) = prepare_new_node(cfg, location, opts)? else {
        return Ok(());
    };
    let mut tx = c.transaction().ctx(|| "cannot begin".into())?;
    tx.query_one("SELECT pgq.create_queue($1)", &[&cfg.queue_name])
        .ctx(|| "cannot create the queue".into())?;
    tx.execute(
        "INSERT INTO londiste.node_info (queue_name, node_type, node_name, worker_name, node_location)
         VALUES ($1, 'root', $2, $3, $4)",
        &[&cfg.queue_name, &name, &cfg.consumer_name, &loc],
    )
    .ctx(|| "cannot create the node".into())?;
    tx.execute(
        "INSERT INTO londiste.node_location (queue_name, node_name, node_location, node_type) VALUES ($1, $2, $3, 'root')
         ON CONFLICT (queue_name, node_name) DO UPDATE SET node_location = EXCLUDED.node_location, dead = false",
        &[&cfg.queue_name, &name, &loc],
    )
    .ctx(|| "cannot register the node location".into())?;
    tx.commit().ctx(|| "cannot commit".into())?;
    log::info!("Initialized root node {name} of queue {}", cfg.queue_name);
    log::info!("Done");
    Ok(())
}

/// Common start of create-*: the public location, the SQL installed, and None
/// when the database is already a node of the queue (said, and not an error).
fn prepare_new_node(
    cfg: &WorkerConfig,
    location: Option<&str>,
    opts: &Opts,
) -> Result<Option<(String, Client)>> {
    let loc = location
        .map(String::from)
        .or_else(|| cfg.public_node_location.clone())
        .unwrap_or_else(|| cfg.db.clone());
    let mut c = connect_local(cfg)?;
    install::install_all(&mut c)?;
    if let Some(n) = node::load(&mut c, &cfg.queue_name)? {
        log::info!(
            "Node is already initialized as {} ({})",
            n.node_name,
            n.node_type
        );
        return Ok(None);
    }
    warn_location(&loc);
    if !opts.nocheck && loc != cfg.db {
        check_public_location(cfg, &mut c, &loc)?;
    }
    Ok(Some((loc, c)))
}

/// The public connect string is how every other node reaches this one: it
/// must lead to this very database (same server, same database), or the set
/// would replicate into the wrong place. `--nocheck` skips this.
fn check_public_location(cfg: &WorkerConfig, local: &mut Client, loc: &str) -> Result<()> {
    const WHO: &str =
        "SELECT current_database()::text, d.oid::int8, pg_postmaster_start_time()::text
                         FROM pg_database d WHERE d.datname = current_database()";
    let id = |c: &mut Client| -> Result<(String, i64, String)> {
        let r = c
            .query_one(WHO, &[])
            .ctx(|| "cannot identify the database".into())?;
        Ok((r.get(0), r.get(1), r.get(2)))
    };
    let here = id(local)?;
    let mut p = remote(cfg, loc).map_err(|e| {
        Error::Other(format!(
            "the public connect string does not connect ({e}); other nodes reach this one through it: fix it, or give --nocheck to skip this check"
        ))
    })?;
    let there = id(&mut p)?;
    if here != there {
        return Err(Error::Other(format!(
            "the public connect string {} leads to database {} of another server or database than the db setting ({} here); fix it, or give --nocheck to skip this check",
            db::describe(loc),
            there.0,
            here.0
        )));
    }
    Ok(())
}

fn warn_location(loc: &str) {
    if !db::names_host(loc) {
        log::warn!(
            "public connect string {:?} has no host=: other nodes may not reach this one",
            db::redact(loc)
        );
    }
    warn_password(loc);
}

/// Locations are stored in the node tables as given, for other nodes to use.
fn warn_password(loc: &str) {
    if db::has_password(loc) {
        log::warn!(
            "connect string {:?} holds a password, which is stored as given in the node tables: whoever may read them can read it; keep passwords in ~/.pgpass (or PGPASSFILE) on each node instead",
            db::redact(loc)
        );
    }
}

/// create-branch and create-leaf.
pub fn create_subscriber(
    cfg: &WorkerConfig,
    kind: &str,
    name: Option<&str>,
    location: Option<&str>,
    opts: &Opts,
) -> Result<()> {
    let name = name
        .map(String::from)
        .or_else(|| cfg.node_name.clone())
        .ok_or_else(|| {
            Error::Usage(format!(
                "create-{kind} needs a node name: create-{kind} NAME [CONNSTR] --provider=CONNSTR"
            ))
        })?;
    let provider_loc = opts
        .provider
        .clone()
        .or_else(|| cfg.initial_provider_location.clone())
        .ok_or_else(|| {
            Error::Usage(format!(
                "create-{kind} needs --provider=CONNSTR (the provider node's connect string)"
            ))
        })?;
    let Some((loc, mut c)) = prepare_new_node(cfg, location, opts)? else {
        return Ok(());
    };
    warn_password(&provider_loc);
    let mut p = remote(cfg, &provider_loc)?;
    let pnode = node::load(&mut p, &cfg.queue_name)?.ok_or_else(|| {
        Error::Other(format!(
            "the provider {} is not a node of queue {:?}: run create-root there first",
            db::describe(&provider_loc),
            cfg.queue_name
        ))
    })?;
    if pnode.node_type == "leaf" {
        return Err(Error::Other(format!(
            "Cannot subscribe to leaf node {}: use its provider or a branch",
            pnode.node_name
        )));
    }
    if pnode.node_name == name {
        return Err(Error::Other(format!(
            "node name {name} is the provider's own name; choose another"
        )));
    }
    let taken: Option<String> = p
        .query_opt(
            "SELECT node_location FROM londiste.node_location WHERE queue_name = $1 AND node_name = $2 AND NOT dead",
            &[&cfg.queue_name, &name],
        )
        .ctx(|| "cannot read the provider's members".into())?
        .map(|r| r.get(0));
    if let Some(t) = taken
        && db::describe(&t) != db::describe(&loc)
    {
        return Err(Error::Other(format!(
            "a node named {name} already exists in queue {:?} at {}; choose another name or drop that node",
            cfg.queue_name,
            db::describe(&t)
        )));
    }
    let worker = cfg.consumer_name.clone();
    p.query_one(
        "SELECT pgq.register_consumer($1, $2)",
        &[&cfg.queue_name, &worker],
    )
    .ctx(|| format!("cannot register consumer {worker} on the provider"))?;
    let row = p
        .query_one(
            "SELECT t.tick_id, t.tick_time::text, t.tick_event_seq FROM pgq.subscription s
               JOIN pgq.queue q ON q.queue_id = s.sub_queue JOIN pgq.consumer co ON co.co_id = s.sub_consumer
               JOIN pgq.tick t ON t.tick_queue = s.sub_queue AND t.tick_id = s.sub_last_tick
              WHERE q.queue_name = $1 AND co.co_name = $2",
            &[&cfg.queue_name, &worker],
        )
        .ctx(|| "cannot read the registration tick".into())?;
    let (tick, tick_time, seq): (i64, String, i64) = (row.get(0), row.get(1), row.get(2));
    // Members as the provider knows them, plus us, on the provider and the root.
    p.execute(
        "INSERT INTO londiste.node_location (queue_name, node_name, node_location, node_type, provider_node)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (queue_name, node_name) DO UPDATE SET node_location = EXCLUDED.node_location,
             node_type = EXCLUDED.node_type, provider_node = EXCLUDED.provider_node, dead = false",
        &[&cfg.queue_name, &name, &loc, &kind, &pnode.node_name],
    )
    .ctx(|| "cannot register this node on the provider".into())?;
    if let Some(root_loc) = find_root(cfg, &mut p, &pnode)?
        && let Ok(mut r) = remote(cfg, &root_loc)
    {
        let _ = r.execute(
                "INSERT INTO londiste.node_location (queue_name, node_name, node_location, node_type, provider_node)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (queue_name, node_name) DO UPDATE SET node_location = EXCLUDED.node_location,
                     node_type = EXCLUDED.node_type, provider_node = EXCLUDED.provider_node, dead = false",
                &[&cfg.queue_name, &name, &loc, &kind, &pnode.node_name],
            );
        // Every member learns of the new node through the queue.
        let _ = r.query(
            "SELECT londiste.announce_member($1, $2)",
            &[&cfg.queue_name, &name],
        );
    }
    let members = p
        .query(
            "SELECT node_name, node_location, node_type, provider_node, dead FROM londiste.node_location WHERE queue_name = $1",
            &[&cfg.queue_name],
        )
        .ctx(|| "cannot read members".into())?;
    let mut tx = c.transaction().ctx(|| "cannot begin".into())?;
    if kind == "branch" {
        tx.query_one("SELECT pgq.create_queue($1)", &[&cfg.queue_name])
            .ctx(|| "cannot create the local queue".into())?;
        tx.execute(
            "UPDATE pgq.queue SET queue_external_ticker = true, queue_disable_insert = true WHERE queue_name = $1",
            &[&cfg.queue_name],
        )
        .ctx(|| "cannot configure the local queue".into())?;
        tx.execute("DELETE FROM pgq.tick WHERE tick_queue = (SELECT queue_id FROM pgq.queue WHERE queue_name = $1)", &[&cfg.queue_name])
            .ctx(|| "cannot reset local ticks".into())?;
        tx.query_one(
            "SELECT pgq.ticker($1, $2, $3::text::timestamptz, $4)",
            &[&cfg.queue_name, &tick, &tick_time, &seq],
        )
        .ctx(|| "cannot create the first local tick".into())?;
    }
    tx.execute(
        "INSERT INTO londiste.node_info (queue_name, node_type, node_name, worker_name, node_location,
                                         provider_node, provider_location, last_tick_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[&cfg.queue_name, &kind, &name, &worker, &loc, &pnode.node_name, &provider_loc, &tick],
    )
    .ctx(|| "cannot create the node".into())?;
    for m in members {
        let (n, l, t, pr, d): (String, String, Option<String>, Option<String>, bool) =
            (m.get(0), m.get(1), m.get(2), m.get(3), m.get(4));
        tx.execute(
            "INSERT INTO londiste.node_location (queue_name, node_name, node_location, node_type, provider_node, dead)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (queue_name, node_name) DO NOTHING",
            &[&cfg.queue_name, &n, &l, &t, &pr, &d],
        )
        .ctx(|| "cannot copy members".into())?;
    }
    tx.commit().ctx(|| "cannot commit".into())?;
    log::info!(
        "Initialized {kind} node {name} of queue {}, provider {}",
        cfg.queue_name,
        pnode.node_name
    );
    log::info!("Done");
    Ok(())
}

/// Location of the root, walking up from a node.
fn find_root(cfg: &WorkerConfig, c: &mut Client, n: &NodeInfo) -> Result<Option<String>> {
    if n.is_root() {
        return Ok(Some(n.node_location.clone()));
    }
    let mut loc = n.provider_location.clone();
    for _ in 0..32 {
        let Some(l) = loc else { return Ok(None) };
        let mut r = remote(cfg, &l)?;
        let Some(rn) = node::load(&mut r, &cfg.queue_name)? else {
            return Ok(None);
        };
        if rn.is_root() {
            return Ok(Some(l));
        }
        loc = rn.provider_location;
    }
    let _ = c;
    Ok(None)
}

/// The names of this node's provider, its provider, ... up to the root.
pub(super) fn provider_chain(cfg: &WorkerConfig, n: &NodeInfo) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let mut loc = n.provider_location.clone();
    while let Some(l) = loc {
        if names.len() > 32 {
            break;
        }
        let mut r = remote(cfg, &l)?;
        let Some(up) = node::load(&mut r, &cfg.queue_name)? else {
            break;
        };
        names.push(up.node_name.clone());
        loc = up.provider_location;
    }
    Ok(names)
}

pub fn members(cfg: &WorkerConfig) -> Result<()> {
    let mut c = connect_local(cfg)?;
    node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let rows = c
        .query(
            "SELECT node_name, dead, node_location FROM londiste.node_location WHERE queue_name = $1 ORDER BY 1",
            &[&cfg.queue_name],
        )
        .ctx(|| "cannot read members".into())?;
    println!("{:<20} {:<6} node_location", "node_name", "dead");
    for r in rows {
        let (n, d, l): (String, bool, String) = (r.get(0), r.get(1), r.get(2));
        println!("{:<20} {:<6} {}", n, d, db::redact(&l));
    }
    Ok(())
}

pub fn node_info(cfg: &WorkerConfig) -> Result<()> {
    let mut c = connect_local(cfg)?;
    let n = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let status = if n.paused {
        "PAUSED"
    } else if n.cur_error.is_some() {
        "ERROR"
    } else {
        "OK"
    };
    println!(
        "Node: {}  Type: {}  Queue: {}",
        n.node_name, n.node_type, n.queue_name
    );
    println!("Status: {status}");
    if let Some(p) = &n.provider_node {
        println!(
            "Provider: {} ({})",
            p,
            db::redact(n.provider_location.as_deref().unwrap_or(""))
        );
    }
    println!("Location: {}", db::redact(&n.node_location));
    println!(
        "Worker: {}  Last tick: {}",
        n.worker_name,
        n.last_tick_id.map(|t| t.to_string()).unwrap_or("-".into())
    );
    if let Some(e) = &n.cur_error {
        println!("ERR: {e}");
    }
    Ok(())
}

pub fn pause(cfg: &WorkerConfig, paused: bool) -> Result<()> {
    let mut c = connect_local(cfg)?;
    node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    c.execute(
        "UPDATE londiste.node_info SET paused = $2 WHERE queue_name = $1",
        &[&cfg.queue_name, &paused],
    )
    .ctx(|| "cannot change the pause flag".into())?;
    log::info!("worker {}", if paused { "paused" } else { "resumed" });
    Ok(())
}

/// Waits until every table is in sync (state ok).
pub fn wait_sync(cfg: &WorkerConfig) -> Result<()> {
    let mut c = connect_local(cfg)?;
    node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let mut last = usize::MAX;
    let mut last_note = std::time::Instant::now();
    loop {
        let ts = node::tables(&mut c, &cfg.queue_name)?;
        let todo: Vec<_> = ts
            .iter()
            .filter(|t| t.local && t.merge_state.as_deref() != Some("ok"))
            .collect();
        if todo.is_empty() {
            log::info!("All tables in sync");
            return Ok(());
        }
        if todo.len() != last {
            log::info!("{}/{} table(s) to copy", todo.len(), ts.len());
            last = todo.len();
            last_note = std::time::Instant::now();
        } else if last_note.elapsed() > std::time::Duration::from_secs(30) {
            last_note = std::time::Instant::now();
            let states: Vec<String> = todo
                .iter()
                .map(|t| format!("{}: {}", t.table_name, human_state(t)))
                .collect();
            log::warn!(
                "still waiting: {}; is the worker running and not paused? (status)",
                states.join("; ")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// wait-provider / wait-root: until this node has applied every change that
/// was committed on the root before the command started. A tick is forced on
/// the root first, so that "stop writes, wait-root, switch over" holds even when
/// the last writes came after the last tick. wait-provider stops at the
/// provider's newest tick once that covers the forced one, or at the
/// provider's newest tick when the root is unreachable from here.
pub fn wait_upstream(cfg: &WorkerConfig, root: bool) -> Result<()> {
    let mut c = connect_local(cfg)?;
    let n = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    if n.is_root() {
        log::info!("this is the root node: nothing to wait for");
        return Ok(());
    }
    // wait-provider can do without the root (unreachable, or a chain being
    // rebuilt): it then waits for the provider's newest tick.
    let root_tick = (|| -> Result<Option<i64>> {
        match find_root(cfg, &mut c, &n)? {
            Some(l) => Ok(Some(crate::replication::node::force_new_tick(
                &mut remote(cfg, &l)?,
                &cfg.queue_name,
            )?)),
            None => Ok(None),
        }
    })();
    let root_tick = match root_tick {
        Ok(Some(t)) => Some(t),
        Ok(None) if root => {
            return Err(Error::Other(
                "cannot find the root node from this node's provider chain (see members)".into(),
            ));
        }
        Err(e) if root => return Err(e),
        Ok(None) => None,
        Err(e) => {
            log::warn!(
                "cannot make a tick on the root ({e}); waiting for the provider's newest tick"
            );
            None
        }
    };
    let ploc = n.provider_location.clone().unwrap_or_default();
    let mut p = remote(cfg, &ploc)?;
    let provider_tick =
        |p: &mut Client| -> Result<i64> { Ok(node::newest_tick(p, &cfg.queue_name)?.unwrap_or(0)) };
    let what = if root { "root" } else { "provider" };
    let started = std::time::Instant::now();
    let mut last_note = started;
    let mut target: Option<i64> = None;
    loop {
        // The provider may itself be catching up with the root: its ticks
        // reach the forced one later.
        if target.is_none() {
            let pt = provider_tick(&mut p)?;
            target = match (root, root_tick) {
                (true, t) => t,
                (false, Some(t)) if pt >= t => Some(pt),
                (false, Some(_)) => None,
                (false, None) => Some(pt),
            };
            if let Some(t) = target {
                log::info!("waiting until this node reaches tick {t} of the {what}");
            }
        }
        let n = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
        let at = n.last_tick_id.unwrap_or(0);
        if let Some(t) = target
            && at >= t
        {
            log::info!("caught up with the {what} (tick {at})");
            return Ok(());
        }
        if last_note.elapsed() > std::time::Duration::from_secs(30) {
            last_note = std::time::Instant::now();
            match target {
                Some(t) => log::warn!(
                    "still waiting after {:.0}s: this node is at tick {at} of {t}{}; is its worker running and not paused? (status)",
                    started.elapsed().as_secs_f64(),
                    match &n.cur_error {
                        Some(e) => format!(", its last error: {e}"),
                        None => String::new(),
                    }
                ),
                None => log::warn!(
                    "still waiting after {:.0}s: the provider {} has not reached the root's tick {} yet; is its worker running and not paused? (status)",
                    started.elapsed().as_secs_f64(),
                    db::describe(&ploc),
                    root_tick.unwrap_or(0)
                ),
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
