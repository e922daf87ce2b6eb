//! Applying events to a subscriber, set-based: the events of one chunk are grouped
//! per table and kind, and each group becomes one statement over arrays
//! (`INSERT ... SELECT FROM unnest($1::text[], ...)`, upsert for updates,
//! `DELETE ... USING unnest(...)`). Values stay text end to end and are cast by the
//! replica's input functions, so every type round-trips exactly.
//!
//! Order: within a table, events keep their queue order. Across tables, a chunk may
//! be regrouped per table when nothing on the replica can observe the order (the
//! session runs in replica mode, or no foreign key touches the replicated tables);
//! otherwise only consecutive events are grouped. TRUNCATE and special events are
//! barriers either way.

use crate::error::{Context, Error, Result};
use crate::names::{ident, split_qualified};
use crate::replication::merge::{self, MergePart};
use crate::replication::record::{
    Snapshot, parse_columns, parse_record, parse_text_array, split_rows,
};
use postgres::{Statement, Transaction};
use std::collections::HashMap;

mod origins;
mod stream;

/// One event as read from the provider's queue.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    pub time: String,
    pub txid: i64,
    pub retry: Option<i32>,
    pub ev_type: String,
    pub data: Option<String>,
    pub extra1: Option<String>,
    pub extra2: Option<String>,
    pub extra3: Option<String>,
    pub extra4: Option<String>,
}

/// What the worker does with one queue table's events on this node.
#[derive(Debug, Clone)]
pub struct TableRoute {
    /// The local table (quoted, schema-qualified).
    pub dest: String,
    /// Events visible in this copy snapshot are already in the copied data.
    pub skip_snapshot: Option<Snapshot>,
    /// Set when the table is merged from several queues (see merge.rs).
    pub merge: Option<MergePart>,
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    type_sql: String,
    generated: bool,
}

#[derive(Debug, Clone)]
struct TableMeta {
    columns: Vec<Column>,
    identity_always: bool,
    partitioned: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Insert,
    Upsert,
    Delete,
}

/// Consecutive events of one table, kind and column list.
struct Group<'a> {
    dest: String,
    kind: Kind,
    cols: &'a str,
    keys: &'a str,
    events: Vec<&'a Event>,
    merge: Option<MergePart>,
}

/// Counters for the stats line.
#[derive(Default, Debug, Clone, Copy)]
pub struct ApplyStats {
    pub events: u64,
    pub rows: u64,
    pub statements: u64,
}

pub struct Applier {
    meta: HashMap<String, TableMeta>,
    stmts: HashMap<String, Statement>,
    /// The origin map of each merged table written so far.
    merge_maps: HashMap<String, String>,
    /// May events of different tables be regrouped (see module doc)?
    pub reorder: bool,
    /// One statement per event: used to pinpoint the failing event after an error.
    pub single: bool,
    pub stats: ApplyStats,
}

impl Default for Applier {
    fn default() -> Self {
        Self::new()
    }
}

impl Applier {
    pub fn new() -> Applier {
        Applier {
            meta: HashMap::new(),
            stmts: HashMap::new(),
            merge_maps: HashMap::new(),
            reorder: false,
            single: false,
            stats: ApplyStats::default(),
        }
    }

    /// Forget cached table shapes and statements (after an error or DDL).
    pub fn reset(&mut self) {
        self.meta.clear();
        self.stmts.clear();
        self.merge_maps.clear();
    }

    /// Applies a chunk of events. `route` says where a queue table's events go
    /// (None: not replicated here, skip). Special events are handed to `special`.
    pub fn apply_chunk(
        &mut self,
        tx: &mut Transaction,
        events: &[Event],
        route: &dyn Fn(&str) -> Option<TableRoute>,
        special: &mut dyn FnMut(&mut Transaction, &Event) -> Result<()>,
    ) -> Result<()> {
        // Buckets in first-seen order; each bucket is a list of groups.
        let mut order: Vec<String> = Vec::new();
        let mut buckets: HashMap<String, Vec<Group>> = HashMap::new();
        let mut last_table: Option<String> = None;
        for ev in events {
            let kind = match ev.ev_type.as_str() {
                "I" | "I*" => Some(Kind::Insert),
                "U" | "U*" => Some(Kind::Upsert),
                "D" | "D*" => Some(Kind::Delete),
                "R" => None,
                _ => {
                    self.flush(tx, &mut order, &mut buckets)?;
                    last_table = None;
                    special(tx, ev)?;
                    if ev.ev_type == "EXECUTE" {
                        // The file may have changed any table's shape.
                        self.reset();
                    }
                    continue;
                }
            };
            let Some(table) = ev.extra1.as_deref() else {
                continue;
            };
            let Some(r) = route(table) else { continue };
            if let Some(s) = &r.skip_snapshot
                && s.visible(ev.txid)
            {
                continue;
            }
            self.stats.events += 1;
            let Some(kind) = kind else {
                // TRUNCATE: a barrier, as it may cascade to other tables.
                self.flush(tx, &mut order, &mut buckets)?;
                last_table = None;
                if let Some(m) = &r.merge {
                    merge::truncate(tx, &r.dest, m, ev.id)?;
                    self.stats.statements += 1;
                    continue;
                }
                let sql = format!("TRUNCATE {} CASCADE", r.dest);
                tx.batch_execute(&sql)
                    .ctx(|| format!("[ev_id={}] cannot truncate {}", ev.id, r.dest))?;
                self.stats.statements += 1;
                continue;
            };
            let cols = ev.extra2.as_deref().unwrap_or("");
            let keys = ev.extra3.as_deref().unwrap_or("");
            // Without reordering, switching tables closes every open group.
            if !self.reorder && last_table.as_deref() != Some(r.dest.as_str()) {
                self.flush(tx, &mut order, &mut buckets)?;
            }
            last_table = Some(r.dest.clone());
            let groups = buckets.entry(r.dest.clone()).or_insert_with(|| {
                order.push(r.dest.clone());
                Vec::new()
            });
            let extend = !self.single
                && groups
                    .last()
                    .is_some_and(|g| g.kind == kind && g.cols == cols && g.keys == keys);
            if extend {
                groups.last_mut().unwrap().events.push(ev);
            } else {
                groups.push(Group {
                    dest: r.dest.clone(),
                    kind,
                    cols,
                    keys,
                    events: vec![ev],
                    merge: r.merge.clone(),
                });
            }
        }
        self.flush(tx, &mut order, &mut buckets)
    }

    fn flush(
        &mut self,
        tx: &mut Transaction,
        order: &mut Vec<String>,
        buckets: &mut HashMap<String, Vec<Group>>,
    ) -> Result<()> {
        for table in order.drain(..) {
            if let Some(groups) = buckets.remove(&table) {
                for g in groups {
                    self.apply_group(tx, &g)?;
                }
            }
        }
        buckets.clear();
        Ok(())
    }

    fn table_meta(&mut self, tx: &mut Transaction, dest: &str) -> Result<TableMeta> {
        if let Some(m) = self.meta.get(dest) {
            return Ok(m.clone());
        }
        let generated =
            crate::version::attgenerated_expr(crate::version::server_version_num(tx)?, "a");
        let rows = tx
            .query(
                &format!(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), {generated}, a.attidentity = 'a',
                            c.relkind = 'p'
                       FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                      WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                      ORDER BY a.attnum"
                ),
                &[&dest],
            )
            .ctx(|| format!("cannot read the columns of {dest} on this node (does the table exist?)"))?;
        let mut meta = TableMeta {
            columns: Vec::new(),
            identity_always: false,
            partitioned: false,
        };
        for r in rows {
            meta.identity_always |= r.get::<_, bool>(3);
            meta.partitioned = r.get(4);
            meta.columns.push(Column {
                name: r.get(0),
                type_sql: r.get(1),
                generated: r.get(2),
            });
        }
        self.meta.insert(dest.to_string(), meta.clone());
        Ok(meta)
    }

    fn statement(&mut self, tx: &mut Transaction, sql: &str) -> Result<Statement> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let st = tx
            .prepare(sql)
            .ctx(|| format!("cannot prepare apply statement {sql}"))?;
        self.stmts.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    fn apply_group(&mut self, tx: &mut Transaction, g: &Group) -> Result<()> {
        let meta = self.table_meta(tx, &g.dest)?;
        let src_cols = parse_columns(g.cols)?;
        let key_cols = if g.keys.is_empty() {
            Vec::new()
        } else {
            parse_text_array(g.keys)?
        };
        let first = g.events[0];
        let where_ = || {
            if g.events.len() == 1 {
                format!("[ev_id={}]", first.id)
            } else {
                format!("[ev_id={}..{}]", first.id, g.events[g.events.len() - 1].id)
            }
        };
        // Map source columns to local ones by name.
        let mut used: Vec<(usize, &Column)> = Vec::new();
        for (i, name) in src_cols.iter().enumerate() {
            match meta.columns.iter().find(|c| &c.name == name) {
                Some(c) if c.generated => {}
                Some(c) => {
                    if g.kind == Kind::Delete && !key_cols.contains(name) {
                        continue;
                    }
                    used.push((i, c));
                }
                None => {
                    return Err(Error::Other(format!(
                        "{} table {} on this node has no column \"{}\" that the provider sends (a schema change \
                         made outside execute?); add it here (ALTER TABLE {} ADD COLUMN ...) and the worker \
                         continues from this batch; make schema changes with `execute` on the root",
                        where_(),
                        g.dest,
                        name,
                        g.dest
                    )));
                }
            }
        }
        if g.kind != Kind::Insert && key_cols.is_empty() {
            return Err(Error::Other(format!(
                "{} event for {} has no key columns; add a primary key on the root and re-add the table",
                where_(),
                g.dest
            )));
        }
        if g.events.len() == 1
            && g.kind != Kind::Delete
            && first
                .data
                .as_ref()
                .is_some_and(|d| d.len() >= stream::STREAM_BYTES)
        {
            return self.stream_rows(tx, g, &meta, &used, &key_cols, src_cols.len(), &where_());
        }
        // Rows of the group, one array per used column. Updates of the same key
        // collapse to the last one: one upsert may not touch a row twice.
        let mut rows: Vec<Vec<Option<String>>> = Vec::with_capacity(g.events.len());
        let mut by_key: HashMap<Vec<Option<String>>, usize> = HashMap::new();
        let key_idx: Vec<usize> = key_cols
            .iter()
            .map(|k| {
                src_cols.iter().position(|c| c == k).ok_or_else(|| {
                    Error::Other(format!(
                        "{} key column {} is not among the event's columns",
                        where_(),
                        k
                    ))
                })
            })
            .collect::<Result<_>>()?;
        for ev in &g.events {
            let data = ev.data.as_deref().unwrap_or("");
            let texts = if ev.ev_type.ends_with('*') {
                split_rows(data).map_err(|e| Error::Other(format!("[ev_id={}] {}", ev.id, e)))?
            } else {
                vec![data]
            };
            for text in texts {
                let fields = parse_record(text)
                    .map_err(|e| Error::Other(format!("[ev_id={}] {}", ev.id, e)))?;
                if fields.len() != src_cols.len() {
                    return Err(Error::Other(format!(
                        "[ev_id={}] event for {} has {} values for {} columns",
                        ev.id,
                        g.dest,
                        fields.len(),
                        src_cols.len()
                    )));
                }
                // Keys are copied (they are small); values are moved, so a huge
                // value is held once here, not twice.
                let key: Vec<Option<String>> = if g.kind == Kind::Insert {
                    Vec::new()
                } else {
                    key_idx.iter().map(|i| fields[*i].clone()).collect()
                };
                let mut fields = fields;
                let row: Vec<Option<String>> =
                    used.iter().map(|(i, _)| fields[*i].take()).collect();
                if g.kind == Kind::Insert {
                    rows.push(row);
                    continue;
                }
                match by_key.get(&key) {
                    Some(&pos) => rows[pos] = row,
                    None => {
                        by_key.insert(key, rows.len());
                        rows.push(row);
                    }
                }
            }
        }
        if let Some(m) = &g.merge {
            self.record_origins(tx, g, m, &used, &rows, &key_cols, &where_())?;
        }
        if g.kind == Kind::Insert && !self.single && rows.len() >= COPY_MIN_ROWS {
            return self.copy_rows(tx, g, &used, &rows, &where_());
        }
        let n = used.len();
        let mut arrays: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(rows.len()); n];
        for row in rows.iter_mut() {
            for (j, v) in row.drain(..).enumerate() {
                arrays[j].push(v);
            }
        }
        let nrows = rows.len();
        let aliases: Vec<String> = (0..n).map(|j| format!("c{j}")).collect();
        let params: Vec<String> = (1..=n).map(|j| format!("${j}::text[]")).collect();
        let only = if meta.partitioned { "" } else { "ONLY " };
        let sql = match g.kind {
            Kind::Insert | Kind::Upsert => {
                let names: Vec<String> = used.iter().map(|(_, c)| ident(&c.name)).collect();
                let casts: Vec<String> = used
                    .iter()
                    .enumerate()
                    .map(|(j, (_, c))| format!("u.c{}::{}", j, c.type_sql))
                    .collect();
                let mut sql = format!(
                    "INSERT INTO {} ({}) {}SELECT {} FROM unnest({}) AS u({})",
                    g.dest,
                    names.join(", "),
                    if meta.identity_always {
                        "OVERRIDING SYSTEM VALUE "
                    } else {
                        ""
                    },
                    casts.join(", "),
                    params.join(", "),
                    aliases.join(", ")
                );
                if g.kind == Kind::Upsert {
                    sql.push_str(&upsert_clause(&key_cols, &used));
                }
                sql
            }
            Kind::Delete => {
                let conds: Vec<String> = used
                    .iter()
                    .enumerate()
                    .map(|(j, (_, c))| format!("t.{} = u.c{}::{}", ident(&c.name), j, c.type_sql))
                    .collect();
                format!(
                    "DELETE FROM {}{} AS t USING unnest({}) AS u({}) WHERE {}",
                    only,
                    g.dest,
                    params.join(", "),
                    aliases.join(", "),
                    conds.join(" AND ")
                )
            }
        };
        let st = self.statement(tx, &sql)?;
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = arrays
            .iter()
            .map(|a| a as &(dyn postgres::types::ToSql + Sync))
            .collect();
        tx.execute(&st, &refs).map_err(|e| {
            let what = match g.kind {
                Kind::Insert => "insert into",
                Kind::Upsert => "update",
                Kind::Delete => "delete from",
            };
            let key = if g.events.len() == 1 && !first.ev_type.ends_with('*') && !key_idx.is_empty()
            {
                let fields = parse_record(first.data.as_deref().unwrap_or("")).unwrap_or_default();
                let kv: Vec<String> = key_cols
                    .iter()
                    .zip(&key_idx)
                    .map(|(k, i)| {
                        format!(
                            "{}={}",
                            k,
                            fields.get(*i).cloned().flatten().unwrap_or_default()
                        )
                    })
                    .collect();
                format!(" (key {})", kv.join(", "))
            } else {
                String::new()
            };
            let msg = format!(
                "{} cannot {} {}{}: {}",
                where_(),
                what,
                g.dest,
                key,
                crate::error::pg_message(&e)
            );
            crate::error::pg_error(&e, msg)
        })?;
        self.stats.rows += nrows as u64;
        self.stats.statements += 1;
        Ok(())
    }
}

impl Applier {
    /// Inserts through COPY: the fastest way into a table for a run of inserts.
    fn copy_rows(
        &mut self,
        tx: &mut Transaction,
        g: &Group,
        used: &[(usize, &Column)],
        rows: &[Vec<Option<String>>],
        where_: &str,
    ) -> Result<()> {
        use std::io::Write;
        let names: Vec<String> = used.iter().map(|(_, c)| ident(&c.name)).collect();
        let sql = format!("COPY {} ({}) FROM STDIN", g.dest, names.join(", "));
        let mut buf = Vec::with_capacity(rows.len() * 128);
        for row in rows {
            for (j, v) in row.iter().enumerate() {
                if j > 0 {
                    buf.push(b'\t');
                }
                match v {
                    None => buf.extend_from_slice(b"\\N"),
                    Some(v) => copy_escape(&mut buf, v),
                }
            }
            buf.push(b'\n');
        }
        let err = |e: postgres::Error| {
            let msg = format!(
                "{where_} cannot insert into {}: {}",
                g.dest,
                crate::error::pg_message(&e)
            );
            crate::error::pg_error(&e, msg)
        };
        let mut w = tx.copy_in(sql.as_str()).map_err(err)?;
        // The server's error can surface here, wrapped in an io::Error.
        w.write_all(&buf).map_err(|e| {
            let inner = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<postgres::Error>());
            let msg = inner.map_or_else(|| e.to_string(), crate::error::pg_message);
            Error::Db(format!("{where_} cannot insert into {}: {msg}", g.dest))
        })?;
        w.finish().map_err(err)?;
        self.stats.rows += rows.len() as u64;
        self.stats.statements += 1;
        Ok(())
    }
}

/// ` ON CONFLICT (keys) DO UPDATE SET ...` turning an INSERT into the upsert
/// of an update event.
fn upsert_clause(key_cols: &[String], used: &[(usize, &Column)]) -> String {
    let keys: Vec<String> = key_cols.iter().map(|k| ident(k)).collect();
    let sets: Vec<String> = used
        .iter()
        .filter(|(_, c)| !key_cols.contains(&c.name))
        .map(|(_, c)| format!("{0} = EXCLUDED.{0}", ident(&c.name)))
        .collect();
    if sets.is_empty() {
        format!(" ON CONFLICT ({}) DO NOTHING", keys.join(", "))
    } else {
        format!(
            " ON CONFLICT ({}) DO UPDATE SET {}",
            keys.join(", "),
            sets.join(", ")
        )
    }
}

/// Below this many rows an INSERT is as fast as COPY and keeps errors precise.
const COPY_MIN_ROWS: usize = 64;

/// COPY text format: backslash, tab, newline and carriage return are escaped.
fn copy_escape(buf: &mut Vec<u8>, v: &str) {
    for b in v.bytes() {
        match b {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            _ => buf.push(b),
        }
    }
}

/// The local name for a queue table: `dest_table` if set, else the same name.
pub fn local_name(table: &str, dest: Option<&str>) -> Result<String> {
    let name = dest.unwrap_or(table);
    let (s, t) = split_qualified(name)?;
    Ok(format!("{}.{}", ident(&s), ident(&t)))
}
