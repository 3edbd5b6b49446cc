//! The queue's age buckets, as Postfix's `qshape` draws them: one column per doubling of
//! age in minutes (`5 10 20 … 1280`, then `1280+`).
//!
//! Pure: no I/O. Shared by `postern queue shape` and any gauge that reports the queue by age,
//! so both use the same edges. A message of age `a` minutes falls in the first bucket whose
//! edge is `>= a` (an age of exactly 5 minutes is in the `5` column); older than the last
//! edge is `1280+`.

use std::time::Duration;

/// The upper edge of each bucket but the last, in minutes.
pub const EDGES_MINUTES: [u64; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];

/// Column labels: one per edge, then the open-ended last bucket.
pub const LABELS: [&str; 10] = [
    "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+",
];

/// The bucket (index into [`LABELS`]) of a message this old.
pub fn bucket(age: Duration) -> usize {
    let secs = age.as_secs();
    EDGES_MINUTES
        .iter()
        .position(|&edge| secs <= edge.saturating_mul(60))
        .unwrap_or(EDGES_MINUTES.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mins(m: u64) -> Duration {
        Duration::from_secs(m * 60)
    }

    #[test]
    fn edges_are_inclusive_and_the_last_bucket_is_open() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(mins(5)), 0);
        assert_eq!(bucket(mins(5) + Duration::from_secs(1)), 1);
        assert_eq!(bucket(mins(10)), 1);
        assert_eq!(bucket(mins(1280)), 8);
        assert_eq!(bucket(mins(1281)), 9);
        assert_eq!(bucket(Duration::from_secs(u64::MAX)), 9);
        assert_eq!(LABELS[bucket(mins(100_000))], "1280+");
    }

    #[test]
    fn labels_match_edges() {
        for (edge, label) in EDGES_MINUTES.iter().zip(LABELS) {
            assert_eq!(edge.to_string(), label);
        }
        assert_eq!(LABELS.len(), EDGES_MINUTES.len() + 1);
    }
}
