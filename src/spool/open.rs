//! Opening a spool: [`Spool::open`] (lock, recover, start the committer and GC threads)
//! and [`Spool::open_read_only`] (a scan without the lock, for the queue tools).
//!
//! A spool directory any local user could write to is refused before anything in it is
//! read or written.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::error::SpoolError;
use super::fresh;
use super::id::{self, QueueId};
use super::index::{self, Entry};
use super::log::{self, Flush, Log, Reg};
use super::record::{self, DoneReason};
use super::space::Space;
use super::summary::{RecoveryReport, SpoolSnapshot, list_corrupt, summarize};
use super::{Handle, Inner, Spool, SpoolOptions, fault, lock, recovery};

/// Refuses a world-writable spool directory (sticky bit or not: anyone could still create
/// a segment file the recovery scan would read as queued mail).
fn check_not_world_writable(dir: &Path) -> Result<(), SpoolError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(SpoolError::WorldWritable {
            path: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovers it, and starts the committer
    /// and garbage-collector threads. Fails with [`SpoolError::Locked`] if another process
    /// has it open, and with [`SpoolError::WorldWritable`] if `dir` is world-writable
    /// (checked before anything in it is read or written).
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<(Self, RecoveryReport), SpoolError> {
        if opts.segment_size > 1 << 30 || opts.segment_size < 4096 {
            return Err(SpoolError::Invalid("segment_size must be in 4 KiB..=1 GiB"));
        }
        std::fs::create_dir_all(dir)?;
        check_not_world_writable(dir)?;
        std::fs::create_dir_all(dir.join("corrupt"))?;
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("spool.lock"))?;
        rustix::fs::flock(
            &lock_file,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .map_err(|_| SpoolError::Locked(dir.to_owned()))?;
        let faults = Arc::new(fault::Faults::from_env());
        let start = Instant::now();
        let scan = recovery::scan(dir, false)?;
        let mut report = scan.report;
        let mut segments = scan.segments;
        if let Some((n, end)) = scan.torn_tail {
            let path = dir.join(log::segment_name(n));
            if end < record::SEGMENT_HEADER_LEN as u64 {
                // Created but its header never made it: nothing can be in it.
                segments.remove(&n);
                std::fs::remove_file(&path)?;
                File::open(dir)?.sync_all()?;
            } else {
                let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                f.set_len(end)?;
                f.sync_all()?;
            }
            tracing::warn!(
                segment = n,
                at = end,
                "truncated the torn tail of the spool log"
            );
        }
        let next = segments.keys().next_back().map_or(1, |n| n + 1);
        let log = Log::create(dir, opts.node_id, opts.segment_size, segments, next, faults)?;
        let mut index = scan.index;
        index.segs.insert(next, index::SegUse::default());
        let fresh_budget = opts.fresh_budget;
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            ids: id::IdAllocator::new(opts.node_id, scan.max_micros),
            space: Space::new(opts.min_free_bytes),
            opts,
            log,
            index: Mutex::new(index),
            fresh: Mutex::new(fresh::Fresh::new(fresh_budget)),
            retry: Mutex::new(HashMap::new()),
            incoming: AtomicUsize::new(0),
            stop: (Mutex::new(false), Condvar::new()),
            closing: AtomicBool::new(false),
            segments_deleted: AtomicU64::new(0),
            messages_moved: AtomicU64::new(0),
            in_doubt_recovered: report.in_doubt as u64,
            _lock: lock_file,
        });
        let mut threads = Vec::new();
        let c = Arc::clone(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("postern-spool-sync".into())
                .spawn(move || c.committer())?,
        );
        let spool = Self {
            handle: Arc::new(Handle {
                inner: Arc::clone(&inner),
                threads: Mutex::new(threads),
            }),
        };
        // Quarantine what recovery found unreadable: salvage to corrupt/, then a Done record.
        let mut last = None;
        for (qid, reason, body) in scan.quarantine {
            inner.salvage(qid, &reason, None, &body);
            let mut rec = Vec::new();
            record::encode_done(&mut rec, qid, DoneReason::Quarantined);
            last = Some(inner.log.append(&rec, Reg::None, Flush::Now)?.lsn);
        }
        if let Some(lsn) = last {
            inner.log.syncer.wait(lsn)?;
        }
        let g = Arc::clone(&inner);
        lock(&spool.handle.threads).push(
            std::thread::Builder::new()
                .name("postern-spool-gc".into())
                .spawn(move || g.gc_loop())?,
        );
        report.elapsed = start.elapsed();
        report.index_bytes = lock(&inner.index).mem_bytes();
        tracing::info!(
            dir = %dir.display(),
            messages = report.messages,
            in_doubt = report.in_doubt,
            partial_dropped = report.partial_dropped,
            quarantined = report.quarantined,
            corrupt_regions = report.corrupt_regions,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "spool recovered"
        );
        Ok((spool, report))
    }

    /// Scans a spool without taking its lock (the daemon may be running): the queue as
    /// the log says at this moment. Nothing is written.
    pub fn open_read_only(dir: &Path) -> Result<SpoolSnapshot, SpoolError> {
        let start = Instant::now();
        let scan = recovery::scan(dir, true)?;
        let mut report = scan.report;
        let entries: Vec<(QueueId, Entry)> = scan.index.map.into_iter().collect();
        let segs = scan.segments;
        let messages = summarize(entries, |n| segs.get(&n).cloned(), &HashMap::new());
        report.elapsed = start.elapsed();
        Ok(SpoolSnapshot {
            messages,
            report,
            corrupt: list_corrupt(dir),
        })
    }
}
