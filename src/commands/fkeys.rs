//! `fkeys`: the foreign keys a copy dropped on this node, per table: those
//! waiting to be restored (the worker restores them, NOT VALID then VALIDATE,
//! once every table of the node is in sync) and those already restored.
//! Skytools documented this command and shipped it as a stub.

use super::{canonical_names, connect_local};
use crate::config::WorkerConfig;
use crate::error::{Context, Result};
use crate::replication::node;

/// The keys, with the table names qualified (the stored name is the
/// regclass text of the moment, which leaves out a schema on the path).
const LIST: &str = "
WITH k AS (
    SELECT from_table, fkey_name, fkey_def, dropped_at, NULL::timestamptz AS restored_at
      FROM londiste.pending_fkeys
    UNION ALL
    SELECT r.from_table, r.fkey_name, r.fkey_def, r.dropped_at, r.restored_at
      FROM londiste.restored_fkeys r
     WHERE NOT EXISTS (SELECT 1 FROM londiste.pending_fkeys p
                        WHERE p.from_table = r.from_table AND p.fkey_name = r.fkey_name))
SELECT coalesce((SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = to_regclass(k.from_table)), k.from_table) AS tbl,
       k.fkey_name, k.fkey_def,
       to_char(k.dropped_at, 'YYYY-MM-DD HH24:MI:SS'),
       to_char(k.restored_at, 'YYYY-MM-DD HH24:MI:SS')
  FROM k ORDER BY 1, 2";

pub fn fkeys(cfg: &WorkerConfig, args: &[String]) -> Result<()> {
    let mut c = connect_local(cfg)?;
    node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let only = canonical_names(args)?;
    let rows = c
        .query(LIST, &[])
        .ctx(|| "cannot read the dropped foreign keys".into())?;
    let (mut pending, mut restored) = (0, 0);
    let mut last_table = String::new();
    for r in rows {
        let (table, name, def, dropped, back): (String, String, String, String, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        if !only.is_empty() && !only.contains(&table) {
            continue;
        }
        if table != last_table {
            println!("{table}");
            last_table = table;
        }
        match back {
            None => {
                pending += 1;
                println!(
                    "    {name}: pending, dropped {dropped} for a copy, restored once every table is in sync: {def}"
                );
            }
            Some(at) => {
                restored += 1;
                println!("    {name}: restored {at} (dropped {dropped}): {def}");
            }
        }
    }
    println!("{pending} foreign key(s) waiting to be restored, {restored} restored");
    Ok(())
}
