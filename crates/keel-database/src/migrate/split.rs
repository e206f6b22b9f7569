//! Splitting a migration's SQL into statements, so a failure names the
//! statement that failed.
//!
//! The splitter understands what can hide a semicolon: string constants
//! (`'…'`, `E'…'` with backslash escapes), quoted identifiers (`"…"`),
//! dollar-quoted bodies (`$$…$$`, `$tag$…$tag$`, as plpgsql functions use),
//! line comments (`--`) and nested block comments (`/* … */`). A file it
//! cannot split safely (a SQL-standard `BEGIN ATOMIC … END` body, whose
//! semicolons are bare) is run as one piece.

/// One statement of a migration: its text and the 1-based line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Statement<'a> {
    pub(crate) sql: &'a str,
    pub(crate) line: usize,
}

/// The statements of `sql`, each with its trailing semicolon; comments and
/// blank text between statements are left out. `None` when the text must run
/// as one piece.
pub(crate) fn statements(sql: &str) -> Option<Vec<Statement<'_>>> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    // Start of the current statement's first significant byte, if any.
    let mut start: Option<usize> = None;
    let mut i = 0;
    let mut words = WordTracker::default();
    while i < bytes.len() {
        let b = bytes[i];
        let next = bytes.get(i + 1).copied();
        match b {
            b'-' if next == Some(b'-') => {
                i = sql[i..].find('\n').map_or(bytes.len(), |n| i + n + 1);
                continue;
            }
            b'/' if next == Some(b'*') => {
                i = skip_block_comment(bytes, i);
                continue;
            }
            _ if b.is_ascii_whitespace() => {
                words.boundary();
                i += 1;
                continue;
            }
            _ => {}
        }
        if start.is_none() {
            start = Some(i);
        }
        match b {
            b'\'' => {
                let escapes = i > 0 && matches!(bytes[i - 1], b'e' | b'E') && words.len == 1;
                words.boundary();
                i = skip_quoted(bytes, i, b'\'', escapes);
            }
            b'"' => {
                words.boundary();
                i = skip_quoted(bytes, i, b'"', false);
            }
            b'$' if !words.in_word() => match dollar_tag(sql, i) {
                Some(tag) => {
                    let body = i + tag.len();
                    i = sql[body..]
                        .find(tag)
                        .map_or(bytes.len(), |n| body + n + tag.len());
                }
                None => i += 1,
            },
            b';' => {
                words.boundary();
                let from = start.take().unwrap_or(i);
                out.push(Statement {
                    sql: &sql[from..=i],
                    line: line_of(sql, from),
                });
                i += 1;
            }
            _ => {
                words.push(b);
                if words.atomic {
                    return None;
                }
                i += 1;
            }
        }
    }
    if let Some(from) = start {
        out.push(Statement {
            sql: &sql[from..],
            line: line_of(sql, from),
        });
    }
    Some(out)
}

/// The 1-based line of byte offset `at`.
pub(crate) fn line_of(sql: &str, at: usize) -> usize {
    sql.as_bytes()[..at.min(sql.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Tracks the current word and the one before it, to spot `BEGIN ATOMIC`
/// and the `E` prefix of an escape string.
#[derive(Default)]
struct WordTracker {
    current: Vec<u8>,
    previous: Vec<u8>,
    len: usize,
    atomic: bool,
}

impl WordTracker {
    fn push(&mut self, b: u8) {
        if b.is_ascii_alphanumeric() || b == b'_' {
            self.current.push(b.to_ascii_lowercase());
            self.len = self.current.len();
        } else {
            self.boundary();
        }
    }

    fn in_word(&self) -> bool {
        !self.current.is_empty()
    }

    fn boundary(&mut self) {
        if self.current.is_empty() {
            self.len = 0;
            return;
        }
        if self.previous == b"begin" && self.current == b"atomic" {
            self.atomic = true;
        }
        self.previous = std::mem::take(&mut self.current);
        self.len = 0;
    }
}

fn skip_block_comment(bytes: &[u8], mut i: usize) -> usize {
    let mut depth = 0_usize;
    while i < bytes.len() {
        if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    i
}

/// Skips a quoted string or identifier starting at `i`; a doubled quote is an
/// escaped quote, and so is a backslash-escaped one in an `E'…'` string.
fn skip_quoted(bytes: &[u8], mut i: usize, quote: u8, backslash: bool) -> usize {
    i += 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if backslash => i += 2,
            b if b == quote => {
                if bytes.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    return i + 1;
                }
            }
            _ => i += 1,
        }
    }
    i
}

/// The dollar-quote tag (`$$` or `$name$`) starting at `i`, if one does.
fn dollar_tag(sql: &str, i: usize) -> Option<&str> {
    let rest = &sql[i + 1..];
    let end = rest.find('$')?;
    let name = &rest[..end];
    let valid = name
        .bytes()
        .enumerate()
        .all(|(k, b)| b == b'_' || b.is_ascii_alphabetic() || (k > 0 && b.is_ascii_digit()));
    valid.then(|| &sql[i..i + end + 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sql: &str) -> Vec<&str> {
        statements(sql)
            .unwrap()
            .into_iter()
            .map(|s| s.sql)
            .collect()
    }

    #[test]
    fn splits_on_semicolons_outside_quotes_comments_and_bodies() {
        let sql = "-- a comment; not a statement\n\
                   CREATE TABLE t (a text DEFAULT 'x;y''z');\n\
                   /* block; /* nested; */ still; */\n\
                   CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$\n\
                   BEGIN RETURN 1; END;\n\
                   $$;\n\
                   CREATE FUNCTION g() RETURNS text LANGUAGE sql AS $body$ SELECT ';' $body$;\n\
                   SELECT \"odd;name\", E'it\\'s; fine' FROM t;\n\
                   SELECT $1";
        let got = texts(sql);
        assert_eq!(got.len(), 5, "{got:#?}");
        assert!(got[0].starts_with("CREATE TABLE t"));
        assert!(got[1].starts_with("CREATE FUNCTION f()") && got[1].ends_with("$$;"));
        assert!(got[2].ends_with("$body$;"));
        assert!(got[3].starts_with("SELECT \"odd;name\""));
        assert_eq!(got[4], "SELECT $1");
    }

    #[test]
    fn statements_know_their_lines() {
        let got = statements("\n\nSELECT 1;\n-- c\nSELECT\n2;").unwrap();
        assert_eq!(got[0].line, 3);
        assert_eq!(got[1].line, 5);
    }

    #[test]
    fn begin_atomic_bodies_run_as_one_piece() {
        let sql = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END;";
        assert_eq!(statements(sql), None);
    }

    #[test]
    fn keel_migrations_split_into_whole_statements() {
        for sql in [
            include_str!("../../migrations/20261123000000_keel_schema.sql"),
            include_str!("../../../keel-eventstore/migrations/20261123010000_eventstore.sql"),
        ] {
            let parts = statements(sql).unwrap();
            assert!(!parts.is_empty());
            for part in parts {
                let text = part.sql.trim_start().to_ascii_uppercase();
                assert!(
                    [
                        "CREATE", "COMMENT", "ALTER", "DROP", "INSERT", "SELECT", "DO"
                    ]
                    .iter()
                    .any(|w| text.starts_with(w)),
                    "odd statement start: {}",
                    part.sql
                );
            }
        }
    }
}
