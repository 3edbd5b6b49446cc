//! Line numbers for configuration errors.
//!
//! serde_yaml knows where a parse error is; semantic errors found after parsing, and the
//! further errors found by re-parsing an edited document ([`super::diagnose`]), only know
//! their key path. [`position_of`] finds a key path in the YAML text by indentation, which is
//! exact for the block style configuration files use, and gives up (no line) on anything
//! else rather than guess.

use super::ConfigError;

/// A serde_yaml error as a [`ConfigError`]: its key path, line, column and message (with a
/// "did you mean" for an unknown key or value). `exact`: the error came from parsing `text`
/// itself, so its own mark is right; otherwise (a re-parse of an edited document) the
/// position is looked up by key path.
pub(super) fn parse_error(e: &serde_yaml::Error, text: &str, file: &str) -> ConfigError {
    located(e, text, file, true)
}

/// As [`parse_error`], for an error of an edited copy of `text`: located by key path.
pub(super) fn reparse_error(e: &serde_yaml::Error, text: &str, file: &str) -> ConfigError {
    located(e, text, file, false)
}

fn located(e: &serde_yaml::Error, text: &str, file: &str, exact: bool) -> ConfigError {
    let full = e.to_string();
    // Display is "path: message at line L column C"; the path has no spaces.
    let without_mark = match full.rfind(" at line ") {
        Some(i) => &full[..i],
        None => &full,
    };
    let (path, message) = match without_mark.split_once(": ") {
        Some((p, m)) if !p.contains(' ') => (p.to_owned(), m.to_owned()),
        _ => (String::new(), without_mark.to_owned()),
    };
    // An unknown key is found at the key itself, not at the mapping holding it.
    let at = match unknown_field(&message) {
        Some(key) if path.is_empty() => key.to_owned(),
        Some(key) => format!("{path}.{key}"),
        None => path.clone(),
    };
    let marked = e
        .location()
        .filter(|_| exact)
        .map(|l| (l.line(), l.column()));
    let position = marked.or_else(|| position_of(text, &at));
    let message = match suggestion(&message) {
        Some(better) => format!("{message}; did you mean `{better}`?"),
        None => message,
    };
    ConfigError::at(file, position, path, message)
}

/// The key of serde's "unknown field `x`, expected …".
pub(super) fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(key, _)| key)
}

/// For "unknown field `x`, expected one of `a`, `b`" (or an unknown variant), the expected
/// word closest to `x`, when it is close enough to be a typo.
fn suggestion(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (given, expected) = rest.split_once('`')?;
    let (_, expected) = expected.split_once("expected")?;
    let candidates = expected.split('`').skip(1).step_by(2);
    let (distance, best) = candidates
        .map(|c| (edit_distance(given, c), c))
        .min_by_key(|(d, _)| *d)?;
    (distance > 0 && distance <= (given.chars().count() / 3).max(2)).then_some(best)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let next = (row[j + 1] + 1).min(row[j] + 1).min(prev + cost);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Splits at dots outside brackets.
fn split_path(path: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in path.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => {
                out.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&path[start..]);
    out.retain(|p| !p.is_empty());
    out
}

pub(super) enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

pub(super) fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in split_path(path) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some(close) = rest.find(']') {
            let inner = &rest[1..close];
            match inner.parse() {
                Ok(i) => out.push(Segment::Index(i)),
                // A map key that contains dots: `routes.domains[example.org]`.
                Err(_) => out.push(Segment::Key(inner)),
            }
            rest = &rest[close + 1..];
        }
    }
    out
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// One non-blank, non-comment line of a block: (line number, indentation, text).
type Logical<'a> = (usize, usize, &'a str);

/// The lines of the block that follows line `n` whose own indentation is `parent`: every
/// later line indented deeper, plus `- ` items at the same indentation (YAML allows a
/// sequence under a key without indenting it).
fn block_after<'a>(lines: &[&'a str], n: usize, parent: usize) -> Vec<Logical<'a>> {
    let mut out = Vec::new();
    for (m, line) in lines.iter().enumerate().skip(n + 1) {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let ind = indent(line);
        if ind > parent || (ind == parent && (t.starts_with("- ") || t == "-")) {
            out.push((m, ind, t));
        } else {
            break;
        }
    }
    out
}

/// The 1-based line of a key path such as `listeners[1].tls.cert`.
pub(super) fn line_of(text: &str, path: &str) -> Option<usize> {
    position_of(text, path).map(|(line, _)| line)
}

/// The 1-based line and column of a key path such as `listeners[1].tls.cert`: where its key
/// (or, for an index, its item's dash) is written.
pub(super) fn position_of(text: &str, path: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    // The current block; at the top, every line at indentation 0.
    let mut block: Vec<Logical<'_>> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(n, l)| (n, indent(l), l.trim_start()))
        .collect();
    let mut found = None;
    for seg in segments(path) {
        let Some(level) = block.first().map(|b| b.1) else {
            break;
        };
        let hit = match seg {
            Segment::Key(key) => block.iter().find(|(_, ind, t)| {
                *ind == level && {
                    let t = t.trim_start_matches(['"', '\'']);
                    t.strip_prefix(key)
                        .is_some_and(|rest| rest.trim_start_matches(['"', '\'']).starts_with(':'))
                }
            }),
            Segment::Index(i) => block
                .iter()
                .filter(|(_, ind, t)| *ind == level && (t.starts_with("- ") || *t == "-"))
                .nth(i),
        };
        // Best effort: the deepest line found so far (a flow mapping keeps its keys on one).
        let Some(&(n, ind, t)) = hit else { break };
        // `t` is always the tail of its line: the column is where it starts.
        found = Some((n, lines[n].len() - t.len()));
        block = match seg {
            // An item's first key shares its line: treat the text after "- " as a line of
            // its own, indented past the dash.
            Segment::Index(_) => {
                let mut items = vec![(n, ind + 2, t[1..].trim_start())];
                items.extend(
                    block_after(&lines, n, ind + 1)
                        .into_iter()
                        .filter(|(_, i, _)| *i >= ind + 2),
                );
                items.retain(|(_, _, t)| !t.is_empty());
                items
            }
            Segment::Key(_) => block_after(&lines, n, ind),
        };
    }
    found.map(|(n, c)| (n + 1, c + 1))
}
