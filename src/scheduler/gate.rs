//! A store's gate: its concurrency [`Window`] and the transactions running under it, shared
//! by everything that sends to the store — the scheduler's shard that owns the store and the
//! listeners in `mode: proxy` (cut-through) — so the store sees one controlled window per
//! gateway, whichever path the mail takes.
//!
//! A transaction holds a [`Permit`] from start to end. [`Gate::try_acquire`] never waits (the
//! scheduler dispatches from its event loop); [`Gate::acquire`] waits up to a bound (a proxy
//! session, a recipient verification). Waiting transactions get freed slots by their client's
//! turn (`Turns`: so gateways feeding one concentrator share its store evenly), and before
//! the scheduler: they have a client waiting on them, the scheduler's messages are already
//! safe in the spool and wait for the next free slot that nobody waits for. Finishing a
//! permit with the transaction's [`Report`] feeds the window: the latency sample on success,
//! a hard signal on a refusal, a lost connection or a busy reply. At a store that gives its
//! clients turns (a postern concentrator: [`TURNS_KEYWORD`](crate::delivery::lmtp::TURNS_KEYWORD))
//! the window stops steering by latency at the first transaction fed after it was seen:
//! the concentrator shares its store out among the gateways itself.
//! A permit dropped without [`Permit::finish`] just frees its slot. At a store that keeps our
//! new sessions waiting in its listen backlog, the store's line stands in for the window
//! (`Gate::line`: the sessions it serves us, and two more; at a concentrator too, whose
//! edges take turns in it). When the window changes,
//! the store's connection pool (if it has one) is resized to it, so no more sessions stay
//! open at the store than the window admits (rounded up: a transaction admitted on the
//! window's fractional part gets a session too, rather than waiting for one and counting that
//! wait as the store's latency); the gauges follow. During a baseline probe the window's
//! `min` counts only transactions that began after the probe: those already running drain
//! on their own, and a long one must not stop the store for the whole probe. The pool
//! shrinks with the probe, to its `min` and the transactions still draining: an idle session
//! would hold a process of a store that runs one per session for the whole probe (measured
//! with `bench/reverse/run.py --scenario a2`: 3 % of the store's worker time, in gaps of
//! 20–90 ms between two transactions of a session).
//!
//! Locking: one short mutex per store, never held across an await or a call out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use metrics::gauge;
use tokio::sync::oneshot;

use super::metrics as m;
use super::turns::Turns;
use super::window::{PROBE_LIMIT, Sample, Window, is_busy};
use crate::delivery::{Report, Scope, StorePool};

/// Transactions beyond the sessions a store that queues sessions serves us ([`Gate::line`]):
/// one whose connect holds our place in the store's line, and one that waits for the next
/// session given back. A transaction gives its session back when its last reply came but
/// frees its slot only once its outcome is durable; without a transaction already waiting,
/// the session would sit idle meanwhile and until the next one is dispatched (the
/// gateway's part of the gap between two transactions of a session: 1.1 ms median, 2.4 ms
/// p90, traced on a 2-core box, against 10–20 ms for a transaction at Dovecot).
const LINE_EXTRA: usize = 2;

/// Called when a slot frees up while someone that does not wait asked to be told.
type Waker = Box<dyn Fn() + Send + Sync>;

struct State {
    window: Window,
    in_flight: usize,
    /// Transactions waiting for a slot ([`Gate::acquire`]).
    turns: Turns,
    /// The store's line ([`Gate::line`]), as of the last lock.
    line: usize,
    /// When the running baseline probe began (none: no probe since the last one ended).
    probe_began: Option<SystemTime>,
    /// Transactions in flight that began before the running probe: they drain on their own
    /// and do not count against the probe's minimum (see [`State::take`]).
    before_probe: usize,
}

impl State {
    /// A slot if the store's line, if it has one, else the window, has room for one more
    /// transaction.
    fn take(&mut self) -> bool {
        if self.line < usize::MAX {
            // The store's line, not the window, is the limit ([`Gate::line`]).
            if self.in_flight >= self.line {
                return false;
            }
            self.in_flight += 1;
            return true;
        }
        // During a baseline probe the window admits its minimum of *new* transactions:
        // those that began before the probe drain on their own. Counting them would let one
        // long transaction (a held mailbox, a 20 MiB message) stop the store for the whole
        // probe, at every probe.
        let counted = if self.window.is_probing() {
            self.in_flight.saturating_sub(self.before_probe)
        } else {
            self.in_flight
        };
        if !self.window.admits(counted) {
            self.window.on_full();
            return false;
        }
        self.in_flight += 1;
        if self.in_flight >= self.window.limit() {
            self.window.on_full();
        }
        true
    }

    /// Transactions allowed at once outside probes: the store's line if it has one, else
    /// the window.
    fn limit(&self) -> usize {
        if self.line < usize::MAX {
            self.line
        } else {
            self.window.ceiling()
        }
    }

    /// The sessions the store's pool may keep open. In the store's line, `most` (its
    /// `max_connections`): the line, not the pool, bounds them. During a baseline probe, the
    /// probe's minimum and the transactions still draining from before it (never more than
    /// outside the probe): the rest would sit idle at the store for the whole probe, each
    /// holding a process that another gateway's session waits for at a store that runs one
    /// per session (Cyrus `maxchild`, Dovecot `process_limit`); they are closed (an idle one
    /// at once, a busy one when its transaction ends) and opened again when the probe is
    /// over. Otherwise the window
    /// rounded up: a transaction admitted on the window's fraction must not wait for a
    /// connection, or the wait counts as latency at the store.
    fn sessions(&self, most: usize) -> usize {
        if self.line < usize::MAX {
            most
        } else if self.window.is_probing() {
            (self.window.limit() + self.before_probe).min(self.window.admitted())
        } else {
            self.window.admitted()
        }
    }

    /// Hands free slots to waiters, in turn, while the window has room. True when nobody
    /// waits any more.
    fn grant(&mut self) -> bool {
        while !self.turns.is_empty() && self.take() {
            match self.turns.next() {
                Some(waiter) => {
                    if waiter.send(()).is_err() {
                        // It stopped waiting between the check and now: the slot is free.
                        self.in_flight -= 1;
                    }
                }
                None => self.in_flight -= 1,
            }
        }
        self.turns.is_empty()
    }
}

/// One store's gate. Shared (`Arc`).
pub struct Gate {
    store: String,
    state: Mutex<State>,
    /// The scheduler tried and found no room: wake it when a slot frees.
    wanted: AtomicBool,
    waker: Mutex<Option<Waker>>,
    pool: Option<StorePool>,
    /// Transactions are relayed through this gate for other gateways ([`Gate::relay`]):
    /// a concentrator. Its pool has been told ([`StorePool::relaying`]).
    relaying: AtomicBool,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Gate")
            .field("store", &self.store)
            .field("limit", &s.window.limit())
            .field("in_flight", &s.in_flight)
            .finish_non_exhaustive()
    }
}

/// What a finished transaction tells the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// It went through (whatever its recipients' replies): a latency sample if it has one.
    Success,
    /// Refused, dropped, timed out, or the store said it is busy.
    Failure,
}

impl Signal {
    /// What a transaction's report says: the store's or the connection's trouble, or a busy
    /// reply (421, 4.3.2, 4.7.0) anywhere in it, is a failure; anything else a success.
    pub fn of(report: &Report) -> Self {
        let busy = report
            .outcomes
            .iter()
            .filter_map(|(_, o)| o.reply())
            .chain(report.trouble.as_ref().and_then(|t| t.reply.as_ref()))
            .any(is_busy);
        match report.scope() {
            Scope::Store | Scope::Connection => Self::Failure,
            Scope::Recipient | Scope::Message if busy => Self::Failure,
            Scope::Recipient | Scope::Message => Self::Success,
        }
    }
}

impl Gate {
    /// A gate with this window, resizing `pool` (if any) to follow it.
    pub fn new(store: &str, window: Window, pool: Option<StorePool>) -> Arc<Self> {
        let gate = Arc::new(Self {
            store: store.to_owned(),
            state: Mutex::new(State {
                window,
                in_flight: 0,
                turns: Turns::default(),
                line: usize::MAX,
                probe_began: None,
                before_probe: 0,
            }),
            wanted: AtomicBool::new(false),
            waker: Mutex::new(None),
            pool,
            relaying: AtomicBool::new(false),
        });
        if let Some(pool) = &gate.pool {
            // The store's line grows as it greets our sessions: transactions that found it
            // full are admitted then, not only when another transaction ends.
            let weak = Arc::downgrade(&gate);
            pool.on_new_session(move || {
                if let Some(gate) = weak.upgrade() {
                    gate.regrant();
                }
            });
        }
        gate.publish(&gate.lock());
        gate
    }

    /// Hands slots to waiters and wakes the scheduler if it found no room, after the limit
    /// may have grown without a transaction ending (the store's line, [`Gate::line`]).
    fn regrant(&self) {
        let room = {
            let mut s = self.lock();
            s.grant() && s.in_flight < s.limit()
        };
        if room && self.wanted.swap(false, Ordering::AcqRel) {
            self.wake_scheduler();
        }
    }

    /// The state, with the store's line as it is now.
    fn lock(&self) -> MutexGuard<'_, State> {
        let line = self.line();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let was_in_line = s.line < usize::MAX;
        s.line = line;
        if was_in_line != (line < usize::MAX) {
            // The line came or went: the gauges and the pool's size follow, and the
            // operator is told why the store's window changed its ways.
            if line < usize::MAX {
                tracing::info!(
                    store = %self.store,
                    "store keeps new sessions waiting (a process limit): taking turns in its line, one connect at a time"
                );
            } else {
                tracing::info!(
                    store = %self.store,
                    "store greets new sessions at once again: its latency window steers"
                );
            }
            self.publish(&s);
        }
        s
    }

    /// How many transactions the store's line lets run at once, if it has one. A store that
    /// keeps our new sessions waiting in its listen backlog (one process per session:
    /// Dovecot `process_limit`, Cyrus `maxchild`) is shared by that line, first come, first
    /// served: each gateway gets a process in its turn and keeps it for half the store's
    /// `reuse_limit` ([`StorePool::reuse_limit`](crate::delivery::StorePool::reuse_limit)). There
    /// the line, not the window, sets how many transactions run: as many as the store serves
    /// us sessions, and [`LINE_EXTRA`] more. The store's own process limit bounds what it
    /// takes on; a window below the sessions it serves us only left its processes idle, or
    /// left us without a connect in the line when a process came free, and the store went to
    /// the others. Measured with `bench/reverse/run.py` (three gateways; figures in its
    /// README), the shares' median deviation went from 21 to 10 % on Dovecot
    /// (`process_limit = 5`) and from 39 to 16 % on the backlog fake store, with fewer
    /// sessions at the store; not on Cyrus in short runs (14 to 18 %: whoever got the
    /// processes first keeps them until `reuse_limit`). Elsewhere: none (`usize::MAX`), the
    /// window decides.
    ///
    /// At a concentrator ([`Gate::relay`]) too. It is often the store's only client, so its
    /// line is all the store's processes and two; its edges keep transactions waiting for
    /// it (their windows there steer by feedback:
    /// [`TURNS_KEYWORD`](crate::delivery::lmtp::TURNS_KEYWORD)), so its gate stays full and
    /// they take turns in it. Steered by its latency window instead, it kept Dovecot
    /// (`process_limit = 5`) at 2.4–4 sessions and delivered a median 68 % of what one
    /// gateway straight to Dovecot did (nine runs); with the line, 7 sessions
    /// (`bench/reverse/run.py --scenario f`, shares within 0.3 % either way; figures in its
    /// README). (Before the
    /// edges left the sharing to it, the line was not kept here: their latency windows
    /// kept few waiting, its gate was seldom full, and the edge keeping the most waiting got
    /// the most: shares 42–65 % off.)
    fn line(&self) -> usize {
        match &self.pool {
            Some(pool) if pool.store().queues_sessions() => pool.status().size + LINE_EXTRA,
            _ => usize::MAX,
        }
    }

    /// `(window, in flight)` now: the store's line if it has one, else the window as it
    /// stands outside baseline probes.
    pub fn status(&self) -> (usize, usize) {
        let s = self.lock();
        (s.limit(), s.in_flight)
    }

    /// The window steers by latency (not at a store that gives its clients turns, nor with
    /// `window: { latency: false }`).
    pub fn steers_by_latency(&self) -> bool {
        self.lock().window.steers_by_latency()
    }

    /// The window's learned no-load latency.
    pub fn baseline(&self) -> Option<Duration> {
        self.lock().window.baseline()
    }

    /// Whom to call when a slot frees after a [`try_acquire`](Self::try_acquire) found none
    /// (the scheduler: "dispatch this store again").
    pub fn set_waker(&self, waker: impl Fn() + Send + Sync + 'static) {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(waker));
    }

    /// A slot now, or none (and the waker is called when one frees that nobody waits for).
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut s = self.lock();
        if !s.turns.is_empty() || !s.take() {
            self.wanted.store(true, Ordering::Release);
            return None;
        }
        Some(self.permit())
    }

    fn permit(self: &Arc<Self>) -> Permit {
        Permit {
            gate: Arc::clone(self),
            started: SystemTime::now(),
            done: false,
        }
    }

    /// [`Gate::acquire`] for a transaction relayed for another gateway (`mode: proxy`):
    /// marks this gate's pool as a concentrator's ([`StorePool::relaying`]).
    pub async fn relay(self: &Arc<Self>, wait: Duration, client: &str) -> Option<Permit> {
        if !self.relaying.swap(true, Ordering::Relaxed)
            && let Some(pool) = &self.pool
        {
            pool.relaying();
        }
        self.acquire(wait, client).await
    }

    /// A slot, waiting at most `wait` for one behind the other waiters, in `client`'s turn.
    pub async fn acquire(self: &Arc<Self>, wait: Duration, client: &str) -> Option<Permit> {
        let (ticket, rx) = {
            let mut s = self.lock();
            if s.turns.is_empty() && s.take() {
                return Some(self.permit());
            }
            s.turns.wait(client)
        };
        let mut waiting = Waiting {
            gate: self,
            ticket,
            rx,
            over: false,
        };
        let granted = matches!(
            tokio::time::timeout(wait, &mut waiting.rx).await,
            Ok(Ok(()))
        );
        // Timed out, unless the slot came just now: decided under the lock that grants.
        (granted || waiting.end()).then(|| self.permit())
    }

    /// Back to the initial window (the store came back after being down).
    pub fn restart(&self) {
        let mut s = self.lock();
        s.window.restart();
        s.grant();
        self.publish(&s);
    }

    /// Feeds one finished transaction, which took its slot at `started`, into the window.
    /// `sample` makes its sample, told whether the store's line is in force.
    fn feed(
        self: &Arc<Self>,
        signal: Signal,
        sample: impl FnOnce(bool) -> Option<Sample>,
        started: SystemTime,
    ) {
        let mut s = self.lock();
        let before = (s.window.ceiling(), s.window.admitted());
        let was_probing = s.window.is_probing();
        let turns = s.window.steers_by_latency()
            && self.pool.as_ref().is_some_and(|p| p.store().gives_turns());
        if turns {
            // The latency we would read is our place in the concentrator's turns: it shares
            // its store out itself, and answers 451 4.3.2 when we keep too many waiting.
            s.window.steer_by_feedback();
        }
        match signal {
            Signal::Success => {
                let sample = sample(s.line < usize::MAX);
                s.window.on_success(sample, started, SystemTime::now());
            }
            Signal::Failure => s.window.on_failure(),
        }
        if !was_probing && s.window.is_probing() {
            // Every transaction in flight began before the probe, this one too (its slot is
            // released after this feed).
            s.probe_began = Some(SystemTime::now());
            s.before_probe = s.in_flight;
            self.publish(&s);
            // A probe ends on its samples or at its time limit, whichever first; the limit
            // must not wait for a sample that a slot held by a long transaction withholds.
            let gate = Arc::clone(self);
            tokio::spawn(async move {
                // A probe lasts at most its drain and PROBE_LIMIT (2 × PROBE_LIMIT in all).
                for _ in 0..3 {
                    tokio::time::sleep(PROBE_LIMIT).await;
                    if gate.end_overdue_probe() {
                        break;
                    }
                }
            });
        } else if was_probing != s.window.is_probing()
            || (s.window.ceiling(), s.window.admitted()) != before
        {
            self.publish(&s);
        }
        drop(s);
        if turns {
            tracing::info!(store = %self.store, "store is a concentrator that gives its clients turns: its window steers by refusals and busy replies, not by latency");
        }
    }

    /// Ends an overdue probe and lets whoever waits for a slot try again. True when no probe
    /// runs any more.
    fn end_overdue_probe(&self) -> bool {
        let (running, nobody_waits) = {
            let mut s = self.lock();
            let ended = s.window.end_overdue_probe(SystemTime::now());
            if ended {
                self.publish(&s);
            }
            let nobody_waits = ended && s.grant();
            (s.window.is_probing(), nobody_waits)
        };
        if nobody_waits {
            self.wanted.store(false, Ordering::Release);
            self.wake_scheduler();
        }
        !running
    }

    /// Frees the slot of a transaction that took it at `started` (none: just now): to the
    /// next waiter, else to the scheduler if it asked.
    fn release(&self, started: Option<SystemTime>) {
        let nobody_waits = {
            let mut s = self.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            if let (Some(began), Some(started)) = (s.probe_began, started)
                && started < began
            {
                s.before_probe = s.before_probe.saturating_sub(1);
                if s.window.is_probing() {
                    // Its session is not needed for the rest of the probe.
                    self.publish(&s);
                }
            }
            s.grant()
        };
        if nobody_waits && self.wanted.swap(false, Ordering::AcqRel) {
            self.wake_scheduler();
        }
    }

    fn wake_scheduler(&self) {
        if let Some(wake) = &*self.waker.lock().unwrap_or_else(|e| e.into_inner()) {
            wake();
        }
    }

    /// Gauges, and the pool sized to the window (idle sessions beyond it are closed).
    fn publish(&self, s: &State) {
        let limit = s.limit();
        gauge!(m::WINDOW, "store" => self.store.clone()).set(limit as f64);
        let baseline = s.window.baseline().map_or(0.0, |b| b.as_secs_f64());
        gauge!(m::LATENCY_BASELINE, "store" => self.store.clone()).set(baseline);
        // Every change of the window (and of the pool's size during a probe), for an operator
        // who asks why a store gets what it gets (`POSTERN_LOG=info,postern::window=debug`).
        tracing::debug!(
            target: "postern::window",
            store = %self.store,
            window = format_args!("{:.2}", s.window.width()),
            limit,
            in_flight = s.in_flight,
            probing = s.window.is_probing(),
            baseline_ms = format_args!("{:.2}", baseline * 1e3),
            round_ms = format_args!("{:.2}", s.window.round_latency().map_or(0.0, |d| d.as_secs_f64() * 1e3)),
            "store window"
        );
        if let Some(pool) = &self.pool {
            pool.resize(s.sessions(pool.store().max_connections()));
        }
    }
}

/// A waiter's place in the gate's [`Turns`] while [`Gate::acquire`] waits. Dropped before the
/// wait is over (the waiting session went away): leaves the line, or frees the slot that was
/// granted to it meanwhile.
struct Waiting<'a> {
    gate: &'a Arc<Gate>,
    ticket: u64,
    rx: oneshot::Receiver<()>,
    over: bool,
}

impl Waiting<'_> {
    /// Ends the wait, under the gate's lock: true if a slot was granted meanwhile (it is
    /// this waiter's now), else the waiter leaves the line.
    fn end(&mut self) -> bool {
        self.over = true;
        let mut s = self.gate.lock();
        let granted = self.rx.try_recv().is_ok();
        if !granted {
            s.turns.forget(self.ticket);
        }
        granted
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.over && self.end() {
            self.gate.release(None);
        }
    }
}

/// One transaction's slot under a store's window.
#[derive(Debug)]
pub struct Permit {
    gate: Arc<Gate>,
    started: SystemTime,
    done: bool,
}

impl Permit {
    /// The transaction ended with this report: feed the window and free the slot.
    pub fn finish(mut self, report: &Report) {
        self.done = true;
        let signal = Signal::of(report);
        self.gate
            .feed(signal, |in_line| sample_of(report, in_line), self.started);
        self.gate.release(Some(self.started));
    }

    /// The transaction ended with this signal and sample (agents without a report of their
    /// own).
    pub fn finish_with(mut self, signal: Signal, sample: Option<Sample>) {
        self.done = true;
        self.gate.feed(signal, |_| sample, self.started);
        self.gate.release(Some(self.started));
    }
}

/// The window's sample of a finished transaction's report.
///
/// `in_line`: the store keeps our new sessions waiting in its listen backlog
/// ([`Gate::line`]). There the wait for a connection is left out: on such a store a
/// transaction on a session it serves never queues (the process is ours until we close the
/// session); what waits is our next session, in the store's line, or a transaction of ours
/// for a session given back. Neither is the store getting slower, and the window takes over
/// again when the store stops keeping sessions waiting. The rest of the sample (MAIL to the
/// final reply) still reads a store whose processes slow each other down (a shared disk).
fn sample_of(report: &Report, in_line: bool) -> Option<Sample> {
    let latency = report.latency?;
    Some(if in_line {
        Sample {
            latency: latency.saturating_sub(report.connection_wait),
            new_connection: report.new_connection,
            connection_wait: Duration::ZERO,
        }
    } else {
        Sample {
            latency,
            new_connection: report.new_connection,
            connection_wait: report.connection_wait,
        }
    })
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.gate.release(Some(self.started));
        }
    }
}

#[cfg(test)]
mod tests;
