//! A store's concurrency window: how many transactions may run at once.
//!
//! Two controllers share one type:
//!
//! - **Latency** (the default for `kind: lmtp` and `kind: smtp` stores): a delay-based
//!   controller, TCP Vegas's. Vegas was chosen over a loss-based AIMD because the stores this
//!   gateway feeds rarely refuse: Cyrus (`maxchild`) and Dovecot (`process_limit`) queue
//!   excess sessions in their listen backlog and only get slower, so delay is the first and
//!   often the only signal. And Vegas's rule is what lets independent gateways share a store
//!   fairly without talking: each steers *its own transactions waiting in the store's queue*
//!   to the same small target, and they all see the same queue.
//!   - A *round* is as many finished transactions as the window is wide (at least
//!     [`MIN_ROUND`]), counting only transactions started after the window last changed:
//!     about one store round trip, like a Vegas RTT. Its mean latency is smoothed over
//!     rounds (`short`, EWMA ½).
//!   - The *baseline* is the no-load latency. It is measured by a *probe* every
//!     [`PROBE_EVERY`], on the wall clock's ten-second boundaries, so that all gateways
//!     feeding a store probe at once (their clocks are NTP-synchronised) and the store's
//!     queue really drains: the window drops to `min` until [`PROBE_SAMPLES`] transactions
//!     started after the drain have ended, or [`MIN_PROBE_SAMPLES`] whose mean is known to
//!     [`PROBE_PRECISION`] (a steady store). Their mean is the measurement — of those on
//!     reused connections, without the wait for the connection, when they are the majority
//!     (`crate::scheduler::probe` says why: a greeting a process-per-session store makes
//!     a new connection wait for is its queue of sessions, and a wait for a connection
//!     given back is this gateway's own queue, neither the store's no-load latency), and
//!     without outliers (samples that still waited behind a queue not quite drained, or
//!     were woken late on a busy box, would make the measurement high and its spread
//!     wide: a wide spread is a wide noise band, in which this gateway would see no queue
//!     where its siblings see theirs). The baseline takes a lower one at once and moves
//!     a quarter of the way to a higher one (so a probe taken while this box was busy does
//!     not stay; a store that became slower is re-learned within a few probes). The first
//!     two probes come a second apart, so that a gateway started against a busy store, or
//!     during a burst of intake, learns its baseline within seconds; the ten-second
//!     boundaries are then counted from the second the second probe began in, the same for
//!     every gateway that began it with the others, whenever it ended. Their samples'
//!     spread is kept too (the noise band below). Before the first probe, the lowest round
//!     stands in.
//!   - At each round's end, the estimate of this gateway's transactions waiting at the
//!     store is `queued = window × rise / short`, where `rise` is `short − baseline` (none
//!     within a noise band: [`NOISE_FLOOR`], or [`NOISE_SIGMAS`] standard errors of
//!     `short − baseline` from the probes' spread, so that a jittery store is not read as
//!     a queue; a ramp from the band to twice the band). Above [`QUEUE_TARGET`] the window
//!     gives back the excess (one unit per `QUEUE_TARGET` over it, at most half); below it,
//!     with the window full during the round, it grows — doubling until the target is first
//!     passed (slow start), then by at most one a round, less the closer it is. Before the
//!     first probe it never doubles: the lowest round then stands in for the baseline, and
//!     gateways started together at a store hold each other's queue in it, see none, and
//!     doubled to 10–20 each at a store of 5 workers for the second or two until their
//!     first probe (`bench/reverse/run.py --scenario a`). At the
//!     fixed point every gateway holds `QUEUE_TARGET` in the queue, so all get the same
//!     throughput (`QUEUE_TARGET / rise`), whatever their windows or their own overheads;
//!     N gateways keep about `N × QUEUE_TARGET` transactions waiting at the store.
//!   - Why not a threshold on `short / baseline` (what this was before): each gateway
//!     judges the ratio against its own baseline, and baselines measured by different
//!     gateways differ by a few per cent (28.0, 29.5, 30.0 ms measured on one store). The
//!     gateway with the highest baseline saw the least rise and kept growing while the
//!     others cut to the minimum: one gateway took 60–73 % of the deliveries. A synchronised
//!     multiplicative cut at the probes kept the ratio of the windows, so it did not help.
//!   - Overload guard: latency above `1 + latency_tolerance` times the baseline cuts the
//!     window multiplicatively (by `(1 + tolerance) / ratio`, clamped to [½, 0.9]) — but only
//!     for a gateway that holds more than its target in the queue (without the noise band):
//!     the ratio is against its own baseline, and cutting whoever measured the lowest one
//!     would starve it again.
//!   - The window is fractional; [`Window::admits`] honours the fraction over time (a
//!     window of 3.5 runs 3 and 4 in turn), which matters when several gateways share a
//!     small store with windows of a few transactions each. The store's connection pool is
//!     sized to the window rounded up ([`Window::admitted`]): a transaction admitted on the
//!     fraction that had to wait for a sibling's connection counted that wait as latency at
//!     the store, a phantom queue that weighed most on the smallest window and kept it small.
//!   - Hard signals stay hard: a connection refused, a session dropped during LHLO, `421`,
//!     `4.3.2` or `4.7.0` shrink the window by a quarter, at most once per round (one
//!     overload event often fails several transactions at once).
//! - **Postfix feedback** (`window: {latency: false}`, and the local agents): the window
//!   starts at `initial` (slow start); a run of as many consecutive successes as the window is
//!   wide raises it by one (1/window per success), up to `max`; a failure lowers it by one and
//!   restarts the run.
//!
//! Both stay within `[min, max]`; when a store comes back after being down the window
//! restarts at `initial`, so the backlog drains at slow-start pace, not as a flood.
//!
//! What a latency sample is (size must not fool the signal): [`crate::delivery::Report`]'s
//! `latency`, the phases whose length does not depend on the message's size — getting a
//! connection (for a new one: the store's greeting and LHLO; but not on a store that keeps
//! our new sessions waiting in its listen backlog, where that wait is our place in the line
//! that shares the store: [`crate::scheduler::gate`]) and the MAIL/RCPT round trips — plus
//! the wait for the replies after the end of data, which does grow with size: it counts
//! whole for messages up to 64 KiB and per 64 KiB above (a 20 MiB message's wait is divided
//! by 320). The time spent writing the content is never part of it.
//!
//! Everything here is pure: time comes in as arguments, so tests drive it with an injected
//! clock.

use std::time::{Duration, SystemTime};

use postern_proto::Reply;

use super::probe::Probe;
pub use super::probe::{MIN_PROBE_SAMPLES, PROBE_LIMIT, PROBE_PRECISION, PROBE_SAMPLES};

/// The fewest transactions that make a round.
pub const MIN_ROUND: usize = 4;
/// Latency rises smaller than this (seconds) are noise, not queueing: a store on the same
/// host answers in well under a millisecond, and one busy CPU moves that by more than the
/// tolerance.
pub const NOISE_FLOOR: f64 = 0.002;
/// How often the baseline is measured again (a probe), on wall-clock boundaries.
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// The boundaries the first probe waits for (whole seconds, for every gateway alike).
pub const FIRST_PROBE_EVERY: Duration = Duration::from_secs(1);
/// How many of its own transactions a gateway aims to keep waiting in the store's queue
/// (Vegas's `alpha = beta`): enough that the store's workers never wait for work, few enough
/// that N gateways queue only N × this much at the store.
pub const QUEUE_TARGET: f64 = 0.6;
/// How many standard errors of `short − baseline` a round's latency may rise before any of it
/// counts as queueing: the store's own jitter, not a queue, amplified by the window in the
/// queue estimate.
pub const NOISE_SIGMAS: f64 = 3.5;

/// How a window is sized and steered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowSettings {
    /// Never below this (at least 1).
    pub min: usize,
    /// At start and after the store recovered.
    pub initial: usize,
    /// Never above this.
    pub max: usize,
    /// Steer by latency (true) or by Postfix's success/failure feedback (false).
    pub latency: bool,
    /// How far above the baseline latency may rise before the window shrinks (0.5: 50 %).
    pub tolerance: f64,
}

impl WindowSettings {
    /// Postfix feedback between 1 and `max`, starting at `initial`.
    pub fn feedback(initial: usize, max: usize) -> Self {
        Self {
            min: 1,
            initial,
            max,
            latency: false,
            tolerance: 0.5,
        }
    }

    /// Latency steering between 1 and `max`, starting at `initial` (tolerance 50 %).
    pub fn latency(initial: usize, max: usize) -> Self {
        Self {
            latency: true,
            ..Self::feedback(initial, max)
        }
    }

    fn clamped(mut self) -> Self {
        self.max = self.max.max(1);
        self.min = self.min.clamp(1, self.max);
        self.initial = self.initial.clamp(self.min, self.max);
        if !self.tolerance.is_finite() || self.tolerance <= 0.0 {
            self.tolerance = 0.5;
        }
        self
    }
}

/// One finished transaction's latency, as a window reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// [`crate::delivery::Report`]'s `latency`.
    pub latency: Duration,
    /// It ran on a connection opened for it (the latency includes the greeting and LHLO).
    pub new_connection: bool,
    /// The part of `latency` spent waiting for the connection.
    pub connection_wait: Duration,
}

impl Sample {
    /// A transaction's latency on a reused connection that was there when it asked.
    pub fn reused(latency: Duration) -> Self {
        Self {
            latency,
            new_connection: false,
            connection_wait: Duration::ZERO,
        }
    }
}

/// The latency controller's state between rounds.
#[derive(Clone, Debug)]
struct Latency {
    /// This round: samples, their sum (seconds), whether the window was full.
    n: usize,
    sum: f64,
    full: bool,
    /// Smoothed round mean (seconds).
    short: Option<f64>,
    /// The no-load latency (seconds).
    baseline: Option<f64>,
    /// The standard deviation of single no-load samples (seconds), as probes measured it.
    spread: Option<f64>,
    /// When the window last changed: earlier transactions do not count for the next round.
    changed_at: SystemTime,
    /// A hard signal already cut the window this round.
    cut_this_round: bool,
    /// Failures since the last round ended on failures.
    failures: usize,
    probe: Option<Probe>,
    /// The probe period last seen (`PROBE_EVERY` since the epoch); 0: none yet.
    period: u64,
    /// No increase has been refused yet: grow by doubling (once a probe has measured).
    slow_start: bool,
    /// A probe has measured the baseline.
    probed: bool,
    /// Probes that measured it (the first two come a second apart).
    probes: u8,
    /// The samples the last probe's measurement was taken from.
    samples: usize,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            n: 0,
            sum: 0.0,
            full: false,
            short: None,
            baseline: None,
            spread: None,
            changed_at: SystemTime::UNIX_EPOCH,
            cut_this_round: false,
            failures: 0,
            probe: None,
            period: 0,
            slow_start: true,
            probed: false,
            probes: 0,
            samples: PROBE_SAMPLES,
        }
    }
}

/// One store's window.
#[derive(Clone, Debug)]
pub struct Window {
    settings: WindowSettings,
    /// The window, fractional so that multiplicative steps keep their ratio.
    current: f64,
    /// Postfix feedback: consecutive successes.
    run: usize,
    latency: Latency,
    /// Admission credit for the window's fractional part ([`Window::admits`]).
    credit: f64,
}

impl PartialEq for Window {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings && self.limit() == other.limit()
    }
}

impl Window {
    /// Postfix feedback at `initial`, at most `max` (both at least 1).
    pub fn new(initial: usize, max: usize) -> Self {
        Self::with_settings(WindowSettings::feedback(initial, max))
    }

    /// A window with these settings (clamped: `1 ≤ min ≤ initial ≤ max`).
    pub fn with_settings(settings: WindowSettings) -> Self {
        let settings = settings.clamped();
        Self {
            current: settings.initial as f64,
            settings,
            run: 0,
            latency: Latency {
                slow_start: true,
                ..Latency::default()
            },
            credit: 0.0,
        }
    }

    /// May one more transaction start, with `in_flight` running? Below [`Window::limit`],
    /// yes. At it, once per whole unit of credit: each finished transaction of a latency
    /// window adds its fractional part divided by its whole part (about one round trip's
    /// worth of completions makes `fraction` of one extra transaction), so over time a
    /// window of 3.5 runs 3.5 at once on average. Windows of a few transactions (several
    /// gateways sharing a small store) then get shares in proportion to their real width,
    /// not to its whole part. (Credit per completion, not per ask: how often a dispatcher
    /// asks depends on its intake, not on the store.)
    pub fn admits(&mut self, in_flight: usize) -> bool {
        let limit = self.limit();
        if in_flight < limit {
            return true;
        }
        if in_flight > limit
            || !self.settings.latency
            || self.latency.probe.is_some()
            || limit >= self.settings.max
        {
            return false;
        }
        if self.credit >= 1.0 {
            self.credit -= 1.0;
            true
        } else {
            false
        }
    }

    /// Transactions allowed at once now (the minimum while a probe measures the baseline).
    pub fn limit(&self) -> usize {
        if self.latency.probe.is_some() {
            return self.settings.min;
        }
        // Float steps stay within [min, max]; the cast floors.
        (self.current as usize).clamp(self.settings.min, self.settings.max)
    }

    /// The window outside probes: what the store gets once a probe ends (the gauge).
    pub fn ceiling(&self) -> usize {
        (self.current as usize).clamp(self.settings.min, self.settings.max)
    }

    /// The most transactions [`Window::admits`] lets run at once outside probes: the window
    /// rounded up, since its fractional part is honoured over time. The store's connection
    /// pool is sized to this: a pool of only the whole part would make the transaction
    /// admitted on the fraction wait for a sibling's connection, and that wait, counted in
    /// its latency, looks like a queue at the store — a phantom that weighs most on the
    /// gateway with the smallest window and kept it small.
    pub fn admitted(&self) -> usize {
        if !self.settings.latency {
            return self.ceiling();
        }
        (self.current.ceil() as usize).clamp(self.settings.min, self.settings.max)
    }

    /// The window as steered, with its fraction (the debug log's figure).
    pub fn width(&self) -> f64 {
        self.current
    }

    /// The smoothed latency of the last rounds (latency controller only, once measured).
    pub fn round_latency(&self) -> Option<Duration> {
        self.latency.short.map(Duration::from_secs_f64)
    }

    /// The most it can grow to.
    pub fn max(&self) -> usize {
        self.settings.max
    }

    /// The learned no-load latency (latency controller only, once learned).
    pub fn baseline(&self) -> Option<Duration> {
        self.latency.baseline.map(Duration::from_secs_f64)
    }

    /// Stops steering by latency from now on (a running probe ends): Postfix's feedback
    /// from the window as it stands, refusals and busy replies still cutting it. For a store
    /// whose latency is not its own to steer by ([`crate::delivery::lmtp::TURNS_KEYWORD`]).
    pub fn steer_by_feedback(&mut self) {
        self.settings.latency = false;
        self.latency.probe = None;
        self.run = 0;
    }

    /// Steers by latency.
    pub fn steers_by_latency(&self) -> bool {
        self.settings.latency
    }

    /// The window was full (every slot taken) at some point of this round.
    pub fn on_full(&mut self) {
        self.latency.full = true;
    }

    /// A transaction went through without trouble beyond its recipients; `sample` is its
    /// latency (none: the agent measures none, e.g. maildir), `started` when it took its
    /// slot, `now` when it ended.
    pub fn on_success(&mut self, sample: Option<Sample>, started: SystemTime, now: SystemTime) {
        self.accrue_credit();
        match sample {
            Some(s) if self.settings.latency => self.on_sample(s, started, now),
            _ => self.feedback_success(),
        }
    }

    /// A finished transaction's share of the fractional window ([`Window::admits`]).
    fn accrue_credit(&mut self) {
        if self.settings.latency {
            let whole = self.current.floor().max(1.0);
            self.credit = (self.credit + (self.current - whole).max(0.0) / whole).min(1.0);
        }
    }

    fn feedback_success(&mut self) {
        self.run += 1;
        if self.run >= self.limit() {
            self.run = 0;
            self.current = (self.limit() + 1).min(self.settings.max) as f64;
        }
    }

    fn on_sample(&mut self, sample: Sample, started: SystemTime, now: SystemTime) {
        if self.probing(sample, started, now) {
            return;
        }
        let sample = sample.latency.as_secs_f64();
        // Only transactions started under the window as it is now say how it does (Vegas
        // judges once per round trip after a change, for the same reason).
        if started < self.latency.changed_at {
            return;
        }
        let round = self.limit().max(MIN_ROUND);
        let l = &mut self.latency;
        l.n += 1;
        l.sum += sample;
        if l.n < round {
            return;
        }
        let mean = l.sum / l.n as f64;
        let full = l.full;
        l.n = 0;
        l.sum = 0.0;
        l.full = false;
        l.cut_this_round = false;
        let short = l.short.map_or(mean, |s| 0.5 * s + 0.5 * mean);
        l.short = Some(short);
        // Until the first probe, the lowest round seen; from then on only probes set it
        // (a minimum over noisy rounds would be biased low, and lowest for the gateway with
        // the smallest window, which would then shrink further: unfair).
        let base = match l.baseline {
            Some(b) if l.probed => b,
            Some(b) => b.min(short),
            None => short,
        };
        l.baseline = Some(base);
        if base <= 0.0 {
            return;
        }
        let before = self.limit();
        // A rise of less than NOISE_FLOOR is scheduling noise on a fast local store, not a
        // queue: the ratio is taken against at least that much more than the baseline.
        let ratio = if short - base < NOISE_FLOOR {
            1.0
        } else {
            short / base
        };
        let tol = self.settings.tolerance;
        // Jitter is not queueing either: a rise within a few standard errors of
        // `short − baseline` counts as none. `short` averages a round's samples over about
        // two rounds (EWMA ½: a third of a round's variance), the baseline is one probe's
        // samples (8 to 16). Before a probe measured the spread: an eighth of the tolerance.
        let band = match self.latency.spread {
            Some(sd) => {
                let probed = self.latency.samples.max(1) as f64;
                let se = sd * (1.0 / (3.0 * round as f64) + 1.0 / probed).sqrt();
                NOISE_FLOOR.max(NOISE_SIGMAS * se)
            }
            None => NOISE_FLOOR.max(base * tol / 8.0),
        };
        // Below the band, no queue; above twice the band, the whole rise; in between, a
        // ramp from nothing to it. The band decides whether there is a queue, not how much:
        // it is measured by each gateway's own probes, and an offset of its own would skew
        // its share as a baseline error does.
        let raw = (short - base).max(0.0);
        let rise = if raw >= 2.0 * band {
            raw
        } else {
            2.0 * (raw - band).max(0.0)
        };
        // Vegas's estimate of this gateway's own transactions waiting at the store: the
        // window times the share of the latency that is queueing. Every gateway steers its
        // own estimate to the same QUEUE_TARGET, so at the fixed point each holds
        // `QUEUE_TARGET × short / (short − baseline)`: equal windows for equal baselines,
        // and a baseline a few per cent off moves a window by a few per cent. (A threshold
        // on the ratio alone does not: the gateway that measured the highest baseline sees
        // the least rise, never backs off, and the others shrink to the minimum.)
        let queued = self.current * rise / short;
        let max = self.settings.max as f64;
        let min = self.settings.min as f64;
        if ratio > 1.0 + tol && self.current * raw / short > QUEUE_TARGET {
            // Overload (many gateways, each at its target, or a store that slowed down): a
            // multiplicative cut — for a gateway that holds more than its target in the
            // queue even without the noise band. Not for one that holds less: the ratio is
            // against its own baseline, and cutting whoever measured the lowest one would
            // starve it again.
            let factor = ((1.0 + tol) / ratio).clamp(0.5, 0.9);
            self.shrink(factor);
            // The next round is judged on its own, not on a mean that still remembers the
            // queue this cut drains.
            self.latency.short = None;
            self.latency.slow_start = false;
        } else if queued > QUEUE_TARGET {
            // More of ours queued than the target: give back the excess (one window unit
            // per QUEUE_TARGET over it, at most half the window).
            self.latency.slow_start = false;
            let step = ((queued - QUEUE_TARGET) / QUEUE_TARGET).min(self.current / 2.0);
            self.current = (self.current - step).max(min);
        } else if full {
            // Fewer queued than the target and the window was used: grow, by doubling until
            // the first time the target was passed (slow start) once a probe has measured the
            // baseline, else by at most one a round, less the closer the estimate is to the
            // target (no overshoot to undo). Before the first probe the estimate may miss a
            // queue that was there from the start.
            let grown = if self.latency.slow_start && self.latency.probed {
                self.current.floor() * 2.0
            } else {
                self.current + ((QUEUE_TARGET - queued) / QUEUE_TARGET).min(1.0)
            };
            self.current = grown.min(max);
        }
        if self.limit() != before {
            self.latency.changed_at = now;
        }
    }

    fn shrink(&mut self, factor: f64) {
        self.current = (self.current * factor).max(self.settings.min as f64);
    }

    /// A connection or handshake failure, or a busy reply.
    pub fn on_failure(&mut self) {
        self.run = 0;
        if self.settings.latency {
            let round = self.limit().max(MIN_ROUND);
            let l = &mut self.latency;
            l.slow_start = false;
            let cut = !l.cut_this_round;
            l.cut_this_round = true;
            // Failures make rounds too: a store that only refuses is cut again each round.
            l.failures += 1;
            if l.failures >= round {
                l.failures = 0;
                l.cut_this_round = false;
            }
            if cut {
                self.shrink(0.75);
            }
        } else {
            self.current = (self.limit().saturating_sub(1)).max(self.settings.min) as f64;
        }
    }

    /// Back to the initial window (after the store recovered).
    pub fn restart(&mut self) {
        self.run = 0;
        self.current = self.settings.initial as f64;
        let baseline = self.latency.baseline;
        self.latency = Latency {
            baseline,
            slow_start: true,
            ..Latency::default()
        };
    }
}

/// Is this reply the store saying it is too busy (`421`, `4.3.2` system not accepting
/// messages, `4.7.0` temporary refusal such as a rate limit)?
pub fn is_busy(reply: &Reply) -> bool {
    if reply.code().get() == 421 {
        return true;
    }
    reply.enhanced().is_some_and(|e| {
        reply.is_transient() && e.class == 4 && matches!((e.subject, e.detail), (3, 2) | (7, 0))
    })
}

mod probing;
#[cfg(test)]
mod tests;
