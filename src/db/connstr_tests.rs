//! The parser against libpq's documented examples and edge cases.

use super::*;
use std::collections::HashMap;

fn kv(s: &str) -> Vec<(String, String)> {
    parse(s).unwrap().into_iter().collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = v
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    v.sort();
    v
}

#[test]
fn keyword_value_quoting() {
    assert_eq!(
        kv("host=h port = 5433  dbname='my db' user=it\\'s password='a\\'b\\\\c'"),
        pairs(&[
            ("host", "h"),
            ("port", "5433"),
            ("dbname", "my db"),
            ("user", "it's"),
            ("password", "a'b\\c")
        ])
    );
    assert_eq!(kv("dbname=''"), pairs(&[("dbname", "")]));
    assert_eq!(kv("dbname=a dbname=b"), pairs(&[("dbname", "b")]));
    assert!(parse("dbname='open").unwrap_err().contains("unterminated"));
    assert!(parse("dbname").unwrap_err().contains("missing \"=\""));
    assert_eq!(
        parse("dbnme=x").unwrap_err(),
        "invalid connection option \"dbnme\""
    );
    assert!(
        parse("sslpassword=x")
            .unwrap_err()
            .contains("not supported")
    );
}

#[test]
fn uris() {
    assert_eq!(
        kv(
            "postgresql://al%40ce:p%3Aw@db.example.com:5433/my%20db?sslmode=verify-full&application_name=x"
        ),
        pairs(&[
            ("user", "al@ce"),
            ("password", "p:w"),
            ("host", "db.example.com"),
            ("port", "5433"),
            ("dbname", "my db"),
            ("sslmode", "verify-full"),
            ("application_name", "x")
        ])
    );
    assert_eq!(
        kv("postgres://a:1,b,[::1]:3/d?target_session_attrs=read-write"),
        pairs(&[
            ("host", "a,b,::1"),
            ("port", "1,,3"),
            ("dbname", "d"),
            ("target_session_attrs", "read-write")
        ])
    );
    assert_eq!(kv("postgresql://"), vec![]);
    assert_eq!(
        kv("postgresql:///app?host=%2Fvar%2Frun%2Fpostgresql"),
        pairs(&[("dbname", "app"), ("host", "/var/run/postgresql")])
    );
    assert_eq!(
        kv("postgresql://h?ssl=true"),
        pairs(&[("host", "h"), ("sslmode", "require")])
    );
    assert!(
        parse("postgresql://h/d?bogus=1")
            .unwrap_err()
            .contains("\"bogus\"")
    );
    assert!(parse("postgresql://h/%zz").unwrap_err().contains("percent"));
}

#[test]
fn round_trip_through_kv() {
    let p = parse("postgresql://u:p%20w@h/d%27b").unwrap();
    assert_eq!(parse(&to_kv(&p)).unwrap(), p);
}

fn env_of(
    vars: &[(&str, &str)],
    home: Option<&Path>,
) -> (HashMap<String, String>, Option<PathBuf>) {
    (
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        home.map(Path::to_path_buf),
    )
}

#[test]
fn environment_and_defaults() {
    let (vars, home) = env_of(
        &[
            ("PGHOST", "envhost"),
            ("PGPORT", "6543"),
            ("PGUSER", "envuser"),
            ("PGSSLMODE", "require"),
            ("PGAPPNAME", ""),
        ],
        None,
    );
    let get = |k: &str| vars.get(k).cloned();
    let env = Env { var: &get, home };
    let p = resolve("dbname=app host=''", &env).unwrap();
    // An empty value counts as not given, so PGHOST fills it.
    assert_eq!(p["host"], "envhost");
    assert_eq!(p["port"], "6543");
    assert_eq!(p["user"], "envuser");
    assert_eq!(p["sslmode"], "require");
    assert_eq!(p["dbname"], "app");
    assert!(!p.contains_key("application_name"));
    // The string wins over the environment; dbname defaults to the user.
    let p = resolve("user=u sslmode=disable", &env).unwrap();
    assert_eq!((p["user"].as_str(), p["dbname"].as_str()), ("u", "u"));
    assert_eq!(p["sslmode"], "disable");

    let none = |_: &str| None;
    let env = Env {
        var: &none,
        home: None,
    };
    let p = resolve("dbname=x", &env).unwrap();
    assert!(SOCKET_DIRS.contains(&p["host"].as_str()), "{p:?}");
    assert_eq!(p["port"], "5432");
    assert!(
        resolve("sslmode=verify", &env)
            .unwrap_err()
            .contains("verify-full")
    );
}

#[test]
fn service_files() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join(".pg_service.conf"),
        "# mine\n[other]\nhost=nothere\n\n[app]\nhost = svchost\nport=7000\ndbname=svcdb\n",
    )
    .unwrap();
    let sys = d.path().join("etc");
    std::fs::create_dir(&sys).unwrap();
    std::fs::write(sys.join("pg_service.conf"), "[sys]\nhost=syshost\n").unwrap();
    let vars: HashMap<String, String> =
        [("PGSYSCONFDIR".to_string(), sys.display().to_string())].into();
    let get = |k: &str| vars.get(k).cloned();
    let env = Env {
        var: &get,
        home: Some(d.path().to_path_buf()),
    };
    let p = resolve("service=app dbname=mine user=u", &env).unwrap();
    assert_eq!(p["host"], "svchost");
    assert_eq!(p["port"], "7000");
    // The string wins over the service.
    assert_eq!(p["dbname"], "mine");
    assert_eq!(
        resolve("service=sys user=u", &env).unwrap()["host"],
        "syshost"
    );
    let e = resolve("service=nope user=u", &env).unwrap_err();
    assert!(
        e.contains("\"nope\" not found") && e.contains(".pg_service.conf"),
        "{e}"
    );
}
