//! [`BodyReader`]: a message body read back from its chunks, with its length and CRC
//! checked at the end (a mismatch is an `InvalidData` error, never silently short data).
//! Read as a stream ([`Read`]) or chunk by chunk into buffers of their own that are never
//! zeroed first ([`BodyReader::next_chunk`]).

use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::log::Segment;

/// The most [`BodyReader::next_chunk`] reads at once, whatever the chunk records' size.
const MAX_CHUNK_READ: u64 = 1 << 20;

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

impl BodyReader {
    /// The rest of the current chunk (all of the next one, unless the reader was used as a
    /// [`Read`] part-way; at most [`MAX_CHUNK_READ`]), read into a buffer of exactly its
    /// size, not zeroed first; `None` after the last chunk, once the length and the CRC
    /// matched.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            let Some((seg, off, len)) = self.parts.get(self.part) else {
                return self.finish().map(|()| None);
            };
            if self.pos == *len {
                self.part += 1;
                self.pos = 0;
                continue;
            }
            let n = (len - self.pos).min(MAX_CHUNK_READ) as usize;
            let at = off + self.pos;
            let mut chunk = Vec::with_capacity(n);
            while chunk.len() < n {
                let from = at + chunk.len() as u64;
                match rustix::io::pread(&seg.file, rustix::buffer::spare_capacity(&mut chunk), from)
                {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // `with_capacity` gives exactly `n`; should an allocator give more, what was
            // read past the chunk is not the body's.
            chunk.truncate(n);
            self.crc.update(&chunk);
            self.pos += n as u64;
            self.read += n as u64;
            return Ok(Some(chunk));
        }
    }

    /// The end of the body: its length and CRC must match the Commit's.
    fn finish(&mut self) -> io::Result<()> {
        let crc = std::mem::take(&mut self.crc).finalize();
        self.crc = crc32fast::Hasher::new_with_initial(crc);
        if self.read != self.expect_len || crc != self.expect_crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "spool body checksum mismatch",
            ));
        }
        Ok(())
    }
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some((seg, off, len)) = self.parts.get(self.part) else {
                return self.finish().map(|()| 0);
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
