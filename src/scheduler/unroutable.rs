//! Queued recipients that lost their route: deferred, not bounced, for a grace period.
//!
//! A recipient is accepted only if the routing map routes it, so a queued recipient the map
//! no longer routes (unknown user, domain gone) lost its route in a reload: most often a
//! mistake in the new map. [`Unroutable::decide`] defers it `451 4.3.0` with a text naming
//! the cause, until `routes.unroutable_grace` has passed since this shard first saw it
//! unroutable; then it bounces as before. A message from `<>` (a DSN) is not held back: it
//! bounces at once, and its bounce goes to the double-bounce address.
//!
//! Promises: the first-seen times are kept in memory, per shard (the message's home shard
//! attempts it, always the same one), and forgotten when the recipient routes again or is
//! decided. A restart starts the grace again: never an earlier bounce, only a later one.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use postern_proto::Reply;

use super::local_reply;
use crate::delivery::Outcome;
use crate::spool::QueueId;

/// First-seen times of unroutable queued recipients.
#[derive(Debug, Default)]
pub(crate) struct Unroutable {
    first: HashMap<(QueueId, usize), SystemTime>,
}

impl Unroutable {
    /// The recipient routes (again): forget it.
    pub(crate) fn routed(&mut self, qid: QueueId, index: usize) {
        if !self.first.is_empty() {
            self.first.remove(&(qid, index));
        }
    }

    /// The outcome for a queued recipient the map refuses with `bounce`: deferred with
    /// `4.3.0 no route` during the grace, then `bounce`.
    pub(crate) fn decide(
        &mut self,
        qid: QueueId,
        index: usize,
        null_sender: bool,
        bounce: Reply,
        grace: Duration,
        now: SystemTime,
    ) -> Outcome {
        if null_sender {
            self.first.remove(&(qid, index));
            return Outcome::Bounced(bounce);
        }
        let first = *self.first.entry((qid, index)).or_insert(now);
        let lost_for = now.duration_since(first).unwrap_or_default();
        if lost_for >= grace {
            self.first.remove(&(qid, index));
            tracing::warn!(queue_id = %qid, rcpt = index, grace = %crate::config::units::Span(grace), "recipient without a route for longer than routes.unroutable_grace; bouncing");
            return Outcome::Bounced(bounce);
        }
        let text = format!(
            "No route: the routing map no longer routes this recipient ({}); deferred for up to routes.unroutable_grace ({}), then bounced",
            bounce.text().lines().next().unwrap_or("refused"),
            crate::config::units::Span(grace)
        );
        Outcome::Deferred(local_reply(451, (4, 3, 0), &text))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

    use super::*;

    #[test]
    fn deferred_during_the_grace_then_bounced() {
        let mut u = Unroutable::default();
        let qid: QueueId = "1K17EVFVJ3M0000".parse().unwrap();
        let bounce = local_reply(550, (5, 1, 1), "Recipient address rejected: unknown user");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let grace = Duration::from_secs(60);
        let o = u.decide(qid, 0, false, bounce.clone(), grace, t0);
        let Outcome::Deferred(r) = &o else {
            panic!("{o:?}")
        };
        assert_eq!(r.enhanced().unwrap().to_string(), "4.3.0");
        assert!(
            r.text().contains("No route") && r.text().contains("unknown user"),
            "{r}"
        );
        let o = u.decide(
            qid,
            0,
            false,
            bounce.clone(),
            grace,
            t0 + Duration::from_secs(59),
        );
        assert!(matches!(o, Outcome::Deferred(_)));
        let o = u.decide(
            qid,
            0,
            false,
            bounce.clone(),
            grace,
            t0 + Duration::from_secs(60),
        );
        assert_eq!(o, Outcome::Bounced(bounce.clone()));
        // Routed again in between: the grace starts over.
        u.decide(qid, 1, false, bounce.clone(), grace, t0);
        u.routed(qid, 1);
        let o = u.decide(
            qid,
            1,
            false,
            bounce.clone(),
            grace,
            t0 + Duration::from_secs(100),
        );
        assert!(matches!(o, Outcome::Deferred(_)));
        // A DSN is not held back.
        assert_eq!(
            u.decide(qid, 2, true, bounce.clone(), grace, t0),
            Outcome::Bounced(bounce)
        );
    }
}
