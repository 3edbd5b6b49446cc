//! [`MessageWriter`]: a message being stored. Body bytes go to the log as Chunk records;
//! [`MessageWriter::commit`] appends the Commit record and returns the promise that the
//! message is on stable storage. A writer dropped without a commit abandons the message.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::error::SpoolError;
use super::id::{self, QueueId};
use super::index::{Entry, Extent};
use super::log::{Durable, Flush, Loc, Reg};
use super::record::{self, Envelope, HEADER_LEN};
use super::{Spool, lock};

/// A message being written. Body bytes are buffered and appended as Chunk records (not
/// synced); [`MessageWriter::commit`] appends the Commit record and returns the promise.
/// Dropping the writer without committing abandons the message (its chunks are garbage).
#[derive(Debug)]
pub struct MessageWriter {
    spool: Spool,
    qid: QueueId,
    /// Taken by [`MessageWriter::commit`].
    envelope: Option<Envelope>,
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
    /// A writer for a new message (the caller counted it in `incoming`; `Drop` uncounts it).
    pub(super) fn new(spool: Spool, qid: QueueId, envelope: Envelope) -> Self {
        Self {
            spool,
            qid,
            envelope: Some(envelope),
            buf: Vec::new(),
            crc: crc32fast::Hasher::new(),
            len: 0,
            extents: Vec::new(),
            pins: Vec::new(),
            failed: None,
        }
    }

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
        let Some(envelope) = self.envelope.take() else {
            return Durable::ready(Err(SpoolError::Invalid("the message was committed twice")));
        };
        let mut rec = Vec::with_capacity(512);
        record::encode_commit(&mut rec, qid, 0, self.len, crc, &envelope);
        let commit_len = rec.len() as u32;
        let single = self.extents.is_empty();
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
                    envelope.recipients.len(),
                );
                ix.insert(qid, entry);
                for (seg, n) in self.pins.drain(..) {
                    ix.unpin(seg, n);
                }
                drop(ix);
                inner.log.faults.hit("store.after_append");
                tracing::debug!(%qid, size = self.len, rcpts = envelope.recipients.len(), "stored");
                // A body that fitted in one chunk is all in `tail`: the first attempt
                // takes it from memory (within the budget, see `fresh`).
                let whole = single.then_some(tail);
                lock(&inner.fresh).insert(qid, envelope, whole);
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
