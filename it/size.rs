//! Size: one transaction of 1,000,000 rows and one 100 MB value replicate,
//! and the leaf's worker stays within bounded memory meanwhile (its peak
//! RSS is printed; run with --nocapture to see it).

use crate::harness::{Cluster, poll_until};
use crate::repl::Repl;
use std::time::{Duration, Instant};

/// Peak resident set size of a process, in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// count and an order-independent hash of each table, for comparing big
/// tables without dumping them.
fn fingerprint(c: &mut postgres::Client) -> Vec<String> {
    c.query(
        "SELECT 'big', count(*)::text || '/' || coalesce(sum(hashtext(b::text)::int8), 0)::text FROM big b
         UNION ALL
         SELECT 'huge', string_agg(id::text || ':' || length(v)::text || ':' || md5(v), ',' ORDER BY id) FROM huge",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| format!("{}={}", r.get::<_, String>(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
    .collect()
}

/// Waits until the leaf's fingerprint is `want`.
fn wait_same(s: &mut postgres::Client, want: &[String], what: &str) {
    poll_until(what, Duration::from_secs(180), || {
        let got = fingerprint(s);
        if got == want {
            Ok(true)
        } else {
            // The first characters: a full fingerprint of the huge table is long.
            Err(format!("{:.200?}", got))
        }
    });
}

#[test]
fn million_row_transaction_and_100mb_value() {
    let c = Cluster::shared();
    let schema = "CREATE TABLE big (id bigint PRIMARY KEY, n int, t text);
                  CREATE TABLE huge (id int PRIMARY KEY, v text);";
    let mut r = Repl::new("size", schema, schema, "");
    r.replicate_in_sync(false, &["big", "huge"]);
    let worker_pid = r.procs[1].0.id();
    let mut m = c.client(&r.master);
    let mut s = c.client(&r.slave);

    let started = Instant::now();
    m.batch_execute(
        "INSERT INTO big SELECT g, g % 1000, 'row ' || g || repeat('x', 40) FROM generate_series(1, 1000000) g",
    )
    .unwrap();
    let inserted = started.elapsed();
    let want = fingerprint(&mut m);
    wait_same(&mut s, &want, "1,000,000 rows on the leaf");
    let big_s = started.elapsed();
    let rss_big = peak_rss_mb(worker_pid);

    // Many large values in one transaction, one statement (one event) each:
    // read a few at a time, not a fetch-full at once.
    let many: String = (1..=12)
        .map(|g| {
            format!(
                "INSERT INTO huge VALUES ({}, repeat(md5('{g}'), 250000));",
                100 + g
            )
        })
        .collect();
    m.batch_execute(&format!("BEGIN; {many} COMMIT;")).unwrap();
    let want = fingerprint(&mut m);
    wait_same(&mut s, &want, "12 values of 8 MB on the leaf");
    let rss_many = peak_rss_mb(worker_pid);

    // 100 MB of text that does not compress: 1 MB of md5 hex, repeated (a
    // period beyond pglz's and lz4's windows).
    let started = Instant::now();
    m.batch_execute(
        "INSERT INTO huge SELECT 1, repeat(string_agg(md5(g::text), ''), 100) FROM generate_series(1, 32768) g;
         INSERT INTO huge VALUES (2, 'small');",
    )
    .unwrap();
    m.batch_execute("UPDATE huge SET v = v || 'tail' WHERE id = 1")
        .unwrap();
    let want = fingerprint(&mut m);
    assert!(want[1].contains(":104857604:"), "{want:?}");
    wait_same(&mut s, &want, "the 100 MB value on the leaf");
    let huge_s = started.elapsed();
    let rss_huge = peak_rss_mb(worker_pid);
    println!(
        "size: 1,000,000-row transaction: insert {:.1}s, on the leaf after {:.1}s, worker peak RSS {rss_big:.0} MB; \
         12 x 8 MB values in one transaction: worker peak RSS {rss_many:.0} MB; \
         100 MB value (insert + update): on the leaf after {:.1}s, worker peak RSS {rss_huge:.0} MB",
        inserted.as_secs_f64(),
        big_s.as_secs_f64(),
        huge_s.as_secs_f64()
    );
    // Bounded: a few copies of the largest value, not of the transaction.
    assert!(
        rss_big < 300.0,
        "worker peak RSS {rss_big:.0} MB after 1,000,000 rows"
    );
    assert!(
        rss_many < 300.0,
        "worker peak RSS {rss_many:.0} MB after 12 values of 8 MB"
    );
    assert!(
        rss_huge < 1024.0,
        "worker peak RSS {rss_huge:.0} MB with a 100 MB value"
    );
    r.assert_running();
}

/// Events close at 4 MB of row text as well as at 1000 rows: 40 rows of
/// 300 kB in one statement (an INSERT, then an UPDATE of all of them) travel
/// as a few events, not one of 12 MB, and arrive whole.
#[test]
fn wide_rows_in_one_statement_travel_in_bounded_events() {
    let c = Cluster::shared();
    let schema = "CREATE TABLE wide (id int PRIMARY KEY, v text);";
    let mut r = Repl::new("wide", schema, schema, "");
    r.replicate_in_sync(false, &["wide"]);
    let mut m = c.client(&r.master);
    let mut s = c.client(&r.slave);
    m.batch_execute(
        "INSERT INTO wide SELECT g, repeat(md5(g::text), 9375) FROM generate_series(1, 40) g;
         UPDATE wide SET v = v || 'x';",
    )
    .unwrap();
    let pfx: String = m
        .query_one("SELECT queue_data_pfx FROM pgq.queue", &[])
        .unwrap()
        .get(0);
    let rows = m
        .query(
            &format!(
                "SELECT ev_type, count(*)::int8, max(octet_length(ev_data)) FROM {pfx} e
                  WHERE ev_extra1 = 'public.wide' GROUP BY 1 ORDER BY 1"
            ),
            &[],
        )
        .unwrap();
    let got: Vec<(String, i64, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    for (t, n, max) in &got {
        assert!(t == "I*" || t == "U*", "{got:?}");
        // 13 or 14 rows of 300 kB each: three events per statement.
        assert_eq!(*n, 3, "{got:?}");
        assert!(*max < 4_500_000, "{got:?}");
    }
    let want = "SELECT count(*)::text || ':' || sum(length(v))::text || ':' || md5(string_agg(v, '' ORDER BY id)) FROM wide";
    let w: String = m.query_one(want, &[]).unwrap().get(0);
    poll_until("the wide rows on the leaf", Duration::from_secs(60), || {
        let g: Option<String> = s.query_one(want, &[]).map_err(|e| e.to_string())?.get(0);
        Ok(g.as_deref() == Some(w.as_str()))
    });
    r.assert_running();
}

/// The worker's memory with huge rows, for `scripts/bench-memory` (ignored:
/// it moves 1.2 GB). Prints one line per case with the worker's peak RSS
/// against the targets: 2x the largest value + 64 MB for one 100 MB
/// value, 300 MB for 1,000 rows of 1 MB in one statement.
#[test]
#[ignore]
fn memory_benchmark() {
    let c = Cluster::shared();
    let schema = "CREATE TABLE mem (id int PRIMARY KEY, v text);";
    for case in ["1000 x 1 MB in one statement", "one 100 MB value"] {
        let mut r = Repl::new("mem", schema, schema, "");
        r.replicate_in_sync(false, &["mem"]);
        let pid = r.procs[1].0.id();
        let mut m = c.client(&r.master);
        let mut s = c.client(&r.slave);
        let base = peak_rss_mb(pid);
        let started = Instant::now();
        if case.starts_with("1000") {
            m.batch_execute("INSERT INTO mem SELECT g, repeat(md5(g::text), 32768) FROM generate_series(1, 1000) g")
                .unwrap();
        } else {
            m.batch_execute(
                "INSERT INTO mem SELECT 1, repeat(string_agg(md5(g::text), ''), 100) FROM generate_series(1, 32768) g",
            )
            .unwrap();
        }
        let inserted = started.elapsed();
        let want = "SELECT count(*)::text || ':' || sum(length(v))::text || ':' || md5(string_agg(md5(v), '' ORDER BY id)) FROM mem";
        let w: String = m.query_one(want, &[]).unwrap().get(0);
        poll_until(case, Duration::from_secs(600), || {
            let g: Option<String> = s.query_one(want, &[]).map_err(|e| e.to_string())?.get(0);
            Ok(g.as_deref() == Some(w.as_str()))
        });
        let target = if case.starts_with("1000") {
            300.0
        } else {
            2.0 * 100.0 + 64.0
        };
        let peak = peak_rss_mb(pid);
        println!(
            "bench-memory: {case}: source insert {:.1}s, on the leaf after {:.1}s, worker peak RSS {peak:.0} MB \
             (idle {base:.0} MB; target {target:.0} MB: {})",
            inserted.as_secs_f64(),
            started.elapsed().as_secs_f64(),
            if peak <= target { "met" } else { "NOT met" }
        );
        r.assert_running();
    }
}
