//! The append log: segment files, appends, and group commit.
//!
//! Records go to the end of the *active* segment (`NNNNNNNN.seg`) with one `pwrite` each,
//! under a mutex; that is a page-cache copy, never a disk wait. When a record would carry the
//! active segment past the size limit, a new segment is created and the old one joins the
//! next sync batch. Every append has a log sequence number (LSN): the total number of bytes
//! appended so far, counted at the end of the record.
//!
//! **Group commit.** One committer thread (see `Spool`) loops: take everything appended since
//! the last sync (a `Batch`: the LSN reached, the segment files with unsynced data, whether
//! the directory needs a sync), `fdatasync` each file (usually one), `fsync` the directory if
//! a segment was created, then resolve every waiter whose LSN is covered. While one
//! `fdatasync` runs, the next batch accumulates, so N sessions finishing DATA together share
//! one flush and the rate is not capped at one flush per message. The committer is woken only
//! when it would not look in time by itself: for a `Now` append (and a `Soon` one while no
//! message is being accepted: it is then synced at once, see `Flush::Soon`), and for a
//! `Soon` one during intake only while it is idle (it polls every `SOON` for a second after
//! each batch; a `Lazy` append never wakes it, it never sleeps as long as `LAZY`). During
//! intake a delivery's outcome records thus cost no thread wake-up of their own.
//!
//! **Waiters.** A [`Durable`] is the promise of one append: a future for tokio code (it never
//! blocks a runtime thread; the committer wakes it) and [`Durable::wait`] for plain threads.
//! Dropping a `Durable` does not undo anything: the record was appended and will be synced.
//!
//! **Failures.** A failed `pwrite` truncates the segment back to where the record started
//! (or, if even that fails, retires the segment so the next append starts a fresh one) and
//! the append returns the error. A failed `fdatasync` retires the segment: after a failed
//! fsync Linux may have dropped the dirty pages, so nothing more is written to that file.
//! The batch's registrations (`Unsynced`) tell the spool which commits and ledger records
//! were not made durable, so it can undo or retry them; only then is every waiter of the
//! batch failed (a client told 4xx finds its message already withdrawn).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use super::error::SpoolError;
use super::fault::Faults;
use super::id::QueueId;
use super::record::SEGMENT_HEADER_LEN;

pub(crate) use super::durable::{Durable, Syncer};
pub(crate) use super::segment::{Loc, PREALLOCATE, Segment, parse_segment_name, segment_name};
use super::segment::{create_active_segment, write_all_parts_at, write_zeros};

/// How soon an append must reach stable storage: what its [`Durable`] promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Somebody is waiting on the wire (a `250` for a Commit, an operator's command): the
    /// committer syncs at once.
    Now,
    /// The outcome of a delivery: while messages are being accepted (a `Now` append within
    /// the last [`SOON`]) it waits up to [`SOON`] to ride the sync of the next `Now` append;
    /// otherwise it is synced at once (sharing the sync with whatever else is pending), so
    /// that a transaction waiting on it does not idle for [`SOON`] when no intake comes to
    /// share with. Its [`Durable`] resolves after that sync.
    Soon,
    /// Written (a crash of the process cannot lose it: it is in the page cache) but no
    /// sync of its own: it rides the next batch, within [`LAZY`] at the latest. Its
    /// [`Durable`] resolves as soon as it is written. Only for records whose loss in a
    /// power failure costs nothing acknowledged: chunks (their Commit syncs them), in-doubt
    /// marks (without one the recipient comes back pending and is retried, the same
    /// at-least-once case), Done records (without one recovery finds every recipient
    /// final and reported, and the message is finished again).
    Lazy,
}

/// How long a [`Flush::Soon`] append may wait for a `Now` append to share its sync.
pub(crate) const SOON: Duration = Duration::from_millis(5);
/// How long a [`Flush::Lazy`] append may stay unsynced when nothing else comes.
pub(crate) const LAZY: Duration = Duration::from_secs(1);
/// What an append registers for the failure path of its batch.
#[derive(Debug)]
pub(crate) enum Reg {
    /// Nothing to undo (chunks, done, hold, compaction copies).
    None,
    /// A Commit at this offset within the appended bytes.
    Commit(QueueId, u32),
    /// Ledger records: (recipient, offset within the appended bytes, length).
    Ledger(QueueId, Vec<(u32, u32, u32)>),
}

/// A record that was appended but is not yet known to be durable.
#[derive(Debug)]
pub(crate) enum Unsynced {
    Commit(QueueId, Loc),
    Ledger {
        qid: QueueId,
        rcpt: u32,
        loc: Loc,
        bytes: Vec<u8>,
    },
}

/// The result of one append.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Appended {
    pub(crate) loc: Loc,
    pub(crate) lsn: u64,
}

/// Everything appended since the previous batch.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) upto: u64,
    from: u64,
    segments: Vec<Arc<Segment>>,
    dir: bool,
    pub(crate) unsynced: Vec<Unsynced>,
}

impl Batch {
    fn has_commit(&self) -> bool {
        self.unsynced
            .iter()
            .any(|u| matches!(u, Unsynced::Commit(..)))
    }
    fn has_ledger(&self) -> bool {
        self.unsynced
            .iter()
            .any(|u| matches!(u, Unsynced::Ledger { .. }))
    }
}

#[derive(Debug)]
struct LogState {
    active: Arc<Segment>,
    offset: u64,
    /// The active segment's file is written (zeros) up to here.
    prealloc: u64,
    /// A `Now` append is waiting for the next batch.
    now: bool,
    /// Since when the oldest `Soon` / `Lazy` append has been waiting.
    soon: Option<Instant>,
    lazy: Option<Instant>,
    appended: u64,
    taken: u64,
    dirty: Vec<Arc<Segment>>,
    active_dirty: bool,
    dir_dirty: bool,
    retire: bool,
    unsynced: Vec<Unsynced>,
    shutdown: bool,
    /// While the committer waits: when it looks again without being woken.
    waits_until: Option<Instant>,
    /// When the committer last took a batch.
    last_batch: Option<Instant>,
    /// When the last `Now` append came.
    last_now: Option<Instant>,
}

/// Counters for the benchmark and metrics.
#[derive(Debug, Default)]
pub(crate) struct LogStats {
    pub(crate) appends: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) syncs: AtomicU64,
    pub(crate) sync_nanos: AtomicU64,
    pub(crate) synced_commits: AtomicU64,
    pub(crate) segments_created: AtomicU64,
}

/// The append log of one spool directory.
#[derive(Debug)]
pub(crate) struct Log {
    dir: PathBuf,
    dir_file: File,
    node: u16,
    segment_size: u64,
    state: Mutex<LogState>,
    work: Condvar,
    pub(crate) syncer: Arc<Syncer>,
    segments: RwLock<BTreeMap<u32, Arc<Segment>>>,
    pub(crate) faults: Arc<Faults>,
    pub(crate) stats: LogStats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a spool lock leaves consistent data (every update is a plain
    // assignment after the I/O), so a poisoned lock is taken over rather than propagated.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Log {
    /// Opens the log for appending: `existing` are the recovered segments; a new active
    /// segment numbered `next` is created (appends never go to a recovered file).
    pub(crate) fn create(
        dir: &Path,
        node: u16,
        segment_size: u64,
        existing: BTreeMap<u32, Arc<Segment>>,
        next: u32,
        faults: Arc<Faults>,
    ) -> Result<Self, SpoolError> {
        let dir_file = File::open(dir)?;
        let active = create_active_segment(dir, next, node, segment_size)?;
        dir_file.sync_all()?;
        let mut segments = existing;
        segments.insert(next, Arc::clone(&active.segment));
        let stats = LogStats::default();
        stats.segments_created.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            dir: dir.to_owned(),
            dir_file,
            node,
            segment_size,
            state: Mutex::new(LogState {
                prealloc: active.prealloc,
                active: Arc::clone(&active.segment),
                offset: SEGMENT_HEADER_LEN as u64,
                now: false,
                soon: None,
                lazy: None,
                appended: 0,
                taken: 0,
                dirty: Vec::new(),
                active_dirty: false,
                dir_dirty: false,
                retire: false,
                unsynced: Vec::new(),
                shutdown: false,
                waits_until: None,
                last_batch: None,
                last_now: None,
            }),
            work: Condvar::new(),
            syncer: Arc::new(Syncer::default()),
            segments: RwLock::new(segments),
            faults,
            stats,
        })
    }

    /// Appends `bytes` (one or more whole records) to the active segment; `flush` says how
    /// soon the committer must sync it.
    pub(crate) fn append(
        &self,
        bytes: &[u8],
        reg: Reg,
        flush: Flush,
    ) -> Result<Appended, SpoolError> {
        self.append_parts(&[bytes], reg, flush)
    }

    /// [`Log::append`] of the concatenation of `parts`, written with one `pwritev` (no
    /// copy into one buffer). `Reg::Ledger` offsets count in the first part.
    pub(crate) fn append_parts(
        &self,
        parts: &[&[u8]],
        reg: Reg,
        flush: Flush,
    ) -> Result<Appended, SpoolError> {
        let bytes = parts.first().copied().unwrap_or_default();
        let mut st = lock(&self.state);
        if st.shutdown {
            return Err(SpoolError::Closed);
        }
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if st.retire
            || (st.offset + len > self.segment_size && st.offset > SEGMENT_HEADER_LEN as u64)
        {
            self.rotate(&mut st)?;
        }
        let off = st.offset;
        let written = self
            .faults
            .write_error()
            .and_then(|()| write_all_parts_at(&st.active.file, parts, off));
        if let Err(e) = written {
            if st.active.file.set_len(off).is_err() {
                st.retire = true;
            }
            return Err(e.into());
        }
        st.offset += len;
        st.appended += len;
        st.active_dirty = true;
        if st.offset + PREALLOCATE / 2 > st.prealloc {
            self.preallocate(&mut st);
        }
        // Wake the committer only when its deadline moves and it would not look in time on
        // its own: at once for `Now`; for the first `Soon` or `Lazy` append of a batch only
        // if it waits longer than that append may (it polls every SOON while busy, and
        // never waits as long as LAZY). A committer that is syncing looks when it is done.
        let now = Instant::now();
        let intake = st.last_now.is_some_and(|t| now.duration_since(t) < SOON);
        let wake = match flush {
            Flush::Now => {
                st.last_now = Some(now);
                !std::mem::replace(&mut st.now, true)
            }
            Flush::Soon if !intake => !std::mem::replace(&mut st.now, true),
            Flush::Soon => first_since(&mut st.soon, now) && waits_past(st.waits_until, now, SOON),
            Flush::Lazy => first_since(&mut st.lazy, now) && waits_past(st.waits_until, now, LAZY),
        };
        let loc = Loc {
            seg: st.active.number,
            off: off as u32,
        };
        match reg {
            Reg::None => {}
            Reg::Commit(qid, at) => st.unsynced.push(Unsynced::Commit(
                qid,
                Loc {
                    seg: loc.seg,
                    off: loc.off + at,
                },
            )),
            Reg::Ledger(qid, recs) => {
                for (rcpt, at, n) in recs {
                    let range = at as usize..(at + n) as usize;
                    st.unsynced.push(Unsynced::Ledger {
                        qid,
                        rcpt,
                        loc: Loc {
                            seg: loc.seg,
                            off: loc.off + at,
                        },
                        bytes: bytes.get(range).unwrap_or_default().to_vec(),
                    });
                }
            }
        }
        let lsn = st.appended;
        drop(st);
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(len, Ordering::Relaxed);
        if wake {
            self.work.notify_one();
        }
        Ok(Appended { loc, lsn })
    }

    /// Writes zeros ahead of the appends (see [`PREALLOCATE`]). A failure is not an append's
    /// failure: appends past the written zeros just change the file size again.
    fn preallocate(&self, st: &mut LogState) {
        let end = (st.offset + PREALLOCATE).min(self.segment_size.max(st.offset));
        if end <= st.prealloc {
            return;
        }
        let from = st.prealloc.max(st.offset);
        if let Err(e) = write_zeros(&st.active.file, from, end) {
            tracing::debug!(error = %e, "could not preallocate the spool segment");
            return;
        }
        st.prealloc = end;
    }

    fn rotate(&self, st: &mut LogState) -> Result<(), SpoolError> {
        let next = st.active.number + 1;
        let created = create_active_segment(&self.dir, next, self.node, self.segment_size)?;
        let seg = created.segment;
        self.faults.hit("segment.after_create");
        let old = std::mem::replace(&mut st.active, Arc::clone(&seg));
        // The closed segment loses its unused zeros (recovery also reads a zero tail as
        // the end); the size change is synced with the segment's last data.
        if st.prealloc > st.offset && old.file.set_len(st.offset).is_ok() {
            st.active_dirty = true;
        }
        if st.active_dirty {
            st.dirty.push(old);
        }
        st.active_dirty = false;
        st.dir_dirty = true;
        st.prealloc = created.prealloc;
        st.offset = SEGMENT_HEADER_LEN as u64;
        st.retire = false;
        self.stats.segments_created.fetch_add(1, Ordering::Relaxed);
        self.segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(next, seg);
        Ok(())
    }

    /// Waits (at most `timeout`) until appended records are due for a sync (see [`Flush`])
    /// and takes everything appended so far as a batch. Returns `None` on timeout, or when
    /// shut down with nothing left to sync.
    pub(crate) fn next_batch(&self, timeout: Duration) -> Option<Batch> {
        let mut st = lock(&self.state);
        let deadline = Instant::now() + timeout;
        loop {
            let pending = st.appended != st.taken || st.dir_dirty;
            if !pending && st.shutdown {
                return None;
            }
            let now = Instant::now();
            let due = [st.soon.map(|t| t + SOON), st.lazy.map(|t| t + LAZY)]
                .into_iter()
                .flatten()
                .min();
            if pending && (st.now || st.shutdown || st.dir_dirty || due.is_some_and(|d| d <= now)) {
                break;
            }
            let mut until = due.map_or(deadline, |d| d.min(deadline));
            // Busy (a batch within the last second): look every SOON, so that appends of
            // outcomes need not wake this thread (see `append_parts`).
            if st.last_batch.is_some_and(|t| now.duration_since(t) < BUSY) {
                until = until.min(now + SOON);
            }
            if now >= until && !pending {
                return None;
            }
            if now >= deadline {
                return None;
            }
            st.waits_until = Some(until);
            st = self
                .work
                .wait_timeout(st, until.saturating_duration_since(now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            st.waits_until = None;
        }
        st.last_batch = Some(Instant::now());
        let mut segments = std::mem::take(&mut st.dirty);
        if st.active_dirty {
            segments.push(Arc::clone(&st.active));
            st.active_dirty = false;
        }
        let batch = Batch {
            from: st.taken,
            upto: st.appended,
            segments,
            dir: std::mem::take(&mut st.dir_dirty),
            unsynced: std::mem::take(&mut st.unsynced),
        };
        st.taken = st.appended;
        st.now = false;
        st.soon = None;
        st.lazy = None;
        Some(batch)
    }

    /// Makes a batch durable: fdatasync of each file, then the directory if it changed.
    pub(crate) fn sync(&self, b: &Batch) -> io::Result<()> {
        let (commit, ledger) = (b.has_commit(), b.has_ledger());
        if commit {
            self.faults.hit("store.before_sync");
        }
        if ledger {
            self.faults.hit("ledger.before_sync");
        }
        let start = Instant::now();
        self.faults.sync_error()?;
        for s in &b.segments {
            s.file.sync_data()?;
        }
        if b.dir {
            self.dir_file.sync_all()?;
        }
        self.stats
            .sync_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        let commits = b
            .unsynced
            .iter()
            .filter(|u| matches!(u, Unsynced::Commit(..)))
            .count();
        self.stats
            .synced_commits
            .fetch_add(commits as u64, Ordering::Relaxed);
        metrics::histogram!(crate::metrics::SPOOL_SYNC).record(start.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::SPOOL_BATCH_RECORDS).record(b.unsynced.len() as f64);
        metrics::histogram!(crate::metrics::SPOOL_BATCH_BYTES).record((b.upto - b.from) as f64);
        if commit {
            self.faults.hit("store.after_sync");
        }
        if ledger {
            self.faults.hit("ledger.after_sync");
        }
        Ok(())
    }

    /// Publishes a batch's outcome to its waiters (after a failure, once the committer has
    /// retired the segment and withdrawn the batch's commits).
    pub(crate) fn finish(&self, b: &Batch, result: &io::Result<()>) {
        let errno = result
            .as_ref()
            .err()
            .map(|e| e.raw_os_error().unwrap_or(super::fault::EIO));
        self.syncer.publish(b.from, b.upto, errno);
    }

    /// After a failed sync: the active segment takes no more appends (its pages are suspect;
    /// the next append starts a new segment).
    pub(crate) fn retire(&self, e: &io::Error) {
        tracing::error!(error = %e, "spool sync failed; retiring the active segment");
        lock(&self.state).retire = true;
    }

    /// Stops accepting appends; the committer drains what is left.
    pub(crate) fn shutdown(&self) {
        lock(&self.state).shutdown = true;
        self.work.notify_all();
    }

    /// Wakes the committer (e.g. to retry failed ledger records).
    pub(crate) fn wake(&self) {
        self.work.notify_all();
    }

    /// At a clean stop, after the last batch: the active segment loses its unused zeros.
    pub(crate) fn trim(&self) {
        let st = lock(&self.state);
        if st.prealloc > st.offset && !st.retire {
            let trimmed = st
                .active
                .file
                .set_len(st.offset)
                .and_then(|()| st.active.file.sync_all());
            if let Err(e) = trimmed {
                tracing::debug!(error = %e, "could not trim the active spool segment");
            }
        }
    }

    /// Syncs everything appended so far at the next batch, whatever its [`Flush`] class
    /// (a caller about to wait on a `Lazy` record's durability, e.g. the compactor).
    pub(crate) fn hurry(&self) {
        lock(&self.state).now = true;
        self.work.notify_all();
    }

    /// The active segment's number.
    pub(crate) fn active_number(&self) -> u32 {
        lock(&self.state).active.number
    }

    /// A segment by number.
    pub(crate) fn segment(&self, n: u32) -> Option<Arc<Segment>> {
        self.segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&n)
            .cloned()
    }

    /// The numbers of all segments, oldest first.
    pub(crate) fn segment_numbers(&self) -> Vec<u32> {
        self.segments
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Forgets segment `n` and unlinks its file.
    pub(crate) fn remove_segment(&self, n: u32) -> io::Result<()> {
        self.segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&n);
        self.faults.hit("gc.before_unlink");
        std::fs::remove_file(self.dir.join(segment_name(n)))
    }

    /// Reads `len` bytes at `loc`.
    pub(crate) fn read_at(&self, loc: Loc, len: usize) -> Result<Vec<u8>, SpoolError> {
        let seg = self.segment(loc.seg).ok_or_else(|| SpoolError::Corrupt {
            qid: None,
            detail: format!("segment {} is gone", loc.seg),
        })?;
        let mut buf = vec![0; len];
        seg.file.read_exact_at(&mut buf, u64::from(loc.off))?;
        Ok(buf)
    }

    /// Syncs the directory (after unlinking segments).
    pub(crate) fn sync_dir(&self) -> io::Result<()> {
        self.dir_file.sync_all()
    }
}

/// How long after its last batch the committer polls every [`SOON`].
const BUSY: Duration = Duration::from_secs(1);

/// The committer waits beyond `limit` from now (so an append due within `limit` must wake
/// it). Not waiting: it looks when its sync is done.
fn waits_past(waits_until: Option<Instant>, now: Instant, limit: Duration) -> bool {
    waits_until.is_some_and(|u| u > now + limit)
}

/// Starts `since` at `now` if it is not running; true if it was not.
fn first_since(since: &mut Option<Instant>, now: Instant) -> bool {
    if since.is_some() {
        return false;
    }
    *since = Some(now);
    true
}

#[cfg(test)]
mod tests;
