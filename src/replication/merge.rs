//! Merged tables: one destination table fed by the queues of several sources
//! (`add-table --merge-all` / `--no-merge`). The origin of each row (which queue
//! wrote its key) lives in an origin map per table (see `sql/merge.sql`); this
//! module keeps it in step with the applied rows, in the same transaction and
//! set-based, one statement per group of events next to the group's own.
//!
//! What the origins give: a key sent by a second source is refused naming both
//! queues (the batch rolls back and its position is held until the conflict is
//! removed at a source); a TRUNCATE at one source deletes that source's rows
//! only; a copy from one source leaves the others' rows alone; `compare` checks
//! each source against its part.

use crate::error::{Context, Error, Result};
use crate::names::ident;
use postgres::{GenericClient, Statement, Transaction};

/// How one queue's events reach a merged table.
#[derive(Debug, Clone, PartialEq)]
pub struct MergePart {
    /// The queue whose rows these are (the name stored in the origin map).
    pub queue: String,
    /// On the source's TRUNCATE, delete this source's rows (false: ignore it).
    pub truncate: bool,
}

/// The origin map of merged table `dest` (created on first use).
pub fn map_of(tx: &mut Transaction, dest: &str) -> Result<String> {
    Ok(tx
        .query_one("SELECT londiste.merge_map($1)", &[&dest])
        .ctx(|| format!("cannot find the origin map of merged table {dest}"))?
        .get(0))
}

/// `unnest($2::text[], ...) AS u(c0, ...)` and `m.k = u.c0::type AND ...`.
fn keys_from(key_names: &[String], key_types: &[String]) -> (String, String) {
    let params: Vec<String> = (0..key_types.len())
        .map(|j| format!("${}::text[]", j + 2))
        .collect();
    let aliases: Vec<String> = (0..key_types.len()).map(|j| format!("c{j}")).collect();
    let on: Vec<String> = key_names
        .iter()
        .zip(key_types)
        .enumerate()
        .map(|(j, (k, t))| format!("m.{} = u.c{j}::{t}", ident(k)))
        .collect();
    (
        format!("unnest({}) AS u({})", params.join(", "), aliases.join(", ")),
        on.join(" AND "),
    )
}

/// The statement that records the origins of a group's keys (inserts and
/// updates) or drops this queue's (deletes) in `map`, returning how many keys
/// it did not record or drop: 0 is the common case, and then nothing else is
/// asked. Parameters: $1 queue, $2.. one text[] per key column.
pub fn origin_sql(map: &str, delete: bool, key_names: &[String], key_types: &[String]) -> String {
    let (from, on) = keys_from(key_names, key_types);
    let change = if delete {
        format!("DELETE FROM {map} m USING {from} WHERE m.queue_name = $1 AND {on} RETURNING 1")
    } else {
        let cols: Vec<String> = key_names.iter().map(|k| ident(k)).collect();
        let casts: Vec<String> = key_types
            .iter()
            .enumerate()
            .map(|(j, t)| format!("u.c{j}::{t}"))
            .collect();
        format!(
            "INSERT INTO {map} ({}, queue_name) SELECT {}, $1 FROM {from} ON CONFLICT ({}) DO NOTHING RETURNING 1",
            cols.join(", "),
            casts.join(", "),
            cols.join(", ")
        )
    };
    format!("WITH w AS ({change}) SELECT cardinality($2::text[]) - (SELECT count(*) FROM w)")
}

/// One key of the group that another queue wrote, if any (same parameters).
/// Keys this queue already had (updates) are not conflicts.
pub fn conflict_sql(map: &str, key_names: &[String], key_types: &[String]) -> String {
    let (from, on) = keys_from(key_names, key_types);
    let cols: Vec<String> = key_names
        .iter()
        .map(|k| format!("m.{}", ident(k)))
        .collect();
    format!(
        "SELECT ROW({})::text, m.queue_name FROM {map} m JOIN {from} ON {on} WHERE m.queue_name <> $1 LIMIT 1",
        cols.join(", ")
    )
}

/// Runs `origin_sql` for one group's keys (`key_values`: one array per key
/// column) and, when some were not new, `conflict_sql`: a key of another queue
/// is the error that names both sources.
#[allow(clippy::too_many_arguments)]
pub fn record_origins(
    tx: &mut Transaction,
    origin: &Statement,
    conflicts: &Statement,
    dest: &str,
    part: &MergePart,
    key_names: &[String],
    key_values: Vec<Vec<Option<String>>>,
    where_: &str,
) -> Result<()> {
    let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![&part.queue];
    for a in &key_values {
        params.push(a);
    }
    let what = || format!("{where_} cannot record the origin of rows of merged table {dest}");
    let not_new: i64 = tx.query_one(origin, &params).ctx(what)?.get(0);
    if not_new == 0 {
        return Ok(());
    }
    match tx.query_opt(conflicts, &params).ctx(what)? {
        None => Ok(()),
        Some(r) => {
            let (row_key, other): (String, String) = (r.get(0), r.get(1));
            Err(conflict(
                tx,
                where_,
                dest,
                key_names,
                &row_key,
                &part.queue,
                &other,
            ))
        }
    }
}

/// `queue q (from node n)`: how a source is named in messages.
fn source_name<C: GenericClient>(c: &mut C, queue: &str) -> String {
    c.query_opt(
        "SELECT provider_node FROM londiste.node_info WHERE queue_name = $1",
        &[&queue],
    )
    .ok()
    .flatten()
    .and_then(|r| r.get::<_, Option<String>>(0))
    .map_or_else(
        || format!("queue {queue}"),
        |n| format!("queue {queue} (from node {n})"),
    )
}

fn conflict<C: GenericClient>(
    c: &mut C,
    where_: &str,
    dest: &str,
    key_names: &[String],
    row_key: &str,
    mine: &str,
    other: &str,
) -> Error {
    let (a, b) = (source_name(c, mine), source_name(c, other));
    Error::Other(format!(
        "{where_} merged table {dest}: key ({})={row_key} comes from two sources: {a} sends it, \
         {b} already wrote it; remove the row at one source (the worker of {mine} holds its \
         position and retries until then)",
        key_names.join(", ")
    ))
}

/// The source's TRUNCATE on a merged table: only this source's rows go.
pub fn truncate(tx: &mut Transaction, dest: &str, part: &MergePart, ev_id: i64) -> Result<()> {
    if !part.truncate {
        log::info!(
            "[ev_id={ev_id}] TRUNCATE of merged table {dest} from queue {} ignored (merge_truncate = skip)",
            part.queue
        );
        return Ok(());
    }
    let n: i64 = tx
        .query_one(
            "SELECT londiste.merge_truncate($1, $2)",
            &[&part.queue, &dest],
        )
        .ctx(|| {
            format!(
                "[ev_id={ev_id}] cannot remove the rows of queue {} from merged table {dest}",
                part.queue
            )
        })?
        .get(0);
    log::info!(
        "[ev_id={ev_id}] TRUNCATE from queue {}: {n} of its rows removed from merged table {dest}",
        part.queue
    );
    Ok(())
}

/// Before a copy into a merged table writes rows: true if it may empty the
/// table (no other source has rows there), else this queue's old rows are gone
/// and the others' stay. Serialises the copies of one table across queues.
pub fn prepare_copy(tx: &mut Transaction, queue: &str, dest: &str) -> Result<bool> {
    Ok(tx
        .query_one(
            "SELECT londiste.merge_prepare_copy($1, $2)",
            &[&queue, &dest],
        )
        .ctx(|| format!("cannot prepare merged table {dest} for the copy from queue {queue}"))?
        .get(0))
}

/// After the COPY: the copied rows become this queue's.
pub fn claim_copied(tx: &mut Transaction, queue: &str, dest: &str) -> Result<i64> {
    Ok(tx
        .query_one(
            "SELECT londiste.merge_claim_copied($1, $2)",
            &[&queue, &dest],
        )
        .ctx(|| format!("cannot record the origin of the rows copied into {dest}"))?
        .get(0))
}

/// A COPY into a merged table failed on a duplicate key: name the source that
/// has it. `detail` is the server's `Key (a, b)=(1, 2) already exists.`.
pub fn copy_conflict<C: GenericClient>(
    c: &mut C,
    table: &str,
    dest: &str,
    queue: &str,
    detail: &str,
) -> Option<Error> {
    let inner = detail.strip_prefix("Key (")?;
    let (names, rest) = inner.split_once(")=(")?;
    let values = rest.strip_suffix(") already exists.")?;
    let names: Vec<String> = names.split(", ").map(str::to_string).collect();
    let vals: Vec<String> = values.split(", ").map(str::to_string).collect();
    let owner: Option<String> = if names.len() == vals.len() {
        c.query_one("SELECT londiste.merge_owner($1, $2)", &[&dest, &vals])
            .ok()
            .and_then(|r| r.get(0))
    } else {
        None
    };
    let b = owner.map_or_else(|| "another source".to_string(), |o| source_name(c, &o));
    let a = source_name(c, queue);
    Some(Error::Other(format!(
        "copy of {table} into merged table {dest}: key ({})=({values}) comes from two sources: \
         {a} has it, {b} already wrote it; remove the row at one source, the copy is retried",
        names.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_statements_cast_each_key_column() {
        let (k, t) = (
            vec!["id".to_string(), "Part".to_string()],
            vec!["integer".to_string(), "text".to_string()],
        );
        let s = origin_sql("londiste.m", false, &k, &t);
        assert!(s.contains("SELECT u.c0::integer, u.c1::text, $1 FROM unnest($2::text[], $3::text[]) AS u(c0, c1)"), "{s}");
        assert!(
            s.contains("ON CONFLICT (\"id\", \"Part\") DO NOTHING"),
            "{s}"
        );
        let d = origin_sql("londiste.m", true, &k, &t);
        assert!(d.contains("DELETE FROM londiste.m m USING"), "{d}");
        assert!(
            d.contains("m.\"id\" = u.c0::integer AND m.\"Part\" = u.c1::text"),
            "{d}"
        );
        let c = conflict_sql("londiste.m", &k, &t);
        assert!(c.contains("ROW(m.\"id\", m.\"Part\")::text"), "{c}");
        assert!(c.contains("m.queue_name <> $1"), "{c}");
    }
}
