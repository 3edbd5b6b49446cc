//! The store role: for each store this shard owns, taking jobs in, dispatching
//! transactions (window, breaker, busy mailboxes), taking their ends back (requeue, park,
//! settle), parking the messages of a down store and probing it, and the per-store gauges
//! and loads.

use std::sync::Arc;
use std::time::SystemTime;

use metrics::{counter, gauge};
use tokio::time::Instant;

use crate::delivery::{Outcome, Scope};
use crate::scheduler::agent::ProbeError;
use crate::scheduler::metrics as m;
use crate::scheduler::transaction::{self, TxnDone};
use crate::scheduler::{Job, JobRcpt, local_reply};
use crate::spool::QueueId;

use super::store_queue::{JobState, StoreJob, StoreQueue, select};
use super::{Event, MAX_TRIES, Shard};

impl Shard {
    fn store(&mut self, name: &str) -> Option<&mut StoreQueue> {
        if !self.stores.contains_key(name) {
            let (agent, gate) = self.ctx.agents.entry(name)?;
            let (agent, gate) = (agent.clone(), Arc::clone(gate));
            let queue = StoreQueue::new(&self.ctx, self.id, name, agent, gate);
            self.stores.insert(name.to_owned(), queue);
        }
        self.stores.get_mut(name)
    }

    pub(super) fn enqueue(&mut self, job: Job) {
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
    pub(super) fn dispatch(&mut self, name: &str) {
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
            // Boxed: a transaction's future is about 6 KiB, and tokio copies a spawned
            // future by value into its task and again when it finishes.
            let task = Box::pin(task);
            ctx.tasks.spawn(async move {
                let done = task.await;
                c.send(shard, Event::TxnDone(Box::new(done)));
            });
            if let Some(m) = pass_on {
                st.wake(&m);
            }
        }
    }

    pub(super) fn txn_done(&mut self, done: TxnDone) {
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

    pub(super) fn spawn_probe(&mut self, name: &str) {
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
                () = ctx.abort.cancelled() => Err(ProbeError::ShuttingDown),
            };
            ctx.send(shard, Event::ProbeDone { store, result });
        });
    }

    pub(super) fn probe_done(&mut self, name: &str, result: Result<(), ProbeError>) {
        let random = self.rng.f64();
        let ctx = Arc::clone(&self.ctx);
        let Some(st) = self.stores.get_mut(name) else {
            return;
        };
        let reason = result
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default();
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
    pub(super) fn publish_loads(&mut self) {
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
                load.update(crate::scheduler::load::Sample {
                    down_for,
                    ..Default::default()
                });
                continue;
            }
            let (queued, oldest) = st.shape.load();
            load.update(crate::scheduler::load::Sample {
                queued: queued as u64,
                oldest: oldest.map(age).unwrap_or_default(),
                down_for: st.down_since.map(age),
            });
        }
    }

    pub(super) fn publish_metrics(&mut self) {
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

fn down_reply(store: &str, reason: &str) -> postern_proto::Reply {
    local_reply(451, (4, 4, 1), &format!("Store {store} is down: {reason}"))
}

fn not_attempted_reply(scope: Scope, detail: &str) -> postern_proto::Reply {
    match scope {
        Scope::Store => local_reply(451, (4, 4, 1), detail),
        _ => local_reply(451, (4, 4, 2), detail),
    }
}
