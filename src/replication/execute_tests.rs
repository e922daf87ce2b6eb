use super::*;

#[test]
fn header_attributes_as_the_reference_reads_them() {
    let sql = "\n -- \n\n--*-- Local-Table: foo , \n--\n--*-- bar , \n--*--\n--*-- zoo \n--*-- \n--*-- Local-Sequence: goo  \n--*-- \n--\n\ncreate fooza;\n--*-- Need-Table: ignored\n";
    let a = Attrs::parse_sql(sql).unwrap();
    assert_eq!(a.get("Local-Table"), ["foo", "bar", "zoo"]);
    assert_eq!(a.get("local-sequence"), ["goo"]);
    assert!(a.get("Need-Table").is_empty());
    assert_eq!(
        a.to_urlenc(),
        "local-table=foo%2Cbar%2Czoo&local-sequence=goo"
    );
    assert_eq!(Attrs::parse_urlenc(&a.to_urlenc()).unwrap(), a);
    let e = Attrs::parse_sql("--*-- Local-Tabel: x\nselect 1;").unwrap_err();
    assert!(e.to_string().contains("Local-Tabel"), "{e}");
    assert!(Attrs::parse_sql("select 1;").unwrap().is_empty());
}

#[test]
fn substitution_uses_local_names() {
    let a = Attrs::parse_sql("--*-- Local-Table: foo, public.bar, zoo\n").unwrap();
    let local = Local {
        tables: [
            ("public.foo", "public.foo"),
            ("public.bar", "other.Bar"),
            ("public.zoo", "\"Other\".\"Foo\""),
        ]
        .into_iter()
        .map(|(k, v)| (canonical(k).unwrap(), v.to_string()))
        .collect(),
        seqs: vec![],
    };
    let sql = "alter table @foo@;\nalter table @public.bar@;\nalter table @zoo@;";
    assert_eq!(
        localize(sql, &a, &local).unwrap(),
        "alter table public.foo;\nalter table other.bar;\nalter table \"Other\".\"Foo\";"
    );
}

#[test]
fn statements_split_at_top_level_semicolons() {
    let sql = "-- head; not a statement\nalter table t add column c int;\n\
               create function f() returns text language sql as $x$ select ';' $x$;\n\
               /* a; /* nested; */ still comment */ insert into t values (E'it\\'s;', 'a''b;', \"we;ird\");\n\
               select $1;\n  -- trailing comment only\n";
    let s = split_statements(sql);
    let texts: Vec<&str> = s.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "alter table t add column c int",
            "create function f() returns text language sql as $x$ select ';' $x$",
            "insert into t values (E'it\\'s;', 'a''b;', \"we;ird\")",
            "select $1",
        ]
    );
    assert_eq!(s.iter().map(|s| s.line).collect::<Vec<_>>(), [2, 3, 4, 5]);
}

#[test]
fn statements_that_cannot_run_in_the_transaction_are_refused() {
    for bad in [
        "BEGIN",
        "commit",
        "start transaction",
        "vacuum t",
        "create index concurrently i on t (a)",
        "\\i other.sql",
    ] {
        let s = Statement {
            line: 3,
            text: bad.into(),
        };
        let e = check_statement("ddl.sql", &s).unwrap_err().to_string();
        assert!(e.starts_with("ddl.sql line 3: "), "{e}");
    }
    for ok in [
        "alter table t add column c int",
        "start_job()",
        "create index i on t (a)",
    ] {
        let s = Statement {
            line: 1,
            text: ok.into(),
        };
        check_statement("ddl.sql", &s).unwrap();
    }
}
