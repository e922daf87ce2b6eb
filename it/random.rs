//! Randomized differential test with fault injection (issue 5).
//!
//! Two private clusters: the provider (master database, `pgqd`, root worker)
//! and the subscriber (slave database, branch worker), so crashing either
//! one disturbs no other test. The master has a parent table and a child
//! with a foreign key (ON UPDATE/DELETE CASCADE; the slave has the same FK),
//! a composite (int, text) key table, a text-key table with Unicode, quotes
//! and backslashes in its keys, a 30-column table of assorted types (NULLs,
//! numeric NaN, float edge values, timestamptz, jsonb, json, bytea, arrays,
//! ranges, an enum, TOASTed text), and per round a big table that is added
//! while the load runs.
//!
//! Each round, three writer sessions run random multi-statement transactions
//! (inserts, upserts, updates, deletes, primary-key changes incl. cascading
//! ones, rare TRUNCATEs, savepoints rolled back to after deliberate errors,
//! rolled-back transactions) and a fourth session runs long transactions
//! spanning many ticks. Meanwhile faults are injected at random moments,
//! every kind at least once per round: SIGKILL of the slave worker, of the
//! ticker, and of the worker while it COPYs the newly added big table and
//! again while that copy catches up;
//! `pg_terminate_backend` of every `londiste-rs%` session on both clusters;
//! immediate-mode crash + restart of the subscriber and of the provider
//! cluster; `remove-table` (slave, then master) of a replicated table while
//! writes go on (it is no longer compared). Then the writers stop and every
//! replicated table on the slave must converge to the master's rows and
//! `londiste3 slave.ini compare` must succeed.
//!
//! The provider runs with `synchronous_commit = on` (the harness default is
//! off): with asynchronous commit a provider crash can lose transactions the
//! subscriber has already applied (and tick ids get reused), which no
//! replication system can undo. The subscriber keeps the harness default
//! (off): the worker must make its own commits durable before it finishes a
//! batch on the provider (this test found that it did not: "lost position"
//! after a subscriber crash).
//!
//! The subscriber connects either as a superuser (replica mode: FKs and user
//! triggers do not fire while applying) or as a plain role owning the slave
//! database (the FK is enforced while applying), picked by the seed or by
//! `LONDISTE_RANDOM_SUBSCRIBER=superuser|plain`.
//!
//! `LONDISTE_RANDOM_SEED` fixes the seed (printed at the start, in every
//! failure message and in the summary; it reproduces the generated
//! transactions and the fault schedule, not the threads' interleaving),
//! `LONDISTE_RANDOM_ROUNDS` (default 2) and `LONDISTE_RANDOM_SECONDS`
//! (default 12, load per round) make it run longer.

use crate::harness::{Cluster, KillOnDrop, Rng, TestDir, run, spawn, tables_diff, unique_name};
use crate::tutorial::output_text;
use postgres::{Client, NoTls};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PARENTS: u64 = 300;
const CHILDREN: u64 = 3000;
const PAIR_K1: u64 = 40;
const TEXT_KEYS: u64 = 400;
const WIDE_IDS: u64 = 200;
const BIG_ROWS: u64 = 300_000;
const GONE_IDS: u64 = 200;
/// Tables replicated from the start and compared after every round.
const BASE_TABLES: &[&str] = &[
    "public.parent",
    "public.child",
    "public.pairs",
    "public.texts",
    "public.wide",
];
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

const SCHEMA: &str = r#"
create type mood as enum ('sad', 'ok', 'happy', 'it''s "quoted"');
create table parent (id int primary key, name text not null, amount numeric(14,3));
create table child (id int primary key,
  parent_id int not null references parent (id) on update cascade on delete cascade,
  note text, qty int);
create index on child (parent_id);
create table pairs (k1 int, k2 text, v text, n int, primary key (k1, k2));
create table texts (k text primary key, v text, n int);
create table wide (id int primary key, c_int int, c_big bigint, c_small smallint, c_num numeric,
  c_num2 numeric(20,6), c_f8 float8, c_f4 real, c_bool boolean, c_text text, c_vchar varchar(40),
  c_char char(6), c_date date, c_ts timestamp, c_tstz timestamptz, c_interval interval,
  c_jsonb jsonb, c_json json, c_bytea bytea, c_int_arr int[], c_text_arr text[], c_uuid uuid,
  c_inet inet, c_time time, c_num_arr numeric[], c_tstz_arr timestamptz[], c_bits varbit(16),
  c_range int4range, c_mood mood, c_long text);
create table gone (id int primary key, v int, t text);
"#;

/// The wide table's columns after `id`, in order.
const WIDE_COLS: &[&str] = &[
    "c_int",
    "c_big",
    "c_small",
    "c_num",
    "c_num2",
    "c_f8",
    "c_f4",
    "c_bool",
    "c_text",
    "c_vchar",
    "c_char",
    "c_date",
    "c_ts",
    "c_tstz",
    "c_interval",
    "c_jsonb",
    "c_json",
    "c_bytea",
    "c_int_arr",
    "c_text_arr",
    "c_uuid",
    "c_inet",
    "c_time",
    "c_num_arr",
    "c_tstz_arr",
    "c_bits",
    "c_range",
    "c_mood",
    "c_long",
];

/// Pieces of awkward text for keys and values.
const PIECES: &[&str] = &[
    "plain",
    "it's",
    "\"dq\"",
    "back\\slash",
    "tab\there",
    "nl\nline",
    "ü",
    "日本語",
    "😀",
    "a b",
    " lead",
    "trail ",
    "%_",
    "$$",
    "--",
    ";",
    "E'x'",
    "NULL",
    "(1,2)",
    "{a,b}",
    "ß",
    "ǅ",
    "\u{200b}",
    "Ω≈ç",
    "\\x00",
    ",",
];

// ---------------------------------------------------------------------------
// Randomness

/// splitmix64: derives independent seeds from one.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(mix(seed).max(1))
    }
    /// 1..=n
    fn id(&mut self, n: u64) -> u64 {
        1 + self.below(n)
    }
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn initial_seed() -> u64 {
    match std::env::var("LONDISTE_RANDOM_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("LONDISTE_RANDOM_SEED={v:?} is not a number")),
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_000_000
        }
    }
}

// ---------------------------------------------------------------------------
// SQL values

/// A standard-conforming string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn weird(rng: &mut Rng, max_pieces: u64) -> String {
    let mut s = String::new();
    for _ in 0..rng.below(max_pieces + 1) {
        s.push_str(rng.pick(PIECES));
        if rng.chance(1, 3) {
            s.push_str(&rng.below(1000).to_string());
        }
    }
    s
}

/// The n-th key of the text-key table: Unicode, quotes, backslashes, spaces,
/// and the empty string.
fn text_key(n: u64) -> String {
    if n == 0 {
        return String::new();
    }
    let l = PIECES.len() as u64;
    format!(
        "{}{n}{}",
        PIECES[(n % l) as usize],
        PIECES[((n / l) % l) as usize]
    )
}

fn pair_k2(rng: &mut Rng) -> String {
    format!(
        "{}-{}",
        rng.pick(&["a", "b", "ü", "x'y", "s p", "\\"]),
        rng.below(8)
    )
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_value(rng: &mut Rng, depth: u32) -> String {
    match rng.below(if depth > 2 { 5 } else { 7 }) {
        0 => "null".into(),
        1 => rng.pick(&["true", "false"]).to_string(),
        2 => format!("{}", rng.below(100_000) as i64 - 50_000),
        3 => rng
            .pick(&["1.5", "-0.0", "1e300", "0.1", "12345678901234567890"])
            .to_string(),
        4 => json_str(&weird(rng, 3)),
        5 => {
            let n = rng.below(4);
            let v: Vec<String> = (0..n).map(|_| json_value(rng, depth + 1)).collect();
            format!("[{}]", v.join(", "))
        }
        _ => {
            let n = rng.below(4);
            let v: Vec<String> = (0..n)
                .map(|i| {
                    format!(
                        "{}: {}",
                        json_str(&format!("{}{i}", weird(rng, 1))),
                        json_value(rng, depth + 1)
                    )
                })
                .collect();
            format!("{{ {} }}", v.join(",  "))
        }
    }
}

fn float8(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => rng
            .pick(&["'NaN'", "'Infinity'", "'-Infinity'", "'-0'", "'5e-324'"])
            .to_string(),
        1 => {
            let f = f64::from_bits(rng.next());
            if f.is_finite() {
                format!("'{f:e}'")
            } else {
                "'1.7976931348623157e308'".into()
            }
        }
        _ => format!("{}", (rng.next() % 2_000_000) as f64 / 7.0 - 100_000.0),
    }
}

fn float4(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => rng.pick(&["'NaN'", "'-Infinity'", "'1e-45'"]).to_string(),
        1 => {
            let f = f32::from_bits(rng.next() as u32);
            if f.is_finite() {
                format!("'{f:e}'")
            } else {
                "'3.4028235e38'".into()
            }
        }
        _ => format!("{}", (rng.below(200_000) as f32) / 3.0),
    }
}

fn numeric(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => rng
            .pick(&[
                "'NaN'",
                "0",
                "-0.000000001",
                "12345678901234567890.123456789",
                "1e-20",
                "100.100",
            ])
            .to_string(),
        _ => format!(
            "{}{}.{}",
            if rng.chance(1, 3) { "-" } else { "" },
            rng.below(10_000_000),
            rng.below(1_000_000)
        ),
    }
}

fn micros_literal(rng: &mut Rng) -> String {
    format!(
        "{}.{:06} seconds",
        rng.below(2_000_000_000),
        rng.below(1_000_000)
    )
}

/// A random SQL value for column `i` of `WIDE_COLS` (NULL a fifth of the time).
fn wide_value(rng: &mut Rng, i: usize) -> String {
    if rng.chance(1, 5) {
        return "NULL".into();
    }
    match WIDE_COLS[i] {
        "c_int" => format!("{}", rng.next() as i32),
        "c_big" => format!("{}", rng.next() as i64),
        "c_small" => format!("{}", rng.next() as i16),
        "c_num" => numeric(rng),
        "c_num2" => format!(
            "{}.{:06}",
            rng.below(100_000_000_000_000),
            rng.below(1_000_000)
        ),
        "c_f8" => float8(rng),
        "c_f4" => float4(rng),
        "c_bool" => rng.pick(&["true", "false"]).to_string(),
        "c_text" => lit(&weird(rng, 6)),
        "c_vchar" => lit(&weird(rng, 4).chars().take(40).collect::<String>()),
        "c_char" => lit(&weird(rng, 2).chars().take(6).collect::<String>()),
        "c_date" => match rng.below(8) {
            0 => "'infinity'".into(),
            1 => "'-infinity'".into(),
            _ => format!("date '1999-12-31' + {}", rng.below(40_000) as i64 - 20_000),
        },
        "c_ts" => match rng.below(8) {
            0 => "'infinity'".into(),
            _ => format!(
                "timestamp '1970-01-01' + interval '{}'",
                micros_literal(rng)
            ),
        },
        "c_tstz" => match rng.below(8) {
            0 => "'-infinity'".into(),
            _ => format!(
                "timestamptz '1970-01-01 00:00:00+00' + interval '{}'",
                micros_literal(rng)
            ),
        },
        "c_interval" => format!(
            "interval '{} years {} mons {} days {}'",
            rng.below(100) as i64 - 50,
            rng.below(12),
            rng.below(1000) as i64 - 500,
            micros_literal(rng)
        ),
        "c_jsonb" => format!("{}::jsonb", lit(&json_value(rng, 0))),
        "c_json" => format!("{}::json", lit(&json_value(rng, 0))),
        "c_bytea" => {
            let n = rng.below(64);
            let hex: String = (0..n).map(|_| format!("{:02x}", rng.below(256))).collect();
            format!("'\\x{hex}'::bytea")
        }
        "c_int_arr" => match rng.below(4) {
            0 => "'{}'::int[]".into(),
            1 => format!(
                "'{{{{{},{}}},{{NULL,{}}}}}'::int[]",
                rng.below(9),
                rng.below(9),
                rng.below(9)
            ),
            _ => {
                let v: Vec<String> = (0..1 + rng.below(6))
                    .map(|_| {
                        if rng.chance(1, 5) {
                            "NULL".into()
                        } else {
                            (rng.next() as i32).to_string()
                        }
                    })
                    .collect();
                format!("'{{{}}}'::int[]", v.join(","))
            }
        },
        "c_text_arr" => {
            let v: Vec<String> = (0..rng.below(5))
                .map(|_| {
                    if rng.chance(1, 5) {
                        "NULL".into()
                    } else {
                        lit(&weird(rng, 3))
                    }
                })
                .collect();
            format!("ARRAY[{}]::text[]", v.join(", "))
        }
        "c_uuid" => {
            let (a, b) = (rng.next(), rng.next());
            format!(
                "'{:08x}-{:04x}-{:04x}-{:04x}-{:012x}'",
                a >> 32,
                (a >> 16) & 0xffff,
                a & 0xffff,
                b >> 48,
                b & 0xffff_ffff_ffff
            )
        }
        "c_inet" => match rng.below(3) {
            0 => format!(
                "'10.{}.{}.{}/8'",
                rng.below(256),
                rng.below(256),
                rng.below(256)
            ),
            1 => format!("'2001:db8::{:x}/64'", rng.below(65536)),
            _ => format!("'192.168.{}.{}'", rng.below(256), rng.below(256)),
        },
        "c_time" => format!(
            "'{:02}:{:02}:{:02}.{:06}'",
            rng.below(24),
            rng.below(60),
            rng.below(60),
            rng.below(1_000_000)
        ),
        "c_num_arr" => format!(
            "'{{{},NaN,NULL,{}}}'::numeric[]",
            rng.below(1000),
            numeric(rng).trim_matches('\'')
        ),
        "c_tstz_arr" => format!(
            "ARRAY[timestamptz '2000-01-01 00:00:00+00' + interval '{}', NULL, 'infinity']::timestamptz[]",
            micros_literal(rng)
        ),
        "c_bits" => {
            let n = rng.below(17);
            let b: String = (0..n)
                .map(|_| if rng.chance(1, 2) { '1' } else { '0' })
                .collect();
            format!("B'{b}'")
        }
        "c_range" => match rng.below(4) {
            0 => "'empty'".into(),
            1 => format!("'(,{}]'", rng.below(100)),
            _ => {
                let a = rng.below(1000) as i64 - 500;
                format!("int4range({a}, {})", a + 1 + rng.below(100) as i64)
            }
        },
        "c_mood" => lit(rng.pick(&["sad", "ok", "happy", "it's \"quoted\""])),
        "c_long" => format!(
            "repeat({}, {})",
            lit(&format!("{}ab'c", weird(rng, 1))),
            rng.below(3000)
        ),
        other => unreachable!("no generator for {other}"),
    }
}

fn wide_row(rng: &mut Rng, id: u64) -> String {
    let vals: Vec<String> = (0..WIDE_COLS.len()).map(|i| wide_value(rng, i)).collect();
    format!("({id}, {})", vals.join(", "))
}

// ---------------------------------------------------------------------------
// The workload

/// The tables the writers may touch besides the base tables.
#[derive(Clone, Default)]
struct Extra {
    bigs: Vec<String>,
    gone: Option<String>,
}

/// One random statement and what kind of change it is.
fn statement(rng: &mut Rng, extra: &Extra) -> (&'static str, String) {
    let trunc = rng.chance(1, 700);
    let mut tables = vec![
        "parent", "parent", "child", "child", "child", "pairs", "pairs",
    ];
    tables.extend(["texts", "texts", "wide", "wide"]);
    if !extra.bigs.is_empty() {
        tables.extend(["big", "big"]);
    }
    if extra.gone.is_some() {
        tables.push("gone");
    }
    let table = rng.pick(&tables);
    if trunc && ["child", "pairs", "texts", "wide"].contains(&table) {
        return ("truncate", format!("truncate {table}"));
    }
    match table {
        "parent" => {
            let id = rng.id(PARENTS);
            match rng.below(10) {
                0..=2 => {
                    let conflict = if rng.chance(2, 3) {
                        " on conflict (id) do nothing"
                    } else {
                        ""
                    };
                    (
                        "insert",
                        format!(
                            "insert into parent values ({id}, {}, {}){conflict}",
                            lit(&weird(rng, 2)),
                            if rng.chance(1, 4) {
                                "NULL".into()
                            } else {
                                format!("{}.{:03}", rng.below(100_000), rng.below(1000))
                            }
                        ),
                    )
                }
                3 | 4 => (
                    "update",
                    format!(
                        "update parent set amount = coalesce(amount, 0) + {}, name = {} where id = {id}",
                        rng.below(100),
                        lit(&weird(rng, 2))
                    ),
                ),
                5 => (
                    "update",
                    format!("update parent set amount = NULL where id between {id} and {id} + 5"),
                ),
                6 | 7 => (
                    "pk_change",
                    format!("update parent set id = {} where id = {id}", rng.id(PARENTS)),
                ),
                _ => ("delete", format!("delete from parent where id = {id}")),
            }
        }
        "child" => {
            let id = rng.id(CHILDREN);
            let p = rng.id(PARENTS);
            match rng.below(12) {
                0..=3 => (
                    "insert",
                    format!(
                        "insert into child (id, parent_id, note, qty) select {id}, id, {}, {} \
                         from parent where id >= {p} order by id limit 1 on conflict (id) do nothing",
                        lit(&weird(rng, 3)),
                        rng.below(100)
                    ),
                ),
                4 | 5 => (
                    "update",
                    format!(
                        "update child set qty = coalesce(qty, 0) + 1, note = {} where id between {id} and {id} + 3",
                        lit(&weird(rng, 2))
                    ),
                ),
                6 => (
                    "update",
                    format!(
                        "update child set parent_id = p.id from (select id from parent where id >= {p} \
                         order by id limit 1) p where child.id = {id}"
                    ),
                ),
                7 => (
                    "pk_change",
                    format!("update child set id = {} where id = {id}", rng.id(CHILDREN)),
                ),
                8 => (
                    "pk_change",
                    if rng.chance(1, 2) {
                        format!("update child set id = -id where id between {id} and {id} + 2")
                    } else {
                        format!("update child set id = -id where id between -{id} - 2 and -{id}")
                    },
                ),
                9 => (
                    "delete",
                    format!("delete from child where id between {id} and {id} + 2"),
                ),
                10 => ("delete", format!("delete from child where parent_id = {p}")),
                _ => (
                    "delete",
                    format!("delete from child where id between -{id} - 2 and -{id}"),
                ),
            }
        }
        "pairs" => {
            let k1 = rng.id(PAIR_K1);
            let k2 = lit(&pair_k2(rng));
            match rng.below(9) {
                0..=2 => (
                    "upsert",
                    format!(
                        "insert into pairs values ({k1}, {k2}, {}, {}) on conflict (k1, k2) \
                         do update set v = excluded.v, n = pairs.n + 1",
                        lit(&weird(rng, 2)),
                        rng.below(1000)
                    ),
                ),
                3 => (
                    "update",
                    format!(
                        "update pairs set v = coalesce(v, '') || {}, n = NULL where k1 = {k1}",
                        lit(&weird(rng, 1))
                    ),
                ),
                4 => (
                    "pk_change",
                    format!(
                        "update pairs set k2 = k2 || {} where k1 = {k1} and length(k2) < 30 \
                         and k2 = (select min(k2) from pairs where k1 = {k1})",
                        lit(rng.pick(&["'", "ü", "+", " "]))
                    ),
                ),
                5 => {
                    let to = rng.id(PAIR_K1);
                    (
                        "pk_change",
                        format!(
                            "update pairs set k1 = {to} where k1 = {k1} \
                             and not exists (select 1 from pairs where k1 = {to})"
                        ),
                    )
                }
                6 => (
                    "delete",
                    format!("delete from pairs where k1 = {k1} and k2 = {k2}"),
                ),
                7 => (
                    "delete",
                    format!(
                        "delete from pairs where k1 = {k1} and k2 = (select max(k2) from pairs where k1 = {k1})"
                    ),
                ),
                _ => ("delete", format!("delete from pairs where k1 = {k1}")),
            }
        }
        "texts" => {
            let k = lit(&text_key(rng.below(TEXT_KEYS)));
            match rng.below(9) {
                0..=2 => (
                    "upsert",
                    format!(
                        "insert into texts values ({k}, {}, {}) on conflict (k) do update set v = excluded.v",
                        lit(&weird(rng, 4)),
                        rng.below(100)
                    ),
                ),
                3 | 4 => (
                    "update",
                    format!(
                        "update texts set v = {}, n = coalesce(n, 0) + 1 where k = {k}",
                        if rng.chance(1, 4) {
                            "NULL".into()
                        } else {
                            lit(&weird(rng, 4))
                        }
                    ),
                ),
                5 => (
                    "pk_change",
                    format!(
                        "update texts set k = {} where k = {k}",
                        lit(&text_key(rng.below(TEXT_KEYS)))
                    ),
                ),
                6 => (
                    "pk_change",
                    format!(
                        "update texts set k = k || {} where k = {k} and length(k) < 60",
                        lit(rng.pick(PIECES))
                    ),
                ),
                7 => {
                    let k2 = lit(&text_key(rng.below(TEXT_KEYS)));
                    (
                        "delete",
                        format!(
                            "delete from texts where k >= least({k}, {k2}) and k <= greatest({k}, {k2}) and n is null"
                        ),
                    )
                }
                _ => ("delete", format!("delete from texts where k = {k}")),
            }
        }
        "wide" => {
            let id = rng.id(WIDE_IDS);
            match rng.below(10) {
                0..=2 => (
                    "insert",
                    format!(
                        "insert into wide values {} on conflict (id) do nothing",
                        wide_row(rng, id)
                    ),
                ),
                3..=5 => {
                    let n = 1 + rng.below(6);
                    let sets: Vec<String> = (0..n)
                        .map(|_| {
                            let c = rng.below(WIDE_COLS.len() as u64) as usize;
                            (c, wide_value(rng, c))
                        })
                        .collect::<BTreeMap<usize, String>>()
                        .into_iter()
                        .map(|(c, v)| format!("{} = {v}", WIDE_COLS[c]))
                        .collect();
                    let cond = if rng.chance(1, 4) {
                        format!("id between {id} and {id} + 3")
                    } else {
                        format!("id = {id}")
                    };
                    (
                        "update",
                        format!("update wide set {} where {cond}", sets.join(", ")),
                    )
                }
                6 | 7 => (
                    "pk_change",
                    format!("update wide set id = {} where id = {id}", rng.id(WIDE_IDS)),
                ),
                _ => ("delete", format!("delete from wide where id = {id}")),
            }
        }
        "big" => {
            let t = extra.bigs[rng.below(extra.bigs.len() as u64) as usize].clone();
            let id = rng.id(BIG_ROWS);
            match rng.below(8) {
                0..=2 => (
                    "update",
                    format!(
                        "update {t} set v = v + 1, pad = {} where id between {id} and {id} + 20",
                        if rng.chance(1, 3) {
                            "NULL".to_string()
                        } else {
                            lit(&weird(rng, 1))
                        }
                    ),
                ),
                3 => ("delete", format!("delete from {t} where id = {id}")),
                4 => (
                    "pk_change",
                    format!("update {t} set id = -id where id = {id}"),
                ),
                _ => (
                    "upsert",
                    format!(
                        "insert into {t} values ({}, {}, 'new') on conflict (id) do update set v = {t}.v - 1",
                        BIG_ROWS + rng.below(BIG_ROWS),
                        rng.below(1000)
                    ),
                ),
            }
        }
        _ => {
            let t = extra.gone.clone().unwrap();
            let id = rng.id(GONE_IDS);
            match rng.below(3) {
                0 => (
                    "upsert",
                    format!(
                        "insert into {t} values ({id}, 1, 'g') on conflict (id) do update set v = {t}.v + 1"
                    ),
                ),
                1 => (
                    "update",
                    format!("update {t} set t = t || 'x', v = v * 2 where id = {id}"),
                ),
                _ => ("delete", format!("delete from {t} where id = {id}")),
            }
        }
    }
}

enum Step {
    Sql(&'static str, String),
    Savepoint(u32),
    RollbackTo(u32),
    Release(u32),
    Sleep(Duration),
}

struct Tx {
    steps: Vec<Step>,
    commit: bool,
}

/// A random transaction: `n` statements, some within savepoints that are
/// rolled back to or released, optionally with pauses between statements.
fn transaction(rng: &mut Rng, extra: &Extra, n: u64, pause: Option<(u64, u64)>) -> Tx {
    let mut steps = Vec::new();
    let mut open: Vec<u32> = Vec::new();
    let mut next_sp = 0;
    let savepoints = rng.chance(1, 3);
    for _ in 0..n {
        if savepoints && rng.chance(1, 3) {
            next_sp += 1;
            open.push(next_sp);
            steps.push(Step::Savepoint(next_sp));
        }
        let (kind, sql) = statement(rng, extra);
        steps.push(Step::Sql(kind, sql));
        if let Some((lo, hi)) = pause {
            steps.push(Step::Sleep(rng.ms(lo, hi)));
        }
        if !open.is_empty() && rng.chance(1, 3) {
            let i = rng.below(open.len() as u64) as usize;
            let sp = open[i];
            if rng.chance(1, 2) {
                steps.push(Step::RollbackTo(sp));
                open.truncate(i + 1);
            } else {
                steps.push(Step::Release(sp));
                open.truncate(i);
            }
        }
    }
    Tx {
        steps,
        commit: !rng.chance(1, 10),
    }
}

#[derive(Default)]
struct Stats {
    committed: u64,
    rolled_back: u64,
    failed: u64,
    reconnects: u64,
    /// Statements that succeeded, by kind (their transaction may not commit).
    kinds: BTreeMap<&'static str, u64>,
    /// Statement errors by SQLSTATE.
    errors: BTreeMap<String, u64>,
    /// Errors no well-formed statement should get (a bug in this generator).
    unexpected: Vec<String>,
}

impl Stats {
    fn merge(&mut self, o: &Stats) {
        self.committed += o.committed;
        self.rolled_back += o.rolled_back;
        self.failed += o.failed;
        self.reconnects += o.reconnects;
        for (k, v) in &o.kinds {
            *self.kinds.entry(k).or_default() += v;
        }
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.unexpected.extend(o.unexpected.iter().cloned());
    }
}

fn is_connection_error(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(c) => {
            let c = c.code();
            c.starts_with("08") || c.starts_with("57P")
        }
        None => e.as_db_error().is_none(),
    }
}

/// Errors a correct statement can get under concurrency and faults.
fn expected_error(code: &str) -> bool {
    code.starts_with("23") // unique, foreign key
        || code.starts_with("40") // deadlock, serialization
        || code == "55P03" // lock_timeout
        || code == "57014" // canceled
}

enum Outcome {
    Committed,
    RolledBack,
    Failed,
    Disconnected,
}

fn exec_tx(c: &mut Client, tx: &Tx, stop: &AtomicBool, st: &mut Stats) -> Outcome {
    if let Err(e) = c.batch_execute("begin") {
        return if is_connection_error(&e) {
            Outcome::Disconnected
        } else {
            Outcome::Failed
        };
    }
    let mut open: Vec<u32> = Vec::new();
    for step in &tx.steps {
        let (sql, kind) = match step {
            Step::Sql(kind, sql) => (sql.clone(), Some(*kind)),
            Step::Savepoint(n) => {
                open.push(*n);
                (format!("savepoint s{n}"), None)
            }
            Step::RollbackTo(n) => {
                let i = open.iter().position(|x| x == n).unwrap();
                open.truncate(i + 1);
                (format!("rollback to savepoint s{n}"), Some("rollback_to"))
            }
            Step::Release(n) => {
                let i = open.iter().position(|x| x == n).unwrap();
                open.truncate(i);
                (format!("release savepoint s{n}"), None)
            }
            Step::Sleep(d) => {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(*d);
                continue;
            }
        };
        match c.batch_execute(&sql) {
            Ok(()) => {
                if let Some(k) = kind {
                    *st.kinds.entry(k).or_default() += 1;
                }
            }
            Err(e) if is_connection_error(&e) => return Outcome::Disconnected,
            Err(e) => {
                let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
                *st.errors.entry(code.clone()).or_default() += 1;
                if !expected_error(&code) {
                    st.unexpected.push(format!("{code} {e:?}\n  in: {sql}"));
                }
                // Recover at the innermost savepoint, as an application would.
                let recovered = match open.last() {
                    Some(sp) => c
                        .batch_execute(&format!("rollback to savepoint s{sp}"))
                        .is_ok(),
                    None => false,
                };
                if recovered {
                    *st.kinds
                        .entry("error_rolled_back_to_savepoint")
                        .or_default() += 1;
                } else {
                    return match c.batch_execute("rollback") {
                        Err(e) if is_connection_error(&e) => Outcome::Disconnected,
                        _ => Outcome::Failed,
                    };
                }
            }
        }
    }
    let end = if tx.commit { "commit" } else { "rollback" };
    match c.batch_execute(end) {
        Ok(()) if tx.commit => Outcome::Committed,
        Ok(()) => Outcome::RolledBack,
        Err(e) if is_connection_error(&e) => Outcome::Disconnected,
        Err(_) => Outcome::Failed,
    }
}

fn connect_writer(connstr: &str) -> Option<Client> {
    let mut c = Client::connect(connstr, NoTls).ok()?;
    c.batch_execute("set application_name = 'random-writer'; set lock_timeout = '300ms'")
        .ok()?;
    Some(c)
}

/// One writer session until `stop`: short transactions, or long ones (many
/// statements with pauses, spanning many ticks) if `long`.
fn writer(
    connstr: String,
    seed: u64,
    long: bool,
    extra: Arc<Mutex<Extra>>,
    stop: Arc<AtomicBool>,
) -> Stats {
    let mut rng = Rng::new(seed);
    let mut st = Stats::default();
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut c = match client.take() {
            Some(c) if !c.is_closed() => c,
            _ => match connect_writer(&connstr) {
                Some(c) => c,
                None => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        let ex = extra.lock().unwrap().clone();
        let tx = if long {
            {
                let n = 10 + rng.below(20);
                transaction(&mut rng, &ex, n, Some((50, 250)))
            }
        } else {
            {
                let n = 1 + rng.below(8);
                transaction(&mut rng, &ex, n, None)
            }
        };
        match exec_tx(&mut c, &tx, &stop, &mut st) {
            Outcome::Committed => st.committed += 1,
            Outcome::RolledBack => st.rolled_back += 1,
            Outcome::Failed => st.failed += 1,
            Outcome::Disconnected => {
                st.failed += 1;
                st.reconnects += 1;
                continue;
            }
        }
        client = Some(c);
        if !long && rng.chance(1, 4) {
            std::thread::sleep(rng.ms(0, 5));
        }
    }
    st
}

// ---------------------------------------------------------------------------
// Faults and the replication setup

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWorker,
    KillTicker,
    AddTableKillDuringCopy,
    TerminateSessions,
    CrashSubscriber,
    CrashProvider,
    RemoveTable,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::KillWorker,
        Fault::KillTicker,
        Fault::AddTableKillDuringCopy,
        Fault::TerminateSessions,
        Fault::CrashSubscriber,
        Fault::CrashProvider,
        Fault::RemoveTable,
    ];
    /// Faults that may be injected more than once per round.
    const REPEATABLE: [Fault; 5] = [
        Fault::KillWorker,
        Fault::KillTicker,
        Fault::TerminateSessions,
        Fault::CrashSubscriber,
        Fault::CrashProvider,
    ];
}

/// A daemon run in the foreground through a link, restarted after a kill.
struct Daemon {
    prog: &'static str,
    args: &'static [&'static str],
    child: Option<KillOnDrop>,
}

impl Daemon {
    fn new(prog: &'static str, args: &'static [&'static str]) -> Daemon {
        Daemon {
            prog,
            args,
            child: None,
        }
    }
    fn start(&mut self, d: &Path) {
        self.child = Some(KillOnDrop(spawn(self.prog, self.args, d)));
    }
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.0.kill();
            let _ = c.0.wait();
        }
    }
    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.0.id()).unwrap_or(0)
    }
    /// The exit status, if it exited on its own.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.0.try_wait().ok().flatten()
    }
}

struct Rig {
    // Daemons first: dropped (killed) before the clusters go away.
    ticker: Daemon,
    root: Daemon,
    worker: Daemon,
    p: Cluster,
    s: Cluster,
    master: String,
    slave: String,
    /// The subscriber's connection string (a superuser or a plain role).
    sconn: String,
    dir: TestDir,
    seed: u64,
    round: usize,
    round_start: Instant,
    timeline: Vec<String>,
    faults: BTreeMap<&'static str, u64>,
    /// Replicated tables compared after each round.
    compared: Vec<String>,
}

impl Rig {
    fn ctx(&self) -> String {
        format!(
            "[random test seed {} round {}; rerun with LONDISTE_RANDOM_SEED={}]",
            self.seed, self.round, self.seed
        )
    }

    fn d(&self) -> &Path {
        self.dir.path()
    }

    fn note(&mut self, what: String) {
        let line = format!("t={:5.1}s {what}", self.round_start.elapsed().as_secs_f64());
        eprintln!("random round {}: {line}", self.round);
        self.timeline.push(line);
    }

    fn count(&mut self, what: &'static str) {
        *self.faults.entry(what).or_default() += 1;
    }

    /// The tails of the daemons' logs, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for f in [
            "log/slave.log",
            "log/ticker.log",
            "log/master.log",
            "pgqd.console",
            "londiste3.console",
        ] {
            let text = std::fs::read_to_string(self.d().join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "--- {f} (tail) ---\n{}\n",
                lines[lines.len().saturating_sub(25)..].join("\n")
            ));
        }
        out
    }

    fn fail(&self, msg: &str) -> ! {
        panic!(
            "{} {msg}\n--- timeline of round {} ---\n{}\n{}",
            self.ctx(),
            self.round,
            self.timeline.join("\n"),
            self.logs()
        );
    }

    /// Runs `londiste3 args`, retrying a few times (a server may just be
    /// coming back); panics with its output if it keeps failing.
    fn admin(&self, args: &[&str]) -> String {
        let mut last = String::new();
        for _ in 0..10 {
            let out = run("londiste3", args, self.d());
            last = output_text(&out);
            if out.status.success() {
                return last;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.fail(&format!(
            "`londiste3 {}` keeps failing:\n{last}",
            args.join(" ")
        ));
    }

    /// Every daemon must still be running: none may give up on its own.
    fn check_daemons(&mut self) {
        for which in ["ticker", "root", "worker"] {
            let d = match which {
                "ticker" => &mut self.ticker,
                "root" => &mut self.root,
                _ => &mut self.worker,
            };
            if let Some(status) = d.exited() {
                let msg = format!(
                    "the {which} ({} {:?}) exited on its own: {status}",
                    d.prog, d.args
                );
                self.fail(&msg);
            }
        }
    }

    fn sql_p(&self, sql: &str) {
        self.p
            .client(&self.master)
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{} master: {sql}: {e}", self.ctx()));
    }

    /// As the subscriber's user (who then owns what it creates).
    fn sql_s(&self, sql: &str) {
        Client::connect(&self.sconn, NoTls)
            .and_then(|mut c| c.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{} slave: {sql}: {e}", self.ctx()));
    }

    fn inject(&mut self, f: Fault, rng: &mut Rng, big: &str, victim: &str, extra: &Mutex<Extra>) {
        self.check_daemons();
        match f {
            Fault::KillWorker => {
                self.note(format!("kill -9 slave worker (pid {})", self.worker.pid()));
                self.worker.kill9();
                std::thread::sleep(rng.ms(0, 500));
                self.worker.start(self.dir.path());
                self.count("kill -9 worker");
            }
            Fault::KillTicker => {
                self.note(format!("kill -9 ticker (pid {})", self.ticker.pid()));
                self.ticker.kill9();
                std::thread::sleep(rng.ms(0, 1500));
                self.ticker.start(self.dir.path());
                self.count("kill -9 ticker");
            }
            Fault::AddTableKillDuringCopy => {
                self.note(format!("add-table {big} on master and slave"));
                self.admin(&["master.ini", "add-table", big]);
                self.admin(&["slave.ini", "add-table", big]);
                self.count("add-table");
                let pattern = format!("copy%{}%", big.trim_start_matches("public."));
                let mut pg = self.s.client("postgres");
                let copying = |pg: &mut Client| {
                    pg.query_one(
                        "select count(*) from pg_stat_activity where datname = $1 and query ilike $2 \
                         and state = 'active'",
                        &[&self.slave, &pattern],
                    )
                    .map(|r| r.get::<_, i64>(0) > 0)
                    .unwrap_or(false)
                };
                let deadline = Instant::now() + Duration::from_secs(30);
                while !copying(&mut pg) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                if copying(&mut pg) {
                    // Somewhere in the middle of the COPY.
                    std::thread::sleep(rng.ms(0, 150));
                    self.note(format!(
                        "kill -9 slave worker during the COPY of {big} (pid {})",
                        self.worker.pid()
                    ));
                    self.worker.kill9();
                    self.count("kill -9 worker during copy");
                    self.worker.start(self.dir.path());
                } else {
                    self.note(format!("never saw the COPY of {big} running; no kill"));
                    self.count("copy kill missed");
                }
                // And once more while the copy catches up with the events
                // since its snapshot, before it hands the table over.
                let state = |pg: &mut Client| -> Option<String> {
                    pg.query_opt(
                        "select merge_state from londiste.table_info where queue_name = $1 and table_name = $2",
                        &[&self.master, &big],
                    )
                    .ok()
                    .flatten()
                    .and_then(|r| r.get(0))
                };
                let mut pg = Client::connect(&self.s.connstr(&self.slave), NoTls)
                    .unwrap_or_else(|e| panic!("{} connect to the slave: {e}", self.ctx()));
                let deadline = Instant::now() + Duration::from_secs(15);
                let mut seen = state(&mut pg);
                while seen.as_deref() != Some("catching-up") && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                    seen = state(&mut pg);
                }
                if seen.as_deref() == Some("catching-up") {
                    std::thread::sleep(rng.ms(0, 100));
                    self.note(format!(
                        "kill -9 slave worker while {big} catches up (pid {})",
                        self.worker.pid()
                    ));
                    self.worker.kill9();
                    self.count("kill -9 worker during catch-up");
                    self.worker.start(self.dir.path());
                } else {
                    self.note(format!(
                        "never saw {big} catching up (last {seen:?}); no kill"
                    ));
                    self.count("catch-up kill missed");
                }
                self.compared.push(big.to_string());
            }
            Fault::TerminateSessions => {
                let mut n = 0;
                for (c, db) in [(&self.s, "postgres"), (&self.p, "postgres")] {
                    let r = c
                        .client(db)
                        .query_one(
                            "select count(pg_terminate_backend(pid)) from pg_stat_activity \
                             where application_name like 'londiste-rs%' and pid <> pg_backend_pid()",
                            &[],
                        )
                        .unwrap_or_else(|e| panic!("{} pg_terminate_backend: {e}", self.ctx()));
                    n += r.get::<_, i64>(0);
                }
                self.note(format!("pg_terminate_backend of {n} londiste-rs sessions"));
                self.count("pg_terminate_backend");
            }
            Fault::CrashSubscriber => {
                self.note("crash (immediate stop) of the subscriber cluster".into());
                self.s.stop_immediate();
                std::thread::sleep(rng.ms(100, 1500));
                self.s.start_again();
                self.note("subscriber cluster restarted".into());
                self.count("crash+restart subscriber");
            }
            Fault::CrashProvider => {
                self.note("crash (immediate stop) of the provider cluster".into());
                self.p.stop_immediate();
                std::thread::sleep(rng.ms(100, 1500));
                self.p.start_again();
                self.note("provider cluster restarted".into());
                self.count("crash+restart provider");
            }
            Fault::RemoveTable => {
                self.note(format!("remove-table {victim} on slave, then master"));
                self.admin(&["slave.ini", "remove-table", victim]);
                self.admin(&["master.ini", "remove-table", victim]);
                self.compared.retain(|t| t != victim);
                let mut ex = extra.lock().unwrap();
                ex.bigs.retain(|t| t != victim);
                if ex.gone.as_deref() == Some(victim) {
                    ex.gone = None;
                }
                self.count("remove-table");
            }
        }
    }

    /// Per table: row count and a hash of the sorted rows, or an error.
    fn fingerprints(&self, c: &Cluster, db: &str) -> Result<Vec<(i64, String)>, String> {
        let mut client = Client::connect(&c.connstr(db), NoTls).map_err(|e| e.to_string())?;
        self.compared
            .iter()
            .map(|t| {
                let sql = format!(
                    "select count(*), coalesce(md5(string_agg(x::text, E'\\n' order by x::text collate \"C\")), '') from {t} x"
                );
                client
                    .query_one(&sql, &[])
                    .map(|r| (r.get(0), r.get(1)))
                    .map_err(|e| format!("{t}: {e}"))
            })
            .collect()
    }

    /// Tables on the slave that are not yet in state `ok`.
    fn not_ok(&self) -> Result<Vec<String>, String> {
        let mut c =
            Client::connect(&self.s.connstr(&self.slave), NoTls).map_err(|e| e.to_string())?;
        let rows = c
            .query(
                "select table_name, coalesce(merge_state, 'none') from londiste.table_info \
                 where queue_name = $1 and local",
                &[&self.master],
            )
            .map_err(|e| e.to_string())?;
        let states: BTreeMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(self
            .compared
            .iter()
            .filter(|t| states.get(*t).map(|s| s.as_str()) != Some("ok"))
            .map(|t| format!("{t}: {:?}", states.get(t)))
            .collect())
    }

    /// Polls until every compared table on the slave is `ok` and has the
    /// master's rows (twice, a second apart), then runs `compare`.
    fn converge(&mut self) {
        let start = Instant::now();
        let mut equal_since: Option<Instant> = None;
        let mut last = String::new();
        loop {
            self.check_daemons();
            let state = (|| -> Result<(), String> {
                let bad = self.not_ok()?;
                if !bad.is_empty() {
                    return Err(format!("tables not ok yet: {bad:?}"));
                }
                let (a, b) = (
                    self.fingerprints(&self.p, &self.master)?,
                    self.fingerprints(&self.s, &self.slave)?,
                );
                let differ: Vec<String> = self
                    .compared
                    .iter()
                    .zip(a.iter().zip(b.iter()))
                    .filter(|(_, (x, y))| x != y)
                    .map(|(t, (x, y))| format!("{t}: master {} rows, slave {} rows", x.0, y.0))
                    .collect();
                if differ.is_empty() {
                    Ok(())
                } else {
                    Err(differ.join("; "))
                }
            })();
            match state {
                Ok(()) => match equal_since {
                    Some(t) if t.elapsed() >= Duration::from_secs(1) => break,
                    Some(_) => {}
                    None => equal_since = Some(Instant::now()),
                },
                Err(e) => {
                    if equal_since.is_some() {
                        self.note(format!("tables were equal, then differed again: {e}"));
                    }
                    equal_since = None;
                    last = e;
                }
            }
            if start.elapsed() > CONVERGE_TIMEOUT {
                let details = self.diff_details();
                self.fail(&format!(
                    "the slave did not converge to the master within {CONVERGE_TIMEOUT:?}: {last}\n{details}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.note(format!(
            "slave equals master after {:.1}s",
            start.elapsed().as_secs_f64()
        ));
        let out = run("londiste3", &["slave.ini", "compare"], self.d());
        if !out.status.success() {
            self.fail(&format!(
                "`londiste3 slave.ini compare` failed ({}):\n{}",
                out.status,
                output_text(&out)
            ));
        }
    }

    /// The rows that differ, per table (for a failure message).
    fn diff_details(&self) -> String {
        let (Ok(mut a), Ok(mut b)) = (
            Client::connect(&self.p.connstr(&self.master), NoTls),
            Client::connect(&self.s.connstr(&self.slave), NoTls),
        ) else {
            return "(cannot connect to compare rows)".into();
        };
        self.compared
            .iter()
            .filter_map(|t| tables_diff(&mut a, &mut b, t))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Names the seed on any panic, also from the harness's own helpers.
struct SeedOnPanic(u64);

impl Drop for SeedOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "random test FAILED with seed {0}; rerun with LONDISTE_RANDOM_SEED={0}",
                self.0
            );
        }
    }
}

/// Stops the writers also when the round panics.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn create_big(rig: &Rig, t: &str) {
    let ddl = format!("create table {t} (id bigint primary key, v int not null, pad text);");
    rig.sql_p(&format!(
        "{ddl} insert into {t} select i, i % 1000, md5(i::text) from generate_series(1, {BIG_ROWS}) i;"
    ));
    rig.sql_s(&ddl);
}

#[test]
fn random_workload_with_faults() {
    let seed = initial_seed();
    let rounds = env_num("LONDISTE_RANDOM_ROUNDS", 2) as usize;
    let seconds = env_num("LONDISTE_RANDOM_SECONDS", 12);
    eprintln!(
        "random test: seed {seed}, {rounds} rounds of {seconds}s load \
         (rerun with LONDISTE_RANDOM_SEED={seed})"
    );
    let _guard = SeedOnPanic(seed);
    let mut rng = Rng::new(seed);
    // The subscriber connects as a superuser (replica mode: no FK checks or
    // user triggers while applying) or as a plain role owning the database
    // (FKs enforced while applying, events applied in order).
    let plain = match std::env::var("LONDISTE_RANDOM_SUBSCRIBER").as_deref() {
        Ok("plain") => true,
        Ok("superuser") => false,
        Ok(v) => panic!("LONDISTE_RANDOM_SUBSCRIBER={v:?}: plain or superuser"),
        Err(_) => rng.chance(1, 2),
    };
    eprintln!(
        "random test: the subscriber connects as {}",
        if plain {
            "a plain role (LONDISTE_RANDOM_SUBSCRIBER=plain)"
        } else {
            "a superuser (LONDISTE_RANDOM_SUBSCRIBER=superuser)"
        }
    );

    // Two private clusters: the test crashes both.
    let (p, s) = (Cluster::start(), Cluster::start());
    let (master, slave) = (unique_name("rnd_master"), unique_name("rnd_slave"));
    let mconn = p.create_db(&master);
    let mut sconn = s.create_db(&slave);
    if plain {
        s.client("postgres")
            .batch_execute(&format!(
                "create role londiste_sub login; alter database {slave} owner to londiste_sub"
            ))
            .unwrap();
        sconn = format!(
            "host=127.0.0.1 port={} user=londiste_sub dbname={slave}",
            s.port()
        );
    }
    // Commits must survive the crashes: an admin command (remove-table) whose
    // commit the subscriber's crash took back left the table replicated on one
    // side only, and compare (rightly) failed.
    for cl in [&p, &s] {
        let mut c = cl.client("postgres");
        c.batch_execute("alter system set synchronous_commit = on")
            .unwrap();
        c.query_one("select pg_reload_conf()", &[]).unwrap();
    }
    let dir = TestDir::new();
    let d = dir.path().to_path_buf();
    dir.tutorial_inis(
        &p.base_connstr(),
        &master,
        &mconn,
        &sconn,
        "exception_sleep = 1\n",
    );
    let mut rig = Rig {
        ticker: Daemon::new("pgqd", &["ticker.ini"]),
        root: Daemon::new("londiste3", &["master.ini", "worker"]),
        worker: Daemon::new("londiste3", &["slave.ini", "worker"]),
        p,
        s,
        master: master.clone(),
        slave,
        sconn: sconn.clone(),
        dir,
        seed,
        round: 0,
        round_start: Instant::now(),
        timeline: Vec::new(),
        faults: BTreeMap::new(),
        compared: BASE_TABLES.iter().map(|t| t.to_string()).collect(),
    };

    // Schema on both, data on the master.
    let mut data = String::from(
        "insert into parent select i, 'p' || i, i * 1.5 from generate_series(1, 200) i;
         insert into child select i, 1 + i % 200, 'c' || i, i from generate_series(1, 600) i;
         insert into pairs select a, b, a || '/' || b, a from generate_series(1, 30) a,
           unnest(array['a-1', 'b-2', 'ü-3', 'x''y-4', 's p-5']) b;
         insert into gone select i, i, 'g' || i from generate_series(1, 100) i;\n",
    );
    let keys: Vec<String> = (0..TEXT_KEYS / 2)
        .map(|n| format!("({}, {}, {n})", lit(&text_key(n)), lit(&weird(&mut rng, 4))))
        .collect();
    data.push_str(&format!("insert into texts values {};\n", keys.join(", ")));
    let rows: Vec<String> = (1..=WIDE_IDS / 2).map(|i| wide_row(&mut rng, i)).collect();
    data.push_str(&format!("insert into wide values {};\n", rows.join(",\n")));
    rig.sql_p(&format!("{SCHEMA}{data}"));
    rig.sql_s(SCHEMA);

    rig.admin(&["master.ini", "create-root", "master", &mconn]);
    rig.admin(&[
        "slave.ini",
        "create-branch",
        "slave",
        &sconn,
        &format!("--provider={mconn}"),
    ]);
    let mut initial: Vec<&str> = BASE_TABLES.to_vec();
    initial.push("public.gone");
    for ini in ["master.ini", "slave.ini"] {
        let mut args = vec![ini, "add-table"];
        args.extend(&initial);
        rig.admin(&args);
    }
    rig.compared.push("public.gone".into());
    rig.ticker.start(&d);
    rig.root.start(&d);
    rig.worker.start(&d);
    rig.note("set up; initial copy".into());
    rig.converge();

    let extra = Arc::new(Mutex::new(Extra {
        bigs: Vec::new(),
        gone: Some("public.gone".into()),
    }));
    let mut total = Stats::default();
    let mut round_seeds = Vec::new();
    let started = Instant::now();
    for round in 0..rounds {
        let round_seed = mix(seed ^ mix(round as u64 + 1));
        round_seeds.push(round_seed);
        let mut rng = Rng::new(round_seed);
        rig.round = round;
        rig.timeline.clear();
        // The table added (and copied) during this round, and the one removed:
        // the start's `gone`, then the previous round's big table.
        let big = format!("public.big_{round}");
        let victim = if round == 0 {
            "public.gone".to_string()
        } else {
            format!("public.big_{}", round - 1)
        };
        create_big(&rig, &big);
        extra.lock().unwrap().bigs.push(big.clone());
        rig.round_start = Instant::now();
        rig.note(format!("round {round} starts (round seed {round_seed})"));

        let stop = Arc::new(AtomicBool::new(false));
        let _stop_writers = StopOnDrop(stop.clone());
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (conn, extra, stop) = (rig.p.connstr(&master), extra.clone(), stop.clone());
                let s = mix(round_seed ^ (100 + w));
                std::thread::spawn(move || writer(conn, s, w == 3, extra, stop))
            })
            .collect();

        let mut faults: Vec<Fault> = Fault::ALL.to_vec();
        for _ in 0..seconds / 8 {
            faults.push(rng.pick(&Fault::REPEATABLE));
        }
        // Fisher-Yates.
        for i in (1..faults.len()).rev() {
            faults.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let load = Duration::from_secs(seconds);
        for (i, f) in faults.iter().enumerate() {
            let left = load.saturating_sub(rig.round_start.elapsed());
            let slot = left / (faults.len() - i + 1) as u32;
            let ms = slot.as_millis() as u64;
            std::thread::sleep(rng.ms(100, (2 * ms).max(200)));
            rig.inject(*f, &mut rng, &big, &victim, &extra);
        }
        if let Some(rest) = load.checked_sub(rig.round_start.elapsed()) {
            std::thread::sleep(rest);
        }
        stop.store(true, Ordering::SeqCst);
        let mut st = Stats::default();
        for w in writers {
            st.merge(&w.join().expect("writer thread"));
        }
        rig.note(format!(
            "writers stopped: {} committed, {} rolled back, {} failed transactions",
            st.committed, st.rolled_back, st.failed
        ));
        if !st.unexpected.is_empty() {
            rig.fail(&format!(
                "writers got errors a correct statement should not get:\n{}",
                st.unexpected.join("\n")
            ));
        }
        assert!(
            st.committed > 50,
            "{} only {} transactions committed",
            rig.ctx(),
            st.committed
        );
        rig.converge();
        eprintln!(
            "random round {round} ok (seed {seed}, round seed {round_seed}):\n  {}",
            rig.timeline.join("\n  ")
        );
        total.merge(&st);
    }
    eprintln!(
        "random test summary: seed {seed}, round seeds {round_seeds:?}, {rounds} rounds of {seconds}s \
         load, {:.0}s total, subscriber as {}\n  transactions: {} committed, {} rolled back, {} failed by errors; \
         writer reconnects {}\n  statements ok by kind: {:?}\n  writer errors by SQLSTATE: {:?}\n  \
         faults: {:?}\n  compared tables: {:?}",
        started.elapsed().as_secs_f64(),
        if plain { "a plain role" } else { "superuser" },
        total.committed,
        total.rolled_back,
        total.failed,
        total.reconnects,
        total.kinds,
        total.errors,
        rig.faults,
        rig.compared
    );
}
