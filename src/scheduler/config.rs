//! `delivery:` — the scheduler's settings (Postfix's qmgr parameters, with units).
//!
//! ```yaml
//! delivery:
//!   enabled: true                # false: accept and queue only
//!   shards: 2                    # default: the number of cores
//!   minimal_backoff: 5m
//!   maximal_backoff: 4000s
//!   maximal_lifetime: 5d         # then bounce
//!   delay_warning: 4h            # optional "still trying" DSN
//!   active_limit: 20000          # messages attempted at once
//!   initial_window: 5            # per-store slow-start concurrency
//!   per_mailbox_serialization: true
//!   breaker: { failures: 5, probe_interval: 30s }
//! ```
//!
//! Every key has a default; unknown keys are refused. [`SchedulerConfig::validate`] checks
//! what serde cannot (bounds that depend on each other).

use std::time::Duration;

use serde::Deserialize;

use crate::config::Span;

/// The `delivery:` section.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Deliver queued mail: true. `false` accepts and queues only (maintenance, intake
    /// tests); the queue is delivered at the next start with it on.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Scheduler shards (independent tasks, each owning a disjoint set of stores and of
    /// messages). Default: the number of cores.
    #[serde(default)]
    pub shards: Option<usize>,
    /// The shortest time between two attempts of a deferred message: 5m.
    #[serde(default = "default_minimal_backoff")]
    pub minimal_backoff: Span,
    /// The longest time between two attempts: 4000s.
    #[serde(default = "default_maximal_backoff")]
    pub maximal_backoff: Span,
    /// A message still undelivered this long after its arrival is bounced: 5d.
    #[serde(default = "default_maximal_lifetime")]
    pub maximal_lifetime: Span,
    /// After this long in the queue, the sender gets one "delayed" DSN: none by default.
    #[serde(default)]
    pub delay_warning: Option<Span>,
    /// Messages being attempted at once, across the shards (Postfix's
    /// `qmgr_message_active_limit`): 20000. More wait in a FIFO, as a queue id each, so a
    /// large queue does not sit in memory whole.
    #[serde(default = "default_active_limit")]
    pub active_limit: usize,
    /// Each store's concurrency window starts here (slow start) and grows after runs of
    /// successes up to the store's `max_connections`: 5.
    #[serde(default = "default_initial_window")]
    pub initial_window: usize,
    /// At most one delivery per mailbox at a time, so a store's per-user locks are not
    /// fought over: true.
    #[serde(default = "default_true")]
    pub per_mailbox_serialization: bool,
    /// The per-store circuit breaker.
    #[serde(default)]
    pub breaker: BreakerConfig,
}

/// `delivery.breaker:`
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive connection or handshake failures (no success between them) that mark a
    /// store down: 5, one cohort at the initial window.
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// While down, the store is probed (LHLO) about this often, jittered by ±25%: 30s.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: Span,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            shards: None,
            minimal_backoff: default_minimal_backoff(),
            maximal_backoff: default_maximal_backoff(),
            maximal_lifetime: default_maximal_lifetime(),
            delay_warning: None,
            active_limit: default_active_limit(),
            initial_window: default_initial_window(),
            per_mailbox_serialization: true,
            breaker: BreakerConfig::default(),
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: default_failures(),
            probe_interval: default_probe_interval(),
        }
    }
}

impl SchedulerConfig {
    /// Checks what serde cannot; the message names the key under `delivery.`.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == Some(0) {
            return Err("shards: must be at least 1".into());
        }
        if self.minimal_backoff.0.is_zero() {
            return Err("minimal_backoff: must be more than 0s".into());
        }
        if self.maximal_backoff < self.minimal_backoff {
            return Err("maximal_backoff: must not be less than minimal_backoff".into());
        }
        if self.maximal_lifetime.0.is_zero() {
            return Err("maximal_lifetime: must be more than 0s".into());
        }
        if self
            .delay_warning
            .is_some_and(|d| d.0.is_zero() || d >= self.maximal_lifetime)
        {
            return Err("delay_warning: must be between 0s and maximal_lifetime".into());
        }
        if self.active_limit == 0 {
            return Err("active_limit: must be at least 1".into());
        }
        if self.initial_window == 0 {
            return Err("initial_window: must be at least 1".into());
        }
        if self.breaker.failures == 0 {
            return Err("breaker.failures: must be at least 1".into());
        }
        if self.breaker.probe_interval.0.is_zero() {
            return Err("breaker.probe_interval: must be more than 0s".into());
        }
        Ok(())
    }

    /// The number of shards to run: the configured number, else the number of cores.
    pub fn shard_count(&self) -> usize {
        self.shards.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

fn default_minimal_backoff() -> Span {
    Span(Duration::from_secs(300))
}
fn default_maximal_backoff() -> Span {
    Span(Duration::from_secs(4000))
}
fn default_maximal_lifetime() -> Span {
    Span(Duration::from_secs(5 * 86_400))
}
fn default_active_limit() -> usize {
    20_000
}
fn default_initial_window() -> usize {
    5
}
fn default_true() -> bool {
    true
}
fn default_failures() -> u32 {
    5
}
fn default_probe_interval() -> Span {
    Span(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_units() {
        let c: SchedulerConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c, SchedulerConfig::default());
        assert_eq!(c.minimal_backoff.0, Duration::from_secs(300));
        assert_eq!(c.maximal_backoff.0, Duration::from_secs(4000));
        assert_eq!(c.maximal_lifetime.0, Duration::from_secs(432_000));
        assert!(c.validate().is_ok());
        let c: SchedulerConfig = serde_yaml::from_str(
            "{minimal_backoff: 1s, maximal_backoff: 1m, delay_warning: 4h, breaker: {failures: 2}}",
        )
        .unwrap();
        assert_eq!(c.maximal_backoff.0, Duration::from_secs(60));
        assert_eq!(c.delay_warning, Some(Span(Duration::from_secs(14_400))));
        assert_eq!(c.breaker.failures, 2);
        assert_eq!(c.breaker.probe_interval.0, Duration::from_secs(30));
    }

    #[test]
    fn unknown_keys_and_bad_bounds_are_refused() {
        assert!(serde_yaml::from_str::<SchedulerConfig>("{minimal_backof: 1s}").is_err());
        let bad = [
            "{shards: 0}",
            "{minimal_backoff: 10m, maximal_backoff: 5m}",
            "{initial_window: 0}",
            "{active_limit: 0}",
            "{delay_warning: 6d}",
            "{breaker: {failures: 0}}",
        ];
        for y in bad {
            let c: SchedulerConfig = serde_yaml::from_str(y).unwrap();
            assert!(c.validate().is_err(), "{y}");
        }
    }
}
