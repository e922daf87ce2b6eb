//! A partitioned table (declarative partitioning) added as its parent: the
//! copy reads every partition and fills the replica's parent, whose own
//! partitions differ (hash here, ranges there), while a writer inserts,
//! deletes and changes keys so that rows move between partitions on both
//! sides, and writes straight into the source's partitions; the replica
//! ends equal to the source, and its partitions refuse local writes as its
//! parent does. A partition made after the table was added is
//! reported by `check` until its triggers are made. On PostgreSQL 10, whose
//! partitioned tables take no ON CONFLICT, add-table refuses a partitioned
//! target with a line saying what works instead.

use crate::harness::{Cluster, Rng, poll_until, run, tables_diff, unique_name};
use crate::repl::Repl;
use crate::tutorial::{ok, output_text};
use crate::versions::limits::{root_and_leaf, run_jobs};
use crate::versions::{Side, tables_ok};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const MASTER: &str = "
    CREATE TABLE pt (id int, k int, v text, PRIMARY KEY (k, id)) PARTITION BY RANGE (k);
    CREATE TABLE pt_low PARTITION OF pt FOR VALUES FROM (0) TO (10);
    CREATE TABLE pt_mid PARTITION OF pt FOR VALUES FROM (10) TO (20);
    CREATE TABLE pt_high PARTITION OF pt FOR VALUES FROM (20) TO (30);
    INSERT INTO pt SELECT g, g % 30, 'v' || g FROM generate_series(1, 3000) g;
";

const SLAVE: &str = "
    CREATE TABLE pt (id int, k int, v text, PRIMARY KEY (k, id)) PARTITION BY HASH (k);
    CREATE TABLE pt_h0 PARTITION OF pt FOR VALUES WITH (MODULUS 2, REMAINDER 0);
    CREATE TABLE pt_h1 PARTITION OF pt FOR VALUES WITH (MODULUS 2, REMAINDER 1);
";

/// Root on `source`, leaf on `target` (None: the system server).
fn rows_move_partitions(source: Option<u32>, target: Option<u32>) {
    let (s, t) = (Side::new(source), Side::new(target));
    let (s, t) = (s.c(), t.c());
    let master = unique_name("part_m");
    let slave = unique_name("part_s");
    let (mconn, sconn) = (s.create_db(&master), t.create_db(&slave));
    s.client(&master).batch_execute(MASTER).unwrap();
    t.client(&slave).batch_execute(SLAVE).unwrap();
    let dir = root_and_leaf(s, &master, &mconn, &sconn);
    let d = dir.path();
    let _jobs = run_jobs(d);
    ok("londiste3", &["master.ini", "add-table", "public.pt"], d);
    // The writer runs from before the copy to after it.
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let direct = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, moved, direct) = (stop.clone(), moved.clone(), direct.clone());
        let mut m = s.client(&master);
        std::thread::spawn(move || {
            let mut rng = Rng(0x5eed_1234);
            while !stop.load(Ordering::Relaxed) {
                let id = rng.below(3000) as i32 + 1;
                let part = ["pt_low", "pt_mid", "pt_high"][rng.below(3) as usize];
                let sql = match rng.below(7) {
                    // A key change across a range boundary: the row moves.
                    0 | 1 => {
                        format!("UPDATE pt SET k = (k + 10) % 30, v = v || 'm' WHERE id = {id}")
                    }
                    2 => format!("DELETE FROM pt WHERE id = {id}"),
                    // One writer keeps id unique (the key is (k, id)).
                    3 => format!(
                        "INSERT INTO pt SELECT {id}, {}, 'n' WHERE NOT EXISTS (SELECT FROM pt WHERE id = {id})",
                        rng.below(30)
                    ),
                    // Straight into a partition, not through the parent.
                    4 => format!("UPDATE {part} SET v = v || 'p' WHERE id = {id}"),
                    5 => format!("DELETE FROM {part} WHERE id = {id}"),
                    _ => {
                        let k = match part {
                            "pt_low" => 5,
                            "pt_mid" => 15,
                            _ => 25,
                        };
                        format!(
                            "INSERT INTO {part} SELECT {id}, {k}, 'd' WHERE NOT EXISTS (SELECT FROM pt WHERE id = {id})"
                        )
                    }
                };
                let n = m.execute(sql.as_str(), &[]).unwrap();
                if sql.starts_with("UPDATE pt ") {
                    moved.fetch_add(n, Ordering::Relaxed);
                } else if sql.contains(" pt_") {
                    direct.fetch_add(n, Ordering::Relaxed);
                }
                // A multi-row statement now and then: one event, many rows.
                if rng.below(50) == 0 {
                    m.execute("UPDATE pt SET k = (k + 10) % 30 WHERE id % 97 = 0", &[])
                        .unwrap();
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    ok("londiste3", &["slave.ini", "add-table", "public.pt"], d);
    poll_until("pt ok on the leaf", Duration::from_secs(30), || {
        tables_ok(&dir, "slave.ini", &["public.pt"])
    });
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(moved.load(Ordering::Relaxed) > 50, "too few rows moved");
    let (mut src, mut dst) = (s.client(&master), t.client(&slave));
    poll_until(
        "pt on the leaf to equal the source",
        Duration::from_secs(30),
        || match tables_diff(&mut src, &mut dst, "public.pt") {
            None => Ok(true),
            Some(d) => Err(d),
        },
    );
    assert!(
        direct.load(Ordering::Relaxed) > 10,
        "too few rows written straight into partitions: {} (moved {})",
        direct.load(Ordering::Relaxed),
        moved.load(Ordering::Relaxed)
    );
    // A partition made after add-table: check names it until its triggers exist.
    s.client(&master)
        .batch_execute("CREATE TABLE pt_extra PARTITION OF pt FOR VALUES FROM (30) TO (40)")
        .unwrap();
    let out = run("londiste3", &["master.ini", "check"], d);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "public.pt: partition public.pt_extra has no capture triggers (made after the table was added): \
         writes straight into it are not replicated; fix: SELECT londiste.regenerate_capture() in this database\n"
    );
    s.client(&master)
        .batch_execute(
            "SELECT londiste.regenerate_capture(); INSERT INTO pt_extra VALUES (9001, 35, 'x')",
        )
        .unwrap();
    ok("londiste3", &["master.ini", "check"], d);
    poll_until(
        "the row in the new partition to arrive",
        Duration::from_secs(20),
        || Ok(t.psql(&slave, "select count(*) from pt where id = 9001") == "1"),
    );
    // A TRUNCATE of one partition cannot be replayed as the parent's: refused.
    let err = s
        .client(&master)
        .batch_execute("TRUNCATE pt_low")
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("its TRUNCATE cannot be replicated alone"),
        "{err:?}"
    );
    // The replica's partitions refuse local writes, like its parent.
    let err = t
        .client(&slave)
        .batch_execute("INSERT INTO pt_h0 VALUES (9999, 0, 'local')")
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("is replicated into this node"),
        "{err:?}"
    );
    // The rows are in the replica's partitions, none stuck in the parent.
    assert_eq!(t.psql(&slave, "select count(*) from only pt"), "0");
    let parts = t.psql(
        &slave,
        "select count(*) filter (where tableoid = 'pt_h0'::regclass) > 0
            and count(*) filter (where tableoid = 'pt_h1'::regclass) > 0 from pt",
    );
    assert_eq!(parts, "t");
}

#[test]
fn partitioned_parent_replicates_with_rows_moving_partitions() {
    rows_move_partitions(None, None);
}

/// The oldest major with row movement and ON CONFLICT on partitioned
/// tables, both ways with the newest.
#[test]
fn partitioned_parent_11_into_18_and_18_into_11() {
    rows_move_partitions(Some(11), Some(18));
    rows_move_partitions(Some(18), Some(11));
}

/// PostgreSQL 10: a partitioned table cannot be the target of the apply's
/// upserts (ON CONFLICT on partitioned tables is 11+).
#[test]
fn partitioned_target_on_10_is_refused() {
    let old = Cluster::start_major(10);
    let c = Cluster::shared();
    let master = unique_name("part10_m");
    let slave = unique_name("part10_s");
    let (mconn, sconn) = (c.create_db(&master), old.create_db(&slave));
    c.client(&master)
        .batch_execute("CREATE TABLE p (id int PRIMARY KEY, v text)")
        .unwrap();
    old.client(&slave)
        .batch_execute(
            "CREATE TABLE p (id int NOT NULL, v text) PARTITION BY RANGE (id);
             CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100);",
        )
        .unwrap();
    let r = Repl::nodes_at("part10", &mconn, &sconn);
    let d = r.d();
    ok("londiste3", &["master.ini", "add-table", "public.p"], d);
    let out = run(
        "londiste3",
        &["slave.ini", "add-table", "public.p", "--key=id"],
        d,
    );
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "table public.p is partitioned on this node, and PostgreSQL 10 cannot apply updates to a partitioned table"
        ),
        "{text}"
    );
    let n = old.psql(&slave, "select count(*) from londiste.table_info");
    assert_eq!(n, "0", "the refused table was added");
}

/// A switchover with a partitioned table: the old root fences its
/// partitions with the parent, and the new root captures writes made straight
/// into its partitions, which reach the old root, now following it.
#[test]
fn switchover_fences_and_captures_partitions() {
    let mut r = crate::cutover::Rig::new(&["master", "slave"]);
    let ddl = "CREATE TABLE pt (id int, k int, v text, PRIMARY KEY (k, id)) PARTITION BY RANGE (k);
               CREATE TABLE pt_low PARTITION OF pt FOR VALUES FROM (0) TO (10);
               CREATE TABLE pt_high PARTITION OF pt FOR VALUES FROM (10) TO (20);";
    r.client("master").batch_execute(ddl).unwrap();
    r.client("slave").batch_execute(ddl).unwrap();
    r.client("master")
        .batch_execute("INSERT INTO pt SELECT g, g % 20, 'v' FROM generate_series(1, 100) g")
        .unwrap();
    r.create_root("master");
    r.create_sub("branch", "slave", "master");
    r.start_ticker();
    r.start_worker("master");
    r.start_worker("slave");
    r.add_all("master");
    r.add_all("slave");
    r.wait_synced("slave", 3);
    r.londiste(&["slave.ini", "takeover", "master"]);
    assert_eq!(r.node_type("slave"), "root");
    // The old root's partition refuses a write naming it.
    let err = r
        .client("master")
        .batch_execute("INSERT INTO pt_low VALUES (1000, 1, 'late')")
        .unwrap_err();
    assert!(format!("{err:?}").contains("moved to node"), "{err:?}");
    // The new root captures a write straight into its partition.
    r.client("slave")
        .batch_execute(
            "INSERT INTO pt_high VALUES (2000, 15, 'new'); UPDATE pt_low SET v = 'u' WHERE id = 3",
        )
        .unwrap();
    let (mut a, mut b) = (r.client("slave"), r.client("master"));
    poll_until(
        "pt on the old root to equal the new root's",
        Duration::from_secs(30),
        || match tables_diff(&mut a, &mut b, "public.pt") {
            None => Ok(true),
            Some(d) => Err(d),
        },
    );
    let n = b
        .query_one(
            "SELECT count(*) FROM pt WHERE id = 2000 OR (id = 3 AND v = 'u')",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(n, 2);
}
