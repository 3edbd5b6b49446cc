//! The byte-level primitives of the spool's record format: little-endian integers,
//! length-prefixed UTF-8 strings, tagged options, queue ids, and [`FormatError`].
//!
//! Owns: [`FormatError`] (re-exported as `record::FormatError`), the payload [`Reader`] and
//! the writers `put_str`/`put_opt`.
//! Promises: a read never panics and never reads past its slice: short input is
//! [`FormatError::Truncated`], a bad tag or invalid UTF-8 a [`FormatError::BadValue`].
//! Fails: with [`FormatError`] only.
//! SEE ALSO: `record` (the record framing and its layout), `envelope` (the Commit
//! record's envelope).

use super::id::{QUEUE_ID_BYTES, QueueId};

/// Why bytes are not a valid record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Fewer bytes than the structure needs.
    #[error("truncated record")]
    Truncated,
    /// Not the magic of a segment or record.
    #[error("bad magic")]
    BadMagic,
    /// Checksum mismatch.
    #[error("checksum mismatch")]
    BadCrc,
    /// A kind this version does not know.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// A segment of another format version.
    #[error("unsupported format version {0}")]
    Version(u16),
    /// A field with an impossible value.
    #[error("bad value in field {0}")]
    BadValue(&'static str),
}

pub(super) fn put_str(o: &mut Vec<u8>, s: &str) {
    o.extend_from_slice(&(s.len() as u32).to_le_bytes());
    o.extend_from_slice(s.as_bytes());
}

pub(super) fn put_opt<T>(o: &mut Vec<u8>, v: Option<T>, f: impl FnOnce(&mut Vec<u8>, T)) {
    match v {
        None => o.push(0),
        Some(v) => {
            o.push(1);
            f(o, v);
        }
    }
}

pub(super) fn le32(b: &[u8]) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(super) fn le64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// A cursor over a record's payload: each read takes its bytes off the front.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], FormatError> {
        if self.0.len() < n {
            return Err(FormatError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(super) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn bool(&mut self) -> Result<bool, FormatError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(FormatError::BadValue("flag")),
        }
    }
    pub(super) fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(le32(self.take(4)?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(le64(self.take(8)?))
    }
    pub(super) fn qid(&mut self) -> Result<QueueId, FormatError> {
        let mut b = [0; QUEUE_ID_BYTES];
        b.copy_from_slice(self.take(QUEUE_ID_BYTES)?);
        Ok(QueueId::from_bytes(&b))
    }
    pub(super) fn string(&mut self) -> Result<String, FormatError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| FormatError::BadValue("UTF-8"))
    }
    pub(super) fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, FormatError>,
    ) -> Result<Option<T>, FormatError> {
        match self.u8()? {
            0 => Ok(None),
            1 => f(self).map(Some),
            _ => Err(FormatError::BadValue("option tag")),
        }
    }
}
