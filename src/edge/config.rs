//! The edge's configuration: per store (`verify_recipients`, `verify_timeout`,
//! `verify_tempfail_action`, `backpressure`, keys of a `kind: lmtp` or `kind: smtp` store)
//! and global (`verify_cache`, one cache for every store: memory is a process-wide budget).
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

use crate::config::Span;

/// What RCPT gets when the store could not answer (a 4xx, a timeout, no window slot, down).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TempfailAction {
    /// `450 4.1.1`: the client retries later (the default; never a 5xx).
    #[default]
    Tempfail,
    /// Accept the recipient unverified, as if verification were off.
    Accept,
}

/// `backpressure:` of a store. Either limit may be left out; with neither, there is none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackpressureConfig {
    /// At this many queued recipients (or more), RCPT for the store gets `451 4.3.2`.
    #[serde(default)]
    pub max_queued: Option<u64>,
    /// When the store's oldest queued recipient is older than this, or its breaker has
    /// been open longer than this, RCPT for the store gets `451 4.3.2`.
    #[serde(default)]
    pub max_oldest: Option<Span>,
}

impl BackpressureConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_queued == Some(0) {
            return Err("backpressure.max_queued: must be at least 1".into());
        }
        if self.max_oldest.is_some_and(|s| s.0.is_zero()) {
            return Err("backpressure.max_oldest: must be above 0".into());
        }
        Ok(())
    }

    /// No limit set.
    pub fn is_empty(&self) -> bool {
        self.max_queued.is_none() && self.max_oldest.is_none()
    }
}

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

/// A store's edge settings, as the delivery agent keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeSettings {
    /// Verification at RCPT, when on.
    pub verify: Option<VerifySettings>,
    /// Backpressure limits (empty: none).
    pub backpressure: BackpressureConfig,
}

/// Verification settings of one store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifySettings {
    /// The whole verification: a window slot, a connection, the three replies.
    pub timeout: Duration,
    /// When the store could not answer.
    pub tempfail: TempfailAction,
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

/// The default `verify_timeout`: 5s.
pub fn default_verify_timeout() -> Span {
    Span(Duration::from_secs(5))
}
