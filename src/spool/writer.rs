//! [`MessageWriter`]: a message being stored. Body bytes go to the log as Chunk records;
//! [`MessageWriter::commit`] appends the Commit record and returns the promise that the
//! message is on stable storage. A writer dropped without a commit abandons the message.
//!
//! The writer keeps the bytes it is given, not copies of them: owned pieces
//! ([`MessageWriter::write_owned`]) wait as they are until they fill a chunk, and a chunk
//! record is written from them, and from the caller's slice that completes it, with one
//! `pwritev`. Only pieces smaller than a sixteenth of a chunk are copied (see
//! [`MessageWriter::keep`]), so a chunk record takes a bounded number of iovecs however
//! the client splits its writes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::error::SpoolError;
use super::id::{self, QueueId};
use super::index::{Entry, Extent};
use super::log::{Durable, Flush, Loc, Reg};
use super::record::{self, Envelope, HEADER_LEN};
use super::{Spool, lock};

/// A message being written. Body bytes are kept and appended as Chunk records (not
/// synced); [`MessageWriter::commit`] appends the Commit record and returns the promise.
/// Dropping the writer without committing abandons the message (its chunks are garbage).
#[derive(Debug)]
pub struct MessageWriter {
    spool: Spool,
    qid: QueueId,
    /// Taken by [`MessageWriter::commit`].
    envelope: Option<Envelope>,
    /// Bytes not yet in a Chunk record, in order; together less than a chunk.
    pending: Vec<Piece>,
    pending_len: usize,
    crc: crc32fast::Hasher,
    len: u64,
    extents: Vec<Extent>,
    /// Index pins on the segments holding this message's chunks, so the garbage collector
    /// cannot delete them before the Commit (which pins them for good).
    pins: Vec<(u32, u64)>,
    failed: Option<SpoolError>,
}

/// Body bytes waiting for their Chunk record: `bytes[from..]`.
#[derive(Debug)]
struct Piece {
    bytes: Vec<u8>,
    from: usize,
}

impl Piece {
    fn octets(&self) -> &[u8] {
        self.bytes.get(self.from..).unwrap_or_default()
    }
}

impl MessageWriter {
    /// A writer for a new message (the caller counted it in `incoming`; `Drop` uncounts it).
    pub(super) fn new(spool: Spool, qid: QueueId, envelope: Envelope) -> Self {
        Self {
            spool,
            qid,
            envelope: Some(envelope),
            pending: Vec::new(),
            pending_len: 0,
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

    /// Appends body bytes. Chunks they complete are written straight from `bytes`; only
    /// what is left over, less than a chunk, is copied to wait for the next.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        let used = self.begin_write(bytes)?;
        let rest = &bytes[used..];
        if rest.len() < self.small() {
            self.keep_small(rest);
        } else {
            self.keep(Piece {
                bytes: rest.to_vec(),
                from: 0,
            });
        }
        Ok(())
    }

    /// Appends body bytes the writer may keep: what does not complete a chunk waits in
    /// `bytes` itself, not in a copy (unless it is smaller than a sixteenth of a chunk).
    pub fn write_owned(&mut self, bytes: Vec<u8>) -> Result<(), SpoolError> {
        let used = self.begin_write(&bytes)?;
        if used < bytes.len() {
            self.keep(Piece { bytes, from: used });
        }
        Ok(())
    }

    /// Counts `bytes` into the body and writes every chunk that the pending bytes and a
    /// prefix of `bytes` complete; returns the length of that prefix.
    fn begin_write(&mut self, bytes: &[u8]) -> Result<usize, SpoolError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.crc.update(bytes);
        self.len += bytes.len() as u64;
        let chunk = self.spool.handle.inner.opts.chunk_size.max(1);
        let mut used = 0;
        while self.pending_len + (bytes.len() - used) >= chunk {
            let take = chunk - self.pending_len;
            let written = self.append_chunk(&bytes[used..used + take]);
            if let Err(e) = written {
                self.failed = Some(e.clone());
                return Err(e);
            }
            used += take;
        }
        Ok(used)
    }

    /// Below this (a sixteenth of a chunk), a piece is copied rather than kept.
    fn small(&self) -> usize {
        self.spool.handle.inner.opts.chunk_size / 16
    }

    /// Keeps `piece` pending: as it is if it holds a sixteenth of a chunk or more, else
    /// copied ([`MessageWriter::keep_small`]). So nothing larger than a small piece is ever
    /// copied, a buffer is kept only for a sixteenth of a chunk or more of it (the rest of
    /// a piece that completed a chunk may be the end of a larger buffer), and a chunk record
    /// takes at most about fifty iovecs.
    fn keep(&mut self, piece: Piece) {
        let n = piece.bytes.len() - piece.from;
        if n < self.small() {
            self.keep_small(piece.octets());
        } else {
            self.pending_len += n;
            self.pending.push(piece);
        }
    }

    /// Copies `octets` (less than a sixteenth of a chunk) to the pending bytes: onto the
    /// last piece if that has room for them without growing, else into a new buffer with
    /// room for more small ones.
    fn keep_small(&mut self, octets: &[u8]) {
        let n = octets.len();
        if n == 0 {
            return;
        }
        let small = self.small();
        self.pending_len += n;
        match self.pending.last_mut() {
            Some(last) if last.bytes.capacity() - last.bytes.len() >= n => {
                last.bytes.extend_from_slice(octets);
            }
            _ => {
                let mut bytes = Vec::with_capacity(small.max(n));
                bytes.extend_from_slice(octets);
                self.pending.push(Piece { bytes, from: 0 });
            }
        }
    }

    /// Writes the pending bytes followed by `last` as one Chunk record; nothing is pending
    /// afterwards.
    fn append_chunk(&mut self, last: &[u8]) -> Result<(), SpoolError> {
        let data_len = self.pending_len + last.len();
        let head = record::chunk_head(self.qid, data_len);
        let mut parts: Vec<&[u8]> = Vec::with_capacity(self.pending.len() + 2);
        parts.push(&head);
        parts.extend(self.pending.iter().map(Piece::octets));
        parts.push(last);
        let total = (head.len() + data_len) as u64;
        let inner = &self.spool.handle.inner;
        let mut ix = lock(&inner.index);
        let a = inner.log.append_parts(&parts, Reg::None, Flush::Lazy)?;
        ix.pin(a.loc.seg, total);
        drop(ix);
        self.pending.clear();
        self.pending_len = 0;
        self.pins.push((a.loc.seg, total));
        self.extents.push(Extent {
            seg: a.loc.seg,
            off: a.loc.off + (HEADER_LEN + id::QUEUE_ID_BYTES) as u32,
            len: data_len as u32,
        });
        Ok(())
    }

    /// The pending bytes as one buffer, for a body held in memory: the one piece itself
    /// if there is just one, else a copy of them all.
    fn take_pending(&mut self) -> Vec<u8> {
        let mut pieces = std::mem::take(&mut self.pending);
        match pieces.as_mut_slice() {
            [one] if one.from == 0 => std::mem::take(&mut one.bytes),
            _ => {
                let mut whole = Vec::with_capacity(self.pending_len);
                for p in &pieces {
                    whole.extend_from_slice(p.octets());
                }
                whole
            }
        }
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
        let tail_len = self.pending_len;
        let head = if tail_len == 0 {
            Vec::new()
        } else {
            record::chunk_head(qid, tail_len)
        };
        let commit_at = head.len() + tail_len;
        let crc = std::mem::take(&mut self.crc).finalize();
        let Some(envelope) = self.envelope.take() else {
            return Durable::ready(Err(SpoolError::Invalid("the message was committed twice")));
        };
        let mut rec = Vec::with_capacity(512);
        record::encode_commit(&mut rec, qid, 0, self.len, crc, &envelope);
        let commit_len = rec.len() as u32;
        let single = self.extents.is_empty();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(self.pending.len() + 2);
        parts.push(&head);
        parts.extend(self.pending.iter().map(Piece::octets));
        parts.push(&rec);
        let mut ix = lock(&inner.index);
        let appended =
            inner
                .log
                .append_parts(&parts, Reg::Commit(qid, commit_at as u32), Flush::Now);
        drop(parts);
        match appended {
            Ok(a) => {
                let mut extents = std::mem::take(&mut self.extents);
                if tail_len > 0 {
                    extents.push(Extent {
                        seg: a.loc.seg,
                        off: a.loc.off + (HEADER_LEN + id::QUEUE_ID_BYTES) as u32,
                        len: tail_len as u32,
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
                // A body that fitted in one chunk is all pending: the first attempt takes
                // it from memory (within the budget, see `fresh`).
                let whole = single.then(|| self.take_pending());
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
