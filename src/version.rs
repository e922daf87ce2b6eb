//! Which PostgreSQL servers we work with, and the few catalog differences
//! between them that the Rust side has to know about. The SQL layer decides
//! the rest itself from `server_version_num` (see `sql/pgq.sql`,
//! `pgq._server_version()`).
//!
//! Supported: PostgreSQL 10 to 18. 10 is the floor because capture relies on
//! statement triggers with transition tables and on `txid_current_if_assigned`.

use crate::error::{Context, Error, Result};
use postgres::GenericClient;

/// The oldest supported server, as `server_version_num`.
pub const OLDEST: i32 = 100000;
/// The newest major tested.
pub const NEWEST_MAJOR: i32 = 18;

/// The connected server's `server_version_num` (e.g. 100023 for 10.23).
pub fn server_version_num<C: GenericClient>(c: &mut C) -> Result<i32> {
    let v: String = c
        .query_one("SELECT current_setting('server_version_num')", &[])
        .ctx(|| "cannot read the server version".into())?
        .get(0);
    v.trim()
        .parse()
        .map_err(|_| Error::Other(format!("unexpected server_version_num {v:?}")))
}

/// `server_version_num` as people write it: 10.23, 9.6.24, 18.4.
pub fn display(num: i32) -> String {
    if num >= 100000 {
        format!("{}.{}", num / 10000, num % 10000)
    } else {
        format!("{}.{}.{}", num / 10000, num / 100 % 100, num % 100)
    }
}

/// An error unless the server is one we support.
pub fn check_supported(num: i32) -> Result<()> {
    if num < OLDEST {
        return Err(Error::Other(format!(
            "PostgreSQL {} is not supported: the oldest supported version is {}; upgrade the server first (pg_upgrade), then install",
            display(num),
            display(OLDEST).trim_end_matches(".0")
        )));
    }
    Ok(())
}

/// Connects' version check: the server's version, or the error above.
pub fn require_supported<C: GenericClient>(c: &mut C) -> Result<i32> {
    let v = server_version_num(c)?;
    check_supported(v)?;
    Ok(v)
}

/// An SQL expression, true for a generated column of `pg_attribute` row
/// `alias` (generated columns came in 12: before, none is).
pub fn attgenerated_expr(num: i32, alias: &str) -> String {
    if num >= 120000 {
        format!("{alias}.attgenerated <> ''")
    } else {
        "false".to_string()
    }
}

/// Built-in types that older servers lack, by name, with the major that
/// brought them. Multiranges (14+) are found by their `typtype`.
const NEWER_TYPES: &[(&str, i32, &str)] = &[
    ("jsonpath", 12, "jsonpath"),
    ("xid8", 13, "xid8"),
    ("pg_snapshot", 13, "pg_snapshot"),
    ("regcollation", 13, "regcollation"),
];

/// The columns of `table` (on the connected source) whose type, or a type it
/// is built from (array element, domain base, range subtype, composite
/// field), a server of `target_major` does not have: an error naming table
/// (as `shown`), column and type, so a value is never silently turned into
/// something else.
pub fn check_types_fit<C: GenericClient>(
    src: &mut C,
    table: &str,
    shown: &str,
    target_major: i32,
) -> Result<()> {
    // A table gone from the provider is the caller's to report.
    let gone: bool = src
        .query_one("SELECT to_regclass($1) IS NULL", &[&table])
        .ctx(|| format!("cannot look up {table} on the provider"))?
        .get(0);
    if gone {
        return Ok(());
    }
    let rows = src
        .query(
            "WITH RECURSIVE t(attnum, oid) AS (
                 SELECT attnum, atttypid FROM pg_attribute
                  WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
                 UNION
                 SELECT t.attnum, x FROM t JOIN pg_type ty ON ty.oid = t.oid
                  CROSS JOIN LATERAL (
                      SELECT ty.typbasetype WHERE ty.typbasetype <> 0
                      UNION ALL SELECT ty.typelem WHERE ty.typelem <> 0
                      UNION ALL SELECT a.atttypid FROM pg_attribute a
                       WHERE a.attrelid = ty.typrelid AND ty.typrelid <> 0 AND a.attnum > 0
                      UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = ty.oid
                  ) n(x))
             SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), ty.typname::text,
                    ty.typtype::text, ty.typnamespace = 'pg_catalog'::regnamespace
               FROM t JOIN pg_type ty ON ty.oid = t.oid
               JOIN pg_attribute a ON a.attrelid = $1::text::regclass AND a.attnum = t.attnum
              ORDER BY a.attnum",
            &[&table],
        )
        .ctx(|| format!("cannot read the column types of {table} on the provider"))?;
    for r in rows {
        let (col, coltype, name, typtype, builtin): (String, String, String, String, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let needs = if typtype == "m" {
            Some((14, "multiranges"))
        } else if builtin {
            NEWER_TYPES
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, v, what)| (*v, *what))
        } else {
            None
        };
        if let Some((major, what)) = needs
            && major > target_major
        {
            let via = if name == coltype || coltype.starts_with(&format!("{name}[")) {
                String::new()
            } else {
                format!(" (built on {name})")
            };
            return Err(Error::Other(format!(
                "cannot replicate {shown}: column \"{col}\" has type {coltype}{via}, which PostgreSQL {target_major} does not have ({what} came in {major}); \
                 change the column's type on the provider, or replicate into PostgreSQL {major} or newer"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_people_write_them() {
        assert_eq!(display(100023), "10.23");
        assert_eq!(display(180004), "18.4");
        assert_eq!(display(90624), "9.6.24");
        assert_eq!(display(90500), "9.5.0");
    }

    #[test]
    fn below_10_is_refused_in_one_line() {
        let e = check_supported(90624).unwrap_err().to_string();
        assert_eq!(
            e,
            "PostgreSQL 9.6.24 is not supported: the oldest supported version is 10; upgrade the server first (pg_upgrade), then install"
        );
        assert!(!e.contains('\n'));
        assert!(check_supported(100000).is_ok());
        assert!(check_supported(180004).is_ok());
    }

    #[test]
    fn generated_columns_from_12() {
        assert_eq!(attgenerated_expr(110022, "a"), "false");
        assert_eq!(attgenerated_expr(120000, "a"), "a.attgenerated <> ''");
    }
}
