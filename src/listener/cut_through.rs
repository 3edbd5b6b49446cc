//! Cut-through relaying (`listeners[].mode: proxy`): a transaction is relayed to each
//! recipient's store while the client waits, and the client is answered with the store's
//! own replies.
//!
//! Owns: what a proxy session does between the end of data and its replies — grouping the
//! recipients by the store their route named at RCPT, one transaction per store (at most the
//! store's `recipients_per_transaction` recipients each) through the store's agent and its
//! concurrency window, turning each [`Outcome`] into a reply, and the SMTP fallback to the
//! spool.
//!
//! Promises:
//! - **Nothing is acknowledged before the store acknowledged it.** A 250 for a recipient is
//!   the store's own 2yz for it, or (the fallback below) `250 … queued as ID` once the
//!   spool says the message is durable.
//! - The store's reply is passed on with its code class made to agree with the outcome the
//!   store's `normalize` rules gave it (a `552` treated as temporary goes upstream as
//!   `452`, so the upstream gateway retries rather than bounces).
//! - A store that cannot be reached, a window that stays full for `proxy_wait`, a session
//!   the store refuses, or a transaction that fails before the end of data: `451 4.3.2`,
//!   nothing delivered. A connection lost after the end of data, before the store's reply:
//!   `451 4.4.2` — the store may have delivered it, the upstream retries, so at most a
//!   duplicate, never a loss.
//! - LMTP: one reply per accepted RCPT, each from the store. An RCPT that an alias
//!   expanded into several recipients is one reply, combined like an SMTP transaction.
//! - SMTP: one reply for the transaction. All recipients with the same class of outcome:
//!   that class (the store's reply when there is one recipient, or when every reply was the
//!   same). Mixed: the recipients the store did not deliver are written to the spool as a
//!   message of their own, handed to the scheduler once durable, and the client gets 250;
//!   if the spool fails, `451 4.3.0` (the recipients already delivered will then be
//!   delivered again when the client retries: a duplicate, never a loss).
//!
//! Memory: the message is held in the session, at most the listener's `max_message_size`.
//!
//! Stores that are not pooled (maildir, pipe, discard, error) are delivered in place by
//! their agent the same way: a maildir answers once its file is synced, a pipe with its
//! command's status, discard with 250, error with its reply.

use std::collections::HashMap;
use std::time::SystemTime;

use metrics::counter;
use postern_proto::reply::{EnhancedCode, ReplyCode, Severity};
use postern_proto::{ForwardPath, MailParams, Reply, ReversePath, replies};

use super::Shared;
use crate::delivery::{OutboundEnvelope, Outcome, Recipient, Report, Scope};
use crate::metrics::{self as m, outcome as word};
use crate::routing::{RcptDecision, Router};
use crate::scheduler::Agent;
use crate::spool::{self, EnvelopeRecipient, QueueId};

/// Where one envelope recipient goes, decided at RCPT.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// Which accepted RCPT it came from (alias expansion makes several of one).
    pub(crate) rcpt_no: usize,
    /// The address as the store is to get it.
    pub(crate) path: ForwardPath,
    /// Its store, or the reply it gets without one (an alias target routing nowhere).
    pub(crate) store: Result<String, Reply>,
}

impl Target {
    /// An address the client gave, routed.
    pub(crate) fn accepted(rcpt_no: usize, path: ForwardPath, decision: &RcptDecision) -> Self {
        let store = decision
            .store()
            .map(str::to_owned)
            .ok_or_else(replies::local_error);
        Self {
            rcpt_no,
            path,
            store,
        }
    }

    /// An alias target, routed like the scheduler routes a queued one (trusted: an alias
    /// may point to another domain, through the relay store).
    pub(crate) fn expanded(rcpt_no: usize, address: &str, router: &Router) -> Self {
        let text = if address.eq_ignore_ascii_case("postmaster") {
            "<Postmaster>".to_owned()
        } else {
            format!("<{address}>")
        };
        let path = match ForwardPath::parse(&text) {
            Ok(p) => p,
            Err(e) => {
                return Self {
                    rcpt_no,
                    path: ForwardPath::Postmaster,
                    store: Err(replies::bad_recipient(&e)),
                };
            }
        };
        let store = match router.resolve(&path, true) {
            RcptDecision::Local { store } | RcptDecision::Relay { store } => Ok(store),
            RcptDecision::UnknownUser => Err(replies::unknown_user()),
            RcptDecision::RelayDenied => Err(replies::relay_denied()),
            RcptDecision::Unavailable => Err(replies::local_error()),
        };
        Self {
            rcpt_no,
            path,
            store,
        }
    }
}

/// One relayed transaction, as the session hands it over at the end of data.
pub(crate) struct Transaction<'a> {
    pub(crate) id: QueueId,
    pub(crate) from: &'a ReversePath,
    pub(crate) params: &'a MailParams,
    pub(crate) recipients: &'a [EnvelopeRecipient],
    pub(crate) targets: &'a [Target],
    /// Our `Received:` header, then the content.
    pub(crate) body: Vec<u8>,
    /// `helo [ip]`, as the spool records it; also whose turn it waits for at a full window.
    pub(crate) client: String,
    /// LMTP: one reply per accepted RCPT; SMTP: one.
    pub(crate) lmtp: bool,
}

/// Relays `t` and returns the replies owed to the client, in order.
pub(crate) async fn run(shared: &Shared, t: Transaction<'_>) -> Vec<Reply> {
    let envelope = OutboundEnvelope {
        from: t.from.clone(),
        params: t.params.clone(),
        size: t.body.len() as u64,
        eight_bit: !t.body.is_ascii(),
        arrived: SystemTime::now(),
    };
    let outcomes = deliver(shared, &envelope, &t).await;
    let units: Vec<Vec<usize>> = if t.lmtp {
        let mut by_rcpt: Vec<Vec<usize>> = Vec::new();
        for (i, target) in t.targets.iter().enumerate() {
            if by_rcpt.len() <= target.rcpt_no {
                by_rcpt.resize(target.rcpt_no + 1, Vec::new());
            }
            by_rcpt[target.rcpt_no].push(i);
        }
        by_rcpt
    } else {
        vec![(0..t.targets.len()).collect()]
    };
    let verdicts: Vec<Verdict> = units.iter().map(|u| verdict(u, &outcomes)).collect();
    let to_spool: Vec<usize> = verdicts
        .iter()
        .filter_map(|v| match v {
            Verdict::Spool(rest) => Some(rest.iter().copied()),
            Verdict::Answer(_) => None,
        })
        .flatten()
        .collect();
    let spooled = if to_spool.is_empty() {
        None
    } else {
        Some(spool_rest(shared, &t, &to_spool).await)
    };
    verdicts
        .into_iter()
        .map(|v| match v {
            Verdict::Answer(reply) => reply,
            Verdict::Spool(_) => spooled.clone().unwrap_or_else(replies::local_error),
        })
        .collect()
}

/// What one reply unit (an SMTP transaction, an LMTP RCPT) comes to.
enum Verdict {
    Answer(Reply),
    /// These recipients were not delivered while others were: spool them, answer 250.
    Spool(Vec<usize>),
}

fn verdict(unit: &[usize], outcomes: &[(Outcome, Reply)]) -> Verdict {
    let given: Vec<&Reply> = unit.iter().map(|&i| &outcomes[i].1).collect();
    let Some(first) = given.first() else {
        return Verdict::Answer(replies::local_error());
    };
    if given.iter().all(|r| r.severity() == first.severity()) {
        if given.len() == 1 || given.iter().all(|r| r == first) {
            return Verdict::Answer((*first).clone());
        }
        return Verdict::Answer(match first.severity() {
            Severity::PositiveCompletion => replies::relayed(given.len()),
            _ => (*first).clone(),
        });
    }
    Verdict::Spool(
        unit.iter()
            .copied()
            .filter(|&i| !matches!(outcomes[i].0, Outcome::Delivered(_)))
            .collect(),
    )
}

/// Every recipient's outcome and the reply it stands for, by envelope index.
async fn deliver(
    shared: &Shared,
    envelope: &OutboundEnvelope,
    t: &Transaction<'_>,
) -> Vec<(Outcome, Reply)> {
    let mut out: Vec<Option<(Outcome, Reply)>> = vec![None; t.targets.len()];
    let mut by_store: Vec<(&str, Vec<Recipient>)> = Vec::new();
    for (index, target) in t.targets.iter().enumerate() {
        match &target.store {
            Ok(store) => {
                let rcpt = Recipient {
                    index,
                    path: target.path.clone(),
                    params: t.recipients[index].params.clone(),
                };
                match by_store.iter_mut().find(|(s, _)| s == store) {
                    Some((_, v)) => v.push(rcpt),
                    None => by_store.push((store, vec![rcpt])),
                }
            }
            Err(reply) => {
                let outcome = if reply.is_transient() {
                    Outcome::Deferred(reply.clone())
                } else {
                    Outcome::Bounced(reply.clone())
                };
                out[index] = Some((outcome, reply.clone()));
            }
        }
    }
    for (store, rcpts) in by_store {
        let Some(agent) = shared.agents.get(store) else {
            // Routes name only stores configured at start-up; never a 5xx for our trouble.
            for r in &rcpts {
                let reply = replies::local_error();
                out[r.index] = Some((Outcome::Deferred(reply.clone()), reply));
            }
            continue;
        };
        // Once the store failed as a whole (unreachable, refused the session, busy), its
        // further batches are not tried: they get the same answer (as `StorePool::deliver`).
        let mut down: Option<&'static str> = None;
        for batch in rcpts.chunks(agent.recipients_per_transaction()) {
            let (report, why) = match down {
                Some(why) => (Report::default(), why),
                None => relay(shared, store, agent, envelope, batch, t).await,
            };
            if down.is_none() && (why == BUSY || report.scope() == Scope::Store) {
                down = Some(why);
            }
            let mut outcomes: HashMap<usize, Outcome> = report.outcomes.into_iter().collect();
            for r in batch {
                // Every recipient handed to an agent gets an outcome; if one did not, it
                // was not sent.
                let outcome = outcomes
                    .remove(&r.index)
                    .unwrap_or(Outcome::NotAttempted(None));
                let reply = reply_for(store, &outcome, why);
                log(shared, t.id, store, agent, &r.path, &outcome, &reply);
                out[r.index] = Some((outcome, reply));
            }
        }
    }
    out.into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                let reply = replies::local_error();
                (Outcome::Deferred(reply.clone()), reply)
            })
        })
        .collect()
}

/// One transaction at `store`, inside its concurrency window (the store's gate, shared with
/// the scheduler and every other proxy session; while it is full, the waiting clients take
/// turns): the one place the window is entered and left. No slot within `proxy_wait`: every
/// recipient of the batch is not attempted, the store "is busy". Returns the report and, for
/// recipients not attempted, why.
async fn relay(
    shared: &Shared,
    store: &str,
    agent: &Agent,
    envelope: &OutboundEnvelope,
    batch: &[Recipient],
    t: &Transaction<'_>,
) -> (Report, &'static str) {
    let permit = match shared.agents.gate(store) {
        Some(gate) => match gate.relay(shared.config.proxy_wait.0, &t.client).await {
            Some(permit) => Some(permit),
            None => {
                let report = crate::delivery::policy::settle_all(
                    batch,
                    &Outcome::NotAttempted(None),
                    &mut |_, _| {},
                );
                return (report, BUSY);
            }
        },
        // Every configured store has a gate; an agent without one runs unthrottled.
        None => None,
    };
    let attempt = agent
        .deliver(envelope, batch, t.body.as_slice(), &mut |_, _| {})
        .await;
    if let Some(permit) = permit {
        permit.finish(&attempt.report);
    }
    let why = not_attempted_why(&attempt.report);
    (attempt.report, why)
}

/// The words of `451 4.3.2` when the store's window stayed full for `proxy_wait`.
const BUSY: &str = "is busy (no room in its concurrency window)";

/// Why recipients were not attempted, in words for the client's `451 4.3.2`.
fn not_attempted_why(report: &Report) -> &'static str {
    match &report.trouble {
        Some(t) if t.detail.starts_with("timeout") => "did not answer in time",
        Some(t) if t.reply.is_some() && t.scope == Scope::Store => "refused the session",
        Some(t) if t.scope == Scope::Store => "is not reachable",
        Some(_) => "lost the connection before the end of data",
        None => "could not take the message",
    }
}

/// The reply for one recipient's outcome at `store`.
fn reply_for(store: &str, outcome: &Outcome, why: &str) -> Reply {
    match outcome {
        Outcome::Delivered(r) => as_class(r, 2),
        Outcome::Deferred(r) => as_class(r, 4),
        Outcome::Bounced(r) => as_class(r, 5),
        Outcome::InDoubt => replies::store_in_doubt(store),
        Outcome::NotAttempted(_) => replies::store_unavailable(store, why),
    }
}

/// `reply` with its code (and enhanced code) in `class`: the store's text, the outcome's
/// class (a normalisation rule may have changed it).
fn as_class(reply: &Reply, class: u8) -> Reply {
    if reply.code().get() / 100 == u16::from(class) {
        return reply.clone();
    }
    let code = match class {
        2 => 250,
        4 => 451,
        _ => 554,
    };
    let code = ReplyCode::new(code).unwrap_or(ReplyCode::LOCAL_ERROR);
    let enhanced = reply
        .enhanced()
        .map(|e| EnhancedCode::new(class, e.subject, e.detail));
    Reply::with_lines(code, enhanced, reply.lines().iter().cloned())
}

/// The SMTP fallback: the recipients in `rest` go to the spool as a message of their own.
/// `250 … queued as ID` once durable (and handed to the scheduler), else the spool's reply.
async fn spool_rest(shared: &Shared, t: &Transaction<'_>, rest: &[usize]) -> Reply {
    let envelope = spool::Envelope {
        sender: t
            .from
            .mailbox()
            .map(ToString::to_string)
            .unwrap_or_default(),
        params: t.params.clone(),
        recipients: rest.iter().map(|&i| t.recipients[i].clone()).collect(),
        received_at: SystemTime::now(),
        client: t.client.clone(),
    };
    let listener = &shared.config.name;
    let stored = async {
        let mut writer = shared.spool.begin(envelope)?;
        writer.write(&t.body)?;
        let qid = writer.queue_id();
        writer.commit().await?;
        Ok::<_, spool::SpoolError>(qid)
    };
    match stored.await {
        Ok(qid) => {
            if let Some(scheduler) = &shared.scheduler {
                scheduler.submit(qid);
            }
            tracing::info!(
                id = %t.id,
                queue_id = %qid,
                listener = %listener,
                nrcpt = rest.len(),
                "recipients the store did not take are queued"
            );
            replies::queued(&qid.to_string())
        }
        Err(e) => {
            tracing::warn!(id = %t.id, listener = %listener, error = %e, "spool fallback failed; transaction refused");
            counter!(m::MESSAGES_REJECTED, "listener" => listener.clone(), "reason" => m::reason::SPOOL)
                .increment(1);
            e.reply()
        }
    }
}

/// One line per recipient relayed (target `postern::cut_through`), and the delivery counters.
fn log(
    shared: &Shared,
    id: QueueId,
    store: &str,
    agent: &Agent,
    to: &ForwardPath,
    outcome: &Outcome,
    reply: &Reply,
) {
    let status = match outcome {
        Outcome::Delivered(_) => word::SENT,
        Outcome::Bounced(_) => word::BOUNCED,
        Outcome::InDoubt => word::IN_DOUBT,
        Outcome::Deferred(_) | Outcome::NotAttempted(_) => word::DEFERRED,
    };
    counter!(m::DELIVERIES, "store" => store.to_owned(), "outcome" => status).increment(1);
    tracing::info!(
        target: "postern::cut_through",
        id = %id,
        listener = %shared.config.name,
        to = %to,
        store = %store,
        relay = %agent.relay(),
        status = status,
        reply = %reply,
        "relayed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, e: (u8, u16, u16), text: &str) -> Reply {
        Reply::new(
            ReplyCode::new(code).unwrap(),
            Some(EnhancedCode::new(e.0, e.1, e.2)),
            text,
        )
    }

    #[test]
    fn the_outcome_decides_the_class_the_store_the_text() {
        let full = reply(552, (5, 2, 2), "Mailbox full");
        // A normalisation rule made it temporary: the upstream must retry, not bounce.
        let r = reply_for("s", &Outcome::Deferred(full.clone()), "");
        assert_eq!(r.to_string(), "451 4.2.2 Mailbox full");
        assert_eq!(reply_for("s", &Outcome::Bounced(full.clone()), ""), full);
        let busy = reply(452, (4, 2, 2), "Over quota");
        assert_eq!(
            reply_for("s", &Outcome::Bounced(busy), "").to_string(),
            "554 5.2.2 Over quota"
        );
        assert_eq!(
            reply_for("s", &Outcome::InDoubt, "").enhanced(),
            Some(EnhancedCode::new(4, 4, 2))
        );
        let r = reply_for("s", &Outcome::NotAttempted(None), "is not reachable");
        assert_eq!(
            r.to_string(),
            "451 4.3.2 Store s is not reachable, try again later"
        );
    }

    #[test]
    fn one_reply_for_alike_outcomes_the_spool_for_mixed_ones() {
        let ok = |t: &str| {
            let r = reply(250, (2, 0, 0), t);
            (Outcome::Delivered(r.clone()), r)
        };
        let later = {
            let r = reply(451, (4, 2, 0), "later");
            (Outcome::Deferred(r.clone()), r)
        };
        let gone = {
            let r = reply(550, (5, 1, 1), "gone");
            (Outcome::Bounced(r.clone()), r)
        };
        let all = [ok("a"), ok("a"), ok("b"), later, gone];
        let answer = |unit: &[usize]| match verdict(unit, &all) {
            Verdict::Answer(r) => Ok(r.to_string()),
            Verdict::Spool(rest) => Err(rest),
        };
        assert_eq!(answer(&[2]), Ok("250 2.0.0 b".into()));
        assert_eq!(answer(&[0, 1]), Ok("250 2.0.0 a".into()));
        assert_eq!(
            answer(&[0, 2]),
            Ok("250 2.0.0 Ok: delivered to 2 recipients".into())
        );
        assert_eq!(answer(&[3]), Ok("451 4.2.0 later".into()));
        assert_eq!(answer(&[0, 3]), Err(vec![3]));
        assert_eq!(answer(&[3, 1, 4]), Err(vec![3, 4]));
        assert_eq!(answer(&[3, 4]), Err(vec![3, 4]), "4yz and 5yz: mixed too");
    }
}
