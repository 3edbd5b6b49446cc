//! The explicit users table: normalised `user@domain` → store or cluster, sized for a
//! million entries.
//!
//! Promises: exact matching (the whole key is compared, never just a hash), and a lookup
//! that touches as little memory as possible, because with a million users every lookup is
//! a cache miss. Keys of up to [`INLINE`] bytes — nearly every real address — live inside
//! the hash table's own slots, so a lookup reads the control bytes and one slot and never
//! chases a pointer to a separate string; longer keys go to a second, ordinary table. The
//! hash is a fixed word-at-a-time multiply-rotate hash (keys come from the configuration,
//! not from clients, so there is no flooding to defend against: a client chooses only what
//! it looks up, not what the table holds).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use super::Target;

/// The longest key kept inline.
pub(crate) const INLINE: usize = 39;

/// A key of up to [`INLINE`] bytes, stored in place.
#[derive(Clone, Copy, PartialEq, Eq)]
struct InlineKey {
    len: u8,
    bytes: [u8; INLINE],
}

impl InlineKey {
    fn new(key: &str) -> Option<Self> {
        let b = key.as_bytes();
        if b.len() > INLINE {
            return None;
        }
        let mut bytes = [0u8; INLINE];
        bytes[..b.len()].copy_from_slice(b);
        Some(Self {
            len: b.len() as u8,
            bytes,
        })
    }

    fn as_str(&self) -> &str {
        // Built from a &str and cut at its length: always valid UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl Hash for InlineKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The padding is zero: hashing the whole array is hashing the key and its length.
        state.write_u8(self.len);
        state.write(&self.bytes);
    }
}

/// Multiply-rotate over 8-byte words, finished by the murmur3 finaliser so hashbrown's
/// control bits (the top 7) are well mixed.
#[derive(Default, Clone, Copy)]
pub(crate) struct WordHasher(u64);

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
        for b in chunks.remainder() {
            self.0 =
                (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(i)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
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

/// The users table.
#[derive(Clone, Debug, Default)]
pub(crate) struct Users {
    inline: HashMap<InlineKey, Target, Fast>,
    long: HashMap<Box<str>, Target, Fast>,
}

impl std::fmt::Debug for InlineKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Users {
    /// An empty table with room for `n` entries.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            inline: HashMap::with_capacity_and_hasher(n, Fast::default()),
            long: HashMap::default(),
        }
    }

    /// Adds or replaces an entry.
    pub(crate) fn insert(&mut self, key: &str, target: Target) {
        match InlineKey::new(key) {
            Some(k) => {
                self.inline.insert(k, target);
            }
            None => {
                self.long.insert(key.into(), target);
            }
        }
    }

    /// The entry for a normalised key.
    pub(crate) fn get(&self, key: &str) -> Option<Target> {
        match InlineKey::new(key) {
            Some(k) => self.inline.get(&k).copied(),
            None => self.long.get(key).copied(),
        }
    }

    /// Entries.
    pub(crate) fn len(&self) -> usize {
        self.inline.len() + self.long.len()
    }

    /// The keys, in no order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &str> {
        self.inline
            .keys()
            .map(InlineKey::as_str)
            .chain(self.long.keys().map(AsRef::as_ref))
    }

    /// Gives back spare capacity after a bulk load.
    pub(crate) fn shrink_to_fit(&mut self) {
        self.inline.shrink_to_fit();
        self.long.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_keys_match_exactly() {
        let mut u = Users::default();
        let long = format!("{}@example.org", "x".repeat(40));
        u.insert("alice@example.org", Target::Store(1));
        u.insert(&long, Target::Cluster(2));
        u.insert("a@example.org", Target::Store(3));
        assert_eq!(u.get("alice@example.org"), Some(Target::Store(1)));
        assert_eq!(u.get(&long), Some(Target::Cluster(2)));
        assert_eq!(u.get("alice@example.or"), None);
        assert_eq!(u.get("a@example.org"), Some(Target::Store(3)));
        assert_eq!(u.get("a@example.org\0"), None, "padding never matches");
        assert_eq!(u.len(), 3);
        let mut keys: Vec<&str> = u.keys().collect();
        keys.sort_unstable();
        assert_eq!(keys[0], "a@example.org");
        assert_eq!(keys[2], long);
    }
}
