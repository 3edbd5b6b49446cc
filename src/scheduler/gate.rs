//! A store's gate: its concurrency [`Window`] and the transactions running under it, shared
//! by everything that sends to the store — the scheduler's shard that owns the store and the
//! listeners in `mode: proxy` (cut-through) — so the store sees one controlled window per
//! gateway, whichever path the mail takes.
//!
//! A transaction holds a [`Permit`] from start to end. [`Gate::try_acquire`] never waits (the
//! scheduler dispatches from its event loop); [`Gate::acquire`] waits up to a bound (a proxy
//! session, a recipient verification). Waiting transactions get freed slots by their client's
//! turn ([`Turns`]: so gateways feeding one concentrator share its store evenly), and before
//! the scheduler: they have a client waiting on them, the scheduler's messages are already
//! safe in the spool and wait for the next free slot that nobody waits for. Finishing a
//! permit with the transaction's [`Report`] feeds the window: the latency sample on success,
//! a hard signal on a refusal, a lost connection or a busy reply.
//! A permit dropped without [`Permit::finish`] just frees its slot. When the window changes,
//! the store's connection pool (if it has one) is resized to it, so no more sessions stay
//! open at the store than the window admits (rounded up: a transaction admitted on the
//! window's fractional part gets a session too, rather than waiting for one and counting that
//! wait as the store's latency); the gauges follow.
//!
//! Locking: one short mutex per store, never held across an await or a call out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use metrics::gauge;
use tokio::sync::oneshot;

use super::metrics as m;
use super::turns::Turns;
use super::window::{PROBE_LIMIT, Window, is_busy};
use crate::delivery::{Report, Scope, StorePool};

/// Called when a slot frees up while someone that does not wait asked to be told.
type Waker = Box<dyn Fn() + Send + Sync>;

struct State {
    window: Window,
    in_flight: usize,
    /// Transactions waiting for a slot ([`Gate::acquire`]).
    turns: Turns,
}

impl State {
    /// A slot if the window has room for one more transaction.
    fn take(&mut self) -> bool {
        if !self.window.admits(self.in_flight) {
            self.window.on_full();
            return false;
        }
        self.in_flight += 1;
        if self.in_flight >= self.window.limit() {
            self.window.on_full();
        }
        true
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
            }),
            wanted: AtomicBool::new(false),
            waker: Mutex::new(None),
            pool,
        });
        gate.publish(&gate.lock());
        gate
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `(window, in flight)` now; the window as it stands outside baseline probes.
    pub fn status(&self) -> (usize, usize) {
        let s = self.lock();
        (s.window.ceiling(), s.in_flight)
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
    fn feed(self: &Arc<Self>, signal: Signal, sample: Option<Duration>, started: SystemTime) {
        let mut s = self.lock();
        let before = (s.window.ceiling(), s.window.admitted());
        let was_probing = s.window.is_probing();
        match signal {
            Signal::Success => s.window.on_success(sample, started, SystemTime::now()),
            Signal::Failure => s.window.on_failure(),
        }
        if (s.window.ceiling(), s.window.admitted()) != before {
            self.publish(&s);
        }
        if !was_probing && s.window.is_probing() {
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
        }
    }

    /// Ends an overdue probe and lets whoever waits for a slot try again. True when no probe
    /// runs any more.
    fn end_overdue_probe(&self) -> bool {
        let (running, nobody_waits) = {
            let mut s = self.lock();
            let ended = s.window.end_overdue_probe(SystemTime::now());
            let nobody_waits = ended && s.grant();
            (s.window.is_probing(), nobody_waits)
        };
        if nobody_waits {
            self.wanted.store(false, Ordering::Release);
            self.wake_scheduler();
        }
        !running
    }

    /// Frees a slot: to the next waiter, else to the scheduler if it asked.
    fn release(&self) {
        let nobody_waits = {
            let mut s = self.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
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
        let limit = s.window.ceiling();
        gauge!(m::WINDOW, "store" => self.store.clone()).set(limit as f64);
        let baseline = s.window.baseline().map_or(0.0, |b| b.as_secs_f64());
        gauge!(m::LATENCY_BASELINE, "store" => self.store.clone()).set(baseline);
        if let Some(pool) = &self.pool {
            // As many sessions as the gate admits transactions (the window rounded up): a
            // transaction admitted on the window's fraction must not wait for a connection,
            // or the wait counts as latency at the store.
            pool.resize(s.window.admitted());
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
            self.gate.release();
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
        self.gate.feed(signal, report.latency, self.started);
        self.gate.release();
    }

    /// The transaction ended with this signal and sample (agents without a report of their
    /// own).
    pub fn finish_with(mut self, signal: Signal, sample: Option<Duration>) {
        self.done = true;
        self.gate.feed(signal, sample, self.started);
        self.gate.release();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.gate.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Report;
    use crate::scheduler::window::WindowSettings;

    fn gate(width: usize) -> Arc<Gate> {
        Gate::new(
            "s",
            Window::with_settings(WindowSettings::feedback(width, width)),
            None,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_clients_take_turns_and_come_before_the_scheduler() {
        let gate = gate(1);
        let held = gate.try_acquire().expect("an empty window admits");
        let (tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        for client in ["a", "a", "a", "b", "c"] {
            let gate = Arc::clone(&gate);
            let tx = tx.clone();
            tokio::spawn(async move {
                let permit = gate.acquire(Duration::from_secs(60), client).await;
                let _ = tx.send(client);
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(permit);
            });
            // Let it queue before the next one comes.
            tokio::task::yield_now().await;
        }
        drop(tx);
        assert!(
            gate.try_acquire().is_none(),
            "the scheduler waits behind them"
        );
        drop(held);
        let mut got = String::new();
        while let Some(c) = order.recv().await {
            got.push_str(c);
        }
        assert_eq!(got, "abcaa");
        assert!(
            gate.try_acquire().is_some(),
            "the slot is free once nobody waits"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_goes_away_leaves_no_slot_taken() {
        let gate = gate(1);
        let held = gate.try_acquire().expect("an empty window admits");
        // One gives up at its deadline, one is dropped while waiting.
        let timed_out = gate.acquire(Duration::from_millis(10), "a");
        let mut dropped = Box::pin(gate.acquire(Duration::from_secs(60), "b"));
        assert!(futures_poll(&mut dropped).is_none());
        assert!(timed_out.await.is_none());
        // The slot is granted to "b" when freed, but "b" is gone: it must come back.
        held.finish(&Report::default());
        drop(dropped);
        assert_eq!(gate.status().1, 0, "nothing in flight");
        assert!(gate.try_acquire().is_some());
    }

    /// Polls a future once.
    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(f).poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
