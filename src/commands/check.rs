//! `check`: the pre-flight list of what would make a copy, the apply or a
//! cut-over fail, run on any node before it does. One line per finding, per
//! table, each naming the command or SQL that fixes it; exit status 0 when
//! clean and 1 otherwise, so cron can run it (`-q` prints nothing when clean).
//!
//! Every node: tables that are gone, keys, the sequences the tables use, the
//! foreign keys that leave the replicated set, grants (`pgq.missing_grants()`
//! where installed). A subscriber also compares itself with its provider:
//! tables not added, columns and types, types this server cannot hold,
//! triggers that fire on apply, privileges of the roles on both sides.
//! Read only: it changes nothing.

use super::{canonical_names, connect_local, remote};
use crate::config::WorkerConfig;
use crate::error::{Context, Error, Result};
use crate::names::quote_ident;
use crate::replication::apply::local_name;
use crate::replication::node::{self, NodeInfo, TableState};
use postgres::Client;
use std::collections::BTreeMap;

/// Findings, per table (or `node` for what is not one table's), in order.
#[derive(Default)]
struct Findings(BTreeMap<String, Vec<String>>);

impl Findings {
    fn add(&mut self, table: &str, line: String) {
        self.0.entry(table.to_string()).or_default().push(line);
    }
    fn count(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }
}

/// A table added here: its queue name and the local table it lives in.
struct Added {
    name: String,
    /// Quoted, for queries.
    dest: String,
    /// As the user writes it, for messages.
    shown: String,
    state: TableState,
}

pub fn check(cfg: &WorkerConfig, args: &[String], quiet: bool) -> Result<()> {
    let mut c = connect_local(cfg)?;
    let me = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let only = canonical_names(args)?;
    let hint = cfg.command_hint();
    let mut added = Vec::new();
    for t in node::tables(&mut c, &cfg.queue_name)? {
        if !t.local || (!only.is_empty() && !only.contains(&t.table_name)) {
            continue;
        }
        added.push(Added {
            name: t.table_name.clone(),
            dest: local_name(&t.table_name, t.dest_table.as_deref())?,
            shown: t.dest_table.clone().unwrap_or_else(|| t.table_name.clone()),
            state: t,
        });
    }
    let mut f = Findings::default();
    // A table that is gone here has nothing else to check.
    let mut present = Vec::new();
    for a in added {
        // Without USAGE on its schema the table cannot even be looked up.
        let (schema, _) = crate::names::split_qualified(&a.shown)?;
        let usable: Option<bool> = c
            .query_one(
                "SELECT (SELECT has_schema_privilege(oid, 'USAGE') FROM pg_namespace WHERE nspname = $1)",
                &[&schema],
            )
            .ctx(|| format!("cannot look up schema {schema}"))?
            .get(0);
        if usable == Some(false) {
            let role: String = c
                .query_one("SELECT current_user::text", &[])
                .ctx(|| "cannot read the role".into())?
                .get(0);
            let s = quote_ident(&schema);
            f.add(
                &a.name,
                format!(
                    "role {role} has no USAGE on schema {s}: the copy and the apply fail; fix: GRANT USAGE ON SCHEMA {s} TO {role}"
                ),
            );
            continue;
        }
        let exists: bool = c
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&a.dest])
            .ctx(|| format!("cannot look up {}", a.shown))?
            .get(0);
        if exists {
            present.push(a);
        } else if me.is_root() {
            f.add(
                &a.name,
                format!("does not exist here; fix: {hint} remove-table {}", a.name),
            );
        } else {
            f.add(
                &a.name,
                format!(
                    "{} does not exist on this node; fix: create it like the provider's (pg_dump --schema-only), \
                     or {hint} remove-table {} then {hint} add-table {} --create",
                    a.shown, a.name, a.name
                ),
            );
        }
    }
    let ntables = present.len();
    local_checks(&mut c, cfg, &me, &present, &mut f)?;
    if !me.is_root() {
        subscriber_checks(&mut c, cfg, &me, &present, &only, &mut f)?;
    }
    grants(&mut c, &mut f)?;
    for (table, lines) in &f.0 {
        for l in lines {
            println!("{table}: {l}");
        }
    }
    let n = f.count();
    if n == 0 {
        if !quiet {
            println!(
                "check: no problems on node {} ({ntables} table(s))",
                me.node_name
            );
        }
        return Ok(());
    }
    Err(Error::Other(format!(
        "check: {n} problem(s) in {} table(s) on node {}",
        f.0.keys().filter(|k| k.as_str() != "node").count(),
        me.node_name
    )))
}

/// The qualified name of relation oid expression `oid`.
fn qualified(oid: &str) -> String {
    format!(
        "(SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = {oid})"
    )
}

/// Checks of this node's own tables, on any node.
fn local_checks(
    c: &mut Client,
    cfg: &WorkerConfig,
    me: &NodeInfo,
    tables: &[Added],
    f: &mut Findings,
) -> Result<()> {
    let hint = cfg.command_hint();
    let dests: Vec<String> = tables.iter().map(|a| a.dest.clone()).collect();
    let name_of = |dest: &str| {
        tables
            .iter()
            .find(|a| a.dest == dest)
            .map(|a| (a.name.clone(), a.shown.clone()))
            .unwrap_or_else(|| (dest.to_string(), dest.to_string()))
    };
    // Keys: on the root the capture needs one for updates and deletes.
    if me.is_root() {
        for a in tables {
            let has: bool = c
                .query_one(
                    "SELECT pgq.table_pkey($1::text::regclass) IS NOT NULL",
                    &[&a.dest],
                )
                .ctx(|| format!("cannot read the key of {}", a.shown))?
                .get(0);
            if !has && a.state.key_columns.is_none() {
                f.add(
                    &a.name,
                    format!(
                        "no primary key: its updates and deletes cannot be replicated; fix: ALTER TABLE {} ADD PRIMARY KEY (...), \
                         or {hint} remove-table {} then {hint} add-table {} --key=COL[,COL]",
                        a.shown, a.name, a.name
                    ),
                );
            }
        }
    }
    // Partitions made after the table was added have no capture triggers:
    // writes straight into them would not be replicated.
    if me.is_root() {
        let rows = c
            .query(
                &format!(
                    "WITH RECURSIVE q AS (SELECT queue_id::text AS id FROM pgq.queue WHERE queue_name = $2),
                     top AS (SELECT t, to_regclass(t) AS o FROM unnest($1::text[]) t
                              WHERE EXISTS (SELECT 1 FROM pg_trigger g, q WHERE g.tgrelid = to_regclass(t)
                                              AND g.tgname = '_pgq_' || q.id || '_ins')),
                     d(t, rel) AS (
                         SELECT top.t, i.inhrelid FROM top JOIN pg_inherits i ON i.inhparent = top.o
                           JOIN pg_class c ON c.oid = i.inhparent AND c.relkind = 'p'
                         UNION
                         SELECT d.t, i.inhrelid FROM d JOIN pg_inherits i ON i.inhparent = d.rel
                           JOIN pg_class c ON c.oid = i.inhparent AND c.relkind = 'p')
                     SELECT d.t, {part} FROM d
                      WHERE NOT EXISTS (SELECT 1 FROM pg_trigger g, q WHERE g.tgrelid = d.rel
                                          AND g.tgname = '_pgq_' || q.id || '_ins')
                      ORDER BY 1, 2",
                    part = qualified("d.rel")
                ),
                &[&dests, &cfg.queue_name],
            )
            .ctx(|| "cannot read the partitions of the tables".into())?;
        for r in rows {
            let (t, part): (String, String) = (r.get(0), r.get(1));
            f.add(
                &name_of(&t).0,
                format!(
                    "partition {part} has no capture triggers (made after the table was added): writes straight into it are not replicated; \
                     fix: SELECT londiste.regenerate_capture() in this database"
                ),
            );
        }
    }
    // Sequences the columns use (defaults) or own (serial, identity).
    let seqs = c
        .query(
            &format!(
                "SELECT t, x.s FROM unnest($1::text[]) t, LATERAL (
                     SELECT {own} AS s FROM pg_depend d JOIN pg_class q ON q.oid = d.objid AND q.relkind = 'S'
                      WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                        AND d.refobjid = t::regclass AND d.deptype IN ('a', 'i')
                     UNION
                     SELECT {used} FROM pg_attrdef ad
                       JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                                       AND d.refclassid = 'pg_class'::regclass
                       JOIN pg_class q ON q.oid = d.refobjid AND q.relkind = 'S'
                      WHERE ad.adrelid = t::regclass) x
                  WHERE NOT EXISTS (SELECT 1 FROM londiste.seq_info si
                                     WHERE si.queue_name = $2 AND si.local AND si.seq_name = x.s)
                  ORDER BY 1, 2",
                own = qualified("d.objid"),
                used = qualified("d.refobjid")
            ),
            &[&dests, &cfg.queue_name],
        )
        .ctx(|| "cannot find the sequences of the tables".into())?;
    for r in seqs {
        let (t, s): (String, String) = (r.get(0), r.get(1));
        f.add(
            &name_of(&t).0,
            format!(
                "uses sequence {s}, which is not added: after a cut-over it would hand out used values; fix: {hint} add-seq {s}{}",
                if me.is_root() {
                    ""
                } else {
                    " (on the root first if the provider lacks it)"
                }
            ),
        );
    }
    // Foreign keys that leave the replicated set.
    let fks = c
        .query(
            &format!(
                "WITH r AS (SELECT n, to_regclass(n) AS o FROM unnest($1::text[]) n)
                 SELECT r.n, k.conname::text, k.conrelid = r.o,
                        {other}
                   FROM r JOIN pg_constraint k ON k.contype = 'f' AND (k.conrelid = r.o OR k.confrelid = r.o)
                  WHERE (CASE WHEN k.conrelid = r.o THEN k.confrelid ELSE k.conrelid END) NOT IN (SELECT o FROM r)
                  ORDER BY 1, 2",
                other = qualified("CASE WHEN k.conrelid = r.o THEN k.confrelid ELSE k.conrelid END")
            ),
            &[&dests],
        )
        .ctx(|| "cannot read the foreign keys".into())?;
    for r in fks {
        let (t, key, outgoing, other): (String, String, bool, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let (name, t) = name_of(&t);
        let line = match (outgoing, me.is_root()) {
            (true, true) => format!(
                "foreign key {key} references {other}, which is not added: a subscriber with this key cannot hold the rows; fix: {hint} add-table {other}"
            ),
            (true, false) => format!(
                "foreign key {key} references {other}, which is not replicated to this node: rows whose parent is missing here break the apply and the key's restore after a copy; fix: {hint} add-table {other}, or ALTER TABLE {t} DROP CONSTRAINT {key}"
            ),
            (false, true) => continue,
            (false, false) => format!(
                "foreign key {key} of {other}, which is not replicated, references this table: a copy drops it and its restore fails if rows of {other} lose their parent; fix: {hint} add-table {other}, or ALTER TABLE {other} DROP CONSTRAINT {key}"
            ),
        };
        f.add(&name, line);
    }
    for a in tables {
        if let Some(e) = &a.state.copy_error {
            f.add(&a.name, format!("its copy failed: {e}"));
        }
    }
    Ok(())
}

/// Lines of `pgq.missing_grants()` (roles that lack rights on the queue),
/// where a version that has it is installed.
fn grants(c: &mut Client, f: &mut Findings) -> Result<()> {
    let has: bool = c
        .query_one(
            "SELECT to_regprocedure('pgq.missing_grants()') IS NOT NULL",
            &[],
        )
        .ctx(|| "cannot look for pgq.missing_grants()".into())?
        .get(0);
    if !has {
        return Ok(());
    }
    let rows = c
        .query("SELECT g::text FROM pgq.missing_grants() g", &[])
        .ctx(|| "cannot run pgq.missing_grants()".into())?;
    for r in rows {
        f.add("node", r.get(0));
    }
    Ok(())
}

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
fn subscriber_checks(
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
