//! The on-disk record format of the spool log.
//!
//! A segment file (`NNNNNNNN.seg`) is a 32-byte segment header followed by records. Every
//! integer is little-endian.
//!
//! ```text
//! segment header (32 bytes)
//!   0  magic     "PSTNSEG\0"
//!   8  version   u16 = 1            format version of every record in the file
//!  10  node      u16                node_id of the gateway that wrote it
//!  12  number    u32                segment number (= file name)
//!  16  created   u64                microseconds since the Unix epoch
//!  24  crc       u32                CRC-32 of bytes 0..24
//!  28  zero      u32
//!
//! record = header (16 bytes) + payload
//!   0  magic     u32 = 0x52535053   "SPSR"
//!   4  kind      u8                 1 Chunk, 2 Commit, 3 Ledger, 4 Done, 5 Hold, 6 Release
//!   5  flags     u8                 Commit: bit 0 = copy written by compaction
//!   6  zero      u16
//!   8  len       u32                payload length (at most MAX_PAYLOAD)
//!  12  crc       u32                CRC-32 of header bytes 4..12, then of the covered payload
//! ```
//!
//! The CRC covers the whole payload except for `Chunk`, where it covers only the queue id:
//! recovery reads record headers and *seeks past* body data, so it does not read every body
//! on start. Bodies are checked as a whole instead, against the length and CRC in their
//! `Commit` record, each time a body is read ([`super::Spool::open_body`]).
//!
//! Payloads (`qid` is 10 bytes: arrival µs u64 + node u16; `str` is u32 length + UTF-8):
//!
//! | kind | payload |
//! |---|---|
//! | Chunk | qid, body bytes (the message as received, CRLF line ends, not dot-stuffed) |
//! | Commit | qid, body_len u64, body_crc u32, envelope (layout in `envelope`). The END marker: a message is acknowledged only once its Commit is on stable storage |
//! | Ledger | qid, recipient index u32, state u8 (0 pending, 1 in doubt, 2 delivered, 3 deferred, 4 bounced), until µs u64 (deferred; else 0), reply str |
//! | Done | qid, reason u8 (0 finished, 1 deleted, 2 quarantined, 3 store failed) |
//! | Hold, Release | qid |
//!
//! The envelope's layout is in `envelope` ([`Envelope`]); the primitives (integers,
//! strings, options) and [`FormatError`] in `wire`. Both are re-exported here.
//!
//! Golden files for every record kind are in `src/spool/testdata/` (`UPDATE_GOLDEN=1` rewrites
//! them; a change to a golden file is a format change and needs a version bump); the tests
//! are in `tests_record.rs`.

use super::envelope;
use super::id::{QUEUE_ID_BYTES, QueueId};
use super::ledger::RecipientState;
use super::wire::{Reader, le32, le64, put_str};

pub use super::envelope::{Envelope, EnvelopeRecipient};
pub use super::wire::FormatError;

/// Segment file magic.
pub const SEGMENT_MAGIC: &[u8; 8] = b"PSTNSEG\0";
/// Format version written in every segment header.
pub const FORMAT_VERSION: u16 = 1;
/// Length of the segment header.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// Record magic ("SPSR" read as bytes).
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"SPSR");
/// Length of a record header.
pub const HEADER_LEN: usize = 16;
/// Largest payload a record may have (envelopes with many recipients stay far below).
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Commit flag: this record is a copy written by compaction, not a new arrival.
pub const FLAG_MOVED: u8 = 1;
/// Ledger flag: the DSN this final state owes (if any) is queued; none is due for it again.
pub const FLAG_REPORTED: u8 = 1;
/// Hold flag: the hold is a poison-message quarantine (the scheduler put it there after
/// `delivery.poison_attempts` abnormal attempts), not an operator's hold.
pub const FLAG_POISON: u8 = 1;

/// Record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// Body bytes of a message being received.
    Chunk = 1,
    /// Envelope and body checksum: the END marker of a message.
    Commit = 2,
    /// One recipient's new state.
    Ledger = 3,
    /// The message is gone from the queue.
    Done = 4,
    /// Operator hold.
    Hold = 5,
    /// Operator release.
    Release = 6,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Chunk,
            2 => Self::Commit,
            3 => Self::Ledger,
            4 => Self::Done,
            5 => Self::Hold,
            6 => Self::Release,
            _ => return None,
        })
    }
}

/// Why a message left the queue (the payload of `Done`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoneReason {
    /// Every recipient reached a final state (and any DSN was queued).
    Finished = 0,
    /// Deleted by the operator.
    Deleted = 1,
    /// Moved to the corrupt queue.
    Quarantined = 2,
    /// The store failed after the Commit was written (the client got 4xx).
    StoreFailed = 3,
}

impl DoneReason {
    /// The reason as logs name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Finished => "finished",
            Self::Deleted => "deleted",
            Self::Quarantined => "quarantined",
            Self::StoreFailed => "store failed",
        }
    }
}

/// A segment file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Segment number.
    pub number: u32,
    /// The writing gateway's node id.
    pub node: u16,
    /// Creation time, µs since the epoch.
    pub created: u64,
}

impl SegmentHeader {
    /// The 32 header bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[..8].copy_from_slice(SEGMENT_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&self.node.to_le_bytes());
        b[12..16].copy_from_slice(&self.number.to_le_bytes());
        b[16..24].copy_from_slice(&self.created.to_le_bytes());
        let crc = crc32fast::hash(&b[..24]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads and checks a segment header.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let b = b.get(..SEGMENT_HEADER_LEN).ok_or(FormatError::Truncated)?;
        if &b[..8] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if crc32fast::hash(&b[..24]) != le32(&b[24..28]) {
            return Err(FormatError::BadCrc);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        Ok(Self {
            node: u16::from_le_bytes([b[10], b[11]]),
            number: le32(&b[12..16]),
            created: le64(&b[16..24]),
        })
    }
}

/// A parsed record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Record kind.
    pub kind: RecordKind,
    /// Kind-specific flags.
    pub flags: u8,
    /// Payload length.
    pub len: u32,
    /// Stored checksum.
    pub crc: u32,
}

impl RecordHeader {
    /// Parses the 16 header bytes (magic, kind and length only; the CRC needs the payload).
    pub fn parse(b: &[u8]) -> Result<Self, FormatError> {
        let b = b.get(..HEADER_LEN).ok_or(FormatError::Truncated)?;
        if le32(&b[..4]) != RECORD_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let kind = RecordKind::from_u8(b[4]).ok_or(FormatError::UnknownKind(b[4]))?;
        let len = le32(&b[8..12]);
        if len > MAX_PAYLOAD || b[6] != 0 || b[7] != 0 {
            return Err(FormatError::BadValue("record header"));
        }
        Ok(Self {
            kind,
            flags: b[5],
            len,
            crc: le32(&b[12..16]),
        })
    }

    /// How many payload bytes the CRC covers.
    pub fn covered(&self) -> usize {
        match self.kind {
            RecordKind::Chunk => QUEUE_ID_BYTES.min(self.len as usize),
            _ => self.len as usize,
        }
    }

    /// Checks the CRC against the header bytes and the covered payload prefix.
    pub fn verify(&self, header: &[u8], covered: &[u8]) -> Result<(), FormatError> {
        let mut h = crc32fast::Hasher::new();
        h.update(header.get(4..12).ok_or(FormatError::Truncated)?);
        h.update(covered);
        if h.finalize() == self.crc {
            Ok(())
        } else {
            Err(FormatError::BadCrc)
        }
    }

    /// Header plus payload length.
    pub fn total_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.len)
    }
}

/// A decoded record (the chunk's body bytes are not part of it: recovery skips them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Body bytes of `qid`; `len` bytes follow the queue id.
    Chunk {
        /// The message.
        qid: QueueId,
        /// Body bytes in the record.
        len: u32,
    },
    /// The END marker.
    Commit {
        /// The message.
        qid: QueueId,
        /// Total body length.
        body_len: u64,
        /// CRC-32 of the whole body.
        body_crc: u32,
        /// The envelope.
        envelope: Envelope,
    },
    /// A recipient's new state.
    Ledger {
        /// The message.
        qid: QueueId,
        /// Index into the envelope's recipients.
        rcpt: u32,
        /// The new state.
        state: RecipientState,
        /// The DSN this final state owes is queued (flag [`FLAG_REPORTED`]).
        reported: bool,
        /// For an in-doubt state: delivery attempts started since the recipient's last
        /// normal end, this one included (kept in the `until` field, unused by in-doubt
        /// records; 0 in records written before attempts were counted).
        attempts: u32,
    },
    /// The message left the queue.
    Done {
        /// The message.
        qid: QueueId,
        /// Why.
        reason: DoneReason,
    },
    /// Operator hold, or poison quarantine.
    Hold {
        /// The message.
        qid: QueueId,
        /// A quarantine (flag [`FLAG_POISON`]).
        poison: bool,
    },
    /// Operator release.
    Release {
        /// The message.
        qid: QueueId,
    },
}

impl Record {
    /// The message the record belongs to.
    pub fn qid(&self) -> QueueId {
        match self {
            Self::Chunk { qid, .. }
            | Self::Commit { qid, .. }
            | Self::Ledger { qid, .. }
            | Self::Done { qid, .. }
            | Self::Hold { qid, .. }
            | Self::Release { qid } => *qid,
        }
    }

    /// Decodes the covered payload of a verified record.
    pub fn decode(h: &RecordHeader, covered: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader(covered);
        let qid = r.qid()?;
        let rec = match h.kind {
            RecordKind::Chunk => {
                return Ok(Self::Chunk {
                    qid,
                    len: h.len.saturating_sub(QUEUE_ID_BYTES as u32),
                });
            }
            RecordKind::Commit => Self::Commit {
                qid,
                body_len: r.u64()?,
                body_crc: r.u32()?,
                envelope: envelope::decode(&mut r)?,
            },
            RecordKind::Ledger => {
                let rcpt = r.u32()?;
                let tag = r.u8()?;
                let until = r.u64()?;
                let reply = r.string()?;
                Self::Ledger {
                    qid,
                    rcpt,
                    state: RecipientState::from_parts(tag, until, reply)
                        .ok_or(FormatError::BadValue("ledger state"))?,
                    reported: h.flags & FLAG_REPORTED != 0,
                    attempts: if tag == 1 {
                        u32::try_from(until).unwrap_or(u32::MAX)
                    } else {
                        0
                    },
                }
            }
            RecordKind::Done => Self::Done {
                qid,
                reason: match r.u8()? {
                    0 => DoneReason::Finished,
                    1 => DoneReason::Deleted,
                    2 => DoneReason::Quarantined,
                    3 => DoneReason::StoreFailed,
                    _ => return Err(FormatError::BadValue("done reason")),
                },
            },
            RecordKind::Hold => Self::Hold {
                qid,
                poison: h.flags & FLAG_POISON != 0,
            },
            RecordKind::Release => Self::Release { qid },
        };
        if !r.0.is_empty() {
            return Err(FormatError::BadValue("trailing bytes"));
        }
        Ok(rec)
    }
}

/// Parses and verifies one complete record in `buf` (header + payload).
pub fn parse_full(buf: &[u8]) -> Result<(RecordHeader, Record), FormatError> {
    let h = RecordHeader::parse(buf)?;
    let payload = buf
        .get(HEADER_LEN..HEADER_LEN + h.len as usize)
        .ok_or(FormatError::Truncated)?;
    let covered = &payload[..h.covered()];
    h.verify(buf, covered)?;
    Ok((h, Record::decode(&h, covered)?))
}

/// Appends a record with the given kind, flags and payload writer to `out`.
fn frame(out: &mut Vec<u8>, kind: RecordKind, flags: u8, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    // Room for the header and a typical payload (ledger, done, hold), so a fresh buffer is
    // allocated once instead of growing field by field.
    out.reserve(HEADER_LEN + 128);
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&[kind as u8, flags, 0, 0]);
    out.extend_from_slice(&[0; 8]);
    payload(out);
    let len = (out.len() - start - HEADER_LEN) as u32;
    out[start + 8..start + 12].copy_from_slice(&len.to_le_bytes());
    let covered = match kind {
        RecordKind::Chunk => QUEUE_ID_BYTES,
        _ => len as usize,
    };
    let mut h = crc32fast::Hasher::new();
    h.update(&out[start + 4..start + 12]);
    h.update(&out[start + HEADER_LEN..start + HEADER_LEN + covered]);
    let crc = h.finalize();
    out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
}

/// The header and queue id of a Chunk record of `len` body bytes: written followed by the
/// bytes themselves (a vectored write, so the body is not copied into a record buffer).
/// The same bytes as [`encode_chunk`]'s up to the body.
pub fn chunk_head(qid: QueueId, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + QUEUE_ID_BYTES);
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&[RecordKind::Chunk as u8, 0, 0, 0]);
    out.extend_from_slice(&((QUEUE_ID_BYTES + len) as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&qid.to_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[4..12]);
    h.update(&out[HEADER_LEN..]);
    let crc = h.finalize();
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Appends a Chunk record.
pub fn encode_chunk(out: &mut Vec<u8>, qid: QueueId, data: &[u8]) {
    frame(out, RecordKind::Chunk, 0, |o| {
        o.extend_from_slice(&qid.to_bytes());
        o.extend_from_slice(data);
    });
}

/// Appends a Commit record.
pub fn encode_commit(
    out: &mut Vec<u8>,
    qid: QueueId,
    flags: u8,
    body_len: u64,
    body_crc: u32,
    env: &Envelope,
) {
    frame(out, RecordKind::Commit, flags, |o| {
        o.extend_from_slice(&qid.to_bytes());
        o.extend_from_slice(&body_len.to_le_bytes());
        o.extend_from_slice(&body_crc.to_le_bytes());
        envelope::encode(o, env);
    });
}

/// Appends a Ledger record.
pub fn encode_ledger(out: &mut Vec<u8>, qid: QueueId, rcpt: u32, state: &RecipientState) {
    encode_ledger_flagged(out, qid, rcpt, state, false);
}

/// Appends a Ledger record; `reported`: the DSN the (final) state owes is queued.
pub fn encode_ledger_flagged(
    out: &mut Vec<u8>,
    qid: QueueId,
    rcpt: u32,
    state: &RecipientState,
    reported: bool,
) {
    let (tag, until, reply) = state.parts();
    encode_ledger_parts(out, qid, rcpt, (tag, until, reply), reported);
}

/// Appends a Ledger record from its parts (tag, `until` field, reply): for an in-doubt
/// state, `until` carries the attempt count ([`Record::Ledger`]'s `attempts`).
pub fn encode_ledger_parts(
    out: &mut Vec<u8>,
    qid: QueueId,
    rcpt: u32,
    (tag, until, reply): (u8, u64, &str),
    reported: bool,
) {
    let flags = if reported { FLAG_REPORTED } else { 0 };
    frame(out, RecordKind::Ledger, flags, |o| {
        o.extend_from_slice(&qid.to_bytes());
        o.extend_from_slice(&rcpt.to_le_bytes());
        o.push(tag);
        o.extend_from_slice(&until.to_le_bytes());
        put_str(o, reply);
    });
}

/// Appends a Done record.
pub fn encode_done(out: &mut Vec<u8>, qid: QueueId, reason: DoneReason) {
    frame(out, RecordKind::Done, 0, |o| {
        o.extend_from_slice(&qid.to_bytes());
        o.push(reason as u8);
    });
}

/// Appends a Hold (`hold`) or Release record.
pub fn encode_hold(out: &mut Vec<u8>, qid: QueueId, hold: bool) {
    let kind = if hold {
        RecordKind::Hold
    } else {
        RecordKind::Release
    };
    frame(out, kind, 0, |o| o.extend_from_slice(&qid.to_bytes()));
}

/// Appends a Hold record flagged [`FLAG_POISON`]: the message is quarantined.
pub fn encode_quarantine(out: &mut Vec<u8>, qid: QueueId) {
    frame(out, RecordKind::Hold, FLAG_POISON, |o| {
        o.extend_from_slice(&qid.to_bytes());
    });
}
