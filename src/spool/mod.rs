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
//!   (see [`log`]): the rate is not capped at one flush per message. Everything
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
//! | this file | [`SpoolOptions`], [`Spool`] (the API) and its shared state |
//! | `open` | [`Spool::open`], [`Spool::open_read_only`] |
//! | `error` | [`SpoolError`] |
//! | `summary` | [`RecoveryReport`], [`MessageSummary`], [`SpoolStats`] and the other views |
//! | `committer` | the committer thread (group commit, undo, ledger retries), the GC loop |
//! | `ops` | writing ledger, Hold/Release and Done records; salvage to `corrupt/` |
//! | `writer` | [`MessageWriter`] |
//! | `reader` | [`BodyReader`] |
//! | `space` | the free-space check |
//! | [`record`] | the record format (typed, length-prefixed, CRC-32, versioned) |
//! | `envelope` | [`Envelope`] and its layout in a Commit record |
//! | `wire` | the format's primitives (integers, strings, options) and `FormatError` |
//! | [`log`] | appends, the group-commit batches and their sync classes |
//! | `segment` | segment files: names, creation with zeros written ahead, positioned writes |
//! | `durable` | [`Durable`], the promise of an append, and the committer's side of it |
//! | [`id`] | [`QueueId`] |
//! | [`ledger`] | [`RecipientState`] and its transitions |
//! | `index` | the in-memory index (about 200 bytes per message) |
//! | `fresh` | just-committed envelopes (and bodies of one chunk) handed to the first delivery attempt from memory |
//! | `recovery` | the startup scan |
//! | `gc` | deleting dead segments, compacting old mostly-dead ones |
//! | [`fault`] | `POSTERN_FAULT` crash points and injected I/O errors |
//! | (`bench/`: `postern-bench`) | the crash-test load and the benchmark, outside the product |
//!
//! # Directory
//!
//! `DIR/spool.lock` (flock: one daemon per spool), `DIR/NNNNNNNN.seg` (the log), and
//! `DIR/corrupt/` (quarantined messages, one `QUEUEID.txt` each).

mod committer;
mod durable;
mod envelope;
mod error;
pub mod fault;
mod fresh;
mod gc;
pub mod id;
mod index;
pub mod ledger;
pub mod log;
mod micros;
mod open;
mod ops;
mod reader;
pub mod record;
mod recovery;
mod segment;
mod space;
mod summary;
mod wire;
mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

pub use durable::Durable;
pub use id::QueueId;
pub use ledger::{InvalidTransition, RecipientState};
pub use record::{Envelope, EnvelopeRecipient};

pub use error::SpoolError;
pub use fresh::HeldBody;
pub use reader::BodyReader;
pub use summary::{
    MessageStatus, MessageSummary, QueueState, RecipientSummary, RecoveryReport, SpoolSnapshot,
    SpoolStats,
};
pub use writer::MessageWriter;

use error::with_qid;
use index::{Entry, Index};
use log::{Flush, Log, Segment};
use record::DoneReason;
use space::Space;
use summary::{list_corrupt, read_commit, summarize};

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
    /// Bytes of freshly committed envelopes and one-chunk bodies kept in memory for the
    /// scheduler's first attempt ([`Spool::take_message`]; a body counts until the attempt
    /// drops it); 0 reads everything from disk. Default 8 MiB.
    pub fresh_budget: usize,
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
            fresh_budget: 8 << 20,
        }
    }
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
    fresh: Mutex<fresh::Fresh>,
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

impl Spool {
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
        Ok(MessageWriter::new(self.clone(), inner.ids.next(), envelope))
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

    /// The message's envelope and body for a delivery attempt: the envelope its writer
    /// committed, handed over from memory if it is still held (once per message; see
    /// `fresh`), otherwise read from the Commit record like [`Spool::read_envelope`]; the
    /// body only if it is still held too (a message that fitted in one chunk, within the
    /// fresh budget): the same octets [`Spool::open_body`] reads. Without it, read the body
    /// from the spool.
    pub fn take_message(&self, qid: QueueId) -> Result<(Envelope, Option<HeldBody>), SpoolError> {
        let held = lock(&self.handle.inner.fresh).take(qid);
        match held {
            Some(held) => Ok(held),
            None => Ok((self.read_envelope(qid)?, None)),
        }
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
        Ok(BodyReader::new(parts, e.body_len, e.body_crc))
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

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_flush;
#[cfg(test)]
mod tests_fresh;
#[cfg(test)]
mod tests_poison;
#[cfg(test)]
mod tests_record;
#[cfg(test)]
mod tests_trouble;
