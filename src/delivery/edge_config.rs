//! A store's edge keys (`verify_recipients`, `verify_timeout`, `verify_tempfail_action`,
//! `backpressure` of a `kind: lmtp` or `kind: smtp` store) and the settings the delivery
//! agent keeps from them. What the edge does with them is in [`crate::edge`]; the
//! backpressure limits are applied by the scheduler's [`crate::scheduler::load`].

use std::time::Duration;

use serde::Deserialize;

use crate::config::units::{Invalid, Span};

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
    pub fn validate(&self) -> Result<(), Invalid> {
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

/// The default `verify_timeout`: 5s.
pub fn default_verify_timeout() -> Span {
    Span(Duration::from_secs(5))
}
