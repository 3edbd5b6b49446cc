//! Freshly committed messages, kept in memory until the scheduler takes them.
//!
//! A message is delivered right after it is accepted in the common case; reading its
//! Commit record back from the segment and decoding it again, then reading its body back
//! for the loop check and again for the store, would only repeat what the writer had in
//! hand. [`Fresh`] keeps each committed envelope (exactly as the record decodes: the
//! arrival time at microsecond precision) and, for a message that fitted in one chunk, its
//! body, until [`Fresh::take`] hands them over, once.
//!
//! **Budget.** Envelopes not taken are dropped oldest first while their estimated bytes
//! exceed the budget. A body counts against the same budget for as long as it lives, in
//! here or taken (a [`HeldBody`] gives its bytes back when dropped, at the end of the
//! attempt): it is kept only if everything held stays within the budget, so a store that
//! keeps thousands of attempts waiting holds at most the budget in bodies, and the rest are
//! read from disk. A message finished or deleted before its first attempt is dropped at
//! once. The disk stays the truth: what is not found here is read from the spool (after a
//! restart, after eviction, over the budget, on every later attempt).

use std::collections::{HashMap, VecDeque};
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::id::QueueId;
use super::micros::{from_micros, to_micros};
use super::record::Envelope;

/// The envelopes (and small bodies) of committed messages not yet taken, within a byte
/// budget.
#[derive(Debug)]
pub(super) struct Fresh {
    budget: usize,
    /// Estimated bytes of the envelopes in `map`.
    bytes: usize,
    /// Bytes of the bodies alive, in `map` or taken.
    bodies: Arc<AtomicUsize>,
    map: HashMap<QueueId, Held>,
    /// Insertion order, for eviction; may name envelopes already taken (skipped).
    order: VecDeque<QueueId>,
}

#[derive(Debug)]
struct Held {
    envelope: Envelope,
    cost: usize,
    body: Option<HeldBody>,
}

/// A message body handed over from memory: the bytes the writer stored, exactly as
/// [`Spool::open_body`](super::Spool::open_body) reads them. Counted against the spool's
/// fresh budget until dropped.
pub struct HeldBody {
    bytes: Vec<u8>,
    bodies: Arc<AtomicUsize>,
}

impl std::fmt::Debug for HeldBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeldBody({} octets)", self.bytes.len())
    }
}

impl Deref for HeldBody {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        self.bodies
            .fetch_sub(self.bytes.capacity(), Ordering::Relaxed);
    }
}

impl Fresh {
    /// Holds at most about `budget` bytes of envelopes, and keeps a body only while the
    /// envelopes and the bodies alive fit in it with that body (0: holds none).
    pub(super) fn new(budget: usize) -> Self {
        Self {
            budget,
            bytes: 0,
            bodies: Arc::new(AtomicUsize::new(0)),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Keeps `envelope` of the just-committed `qid`, and its whole `body` if given and
    /// the budget has room for it.
    pub(super) fn insert(&mut self, qid: QueueId, mut envelope: Envelope, body: Option<Vec<u8>>) {
        let cost = cost(&envelope);
        if cost > self.budget {
            return;
        }
        envelope.received_at = from_micros(to_micros(envelope.received_at));
        let body = body.and_then(|bytes| {
            let size = bytes.capacity();
            let alive = self.bodies.load(Ordering::Relaxed);
            (self.bytes + cost + alive + size <= self.budget).then(|| {
                self.bodies.fetch_add(size, Ordering::Relaxed);
                HeldBody {
                    bytes,
                    bodies: Arc::clone(&self.bodies),
                }
            })
        });
        let held = Held {
            envelope,
            cost,
            body,
        };
        if let Some(old) = self.map.insert(qid, held) {
            self.bytes -= old.cost;
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

    /// Hands over the envelope of `qid`, and its body if that was kept, if they are still
    /// held (once).
    pub(super) fn take(&mut self, qid: QueueId) -> Option<(Envelope, Option<HeldBody>)> {
        let held = self.map.remove(&qid)?;
        self.bytes -= held.cost;
        Some((held.envelope, held.body))
    }

    /// Drops what is held of `qid` (the message is gone).
    pub(super) fn remove(&mut self, qid: QueueId) {
        if let Some(held) = self.map.remove(&qid) {
            self.bytes -= held.cost;
        }
    }

    /// Envelopes held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes of bodies alive, held here or taken.
    #[cfg(test)]
    pub(super) fn body_bytes(&self) -> usize {
        self.bodies.load(Ordering::Relaxed)
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
        f.insert(qid(1), envelope(2), None);
        let (got, body) = f.take(qid(1)).unwrap();
        assert!(body.is_none());
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
            f.insert(qid(n), envelope(1), None);
        }
        assert_eq!(f.len(), 3);
        assert!(f.take(qid(0)).is_none() && f.take(qid(1)).is_none());
        assert!(f.take(qid(4)).is_some());
        assert!(f.bytes <= 3 * one);
    }

    #[test]
    fn a_body_is_handed_over_once_and_gives_its_bytes_back_when_dropped() {
        let mut f = Fresh::new(1 << 20);
        f.insert(
            qid(1),
            envelope(1),
            Some(b"Subject: x\r\n\r\nhi\r\n".to_vec()),
        );
        let kept = f.body_bytes();
        assert_eq!(kept, 18, "the body's bytes are counted");
        let (_, body) = f.take(qid(1)).unwrap();
        let body = body.expect("the body is handed over");
        assert_eq!(&body[..], b"Subject: x\r\n\r\nhi\r\n");
        assert_eq!(f.body_bytes(), kept, "a taken body still counts");
        assert!(f.take(qid(1)).is_none());
        drop(body);
        assert_eq!(f.body_bytes(), 0);
        // Removed before it was taken: the body goes with it.
        f.insert(qid(2), envelope(1), Some(vec![b'x'; 100]));
        assert!(f.body_bytes() >= 100);
        f.remove(qid(2));
        assert_eq!(f.body_bytes(), 0);
    }

    #[test]
    fn bodies_alive_anywhere_stay_within_the_budget() {
        let one = cost(&envelope(1));
        let mut f = Fresh::new(2 * one + 1000);
        f.insert(qid(1), envelope(1), Some(Vec::with_capacity(1000)));
        let (_, first) = f.take(qid(1)).unwrap();
        assert!(first.is_some());
        // The taken body still holds its 1000 bytes: the next one has no room, its
        // envelope is kept all the same.
        f.insert(qid(2), envelope(1), Some(Vec::with_capacity(1000)));
        let (_, second) = f.take(qid(2)).unwrap();
        assert!(second.is_none());
        drop(first);
        f.insert(qid(3), envelope(1), Some(Vec::with_capacity(1000)));
        assert!(f.take(qid(3)).unwrap().1.is_some());
        // A body larger than the whole budget is never kept.
        f.insert(qid(4), envelope(1), Some(Vec::with_capacity(1 << 20)));
        assert!(f.take(qid(4)).unwrap().1.is_none());
        assert_eq!(f.body_bytes(), 0);
    }

    #[test]
    fn zero_budget_holds_nothing_and_order_stays_bounded() {
        let mut f = Fresh::new(0);
        f.insert(qid(1), envelope(1), None);
        assert!(f.take(qid(1)).is_none());
        let mut f = Fresh::new(1 << 30);
        for n in 0..10_000 {
            f.insert(qid(n), envelope(1), None);
            assert!(f.take(qid(n)).is_some());
        }
        assert!(f.order.len() <= 1024 + 1, "order holds {}", f.order.len());
        f.insert(qid(1), envelope(1), None);
        f.remove(qid(1));
        assert_eq!((f.len(), f.bytes), (0, 0));
    }
}
