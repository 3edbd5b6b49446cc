//! The startup scan: rebuild the index from the log.
//!
//! Segments are read oldest first through a 1 MiB window; for each record the scan reads the
//! header and the CRC-covered payload and *skips* chunk body bytes (for large bodies the
//! window jumps past them; small ones come in with the window anyway). Records apply in log
//! order:
//!
//! - `Chunk` adds an extent to the message's partial body;
//! - `Commit` makes the message live with all recipients pending, if its chunks add up to
//!   its body length (otherwise it goes to the corrupt queue). A later Commit for the same
//!   id (a compaction copy) replaces the earlier one;
//! - `Ledger`, `Hold`, `Release` update a live message; `Done` removes it.
//!
//! At the end, chunks without a Commit are partial messages: dropped, never acknowledged.
//!
//! **Damage.** A record whose header or CRC is bad starts an unreadable region; the scan
//! looks for the next valid record (magic plus a matching CRC) and goes on from there,
//! logging the region. If nothing valid follows in the *last* segment, the region is a torn
//! tail (a crash during an unsynced write): it is truncated. Zeros to the end of a segment
//! are not damage: they were written ahead of the appends (`log::PREALLOCATE`), and the
//! last segment is truncated there. Nothing acknowledged can be in
//! a torn tail, because acknowledgement waits for the fdatasync that covers every byte
//! before it. When the bad record still names a queue id whose Commit never appears, that
//! message goes to the corrupt queue rather than being dropped as partial: its Commit may
//! have been the damaged record. Recovery never panics on bad data.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::id::{QUEUE_ID_BYTES, QueueId};
use super::index::{Entry, Extent, Index};
use super::ledger::CompactState;
use super::log::{Loc, Segment, parse_segment_name};
use super::record::{
    HEADER_LEN, RECORD_MAGIC, Record, RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader,
};
use super::{RecoveryReport, SpoolError};

const WINDOW: usize = 1 << 20;

/// The outcome of a scan.
#[derive(Debug)]
pub(crate) struct Scanned {
    pub(crate) index: Index,
    pub(crate) segments: BTreeMap<u32, Arc<Segment>>,
    pub(crate) report: RecoveryReport,
    pub(crate) max_micros: u64,
    /// Messages to move to the corrupt queue: id, reason, body bytes found.
    pub(crate) quarantine: Vec<(QueueId, String, Vec<u8>)>,
    /// The last segment ends in garbage from this offset: truncate it.
    pub(crate) torn_tail: Option<(u32, u64)>,
}

/// Scans every segment in `dir`. With `read_only`, segments are opened read-only and no
/// file is changed (the caller does not truncate).
pub(crate) fn scan(dir: &Path, read_only: bool) -> Result<Scanned, SpoolError> {
    let mut numbers = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if let Some(n) = e.file_name().to_str().and_then(parse_segment_name) {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    let mut b = Builder::default();
    let mut segments = BTreeMap::new();
    let mut torn_tail = None;
    let last = numbers.last().copied();
    for &n in &numbers {
        let path = dir.join(super::log::segment_name(n));
        let file = match File::open(&path) {
            Ok(f) => f,
            // Read-only scans race the daemon's garbage collector: a vanished segment was dead.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        let is_tail = Some(n) == last;
        let end = scan_segment(n, &file, is_tail, &mut b)?;
        if let Some(end) = end
            && is_tail
            && !read_only
        {
            torn_tail = Some((n, end));
        }
        b.report.segments += 1;
        segments.insert(n, Arc::new(Segment { number: n, file }));
    }
    Ok(b.finish(segments, torn_tail))
}

#[derive(Default)]
struct Builder {
    index: Index,
    partial: HashMap<QueueId, Vec<Extent>>,
    quarantine: HashMap<QueueId, (String, Vec<Extent>)>,
    suspects: HashSet<QueueId>,
    report: RecoveryReport,
    max_micros: u64,
}

impl Builder {
    fn apply(&mut self, seg: u32, off: u64, h: &RecordHeader, rec: Record) {
        self.report.records += 1;
        let qid = rec.qid();
        self.max_micros = self.max_micros.max(qid.micros());
        let loc = Loc {
            seg,
            off: off as u32,
        };
        let total = h.total_len() as u32;
        match rec {
            Record::Chunk { len, .. } => self.partial.entry(qid).or_default().push(Extent {
                seg,
                off: (off + (HEADER_LEN + QUEUE_ID_BYTES) as u64) as u32,
                len,
            }),
            Record::Commit {
                body_len,
                body_crc,
                envelope,
                ..
            } => {
                let extents = self.partial.remove(&qid).unwrap_or_default();
                let have: u64 = extents.iter().map(|e| u64::from(e.len)).sum();
                if have != body_len {
                    self.index.map.remove(&qid);
                    self.quarantine.insert(
                        qid,
                        (format!("body has {have} of its {body_len} bytes"), extents),
                    );
                    return;
                }
                self.quarantine.remove(&qid);
                let e = Entry::new(
                    loc,
                    total,
                    extents,
                    body_len,
                    body_crc,
                    envelope.recipients.len(),
                );
                self.index.map.insert(qid, e);
            }
            Record::Ledger {
                rcpt,
                state,
                reported,
                attempts,
                ..
            } => {
                if let Some(slot) = self
                    .index
                    .map
                    .get_mut(&qid)
                    .and_then(|e| e.rcpts.get_mut(rcpt as usize))
                {
                    let mut compact = CompactState {
                        reported,
                        ..CompactState::of(&state)
                    };
                    if compact.is_in_doubt() {
                        compact.until = u64::from(attempts);
                    }
                    slot.state = compact;
                    slot.ledger = Some((loc, total));
                }
            }
            Record::Done { .. } => {
                self.index.map.remove(&qid);
                self.partial.remove(&qid);
                self.quarantine.remove(&qid);
                self.suspects.remove(&qid);
            }
            Record::Hold { poison, .. } => {
                if let Some(e) = self.index.map.get_mut(&qid) {
                    e.hold = Some((loc, total));
                    e.poison = poison;
                }
            }
            Record::Release { .. } => {
                if let Some(e) = self.index.map.get_mut(&qid) {
                    e.hold = None;
                    e.poison = false;
                }
            }
        }
    }

    fn finish(
        mut self,
        segments: BTreeMap<u32, Arc<Segment>>,
        torn_tail: Option<(u32, u64)>,
    ) -> Scanned {
        for (qid, extents) in std::mem::take(&mut self.partial) {
            if self.suspects.contains(&qid) && !self.index.map.contains_key(&qid) {
                self.quarantine
                    .insert(qid, ("its commit record is unreadable".into(), extents));
            } else {
                self.report.partial_dropped += 1;
            }
        }
        let mut quarantine = Vec::new();
        for (qid, (reason, extents)) in self.quarantine {
            let mut body = Vec::new();
            for x in extents {
                if let Some(s) = segments.get(&x.seg) {
                    let mut b = vec![0; x.len as usize];
                    if s.file.read_exact_at(&mut b, u64::from(x.off)).is_ok() {
                        body.extend_from_slice(&b);
                    }
                }
            }
            quarantine.push((qid, reason, body));
        }
        let numbers: Vec<u32> = segments.keys().copied().collect();
        self.index.rebuild_usage(&numbers);
        self.report.messages = self.index.map.len();
        self.report.quarantined = quarantine.len();
        self.report.recipients = self
            .index
            .map
            .values()
            .flat_map(|e| e.rcpts.iter())
            .filter(|s| !s.state.is_final())
            .count();
        self.report.in_doubt = self
            .index
            .map
            .values()
            .flat_map(|e| e.rcpts.iter())
            .filter(|s| s.state.is_in_doubt())
            .count();
        if let Some((_, end)) = torn_tail
            && let Some(s) = numbers.last().and_then(|n| segments.get(n))
            && let Ok(m) = s.file.metadata()
        {
            self.report.truncated_bytes = m.len().saturating_sub(end);
        }
        Scanned {
            index: self.index,
            segments,
            report: self.report,
            max_micros: self.max_micros,
            quarantine,
            torn_tail,
        }
    }
}

/// A read window over a segment file.
struct Window<'a> {
    file: &'a File,
    len: u64,
    buf: Vec<u8>,
    start: u64,
    filled: usize,
}

impl<'a> Window<'a> {
    fn new(file: &'a File, len: u64) -> Self {
        Self {
            file,
            len,
            buf: Vec::new(),
            start: 0,
            filled: 0,
        }
    }

    /// `n` bytes at `off`, or `None` past the end of the file.
    fn at(&mut self, off: u64, n: usize) -> io::Result<Option<&[u8]>> {
        if off + n as u64 > self.len {
            return Ok(None);
        }
        let inside = off >= self.start && off + n as u64 <= self.start + self.filled as u64;
        if !inside {
            let want = n.max(WINDOW).min((self.len - off) as usize);
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            self.file.read_exact_at(&mut self.buf[..want], off)?;
            self.start = off;
            self.filled = want;
        }
        let s = (off - self.start) as usize;
        Ok(Some(&self.buf[s..s + n]))
    }
}

enum Step {
    Record(RecordHeader, Record),
    Bad(Option<QueueId>),
}

fn read_record(w: &mut Window<'_>, off: u64) -> io::Result<Step> {
    let Some(hb) = w.at(off, HEADER_LEN)? else {
        return Ok(Step::Bad(None));
    };
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(hb);
    let Ok(h) = RecordHeader::parse(&header) else {
        return Ok(Step::Bad(None));
    };
    if off + h.total_len() > w.len {
        return Ok(Step::Bad(hint(w, off)?));
    }
    let Some(covered) = w.at(off + HEADER_LEN as u64, h.covered())? else {
        return Ok(Step::Bad(None));
    };
    if h.verify(&header, covered).is_err() {
        return Ok(Step::Bad(hint(w, off)?));
    }
    match Record::decode(&h, covered) {
        Ok(r) => Ok(Step::Record(h, r)),
        Err(_) => Ok(Step::Bad(hint(w, off)?)),
    }
}

/// The queue id a damaged record seems to name (magic and kind were plausible).
fn hint(w: &mut Window<'_>, off: u64) -> io::Result<Option<QueueId>> {
    Ok(w.at(off + HEADER_LEN as u64, QUEUE_ID_BYTES)?.map(|b| {
        let mut a = [0; QUEUE_ID_BYTES];
        a.copy_from_slice(b);
        QueueId::from_bytes(&a)
    }))
}

/// Finds the next offset after `from` where a valid record starts.
fn resync(w: &mut Window<'_>, from: u64) -> io::Result<Option<u64>> {
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut pos = from;
    while pos + HEADER_LEN as u64 <= w.len {
        let n = (w.len - pos).min(WINDOW as u64) as usize;
        let candidates: Vec<u64> = match w.at(pos, n)? {
            Some(b) => b
                .windows(4)
                .enumerate()
                .filter(|(_, x)| *x == magic)
                .map(|(i, _)| pos + i as u64)
                .collect(),
            None => break,
        };
        for c in candidates {
            if let Step::Record(..) = read_record(w, c)? {
                return Ok(Some(c));
            }
        }
        // Overlap by 3 bytes so a magic split across windows is found.
        pos += (n as u64).saturating_sub(3).max(1);
    }
    Ok(None)
}

/// Is everything from `from` to the end of the file zero?
fn zeros_to_end(w: &mut Window<'_>, from: u64) -> io::Result<bool> {
    let mut pos = from;
    while pos < w.len {
        let n = (w.len - pos).min(WINDOW as u64) as usize;
        match w.at(pos, n)? {
            Some(b) if b.iter().all(|&x| x == 0) => pos += n as u64,
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// Scans one segment; returns where the valid data ends if garbage (or, in the last
/// segment, the preallocated zeros) runs to the end.
fn scan_segment(n: u32, file: &File, is_tail: bool, b: &mut Builder) -> io::Result<Option<u64>> {
    let len = file.metadata()?.len();
    let mut w = Window::new(file, len);
    match w.at(0, SEGMENT_HEADER_LEN)?.map(SegmentHeader::decode) {
        Some(Ok(h)) if h.number == n => {}
        Some(Ok(h)) => {
            tracing::error!(
                segment = n,
                header = h.number,
                "segment header names another number"
            );
            b.report.corrupt_regions += 1;
        }
        None if is_tail => {
            // Created, header not yet written, when the process died: nothing in it.
            return Ok(Some(0));
        }
        _ => {
            tracing::error!(
                segment = n,
                "unreadable segment header; scanning its records"
            );
            b.report.corrupt_regions += 1;
        }
    }
    let mut pos = SEGMENT_HEADER_LEN as u64;
    while pos < len {
        match read_record(&mut w, pos)? {
            Step::Record(h, rec) => {
                b.apply(n, pos, &h, rec);
                pos += h.total_len();
            }
            // The zeros written ahead of the appends (log::PREALLOCATE): the clean end.
            Step::Bad(_) if zeros_to_end(&mut w, pos)? => {
                return Ok(is_tail.then_some(pos));
            }
            Step::Bad(hinted) => match resync(&mut w, pos + 1)? {
                Some(next) => {
                    tracing::error!(
                        segment = n,
                        from = pos,
                        to = next,
                        "unreadable records skipped in the spool log"
                    );
                    b.report.corrupt_regions += 1;
                    b.suspects.extend(hinted);
                    pos = next;
                }
                None => {
                    if !is_tail {
                        tracing::error!(
                            segment = n,
                            from = pos,
                            "unreadable end of a spool segment"
                        );
                        b.report.corrupt_regions += 1;
                        b.suspects.extend(hinted);
                    }
                    return Ok(Some(pos));
                }
            },
        }
    }
    Ok(None)
}

/// The operator's start-up line: `recovered 12 messages, 30 recipients in 0.27 s`, then what
/// needs a look, when any (in doubt, dropped, quarantined, corrupt, truncated).
impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recovered {} messages, {} recipients in {:.2} s",
            self.messages,
            self.recipients,
            self.elapsed.as_secs_f64()
        )?;
        let notes = [
            (self.in_doubt, "recipients in doubt"),
            (self.partial_dropped, "partial messages dropped"),
            (self.quarantined, "messages quarantined"),
            (self.corrupt_regions, "corrupt regions skipped"),
        ];
        for (n, what) in notes {
            if n > 0 {
                write!(f, "; {n} {what}")?;
            }
        }
        if self.truncated_bytes > 0 {
            write!(f, "; {} torn bytes truncated", self.truncated_bytes)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_start_up_line_reads_as_a_sentence() {
        let mut r = RecoveryReport {
            messages: 12,
            recipients: 30,
            elapsed: Duration::from_millis(270),
            ..RecoveryReport::default()
        };
        assert_eq!(
            r.to_string(),
            "recovered 12 messages, 30 recipients in 0.27 s"
        );
        r.in_doubt = 2;
        r.truncated_bytes = 17;
        assert_eq!(
            r.to_string(),
            "recovered 12 messages, 30 recipients in 0.27 s; 2 recipients in doubt; \
             17 torn bytes truncated"
        );
    }
}
