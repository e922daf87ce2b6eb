//! The password file (`~/.pgpass`, `PGPASSFILE`, `passfile=`) with libpq's
//! rules: `host:port:database:user:password` lines, `*` matching anything,
//! `\:` and `\\` escapes, the first matching line wins, and a file that group
//! or others may read is ignored with a warning.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

/// What the lookup found, for the password-failed message.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// A line matched: its password is used.
    Found(String),
    /// The file was read, no line matched.
    NoMatch,
    /// No file there.
    Absent,
    /// The file was ignored (permissions, not a file, unreadable): why.
    Ignored(String),
}

/// Splits one line into its five fields, or `None` for comments and lines
/// with fewer fields. Escapes are resolved; `*` is kept as `Some("*")` only
/// when written bare (an escaped `\*` is a literal star).
fn fields(line: &str) -> Option<Vec<(String, bool)>> {
    if line.starts_with('#') {
        return None;
    }
    let mut out = Vec::new();
    let (mut cur, mut escaped_any) = (String::new(), false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    escaped_any = true;
                }
            }
            // As in libpq, the password too ends at an unescaped colon.
            ':' => {
                out.push((std::mem::take(&mut cur), escaped_any));
                escaped_any = false;
            }
            _ => cur.push(c),
        }
    }
    out.push((cur, escaped_any));
    (out.len() >= 5).then_some(out)
}

/// The password of the first line matching host, port, database and user.
pub fn find(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    let want = [host, port, db, user];
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        let Some(f) = fields(line) else { continue };
        let ok = f
            .iter()
            .zip(want)
            .all(|((v, esc), w)| (v == "*" && !esc) || v == w);
        if ok {
            return Some(f[4].0.clone());
        }
    }
    None
}

/// The file libpq would read: `passfile=`/PGPASSFILE, else ~/.pgpass.
pub fn path(passfile: Option<&str>, home: Option<&Path>) -> Option<PathBuf> {
    passfile
        .map(PathBuf::from)
        .or_else(|| home.map(|h| h.join(".pgpass")))
}

/// Looks the password up in `file`, warning once per file (per process) when
/// the file is ignored, as libpq warns on each connection.
pub fn lookup(file: &Path, host: &str, port: &str, db: &str, user: &str) -> Lookup {
    let meta = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Absent,
        Err(e) => return ignored(file, format!("cannot be read: {e}")),
    };
    if !meta.is_file() {
        return ignored(file, "is not a plain file".into());
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return ignored(
            file,
            format!(
                "has group or world access (mode {:04o}, owner uid {}); permissions should be u=rw (0600) or less: chmod 600 {}",
                meta.permissions().mode() & 0o7777,
                meta.uid(),
                file.display()
            ),
        );
    }
    match std::fs::read_to_string(file) {
        Ok(text) => match find(&text, host, port, db, user) {
            Some(pw) => Lookup::Found(pw),
            None => Lookup::NoMatch,
        },
        Err(e) => ignored(file, format!("cannot be read: {e}")),
    }
}

fn ignored(file: &Path, why: String) -> Lookup {
    static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let mut w = WARNED.lock();
    if w.get_or_insert_with(HashSet::new)
        .insert(file.to_path_buf())
    {
        log::warn!("password file \"{}\" ignored: it {why}", file.display());
    }
    Lookup::Ignored(format!("password file \"{}\" {why}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_rules() {
        let f = "# comment\n\
                 db1.example.com:5432:app:alice:first\n\
                 *:5432:app:alice:second\n\
                 localhost:*:*:bob:pw\\:with\\\\colon:and:more\n\
                 h\\:x:1:d:u:escaped-host\n\
                 \\*:1:d:u:literal-star\n\
                 short:line\n";
        assert_eq!(
            find(f, "db1.example.com", "5432", "app", "alice").as_deref(),
            Some("first")
        );
        assert_eq!(
            find(f, "other", "5432", "app", "alice").as_deref(),
            Some("second")
        );
        assert_eq!(find(f, "other", "5433", "app", "alice"), None);
        // Escapes in the password are resolved; a bare colon ends it.
        assert_eq!(
            find(f, "localhost", "6000", "x", "bob").as_deref(),
            Some("pw:with\\colon")
        );
        assert_eq!(
            find(f, "h:x", "1", "d", "u").as_deref(),
            Some("escaped-host")
        );
        assert_eq!(find(f, "*", "1", "d", "u").as_deref(), Some("literal-star"));
        assert_eq!(find(f, "zzz", "1", "d", "u"), None);
        assert_eq!(
            find("a:b:c:d:e\r\n", "a", "b", "c", "d").as_deref(),
            Some("e")
        );
    }

    #[test]
    fn permissions_and_absence() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pgpass");
        assert_eq!(lookup(&p, "h", "1", "d", "u"), Lookup::Absent);
        std::fs::write(&p, "h:1:d:u:secret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        match lookup(&p, "h", "1", "d", "u") {
            Lookup::Ignored(why) => assert!(why.contains("group or world access"), "{why}"),
            other => panic!("0644 file used: {other:?}"),
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            lookup(&p, "h", "1", "d", "u"),
            Lookup::Found("secret".into())
        );
        assert_eq!(lookup(&p, "h", "2", "d", "u"), Lookup::NoMatch);
    }
}
