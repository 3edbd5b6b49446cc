//! Queue shape: message ages in qshape's buckets (0-5m, 5-10m, 10-20m, … 1280m+).
//!
//! Pure and shared: the `postern_queue_shape_messages` gauge and the queue tools bucket
//! ages the same way. Bucket `i` holds ages in `[EDGES_MINUTES[i-1], EDGES_MINUTES[i])`
//! minutes (bucket 0 starts at 0); the last bucket holds everything from 1280 minutes on.

use std::time::Duration;

/// Upper edges of the buckets, in minutes (the last bucket is open-ended).
pub const EDGES_MINUTES: [u64; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];

/// The buckets' labels, in order.
pub const LABELS: [&str; 10] = [
    "0-5m",
    "5-10m",
    "10-20m",
    "20-40m",
    "40-80m",
    "80-160m",
    "160-320m",
    "320-640m",
    "640-1280m",
    "1280m+",
];

/// The bucket (index into [`LABELS`]) of a message `age` old.
pub fn bucket(age: Duration) -> usize {
    let secs = age.as_secs();
    EDGES_MINUTES
        .iter()
        .position(|&edge| secs < edge * 60)
        .unwrap_or(EDGES_MINUTES.len())
}

/// Counts `ages` into the buckets.
pub fn histogram(ages: impl IntoIterator<Item = Duration>) -> [u64; 10] {
    let mut counts = [0u64; 10];
    for age in ages {
        counts[bucket(age)] += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;

    #[test]
    fn edges_fall_in_the_upper_bucket() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_secs(5 * MIN - 1)), 0);
        assert_eq!(bucket(Duration::from_secs(5 * MIN)), 1);
        assert_eq!(bucket(Duration::from_secs(10 * MIN)), 2);
        assert_eq!(bucket(Duration::from_secs(1280 * MIN - 1)), 8);
        assert_eq!(bucket(Duration::from_secs(1280 * MIN)), 9);
        assert_eq!(bucket(Duration::from_secs(30 * 24 * 60 * MIN)), 9);
    }

    #[test]
    fn labels_match_edges() {
        for (i, edge) in EDGES_MINUTES.iter().enumerate() {
            assert!(LABELS[i].ends_with(&format!("-{edge}m")), "{}", LABELS[i]);
            assert!(
                LABELS[i + 1].starts_with(&format!("{edge}")),
                "{}",
                LABELS[i + 1]
            );
        }
        assert_eq!(LABELS[0], "0-5m");
        assert_eq!(LABELS[9], "1280m+");
    }

    #[test]
    fn histogram_counts_each_age_once() {
        let ages = [0, 4, 6, 100_000].map(|m| Duration::from_secs(m * MIN));
        let h = histogram(ages);
        assert_eq!(h.iter().sum::<u64>(), 4);
        assert_eq!(h[0], 2);
        assert_eq!(h[1], 1);
        assert_eq!(h[9], 1);
    }
}
