//! [`ConfigError`]: one located problem in a configuration file. A leaf: every section's
//! owner reports through it without depending on the rest of the configuration.

use std::fmt;

/// A configuration error, located: `file:line:column: key.path: what is wrong` (without
/// line and column when unknown, without the key path for the file as a whole).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column of the key (or item) at fault, when known: YAML errors have one;
    /// lines of a plain list such as the users file do not.
    pub column: Option<usize>,
    /// The key path, e.g. `listeners[0].tls.cert`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error at a position of `file` (`None`: unknown), named by its key path.
    pub fn at(
        file: impl Into<String>,
        position: Option<(usize, usize)>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            line: position.map(|p| p.0),
            column: position.map(|p| p.1),
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: ", self.file)?,
            (Some(l), None) => write!(f, "{}:{l}: ", self.file)?,
            (None, _) => write!(f, "{}: ", self.file)?,
        }
        // A whole-file problem (unreadable, a missing top-level key) has no key path.
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}
