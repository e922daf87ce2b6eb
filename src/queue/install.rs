//! Installs and upgrades our SQL (schemas `pgq` and `londiste`) in a database.
//! The scripts are embedded in the binary and idempotent; a version row per
//! component says what is installed. Installing runs in one transaction under an
//! advisory lock, so two processes installing at once do not collide, and an
//! upgrade keeps every queued event (tables are only ever created if missing).

use crate::error::{Context, Result};
use postgres::{Client, GenericClient};

const PGQ_SQL: &str = concat!(
    include_str!("../sql/pgq.sql"),
    "\n",
    include_str!("../sql/capture.sql"),
    "\n",
    include_str!("../sql/pgq_triggers.sql"),
    "\n",
    include_str!("../sql/pgq_grants.sql")
);
const LONDISTE_SQL: &str = concat!(
    include_str!("../sql/londiste.sql"),
    "\n",
    include_str!("../sql/cascade.sql"),
    "\n",
    include_str!("../sql/execute.sql"),
    "\n",
    include_str!("../sql/merge.sql")
);

/// The files each component's script is made of, in order, for error positions.
fn script_files(component: &str) -> Vec<(&'static str, &'static str)> {
    if component == "pgq" {
        vec![
            ("pgq.sql", include_str!("../sql/pgq.sql")),
            ("capture.sql", include_str!("../sql/capture.sql")),
            ("pgq_triggers.sql", include_str!("../sql/pgq_triggers.sql")),
            ("pgq_grants.sql", include_str!("../sql/pgq_grants.sql")),
        ]
    } else {
        vec![
            ("londiste.sql", include_str!("../sql/londiste.sql")),
            ("cascade.sql", include_str!("../sql/cascade.sql")),
            ("execute.sql", include_str!("../sql/execute.sql")),
            ("merge.sql", include_str!("../sql/merge.sql")),
        ]
    }
}

/// Bump when a script changes; an older installed version is upgraded by
/// re-running the (idempotent) script.
pub const PGQ_VERSION: i32 = 10;
pub const LONDISTE_VERSION: i32 = 10;

const LOCK_KEY: i64 = 0x6c6f_6e64_6973; // "londis"

fn installed_version<C: GenericClient>(c: &mut C, component: &str) -> Result<Option<i32>> {
    let has = c
        // Not to_regclass(): it trusts this backend's catalog caches, which in a
        // transaction begun before another installer committed still say "no
        // such table", so the re-check under the lock would miss that install.
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'pgq' AND c.relname = 'schema_info')",
            &[],
        )
        .ctx(|| "cannot check installed version".into())?;
    if !has.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = c
        .query_opt(
            "SELECT version FROM pgq.schema_info WHERE component = $1",
            &[&component],
        )
        .ctx(|| "cannot read pgq.schema_info".into())?;
    Ok(row.map(|r| r.get(0)))
}

/// ` (at <file> line N: <that line>)` for an error the server placed in the
/// script, so an install error names the statement that failed.
fn where_in_script(component: &str, sql: &str, e: &postgres::Error) -> String {
    match e.as_db_error().and_then(|d| d.position()) {
        Some(postgres::error::ErrorPosition::Original(pos)) => locate(component, sql, *pos),
        _ => String::new(),
    }
}

/// ` (at <file> line N: <that line>)` for character `pos` (from 1) of `sql`.
fn locate(component: &str, sql: &str, pos: u32) -> String {
    let before: String = sql.chars().take((pos as usize).saturating_sub(1)).collect();
    let mut line = before.matches('\n').count() + 1;
    let mut file = "";
    for (name, text) in script_files(component) {
        file = name;
        // Each file is followed by the "\n" that joins it to the next.
        let n = text.lines().count() + 1;
        if line <= n {
            break;
        }
        line -= n;
    }
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let text = sql[start..].lines().next().unwrap_or("").trim();
    let mut text: String = text.chars().take(100).collect();
    if text.len() < sql[start..].lines().next().unwrap_or("").trim().len() {
        text.push_str("...");
    }
    format!(" (at {file} line {line}: {text})")
}

fn install_component(c: &mut Client, component: &str, sql: &str, version: i32) -> Result<bool> {
    crate::version::require_supported(c)?;
    if installed_version(c, component)? == Some(version) {
        return Ok(false);
    }
    let mut tx = c
        .transaction()
        .ctx(|| "cannot begin install transaction".into())?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .ctx(|| "cannot take install lock".into())?;
    // Someone else may have installed while we waited for the lock.
    if installed_version(&mut tx, component)? == Some(version) {
        return Ok(false);
    }
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .ctx(|| "cannot set client_min_messages".into())?;
    tx.batch_execute(sql).map_err(|e| {
        let msg = format!(
            "cannot install the {component} schema: {}{}",
            crate::error::pg_message(&e),
            where_in_script(component, sql, &e)
        );
        crate::error::pg_error(&e, msg)
    })?;
    tx.execute(
        "INSERT INTO pgq.schema_info (component, version) VALUES ($1, $2)
         ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, installed_at = now()",
        &[&component, &version],
    )
    .ctx(|| "cannot record schema version".into())?;
    tx.commit()
        .ctx(|| format!("cannot commit the {component} install"))?;
    Ok(true)
}

/// Installs or upgrades the queue layer; returns whether anything changed.
pub fn install_pgq(c: &mut Client) -> Result<bool> {
    install_component(c, "pgq", PGQ_SQL, PGQ_VERSION)
}

/// Installs the queue layer and the node/table state schema.
pub fn install_all(c: &mut Client) -> Result<bool> {
    let a = install_pgq(c)?;
    let b = install_component(c, "londiste", LONDISTE_SQL, LONDISTE_VERSION)?;
    Ok(a || b)
}

/// What the permission model (roles pgq_reader, pgq_writer, pgq_admin and
/// their grants) still lacks in this database, one line each with its fix.
pub fn missing_grants(c: &mut Client) -> Result<Vec<String>> {
    let rows = c
        .query("SELECT pgq.missing_grants()", &[])
        .ctx(|| "cannot check the pgq roles and grants".into())?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Upgrades what is installed and older than this binary; installs nothing new.
/// Workers and commands call it on connect, so a new binary brings its SQL along.
pub fn upgrade_if_installed(c: &mut Client) -> Result<()> {
    for (component, sql, version) in [
        ("pgq", PGQ_SQL, PGQ_VERSION),
        ("londiste", LONDISTE_SQL, LONDISTE_VERSION),
    ] {
        if let Some(v) = installed_version(c, component)?
            && v < version
            && install_component(c, component, sql, version)?
        {
            log::info!("upgraded the {component} schema from version {v} to {version}");
            if component == "pgq" && installed_version(c, "londiste")?.is_some() {
                // Capture triggers are generated code: bring them up to date too.
                install_component(c, "londiste", LONDISTE_SQL, LONDISTE_VERSION)?;
                let n: i32 = c
                    .query_one("SELECT londiste.regenerate_capture()", &[])
                    .ctx(|| "cannot regenerate the capture triggers".into())?
                    .get(0);
                log::info!("regenerated the capture triggers of {n} table(s)");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The character position of the first `needle` in `sql`, counted from 1.
    fn pos_of(sql: &str, needle: &str) -> u32 {
        sql[..sql.find(needle).unwrap()].chars().count() as u32 + 1
    }

    #[test]
    fn install_errors_point_at_file_and_line() {
        let capture = include_str!("../sql/capture.sql");
        let needle = "CREATE OR REPLACE FUNCTION pgq._type_uses_money";
        let line = capture.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
        assert_eq!(
            locate("pgq", PGQ_SQL, pos_of(PGQ_SQL, needle) + 27),
            format!(" (at capture.sql line {line}: {needle}(i_table regclass) RETURNS boolean)")
        );
        assert_eq!(
            locate(
                "pgq",
                PGQ_SQL,
                pos_of(PGQ_SQL, "CREATE SCHEMA IF NOT EXISTS pgq")
            ),
            " (at pgq.sql line 10: CREATE SCHEMA IF NOT EXISTS pgq;)"
        );
        assert!(locate("londiste", LONDISTE_SQL, 1).starts_with(" (at londiste.sql line 1: "));
        let needle = "CREATE OR REPLACE FUNCTION londiste.execute_finish";
        let line = include_str!("../sql/execute.sql")
            .lines()
            .position(|l| l.starts_with(needle))
            .unwrap()
            + 1;
        assert!(
            locate("londiste", LONDISTE_SQL, pos_of(LONDISTE_SQL, needle))
                .starts_with(&format!(" (at execute.sql line {line}: "))
        );
    }
}
