//! Pooled LMTP connections, one pool per store (deadpool, managed).
//!
//! A connection is reused across messages and scheduler shards. Taking one from the pool
//! recycles it first: a connection that is broken, older than the store's `reuse_limit` or
//! idle longer than its `idle_timeout` is closed (QUIT) and replaced by a new one; otherwise
//! `RSET` checks that it is alive, unless it was used within [`PoolOptions::rset_skip`]. A
//! connection left unusable by a delivery (lost, timed out, aborted) is detached from the
//! pool ([`Object::take`]) and dropped, so its slot is free at once. [`StorePool::sweep`]
//! closes idle and old connections that sit in the pool; [`StorePool::spawn_sweeper`] runs it
//! periodically (every half `idle_timeout`, so an idle session never holds a store process
//! much longer than that).
//!
//! **No work waits on a greeting that a sibling could spare.** A store that runs one process
//! per session (Cyrus `maxchild`, Dovecot `process_limit`) leaves excess connections
//! unanswered in its listen backlog. A transaction that had to open a new connection waits
//! for that greeting; if meanwhile another transaction of the same store gives its connection
//! back ([`StorePool::release`]), that connection goes straight to the transaction that has
//! waited longest. Connects run in their own tasks, at most `MAX_CONNECTING` at once (one
//! while the store queues our sessions, `MAX_CONNECTING_QUEUED`, unless the pool serves a
//! concentrator: [`StorePool::relaying`]), and
//! each hands its connection to whoever waits first (or, when nobody does any more, closes
//! it at once: we never hold more sessions than the pool counts), so only a couple of our
//! sessions ever wait in a store's backlog. Without this, the transactions would sit on unanswered connects while the
//! sessions the store does serve sit idle in the pool.
//!
//! **Sessions are handed back.** A connection older than `reuse_limit` (2 s by default) is
//! closed when its transaction ends, not reused: on a store that runs one process per
//! session, that process then serves the next session in its backlog — another gateway's,
//! in turn — instead of staying with whichever gateway connected first. While the store
//! keeps our new sessions waiting, the limit is half that ([`StorePool::reuse_limit`]):
//! shorter turns at its processes.
//!
//! **Idle sessions go back early to a store that queues sessions.** Once a greeting showed
//! that the store keeps our new sessions waiting ([`crate::delivery::backlog`]), an idle
//! session is closed after 50 ms instead of `idle_timeout` (and swept that often): it holds
//! a store process another gateway's session waits for.
//!
//! The pool holds at most the store's `max_connections`; the store's concurrency window
//! ([`crate::scheduler::gate`]) [`resize`](StorePool::resize)s it to the window, so no more
//! sessions stay open at the store than the window allows. [`StorePool::status`] reports the
//! current size.
//!
//! DIAGNOSTICS: a connection that cannot be opened is a [`Trouble`] of [`Scope::Store`];
//! [`StorePool::deliver`] then reports every recipient not attempted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::lmtp::{Connection, RemoteStore};
use super::message::{MessageBody, OutboundEnvelope, Recipient, Report};
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

/// Connects under way at once, per store: enough to open a pool quickly, few enough that a
/// store which queues sessions in its listen backlog (Cyrus `maxchild`, Dovecot
/// `process_limit`) holds only a couple of ours there.
const MAX_CONNECTING: usize = 2;
/// Connects under way at once while the store queues our sessions
/// ([`RemoteStore::queues_sessions`]): one, this gateway's place in the store's line. The
/// store hands its processes to that line first come, first served, so every gateway that
/// has mail waiting gets one in its turn (the window leaves that wait out of its latency
/// for this reason: `crate::scheduler::gate`); with one each, N gateways keep N sessions
/// waiting at the store, not 2N.
const MAX_CONNECTING_QUEUED: usize = 1;

/// Transactions waiting for a connection, and the connects under way for them.
#[derive(Debug, Default)]
struct Handover {
    /// First come, first served: a new connection, a connect's failure, or a connection
    /// another transaction gives back.
    waiting: VecDeque<oneshot::Sender<Result<Connection, Trouble>>>,
    /// Connects under way. One whose transaction took a connection given back goes on and
    /// serves the next transaction to wait (or is closed once greeted if none does).
    connecting: usize,
    /// The pool serves a concentrator ([`StorePool::relaying`]): no line to keep a place in.
    relaying: bool,
}

impl Handover {
    /// Starts a connect if fewer than [`MAX_CONNECTING`] (or [`MAX_CONNECTING_QUEUED`]), and
    /// fewer than the transactions waiting, are under way: the store never sees more
    /// sessions from us than the pool counts, but for a connect overtaken by a connection
    /// given back, for the moment until it serves the next transaction or is closed.
    fn connect_if_needed(&mut self, store: &Arc<RemoteStore>, me: &Arc<Mutex<Self>>) {
        self.waiting.retain(|w| !w.is_closed());
        let most = if store.queues_sessions() && !self.relaying {
            MAX_CONNECTING_QUEUED
        } else {
            MAX_CONNECTING
        };
        if self.connecting < most.min(self.waiting.len()) {
            self.connecting += 1;
            spawn_connect(Arc::clone(store), Arc::clone(me));
        }
    }
}

/// Creates and recycles connections to one store.
#[derive(Debug)]
pub struct Manager {
    store: Arc<RemoteStore>,
    options: PoolOptions,
    handover: Arc<Mutex<Handover>>,
}

impl Manager {
    fn handover(&self) -> MutexGuard<'_, Handover> {
        lock(&self.handover)
    }

    /// See [`StorePool::reuse_limit`].
    fn reuse_limit(&self) -> Duration {
        let limit = self.store.reuse_limit();
        if self.store.queues_sessions() && !self.handover().relaying {
            limit / 2
        } else {
            limit
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a plain assignment: a poisoned lock is taken over.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens a connection in its own task and gives the result to the first transaction still
/// waiting (one that nobody waits for any more is closed at once); starts the next connect
/// while transactions are left waiting.
fn spawn_connect(store: Arc<RemoteStore>, handover: Arc<Mutex<Handover>>) {
    tokio::spawn(async move {
        let result = store.connect().await;
        let unwanted = {
            let mut h = lock(&handover);
            h.connecting = h.connecting.saturating_sub(1);
            let mut result = result;
            let unwanted = loop {
                let Some(give) = h.waiting.pop_front() else {
                    break result.ok();
                };
                match give.send(result) {
                    Ok(()) => break None,
                    Err(back) => result = back,
                }
            };
            h.connect_if_needed(&store, &handover);
            unwanted
        };
        // Nobody waits for it any more: hand it back to the store at once.
        if let Some(mut conn) = unwanted {
            conn.quit().await;
        }
    });
}

impl managed::Manager for Manager {
    type Type = Connection;
    type Error = Trouble;

    /// The first connection to come: one given back by another transaction, or a new one (a
    /// connect is started unless `MAX_CONNECTING` are under way already).
    async fn create(&self) -> Result<Connection, Trouble> {
        let (give, given) = oneshot::channel();
        {
            let mut h = self.handover();
            h.waiting.push_back(give);
            h.connect_if_needed(&self.store, &self.handover);
        }
        given
            .await
            .unwrap_or_else(|_| Err(trouble::unusable("the connect task ended")))
    }

    async fn recycle(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<Trouble> {
        if !conn.is_usable() {
            return Err(RecycleError::message("connection unusable"));
        }
        if conn.age() >= self.reuse_limit() {
            conn.quit().await;
            return Err(RecycleError::message("reuse limit reached"));
        }
        if conn.idle() >= self.store.idle_limit() {
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
    on_new_session: Arc<NewSessionHook>,
}

/// Whom [`StorePool::get`] tells when it opened a new session (see
/// [`StorePool::on_new_session`]).
#[derive(Default)]
struct NewSessionHook(Mutex<Option<Box<dyn Fn() + Send + Sync>>>);

impl std::fmt::Debug for NewSessionHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewSessionHook")
    }
}

impl StorePool {
    /// A pool of at most the store's `max_connections`, with default options.
    pub fn new(store: Arc<RemoteStore>) -> Self {
        Self::with_options(store, PoolOptions::default())
    }

    /// A pool with explicit options.
    pub fn with_options(store: Arc<RemoteStore>, options: PoolOptions) -> Self {
        let size = store.max_connections();
        let manager = Manager {
            store,
            options,
            handover: Arc::default(),
        };
        let pool = managed::Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool::Runtime::Tokio1)
            .build();
        // build() fails only for a timeout without a runtime; the runtime is set.
        let Ok(pool) = pool else {
            unreachable!("runtime set, no timeouts configured")
        };
        Self {
            pool,
            on_new_session: Arc::default(),
        }
    }

    /// Calls `hook` whenever [`get`](Self::get) returns a session it had to open (or one
    /// handed over while it waited for its greeting): the sessions the store serves us may
    /// have grown, and with them what a store that keeps sessions waiting lets us run
    /// (`crate::scheduler::gate`). Replaces an earlier hook.
    pub fn on_new_session(&self, hook: impl Fn() + Send + Sync + 'static) {
        *lock(&self.on_new_session.0) = Some(Box::new(hook));
    }

    /// This pool serves a concentrator (transactions relayed for other gateways): it is
    /// usually the store's only client, with no other gateway to take turns with in the
    /// store's line, so connects are not held to `MAX_CONNECTING_QUEUED`.
    pub fn relaying(&self) {
        self.pool.manager().handover().relaying = true;
    }

    /// A connection older than this is handed back rather than reused: the store's
    /// `reuse_limit`, and half of it while the store keeps our new sessions waiting
    /// ([`RemoteStore::queues_sessions`]). There a session is a turn at one of the store's
    /// processes, and the gateways' sessions wait in its line for the next one: shorter
    /// turns pass the processes round the gateways in finer steps, and a gateway that reached
    /// the store after the others waits less for its first (`bench/reverse/README.md`,
    /// "Shorter turns"). Not at a concentrator ([`Self::relaying`]): as the store's only
    /// client it has nobody to take turns with, and shorter turns only cost reconnects.
    pub fn reuse_limit(&self) -> Duration {
        self.pool.manager().reuse_limit()
    }

    /// The store.
    pub fn store(&self) -> &Arc<RemoteStore> {
        &self.pool.manager().store
    }

    /// A connection: an idle one recycled, or a new one (waiting while all are in use).
    pub async fn get(&self) -> Result<PooledConnection, Trouble> {
        let conn = self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(t) => t,
            PoolError::Closed => closed(),
            other => {
                let mut t = trouble::unusable(&other.to_string());
                t.scope = Scope::Store;
                t
            }
        })?;
        if Object::metrics(&conn).recycle_count == 0
            && let Some(hook) = &*lock(&self.on_new_session.0)
        {
            hook();
        }
        Ok(conn)
    }

    /// Gives a connection back after a transaction: to a transaction waiting for a greeting
    /// if there is one (see the module header), else to the pool; an unusable one is
    /// dropped.
    pub fn release(&self, conn: PooledConnection) {
        if !conn.is_usable() {
            drop(Object::take(conn));
            return;
        }
        if conn.age() >= self.reuse_limit() {
            // Handed back to the store: on a store that runs one process per session, the
            // process goes to the next session waiting for it (another gateway's, in turn).
            let mut conn = Object::take(conn);
            tokio::spawn(async move { conn.quit().await });
            return;
        }
        let mut h = self.pool.manager().handover();
        h.waiting.retain(|w| !w.is_closed());
        if h.waiting.is_empty() {
            return; // `conn` goes back to the pool as it drops
        }
        let mut conn = Ok(Object::take(conn));
        while let Some(give) = h.waiting.pop_front() {
            match give.send(conn) {
                Ok(()) => return,
                Err(back) => conn = back,
            }
        }
        // Everybody stopped waiting in the meantime (a rare race): close it rather than hold
        // a session the pool does not count.
        drop(conn);
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
        let (idle, reuse) = (store.idle_limit(), self.reuse_limit());
        let removed = self
            .pool
            .retain(|conn, _| conn.is_usable() && conn.idle() < idle && conn.age() < reuse)
            .removed;
        self.pool
            .manager()
            .handover()
            .waiting
            .retain(|w| !w.is_closed());
        let n = removed.len();
        for mut conn in removed {
            conn.quit().await;
        }
        n
    }

    /// How often to sweep: half the idle timeout, between 100 ms and 30 s.
    pub fn sweep_interval(&self) -> Duration {
        (self.store().idle_timeout() / 2).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }

    /// Sweeps every `every` until the pool is closed or dropped.
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = self.pool.weak();
        tokio::spawn(async move {
            let mut pause = every;
            loop {
                tokio::time::sleep(pause).await;
                let Some(pool) = weak.upgrade() else { return };
                if pool.is_closed() {
                    return;
                }
                let me = Self {
                    pool,
                    on_new_session: Arc::default(),
                };
                me.sweep().await;
                // While the store queues our sessions, idle ones go back within LINGER.
                pause = if me.store().queues_sessions() {
                    every.min(crate::delivery::backlog::LINGER / 2)
                } else {
                    every
                };
            }
        })
    }

    /// Delivers one message to `recipients` of this store: split into transactions of at
    /// most `recipients_per_transaction`, each a [`transaction`](Self::transaction) (one after
    /// the other). Trouble of the store's scope stops the remaining transactions: their
    /// recipients are not attempted.
    pub async fn deliver<B, F>(
        &self,
        envelope: &OutboundEnvelope,
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
            let (part, _) = self.transaction(envelope, batch, body, on_outcome).await;
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

    /// One transaction for `recipients` on a pooled connection, the body opened afresh.
    /// Outcomes go to `on_outcome` as they arrive; the connection is given back
    /// ([`release`](Self::release)), or dropped if the transaction left it unusable. Also
    /// returns the wait for the connection: the report's `latency` includes it (a store that
    /// runs one process per session queues us there) and its `connection_wait` says it apart.
    /// No connection: every recipient not attempted, with the trouble; a body that cannot be
    /// read: every recipient deferred.
    pub async fn transaction<B, F>(
        &self,
        envelope: &OutboundEnvelope,
        recipients: &[Recipient],
        body: &B,
        on_outcome: &mut F,
    ) -> (Report, Duration)
    where
        B: MessageBody + ?Sized,
        F: FnMut(usize, &Outcome),
    {
        let asked = Instant::now();
        let conn = self.get().await;
        let waited = asked.elapsed();
        let report = match conn {
            Ok(mut conn) => match body.open().await {
                Ok(reader) => {
                    let mut r = conn.deliver(envelope, recipients, reader, on_outcome).await;
                    r.latency = r.latency.map(|l| l + waited);
                    r.connection_wait = waited;
                    self.release(conn);
                    r
                }
                Err(e) => {
                    let reply = trouble::local_read_error(&e);
                    let refused = Some(trouble::message_refused(&reply));
                    settle(recipients, &Outcome::Deferred(reply), on_outcome, refused)
                }
            },
            Err(t) => settle(
                recipients,
                &Outcome::NotAttempted(None),
                on_outcome,
                Some(t),
            ),
        };
        (report, waited)
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
    Report {
        trouble,
        ..super::policy::settle_all(batch, outcome, on_outcome)
    }
}
