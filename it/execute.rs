//! Schema changes while the application writes: `execute` on the root of a
//! root -> branch -> leaf chain, a file that fails on one node and the node
//! going on by itself once the cause is gone, and a change made outside
//! `execute` (drift) stopping a node with an error that says what to do.

use crate::cutover::{Q, Rig, node_ini};
use crate::harness::{Cluster, poll_until, run, tables_diff, unique_name};
use crate::tutorial::output_text;
use postgres::{Client, NoTls};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// An application on one long-lived connection: it inserts orders, and
/// updates some, all the time; once `tagged` is set it fills the column the
/// first file adds. Its plans stay cached across the schema changes, as a
/// pooled application's do.
struct App {
    stop: Arc<AtomicBool>,
    tagged: Arc<AtomicBool>,
    commits: Arc<AtomicUsize>,
    handle: JoinHandle<Vec<String>>,
}

impl App {
    fn start(conn: String) -> App {
        let stop = Arc::new(AtomicBool::new(false));
        let tagged = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicUsize::new(0));
        let (s, t, n) = (stop.clone(), tagged.clone(), commits.clone());
        let handle = std::thread::spawn(move || {
            let mut c = Client::connect(&conn, NoTls).unwrap();
            let mut errors = Vec::new();
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let r = if t.load(Ordering::Relaxed) {
                    c.batch_execute(&format!(
                        "insert into orders (note, tag) values ('app {i}', 'tag {i}');
                         update orders set tag = 'again {i}' where id = (select max(id) - 3 from orders)"
                    ))
                } else {
                    c.batch_execute(&format!(
                        "insert into orders (note) values ('app {i}');
                         update orders set note = note || '.' where id = (select max(id) - 3 from orders)"
                    ))
                };
                match r {
                    Ok(()) => {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => errors.push(format!("{e:?}")),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            errors
        });
        App {
            stop,
            tagged,
            commits,
            handle,
        }
    }

    fn wait_commits(&self, more: usize) {
        let target = self.commits.load(Ordering::Relaxed) + more;
        poll_until("the application to commit", Duration::from_secs(30), || {
            Ok(self.commits.load(Ordering::Relaxed) >= target)
        });
    }

    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

fn execute(r: &Rig, node: &str, files: &[&str]) -> (bool, String) {
    let mut args = vec![Rig::ini(node), "execute".to_string()];
    args.extend(files.iter().map(|f| f.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("londiste3", &args, r.d());
    (out.status.success(), output_text(&out))
}

fn wait_equal_tables(r: &Rig, a: &str, b: &str, tables: &[&str]) {
    let (mut ca, mut cb) = (r.client(a), r.client(b));
    for t in tables {
        poll_until(
            &format!("{t} equal on {a} and {b}"),
            Duration::from_secs(60),
            || match tables_diff(&mut ca, &mut cb, t) {
                None => Ok(true),
                Some(d) => Err(format!("{d}; {b} error: {:?}", r.node_col(b, "cur_error"))),
            },
        );
    }
}

fn columns(c: &mut Client, table: &str) -> Vec<String> {
    c.query(
        "select attname::text || ' ' || format_type(atttypid, atttypmod) from pg_attribute
          where attrelid = $1::text::regclass and attnum > 0 and not attisdropped order by attnum",
        &[&table],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The root and a leaf under it, both tables in sync, ticker and workers up.
fn root_and_leaf(mut r: Rig) -> Rig {
    r.create_root("root");
    r.create_sub("leaf", "leaf", "root");
    r.start_ticker();
    r.start_worker("root");
    r.start_worker("leaf");
    r.add_all("root");
    r.add_all("leaf");
    r.wait_synced("leaf", 2);
    r
}

#[test]
fn execute_under_writes_reaches_branch_and_leaf_at_the_same_position() {
    let mut r = Rig::new(&["root", "branch", "leaf"]);
    r.create_root("root");
    r.create_sub("branch", "branch", "root");
    r.create_sub("leaf", "leaf", "branch");
    r.start_ticker();
    for n in ["root", "branch", "leaf"] {
        r.start_worker(n);
        r.add_all(n);
    }
    r.wait_synced("leaf", 2);
    let app = App::start(r.conn("root"));
    app.wait_commits(20);

    r.dir.write(
        "01_tag.sql",
        "-- the application starts filling tag right after this\nalter table orders add column tag text;\n",
    );
    r.dir.write(
        "02_items.sql",
        "--*-- Local-Table: public.items\n\nalter table @public.items@ rename column qty to quantity;\n",
    );
    r.dir.write(
        "03_index_type.sql",
        "create index orders_tag on orders (tag);\nalter table orders alter column n type bigint;\n",
    );
    r.dir
        .write("04_drop.sql", "alter table orders drop column n;\n");

    let (ok, out) = execute(&r, "root", &["01_tag.sql"]);
    assert!(ok, "{out}");
    app.tagged.store(true, Ordering::Relaxed);
    app.wait_commits(20);
    let (ok, out) = execute(&r, "root", &["02_items.sql", "03_index_type.sql"]);
    assert!(ok, "{out}");
    r.client("root")
        .batch_execute("update items set quantity = quantity + 100 where sku in ('sku1', 'sku2'); delete from items where sku = 'sku3'")
        .unwrap();
    app.wait_commits(20);
    let (ok, out) = execute(&r, "root", &["04_drop.sql"]);
    assert!(ok, "{out}");
    app.wait_commits(20);

    // A file is known by its name: running it again changes nothing anywhere.
    let (ok, out) = execute(&r, "root", &["01_tag.sql"]);
    assert!(ok, "{out}");
    assert!(out.contains("01_tag.sql already applied"), "{out}");

    // Not on a replica: the message names the root.
    let (ok, out) = execute(&r, "leaf", &["01_tag.sql"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("execute runs on the root") && out.contains("the root is root"),
        "{out}"
    );

    let errors = app.stop();
    assert!(errors.is_empty(), "the application saw errors: {errors:?}");
    for n in ["branch", "leaf"] {
        wait_equal_tables(&r, "root", n, &["public.orders", "public.items"]);
    }
    let (mut root, mut leaf) = (r.client("root"), r.client("leaf"));
    for t in ["public.orders", "public.items"] {
        assert_eq!(columns(&mut root, t), columns(&mut leaf, t), "{t}");
    }
    assert_eq!(
        columns(&mut leaf, "public.orders"),
        ["id integer", "note text", "tag text"]
    );
    assert_eq!(
        columns(&mut leaf, "public.items"),
        ["sku text", "quantity integer"]
    );
    let tagged: i64 = leaf
        .query_one("select count(*) from orders where tag is not null", &[])
        .unwrap()
        .get(0);
    assert!(tagged >= 20, "{tagged} tagged rows on the leaf");
    let idx: i64 = leaf
        .query_one(
            "select count(*) from pg_indexes where indexname = 'orders_tag'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(idx, 1);
    let files: Vec<String> = leaf
        .query(
            "select execute_file from londiste.applied_execute where queue_name = $1 order by 1",
            &[&Q],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        files,
        [
            "01_tag.sql",
            "02_items.sql",
            "03_index_type.sql",
            "04_drop.sql"
        ]
    );
    // The replicas still refuse the application's writes after the changes.
    let e = leaf
        .batch_execute("insert into orders (note) values ('local')")
        .unwrap_err();
    assert!(
        format!("{e:?}").contains("is replicated into this node"),
        "{e:?}"
    );
}

#[test]
fn a_file_failing_on_the_leaf_holds_it_there_and_it_goes_on_once_fixed() {
    let r = root_and_leaf(Rig::new(&["root", "leaf"]));
    // The leaf has an object of its own that the file's first statement
    // conflicts with.
    r.client("leaf")
        .batch_execute("create table audit (x int)")
        .unwrap();
    r.dir.write(
        "05_audit.sql",
        "create table audit (id int primary key, what text);\nalter table orders add column audited boolean not null default false;\n",
    );
    let (ok, out) = execute(&r, "root", &["05_audit.sql"]);
    assert!(ok, "{out}");
    let mut root = r.client("root");
    root.batch_execute("insert into orders (note, audited) values ('after', true)")
        .unwrap();
    let pos = r.node_col("leaf", "last_tick_id").unwrap();
    poll_until(
        "the leaf to report the failing file",
        Duration::from_secs(30),
        || match r.node_col("leaf", "cur_error")? {
            Some(e) if e.contains("05_audit.sql") && e.contains("statement 1 (line 1)") => Ok(true),
            e => Err(format!("{e:?}")),
        },
    );
    let status = r.londiste(&[&Rig::ini("leaf"), "status"]);
    assert!(status.contains("05_audit.sql"), "{status}");
    let info = r.londiste(&[&Rig::ini("leaf"), "node-info"]);
    assert!(info.contains("05_audit.sql"), "{info}");
    // Held at the event: rows written after the file are not applied, and the
    // position stays where it was.
    let mut leaf = r.client("leaf");
    let n: i64 = leaf
        .query_one("select count(*) from orders where note = 'after'", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert_eq!(r.node_col("leaf", "last_tick_id").unwrap(), pos);

    // The cause removed, the worker goes on by itself.
    leaf.batch_execute("drop table audit").unwrap();
    wait_equal_tables(&r, "root", "leaf", &["public.orders", "public.items"]);
    assert_eq!(
        columns(&mut leaf, "public.audit"),
        ["id integer", "what text"]
    );
    assert_eq!(r.node_col("leaf", "cur_error").unwrap(), None);
}

#[test]
fn a_column_added_outside_execute_stops_the_node_with_the_fix() {
    let r = root_and_leaf(Rig::new(&["root", "leaf"]));
    let mut root = r.client("root");
    root.batch_execute(
        "alter table orders add column sneaky int; insert into orders (note, sneaky) values ('drift', 1);
         update items set qty = 0 where sku = 'sku1'",
    )
    .unwrap();
    poll_until(
        "the leaf to stop at the drift",
        Duration::from_secs(30),
        || match r.node_col("leaf", "cur_error")? {
            Some(e)
                if e.contains("\"sneaky\"")
                    && e.contains("public")
                    && e.contains("orders")
                    && e.contains("execute") =>
            {
                Ok(true)
            }
            e => Err(format!("{e:?}")),
        },
    );
    let mut leaf = r.client("leaf");
    // Nothing of that batch is applied, the other table's change included.
    let qty: i32 = leaf
        .query_one("select qty from items where sku = 'sku1'", &[])
        .unwrap()
        .get(0);
    assert_eq!(qty, 1);
    leaf.batch_execute("alter table orders add column sneaky int")
        .unwrap();
    wait_equal_tables(&r, "root", "leaf", &["public.orders", "public.items"]);
}

#[test]
fn header_conditions_decide_where_a_file_runs() {
    let r = root_and_leaf(Rig::new(&["root", "leaf"]));
    r.client("root")
        .batch_execute("create schema reporting")
        .unwrap();
    r.dir.write(
        "06_reporting.sql",
        "--*-- Need-Schema: reporting\ncreate table reporting.daily (d date primary key);\n",
    );
    r.dir.write(
        "07_marker.sql",
        "create table marker (id int primary key);\n",
    );
    let (ok, out) = execute(&r, "root", &["06_reporting.sql", "07_marker.sql"]);
    assert!(ok, "{out}");
    // The leaf passes 06 (no reporting schema there) and runs 07 after it.
    let mut leaf = r.client("leaf");
    poll_until("07 on the leaf", Duration::from_secs(30), || {
        Ok(leaf
            .query_one("select to_regclass('public.marker') is not null", &[])
            .map_err(|e| e.to_string())?
            .get::<_, bool>(0))
    });
    let has: bool = leaf
        .query_one("select to_regclass('reporting.daily') is not null", &[])
        .unwrap()
        .get(0);
    assert!(!has);
    assert!(
        r.log("leaf")
            .contains("06_reporting.sql: its --*-- header matches nothing on this node")
    );

    // Bad files are refused before anything runs, naming the file.
    r.dir
        .write("08_tx.sql", "begin;\ncreate table t8 (id int);\ncommit;\n");
    let (ok, out) = execute(&r, "root", &["07_marker.sql", "08_tx.sql"]);
    assert!(
        !ok && out.contains("08_tx.sql line 1: begin is refused"),
        "{out}"
    );
    let (ok, out) = execute(&r, "root", &["no_such.sql"]);
    assert!(!ok && out.contains("cannot read no_such.sql"), "{out}");
    r.dir.write(
        "09_bad.sql",
        "create table t9 (id int primary key);\nselect nonsense from nowhere;\n",
    );
    let (ok, out) = execute(&r, "root", &["09_bad.sql"]);
    assert!(
        !ok && out.contains("09_bad.sql: statement 2 (line 2) failed"),
        "{out}"
    );
    let t9: bool = r
        .client("root")
        .query_one("select to_regclass('public.t9') is null", &[])
        .unwrap()
        .get(0);
    assert!(t9, "a failed file leaves nothing behind on the root");
    // ...and can be run again once fixed.
    r.dir
        .write("09_bad.sql", "create table t9 (id int primary key);\n");
    let (ok, out) = execute(&r, "root", &["09_bad.sql"]);
    assert!(ok, "{out}");
}

/// No superuser anywhere: a role that owns the tables (and the databases)
/// sets up the nodes, runs the ticker and the workers, and runs `execute`.
#[test]
fn execute_needs_only_the_tables_owner() {
    let mut r = Rig::new(&["root", "leaf"]);
    let c = Cluster::shared();
    let role = unique_name("ddl_owner");
    c.client("postgres")
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
        ))
        .unwrap();
    for n in r.nodes.iter_mut() {
        c.client(&n.1)
            .batch_execute(&format!(
                "ALTER DATABASE \"{}\" OWNER TO {role}; ALTER SCHEMA public OWNER TO {role};
                 ALTER TABLE orders OWNER TO {role}; ALTER TABLE items OWNER TO {role};",
                n.1
            ))
            .unwrap();
        n.2 = n.2.replace("user=postgres", &format!("user={role}"));
        r.dir.write(&format!("{}.ini", n.0), &node_ini(&n.2, &n.0));
    }
    r.dir.write(
        "ticker.ini",
        &format!(
            "[pgqd]\nbase_connstr = host=127.0.0.1 port={} user={role}\ndatabase_list = {}\nlogfile = log/ticker.log\nticker_period = 0.05\n",
            c.port(),
            r.nodes[0].1
        ),
    );
    let r = root_and_leaf(r);
    r.dir.write(
        "10_owner.sql",
        "alter table orders add column owner_note text;\ncreate index orders_owner_note on orders (owner_note);\n",
    );
    let (ok, out) = execute(&r, "root", &["10_owner.sql"]);
    assert!(ok, "{out}");
    let mut root = r.client("root");
    let su: bool = root
        .query_one(
            "select rolsuper from pg_roles where rolname = current_user",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!su, "the test must run without superuser");
    root.batch_execute("insert into orders (note, owner_note) values ('by owner', 'yes')")
        .unwrap();
    wait_equal_tables(&r, "root", "leaf", &["public.orders", "public.items"]);
    assert_eq!(
        columns(&mut r.client("leaf"), "public.orders"),
        ["id integer", "note text", "n integer", "owner_note text"]
    );
}
