//! Connecting the way libpq does. A cluster that accepts only TLS (hostssl
//! with scram passwords, plain TCP rejected, certificates from a private CA
//! made here) runs the tutorial with the root at verify-full (and a client
//! certificate) and the leaf at require, every connection of the tool seen as
//! TLS in pg_stat_ssl; wrong CA, wrong host name, plain-only client, bad keys
//! and bad password files are refused with messages that say why. Then the
//! non-TLS ways: PG* variables, a service file, URIs, the local socket default
//! and several hosts with target_session_attrs=read-write.

use crate::harness::{Cluster, TestDir, bin_dir, poll_until, unique_name};
use crate::tutorial::{CHANGES, DATA, PidGuard, SCHEMA, TABLES, all_diff, output_text};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PASSWORD: &str = "s3cret:pw";

/// Runs the binary as `name` with HOME set to `cwd` (so no real ~/.pgpass or
/// ~/.postgresql is read), no PG* variables but `env`. Output to temp files,
/// since `-d` daemons keep them open.
fn run_env(name: &str, args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin_dir().join(name));
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") {
            cmd.env_remove(&k);
        }
    }
    let (mut out, mut err) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
    cmd.args(args)
        .current_dir(cwd)
        .env("HOME", cwd)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap());
    let mut child = cmd.spawn().expect("spawn binary");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("{name} {args:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::io::{Read, Seek};
    let slurp = |f: &mut fs::File| {
        let mut v = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    Output {
        status,
        stdout: slurp(&mut out),
        stderr: slurp(&mut err),
    }
}

fn ok_env(name: &str, args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> String {
    let out = run_env(name, args, cwd, env);
    let all = output_text(&out);
    assert!(
        out.status.success(),
        "`{name} {}` failed:\n{all}",
        args.join(" ")
    );
    all
}

fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split(' '))
        .current_dir(dir)
        .output()
        .expect("run openssl (install the openssl package)");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        output_text(&out)
    );
}

/// A private CA, a server certificate for localhost and 127.0.0.1, a client
/// certificate for user postgres, and an unrelated second CA.
fn make_certs(dir: &Path) {
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for ca in ["ca", "otherca"] {
        openssl(
            dir,
            &format!("req -x509 {key} -keyout {ca}.key -out {ca}.crt -days 2 -subj /CN=test-{ca}"),
        );
    }
    fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\n").unwrap();
    for (who, cn) in [("server", "localhost"), ("client", "postgres")] {
        openssl(
            dir,
            &format!("req -new {key} -keyout {who}.key -out {who}.csr -subj /CN={cn}"),
        );
        openssl(
            dir,
            &format!(
                "x509 -req -in {who}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -out {who}.crt -extfile {who}.ext"
            ),
        );
    }
    for f in ["server.key", "client.key"] {
        fs::set_permissions(dir.join(f), fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// A TLS-only cluster: certificates in `dir` (made readable to the server),
/// scram passwords over hostssl, plain TCP rejected, `root_db` only with a
/// client certificate; the harness itself uses the socket.
fn tls_cluster(dir: &Path, root_db: &str) -> Cluster {
    make_certs(dir);
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let server_files = ["server.crt", "server.key", "ca.crt"];
    if nix::unistd::geteuid().is_root() {
        let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        for f in server_files {
            nix::unistd::chown(&dir.join(f), Some(pg.uid), Some(pg.gid)).unwrap();
        }
    }
    let d = dir.display();
    let conf = format!(
        "ssl = on\nssl_cert_file = '{d}/server.crt'\nssl_key_file = '{d}/server.key'\n\
         ssl_ca_file = '{d}/ca.crt'\npassword_encryption = scram-sha-256\n"
    );
    let hba = format!(
        "local all all trust\n\
         hostssl {root_db} all 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n\
         hostssl {root_db} all all reject\n\
         hostssl all all 127.0.0.1/32 scram-sha-256\n\
         hostnossl all all all reject\n"
    );
    let c = Cluster::start_with(&conf, Some(&hba));
    c.psql(
        "postgres",
        &format!("ALTER ROLE postgres PASSWORD '{PASSWORD}'"),
    );
    c
}

/// `.pgpass` in `dir` for the cluster's port, mode 0600; returns its path.
fn pgpass(dir: &Path, port: u16, password: &str, mode: u32) -> String {
    let pw = password.replace('\\', "\\\\").replace(':', "\\:");
    let p = dir.join(".pgpass");
    fs::write(
        &p,
        format!("# test\nlocalhost:{port}:*:postgres:{pw}\n127.0.0.1:{port}:*:postgres:{pw}\n"),
    )
    .unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    p.display().to_string()
}

fn write_job(dir: &Path, ini: &str, db: &str, queue: &str) {
    fs::create_dir_all(dir.join("log")).unwrap();
    fs::create_dir_all(dir.join("pid")).unwrap();
    fs::write(
        dir.join(ini),
        format!(
            "[londiste3]\ndb = {db}\nqueue_name = {queue}\nloop_delay = 0.2\n\
             logfile = log/{ini}.log\npidfile = pid/{ini}.pid\n"
        ),
    )
    .unwrap();
}

/// Seconds until the keepalive timer of the TCP socket from `local` to
/// `remote` on 127.0.0.1 fires, from /proc/net/tcp (timer kind 2, in
/// USER_HZ = 100 ticks); `None` when no keepalive timer is running.
fn keepalive_timer(local: u16, remote: u16) -> Option<f64> {
    let tcp = fs::read_to_string("/proc/net/tcp").ok()?;
    let (l, r) = (format!(":{local:04X}"), format!(":{remote:04X}"));
    tcp.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 5 && f[1].ends_with(&l) && f[2].ends_with(&r) {
            let (kind, when) = f[5].split_once(':')?;
            (kind == "02").then(|| u64::from_str_radix(when, 16).ok().map(|t| t as f64 / 100.0))?
        } else {
            None
        }
    })
}

#[test]
fn tls_tutorial_root_verify_full_leaf_require() {
    let t = TestDir::new();
    let d = t.path();
    let (root, leaf) = (unique_name("tlsroot"), unique_name("tlsleaf"));
    let c = tls_cluster(d, &root);
    let port = c.port();
    c.create_db(&root);
    c.create_db(&leaf);
    c.client(&root)
        .batch_execute(&format!("{SCHEMA}{DATA}"))
        .unwrap();
    c.client(&leaf).batch_execute(SCHEMA).unwrap();
    let passfile = pgpass(d, port, PASSWORD, 0o600);
    let env = [("PGPASSFILE", passfile.as_str())];
    let dd = d.display();
    let full = format!(
        "host=localhost port={port} user=postgres sslmode=verify-full sslrootcert={dd}/ca.crt \
         sslcert={dd}/client.crt sslkey={dd}/client.key"
    );
    let rconn = format!("{full} dbname={root}");
    let lconn = format!("host=127.0.0.1 port={port} user=postgres dbname={leaf} sslmode=require");
    fs::write(
        d.join("ticker.ini"),
        format!(
            "[pgqd]\nbase_connstr = {full}\ndatabase_list = {root}, {leaf}\n\
             logfile = log/ticker.log\npidfile = pid/ticker.pid\n"
        ),
    )
    .unwrap();
    write_job(d, "root.ini", &rconn, &root);
    write_job(d, "leaf.ini", &lconn, &root);
    let _guard = PidGuard(
        ["ticker", "root.ini", "leaf.ini"]
            .iter()
            .map(|n| d.join(format!("pid/{n}.pid")))
            .collect(),
    );

    ok_env("pgqd", &["-d", "ticker.ini"], d, &env);
    ok_env(
        "londiste3",
        &["root.ini", "create-root", "root", &rconn],
        d,
        &env,
    );
    ok_env("londiste3", &["-d", "root.ini", "worker"], d, &env);
    let provider = format!("--provider={rconn}");
    ok_env(
        "londiste3",
        &["leaf.ini", "create-leaf", "leaf", &lconn, &provider],
        d,
        &env,
    );
    ok_env("londiste3", &["-d", "leaf.ini", "worker"], d, &env);
    ok_env("londiste3", &["root.ini", "add-table", "--all"], d, &env);
    ok_env("londiste3", &["leaf.ini", "add-table", "--all"], d, &env);

    let (mut a, mut b) = (c.client(&root), c.client(&leaf));
    let equal = |a: &mut postgres::Client, b: &mut postgres::Client| match all_diff(a, b, TABLES) {
        None => Ok(true),
        Some(diff) => Err(diff),
    };
    poll_until("leaf tables equal to root", Duration::from_secs(30), || {
        equal(&mut a, &mut b)
    });
    a.batch_execute(CHANGES).unwrap();
    poll_until("live changes on the leaf", Duration::from_secs(30), || {
        equal(&mut a, &mut b)
    });

    // Every connection of the tool is TLS: the ticker's to both databases,
    // each worker's to its own (named after the job), the leaf worker's to its
    // provider (the root); those to the root with the client certificate.
    let sql = "select a.datname || ' ' || a.application_name || ' ssl=' || s.ssl || ' dn=' || coalesce(s.client_dn, '') \
         from pg_stat_activity a join pg_stat_ssl s using (pid) \
         where a.application_name like 'londiste-rs%' order by 1";
    let want = [
        format!("{root} londiste-rs ticker ssl=true dn=/CN=postgres"),
        format!("{leaf} londiste-rs ticker ssl=true dn=/CN=postgres"),
        format!("{root} londiste-rs root ssl=true dn=/CN=postgres"),
        format!("{root} londiste-rs worker ssl=true dn=/CN=postgres"),
        format!("{leaf} londiste-rs leaf ssl=true dn="),
    ];
    poll_until(
        "ticker and workers connected over TLS",
        Duration::from_secs(20),
        || {
            let seen = c.psql("postgres", sql);
            let all_tls = seen.lines().all(|l| l.contains("ssl=true"));
            let has_all = want.iter().all(|w| seen.lines().any(|l| l == w));
            if all_tls && has_all {
                Ok(true)
            } else {
                Err(seen)
            }
        },
    );
    // Keepalives are on with a 30 s idle time (the kernel default is 2 h):
    // the root worker's socket shows the keepalive timer at most 30 s away.
    let cport: i32 = c
        .psql(
            "postgres",
            &format!("select client_port from pg_stat_activity where datname = '{root}' and application_name = 'londiste-rs root'"),
        )
        .parse()
        .expect("the root worker's client port");
    poll_until(
        "keepalive timer on the worker's socket",
        Duration::from_secs(10),
        || match keepalive_timer(cport as u16, port) {
            Some(s) if s <= 30.0 => Ok(true),
            other => Err(format!("keepalive timer: {other:?} s")),
        },
    );
    let status = ok_env("londiste3", &["leaf.ini", "status"], d, &env);
    assert!(
        !status.contains(PASSWORD),
        "status shows the password:\n{status}"
    );
    for ini in ["leaf.ini", "root.ini"] {
        ok_env("londiste3", &["-s", ini], d, &env);
    }
    ok_env("pgqd", &["-s", "ticker.ini"], d, &env);
    let logs: String = ["ticker.log", "root.ini.log", "leaf.ini.log"]
        .iter()
        .map(|f| fs::read_to_string(d.join("log").join(f)).unwrap_or_default())
        .collect();
    assert!(!logs.contains("s3cret"), "a log shows the password");
}

#[test]
fn tls_refusals_say_why() {
    let t = TestDir::new();
    let d = t.path();
    let dbn = unique_name("tlsref");
    let c = tls_cluster(d, "no_such_root_db");
    let port = c.port();
    c.create_db(&dbn);
    let dd = d.display();
    let base = format!("port={port} user=postgres dbname={dbn}");
    let passfile = pgpass(d, port, PASSWORD, 0o600);
    let env = [("PGPASSFILE", passfile.as_str())];
    let try_db = |db: &str, env: &[(&str, &str)]| {
        write_job(d, "job.ini", db, "q");
        run_env("londiste3", &["job.ini", "status"], d, env)
    };
    let refused = |db: &str, env: &[(&str, &str)], want: &[&str]| {
        let out = try_db(db, env);
        let text = output_text(&out);
        assert!(!out.status.success(), "{db} should be refused:\n{text}");
        for w in want {
            assert!(text.contains(w), "{db}: expected {w:?} in:\n{text}");
        }
        assert!(!text.contains("s3cret"), "password shown:\n{text}");
        text
    };
    let connected = |db: &str, env: &[(&str, &str)]| {
        let text = output_text(&try_db(db, env));
        // No node yet: status gets as far as reading the node tables.
        assert!(
            !text.contains("cannot connect"),
            "{db} should connect:\n{text}"
        );
    };

    // Accepted: the default sslmode (prefer), allow (plain refused, then
    // TLS), verify-full by address (the IP SAN).
    connected(&format!("host=localhost {base}"), &env);
    connected(&format!("host=127.0.0.1 {base} sslmode=allow"), &env);
    connected(
        &format!("host=127.0.0.1 {base} sslmode=verify-full sslrootcert={dd}/ca.crt"),
        &env,
    );

    refused(
        &format!("host=localhost {base} sslmode=verify-ca sslrootcert={dd}/otherca.crt"),
        &env,
        &["server certificate not trusted", "sslrootcert="],
    );
    refused(
        &format!("host=localhost {base} sslmode=verify-full sslrootcert=system"),
        &env,
        &["server certificate not trusted"],
    );
    refused(
        &format!(
            "host=wrongname hostaddr=127.0.0.1 {base} sslmode=verify-full sslrootcert={dd}/ca.crt"
        ),
        &env,
        &["does not match host name \"wrongname\"", "localhost"],
    );
    refused(
        &format!("host=127.0.0.1 {base} sslmode=disable"),
        &env,
        &["no encryption", "set sslmode=require"],
    );
    refused(
        &format!("host=localhost {base} sslcert={dd}/client.crt sslkey={dd}/missing.key"),
        &env,
        &["private key file", "missing.key"],
    );
    fs::set_permissions(d.join("client.key"), fs::Permissions::from_mode(0o644)).unwrap();
    refused(
        &format!("host=localhost {base} sslcert={dd}/client.crt sslkey={dd}/client.key"),
        &env,
        &["has group or world access", "0600"],
    );
    // A server without TLS (the shared cluster) and sslmode=require.
    let shared = Cluster::shared().port();
    refused(
        &format!("host=127.0.0.1 port={shared} user=postgres dbname=postgres sslmode=require"),
        &env,
        &["server does not support TLS"],
    );

    // Passwords: a wrong one in .pgpass, none found, a file others may read.
    let host = format!("host=localhost {base}");
    let bad = pgpass(d, port, "wrong", 0o600);
    refused(
        &host,
        &[("PGPASSFILE", bad.as_str())],
        &["password authentication failed", "password file", ".pgpass"],
    );
    fs::write(d.join("other.pgpass"), "elsewhere:1:*:*:x\n").unwrap();
    fs::set_permissions(d.join("other.pgpass"), fs::Permissions::from_mode(0o600)).unwrap();
    let other = d.join("other.pgpass").display().to_string();
    refused(
        &host,
        &[("PGPASSFILE", other.as_str())],
        &["none was found", "has no line for localhost"],
    );
    let open = pgpass(d, port, PASSWORD, 0o644);
    let text = refused(&host, &[("PGPASSFILE", open.as_str())], &["none was found"]);
    assert!(
        text.contains("WARN") && text.contains("group or world access"),
        "a 0644 .pgpass must be ignored with a warning:\n{text}"
    );
    // PGPASSWORD works, and ~/.pgpass (HOME is the test dir) once fixed.
    connected(&host, &[("PGPASSWORD", PASSWORD)]);
    pgpass(d, port, PASSWORD, 0o600);
    connected(&host, &[]);
}

/// Creates the root node of queue `q` with `db`, in `dir`, under `env`.
fn create_root(dir: &Path, db: &str, env: &[(&str, &str)]) -> String {
    write_job(dir, "job.ini", db, "q");
    ok_env("londiste3", &["job.ini", "create-root", "r"], dir, env)
}

fn has_node(c: &Cluster, db: &str) -> bool {
    c.psql(
        db,
        "select count(*) from pg_namespace where nspname = 'londiste'",
    ) == "1"
}

#[test]
fn defaults_from_environment_service_file_and_uri() {
    let c = Cluster::shared();
    let port = c.port().to_string();
    let t = TestDir::new();
    let d = t.path();

    let app = unique_name("envapp");
    c.create_db(&app);
    let db = format!("dbname={app}");
    create_root(
        d,
        &db,
        &[
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", &port),
            ("PGUSER", "postgres"),
        ],
    );
    assert!(has_node(c, &app), "create-root from PG* variables");

    let svc = unique_name("svcapp");
    c.create_db(&svc);
    fs::write(
        d.join("services.conf"),
        format!("[other]\nhost=nowhere\n[appsvc]\nhost=127.0.0.1\nport={port}\nuser=postgres\n"),
    )
    .unwrap();
    let file = d.join("services.conf").display().to_string();
    create_root(
        d,
        &format!("dbname={svc}"),
        &[("PGSERVICE", "appsvc"), ("PGSERVICEFILE", &file)],
    );
    assert!(has_node(c, &svc), "create-root from a service file");

    // A URI, also as --provider, and the password warning for a location.
    let (r, l) = (unique_name("urir"), unique_name("uril"));
    c.create_db(&r);
    c.create_db(&l);
    let ruri = format!("postgresql://postgres@127.0.0.1:{port}/{r}?application_name=uri%20test");
    let luri = format!("postgres://postgres:pw%40x@127.0.0.1:{port}/{l}");
    create_root(d, &ruri, &[]);
    write_job(d, "leaf.ini", &luri, "q");
    let out = ok_env(
        "londiste3",
        &[
            "leaf.ini",
            "create-leaf",
            "l",
            &luri,
            &format!("--provider={ruri}"),
        ],
        d,
        &[],
    );
    assert!(
        out.contains(".pgpass") && !out.contains("pw@x") && !out.contains("pw%40x"),
        "a stored location with a password must warn (without showing it):\n{out}"
    );
    let members = c.psql(
        &l,
        "select node_name from londiste.node_location order by 1",
    );
    assert_eq!(members, "l\nr", "leaf created from URIs knows both nodes");
}

#[test]
fn local_socket_default_and_read_write_host() {
    // The socket also in /tmp, where libpq looks without host=; the OS user
    // as the role when no user= is given.
    let c = Cluster::start_with("unix_socket_directories = '/tmp'\n", None);
    let port = c.port().to_string();
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    c.psql("postgres", &format!("CREATE ROLE \"{me}\" SUPERUSER LOGIN"));
    let t = TestDir::new();
    let d = t.path();
    let app = unique_name("sockapp");
    c.create_db(&app);
    create_root(d, &format!("dbname={app} port={port}"), &[]);
    assert!(has_node(&c, &app), "create-root over the default socket");

    // Several hosts: the first down, the second read-only, the third
    // writable; target_session_attrs=read-write picks the third.
    let ro = Cluster::shared();
    let rw_db = unique_name("rwpick");
    c.create_db(&rw_db);
    ro.create_db(&rw_db);
    ro.psql(
        "postgres",
        &format!("ALTER DATABASE \"{rw_db}\" SET default_transaction_read_only = on"),
    );
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let multi = format!(
        "host=127.0.0.1,127.0.0.1,127.0.0.1 port={dead},{},{port} user=postgres dbname={rw_db} target_session_attrs=read-write",
        ro.port()
    );
    create_root(d, &multi, &[]);
    assert!(has_node(&c, &rw_db), "the writable host was chosen");
    assert!(
        !has_node(ro, &rw_db),
        "nothing installed on the read-only host"
    );
}
