//! One transaction: mark in doubt, hand to the agent, write each reply to the ledger as it
//! arrives, log one line per recipient, count.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metrics::{counter, histogram};
use postern_proto::Reply;

use super::agent::{Agent, Attempt};
use super::gate::Permit;
use super::metrics::{self as m, outcome};
use super::{Ctx, JobRcpt, Message, dsn, local_reply};
use crate::delivery::trouble::Trouble;
use crate::delivery::{Outcome, PhaseMark, Recipient, Report, Scope};
use crate::spool::RecipientState;

/// What a transaction came to, for the store shard.
#[derive(Debug)]
pub(crate) struct TxnDone {
    pub(crate) store: String,
    pub(crate) job: u64,
    pub(crate) batch: Vec<JobRcpt>,
    pub(crate) report: Report,
    /// Dropped at the shutdown deadline.
    pub(crate) aborted: bool,
}

impl TxnDone {
    pub(crate) fn scope(&self) -> Scope {
        self.report.scope()
    }

    pub(crate) fn outcome(&self, index: usize) -> Option<&Outcome> {
        self.report.outcome(index)
    }
}

/// Delays for the log line, Postfix's `delays=a/b/c`: in the queue before this
/// transaction, getting a connection, the transfer.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Delays {
    pub(crate) queue: Duration,
    pub(crate) connect: Duration,
    pub(crate) transfer: Duration,
}

/// The ledger state for an outcome decided now: a temporary failure of an expired message
/// is a bounce. `None` for outcomes that write nothing (in doubt: already marked; not
/// attempted: the shard decides).
pub(crate) fn ledger_state(
    msg: &Message,
    outcome: &Outcome,
    now: SystemTime,
) -> Option<RecipientState> {
    Some(match outcome {
        Outcome::Delivered(r) => RecipientState::Delivered {
            reply: r.to_string(),
        },
        Outcome::Bounced(r) => RecipientState::Bounced {
            reply: r.to_string(),
        },
        Outcome::Deferred(r) => deferral(msg, r, now),
        Outcome::InDoubt | Outcome::NotAttempted(_) => return None,
    })
}

/// Deferred until the attempt's retry time, or bounced if the message has expired.
pub(crate) fn deferral(msg: &Message, reply: &Reply, now: SystemTime) -> RecipientState {
    if now >= msg.expires_at {
        RecipientState::Bounced {
            reply: reply.to_string(),
        }
    } else {
        RecipientState::Deferred {
            until: msg.retry_at,
            reply: reply.to_string(),
        }
    }
}

/// Writes a recipient's state decided without a transaction (routing refused it, its store
/// is down or unknown), logs and counts it. An in-doubt recipient keeps its state until the
/// message expires: it may have been delivered, so it must be retried alone.
#[allow(clippy::too_many_arguments, reason = "one log line's worth of fields")]
pub(crate) fn settle_locally(
    ctx: &Ctx,
    msg: &Message,
    store: &str,
    relay: &str,
    rcpt: &JobRcpt,
    outcome: &Outcome,
) {
    let now = ctx.clock.now();
    let delays = Delays {
        queue: now.duration_since(msg.arrival).unwrap_or_default(),
        ..Delays::default()
    };
    if rcpt.in_doubt && !outcome.is_final() && now < msg.expires_at {
        log_line(
            ctx,
            msg,
            store,
            relay,
            &rcpt.path.to_string(),
            delays,
            None,
            outcome,
        );
        return;
    }
    let state = ledger_state(msg, outcome, now);
    if let Some(state) = &state {
        // Appended now; durability follows with the next group commit.
        drop(ctx.spool.ledger(msg.qid, rcpt.index, state.clone()));
    }
    log_line(
        ctx,
        msg,
        store,
        relay,
        &rcpt.path.to_string(),
        delays,
        state.as_ref(),
        outcome,
    );
}

/// Runs one transaction of `batch` (recipients of one message for one store) under the
/// store's `permit`.
#[allow(
    clippy::too_many_arguments,
    reason = "one transaction's worth of context"
)]
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    agent: Agent,
    store: String,
    relay: String,
    msg: Arc<Message>,
    job: u64,
    batch: Vec<JobRcpt>,
    permit: Permit,
) -> TxnDone {
    let started = ctx.clock.now();
    let indices: Vec<usize> = batch.iter().map(|r| r.index).collect();
    let mut done = TxnDone {
        store,
        job,
        batch,
        report: Report::default(),
        aborted: false,
    };
    if let [one] = done.batch.as_slice()
        && one.in_doubt
    {
        counter!(m::IN_DOUBT_RETRIES, "store" => done.store.clone()).increment(1);
    }
    // An operator hold that landed after the attempt started (the recipients were waiting
    // for the store's window or a busy mailbox): not delivered, deferred with that reason.
    if ctx.spool.is_held(msg.qid) {
        let reply = local_reply(451, (4, 0, 0), "Held by the operator");
        done.report = not_attempted(&indices, reply, "held by the operator");
        return done;
    }
    // Poison messages: a recipient whose last `poison_attempts` attempts all ended
    // abnormally (still in doubt: no reply was recorded) quarantines the message.
    let poison = ctx.live.load().poison_attempts;
    if let Some(worst) = done
        .batch
        .iter()
        .filter(|r| r.in_doubt)
        .max_by_key(|r| r.attempts)
        .filter(|r| poison > 0 && r.attempts >= poison)
    {
        let reason = format!(
            "{} delivery attempts to {} ended abnormally (connection lost after the end of data, or the store or gateway stopped during the attempt)",
            worst.attempts, worst.path
        );
        if let Err(e) = ctx.spool.quarantine_poison(msg.qid, &reason).await {
            tracing::warn!(queue_id = %msg.qid, error = %e, "cannot quarantine the message; not delivering");
        }
        metrics::gauge!(crate::metrics::QUARANTINED).set(ctx.spool.quarantined() as f64);
        let reply = local_reply(
            451,
            (4, 0, 0),
            "Quarantined: delivery attempts kept ending abnormally",
        );
        done.report = not_attempted(&indices, reply, "quarantined");
        return done;
    }
    // The contract with the spool: durably in doubt before the final dot can be sent. The
    // same records count the attempt, so a crash during it is counted too.
    let counted: Vec<(usize, u32)> = done
        .batch
        .iter()
        .map(|r| {
            let before = if r.in_doubt { r.attempts } else { 0 };
            (r.index, before.saturating_add(1))
        })
        .collect();
    for (r, (_, n)) in done.batch.iter_mut().zip(&counted) {
        r.attempts = *n;
    }
    if let Err(e) = ctx.spool.mark_in_doubt_counted(msg.qid, &counted).await {
        tracing::warn!(queue_id = %msg.qid, error = %e, "cannot mark recipients in doubt; not delivering");
        let reply = local_reply(451, (4, 3, 0), &format!("Spool error before delivery: {e}"));
        done.report = not_attempted(&indices, reply, "spool error before delivery");
        return done;
    }
    let recipients: Vec<Recipient> = done
        .batch
        .iter()
        .map(|r| Recipient {
            index: r.index,
            path: r.path.clone(),
            params: r.params.clone(),
        })
        .collect();
    // The replies of one transaction arrive together (LMTP: one per recipient after the
    // dot): their states go to the ledger in one append, so a 5-recipient message costs one
    // record write and one place in a group commit, not five. A final state that owes no DSN
    // (the common delivery) is marked reported in the same record, so finishing the message
    // needs no second ledger write. A crash before the append leaves them in doubt: retried
    // alone, the documented at-least-once case.
    let mut states: Vec<(usize, Option<RecipientState>)> = Vec::with_capacity(done.batch.len());
    let mut on_outcome = |index: usize, outcome: &Outcome| {
        if let Some(state) = ledger_state(&msg, outcome, ctx.clock.now()) {
            states.push((index, Some(state)));
        }
    };
    let attempt = tokio::select! {
        a = agent.deliver(&msg.delivery, &recipients, &msg.body, &mut on_outcome) => a,
        () = ctx.abort.cancelled() => {
            done.aborted = true;
            Attempt::default()
        }
    };
    // Appended now, synced with the next batch (within a few ms, usually with the next
    // accepted message); the transaction is done only after it.
    let outcomes = (!states.is_empty()).then(|| {
        let ops: Vec<(usize, RecipientState, bool)> = states
            .iter()
            .filter_map(|(i, s)| s.as_ref().map(|s| (*i, s)))
            .map(|(i, s)| {
                let reported = s.is_final() && !dsn::owes_final(&msg.envelope, i, s);
                (i, s.clone(), reported)
            })
            .collect();
        ctx.spool.ledger_batch(msg.qid, ops)
    });
    // A recipient already in doubt that this transaction did not reach (nothing sent past
    // MAIL/RCPT/DATA: a store down or busy) was not tried abnormally: its count goes back.
    let untried: Vec<(usize, u32)> = done
        .batch
        .iter_mut()
        .filter(|r| {
            r.in_doubt
                && matches!(
                    attempt.report.outcome(r.index),
                    Some(Outcome::NotAttempted(_))
                )
        })
        .map(|r| {
            r.attempts = r.attempts.saturating_sub(1);
            (r.index, r.attempts)
        })
        .collect();
    if !untried.is_empty() {
        drop(ctx.spool.mark_in_doubt_counted(msg.qid, &untried));
    }
    if let Some(outcomes) = outcomes
        && let Err(e) = outcomes.await
    {
        // The spool keeps the new states in memory and retries the record.
        tracing::warn!(queue_id = %msg.qid, error = %e, "ledger update not yet durable");
    }
    if done.aborted {
        return done;
    }
    // The store's window learns from what the transaction came to; its slot is freed once
    // the outcome is durable (a slot freed earlier let a parked message be kicked while its
    // outcome was still in flight).
    permit.finish(&attempt.report);
    if msg.body.is_corrupt() {
        tracing::error!(queue_id = %msg.qid, "message body failed its checksum; quarantining");
        drop(
            ctx.spool
                .quarantine(msg.qid, "body checksum mismatch at delivery"),
        );
    }
    let delays = Delays {
        queue: started.duration_since(msg.arrival).unwrap_or_default(),
        connect: attempt.connect,
        transfer: attempt.transfer,
    };
    if let Agent::Lmtp(pool) = agent {
        let store = pool.store();
        store.record_phase(PhaseMark::Acquire, attempt.connect);
        if attempt.report.scope() != Scope::Store {
            store.record_phase(PhaseMark::Transaction, attempt.transfer);
        }
    }
    for (index, outcome) in &attempt.report.outcomes {
        let Some(rcpt) = done.batch.iter().find(|r| r.index == *index) else {
            continue;
        };
        if matches!(outcome, Outcome::NotAttempted(_)) {
            continue; // logged by the shard when it decides
        }
        let state = states
            .iter()
            .find(|(i, _)| i == index)
            .and_then(|(_, s)| s.as_ref());
        log_line(
            &ctx,
            &msg,
            &done.store,
            &relay,
            &rcpt.path.to_string(),
            delays,
            state,
            outcome,
        );
    }
    done.report = attempt.report;
    done
}

/// One line per recipient attempt, Postfix-style, and the delivery counters.
#[allow(clippy::too_many_arguments, reason = "one log line's worth of fields")]
pub(crate) fn log_line(
    ctx: &Ctx,
    msg: &Message,
    store: &str,
    relay: &str,
    to: &str,
    delays: Delays,
    state: Option<&RecipientState>,
    outcome: &Outcome,
) {
    let (status, reply): (&str, Cow<'_, str>) = match (state, outcome) {
        (Some(RecipientState::Delivered { reply }), _) => ("sent", Cow::Borrowed(reply)),
        (Some(RecipientState::Bounced { reply }), Outcome::Deferred(_)) => {
            ("bounced", Cow::Owned(format!("{reply} (message expired)")))
        }
        (Some(RecipientState::Bounced { reply }), _) => ("bounced", Cow::Borrowed(reply)),
        (Some(RecipientState::Deferred { reply, .. }), _) => ("deferred", Cow::Borrowed(reply)),
        (_, Outcome::InDoubt) => (
            "in doubt",
            Cow::Borrowed("451 4.4.2 connection lost after the end of data"),
        ),
        (_, other) => (
            "deferred",
            other
                .reply()
                .map_or(Cow::Borrowed("451 4.4.2 not attempted"), |r| {
                    Cow::Owned(r.to_string())
                }),
        ),
    };
    let total = delays.queue + delays.connect + delays.transfer;
    tracing::info!(
        target: "postern::delivery",
        queue_id = %msg.qid,
        to = %to,
        store = %store,
        relay = %relay,
        delay = %format_args!("{:.2}", total.as_secs_f64()),
        delays = %format_args!(
            "{:.2}/{:.2}/{:.2}",
            delays.queue.as_secs_f64(),
            delays.connect.as_secs_f64(),
            delays.transfer.as_secs_f64()
        ),
        dsn = %dsn::status_of(&reply),
        status,
        reply = %reply,
        "delivery"
    );
    let word = match status {
        "sent" => outcome::SENT,
        "bounced" => outcome::BOUNCED,
        "in doubt" => outcome::IN_DOUBT,
        _ => outcome::DEFERRED,
    };
    counter!(m::DELIVERIES, "store" => store.to_owned(), "outcome" => word).increment(1);
    match word {
        outcome::IN_DOUBT => counter!(m::IN_DOUBT, "store" => store.to_owned()).increment(1),
        outcome::DEFERRED => {
            let class = crate::metrics::deferral_class(&reply);
            counter!(m::DEFERRALS, "store" => store.to_owned(), "class" => class).increment(1);
        }
        outcome::SENT => {
            let latency = ctx
                .clock
                .now()
                .duration_since(msg.arrival)
                .unwrap_or_default();
            histogram!(m::DELIVERY_LATENCY, "store" => store.to_owned())
                .record(latency.as_secs_f64());
        }
        _ => {}
    }
}

/// Every recipient of the transaction not attempted, for a reason of the whole message.
fn not_attempted(indices: &[usize], reply: Reply, detail: &str) -> Report {
    Report {
        outcomes: indices
            .iter()
            .map(|&i| (i, Outcome::NotAttempted(Some(reply.clone()))))
            .collect(),
        trouble: Some(Trouble {
            scope: Scope::Message,
            detail: detail.into(),
            reply: Some(reply),
        }),
        ..Report::default()
    }
}
