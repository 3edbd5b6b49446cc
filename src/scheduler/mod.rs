//! The scheduler: Postfix's qmgr for postern. Takes queued messages from the spool and
//! delivers every recipient to the store that holds its mailbox, retrying, backing off,
//! bouncing and reporting.
//!
//! # Shape
//!
//! `N` shards (default: the number of cores), each one tokio task that owns two disjoint
//! sets without sharing them: the *stores* whose name hashes to it, and the *messages* whose
//! queue id hashes to it (their "home"). No lock is global; shards talk through channels.
//!
//! ```text
//! submit(qid) ─▶ home shard: status + envelope from the spool, route every open recipient
//!                 (re-resolved at each attempt), one Job per store ──▶ store shard(s)
//! store shard:   per-store queue of jobs, round robin; a transaction is started while the
//!                store's window has room and its breaker is closed; each runs in its own
//!                task: mark in doubt ─▶ agent (LMTP, maildir, …) ─▶ ledger (one append)
//!                ──▶ TxnDone back to the store shard (window, breaker, requeue, log)
//!                ──▶ JobDone to the home shard once the job's recipients are settled
//! home shard:    all jobs done ─▶ DSN for the newly final recipients, marked reported;
//!                recipients left? timer at the retry time (jittered backoff) : finish
//! ```
//!
//! # Promises
//!
//! - **Ledger.** Recipients are marked in doubt (durably) before their transaction starts,
//!   and the transaction's replies are written to the ledger in one append when it ends (a
//!   crash before that leaves them in doubt). A recipient found in doubt is retried alone
//!   in its own transaction. The DSN owed for final recipients (bounces, and deliveries
//!   with NOTIFY=SUCCESS) is queued at the end of the attempt that settled them, then they
//!   are marked reported in the ledger (a crash between the two repeats the DSN, never
//!   loses it); a message is finished only after that. A final state that owes no DSN is
//!   marked reported in its outcome record itself.
//! - **Per store.** At most `window` transactions at once (slow start at `initial_window`,
//!   up to `max_connections`, see [`window`]); at most `recipients_per_transaction`
//!   recipients per transaction; at most one transaction per mailbox at a time when
//!   `per_mailbox_serialization` is on; a job whose mailboxes are all busy waits on one of
//!   them, off the ready queue, and is woken when it is released (dispatching costs the
//!   work it starts, not the length of the queue). A store that fails a cohort of connections is
//!   marked down ([`breaker`]): its recipients are deferred without waiting on it, and its
//!   parked messages come back as soon as a probe (or a transaction) succeeds, at
//!   slow-start pace.
//! - **Fairness.** Jobs of one store are served round robin, one transaction at a time
//!   each, so a large message takes one slot and the small ones pass it. Stores never wait
//!   for each other: a slow or dead store holds only its own window.
//! - **Retries** ([`retry`]): jittered exponential backoff between `minimal_backoff` and
//!   `maximal_backoff`; bounced at `maximal_lifetime`.
//! - **Double bounce** (`double_bounce.rs`): mail from `<>` (a DSN) owes no DSN, so when a
//!   recipient of it bounces (it cannot be routed, e.g. the sender's domain is not ours and
//!   there is no relay store, or its store refuses it) one copy goes to the `double_bounce`
//!   address; if that copy bounces too, it is kept in the hold queue and logged. Never
//!   dropped, never a loop.
//!
//! # Compromises
//!
//! - XXX: an attempt reads the message's state and envelope from the spool on the shard's
//!   task (memory and one small read from the page cache); a slow disk slows that shard.
//! - Every message being attempted is in memory (envelope, about 1 KiB), at most
//!   `active_limit` of them; waiting and backlogged messages cost a queue id each.
//!
//! DIAGNOSTICS: nothing here panics on spool or network input; a message whose envelope or
//! body cannot be read is quarantined by the spool. Every recipient attempt is logged on
//! one line (target `postern::delivery`).
//!
//! SEE ALSO: [`crate::delivery`] (the agents), [`crate::spool`] (the ledger), Postfix
//! `qmgr(8)`, RFC 3464.

pub mod agent;
pub mod breaker;
pub mod clock;
pub mod config;
mod double_bounce;
pub mod dsn;
pub mod gate;
pub mod load;
mod loops;
pub mod metrics;
mod operator;
mod probe;
pub mod retry;
mod shard;
mod transaction;
mod turns;
mod unroutable;
pub mod window;
#[cfg(test)]
mod window_sim;

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use postern_proto::reply::{EnhancedCode, Reply, ReplyCode};
use postern_proto::{ForwardPath, RcptParams};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use agent::{Agent, Agents, ProbeError, SpoolBody};
pub use clock::Clock;
pub use config::{DeliveryDiff, LiveDelivery, SchedulerConfig};
pub use retry::RetryPolicy;

use crate::routing::Router;
use crate::spool::{Envelope, QueueId, Spool};

/// The running scheduler. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Scheduler {
    ctx: Arc<Ctx>,
    shards: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

/// One store's scheduling state ([`Scheduler::stores`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStatus {
    /// The store.
    pub name: String,
    /// Transactions allowed at once now.
    pub window: usize,
    /// Transactions running.
    pub in_flight: usize,
    /// The breaker.
    pub breaker: breaker::BreakerState,
    /// Recipients waiting for a transaction.
    pub queued: usize,
    /// Messages parked until the store works again.
    pub parked: usize,
    /// Jobs waiting for a busy mailbox (per-mailbox serialisation), off the ready queue.
    pub mailbox_waits: usize,
    /// Jobs the dispatcher has looked at since start: grows with the work started, not
    /// with the queue's length times the dispatches.
    pub examined: u64,
}

/// What [`Scheduler::start`] needs.
#[derive(Debug)]
pub struct Setup {
    /// The spool (already open and recovered).
    pub spool: Spool,
    /// The routing map; swap it to reload (queued mail is re-routed at its next attempt).
    pub router: Arc<ArcSwap<Router>>,
    /// The agents, by store name.
    pub agents: Agents,
    /// `delivery:`
    pub config: SchedulerConfig,
    /// Our host name (DSNs).
    pub hostname: String,
    /// `double_bounce`: where an undeliverable DSN goes once (default `postmaster@`
    /// `hostname`).
    pub double_bounce: Option<String>,
    /// Where "now" comes from.
    pub clock: Clock,
}

/// What every shard shares (read-only, or channels).
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) spool: Spool,
    pub(crate) router: Arc<ArcSwap<Router>>,
    pub(crate) agents: Agents,
    /// `delivery:` as at start-up; its live keys are read from `live` instead.
    pub(crate) config: SchedulerConfig,
    /// The `delivery:` keys that change at a reload ([`Scheduler::update_delivery`]).
    pub(crate) live: ArcSwap<LiveDelivery>,
    pub(crate) clock: Clock,
    pub(crate) hostname: String,
    /// Where an undeliverable DSN goes, once.
    pub(crate) double_bounce: String,
    pub(crate) shards: Vec<mpsc::UnboundedSender<shard::Event>>,
    /// Cancelled at shutdown: no new transaction starts.
    pub(crate) stop: CancellationToken,
    /// Cancelled when the shutdown deadline passes: transactions still running are dropped
    /// (their recipients stay in doubt in the ledger).
    pub(crate) abort: CancellationToken,
    /// Cancelled last: the shard tasks end.
    pub(crate) exit: CancellationToken,
    /// Transactions, probes and finishing messages.
    pub(crate) tasks: TaskTracker,
}

impl Ctx {
    /// The retry policy in force.
    pub(crate) fn policy(&self) -> RetryPolicy {
        self.live.load().policy
    }

    /// `delay_warning` in force.
    pub(crate) fn delay_warning(&self) -> Option<Duration> {
        self.live.load().delay_warning
    }

    fn shard_of(&self, key: impl Hash) -> usize {
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() % self.shards.len() as u64) as usize
    }

    /// The shard that owns store `name`.
    pub(crate) fn store_shard(&self, name: &str) -> usize {
        self.shard_of(("store", name))
    }

    /// The shard that owns message `qid`.
    pub(crate) fn home_shard(&self, qid: QueueId) -> usize {
        self.shard_of(("message", qid))
    }

    pub(crate) fn send(&self, shard: usize, event: shard::Event) {
        // A closed channel means the shard has exited (shutdown): the message stays in the
        // spool and is picked up at the next start.
        if let Some(tx) = self.shards.get(shard) {
            let _ = tx.send(event);
        }
    }
}

/// One message during one attempt: its envelope, as the agents want it, and the attempt's
/// retry time (shared by every recipient deferred in the attempt).
#[derive(Debug)]
pub(crate) struct Message {
    pub(crate) qid: QueueId,
    pub(crate) envelope: Envelope,
    pub(crate) delivery: crate::delivery::OutboundEnvelope,
    pub(crate) body: SpoolBody,
    pub(crate) arrival: SystemTime,
    pub(crate) retry_at: SystemTime,
    pub(crate) expires_at: SystemTime,
}

/// One recipient of a job.
#[derive(Clone, Debug)]
pub(crate) struct JobRcpt {
    pub(crate) index: usize,
    pub(crate) path: ForwardPath,
    pub(crate) params: RcptParams,
    /// Lower-cased address: the per-mailbox serialisation key.
    pub(crate) mailbox: String,
    /// May have been delivered already: goes alone in its transaction.
    pub(crate) in_doubt: bool,
    /// Transactions tried in this attempt.
    pub(crate) tries: u8,
    /// In doubt: delivery attempts started since its last normal end, as the ledger counts
    /// them (the in-doubt mark carries the count); 0 otherwise.
    pub(crate) attempts: u32,
}

/// A message's recipients for one store (Postfix's queue entry).
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) msg: Arc<Message>,
    pub(crate) store: String,
    pub(crate) rcpts: Vec<JobRcpt>,
}

impl Scheduler {
    /// Starts the shards and loads the queue from the spool (in the background: deferred
    /// messages wait for their retry time, the others are attempted at once).
    pub fn start(setup: Setup) -> Self {
        let Setup {
            spool,
            router,
            agents,
            config,
            hostname,
            double_bounce,
            clock,
        } = setup;
        let double_bounce = double_bounce.unwrap_or_else(|| format!("postmaster@{hostname}"));
        let n = config.shard_count().max(1);
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let live = ArcSwap::from_pointee(config.live());
        let ctx = Arc::new(Ctx {
            spool,
            router,
            agents,
            config,
            live,
            clock,
            hostname,
            double_bounce,
            shards: txs,
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            exit: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let shards = rxs
            .into_iter()
            .enumerate()
            .map(|(id, rx)| tokio::spawn(shard::Shard::new(id, Arc::clone(&ctx), rx).run()))
            .collect();
        for (_, agent) in ctx.agents.iter() {
            if let Agent::Lmtp(pool) = agent {
                // Closes idle connections past the store's idle timeout; ends with the pool.
                pool.spawn_sweeper(pool.sweep_interval());
            }
        }
        let recovered = ctx.spool.stats().in_doubt_recovered;
        ::metrics::counter!(metrics::IN_DOUBT_RECOVERED).increment(recovered);
        let loader = Arc::clone(&ctx);
        ctx.tasks.spawn(async move { load_queue(loader).await });
        tracing::info!(shards = n, "scheduler started");
        Self {
            ctx,
            shards: Arc::new(std::sync::Mutex::new(shards)),
        }
    }

    /// A message was committed to the spool: deliver it.
    pub fn submit(&self, qid: QueueId) {
        self.ctx
            .send(self.ctx.home_shard(qid), shard::Event::Submit(qid));
    }

    /// Puts the live keys of `config` in force (`minimal_backoff`, `maximal_backoff`,
    /// `maximal_lifetime`, `delay_warning`, `breaker.failures`, `breaker.probe_interval`;
    /// see [`SchedulerConfig::diff`]); the others are ignored (they need a restart). Call
    /// it with a validated configuration. The next retry time computed (the next deferral)
    /// uses the new values; retry times already scheduled, in the timers and in the
    /// ledger, are not rewritten, and an attempt already running keeps the expiry time it
    /// started with. A store's breaker takes the new limits at its next failure or probe
    /// result (a probe already scheduled keeps its time).
    pub fn update_delivery(&self, config: &SchedulerConfig) {
        self.ctx.live.store(Arc::new(config.live()));
    }

    /// The addresses of every queued recipient not yet delivered or bounced (reads the
    /// envelopes from disk: for a reload's count of recipients that lose their route).
    pub fn open_recipients(&self) -> Vec<String> {
        self.ctx
            .spool
            .snapshot()
            .into_iter()
            .flat_map(|m| m.recipients)
            .filter(|r| !r.state.is_final())
            .map(|r| r.address)
            .collect()
    }

    /// The live `delivery:` keys in force.
    pub fn delivery(&self) -> LiveDelivery {
        **self.ctx.live.load()
    }

    /// Each store's scheduling state, by name (for tools and tests).
    pub async fn stores(&self) -> Vec<StoreStatus> {
        let mut out = Vec::new();
        for shard in 0..self.ctx.shards.len() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.ctx.send(shard, shard::Event::Status(tx));
            if let Ok(mut v) = rx.await {
                out.append(&mut v);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Asks every shard to answer and waits for all of them: `true` once each has, `false`
    /// if a shard has exited. The systemd watchdog's proof that the scheduler's event loops
    /// run (a ping waits behind the events already queued to the shard).
    pub async fn ping(&self) -> bool {
        let mut answers = Vec::with_capacity(self.ctx.shards.len());
        for shard in 0..self.ctx.shards.len() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.ctx.send(shard, shard::Event::Ping(tx));
            answers.push(rx);
        }
        for rx in answers {
            if rx.await.is_err() {
                return false;
            }
        }
        true
    }

    /// When a waiting (deferred) message is to be attempted next; `None` if it is not
    /// waiting (being attempted, done, or unknown).
    pub async fn next_attempt(&self, qid: QueueId) -> Option<SystemTime> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ctx
            .send(self.ctx.home_shard(qid), shard::Event::NextAttempt(qid, tx));
        rx.await.ok().flatten()
    }

    /// Stops starting deliveries, waits up to `deadline` for the transactions in flight,
    /// then drops the rest (their recipients stay in doubt, retried alone after a restart),
    /// closes the stores' connection pools and ends the shards.
    pub async fn shutdown(&self, deadline: Duration) {
        self.drain(deadline).await;
        for (_, agent) in self.ctx.agents.iter() {
            if let Agent::Lmtp(pool) = agent {
                pool.close();
            }
        }
    }

    /// [`Scheduler::shutdown`] but the stores' pools stay open: for a caller that shares the
    /// agents (the gateway: a listener in `mode: proxy` may still be relaying through them
    /// while its sessions drain) and closes them itself.
    pub async fn drain(&self, deadline: Duration) {
        self.ctx.stop.cancel();
        self.ctx.tasks.close();
        if tokio::time::timeout(deadline, self.ctx.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.ctx.tasks.len(),
                "delivery deadline passed; abandoning the transactions in flight"
            );
            self.ctx.abort.cancel();
            self.ctx.tasks.wait().await;
        }
        self.ctx.exit.cancel();
        let shards = std::mem::take(&mut *self.shards.lock().unwrap_or_else(|e| e.into_inner()));
        for s in shards {
            let _ = s.await;
        }
        tracing::info!("scheduler stopped");
    }
}

/// Reads the queue at start: every message not on hold is attempted now, or at its retry
/// time if all its open recipients are deferred.
async fn load_queue(ctx: Arc<Ctx>) {
    let spool = ctx.spool.clone();
    let Ok(messages) = tokio::task::spawn_blocking(move || spool.snapshot()).await else {
        return;
    };
    let (mut now_n, mut later_n) = (0usize, 0usize);
    for m in messages {
        let home = ctx.home_shard(m.qid);
        match (m.queue, m.next_attempt) {
            (crate::spool::QueueState::Hold | crate::spool::QueueState::Quarantine, _) => {}
            (crate::spool::QueueState::Deferred, Some(at)) if at > ctx.clock.now() => {
                later_n += 1;
                ctx.send(home, shard::Event::Schedule(m.qid, at));
            }
            _ => {
                now_n += 1;
                ctx.send(home, shard::Event::Load(m.qid));
            }
        }
    }
    tracing::info!(now = now_n, deferred = later_n, "queue loaded");
}

/// A reply made here (not by a store), for the ledger, logs and DSNs.
pub(crate) fn local_reply(code: u16, enhanced: (u8, u16, u16), text: &str) -> Reply {
    let code = ReplyCode::new(code).unwrap_or(ReplyCode::LOCAL_ERROR);
    Reply::new(
        code,
        Some(EnhancedCode::new(enhanced.0, enhanced.1, enhanced.2)),
        text,
    )
}
