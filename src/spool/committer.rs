//! The spool's two background threads: the committer (group commit, withdrawing the
//! stores of a batch whose sync failed, retrying ledger records until they land) and the
//! garbage collector's timer loop.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::log::{Flush, Reg, Unsynced};
use super::record::{self, DoneReason};
use super::{Inner, gc, lock};

impl Inner {
    /// The committer: group commit, failure handling, ledger retries.
    pub(super) fn committer(&self) {
        let mut last_retry = Instant::now();
        loop {
            if last_retry.elapsed() >= Duration::from_millis(200) {
                last_retry = Instant::now();
                if !lock(&self.retry).is_empty() {
                    self.retry_ledger();
                }
            }
            match self.log.next_batch(Duration::from_millis(200)) {
                Some(mut batch) => {
                    let result = self.log.sync(&batch);
                    if let Err(e) = &result {
                        // The failed segment takes no more appends (the withdrawals
                        // below go to a new one), and a commit is withdrawn before its
                        // writer hears of the failure: a client told 4xx finds no message.
                        self.log.retire(e);
                        self.undo_batch(std::mem::take(&mut batch.unsynced));
                    }
                    self.log.finish(&batch, &result);
                }
                None if self.closing.load(Ordering::SeqCst) => break,
                None => {}
            }
        }
        self.log.trim();
        self.log.syncer.close();
    }

    /// After a failed sync: commits of the batch are withdrawn (the client got 4xx), ledger
    /// records are queued for retry.
    fn undo_batch(&self, unsynced: Vec<Unsynced>) {
        for u in unsynced {
            match u {
                Unsynced::Commit(qid, loc) => {
                    let mut ix = lock(&self.index);
                    if ix.map.get(&qid).is_some_and(|e| e.commit == loc) {
                        ix.remove(qid);
                        lock(&self.fresh).remove(qid);
                        let mut rec = Vec::new();
                        record::encode_done(&mut rec, qid, DoneReason::StoreFailed);
                        if let Err(e) = self.log.append(&rec, Reg::None, Flush::Lazy) {
                            tracing::warn!(%qid, error = %e, "could not withdraw a failed store; it may be delivered after a restart");
                        }
                        tracing::warn!(%qid, "store failed at sync; message withdrawn");
                    }
                }
                Unsynced::Ledger {
                    qid,
                    rcpt,
                    loc,
                    bytes,
                } => {
                    let mut ix = lock(&self.index);
                    if let Some(slot) = ix
                        .map
                        .get_mut(&qid)
                        .and_then(|e| e.rcpts.get_mut(rcpt as usize))
                        && slot.ledger.is_some_and(|(l, _)| l == loc)
                        // A newer state that could not be written is already queued for
                        // retry: this record is older (its location is still the slot's
                        // only because the newer append failed).
                        && !slot.retry
                    {
                        slot.retry = true;
                        lock(&self.retry).insert((qid, rcpt), bytes);
                    }
                }
            }
        }
    }

    /// Re-appends ledger records that failed (disk full or a failed sync).
    fn retry_ledger(&self) {
        let items: Vec<_> = lock(&self.retry).drain().collect();
        let mut failed = false;
        for ((qid, rcpt), bytes) in items {
            let mut ix = lock(&self.index);
            let Some(state) = ix
                .map
                .get(&qid)
                .and_then(|e| e.rcpts.get(rcpt as usize))
                .filter(|s| s.retry)
                .map(|s| s.state)
            else {
                continue;
            };
            if failed {
                lock(&self.retry).insert((qid, rcpt), bytes);
                continue;
            }
            let n = bytes.len() as u32;
            match self
                .log
                .append(&bytes, Reg::Ledger(qid, vec![(rcpt, 0, n)]), Flush::Soon)
            {
                Ok(a) => {
                    ix.set_ledger(qid, rcpt as usize, state, Some((a.loc, n)));
                    tracing::info!(%qid, rcpt, "ledger update written after retry");
                }
                Err(_) => {
                    failed = true;
                    lock(&self.retry).insert((qid, rcpt), bytes);
                }
            }
        }
    }

    pub(super) fn gc_loop(&self) {
        let (m, cv) = &self.stop;
        let mut stop = lock(m);
        while !*stop {
            stop = cv
                .wait_timeout(stop, self.opts.gc_interval)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if *stop {
                break;
            }
            drop(stop);
            if let Err(e) = gc::collect(self) {
                tracing::warn!(error = %e, "spool garbage collection failed; will retry");
            }
            stop = lock(m);
        }
    }
}
