//! The scheduler's metrics. Names, help texts and label sets live in [`crate::metrics`];
//! this module re-exports the scheduler's names and keeps the queue-shape bookkeeping.

pub use crate::metrics::{
    BREAKER, BREAKER_TRIPS, CONNECTIONS, DEFERRALS, DELIVERIES, DELIVERY_LATENCY, DSNS, IN_DOUBT,
    IN_DOUBT_RECOVERED, IN_DOUBT_RETRIES, LATENCY_BASELINE, OLDEST_AGE, PHASE_LATENCY,
    QUEUE_MESSAGES, QUEUE_SHAPE, STORE_PARKED, STORE_RECIPIENTS, WINDOW, outcome,
};

use std::collections::HashMap;
use std::time::SystemTime;

use metrics::gauge;

use crate::shape;
use crate::spool::{QueueId, Spool, SpoolError};

/// The queue shape of one store: the messages routed to it (since start) that still have an
/// open recipient for it, with their arrival times. Published as [`QUEUE_SHAPE`].
#[derive(Debug, Default)]
pub(crate) struct ShapeTracker {
    messages: HashMap<QueueId, (SystemTime, Vec<usize>)>,
    /// Recipients in `messages` (the store's open recipients, for backpressure).
    open: usize,
}

impl ShapeTracker {
    /// A message's recipients (envelope indexes) were queued for this store.
    pub(crate) fn track(
        &mut self,
        qid: QueueId,
        arrival: SystemTime,
        indexes: impl IntoIterator<Item = usize>,
    ) {
        let (_, known) = self
            .messages
            .entry(qid)
            .or_insert_with(|| (arrival, Vec::new()));
        for i in indexes {
            if !known.contains(&i) {
                known.push(i);
                self.open += 1;
            }
        }
    }

    /// A recipient became final (delivered or bounced): it is no longer open.
    pub(crate) fn settled(&mut self, qid: QueueId, index: usize) {
        let Some((_, known)) = self.messages.get_mut(&qid) else {
            return;
        };
        let before = known.len();
        known.retain(|&i| i != index);
        self.open -= before - known.len();
        if known.is_empty() {
            self.messages.remove(&qid);
        }
    }

    /// Open recipients, and the arrival of the oldest of their messages.
    pub(crate) fn load(&self) -> (usize, Option<SystemTime>) {
        let oldest = self.messages.values().map(|(t, _)| *t).min();
        (self.open, oldest)
    }

    /// Forgets messages that are gone or whose recipients for this store are all final, then
    /// sets every age bucket of `store` (zeros included). One index look-up per message.
    pub(crate) fn publish(&mut self, store: &str, now: SystemTime, spool: &Spool) {
        self.messages
            .retain(|qid, (_, indexes)| match spool.status(*qid) {
                Ok(s) => {
                    // Final recipients leave (missed settlements: expiry, operator actions).
                    indexes.retain(|&i| s.recipients.get(i).is_some_and(|r| !r.is_final()));
                    !indexes.is_empty()
                }
                Err(SpoolError::NotFound(_)) => false,
                Err(_) => true,
            });
        self.open = self.messages.values().map(|(_, v)| v.len()).sum();
        let counts = shape::histogram(
            self.messages
                .values()
                .map(|(arrival, _)| now.duration_since(*arrival).unwrap_or_default()),
        );
        for (label, n) in shape::LABELS.iter().zip(counts) {
            gauge!(QUEUE_SHAPE, "store" => store.to_owned(), "bucket" => *label).set(n as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::spool::{Envelope, EnvelopeRecipient, RecipientState, SpoolOptions};

    #[test]
    fn a_message_leaves_the_shape_when_its_recipients_for_the_store_are_final() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions {
            min_free_bytes: 0,
            ..SpoolOptions::default()
        };
        let (spool, _) = Spool::open(dir.path(), opts).unwrap();
        let arrived = UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let envelope = Envelope {
            sender: "s@example.org".into(),
            params: postern_proto::MailParams::default(),
            recipients: (0..2)
                .map(|i| EnvelopeRecipient {
                    address: format!("r{i}@example.net"),
                    params: postern_proto::RcptParams::default(),
                })
                .collect(),
            received_at: arrived,
            client: "client.example [192.0.2.9]".into(),
        };
        let mut w = spool.begin(envelope).unwrap();
        w.write(b"Subject: x\r\n\r\nbody\r\n").unwrap();
        let qid = w.queue_id();
        w.commit().wait().unwrap();

        let mut shape = ShapeTracker::default();
        shape.track(qid, arrived, [0]);
        shape.track(qid, arrived, [0]);
        let now = arrived + Duration::from_secs(7 * 60);
        shape.publish("a", now, &spool);
        assert_eq!(shape.messages.len(), 1, "recipient 0 is still open");

        let bounced = RecipientState::Bounced {
            reply: "550 5.1.1 no".into(),
        };
        spool.ledger(qid, 0, bounced).wait().unwrap();
        shape.publish("a", now, &spool);
        assert_eq!(
            shape.messages.len(),
            0,
            "recipient 1 is open but not this store's"
        );
    }
}
