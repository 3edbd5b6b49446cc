//! One scheduler shard: the home of some messages and the owner of some stores.
//!
//! As a *home* it runs each attempt of its messages (route, split into jobs, collect the
//! jobs' ends) and keeps their retry timers. As a *store owner* it keeps, per store, the
//! queue of jobs (round robin), the concurrency window, the breaker, the busy mailboxes and
//! the messages parked while the store is down, and starts transactions. Everything here
//! runs on the shard's task; transactions, probes and finishing run in their own tasks and
//! report back through the shard's channel.
//!
//! | file | owns |
//! |---|---|
//! | this file | [`Event`], [`Shard`] and its event loop (events, timers, backlog) |
//! | `attempt` | the home role: an attempt, settling it, the delay warning |
//! | `store_role` | the store role: enqueue, dispatch, transaction ends, parking, probes, gauges |
//! | `store_queue` | one store's queue of jobs, busy mailboxes and batch selection |
//! | `dsn_queue` | queueing the DSNs a message owes, then finishing it |

mod attempt;
mod dsn_queue;
mod store_queue;
mod store_role;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metrics::gauge;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::agent::ProbeError;
use super::metrics as m;
use super::transaction::TxnDone;
use super::unroutable::Unroutable;
use super::{Ctx, Job, StoreStatus};
use crate::spool::QueueId;

use store_queue::{JobState, StoreQueue};

/// Transactions a recipient may be tried in during one attempt (a connection lost before
/// or after the end of data is retried once at once; then it waits for the next attempt).
const MAX_TRIES: u8 = 2;

/// How often the per-store gauges are refreshed.
const METRICS_EVERY: Duration = Duration::from_secs(5);

/// How often each store's load is published for the listeners' backpressure check.
const LOAD_EVERY: Duration = Duration::from_secs(1);

/// What a shard is told.
#[derive(Debug)]
pub(crate) enum Event {
    /// A message was queued (or is due): attempt it now.
    Submit(QueueId),
    /// A message found in the queue at start, due now: attempt it, unless this shard
    /// already knows it (queued and submitted since the queue was read: a second attempt
    /// would retry its deferred recipients at once).
    Load(QueueId),
    /// A message is deferred until then (found so at start).
    Schedule(QueueId, SystemTime),
    /// A store the message was parked on is back: attempt it now if it is waiting.
    Kick(QueueId),
    /// A message's recipients for a store this shard owns.
    Enqueue(Job),
    /// One of the message's jobs is settled.
    JobDone(QueueId),
    /// A transaction ended.
    TxnDone(Box<TxnDone>),
    /// A probe of a down store ended.
    ProbeDone {
        store: String,
        result: Result<(), ProbeError>,
    },
    /// Finishing (DSN and delete) ended.
    Finished { qid: QueueId, ok: bool },
    /// A store's gate has room again after a transaction of another path (a proxy
    /// session) ended: dispatch it.
    Dispatch(String),
    /// Report the stores' state.
    Status(tokio::sync::oneshot::Sender<Vec<StoreStatus>>),
    /// Reporting the final recipients of a message still in the queue ended.
    Reported(QueueId),
    /// When is this waiting message attempted next?
    NextAttempt(QueueId, tokio::sync::oneshot::Sender<Option<SystemTime>>),
    /// Answer at once: the shard's event loop runs (the systemd watchdog asks).
    Ping(tokio::sync::oneshot::Sender<()>),
}

/// A message whose attempt is running, homed here.
#[derive(Debug)]
struct Active {
    outstanding: usize,
    retry_at: SystemTime,
    arrival: SystemTime,
}

pub(crate) struct Shard {
    id: usize,
    ctx: Arc<Ctx>,
    rx: mpsc::UnboundedReceiver<Event>,
    active: HashMap<QueueId, Active>,
    finishing: HashSet<QueueId>,
    waiting: HashMap<QueueId, Instant>,
    timers: BinaryHeap<Reverse<(Instant, QueueId)>>,
    warned: HashSet<QueueId>,
    stores: HashMap<String, StoreQueue>,
    next_job: u64,
    rng: fastrand::Rng,
    /// Messages due while `active_limit` is reached, in arrival order of their turn.
    backlog: VecDeque<QueueId>,
    backlogged: HashSet<QueueId>,
    /// This shard's share of `active_limit`.
    active_limit: usize,
    /// Messages whose final recipients are being reported while others are still open.
    reporting: HashSet<QueueId>,
    /// Queued recipients that lost their route, and since when.
    unroutable: Unroutable,
}

impl Shard {
    pub(crate) fn new(id: usize, ctx: Arc<Ctx>, rx: mpsc::UnboundedReceiver<Event>) -> Self {
        let mut stores = HashMap::new();
        for (name, agent, gate) in ctx.agents.entries() {
            if ctx.store_shard(name) == id {
                let queue = StoreQueue::new(&ctx, id, name, agent.clone(), Arc::clone(gate));
                stores.insert(name.to_owned(), queue);
            }
        }
        let active_limit = (ctx.config.active_limit / ctx.shards.len().max(1)).max(1);
        Self {
            active_limit,
            backlog: VecDeque::new(),
            backlogged: HashSet::new(),
            reporting: HashSet::new(),
            unroutable: Unroutable::default(),
            id,
            ctx,
            rx,
            active: HashMap::new(),
            finishing: HashSet::new(),
            waiting: HashMap::new(),
            timers: BinaryHeap::new(),
            warned: HashSet::new(),
            stores,
            next_job: 0,
            rng: fastrand::Rng::new(),
        }
    }

    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(METRICS_EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut load_tick = tokio::time::interval(LOAD_EVERY);
        load_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let exit = self.ctx.exit.clone();
        loop {
            let wake = self.next_wake();
            let timer = async move {
                match wake {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = exit.cancelled() => break,
                ev = self.rx.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
                () = timer => self.on_timers(),
                _ = tick.tick() => self.publish_metrics(),
                _ = load_tick.tick() => self.publish_loads(),
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Submit(qid) => self.attempt(qid),
            Event::Load(qid) => {
                if !self.knows(qid) {
                    self.attempt(qid);
                }
            }
            Event::Schedule(qid, at) => {
                if !self.knows(qid) {
                    self.schedule(qid, at);
                }
            }
            Event::Kick(qid) => {
                if self.waiting.contains_key(&qid) {
                    self.attempt(qid);
                }
            }
            Event::Enqueue(job) => self.enqueue(job),
            Event::JobDone(qid) => {
                if let Some(a) = self.active.get_mut(&qid) {
                    a.outstanding = a.outstanding.saturating_sub(1);
                    if a.outstanding == 0 {
                        self.settle(qid);
                    }
                }
            }
            Event::TxnDone(done) => self.txn_done(*done),
            Event::ProbeDone { store, result } => self.probe_done(&store, result),
            Event::Dispatch(store) => self.dispatch(&store),
            Event::NextAttempt(qid, tx) => {
                let now = Instant::now();
                let at = self
                    .waiting
                    .get(&qid)
                    .map(|i| self.ctx.clock.now() + i.saturating_duration_since(now));
                let _ = tx.send(at);
            }
            Event::Reported(qid) => {
                self.reporting.remove(&qid);
            }
            Event::Ping(tx) => {
                let _ = tx.send(());
            }
            Event::Status(tx) => {
                let v = self
                    .stores
                    .iter()
                    .map(|(name, st)| StoreStatus {
                        name: name.clone(),
                        window: st.gate.status().0,
                        in_flight: st.in_flight,
                        breaker: st.breaker.state(),
                        queued: st.queued_rcpts,
                        parked: st.parked.len(),
                        mailbox_waits: st
                            .jobs
                            .values()
                            .filter(|j| matches!(j.state, JobState::Parked(_)))
                            .count(),
                        examined: st.examined,
                    })
                    .collect();
                let _ = tx.send(v);
            }
            Event::Finished { qid, ok } => {
                self.finishing.remove(&qid);
                if ok {
                    self.warned.remove(&qid);
                } else {
                    let at = self.ctx.clock.now() + self.ctx.policy().minimal_backoff;
                    self.schedule(qid, at);
                }
                self.drain_backlog();
            }
        }
    }

    /// Starts the backlog's messages while there is room under the active limit.
    fn drain_backlog(&mut self) {
        while self.active.len() + self.finishing.len() < self.active_limit {
            let Some(qid) = self.backlog.pop_front() else {
                return;
            };
            self.backlogged.remove(&qid);
            gauge!(m::QUEUE_MESSAGES, "state" => "backlog").decrement(1.0);
            self.attempt(qid);
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        let probe = self
            .stores
            .values()
            .filter_map(|s| s.breaker.probe_at())
            .min();
        match (timer, probe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, qid))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if self.waiting.get(&qid) == Some(&at) {
                self.attempt(qid);
            }
        }
        if self.ctx.stop.is_cancelled() {
            return;
        }
        let names: Vec<String> = self
            .stores
            .iter_mut()
            .filter_map(|(n, s)| s.breaker.start_probe(now).then(|| n.clone()))
            .collect();
        for name in names {
            self.spawn_probe(&name);
        }
    }

    // ---- home role ----------------------------------------------------------------------

    fn schedule(&mut self, qid: QueueId, at: SystemTime) {
        let instant = self.ctx.clock.instant_at(at);
        if self.waiting.insert(qid, instant).is_none() {
            gauge!(m::QUEUE_MESSAGES, "state" => "waiting").increment(1.0);
        }
        self.timers.push(Reverse((instant, qid)));
    }

    /// Is the message active, finishing, backlogged or waiting here?
    fn knows(&self, qid: QueueId) -> bool {
        self.active.contains_key(&qid)
            || self.finishing.contains(&qid)
            || self.backlogged.contains(&qid)
            || self.waiting.contains_key(&qid)
    }

    fn unwait(&mut self, qid: QueueId) {
        if self.waiting.remove(&qid).is_some() {
            gauge!(m::QUEUE_MESSAGES, "state" => "waiting").decrement(1.0);
        }
    }
}
