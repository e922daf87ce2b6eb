//! TLS with libpq's `sslmode` semantics, through OpenSSL as libpq does it.
//!
//! `verify-ca`/`verify-full` verify the chain against `sslrootcert` (a file, by
//! default ~/.postgresql/root.crt, or `system` for the system store); as in
//! libpq, `require` (and `prefer`/`allow`) verify the chain too when that
//! default file exists. `verify-full` then checks the host name the way libpq
//! does (DNS and IP subjectAltNames, the CN only without a SAN of that kind).
//! Why a certificate was refused is kept in `Tls::failure` for the error.

use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openssl::nid::Nid;
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::store::{X509Lookup, X509StoreBuilder};
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509Ref, X509StoreContextRef};
use parking_lot::Mutex;
use postgres_openssl::MakeTlsConnector;

use super::connstr::Params;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    pub fn of(p: &Params) -> Mode {
        match p.get("sslmode").map(String::as_str) {
            Some("disable") => Mode::Disable,
            Some("allow") => Mode::Allow,
            Some("require") => Mode::Require,
            Some("verify-ca") => Mode::VerifyCa,
            Some("verify-full") => Mode::VerifyFull,
            Some(_) => Mode::Prefer,
            None if p.get("requiressl").map(String::as_str) == Some("1") => Mode::Require,
            None => Mode::Prefer,
        }
    }
}

/// A TLS set-up for one `db::connect` call.
pub struct Tls {
    pub mode: Mode,
    pub connector: Option<MakeTlsConnector>,
    /// Why the last handshake refused the server's certificate.
    pub failure: Arc<Mutex<Option<String>>>,
    /// The root certificate file in use, for messages.
    pub rootcert: Option<String>,
}

fn home_file(p: &Params, key: &str, home: Option<&Path>, default: &str) -> Option<PathBuf> {
    match p.get(key) {
        Some(v) => Some(PathBuf::from(v)),
        None => home.map(|h| h.join(".postgresql").join(default)),
    }
}

fn version(v: &str, key: &str) -> Result<Option<SslVersion>, String> {
    Ok(Some(match v {
        "TLSv1" => SslVersion::TLS1,
        "TLSv1.1" => SslVersion::TLS1_1,
        "TLSv1.2" => SslVersion::TLS1_2,
        "TLSv1.3" => SslVersion::TLS1_3,
        "" => return Ok(None),
        _ => {
            return Err(format!(
                "invalid {key} value: \"{v}\" (one of: TLSv1, TLSv1.1, TLSv1.2, TLSv1.3)"
            ));
        }
    }))
}

/// libpq's rule for a client key: no access for group or others when owned
/// by the user, at most group read when owned by root.
fn check_key_file(key: &Path) -> Result<(), String> {
    let m = std::fs::metadata(key).map_err(|e| {
        format!(
            "certificate present, but not private key file \"{}\" ({e}); set sslkey= to the client key",
            key.display()
        )
    })?;
    if !m.is_file() {
        return Err(format!(
            "private key file \"{}\" is not a regular file",
            key.display()
        ));
    }
    let mode = m.permissions().mode();
    let me = nix::unistd::geteuid().as_raw();
    if (m.uid() == me && mode & 0o077 != 0) || (m.uid() == 0 && mode & 0o037 != 0) {
        return Err(format!(
            "private key file \"{}\" has group or world access; file must have permissions u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) or less if owned by root",
            key.display()
        ));
    }
    Ok(())
}

pub fn setup(p: &Params, home: Option<&Path>) -> Result<Tls, String> {
    let mode = Mode::of(p);
    let failure = Arc::new(Mutex::new(None));
    if mode == Mode::Disable {
        return Ok(Tls {
            mode,
            connector: None,
            failure,
            rootcert: None,
        });
    }
    let (ssl, verify_chain, rootcert) = connector_for(p, home, mode)?;
    let sni = p.get("sslsni").map(String::as_str) != Some("0");
    let full = mode == Mode::VerifyFull;
    let mut connector = MakeTlsConnector::new(ssl);
    let slot = failure.clone();
    connector.set_callback(move |cfg, host| {
        cfg.set_verify_hostname(false);
        cfg.set_use_server_name_indication(sni);
        if verify_chain {
            let (slot, host) = (slot.clone(), host.to_string());
            cfg.set_verify_callback(SslVerifyMode::PEER, move |ok, ctx| {
                verify(ok, ctx, full, &host, &slot)
            });
        }
        Ok(())
    });
    Ok(Tls {
        mode,
        connector: Some(connector),
        failure,
        rootcert,
    })
}

/// Built connectors by their settings (and the files' modification times, so
/// a renewed certificate is read again). Building one costs ~25 ms (OpenSSL
/// reads the system trust store whatever we then put in its place); workers
/// and commands connect to the same few servers again and again.
type Built = (SslConnector, bool, Option<String>);
static CONNECTORS: Mutex<Vec<(String, Built)>> = Mutex::new(Vec::new());

fn connector_for(p: &Params, home: Option<&Path>, mode: Mode) -> Result<Built, String> {
    let mut key = format!("{mode:?}");
    for k in [
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslcrl",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
    ] {
        let v = p.get(k).cloned().unwrap_or_default();
        let f = match k {
            "sslrootcert" => home_file(p, k, home, "root.crt"),
            "sslcert" => home_file(p, k, home, "postgresql.crt"),
            "sslkey" => home_file(p, k, home, "postgresql.key"),
            "sslcrl" => home_file(p, k, home, "root.crl"),
            _ => None,
        };
        let stamp = f
            .and_then(|f| std::fs::metadata(f).ok())
            .map(|m| format!("{}.{}:{}", m.mtime(), m.mtime_nsec(), m.mode()))
            .unwrap_or_default();
        key.push_str(&format!("|{k}={v}@{stamp}"));
    }
    if let Some((_, b)) = CONNECTORS.lock().iter().find(|(k, _)| *k == key) {
        return Ok(b.clone());
    }
    let built = build_connector(p, home, mode)?;
    let mut cache = CONNECTORS.lock();
    if cache.len() >= 64 {
        cache.remove(0);
    }
    cache.push((key, built.clone()));
    Ok(built)
}

fn build_connector(p: &Params, home: Option<&Path>, mode: Mode) -> Result<Built, String> {
    let verify_mode = matches!(mode, Mode::VerifyCa | Mode::VerifyFull);
    let tls_err = |what: &str, f: &Path, e: openssl::error::ErrorStack| {
        format!("could not load {what} \"{}\": {e}", f.display())
    };
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(|e| e.to_string())?;
    // The builder trusts the system store; libpq trusts only sslrootcert
    // (the system store only with sslrootcert=system), so start empty.
    b.set_cert_store(X509StoreBuilder::new().map_err(|e| e.to_string())?.build());
    let min = p.get("ssl_min_protocol_version").map_or("TLSv1.2", |s| s);
    b.set_min_proto_version(version(min, "ssl_min_protocol_version")?)
        .map_err(|e| e.to_string())?;
    if let Some(max) = p.get("ssl_max_protocol_version") {
        b.set_max_proto_version(version(max, "ssl_max_protocol_version")?)
            .map_err(|e| e.to_string())?;
    }
    let root = home_file(p, "sslrootcert", home, "root.crt");
    let (verify_chain, rootcert) = match root {
        Some(r) if r.as_os_str() == "system" => {
            if mode != Mode::VerifyFull {
                return Err(
                    "weak sslmode may not be used with sslrootcert=system (use sslmode=verify-full)"
                        .into(),
                );
            }
            b.set_default_verify_paths().map_err(|e| e.to_string())?;
            (true, Some("system".to_string()))
        }
        Some(r) if r.exists() => {
            b.set_ca_file(&r)
                .map_err(|e| tls_err("root certificate file", &r, e))?;
            (true, Some(r.display().to_string()))
        }
        r => {
            if verify_mode {
                let f = r.map_or("~/.postgresql/root.crt".into(), |r| r.display().to_string());
                return Err(format!(
                    "root certificate file \"{f}\" does not exist; either provide the file (sslrootcert=), use the system's trusted roots with sslrootcert=system, or change sslmode to disable server certificate verification"
                ));
            }
            (false, None)
        }
    };
    if verify_chain
        && let Some(crl) = home_file(p, "sslcrl", home, "root.crl")
        && (crl.exists() || p.contains_key("sslcrl"))
    {
        let store = b.cert_store_mut();
        let lookup = store
            .add_lookup(X509Lookup::file())
            .map_err(|e| e.to_string())?;
        lookup
            .load_crl_file(&crl, SslFiletype::PEM)
            .map_err(|e| tls_err("SSL certificate revocation list file", &crl, e))?;
        store
            .set_flags(X509VerifyFlags::CRL_CHECK | X509VerifyFlags::CRL_CHECK_ALL)
            .map_err(|e| e.to_string())?;
    }
    if let Some(cert) = home_file(p, "sslcert", home, "postgresql.crt")
        && cert.exists()
    {
        b.set_certificate_chain_file(&cert)
            .map_err(|e| tls_err("client certificate file", &cert, e))?;
        let key = home_file(p, "sslkey", home, "postgresql.key").unwrap_or_default();
        check_key_file(&key)?;
        b.set_private_key_file(&key, SslFiletype::PEM)
            .map_err(|e| tls_err("private key file", &key, e))?;
        b.check_private_key().map_err(|e| {
            format!(
                "private key file \"{}\" does not match client certificate \"{}\": {e}",
                key.display(),
                cert.display()
            )
        })?;
    }
    b.set_verify(if verify_chain {
        SslVerifyMode::PEER
    } else {
        SslVerifyMode::NONE
    });
    Ok((b.build(), verify_chain, rootcert))
}

fn verify(
    ok: bool,
    ctx: &mut X509StoreContextRef,
    full: bool,
    host: &str,
    slot: &Mutex<Option<String>>,
) -> bool {
    if !ok {
        let subject = ctx
            .current_cert()
            .map(|c| names(c).1.join(", "))
            .unwrap_or_default();
        *slot.lock() = Some(format!(
            "server certificate not trusted: {} (certificate at depth {}{})",
            ctx.error().error_string(),
            ctx.error_depth(),
            if subject.is_empty() {
                String::new()
            } else {
                format!(", CN {subject}")
            }
        ));
        return false;
    }
    if full
        && ctx.error_depth() == 0
        && let Some(cert) = ctx.current_cert()
        && let Err(e) = host_matches(cert, host)
    {
        *slot.lock() = Some(e);
        return false;
    }
    true
}

/// The certificate's (subjectAltNames, common names).
fn names(cert: &X509Ref) -> (Vec<San>, Vec<String>) {
    let sans = cert
        .subject_alt_names()
        .map(|s| {
            s.iter()
                .filter_map(|g| {
                    if let Some(d) = g.dnsname() {
                        Some(San::Dns(d.to_string()))
                    } else {
                        g.ipaddress().map(|ip| San::Ip(ip.to_vec()))
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let cns = cert
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .filter_map(|e| e.data().to_string().ok())
        .collect();
    (sans, cns)
}

#[derive(Debug)]
enum San {
    Dns(String),
    Ip(Vec<u8>),
}

/// libpq's wildcard rule: `*.example.com` matches one leading label.
fn name_matches(pattern: &str, host: &str) -> bool {
    if pattern.eq_ignore_ascii_case(host) {
        return true;
    }
    match (pattern.strip_prefix("*."), host.split_once('.')) {
        (Some(rest), Some((first, hrest))) => !first.is_empty() && rest.eq_ignore_ascii_case(hrest),
        _ => false,
    }
}

/// libpq's `pq_verify_peer_name_matches_certificate`: DNS SANs compare as
/// names, IP SANs as addresses; the CN counts only when no SAN of the host's
/// kind (name or address) is present.
fn host_matches(cert: &X509Ref, host: &str) -> std::result::Result<(), String> {
    if host.is_empty() {
        return Err("host name must be specified for a verified SSL connection (sslmode=verify-full needs host=)".into());
    }
    let ip: Option<IpAddr> = host.parse().ok();
    let (sans, cns) = names(cert);
    let mut check_cn = true;
    let mut shown = Vec::new();
    for s in &sans {
        match s {
            San::Dns(d) => {
                shown.push(d.clone());
                if ip.is_none() {
                    check_cn = false;
                }
                if name_matches(d, host) {
                    return Ok(());
                }
            }
            San::Ip(a) => {
                let addr = match a.len() {
                    4 => Some(IpAddr::from(
                        <[u8; 4]>::try_from(&a[..]).unwrap_or_default(),
                    )),
                    16 => Some(IpAddr::from(
                        <[u8; 16]>::try_from(&a[..]).unwrap_or_default(),
                    )),
                    _ => None,
                };
                if let Some(addr) = addr {
                    shown.push(addr.to_string());
                    if ip.is_some() {
                        check_cn = false;
                    }
                    if Some(addr) == ip {
                        return Ok(());
                    }
                }
            }
        }
    }
    if check_cn {
        for cn in &cns {
            shown.push(cn.clone());
            if name_matches(cn, host) {
                return Ok(());
            }
        }
    }
    let list = match shown.len() {
        0 => return Err("could not get server's host name from server certificate".into()),
        1 => format!("\"{}\"", shown[0]),
        n => format!(
            "\"{}\" (and {} other name{})",
            shown[0],
            n - 1,
            if n == 2 { "" } else { "s" }
        ),
    };
    Err(format!(
        "server certificate for {list} does not match host name \"{host}\" (sslmode=verify-full): connect by a name the certificate holds, or use sslmode=verify-ca"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_as_libpq() {
        assert!(name_matches("*.example.com", "db.example.com"));
        assert!(name_matches("DB.example.com", "db.EXAMPLE.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("db*.example.com", "db1.example.com"));
    }
}
