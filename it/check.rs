//! `check`, the pre-flight: a root and a leaf set up with one of each kind
//! of problem (no key, a sequence not added, columns and types that differ,
//! foreign keys leaving the replicated set, a table not added, one gone, a
//! trigger that fires on apply, missing privileges and ownership, a missing
//! grant), each reported on one line with its fix and exit status 1; a
//! clean set exits 0, and prints nothing with -q. A replica on PostgreSQL 13
//! is told about a multirange column it cannot hold. No worker runs: the
//! check is what an operator runs before starting one.

use crate::harness::{Cluster, run, unique_name};
use crate::repl::{Repl, worker_ini};
use crate::tutorial::{ok, output_text};

const MASTER: &str = "
    CREATE TABLE nokey (id int PRIMARY KEY, v text);
    CREATE TABLE parent (id int PRIMARY KEY);
    CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent);
    CREATE SEQUENCE extseq;
    CREATE TABLE seqt (id int PRIMARY KEY DEFAULT nextval('extseq'));
    CREATE TABLE cols (id int PRIMARY KEY, a int, b text, c int);
    CREATE TABLE notadded (id int PRIMARY KEY);
    CREATE TABLE nopk (id int PRIMARY KEY, v text);
    CREATE TABLE fkout (id int PRIMARY KEY, ref int);
    CREATE TABLE trig (id int PRIMARY KEY);
    CREATE TABLE gone (id int PRIMARY KEY);
    CREATE TABLE lacking (id int PRIMARY KEY);
    CREATE TABLE owned (id int PRIMARY KEY, k int);
    CREATE SCHEMA hid;
    CREATE TABLE hid.h (id int PRIMARY KEY);
";

/// The leaf's tables, owned by postgres: the test gives most of them to the
/// worker's role below.
const SLAVE: &str = "
    CREATE TABLE nokey (id int PRIMARY KEY, v text);
    CREATE TABLE child (id int PRIMARY KEY, parent_id int);
    CREATE SEQUENCE extseq;
    CREATE TABLE seqt (id int PRIMARY KEY DEFAULT nextval('extseq'));
    CREATE TABLE cols (id int PRIMARY KEY, a text, c int, d int NOT NULL);
    CREATE TABLE notadded (id int PRIMARY KEY);
    CREATE TABLE nopk (id int, v text);
    CREATE TABLE local_only (id int PRIMARY KEY);
    CREATE TABLE fkout (id int PRIMARY KEY, ref int REFERENCES local_only);
    CREATE TABLE trig (id int PRIMARY KEY);
    CREATE TABLE local_ref (id int PRIMARY KEY, t int REFERENCES trig);
    CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
    CREATE TRIGGER audit_ins BEFORE INSERT ON trig FOR EACH ROW EXECUTE PROCEDURE audit();
    CREATE TABLE gone (id int PRIMARY KEY);
    CREATE TABLE lacking (id int PRIMARY KEY);
    CREATE TABLE owned (id int PRIMARY KEY, k int REFERENCES nokey);
    CREATE TABLE onlyhere (id int PRIMARY KEY);
    CREATE SCHEMA hid;
    CREATE TABLE hid.h (id int PRIMARY KEY);
";

#[test]
fn check_lists_each_problem_with_its_fix() {
    let r = Repl::new("chk", MASTER, SLAVE, "");
    let c = Cluster::shared();
    // The leaf's worker runs as a plain role (no superuser, so no replica
    // mode): it owns its tables but lacking's and owned's.
    let role = unique_name("chk_role");
    c.client("postgres")
        .batch_execute(&format!("CREATE ROLE {role} LOGIN NOSUPERUSER"))
        .unwrap();
    let mut s = c.client(&r.slave);
    s.batch_execute(&format!(
        "GRANT CREATE ON DATABASE {db} TO {role};
         GRANT USAGE, CREATE ON SCHEMA public TO {role};
         ALTER TABLE nokey OWNER TO {role}; ALTER TABLE child OWNER TO {role};
         ALTER SEQUENCE extseq OWNER TO {role}; ALTER TABLE seqt OWNER TO {role};
         ALTER TABLE cols OWNER TO {role}; ALTER TABLE notadded OWNER TO {role};
         ALTER TABLE nopk OWNER TO {role}; ALTER TABLE local_only OWNER TO {role};
         ALTER TABLE fkout OWNER TO {role}; ALTER TABLE trig OWNER TO {role};
         ALTER TABLE local_ref OWNER TO {role}; ALTER TABLE gone OWNER TO {role};
         ALTER TABLE onlyhere OWNER TO {role};
         GRANT USAGE ON SCHEMA hid TO {role}; ALTER TABLE hid.h OWNER TO {role};
         GRANT SELECT, TRIGGER ON lacking TO {role};
         GRANT ALL ON owned TO {role};",
        db = r.slave
    ))
    .unwrap();
    r.dir.write(
        "slave.ini",
        &worker_ini(&format!("{} user={role}", r.sconn), "slave"),
    );
    let slave_conn = format!("{} user={role}", r.sconn);
    let d = r.d();
    ok(
        "londiste3",
        &["master.ini", "create-root", "master", &r.mconn],
        d,
    );
    let prov = format!("--provider={}", r.mconn);
    ok(
        "londiste3",
        &["slave.ini", "create-leaf", "slave", &slave_conn, &prov],
        d,
    );
    for t in [
        "nokey", "child", "seqt", "cols", "notadded", "nopk", "fkout", "trig", "gone", "lacking",
        "owned", "hid.h",
    ] {
        let t = if t.contains('.') {
            t.to_string()
        } else {
            format!("public.{t}")
        };
        ok("londiste3", &["master.ini", "add-table", &t], d);
    }
    c.client(&r.master)
        .batch_execute("ALTER TABLE nokey DROP CONSTRAINT nokey_pkey")
        .unwrap();
    for t in [
        "nokey", "child", "seqt", "cols", "fkout", "trig", "gone", "lacking", "owned", "hid.h",
    ] {
        let t = if t.contains('.') {
            t.to_string()
        } else {
            format!("public.{t}")
        };
        ok("londiste3", &["slave.ini", "add-table", &t], d);
    }
    ok(
        "londiste3",
        &["slave.ini", "add-table", "public.nopk", "--key=id"],
        d,
    );
    // --force: a table the provider does not replicate (yet).
    ok(
        "londiste3",
        &["slave.ini", "add-table", "public.onlyhere", "--force"],
        d,
    );
    s.batch_execute(&format!("REVOKE USAGE ON SCHEMA hid FROM {role}"))
        .unwrap();
    s.batch_execute(
        "DROP TABLE gone;
         -- Stands in for the installed pgq.missing_grants() (whose own lines
         -- it/pgq_grants.rs checks): check prints whatever it returns.
         CREATE OR REPLACE FUNCTION pgq.missing_grants() RETURNS SETOF text LANGUAGE sql
             AS $$ SELECT 'role app lacks USAGE on schema pgq; fix: GRANT USAGE ON SCHEMA pgq TO app'::text $$;",
    )
    .unwrap();

    let lines = |ini: &str| -> (Option<i32>, Vec<String>, String) {
        let out = run("londiste3", &[ini, "check"], d);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.code(),
            stdout.lines().map(String::from).collect(),
            output_text(&out),
        )
    };
    let (code, got, all) = lines("master.ini");
    let want = [
        "public.child: foreign key child_parent_id_fkey references public.parent, which is not added: a subscriber with this key cannot hold the rows; fix: londiste3 master.ini add-table public.parent",
        "public.nokey: no primary key: its updates and deletes cannot be replicated; fix: ALTER TABLE public.nokey ADD PRIMARY KEY (...), or londiste3 master.ini remove-table public.nokey then londiste3 master.ini add-table public.nokey --key=COL[,COL]",
        "public.seqt: uses sequence public.extseq, which is not added: after a cut-over it would hand out used values; fix: londiste3 master.ini add-seq public.extseq",
    ];
    assert_eq!(got, want, "root check:\n{all}");
    assert_eq!(code, Some(1), "{all}");
    assert!(
        all.contains("check: 3 problem(s) in 3 table(s) on node master"),
        "{all}"
    );

    let (code, got, all) = lines("slave.ini");
    let rl = &role;
    let want = [
        format!("hid.h: role {rl} has no USAGE on schema hid: the copy and the apply fail; fix: GRANT USAGE ON SCHEMA hid TO {rl}"),
        "node: role app lacks USAGE on schema pgq; fix: GRANT USAGE ON SCHEMA pgq TO app".to_string(),
        "public.cols: column a is integer on the provider but text here; fix: ALTER TABLE public.cols ALTER COLUMN a TYPE integer".into(),
        "public.cols: column b (text) of the provider is missing here: the copy stops; fix: ALTER TABLE public.cols ADD COLUMN b text".into(),
        "public.cols: column d is NOT NULL without a default here and the provider has no such column: inserts fail; fix: ALTER TABLE public.cols ALTER COLUMN d DROP NOT NULL".into(),
        "public.fkout: foreign key fkout_ref_fkey references public.local_only, which is not replicated to this node: rows whose parent is missing here break the apply and the key's restore after a copy; fix: londiste3 slave.ini add-table public.local_only, or ALTER TABLE public.fkout DROP CONSTRAINT fkout_ref_fkey".into(),
        "public.gone: public.gone does not exist on this node; fix: create it like the provider's (pg_dump --schema-only), or londiste3 slave.ini remove-table public.gone then londiste3 slave.ini add-table public.gone --create".into(),
        format!("public.lacking: role {rl} lacks INSERT, UPDATE, DELETE, TRUNCATE on public.lacking: the copy, the apply or a cut-over (which creates triggers) fails; fix: GRANT INSERT, UPDATE, DELETE, TRUNCATE ON public.lacking TO {rl}"),
        "public.nopk: no primary key or unique index on (id) on this node: its updates cannot be applied; fix: ALTER TABLE public.nopk ADD PRIMARY KEY (id)".into(),
        "public.notadded: is replicated on the provider but not added here; fix: londiste3 slave.ini add-table public.notadded".into(),
        "public.onlyhere: is not replicated on the provider: nothing reaches it; fix: add it there, or londiste3 slave.ini remove-table public.onlyhere".into(),
        format!("public.owned: role {rl} does not own public.owned, and a copy drops and restores its foreign keys (ALTER TABLE); fix: ALTER TABLE public.owned OWNER TO {rl}"),
        "public.seqt: uses sequence public.extseq, which is not added: after a cut-over it would hand out used values; fix: londiste3 slave.ini add-seq public.extseq (on the root first if the provider lacks it)".into(),
        "public.trig: foreign key local_ref_t_fkey of public.local_ref, which is not replicated, references this table: a copy drops it and its restore fails if rows of public.local_ref lose their parent; fix: londiste3 slave.ini add-table public.local_ref, or ALTER TABLE public.local_ref DROP CONSTRAINT local_ref_t_fkey".into(),
        format!("public.trig: trigger audit_ins fires when the worker applies rows (role {rl} cannot set session_replication_role = replica); fix: ALTER TABLE public.trig DISABLE TRIGGER audit_ins, or let the role set it (GRANT SET ON PARAMETER session_replication_role TO {rl}, 15+)"),
    ];
    assert_eq!(got, want, "leaf check:\n{all}");
    assert_eq!(code, Some(1), "{all}");
    assert!(
        all.contains("check: 15 problem(s) in 11 table(s) on node slave"),
        "{all}"
    );
    // -q changes nothing when there is something to say.
    let out = run("londiste3", &["-q", "slave.ini", "check"], d);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 15);
    // One table: only its lines.
    let out = run("londiste3", &["slave.ini", "check", "public.cols"], d);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.lines()
            .all(|l| l.starts_with("public.cols: ") || l.starts_with("node: ")),
        "{text}"
    );
}

#[test]
fn check_of_a_clean_set_exits_0() {
    let sql = "CREATE TABLE a (id serial PRIMARY KEY, v text);
               CREATE TABLE b (id int PRIMARY KEY, a_id int REFERENCES a);";
    let r = Repl::new("chkok", sql, sql, "");
    r.nodes();
    r.add_tables(&["public.a", "public.b"]);
    for ini in ["master.ini", "slave.ini"] {
        let out = run("londiste3", &[ini, "check"], r.d());
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(0), "{ini}: {text}");
        let node = ini.trim_end_matches(".ini");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("check: no problems on node {node} (2 table(s))\n"),
            "{text}"
        );
        // Cron: nothing at all when clean.
        let out = run("londiste3", &["-q", ini, "check"], r.d());
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(output_text(&out), "", "{ini} -q");
    }
}

/// A multirange column (14+) on the provider, and a replica on 13.
#[test]
fn check_names_a_type_the_replica_cannot_hold() {
    let old = Cluster::start_major(13);
    let c = Cluster::shared();
    let master = unique_name("chkv_m");
    let slave = unique_name("chkv_s");
    let (mconn, sconn) = (c.create_db(&master), old.create_db(&slave));
    c.client(&master)
        .batch_execute("CREATE TABLE m (id int PRIMARY KEY, r text)")
        .unwrap();
    old.client(&slave)
        .batch_execute("CREATE TABLE m (id int PRIMARY KEY, r text)")
        .unwrap();
    let r = Repl::nodes_at("chkv", &mconn, &sconn);
    let d = r.d();
    ok("londiste3", &["master.ini", "add-table", "public.m"], d);
    ok("londiste3", &["slave.ini", "add-table", "public.m"], d);
    // The provider's column changes type after the table was added.
    c.client(&master)
        .batch_execute("ALTER TABLE m ALTER COLUMN r TYPE int4multirange USING r::int4multirange")
        .unwrap();
    let out = run("londiste3", &["slave.ini", "check"], d);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "public.m: cannot replicate public.m: column \"r\" has type int4multirange, which PostgreSQL 13 does not have (multiranges came in 14); change the column's type on the provider, or replicate into PostgreSQL 14 or newer",
        ],
        "{}",
        output_text(&out)
    );
}
