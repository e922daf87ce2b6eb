//! Table commands: add-table, remove-table, resync, tables, missing.

use super::nodes::{provider_chain, wait_sync};
use super::{Opts, canonical_names, connect_local, consolidate, remote, resolve, table_exists};
use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::names::split_qualified;
use crate::replication::node;
use postgres::Client;

/// Tables of the root database that could be added (not ours, not yet added).
pub(super) fn missing(c: &mut Client, queue: &str) -> Result<Vec<(String, String)>> {
    let rows = c
        .query(
            "SELECT obj_kind, obj_name FROM londiste.local_show_missing($1)",
            &[&queue],
        )
        .ctx(|| "cannot list missing objects".into())?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// add-table, then the sequences the new tables' columns own (serial, identity),
/// so that the replica's sequences are ready for a cut-over (`--no-sequences`
/// leaves them out).
pub fn add_table(cfg: &WorkerConfig, args: &[String], opts: &Opts) -> Result<()> {
    let added_sql = "SELECT table_name FROM londiste.table_info WHERE queue_name = $1 AND local AND dest_table IS NULL";
    let before: Vec<String> = if opts.no_seqs {
        Vec::new()
    } else {
        let mut c = connect_local(cfg)?;
        c.query(added_sql, &[&cfg.queue_name])
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default()
    };
    add_tables(cfg, args, opts)?;
    if opts.no_seqs {
        return Ok(());
    }
    let mut c = connect_local(cfg)?;
    let new: Vec<String> = c
        .query(added_sql, &[&cfg.queue_name])
        .ctx(|| "cannot read table_info".into())?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|t| !before.contains(t))
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let seqs: Vec<String> = c
        .query(
            "SELECT DISTINCT s FROM unnest($2::text[]) t, londiste.owned_sequences(t::regclass) s
              WHERE NOT EXISTS (SELECT 1 FROM londiste.seq_info si WHERE si.queue_name = $1 AND si.seq_name = s)
              ORDER BY 1",
            &[&cfg.queue_name, &new],
        )
        .ctx(|| "cannot find the sequences of the added tables".into())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if seqs.is_empty() {
        return Ok(());
    }
    log::info!(
        "registering the sequences the added tables own: {}",
        seqs.join(", ")
    );
    let seq_opts = Opts {
        skip_non_existing: true,
        ..Opts::default()
    };
    super::seqs::add_seq(cfg, &seqs, &seq_opts)
}

fn add_tables(cfg: &WorkerConfig, args: &[String], opts: &Opts) -> Result<()> {
    let mut c = connect_local(cfg)?;
    let n = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let mut merge_all_tables: Vec<String> = Vec::new();
    if opts.dest_table.is_some() && opts.dest_schema.is_some() {
        return Err(Error::Usage(
            "--dest-table and --dest-schema exclude each other: one names the table, the other only its schema".into(),
        ));
    }
    if (opts.merge_all || opts.no_merge || opts.dest_schema.is_some()) && n.is_root() {
        return Err(Error::Usage(
            "--merge-all, --no-merge and --dest-schema are for subscriber nodes: add the table on the root without them".into(),
        ));
    }
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
    if opts.merge_all {
        // Named tables already added here still go to the other queues.
        let extra: Vec<String> = canonical_names(args)?
            .into_iter()
            .filter(|t| have.contains(t) && !names.contains(t))
            .collect();
        merge_all_tables = names.iter().cloned().chain(extra).collect();
    }
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
    // A type this server lacks is refused here already, not at the copy.
    let local_major = crate::version::server_version_num(&mut c)? / 10000;
    for t in names {
        if have.contains(&t) {
            log::info!("Table {t} already added");
            continue;
        }
        if provider_tables.contains(&t) {
            crate::version::check_types_fit(&mut p, &t, &t, local_major)?;
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
            // --force: accept a name the provider does not list (yet); the
            // copy waits until a node above has the table in sync.
            if !opts.force {
                return Err(Error::Other(format!(
                    "{msg}; or add it here anyway with --force"
                )));
            }
            log::warn!("{msg}; added anyway (--force): its copy waits until the provider has it");
        }
        let dest = consolidate::dest_for(cfg, opts, &t)?;
        let local_name = dest.clone().unwrap_or_else(|| t.clone());
        if !table_exists(&mut c, &local_name)? {
            if opts.create || opts.create_full {
                consolidate::ensure_schema(&mut c, &local_name)?;
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
        // ON CONFLICT on a partitioned table is 11+: the apply's upserts
        // would fail on every update.
        let partitioned: bool = c
            .query_one(
                "SELECT relkind = 'p' FROM pg_class WHERE oid = $1::text::regclass",
                &[&local_name],
            )
            .ctx(|| format!("cannot look up {local_name}"))?
            .get(0);
        if partitioned && local_major < 11 {
            return Err(Error::Other(format!(
                "table {local_name} is partitioned on this node, and PostgreSQL {local_major} cannot apply updates to a partitioned table \
                 (ON CONFLICT needs 11): replicate into a plain table here, or into PostgreSQL 11 or newer"
            )));
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
        let merged = opts.merge_all || opts.no_merge;
        consolidate::check_feeders(&mut c, &cfg.queue_name, &local_name, merged, opts)?;
        let state: Option<&str> = if opts.expect_sync { Some("ok") } else { None };
        let attrs: Option<String> = opts.copy_node.as_ref().map(|n| format!("copy_node={n}"));
        let mut tx = c.transaction().ctx(|| "cannot begin".into())?;
        tx.execute(
            "INSERT INTO londiste.table_info (queue_name, table_name, dest_table, local, merge_state, skip_truncate,
                                              key_columns, table_attrs, merged)
             VALUES ($1, $2, $3, true, $4, $5, $6, $7, $8)",
            &[&cfg.queue_name, &t, &dest, &state, &opts.skip_truncate, &opts.keys, &attrs, &merged],
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
    if opts.merge_all {
        drop(c);
        consolidate::add_other_queues(cfg, &merge_all_tables, opts)?;
    }
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
        let k: Vec<String> = k.iter().map(|x| crate::names::ident(x)).collect();
        defs.push(format!("PRIMARY KEY ({})", k.join(", ")));
    }
    let (s, _) = split_qualified(dest)?;
    let sql = format!(
        "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE {} ({})",
        crate::names::ident(&s),
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
        let src_q = crate::replication::apply::local_name(src, None)?;
        for r in idx {
            let def: String = r.get(0);
            let def = if src_q == crate::replication::apply::local_name(dest, None)? {
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
