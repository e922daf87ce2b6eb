//! Sequence commands: add-seq, remove-seq, seqs.

use super::tables::missing;
use super::{Opts, connect_local, remote, resolve, seq_exists};
use crate::config::WorkerConfig;
use crate::db;
use crate::error::{Context, Error, Result};
use crate::replication::node;

pub fn add_seq(cfg: &WorkerConfig, args: &[String], opts: &Opts) -> Result<()> {
    let mut c = connect_local(cfg)?;
    let n = node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    // Subscriber: the provider's sequences and their last published values.
    let mut provider_seqs: Vec<(String, Option<i64>)> = Vec::new();
    let pool: Vec<String> = if n.is_root() {
        missing(&mut c, &cfg.queue_name)?
            .into_iter()
            .filter(|(k, _)| k == "S")
            .map(|(_, n)| n)
            .collect()
    } else {
        let mut p = remote(cfg, n.provider_location.as_deref().unwrap_or(""))?;
        let rows = p
            .query(
                "SELECT seq_name, last_value FROM londiste.seq_info WHERE queue_name = $1 AND local",
                &[&cfg.queue_name],
            )
            .ctx(|| "cannot read the provider's sequences".into())?;
        provider_seqs = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let have: Vec<String> = c
            .query(
                "SELECT seq_name FROM londiste.seq_info WHERE queue_name = $1",
                &[&cfg.queue_name],
            )
            .ctx(|| "cannot read seq_info".into())?
            .iter()
            .map(|r| r.get(0))
            .collect();
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|s| !have.contains(s))
            .collect()
    };
    for s in resolve(args, &pool, opts, "sequence")? {
        let published = provider_seqs.iter().find(|(p, _)| *p == s).map(|(_, v)| *v);
        if !n.is_root() && published.is_none() {
            let msg = format!(
                "sequence {s} is not replicated on the provider {}: add it there first (londiste-rs PROVIDER.ini add-seq {s})",
                db::describe(n.provider_location.as_deref().unwrap_or(""))
            );
            if opts.skip_non_existing {
                log::warn!("{msg}; skipped");
                continue;
            }
            return Err(Error::Other(msg));
        }
        if !seq_exists(&mut c, &s)? {
            if opts.create || opts.create_full {
                c.batch_execute(&format!("CREATE SEQUENCE {s}"))
                    .ctx(|| format!("cannot create sequence {s}"))?;
            } else if opts.skip_non_existing {
                log::warn!("sequence {s} does not exist here; skipped");
                continue;
            } else {
                return Err(Error::Other(format!(
                    "sequence {s} does not exist on this node: create it, or add with --create"
                )));
            }
        }
        let k = c
            .execute(
                "INSERT INTO londiste.seq_info (queue_name, seq_name, local) VALUES ($1, $2, true) ON CONFLICT DO NOTHING",
                &[&cfg.queue_name, &s],
            )
            .ctx(|| format!("cannot add sequence {s}"))?;
        // The provider may have published its value before this node added the
        // sequence (the event then passed by unapplied): catch up with it now.
        if let Some(Some(v)) = published {
            c.query_one(
                "SELECT londiste.seq_push($1::text::regclass, $2)",
                &[&s, &v],
            )
            .ctx(|| format!("cannot move sequence {s} to {v}"))?;
            c.execute(
                "UPDATE londiste.seq_info SET last_value = $3 WHERE queue_name = $1 AND seq_name = $2
                    AND (last_value IS NULL OR last_value < $3)",
                &[&cfg.queue_name, &s, &v],
            )
            .ctx(|| "cannot update seq_info".into())?;
        }
        log::info!(
            "{} {s}",
            if k == 0 {
                "Sequence already added:"
            } else {
                "Sequence added:"
            }
        );
    }
    if n.is_root() {
        c.query_one(
            "SELECT londiste.root_check_seqs($1, $2)",
            &[&cfg.queue_name, &cfg.seq_buffer],
        )
        .ctx(|| "cannot publish sequences".into())?;
    }
    Ok(())
}

pub fn remove_seq(cfg: &WorkerConfig, args: &[String], opts: &Opts) -> Result<()> {
    let mut c = connect_local(cfg)?;
    node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let have: Vec<String> = c
        .query(
            "SELECT seq_name FROM londiste.seq_info WHERE queue_name = $1",
            &[&cfg.queue_name],
        )
        .ctx(|| "cannot read seq_info".into())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for s in resolve(args, &have, opts, "sequence")? {
        c.execute(
            "DELETE FROM londiste.seq_info WHERE queue_name = $1 AND seq_name = $2",
            &[&cfg.queue_name, &s],
        )
        .ctx(|| "cannot remove sequence".into())?;
        log::info!("Sequence removed: {s}");
    }
    Ok(())
}

pub fn seqs(cfg: &WorkerConfig) -> Result<()> {
    let mut c = connect_local(cfg)?;
    node::require(&mut c, &cfg.queue_name, &cfg.command_hint())?;
    let rows = c
        .query("SELECT seq_name, local, last_value FROM londiste.seq_info WHERE queue_name = $1 ORDER BY 1", &[&cfg.queue_name])
        .ctx(|| "cannot read seq_info".into())?;
    println!("{:<40} {:<6} Last value", "Sequence", "Local");
    for r in rows {
        let (n, l, v): (String, bool, Option<i64>) = (r.get(0), r.get(1), r.get(2));
        println!(
            "{:<40} {:<6} {}",
            n,
            l,
            v.map(|v| v.to_string()).unwrap_or_default()
        );
    }
    Ok(())
}
