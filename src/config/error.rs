//! [`ConfigError`]: one located problem in a configuration file. A leaf: every section's
//! owner reports through it without depending on the rest of the configuration.

/// A configuration error, located.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{}: {path}: {message}", line.map_or_else(|| "?".to_owned(), |l| l.to_string()))]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The key path, e.g. `listeners[0].tls.cert`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}
