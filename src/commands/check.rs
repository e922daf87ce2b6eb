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

mod subscriber;

use super::{canonical_names, connect_local};
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
        subscriber::subscriber_checks(&mut c, cfg, &me, &present, &only, &mut f)?;
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
