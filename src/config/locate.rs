//! Line numbers for configuration errors.
//!
//! serde_yaml knows where a parse error is; semantic errors found after parsing only know
//! their key path. [`line_of`] finds a key path in the YAML text by indentation, which is
//! exact for the block style configuration files use, and gives up (no line) on anything
//! else rather than guess.

use super::ConfigError;

/// A serde_yaml error as a [`ConfigError`]: its key path, line and message.
pub(super) fn parse_error(e: &serde_yaml::Error, text: &str, file: &str) -> ConfigError {
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
    let line = e
        .location()
        .map(|l| l.line())
        .or_else(|| line_of(text, &path));
    ConfigError {
        file: file.to_owned(),
        line,
        path,
        message,
    }
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

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
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
        found = Some(n);
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
    found.map(|n| n + 1)
}
