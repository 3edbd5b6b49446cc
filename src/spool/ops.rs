//! The [`Inner`] operations that write ledger, Hold/Release and Done records and update
//! the index to match, and the salvage of a bad message to `corrupt/`.
//!
//! Each record writer returns a [`Durable`] that resolves once its record is as durable as
//! its [`Flush`] says. A ledger update that cannot be written is queued for the committer's
//! retry; the last durable state stays the truth meanwhile.

use std::fs::File;
use std::io::{self, Write};

use super::error::SpoolError;
use super::id::QueueId;
use super::ledger::{self, RecipientState};
use super::log::{Durable, Flush, Loc, Reg};
use super::record::{self, DoneReason, Envelope, Record};
use super::{Inner, lock};

impl Inner {
    /// `attempts`: per op, the attempt count of an in-doubt state (empty: none).
    pub(super) fn ledger_ops(
        &self,
        qid: QueueId,
        ops: Vec<(usize, RecipientState, bool)>,
        attempts: &[u32],
    ) -> Durable {
        let mut ix = lock(&self.index);
        let Some(e) = ix.map.get(&qid) else {
            return Durable::ready(Err(SpoolError::NotFound(qid)));
        };
        let mut current: Vec<_> = e.rcpts.iter().map(|s| s.state.shape()).collect();
        let mut buf = Vec::new();
        let mut recs = Vec::with_capacity(ops.len());
        let mut compact = Vec::with_capacity(ops.len());
        for (i, (rcpt, state, reported)) in ops.iter().enumerate() {
            let Some(cur) = current.get_mut(*rcpt) else {
                return Durable::ready(Err(SpoolError::NoSuchRecipient { qid, rcpt: *rcpt }));
            };
            if let Err(t) = cur.check_transition(state) {
                return Durable::ready(Err(t.into()));
            }
            *cur = state.clone();
            let mut c = ledger::CompactState {
                reported: *reported,
                ..ledger::CompactState::of(state)
            };
            if c.is_in_doubt() {
                c.until = u64::from(attempts.get(i).copied().unwrap_or(0));
            }
            let (_, _, reply) = state.parts();
            let at = buf.len();
            record::encode_ledger_parts(
                &mut buf,
                qid,
                *rcpt as u32,
                (c.tag, c.until, reply),
                c.reported,
            );
            recs.push((*rcpt as u32, at as u32, (buf.len() - at) as u32));
            compact.push(c);
        }
        // In-doubt marks are written before the dot but not synced on their own (see
        // [`Flush::Lazy`]); outcomes are synced soon.
        let flush = if compact.iter().all(|c| c.is_in_doubt()) {
            Flush::Lazy
        } else {
            Flush::Soon
        };
        match self.log.append(&buf, Reg::Ledger(qid, recs.clone()), flush) {
            Ok(a) => {
                for ((rcpt, at, n), c) in recs.iter().zip(&compact) {
                    let loc = Loc {
                        seg: a.loc.seg,
                        off: a.loc.off + at,
                    };
                    ix.set_ledger(qid, *rcpt as usize, *c, Some((loc, *n)));
                }
                drop(ix);
                self.log.faults.hit("ledger.after_append");
                match flush {
                    Flush::Lazy => Durable::ready(Ok(())),
                    _ => Durable::wait_for(&self.log.syncer, a.lsn),
                }
            }
            Err(err) => {
                // The in-memory state moves on (so nothing is delivered twice from memory);
                // the durable state stays the previous one until the retry lands.
                let mut retry = lock(&self.retry);
                for ((rcpt, at, n), c) in recs.iter().zip(&compact) {
                    ix.set_ledger(qid, *rcpt as usize, *c, None);
                    if let Some(slot) = ix
                        .map
                        .get_mut(&qid)
                        .and_then(|e| e.rcpts.get_mut(*rcpt as usize))
                    {
                        slot.retry = true;
                    }
                    let r = *at as usize..(*at + *n) as usize;
                    retry.insert((qid, *rcpt), buf[r].to_vec());
                }
                drop(retry);
                drop(ix);
                self.space.force_recheck();
                tracing::warn!(%qid, error = %err, "ledger update not written; will retry");
                Durable::ready(Err(err))
            }
        }
    }

    pub(super) fn mark_reported(&self, qid: QueueId, rcpts: &[usize]) -> Durable {
        let mut ix = lock(&self.index);
        let Some(e) = ix.map.get(&qid) else {
            return Durable::ready(Err(SpoolError::NotFound(qid)));
        };
        let mut buf = Vec::new();
        let mut recs = Vec::new();
        let mut states = Vec::new();
        for &rcpt in rcpts {
            let Some(slot) = e.rcpts.get(rcpt) else {
                return Durable::ready(Err(SpoolError::NoSuchRecipient { qid, rcpt }));
            };
            if !slot.state.is_final() {
                return Durable::ready(Err(SpoolError::Invalid(
                    "mark_reported: the recipient is not delivered or bounced",
                )));
            }
            if slot.state.reported {
                continue;
            }
            // The record repeats the state's reply: the latest record is the one read.
            let latest = if slot.retry {
                lock(&self.retry).get(&(qid, rcpt as u32)).cloned()
            } else {
                slot.ledger
                    .and_then(|(l, n)| self.log.read_at(l, n as usize).ok())
            };
            let reply = latest
                .and_then(|b| match record::parse_full(&b) {
                    Ok((_, Record::Ledger { state, .. })) => state.reply().map(str::to_owned),
                    _ => None,
                })
                .unwrap_or_default();
            let at = buf.len();
            record::encode_ledger_flagged(
                &mut buf,
                qid,
                rcpt as u32,
                &slot.state.expand(reply),
                true,
            );
            recs.push((rcpt as u32, at as u32, (buf.len() - at) as u32));
            states.push(ledger::CompactState {
                reported: true,
                ..slot.state
            });
        }
        if recs.is_empty() {
            return Durable::ready(Ok(()));
        }
        match self
            .log
            .append(&buf, Reg::Ledger(qid, recs.clone()), Flush::Soon)
        {
            Ok(a) => {
                for ((rcpt, at, n), state) in recs.iter().zip(states) {
                    let loc = Loc {
                        seg: a.loc.seg,
                        off: a.loc.off + at,
                    };
                    ix.set_ledger(qid, *rcpt as usize, state, Some((loc, *n)));
                }
                Durable::wait_for(&self.log.syncer, a.lsn)
            }
            // Nothing changes: the DSN may be sent again, never lost.
            Err(e) => Durable::ready(Err(e)),
        }
    }

    pub(super) fn set_hold(&self, qid: QueueId, hold: bool) -> Durable {
        self.set_hold_as(qid, hold, false)
    }

    /// A Hold (`poison`: flagged as a quarantine) or Release record. Holding a message
    /// already held changes nothing (an operator's hold stays one, a quarantine too).
    pub(super) fn set_hold_as(&self, qid: QueueId, hold: bool, poison: bool) -> Durable {
        let mut ix = lock(&self.index);
        let Some(e) = ix.map.get(&qid) else {
            return Durable::ready(Err(SpoolError::NotFound(qid)));
        };
        if e.hold.is_some() == hold {
            return Durable::ready(Ok(()));
        }
        let mut rec = Vec::new();
        if hold && poison {
            record::encode_quarantine(&mut rec, qid);
        } else {
            record::encode_hold(&mut rec, qid, hold);
        }
        match self.log.append(&rec, Reg::None, Flush::Now) {
            Ok(a) => {
                ix.set_hold(qid, hold.then_some((a.loc, rec.len() as u32)), poison);
                tracing::info!(%qid, hold, poison, "hold state changed");
                Durable::wait_for(&self.log.syncer, a.lsn)
            }
            Err(e) => Durable::ready(Err(e)),
        }
    }

    /// A Done record. `Flush::Lazy` for a finished message: without the record, recovery
    /// finds every recipient final and reported and the scheduler finishes it again.
    pub(super) fn done(
        &self,
        qid: QueueId,
        reason: DoneReason,
        require_final: bool,
        flush: Flush,
    ) -> Durable {
        let mut ix = lock(&self.index);
        let Some(e) = ix.map.get(&qid) else {
            return Durable::ready(Err(SpoolError::NotFound(qid)));
        };
        if require_final && !e.rcpts.iter().all(|s| s.state.is_final()) {
            return Durable::ready(Err(SpoolError::Invalid(
                "finish: some recipients are not delivered or bounced",
            )));
        }
        let mut rec = Vec::new();
        record::encode_done(&mut rec, qid, reason);
        match self.log.append(&rec, Reg::None, flush) {
            Ok(a) => {
                ix.remove(qid);
                lock(&self.fresh).remove(qid);
                lock(&self.retry).retain(|(q, _), _| *q != qid);
                tracing::info!(%qid, reason = reason.name(), "removed from the spool");
                match flush {
                    Flush::Lazy => Durable::ready(Ok(())),
                    _ => Durable::wait_for(&self.log.syncer, a.lsn),
                }
            }
            Err(e) => Durable::ready(Err(e)),
        }
    }

    /// Writes what is readable of a bad message to `corrupt/QUEUEID.txt`.
    pub(super) fn salvage(&self, qid: QueueId, reason: &str, env: Option<&Envelope>, body: &[u8]) {
        tracing::error!(%qid, reason, "message moved to the corrupt queue");
        let path = self.dir.join("corrupt").join(format!("{qid}.txt"));
        let write = || -> io::Result<()> {
            let mut f = File::create(&path)?;
            writeln!(f, "queue-id: {qid}\nreason: {reason}")?;
            if let Some(env) = env {
                writeln!(f, "sender: <{}>\nclient: {}", env.sender, env.client)?;
                for r in &env.recipients {
                    writeln!(f, "recipient: <{}>", r.address)?;
                }
            }
            writeln!(f, "body-bytes-found: {}\n", body.len())?;
            f.write_all(body)?;
            f.sync_all()?;
            File::open(self.dir.join("corrupt"))?.sync_all()
        };
        if let Err(e) = write() {
            tracing::error!(%qid, error = %e, "could not write the corrupt-queue file");
        }
    }
}
