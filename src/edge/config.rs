//! The edge's configuration: global (`verify_cache`, one cache for every store: memory is
//! a process-wide budget). The per-store keys (`verify_recipients`, `verify_timeout`,
//! `verify_tempfail_action`, `backpressure`, keys of a `kind: lmtp` or `kind: smtp` store)
//! belong to the store's configuration ([`crate::delivery::edge_config`]) and are re-exported
//! here.
//!
//! ```yaml
//! verify_cache: { positive: 1h, negative: 10m, max_entries: 1000000 }
//! stores:
//!   - name: cyrus1
//!     kind: lmtp
//!     address: 10.0.0.11:2003
//!     verify_recipients: true          # ask the store at RCPT (MAIL FROM:<>, RCPT, RSET)
//!     verify_timeout: 5s               # a window slot, a connection and the replies
//!     verify_tempfail_action: tempfail # or accept (Postfix's unverified_recipient_tempfail_action)
//!     backpressure: { max_queued: 5000, max_oldest: 30m }
//! ```

use std::time::Duration;

use serde::Deserialize;

use crate::config::units::Span;
pub use crate::delivery::edge_config::{
    BackpressureConfig, EdgeSettings, TempfailAction, VerifySettings, default_verify_timeout,
};

/// `verify_cache:` (top level): how long answers are kept, and how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyCacheConfig {
    /// How long "the store knows this recipient" is kept: 1h.
    #[serde(default = "default_positive")]
    pub positive: Span,
    /// How long "the store does not know this recipient" (5xx) is kept: 10m.
    #[serde(default = "default_negative")]
    pub negative: Span,
    /// Entries kept, at most, for every store together (the oldest go first): 1,000,000
    /// (about 120 bytes each for a 30-octet address).
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
}

impl Default for VerifyCacheConfig {
    fn default() -> Self {
        Self {
            positive: default_positive(),
            negative: default_negative(),
            max_entries: default_max_entries(),
        }
    }
}

fn default_positive() -> Span {
    Span(Duration::from_secs(3600))
}

fn default_negative() -> Span {
    Span(Duration::from_secs(600))
}

fn default_max_entries() -> usize {
    1_000_000
}
