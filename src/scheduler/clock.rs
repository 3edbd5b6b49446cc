//! Wall-clock time for the scheduler, injectable for tests.
//!
//! Timers run on tokio's clock ([`tokio::time::Instant`]); the ledger and the lifetime rules
//! need wall-clock time ([`SystemTime`]: `Deferred { until }`, arrival dates). In production
//! [`Clock::System`] reads the system clock. [`Clock::FollowTokio`] derives wall-clock time
//! from tokio's clock, so a test under `tokio::time::pause()` moves both together and can
//! cross a five-day lifetime in microseconds of real time.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// Where "now" comes from.
#[derive(Clone, Copy, Debug)]
pub enum Clock {
    /// `SystemTime::now()`.
    System,
    /// `base` plus the tokio time elapsed since `start`.
    FollowTokio {
        /// Wall-clock time at `start`.
        base: SystemTime,
        /// The tokio instant `base` corresponds to.
        start: Instant,
    },
}

impl Clock {
    /// A clock that follows tokio's (possibly paused) clock from now on.
    pub fn follow_tokio() -> Self {
        Self::FollowTokio {
            base: SystemTime::now(),
            start: Instant::now(),
        }
    }

    /// Wall-clock now.
    pub fn now(&self) -> SystemTime {
        match self {
            Self::System => SystemTime::now(),
            Self::FollowTokio { base, start } => *base + start.elapsed(),
        }
    }

    /// The tokio instant at which the wall clock reads `at` (now, if `at` is past).
    pub fn instant_at(&self, at: SystemTime) -> Instant {
        Instant::now() + at.duration_since(self.now()).unwrap_or(Duration::ZERO)
    }
}
