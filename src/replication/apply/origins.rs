//! Merged tables: the origin of every row a group writes, recorded before the
//! rows (see replication/merge.rs), so that a key another source wrote is
//! reported as such.

use super::{Applier, Column, Group, Kind};
use crate::error::{Error, Result};
use crate::replication::merge::{self, MergePart};
use postgres::Transaction;

impl Applier {
    /// A merged table: the group's keys get (or, deleted, lose) their origin
    /// before the rows are written, so a key of another source is reported as
    /// such, not as the table's unique violation.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_origins(
        &mut self,
        tx: &mut Transaction,
        g: &Group,
        m: &MergePart,
        used: &[(usize, &Column)],
        rows: &[Vec<Option<String>>],
        key_cols: &[String],
        where_: &str,
    ) -> Result<()> {
        let mut types = Vec::with_capacity(key_cols.len());
        let mut arrays = Vec::with_capacity(key_cols.len());
        for k in key_cols {
            let j = used.iter().position(|(_, c)| &c.name == k).ok_or_else(|| {
                Error::Other(format!(
                    "{where_} key column {k} of merged table {} is not among the applied columns",
                    g.dest
                ))
            })?;
            types.push(used[j].1.type_sql.clone());
            arrays.push(rows.iter().map(|r| r[j].clone()).collect());
        }
        if types.is_empty() {
            return Err(Error::Other(format!(
                "{where_} event for merged table {} has no key columns; a merged table needs a primary key on every source",
                g.dest
            )));
        }
        let map = match self.merge_maps.get(&g.dest) {
            Some(m) => m.clone(),
            None => {
                let m = merge::map_of(tx, &g.dest)?;
                self.merge_maps.insert(g.dest.clone(), m.clone());
                m
            }
        };
        let delete = g.kind == Kind::Delete;
        let origin = self.statement(tx, &merge::origin_sql(&map, delete, key_cols, &types))?;
        let conflicts = self.statement(tx, &merge::conflict_sql(&map, key_cols, &types))?;
        merge::record_origins(
            tx, &origin, &conflicts, &g.dest, m, key_cols, arrays, where_,
        )?;
        self.stats.statements += 1;
        Ok(())
    }
}
