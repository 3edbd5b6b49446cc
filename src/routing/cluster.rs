//! Clusters: a named set of stores over which mailboxes are spread by rendezvous
//! (highest-random-weight) hashing.
//!
//! Promises: the store chosen for a mailbox depends only on the mailbox and the member
//! names (a fixed, seedless 64-bit hash: FNV-1a then the murmur3 finaliser — never std's
//! randomly keyed hasher), so every process and every reload agrees. Adding a store moves
//! only the mailboxes that now score highest on it (about 1/(N+1) of them); removing a
//! store moves only the mailboxes it held.

/// 64-bit FNV-1a over `bytes`, from `seed`.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The murmur3 64-bit finaliser: spreads every input bit over the whole word.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The hash of a normalised mailbox, computed once per lookup.
pub(crate) fn mailbox_hash(mailbox: &str) -> u64 {
    fmix64(fnv1a(FNV_OFFSET, mailbox.as_bytes()))
}

/// A store's weight seed, computed once at load.
pub(crate) fn store_seed(store: &str) -> u64 {
    // A different offset from the mailbox hash, so a store named like a mailbox is no
    // special case.
    fmix64(fnv1a(FNV_OFFSET ^ 0x9e37_79b9_7f4a_7c15, store.as_bytes()))
}

/// One store's score for one mailbox; the highest wins.
fn score(mailbox: u64, seed: u64) -> u64 {
    fmix64(mailbox ^ seed)
}

/// A compiled cluster: members as `(store id, seed)`, with their names for ties.
#[derive(Clone, Debug)]
pub(crate) struct Cluster {
    /// `(store id, seed)` in configuration order.
    pub(crate) members: Vec<(u32, u64)>,
}

impl Cluster {
    /// The member that holds `mailbox` (normalised), or `None` for an empty cluster
    /// (configuration validation refuses those).
    pub(crate) fn pick(&self, mailbox: &str) -> Option<u32> {
        let h = mailbox_hash(mailbox);
        // Ties (astronomically rare) go to the larger seed, then the larger id: still a
        // pure function of the member set, whatever the configuration order.
        self.members
            .iter()
            .max_by_key(|(id, seed)| (score(h, *seed), *seed, *id))
            .map(|(id, _)| *id)
    }
}

/// Rendezvous choice over plain names (for tests and the benchmark).
pub fn choose<'a>(stores: &[&'a str], mailbox: &str) -> Option<&'a str> {
    let h = mailbox_hash(mailbox);
    stores
        .iter()
        .max_by_key(|s| (score(h, store_seed(s)), store_seed(s)))
        .copied()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cyrus{i}")).collect()
    }

    #[test]
    fn fixed_hash_values_never_change() {
        // These figures are what every postern computes, in any process, forever: a change
        // here would move mailboxes on upgrade.
        assert_eq!(fnv1a(FNV_OFFSET, b""), FNV_OFFSET);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(mailbox_hash("alice@example.org"), 0x2562_c6bf_020a_f5e0);
        assert_eq!(store_seed("cyrus0"), 0x0d31_4ef9_02b4_974e);
        // Computed independently (a few lines of Python over the same definitions).
        let stores = ["cyrus0", "cyrus1", "cyrus2"];
        let cluster = Cluster {
            members: stores
                .iter()
                .enumerate()
                .map(|(i, s)| (i as u32, store_seed(s)))
                .collect(),
        };
        for (m, want) in [
            ("alice@example.org", "cyrus1"),
            ("bob@example.org", "cyrus2"),
            ("carol@example.org", "cyrus1"),
            ("dave@example.org", "cyrus1"),
        ] {
            assert_eq!(choose(&stores, m), Some(want), "{m}");
            assert_eq!(stores[cluster.pick(m).unwrap() as usize], want, "{m}");
        }
    }

    #[test]
    fn spreads_evenly() {
        let stores = names(10);
        let refs: Vec<&str> = stores.iter().map(String::as_str).collect();
        let mut counts = std::collections::HashMap::new();
        for i in 0..20_000 {
            *counts
                .entry(choose(&refs, &format!("user{i}@example.org")).unwrap())
                .or_insert(0usize) += 1;
        }
        assert_eq!(counts.len(), 10);
        for (s, n) in counts {
            assert!((1_600..=2_400).contains(&n), "{s}: {n} of 20000");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The same input always gives the same store, whatever the member order.
        #[test]
        fn stable_and_order_free(n in 1usize..40, user in "[a-z0-9.]{1,20}", rot in 0usize..40) {
            let stores = names(n);
            let mut refs: Vec<&str> = stores.iter().map(String::as_str).collect();
            let mailbox = format!("{user}@example.org");
            let first = choose(&refs, &mailbox);
            prop_assert_eq!(first, choose(&refs, &mailbox));
            refs.rotate_left(rot % n);
            prop_assert_eq!(first, choose(&refs, &mailbox));
        }

        /// Adding a store to N moves about 1/(N+1) of the mailboxes, all of them to the new
        /// store; removing it again moves exactly those back.
        #[test]
        fn adding_a_store_moves_about_one_in_n_plus_one(n in 2usize..30, salt in 0u32..1000) {
            let stores = names(n + 1);
            let before: Vec<&str> = stores[..n].iter().map(String::as_str).collect();
            let after: Vec<&str> = stores.iter().map(String::as_str).collect();
            let users = 6_000;
            let mut moved = 0usize;
            for i in 0..users {
                let m = format!("u{salt}-{i}@corp.example");
                let (a, b) = (choose(&before, &m).unwrap(), choose(&after, &m).unwrap());
                if a != b {
                    prop_assert_eq!(b, stores[n].as_str(), "a move goes to the new store only");
                    moved += 1;
                }
            }
            let expected = users as f64 / (n + 1) as f64;
            let tolerance = 4.0 * expected.sqrt() + 0.15 * expected;
            prop_assert!(
                (moved as f64 - expected).abs() <= tolerance,
                "moved {} of {}, expected ~{:.0} (N={})", moved, users, expected, n
            );
        }

        /// Removing a store moves only the mailboxes it held.
        #[test]
        fn removing_a_store_moves_only_its_mailboxes(n in 2usize..30, gone in 0usize..30, salt in 0u32..1000) {
            let stores = names(n);
            let gone = gone % n;
            let all: Vec<&str> = stores.iter().map(String::as_str).collect();
            let rest: Vec<&str> = all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, s)| *s).collect();
            for i in 0..2_000 {
                let m = format!("r{salt}-{i}@corp.example");
                let (a, b) = (choose(&all, &m).unwrap(), choose(&rest, &m).unwrap());
                if a != stores[gone] {
                    prop_assert_eq!(a, b);
                }
            }
        }
    }
}
