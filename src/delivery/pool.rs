//! Pooled LMTP connections, one pool per store (deadpool, managed).
//!
//! A connection is reused across messages and scheduler shards. Taking one from the pool
//! recycles it first: a connection that is broken, older than the store's `reuse_limit` or
//! idle longer than its `idle_timeout` is closed (QUIT) and replaced by a new one; otherwise
//! `RSET` checks that it is alive, unless it was used within [`PoolOptions::rset_skip`]. A
//! connection left unusable by a delivery (lost, timed out, aborted) is detached from the
//! pool ([`Object::take`]) and dropped, so its slot is free at once. [`StorePool::sweep`]
//! closes idle and old connections that sit in the pool; [`StorePool::spawn_sweeper`] runs it
//! periodically.
//!
//! The pool holds at most the store's `max_connections`. The scheduler bounds its own
//! concurrency per store (its window, with a semaphore) and may [`resize`](StorePool::resize)
//! the pool to match; [`StorePool::status`] reports the current size.
//!
//! DIAGNOSTICS: a connection that cannot be opened is a [`Trouble`] of [`Scope::Store`];
//! [`StorePool::deliver`] then reports every recipient not attempted.

use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult};

use super::lmtp::{Connection, LmtpStore};
use super::message::{Envelope, MessageBody, Recipient, Report};
use super::trouble::{self, Outcome, Scope, Trouble};

pub use deadpool::Status;

/// Tuning that is not part of the store's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolOptions {
    /// A connection used less than this long ago is reused without RSET: 1 s. Its previous
    /// transaction ended cleanly, so the store is outside a transaction; RSET would only
    /// cost a round trip.
    pub rset_skip: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            rset_skip: Duration::from_secs(1),
        }
    }
}

/// Creates and recycles connections to one store.
#[derive(Debug)]
pub struct Manager {
    store: Arc<LmtpStore>,
    options: PoolOptions,
}

impl managed::Manager for Manager {
    type Type = Connection;
    type Error = Trouble;

    async fn create(&self) -> Result<Connection, Trouble> {
        self.store.connect().await
    }

    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<Trouble> {
        if !conn.is_usable() {
            return Err(RecycleError::message("connection unusable"));
        }
        if conn.age() >= self.store.reuse_limit() {
            conn.quit().await;
            return Err(RecycleError::message("reuse limit reached"));
        }
        if conn.idle() >= self.store.idle_timeout() {
            conn.quit().await;
            return Err(RecycleError::message("idle too long"));
        }
        if conn.idle() >= self.options.rset_skip {
            conn.rset().await?;
        }
        Ok(())
    }
}

/// A pooled connection.
pub type PooledConnection = Object<Manager>;

/// The connections to one store. Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct StorePool {
    pool: managed::Pool<Manager>,
}

impl StorePool {
    /// A pool of at most the store's `max_connections`, with default options.
    pub fn new(store: Arc<LmtpStore>) -> Self {
        Self::with_options(store, PoolOptions::default())
    }

    /// A pool with explicit options.
    pub fn with_options(store: Arc<LmtpStore>, options: PoolOptions) -> Self {
        let size = store.max_connections();
        let manager = Manager { store, options };
        let pool = managed::Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool::Runtime::Tokio1)
            .build();
        // build() fails only for a timeout without a runtime; the runtime is set.
        let Ok(pool) = pool else {
            unreachable!("runtime set, no timeouts configured")
        };
        Self { pool }
    }

    /// The store.
    pub fn store(&self) -> &Arc<LmtpStore> {
        &self.pool.manager().store
    }

    /// A connection: an idle one recycled, or a new one (waiting while all are in use).
    pub async fn get(&self) -> Result<PooledConnection, Trouble> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(t) => t,
            PoolError::Closed => closed(),
            other => {
                let mut t = trouble::unusable(&other.to_string());
                t.scope = Scope::Store;
                t
            }
        })
    }

    /// Size, idle connections and waiters.
    pub fn status(&self) -> Status {
        self.pool.status()
    }

    /// Changes the most connections the pool holds (the scheduler's window); idle
    /// connections beyond it are closed.
    pub fn resize(&self, max_size: usize) {
        self.pool.resize(max_size);
    }

    /// Closes the pool: waiters and later `get`s fail; idle connections are dropped.
    pub fn close(&self) {
        self.pool.close();
    }

    /// Closes (QUIT) the idle connections that are past the idle timeout or the reuse limit.
    /// Returns how many were closed.
    pub async fn sweep(&self) -> usize {
        let store = self.store();
        let (idle, reuse) = (store.idle_timeout(), store.reuse_limit());
        let removed = self
            .pool
            .retain(|conn, _| conn.is_usable() && conn.idle() < idle && conn.age() < reuse)
            .removed;
        let n = removed.len();
        for mut conn in removed {
            conn.quit().await;
        }
        n
    }

    /// Sweeps every `every` until the pool is closed or dropped.
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = self.pool.weak();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                if pool.is_closed() {
                    return;
                }
                Self { pool }.sweep().await;
            }
        })
    }

    /// Delivers one message to `recipients` of this store: split into transactions of at
    /// most `recipients_per_transaction`, each on a pooled connection (one after the other),
    /// the body opened afresh for each. Outcomes go to `on_outcome` as they arrive. A
    /// connection left unusable is detached and dropped. Trouble of the store's scope stops
    /// the remaining transactions: their recipients are not attempted.
    pub async fn deliver<B, F>(
        &self,
        envelope: &Envelope,
        recipients: &[Recipient],
        body: &B,
        on_outcome: &mut F,
    ) -> Report
    where
        B: MessageBody + ?Sized,
        F: FnMut(usize, &Outcome),
    {
        let mut report = Report::default();
        let per = self.store().recipients_per_transaction().max(1);
        let mut batches = recipients.chunks(per);
        while let Some(batch) = batches.next() {
            let part = match self.get().await {
                Ok(mut conn) => match body.open().await {
                    Ok(reader) => {
                        let part = conn.deliver(envelope, batch, reader, on_outcome).await;
                        if !conn.is_usable() {
                            drop(Object::take(conn));
                        }
                        part
                    }
                    Err(e) => {
                        let reply = trouble::local_read_error(&e);
                        settle(
                            batch,
                            &Outcome::Deferred(reply.clone()),
                            on_outcome,
                            Some(trouble::message_refused(&reply)),
                        )
                    }
                },
                Err(t) => settle(batch, &Outcome::NotAttempted(None), on_outcome, Some(t)),
            };
            let stop = part.scope() == Scope::Store;
            report.merge(part);
            if stop {
                for rest in batches.by_ref() {
                    report.merge(settle(rest, &Outcome::NotAttempted(None), on_outcome, None));
                }
            }
        }
        report
    }
}

fn closed() -> Trouble {
    let mut t = trouble::unusable("the store's pool is closed");
    t.scope = Scope::Store;
    t
}

/// The same outcome for every recipient of a batch that was never sent.
fn settle<F: FnMut(usize, &Outcome)>(
    batch: &[Recipient],
    outcome: &Outcome,
    on_outcome: &mut F,
    trouble: Option<Trouble>,
) -> Report {
    let outcomes = batch
        .iter()
        .map(|r| {
            on_outcome(r.index, outcome);
            (r.index, outcome.clone())
        })
        .collect();
    Report { outcomes, trouble }
}
