//! Parsers for the text forms that travel in events: a row as PostgreSQL's
//! composite text (`(1,"a b",)`), a one-dimensional text array literal
//! (`{id,"odd name"}`) and a txid snapshot (`xmin:xmax:xip,...`). Values stay
//! text: the replica's input functions turn them back into exactly the source's
//! values, so nothing is lost in a conversion of ours.

use crate::error::{Error, Result};

/// Splits composite text into fields; `None` is SQL NULL (an empty unquoted field).
/// Works on bytes (every delimiter is ASCII) and copies a field that needs no
/// unquoting in one piece: this is on the apply hot path, and a huge value is
/// allocated once, at its exact size.
pub fn parse_record(s: &str) -> Result<Vec<Option<String>>> {
    let b = s.as_bytes();
    if b.len() < 2 || b[0] != b'(' || b[b.len() - 1] != b')' {
        return Err(Error::Other(format!("malformed row text: {}", preview(s))));
    }
    let inner = &b[1..b.len() - 1];
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let start = i;
        let (mut quoted, mut plain, mut any) = (false, true, false);
        while i < inner.len() {
            match inner[i] {
                b',' if !quoted => break,
                b'"' => {
                    plain = false;
                    any = true;
                    if quoted && inner.get(i + 1) == Some(&b'"') {
                        i += 1;
                    } else {
                        quoted = !quoted;
                    }
                }
                b'\\' => {
                    plain = false;
                    any = true;
                    i += 1;
                    if i >= inner.len() {
                        return Err(Error::Other(format!("malformed row text: {}", preview(s))));
                    }
                }
                _ => any = true,
            }
            i += 1;
        }
        if quoted {
            return Err(Error::Other(format!(
                "unterminated quote in row text: {}",
                preview(s)
            )));
        }
        let field = &inner[start..i];
        out.push(match (any, plain) {
            (false, _) => None,
            // Slicing at ASCII delimiters keeps UTF-8 valid.
            (true, true) => Some(s[1 + start..1 + i].to_string()),
            (true, false) => Some(unquote(field)),
        });
        if i >= inner.len() {
            break;
        }
        i += 1;
    }
    Ok(out)
}

/// Writes the fields of composite text `s` that `want` marks as one line of
/// COPY text format (tab-separated, `\N` for NULL), unquoting and escaping on
/// the fly through a small buffer: a huge value streams to the server in
/// pieces instead of being parsed into a copy and bound as a parameter.
/// Returns how many fields `s` has.
pub fn write_record_copy(
    s: &str,
    want: &[bool],
    w: &mut dyn std::io::Write,
) -> std::io::Result<usize> {
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{what}: {}", preview(s)),
        )
    };
    let b = s.as_bytes();
    if b.len() < 2 || b[0] != b'(' || b[b.len() - 1] != b')' {
        return Err(bad("malformed row text"));
    }
    let inner = &b[1..b.len() - 1];
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    let (mut i, mut field, mut written) = (0, 0, 0);
    loop {
        let keep = want.get(field).copied().unwrap_or(false);
        if keep && written > 0 {
            buf.push(b'\t');
        }
        let (mut quoted, mut any) = (false, false);
        while i < inner.len() {
            let c = inner[i];
            match c {
                b',' if !quoted => break,
                b'"' if quoted && inner.get(i + 1) == Some(&b'"') => {
                    any = true;
                    i += 1;
                    if keep {
                        buf.push(b'"');
                    }
                }
                b'"' => {
                    any = true;
                    quoted = !quoted;
                }
                _ => {
                    any = true;
                    let c = if c == b'\\' {
                        i += 1;
                        *inner.get(i).ok_or_else(|| bad("malformed row text"))?
                    } else {
                        c
                    };
                    if keep {
                        match c {
                            b'\\' => buf.extend_from_slice(b"\\\\"),
                            b'\t' => buf.extend_from_slice(b"\\t"),
                            b'\n' => buf.extend_from_slice(b"\\n"),
                            b'\r' => buf.extend_from_slice(b"\\r"),
                            c => buf.push(c),
                        }
                    }
                }
            }
            i += 1;
            if buf.len() >= 60 << 10 {
                w.write_all(&buf)?;
                buf.clear();
            }
        }
        if quoted {
            return Err(bad("unterminated quote in row text"));
        }
        if keep {
            if !any {
                buf.extend_from_slice(b"\\N");
            }
            written += 1;
        }
        field += 1;
        if i >= inner.len() {
            break;
        }
        i += 1;
    }
    buf.push(b'\n');
    w.write_all(&buf)?;
    Ok(field)
}

/// The column names of an event (`ev_extra2`): a JSON object whose values are
/// all null, in column order (what the capture triggers write), or a text[]
/// literal (older versions). The two never overlap: an array literal's quoted
/// element is followed by `,` or `}`, never by `:`.
pub fn parse_columns(s: &str) -> Result<Vec<String>> {
    match parse_json_null_object(s) {
        Some(cols) => Ok(cols),
        None => parse_text_array(s),
    }
}

fn parse_json_null_object(s: &str) -> Option<Vec<String>> {
    let mut it = s.trim().chars().peekable();
    let skip_ws = |it: &mut std::iter::Peekable<std::str::Chars>| {
        while it.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            it.next();
        }
    };
    if it.next()? != '{' {
        return None;
    }
    let mut out = Vec::new();
    skip_ws(&mut it);
    if it.peek() == Some(&'}') {
        it.next();
        return it.next().is_none().then_some(out);
    }
    loop {
        skip_ws(&mut it);
        if it.next()? != '"' {
            return None;
        }
        let mut key = String::new();
        loop {
            match it.next()? {
                '"' => break,
                '\\' => match it.next()? {
                    'u' => {
                        let mut cp = json_hex4(&mut it)?;
                        if (0xD800..0xDC00).contains(&cp) {
                            if it.next()? != '\\' || it.next()? != 'u' {
                                return None;
                            }
                            let lo = json_hex4(&mut it)?;
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo.checked_sub(0xDC00)?);
                        }
                        key.push(char::from_u32(cp)?);
                    }
                    'b' => key.push('\u{8}'),
                    'f' => key.push('\u{c}'),
                    'n' => key.push('\n'),
                    'r' => key.push('\r'),
                    't' => key.push('\t'),
                    c @ ('"' | '\\' | '/') => key.push(c),
                    _ => return None,
                },
                c => key.push(c),
            }
        }
        skip_ws(&mut it);
        if it.next()? != ':' {
            return None;
        }
        skip_ws(&mut it);
        for want in "null".chars() {
            if it.next()? != want {
                return None;
            }
        }
        out.push(key);
        skip_ws(&mut it);
        match it.next()? {
            ',' => continue,
            '}' => return it.next().is_none().then_some(out),
            _ => return None,
        }
    }
}

fn json_hex4(it: &mut impl Iterator<Item = char>) -> Option<u32> {
    let mut v = 0;
    for _ in 0..4 {
        v = v * 16 + it.next()?.to_digit(16)?;
    }
    Some(v)
}

/// Splits the data of a multi-row event (`I*`, `U*`, `D*`): rows in composite
/// text, separated by newlines. A newline or parenthesis inside a value is
/// always within double quotes, so the row ends at the first `)` outside quotes.
pub fn split_rows(s: &str) -> Result<Vec<&str>> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'(' {
            return Err(Error::Other(format!(
                "malformed multi-row text: {}",
                preview(&s[i..])
            )));
        }
        let start = i;
        let mut quoted = false;
        i += 1;
        loop {
            match b.get(i) {
                None => {
                    return Err(Error::Other(format!(
                        "unterminated row in multi-row text: {}",
                        preview(&s[start..])
                    )));
                }
                Some(b'\\') => i += 1,
                Some(b'"') => quoted = !quoted,
                Some(b')') if !quoted => break,
                _ => {}
            }
            i += 1;
        }
        i += 1;
        out.push(&s[start..i]);
        match b.get(i) {
            None => break,
            Some(b'\n') => i += 1,
            Some(_) => {
                return Err(Error::Other(format!(
                    "malformed multi-row text: {}",
                    preview(&s[start..])
                )));
            }
        }
    }
    Ok(out)
}

/// Removes composite-text quoting: `"..."` groups, `""` inside them, `\x` escapes.
fn unquote(f: &[u8]) -> String {
    let mut v = Vec::with_capacity(f.len());
    let (mut i, mut quoted) = (0, false);
    while i < f.len() {
        match f[i] {
            b'"' if quoted && f.get(i + 1) == Some(&b'"') => {
                v.push(b'"');
                i += 1;
            }
            b'"' => quoted = !quoted,
            b'\\' => {
                i += 1;
                v.push(f[i]);
            }
            c => v.push(c),
        }
        i += 1;
    }
    // Only ASCII bytes were removed, so the rest is still valid UTF-8.
    String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Parses a one-dimensional text array literal of non-NULL elements.
pub fn parse_text_array(s: &str) -> Result<Vec<String>> {
    let s = s.trim();
    if s.len() < 2 || !s.starts_with('{') || !s.ends_with('}') {
        return Err(Error::Other(format!(
            "malformed array text: {}",
            preview(s)
        )));
    }
    let inner = &s[1..s.len() - 1];
    let mut out = Vec::new();
    if inner.is_empty() {
        return Ok(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let mut item = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => item.push(c),
                        None => {
                            return Err(Error::Other(format!(
                                "malformed array text: {}",
                                preview(s)
                            )));
                        }
                    },
                    Some('"') => break,
                    Some(c) => item.push(c),
                    None => {
                        return Err(Error::Other(format!(
                            "malformed array text: {}",
                            preview(s)
                        )));
                    }
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                item.push(c);
                chars.next();
            }
        }
        out.push(item);
        match chars.next() {
            Some(',') => continue,
            None => break,
            Some(_) => {
                return Err(Error::Other(format!(
                    "malformed array text: {}",
                    preview(s)
                )));
            }
        }
    }
    Ok(out)
}

/// A txid snapshot: which transactions had committed when it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: i64,
    pub xmax: i64,
    pub xip: Vec<i64>,
}

impl Snapshot {
    pub fn parse(s: &str) -> Result<Snapshot> {
        let bad = || Error::Other(format!("malformed txid snapshot: {}", preview(s)));
        let mut parts = s.trim().splitn(3, ':');
        let xmin = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let xmax = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let rest = parts.next().ok_or_else(bad)?;
        let mut xip = Vec::new();
        for p in rest.split(',').filter(|p| !p.is_empty()) {
            xip.push(p.parse().map_err(|_| bad())?);
        }
        xip.sort_unstable();
        Ok(Snapshot { xmin, xmax, xip })
    }

    /// Same rule as txid_visible_in_snapshot(): committed before the snapshot.
    pub fn visible(&self, txid: i64) -> bool {
        if txid < self.xmin {
            return true;
        }
        if txid >= self.xmax {
            return false;
        }
        self.xip.binary_search(&txid).is_err()
    }

    /// Whether every transaction visible in `earlier` is visible here too.
    /// (Not "xmin >= earlier.xmax": a transaction that was running in both,
    /// anywhere in the cluster, would keep that false for as long as it runs.)
    pub fn covers(&self, earlier: &Snapshot) -> bool {
        self.xmax >= earlier.xmax
            && self
                .xip
                .iter()
                .all(|&x| x >= earlier.xmax || !earlier.visible(x))
    }
}

fn preview(s: &str) -> String {
    let mut p: String = s.chars().take(80).collect();
    if p.len() < s.len() {
        p.push_str("...");
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{fq_name, split_qualified};

    #[test]
    fn copy_lines_match_the_parsed_fields() {
        // COPY text of the parsed fields, the slow way.
        fn expected(rec: &str, want: &[bool]) -> String {
            let f = parse_record(rec).unwrap();
            let mut out = Vec::new();
            for (v, _) in f.iter().zip(want).filter(|(_, w)| **w) {
                out.push(match v {
                    None => "\\N".to_string(),
                    Some(v) => v
                        .replace('\\', "\\\\")
                        .replace('\t', "\\t")
                        .replace('\n', "\\n")
                        .replace('\r', "\\r"),
                });
            }
            out.join("\t") + "\n"
        }
        let big = "x".repeat(200_000);
        for (rec, want) in [
            ("(1,abc,)", vec![true, true, true]),
            ("(1,\"a,b\",\"\")", vec![true, false, true]),
            (
                "(,\"say \"\"hi\"\"\",\"back\\\\slash\ttab\nnl\r\")",
                vec![true, true, true],
            ),
            ("(7,\"\\\\x0102\")", vec![false, true]),
            (
                &format!("(1,{big},\"{big}\\\\\")") as &str,
                vec![true, true, true],
            ),
        ] {
            let mut got = Vec::new();
            let n = write_record_copy(rec, &want, &mut got).unwrap();
            assert_eq!(n, want.len(), "{rec:.60}");
            assert_eq!(
                String::from_utf8(got).unwrap(),
                expected(rec, &want),
                "{rec:.60}"
            );
        }
        assert!(write_record_copy("(1,\"open)", &[true, true], &mut Vec::new()).is_err());
        assert!(write_record_copy("1,2", &[true, true], &mut Vec::new()).is_err());
    }

    #[test]
    fn snapshot_covers() {
        let snap = |s: &str| Snapshot::parse(s).unwrap();
        let copy = snap("100:120:100,110");
        // 100 still running in both: covered (the old rule waited for it).
        assert!(snap("100:130:100,125").covers(&copy));
        assert!(snap("100:130:100,110,125").covers(&copy));
        // 115 was visible to the copy but is running at the tick: impossible in
        // practice, and not covered.
        assert!(!snap("100:130:100,115").covers(&copy));
        // The tick is older than the copy.
        assert!(!snap("100:119:100").covers(&copy));
        // Branch ticks: everything up to the worker's own transaction.
        assert!(snap("131:131:").covers(&copy));
    }

    #[test]
    fn records() {
        let r = parse_record(r#"(1,"b""c",,"","a\\b","x,y")"#).unwrap();
        assert_eq!(
            r,
            vec![
                Some("1".into()),
                Some("b\"c".into()),
                None,
                Some("".into()),
                Some("a\\b".into()),
                Some("x,y".into())
            ]
        );
        assert_eq!(parse_record("()").unwrap(), vec![None]);
        assert!(parse_record("(\"a)").is_err());
    }

    #[test]
    fn arrays() {
        assert_eq!(
            parse_text_array(r#"{id,"a b","q\"x",c}"#).unwrap(),
            vec!["id", "a b", "q\"x", "c"]
        );
        assert!(parse_text_array("{}").unwrap().is_empty());
    }

    #[test]
    fn snapshots() {
        let s = Snapshot::parse("10:20:12,15").unwrap();
        assert!(s.visible(9) && s.visible(11) && !s.visible(12) && !s.visible(20) && s.visible(19));
    }

    #[test]
    fn names() {
        assert_eq!(
            split_qualified("T1").unwrap(),
            ("public".into(), "t1".into())
        );
        assert_eq!(
            split_qualified(r#""My.S"."x""y""#).unwrap(),
            ("My.S".into(), "x\"y".into())
        );
        assert_eq!(fq_name("public", "Order"), r#"public."Order""#);
        assert_eq!(fq_name("public", "order"), r#"public."order""#);
        assert!(split_qualified("a.b.c").is_err());
    }

    #[test]
    fn columns_from_json_or_array() {
        assert_eq!(
            parse_columns(
                r#"{"id":null,"odd \"na\\me\"":null,"\u00e9t\u00e9":null,"x:null":null}"#
            )
            .unwrap(),
            vec!["id", "odd \"na\\me\"", "été", "x:null"]
        );
        assert_eq!(
            parse_columns(r#"{ "a" : null, "b" : null }"#).unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(
            parse_columns(r#"{"\ud83d\ude00":null}"#).unwrap(),
            vec!["😀"]
        );
        // Array literals, including ones that look a bit like JSON.
        assert_eq!(parse_columns(r#"{id,"a b"}"#).unwrap(), vec!["id", "a b"]);
        assert_eq!(parse_columns(r#"{"x\":null"}"#).unwrap(), vec!["x\":null"]);
        assert_eq!(parse_columns("{a:null}").unwrap(), vec!["a:null"]);
    }

    #[test]
    fn multi_row_text_splits_at_row_ends() {
        let s = "(1,\"a)\nb\")\n(2,)\n(3,\"q\\\"\"\"\")";
        let rows = split_rows(s).unwrap();
        assert_eq!(rows, vec!["(1,\"a)\nb\")", "(2,)", "(3,\"q\\\"\"\"\")"]);
        assert_eq!(
            parse_record(rows[0]).unwrap(),
            vec![Some("1".into()), Some("a)\nb".into())]
        );
        assert_eq!(split_rows("(1)").unwrap(), vec!["(1)"]);
        assert!(split_rows("(1,\"x)").is_err());
        assert!(split_rows("(1)x(2)").is_err());
    }
}
