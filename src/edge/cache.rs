//! The recipient verification cache: answers by `(store, address)`, bounded, expiring, with
//! single flight.
//!
//! Owns: one map for every store (`verify_cache.max_entries` in all), the oldest entries
//! evicted first (insertion order), each entry expiring after the TTL it was stored with
//! (`positive` for a known recipient, `negative` for an unknown one; a store that could not
//! answer is not cached at all). Lost on restart: it is a cache.
//!
//! Promises: while a query for a key runs, every other lookup of that key waits for it
//! ([`Lookup::Wait`]) instead of asking the store again, so a burst of RCPTs for one
//! address costs one store query. The query's owner ([`Flight`]) always ends the wait:
//! [`Flight::finish`] hands every waiter the answer, and a flight dropped unfinished wakes
//! them with no answer (they treat it as a temporary failure). One short mutex, never held
//! across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postern_proto::Reply;
use tokio::sync::watch;

/// What the store said about a recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A 2yz to RCPT: the store knows the recipient.
    Valid,
    /// A 5yz to RCPT: the store's reply.
    Invalid(Reply),
    /// No answer: a 4yz, a timeout, no window slot, the store down. Why, for the log.
    Unavailable(String),
}

/// The answer channel of a query in flight: `None` until it is done.
pub type Pending = watch::Receiver<Option<Verdict>>;

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A fresh answer.
    Hit(Verdict),
    /// Another lookup is asking the store: wait on this.
    Wait(Pending),
    /// Nobody is asking: ask, then [`Flight::finish`]. Others wait on the flight meanwhile.
    Lead(Flight, Pending),
}

struct Ready {
    verdict: Verdict,
    expires: Instant,
    seq: u64,
}

enum Slot {
    Ready(Ready),
    Pending(u64, watch::Sender<Option<Verdict>>),
}

struct Inner {
    map: HashMap<Arc<str>, Slot>,
    /// Ready entries in insertion order (with their sequence number: an entry replaced
    /// since has another one, and its old place is skipped).
    order: VecDeque<(Arc<str>, u64)>,
    seq: u64,
}

/// The cache. Cheap to clone (shared).
#[derive(Clone)]
pub struct VerifyCache {
    inner: Arc<Mutex<Inner>>,
    max_entries: usize,
}

impl std::fmt::Debug for VerifyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyCache")
            .field("entries", &self.len())
            .field("max_entries", &self.max_entries)
            .finish()
    }
}

impl VerifyCache {
    /// An empty cache holding at most `max_entries` answers (0: nothing is kept).
    pub fn new(max_entries: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
                seq: 0,
            })),
            max_entries,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers and queries in flight held now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks `key` up at `now`: a fresh answer, a query to wait for, or the lead of a new
    /// query.
    pub fn lookup(&self, key: &str, now: Instant) -> Lookup {
        let mut inner = self.lock();
        match inner.map.get(key) {
            Some(Slot::Ready(r)) if r.expires > now => return Lookup::Hit(r.verdict.clone()),
            Some(Slot::Pending(_, tx)) => return Lookup::Wait(tx.subscribe()),
            _ => {}
        }
        inner.seq += 1;
        let seq = inner.seq;
        let (tx, rx) = watch::channel(None);
        let key: Arc<str> = Arc::from(key);
        inner.map.insert(Arc::clone(&key), Slot::Pending(seq, tx));
        let flight = Flight {
            cache: self.clone(),
            key,
            seq,
            done: false,
        };
        Lookup::Lead(flight, rx)
    }

    fn complete(&self, key: &Arc<str>, seq: u64, verdict: Option<Verdict>, ttl: Option<Duration>) {
        let mut inner = self.lock();
        let Some(Slot::Pending(s, _)) = inner.map.get(key) else {
            return;
        };
        if *s != seq {
            return;
        }
        let slot = match (&verdict, ttl) {
            (Some(v), Some(ttl)) if self.max_entries > 0 => {
                inner.seq += 1;
                let seq = inner.seq;
                inner.order.push_back((Arc::clone(key), seq));
                Some(Slot::Ready(Ready {
                    verdict: v.clone(),
                    expires: Instant::now() + ttl,
                    seq,
                }))
            }
            _ => None,
        };
        let old = match slot {
            Some(slot) => inner.map.insert(Arc::clone(key), slot),
            None => inner.map.remove(key),
        };
        if let Some(Slot::Pending(_, tx)) = old {
            tx.send_replace(verdict);
        }
        inner.evict(self.max_entries);
    }
}

impl Inner {
    /// Drops the oldest answers beyond `max`; compacts the order queue when it is mostly
    /// stale (entries replaced or expired and removed).
    fn evict(&mut self, max: usize) {
        while self.map.len() > max {
            let Some((key, seq)) = self.order.pop_front() else {
                break;
            };
            if matches!(self.map.get(&key), Some(Slot::Ready(r)) if r.seq == seq) {
                self.map.remove(&key);
            }
        }
        if self.order.len() > 2 * self.map.len().max(1024) {
            let map = &self.map;
            self.order
                .retain(|(k, s)| matches!(map.get(k), Some(Slot::Ready(r)) if r.seq == *s));
        }
    }
}

/// The one query in flight for a key. Finish it with the answer; dropped unfinished, the
/// waiters get no answer and the key is free again.
pub struct Flight {
    cache: VerifyCache,
    key: Arc<str>,
    seq: u64,
    done: bool,
}

impl std::fmt::Debug for Flight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight").field("seq", &self.seq).finish()
    }
}

impl Flight {
    /// Hands `verdict` to every waiter, and keeps it for `ttl` (none: not kept).
    pub fn finish(mut self, verdict: Verdict, ttl: Option<Duration>) {
        self.done = true;
        self.cache.complete(&self.key, self.seq, Some(verdict), ttl);
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if !self.done {
            self.cache.complete(&self.key, self.seq, None, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lead(cache: &VerifyCache, key: &str) -> (Flight, Pending) {
        match cache.lookup(key, Instant::now()) {
            Lookup::Lead(f, rx) => (f, rx),
            other => panic!("expected to lead, got {other:?}"),
        }
    }

    #[test]
    fn a_second_lookup_waits_for_the_first_and_then_hits() {
        let cache = VerifyCache::new(10);
        let (flight, _) = lead(&cache, "s\0a@x");
        let Lookup::Wait(mut rx) = cache.lookup("s\0a@x", Instant::now()) else {
            panic!("a query is in flight: wait");
        };
        assert!(rx.borrow().is_none());
        flight.finish(Verdict::Valid, Some(Duration::from_secs(60)));
        assert_eq!(*rx.borrow_and_update(), Some(Verdict::Valid));
        assert!(matches!(
            cache.lookup("s\0a@x", Instant::now()),
            Lookup::Hit(Verdict::Valid)
        ));
    }

    #[test]
    fn answers_expire_and_temporary_ones_are_not_kept() {
        let cache = VerifyCache::new(10);
        let (flight, _) = lead(&cache, "k");
        flight.finish(Verdict::Valid, Some(Duration::from_secs(60)));
        let later = Instant::now() + Duration::from_secs(61);
        assert!(matches!(cache.lookup("k", later), Lookup::Lead(..)));

        let (flight, _) = lead(&cache, "t");
        flight.finish(Verdict::Unavailable("down".into()), None);
        assert!(matches!(
            cache.lookup("t", Instant::now()),
            Lookup::Lead(..)
        ));
    }

    #[test]
    fn a_dropped_flight_wakes_its_waiters_and_frees_the_key() {
        let cache = VerifyCache::new(10);
        let (flight, _) = lead(&cache, "k");
        let Lookup::Wait(mut rx) = cache.lookup("k", Instant::now()) else {
            panic!("wait");
        };
        drop(flight);
        assert!(rx.borrow_and_update().is_none());
        assert!(
            rx.has_changed().is_err(),
            "the sender is gone: waiters wake"
        );
        assert!(matches!(
            cache.lookup("k", Instant::now()),
            Lookup::Lead(..)
        ));
    }

    #[test]
    fn the_oldest_entries_go_first_beyond_max_entries() {
        let cache = VerifyCache::new(3);
        for key in ["a", "b", "c", "d"] {
            let (flight, _) = lead(&cache, key);
            flight.finish(Verdict::Valid, Some(Duration::from_secs(60)));
        }
        assert_eq!(cache.len(), 3);
        assert!(matches!(
            cache.lookup("a", Instant::now()),
            Lookup::Lead(..)
        ));
        for key in ["c", "d"] {
            assert!(
                matches!(cache.lookup(key, Instant::now()), Lookup::Hit(_)),
                "{key}"
            );
        }
    }

    #[test]
    fn replaced_entries_do_not_grow_the_order_queue_without_bound() {
        let cache = VerifyCache::new(10);
        for _ in 0..5000 {
            let (flight, _) = match cache.lookup("same", Instant::now() + Duration::from_secs(120))
            {
                Lookup::Lead(f, rx) => (f, rx),
                other => panic!("{other:?}"),
            };
            flight.finish(Verdict::Valid, Some(Duration::from_secs(60)));
        }
        assert!(cache.lock().order.len() <= 2 * 1024 + 1);
    }
}
