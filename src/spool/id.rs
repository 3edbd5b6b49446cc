//! Queue ids: unique across gateways, sortable by arrival, short enough for every log line.
//!
//! A [`QueueId`] is the arrival time in microseconds since the Unix epoch plus the gateway's
//! `node_id`. The allocator hands out strictly increasing microsecond values (a second id in
//! the same microsecond takes the next one), so ids from one gateway never collide and sort
//! by arrival; the `node_id` keeps two gateways apart. After a restart the allocator starts
//! above the largest id found in the spool, so a clock that stepped back cannot reuse the id
//! of a message still queued.
//!
//! Text form: 15 characters of Crockford base32 (no I, L, O, U), the time first so that a
//! plain `sort` of log lines or queue listings is arrival order: 11 characters of time
//! (55 bits, enough until the year 3111) and 4 of node (20 bits; node ids are 16 bits).
//! On disk: 10 bytes, the microseconds (u64 LE) then the node (u16 LE).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::micros::{from_micros, to_micros};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Length of the text form.
pub const QUEUE_ID_LEN: usize = 15;
/// Length of the binary form in records.
pub const QUEUE_ID_BYTES: usize = 10;

/// A message's id in the spool, in `Received:` headers and in every log line about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId {
    micros: u64,
    node: u16,
}

impl QueueId {
    /// An id from its parts (tests and decoding).
    pub const fn new(micros: u64, node: u16) -> Self {
        Self { micros, node }
    }

    /// Arrival time, microseconds since the Unix epoch.
    pub const fn micros(self) -> u64 {
        self.micros
    }

    /// The gateway that accepted the message.
    pub const fn node(self) -> u16 {
        self.node
    }

    /// Arrival time.
    pub fn arrival(self) -> SystemTime {
        from_micros(self.micros)
    }

    /// The binary form (10 bytes).
    pub fn to_bytes(self) -> [u8; QUEUE_ID_BYTES] {
        let mut out = [0; QUEUE_ID_BYTES];
        out[..8].copy_from_slice(&self.micros.to_le_bytes());
        out[8..].copy_from_slice(&self.node.to_le_bytes());
        out
    }

    /// Reads the binary form.
    pub fn from_bytes(b: &[u8; QUEUE_ID_BYTES]) -> Self {
        let mut m = [0; 8];
        m.copy_from_slice(&b[..8]);
        Self {
            micros: u64::from_le_bytes(m),
            node: u16::from_le_bytes([b[8], b[9]]),
        }
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; QUEUE_ID_LEN];
        for (i, slot) in buf[..11].iter_mut().enumerate() {
            let shift = 5 * (10 - i);
            *slot = ALPHABET[((self.micros >> shift) & 31) as usize];
        }
        for (i, slot) in buf[11..].iter_mut().enumerate() {
            let shift = 5 * (3 - i);
            *slot = ALPHABET[((u32::from(self.node) >> shift) & 31) as usize];
        }
        // The alphabet is ASCII.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

/// Why a text queue id did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a queue id: `{0}`")]
pub struct BadQueueId(pub String);

impl FromStr for QueueId {
    type Err = BadQueueId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadQueueId(s.to_owned());
        if s.len() != QUEUE_ID_LEN {
            return Err(bad());
        }
        let mut micros: u64 = 0;
        let mut node: u32 = 0;
        for (i, c) in s.bytes().enumerate() {
            let v = ALPHABET
                .iter()
                .position(|&a| a == c.to_ascii_uppercase())
                .ok_or_else(bad)? as u64;
            if i < 11 {
                micros = (micros << 5) | v;
            } else {
                node = (node << 5) | v as u32;
            }
        }
        if micros >> 55 != 0 {
            return Err(bad());
        }
        let node = u16::try_from(node).map_err(|_| bad())?;
        Ok(Self { micros, node })
    }
}

/// Hands out strictly increasing queue ids for one gateway.
#[derive(Debug)]
pub(crate) struct IdAllocator {
    node: u16,
    last: AtomicU64,
}

impl IdAllocator {
    /// An allocator whose ids are all above `floor` (the largest id found at recovery).
    pub(crate) fn new(node: u16, floor: u64) -> Self {
        Self {
            node,
            last: AtomicU64::new(floor),
        }
    }

    /// The next id: now, or one microsecond past the previous id if the clock has not moved.
    pub(crate) fn next(&self) -> QueueId {
        let now = to_micros(SystemTime::now());
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let candidate = now.max(prev + 1);
            match self.last.compare_exchange_weak(
                prev,
                candidate,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return QueueId::new(candidate, self.node),
                Err(actual) => prev = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_length() {
        let id = QueueId::new(1_764_215_000_123_456, 0xBEEF);
        let s = id.to_string();
        assert_eq!(s.len(), QUEUE_ID_LEN);
        assert_eq!(s.parse::<QueueId>().unwrap(), id);
        assert_eq!(s.to_ascii_lowercase().parse::<QueueId>().unwrap(), id);
        assert!("0000000000000I0".parse::<QueueId>().is_err());
        assert!("short".parse::<QueueId>().is_err());
    }

    #[test]
    fn text_sorts_like_arrival() {
        let a = QueueId::new(1_000_000, 9);
        let b = QueueId::new(1_000_001, 1);
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
    }

    #[test]
    fn binary_round_trip() {
        let id = QueueId::new(u64::MAX >> 9, u16::MAX);
        assert_eq!(QueueId::from_bytes(&id.to_bytes()), id);
    }

    #[test]
    fn allocator_is_strictly_increasing_and_above_floor() {
        let far_future = 1u64 << 53;
        let alloc = IdAllocator::new(7, far_future);
        let a = alloc.next();
        let b = alloc.next();
        assert_eq!(a.micros(), far_future + 1);
        assert_eq!(b.micros(), far_future + 2);
        assert_eq!(a.node(), 7);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let alloc = &alloc;
                std::thread::scope(|_| (0..1000).map(|_| alloc.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<_> = threads.into_iter().flatten().collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
