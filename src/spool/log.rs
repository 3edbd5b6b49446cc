//! The append log: segment files, appends, and group commit.
//!
//! Records go to the end of the *active* segment (`NNNNNNNN.seg`) with one `pwrite` each,
//! under a mutex; that is a page-cache copy, never a disk wait. When a record would carry the
//! active segment past the size limit, a new segment is created and the old one joins the
//! next sync batch. Every append has a log sequence number (LSN): the total number of bytes
//! appended so far, counted at the end of the record.
//!
//! **Group commit.** One committer thread (see `Spool`) loops: take everything appended since
//! the last sync (a [`Batch`]: the LSN reached, the segment files with unsynced data, whether
//! the directory needs a sync), `fdatasync` each file (usually one), `fsync` the directory if
//! a segment was created, then resolve every waiter whose LSN is covered. While one
//! `fdatasync` runs, the next batch accumulates, so N sessions finishing DATA together share
//! one flush and the rate is not capped at one flush per message.
//!
//! **Waiters.** A [`Durable`] is the promise of one append: a future for tokio code (it never
//! blocks a runtime thread; the committer wakes it) and [`Durable::wait`] for plain threads.
//! Dropping a `Durable` does not undo anything: the record was appended and will be synced.
//!
//! **Failures.** A failed `pwrite` truncates the segment back to where the record started
//! (or, if even that fails, retires the segment so the next append starts a fresh one) and
//! the append returns the error. A failed `fdatasync` fails every waiter of the batch and
//! retires the segment: after a failed fsync Linux may have dropped the dirty pages, so
//! nothing more is written to that file. The batch's registrations ([`Unsynced`]) tell the
//! spool which commits and ledger records were not made durable, so it can undo or retry them.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::SpoolError;
use super::fault::Faults;
use super::id::QueueId;
use super::micros::to_micros;
use super::record::{SEGMENT_HEADER_LEN, SegmentHeader};

/// One segment file, open for reading (and, for the active one, appending).
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) number: u32,
    pub(crate) file: File,
}

/// Where a record starts: segment number and byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Loc {
    pub(crate) seg: u32,
    pub(crate) off: u32,
}

/// The file name of segment `n`.
pub(crate) fn segment_name(n: u32) -> String {
    format!("{n:08}.seg")
}

/// Parses a segment file name.
pub(crate) fn parse_segment_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// How soon an append must reach stable storage: what its [`Durable`] promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Somebody is waiting on the wire (a `250` for a Commit, an operator's command): the
    /// committer syncs at once.
    Now,
    /// The outcome of a delivery: durable within [`SOON`], riding the sync of the next
    /// `Now` append if one comes first. Its [`Durable`] resolves after that sync.
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
/// Segments are extended by writing this many zero bytes ahead of the appends, so that an
/// append changes no file metadata and its `fdatasync` needs no journal commit: one device
/// flush per batch, not two or three. The size changes once per step.
pub(crate) const PREALLOCATE: u64 = 1 << 20;

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
        // Wake the committer only when its deadline moves: at once for `Now`, for the
        // first `Soon` or `Lazy` append of a batch (to arm its timer).
        let wake = match flush {
            Flush::Now => !std::mem::replace(&mut st.now, true),
            Flush::Soon => first_since(&mut st.soon),
            Flush::Lazy => first_since(&mut st.lazy),
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
            let until = due.map_or(deadline, |d| d.min(deadline));
            if now >= until && !pending {
                return None;
            }
            if now >= deadline {
                return None;
            }
            st = self
                .work
                .wait_timeout(st, until.saturating_duration_since(now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
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

    /// Publishes a batch's outcome to its waiters. After a failure the active segment is
    /// retired: the next append starts a new file.
    pub(crate) fn finish(&self, b: &Batch, result: &io::Result<()>) {
        if let Err(e) = result {
            tracing::error!(error = %e, "spool sync failed; retiring the active segment");
            lock(&self.state).retire = true;
        }
        let errno = result
            .as_ref()
            .err()
            .map(|e| e.raw_os_error().unwrap_or(super::fault::EIO));
        self.syncer.publish(b.from, b.upto, errno);
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

/// A new active segment and how far its file is written.
pub(crate) struct Created {
    pub(crate) segment: Arc<Segment>,
    pub(crate) prealloc: u64,
}

/// Creates segment `n` with its header and its first [`PREALLOCATE`] zero bytes (none of
/// it synced yet).
fn create_active_segment(
    dir: &Path,
    n: u32,
    node: u16,
    segment_size: u64,
) -> Result<Created, SpoolError> {
    let segment = create_segment(dir, n, node)?;
    let header = SEGMENT_HEADER_LEN as u64;
    let end = (header + PREALLOCATE).min(segment_size.max(header));
    let prealloc = match write_zeros(&segment.file, header, end) {
        Ok(()) => end,
        Err(_) => header,
    };
    Ok(Created { segment, prealloc })
}

/// Writes all of `parts`, in order, at `off`: `pwritev`, continued after a short write.
fn write_all_parts_at(file: &File, parts: &[&[u8]], off: u64) -> io::Result<()> {
    if let [one] = parts {
        return file.write_all_at(one, off);
    }
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0usize;
    while done < total {
        // The parts not yet (wholly) written, the first one cut where the write stopped.
        let mut skip = done;
        let mut slices = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            slices.push(io::IoSlice::new(&p[skip..]));
            skip = 0;
        }
        match rustix::io::pwritev(file, &slices, off + done as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Starts `since` now if it is not running; true if it was not.
fn first_since(since: &mut Option<Instant>) -> bool {
    if since.is_some() {
        return false;
    }
    *since = Some(Instant::now());
    true
}

/// Writes zeros over `[from, to)` of `file`.
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Creates segment `n` with its header (not yet synced).
pub(crate) fn create_segment(dir: &Path, n: u32, node: u16) -> Result<Arc<Segment>, SpoolError> {
    let path = dir.join(segment_name(n));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let header = SegmentHeader {
        number: n,
        node,
        created: to_micros(std::time::SystemTime::now()),
    };
    if let Err(e) = file.write_all_at(&header.encode(), 0) {
        let _ = std::fs::remove_file(&path);
        return Err(e.into());
    }
    Ok(Arc::new(Segment { number: n, file }))
}

/// The shared state between the committer and the waiters.
#[derive(Debug, Default)]
pub(crate) struct Syncer {
    state: Mutex<SyncState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    processed: u64,
    failed: Vec<(u64, u64, i32)>,
    wakers: Vec<(u64, Waker)>,
    closed: bool,
}

impl SyncState {
    fn outcome(&self, lsn: u64) -> Option<Result<(), SpoolError>> {
        if lsn <= self.processed {
            for &(lo, hi, errno) in self.failed.iter().rev() {
                if lo < lsn && lsn <= hi {
                    return Some(Err(SpoolError::from_errno(errno)));
                }
            }
            return Some(Ok(()));
        }
        if self.closed {
            return Some(Err(SpoolError::Closed));
        }
        None
    }
}

impl Syncer {
    fn publish(&self, from: u64, upto: u64, errno: Option<i32>) {
        let wakers = {
            let mut st = lock(&self.state);
            if let Some(e) = errno {
                st.failed.push((from, upto, e));
                if st.failed.len() > 4096 {
                    st.failed.drain(..2048);
                }
            }
            st.processed = st.processed.max(upto);
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut st.wakers)
                .into_iter()
                .partition(|(l, _)| *l <= upto);
            st.wakers = waiting;
            ready
        };
        self.cv.notify_all();
        for (_, w) in wakers {
            w.wake();
        }
    }

    /// No more batches will come: every waiter still pending fails with `Closed`.
    pub(crate) fn close(&self) {
        let wakers = {
            let mut st = lock(&self.state);
            st.closed = true;
            std::mem::take(&mut st.wakers)
        };
        self.cv.notify_all();
        for (_, w) in wakers {
            w.wake();
        }
    }

    /// Blocks until `lsn` is durable.
    pub(crate) fn wait(&self, lsn: u64) -> Result<(), SpoolError> {
        let mut st = lock(&self.state);
        loop {
            if let Some(r) = st.outcome(lsn) {
                return r;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The promise that an operation is on stable storage: `.await` it from async code or
/// [`Durable::wait`] from a plain thread. Dropping it does not cancel the operation.
#[derive(Debug)]
#[must_use = "a Durable says when the operation is on disk; await or wait on it before acknowledging"]
pub struct Durable {
    inner: DurableInner,
}

#[derive(Debug)]
enum DurableInner {
    Ready(Option<Result<(), SpoolError>>),
    Wait { syncer: Arc<Syncer>, lsn: u64 },
}

impl Durable {
    pub(crate) fn ready(r: Result<(), SpoolError>) -> Self {
        Self {
            inner: DurableInner::Ready(Some(r)),
        }
    }

    pub(crate) fn wait_for(syncer: &Arc<Syncer>, lsn: u64) -> Self {
        Self {
            inner: DurableInner::Wait {
                syncer: Arc::clone(syncer),
                lsn,
            },
        }
    }

    /// The operation failed before anything was appended (the result is already known).
    pub(crate) fn failed_at_once(&self) -> bool {
        matches!(&self.inner, DurableInner::Ready(Some(Err(_))))
    }

    /// Blocks the calling thread until the operation is durable (or failed). Not for
    /// async code: `.await` the `Durable` there.
    pub fn wait(self) -> Result<(), SpoolError> {
        match self.inner {
            DurableInner::Ready(r) => r.unwrap_or(Err(SpoolError::Closed)),
            DurableInner::Wait { syncer, lsn } => syncer.wait(lsn),
        }
    }
}

impl Future for Durable {
    type Output = Result<(), SpoolError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.inner {
            DurableInner::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(SpoolError::Closed))),
            DurableInner::Wait { syncer, lsn } => {
                let mut st = lock(&syncer.state);
                if let Some(r) = st.outcome(*lsn) {
                    return Poll::Ready(r);
                }
                let lsn = *lsn;
                match st
                    .wakers
                    .iter_mut()
                    .find(|(l, w)| *l == lsn && w.will_wake(cx.waker()))
                {
                    Some(_) => {}
                    None => st.wakers.push((lsn, cx.waker().clone())),
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names() {
        assert_eq!(segment_name(42), "00000042.seg");
        assert_eq!(parse_segment_name("00000042.seg"), Some(42));
        assert_eq!(parse_segment_name("42.seg"), None);
        assert_eq!(parse_segment_name("0000004x.seg"), None);
        assert_eq!(parse_segment_name("00000042.tmp"), None);
    }

    #[test]
    fn syncer_resolves_ok_and_failed_ranges() {
        let s = Arc::new(Syncer::default());
        s.publish(0, 100, None);
        s.publish(100, 200, Some(super::super::fault::ENOSPC));
        assert!(s.wait(50).is_ok());
        assert!(s.wait(100).is_ok());
        assert!(matches!(s.wait(150), Err(SpoolError::NoSpace)));
        assert!(matches!(s.wait(200), Err(SpoolError::NoSpace)));
        s.close();
        assert!(matches!(s.wait(201), Err(SpoolError::Closed)));
    }
}
