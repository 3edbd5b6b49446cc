//! Segment files: their names, creating one (header, then zeros written ahead of the
//! appends), and the positioned writes into them. No state: the log owns the files.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::error::SpoolError;
use super::micros::to_micros;
use super::record::{SEGMENT_HEADER_LEN, SegmentHeader};

/// Segments are extended by writing this many zero bytes ahead of the appends, so that an
/// append changes no file metadata and its `fdatasync` needs no journal commit: one device
/// flush per batch, not two or three. The size changes once per step.
pub(crate) const PREALLOCATE: u64 = 1 << 20;

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

/// A new active segment and how far its file is written.
pub(crate) struct Created {
    pub(crate) segment: Arc<Segment>,
    pub(crate) prealloc: u64,
}

/// Creates segment `n` with its header and its first [`PREALLOCATE`] zero bytes (none of
/// it synced yet).
pub(crate) fn create_active_segment(
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
pub(crate) fn write_all_parts_at(file: &File, parts: &[&[u8]], off: u64) -> io::Result<()> {
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

/// Writes zeros over `[from, to)` of `file`.
pub(crate) fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
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
