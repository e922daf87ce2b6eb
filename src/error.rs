//! The one error type. Its `Display` is exactly the line a user reads: what failed,
//! on which object, and what to do next. Connection strings are shown without
//! passwords (see `db::redact`).

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// Bad command line (exit 64).
    Usage(String),
    /// Bad or missing configuration (exit 78).
    Config(String),
    /// A database could not be reached (exit 69).
    Unavailable(String),
    /// A database answered with an error.
    Db(String),
    /// A file or system call failed.
    Io(String),
    /// A requested stop unwinding through the stack (exit 0).
    Stopped,
    /// Anything else the user can act on.
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// sysexits-style exit codes, as the man page states.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 64,
            Error::Config(_) => 78,
            Error::Unavailable(_) => 69,
            Error::Db(_) => 1,
            Error::Io(_) => 74,
            Error::Stopped => 0,
            Error::Other(_) => 1,
        }
    }

    /// Is this worth retrying after a pause (connection lost, server restarting)?
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m)
            | Error::Config(m)
            | Error::Unavailable(m)
            | Error::Db(m)
            | Error::Io(m)
            | Error::Other(m) => f.write_str(m),
            Error::Stopped => f.write_str("stopped"),
        }
    }
}

impl std::error::Error for Error {}

/// Formats a database error with its SQLSTATE detail and hint, which the
/// `postgres` crate's own Display leaves out.
pub fn pg_message(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = db.message().to_string();
        if let Some(d) = db.detail() {
            s.push_str(" (");
            s.push_str(d);
            s.push(')');
        }
        // A COPY's context names the row and column of a bad value
        // (`COPY t, line 3, column v: "Infinity"`).
        if let Some(w) = db.where_()
            && w.starts_with("COPY ")
        {
            s.push_str(" (");
            s.push_str(w.lines().next().unwrap_or(w));
            s.push(')');
        }
        if let Some(h) = db.hint() {
            s.push_str("; hint: ");
            s.push_str(h);
        } else if db.code() == &postgres::error::SqlState::INSUFFICIENT_PRIVILEGE {
            s.push_str(
                "; grant the connecting role this right, or connect as the role that owns these objects",
            );
        }
        return s;
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = inner.source();
    }
    s
}

/// Adds context to database results: `ctx: message`. A closed connection or a
/// server shutting down becomes `Unavailable`, so callers retry instead of failing.
pub trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, postgres::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| {
            let msg = format!("{}: {}", what(), pg_message(&e));
            pg_error(&e, msg)
        })
    }
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Io(format!("{}: {}", what(), e)))
    }
}

/// Errors after which the connection is unusable or the server is going away.
/// `msg` (which already says what failed and the server's message) as the
/// error kind the failure is: Unavailable when the connection is gone, so the
/// worker reconnects, else Db.
pub fn pg_error(e: &postgres::Error, msg: String) -> Error {
    if is_connection_error(e) {
        Error::Unavailable(msg)
    } else {
        Error::Db(msg)
    }
}

pub fn is_connection_error(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(c) => {
            let c = c.code();
            // 08: connection exception; 57P01-03: admin shutdown, crash shutdown,
            // cannot connect now.
            c.starts_with("08") || c == "57P01" || c == "57P02" || c == "57P03"
        }
        None => e.as_db_error().is_none(),
    }
}
