//! Database connections: every connection the tool makes goes through
//! `connect`, which reads the connection string as libpq does (`connstr`:
//! keyword/value or URI, services, PG* variables, the local socket), finds the
//! password (`pgpass`), sets up TLS with libpq's sslmode rules (`tls`), tries
//! each listed host in turn, and on failure says which server, why, and what
//! to do (never showing the password). It then sets the session settings
//! every role needs.

pub mod connstr;
mod pgpass;
mod tls;

use std::net::IpAddr;
use std::time::Duration;

use crate::error::{Context, Error, Result, pg_message};
use connstr::Params;
use postgres::config::{ChannelBinding, SslMode, TargetSessionAttrs};
use postgres::{Client, NoTls};

/// Keepalive defaults: a peer that died (or a load balancer that dropped the
/// flow) is noticed after IDLE + COUNT * INTERVAL = 60 s of silence, where the
/// kernel default would wait over two hours.
const KEEPALIVES_IDLE: u64 = 30;
const KEEPALIVES_INTERVAL: u64 = 10;
const KEEPALIVES_COUNT: u32 = 3;

/// A connection string with any password removed, safe for logs and errors:
/// `password=` values (quoted or not), the password of a URI's user info and
/// a `password` URI parameter.
pub fn redact(connstr: &str) -> String {
    if connstr::is_uri(connstr) {
        return redact_uri(connstr);
    }
    match connstr::lex_kv(connstr) {
        Ok(items) => {
            let mut out = connstr.to_string();
            for it in items.iter().rev() {
                if it.key == "password" {
                    out.replace_range(it.span.clone(), "***");
                }
            }
            out
        }
        // Malformed: keep what precedes any password, drop the rest.
        Err(_) => match connstr.find("password") {
            Some(i) => format!("{}password=***", &connstr[..i]),
            None => connstr.to_string(),
        },
    }
}

fn redact_uri(s: &str) -> String {
    let start = s.find("://").map_or(0, |i| i + 3);
    let auth_end = s[start..].find(['/', '?']).map_or(s.len(), |i| start + i);
    let mut out = s[..start].to_string();
    let authority = &s[start..auth_end];
    match authority.rsplit_once('@') {
        Some((cred, host)) => {
            match cred.split_once(':') {
                Some((u, _)) => out.push_str(&format!("{u}:***@{host}")),
                None => out.push_str(authority),
            };
        }
        None => out.push_str(authority),
    }
    let rest = &s[auth_end..];
    match rest.split_once('?') {
        Some((path, q)) => {
            out.push_str(path);
            out.push('?');
            let parts: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some(("password", _)) => "password=***".to_string(),
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(&parts.join("&"));
        }
        None => out.push_str(rest),
    }
    out
}

/// `host:port/dbname` of a connection string, for short messages (a service
/// name stands in for the host when none is written).
pub fn describe(connstr: &str) -> String {
    let Ok(p) = connstr::parse(connstr) else {
        return redact(connstr);
    };
    let host = p
        .get("host")
        .or(p.get("hostaddr"))
        .cloned()
        .or_else(|| p.get("service").map(|s| format!("service={s}")))
        .unwrap_or_else(|| "localhost".into());
    let port = p.get("port").map_or("5432", |s| s);
    let db = p.get("dbname").map_or("", |s| s);
    format!("{host}:{port}/{db}")
}

/// Does the string name a database itself (`dbname=`, or a URI's path)?
pub fn names_database(connstr: &str) -> bool {
    connstr::parse(connstr).is_ok_and(|p| p.contains_key("dbname"))
}

/// Does the string say where the server is (host, hostaddr or a service)?
pub fn names_host(connstr: &str) -> bool {
    connstr::parse(connstr).is_ok_and(|p| {
        ["host", "hostaddr", "service"]
            .iter()
            .any(|k| p.get(*k).is_some_and(|v| !v.is_empty()))
    })
}

/// Does the string carry a password itself (not from .pgpass)?
pub fn has_password(connstr: &str) -> bool {
    connstr::parse(connstr).is_ok_and(|p| p.contains_key("password"))
}

/// Appends extra connection parameters (remote_extra_connstr); they win over
/// the string's own. A URI is rewritten as keyword/value first.
pub fn with_extra(connstr: &str, extra: &str) -> String {
    if extra.trim().is_empty() {
        connstr.to_string()
    } else {
        format!("{} {extra}", as_kv(connstr))
    }
}

/// The string with `dbname` set (the ticker's base_connstr per database).
pub fn with_dbname(connstr: &str, dbname: &str) -> String {
    format!("{} dbname={}", as_kv(connstr), connstr::quote(dbname))
}

fn as_kv(connstr: &str) -> String {
    match connstr::is_uri(connstr).then(|| connstr::parse(connstr)) {
        Some(Ok(p)) => connstr::to_kv(&p),
        _ => connstr.to_string(),
    }
}

/// One host to try: a name or socket directory, an address, a port.
struct Target {
    host: Option<String>,
    hostaddr: Option<IpAddr>,
    port: u16,
}

impl Target {
    fn unix(&self) -> bool {
        self.hostaddr.is_none() && self.host.as_deref().is_some_and(|h| h.starts_with('/'))
    }

    fn show(&self) -> String {
        match (&self.host, &self.hostaddr) {
            (Some(h), _) if h.starts_with('/') => format!("socket {h}/.s.PGSQL.{}", self.port),
            (Some(h), Some(a)) => format!("{h} ({a}) port {}", self.port),
            (Some(h), None) => format!("{h} port {}", self.port),
            (None, Some(a)) => format!("{a} port {}", self.port),
            (None, None) => format!("port {}", self.port),
        }
    }
}

fn list(p: &Params, k: &str) -> Vec<String> {
    p.get(k)
        .map(|v| v.split(',').map(|x| x.trim().to_string()).collect())
        .unwrap_or_default()
}

fn targets(p: &Params) -> std::result::Result<Vec<Target>, String> {
    let (hosts, addrs, ports) = (list(p, "host"), list(p, "hostaddr"), list(p, "port"));
    let n = hosts.len().max(addrs.len());
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(format!(
            "could not match {} host names to {} hostaddr values",
            hosts.len(),
            addrs.len()
        ));
    }
    if ports.len() != 1 && ports.len() != n {
        return Err(format!(
            "could not match {} port numbers to {n} hosts",
            ports.len()
        ));
    }
    (0..n)
        .map(|i| {
            let ps = if ports.len() == 1 {
                &ports[0]
            } else {
                &ports[i]
            };
            let port = if ps.is_empty() { "5432" } else { ps };
            Ok(Target {
                host: hosts.get(i).filter(|h| !h.is_empty()).cloned(),
                hostaddr: match addrs.get(i).filter(|a| !a.is_empty()) {
                    Some(a) => Some(
                        a.parse()
                            .map_err(|_| format!("could not parse network address \"{a}\""))?,
                    ),
                    None => None,
                },
                port: port
                    .parse()
                    .map_err(|_| format!("invalid port number: \"{port}\""))?,
            })
        })
        .collect()
}

fn secs(p: &Params, k: &str) -> std::result::Result<Option<u64>, String> {
    p.get(k)
        .map(|v| {
            v.trim()
                .parse::<i64>()
                .map(|n| n.max(0) as u64)
                .map_err(|_| format!("invalid integer value \"{v}\" for connection option \"{k}\""))
        })
        .transpose()
}

/// Where the password of one attempt came from, for the password message.
enum PwSource {
    Given,
    Pgpass(String),
    None(String),
}

/// Connects and prepares the session: ISO dates and fixed formats, so values that
/// travel as text (events, copies) read back exactly. The application name is
/// `app` unless the string (or PGAPPNAME) sets one.
pub fn connect(connstr: &str, app: &str) -> Result<Client> {
    let env = connstr::Env::process();
    let bad = |e: String| {
        Error::Config(format!(
            "bad connection string \"{}\": {e}",
            redact(connstr)
        ))
    };
    let p = connstr::resolve(connstr, &env).map_err(bad)?;
    let tls = tls::setup(&p, env.home.as_deref())
        .map_err(|e| Error::Config(format!("cannot use TLS for \"{}\": {e}", redact(connstr))))?;
    let mut errors = Vec::new();
    for t in targets(&p).map_err(bad)? {
        match connect_one(&p, &t, &tls, app, &env) {
            Ok(mut client) => {
                client
                    .batch_execute(
                        "SET datestyle = 'ISO, YMD'; SET intervalstyle = 'postgres'; SET timezone = 'UTC'; \
                         SET extra_float_digits = 3; SET bytea_output = 'hex'; SET lc_monetary = 'C'; \
                         SET client_encoding = 'UTF8'",
                    )
                    .ctx(|| format!("cannot set up session on {}", describe(connstr)))?;
                return Ok(client);
            }
            Err(e) if errors.is_empty() && p.get("host").is_none_or(|h| !h.contains(',')) => {
                errors.push(e)
            }
            Err(e) => errors.push(format!("{}: {e}", t.show())),
        }
    }
    Err(Error::Unavailable(format!(
        "cannot connect to \"{}\": {}",
        redact(connstr),
        errors.join("; ")
    )))
}

fn connect_one(
    p: &Params,
    t: &Target,
    tls: &tls::Tls,
    app: &str,
    env: &connstr::Env,
) -> std::result::Result<Client, String> {
    let mut cfg = postgres::Config::new();
    match (&t.host, t.hostaddr) {
        (Some(h), _) if t.unix() => {
            cfg.host_path(h);
        }
        (Some(h), a) => {
            cfg.host(h);
            if let Some(a) = a {
                cfg.hostaddr(a);
            }
        }
        (None, Some(a)) => {
            if tls.mode == tls::Mode::VerifyFull {
                return Err("host name must be specified for a verified SSL connection (sslmode=verify-full with hostaddr= needs host= too)".into());
            }
            // The crate wants a name for TLS; libpq uses the address.
            cfg.host(&a.to_string()).hostaddr(a);
        }
        (None, None) => return Err("no host".into()),
    }
    cfg.port(t.port);
    let user = p.get("user").map_or("", |s| s);
    let dbname = p.get("dbname").map_or("", |s| s);
    cfg.user(user).dbname(dbname);
    if let Some(o) = p.get("options") {
        cfg.options(o);
    }
    let appname = p
        .get("application_name")
        .or(p.get("fallback_application_name"))
        .map_or(app, |s| s);
    cfg.application_name(appname);
    // libpq: 0 waits forever, 1 counts as 2; ours defaults to 10 s.
    match secs(p, "connect_timeout")? {
        Some(0) => {}
        Some(n) => {
            cfg.connect_timeout(Duration::from_secs(n.max(2)));
        }
        None => {
            cfg.connect_timeout(Duration::from_secs(10));
        }
    }
    cfg.keepalives(p.get("keepalives").map(String::as_str) != Some("0"));
    cfg.keepalives_idle(Duration::from_secs(
        secs(p, "keepalives_idle")?
            .unwrap_or(KEEPALIVES_IDLE)
            .max(1),
    ));
    cfg.keepalives_interval(Duration::from_secs(
        secs(p, "keepalives_interval")?
            .unwrap_or(KEEPALIVES_INTERVAL)
            .max(1),
    ));
    cfg.keepalives_retries(
        secs(p, "keepalives_count")?.map_or(KEEPALIVES_COUNT, |n| n.clamp(1, 127) as u32),
    );
    if let Some(ms) = secs(p, "tcp_user_timeout")?.filter(|n| *n > 0) {
        cfg.tcp_user_timeout(Duration::from_millis(ms));
    }
    match p.get("target_session_attrs").map(String::as_str) {
        Some("read-write") => {
            cfg.target_session_attrs(TargetSessionAttrs::ReadWrite);
        }
        Some("read-only") => {
            cfg.target_session_attrs(TargetSessionAttrs::ReadOnly);
        }
        _ => {}
    }
    match p.get("channel_binding").map(String::as_str) {
        Some("disable") => {
            cfg.channel_binding(ChannelBinding::Disable);
        }
        Some("require") => {
            cfg.channel_binding(ChannelBinding::Require);
        }
        _ => {}
    }
    let src = match p.get("password") {
        Some(pw) => {
            cfg.password(pw);
            PwSource::Given
        }
        None => password_from_file(p, t, env, &mut cfg),
    };
    *tls.failure.lock() = None;
    let mode = if t.unix() {
        // libpq never asks for TLS on a Unix socket.
        SslMode::Disable
    } else {
        match tls.mode {
            tls::Mode::Disable | tls::Mode::Allow => SslMode::Disable,
            tls::Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        }
    };
    let attempt = |cfg: &mut postgres::Config, mode: SslMode| {
        cfg.ssl_mode(mode);
        match (&tls.connector, mode) {
            (Some(c), m) if m != SslMode::Disable => cfg.connect(c.clone()),
            _ => cfg.connect(NoTls),
        }
    };
    let mut res = attempt(&mut cfg, mode);
    // sslmode=allow: plain first, TLS when the server turns plain away.
    if tls.mode == tls::Mode::Allow
        && !t.unix()
        && let Err(e) = &res
        && e.code() == Some(&postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    {
        res = attempt(&mut cfg, SslMode::Require);
    }
    res.map_err(|e| explain(&e, mode, tls, t, user, &src))
}

fn password_from_file(
    p: &Params,
    t: &Target,
    env: &connstr::Env,
    cfg: &mut postgres::Config,
) -> PwSource {
    let Some(file) = pgpass::path(p.get("passfile").map(String::as_str), env.home.as_deref())
    else {
        return PwSource::None("no home directory for ~/.pgpass".into());
    };
    // libpq matches a socket in the default directory as "localhost".
    let host = match (&t.host, t.hostaddr) {
        (Some(h), _) if connstr::SOCKET_DIRS.contains(&h.as_str()) => "localhost".to_string(),
        (Some(h), _) => h.clone(),
        (None, Some(a)) => a.to_string(),
        (None, None) => "localhost".to_string(),
    };
    let (port, db, user) = (
        t.port.to_string(),
        p.get("dbname").map_or("", |s| s),
        p.get("user").map_or("", |s| s),
    );
    let key = format!("{host}:{port}:{db}:{user}");
    match pgpass::lookup(&file, &host, &port, db, user) {
        pgpass::Lookup::Found(pw) => {
            cfg.password(pw);
            PwSource::Pgpass(format!(
                "the password came from the line for {key} in password file \"{}\"",
                file.display()
            ))
        }
        pgpass::Lookup::NoMatch => PwSource::None(format!(
            "password file \"{}\" has no line for {key}",
            file.display()
        )),
        pgpass::Lookup::Absent => PwSource::None(format!(
            "no password file \"{}\" (PGPASSFILE or ~/.pgpass)",
            file.display()
        )),
        pgpass::Lookup::Ignored(why) => PwSource::None(format!("{why}, so it was not read")),
    }
}

/// The reason one attempt failed and what to do about it.
fn explain(
    e: &postgres::Error,
    mode: SslMode,
    tls: &tls::Tls,
    t: &Target,
    user: &str,
    src: &PwSource,
) -> String {
    if let Some(why) = tls.failure.lock().take() {
        let what = if why.contains("not trusted") {
            format!(
                "; sslrootcert={} does not hold the CA that signed it: set sslrootcert= to that CA's certificate file (a cloud provider publishes its CA bundle)",
                tls.rootcert.as_deref().unwrap_or("")
            )
        } else {
            String::new()
        };
        return format!("{why}{what}");
    }
    let msg = pg_message(e);
    let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
    let pw_note = || match src {
        PwSource::Given => {
            "the password was given in the connection string or PGPASSWORD".to_string()
        }
        PwSource::Pgpass(s) | PwSource::None(s) => s.clone(),
    };
    if msg.contains("no encryption") && mode == SslMode::Disable {
        format!(
            "{msg}; the server accepts only TLS connections here: set sslmode=require (or verify-full with sslrootcert=)"
        )
    } else if msg.contains("server does not support TLS") {
        format!(
            "{msg}: sslmode={} needs TLS but the server has ssl = off; enable ssl on the server, or use sslmode=prefer",
            match tls.mode {
                tls::Mode::VerifyCa => "verify-ca",
                tls::Mode::VerifyFull => "verify-full",
                _ => "require",
            }
        )
    } else if code == "28P01" {
        format!("{msg}; check the user and password: {}", pw_note())
    } else if msg.contains("password missing") {
        format!(
            "the server asks for a password for user \"{user}\" and none was found ({}); put it in ~/.pgpass (mode 0600) as host:port:database:user:password",
            pw_note()
        )
    } else if msg.contains("does not allow writes") {
        format!(
            "{msg}: read-only (a standby, or default_transaction_read_only = on); target_session_attrs=read-write skips it"
        )
    } else if t.unix() && (msg.contains("No such file") || msg.contains("refused")) {
        format!(
            "{msg} ({}); is the server running with a socket there? Set host= (or PGHOST) and port= (or PGPORT)",
            t.show()
        )
    } else if msg.contains("refused") || msg.contains("timed out") || msg.contains("No such file") {
        format!("{msg}; is the server running and accepting TCP connections there?")
    } else if msg.contains("does not exist") {
        format!("{msg}; create it first, or fix dbname=")
    } else {
        msg
    }
}

/// Does a schema exist in the connected database?
pub fn schema_exists(c: &mut Client, schema: &str) -> Result<bool> {
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .ctx(|| "cannot read pg_namespace".into())?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("host=x password=s3cret dbname=d"),
            "host=x password=*** dbname=d"
        );
        assert_eq!(
            redact("host=x password='a b' dbname=d"),
            "host=x password=*** dbname=d"
        );
        assert_eq!(redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("host=x password = 'it\\'s' user=u"),
            "host=x password = *** user=u"
        );
        assert_eq!(
            redact("postgresql://u:p%40ss@h:5/db?password=two&sslmode=require"),
            "postgresql://u:***@h:5/db?password=***&sslmode=require"
        );
        assert_eq!(
            redact("host=x password='unterminated"),
            "host=x password=***"
        );
        assert_eq!(describe("host=h port=5 dbname=x"), "h:5/x");
        assert_eq!(describe("postgresql://u:pw@h:6/d"), "h:6/d");
        assert_eq!(describe("service=app"), "service=app:5432/");
    }

    #[test]
    fn helpers_work_for_uris() {
        let uri = "postgresql://u@h:6/d?sslmode=require";
        let s = with_dbname("postgresql://u@h:6?sslmode=require", "it's");
        let p = connstr::parse(&s).unwrap();
        assert_eq!((p["dbname"].as_str(), p["host"].as_str()), ("it's", "h"));
        let p = connstr::parse(&with_extra(uri, "connect_timeout=3")).unwrap();
        assert_eq!(
            (p["connect_timeout"].as_str(), p["sslmode"].as_str()),
            ("3", "require")
        );
        assert!(names_database(uri) && !names_database("postgresql://h:6"));
        assert!(!names_database("host=h user=u"));
    }
}
