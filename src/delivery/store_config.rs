//! `stores:` — one entry per store, by `kind:` ([`StoreConfig`]): a maildir, a discard or
//! error policy route, or the settings of an LMTP store, an SMTP relay or a pipe command
//! (each kind's own keys are in [`super::config`] and [`super::pipe`]).

use std::path::PathBuf;

use serde::Deserialize;

use super::config::{LmtpStoreConfig, SmtpStoreConfig};
use super::pipe::PipeStoreConfig;

/// One entry of `stores:`, by `kind:`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// Local maildirs under `root/<domain>/<user>/Maildir` (like Postfix's virtual(8)).
    Maildir {
        /// Name used by routes.
        name: String,
        /// Root directory.
        root: PathBuf,
    },
    /// Accept and drop (a policy route).
    Discard {
        /// Name used by routes.
        name: String,
    },
    /// A mailbox store reached over LMTP (Cyrus, Dovecot).
    Lmtp(Box<LmtpStoreConfig>),
    /// A relay to a fixed next hop over SMTP (bounces, mail to other domains).
    Smtp(Box<SmtpStoreConfig>),
    /// A command with the message on stdin (like Postfix's pipe(8)).
    Pipe(Box<PipeStoreConfig>),
    /// Every recipient gets this reply: 4yz deferred, 5yz bounced (a policy route).
    Error {
        /// Name used by routes.
        name: String,
        /// `550 5.7.1 text`, as on the wire.
        #[serde(deserialize_with = "super::policy::deserialize_fixed_reply")]
        reply: postern_proto::Reply,
    },
}

impl StoreConfig {
    /// The store's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Maildir { name, .. } | Self::Discard { name } | Self::Error { name, .. } => name,
            Self::Lmtp(l) | Self::Smtp(l) => &l.name,
            Self::Pipe(p) => &p.name,
        }
    }
}
