//! A probe's samples: the measurement of a store's no-load latency that a window's baseline
//! is taken from ([`crate::scheduler::window`] decides when a probe runs and what it does
//! with the result).
//!
//! Promises: the measurement is the mean and spread of the transactions that started once
//! the store's queue had drained, without outliers ([`Measurement`]). Those that ran on a
//! *reused* connection count without their wait for it, and are measured on their own when
//! they are the majority:
//! - A transaction on a new connection waited for the store's greeting, and a store that
//!   runs one process per session (Dovecot `process_limit`, Cyrus `maxchild`) answers that
//!   greeting only when one of its processes is free, whatever the probe did to the queue of
//!   transactions: that is the store's queue of sessions, which the rounds are there to see.
//! - A transaction that waited for a connection given back by a sibling waited behind this
//!   gateway's own transactions that started before the probe.
//!
//! Measured with `bench/reverse/run.py --scenario b` (Dovecot, `process_limit = 5`, three
//! gateways): 6–16 % of a probe's transactions waited 30 ms or more for their connection,
//! and a first probe came out at 50 ms to 2.2 s against a no-load latency of 11–14 ms; the
//! gateways then read the store's queue as none and held windows of 10 to 20 on a store of
//! 5 processes. When most samples are on new connections (a store or configuration that
//! does not reuse connections), their whole latency is the no-load cost of a transaction,
//! and all of them are measured.

use std::time::{Duration, SystemTime};

/// The most clean samples a probe takes (transactions started once the store's queue
/// drained), of one kind: on reused connections, or on new ones.
pub const PROBE_SAMPLES: usize = 16;
/// The fewest: a probe ends with these once its mean is known to [`PROBE_PRECISION`].
pub const MIN_PROBE_SAMPLES: usize = 8;
/// A probe's mean is precise enough when its standard error is within this share of it:
/// a steady store is measured in half the samples (a probe holds every gateway at its
/// minimum, which cost a store of 50 ms 6–7 % of its deliveries at sixteen samples every
/// ten seconds), a jittery one still takes them all.
pub const PROBE_PRECISION: f64 = 0.01;
/// A probe ends after this long (past its drain) even without its samples.
pub const PROBE_LIMIT: Duration = Duration::from_secs(2);

/// Some samples (seconds): the first [`PROBE_SAMPLES`] of one kind.
#[derive(Clone, Copy, Debug, Default)]
struct Samples {
    n: usize,
    values: [f64; PROBE_SAMPLES],
}

impl Samples {
    fn add(&mut self, x: f64) {
        if let Some(v) = self.values.get_mut(self.n) {
            *v = x;
            self.n += 1;
        }
    }

    fn as_slice(&self) -> &[f64] {
        &self.values[..self.n]
    }
}

/// The median of some values (sorts them); none if there are none.
fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let k = v.len();
    match k {
        0 => None,
        _ if k % 2 == 1 => Some(v[k / 2]),
        _ => Some(0.5 * (v[k / 2 - 1] + v[k / 2])),
    }
}

/// The median absolute deviation's factor to a standard deviation (for normal noise).
const MAD_TO_SD: f64 = 1.4826;
/// Samples further from the median than this many median deviations (scaled to standard
/// deviations) are outliers, not the store's no-load latency.
const OUTLIER_MADS: f64 = 5.0;
/// Nor closer than this (seconds): when more than half the samples are alike to the
/// microsecond the median deviation is nought, and a sample a fraction of a millisecond off
/// is no outlier (the window counts a rise under 2 ms as noise: `NOISE_FLOOR`).
const OUTLIER_FLOOR: f64 = 0.002;

/// What a probe measured (seconds): the mean latency and, with two samples or more, the
/// standard deviation of single samples, both of the samples within [`OUTLIER_MADS`] median
/// deviations of the median.
///
/// Without its outliers: a probe's first samples can still have waited behind a queue that
/// had not quite drained (a gateway that began its probe later than its siblings, the burst
/// at start-up), and a late wake-up of this busy box adds tens of milliseconds to one
/// sample. Measured with `bench/reverse/run.py --scenario a,e`: such probes had a standard
/// deviation of 12–45 ms against 0.3–1 ms for a clean one at the same store, and the gateway
/// that took one read its noise band as 25–30 ms until its next probe: it saw no queue where
/// its siblings saw theirs, kept growing, and took the largest share. A few such samples
/// move neither the median nor the median deviation, and a store's own jitter (±50 %, even)
/// stays within their reach, so on such a store the mean and deviation are all the samples'
/// (more exact there than a median would be).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Measurement {
    pub(super) mean: f64,
    pub(super) spread: Option<f64>,
    /// The samples it was taken from (without the outliers).
    pub(super) samples: usize,
}

/// A baseline measurement in progress (the window is at its minimum meanwhile).
#[derive(Clone, Copy, Debug)]
pub(super) struct Probe {
    /// It ends at this instant at the latest.
    pub(super) until: SystemTime,
    /// When it began.
    pub(super) began: SystemTime,
    /// Transactions started before this waited behind the queue the probe drains.
    clean_after: SystemTime,
    reused: Samples,
    new: Samples,
}

impl Probe {
    /// A probe begun at `now` that lets the store's queue drain for `drain`.
    pub(super) fn new(now: SystemTime, drain: Duration) -> Self {
        Self {
            until: now + drain + PROBE_LIMIT,
            began: now,
            clean_after: now + drain,
            reused: Samples::default(),
            new: Samples::default(),
        }
    }

    /// Counts a transaction on a reused connection, by its latency without the wait for
    /// the connection (seconds), if it started after the drain.
    pub(super) fn add_reused(&mut self, exchange: f64, started: SystemTime) {
        if started >= self.clean_after {
            self.reused.add(exchange);
        }
    }

    /// Counts a transaction on a new connection, by its whole latency (seconds), if it
    /// started after the drain.
    pub(super) fn add_new(&mut self, latency: f64, started: SystemTime) {
        if started >= self.clean_after {
            self.new.add(latency);
        }
    }

    /// Has it all it needs: [`PROBE_SAMPLES`] of one kind, or [`MIN_PROBE_SAMPLES`] whose
    /// mean is known to [`PROBE_PRECISION`] (standard error), or its time is up at `now`?
    pub(super) fn is_done(&self, now: SystemTime) -> bool {
        if self.reused.n >= PROBE_SAMPLES || self.new.n >= PROBE_SAMPLES || now >= self.until {
            return true;
        }
        if self.reused.n.max(self.new.n) < MIN_PROBE_SAMPLES {
            return false;
        }
        self.measurement().is_some_and(|m| {
            m.samples >= MIN_PROBE_SAMPLES
                && m.spread
                    .is_some_and(|sd| sd / (m.samples as f64).sqrt() <= PROBE_PRECISION * m.mean)
        })
    }

    /// The measurement: the reused connections' samples if they are the majority, else
    /// all of them; none without samples.
    pub(super) fn measurement(&self) -> Option<Measurement> {
        let mut v: Vec<f64> = self.reused.as_slice().to_vec();
        if self.reused.n < self.new.n {
            v.extend_from_slice(self.new.as_slice());
        }
        let centre = median(&mut v)?;
        let mut dev: Vec<f64> = v.iter().map(|x| (x - centre).abs()).collect();
        let reach = (OUTLIER_MADS * median(&mut dev).unwrap_or(0.0) * MAD_TO_SD).max(OUTLIER_FLOOR);
        // At least the half of the samples nearest the median stays.
        let (n, sum, sq) = v
            .iter()
            .filter(|x| (*x - centre).abs() <= reach)
            .fold((0usize, 0.0, 0.0), |(n, s, q), x| (n + 1, s + x, q + x * x));
        if n == 0 {
            return None;
        }
        let mean = sum / n as f64;
        let spread = (n > 1).then(|| ((sq - sum * mean) / (n - 1) as f64).max(0.0).sqrt());
        Some(Measurement {
            mean,
            spread,
            samples: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
    }

    #[test]
    fn greetings_waited_for_are_not_the_no_load_latency() {
        let mut p = Probe::new(at(0), Duration::from_millis(40));
        // Before the drain: not counted, whatever they are.
        p.add_reused(0.500, at(10));
        for i in 0..PROBE_SAMPLES as u64 {
            // Every fifth on a new connection that waited 400 ms for its greeting.
            let new = i % 5 == 0;
            let latency = if new {
                0.410
            } else {
                0.010 + 0.001 * (i % 2) as f64
            };
            assert!(!p.is_done(at(50 + i)), "not done before its samples");
            if new {
                p.add_new(latency, at(50 + i));
            } else {
                p.add_reused(latency, at(50 + i));
            }
        }
        assert!(!p.is_done(at(100)), "12 reused so far");
        for i in 0..4 {
            p.add_reused(0.010 + 0.001 * (i % 2) as f64, at(100 + i));
        }
        assert!(p.is_done(at(110)));
        let m = p.measurement().expect("samples were taken");
        assert!((m.mean - 0.0105).abs() < 1e-9, "{}", m.mean);
        let sd = m.spread.expect("16 samples");
        assert!(sd > 0.0004 && sd < 0.0006, "{sd}");
    }

    #[test]
    fn a_store_that_never_reuses_a_connection_is_measured_as_it_is() {
        let mut p = Probe::new(at(0), Duration::ZERO);
        for i in 0..PROBE_SAMPLES as u64 {
            p.add_new(0.015, at(i));
        }
        p.add_reused(0.010, at(20));
        assert!(p.is_done(at(21)));
        let m = p.measurement().expect("samples were taken");
        // The one on a reused connection is an outlier among them.
        assert!((m.mean - 0.015).abs() < 1e-9, "{}", m.mean);
        assert_eq!(m.spread, Some(0.0));
    }

    #[test]
    fn samples_that_still_waited_behind_a_queue_move_neither_level_nor_spread() {
        let mut p = Probe::new(at(0), Duration::ZERO);
        for i in 0..PROBE_SAMPLES as u64 {
            // The first four waited 100 ms behind a queue that had not drained, and one
            // more was woken late; the rest alternate 49.5 and 50.5 ms.
            let latency = match i {
                0..4 => 0.150,
                9 => 0.090,
                _ if i % 2 == 0 => 0.0495,
                _ => 0.0505,
            };
            p.add_reused(latency, at(i));
        }
        let m = p.measurement().expect("samples were taken");
        // Of all sixteen: mean 77.8 ms, standard deviation 43 ms.
        assert!(
            (m.mean - (6.0 * 0.0495 + 5.0 * 0.0505) / 11.0).abs() < 1e-9,
            "{}",
            m.mean
        );
        let sd = m.spread.expect("16 samples");
        assert!(sd < 0.001, "{sd}");
    }

    #[test]
    fn a_steady_store_is_measured_in_the_fewest_samples_a_jittery_one_in_all() {
        let mut steady = Probe::new(at(0), Duration::ZERO);
        let mut jittery = Probe::new(at(0), Duration::ZERO);
        for i in 0..PROBE_SAMPLES as u64 {
            assert!(!jittery.is_done(at(i)), "jittery: done after {i} samples");
            let ahead = i < MIN_PROBE_SAMPLES as u64;
            assert_eq!(!steady.is_done(at(i)), ahead, "steady, after {i} samples");
            // 50 ms ± 0.5 (standard error after eight: 0.35 %), and 20 ms ± 10.
            steady.add_reused(0.050 + 0.0005 * if i % 2 == 0 { 1.0 } else { -1.0 }, at(i));
            jittery.add_reused(0.020 + 0.010 * ((i * 7) % 5) as f64 / 2.0 - 0.010, at(i));
        }
        assert!(jittery.is_done(at(20)));
    }

    #[test]
    fn it_ends_at_its_time_limit_with_what_it_has() {
        let p = Probe::new(at(0), Duration::from_millis(100));
        assert!(!p.is_done(at(100) + PROBE_LIMIT - Duration::from_millis(1)));
        assert!(p.is_done(at(100) + PROBE_LIMIT));
        assert_eq!(p.measurement(), None);
    }
}
