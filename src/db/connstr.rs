//! Connection strings as libpq reads them: `key=value` lists (with `'quoted'`
//! values and backslash escapes) and `postgresql://` URIs, completed the way
//! libpq completes them: values from a `service=` entry, then `PG*` environment
//! variables, then built-in defaults (the local socket, the OS user name).
//!
//! The `postgres` crate's own parser knows only part of this (no services, no
//! environment, sslmode only disable/prefer/require), so the string is read here
//! and `db::connect` builds the crate's `Config` from the result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Keywords and the environment variable that supplies each default (libpq's
/// `PQconninfoOptions`). All are honoured by `db::connect`.
const KEYWORDS: &[(&str, Option<&str>)] = &[
    ("host", Some("PGHOST")),
    ("hostaddr", Some("PGHOSTADDR")),
    ("port", Some("PGPORT")),
    ("user", Some("PGUSER")),
    ("password", Some("PGPASSWORD")),
    ("passfile", Some("PGPASSFILE")),
    ("dbname", Some("PGDATABASE")),
    ("service", Some("PGSERVICE")),
    ("options", Some("PGOPTIONS")),
    ("application_name", Some("PGAPPNAME")),
    ("fallback_application_name", None),
    ("connect_timeout", Some("PGCONNECT_TIMEOUT")),
    ("client_encoding", Some("PGCLIENTENCODING")),
    ("sslmode", Some("PGSSLMODE")),
    ("requiressl", Some("PGREQUIRESSL")),
    ("sslrootcert", Some("PGSSLROOTCERT")),
    ("sslcert", Some("PGSSLCERT")),
    ("sslkey", Some("PGSSLKEY")),
    ("sslcrl", Some("PGSSLCRL")),
    ("sslsni", Some("PGSSLSNI")),
    ("ssl_min_protocol_version", Some("PGSSLMINPROTOCOLVERSION")),
    ("ssl_max_protocol_version", Some("PGSSLMAXPROTOCOLVERSION")),
    ("channel_binding", Some("PGCHANNELBINDING")),
    ("gssencmode", Some("PGGSSENCMODE")),
    ("target_session_attrs", Some("PGTARGETSESSIONATTRS")),
    ("load_balance_hosts", Some("PGLOADBALANCEHOSTS")),
    ("keepalives", None),
    ("keepalives_idle", None),
    ("keepalives_interval", None),
    ("keepalives_count", None),
    ("tcp_user_timeout", None),
];

/// libpq keywords this tool cannot honour: refused by name rather than ignored,
/// since each changes who is trusted or how the server is found.
const UNSUPPORTED: &[&str] = &[
    "sslpassword",
    "sslcrldir",
    "sslcompression",
    "sslcertmode",
    "sslnegotiation",
    "sslkeylogfile",
    "requirepeer",
    "require_auth",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "replication",
    "min_protocol_version",
    "max_protocol_version",
];

/// Parsed connection parameters, keyword to value; a later value wins.
pub type Params = BTreeMap<String, String>;

/// Where `resolve` looks things up: the environment and the home directory.
/// Tests pass their own.
pub struct Env<'a> {
    pub var: &'a dyn Fn(&str) -> Option<String>,
    pub home: Option<PathBuf>,
}

impl Env<'_> {
    /// The process environment; home as libpq finds it ($HOME, else passwd).
    pub fn process() -> Env<'static> {
        Env {
            var: &|k| std::env::var(k).ok(),
            home: home_dir(),
        }
    }
}

pub fn home_dir() -> Option<PathBuf> {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => Some(PathBuf::from(h)),
        _ => nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.dir),
    }
}

fn check_keyword(k: &str) -> Result<(), String> {
    if KEYWORDS.iter().any(|(n, _)| *n == k) {
        Ok(())
    } else if UNSUPPORTED.contains(&k) {
        Err(format!(
            "connection option \"{k}\" is not supported by londiste-rs"
        ))
    } else {
        Err(format!("invalid connection option \"{k}\""))
    }
}

pub fn is_uri(s: &str) -> bool {
    let t = s.trim_start();
    t.starts_with("postgresql://") || t.starts_with("postgres://")
}

/// Parses a keyword/value string or a URI (no defaults applied).
pub fn parse(s: &str) -> Result<Params, String> {
    let p = if is_uri(s) {
        parse_uri(s.trim())?
    } else {
        parse_kv(s)?
    };
    for k in p.keys() {
        check_keyword(k)?;
    }
    Ok(p)
}

/// One `key = value` item of a keyword/value string: the key, the value and
/// the byte range of the value as written (for `redact`).
pub(crate) struct Item {
    pub key: String,
    pub value: String,
    pub span: std::ops::Range<usize>,
}

/// libpq's `conninfo_parse`: whitespace around `=` allowed; a value is either
/// `'quoted'` or runs to the next whitespace; `\` escapes the next character.
pub(crate) fn lex_kv(s: &str) -> Result<Vec<Item>, (String, usize)> {
    let b: Vec<char> = s.chars().collect();
    // Byte offsets of each char, for spans into the original string.
    let offs: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
    let mut i = 0;
    let mut items = Vec::new();
    loop {
        while i < b.len() && b[i].is_whitespace() {
            i += 1;
        }
        if i == b.len() {
            return Ok(items);
        }
        let kstart = i;
        while i < b.len() && b[i] != '=' && !b[i].is_whitespace() {
            i += 1;
        }
        let key: String = b[kstart..i].iter().collect();
        while i < b.len() && b[i].is_whitespace() {
            i += 1;
        }
        if i == b.len() || b[i] != '=' {
            return Err((
                format!("missing \"=\" after \"{key}\" in connection info string"),
                offs[kstart],
            ));
        }
        i += 1;
        while i < b.len() && b[i].is_whitespace() {
            i += 1;
        }
        let vstart = i;
        let mut value = String::new();
        if i < b.len() && b[i] == '\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => {
                        return Err((
                            "unterminated quoted string in connection info string".into(),
                            offs[vstart],
                        ));
                    }
                    Some('\\') => {
                        if let Some(&c) = b.get(i + 1) {
                            value.push(c);
                        }
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_whitespace() {
                if b[i] == '\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        let end = offs[i.min(b.len())];
        items.push(Item {
            key,
            value,
            span: offs[vstart]..end,
        });
    }
}

fn parse_kv(s: &str) -> Result<Params, String> {
    let items = lex_kv(s).map_err(|(m, _)| m)?;
    Ok(items.into_iter().map(|i| (i.key, i.value)).collect())
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid percent-encoded token: \"{}\"", &s[i..]))?;
            if hex == 0 {
                return Err("forbidden value %00 in percent-encoded value".into());
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("percent-encoded value {s:?} is not UTF-8"))
}

/// libpq's URI form: `postgresql://[user[:password]@][host][:port][,...][/dbname][?k=v&...]`.
fn parse_uri(s: &str) -> Result<Params, String> {
    let rest = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
        .ok_or("not a postgresql:// URI")?;
    let mut p = Params::new();
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.split_once('/') {
        Some((a, d)) => (a, Some(d)),
        None => (main, None),
    };
    let hostpart = match authority.rsplit_once('@') {
        Some((cred, h)) => {
            let (u, pw) = match cred.split_once(':') {
                Some((u, pw)) => (u, Some(pw)),
                None => (cred, None),
            };
            if !u.is_empty() {
                p.insert("user".into(), percent_decode(u)?);
            }
            if let Some(pw) = pw {
                p.insert("password".into(), percent_decode(pw)?);
            }
            h
        }
        None => authority,
    };
    let (mut hosts, mut ports) = (Vec::new(), Vec::new());
    if !hostpart.is_empty() {
        for hp in hostpart.split(',') {
            let (h, port) = if let Some(r) = hp.strip_prefix('[') {
                let (h, after) = r
                    .split_once(']')
                    .ok_or_else(|| format!("missing \"]\" in IPv6 host address in URI: {hp:?}"))?;
                (h, after.strip_prefix(':').unwrap_or(""))
            } else {
                match hp.rsplit_once(':') {
                    Some((h, port)) => (h, port),
                    None => (hp, ""),
                }
            };
            hosts.push(percent_decode(h)?);
            ports.push(percent_decode(port)?);
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            p.insert("host".into(), hosts.join(","));
        }
        if ports.iter().any(|x| !x.is_empty()) {
            p.insert("port".into(), ports.join(","));
        }
    }
    if let Some(d) = path
        && !d.is_empty()
    {
        p.insert("dbname".into(), percent_decode(d)?);
    }
    for kv in query.unwrap_or("").split('&').filter(|x| !x.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            format!("missing key/value separator \"=\" in URI query parameter: {kv:?}")
        })?;
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        // libpq's JDBC-compatible alias.
        if k == "ssl" && v == "true" {
            p.insert("sslmode".into(), "require".into());
        } else {
            p.insert(k, v);
        }
    }
    Ok(p)
}

/// Quotes a value for a keyword/value string.
pub fn quote(v: &str) -> String {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Writes parameters back as a keyword/value string.
pub fn to_kv(p: &Params) -> String {
    p.iter()
        .map(|(k, v)| format!("{k}={}", quote(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The service file entries of `name`: the user's file (PGSERVICEFILE, else
/// ~/.pg_service.conf), else the system one (PGSYSCONFDIR/pg_service.conf,
/// else Debian's /etc/postgresql-common/pg_service.conf), as libpq looks.
fn service(name: &str, env: &Env) -> Result<Params, String> {
    let user_file = (env.var)("PGSERVICEFILE")
        .map(PathBuf::from)
        .or_else(|| env.home.as_ref().map(|h| h.join(".pg_service.conf")));
    let sys_file = match (env.var)("PGSYSCONFDIR") {
        Some(d) => Path::new(&d).join("pg_service.conf"),
        None => PathBuf::from("/etc/postgresql-common/pg_service.conf"),
    };
    let mut tried = Vec::new();
    for f in user_file.into_iter().chain([sys_file]) {
        match std::fs::read_to_string(&f) {
            Ok(text) => {
                if let Some(p) = service_in(&text, name, &f)? {
                    return Ok(p);
                }
                tried.push(f.display().to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tried.push(format!("{} (absent)", f.display()))
            }
            Err(e) => return Err(format!("cannot read service file {}: {e}", f.display())),
        }
    }
    Err(format!(
        "definition of service \"{name}\" not found (looked in {})",
        tried.join(", ")
    ))
}

fn service_in(text: &str, name: &str, file: &Path) -> Result<Option<Params>, String> {
    let mut found: Option<Params> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(sec) = line.strip_prefix('[') {
            if found.is_some() {
                break;
            }
            if sec.strip_suffix(']').map(str::trim) == Some(name) {
                found = Some(Params::new());
            }
            continue;
        }
        if let Some(p) = found.as_mut() {
            let (k, v) = line.split_once('=').ok_or_else(|| {
                format!(
                    "syntax error in service file {}, line {}",
                    file.display(),
                    n + 1
                )
            })?;
            let k = k.trim();
            if k == "service" {
                return Err(format!(
                    "nested service specifications not supported in service file {}, line {}",
                    file.display(),
                    n + 1
                ));
            }
            check_keyword(k).map_err(|e| format!("{e} in service file {}", file.display()))?;
            p.insert(k.to_string(), v.trim().to_string());
        }
    }
    Ok(found)
}

/// Debian's socket directory first, then the upstream default.
pub const SOCKET_DIRS: &[&str] = &["/var/run/postgresql", "/tmp"];

/// The string completed as libpq completes it: service entries, then PG*
/// variables, then defaults for port, host (local socket), user and dbname.
/// A value given empty counts as not given, as in libpq.
pub fn resolve(s: &str, env: &Env) -> Result<Params, String> {
    let mut p = parse(s)?;
    p.retain(|_, v| !v.is_empty());
    let svc = p
        .get("service")
        .cloned()
        .or_else(|| (env.var)("PGSERVICE").filter(|v| !v.is_empty()));
    if let Some(name) = svc {
        for (k, v) in service(&name, env)? {
            p.entry(k).or_insert(v);
        }
    }
    for (k, var) in KEYWORDS {
        if let Some(var) = var
            && !p.contains_key(*k)
            && let Some(v) = (env.var)(var).filter(|v| !v.is_empty())
        {
            check_value(k, &v).map_err(|e| format!("{e} (from {var})"))?;
            p.insert(k.to_string(), v);
        }
    }
    let port = p
        .entry("port".into())
        .or_insert_with(|| "5432".into())
        .clone();
    if !p.contains_key("host") && !p.contains_key("hostaddr") {
        let first_port = port.split(',').next().unwrap_or("5432").to_string();
        let dir = SOCKET_DIRS
            .iter()
            .find(|d| Path::new(d).join(format!(".s.PGSQL.{first_port}")).exists())
            .or_else(|| SOCKET_DIRS.iter().find(|d| Path::new(d).is_dir()))
            .unwrap_or(&"/tmp");
        p.insert("host".into(), dir.to_string());
    }
    if !p.contains_key("user") {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .ok_or("no user= given and the OS user name cannot be found")?;
        p.insert("user".into(), me);
    }
    if !p.contains_key("dbname") {
        let u = p["user"].clone();
        p.insert("dbname".into(), u);
    }
    for (k, v) in &p {
        check_value(k, v)?;
    }
    Ok(p)
}

/// Values with a fixed set of choices, checked early so the error names them.
fn check_value(k: &str, v: &str) -> Result<(), String> {
    let allowed: &[&str] = match k {
        "sslmode" => &[
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ],
        "target_session_attrs" => &["any", "read-write", "read-only"],
        "channel_binding" => &["disable", "prefer", "require"],
        "gssencmode" => &["disable", "prefer"],
        "load_balance_hosts" => &["disable", "random"],
        "keepalives" | "sslsni" | "requiressl" => &["0", "1"],
        _ => return Ok(()),
    };
    if allowed.contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "invalid {k} value: \"{v}\" (one of: {})",
            allowed.join(", ")
        ))
    }
}

#[cfg(test)]
#[path = "connstr_tests.rs"]
mod tests;
