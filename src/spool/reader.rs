//! [`BodyReader`]: a message body read back from its chunks, with its length and CRC
//! checked at the end (a mismatch is an `InvalidData` error, never silently short data).

use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::log::Segment;

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

impl BodyReader {
    /// A reader over `parts` (segment, offset, length), expecting `expect_len` bytes with
    /// CRC-32 `expect_crc`.
    pub(super) fn new(
        parts: Vec<(Arc<Segment>, u64, u64)>,
        expect_len: u64,
        expect_crc: u32,
    ) -> Self {
        Self {
            parts,
            part: 0,
            pos: 0,
            crc: crc32fast::Hasher::new(),
            read: 0,
            expect_len,
            expect_crc,
        }
    }
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
