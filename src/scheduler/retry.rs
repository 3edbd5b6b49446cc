//! The retry policy: when a deferred message is tried again, and when it is given up.
//!
//! Like Postfix's qmgr, the delay before the next attempt is the message's age clamped to
//! `[minimal_backoff, maximal_backoff]`: it roughly doubles with each attempt and needs no
//! attempt counter on disk (a restart keeps the schedule). The delay is then jittered by
//! ±20%, always inside the bounds, so the messages of one outage do not all return at the
//! same second: at the lower bound it spreads upwards, at the upper bound downwards.
//!
//! A message is *expired* once it is `maximal_lifetime` old: a recipient that would be
//! deferred then is bounced instead. The next attempt is never scheduled after the expiry
//! time, so the last attempt happens at the lifetime (not up to `maximal_backoff` later).
//!
//! Everything here is a pure function of its arguments (time and a random number in
//! `[0, 1)`), tested without a clock.

use std::time::{Duration, SystemTime};

/// The jitter: ±20% of the delay.
const JITTER: f64 = 0.2;

/// The configured bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Shortest delay between attempts.
    pub minimal_backoff: Duration,
    /// Longest delay between attempts.
    pub maximal_backoff: Duration,
    /// Age at which a message is bounced.
    pub maximal_lifetime: Duration,
}

impl RetryPolicy {
    /// The delay before the next attempt without jitter: the age, clamped to the bounds.
    pub fn base_delay(&self, age: Duration) -> Duration {
        age.clamp(self.minimal_backoff, self.maximal_backoff)
    }

    /// The interval the jittered delay is drawn from: `base ± 20%` intersected with the
    /// bounds.
    pub fn delay_range(&self, age: Duration) -> (Duration, Duration) {
        let base = self.base_delay(age);
        let lo = base.mul_f64(1.0 - JITTER).max(self.minimal_backoff);
        let hi = base.mul_f64(1.0 + JITTER).min(self.maximal_backoff);
        (lo, hi.max(lo))
    }

    /// The jittered delay; `random` is uniform in `[0, 1)`.
    pub fn delay(&self, age: Duration, random: f64) -> Duration {
        let (lo, hi) = self.delay_range(age);
        lo + (hi - lo).mul_f64(random.clamp(0.0, 1.0))
    }

    /// When the message arrived at `arrival` expires.
    pub fn expires_at(&self, arrival: SystemTime) -> SystemTime {
        arrival + self.maximal_lifetime
    }

    /// Is the message expired at `now`?
    pub fn is_expired(&self, arrival: SystemTime, now: SystemTime) -> bool {
        now >= self.expires_at(arrival)
    }

    /// The next attempt of a message that arrived at `arrival`, deferred at `now`: never
    /// after its expiry (when the last attempt is made), never before `now`.
    pub fn next_attempt(&self, arrival: SystemTime, now: SystemTime, random: f64) -> SystemTime {
        let age = now.duration_since(arrival).unwrap_or(Duration::ZERO);
        let at = now + self.delay(age, random);
        at.min(self.expires_at(arrival)).max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const MIN: u64 = 300;
    const MAX: u64 = 4000;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            minimal_backoff: Duration::from_secs(MIN),
            maximal_backoff: Duration::from_secs(MAX),
            maximal_lifetime: Duration::from_secs(5 * 86_400),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn delay_is_the_age_clamped_to_the_bounds() {
        let p = policy();
        assert_eq!(p.base_delay(secs(0)), secs(MIN));
        assert_eq!(p.base_delay(secs(1000)), secs(1000));
        assert_eq!(p.base_delay(secs(86_400)), secs(MAX));
    }

    #[test]
    fn jitter_stays_inside_the_bounds_and_spreads() {
        let p = policy();
        let cases = [
            (secs(0), secs(MIN), secs(360)),
            (secs(1000), secs(800), secs(1200)),
            (secs(100_000), secs(3200), secs(MAX)),
        ];
        for (age, lo, hi) in cases {
            assert_eq!(p.delay_range(age), (lo, hi), "age {age:?}");
            assert_eq!(p.delay(age, 0.0), lo);
            assert!(p.delay(age, 0.999_999) <= hi);
            let mut rng = fastrand::Rng::with_seed(7);
            let draws: Vec<Duration> = (0..1000).map(|_| p.delay(age, rng.f64())).collect();
            assert!(draws.iter().all(|d| *d >= lo && *d <= hi));
            let spread = *draws.iter().max().unwrap() - *draws.iter().min().unwrap();
            assert!(spread > (hi - lo).mul_f64(0.9), "jitter covers its range");
        }
    }

    #[test]
    fn attempts_roughly_double_and_end_at_the_lifetime() {
        let p = policy();
        let arrival = UNIX_EPOCH + secs(1_000_000);
        let mut now = arrival;
        let mut delays = Vec::new();
        while !p.is_expired(arrival, now) {
            let next = p.next_attempt(arrival, now, 0.5);
            assert!(next > now || next == p.expires_at(arrival));
            delays.push(next.duration_since(now).unwrap());
            now = next;
        }
        assert_eq!(
            now,
            p.expires_at(arrival),
            "the last attempt is at the lifetime"
        );
        assert!(delays[0] >= secs(MIN) && delays[0] <= secs(360));
        assert!(delays.iter().all(|d| *d <= secs(MAX)));
        // In the middle regime each delay is the age, so the attempts double.
        let ratios: Vec<f64> = delays[..delays.len() - 1]
            .windows(2)
            .filter(|w| w[0] > secs(700) && w[1] < secs(3000))
            .map(|w| w[1].as_secs_f64() / w[0].as_secs_f64())
            .collect();
        assert!(
            !ratios.is_empty() && ratios.iter().all(|r| (1.8..2.2).contains(r)),
            "{ratios:?}"
        );
        let tail = &delays[delays.len() / 2..delays.len() - 1];
        assert!(tail.iter().all(|d| *d >= secs(3200)));
        // 5 days at most 4000 s apart: about 120 attempts, not thousands.
        assert!((100..140).contains(&delays.len()), "{}", delays.len());
    }

    #[test]
    fn expiry() {
        let p = policy();
        let arrival = UNIX_EPOCH + secs(1_000_000);
        assert!(!p.is_expired(arrival, arrival + secs(5 * 86_400 - 1)));
        assert!(p.is_expired(arrival, arrival + secs(5 * 86_400)));
        // Deferred just before the lifetime: the next attempt is at the lifetime.
        let late = arrival + secs(5 * 86_400 - 10);
        assert_eq!(p.next_attempt(arrival, late, 0.9), p.expires_at(arrival));
    }
}
