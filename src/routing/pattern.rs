//! `routes.patterns`: regex or wildcard rules over the normalised address, tried in order
//! after the exact entries.
//!
//! A wildcard is compiled to an anchored regex (`*` any run, `?` one character, everything
//! else literal), so both kinds match the same way; a regex is used as written (anchor it
//! yourself). Matching is against `user@domain` after normalisation, with the extension and then
//! without it.
//!
//! Fails: a pattern that does not compile is a [`PatternError`], which names the kind of
//! rule and the regex engine's reason; the configuration check reports it at the rule's key.

use regex::Regex;

use super::Target;

/// Why a rule's pattern did not compile.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum PatternError {
    /// The regex, as written.
    #[error("bad regex: {0}")]
    Regex(regex::Error),
    /// The regex a wildcard compiles to (too large, in practice).
    #[error("bad wildcard: {0}")]
    Wildcard(regex::Error),
}

/// One compiled pattern.
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    regex: Regex,
    /// As written, for explanations.
    pub(crate) text: String,
    pub(crate) target: Target,
}

impl Pattern {
    /// Compiles a regex rule.
    pub(crate) fn regex(text: &str, target: Target) -> Result<Self, PatternError> {
        let regex = Regex::new(text).map_err(PatternError::Regex)?;
        Ok(Self {
            regex,
            text: text.to_owned(),
            target,
        })
    }

    /// Compiles a wildcard rule.
    pub(crate) fn wildcard(text: &str, target: Target) -> Result<Self, PatternError> {
        let regex = Regex::new(&wildcard_regex(text)).map_err(PatternError::Wildcard)?;
        Ok(Self {
            regex,
            text: text.to_owned(),
            target,
        })
    }

    /// True when the normalised address matches.
    pub(crate) fn matches(&self, address: &str) -> bool {
        self.regex.is_match(address)
    }
}

/// `*@lists.example` → `^.*@lists\.example$` (case-insensitive: addresses are normalised,
/// but a pattern written in capitals should still match a folded domain).
pub(crate) fn wildcard_regex(text: &str) -> String {
    let mut out = String::from("(?i)^");
    for c in text.chars() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            c => out.push_str(&regex::escape(&c.to_string())),
        }
    }
    out.push('$');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_are_anchored_and_literal() {
        let p = Pattern::wildcard("*@lists.example", Target::Store(0)).unwrap();
        assert!(p.matches("dev@lists.example"));
        assert!(!p.matches("dev@lists.example.org"));
        assert!(!p.matches("dev@listsxexample"));
        let q = Pattern::wildcard("bounce-?@Example.org", Target::Store(0)).unwrap();
        assert!(q.matches("bounce-1@example.org"));
        assert!(!q.matches("bounce-12@example.org"));
    }

    #[test]
    fn bad_regex_is_an_error_with_its_reason() {
        let e = Pattern::regex("^(unclosed", Target::Store(0))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bad regex: "), "{e}");
    }
}
