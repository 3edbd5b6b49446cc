//! Per-store backpressure: a store's load as its scheduler shard last saw it, and the
//! `451 4.3.2` the listeners give that store's recipients while it is over its limits.
//!
//! Owns: one [`StoreLoad`] per store, written by the shard that owns the store (about once a
//! second, [`StoreLoad::update`]) and read by every listener at RCPT ([`StoreLoad::refusal`])
//! without a round trip: three relaxed atomics, no lock. The load is over its limits while
//! the store has `max_queued` or more queued recipients, or its oldest queued recipient is
//! older than `max_oldest`, or its breaker has been open longer than `max_oldest`.
//!
//! Promises: only the store's own recipients are refused, and only with a 4yz (the client
//! retries; nothing is lost). Entering and leaving backpressure are logged once each and
//! set `postern_store_backpressure{store}` (1 while refusing). A store without limits is
//! never refused. The global disk guard (`452 4.3.1` at MAIL below `spool.min_free`) is
//! separate and stays the last line.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use metrics::gauge;
use postern_proto::{Reply, replies};

use crate::delivery::edge_config::BackpressureConfig;
use crate::metrics as m;

/// Why a store is refusing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// Under its limits.
    Clear,
    /// `max_queued` or more recipients queued.
    Queued,
    /// The oldest queued recipient is older than `max_oldest`.
    Oldest,
    /// The breaker has been open longer than `max_oldest`.
    Down,
}

impl Condition {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Queued,
            2 => Self::Oldest,
            3 => Self::Down,
            _ => Self::Clear,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Clear => 0,
            Self::Queued => 1,
            Self::Oldest => 2,
            Self::Down => 3,
        }
    }
}

/// What the shard measured for a store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Open recipients for the store: waiting, in flight, deferred or parked.
    pub queued: u64,
    /// Age of the oldest of them.
    pub oldest: Duration,
    /// How long the breaker has been open (none: closed).
    pub down_for: Option<Duration>,
}

/// One store's load, shared by its shard (writer) and the listeners (readers).
#[derive(Debug)]
pub struct StoreLoad {
    store: String,
    limits: BackpressureConfig,
    condition: AtomicU8,
    queued: AtomicU64,
    /// Seconds: the oldest queued recipient's age, or how long the breaker has been open.
    age: AtomicU64,
    /// The breaker is open (whatever the limits): verification does not ask the store.
    down: AtomicBool,
}

impl StoreLoad {
    /// A store's load, clear, with these limits.
    pub fn new(store: &str, limits: BackpressureConfig) -> Self {
        Self {
            store: store.to_owned(),
            limits,
            condition: AtomicU8::new(0),
            queued: AtomicU64::new(0),
            age: AtomicU64::new(0),
            down: AtomicBool::new(false),
        }
    }

    /// The store's breaker was open at the shard's last look.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// The limits.
    pub fn limits(&self) -> BackpressureConfig {
        self.limits
    }

    /// Where the store stands now.
    pub fn condition(&self) -> Condition {
        Condition::from_u8(self.condition.load(Ordering::Relaxed))
    }

    /// The shard's latest measurement. Logs and sets the gauge when the store enters or
    /// leaves backpressure (or changes why).
    pub fn update(&self, sample: Sample) {
        self.down
            .store(sample.down_for.is_some(), Ordering::Relaxed);
        if self.limits.is_empty() {
            return;
        }
        let over = |d: Duration| self.limits.max_oldest.is_some_and(|max| d > max.0);
        let (condition, age) = match sample.down_for {
            Some(d) if over(d) => (Condition::Down, d),
            _ if self.limits.max_queued.is_some_and(|n| sample.queued >= n) => {
                (Condition::Queued, sample.oldest)
            }
            _ if over(sample.oldest) => (Condition::Oldest, sample.oldest),
            _ => (Condition::Clear, sample.oldest),
        };
        self.queued.store(sample.queued, Ordering::Relaxed);
        self.age.store(age.as_secs(), Ordering::Relaxed);
        let before = Condition::from_u8(self.condition.swap(condition.to_u8(), Ordering::Relaxed));
        if before == condition {
            return;
        }
        let on = condition != Condition::Clear;
        gauge!(m::STORE_BACKPRESSURE, "store" => self.store.clone()).set(if on {
            1.0
        } else {
            0.0
        });
        if on {
            tracing::warn!(
                store = %self.store,
                queued = sample.queued,
                oldest_seconds = sample.oldest.as_secs(),
                reason = %self.text(condition),
                "store in backpressure: its recipients get 451 4.3.2 at RCPT"
            );
        } else {
            tracing::info!(
                store = %self.store,
                queued = sample.queued,
                oldest_seconds = sample.oldest.as_secs(),
                "store left backpressure: its recipients are accepted again"
            );
        }
    }

    /// `451 4.3.2` naming the condition while the store is over its limits.
    pub fn refusal(&self) -> Option<Reply> {
        match self.condition() {
            Condition::Clear => None,
            c => Some(replies::store_backlogged(&self.text(c))),
        }
    }

    fn text(&self, condition: Condition) -> String {
        let queued = self.queued.load(Ordering::Relaxed);
        let age = human(Duration::from_secs(self.age.load(Ordering::Relaxed)));
        let store = &self.store;
        match condition {
            Condition::Queued => format!("Store {store} is backlogged: {queued} recipients queued"),
            Condition::Oldest => {
                format!("Store {store} is backlogged: oldest queued recipient waiting {age}")
            }
            Condition::Down => format!("Store {store} is down for {age}"),
            Condition::Clear => format!("Store {store} is available"),
        }
    }
}

/// `45s`, `31m`, `2h5m`: whole units, for reply texts.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        _ if s % 3600 / 60 == 0 => format!("{}h", s / 3600),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::Span;

    fn load(max_queued: Option<u64>, max_oldest: Option<u64>) -> StoreLoad {
        let limits = BackpressureConfig {
            max_queued,
            max_oldest: max_oldest.map(|s| Span(Duration::from_secs(s))),
        };
        StoreLoad::new("cyrus1", limits)
    }

    fn sample(queued: u64, oldest: u64, down_for: Option<u64>) -> Sample {
        Sample {
            queued,
            oldest: Duration::from_secs(oldest),
            down_for: down_for.map(Duration::from_secs),
        }
    }

    #[test]
    fn each_limit_names_its_condition_and_clears() {
        let l = load(Some(5000), Some(1800));
        l.update(sample(4999, 10, None));
        assert_eq!(l.refusal(), None);
        l.update(sample(5000, 10, None));
        let r = l.refusal().unwrap();
        assert_eq!(
            r.to_string(),
            "451 4.3.2 Store cyrus1 is backlogged: 5000 recipients queued"
        );
        l.update(sample(3, 1860, None));
        assert_eq!(
            l.refusal().unwrap().to_string(),
            "451 4.3.2 Store cyrus1 is backlogged: oldest queued recipient waiting 31m"
        );
        l.update(sample(0, 0, Some(7500)));
        assert_eq!(
            l.refusal().unwrap().to_string(),
            "451 4.3.2 Store cyrus1 is down for 2h5m"
        );
        l.update(sample(0, 0, Some(60)));
        assert_eq!(
            l.refusal(),
            None,
            "down, but not for longer than max_oldest"
        );
    }

    #[test]
    fn no_limits_never_refuse_but_a_down_store_is_known() {
        let l = load(None, None);
        l.update(sample(1_000_000, 1_000_000, Some(1_000_000)));
        assert_eq!(l.refusal(), None);
        assert!(l.is_down());
        l.update(sample(0, 0, None));
        assert!(!l.is_down());
    }
}
