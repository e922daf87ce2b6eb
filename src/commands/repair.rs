//! `repair`: finds the rows that differ between the provider and this node, by
//! key, and prints the SQL that makes this node equal; `--apply` runs it too.
//!
//! Both sides are read at the same queue position (as `compare` does: the table
//! is locked in SHARE mode on the provider, a tick is made, and this node is
//! waited for), each as one stream ordered by the key's text in byte order
//! (`COLLATE "C"`, the same order Rust compares strings in, whatever the
//! databases' collations), and merged: memory stays bounded for any table size.

use crate::commands::Opts;
use crate::commands::compare::{columns, lock_and_sync};
use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::names::ident;
use crate::replication::node;
use postgres::{Row, Transaction};
use std::cmp::Ordering;

const FETCH: i32 = 5000;

/// One side's row: the key as text (for ordering) and every column as text.
struct Side<'a> {
    tx: Transaction<'a>,
    portal: postgres::Portal,
    buf: std::vec::IntoIter<Row>,
    done: bool,
}

impl<'a> Side<'a> {
    fn open(
        mut tx: Transaction<'a>,
        table: &str,
        keys: &[String],
        cols: &[String],
        part: Option<(&str, &str)>,
    ) -> Result<Side<'a>> {
        let key_expr = if keys.len() == 1 {
            format!("t.{}::text", ident(&keys[0]))
        } else {
            let k: Vec<String> = keys.iter().map(|k| format!("t.{}", ident(k))).collect();
            format!("ROW({})::text", k.join(", "))
        };
        let vals: Vec<String> = cols
            .iter()
            .map(|c| format!("t.{}::text", ident(c)))
            .collect();
        // A merged table: only the rows this node's queue wrote.
        let (filter, params): (String, Vec<&(dyn postgres::types::ToSql + Sync)>) = match &part {
            Some((queue, filter)) => (format!(" WHERE {filter}"), vec![queue]),
            None => (String::new(), Vec::new()),
        };
        let sql = format!(
            "SELECT {key_expr} COLLATE \"C\" AS k, ARRAY[{}]::text[] AS v FROM ONLY {table} t{filter} ORDER BY 1",
            vals.join(", ")
        );
        let portal = tx
            .bind(sql.as_str(), &params)
            .ctx(|| format!("cannot read {table}"))?;
        Ok(Side {
            tx,
            portal,
            buf: Vec::new().into_iter(),
            done: false,
        })
    }

    fn next(&mut self) -> Result<Option<(String, Vec<Option<String>>)>> {
        loop {
            if let Some(r) = self.buf.next() {
                return Ok(Some((r.get(0), r.get(1))));
            }
            if self.done {
                return Ok(None);
            }
            let rows = self
                .tx
                .query_portal(&self.portal, FETCH)
                .ctx(|| "cannot fetch rows".into())?;
            self.done = rows.len() < FETCH as usize;
            self.buf = rows.into_iter();
        }
    }
}

fn literal(v: &Option<String>) -> String {
    match v {
        None => "NULL".into(),
        Some(s) => format!("'{}'", s.replace('\'', "''")),
    }
}

pub fn repair(cfg: &WorkerConfig, args: &[String], opts: &Opts, apply: bool) -> Result<()> {
    let mut local = db::connect(&cfg.db, "londiste-rs repair")?;
    let me = node::require(&mut local, &cfg.queue_name, &cfg.command_hint())?;
    if me.is_root() {
        return Err(Error::Other(
            "repair runs on a subscriber node: it makes it equal to its provider".into(),
        ));
    }
    let ploc = me.provider_location.clone().unwrap_or_default();
    let remote = |l: &str| {
        db::connect(
            &db::with_extra(l, &cfg.remote_extra_connstr),
            "londiste-rs repair",
        )
    };
    let mut p = remote(&ploc)?;
    let mut ticker = remote(&ploc)?;
    let mut fixer = db::connect(&cfg.db, "londiste-rs repair")?;
    fixer
        .batch_execute("SET londiste.replay = 'on'")
        .ctx(|| "cannot set londiste.replay".into())?;
    let root = crate::replication::node::is_root_at(&mut p, &cfg.queue_name)?;
    let tables = crate::commands::compare::selected_tables(&mut local, &cfg.queue_name, args)?;
    let _ = opts;
    let mut total = 0u64;
    for t in tables {
        if t.merge_state.as_deref() != Some("ok") {
            println!("-- {}: not in sync yet, skipped", t.table_name);
            continue;
        }
        let dest = crate::replication::apply::local_name(&t.table_name, t.dest_table.as_deref())?;
        let src = crate::replication::apply::local_name(&t.table_name, None)?;
        let mut ptx = p
            .transaction()
            .ctx(|| "cannot begin on the provider".into())?;
        // The lock stays until the fix is committed: a change applied in
        // between could otherwise be undone by it.
        lock_and_sync(
            cfg,
            &mut ptx,
            &mut ticker,
            &mut local,
            &src,
            &t.table_name,
            root,
        )?;
        let keys: Vec<String> = match &t.key_columns {
            Some(k) => k.clone(),
            None => local
                .query_one("SELECT pgq.table_pkey($1::text::regclass)", &[&dest])
                .ctx(|| format!("cannot read the key of {dest}"))?
                .get::<_, Option<Vec<String>>>(0)
                .ok_or_else(|| {
                    Error::Other(format!("{dest} has no primary key; repair needs one"))
                })?,
        };
        let scols = columns(&mut ptx, &src)?;
        let dcols = columns(&mut local, &dest)?;
        let cols: Vec<String> = scols
            .iter()
            .filter(|c| dcols.contains(c))
            .cloned()
            .collect();
        let origin_key: Option<String> = if t.merged {
            Some(
                local
                    .query_one("SELECT londiste.merge_part_filter($1, 't')", &[&dest])
                    .ctx(|| format!("cannot read the key of merged table {dest}"))?
                    .get(0),
            )
        } else {
            None
        };
        let key_pos: Vec<usize> = keys
            .iter()
            .filter_map(|k| cols.iter().position(|c| c == k))
            .collect();
        let ltx = local
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .ctx(|| "cannot begin on this node".into())?;
        let part = origin_key.as_deref().map(|k| (cfg.queue_name.as_str(), k));
        let mut a = Side::open(ptx, &src, &keys, &cols, None)?;
        let mut b = Side::open(ltx, &dest, &keys, &cols, part)?;
        // Fixes of a merged table keep the row origins in step.
        let owner = |v: &[Option<String>], queue: Option<&str>| -> String {
            if !t.merged {
                return String::new();
            }
            let vals: Vec<String> = key_pos.iter().map(|&i| literal(&v[i])).collect();
            format!(
                " SELECT londiste.merge_set_owner({}, ARRAY[{}]::text[], {});",
                literal(&Some(dest.clone())),
                vals.join(", "),
                literal(&queue.map(str::to_string))
            )
        };
        let mut fix = if apply {
            Some(fixer.transaction().ctx(|| "cannot begin the fix".into())?)
        } else {
            None
        };
        let where_ = |v: &[Option<String>]| -> String {
            key_pos
                .iter()
                .map(|&i| format!("{} = {}", ident(&cols[i]), literal(&v[i])))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let names: Vec<String> = cols.iter().map(|c| ident(c)).collect();
        let (mut ins, mut upd, mut del) = (0u64, 0u64, 0u64);
        let mut x = a.next()?;
        let mut y = b.next()?;
        loop {
            let stmt = match (&x, &y) {
                (None, None) => break,
                (Some((ka, va)), Some((kb, vb)))
                    if ka.as_bytes().cmp(kb.as_bytes()) == Ordering::Equal =>
                {
                    let s = if va != vb {
                        upd += 1;
                        let sets: Vec<String> = cols
                            .iter()
                            .zip(va)
                            .filter(|(c, _)| !keys.contains(c))
                            .map(|(c, v)| format!("{} = {}", ident(c), literal(v)))
                            .collect();
                        Some(format!(
                            "UPDATE {dest} SET {} WHERE {};",
                            sets.join(", "),
                            where_(va)
                        ))
                    } else {
                        None
                    };
                    x = a.next()?;
                    y = b.next()?;
                    s
                }
                (Some((ka, va)), Some((kb, _))) if ka.as_bytes() < kb.as_bytes() => {
                    ins += 1;
                    let s = insert_sql(&dest, &names, va) + &owner(va, Some(&cfg.queue_name));
                    x = a.next()?;
                    Some(s)
                }
                (Some((_, va)), None) => {
                    ins += 1;
                    let s = insert_sql(&dest, &names, va) + &owner(va, Some(&cfg.queue_name));
                    x = a.next()?;
                    Some(s)
                }
                (_, Some((_, vb))) => {
                    del += 1;
                    let s = format!(
                        "DELETE FROM {dest} WHERE {};{}",
                        where_(vb),
                        owner(vb, None)
                    );
                    y = b.next()?;
                    Some(s)
                }
            };
            if let Some(s) = stmt {
                println!("{s}");
                if let Some(f) = fix.as_mut() {
                    f.batch_execute(&s)
                        .ctx(|| format!("cannot apply fix: {s}"))?;
                }
            }
        }
        a.tx.commit().ok();
        b.tx.commit().ok();
        if let Some(f) = fix {
            f.commit().ctx(|| "cannot commit the fix".into())?;
        }
        let n = ins + upd + del;
        total += n;
        println!(
            "-- {}: {} missing, {} different, {} extra row(s) on this node{}",
            t.table_name,
            ins,
            upd,
            del,
            if apply && n > 0 { "; fixed" } else { "" }
        );
    }
    if total > 0 && !apply {
        return Err(Error::Other(format!(
            "{total} row(s) differ; run again with --apply to fix them"
        )));
    }
    Ok(())
}

fn insert_sql(dest: &str, names: &[String], v: &[Option<String>]) -> String {
    let vals: Vec<String> = v.iter().map(literal).collect();
    format!(
        "INSERT INTO {dest} ({}) VALUES ({});",
        names.join(", "),
        vals.join(", ")
    )
}
