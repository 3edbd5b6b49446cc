//! Times on disk: microseconds since the Unix epoch, as queue ids, envelopes, ledger
//! entries and segment headers store them. A leaf: it imports nothing from the crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Microseconds since the epoch (0 before it).
pub(super) fn to_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The time `micros` after the epoch.
pub(super) fn from_micros(micros: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(micros)
}
