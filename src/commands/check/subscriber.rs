//! `check` on a subscriber: its tables against the provider's (columns,
//! types, keys, privileges on both sides, triggers that fire on apply).

use super::{Added, Findings};
use crate::commands::remote;
use crate::config::WorkerConfig;
use crate::error::{Context, Result};
use crate::names::quote_ident;
use crate::replication::node::{self, NodeInfo};
use postgres::Client;

/// A column as the catalog has it.
struct Col {
    name: String,
    ty: String,
    generated: bool,
    not_null: bool,
    has_default: bool,
}

fn columns(c: &mut Client, table: &str) -> Result<Vec<Col>> {
    let generated = crate::version::attgenerated_expr(crate::version::server_version_num(c)?, "a");
    let rows = c
        .query(
            &format!(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), {generated}, a.attnotnull,
                        a.atthasdef OR a.attidentity <> ''
                   FROM pg_attribute a WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum"
            ),
            &[&table],
        )
        .ctx(|| format!("cannot read the columns of {table}"))?;
    Ok(rows
        .iter()
        .map(|r| Col {
            name: r.get(0),
            ty: r.get(1),
            generated: r.get(2),
            not_null: r.get(3),
            has_default: r.get(4),
        })
        .collect())
}

/// Checks of a subscriber against its provider.
pub(super) fn subscriber_checks(
    c: &mut Client,
    cfg: &WorkerConfig,
    me: &NodeInfo,
    tables: &[Added],
    only: &[String],
    f: &mut Findings,
) -> Result<()> {
    let hint = cfg.command_hint();
    let ploc = me.provider_location.clone().unwrap_or_default();
    let mut p = remote(cfg, &ploc)?;
    let provided: Vec<(String, Option<Vec<String>>)> = p
        .query(
            "SELECT table_name, coalesce(key_columns, pgq.table_pkey(to_regclass(table_name))) FROM londiste.table_info
              WHERE queue_name = $1 AND local ORDER BY 1",
            &[&cfg.queue_name],
        )
        .ctx(|| "cannot read the provider's tables".into())?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let have: Vec<String> = node::tables(c, &cfg.queue_name)?
        .into_iter()
        .map(|t| t.table_name)
        .collect();
    for (t, _) in &provided {
        if !have.contains(t) && (only.is_empty() || only.contains(t)) {
            f.add(
                t,
                format!(
                    "is replicated on the provider but not added here; fix: {hint} add-table {t}"
                ),
            );
        }
    }
    let local_num = crate::version::server_version_num(c)?;
    let local_major = local_num / 10000;
    // Can the worker's session switch user triggers off (replica mode)?
    let replica_mode = {
        let mut tx = c.transaction().ctx(|| "cannot begin".into())?;
        let ok = tx
            .batch_execute("SET LOCAL session_replication_role = replica")
            .is_ok();
        tx.rollback().ok();
        ok
    };
    let (prole, role): (String, String) = (
        p.query_one("SELECT current_user::text", &[])
            .ctx(|| "cannot read the provider's role".into())?
            .get(0),
        c.query_one("SELECT current_user::text", &[])
            .ctx(|| "cannot read the role".into())?
            .get(0),
    );
    let nkey = if local_num >= 110000 {
        "i.indnkeyatts"
    } else {
        "i.indnatts"
    };
    for a in tables {
        let Some((_, keys)) = provided.iter().find(|(t, _)| *t == a.name) else {
            f.add(
                &a.name,
                format!(
                    "is not replicated on the provider: nothing reaches it; fix: add it there, or {hint} remove-table {}",
                    a.name
                ),
            );
            continue;
        };
        let on_provider: bool = p
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&a.name])
            .ctx(|| format!("cannot look up {} on the provider", a.name))?
            .get(0);
        if on_provider {
            // A type this server lacks: changing the column here cannot help.
            let fits = crate::version::check_types_fit(&mut p, &a.name, &a.name, local_major);
            compare_columns(c, &mut p, a, fits.is_ok(), f)?;
            if let Err(e) = fits {
                f.add(&a.name, e.to_string());
            }
            let readable: bool = p
                .query_one("SELECT has_table_privilege($1, 'SELECT')", &[&a.name])
                .ctx(|| format!("cannot read the privileges of {} on the provider", a.name))?
                .get(0);
            if !readable {
                f.add(
                    &a.name,
                    format!(
                        "role {prole} cannot read it on the provider: its copy fails; fix (on the provider): GRANT SELECT ON {} TO {prole}",
                        a.name
                    ),
                );
            }
        }
        let keys = a.state.key_columns.clone().or(keys.clone());
        let r = c
            .query_one(
                &format!(
                    "SELECT c.relkind = 'p',
                            array_remove(ARRAY[
                              CASE WHEN NOT has_table_privilege(c.oid, 'SELECT') THEN 'SELECT' END,
                              CASE WHEN NOT has_table_privilege(c.oid, 'INSERT') THEN 'INSERT' END,
                              CASE WHEN NOT has_table_privilege(c.oid, 'UPDATE') THEN 'UPDATE' END,
                              CASE WHEN NOT has_table_privilege(c.oid, 'DELETE') THEN 'DELETE' END,
                              CASE WHEN NOT has_table_privilege(c.oid, 'TRUNCATE') THEN 'TRUNCATE' END,
                              CASE WHEN NOT has_table_privilege(c.oid, 'TRIGGER') THEN 'TRIGGER' END], NULL),
                            pg_has_role(c.relowner, 'USAGE'),
                            EXISTS (SELECT 1 FROM pg_constraint k WHERE k.contype = 'f' AND (k.conrelid = c.oid OR k.confrelid = c.oid)),
                            $2::text[] IS NULL OR EXISTS (
                              SELECT 1 FROM pg_index i
                               WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
                                 AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text)
                                        FROM generate_series(0, {nkey} - 1) g
                                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[g])
                                   = (SELECT array_agg(k ORDER BY k) FROM unnest($2::text[]) k))
                       FROM pg_class c WHERE c.oid = $1::text::regclass"
                ),
                &[&a.dest, &keys],
            )
            .ctx(|| format!("cannot read {} on this node", a.shown))?;
        let (partitioned, missing, owner, has_fk, unique): (bool, Vec<String>, bool, bool, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));

        if partitioned && local_major < 11 {
            f.add(
                &a.name,
                format!(
                    "{} is partitioned, and PostgreSQL {local_major} cannot apply updates to a partitioned table (ON CONFLICT needs 11); \
                     fix: replicate into a plain table, or into PostgreSQL 11 or newer",
                    a.shown
                ),
            );
        } else if !unique {
            let k = keys.clone().unwrap_or_default().join(", ");
            f.add(
                &a.name,
                format!(
                    "no primary key or unique index on ({k}) on this node: its updates cannot be applied; fix: ALTER TABLE {} ADD PRIMARY KEY ({k})",
                    a.shown
                ),
            );
        }
        if !missing.is_empty() {
            f.add(
                &a.name,
                format!(
                    "role {role} lacks {} on {}: the copy, the apply or a cut-over (which creates triggers) fails; fix: GRANT {} ON {} TO {role}",
                    missing.join(", "),
                    a.shown,
                    missing.join(", "),
                    a.shown
                ),
            );
        }
        if has_fk && !owner {
            f.add(
                &a.name,
                format!(
                    "role {role} does not own {}, and a copy drops and restores its foreign keys (ALTER TABLE); fix: ALTER TABLE {} OWNER TO {role}",
                    a.shown, a.shown
                ),
            );
        }
        triggers(c, a, replica_mode, &role, f)?;
    }
    Ok(())
}

/// Columns here against the provider's: what the copy or the apply trips on.
fn compare_columns(
    c: &mut Client,
    p: &mut Client,
    a: &Added,
    types: bool,
    f: &mut Findings,
) -> Result<()> {
    let theirs = columns(p, &a.name)?;
    let ours = columns(c, &a.dest)?;
    for t in &theirs {
        match ours.iter().find(|o| o.name == t.name) {
            None if !t.generated => f.add(
                &a.name,
                format!(
                    "column {} ({}) of the provider is missing here: the copy stops; fix: ALTER TABLE {} ADD COLUMN {} {}",
                    t.name, t.ty, a.shown, quote_ident(&t.name), t.ty
                ),
            ),
            Some(o) if types && !o.generated && o.ty != t.ty => f.add(
                &a.name,
                format!(
                    "column {} is {} on the provider but {} here; fix: ALTER TABLE {} ALTER COLUMN {} TYPE {}",
                    t.name, t.ty, o.ty, a.shown, quote_ident(&t.name), t.ty
                ),
            ),
            _ => {}
        }
    }
    for o in &ours {
        if !o.generated && o.not_null && !o.has_default && !theirs.iter().any(|t| t.name == o.name)
        {
            f.add(
                &a.name,
                format!(
                    "column {} is NOT NULL without a default here and the provider has no such column: inserts fail; fix: ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL",
                    o.name, a.shown, quote_ident(&o.name)
                ),
            );
        }
    }
    Ok(())
}

/// User triggers that fire when the worker writes: in replica mode only
/// those enabled ALWAYS or REPLICA do, which someone chose; without it (a
/// role that may not set session_replication_role) every enabled one does.
fn triggers(
    c: &mut Client,
    a: &Added,
    replica_mode: bool,
    role: &str,
    f: &mut Findings,
) -> Result<()> {
    if replica_mode {
        return Ok(());
    }
    let rows = c
        .query(
            "SELECT g.tgname::text FROM pg_trigger g
              WHERE g.tgrelid = $1::text::regclass AND NOT g.tgisinternal AND g.tgenabled IN ('O', 'A')
                AND g.tgname NOT LIKE '\\_pgq\\_%' AND g.tgname NOT LIKE '\\_londiste\\_%'
              ORDER BY 1",
            &[&a.dest],
        )
        .ctx(|| format!("cannot read the triggers of {}", a.shown))?;
    for r in rows {
        let g: String = r.get(0);
        f.add(
            &a.name,
            format!(
                "trigger {g} fires when the worker applies rows (role {role} cannot set session_replication_role = replica); \
                 fix: ALTER TABLE {} DISABLE TRIGGER {g}, or let the role set it (GRANT SET ON PARAMETER session_replication_role TO {role}, 15+)",
                a.shown
            ),
        );
    }
    Ok(())
}
