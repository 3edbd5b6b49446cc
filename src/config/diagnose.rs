//! Every error of a configuration file, not only the first, so that `check-config` lists
//! them all (a file with three mistakes prints three lines).
//!
//! serde stops at the first error. After it, the document is read again as plain YAML, the
//! key at fault is taken out (an unknown key, or a key with a bad value), and the rest is
//! parsed again, until it parses or nothing more can be taken out: a missing required key,
//! a bad list item (taking it out would renumber the items after it) or a YAML syntax error
//! end the search. Once the rest parses, the semantic checks run on it too; a check on a key
//! that was taken out (it then has its default) is not reported. Every error is located in
//! the original text by its key path ([`locate::position_of`]), and they are listed in the
//! order of the file.

use serde_yaml::Value;

use super::error::ConfigError;
use super::{Config, locate};

/// At most this many errors are listed.
const MAX_ERRORS: usize = 64;

/// The errors of `text`, the first of which is `first`.
pub(super) fn parse_errors(first: &serde_yaml::Error, text: &str, file: &str) -> Vec<ConfigError> {
    let mut errors = vec![locate::parse_error(first, text, file)];
    // A syntax error: nothing after it can be read.
    let Ok(mut document) = serde_yaml::from_str::<Value>(text) else {
        return errors;
    };
    while errors.len() < MAX_ERRORS {
        let Some(last) = errors.last() else { break };
        if !take_out(&mut document, last) {
            break;
        }
        let Ok(edited) = serde_yaml::to_string(&document) else {
            break;
        };
        match serde_yaml::from_str::<Config>(&edited) {
            Ok(rest) => {
                semantic(&rest, &mut errors, text, file);
                break;
            }
            Err(e) => {
                let next = locate::reparse_error(&e, text, file);
                // The same fault again, or a required key missing because it was taken
                // out: nothing new.
                let at = fault_path(&next);
                if errors.iter().any(|x| fault_path(x) == at) {
                    break;
                }
                errors.push(next);
            }
        }
    }
    // In the order of the file (found in the order serde reads it; unplaced ones last).
    errors.sort_by_key(|e| (e.line.is_none(), e.line, e.column));
    errors
}

/// The semantic errors of what parsed, except on keys already reported.
fn semantic(config: &Config, errors: &mut Vec<ConfigError>, text: &str, file: &str) {
    let reported: Vec<String> = errors.iter().map(fault_path).collect();
    for (path, message) in config.validate() {
        let overlaps = reported
            .iter()
            .any(|r| path.starts_with(r.as_str()) || r.starts_with(path.as_str()));
        if !overlaps {
            let position = locate::position_of(text, &path);
            errors.push(ConfigError::at(file, position, path, message));
        }
    }
}

/// The key at fault: an unknown or a missing key is its own path, not its mapping's.
fn fault_path(e: &ConfigError) -> String {
    let key = locate::unknown_field(&e.message).or_else(|| missing_field(&e.message));
    match key {
        Some(key) if e.path.is_empty() => key.to_owned(),
        Some(key) => format!("{}.{key}", e.path),
        None => e.path.clone(),
    }
}

/// The key of serde's "missing field `x`".
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split_once('`').map(|(key, _)| key)
}

/// Takes the key at fault out of `document`; false when there is none to take out.
fn take_out(document: &mut Value, error: &ConfigError) -> bool {
    let mut segments = locate::segments(&error.path);
    let key = match locate::unknown_field(&error.message) {
        Some(unknown) => unknown.to_owned(),
        None => match segments.pop() {
            Some(locate::Segment::Key(k)) => k.to_owned(),
            // A list item, the top level: nothing to take out without renumbering.
            Some(locate::Segment::Index(_)) | None => return false,
        },
    };
    let mut node = document;
    for segment in segments {
        node = match (segment, node) {
            (locate::Segment::Key(k), Value::Mapping(m)) => match m.get_mut(k) {
                Some(v) => v,
                None => return false,
            },
            (locate::Segment::Index(i), Value::Sequence(s)) => match s.get_mut(i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match node {
        Value::Mapping(m) => m.remove(key.as_str()).is_some(),
        _ => false,
    }
}
