//! Database connections: connect with a message that names the server (never the
//! password) and says what to do, and the session settings every role needs.

use crate::error::{Context, Error, Result, pg_message};
use postgres::{Client, NoTls};

/// A connection string with any password removed, safe for logs and errors.
pub fn redact(connstr: &str) -> String {
    let mut out = Vec::new();
    for part in split_connstr(connstr) {
        let key = part.split('=').next().unwrap_or("").trim().to_lowercase();
        if key == "password" {
            out.push("password=***".to_string());
        } else {
            out.push(part);
        }
    }
    let s = out.join(" ");
    // URI form: postgres://user:secret@host/db
    if let Some(scheme_end) = s.find("://")
        && let Some(at) = s[scheme_end + 3..].find('@')
    {
        let cred = &s[scheme_end + 3..scheme_end + 3 + at];
        if let Some(colon) = cred.find(':') {
            return format!(
                "{}{}:***{}",
                &s[..scheme_end + 3],
                &cred[..colon],
                &s[scheme_end + 3 + at..]
            );
        }
    }
    s
}

/// Splits `key=value key='quoted value'` into its items, quotes kept.
fn split_connstr(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut in_quote = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_quote => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '\'' => {
                in_quote = !in_quote;
                cur.push(c);
            }
            c if c.is_whitespace() && !in_quote => {
                if !cur.is_empty() {
                    items.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        items.push(cur);
    }
    items
}

/// `host:port/dbname` of a connection string, for short messages.
pub fn describe(connstr: &str) -> String {
    let mut host = String::from("localhost");
    let mut port = String::from("5432");
    let mut db = String::new();
    for part in split_connstr(connstr) {
        if let Some((k, v)) = part.split_once('=') {
            let v = v.trim_matches('\'').to_string();
            match k.trim() {
                "host" | "hostaddr" => host = v,
                "port" => port = v,
                "dbname" => db = v,
                _ => {}
            }
        }
    }
    format!("{host}:{port}/{db}")
}

/// Appends extra connection parameters (remote_extra_connstr).
pub fn with_extra(connstr: &str, extra: &str) -> String {
    if extra.trim().is_empty() {
        connstr.to_string()
    } else {
        format!("{connstr} {extra}")
    }
}

/// Connects and prepares the session: ISO dates and fixed formats, so values that
/// travel as text (events, copies) read back exactly.
pub fn connect(connstr: &str, app: &str) -> Result<Client> {
    let mut cfg: postgres::Config = connstr.parse().map_err(|e: postgres::Error| {
        Error::Config(format!(
            "bad connection string \"{}\": {}",
            redact(connstr),
            pg_message(&e)
        ))
    })?;
    if cfg.get_application_name().is_none() {
        cfg.application_name(app);
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(std::time::Duration::from_secs(10));
    }
    let mut client = cfg.connect(NoTls).map_err(|e| {
        let msg = pg_message(&e);
        let hint =
            if msg.contains("refused") || msg.contains("timed out") || msg.contains("No such file")
            {
                "; is the server running and accepting TCP connections there?"
            } else if msg.contains("password") {
                "; check the user and password (or .pgpass)"
            } else if msg.contains("does not exist") {
                "; create it first, or fix dbname="
            } else {
                ""
            };
        Error::Unavailable(format!(
            "cannot connect to \"{}\": {}{}",
            redact(connstr),
            msg,
            hint
        ))
    })?;
    client
        .batch_execute(
            "SET datestyle = 'ISO, YMD'; SET intervalstyle = 'postgres'; SET timezone = 'UTC'; \
             SET extra_float_digits = 3; SET bytea_output = 'hex'; SET lc_monetary = 'C'; \
             SET client_encoding = 'UTF8'",
        )
        .ctx(|| format!("cannot set up session on {}", describe(connstr)))?;
    Ok(client)
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
        assert_eq!(describe("host=h port=5 dbname=x"), "h:5/x");
    }
}
