//! Read-only views across nodes: `status` (the tree of nodes with lag, position,
//! errors and table states) and `compare` (row count and checksum of each table on
//! the provider and on this node at the same queue position).

use crate::admin::Opts;
use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::node::{self, NodeInfo};
use crate::record::ident;
use postgres::Client;
use std::time::{Duration, Instant};

fn remote(cfg: &WorkerConfig, loc: &str) -> Result<Client> {
    db::connect(
        &db::with_extra(loc, &cfg.remote_extra_connstr),
        "londiste-rs status",
    )
}

struct Row {
    info: Option<NodeInfo>,
    name: String,
    provider: Option<String>,
    lines: Vec<String>,
}

pub fn status(cfg: &WorkerConfig) -> Result<()> {
    let mut local = db::connect(&cfg.db, "londiste-rs status")?;
    let me = node::require(&mut local, &cfg.queue_name, &cfg.command_hint())?;
    // Find the root: walk up the providers.
    let mut root_loc = me.node_location.clone();
    let mut cur = me.clone();
    let mut root_client: Option<Client> = if me.is_root() { Some(local) } else { None };
    let mut walk = || -> Result<Client> {
        for _ in 0..32 {
            if cur.is_root() {
                break;
            }
            let loc = cur.provider_location.clone().unwrap_or_default();
            let mut c = remote(cfg, &loc)?;
            cur = node::load(&mut c, &cfg.queue_name)?.ok_or_else(|| {
                Error::Other(format!(
                    "{} is not a node of queue {}",
                    db::describe(&loc),
                    cfg.queue_name
                ))
            })?;
            root_loc = loc;
            root_client = Some(c);
        }
        match root_client.take() {
            Some(c) => Ok(c),
            None => remote(cfg, &root_loc),
        }
    };
    let mut root = match walk() {
        Ok(c) => c,
        // Without the way up, show what this node knows: its own state and
        // error are what the operator needs most then.
        Err(e) => return status_alone(cfg, &me, &e),
    };
    let members = root
        .query(
            "SELECT node_name, node_location, provider_node, dead FROM londiste.node_location WHERE queue_name = $1 ORDER BY 1",
            &[&cfg.queue_name],
        )
        .ctx(|| "cannot read members on the root".into())?;
    let root_tick = node::newest_tick(&mut root, &cfg.queue_name)?;
    let mut rows = Vec::new();
    for m in members {
        let (name, loc, prov, dead): (String, String, Option<String>, bool) =
            (m.get(0), m.get(1), m.get(2), m.get(3));
        let mut r = Row {
            info: None,
            name: name.clone(),
            provider: prov,
            lines: Vec::new(),
        };
        if dead {
            r.lines.push("DEAD".into());
            rows.push(r);
            continue;
        }
        match remote(cfg, &loc)
            .and_then(|mut c| node_lines(&mut c, &mut root, cfg, root_tick).map(|x| (x, c)))
        {
            Ok(((info, lines), _)) => {
                r.info = info;
                r.lines = lines;
            }
            Err(e) => r.lines.push(format!("ERR: cannot reach: {e}")),
        }
        rows.push(r);
    }
    println!("Queue: {}   Local node: {}\n", cfg.queue_name, me.node_name);
    let root_name = rows
        .iter()
        .find(|r| r.info.as_ref().is_some_and(|i| i.is_root()))
        .map(|r| r.name.clone());
    let Some(root_name) = root_name else {
        return Err(Error::Other(
            "the root node is not among the members".into(),
        ));
    };
    print_tree(&rows, &root_name, "", true, true);
    Ok(())
}

/// `status` when the provider chain cannot be followed to the root.
fn status_alone(cfg: &WorkerConfig, me: &NodeInfo, why: &Error) -> Result<()> {
    let mut a = db::connect(&cfg.db, "londiste-rs status")?;
    let mut b = db::connect(&cfg.db, "londiste-rs status")?;
    let (_, lines) = node_lines(&mut a, &mut b, cfg, None)?;
    println!("Queue: {}   Local node: {}\n", cfg.queue_name, me.node_name);
    println!("{} ({})", me.node_name, me.node_type);
    for l in lines {
        println!("    {l}");
    }
    println!("    ERR: cannot reach the rest of the set through the provider: {why}");
    Ok(())
}

fn print_tree(rows: &[Row], name: &str, prefix: &str, last: bool, top: bool) {
    let Some(r) = rows.iter().find(|r| r.name == name) else {
        return;
    };
    let kind = r
        .info
        .as_ref()
        .map(|i| i.node_type.clone())
        .unwrap_or_else(|| "?".into());
    if top {
        println!("{} ({})", r.name, kind);
    } else {
        println!("{}+--: {} ({})", prefix, r.name, kind);
    }
    let child_prefix = if top {
        String::new()
    } else {
        format!("{}{}", prefix, if last { "    " } else { "|   " })
    };
    let kids: Vec<&Row> = rows
        .iter()
        .filter(|k| k.provider.as_deref() == Some(name) && k.name != name)
        .collect();
    for l in &r.lines {
        println!(
            "{}{}    {}",
            child_prefix,
            if kids.is_empty() { " " } else { "|" },
            l
        );
    }
    for (i, k) in kids.iter().enumerate() {
        print_tree(rows, &k.name, &child_prefix, i + 1 == kids.len(), false);
    }
}

fn node_lines(
    c: &mut Client,
    root: &mut Client,
    cfg: &WorkerConfig,
    root_tick: Option<i64>,
) -> Result<(Option<NodeInfo>, Vec<String>)> {
    let Some(n) = node::load(c, &cfg.queue_name)? else {
        return Ok((None, vec!["not initialised".into()]));
    };
    let mut lines = Vec::new();
    let tables = node::tables(c, &cfg.queue_name)?;
    let ok = tables
        .iter()
        .filter(|t| t.local && t.merge_state.as_deref() == Some("ok"))
        .count();
    let half = tables
        .iter()
        .filter(|t| t.local && t.merge_state.as_deref() != Some("ok"))
        .count();
    let ignored = tables.iter().filter(|t| !t.local).count();
    lines.push(format!("Tables: {ok}/{half}/{ignored}"));
    if n.is_root() {
        let lag: Option<f64> = c
            .query_one(
                "SELECT extract(epoch FROM now() - max(t.tick_time))::float8 FROM pgq.tick t JOIN pgq.queue q
                   ON q.queue_id = t.tick_queue WHERE q.queue_name = $1",
                &[&cfg.queue_name],
            )
            .ctx(|| "cannot read ticks".into())?
            .get(0);
        lines.push(format!(
            "Lag: {}, Tick: {}",
            lag.map(|l| format!("{l:.1}s")).unwrap_or("-".into()),
            root_tick.map(|t| t.to_string()).unwrap_or("-".into())
        ));
    } else {
        let tick = n.last_tick_id.unwrap_or(0);
        let lag: Option<f64> = root
            .query_opt(
                "SELECT extract(epoch FROM now() - t.tick_time)::float8 FROM pgq.tick t JOIN pgq.queue q
                   ON q.queue_id = t.tick_queue WHERE q.queue_name = $1 AND t.tick_id = $2",
                &[&cfg.queue_name, &tick],
            )
            .ctx(|| "cannot read ticks on the root".into())?
            .map(|r| r.get(0));
        let behind = root_tick.map(|r| r - tick).unwrap_or(0);
        lines.push(format!(
            "Lag: {}, Tick: {}{}",
            lag.map(|l| format!("{l:.1}s")).unwrap_or("?".into()),
            tick,
            if behind > 0 {
                format!(" ({behind} ticks behind)")
            } else {
                String::new()
            }
        ));
        let seen: Option<f64> = c
            .query_one(
                "SELECT extract(epoch FROM now() - worker_seen)::float8 FROM londiste.node_info WHERE queue_name = $1",
                &[&cfg.queue_name],
            )
            .ctx(|| "cannot read node_info".into())?
            .get(0);
        if seen.is_none_or(|s| s > 60.0) {
            lines.push("NOT RUNNING? worker not seen for over a minute".into());
        }
    }
    if n.paused {
        lines.push("PAUSED".into());
    }
    if let Some(e) = &n.cur_error {
        lines.push(format!("ERR: {e}"));
    }
    for t in tables
        .iter()
        .filter(|t| t.local && t.merge_state.as_deref() != Some("ok"))
    {
        lines.push(format!(
            "  {}: {}",
            t.table_name,
            crate::admin::human_state(t)
        ));
    }
    Ok((Some(n), lines))
}

/// Row count and checksum of a table over the given columns.
fn checksum(
    c: &mut impl postgres::GenericClient,
    table: &str,
    cols: &[String],
    count_only: bool,
) -> Result<(i64, i64)> {
    let sql = if count_only {
        format!("SELECT count(*), 0::int8 FROM ONLY {table}")
    } else {
        let list: Vec<String> = cols.iter().map(|c| format!("t.{}", ident(c))).collect();
        format!(
            "SELECT count(*), coalesce(sum(hashtext(ROW({})::text)::int8), 0)::int8 FROM ONLY {table} t",
            list.join(", ")
        )
    };
    let r = c
        .query_one(sql.as_str(), &[])
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
    let tables = crate::status::selected_tables(&mut local, &cfg.queue_name, args)?;
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
        let dest = crate::apply::local_name(&t.table_name, t.dest_table.as_deref())?;
        let src = crate::apply::local_name(&t.table_name, None)?;
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
        let (src_sum, dst_sum) = std::thread::scope(|s| {
            let h = s.spawn(|| checksum(&mut ptx, &src, &common, count_only));
            let d = checksum(&mut ltx, &dest, &common, count_only);
            (h.join().expect("checksum thread"), d)
        });
        let ((sn, ss), (dn, ds)) = (src_sum?, dst_sum?);
        ptx.commit().ok();
        ltx.commit().ok();
        println!("{}: provider {} rows, checksum={}", t.table_name, sn, ss);
        println!("{}: this node {} rows, checksum={}", t.table_name, dn, ds);
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
    let wanted = crate::admin::canonical_names(args)?;
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

/// Whether the node on this connection is the root.
pub fn is_root_at(c: &mut Client, queue: &str) -> Result<bool> {
    Ok(node::load(c, queue)?.is_some_and(|n| n.is_root()))
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
        let cur = node::newest_tick(c, queue)?.unwrap_or(0);
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
