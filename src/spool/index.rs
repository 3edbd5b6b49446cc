//! The in-memory index of live messages.
//!
//! One [`Entry`] per queued message, keyed by [`QueueId`]: where its Commit record and body
//! chunks are, the body length and CRC, the hold record, and per recipient the compact state
//! (tag and next attempt) plus where its latest ledger record is. Envelopes and reply texts
//! stay on disk and are read on demand, so an entry is about 150 bytes plus 32 per
//! recipient (the benchmark measures it; the budget is 1 KiB per message).
//!
//! The index also counts, per segment, the live records in it (`refs`) and their bytes.
//! A segment with no live record can go; one with few live bytes is worth compacting.

use std::collections::{BTreeMap, HashMap};

use super::id::QueueId;
use super::ledger::CompactState;
use super::log::Loc;
use super::record::HEADER_LEN;

/// A run of body bytes inside one Chunk record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) seg: u32,
    /// Offset of the body bytes (past the record header and queue id).
    pub(crate) off: u32,
    pub(crate) len: u32,
}

/// A recipient's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) state: CompactState,
    /// The latest ledger record (location, total length), if any.
    pub(crate) ledger: Option<(Loc, u32)>,
    /// The latest state could not be written yet; the committer retries it.
    pub(crate) retry: bool,
}

/// One live message.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) commit: Loc,
    pub(crate) commit_len: u32,
    pub(crate) body: Box<[Extent]>,
    pub(crate) body_len: u64,
    pub(crate) body_crc: u32,
    pub(crate) hold: Option<(Loc, u32)>,
    /// The hold is a poison quarantine (its Hold record is flagged).
    pub(crate) poison: bool,
    pub(crate) rcpts: Box<[Slot]>,
}

impl Entry {
    pub(crate) fn new(
        commit: Loc,
        commit_len: u32,
        body: Vec<Extent>,
        body_len: u64,
        body_crc: u32,
        nrcpt: usize,
    ) -> Self {
        Self {
            commit,
            commit_len,
            body: body.into_boxed_slice(),
            body_len,
            body_crc,
            hold: None,
            poison: false,
            rcpts: vec![
                Slot {
                    state: CompactState::PENDING,
                    ledger: None,
                    retry: false,
                };
                nrcpt
            ]
            .into_boxed_slice(),
        }
    }

    /// Every (segment, bytes) this entry keeps alive.
    pub(crate) fn pins(&self) -> Vec<(u32, u64)> {
        let mut v = Vec::with_capacity(2 + self.body.len() + self.rcpts.len());
        v.push((self.commit.seg, u64::from(self.commit_len)));
        for e in self.body.iter() {
            v.push((e.seg, u64::from(e.len) + HEADER_LEN as u64 + 10));
        }
        if let Some((l, n)) = self.hold {
            v.push((l.seg, u64::from(n)));
        }
        for s in self.rcpts.iter() {
            if let Some((l, n)) = s.ledger {
                v.push((l.seg, u64::from(n)));
            }
        }
        v
    }

    /// Does any live record of this entry sit in segment `seg`?
    pub(crate) fn references(&self, seg: u32) -> bool {
        self.pins().iter().any(|&(s, _)| s == seg)
    }

    /// Does the Commit or a body chunk sit in `seg` (the whole message must move)?
    pub(crate) fn content_in(&self, seg: u32) -> bool {
        self.commit.seg == seg || self.body.iter().any(|e| e.seg == seg)
    }

    /// Approximate heap and table bytes of this entry.
    #[cfg(test)]
    pub(crate) fn mem_bytes(&self) -> usize {
        std::mem::size_of::<(QueueId, Self)>()
            + self.body.len() * std::mem::size_of::<Extent>()
            + self.rcpts.len() * std::mem::size_of::<Slot>()
    }
}

/// Live records per segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SegUse {
    pub(crate) refs: u64,
    pub(crate) bytes: u64,
}

/// The index: live messages and segment usage.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub(crate) map: HashMap<QueueId, Entry>,
    pub(crate) segs: BTreeMap<u32, SegUse>,
}

impl Index {
    pub(crate) fn pin(&mut self, seg: u32, bytes: u64) {
        let u = self.segs.entry(seg).or_default();
        u.refs += 1;
        u.bytes += bytes;
    }

    pub(crate) fn unpin(&mut self, seg: u32, bytes: u64) {
        if let Some(u) = self.segs.get_mut(&seg) {
            u.refs = u.refs.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(bytes);
        }
    }

    /// Inserts (or replaces) an entry, moving the pins.
    pub(crate) fn insert(&mut self, qid: QueueId, e: Entry) {
        for (s, b) in e.pins() {
            self.pin(s, b);
        }
        if let Some(old) = self.map.insert(qid, e) {
            for (s, b) in old.pins() {
                self.unpin(s, b);
            }
        }
    }

    /// Removes an entry and its pins.
    pub(crate) fn remove(&mut self, qid: QueueId) -> Option<Entry> {
        let e = self.map.remove(&qid)?;
        for (s, b) in e.pins() {
            self.unpin(s, b);
        }
        Some(e)
    }

    /// Points recipient `rcpt` at a new ledger record.
    pub(crate) fn set_ledger(
        &mut self,
        qid: QueueId,
        rcpt: usize,
        state: CompactState,
        rec: Option<(Loc, u32)>,
    ) {
        let Some(slot) = self.map.get_mut(&qid).and_then(|e| e.rcpts.get_mut(rcpt)) else {
            return;
        };
        let old = slot.ledger;
        slot.state = state;
        if rec.is_some() {
            slot.ledger = rec;
            slot.retry = false;
        }
        if let (Some((l, n)), Some(_)) = (old, rec) {
            self.unpin(l.seg, u64::from(n));
        }
        if let Some((l, n)) = rec {
            self.pin(l.seg, u64::from(n));
        }
    }

    /// Sets or clears the hold record.
    pub(crate) fn set_hold(&mut self, qid: QueueId, rec: Option<(Loc, u32)>, poison: bool) {
        let Some(e) = self.map.get_mut(&qid) else {
            return;
        };
        e.poison = poison && rec.is_some();
        let old = std::mem::replace(&mut e.hold, rec);
        if let Some((l, n)) = old {
            self.unpin(l.seg, u64::from(n));
        }
        if let Some((l, n)) = rec {
            self.pin(l.seg, u64::from(n));
        }
    }

    /// Recomputes the segment usage from the entries (after recovery).
    pub(crate) fn rebuild_usage(&mut self, segments: &[u32]) {
        self.segs.clear();
        for &s in segments {
            self.segs.insert(s, SegUse::default());
        }
        let pins: Vec<_> = self.map.values().flat_map(Entry::pins).collect();
        for (s, b) in pins {
            self.pin(s, b);
        }
    }

    /// Approximate memory held by the index.
    pub(crate) fn mem_bytes(&self) -> usize {
        // hashbrown keeps one control byte per bucket and up to 1/8 empty buckets.
        let table = self.map.capacity() * (std::mem::size_of::<(QueueId, Entry)>() + 1);
        let heap: usize = self
            .map
            .values()
            .map(|e| {
                e.body.len() * std::mem::size_of::<Extent>()
                    + e.rcpts.len() * std::mem::size_of::<Slot>()
            })
            .sum();
        table + heap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seg: u32) -> Entry {
        Entry::new(
            Loc { seg, off: 100 },
            200,
            vec![Extent {
                seg,
                off: 40,
                len: 4096,
            }],
            4096,
            1,
            2,
        )
    }

    #[test]
    fn pins_follow_insert_ledger_and_remove() {
        let mut ix = Index::default();
        let q = QueueId::new(1, 0);
        ix.insert(q, entry(1));
        assert_eq!(ix.segs[&1].refs, 2);
        ix.set_ledger(
            q,
            0,
            CompactState {
                tag: 1,
                until: 0,
                reported: false,
            },
            Some((Loc { seg: 2, off: 32 }, 50)),
        );
        assert_eq!(ix.segs[&2], SegUse { refs: 1, bytes: 50 });
        ix.set_ledger(
            q,
            0,
            CompactState {
                tag: 2,
                until: 0,
                reported: false,
            },
            Some((Loc { seg: 3, off: 32 }, 60)),
        );
        assert_eq!(ix.segs[&2], SegUse::default());
        assert_eq!(ix.segs[&3].refs, 1);
        assert!(ix.map[&q].references(3));
        assert!(!ix.map[&q].content_in(3));
        ix.remove(q);
        assert!(ix.segs.values().all(|u| *u == SegUse::default()));
    }

    #[test]
    fn entry_is_small() {
        let e = entry(1);
        assert!(e.mem_bytes() < 300, "{}", e.mem_bytes());
    }
}
