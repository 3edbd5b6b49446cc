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
//!   poison_attempts: 5           # abnormal attempts in a row, then quarantine (0: never)
//! ```
//!
//! Every key has a default; unknown keys are refused. [`SchedulerConfig::validate`] checks
//! what serde cannot (bounds that depend on each other).

use std::time::Duration;

use serde::Deserialize;

use super::retry::RetryPolicy;
use crate::config::units::{Invalid, Span};

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
    /// A recipient whose delivery attempts ended abnormally this many times in a row (left
    /// in doubt: the connection lost after the final dot, the store or the gateway killed
    /// during the attempt) quarantines its message instead of being tried again: 5. `0`
    /// never quarantines.
    #[serde(default = "default_poison_attempts")]
    pub poison_attempts: u32,
}

/// The `delivery:` keys that change live, at a reload ([`crate::scheduler::Scheduler::update_delivery`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveDelivery {
    /// `minimal_backoff`, `maximal_backoff`, `maximal_lifetime`.
    pub policy: RetryPolicy,
    /// `delay_warning`.
    pub delay_warning: Option<Duration>,
    /// `breaker.failures`.
    pub breaker_failures: u32,
    /// `breaker.probe_interval`.
    pub probe_interval: Duration,
    /// `poison_attempts`.
    pub poison_attempts: u32,
}

/// What a reload changes in `delivery:` ([`SchedulerConfig::diff`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryDiff {
    /// Changed keys that take effect live: `"delivery.maximal_backoff: 4000s -> 600s"`.
    pub live: Vec<String>,
    /// Changed keys that need a restart: `"delivery.shards"`.
    pub restart: Vec<&'static str>,
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
            poison_attempts: default_poison_attempts(),
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
    pub fn validate(&self) -> Result<(), Invalid> {
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

    /// What changed from `self` to `new`: the keys that change live, as
    /// `"delivery.key: old -> new"`, and the keys that need a restart, as `"delivery.key"`.
    pub fn diff(&self, new: &Self) -> DeliveryDiff {
        let mut d = DeliveryDiff::default();
        let mut live = |key: &str, a: String, b: String| {
            if a != b {
                d.live.push(format!("delivery.{key}: {a} -> {b}"));
            }
        };
        let opt = |s: Option<Span>| s.map_or_else(|| "none".to_owned(), |s| s.to_string());
        live(
            "minimal_backoff",
            self.minimal_backoff.to_string(),
            new.minimal_backoff.to_string(),
        );
        live(
            "maximal_backoff",
            self.maximal_backoff.to_string(),
            new.maximal_backoff.to_string(),
        );
        live(
            "maximal_lifetime",
            self.maximal_lifetime.to_string(),
            new.maximal_lifetime.to_string(),
        );
        live(
            "delay_warning",
            opt(self.delay_warning),
            opt(new.delay_warning),
        );
        live(
            "breaker.failures",
            self.breaker.failures.to_string(),
            new.breaker.failures.to_string(),
        );
        live(
            "breaker.probe_interval",
            self.breaker.probe_interval.to_string(),
            new.breaker.probe_interval.to_string(),
        );
        live(
            "poison_attempts",
            self.poison_attempts.to_string(),
            new.poison_attempts.to_string(),
        );
        let mut restart = |key: &'static str, changed: bool| {
            if changed {
                d.restart.push(key);
            }
        };
        restart("delivery.enabled", self.enabled != new.enabled);
        restart("delivery.shards", self.shards != new.shards);
        restart(
            "delivery.active_limit",
            self.active_limit != new.active_limit,
        );
        restart(
            "delivery.initial_window",
            self.initial_window != new.initial_window,
        );
        restart(
            "delivery.per_mailbox_serialization",
            self.per_mailbox_serialization != new.per_mailbox_serialization,
        );
        d
    }

    /// Copies the keys that change live from `new` (the others stay as they are).
    pub fn apply_live(&mut self, new: &Self) {
        self.minimal_backoff = new.minimal_backoff;
        self.maximal_backoff = new.maximal_backoff;
        self.maximal_lifetime = new.maximal_lifetime;
        self.delay_warning = new.delay_warning;
        self.breaker = new.breaker.clone();
        self.poison_attempts = new.poison_attempts;
    }

    /// The live part, as the scheduler uses it.
    pub fn live(&self) -> LiveDelivery {
        // validate() refuses a zero backoff; never retry in a tight loop.
        let minimal_backoff = self.minimal_backoff.0.max(Duration::from_millis(10));
        LiveDelivery {
            policy: RetryPolicy {
                minimal_backoff,
                // validate() refuses max < min; never let clamp() see it.
                maximal_backoff: self.maximal_backoff.0.max(minimal_backoff),
                maximal_lifetime: self.maximal_lifetime.0,
            },
            delay_warning: self.delay_warning.map(|s| s.0),
            breaker_failures: self.breaker.failures.max(1),
            // validate() refuses a zero interval; never probe in a tight loop.
            probe_interval: self.breaker.probe_interval.0.max(Duration::from_millis(10)),
            poison_attempts: self.poison_attempts,
        }
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
fn default_poison_attempts() -> u32 {
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
    fn diff_sorts_live_keys_from_restart_keys() {
        let old = SchedulerConfig::default();
        assert_eq!(old.diff(&old), DeliveryDiff::default());
        let new: SchedulerConfig = serde_yaml::from_str(
            "{maximal_backoff: 600s, maximal_lifetime: 2d, delay_warning: 4h, shards: 3, initial_window: 2, breaker: {failures: 9}, active_limit: 7}",
        )
        .unwrap();
        let d = old.diff(&new);
        assert_eq!(
            d.live,
            [
                "delivery.maximal_backoff: 4000s -> 10m",
                "delivery.maximal_lifetime: 5d -> 2d",
                "delivery.delay_warning: none -> 4h",
                "delivery.breaker.failures: 5 -> 9",
            ]
        );
        assert_eq!(
            d.restart,
            [
                "delivery.shards",
                "delivery.active_limit",
                "delivery.initial_window"
            ]
        );
        let mut applied = old;
        applied.apply_live(&new);
        assert!(
            applied.diff(&new).live.is_empty(),
            "the live keys were copied"
        );
        assert_eq!(applied.diff(&new).restart, d.restart, "the others were not");
        assert_eq!(
            applied.live().policy.maximal_backoff,
            Duration::from_secs(600)
        );
        assert_eq!(
            applied.live().delay_warning,
            Some(Duration::from_secs(14_400))
        );
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
