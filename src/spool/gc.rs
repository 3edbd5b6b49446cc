//! Garbage collection: delete dead segments, compact old mostly-dead ones.
//!
//! Segments are deleted **oldest first only**. A newer segment can hold the records that
//! supersede records of an older one (a `Done`, a later ledger state, a `Release`); deleting
//! a newer segment while an older one exists could bring a finished message or an old state
//! back at the next recovery. Deleting in order keeps every superseding record on disk for
//! as long as the record it supersedes.
//!
//! So a long-deferred message in the oldest segment would pin every segment after it.
//! **Compaction** prevents that: when the oldest segment's live bytes fall below
//! `compact_below` of its size, or when the spool's files are more than twice its live bytes
//! (plus two segments of slack), its live messages are copied forward into the active
//! segment (body chunks, a Commit flagged *moved*, and a Ledger record for each recipient
//! that is not pending, plus Hold), the index is pointed at the copies, the copies are
//! synced, and the old segment, now dead, is deleted. Copies happen under the index lock,
//! so no `Done` or ledger record for the message can be ordered between the original and the
//! copy; recovery lets the later Commit replace the earlier one and then applies the ledger
//! records that follow it.

use std::sync::atomic::Ordering;

use super::index::Extent;
use super::log::{Flush, Loc, Reg};
use super::record::{self, FLAG_MOVED, HEADER_LEN, Record};
use super::{Inner, QueueId, SpoolError, lock};

/// One pass: delete or compact the oldest segments while possible.
pub(super) fn collect(inner: &Inner) -> Result<(), SpoolError> {
    let mut deleted = false;
    loop {
        let active = inner.log.active_number();
        let Some(&oldest) = inner.log.segment_numbers().first() else {
            break;
        };
        if oldest >= active {
            break;
        }
        let usage = lock(&inner.index)
            .segs
            .get(&oldest)
            .copied()
            .unwrap_or_default();
        if usage.refs == 0 {
            // Deleted under the index lock so that no reader takes a location in it after.
            let ix = lock(&inner.index);
            if ix.segs.get(&oldest).is_some_and(|u| u.refs > 0) {
                continue;
            }
            inner.log.remove_segment(oldest)?;
            drop(ix);
            lock(&inner.index).segs.remove(&oldest);
            inner.segments_deleted.fetch_add(1, Ordering::Relaxed);
            deleted = true;
            tracing::debug!(segment = oldest, "deleted a dead spool segment");
            continue;
        }
        let size = segment_len(inner, oldest);
        // Compact the oldest segment when it is mostly dead, or when the spool as a whole is
        // more than half garbage: a mostly-live oldest segment must not pin every dead
        // segment after it (deletion is in order) for as long as its messages stay queued.
        let (total, live) = totals(inner);
        let mostly_dead = (usage.bytes as f64) < inner.opts.compact_below * size as f64;
        let bloated = total > 2 * live + 2 * inner.opts.segment_size;
        if mostly_dead || bloated {
            compact(inner, oldest)?;
            continue;
        }
        break;
    }
    if deleted {
        inner.log.sync_dir()?;
    }
    Ok(())
}

fn segment_len(inner: &Inner, n: u32) -> u64 {
    inner
        .log
        .segment(n)
        .and_then(|s| s.file.metadata().ok())
        .map_or(0, |m| m.len())
}

/// Bytes of all segment files, and live bytes in them.
fn totals(inner: &Inner) -> (u64, u64) {
    let total = inner
        .log
        .segment_numbers()
        .into_iter()
        .map(|n| segment_len(inner, n))
        .sum();
    let live = lock(&inner.index).segs.values().map(|u| u.bytes).sum();
    (total, live)
}

/// Copies every live record of segment `seg` forward and waits until the copies are durable.
fn compact(inner: &Inner, seg: u32) -> Result<(), SpoolError> {
    let qids: Vec<QueueId> = {
        let ix = lock(&inner.index);
        ix.map
            .iter()
            .filter(|(_, e)| e.references(seg))
            .map(|(q, _)| *q)
            .collect()
    };
    let mut last_lsn = None;
    let mut moved = 0u64;
    for qid in qids {
        if let Some(lsn) = copy_message(inner, qid, seg)? {
            last_lsn = Some(lsn);
            moved += 1;
        }
    }
    if let Some(lsn) = last_lsn {
        // The copies are written lazily, in as few syncs as it takes; then one sync now.
        inner.log.hurry();
        inner.log.syncer.wait(lsn)?;
    }
    inner.log.faults.hit("gc.after_copy");
    inner.messages_moved.fetch_add(moved, Ordering::Relaxed);
    tracing::info!(segment = seg, messages = moved, "compacted a spool segment");
    Ok(())
}

/// Copies one message (or only its ledger/hold records, if its content lives elsewhere).
fn copy_message(inner: &Inner, qid: QueueId, seg: u32) -> Result<Option<u64>, SpoolError> {
    // Read the immutable parts (envelope, body) without holding the index lock.
    let snapshot = lock(&inner.index).map.get(&qid).cloned();
    let Some(snap) = snapshot else {
        return Ok(None);
    };
    let content = if snap.content_in(seg) {
        let raw = inner.log.read_at(snap.commit, snap.commit_len as usize)?;
        let (_, Record::Commit { envelope, .. }) = record::parse_full(&raw)? else {
            return Err(SpoolError::Corrupt {
                qid: Some(qid),
                detail: "commit location holds another record".into(),
            });
        };
        let mut body = Vec::with_capacity(snap.body_len as usize);
        for x in snap.body.iter() {
            body.extend_from_slice(&inner.log.read_at(
                Loc {
                    seg: x.seg,
                    off: x.off,
                },
                x.len as usize,
            )?);
        }
        Some((envelope, body))
    } else {
        None
    };
    let mut ix = lock(&inner.index);
    let Some(e) = ix.map.get(&qid) else {
        return Ok(None);
    };
    if e.commit != snap.commit {
        return Ok(None);
    }
    let mut buf = Vec::new();
    let mut chunks = Vec::new();
    if let Some((_, body)) = &content {
        for piece in body.chunks(inner.opts.chunk_size.max(1)) {
            chunks.push((buf.len() as u32, piece.len() as u32));
            record::encode_chunk(&mut buf, qid, piece);
        }
    }
    let commit_at = buf.len();
    if let Some((envelope, _)) = &content {
        record::encode_commit(&mut buf, qid, FLAG_MOVED, e.body_len, e.body_crc, envelope);
    }
    let commit_len = buf.len() - commit_at;
    let mut ledgers = Vec::new();
    for (i, s) in e.rcpts.iter().enumerate() {
        let must_copy = s.ledger.is_some_and(|(l, _)| l.seg == seg) || content.is_some();
        if s.state.tag == 0 || !must_copy {
            continue;
        }
        let reply = s
            .ledger
            .and_then(|(l, n)| inner.log.read_at(l, n as usize).ok())
            .and_then(|b| match record::parse_full(&b) {
                Ok((_, Record::Ledger { state, .. })) => state.reply().map(str::to_owned),
                _ => None,
            })
            .unwrap_or_default();
        let at = buf.len();
        // From the compact state, so an in-doubt recipient keeps its attempt count.
        record::encode_ledger_parts(
            &mut buf,
            qid,
            i as u32,
            (s.state.tag, s.state.until, &reply),
            s.state.reported,
        );
        ledgers.push((i, at as u32, (buf.len() - at) as u32, s.state));
    }
    let hold_at = buf.len();
    let copy_hold = e
        .hold
        .is_some_and(|(l, _)| l.seg == seg || content.is_some());
    let poison = e.poison;
    if copy_hold && poison {
        record::encode_quarantine(&mut buf, qid);
    } else if copy_hold {
        record::encode_hold(&mut buf, qid, true);
    }
    if buf.is_empty() {
        return Ok(None);
    }
    let a = inner.log.append(&buf, Reg::None, Flush::Lazy)?;
    let at = |x: u32| Loc {
        seg: a.loc.seg,
        off: a.loc.off + x,
    };
    if content.is_some() {
        let mut entry = e.clone();
        ix.remove(qid);
        entry.commit = at(commit_at as u32);
        entry.commit_len = commit_len as u32;
        entry.body = chunks
            .iter()
            .map(|&(off, len)| Extent {
                seg: a.loc.seg,
                off: a.loc.off + off + (HEADER_LEN + super::id::QUEUE_ID_BYTES) as u32,
                len,
            })
            .collect();
        for s in entry.rcpts.iter_mut() {
            s.ledger = None;
        }
        entry.hold = None;
        ix.insert(qid, entry);
    }
    for (i, off, len, state) in ledgers {
        ix.set_ledger(qid, i, state, Some((at(off), len)));
    }
    if copy_hold {
        let hold_len = (buf.len() - hold_at) as u32;
        ix.set_hold(qid, Some((at(hold_at as u32), hold_len)), poison);
    }
    Ok(Some(a.lsn))
}
