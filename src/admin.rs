//! Administration commands of the `londiste3` mode: node creation, table and
//! sequence registration, and the read-only views (status, tables, members...).
//! Every command is safe to run twice: a repeat says so and exits 0.

use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::install;
use crate::node::{self, NodeInfo};
use crate::record::{fq_name, split_qualified};
use postgres::Client;

/// Options of the table and node commands (parsed in cli.rs).
#[derive(Debug, Default, Clone)]
pub struct Opts {
    pub provider: Option<String>,
    pub all: bool,
    pub expect_sync: bool,
    pub skip_truncate: bool,
    pub no_triggers: bool,
    pub wait_sync: bool,
    pub skip_non_existing: bool,
    pub create: bool,
    pub create_full: bool,
    pub dest_table: Option<String>,
    pub copy_node: Option<String>,
    pub keys: Option<Vec<String>>,
    pub names_only: bool,
    pub count_only: bool,
    pub apply: bool,
}

fn connect_local(cfg: &WorkerConfig) -> Result<Client> {
    let mut c = db::connect(&cfg.db, "londiste-rs admin")?;
    crate::install::upgrade_if_installed(&mut c)?;
    Ok(c)
}

fn remote(cfg: &WorkerConfig, loc: &str) -> Result<Client> {
    db::connect(
        &db::with_extra(loc, &cfg.remote_extra_connstr),
        "londiste-rs admin",
    )
}

pub fn create_root(cfg: &WorkerConfig, name: Option<&str>, location: Option<&str>) -> Result<()> {
    let name = name
        .map(String::from)
        .or_else(|| cfg.node_name.clone())
        .ok_or_else(|| {
            Error::Usage("create-root needs a node name: create-root NAME [CONNSTR]".into())
        })?;
    let Some((loc, mut c)) = prepare_new_node(cfg, location)? else {
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
    Ok(Some((loc, c)))
}

fn warn_location(loc: &str) {
    if !loc.contains("host=") && !loc.contains("service=") && !loc.contains("://") {
        log::warn!(
            "public connect string {:?} has no host=: other nodes may not reach this one",
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
    let Some((loc, mut c)) = prepare_new_node(cfg, location)? else {
        return Ok(());
    };
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
fn provider_chain(cfg: &WorkerConfig, n: &NodeInfo) -> Result<Vec<String>> {
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

/// Tables of the root database that could be added (not ours, not yet added).
fn missing(c: &mut Client, queue: &str) -> Result<Vec<(String, String)>> {
    let rows = c
        .query(
            "SELECT obj_kind, obj_name FROM londiste.local_show_missing($1)",
            &[&queue],
        )
        .ctx(|| "cannot list missing objects".into())?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

pub fn glob_match(pat: &str, s: &str) -> bool {
    fn m(p: &[char], s: &[char]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some('*'), _) => m(&p[1..], s) || (!s.is_empty() && m(p, &s[1..])),
            (Some('?'), Some(_)) => m(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pat.chars().collect();
    let s: Vec<char> = s.chars().collect();
    m(&p, &s)
}

/// Turns command-line names and globs into canonical table names from `pool`.
fn resolve(args: &[String], pool: &[String], opts: &Opts, what: &str) -> Result<Vec<String>> {
    if opts.all {
        return Ok(pool.to_vec());
    }
    if args.is_empty() {
        return Err(Error::Usage(format!(
            "name the {what}s to use, or give --all"
        )));
    }
    let mut out = Vec::new();
    for a in args {
        if a.contains('*') || a.contains('?') {
            let pat = if a.contains('.') {
                a.clone()
            } else {
                format!("public.{a}")
            };
            let hits: Vec<&String> = pool.iter().filter(|t| glob_match(&pat, t)).collect();
            if hits.is_empty() {
                log::warn!("no {what} matches {a}");
            }
            out.extend(hits.into_iter().cloned());
        } else {
            let (s, t) = split_qualified(a)?;
            out.push(fq_name(&s, &t));
        }
    }
    out.dedup();
    Ok(out)
}

/// Table names as given on the command line, in the canonical stored form.
pub fn canonical_names(args: &[String]) -> Result<Vec<String>> {
    args.iter()
        .map(|a| split_qualified(a).map(|(s, t)| fq_name(&s, &t)))
        .collect()
}

/// Is `name` a sequence here? An error if it names something else.
fn seq_exists(c: &mut Client, name: &str) -> Result<bool> {
    let kind: Option<String> = c
        .query_one(
            "SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1))",
            &[&name],
        )
        .ctx(|| format!("cannot look up {name}"))?
        .get(0);
    match kind.as_deref() {
        None => Ok(false),
        Some("S") => Ok(true),
        Some(_) => Err(Error::Other(format!(
            "{name} is not a sequence: add tables with add-table"
        ))),
    }
}

fn table_exists(c: &mut Client, name: &str) -> Result<bool> {
    let r = c
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .ctx(|| format!("cannot look up {name}"))?;
    Ok(r.get(0))
}

pub fn add_table(cfg: &WorkerConfig, args: &[String], opts: &Opts) -> Result<()> {
    let mut c = connect_local(cfg)?;
    let n = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    if opts.dest_table.is_some() && (opts.all || args.len() != 1) {
        return Err(Error::Usage(
            "--dest-table works with exactly one table".into(),
        ));
    }
    if n.is_root() {
        let pool: Vec<String> = missing(&mut c, &cfg.queue_name)?
            .into_iter()
            .filter(|(k, _)| k == "r")
            .map(|(_, n)| n)
            .collect();
        let names = resolve(args, &pool, opts, "table")?;
        let mut failed = 0;
        for t in names {
            match add_root_table(&mut c, cfg, &t, opts) {
                Ok(()) => {}
                Err(e) if opts.all => {
                    log::warn!("{e}");
                    failed += 1;
                }
                Err(e) => return Err(e),
            }
        }
        if failed > 0 {
            log::warn!("{failed} table(s) skipped; add them one by one once fixed");
        }
        return Ok(());
    }
    // Subscriber: tables must be replicated on the provider (or above).
    let ploc = n.provider_location.clone().unwrap_or_default();
    let mut p = remote(cfg, &ploc)?;
    let prov_rows = p
        .query(
            "SELECT table_name FROM londiste.table_info WHERE queue_name = $1 AND local ORDER BY 1",
            &[&cfg.queue_name],
        )
        .ctx(|| "cannot read the provider's tables".into())?;
    let provider_tables: Vec<String> = prov_rows.iter().map(|r| r.get(0)).collect();
    let have: Vec<String> = node::tables(&mut c, &cfg.queue_name)?
        .into_iter()
        .map(|t| t.table_name)
        .collect();
    let pool: Vec<String> = provider_tables
        .iter()
        .filter(|t| !have.contains(t))
        .cloned()
        .collect();
    let names = resolve(args, &pool, opts, "table")?;
    if names.is_empty() && opts.all {
        log::info!("nothing to add: every table of the provider is already added here");
    }
    if let Some(node) = &opts.copy_node {
        let known = c
            .query_opt(
                "SELECT 1 FROM londiste.node_location WHERE queue_name = $1 AND node_name = $2",
                &[&cfg.queue_name, node],
            )
            .ctx(|| "cannot read node_location".into())?;
        if known.is_none() {
            return Err(Error::Other(format!(
                "--copy-node: {node} is not a member of the set (see members)"
            )));
        }
        // Only a node above this one passes through every tick this node's
        // provider has, which the copy's hand-over needs.
        let chain = provider_chain(cfg, &n)?;
        if !chain.contains(node) {
            return Err(Error::Other(format!(
                "--copy-node: {node} is not above this node (its providers: {}); name one of them",
                chain.join(" -> ")
            )));
        }
    }
    for t in names {
        if have.contains(&t) {
            log::info!("Table {t} already added");
            continue;
        }
        if !provider_tables.contains(&t) && !opts.expect_sync {
            let msg = format!(
                "table {t} is not replicated on the provider {}: add it there first (londiste-rs PROVIDER.ini add-table {t})",
                db::describe(&ploc)
            );
            if opts.skip_non_existing {
                log::warn!("{msg}; skipped");
                continue;
            }
            return Err(Error::Other(msg));
        }
        let dest = opts.dest_table.clone().map(|d| {
            let (s, tt) = split_qualified(&d).unwrap_or(("public".into(), d.clone()));
            fq_name(&s, &tt)
        });
        let local_name = dest.clone().unwrap_or_else(|| t.clone());
        if !table_exists(&mut c, &local_name)? {
            if opts.create || opts.create_full {
                create_from_provider(&mut p, &mut c, &t, &local_name, opts.create_full)?;
            } else if opts.skip_non_existing {
                log::warn!("table {local_name} does not exist on this node; skipped");
                continue;
            } else {
                return Err(Error::Other(format!(
                    "table {local_name} does not exist on this node: create it (pg_dump --schema-only), or add with --create"
                )));
            }
        }
        let has_key: bool = c
            .query_one(
                "SELECT pgq.table_pkey($1::text::regclass) IS NOT NULL",
                &[&local_name],
            )
            .ctx(|| format!("cannot read the key of {local_name}"))?
            .get(0);
        if !has_key && opts.keys.is_none() {
            return Err(Error::Other(format!(
                "table {local_name} has no primary key on this node: updates cannot be applied; add the same primary key as on the provider"
            )));
        }
        let state: Option<&str> = if opts.expect_sync { Some("ok") } else { None };
        let attrs: Option<String> = opts.copy_node.as_ref().map(|n| format!("copy_node={n}"));
        let mut tx = c.transaction().ctx(|| "cannot begin".into())?;
        tx.execute(
            "INSERT INTO londiste.table_info (queue_name, table_name, dest_table, local, merge_state, skip_truncate,
                                              key_columns, table_attrs)
             VALUES ($1, $2, $3, true, $4, $5, $6, $7)",
            &[&cfg.queue_name, &t, &dest, &state, &opts.skip_truncate, &opts.keys, &attrs],
        )
        .ctx(|| format!("cannot add table {t}"))?;
        if !opts.no_triggers {
            tx.query_one(
                "SELECT londiste.deny_create($1, $2::text::regclass)",
                &[&cfg.queue_name, &local_name],
            )
            .ctx(|| format!("cannot protect {local_name} against local writes"))?;
        }
        tx.commit().ctx(|| "cannot commit".into())?;
        log::info!(
            "Table added: {t}{}",
            if opts.expect_sync {
                " (expected in sync, no copy)"
            } else {
                ""
            }
        );
    }
    // Wake the worker now instead of at its next loop_delay: it listens for
    // ticks on the provider.
    let _ = p.execute("SELECT pg_notify('pgq_tick', $1)", &[&cfg.queue_name]);
    if opts.wait_sync {
        wait_sync(cfg)?;
    }
    Ok(())
}

fn add_root_table(c: &mut Client, cfg: &WorkerConfig, t: &str, opts: &Opts) -> Result<()> {
    if !table_exists(c, t)? {
        return Err(Error::Other(format!(
            "table {t} does not exist in this database; check the name (schema.table)"
        )));
    }
    let exists = c
        .query_opt(
            "SELECT 1 FROM londiste.table_info WHERE queue_name = $1 AND table_name = $2",
            &[&cfg.queue_name, &t],
        )
        .ctx(|| "cannot read table_info".into())?;
    if exists.is_some() {
        log::info!("Table {t} already added");
        return Ok(());
    }
    let has_key: bool = c
        .query_one(
            "SELECT pgq.table_pkey($1::text::regclass) IS NOT NULL",
            &[&t],
        )
        .ctx(|| format!("cannot read the key of {t}"))?
        .get(0);
    if !has_key && opts.keys.is_none() {
        return Err(Error::Other(format!(
            "table {t} has no primary key: add one (ALTER TABLE {t} ADD PRIMARY KEY (...)), or name key columns with --key=COL[,COL]"
        )));
    }
    let mut tx = c.transaction().ctx(|| "cannot begin".into())?;
    tx.execute(
        &format!(
            "SET LOCAL lock_timeout = '{}ms'",
            cfg.lock_timeout.as_millis()
        ),
        &[],
    )
    .ctx(|| "cannot set lock_timeout".into())?;
    if !opts.no_triggers {
        tx.query_one(
            "SELECT pgq.capture_create($1, $2::text::regclass, $3, 'capture')",
            &[&cfg.queue_name, &t, &opts.keys],
        )
        .ctx(|| {
            format!(
                "cannot create the capture triggers on {t} (lock_timeout {:?}; is the table busy?)",
                cfg.lock_timeout
            )
        })?;
    }
    tx.execute(
        "INSERT INTO londiste.table_info (queue_name, table_name, local, merge_state, key_columns) VALUES ($1, $2, true, 'ok', $3)",
        &[&cfg.queue_name, &t, &opts.keys],
    )
    .ctx(|| format!("cannot add table {t}"))?;
    tx.query_one(
        "SELECT pgq.insert_event($1, 'londiste.add-table', $2)",
        &[&cfg.queue_name, &t],
    )
    .ctx(|| "cannot announce the table".into())?;
    tx.commit().ctx(|| "cannot commit".into())?;
    log::info!("Table added: {t}");
    Ok(())
}

/// --create: the table with its columns and primary key, from the provider.
fn create_from_provider(
    p: &mut Client,
    c: &mut Client,
    src: &str,
    dest: &str,
    full: bool,
) -> Result<()> {
    let cols = p
        .query(
            "SELECT quote_ident(attname), format_type(atttypid, atttypmod), attnotnull FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&src],
        )
        .ctx(|| format!("cannot read the structure of {src} on the provider"))?;
    let pk: Option<Vec<String>> = p
        .query_one("SELECT pgq.table_pkey($1::text::regclass)", &[&src])
        .ctx(|| "cannot read the provider's key".into())?
        .get(0);
    let mut defs: Vec<String> = cols
        .iter()
        .map(|r| {
            let (n, t, nn): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
            format!("{n} {t}{}", if nn { " NOT NULL" } else { "" })
        })
        .collect();
    if let Some(k) = pk {
        let k: Vec<String> = k.iter().map(|x| crate::record::ident(x)).collect();
        defs.push(format!("PRIMARY KEY ({})", k.join(", ")));
    }
    let (s, _) = split_qualified(dest)?;
    let sql = format!(
        "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE {} ({})",
        crate::record::ident(&s),
        dest,
        defs.join(", ")
    );
    c.batch_execute(&sql)
        .ctx(|| format!("cannot create table {dest}"))?;
    log::info!("Created table {dest}");
    if full {
        // --create-full: the provider's other indexes too (the copy is faster
        // without them, but the replica is meant to serve queries).
        let idx = p
            .query(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = $1::text::regclass AND NOT indisprimary",
                &[&src],
            )
            .ctx(|| format!("cannot read the indexes of {src} on the provider"))?;
        let src_q = crate::apply::local_name(src, None)?;
        for r in idx {
            let def: String = r.get(0);
            let def = if src_q == crate::apply::local_name(dest, None)? {
                def
            } else {
                def.replace(&format!(" ON {src} "), &format!(" ON {dest} "))
            };
            c.batch_execute(&def)
                .ctx(|| format!("cannot create index: {def}"))?;
            log::info!("Created index: {def}");
        }
    }
    Ok(())
}

pub fn remove_table(cfg: &WorkerConfig, args: &[String], opts: &Opts) -> Result<()> {
    let mut c = connect_local(cfg)?;
    let n = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let have: Vec<String> = node::tables(&mut c, &cfg.queue_name)?
        .into_iter()
        .map(|t| t.table_name)
        .collect();
    let names = resolve(args, &have, opts, "table")?;
    for t in names {
        if !have.contains(&t) {
            log::info!("Table {t} is not added; nothing to remove");
            continue;
        }
        let mut tx = c.transaction().ctx(|| "cannot begin".into())?;
        if n.is_root() && table_exists_tx(&mut tx, &t)? {
            tx.query_one(
                "SELECT pgq.capture_drop($1, $2::text::regclass)",
                &[&cfg.queue_name, &t],
            )
            .ctx(|| format!("cannot drop the triggers on {t}"))?;
            tx.query_one(
                "SELECT pgq.insert_event($1, 'londiste.remove-table', $2)",
                &[&cfg.queue_name, &t],
            )
            .ctx(|| "cannot announce the removal".into())?;
        }
        if !n.is_root() {
            let local: String = tx
                .query_one(
                    "SELECT coalesce(dest_table, table_name) FROM londiste.table_info WHERE queue_name = $1 AND table_name = $2",
                    &[&cfg.queue_name, &t],
                )
                .ctx(|| "cannot read table_info".into())?
                .get(0);
            if table_exists_tx(&mut tx, &local)? {
                tx.query_one(
                    "SELECT londiste.deny_drop($1, $2::text::regclass)",
                    &[&cfg.queue_name, &local],
                )
                .ctx(|| format!("cannot drop the write protection of {local}"))?;
            }
        }
        tx.execute(
            "DELETE FROM londiste.table_info WHERE queue_name = $1 AND table_name = $2",
            &[&cfg.queue_name, &t],
        )
        .ctx(|| "cannot remove the table".into())?;
        tx.commit().ctx(|| "cannot commit".into())?;
        log::info!("Table removed: {t}");
    }
    Ok(())
}

fn table_exists_tx(tx: &mut postgres::Transaction, name: &str) -> Result<bool> {
    Ok(tx
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .ctx(|| "cannot look up table".into())?
        .get(0))
}

pub fn resync(cfg: &WorkerConfig, args: &[String], opts: &Opts) -> Result<()> {
    let mut c = connect_local(cfg)?;
    let n = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    if n.is_root() {
        return Err(Error::Other(
            "resync is for subscriber nodes; the root is the source".into(),
        ));
    }
    let have: Vec<String> = node::tables(&mut c, &cfg.queue_name)?
        .into_iter()
        .map(|t| t.table_name)
        .collect();
    for t in resolve(args, &have, opts, "table")? {
        let k = c
            .execute(
                "UPDATE londiste.table_info SET merge_state = NULL, custom_snapshot = NULL, copy_tick = NULL
                  WHERE queue_name = $1 AND table_name = $2",
                &[&cfg.queue_name, &t],
            )
            .ctx(|| "cannot reset the table".into())?;
        if k == 0 {
            return Err(Error::Other(format!("table {t} is not added on this node")));
        }
        log::info!("Table {t} will be copied again");
    }
    Ok(())
}

pub fn add_seq(cfg: &WorkerConfig, args: &[String], opts: &Opts) -> Result<()> {
    let mut c = connect_local(cfg)?;
    let n = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    // Subscriber: the provider's sequences and their last published values.
    let mut provider_seqs: Vec<(String, Option<i64>)> = Vec::new();
    let pool: Vec<String> = if n.is_root() {
        missing(&mut c, &cfg.queue_name)?
            .into_iter()
            .filter(|(k, _)| k == "S")
            .map(|(_, n)| n)
            .collect()
    } else {
        let mut p = remote(cfg, n.provider_location.as_deref().unwrap_or(""))?;
        let rows = p
            .query(
                "SELECT seq_name, last_value FROM londiste.seq_info WHERE queue_name = $1 AND local",
                &[&cfg.queue_name],
            )
            .ctx(|| "cannot read the provider's sequences".into())?;
        provider_seqs = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let have: Vec<String> = c
            .query(
                "SELECT seq_name FROM londiste.seq_info WHERE queue_name = $1",
                &[&cfg.queue_name],
            )
            .ctx(|| "cannot read seq_info".into())?
            .iter()
            .map(|r| r.get(0))
            .collect();
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|s| !have.contains(s))
            .collect()
    };
    for s in resolve(args, &pool, opts, "sequence")? {
        let published = provider_seqs.iter().find(|(p, _)| *p == s).map(|(_, v)| *v);
        if !n.is_root() && published.is_none() {
            let msg = format!(
                "sequence {s} is not replicated on the provider {}: add it there first (londiste-rs PROVIDER.ini add-seq {s})",
                db::describe(n.provider_location.as_deref().unwrap_or(""))
            );
            if opts.skip_non_existing {
                log::warn!("{msg}; skipped");
                continue;
            }
            return Err(Error::Other(msg));
        }
        if !seq_exists(&mut c, &s)? {
            if opts.create || opts.create_full {
                c.batch_execute(&format!("CREATE SEQUENCE {s}"))
                    .ctx(|| format!("cannot create sequence {s}"))?;
            } else if opts.skip_non_existing {
                log::warn!("sequence {s} does not exist here; skipped");
                continue;
            } else {
                return Err(Error::Other(format!(
                    "sequence {s} does not exist on this node: create it, or add with --create"
                )));
            }
        }
        let k = c
            .execute(
                "INSERT INTO londiste.seq_info (queue_name, seq_name, local) VALUES ($1, $2, true) ON CONFLICT DO NOTHING",
                &[&cfg.queue_name, &s],
            )
            .ctx(|| format!("cannot add sequence {s}"))?;
        // The provider may have published its value before this node added the
        // sequence (the event then passed by unapplied): catch up with it now.
        if let Some(Some(v)) = published {
            c.query_one(
                "SELECT londiste.seq_push($1::text::regclass, $2)",
                &[&s, &v],
            )
            .ctx(|| format!("cannot move sequence {s} to {v}"))?;
            c.execute(
                "UPDATE londiste.seq_info SET last_value = $3 WHERE queue_name = $1 AND seq_name = $2
                    AND (last_value IS NULL OR last_value < $3)",
                &[&cfg.queue_name, &s, &v],
            )
            .ctx(|| "cannot update seq_info".into())?;
        }
        log::info!(
            "{} {s}",
            if k == 0 {
                "Sequence already added:"
            } else {
                "Sequence added:"
            }
        );
    }
    if n.is_root() {
        c.query_one(
            "SELECT londiste.root_check_seqs($1, $2)",
            &[&cfg.queue_name, &cfg.seq_buffer],
        )
        .ctx(|| "cannot publish sequences".into())?;
    }
    Ok(())
}

pub fn remove_seq(cfg: &WorkerConfig, args: &[String], opts: &Opts) -> Result<()> {
    let mut c = connect_local(cfg)?;
    node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let have: Vec<String> = c
        .query(
            "SELECT seq_name FROM londiste.seq_info WHERE queue_name = $1",
            &[&cfg.queue_name],
        )
        .ctx(|| "cannot read seq_info".into())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for s in resolve(args, &have, opts, "sequence")? {
        c.execute(
            "DELETE FROM londiste.seq_info WHERE queue_name = $1 AND seq_name = $2",
            &[&cfg.queue_name, &s],
        )
        .ctx(|| "cannot remove sequence".into())?;
        log::info!("Sequence removed: {s}");
    }
    Ok(())
}

pub fn human_state(t: &node::TableState) -> String {
    let state = human_copy_state(t);
    match (&t.copy_error, t.merge_state.as_deref()) {
        (Some(e), s) if s != Some("ok") => format!("{state}; last copy failed: {e}"),
        _ => state,
    }
}

fn human_copy_state(t: &node::TableState) -> String {
    match t.merge_state.as_deref() {
        Some("ok") => "ok".into(),
        Some("in-copy") => {
            let rows = t.copy_rows.unwrap_or(0);
            let est = t.copy_estimate.unwrap_or(0);
            let pct = if est > 0 {
                format!(" {:.0}%", 100.0 * rows as f64 / est as f64)
            } else {
                String::new()
            };
            let rate = t
                .copy_seconds
                .filter(|s| *s > 0.0)
                .map(|s| rows as f64 / s)
                .unwrap_or(0.0);
            let eta = if rate > 0.0 && est > rows {
                format!(", ETA {:.0}s", (est - rows) as f64 / rate)
            } else {
                String::new()
            };
            let mb = t.copy_bytes.unwrap_or(0) as f64 / 1e6;
            format!("in-copy: {rows} rows{pct}, {mb:.1} MB, {rate:.0} rows/s{eta}")
        }
        Some(s) => s.to_string(),
        None => "waiting for copy".into(),
    }
}

pub fn tables(cfg: &WorkerConfig, opts: &Opts) -> Result<()> {
    let mut c = connect_local(cfg)?;
    node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let ts = node::tables(&mut c, &cfg.queue_name)?;
    if opts.names_only {
        for t in ts {
            println!("{}", t.table_name);
        }
        return Ok(());
    }
    println!("{:<40} State", "Table");
    for t in ts {
        let name = match &t.dest_table {
            Some(d) => format!("{} -> {}", t.table_name, d),
            None => t.table_name.clone(),
        };
        println!("{:<40} {}", name, human_state(&t));
    }
    Ok(())
}

pub fn seqs(cfg: &WorkerConfig) -> Result<()> {
    let mut c = connect_local(cfg)?;
    node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let rows = c
        .query("SELECT seq_name, local, last_value FROM londiste.seq_info WHERE queue_name = $1 ORDER BY 1", &[&cfg.queue_name])
        .ctx(|| "cannot read seq_info".into())?;
    println!("{:<40} {:<6} Last value", "Sequence", "Local");
    for r in rows {
        let (n, l, v): (String, bool, Option<i64>) = (r.get(0), r.get(1), r.get(2));
        println!(
            "{:<40} {:<6} {}",
            n,
            l,
            v.map(|v| v.to_string()).unwrap_or_default()
        );
    }
    Ok(())
}

pub fn show_missing(cfg: &WorkerConfig) -> Result<()> {
    let mut c = connect_local(cfg)?;
    let n = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    if n.is_root() {
        for (k, name) in missing(&mut c, &cfg.queue_name)? {
            println!("{}  {}", if k == "S" { "seq  " } else { "table" }, name);
        }
        return Ok(());
    }
    let mut p = remote(cfg, n.provider_location.as_deref().unwrap_or(""))?;
    let have: Vec<String> = node::tables(&mut c, &cfg.queue_name)?
        .into_iter()
        .map(|t| t.table_name)
        .collect();
    for t in node::tables(&mut p, &cfg.queue_name)? {
        if t.local && !have.contains(&t.table_name) {
            println!("table  {}", t.table_name);
        }
    }
    Ok(())
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
            Some(l) => Ok(Some(crate::status::force_new_tick(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_progress_reads_like_a_progress_line() {
        let t = node::TableState {
            table_name: "public.t".into(),
            local: true,
            merge_state: Some("in-copy".into()),
            copy_rows: Some(250_000),
            copy_bytes: Some(31_500_000),
            copy_estimate: Some(1_000_000),
            copy_seconds: Some(2.5),
            ..Default::default()
        };
        assert_eq!(
            human_state(&t),
            "in-copy: 250000 rows 25%, 31.5 MB, 100000 rows/s, ETA 8s"
        );
        let failed = node::TableState {
            merge_state: None,
            copy_error: Some("cannot COPY: permission denied".into()),
            ..t.clone()
        };
        assert_eq!(
            human_state(&failed),
            "waiting for copy; last copy failed: cannot COPY: permission denied"
        );
        let ok = node::TableState {
            merge_state: Some("ok".into()),
            ..failed
        };
        assert_eq!(human_state(&ok), "ok");
    }
}
