//! One scheduler shard: the home of some messages and the owner of some stores.
//!
//! As a *home* it runs each attempt of its messages (route, split into jobs, collect the
//! jobs' ends) and keeps their retry timers. As a *store owner* it keeps, per store, the
//! queue of jobs (round robin), the concurrency window, the breaker, the busy mailboxes and
//! the messages parked while the store is down, and starts transactions. Everything here
//! runs on the shard's task; transactions, probes and finishing run in their own tasks and
//! report back through the shard's channel.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metrics::{counter, gauge};
use postern_proto::{ForwardPath, ReversePath};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::agent::{Agent, SpoolBody};
use super::breaker::Breaker;
use super::dsn::{self, Kind};
use super::gate::Gate;
use super::metrics as m;
use super::transaction::{self, TxnDone};
use super::unroutable::Unroutable;
use super::{Ctx, Job, JobRcpt, Message, StoreStatus, local_reply};
use crate::delivery::{Outcome, Scope};
use crate::routing::RcptDecision;
use crate::spool::{QueueId, RecipientState, SpoolError};

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
        result: Result<(), String>,
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

/// Where a job with recipients to start waits.
#[derive(Debug, PartialEq, Eq)]
enum JobState {
    /// Not queued: nothing pending (its recipients are in flight or settled).
    Idle,
    /// In the store's round-robin `ready` queue. `woken_for`: the mailbox whose release
    /// put it there; if the job does not take that mailbox, the wake-up passes to the
    /// mailbox's next waiter (no lost wake-ups, one waiter woken per release).
    Ready { woken_for: Option<String> },
    /// Every pending recipient's mailbox is busy: waits, off the ready queue, in this
    /// mailbox's waiter list until it is released.
    Parked(String),
}

/// A job in a store queue.
#[derive(Debug)]
struct StoreJob {
    msg: Arc<Message>,
    pending: VecDeque<JobRcpt>,
    in_flight: usize,
    state: JobState,
}

/// One store, as its shard sees it.
#[derive(Debug)]
struct StoreQueue {
    agent: Agent,
    relay: String,
    per_txn: usize,
    /// The store's window, shared with the other paths to the store (proxy sessions).
    gate: Arc<Gate>,
    breaker: Breaker,
    jobs: HashMap<u64, StoreJob>,
    /// Jobs with a recipient that can start now, round robin. Dispatch costs O(work
    /// started): a job whose mailboxes are all busy is parked in `waiters`, not rescanned.
    ready: VecDeque<u64>,
    in_flight: usize,
    /// Mailboxes in a transaction now (per-mailbox serialisation).
    busy: HashSet<String>,
    /// Jobs parked on a busy mailbox, in arrival order (entries whose job has moved on
    /// are skipped when popped).
    waiters: HashMap<String, VecDeque<u64>>,
    parked: HashSet<QueueId>,
    queued_rcpts: usize,
    inflight_rcpts: usize,
    /// The queue shape (`postern_queue_shape_messages`).
    shape: m::ShapeTracker,
    /// Jobs popped off `ready` by the dispatcher ([`StoreStatus::examined`]).
    examined: u64,
    /// Since when the breaker has been open (seen at a load tick; backpressure).
    down_since: Option<SystemTime>,
}

impl StoreQueue {
    fn new(ctx: &Arc<Ctx>, shard: usize, name: &str, agent: Agent, gate: Arc<Gate>) -> Self {
        let live = ctx.live.load();
        // Another path's transaction freed a slot the dispatcher had wanted.
        let weak = Arc::downgrade(ctx);
        let store = name.to_owned();
        gate.set_waker(move || {
            if let Some(ctx) = weak.upgrade() {
                ctx.send(shard, Event::Dispatch(store.clone()));
            }
        });
        Self {
            relay: agent.relay(),
            per_txn: agent.recipients_per_transaction(),
            gate,
            breaker: Breaker::new(live.breaker_failures, live.probe_interval),
            agent,
            jobs: HashMap::new(),
            ready: VecDeque::new(),
            in_flight: 0,
            busy: HashSet::new(),
            waiters: HashMap::new(),
            parked: HashSet::new(),
            queued_rcpts: 0,
            inflight_rcpts: 0,
            shape: m::ShapeTracker::default(),
            examined: 0,
            down_since: None,
        }
    }

    /// Puts a job with pending recipients on the ready queue (unless it is there).
    fn make_ready(&mut self, id: u64) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.pending.is_empty() || matches!(job.state, JobState::Ready { .. }) {
            return;
        }
        job.state = JobState::Ready { woken_for: None };
        self.ready.push_back(id);
    }

    /// `mailbox` was released: its first (still parked) waiter goes to the ready queue.
    fn wake(&mut self, mailbox: &str) {
        let Some(q) = self.waiters.get_mut(mailbox) else {
            return;
        };
        while let Some(id) = q.pop_front() {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            if !matches!(&job.state, JobState::Parked(m) if m == mailbox) {
                continue; // moved on since it was parked here
            }
            job.state = JobState::Ready {
                woken_for: Some(mailbox.to_owned()),
            };
            self.ready.push_back(id);
            break;
        }
        if q.is_empty() {
            self.waiters.remove(mailbox);
        }
    }
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
            Event::Schedule(qid, at) => {
                if !self.active.contains_key(&qid) {
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

    fn unwait(&mut self, qid: QueueId) {
        if self.waiting.remove(&qid).is_some() {
            gauge!(m::QUEUE_MESSAGES, "state" => "waiting").decrement(1.0);
        }
    }

    /// Starts an attempt: route every open recipient, one job per store.
    fn attempt(&mut self, qid: QueueId) {
        if self.active.contains_key(&qid) || self.finishing.contains(&qid) {
            return;
        }
        if self.ctx.stop.is_cancelled() {
            return; // picked up at the next start
        }
        self.unwait(qid);
        if self.active.len() + self.finishing.len() >= self.active_limit {
            if self.backlogged.insert(qid) {
                gauge!(m::QUEUE_MESSAGES, "state" => "backlog").increment(1.0);
                self.backlog.push_back(qid);
            }
            return;
        }
        let ctx = Arc::clone(&self.ctx);
        let status = match ctx.spool.status(qid) {
            Ok(s) => s,
            Err(SpoolError::NotFound(_)) => return,
            Err(e) => {
                tracing::warn!(queue_id = %qid, error = %e, "cannot read the message's state; retrying later");
                self.schedule(qid, ctx.clock.now() + ctx.policy().minimal_backoff);
                return;
            }
        };
        if status.hold {
            return;
        }
        let envelope = match ctx.spool.read_envelope(qid) {
            Ok(e) => e,
            Err(e @ SpoolError::Corrupt { .. }) => {
                tracing::error!(queue_id = %qid, error = %e, "unreadable envelope; quarantining");
                drop(ctx.spool.quarantine(qid, &e.to_string()));
                return;
            }
            Err(SpoolError::NotFound(_)) => return,
            Err(e) => {
                tracing::warn!(queue_id = %qid, error = %e, "cannot read the envelope; retrying later");
                self.schedule(qid, ctx.clock.now() + ctx.policy().minimal_backoff);
                return;
            }
        };
        let now = ctx.clock.now();
        let arrival = envelope.received_at;
        let from = if envelope.sender.is_empty() {
            ReversePath::Null
        } else {
            ReversePath::parse(&format!("<{}>", envelope.sender)).unwrap_or(ReversePath::Null)
        };
        let delivery = crate::delivery::Envelope {
            from,
            params: envelope.params.clone(),
            size: status.size,
            eight_bit: false,
            arrived: arrival,
        };
        let msg = Arc::new(Message {
            qid,
            body: SpoolBody::new(ctx.spool.clone(), qid, status.size),
            delivery,
            arrival,
            retry_at: ctx.policy().next_attempt(arrival, now, self.rng.f64()),
            expires_at: ctx.policy().expires_at(arrival),
            envelope,
        });
        let router = ctx.router.load();
        let delivered_to = super::loops::delivered_to(&ctx.spool, qid);
        let mut groups: Vec<(String, Vec<JobRcpt>)> = Vec::new();
        for (index, (r, state)) in msg
            .envelope
            .recipients
            .iter()
            .zip(&status.recipients)
            .enumerate()
        {
            if state.is_final() {
                continue;
            }
            let in_doubt = *state == RecipientState::InDoubt;
            let text = if r.address.eq_ignore_ascii_case("postmaster") {
                "<Postmaster>".to_owned()
            } else {
                format!("<{}>", r.address)
            };
            let mut rcpt = JobRcpt {
                index,
                path: ForwardPath::Postmaster,
                params: r.params.clone(),
                mailbox: mailbox_key(&r.address),
                in_doubt,
                tries: 0,
                attempts: if in_doubt {
                    status.attempts.get(index).copied().unwrap_or(0)
                } else {
                    0
                },
            };
            let Ok(path) = ForwardPath::parse(&text) else {
                let reply = local_reply(550, (5, 1, 3), "Bad recipient address syntax");
                transaction::settle_locally(
                    &ctx,
                    &msg,
                    "none",
                    "none",
                    &rcpt,
                    &Outcome::Bounced(reply),
                );
                continue;
            };
            rcpt.path = path;
            if super::loops::is_loop(&delivered_to, &r.address) {
                let reply = local_reply(
                    554,
                    (5, 4, 6),
                    "Mail forwarding loop: the message already has a Delivered-To header for this recipient",
                );
                transaction::settle_locally(
                    &ctx,
                    &msg,
                    "none",
                    "none",
                    &rcpt,
                    &Outcome::Bounced(reply),
                );
                continue;
            }
            let lost = |this: &mut Self, bounce| {
                Err(this.unroutable.decide(
                    qid,
                    index,
                    msg.envelope.sender.is_empty(),
                    bounce,
                    router.unroutable_grace(),
                    now,
                ))
            };
            let refusal = match router.resolve(&rcpt.path, true) {
                RcptDecision::Local { store } | RcptDecision::Relay { store } => {
                    self.unroutable.routed(qid, index);
                    Ok(store)
                }
                RcptDecision::UnknownUser => lost(
                    self,
                    local_reply(550, (5, 1, 1), "Recipient address rejected: unknown user"),
                ),
                RcptDecision::RelayDenied => lost(
                    self,
                    local_reply(
                        554,
                        (5, 7, 1),
                        "Recipient address rejected: no route to this domain",
                    ),
                ),
                // The map did not load: retry later, never bounce for our own trouble.
                RcptDecision::Unavailable => Err(Outcome::Deferred(local_reply(
                    451,
                    (4, 3, 0),
                    "Routing map unavailable",
                ))),
            };
            let store = match refusal {
                Ok(store) => store,
                Err(outcome) => {
                    transaction::settle_locally(&ctx, &msg, "none", "none", &rcpt, &outcome);
                    continue;
                }
            };
            match groups.iter_mut().find(|(s, _)| *s == store) {
                Some((_, v)) => v.push(rcpt),
                None => groups.push((store, vec![rcpt])),
            }
        }
        gauge!(m::QUEUE_MESSAGES, "state" => "active").increment(1.0);
        self.active.insert(
            qid,
            Active {
                outstanding: groups.len(),
                retry_at: msg.retry_at,
                arrival,
            },
        );
        if groups.is_empty() {
            // Not settle(): that drains the backlog, which calls here (no recursion).
            self.settle_message(qid);
            return;
        }
        for (store, rcpts) in groups {
            let shard = ctx.store_shard(&store);
            let job = Job {
                msg: Arc::clone(&msg),
                store,
                rcpts,
            };
            ctx.send(shard, Event::Enqueue(job));
        }
    }

    /// Every job of the attempt is settled: wait for the next attempt, or finish.
    fn settle(&mut self, qid: QueueId) {
        self.settle_message(qid);
        self.drain_backlog();
    }

    fn settle_message(&mut self, qid: QueueId) {
        let Some(a) = self.active.remove(&qid) else {
            return;
        };
        gauge!(m::QUEUE_MESSAGES, "state" => "active").decrement(1.0);
        let ctx = Arc::clone(&self.ctx);
        let now = ctx.clock.now();
        match ctx.spool.status(qid) {
            Err(SpoolError::NotFound(_)) => {}
            Ok(s)
                if self.reporting.contains(&qid)
                    && s.recipients.iter().all(RecipientState::is_final) =>
            {
                // Its last report is still being queued: finish once it is marked.
                self.schedule(
                    qid,
                    now + Duration::from_secs(1).min(ctx.policy().minimal_backoff),
                );
            }
            Ok(s) if s.recipients.iter().all(RecipientState::is_final) => {
                self.finishing.insert(qid);
                let home = self.id;
                let c = Arc::clone(&ctx);
                // Every final state already reported (no DSN owed, marked with the outcome
                // itself): nothing to read back from disk, just remove the message.
                let reported = s.reported.iter().all(|r| *r);
                ctx.tasks.spawn(async move {
                    let ok = match finish(&c, qid, reported).await {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(queue_id = %qid, error = %e, "cannot finish the message; retrying later");
                            false
                        }
                    };
                    c.send(home, Event::Finished { qid, ok });
                });
            }
            Ok(s) => {
                // Bounces (and success reports) go out now, not when the last deferred
                // recipient is done with.
                let unreported = s
                    .recipients
                    .iter()
                    .zip(&s.reported)
                    .any(|(r, reported)| r.is_final() && !reported);
                if unreported && self.reporting.insert(qid) {
                    let home = self.id;
                    let c = Arc::clone(&ctx);
                    ctx.tasks.spawn(async move {
                        if let Err(e) = report(&c, qid).await {
                            tracing::warn!(queue_id = %qid, error = %e, "cannot queue the DSN yet; retrying at the next attempt");
                        }
                        c.send(home, Event::Reported(qid));
                    });
                }
                let deferred = s
                    .recipients
                    .iter()
                    .any(|r| matches!(r, RecipientState::Deferred { .. }));
                if deferred {
                    self.maybe_warn(qid, a.arrival, now);
                }
                let at = if a.retry_at > now {
                    a.retry_at
                } else {
                    ctx.policy().next_attempt(a.arrival, now, self.rng.f64())
                };
                self.schedule(qid, at);
            }
            Err(e) => {
                tracing::warn!(queue_id = %qid, error = %e, "cannot read the message's state; retrying later");
                self.schedule(qid, now + ctx.policy().minimal_backoff);
            }
        }
    }

    /// Sends the one "delayed" DSN, the first time a message is found deferred past
    /// `delay_warning`.
    // XXX: whether the warning was sent is kept in memory only. After a restart a message
    // is warned again only if it crossed `delay_warning` within the last backoff interval
    // (so at most one duplicate, never a missed warning within the interval).
    fn maybe_warn(&mut self, qid: QueueId, arrival: SystemTime, now: SystemTime) {
        let Some(dw) = self.ctx.delay_warning() else {
            return;
        };
        let age = now.duration_since(arrival).unwrap_or_default();
        let window = self.ctx.policy().maximal_backoff.mul_f64(1.25);
        if age < dw || age > dw + window || !self.warned.insert(qid) {
            return;
        }
        let ctx = Arc::clone(&self.ctx);
        self.ctx.tasks.spawn(async move {
            if let Err(e) = queue_dsn_async(&ctx, qid, Kind::Delay).await {
                tracing::warn!(queue_id = %qid, error = %e, "cannot queue the delay warning");
            }
        });
    }

    // ---- store role ---------------------------------------------------------------------

    fn store(&mut self, name: &str) -> Option<&mut StoreQueue> {
        if !self.stores.contains_key(name) {
            let (agent, gate) = self.ctx.agents.entry(name)?;
            let (agent, gate) = (agent.clone(), Arc::clone(gate));
            let queue = StoreQueue::new(&self.ctx, self.id, name, agent, gate);
            self.stores.insert(name.to_owned(), queue);
        }
        self.stores.get_mut(name)
    }

    fn enqueue(&mut self, job: Job) {
        let ctx = Arc::clone(&self.ctx);
        let Job { msg, store, rcpts } = job;
        let home = ctx.home_shard(msg.qid);
        let id = self.next_job;
        self.next_job += 1;
        let Some(st) = self.store(&store) else {
            let reply = local_reply(451, (4, 3, 5), &format!("Store {store} is not configured"));
            for r in &rcpts {
                transaction::settle_locally(
                    &ctx,
                    &msg,
                    &store,
                    "none",
                    r,
                    &Outcome::Deferred(reply.clone()),
                );
            }
            ctx.send(home, Event::JobDone(msg.qid));
            return;
        };
        st.shape
            .track(msg.qid, msg.arrival, rcpts.iter().map(|r| r.index));
        if !st.breaker.is_closed() {
            let reply = down_reply(&store, st.breaker.reason());
            for r in &rcpts {
                transaction::settle_locally(
                    &ctx,
                    &msg,
                    &store,
                    &st.relay,
                    r,
                    &Outcome::Deferred(reply.clone()),
                );
            }
            st.parked.insert(msg.qid);
            ctx.send(home, Event::JobDone(msg.qid));
            return;
        }
        st.queued_rcpts += rcpts.len();
        st.jobs.insert(
            id,
            StoreJob {
                msg,
                pending: rcpts.into(),
                in_flight: 0,
                state: JobState::Ready { woken_for: None },
            },
        );
        st.ready.push_back(id);
        self.dispatch(&store);
    }

    /// Starts transactions while the window has room: round robin over the store's jobs,
    /// one transaction per job per turn.
    fn dispatch(&mut self, name: &str) {
        let ctx = Arc::clone(&self.ctx);
        let shard = self.id;
        let Some(st) = self.stores.get_mut(name) else {
            return;
        };
        if ctx.stop.is_cancelled() || !st.breaker.is_closed() {
            return;
        }
        let serialize = ctx.config.per_mailbox_serialization;
        while !st.ready.is_empty() {
            // A slot under the store's window (shared with proxy sessions); none: the gate
            // sends Dispatch when one frees.
            let Some(permit) = st.gate.try_acquire() else {
                break;
            };
            let Some(id) = st.ready.pop_front() else {
                break;
            };
            st.examined += 1;
            let Some(job) = st.jobs.get_mut(&id) else {
                continue; // reaped since it was queued
            };
            let JobState::Ready { woken_for } = std::mem::replace(&mut job.state, JobState::Idle)
            else {
                continue;
            };
            let batch = select(&mut job.pending, &mut st.busy, st.per_txn.max(1), serialize);
            // Woken by a release but did not take that mailbox (and nobody else did):
            // the next waiter gets the wake-up.
            let pass_on = woken_for.filter(|m| !st.busy.contains(m));
            if batch.is_empty() {
                // Nothing startable: every pending mailbox is busy. Wait on the first.
                if let Some(r) = job.pending.front() {
                    let mailbox = r.mailbox.clone();
                    job.state = JobState::Parked(mailbox.clone());
                    st.waiters.entry(mailbox).or_default().push_back(id);
                }
                if let Some(m) = pass_on {
                    st.wake(&m);
                }
                continue;
            }
            if !job.pending.is_empty() {
                job.state = JobState::Ready { woken_for: None };
                st.ready.push_back(id);
            }
            job.in_flight += batch.len();
            st.in_flight += 1;
            st.queued_rcpts -= batch.len();
            st.inflight_rcpts += batch.len();
            let task = transaction::run(
                Arc::clone(&ctx),
                st.agent.clone(),
                name.to_owned(),
                st.relay.clone(),
                Arc::clone(&job.msg),
                id,
                batch,
                permit,
            );
            let c = Arc::clone(&ctx);
            ctx.tasks.spawn(async move {
                let done = task.await;
                c.send(shard, Event::TxnDone(Box::new(done)));
            });
            if let Some(m) = pass_on {
                st.wake(&m);
            }
        }
    }

    fn txn_done(&mut self, done: TxnDone) {
        let ctx = Arc::clone(&self.ctx);
        let random = self.rng.f64();
        let Some(st) = self.stores.get_mut(&done.store) else {
            return;
        };
        st.in_flight = st.in_flight.saturating_sub(1);
        st.inflight_rcpts = st.inflight_rcpts.saturating_sub(done.batch.len());
        let mut released = Vec::new();
        for r in &done.batch {
            if st.busy.remove(&r.mailbox) {
                released.push(r.mailbox.clone());
            }
        }
        if done.aborted {
            return;
        }
        let scope = done.scope();
        let detail = done
            .report
            .trouble
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        // The window learned from the transaction through its permit (the gate).
        match scope {
            Scope::Store => {
                let live = ctx.live.load();
                st.breaker
                    .set_limits(live.breaker_failures, live.probe_interval);
                if st.breaker.on_failure(Instant::now(), random, &detail) {
                    counter!(m::BREAKER_TRIPS, "store" => done.store.clone()).increment(1);
                    tracing::warn!(store = %done.store, reason = %detail, "store marked down; deferring its mail and probing");
                }
            }
            Scope::Connection => {}
            Scope::Recipient | Scope::Message => {
                st.breaker.on_success();
                // The store takes mail again: what it turned away comes back now.
                for qid in st.parked.drain() {
                    ctx.send(ctx.home_shard(qid), Event::Kick(qid));
                }
            }
        }
        let up = st.breaker.is_closed() && !ctx.stop.is_cancelled();
        for m in &released {
            st.wake(m);
        }
        let Some(job) = st.jobs.get_mut(&done.job) else {
            return;
        };
        job.in_flight = job.in_flight.saturating_sub(done.batch.len());
        let msg = Arc::clone(&job.msg);
        let mut later: Vec<(JobRcpt, Outcome)> = Vec::new();
        let mut finals: Vec<usize> = Vec::new();
        for mut r in done.batch.iter().cloned() {
            match done.outcome(r.index) {
                Some(Outcome::Delivered(_) | Outcome::Bounced(_)) => finals.push(r.index),
                Some(Outcome::Deferred(_)) => {}
                Some(Outcome::InDoubt) => {
                    r.in_doubt = true;
                    r.tries += 1;
                    if up && r.tries < MAX_TRIES {
                        job.pending.push_back(r);
                        st.queued_rcpts += 1;
                    } else if ctx.clock.now() >= msg.expires_at {
                        let reply =
                            local_reply(451, (4, 4, 2), "connection lost after the end of data");
                        later.push((r, Outcome::Deferred(reply)));
                    }
                    // else: stays in doubt in the ledger until the next attempt
                }
                other => {
                    r.tries += 1;
                    let reply = other
                        .and_then(Outcome::reply)
                        .or(done.report.trouble.as_ref().and_then(|t| t.reply.as_ref()))
                        .cloned();
                    if up && scope == Scope::Connection && r.tries < MAX_TRIES {
                        job.pending.push_back(r);
                        st.queued_rcpts += 1;
                    } else {
                        let reply = reply.unwrap_or_else(|| not_attempted_reply(scope, &detail));
                        later.push((r, Outcome::Deferred(reply)));
                    }
                }
            }
        }
        for index in finals {
            st.shape.settled(msg.qid, index);
        }
        st.make_ready(done.job);
        for (r, outcome) in &later {
            transaction::settle_locally(&ctx, &msg, &done.store, &st.relay, r, outcome);
        }
        if scope == Scope::Store {
            // Retried as soon as the store is seen working again (a probe or a transaction
            // succeeds), not only at the message's retry time.
            st.parked.insert(msg.qid);
        }
        if !st.breaker.is_closed() {
            self.park_all(&done.store);
        }
        self.reap(&done.store, done.job);
        self.dispatch(&done.store);
    }

    /// The store is down: defer every queued recipient and park their messages.
    fn park_all(&mut self, name: &str) {
        let ctx = Arc::clone(&self.ctx);
        let Some(st) = self.stores.get_mut(name) else {
            return;
        };
        let reply = down_reply(name, st.breaker.reason());
        st.ready.clear();
        st.waiters.clear();
        let ids: Vec<u64> = st
            .jobs
            .iter()
            .filter(|(_, j)| !j.pending.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            let Some(job) = st.jobs.get_mut(id) else {
                continue;
            };
            job.state = JobState::Idle;
            st.queued_rcpts -= job.pending.len();
            for r in job.pending.drain(..) {
                transaction::settle_locally(
                    &ctx,
                    &job.msg,
                    name,
                    &st.relay,
                    &r,
                    &Outcome::Deferred(reply.clone()),
                );
            }
            st.parked.insert(job.msg.qid);
        }
        for id in ids {
            self.reap(name, id);
        }
    }

    /// Removes a job with nothing pending or in flight and tells its home.
    fn reap(&mut self, name: &str, id: u64) {
        let Some(st) = self.stores.get_mut(name) else {
            return;
        };
        let Some(job) = st.jobs.get(&id) else {
            return;
        };
        if job.pending.is_empty() && job.in_flight == 0 {
            let qid = job.msg.qid;
            st.jobs.remove(&id);
            self.ctx.send(self.ctx.home_shard(qid), Event::JobDone(qid));
        }
    }

    fn spawn_probe(&mut self, name: &str) {
        let Some(st) = self.stores.get(name) else {
            return;
        };
        let agent = st.agent.clone();
        let ctx = Arc::clone(&self.ctx);
        let store = name.to_owned();
        let shard = self.id;
        tracing::debug!(store = %store, "probing");
        self.ctx.tasks.spawn(async move {
            let result = tokio::select! {
                r = agent.probe() => r,
                () = ctx.abort.cancelled() => Err("shutting down".into()),
            };
            ctx.send(shard, Event::ProbeDone { store, result });
        });
    }

    fn probe_done(&mut self, name: &str, result: Result<(), String>) {
        let random = self.rng.f64();
        let ctx = Arc::clone(&self.ctx);
        let Some(st) = self.stores.get_mut(name) else {
            return;
        };
        let reason = result.as_ref().err().cloned().unwrap_or_default();
        let live = ctx.live.load();
        st.breaker
            .set_limits(live.breaker_failures, live.probe_interval);
        if st
            .breaker
            .probe_result(result.is_ok(), Instant::now(), random, &reason)
        {
            st.gate.restart();
            let parked: Vec<QueueId> = st.parked.drain().collect();
            tracing::info!(store = %name, parked = parked.len(), "store is back; draining its backlog at slow-start pace");
            for qid in parked {
                ctx.send(ctx.home_shard(qid), Event::Kick(qid));
            }
            self.dispatch(name);
        } else {
            tracing::debug!(store = %name, reason = %reason, "probe failed; store still down");
        }
    }

    /// Each store's load for the listeners' backpressure check ([`crate::edge`]): its open
    /// recipients (queued, in flight, deferred or parked: the queue shape), the oldest's
    /// age, and how long its breaker has been open.
    fn publish_loads(&mut self) {
        let now = self.ctx.clock.now();
        for (name, st) in &mut self.stores {
            let Some(load) = self.ctx.agents.load(name) else {
                continue;
            };
            st.down_since = match (st.breaker.is_closed(), st.down_since) {
                (true, _) => None,
                (false, Some(t)) => Some(t),
                (false, None) => Some(now),
            };
            let age = |t: SystemTime| now.duration_since(t).unwrap_or_default();
            if load.limits().is_empty() {
                // Only whether it is down (verification does not ask a down store).
                let down_for = st.down_since.map(age);
                load.update(crate::edge::Sample {
                    down_for,
                    ..Default::default()
                });
                continue;
            }
            let (queued, oldest) = st.shape.load();
            load.update(crate::edge::Sample {
                queued: queued as u64,
                oldest: oldest.map(age).unwrap_or_default(),
                down_for: st.down_since.map(age),
            });
        }
    }

    fn publish_metrics(&mut self) {
        let now = self.ctx.clock.now();
        for (name, st) in &mut self.stores {
            st.shape.publish(name, now, &self.ctx.spool);
            let store = name.clone();
            gauge!(m::WINDOW, "store" => store.clone()).set(st.gate.status().0 as f64);
            // 0 until learned (a store with latency steering off, or no transaction yet).
            let baseline = st.gate.baseline().map_or(0.0, |b| b.as_secs_f64());
            gauge!(m::LATENCY_BASELINE, "store" => store.clone()).set(baseline);
            gauge!(m::BREAKER, "store" => store.clone()).set(st.breaker.state().gauge());
            if let Some((in_use, idle)) = st.agent.connections() {
                gauge!(m::CONNECTIONS, "store" => store.clone(), "state" => "in_use")
                    .set(in_use as f64);
                gauge!(m::CONNECTIONS, "store" => store.clone(), "state" => "idle")
                    .set(idle as f64);
            }
            gauge!(m::STORE_RECIPIENTS, "store" => store.clone(), "state" => "queued")
                .set(st.queued_rcpts as f64);
            gauge!(m::STORE_RECIPIENTS, "store" => store.clone(), "state" => "in_flight")
                .set(st.inflight_rcpts as f64);
            gauge!(m::STORE_PARKED, "store" => store.clone()).set(st.parked.len() as f64);
            let oldest = st
                .jobs
                .values()
                .map(|j| j.msg.arrival)
                .chain(st.parked.iter().map(|q| q.arrival()))
                .min();
            let age = oldest.map_or(0.0, |t| {
                now.duration_since(t).unwrap_or_default().as_secs_f64()
            });
            gauge!(m::OLDEST_AGE, "store" => store).set(age);
        }
    }
}

/// Picks the next transaction's recipients from a job: up to `per_txn`, skipping mailboxes
/// that are busy; a recipient in doubt goes alone.
fn select(
    pending: &mut VecDeque<JobRcpt>,
    busy: &mut HashSet<String>,
    per_txn: usize,
    serialize: bool,
) -> Vec<JobRcpt> {
    let mut batch: Vec<JobRcpt> = Vec::new();
    let mut i = 0;
    while i < pending.len() && batch.len() < per_txn {
        let r = &pending[i];
        if serialize && busy.contains(&r.mailbox) {
            i += 1;
            continue;
        }
        if r.in_doubt && !batch.is_empty() {
            i += 1;
            continue;
        }
        let alone = r.in_doubt;
        let Some(r) = pending.remove(i) else { break };
        if serialize {
            busy.insert(r.mailbox.clone());
        }
        batch.push(r);
        if alone {
            break;
        }
    }
    batch
}

/// The per-mailbox serialisation key: the address lower-cased, without a `+detail`
/// extension (`Bob+lists@Example.org` and `bob@example.org` are one mailbox at the store).
fn mailbox_key(address: &str) -> String {
    let lower = address.to_lowercase();
    match lower.rsplit_once('@') {
        Some((local, domain)) => {
            let user = local.split('+').next().unwrap_or(local);
            format!("{user}@{domain}")
        }
        None => lower,
    }
}

fn down_reply(store: &str, reason: &str) -> postern_proto::Reply {
    local_reply(451, (4, 4, 1), &format!("Store {store} is down: {reason}"))
}

fn not_attempted_reply(scope: Scope, detail: &str) -> postern_proto::Reply {
    match scope {
        Scope::Store => local_reply(451, (4, 4, 1), detail),
        _ => local_reply(451, (4, 4, 2), detail),
    }
}

/// Queues the DSN the message owes, then removes it from the spool.
/// Reports what is owed, then removes the message from the spool.
async fn finish(ctx: &Arc<Ctx>, qid: QueueId, reported: bool) -> Result<(), String> {
    if !reported {
        report(ctx, qid).await?;
    }
    ctx.spool.finish(qid).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Queues the DSN owed for the final recipients not yet reported (failures and, with
/// NOTIFY=SUCCESS, deliveries), then marks them reported in the ledger: the DSN is queued
/// before the mark, so a crash between the two repeats it, never loses it.
async fn report(ctx: &Arc<Ctx>, qid: QueueId) -> Result<(), String> {
    let c = Arc::clone(ctx);
    let (dsn, covered) = tokio::task::spawn_blocking(move || queue_dsn(&c, qid, Kind::Final))
        .await
        .map_err(|e| e.to_string())??;
    if let Some(dsn_qid) = dsn {
        ctx.send(ctx.home_shard(dsn_qid), Event::Submit(dsn_qid));
    }
    if !covered.is_empty() {
        ctx.spool
            .mark_reported(qid, &covered)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn queue_dsn_async(ctx: &Arc<Ctx>, qid: QueueId, kind: Kind) -> Result<(), String> {
    let c = Arc::clone(ctx);
    let (dsn, _) = tokio::task::spawn_blocking(move || queue_dsn(&c, qid, kind))
        .await
        .map_err(|e| e.to_string())??;
    if let Some(dsn_qid) = dsn {
        ctx.send(ctx.home_shard(dsn_qid), Event::Submit(dsn_qid));
    }
    Ok(())
}

/// Builds and durably queues the DSN of `kind` for `qid`, if one is owed (blocking).
/// Returns its queue id and, for [`Kind::Final`], the final recipients it covers (those
/// not reported before; owed a DSN or not).
fn queue_dsn(ctx: &Ctx, qid: QueueId, kind: Kind) -> Result<(Option<QueueId>, Vec<usize>), String> {
    let envelope = ctx.spool.read_envelope(qid).map_err(|e| e.to_string())?;
    let summary = ctx.spool.message(qid).map_err(|e| e.to_string())?;
    let mut covered = Vec::new();
    let states: Vec<RecipientState> = summary
        .recipients
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            if kind == Kind::Final && r.state.is_final() && !r.reported {
                covered.push(i);
            }
            if r.reported {
                RecipientState::Pending // reported before: not again
            } else {
                r.state
            }
        })
        .collect();
    if kind == Kind::Final && envelope.sender.is_empty() {
        let failed: Vec<(usize, &RecipientState)> = covered
            .iter()
            .filter_map(|&i| states.get(i).map(|s| (i, s)))
            .collect();
        let copy = super::double_bounce::handle(ctx, qid, &envelope, &failed)?;
        return Ok((copy, covered));
    }
    let rcpts = dsn::owed(&envelope, &states, kind);
    if rcpts.is_empty() {
        return Ok((None, covered));
    }
    let now = ctx.clock.now();
    let report = dsn::Report {
        hostname: &ctx.hostname,
        qid,
        envelope: &envelope,
        recipients: &rcpts,
        now,
        maximal_lifetime: ctx.policy().maximal_lifetime,
    };
    let rendered = match ctx.spool.open_body(qid) {
        Ok(mut body) => dsn::render(&report, &mut body, summary.size),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    };
    // An unreadable body still gets its recipients reported, without the content.
    let rendered = match rendered {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(queue_id = %qid, error = %e, "original message unreadable; DSN without it");
            dsn::render(&report, &mut std::io::empty(), 0).map_err(|e| e.to_string())?
        }
    };
    let env = dsn::envelope(&envelope, rendered.eight_bit, now);
    let mut w = ctx.spool.begin(env).map_err(|e| e.to_string())?;
    w.write(&rendered.content).map_err(|e| e.to_string())?;
    let dsn_qid = w.queue_id();
    w.commit().wait().map_err(|e| e.to_string())?;
    let word = match kind {
        Kind::Delay => "delay",
        Kind::Final if rcpts.iter().any(|r| r.action == dsn::Action::Failed) => "failure",
        Kind::Final => "success",
    };
    counter!(m::DSNS, "kind" => word).increment(1);
    tracing::info!(queue_id = %qid, dsn = %dsn_qid, kind = word, recipients = rcpts.len(), "DSN queued to the sender");
    Ok((Some(dsn_qid), covered))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(i: usize, mailbox: &str, in_doubt: bool) -> JobRcpt {
        JobRcpt {
            index: i,
            path: ForwardPath::parse(&format!("<{mailbox}>")).unwrap(),
            params: Default::default(),
            mailbox: mailbox.into(),
            in_doubt,
            tries: 0,
            attempts: 0,
        }
    }

    #[test]
    fn mailbox_keys() {
        assert_eq!(mailbox_key("Bob+lists@Example.ORG"), "bob@example.org");
        assert_eq!(mailbox_key("bob@example.org"), "bob@example.org");
        assert_eq!(mailbox_key("Postmaster"), "postmaster");
        assert_eq!(mailbox_key("+x@d"), "@d");
    }

    #[test]
    fn select_batches_skips_busy_mailboxes_and_isolates_in_doubt() {
        let mut pending: VecDeque<JobRcpt> = [
            r(0, "a@x", false),
            r(1, "b@x", false),
            r(2, "c@x", true),
            r(3, "a@x", false),
            r(4, "d@x", false),
        ]
        .into();
        let mut busy = HashSet::new();
        busy.insert("b@x".to_owned());
        let batch = select(&mut pending, &mut busy, 10, true);
        let idx: Vec<usize> = batch.iter().map(|r| r.index).collect();
        assert_eq!(idx, [0, 4], "b busy, c in doubt, the second a serialised");
        let batch = select(&mut pending, &mut busy, 10, true);
        assert_eq!(
            batch.iter().map(|r| r.index).collect::<Vec<_>>(),
            [2],
            "in doubt alone"
        );
        assert!(
            select(&mut pending, &mut busy, 10, true).is_empty(),
            "all busy"
        );
        busy.clear();
        let batch = select(&mut pending, &mut busy, 1, true);
        assert_eq!(batch.len(), 1, "recipients_per_transaction");
        let mut pending: VecDeque<JobRcpt> = [r(0, "a@x", false), r(1, "a@x", false)].into();
        let mut busy = HashSet::new();
        assert_eq!(
            select(&mut pending, &mut busy, 10, false).len(),
            2,
            "no serialisation"
        );
    }
}
