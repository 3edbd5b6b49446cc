//! Operator actions on queued messages (`postern queue hold|release|delete|flush|requeue`),
//! through the scheduler so that what it holds in memory and the spool's ledger agree.
//!
//! Promises: hold, release and delete resolve only once their spool record is durable.
//! A held message is not delivered: the hold flag is checked at the start of every attempt
//! and again before each transaction (recipients already waiting for their store's window
//! are deferred with `451 4.0.0 Held by the operator`); only a transaction already past
//! that check finishes. Release and flush make the message due now; its
//! recipients still wait for their store's window (slow start) and breaker, so a flush of a
//! large queue cannot stampede a store. Routing is resolved again at every attempt, so a
//! requeue (route again with the current map) is a flush.

use super::Scheduler;
use crate::spool::{QueueId, SpoolError};

impl Scheduler {
    /// Puts `qid` on hold (durable when this returns `Ok`).
    pub async fn hold(&self, qid: QueueId) -> Result<(), SpoolError> {
        self.ctx.spool.hold(qid).await
    }

    /// Releases `qid` (durable) and makes it due now.
    pub async fn release(&self, qid: QueueId) -> Result<(), SpoolError> {
        self.ctx.spool.release(qid).await?;
        self.count_quarantined();
        self.submit(qid);
        Ok(())
    }

    /// Removes `qid` from the spool without a bounce (durable when this returns `Ok`).
    pub async fn delete(&self, qid: QueueId) -> Result<(), SpoolError> {
        self.ctx.spool.delete(qid).await?;
        self.count_quarantined();
        Ok(())
    }

    /// `postern_quarantined_messages` now (it is also sampled every few seconds).
    fn count_quarantined(&self) {
        metrics::gauge!(crate::metrics::QUARANTINED).set(self.ctx.spool.quarantined() as f64);
    }

    /// Makes `qid` due now (a no-op for a held message, or one being attempted).
    pub fn flush(&self, qid: QueueId) {
        self.submit(qid);
    }
}
