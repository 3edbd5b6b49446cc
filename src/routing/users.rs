//! The explicit users table: normalised `user@domain` → store or cluster, sized for a
//! million entries.
//!
//! Promises: exact matching (the whole key is compared, never just a hash), and a lookup
//! that touches as little memory as possible, because with a million users every lookup is
//! a cache miss. Keys of up to [`INLINE`] octets — nearly every real address — live in
//! 64-octet slots of one open-addressing table (linear probing, at most 3/4 full): a lookup
//! usually reads a single cache line, and its neighbours on a collision, never a separate
//! string. Longer keys go to an ordinary hash map. The hash is a fixed word-at-a-time
//! multiply-rotate hash: keys come from the configuration, not from clients, so there is
//! no flooding to defend against (a client chooses only what it looks up, not what the
//! table holds, and probe runs are bounded by the load factor).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::Target;

/// The longest key kept inline.
pub(crate) const INLINE: usize = 59;

/// One slot: a key of up to [`INLINE`] octets, its length (0: empty) and its target.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Slot {
    len: u8,
    key: [u8; INLINE],
    target: u32,
}

const EMPTY: Slot = Slot {
    len: 0,
    key: [0; INLINE],
    target: 0,
};

const CLUSTER_BIT: u32 = 1 << 31;

fn pack(t: Target) -> u32 {
    match t {
        Target::Store(s) => s & !CLUSTER_BIT,
        Target::Cluster(c) => c | CLUSTER_BIT,
    }
}

fn unpack(v: u32) -> Target {
    if v & CLUSTER_BIT == 0 {
        Target::Store(v)
    } else {
        Target::Cluster(v & !CLUSTER_BIT)
    }
}

/// Multiply-rotate over 8-byte words, finished by the murmur3 finaliser so every bit of
/// the result depends on every input bit.
#[derive(Default, Clone, Copy)]
pub(crate) struct WordHasher(u64);

const K: u64 = 0x517c_c1b7_2722_0a95;

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(K);
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(i)).wrapping_mul(K);
    }

    fn finish(&self) -> u64 {
        let mut k = self.0;
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k
    }
}

/// Tables keyed by configuration text (users, domains) use this hasher.
pub(crate) type Fast = BuildHasherDefault<WordHasher>;

fn hash(key: &[u8]) -> u64 {
    let mut h = WordHasher::default();
    h.write(key);
    h.finish()
}

/// The users table.
#[derive(Clone, Default)]
pub(crate) struct Users {
    slots: Vec<Slot>,
    inline: usize,
    long: HashMap<Box<str>, Target, Fast>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Users({} entries)", self.len())
    }
}

/// Slots for `n` entries at most 3/4 full.
fn slots_for(n: usize) -> usize {
    (n.saturating_mul(4) / 3).max(16) + 1
}

impl Users {
    /// An empty table with room for `n` entries.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            slots: vec![EMPTY; slots_for(n)],
            inline: 0,
            long: HashMap::default(),
        }
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn find(&self, key: &[u8]) -> usize {
        let n = self.slots.len();
        // Lemire's reduction: the high bits of hash × n, no division.
        let mut i = ((u128::from(hash(key)) * n as u128) >> 64) as usize;
        loop {
            let s = &self.slots[i];
            if s.len == 0 || (usize::from(s.len) == key.len() && &s.key[..key.len()] == key) {
                return i;
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
    }

    fn grow(&mut self) {
        let old = std::mem::take(&mut self.slots);
        self.slots = vec![EMPTY; slots_for(self.inline * 2)];
        for s in old.iter().filter(|s| s.len != 0) {
            let i = self.find(&s.key[..usize::from(s.len)]);
            self.slots[i] = *s;
        }
    }

    /// Adds or replaces an entry.
    pub(crate) fn insert(&mut self, key: &str, target: Target) {
        let b = key.as_bytes();
        if b.is_empty() || b.len() > INLINE {
            self.long.insert(key.into(), target);
            return;
        }
        if (self.inline + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let i = self.find(b);
        let s = &mut self.slots[i];
        if s.len == 0 {
            s.len = b.len() as u8;
            s.key[..b.len()].copy_from_slice(b);
            self.inline += 1;
        }
        s.target = pack(target);
    }

    /// The entry for a normalised key.
    pub(crate) fn get(&self, key: &str) -> Option<Target> {
        let b = key.as_bytes();
        if b.is_empty() || b.len() > INLINE {
            return self.long.get(key).copied();
        }
        if self.slots.is_empty() {
            return None;
        }
        let s = &self.slots[self.find(b)];
        (s.len != 0).then(|| unpack(s.target))
    }

    /// Entries.
    pub(crate) fn len(&self) -> usize {
        self.inline + self.long.len()
    }

    /// The keys, in no order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &str> {
        self.slots
            .iter()
            .filter(|s| s.len != 0)
            // Copied from a &str and cut at its length: always valid UTF-8.
            .map(|s| std::str::from_utf8(&s.key[..usize::from(s.len)]).unwrap_or_default())
            .chain(self.long.keys().map(AsRef::as_ref))
    }

    /// Gives back spare room after a bulk load (the estimate was generous).
    pub(crate) fn shrink_to_fit(&mut self) {
        // Only when it saves a quarter: a rebuild holds both tables for a moment.
        if slots_for(self.inline) * 4 < self.slots.len() * 3 {
            let old = std::mem::take(&mut self.slots);
            self.slots = vec![EMPTY; slots_for(self.inline)];
            for s in old.iter().filter(|s| s.len != 0) {
                let i = self.find(&s.key[..usize::from(s.len)]);
                self.slots[i] = *s;
            }
        }
        self.long.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_one_cache_line() {
        assert_eq!(std::mem::size_of::<Slot>(), 64);
    }

    #[test]
    fn short_and_long_keys_match_exactly() {
        let mut u = Users::default();
        let long = format!("{}@example.org", "x".repeat(60));
        u.insert("alice@example.org", Target::Store(1));
        u.insert(&long, Target::Cluster(2));
        u.insert("a@example.org", Target::Store(3));
        u.insert("a@example.org", Target::Cluster(4));
        assert_eq!(u.get("alice@example.org"), Some(Target::Store(1)));
        assert_eq!(u.get(&long), Some(Target::Cluster(2)));
        assert_eq!(u.get("alice@example.or"), None);
        assert_eq!(u.get("a@example.org"), Some(Target::Cluster(4)), "replaced");
        assert_eq!(u.get("a@example.org\0"), None, "padding never matches");
        assert_eq!(u.get(""), None);
        assert_eq!(u.len(), 3);
        let mut keys: Vec<&str> = u.keys().collect();
        keys.sort_unstable();
        assert_eq!(keys[0], "a@example.org");
        assert_eq!(keys[2], long);
    }

    #[test]
    fn grows_and_shrinks_without_losing_entries() {
        let mut u = Users::with_capacity(100_000);
        for i in 0..20_000u32 {
            u.insert(&format!("user{i}@example.org"), Target::Store(i));
        }
        u.shrink_to_fit();
        for i in 20_000..50_000u32 {
            u.insert(&format!("user{i}@example.org"), Target::Cluster(i));
        }
        assert_eq!(u.len(), 50_000);
        for i in 0..50_000u32 {
            let want = if i < 20_000 {
                Target::Store(i)
            } else {
                Target::Cluster(i)
            };
            assert_eq!(u.get(&format!("user{i}@example.org")), Some(want));
        }
        assert_eq!(u.get("user50000@example.org"), None);
        assert!(
            u.inline * 4 <= u.slots.len() * 3,
            "never more than 3/4 full"
        );
    }
}
