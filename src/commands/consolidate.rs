//! What add-table does for a consolidation (several sources into one target
//! database): the destination name under `--dest-schema` / `dest_schema`, the
//! checks that keep two queues from writing one table unless it is merged, and
//! `--merge-all` adding a merged table for every queue of this database.

use super::{Opts, remote};
use crate::config::WorkerConfig;
use crate::error::{Context, Error, Result};
use crate::names::{fq_name, ident, split_qualified};
use postgres::Client;

/// The local name of source table `t` when it is not `t` itself: `--dest-table`,
/// else the table in `--dest-schema` (or the job's `dest_schema`).
pub(super) fn dest_for(cfg: &WorkerConfig, opts: &Opts, t: &str) -> Result<Option<String>> {
    if let Some(d) = &opts.dest_table {
        let (s, tt) = split_qualified(d).unwrap_or(("public".into(), d.clone()));
        return Ok(Some(fq_name(&s, &tt)));
    }
    let Some(schema) = opts.dest_schema.as_ref().or(cfg.dest_schema.as_ref()) else {
        return Ok(None);
    };
    let (s, name) = split_qualified(t)?;
    if &s == schema {
        return Ok(None);
    }
    Ok(Some(fq_name(schema, &name)))
}

/// --create into a schema that is not there yet: make it, and say so.
pub(super) fn ensure_schema(c: &mut Client, local_name: &str) -> Result<()> {
    let (s, _) = split_qualified(local_name)?;
    let has: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&s],
        )
        .ctx(|| "cannot look up the schema".into())?
        .get(0);
    if !has {
        c.batch_execute(&format!("CREATE SCHEMA {}", ident(&s)))
            .ctx(|| format!("cannot create schema {s}"))?;
        log::info!("Created schema {s}");
    }
    Ok(())
}

/// Other queues of this database writing `local_name`: refused unless every
/// one of them, and this one, treats it as a merged table.
pub(super) fn check_feeders(
    c: &mut Client,
    queue: &str,
    local_name: &str,
    merged: bool,
    opts: &Opts,
) -> Result<()> {
    let rows = c
        .query(
            "SELECT queue_name, coalesce((to_jsonb(t) ->> 'merged')::bool, false) FROM londiste.table_info t
              WHERE queue_name <> $1 AND coalesce(dest_table, table_name) = $2 ORDER BY 1",
            &[&queue, &local_name],
        )
        .ctx(|| "cannot read table_info".into())?;
    for r in rows {
        let (q, m): (String, bool) = (r.get(0), r.get(1));
        if !merged {
            return Err(Error::Other(format!(
                "table {local_name} is already replicated into this database by queue {q}: to merge the \
                 sources into it add it with --merge-all (or --no-merge on each queue); to keep them \
                 apart, use --dest-table or --dest-schema"
            )));
        }
        if !m {
            return Err(Error::Other(format!(
                "table {local_name} is replicated here by queue {q} as an ordinary table, not merged: \
                 remove it there (remove-table) and add it again with --no-merge, then add it here"
            )));
        }
    }
    if merged {
        if opts.keys.is_some() {
            return Err(Error::Usage(
                "--key does not go with a merged table: the sources' rows are told apart by the primary key here".into(),
            ));
        }
        let has_pk: bool = c
            .query_one(
                "SELECT pgq.table_pkey($1::text::regclass) IS NOT NULL",
                &[&local_name],
            )
            .ctx(|| format!("cannot read the key of {local_name}"))?
            .get(0);
        if !has_pk {
            return Err(Error::Other(format!(
                "merged table {local_name} has no primary key here: add the sources' primary key \
                 (the sources' rows are told apart by it)"
            )));
        }
        // Its origin map, now rather than by the first worker to need it.
        let dest = crate::replication::apply::local_name(local_name, None)?;
        c.query_one("SELECT londiste.merge_map($1)", &[&dest])
            .ctx(|| format!("cannot create the origin map of {local_name}"))?;
    }
    Ok(())
}

/// --merge-all: the same tables as merged parts for every other subscriber
/// queue of this database whose provider replicates them.
pub(super) fn add_other_queues(cfg: &WorkerConfig, tables: &[String], opts: &Opts) -> Result<()> {
    let mut c = super::connect_local(cfg)?;
    let others = c
        .query(
            "SELECT queue_name, provider_location FROM londiste.node_info
              WHERE queue_name <> $1 AND node_type <> 'root' AND provider_location IS NOT NULL ORDER BY 1",
            &[&cfg.queue_name],
        )
        .ctx(|| "cannot read node_info".into())?;
    for r in others {
        let (q, ploc): (String, String) = (r.get(0), r.get(1));
        let mut p = match remote(cfg, &ploc) {
            Ok(p) => p,
            Err(e) => {
                log::warn!(
                    "--merge-all: queue {q} skipped, its provider is not reachable: {e}; add the tables with its own job later"
                );
                continue;
            }
        };
        for t in tables {
            let there = p
                .query_opt(
                    "SELECT 1 FROM londiste.table_info WHERE queue_name = $1 AND table_name = $2 AND local",
                    &[&q, t],
                )
                .ctx(|| format!("cannot read the tables of queue {q} on its provider"))?
                .is_some();
            let added = c
                .query_opt(
                    "SELECT 1 FROM londiste.table_info WHERE queue_name = $1 AND table_name = $2",
                    &[&q, t],
                )
                .ctx(|| "cannot read table_info".into())?
                .is_some();
            if !there || added {
                continue;
            }
            let dest = dest_for(cfg, opts, t)?;
            let local_name = dest.clone().unwrap_or_else(|| t.clone());
            check_feeders(&mut c, &q, &local_name, true, opts)?;
            let mut tx = c.transaction().ctx(|| "cannot begin".into())?;
            tx.execute(
                "INSERT INTO londiste.table_info (queue_name, table_name, dest_table, local, merged)
                 VALUES ($1, $2, $3, true, true)",
                &[&q, t, &dest],
            )
            .ctx(|| format!("cannot add table {t} for queue {q}"))?;
            if !opts.no_triggers {
                tx.query_one(
                    "SELECT londiste.deny_create($1, $2::text::regclass)",
                    &[&q, &local_name],
                )
                .ctx(|| format!("cannot protect {local_name} against local writes"))?;
            }
            tx.commit().ctx(|| "cannot commit".into())?;
            log::info!("Table added: {t} (merged into {local_name}, queue {q})");
            let _ = p.execute("SELECT pg_notify('pgq_tick', $1)", &[&q]);
        }
    }
    Ok(())
}
