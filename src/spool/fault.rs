//! Fault injection for the crash tests: abort the process at a named point, or make the
//! next appends or syncs fail with an injected error.
//!
//! Only with the cargo feature `fault-injection` (which the `postern-bench` crate turns on for
//! its crash test; the product is built without it):
//! `POSTERN_FAULT=<point>` (read once, when the spool opens) aborts the process with
//! `std::process::abort()` the `POSTERN_FAULT_AFTER`-th time (default 1) the point is reached.
//! Points:
//!
//! | point | where |
//! |---|---|
//! | `store.after_append` | a Commit record was written to the page cache, before any sync |
//! | `store.before_sync` / `store.after_sync` | around the fdatasync of a batch holding a Commit |
//! | `ledger.after_append` | a Ledger record was written, before any sync |
//! | `ledger.before_sync` / `ledger.after_sync` | around the fdatasync of a batch holding a Ledger record |
//! | `segment.after_create` | a new segment file exists, before its directory entry is synced |
//! | `gc.after_copy` | compaction copied live messages forward, before the old segment goes |
//! | `gc.before_unlink` | a dead segment is about to be unlinked |
//!
//! The injected I/O errors ([`super::Spool::inject_errors`]) are a test hook for the disk
//! trouble tests: they cost one relaxed atomic load per append or sync.

use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// ENOSPC, for the injected-error tests.
pub const ENOSPC: i32 = 28;
/// EIO, for the injected-error tests.
pub const EIO: i32 = 5;

#[derive(Debug, Default)]
pub(crate) struct Faults {
    point: Option<String>,
    countdown: AtomicU64,
    write_errno: AtomicI32,
    sync_errno: AtomicI32,
}

impl Faults {
    /// The armed point from `POSTERN_FAULT`, `POSTERN_FAULT_AFTER` (none without the
    /// `fault-injection` feature: the product never reads them).
    #[cfg(not(feature = "fault-injection"))]
    pub(crate) fn from_env() -> Self {
        Self::default()
    }

    /// The armed point from `POSTERN_FAULT`, `POSTERN_FAULT_AFTER`.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn from_env() -> Self {
        let point = std::env::var("POSTERN_FAULT")
            .ok()
            .filter(|p| !p.is_empty());
        let after = std::env::var("POSTERN_FAULT_AFTER")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1u64)
            .max(1);
        Self {
            point,
            countdown: AtomicU64::new(after),
            ..Self::default()
        }
    }

    /// Aborts the process if `name` is the armed point and its count is reached.
    #[inline]
    pub(crate) fn hit(&self, name: &str) {
        if self.point.as_deref() == Some(name) && self.countdown.fetch_sub(1, Ordering::SeqCst) == 1
        {
            tracing::warn!(point = name, "POSTERN_FAULT: aborting");
            std::process::abort();
        }
    }

    pub(crate) fn set(&self, write_errno: i32, sync_errno: i32) {
        self.write_errno.store(write_errno, Ordering::SeqCst);
        self.sync_errno.store(sync_errno, Ordering::SeqCst);
    }

    #[inline]
    pub(crate) fn write_error(&self) -> io::Result<()> {
        match self.write_errno.load(Ordering::Relaxed) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    #[inline]
    pub(crate) fn sync_error(&self) -> io::Result<()> {
        match self.sync_errno.load(Ordering::Relaxed) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}
