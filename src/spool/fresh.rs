//! Freshly committed envelopes, kept in memory until the scheduler takes them.
//!
//! A message is delivered right after it is accepted in the common case; reading its
//! Commit record back from the segment and decoding it again would only repeat what the
//! writer had in hand. [`Fresh`] keeps each committed envelope (exactly as the record
//! decodes: the arrival time at microsecond precision) until [`Fresh::take`] hands it over,
//! once. What is not taken is dropped oldest first while the estimated bytes held exceed
//! the budget; a message finished or deleted before its first attempt is dropped at once.
//! The disk stays the truth: an envelope not found here is read from its Commit record
//! (after a restart, after eviction, on every later attempt).

use std::collections::{HashMap, VecDeque};

use super::id::QueueId;
use super::micros::{from_micros, to_micros};
use super::record::Envelope;

/// The envelopes of committed messages not yet taken, within a byte budget.
#[derive(Debug)]
pub(super) struct Fresh {
    budget: usize,
    bytes: usize,
    map: HashMap<QueueId, (Envelope, usize)>,
    /// Insertion order, for eviction; may name envelopes already taken (skipped).
    order: VecDeque<QueueId>,
}

impl Fresh {
    /// Holds at most about `budget` bytes of envelopes (0: holds none).
    pub(super) fn new(budget: usize) -> Self {
        Self {
            budget,
            bytes: 0,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Keeps `envelope` of the just-committed `qid`.
    pub(super) fn insert(&mut self, qid: QueueId, mut envelope: Envelope) {
        let cost = cost(&envelope);
        if cost > self.budget {
            return;
        }
        envelope.received_at = from_micros(to_micros(envelope.received_at));
        if let Some((_, old)) = self.map.insert(qid, (envelope, cost)) {
            self.bytes -= old;
        }
        self.bytes += cost;
        self.order.push_back(qid);
        while self.bytes > self.budget {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.remove(oldest);
        }
        // Taken entries leave their ids behind in `order`; compact now and then.
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|q| map.contains_key(q));
        }
    }

    /// Hands over the envelope of `qid` if it is still held (once).
    pub(super) fn take(&mut self, qid: QueueId) -> Option<Envelope> {
        let (envelope, cost) = self.map.remove(&qid)?;
        self.bytes -= cost;
        Some(envelope)
    }

    /// Drops the envelope of `qid` (the message is gone).
    pub(super) fn remove(&mut self, qid: QueueId) {
        if let Some((_, cost)) = self.map.remove(&qid) {
            self.bytes -= cost;
        }
    }

    /// Envelopes held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}

/// The heap an envelope holds, roughly: its strings and a fixed overhead per recipient.
fn cost(envelope: &Envelope) -> usize {
    const FIXED: usize = 256;
    const PER_RECIPIENT: usize = 96;
    FIXED
        + envelope.sender.len()
        + envelope.client.len()
        + envelope
            .recipients
            .iter()
            .map(|r| PER_RECIPIENT + r.address.len())
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::spool::record::EnvelopeRecipient;

    fn envelope(rcpts: usize) -> Envelope {
        Envelope {
            sender: "a@example.org".into(),
            params: Default::default(),
            recipients: (0..rcpts)
                .map(|i| EnvelopeRecipient {
                    address: format!("r{i}@example.org"),
                    params: Default::default(),
                })
                .collect(),
            received_at: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            client: "client [127.0.0.1]".into(),
        }
    }

    fn qid(n: u64) -> QueueId {
        QueueId::new(1_000 + n, 1)
    }

    #[test]
    fn taken_once_at_record_precision() {
        let mut f = Fresh::new(1 << 20);
        f.insert(qid(1), envelope(2));
        let got = f.take(qid(1)).unwrap();
        assert_eq!(got.recipients.len(), 2);
        assert_eq!(
            got.received_at,
            UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456)
        );
        assert!(f.take(qid(1)).is_none());
        assert_eq!(f.bytes, 0);
    }

    #[test]
    fn the_budget_drops_the_oldest() {
        let one = cost(&envelope(1));
        let mut f = Fresh::new(3 * one);
        for n in 0..5 {
            f.insert(qid(n), envelope(1));
        }
        assert_eq!(f.len(), 3);
        assert!(f.take(qid(0)).is_none() && f.take(qid(1)).is_none());
        assert!(f.take(qid(4)).is_some());
        assert!(f.bytes <= 3 * one);
    }

    #[test]
    fn zero_budget_holds_nothing_and_order_stays_bounded() {
        let mut f = Fresh::new(0);
        f.insert(qid(1), envelope(1));
        assert!(f.take(qid(1)).is_none());
        let mut f = Fresh::new(1 << 30);
        for n in 0..10_000 {
            f.insert(qid(n), envelope(1));
            assert!(f.take(qid(n)).is_some());
        }
        assert!(f.order.len() <= 1024 + 1, "order holds {}", f.order.len());
        f.insert(qid(1), envelope(1));
        f.remove(qid(1));
        assert_eq!((f.len(), f.bytes), (0, 0));
    }
}
