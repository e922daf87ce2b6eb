//! Huge rows: an event whose text is larger than STREAM_BYTES (a value of
//! tens or hundreds of MB) is not parsed into fields and bound as a
//! parameter (each a full copy of the value) but streamed through COPY,
//! unquoted on the fly: straight into the table for an insert, through a
//! temporary table and one INSERT ... ON CONFLICT for an update. The worker
//! then holds the value once, as the event's text.

use super::{Applier, Column, Group, Kind, TableMeta, upsert_clause};
use crate::error::{Error, Result};
use crate::names::ident;
use crate::replication::record::{split_rows, write_record_copy};
use postgres::Transaction;

pub const STREAM_BYTES: usize = 8 << 20;

const STAGE: &str = "pg_temp.londiste_stage";

impl Applier {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn stream_rows(
        &mut self,
        tx: &mut Transaction,
        g: &Group,
        meta: &TableMeta,
        used: &[(usize, &Column)],
        key_cols: &[String],
        ncols: usize,
        where_: &str,
    ) -> Result<()> {
        let ev = g.events[0];
        let data = ev.data.as_deref().unwrap_or("");
        let rows = if ev.ev_type.ends_with('*') {
            split_rows(data).map_err(|e| Error::Other(format!("[ev_id={}] {}", ev.id, e)))?
        } else {
            vec![data]
        };
        let what = if g.kind == Kind::Insert {
            "insert into"
        } else {
            "update"
        };
        let fail = |e: &dyn std::fmt::Display| {
            Error::Db(format!("{where_} cannot {what} {}: {e}", g.dest))
        };
        let pg = |e: postgres::Error| {
            let msg = format!(
                "{where_} cannot {what} {}: {}",
                g.dest,
                crate::error::pg_message(&e)
            );
            crate::error::pg_error(&e, msg)
        };
        let names: Vec<String> = used.iter().map(|(_, c)| ident(&c.name)).collect();
        let names = names.join(", ");
        // COPY does not refuse values for GENERATED ALWAYS identity columns,
        // but INSERT ... OVERRIDING is what the other paths do: stay with it.
        let direct = g.kind == Kind::Insert && !meta.identity_always;
        let target = if direct {
            g.dest.clone()
        } else {
            tx.batch_execute(&format!(
                "CREATE TEMP TABLE londiste_stage ON COMMIT DROP AS SELECT {names} FROM {} WITH NO DATA",
                g.dest
            ))
            .map_err(pg)?;
            STAGE.to_string()
        };
        let mut want = vec![false; ncols];
        for (i, _) in used {
            want[*i] = true;
        }
        let mut w = tx
            .copy_in(format!("COPY {target} ({names}) FROM STDIN").as_str())
            .map_err(pg)?;
        for r in &rows {
            let n = write_record_copy(r, &want, &mut w).map_err(|e| {
                // The server's error can surface here, wrapped in an io::Error.
                match e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<postgres::Error>())
                {
                    Some(p) => fail(&crate::error::pg_message(p)),
                    None => fail(&e),
                }
            })?;
            if n != ncols {
                return Err(Error::Other(format!(
                    "[ev_id={}] event for {} has {n} values for {ncols} columns",
                    ev.id, g.dest
                )));
            }
        }
        w.finish().map_err(pg)?;
        if !direct {
            let mut sql = format!(
                "INSERT INTO {} ({names}) {}SELECT {names} FROM {STAGE}",
                g.dest,
                if meta.identity_always {
                    "OVERRIDING SYSTEM VALUE "
                } else {
                    ""
                }
            );
            if g.kind == Kind::Upsert {
                sql.push_str(&upsert_clause(key_cols, used));
            }
            sql.push_str(&format!("; DROP TABLE {STAGE}"));
            tx.batch_execute(&sql).map_err(pg)?;
        }
        self.stats.rows += rows.len() as u64;
        self.stats.statements += 1;
        Ok(())
    }
}
