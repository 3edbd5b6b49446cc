//! `kind: pipe` settings as written under `stores:` ([`PipeStoreConfig`]), their defaults,
//! and the checks serde cannot make (an absolute `argv[0]`, no `user:`, macros that parse).

use std::time::Duration;

use serde::Deserialize;

use super::argv::parse_argv;
use crate::config::units::{ByteSize, Invalid, Span};

/// One store of kind `pipe`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipeStoreConfig {
    /// Name used by routes, logs and metrics.
    pub name: String,
    /// The command and its arguments; `argv[0]` is an absolute path.
    pub argv: Vec<String>,
    /// The user to run the command as: not supported (a configuration error when set).
    #[serde(default)]
    pub user: Option<String>,
    /// The longest a run may take before it is killed: 10m.
    #[serde(default = "default_timeout")]
    pub timeout: Span,
    /// Output (stdout and stderr) kept for the reply text: 64KiB.
    #[serde(default = "default_max_output")]
    pub max_output: ByteSize,
    /// One run per recipient (true), or one run for all the recipients of a transaction.
    #[serde(default = "default_true")]
    pub per_recipient: bool,
    /// Line endings of the message on the command's stdin: `lf` (like Postfix) or `crlf`.
    #[serde(default)]
    pub line_endings: LineEndings,
}

/// Line endings of the message as the command sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LineEndings {
    /// CRLF becomes LF (a bare CR stays).
    #[default]
    Lf,
    /// As spooled.
    Crlf,
}

impl PipeStoreConfig {
    /// A store running `argv`, with every default.
    pub fn new(name: &str, argv: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            argv: argv.iter().map(|&a| a.to_owned()).collect(),
            user: None,
            timeout: default_timeout(),
            max_output: default_max_output(),
            per_recipient: true,
            line_endings: LineEndings::Lf,
        }
    }

    /// Checks what serde cannot: the message names the key.
    pub fn validate(&self) -> Result<(), Invalid> {
        parse_argv(&self.argv)?;
        if self.user.is_some() {
            return Err(
                "user: running the command as another user is not supported; \
                        run postern as that user, or let the command change user itself"
                    .into(),
            );
        }
        if self.timeout.0.is_zero() {
            return Err("timeout: must be more than 0s".into());
        }
        if self.max_output.0 > 16 << 20 {
            return Err("max_output: at most 16MiB".into());
        }
        Ok(())
    }
}

fn default_timeout() -> Span {
    Span(Duration::from_secs(600))
}
fn default_max_output() -> ByteSize {
    ByteSize(64 << 10)
}
fn default_true() -> bool {
    true
}
