//! `execute FILE...`: a schema change on the root, queued so that every node
//! runs it at the same position in the stream (see replication/execute.rs for
//! the file format and the subscriber side).

use super::connect_local;
use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::replication::execute::{
    Attrs, applies, check_statement, local_objects, localize, run_statements, split_statements,
};
use crate::replication::node;
use postgres::Client;
use std::path::Path;
use std::time::Duration;

/// A DDL statement queues behind any long transaction on its table, and every
/// writer of the table queues behind it: waiting is bounded, then retried.
const LOCK_TIMEOUT: &str = "5s";
const LOCK_ATTEMPTS: u32 = 4;

struct File {
    path: String,
    name: String,
    sql: String,
    attrs: Attrs,
}

/// Reads and checks every file before anything runs: a typo in the third file
/// should not leave the first two applied.
fn read_files(paths: &[String]) -> Result<Vec<File>> {
    if paths.is_empty() {
        return Err(Error::Usage(
            "name the SQL files to run: execute FILE...".into(),
        ));
    }
    let mut out = Vec::new();
    for p in paths {
        let sql =
            std::fs::read_to_string(p).map_err(|e| Error::Io(format!("cannot read {p}: {e}")))?;
        let name = Path::new(p)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.clone());
        let attrs = Attrs::parse_sql(&sql).map_err(|e| Error::Usage(format!("{p}: {e}")))?;
        let stmts = split_statements(&sql);
        if stmts.is_empty() {
            return Err(Error::Usage(format!("{p} has no SQL statements")));
        }
        for s in &stmts {
            check_statement(p, s)?;
        }
        if out.iter().any(|f: &File| f.name == name) {
            return Err(Error::Usage(format!(
                "two files are named {name}: files are known by name on every node, rename one"
            )));
        }
        out.push(File {
            path: p.clone(),
            name,
            sql,
            attrs,
        });
    }
    Ok(out)
}

fn root_hint(c: &mut Client, queue: &str) -> String {
    c.query_opt(
        "SELECT node_name, node_location FROM londiste.node_location
          WHERE queue_name = $1 AND node_type = 'root' AND NOT dead LIMIT 1",
        &[&queue],
    )
    .ok()
    .flatten()
    .map(|r| {
        format!(
            " (the root is {} at {})",
            r.get::<_, String>(0),
            db::redact(&r.get::<_, String>(1))
        )
    })
    .unwrap_or_default()
}

pub fn execute(cfg: &WorkerConfig, paths: &[String]) -> Result<()> {
    let files = read_files(paths)?;
    let mut c = connect_local(cfg)?;
    let queue = cfg.queue_name.clone();
    let n = node::require(&mut c, &queue, &cfg.command_hint())?;
    if !n.is_root() {
        return Err(Error::Other(format!(
            "execute runs on the root: this node ({}) is a {}{}; run it with the root's config",
            n.node_name,
            n.node_type,
            root_hint(&mut c, &queue)
        )));
    }
    for f in &files {
        let mut attempt = 1;
        loop {
            match run_one(&mut c, &queue, f) {
                Err(e) if is_lock_timeout(&e) && attempt < LOCK_ATTEMPTS => {
                    log::warn!(
                        "{}: a lock was not granted within {LOCK_TIMEOUT} (attempt {attempt} of {LOCK_ATTEMPTS}); \
                         a long transaction holds a table the file changes; trying again",
                        f.path
                    );
                    attempt += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) if is_lock_timeout(&e) => {
                    return Err(Error::Other(format!(
                        "{e}; find the transaction holding the table in pg_stat_activity, end it, and run execute again"
                    )));
                }
                r => {
                    r?;
                    break;
                }
            }
        }
    }
    log::info!("Done");
    Ok(())
}

/// What the generated capture code of each root table depends on.
fn capture_shapes(
    tx: &mut postgres::Transaction,
    queue: &str,
) -> Result<std::collections::HashMap<String, String>> {
    Ok(tx
        .query(
            "SELECT table_name, concat_ws(' ', t::oid, t::text, pgq.table_pkey(t)::text, pgq._type_uses_money(t))
               FROM londiste.table_info, to_regclass(table_name) t
              WHERE queue_name = $1 AND local AND t IS NOT NULL",
            &[&queue],
        )
        .ctx(|| "cannot read the replicated tables' shapes".into())?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

fn is_lock_timeout(e: &Error) -> bool {
    matches!(e, Error::Db(m) if m.contains("lock timeout"))
}

/// One file in one transaction: record it, run it, queue its event.
fn run_one(c: &mut Client, queue: &str, f: &File) -> Result<()> {
    let mut tx = c
        .transaction()
        .ctx(|| "cannot begin the execute transaction".into())?;
    // The file's own row changes are not captured: every node runs the file.
    tx.batch_execute(&format!(
        "SET LOCAL londiste.replay = 'on'; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"
    ))
    .ctx(|| "cannot prepare the execute session".into())?;
    let r = tx
        .query_one(
            "SELECT ret_code, ret_note FROM londiste.execute_start($1, $2, $3, true, $4)",
            &[&queue, &f.name, &f.sql, &f.attrs.to_urlenc()],
        )
        .ctx(|| format!("cannot start {}", f.path))?;
    let (code, note): (i32, String) = (r.get(0), r.get(1));
    match code {
        200 => {}
        201 => {
            log::info!("{note}");
            return Ok(());
        }
        _ => return Err(Error::Other(format!("{}: {note}", f.path))),
    }
    let local = local_objects(&mut tx, queue)?;
    let before = capture_shapes(&mut tx, queue)?;
    let ran = if applies(&mut tx, &f.path, &f.attrs, &local)? {
        let text = localize(&f.sql, &f.attrs, &local)?;
        Some(run_statements(&mut tx, &f.path, &text)?)
    } else {
        None
    };
    let lost: Vec<String> = tx
        .query("SELECT londiste.execute_lost_tables($1)", &[&queue])
        .ctx(|| "cannot check the replicated tables".into())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !lost.is_empty() {
        return Err(Error::Other(format!(
            "{} drops or renames replicated table(s) {}: nothing was run; remove-table them on every node first, \
             then run execute again",
            f.path,
            lost.join(", ")
        )));
    }
    // The capture triggers read the columns at run time, but carry the
    // table's name, key and money handling: regenerate them, in this
    // transaction, for the tables where the file changed one of those (only
    // those: a trigger change locks its table against writers).
    for (t, shape) in capture_shapes(&mut tx, queue)? {
        if before.get(&t) != Some(&shape) {
            tx.query_one(
                "SELECT pgq.capture_create($1, $2::text::regclass, key_columns, 'capture')
                   FROM londiste.table_info WHERE queue_name = $1 AND table_name = $2",
                &[&queue, &t],
            )
            .ctx(|| format!("cannot regenerate the capture triggers of {t}"))?;
            log::info!("{}: capture triggers of {t} regenerated", f.name);
        }
    }
    tx.query_one(
        "SELECT ret_code FROM londiste.execute_finish($1, $2)",
        &[&queue, &f.name],
    )
    .ctx(|| format!("cannot queue the EXECUTE event of {}", f.path))?;
    tx.commit().ctx(|| format!("cannot commit {}", f.path))?;
    match ran {
        Some(n) => log::info!(
            "{}: {n} statement(s) run on the root, queued for every node",
            f.name
        ),
        None => log::info!(
            "{}: its --*-- header matches nothing on the root; not run here, queued for the other nodes",
            f.name
        ),
    }
    Ok(())
}
