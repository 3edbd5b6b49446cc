//! The window during a baseline probe: when one starts (on the wall clock's boundaries,
//! the first two a second apart), the samples it takes, and what its measurement does to
//! the baseline and the noise band. The probe's own bookkeeping (which samples count, when
//! it is done) is [`crate::scheduler::probe`]'s.

use std::time::{Duration, SystemTime};

use super::{FIRST_PROBE_EVERY, PROBE_EVERY, PROBE_LIMIT, Sample, Window};
use crate::scheduler::probe::{Measurement, Probe};

impl Window {
    /// Starts, feeds or ends a probe; true while one runs (the sample is the probe's).
    ///
    /// Every [`PROBE_EVERY`], on the wall clock's boundaries so that the gateways feeding a
    /// store probe together and its queue really drains, the window drops to its minimum
    /// until [`PROBE_SAMPLES`](super::PROBE_SAMPLES) transactions started after the drain
    /// have ended (at a steady store, [`MIN_PROBE_SAMPLES`](super::MIN_PROBE_SAMPLES)):
    /// their mean without outliers is the new measurement of the baseline
    /// (taken at once if lower, a quarter of the way if higher), their spread the store's
    /// jitter. This is how the baseline forgets: a store that became slower is re-learned
    /// within a probe or two, and a baseline learned under load (a gateway that started
    /// while the store was busy) does not stay inflated. It costs a few round trips at the
    /// minimum every ten seconds.
    pub(super) fn probing(&mut self, sample: Sample, started: SystemTime, now: SystemTime) -> bool {
        let latency = sample.latency.as_secs_f64();
        let l = &mut self.latency;
        // Until the second probe, on whole seconds: a gateway (or several) started against a
        // busy store learns its real baseline within a second or two, not ten, and a first
        // probe taken while this box was busy (the gateways' intake) is replaced at once.
        let every = if l.probes >= 2 {
            PROBE_EVERY
        } else {
            FIRST_PROBE_EVERY
        };
        let period = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / every.as_secs());
        if l.probe.is_none() && period != l.period {
            let first = l.period == 0;
            l.period = period;
            if !first && l.baseline.is_some() {
                // The queue drains within about two round trips once every gateway is at its
                // minimum; the samples then have PROBE_LIMIT to come (a store that queued
                // for seconds must still get its probe measured, or it would never be).
                let drain = Duration::from_secs_f64(2.0 * l.short.unwrap_or(latency).max(latency))
                    .min(PROBE_LIMIT);
                l.probe = Some(Probe::new(now, drain));
            }
        }
        let Some(p) = &mut l.probe else {
            return false;
        };
        if sample.new_connection {
            p.add_new(latency, started);
        } else {
            let exchange = sample.latency.saturating_sub(sample.connection_wait);
            p.add_reused(exchange.as_secs_f64(), started);
        }
        if p.is_done(now) {
            self.finish_probe(now);
        }
        true
    }

    /// A probe is running (the window is at its minimum).
    pub fn is_probing(&self) -> bool {
        self.latency.probe.is_some()
    }

    /// Ends a probe that has run past [`PROBE_LIMIT`] without its samples (the transactions
    /// in flight when it began may hold every slot for longer). True if one ended.
    pub fn end_overdue_probe(&mut self, now: SystemTime) -> bool {
        match self.latency.probe {
            Some(p) if now >= p.until => {
                self.finish_probe(now);
                true
            }
            _ => false,
        }
    }

    pub(super) fn finish_probe(&mut self, now: SystemTime) {
        let l = &mut self.latency;
        let Some(p) = l.probe.take() else {
            return;
        };
        if let Some(Measurement {
            mean: measured,
            spread,
            samples,
        }) = p.measurement()
        {
            l.samples = samples;
            if let Some(sd) = spread {
                // Like the baseline: down at once, up slowly (a busy moment of this box makes
                // a probe's samples spread; the store's own jitter is what is left).
                l.spread = Some(match l.spread {
                    Some(s) if sd > s => 0.75 * s + 0.25 * sd,
                    _ => sd,
                });
            }
            // Down at once, up slowly. The gateways probe together, so a lower measurement is
            // the store's no-load latency now; a higher one may be a busy moment of this box,
            // or a store that got slower, which a few probes confirm. A baseline measured too
            // high (a first probe during intake: 30 % high was seen) would otherwise stay for
            // a minute and, being this gateway's reference, skew its share. (The noise band
            // below allows for a baseline that is one probe's mean, a little low on a jittery
            // store.)
            l.baseline = Some(match l.baseline {
                Some(b) if l.probed && measured > b => 0.75 * b + 0.25 * measured,
                _ => measured,
            });
            l.probed = true;
            l.probes = l.probes.saturating_add(1);
            if l.probes == 2 {
                // From now on, the ten-second boundaries, counted from the one this probe
                // began in: the gateways began it on the same second, but end it up to a
                // second apart, and one that ended after such a boundary would skip
                // the probe there that those that ended before it take (its window open
                // meanwhile: their probe measures its queue).
                l.period = p
                    .began
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() / PROBE_EVERY.as_secs());
            }
        }
        l.n = 0;
        l.sum = 0.0;
        l.full = false;
        l.short = None;
        l.changed_at = now;
    }
}
