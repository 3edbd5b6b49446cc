//! Whether a store keeps our new sessions waiting in its listen backlog, from how long its
//! greeting takes; and how long an idle session may then hold one of its processes.
//!
//! A store that runs one process per session (Cyrus `maxchild`, Dovecot `process_limit`)
//! accepts a connection only when a process is free; the rest wait unanswered. Every session
//! we keep idle in the pool then holds a process that another gateway's connection waits
//! for. Measured with `bench/reverse/run.py --scenario a2` (three gateways, a five-worker
//! backlog store): 12 % of the workers' time went to sessions idle in a pool before they were
//! closed at `idle_timeout` (2 s). So once a greeting (with LHLO) took clearly longer than
//! the store's usual one, or the greeting alone clearly longer than the LHLO round trip after
//! it, idle sessions to that store are given back after [`LINGER`] instead
//! of `idle_timeout`, for [`MEMORY`] after the last such greeting: long enough for the
//! gateway's next transaction to take the session, short enough that the process goes to
//! whoever waits for it. [`CLEARED_AFTER`] sessions in a row greeted at once end it sooner:
//! such a store is not keeping us waiting now, whatever one greeting showed.
//!
//! Pure: time comes in as arguments.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A greeting (with LHLO) at least this long, and [`FACTOR`] times the fastest seen, was
/// queued.
pub const QUEUED: Duration = Duration::from_millis(50);
/// How many times the store's fastest greeting a queued one takes at least.
pub const FACTOR: u32 = 4;
/// How long after a queued greeting idle sessions are given back early.
pub const MEMORY: Duration = Duration::from_secs(10);
/// How long an idle session is kept while the store queues sessions.
pub const LINGER: Duration = Duration::from_millis(50);
/// After this many new sessions in a row that were greeted at once, the store is not
/// queueing ours: its sign is cleared. A store that greets at once but was slow once (a
/// threaded store busy at start-up, a box that stalled) would otherwise be taken for a
/// process-per-session one for [`MEMORY`], and the store's line (the scheduler's gate)
/// grows by every session it greets: `bench/reverse/run.py --scenario a` (deliveries queue
/// inside the store, greetings are immediate) had one gateway at all its 20 connections
/// for 10 s and 4.65× the store's workers in sessions after one slow first greeting.
pub const CLEARED_AFTER: u32 = 3;
/// What a greeting sent on accept may take beyond the LHLO round trip (the store's accept).
const ACCEPT_SLACK: Duration = Duration::from_millis(1);

#[derive(Debug, Default)]
struct Seen {
    fastest: Option<Duration>,
    queued_at: Option<Instant>,
    /// New sessions greeted at once since the last queued greeting.
    at_once: u32,
}

/// What the greetings of one store showed.
#[derive(Debug, Default)]
pub struct BacklogSign {
    seen: Mutex<Seen>,
}

impl BacklogSign {
    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session waited `greeting` for its greeting after the connect, then `lhlo` for
    /// the LHLO round trip, ending `now`. Queued: the two together are long against the
    /// store's fastest such wait, or the greeting alone is long against the LHLO round trip
    /// on the same session. The second catches the first session of a gateway that started
    /// while the store's processes were all busy (others', at start-up): its first greeting
    /// is also its fastest, and so no later one is [`FACTOR`] times slower
    /// (`bench/reverse/run.py --scenario c`: two gateways of three never saw the line and
    /// kept 16 and 26 % of the deliveries). A store far away greets within about a round
    /// trip, as fast as it answers LHLO.
    ///
    /// Greeted at once: within [`QUEUED`] and no later than twice the LHLO round trip (and
    /// a millisecond for the accept), i.e. no process had to come free for it.
    /// [`CLEARED_AFTER`] such sessions in a row clear the sign.
    pub fn observe(&self, greeting: Duration, lhlo: Duration, now: Instant) {
        let took = greeting + lhlo;
        let mut s = self.lock();
        let fastest = s.fastest.map_or(took, |f| f.min(took));
        s.fastest = Some(fastest);
        let slow_greeting = greeting >= QUEUED && greeting >= lhlo * FACTOR;
        if took >= QUEUED && (took >= fastest * FACTOR || slow_greeting) {
            s.queued_at = Some(now);
            s.at_once = 0;
        } else if greeting < QUEUED && greeting <= lhlo * 2 + ACCEPT_SLACK {
            s.at_once = s.at_once.saturating_add(1);
            if s.at_once >= CLEARED_AFTER {
                s.queued_at = None;
            }
        } else {
            // It waited a little: maybe for a process to come free. Not a run.
            s.at_once = 0;
        }
    }

    /// The store queued one of our sessions within [`MEMORY`] before `now`.
    pub fn queues(&self, now: Instant) -> bool {
        self.lock()
            .queued_at
            .is_some_and(|t| now.saturating_duration_since(t) < MEMORY)
    }

    /// How long an idle session may stay pooled at `now`: `idle_timeout`, or [`LINGER`]
    /// while the store queues sessions.
    pub fn idle_limit(&self, idle_timeout: Duration, now: Instant) -> Duration {
        if self.queues(now) {
            idle_timeout.min(LINGER)
        } else {
            idle_timeout
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_slow_greeting_shortens_idle_sessions_for_a_while() {
        let sign = BacklogSign::default();
        let t0 = Instant::now();
        let idle = Duration::from_secs(2);
        sign.observe(MS, MS, t0);
        sign.observe(5 * MS, 5 * MS, t0);
        assert_eq!(sign.idle_limit(idle, t0), idle, "a few ms is no queue");
        sign.observe(899 * MS, MS, t0 + MS);
        assert_eq!(sign.idle_limit(idle, t0 + 2 * MS), LINGER);
        assert_eq!(sign.idle_limit(idle, t0 + MS + MEMORY), idle, "forgotten");
        // never longer than the configured timeout
        sign.observe(899 * MS, MS, t0 + MEMORY);
        assert_eq!(sign.idle_limit(10 * MS, t0 + MEMORY), 10 * MS);
    }

    #[test]
    fn a_far_store_whose_greetings_are_all_slow_is_not_queueing() {
        let sign = BacklogSign::default();
        let t0 = Instant::now();
        // A round trip of about 40 ms: the greeting comes within one, LHLO takes one.
        for ms in [80, 95, 120, 90] {
            sign.observe(ms / 2 * MS, ms / 2 * MS, t0);
        }
        assert!(!sign.queues(t0));
        sign.observe(360 * MS, 40 * MS, t0);
        assert!(sign.queues(t0));
    }

    #[test]
    fn a_first_greeting_that_waited_for_a_process_is_queued() {
        let sign = BacklogSign::default();
        let t0 = Instant::now();
        // The first session of a gateway that started while every process served others:
        // also the fastest it has seen, but the greeting took a second and LHLO 1 ms.
        sign.observe(1000 * MS, MS, t0);
        assert!(sign.queues(t0));
        // A store that takes its time to greet but answers LHLO as slowly is no queue.
        let far = BacklogSign::default();
        far.observe(60 * MS, 100 * MS, t0);
        assert!(!far.queues(t0));
    }

    #[test]
    fn sessions_greeted_at_once_in_a_row_clear_the_sign() {
        let sign = BacklogSign::default();
        let t0 = Instant::now();
        let queued = |at| sign.observe(300 * MS, MS, at);
        queued(t0);
        for _ in 1..CLEARED_AFTER {
            sign.observe(MS, MS, t0);
        }
        assert!(sign.queues(t0), "one greeting short of the run");
        sign.observe(MS, MS, t0);
        assert!(
            !sign.queues(t0),
            "greeted at once, {CLEARED_AFTER} in a row"
        );
        // A queued greeting starts the run again.
        queued(t0);
        sign.observe(MS, MS, t0);
        queued(t0);
        for _ in 1..CLEARED_AFTER {
            sign.observe(MS, MS, t0);
        }
        assert!(sign.queues(t0), "the run was broken by a queued greeting");
        // A greeting that waited a little, perhaps for a process (not queued by the rule,
        // nor at once: ten times the LHLO round trip), breaks the run too.
        sign.observe(10 * MS, MS, t0);
        for _ in 1..CLEARED_AFTER {
            sign.observe(MS, MS, t0);
        }
        assert!(
            sign.queues(t0),
            "waiting a little is no proof of a free process"
        );
    }
}
