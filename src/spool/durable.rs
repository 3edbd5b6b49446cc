//! The promise of a durable append: [`Durable`] for the waiters, [`Syncer`] for the
//! committer that keeps it.
//!
//! Every append has a log sequence number (LSN). The committer publishes each batch it
//! synced (the LSN range and whether the sync failed); a [`Durable`] for LSN `n` resolves once
//! a published batch covers `n`, with that batch's result. Async waiters are woken by the
//! committer; [`Durable::wait`] blocks a plain thread. After [`Syncer::close`] no batch
//! comes: every waiter still pending gets `Closed`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::error::SpoolError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under this lock is a plain assignment: a poisoned lock is taken over.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shared state between the committer and the waiters.
#[derive(Debug, Default)]
pub(crate) struct Syncer {
    state: Mutex<SyncState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    processed: u64,
    failed: Vec<(u64, u64, i32)>,
    wakers: Vec<(u64, Waker)>,
    closed: bool,
    /// Threads blocked in [`Syncer::wait`].
    blocked: usize,
}

impl SyncState {
    fn outcome(&self, lsn: u64) -> Option<Result<(), SpoolError>> {
        if lsn <= self.processed {
            for &(lo, hi, errno) in self.failed.iter().rev() {
                if lo < lsn && lsn <= hi {
                    return Some(Err(SpoolError::from_errno(errno)));
                }
            }
            return Some(Ok(()));
        }
        if self.closed {
            return Some(Err(SpoolError::Closed));
        }
        None
    }
}

impl Syncer {
    pub(super) fn publish(&self, from: u64, upto: u64, errno: Option<i32>) {
        let (wakers, blocked) = {
            let mut st = lock(&self.state);
            if let Some(e) = errno {
                st.failed.push((from, upto, e));
                if st.failed.len() > 4096 {
                    st.failed.drain(..2048);
                }
            }
            st.processed = st.processed.max(upto);
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut st.wakers)
                .into_iter()
                .partition(|(l, _)| *l <= upto);
            st.wakers = waiting;
            (ready, st.blocked > 0)
        };
        if blocked {
            self.cv.notify_all();
        }
        // Newest first: a Commit (a client waits for its 250) is usually the last append of
        // its batch, after the delivery outcomes that rode along with it; tasks woken from
        // this thread run in the order they are woken.
        for (_, w) in wakers.into_iter().rev() {
            w.wake();
        }
    }

    /// No more batches will come: every waiter still pending fails with `Closed`.
    pub(crate) fn close(&self) {
        let wakers = {
            let mut st = lock(&self.state);
            st.closed = true;
            std::mem::take(&mut st.wakers)
        };
        self.cv.notify_all();
        for (_, w) in wakers {
            w.wake();
        }
    }

    /// Blocks until `lsn` is durable.
    pub(crate) fn wait(&self, lsn: u64) -> Result<(), SpoolError> {
        let mut st = lock(&self.state);
        loop {
            if let Some(r) = st.outcome(lsn) {
                return r;
            }
            st.blocked += 1;
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            st.blocked -= 1;
        }
    }
}

/// The promise that an operation is on stable storage: `.await` it from async code or
/// [`Durable::wait`] from a plain thread. Dropping it does not cancel the operation.
#[derive(Debug)]
#[must_use = "a Durable says when the operation is on disk; await or wait on it before acknowledging"]
pub struct Durable {
    inner: DurableInner,
}

#[derive(Debug)]
enum DurableInner {
    Ready(Option<Result<(), SpoolError>>),
    Wait { syncer: Arc<Syncer>, lsn: u64 },
}

impl Durable {
    pub(crate) fn ready(r: Result<(), SpoolError>) -> Self {
        Self {
            inner: DurableInner::Ready(Some(r)),
        }
    }

    pub(crate) fn wait_for(syncer: &Arc<Syncer>, lsn: u64) -> Self {
        Self {
            inner: DurableInner::Wait {
                syncer: Arc::clone(syncer),
                lsn,
            },
        }
    }

    /// The operation failed before anything was appended (the result is already known).
    pub(crate) fn failed_at_once(&self) -> bool {
        matches!(&self.inner, DurableInner::Ready(Some(Err(_))))
    }

    /// Blocks the calling thread until the operation is durable (or failed). Not for
    /// async code: `.await` the `Durable` there.
    pub fn wait(self) -> Result<(), SpoolError> {
        match self.inner {
            DurableInner::Ready(r) => r.unwrap_or(Err(SpoolError::Closed)),
            DurableInner::Wait { syncer, lsn } => syncer.wait(lsn),
        }
    }
}

impl Future for Durable {
    type Output = Result<(), SpoolError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.inner {
            DurableInner::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(SpoolError::Closed))),
            DurableInner::Wait { syncer, lsn } => {
                let mut st = lock(&syncer.state);
                if let Some(r) = st.outcome(*lsn) {
                    return Poll::Ready(r);
                }
                let lsn = *lsn;
                match st
                    .wakers
                    .iter_mut()
                    .find(|(l, w)| *l == lsn && w.will_wake(cx.waker()))
                {
                    Some(_) => {}
                    None => st.wakers.push((lsn, cx.waker().clone())),
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncer_resolves_ok_and_failed_ranges() {
        let s = Arc::new(Syncer::default());
        s.publish(0, 100, None);
        s.publish(100, 200, Some(super::super::fault::ENOSPC));
        assert!(s.wait(50).is_ok());
        assert!(s.wait(100).is_ok());
        assert!(matches!(s.wait(150), Err(SpoolError::NoSpace)));
        assert!(matches!(s.wait(200), Err(SpoolError::NoSpace)));
        s.close();
        assert!(matches!(s.wait(201), Err(SpoolError::Closed)));
    }
}
