//! A store's circuit breaker: stop sending to a store that is down, probe it, and let it
//! back in gently.
//!
//! ```text
//!   Closed ──(`failures` consecutive connection/handshake failures)──▶ Open
//!     ▲                                                                  │ probe timer
//!     │                                                                  ▼ (jittered)
//!     └──────────────(probe succeeds: window restarts)─────────────── Probing
//!                                                        probe fails ──▶ Open
//! ```
//!
//! While the breaker is not closed, nothing is sent to the store: its recipients are
//! deferred at once (no connection attempt, no timeout to wait out) and their messages
//! parked (so are messages turned away by a store-wide failure before the breaker opened);
//! on recovery the parked messages are retried through the store's window, which restarts
//! at the initial value (slow start). The probe is a fresh connection (greeting and
//! LHLO) closed with QUIT. Probe times are jittered ±25% around `probe_interval` so that
//! several gateways do not probe a recovering store in step.
//!
//! Pure state: time and randomness come in as arguments.

use std::time::Duration;

use tokio::time::Instant;

/// The jitter of the probe timer: ±25%.
const PROBE_JITTER: f64 = 0.25;

/// Where the breaker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Deliveries go through.
    Closed,
    /// The store is down; probe at `probe_at`.
    Open {
        /// When to probe.
        probe_at: Instant,
    },
    /// A probe is in flight.
    Probing,
}

impl BreakerState {
    /// For the metric: 0 closed, 1 open, 2 probing.
    pub fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open { .. } => 1.0,
            Self::Probing => 2.0,
        }
    }
}

/// One store's breaker.
#[derive(Clone, Debug)]
pub struct Breaker {
    state: BreakerState,
    consecutive: u32,
    threshold: u32,
    probe_interval: Duration,
    reason: String,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive failures.
    pub fn new(threshold: u32, probe_interval: Duration) -> Self {
        Self {
            state: BreakerState::Closed,
            consecutive: 0,
            threshold: threshold.max(1),
            probe_interval,
            reason: String::new(),
        }
    }

    /// New limits (a reload): `threshold` counts from the failures already seen; a probe
    /// already scheduled keeps its time, the next one is `probe_interval` away.
    pub fn set_limits(&mut self, threshold: u32, probe_interval: Duration) {
        self.threshold = threshold.max(1);
        self.probe_interval = probe_interval;
    }

    /// The state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Deliveries may start.
    pub fn is_closed(&self) -> bool {
        self.state == BreakerState::Closed
    }

    /// Why the store was marked down (the failure that opened the breaker).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// A probe delay: `probe_interval` ±25%; `random` is uniform in `[0, 1)`.
    pub fn probe_delay(&self, random: f64) -> Duration {
        let f = 1.0 - PROBE_JITTER + 2.0 * PROBE_JITTER * random.clamp(0.0, 1.0);
        self.probe_interval.mul_f64(f)
    }

    /// A transaction reached the store (whatever its recipients' replies).
    pub fn on_success(&mut self) {
        self.consecutive = 0;
    }

    /// A connection or handshake failure. Returns true when this one opened the breaker.
    pub fn on_failure(&mut self, now: Instant, random: f64, reason: &str) -> bool {
        self.consecutive = self.consecutive.saturating_add(1);
        if self.state == BreakerState::Closed && self.consecutive >= self.threshold {
            self.reason = reason.to_owned();
            self.state = BreakerState::Open {
                probe_at: now + self.probe_delay(random),
            };
            return true;
        }
        false
    }

    /// When the next probe is due, if the breaker is open.
    pub fn probe_at(&self) -> Option<Instant> {
        match self.state {
            BreakerState::Open { probe_at } => Some(probe_at),
            _ => None,
        }
    }

    /// Starts a probe if one is due at `now`; returns whether to send it.
    pub fn start_probe(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Open { probe_at } if now >= probe_at => {
                self.state = BreakerState::Probing;
                true
            }
            _ => false,
        }
    }

    /// The probe's result. Returns true when the store is back (the breaker closed).
    pub fn probe_result(&mut self, ok: bool, now: Instant, random: f64, reason: &str) -> bool {
        if ok {
            self.state = BreakerState::Closed;
            self.consecutive = 0;
            self.reason.clear();
            return true;
        }
        reason.clone_into(&mut self.reason);
        self.state = BreakerState::Open {
            probe_at: now + self.probe_delay(random),
        };
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(3, Duration::from_secs(30))
    }

    #[test]
    fn opens_after_a_failed_cohort_only() {
        let now = Instant::now();
        let mut b = breaker();
        assert!(!b.on_failure(now, 0.5, "refused"));
        assert!(!b.on_failure(now, 0.5, "refused"));
        b.on_success();
        assert!(
            !b.on_failure(now, 0.5, "refused"),
            "a success restarts the count"
        );
        assert!(!b.on_failure(now, 0.5, "refused"));
        assert!(b.is_closed());
        assert!(b.on_failure(now, 0.5, "connect refused"));
        assert_eq!(b.reason(), "connect refused");
        assert_eq!(b.probe_at(), Some(now + Duration::from_secs(30)));
        assert!(
            !b.on_failure(now, 0.5, "x"),
            "already open: no second opening"
        );
        assert_eq!(b.probe_at(), Some(now + Duration::from_secs(30)));
    }

    #[test]
    fn new_limits_apply_to_the_next_failure_and_probe() {
        let now = Instant::now();
        let mut b = breaker();
        assert!(!b.on_failure(now, 0.5, "refused"));
        b.set_limits(2, Duration::from_secs(5));
        assert!(
            b.on_failure(now, 0.5, "refused"),
            "opens at the new threshold"
        );
        assert_eq!(b.probe_at(), Some(now + Duration::from_secs(5)));
        b.set_limits(0, Duration::from_secs(60));
        assert!(
            b.start_probe(now + Duration::from_secs(5)),
            "the probe kept its time"
        );
        assert!(!b.probe_result(false, now, 0.5, "refused"));
        assert_eq!(b.probe_at(), Some(now + Duration::from_secs(60)));
        assert_eq!(b.threshold, 1, "never 0");
    }

    #[test]
    fn probe_timer_is_jittered() {
        let b = breaker();
        assert_eq!(b.probe_delay(0.0), Duration::from_millis(22_500));
        assert_eq!(b.probe_delay(0.5), Duration::from_secs(30));
        assert!(b.probe_delay(0.999_999) <= Duration::from_millis(37_500));
        let mut rng = fastrand::Rng::with_seed(1);
        let mut d: Vec<Duration> = (0..200).map(|_| b.probe_delay(rng.f64())).collect();
        d.sort();
        d.dedup();
        assert!(d.len() > 150, "probes spread, not in step");
    }

    #[test]
    fn probing_and_recovery() {
        let t0 = Instant::now();
        let mut b = breaker();
        for _ in 0..3 {
            b.on_failure(t0, 0.5, "refused");
        }
        assert!(!b.start_probe(t0 + Duration::from_secs(29)), "not due yet");
        let t1 = t0 + Duration::from_secs(30);
        assert!(b.start_probe(t1));
        assert_eq!(b.state(), BreakerState::Probing);
        assert!(!b.start_probe(t1), "one probe at a time");
        assert!(!b.probe_result(false, t1, 0.0, "still refused"));
        assert_eq!(b.reason(), "still refused");
        assert_eq!(b.probe_at(), Some(t1 + Duration::from_millis(22_500)));
        let t2 = t1 + Duration::from_secs(40);
        assert!(b.start_probe(t2));
        assert!(b.probe_result(true, t2, 0.0, ""));
        assert!(b.is_closed());
        // Counting starts afresh after recovery.
        assert!(!b.on_failure(t2, 0.5, "x"));
        assert!(!b.on_failure(t2, 0.5, "x"));
        assert!(b.on_failure(t2, 0.5, "x"));
    }
}
