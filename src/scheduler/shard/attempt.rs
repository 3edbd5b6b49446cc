//! The home role: an attempt of a message homed on this shard (read its state, route every
//! open recipient, one job per store) and its settling once every job is done (schedule
//! the next attempt, or finish: DSN, then removal), and the one "delayed" warning.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metrics::gauge;
use postern_proto::{ForwardPath, ReversePath};

use crate::delivery::Outcome;
use crate::routing::RcptDecision;
use crate::scheduler::agent::SpoolBody;
use crate::scheduler::dsn::DsnKind;
use crate::scheduler::metrics as m;
use crate::scheduler::transaction;
use crate::scheduler::{Job, JobRcpt, Message, local_reply};
use crate::spool::{QueueId, RecipientState, SpoolError};

use super::dsn_queue::{finish, queue_dsn_async, report};
use super::store_queue::mailbox_key;
use super::{Active, Event, Shard};

impl Shard {
    /// Starts an attempt: route every open recipient, one job per store.
    pub(super) fn attempt(&mut self, qid: QueueId) {
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
        let (envelope, held) = match ctx.spool.take_message(qid) {
            Ok(m) => m,
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
        let delivery = crate::delivery::OutboundEnvelope {
            from,
            params: envelope.params.clone(),
            size: status.size,
            eight_bit: false,
            arrived: arrival,
        };
        let msg = Arc::new(Message {
            qid,
            body: SpoolBody::new(ctx.spool.clone(), qid, status.size, held),
            delivery,
            arrival,
            retry_at: ctx.policy().next_attempt(arrival, now, self.rng.f64()),
            expires_at: ctx.policy().expires_at(arrival),
            envelope,
        });
        let router = ctx.router.load();
        let delivered_to = crate::scheduler::loops::delivered_to(&ctx.spool, qid, msg.body.held());
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
            if crate::scheduler::loops::is_loop(&delivered_to, &r.address) {
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
    pub(super) fn settle(&mut self, qid: QueueId) {
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
            if let Err(e) = queue_dsn_async(&ctx, qid, DsnKind::Delay).await {
                tracing::warn!(queue_id = %qid, error = %e, "cannot queue the delay warning");
            }
        });
    }
}
