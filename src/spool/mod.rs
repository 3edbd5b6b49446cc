//! The durable spool: after `250`, the message survives a crash.
//!
//! # Promises
//!
//! - **Store.** [`MessageWriter::commit`] resolves `Ok` only once the message's body, its
//!   envelope (with every DSN parameter) and its END marker (the Commit record) are on stable
//!   storage: appended to the log and covered by an `fdatasync` (plus an `fsync` of the
//!   directory when a new segment file was created). A message without its Commit record is
//!   partial: recovery drops it, and it was never acknowledged.
//! - **Group commit.** Sessions that finish DATA at the same moment share one `fdatasync`
//!   (see [`log`](self::log)): the rate is not capped at one flush per message. Everything
//!   else pending rides the same sync: a delivery's outcome waits up to 5 ms for the next
//!   Commit rather than taking a flush of its own, and records whose loss in a power
//!   failure costs nothing acknowledged (in-doubt marks, Done records) are written at once
//!   but synced only with the next batch (within a second). Segments are written with zeros
//!   ahead of the appends, so that a sync changes no file metadata: one device flush per
//!   batch.
//! - **Per-recipient ledger.** Each recipient's state ([`RecipientState`]) is a durable
//!   record written as each reply arrives ([`Spool::ledger`]); its [`Durable`] resolves
//!   once it is synced, so after a crash of the machine a delivery is repeated only if its
//!   outcome had not yet been synced: the transactions in flight. Recipients are marked in
//!   doubt ([`Spool::mark_in_doubt`]) before a final dot is sent: the mark is written (a
//!   crash of the process cannot lose it) and synced with the next batch. After a crash
//!   they come back in doubt (counted in [`RecoveryReport::in_doubt`]), never lost; after a
//!   power failure that took an unsynced mark, as pending, the same at-least-once retry.
//!   A final state is marked *reported* ([`Spool::mark_reported`]) once the DSN it owes is
//!   queued, so that a restart does not send it again.
//! - **Queues** are states: *incoming* (a [`MessageWriter`] is open), *active* (recipients
//!   pending or in doubt), *deferred* (all remaining recipients deferred; next attempt
//!   known), *hold* (operator), *corrupt* (unreadable messages are moved to `corrupt/` with
//!   a log line; nothing crashes the process). A message leaves the spool with
//!   [`Spool::finish`] once no recipient is left (the caller queues any DSN it owes first)
//!   or with [`Spool::delete`] (operator).
//! - **Recovery** ([`Spool::open`]): scan the segments reading record headers (body bytes
//!   are skipped), truncate a torn tail, drop partial messages, rebuild the index, and
//!   start a fresh active segment.
//! - **Disk trouble.** `ENOSPC`/`EIO` while storing fail that store ([`SpoolError::reply`]
//!   gives `452 4.3.1` or `451 4.3.0`) and leave no live partial message; [`Spool::begin`]
//!   refuses new messages while free space is under `min_free_bytes` and accepts them again
//!   by itself when space returns. A ledger update that cannot be written returns an error
//!   (the scheduler pauses that delivery) and is retried by the committer until it lands;
//!   the last durable state stays the truth meanwhile, so nothing acknowledged is lost.
//! - **Read-only access.** [`Spool::open_read_only`] scans a spool without its lock, for the
//!   queue tools while the daemon runs.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`record`] | the record format (typed, length-prefixed, CRC-32, versioned) |
//! | [`log`](self::log) | segment files, appends, the group-commit batches, [`Durable`] |
//! | [`id`] | [`QueueId`] |
//! | [`ledger`] | [`RecipientState`] and its transitions |
//! | `index` | the in-memory index (about 200 bytes per message) |
//! | `recovery` | the startup scan |
//! | `gc` | deleting dead segments, compacting old mostly-dead ones |
//! | [`fault`] | `POSTERN_FAULT` crash points and injected I/O errors |
//! | (`bench/`: `postern-bench`) | the crash-test load and the benchmark, outside the product |
//!
//! # Directory
//!
//! `DIR/spool.lock` (flock: one daemon per spool), `DIR/NNNNNNNN.seg` (the log), and
//! `DIR/corrupt/` (quarantined messages, one `QUEUEID.txt` each).

pub mod fault;
mod gc;
pub mod id;
mod index;
pub mod ledger;
pub mod log;
mod micros;
pub mod record;
mod recovery;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use postern_proto::{Reply, replies};

pub use id::QueueId;
pub use ledger::{InvalidTransition, RecipientState};
pub use log::Durable;
pub use record::{Envelope, EnvelopeRecipient};

use index::{Entry, Extent, Index};
use log::{Flush, Loc, Log, Reg, Segment, Unsynced};
use record::{DoneReason, HEADER_LEN, Record};

/// Spool settings.
#[derive(Clone, Debug)]
pub struct SpoolOptions {
    /// This gateway's node id, part of every queue id. Default 0.
    pub node_id: u16,
    /// A segment is closed when the next record would carry it past this size.
    /// Default 64 MiB; at most 1 GiB.
    pub segment_size: u64,
    /// [`Spool::begin`] refuses new messages (452) below this much free space.
    /// Default 128 MiB.
    pub min_free_bytes: u64,
    /// Body bytes buffered per message before a Chunk record is written. Default 64 KiB.
    pub chunk_size: usize,
    /// The oldest segment is compacted when its live bytes fall below this fraction of
    /// its size. Default 0.5.
    pub compact_below: f64,
    /// How often the garbage collector looks at the oldest segment. Default 500 ms.
    pub gc_interval: Duration,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            node_id: 0,
            segment_size: 64 << 20,
            min_free_bytes: 128 << 20,
            chunk_size: 64 << 10,
            compact_below: 0.5,
            gc_interval: Duration::from_millis(500),
        }
    }
}

/// Why a spool operation failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// The disk is full (ENOSPC/EDQUOT) or below the free-space floor: `452 4.3.1`.
    #[error("spool is out of space")]
    NoSpace,
    /// Any other I/O error: `451 4.3.0`.
    #[error("spool I/O error: {0}")]
    Io(Arc<io::Error>),
    /// Data on disk does not parse or does not match its checksum.
    #[error("corrupt spool data{}: {detail}", qid.map(|q| format!(" for {q}")).unwrap_or_default())]
    Corrupt {
        /// The message, when known.
        qid: Option<QueueId>,
        /// What is wrong.
        detail: String,
    },
    /// Another process holds the spool's lock.
    #[error("spool {0} is locked by another process (is a gateway running on it?)")]
    Locked(PathBuf),
    /// The spool directory is world-writable: any local user could plant, replace or
    /// remove queue files (forged mail, lost mail). Refused at [`Spool::open`].
    #[error(
        "spool directory {} is world-writable (mode {mode:04o}): any local user could forge or remove queued mail; fix it with `chmod o-w {}` (the package's spool is postern:postern 0750)",
        path.display(),
        path.display()
    )]
    WorldWritable {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No such message in the spool.
    #[error("no message {0} in the spool")]
    NotFound(QueueId),
    /// No such recipient in the message.
    #[error("message {qid} has no recipient {rcpt}")]
    NoSuchRecipient {
        /// The message.
        qid: QueueId,
        /// The index asked for.
        rcpt: usize,
    },
    /// The ledger refused a transition.
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    /// A message without recipients, or similar misuse.
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// The spool is shutting down.
    #[error("the spool is closed")]
    Closed,
}

impl From<io::Error> for SpoolError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(28 | 122) => Self::NoSpace,
            _ => Self::Io(Arc::new(e)),
        }
    }
}

impl From<record::FormatError> for SpoolError {
    fn from(e: record::FormatError) -> Self {
        Self::Corrupt {
            qid: None,
            detail: e.to_string(),
        }
    }
}

impl SpoolError {
    pub(crate) fn from_errno(errno: i32) -> Self {
        io::Error::from_raw_os_error(errno).into()
    }

    /// The reply a session sends for this failure: `452 4.3.1` when out of space,
    /// `451 4.3.0` otherwise.
    pub fn reply(&self) -> Reply {
        match self {
            Self::NoSpace => replies::insufficient_storage(),
            _ => replies::local_error(),
        }
    }
}

/// What recovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files scanned.
    pub segments: usize,
    /// Valid records read.
    pub records: u64,
    /// Live messages in the index.
    pub messages: usize,
    /// Their recipients not yet delivered or bounced.
    pub recipients: usize,
    /// Messages without a Commit record, dropped (never acknowledged).
    pub partial_dropped: usize,
    /// Messages moved to the corrupt queue.
    pub quarantined: usize,
    /// Recipients that came back in doubt (retried one per transaction).
    pub in_doubt: usize,
    /// Unreadable byte ranges skipped (each logged).
    pub corrupt_regions: usize,
    /// Bytes of torn tail truncated from the last segment.
    pub truncated_bytes: u64,
    /// Time the scan took.
    pub elapsed: Duration,
    /// Approximate memory of the rebuilt index.
    pub index_bytes: usize,
}

/// The queue a message is in (derived from its recipients and hold flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueueState {
    /// Recipients pending or in doubt.
    Active,
    /// Every remaining recipient is deferred.
    Deferred,
    /// Held by the operator.
    Hold,
    /// Poison quarantine: its delivery attempts kept ending abnormally
    /// (`delivery.poison_attempts`); held until an operator releases it.
    Quarantine,
    /// Every recipient is final; waiting for [`Spool::finish`].
    Finished,
}

/// One recipient in a [`MessageSummary`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientSummary {
    /// The forward path.
    pub address: String,
    /// The state, with its last reply.
    pub state: RecipientState,
    /// Final, and the DSN it owes (if any) is queued ([`Spool::mark_reported`]).
    pub reported: bool,
}

/// One queued message, for the queue tools and the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageSummary {
    /// Its id.
    pub qid: QueueId,
    /// Arrival time.
    pub arrival: SystemTime,
    /// Queue.
    pub queue: QueueState,
    /// Body size in bytes.
    pub size: u64,
    /// The reverse path (`""` for `<>`).
    pub sender: String,
    /// Recipients in envelope order.
    pub recipients: Vec<RecipientSummary>,
    /// The earliest next attempt of a deferred recipient.
    pub next_attempt: Option<SystemTime>,
}

/// A message's state as the index holds it ([`Spool::status`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageStatus {
    /// Held by the operator (or quarantined): the scheduler leaves it alone.
    pub hold: bool,
    /// For each recipient in doubt: delivery attempts started since its last normal end
    /// (the in-doubt mark counts them); 0 for the others.
    pub attempts: Vec<u32>,
    /// Body size in bytes.
    pub size: u64,
    /// Each recipient's state in envelope order; reply texts are empty.
    pub recipients: Vec<RecipientState>,
    /// Each recipient is final and its DSN, if owed, is queued ([`Spool::mark_reported`]).
    pub reported: Vec<bool>,
}

/// A read-only view of a spool, for the admin tools.
#[derive(Clone, Debug)]
pub struct SpoolSnapshot {
    /// The queued messages, oldest first.
    pub messages: Vec<MessageSummary>,
    /// What the scan found.
    pub report: RecoveryReport,
    /// Files in the corrupt queue.
    pub corrupt: Vec<String>,
}

/// Counters since the spool opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Messages whose Commit was synced.
    pub stored: u64,
    /// fdatasync batches.
    pub syncs: u64,
    /// Total time spent in fdatasync.
    pub sync_time: Duration,
    /// Records appended (a write of several records counts once).
    pub appends: u64,
    /// Bytes appended.
    pub bytes: u64,
    /// Segments created.
    pub segments_created: u64,
    /// Segments deleted by the garbage collector.
    pub segments_deleted: u64,
    /// Messages copied forward by compaction.
    pub messages_moved: u64,
    /// Ledger records waiting to be retried.
    pub ledger_retries_pending: u64,
    /// Recipients that came back in doubt at recovery.
    pub in_doubt_recovered: u64,
    /// Live messages.
    pub messages: u64,
}

/// The spool handle. Cheap to clone; the spool closes (after a last sync) when the last
/// clone and the last [`MessageWriter`] are dropped.
#[derive(Clone, Debug)]
pub struct Spool {
    handle: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    opts: SpoolOptions,
    log: Log,
    index: Mutex<Index>,
    retry: Mutex<HashMap<(QueueId, u32), Vec<u8>>>,
    ids: id::IdAllocator,
    space: Space,
    incoming: AtomicUsize,
    stop: (Mutex<bool>, Condvar),
    closing: AtomicBool,
    segments_deleted: AtomicU64,
    messages_moved: AtomicU64,
    in_doubt_recovered: u64,
    _lock: File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            ids: id::IdAllocator::new(opts.node_id, scan.max_micros),
            space: Space::new(opts.min_free_bytes),
            opts,
            log,
            index: Mutex::new(index),
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

    /// Starts a new message: allocates its queue id. Fails with [`SpoolError::NoSpace`]
    /// while free space is under `min_free_bytes`.
    pub fn begin(&self, envelope: Envelope) -> Result<MessageWriter, SpoolError> {
        let inner = &self.handle.inner;
        if envelope.recipients.is_empty() {
            return Err(SpoolError::Invalid(
                "a message needs at least one recipient",
            ));
        }
        if !inner.space.check(&inner.dir) {
            return Err(SpoolError::NoSpace);
        }
        inner.incoming.fetch_add(1, Ordering::Relaxed);
        Ok(MessageWriter {
            spool: self.clone(),
            qid: inner.ids.next(),
            envelope,
            buf: Vec::new(),
            crc: crc32fast::Hasher::new(),
            len: 0,
            extents: Vec::new(),
            pins: Vec::new(),
            failed: None,
        })
    }

    /// A fresh queue id that no message holds: for a transaction relayed without being
    /// stored (`mode: proxy`), so its `Received:` header and log lines carry an id like any
    /// other.
    pub fn allocate_id(&self) -> QueueId {
        self.handle.inner.ids.next()
    }

    /// Is there room for new messages (free space at least `min_free_bytes`)?
    pub fn has_space(&self) -> bool {
        let inner = &self.handle.inner;
        inner.space.check(&inner.dir)
    }

    /// Records recipient `rcpt`'s new state (one durable ledger record).
    pub fn ledger(&self, qid: QueueId, rcpt: usize, state: RecipientState) -> Durable {
        self.handle
            .inner
            .ledger_ops(qid, vec![(rcpt, state, false)], &[])
    }

    /// Records several recipients' new states in one append (one `pwrite`, one place in
    /// the next group commit): the outcomes of one transaction. `reported` marks a final
    /// state whose DSN is already dealt with (none is owed), as [`Spool::mark_reported`]
    /// would, without a second record; it is refused for a state that is not final.
    pub fn ledger_batch(&self, qid: QueueId, ops: Vec<(usize, RecipientState, bool)>) -> Durable {
        if ops
            .iter()
            .any(|(_, s, reported)| *reported && !s.is_final())
        {
            return Durable::ready(Err(SpoolError::Invalid(
                "ledger_batch: only a delivered or bounced recipient can be reported",
            )));
        }
        self.handle.inner.ledger_ops(qid, ops, &[])
    }

    /// Marks recipients in doubt, in one record batch: call (and await) before sending
    /// the final dot of a delivery. The [`Durable`] resolves once the record is written
    /// (it survives a crash of the process); it is synced with the next batch.
    pub fn mark_in_doubt(&self, qid: QueueId, rcpts: &[usize]) -> Durable {
        let ops = rcpts
            .iter()
            .map(|&r| (r, RecipientState::InDoubt, false))
            .collect();
        self.handle.inner.ledger_ops(qid, ops, &[])
    }

    /// Marks recipients in doubt as [`Spool::mark_in_doubt`] does, each with its attempt
    /// count (delivery attempts started since its last normal end, this one included),
    /// carried by the same record: a crash during the attempt leaves it counted.
    pub fn mark_in_doubt_counted(&self, qid: QueueId, rcpts: &[(usize, u32)]) -> Durable {
        let ops = rcpts
            .iter()
            .map(|&(r, _)| (r, RecipientState::InDoubt, false))
            .collect();
        let counts: Vec<u32> = rcpts.iter().map(|&(_, n)| n).collect();
        self.handle.inner.ledger_ops(qid, ops, &counts)
    }

    /// Moves a message to the quarantine queue (a Hold record flagged poison): the
    /// scheduler leaves it alone, it is neither retried nor expired nor bounced until an
    /// operator releases it ([`Spool::release`]) or deletes it. `reason` is logged.
    pub fn quarantine_poison(&self, qid: QueueId, reason: &str) -> Durable {
        let durable = self.handle.inner.set_hold_as(qid, true, true);
        tracing::warn!(queue_id = %qid, reason, "message quarantined");
        durable
    }

    /// Is the message quarantined? From memory.
    pub fn is_quarantined(&self, qid: QueueId) -> bool {
        let ix = lock(&self.handle.inner.index);
        ix.map
            .get(&qid)
            .is_some_and(|e| e.hold.is_some() && e.poison)
    }

    /// Messages in the quarantine queue. From memory.
    pub fn quarantined(&self) -> usize {
        let ix = lock(&self.handle.inner.index);
        ix.map
            .values()
            .filter(|e| e.hold.is_some() && e.poison)
            .count()
    }

    /// Records that the DSN owed for these recipients' final states is queued (one durable
    /// ledger record each, the same state with the reported flag), so that it is not sent
    /// again, after a restart either. Recipients already marked are skipped; a recipient
    /// that is not final is refused. Call (and await) after the DSN's own commit.
    pub fn mark_reported(&self, qid: QueueId, rcpts: &[usize]) -> Durable {
        self.handle.inner.mark_reported(qid, rcpts)
    }

    /// The message's envelope (read from its Commit record).
    pub fn read_envelope(&self, qid: QueueId) -> Result<Envelope, SpoolError> {
        let inner = &self.handle.inner;
        let (loc, len, seg) = {
            let ix = lock(&inner.index);
            let e = ix.map.get(&qid).ok_or(SpoolError::NotFound(qid))?;
            (e.commit, e.commit_len, inner.log.segment(e.commit.seg))
        };
        read_commit(seg, loc, len).map_err(|e| with_qid(e, qid))
    }

    /// The message body (as received, CRLF line ends, not dot-stuffed). The reader checks
    /// the length and CRC at the end and fails with `InvalidData` on a mismatch; call
    /// [`Spool::quarantine`] then.
    pub fn open_body(&self, qid: QueueId) -> Result<BodyReader, SpoolError> {
        let inner = &self.handle.inner;
        let ix = lock(&inner.index);
        let e = ix.map.get(&qid).ok_or(SpoolError::NotFound(qid))?;
        let mut parts = Vec::with_capacity(e.body.len());
        for x in e.body.iter() {
            let seg = inner
                .log
                .segment(x.seg)
                .ok_or_else(|| SpoolError::Corrupt {
                    qid: Some(qid),
                    detail: format!("segment {} is gone", x.seg),
                })?;
            parts.push((seg, u64::from(x.off), u64::from(x.len)));
        }
        Ok(BodyReader {
            parts,
            part: 0,
            pos: 0,
            crc: crc32fast::Hasher::new(),
            read: 0,
            expect_len: e.body_len,
            expect_crc: e.body_crc,
        })
    }

    /// Puts a message on hold: the scheduler leaves it alone until [`Spool::release`].
    pub fn hold(&self, qid: QueueId) -> Durable {
        self.handle.inner.set_hold(qid, true)
    }

    /// Releases a held or quarantined message. The attempt counts of its in-doubt
    /// recipients start again from zero (written before the Release record, so a crash in
    /// between leaves it held with its counts reset, never released with the old counts).
    pub fn release(&self, qid: QueueId) -> Durable {
        let inner = &self.handle.inner;
        let reset: Vec<usize> = {
            let ix = lock(&inner.index);
            ix.map.get(&qid).map_or_else(Vec::new, |e| {
                e.rcpts
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.state.is_in_doubt() && s.state.until > 0)
                    .map(|(i, _)| i)
                    .collect()
            })
        };
        if !reset.is_empty() {
            let ops = reset
                .iter()
                .map(|&r| (r, RecipientState::InDoubt, false))
                .collect();
            let zeros = vec![0; reset.len()];
            let reset = inner.ledger_ops(qid, ops, &zeros);
            if reset.failed_at_once() {
                return reset;
            }
        }
        inner.set_hold(qid, false)
    }

    /// Removes a message whatever its recipients' states (operator action).
    pub fn delete(&self, qid: QueueId) -> Durable {
        self.handle
            .inner
            .done(qid, DoneReason::Deleted, false, Flush::Now)
    }

    /// Removes a message whose recipients are all delivered or bounced. The caller queues
    /// any DSN the message owes *before* calling this. The [`Durable`] resolves once the
    /// record is written; it is synced with the next batch (losing it to a power failure
    /// only makes the scheduler finish the message again).
    pub fn finish(&self, qid: QueueId) -> Durable {
        self.handle
            .inner
            .done(qid, DoneReason::Finished, true, Flush::Lazy)
    }

    /// Moves a message to the corrupt queue (e.g. after its body failed its checksum):
    /// what can be read is saved in `corrupt/QUEUEID.txt`, and it leaves the queue.
    pub fn quarantine(&self, qid: QueueId, reason: &str) -> Durable {
        let inner = &self.handle.inner;
        let env = self.read_envelope(qid).ok();
        let mut body = Vec::new();
        if let Ok(mut r) = self.open_body(qid) {
            let _ = r.read_to_end(&mut body);
        }
        inner.salvage(qid, reason, env.as_ref(), &body);
        inner.done(qid, DoneReason::Quarantined, false, Flush::Now)
    }

    /// Is the message held? From memory, without copying its recipients' states (checked
    /// before every transaction). `false` for a message not in the spool.
    pub fn is_held(&self, qid: QueueId) -> bool {
        let ix = lock(&self.handle.inner.index);
        ix.map.get(&qid).is_some_and(|e| e.hold.is_some())
    }

    /// A message's recipients' states, from memory (no disk read; reply texts are left
    /// empty): what the scheduler needs at the start of each attempt.
    pub fn status(&self, qid: QueueId) -> Result<MessageStatus, SpoolError> {
        let ix = lock(&self.handle.inner.index);
        let e = ix.map.get(&qid).ok_or(SpoolError::NotFound(qid))?;
        Ok(MessageStatus {
            hold: e.hold.is_some(),
            attempts: e
                .rcpts
                .iter()
                .map(|s| {
                    if s.state.is_in_doubt() {
                        u32::try_from(s.state.until).unwrap_or(u32::MAX)
                    } else {
                        0
                    }
                })
                .collect(),
            size: e.body_len,
            recipients: e.rcpts.iter().map(|s| s.state.shape()).collect(),
            reported: e.rcpts.iter().map(|s| s.state.reported).collect(),
        })
    }

    /// One queued message, as [`Spool::snapshot`] shows it (reads its envelope and reply
    /// texts from disk): for DSNs.
    pub fn message(&self, qid: QueueId) -> Result<MessageSummary, SpoolError> {
        let inner = &self.handle.inner;
        let (entry, segs) = {
            let ix = lock(&inner.index);
            let e = ix.map.get(&qid).ok_or(SpoolError::NotFound(qid))?.clone();
            let mut segs: HashMap<u32, Arc<Segment>> = HashMap::new();
            let locs = std::iter::once(e.commit.seg)
                .chain(e.rcpts.iter().filter_map(|s| s.ledger.map(|(l, _)| l.seg)));
            for n in locs {
                if let Some(seg) = inner.log.segment(n) {
                    segs.insert(n, seg);
                }
            }
            (e, segs)
        };
        let retry: HashMap<(QueueId, u32), Vec<u8>> = lock(&inner.retry)
            .iter()
            .filter(|((q, _), _)| *q == qid)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        summarize(vec![(qid, entry)], |n| segs.get(&n).cloned(), &retry)
            .pop()
            .ok_or(SpoolError::NotFound(qid))
    }

    /// Every queued message, oldest first (reads envelopes and reply texts from disk).
    pub fn snapshot(&self) -> Vec<MessageSummary> {
        let inner = &self.handle.inner;
        let (entries, segs) = {
            let ix = lock(&inner.index);
            let entries: Vec<(QueueId, Entry)> =
                ix.map.iter().map(|(q, e)| (*q, e.clone())).collect();
            let segs: HashMap<u32, Arc<Segment>> = inner
                .log
                .segment_numbers()
                .into_iter()
                .filter_map(|n| inner.log.segment(n).map(|s| (n, s)))
                .collect();
            (entries, segs)
        };
        let retry = lock(&inner.retry).clone();
        summarize(entries, |n| segs.get(&n).cloned(), &retry)
    }

    /// Number of queued messages.
    pub fn len(&self) -> usize {
        lock(&self.handle.inner.index).map.len()
    }

    /// No message queued?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Messages being received (open writers): the incoming queue.
    pub fn incoming(&self) -> usize {
        self.handle.inner.incoming.load(Ordering::Relaxed)
    }

    /// Files in the corrupt queue.
    pub fn corrupt(&self) -> Vec<String> {
        list_corrupt(&self.handle.inner.dir)
    }

    /// Counters since open.
    pub fn stats(&self) -> SpoolStats {
        let inner = &self.handle.inner;
        let s = &inner.log.stats;
        SpoolStats {
            stored: s.synced_commits.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
            sync_time: Duration::from_nanos(s.sync_nanos.load(Ordering::Relaxed)),
            appends: s.appends.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            segments_created: s.segments_created.load(Ordering::Relaxed),
            segments_deleted: inner.segments_deleted.load(Ordering::Relaxed),
            messages_moved: inner.messages_moved.load(Ordering::Relaxed),
            ledger_retries_pending: lock(&inner.retry).len() as u64,
            in_doubt_recovered: inner.in_doubt_recovered,
            messages: lock(&inner.index).map.len() as u64,
        }
    }

    /// Approximate memory held by the index.
    pub fn index_bytes(&self) -> usize {
        lock(&self.handle.inner.index).mem_bytes()
    }

    /// Runs one garbage-collection pass now (tests and tools; the GC thread also runs it).
    pub fn collect_garbage(&self) -> Result<(), SpoolError> {
        gc::collect(&self.handle.inner)
    }

    /// Test hook: make every append (`write_errno`) or sync (`sync_errno`) fail with that
    /// errno until called again with 0 (see [`fault::ENOSPC`], [`fault::EIO`]).
    #[doc(hidden)]
    pub fn inject_errors(&self, write_errno: i32, sync_errno: i32) {
        let inner = &self.handle.inner;
        inner.log.faults.set(write_errno, sync_errno);
        inner.space.force_recheck();
        inner.log.wake();
    }

    /// Test hook: the segment numbers on disk.
    #[doc(hidden)]
    pub fn segment_numbers(&self) -> Vec<u32> {
        self.handle.inner.log.segment_numbers()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        *lock(&self.inner.stop.0) = true;
        self.inner.stop.1.notify_all();
        self.inner.log.shutdown();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }
}

impl Inner {
    /// The committer: group commit, failure handling, ledger retries.
    fn committer(&self) {
        let mut last_retry = Instant::now();
        loop {
            if last_retry.elapsed() >= Duration::from_millis(200) {
                last_retry = Instant::now();
                if !lock(&self.retry).is_empty() {
                    self.retry_ledger();
                }
            }
            match self.log.next_batch(Duration::from_millis(200)) {
                Some(batch) => {
                    let result = self.log.sync(&batch);
                    self.log.finish(&batch, &result);
                    if result.is_err() {
                        self.undo_batch(batch.unsynced);
                    }
                }
                None if self.closing.load(Ordering::SeqCst) => break,
                None => {}
            }
        }
        self.log.trim();
        self.log.syncer.close();
    }

    /// After a failed sync: commits of the batch are withdrawn (the client got 4xx), ledger
    /// records are queued for retry.
    fn undo_batch(&self, unsynced: Vec<Unsynced>) {
        for u in unsynced {
            match u {
                Unsynced::Commit(qid, loc) => {
                    let mut ix = lock(&self.index);
                    if ix.map.get(&qid).is_some_and(|e| e.commit == loc) {
                        ix.remove(qid);
                        let mut rec = Vec::new();
                        record::encode_done(&mut rec, qid, DoneReason::StoreFailed);
                        if let Err(e) = self.log.append(&rec, Reg::None, Flush::Lazy) {
                            tracing::warn!(%qid, error = %e, "could not withdraw a failed store; it may be delivered after a restart");
                        }
                        tracing::warn!(%qid, "store failed at sync; message withdrawn");
                    }
                }
                Unsynced::Ledger {
                    qid,
                    rcpt,
                    loc,
                    bytes,
                } => {
                    let mut ix = lock(&self.index);
                    if let Some(slot) = ix
                        .map
                        .get_mut(&qid)
                        .and_then(|e| e.rcpts.get_mut(rcpt as usize))
                        && slot.ledger.is_some_and(|(l, _)| l == loc)
                        // A newer state that could not be written is already queued for
                        // retry: this record is older (its location is still the slot's
                        // only because the newer append failed).
                        && !slot.retry
                    {
                        slot.retry = true;
                        lock(&self.retry).insert((qid, rcpt), bytes);
                    }
                }
            }
        }
    }

    /// Re-appends ledger records that failed (disk full or a failed sync).
    fn retry_ledger(&self) {
        let items: Vec<_> = lock(&self.retry).drain().collect();
        let mut failed = false;
        for ((qid, rcpt), bytes) in items {
            let mut ix = lock(&self.index);
            let Some(state) = ix
                .map
                .get(&qid)
                .and_then(|e| e.rcpts.get(rcpt as usize))
                .filter(|s| s.retry)
                .map(|s| s.state)
            else {
                continue;
            };
            if failed {
                lock(&self.retry).insert((qid, rcpt), bytes);
                continue;
            }
            let n = bytes.len() as u32;
            match self
                .log
                .append(&bytes, Reg::Ledger(qid, vec![(rcpt, 0, n)]), Flush::Soon)
            {
                Ok(a) => {
                    ix.set_ledger(qid, rcpt as usize, state, Some((a.loc, n)));
                    tracing::info!(%qid, rcpt, "ledger update written after retry");
                }
                Err(_) => {
                    failed = true;
                    lock(&self.retry).insert((qid, rcpt), bytes);
                }
            }
        }
    }

    /// `attempts`: per op, the attempt count of an in-doubt state (empty: none).
    fn ledger_ops(
        &self,
        qid: QueueId,
        ops: Vec<(usize, RecipientState, bool)>,
        attempts: &[u32],
    ) -> Durable {
        let mut ix = lock(&self.index);
        let Some(e) = ix.map.get(&qid) else {
            return Durable::ready(Err(SpoolError::NotFound(qid)));
        };
        let mut current: Vec<_> = e.rcpts.iter().map(|s| s.state.shape()).collect();
        let mut buf = Vec::new();
        let mut recs = Vec::with_capacity(ops.len());
        let mut compact = Vec::with_capacity(ops.len());
        for (i, (rcpt, state, reported)) in ops.iter().enumerate() {
            let Some(cur) = current.get_mut(*rcpt) else {
                return Durable::ready(Err(SpoolError::NoSuchRecipient { qid, rcpt: *rcpt }));
            };
            if let Err(t) = cur.check_transition(state) {
                return Durable::ready(Err(t.into()));
            }
            *cur = state.clone();
            let mut c = ledger::CompactState {
                reported: *reported,
                ..ledger::CompactState::of(state)
            };
            if c.is_in_doubt() {
                c.until = u64::from(attempts.get(i).copied().unwrap_or(0));
            }
            let (_, _, reply) = state.parts();
            let at = buf.len();
            record::encode_ledger_parts(
                &mut buf,
                qid,
                *rcpt as u32,
                (c.tag, c.until, reply),
                c.reported,
            );
            recs.push((*rcpt as u32, at as u32, (buf.len() - at) as u32));
            compact.push(c);
        }
        // In-doubt marks are written before the dot but not synced on their own (see
        // [`Flush::Lazy`]); outcomes are synced soon.
        let flush = if compact.iter().all(|c| c.is_in_doubt()) {
            Flush::Lazy
        } else {
            Flush::Soon
        };
        match self.log.append(&buf, Reg::Ledger(qid, recs.clone()), flush) {
            Ok(a) => {
                for ((rcpt, at, n), c) in recs.iter().zip(&compact) {
                    let loc = Loc {
                        seg: a.loc.seg,
                        off: a.loc.off + at,
                    };
                    ix.set_ledger(qid, *rcpt as usize, *c, Some((loc, *n)));
                }
                drop(ix);
                self.log.faults.hit("ledger.after_append");
                match flush {
                    Flush::Lazy => Durable::ready(Ok(())),
                    _ => Durable::wait_for(&self.log.syncer, a.lsn),
                }
            }
            Err(err) => {
                // The in-memory state moves on (so nothing is delivered twice from memory);
                // the durable state stays the previous one until the retry lands.
                let mut retry = lock(&self.retry);
                for ((rcpt, at, n), c) in recs.iter().zip(&compact) {
                    ix.set_ledger(qid, *rcpt as usize, *c, None);
                    if let Some(slot) = ix
                        .map
                        .get_mut(&qid)
                        .and_then(|e| e.rcpts.get_mut(*rcpt as usize))
                    {
                        slot.retry = true;
                    }
                    let r = *at as usize..(*at + *n) as usize;
                    retry.insert((qid, *rcpt), buf[r].to_vec());
                }
                drop(retry);
                drop(ix);
                self.space.force_recheck();
                tracing::warn!(%qid, error = %err, "ledger update not written; will retry");
                Durable::ready(Err(err))
            }
        }
    }

    fn mark_reported(&self, qid: QueueId, rcpts: &[usize]) -> Durable {
        let mut ix = lock(&self.index);
        let Some(e) = ix.map.get(&qid) else {
            return Durable::ready(Err(SpoolError::NotFound(qid)));
        };
        let mut buf = Vec::new();
        let mut recs = Vec::new();
        let mut states = Vec::new();
        for &rcpt in rcpts {
            let Some(slot) = e.rcpts.get(rcpt) else {
                return Durable::ready(Err(SpoolError::NoSuchRecipient { qid, rcpt }));
            };
            if !slot.state.is_final() {
                return Durable::ready(Err(SpoolError::Invalid(
                    "mark_reported: the recipient is not delivered or bounced",
                )));
            }
            if slot.state.reported {
                continue;
            }
            // The record repeats the state's reply: the latest record is the one read.
            let latest = if slot.retry {
                lock(&self.retry).get(&(qid, rcpt as u32)).cloned()
            } else {
                slot.ledger
                    .and_then(|(l, n)| self.log.read_at(l, n as usize).ok())
            };
            let reply = latest
                .and_then(|b| match record::parse_full(&b) {
                    Ok((_, Record::Ledger { state, .. })) => state.reply().map(str::to_owned),
                    _ => None,
                })
                .unwrap_or_default();
            let at = buf.len();
            record::encode_ledger_flagged(
                &mut buf,
                qid,
                rcpt as u32,
                &slot.state.expand(reply),
                true,
            );
            recs.push((rcpt as u32, at as u32, (buf.len() - at) as u32));
            states.push(ledger::CompactState {
                reported: true,
                ..slot.state
            });
        }
        if recs.is_empty() {
            return Durable::ready(Ok(()));
        }
        match self
            .log
            .append(&buf, Reg::Ledger(qid, recs.clone()), Flush::Soon)
        {
            Ok(a) => {
                for ((rcpt, at, n), state) in recs.iter().zip(states) {
                    let loc = Loc {
                        seg: a.loc.seg,
                        off: a.loc.off + at,
                    };
                    ix.set_ledger(qid, *rcpt as usize, state, Some((loc, *n)));
                }
                Durable::wait_for(&self.log.syncer, a.lsn)
            }
            // Nothing changes: the DSN may be sent again, never lost.
            Err(e) => Durable::ready(Err(e)),
        }
    }

    fn set_hold(&self, qid: QueueId, hold: bool) -> Durable {
        self.set_hold_as(qid, hold, false)
    }

    /// A Hold (`poison`: flagged as a quarantine) or Release record. Holding a message
    /// already held changes nothing (an operator's hold stays one, a quarantine too).
    fn set_hold_as(&self, qid: QueueId, hold: bool, poison: bool) -> Durable {
        let mut ix = lock(&self.index);
        let Some(e) = ix.map.get(&qid) else {
            return Durable::ready(Err(SpoolError::NotFound(qid)));
        };
        if e.hold.is_some() == hold {
            return Durable::ready(Ok(()));
        }
        let mut rec = Vec::new();
        if hold && poison {
            record::encode_quarantine(&mut rec, qid);
        } else {
            record::encode_hold(&mut rec, qid, hold);
        }
        match self.log.append(&rec, Reg::None, Flush::Now) {
            Ok(a) => {
                ix.set_hold(qid, hold.then_some((a.loc, rec.len() as u32)), poison);
                tracing::info!(%qid, hold, poison, "hold state changed");
                Durable::wait_for(&self.log.syncer, a.lsn)
            }
            Err(e) => Durable::ready(Err(e)),
        }
    }

    /// A Done record. `Flush::Lazy` for a finished message: without the record, recovery
    /// finds every recipient final and reported and the scheduler finishes it again.
    fn done(&self, qid: QueueId, reason: DoneReason, require_final: bool, flush: Flush) -> Durable {
        let mut ix = lock(&self.index);
        let Some(e) = ix.map.get(&qid) else {
            return Durable::ready(Err(SpoolError::NotFound(qid)));
        };
        if require_final && !e.rcpts.iter().all(|s| s.state.is_final()) {
            return Durable::ready(Err(SpoolError::Invalid(
                "finish: some recipients are not delivered or bounced",
            )));
        }
        let mut rec = Vec::new();
        record::encode_done(&mut rec, qid, reason);
        match self.log.append(&rec, Reg::None, flush) {
            Ok(a) => {
                ix.remove(qid);
                lock(&self.retry).retain(|(q, _), _| *q != qid);
                tracing::info!(%qid, ?reason, "removed from the spool");
                match flush {
                    Flush::Lazy => Durable::ready(Ok(())),
                    _ => Durable::wait_for(&self.log.syncer, a.lsn),
                }
            }
            Err(e) => Durable::ready(Err(e)),
        }
    }

    /// Writes what is readable of a bad message to `corrupt/QUEUEID.txt`.
    fn salvage(&self, qid: QueueId, reason: &str, env: Option<&Envelope>, body: &[u8]) {
        tracing::error!(%qid, reason, "message moved to the corrupt queue");
        let path = self.dir.join("corrupt").join(format!("{qid}.txt"));
        let write = || -> io::Result<()> {
            let mut f = File::create(&path)?;
            writeln!(f, "queue-id: {qid}\nreason: {reason}")?;
            if let Some(env) = env {
                writeln!(f, "sender: <{}>\nclient: {}", env.sender, env.client)?;
                for r in &env.recipients {
                    writeln!(f, "recipient: <{}>", r.address)?;
                }
            }
            writeln!(f, "body-bytes-found: {}\n", body.len())?;
            f.write_all(body)?;
            f.sync_all()?;
            File::open(self.dir.join("corrupt"))?.sync_all()
        };
        if let Err(e) = write() {
            tracing::error!(%qid, error = %e, "could not write the corrupt-queue file");
        }
    }

    fn gc_loop(&self) {
        let (m, cv) = &self.stop;
        let mut stop = lock(m);
        while !*stop {
            stop = cv
                .wait_timeout(stop, self.opts.gc_interval)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if *stop {
                break;
            }
            drop(stop);
            if let Err(e) = gc::collect(self) {
                tracing::warn!(error = %e, "spool garbage collection failed; will retry");
            }
            stop = lock(m);
        }
    }
}

/// A message being written. Body bytes are buffered and appended as Chunk records (not
/// synced); [`MessageWriter::commit`] appends the Commit record and returns the promise.
/// Dropping the writer without committing abandons the message (its chunks are garbage).
#[derive(Debug)]
pub struct MessageWriter {
    spool: Spool,
    qid: QueueId,
    envelope: Envelope,
    buf: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u64,
    extents: Vec<Extent>,
    /// Index pins on the segments holding this message's chunks, so the garbage collector
    /// cannot delete them before the Commit (which pins them for good).
    pins: Vec<(u32, u64)>,
    failed: Option<SpoolError>,
}

impl MessageWriter {
    /// The message's queue id (for `Received:` and logs).
    pub fn queue_id(&self) -> QueueId {
        self.qid
    }

    /// Appends body bytes. Whole chunks are written straight from `bytes`; only a chunk's
    /// worth of the tail is buffered.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.crc.update(bytes);
        self.len += bytes.len() as u64;
        let chunk = self.spool.handle.inner.opts.chunk_size.max(1);
        let mut rest = bytes;
        while !rest.is_empty() {
            let written = if self.buf.is_empty() && rest.len() >= chunk {
                let (now, later) = rest.split_at(chunk);
                rest = later;
                self.append_chunk(now)
            } else {
                let take = (chunk - self.buf.len()).min(rest.len());
                self.buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if self.buf.len() < chunk {
                    continue;
                }
                let data = std::mem::take(&mut self.buf);
                let r = self.append_chunk(&data);
                self.buf = data;
                self.buf.clear();
                r
            };
            if let Err(e) = written {
                self.failed = Some(e.clone());
                return Err(e);
            }
        }
        Ok(())
    }

    fn append_chunk(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        let head = record::chunk_head(self.qid, data.len());
        let total = (head.len() + data.len()) as u64;
        let inner = &self.spool.handle.inner;
        let mut ix = lock(&inner.index);
        let a = inner
            .log
            .append_parts(&[&head, data], Reg::None, Flush::Lazy)?;
        ix.pin(a.loc.seg, total);
        drop(ix);
        self.pins.push((a.loc.seg, total));
        self.extents.push(Extent {
            seg: a.loc.seg,
            off: a.loc.off + (HEADER_LEN + id::QUEUE_ID_BYTES) as u32,
            len: data.len() as u32,
        });
        Ok(())
    }

    /// Appends the last chunk and the Commit record; the returned [`Durable`] resolves once
    /// they are on stable storage. Answer 250 only after it resolved `Ok`.
    pub fn commit(mut self) -> Durable {
        if let Some(e) = self.failed.take() {
            return Durable::ready(Err(e));
        }
        let inner = Arc::clone(&self.spool.handle.inner);
        let qid = self.qid;
        // The tail chunk's head, its bytes (not copied), the Commit: one pwritev.
        let tail = std::mem::take(&mut self.buf);
        let head = if tail.is_empty() {
            Vec::new()
        } else {
            record::chunk_head(qid, tail.len())
        };
        let commit_at = head.len() + tail.len();
        let crc = std::mem::take(&mut self.crc).finalize();
        let mut rec = Vec::with_capacity(512);
        record::encode_commit(&mut rec, qid, 0, self.len, crc, &self.envelope);
        let commit_len = rec.len() as u32;
        let mut ix = lock(&inner.index);
        match inner.log.append_parts(
            &[&head, &tail, &rec],
            Reg::Commit(qid, commit_at as u32),
            Flush::Now,
        ) {
            Ok(a) => {
                let mut extents = std::mem::take(&mut self.extents);
                if !tail.is_empty() {
                    extents.push(Extent {
                        seg: a.loc.seg,
                        off: a.loc.off + (HEADER_LEN + id::QUEUE_ID_BYTES) as u32,
                        len: tail.len() as u32,
                    });
                }
                let commit = Loc {
                    seg: a.loc.seg,
                    off: a.loc.off + commit_at as u32,
                };
                let entry = Entry::new(
                    commit,
                    commit_len,
                    extents,
                    self.len,
                    crc,
                    self.envelope.recipients.len(),
                );
                ix.insert(qid, entry);
                for (seg, n) in self.pins.drain(..) {
                    ix.unpin(seg, n);
                }
                drop(ix);
                inner.log.faults.hit("store.after_append");
                tracing::debug!(%qid, size = self.len, rcpts = self.envelope.recipients.len(), "stored");
                Durable::wait_for(&inner.log.syncer, a.lsn)
            }
            Err(e) => {
                drop(ix);
                inner.space.force_recheck();
                tracing::warn!(%qid, error = %e, "store failed");
                Durable::ready(Err(e))
            }
        }
    }

    /// Abandons the message (its chunks become garbage; recovery ignores them).
    pub fn abort(self) {}
}

impl Drop for MessageWriter {
    fn drop(&mut self) {
        let inner = &self.spool.handle.inner;
        if !self.pins.is_empty() {
            let mut ix = lock(&inner.index);
            for (seg, n) in self.pins.drain(..) {
                ix.unpin(seg, n);
            }
        }
        inner.incoming.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads a message body from its chunks and checks length and CRC at the end.
#[derive(Debug)]
pub struct BodyReader {
    parts: Vec<(Arc<Segment>, u64, u64)>,
    part: usize,
    pos: u64,
    crc: crc32fast::Hasher,
    read: u64,
    expect_len: u64,
    expect_crc: u32,
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some((seg, off, len)) = self.parts.get(self.part) else {
                let crc = std::mem::take(&mut self.crc).finalize();
                self.crc = crc32fast::Hasher::new_with_initial(crc);
                if self.read != self.expect_len || crc != self.expect_crc {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "spool body checksum mismatch",
                    ));
                }
                return Ok(0);
            };
            if self.pos == *len {
                self.part += 1;
                self.pos = 0;
                continue;
            }
            let n = out.len().min((len - self.pos) as usize);
            if n == 0 {
                return Ok(0);
            }
            seg.file.read_exact_at(&mut out[..n], off + self.pos)?;
            self.crc.update(&out[..n]);
            self.pos += n as u64;
            self.read += n as u64;
            return Ok(n);
        }
    }
}

fn with_qid(e: SpoolError, qid: QueueId) -> SpoolError {
    match e {
        SpoolError::Corrupt { detail, .. } => SpoolError::Corrupt {
            qid: Some(qid),
            detail,
        },
        e => e,
    }
}

fn read_commit(seg: Option<Arc<Segment>>, loc: Loc, len: u32) -> Result<Envelope, SpoolError> {
    let seg = seg.ok_or_else(|| SpoolError::Corrupt {
        qid: None,
        detail: format!("segment {} is gone", loc.seg),
    })?;
    let mut buf = vec![0; len as usize];
    seg.file.read_exact_at(&mut buf, u64::from(loc.off))?;
    match record::parse_full(&buf)? {
        (_, Record::Commit { envelope, .. }) => Ok(envelope),
        _ => Err(SpoolError::Corrupt {
            qid: None,
            detail: "not a commit record".into(),
        }),
    }
}

fn read_ledger_reply(seg: Option<Arc<Segment>>, loc: Loc, len: u32) -> Option<String> {
    let seg = seg?;
    let mut buf = vec![0; len as usize];
    seg.file.read_exact_at(&mut buf, u64::from(loc.off)).ok()?;
    match record::parse_full(&buf).ok()? {
        (_, Record::Ledger { state, .. }) => state.reply().map(str::to_owned),
        _ => None,
    }
}

fn summarize(
    mut entries: Vec<(QueueId, Entry)>,
    seg: impl Fn(u32) -> Option<Arc<Segment>>,
    retry: &HashMap<(QueueId, u32), Vec<u8>>,
) -> Vec<MessageSummary> {
    entries.sort_by_key(|(q, _)| *q);
    let mut out = Vec::with_capacity(entries.len());
    for (qid, e) in entries {
        let env = read_commit(seg(e.commit.seg), e.commit, e.commit_len).ok();
        let mut recipients = Vec::with_capacity(e.rcpts.len());
        let mut next: Option<SystemTime> = None;
        let (mut active, mut deferred) = (false, false);
        for (i, s) in e.rcpts.iter().enumerate() {
            let reply = if !s.state.has_reply() {
                String::new()
            } else if let Some(b) = retry.get(&(qid, i as u32)) {
                match record::parse_full(b) {
                    Ok((_, Record::Ledger { state, .. })) => {
                        state.reply().unwrap_or_default().to_owned()
                    }
                    _ => String::new(),
                }
            } else {
                s.ledger
                    .and_then(|(l, n)| read_ledger_reply(seg(l.seg), l, n))
                    .unwrap_or_default()
            };
            let state = s.state.expand(reply);
            match &state {
                RecipientState::Pending | RecipientState::InDoubt => active = true,
                RecipientState::Deferred { until, .. } => {
                    deferred = true;
                    next = Some(next.map_or(*until, |n| n.min(*until)));
                }
                _ => {}
            }
            let address = env
                .as_ref()
                .and_then(|env| env.recipients.get(i))
                .map(|r| r.address.clone())
                .unwrap_or_default();
            recipients.push(RecipientSummary {
                address,
                state,
                reported: s.state.reported,
            });
        }
        let queue = if e.hold.is_some() && e.poison {
            QueueState::Quarantine
        } else if e.hold.is_some() {
            QueueState::Hold
        } else if active {
            QueueState::Active
        } else if deferred {
            QueueState::Deferred
        } else {
            QueueState::Finished
        };
        out.push(MessageSummary {
            qid,
            arrival: qid.arrival(),
            queue,
            size: e.body_len,
            sender: env.map(|e| e.sender).unwrap_or_default(),
            recipients,
            next_attempt: next,
        });
    }
    out
}

fn list_corrupt(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("corrupt"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Free-space check, cached for 200 ms.
#[derive(Debug)]
struct Space {
    min_free: u64,
    cache: Mutex<Option<(Instant, bool)>>,
}

impl Space {
    fn new(min_free: u64) -> Self {
        Self {
            min_free,
            cache: Mutex::new(None),
        }
    }

    fn check(&self, dir: &Path) -> bool {
        let mut c = lock(&self.cache);
        if let Some((at, ok)) = *c
            && at.elapsed() < Duration::from_millis(200)
        {
            return ok;
        }
        let ok = match rustix::fs::statvfs(dir) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize) >= self.min_free,
            Err(_) => true,
        };
        *c = Some((Instant::now(), ok));
        ok
    }

    fn force_recheck(&self) {
        *lock(&self.cache) = None;
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_poison;
