//! What the spool reports about itself: the recovery report, the queue states, message
//! summaries and status, the read-only snapshot and the counters, and the helpers that
//! build summaries from the index and the log (reading Commit and Ledger records back).
//!
//! Nothing here writes: these are views of the index and the log.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::error::SpoolError;
use super::id::QueueId;
use super::index::Entry;
use super::ledger::RecipientState;
use super::log::{Loc, Segment};
use super::record::{self, Envelope, Record};

/// What recovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files scanned.
    pub segments: usize,
    /// Valid records read.
    pub records: u64,
    /// Live messages in the index.
    pub messages: usize,
    /// Their recipients not yet delivered or bounced.
    pub recipients: usize,
    /// Messages without a Commit record, dropped (never acknowledged).
    pub partial_dropped: usize,
    /// Messages moved to the corrupt queue.
    pub quarantined: usize,
    /// Recipients that came back in doubt (retried one per transaction).
    pub in_doubt: usize,
    /// Unreadable byte ranges skipped (each logged).
    pub corrupt_regions: usize,
    /// Bytes of torn tail truncated from the last segment.
    pub truncated_bytes: u64,
    /// Time the scan took.
    pub elapsed: Duration,
    /// Approximate memory of the rebuilt index.
    pub index_bytes: usize,
}

/// The queue a message is in (derived from its recipients and hold flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueueState {
    /// Recipients pending or in doubt.
    Active,
    /// Every remaining recipient is deferred.
    Deferred,
    /// Held by the operator.
    Hold,
    /// Poison quarantine: its delivery attempts kept ending abnormally
    /// (`delivery.poison_attempts`); held until an operator releases it.
    Quarantine,
    /// Every recipient is final; waiting for [`Spool::finish`](super::Spool::finish).
    Finished,
}

/// One recipient in a [`MessageSummary`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientSummary {
    /// The forward path.
    pub address: String,
    /// The state, with its last reply.
    pub state: RecipientState,
    /// Final, and the DSN it owes (if any) is queued
    /// ([`Spool::mark_reported`](super::Spool::mark_reported)).
    pub reported: bool,
}

/// One queued message, for the queue tools and the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageSummary {
    /// Its id.
    pub qid: QueueId,
    /// Arrival time.
    pub arrival: SystemTime,
    /// Queue.
    pub queue: QueueState,
    /// Body size in bytes.
    pub size: u64,
    /// The reverse path (`""` for `<>`).
    pub sender: String,
    /// Recipients in envelope order.
    pub recipients: Vec<RecipientSummary>,
    /// The earliest next attempt of a deferred recipient.
    pub next_attempt: Option<SystemTime>,
}

/// A message's state as the index holds it ([`Spool::status`](super::Spool::status)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageStatus {
    /// Held by the operator (or quarantined): the scheduler leaves it alone.
    pub hold: bool,
    /// For each recipient in doubt: delivery attempts started since its last normal end
    /// (the in-doubt mark counts them); 0 for the others.
    pub attempts: Vec<u32>,
    /// Body size in bytes.
    pub size: u64,
    /// Each recipient's state in envelope order; reply texts are empty.
    pub recipients: Vec<RecipientState>,
    /// Each recipient is final and its DSN, if owed, is queued
    /// ([`Spool::mark_reported`](super::Spool::mark_reported)).
    pub reported: Vec<bool>,
}

/// A read-only view of a spool, for the admin tools.
#[derive(Clone, Debug)]
pub struct SpoolSnapshot {
    /// The queued messages, oldest first.
    pub messages: Vec<MessageSummary>,
    /// What the scan found.
    pub report: RecoveryReport,
    /// Files in the corrupt queue.
    pub corrupt: Vec<String>,
}

/// Counters since the spool opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Messages whose Commit was synced.
    pub stored: u64,
    /// fdatasync batches.
    pub syncs: u64,
    /// Total time spent in fdatasync.
    pub sync_time: Duration,
    /// Records appended (a write of several records counts once).
    pub appends: u64,
    /// Bytes appended.
    pub bytes: u64,
    /// Segments created.
    pub segments_created: u64,
    /// Segments deleted by the garbage collector.
    pub segments_deleted: u64,
    /// Messages copied forward by compaction.
    pub messages_moved: u64,
    /// Ledger records waiting to be retried.
    pub ledger_retries_pending: u64,
    /// Recipients that came back in doubt at recovery.
    pub in_doubt_recovered: u64,
    /// Live messages.
    pub messages: u64,
}

pub(super) fn read_commit(
    seg: Option<Arc<Segment>>,
    loc: Loc,
    len: u32,
) -> Result<Envelope, SpoolError> {
    let seg = seg.ok_or_else(|| SpoolError::Corrupt {
        qid: None,
        detail: format!("segment {} is gone", loc.seg),
    })?;
    let mut buf = vec![0; len as usize];
    seg.file.read_exact_at(&mut buf, u64::from(loc.off))?;
    match record::parse_full(&buf)? {
        (_, Record::Commit { envelope, .. }) => Ok(envelope),
        _ => Err(SpoolError::Corrupt {
            qid: None,
            detail: "not a commit record".into(),
        }),
    }
}

pub(super) fn read_ledger_reply(seg: Option<Arc<Segment>>, loc: Loc, len: u32) -> Option<String> {
    let seg = seg?;
    let mut buf = vec![0; len as usize];
    seg.file.read_exact_at(&mut buf, u64::from(loc.off)).ok()?;
    match record::parse_full(&buf).ok()? {
        (_, Record::Ledger { state, .. }) => state.reply().map(str::to_owned),
        _ => None,
    }
}

pub(super) fn summarize(
    mut entries: Vec<(QueueId, Entry)>,
    seg: impl Fn(u32) -> Option<Arc<Segment>>,
    retry: &HashMap<(QueueId, u32), Vec<u8>>,
) -> Vec<MessageSummary> {
    entries.sort_by_key(|(q, _)| *q);
    let mut out = Vec::with_capacity(entries.len());
    for (qid, e) in entries {
        let env = read_commit(seg(e.commit.seg), e.commit, e.commit_len).ok();
        let mut recipients = Vec::with_capacity(e.rcpts.len());
        let mut next: Option<SystemTime> = None;
        let (mut active, mut deferred) = (false, false);
        for (i, s) in e.rcpts.iter().enumerate() {
            let reply = if !s.state.has_reply() {
                String::new()
            } else if let Some(b) = retry.get(&(qid, i as u32)) {
                match record::parse_full(b) {
                    Ok((_, Record::Ledger { state, .. })) => {
                        state.reply().unwrap_or_default().to_owned()
                    }
                    _ => String::new(),
                }
            } else {
                s.ledger
                    .and_then(|(l, n)| read_ledger_reply(seg(l.seg), l, n))
                    .unwrap_or_default()
            };
            let state = s.state.expand(reply);
            match &state {
                RecipientState::Pending | RecipientState::InDoubt => active = true,
                RecipientState::Deferred { until, .. } => {
                    deferred = true;
                    next = Some(next.map_or(*until, |n| n.min(*until)));
                }
                _ => {}
            }
            let address = env
                .as_ref()
                .and_then(|env| env.recipients.get(i))
                .map(|r| r.address.clone())
                .unwrap_or_default();
            recipients.push(RecipientSummary {
                address,
                state,
                reported: s.state.reported,
            });
        }
        let queue = if e.hold.is_some() && e.poison {
            QueueState::Quarantine
        } else if e.hold.is_some() {
            QueueState::Hold
        } else if active {
            QueueState::Active
        } else if deferred {
            QueueState::Deferred
        } else {
            QueueState::Finished
        };
        out.push(MessageSummary {
            qid,
            arrival: qid.arrival(),
            queue,
            size: e.body_len,
            sender: env.map(|e| e.sender).unwrap_or_default(),
            recipients,
            next_attempt: next,
        });
    }
    out
}

pub(super) fn list_corrupt(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("corrupt"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
