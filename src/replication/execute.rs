//! Schema changes at one queue position (`execute`): the file's header
//! attributes, its statements, and running it on a node. The root runs a file
//! from the `execute` command (commands/execute.rs); every subscriber runs the
//! same text when its worker reaches the EXECUTE event, inside the batch
//! transaction, so rows written before the change are applied before it.
//!
//! The header format is the reference's, so existing DDL files keep working:
//! lines `--*-- Key: value, value` before the first statement (a line ending in
//! a comma continues on the next), keys Local-Table, Local-Sequence,
//! Local-Destination, Need-Table, Need-Sequence, Need-Function (`name(nargs)`),
//! Need-Schema, Need-View. With attributes, a node runs the file only when every
//! named object matches there (and refuses a partial match); `@name@` in the
//! text becomes the local name of table or sequence `name`.

use crate::error::{Context, Error, Result};
use crate::names::{fq_name, quote_ident, split_qualified};
use postgres::GenericClient;
use std::collections::HashMap;

const PREFIX: &str = "--*--";

/// Keys in the order the reference probes (and prints) them.
const KEYS: &[&str] = &[
    "Local-Table",
    "Local-Sequence",
    "Local-Destination",
    "Need-Table",
    "Need-Sequence",
    "Need-Function",
    "Need-Schema",
    "Need-View",
];

/// The header attributes of a file: lower-case key to its values, in order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Attrs(Vec<(String, Vec<String>)>);

impl Attrs {
    fn add(&mut self, key: &str, value: &str) -> Result<()> {
        let k = key.trim().to_ascii_lowercase();
        if !KEYS.iter().any(|n| n.eq_ignore_ascii_case(&k)) {
            return Err(Error::Usage(format!(
                "invalid attribute {:?} in the --*-- header; known: {}",
                key.trim(),
                KEYS.join(", ")
            )));
        }
        let v = value.trim().to_string();
        match self.0.iter_mut().find(|(n, _)| *n == k) {
            Some((_, vs)) => vs.push(v),
            None => self.0.push((k, vec![v])),
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> &[String] {
        let k = key.to_ascii_lowercase();
        self.0
            .iter()
            .find(|(n, _)| *n == k)
            .map_or(&[], |(_, v)| v.as_slice())
    }

    /// Reads the `--*--` lines before the first statement.
    pub fn parse_sql(sql: &str) -> Result<Attrs> {
        let mut a = Attrs::default();
        let mut cont: Option<String> = None;
        for ln in sql.lines() {
            let ln = ln.trim();
            if ln.is_empty() {
                continue;
            }
            if !ln.starts_with("--") {
                break;
            }
            let Some(rest) = ln.strip_prefix(PREFIX) else {
                continue;
            };
            let rest = rest.trim();
            if rest.is_empty() {
                continue;
            }
            let (key, values) = match &cont {
                Some(k) => (k.clone(), rest),
                None => match rest.split_once(':') {
                    Some((k, v)) => (k.to_string(), v),
                    None => continue,
                },
            };
            for v in values.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                a.add(&key, v)?;
            }
            cont = rest.ends_with(',').then_some(key);
        }
        Ok(a)
    }

    /// The form the EXECUTE event carries (ev_extra2), as the reference writes it.
    pub fn to_urlenc(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{}={}", urlenc(k), urlenc(&v.join(","))))
            .collect::<Vec<_>>()
            .join("&")
    }

    pub fn parse_urlenc(s: &str) -> Result<Attrs> {
        let mut a = Attrs::default();
        for pair in s.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = urldec(v);
            for x in v.split(',').filter(|x| !x.trim().is_empty()) {
                a.add(&urldec(k), x)?;
            }
        }
        Ok(a)
    }
}

fn urlenc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn urldec(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or(""), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One statement of a file and the line it starts on.
#[derive(Debug, PartialEq)]
pub struct Statement {
    pub line: usize,
    pub text: String,
}

/// Splits SQL text into statements at top-level semicolons, minding quotes,
/// dollar quotes, comments and E'' escapes. Comment-only pieces are dropped.
pub fn split_statements(sql: &str) -> Vec<Statement> {
    let c: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut start, mut line, mut start_line) = (0, 0, 1, 1);
    let mut substantive = false;
    let mut push = |from: usize, to: usize, l: usize, subst: bool| {
        let text: String = c[from..to].iter().collect();
        if subst {
            out.push(Statement {
                line: l,
                text: text.trim().to_string(),
            });
        }
    };
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        let comment = (ch == '-' && next == Some('-')) || (ch == '/' && next == Some('*'));
        if !(substantive || comment || ch.is_whitespace()) {
            substantive = true;
            start_line = line;
            start = i;
        }
        match ch {
            '\n' => line += 1,
            '-' if next == Some('-') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '/' if next == Some('*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 1;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 1;
                        if depth == 0 {
                            i += 1;
                            break;
                        }
                    } else if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
                continue;
            }
            '\'' | '"' => {
                let escapes = ch == '\''
                    && i > 0
                    && matches!(c[i - 1], 'e' | 'E')
                    && (i < 2 || !(c[i - 2].is_alphanumeric() || c[i - 2] == '_'));
                i += 1;
                while i < c.len() {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    if escapes && c[i] == '\\' {
                        i += 2;
                        continue;
                    }
                    if c[i] == ch {
                        if c.get(i + 1) == Some(&ch) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            '$' if i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_') => {
                // $tag$ ... $tag$ (a $1 parameter is not a quote).
                let mut j = i + 1;
                while j < c.len() && (c[j].is_alphanumeric() || c[j] == '_') {
                    j += 1;
                }
                if j < c.len() && c[j] == '$' && !c.get(i + 1).is_some_and(|x| x.is_ascii_digit()) {
                    let tag: Vec<char> = c[i..=j].to_vec();
                    let mut k = j + 1;
                    while k < c.len() && c[k..].iter().take(tag.len()).ne(tag.iter()) {
                        if c[k] == '\n' {
                            line += 1;
                        }
                        k += 1;
                    }
                    i = (k + tag.len()).min(c.len());
                    continue;
                }
            }
            ';' => {
                push(start, i, start_line, substantive);
                substantive = false;
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    push(start, c.len(), start_line, substantive);
    out
}

/// Refuses what cannot run inside the one transaction that keeps a file and
/// its queue position together.
pub fn check_statement(file: &str, s: &Statement) -> Result<()> {
    let words: Vec<String> = s
        .text
        .split_whitespace()
        .take(4)
        .map(|w| w.trim_end_matches(';').to_ascii_lowercase())
        .collect();
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let why = if s.text.starts_with('\\') {
        Some("psql meta-commands are not SQL")
    } else if matches!(
        w(0),
        "begin" | "commit" | "rollback" | "end" | "abort" | "start"
    ) && !(w(0) == "start" && w(1) != "transaction")
    {
        Some("the file runs in one transaction with its queue event; leave out transaction control")
    } else if w(0) == "vacuum"
        || (w(0) == "create" && w(1) == "database")
        || (w(0) == "alter" && w(1) == "system")
        || words.iter().any(|x| x == "concurrently")
    {
        Some("it cannot run inside a transaction block")
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::Usage(format!(
            "{file} line {}: {} is refused: {why}",
            s.line,
            short(&s.text)
        ))),
        None => Ok(()),
    }
}

pub fn short(sql: &str) -> String {
    let one: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > 80 {
        format!("{}...", one.chars().take(77).collect::<String>())
    } else {
        one
    }
}

/// Runs the statements, naming the file, statement and line of a failure.
pub fn run_statements<C: GenericClient>(c: &mut C, file: &str, sql: &str) -> Result<usize> {
    let stmts = split_statements(sql);
    for s in &stmts {
        check_statement(file, s)?;
    }
    for (n, s) in stmts.iter().enumerate() {
        c.batch_execute(&s.text).map_err(|e| {
            let msg = format!(
                "{file}: statement {} (line {}) failed: {}: {}",
                n + 1,
                s.line,
                short(&s.text),
                crate::error::pg_message(&e)
            );
            crate::error::pg_error(&e, msg)
        })?;
    }
    Ok(stmts.len())
}

/// This node's replicated tables (queue name -> local name) and sequences.
pub struct Local {
    pub tables: HashMap<String, String>,
    pub seqs: Vec<String>,
}

pub fn local_objects<C: GenericClient>(c: &mut C, queue: &str) -> Result<Local> {
    let mut tables = HashMap::new();
    for r in c
        .query(
            "SELECT table_name, coalesce(dest_table, table_name) FROM londiste.table_info WHERE queue_name = $1 AND local",
            &[&queue],
        )
        .ctx(|| "cannot read londiste.table_info".into())?
    {
        tables.insert(r.get::<_, String>(0), r.get::<_, String>(1));
    }
    let seqs = c
        .query(
            "SELECT seq_name FROM londiste.seq_info WHERE queue_name = $1 AND local",
            &[&queue],
        )
        .ctx(|| "cannot read londiste.seq_info".into())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Local { tables, seqs })
}

fn canonical(name: &str) -> Result<String> {
    let (s, t) = split_qualified(name)?;
    Ok(fq_name(&s, &t))
}

fn exists<C: GenericClient>(c: &mut C, key: &str, name: &str) -> Result<bool> {
    let sql = match key {
        "need-table" | "local-destination" => {
            "SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass($1) AND relkind IN ('r', 'p'))"
        }
        "need-sequence" => {
            "SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass($1) AND relkind = 'S')"
        }
        "need-view" => {
            "SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass($1) AND relkind IN ('v', 'm'))"
        }
        "need-schema" => "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
        _ => {
            // name(nargs), nargs 0 when left out.
            let (f, n) = match name.split_once('(') {
                Some((f, rest)) => (f, rest.trim_end_matches(')').trim().parse().unwrap_or(0)),
                None => (name, 0),
            };
            let (s, p) = split_qualified(f.trim())?;
            return c
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                                     WHERE n.nspname = $1 AND p.proname = $2 AND p.pronargs = $3)",
                    &[&s, &p, &(n as i16)],
                )
                .map(|r| r.get(0))
                .ctx(|| format!("cannot look up function {name}"));
        }
    };
    c.query_one(sql, &[&name])
        .map(|r| r.get(0))
        .ctx(|| format!("cannot look up {name}"))
}

/// Does the file apply to this node? Without attributes always; with them,
/// when every named object matches here, not when none does, and an error
/// when only some do (the file was written for another layout).
pub fn applies<C: GenericClient>(c: &mut C, file: &str, a: &Attrs, local: &Local) -> Result<bool> {
    if a.is_empty() {
        return Ok(true);
    }
    let (mut hit, mut miss) = (Vec::new(), Vec::new());
    for key in KEYS {
        let k = key.to_ascii_lowercase();
        for v in a.get(&k) {
            let name = canonical(v)?;
            let ok = match k.as_str() {
                "local-table" => local.tables.contains_key(&name),
                "local-sequence" => local.seqs.contains(&name),
                "local-destination" => match local.tables.get(&name) {
                    Some(dest) => exists(c, &k, dest)?,
                    None => false,
                },
                "need-function" | "need-schema" => exists(c, &k, v)?,
                _ => exists(c, &k, &name)?,
            };
            if ok { &mut hit } else { &mut miss }.push(format!("{key}: {v}"));
        }
    }
    match (hit.is_empty(), miss.is_empty()) {
        (false, true) | (true, true) => Ok(true),
        (true, false) => Ok(false),
        (false, false) => Err(Error::Other(format!(
            "{file} only partly matches this node: found {}; missing {}; make the node match the file's --*-- header or fix the header",
            hit.join(", "),
            miss.join(", ")
        ))),
    }
}

/// The text with `@name@` of Local-Table, Local-Sequence and Local-Destination
/// replaced by the local, quoted name.
pub fn localize(sql: &str, a: &Attrs, local: &Local) -> Result<String> {
    let mut out = sql.to_string();
    for key in ["local-table", "local-sequence", "local-destination"] {
        for v in a.get(key) {
            let name = canonical(v)?;
            let target = if key == "local-sequence" {
                local.seqs.contains(&name).then(|| name.clone())
            } else {
                local.tables.get(&name).cloned()
            };
            let Some(target) = target else { continue };
            let (s, t) = split_qualified(&target)?;
            out = out.replace(
                &format!("@{v}@"),
                &format!("{}.{}", quote_ident(&s), quote_ident(&t)),
            );
        }
    }
    Ok(out)
}

/// A subscriber's replay of an EXECUTE event, in the batch transaction: the
/// file runs here unless it ran already or its header says it is not for this
/// node. A failure rolls the batch back; the worker retries it with backoff,
/// so once the cause is removed the node goes on by itself.
pub fn apply_event<C: GenericClient>(
    c: &mut C,
    queue: &str,
    ev: &super::apply::Event,
) -> Result<()> {
    let file = ev.extra1.as_deref().unwrap_or("");
    let sql = ev.data.as_deref().unwrap_or("");
    let fail = |e: Error| -> Error {
        let m = format!(
            "[ev_id={}] EXECUTE {file} stopped this node at its queue position: {e}; the worker retries until it runs              (fix the cause on this node)",
            ev.id
        );
        match e {
            Error::Unavailable(_) => Error::Unavailable(m),
            _ => Error::Db(m),
        }
    };
    let attrs = Attrs::parse_urlenc(ev.extra2.as_deref().unwrap_or("")).map_err(fail)?;
    let local = local_objects(c, queue)?;
    let run = applies(c, file, &attrs, &local).map_err(fail)?;
    let text = if run {
        localize(sql, &attrs, &local).map_err(fail)?
    } else {
        sql.to_string()
    };
    let r = c
        .query_one(
            "SELECT ret_code, ret_note FROM londiste.execute_start($1, $2, $3, false, $4)",
            &[&queue, &file, &text, &ev.extra2],
        )
        .ctx(|| format!("[ev_id={}] cannot record EXECUTE {file}", ev.id))?;
    let (code, note): (i32, String) = (r.get(0), r.get(1));
    if code == 201 {
        log::info!("{note}");
        return Ok(());
    }
    if code != 200 {
        return Err(fail(Error::Other(note)));
    }
    if !run {
        log::info!("EXECUTE {file}: its --*-- header matches nothing on this node, skipped");
        return Ok(());
    }
    let n = run_statements(c, file, &text).map_err(fail)?;
    log::info!("EXECUTE {file}: {n} statement(s) run");
    Ok(())
}

#[cfg(test)]
#[path = "execute_tests.rs"]
mod tests;
