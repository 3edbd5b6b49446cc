//! The delivery agents the scheduler hands transactions to, one per store, and the spooled
//! message body they read.
//!
//! An [`Agent`] runs *one* transaction (at most the store's `recipients_per_transaction`
//! recipients; the scheduler splits) and reports each recipient's [`Outcome`] through the
//! callback as soon as it is known, plus how long getting a connection and the transfer
//! took. [`SpoolBody`] streams a spooled body to the agent without loading it: a body the
//! spool still held in memory ([`HeldBody`]) is served from there, other small bodies are
//! read at once, larger ones by a blocking thread feeding a bounded channel
//! (64 KiB chunks, at most four in flight), and a checksum failure reaches the agent as a
//! read error before the end of the content, so a corrupt message is never delivered.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use postern_proto::Reply;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::gate::Gate;
use super::load::StoreLoad;
use super::window::{Window, WindowSettings};
use crate::delivery::{
    MaildirStore, MessageBody, OutboundEnvelope, Outcome, PipeStore, Recipient, Report,
    StoreConfig, StorePool, trouble,
};
use crate::spool::{HeldBody, QueueId, Spool};

/// Bodies up to this size are read in one go when a transaction opens them.
const SMALL_BODY: u64 = 256 << 10;
/// Concurrency limit for stores that have no `max_connections` of their own.
const LOCAL_MAX_CONCURRENCY: usize = 20;
/// Batch size for stores without `recipients_per_transaction`.
const LOCAL_BATCH: usize = 50;

/// How one store is delivered to.
#[derive(Clone, Debug)]
pub enum Agent {
    /// Pooled LMTP connections.
    Lmtp(StorePool),
    /// The built-in maildir store.
    Maildir(Arc<MaildirStore>),
    /// A command, fed the message on its standard input.
    Pipe(Arc<PipeStore>),
    /// Accept and drop.
    Discard,
    /// Every recipient gets this reply (4yz deferred, 5yz bounced): a store that is
    /// configured away, or a policy route.
    Error(Reply),
}

/// What one transaction came to, with its timings.
#[derive(Clone, Debug, Default)]
pub struct Attempt {
    /// The outcomes and any trouble beyond single recipients.
    pub report: Report,
    /// Getting a connection (from the pool, or a new one), when the agent has connections.
    pub connect: Duration,
    /// The transaction itself.
    pub transfer: Duration,
}

impl Agent {
    /// Recipients per transaction.
    pub fn recipients_per_transaction(&self) -> usize {
        match self {
            Self::Lmtp(pool) => pool.store().recipients_per_transaction().max(1),
            Self::Pipe(p) if p.per_recipient() => 1,
            Self::Maildir(_) | Self::Pipe(_) | Self::Discard | Self::Error(_) => LOCAL_BATCH,
        }
    }

    /// The most transactions at once (the window's ceiling).
    pub fn max_connections(&self) -> usize {
        match self {
            Self::Lmtp(pool) => pool.store().max_connections().max(1),
            Self::Maildir(_) | Self::Pipe(_) | Self::Discard | Self::Error(_) => {
                LOCAL_MAX_CONCURRENCY
            }
        }
    }

    /// The relay as logged (`relay=`).
    pub fn relay(&self) -> String {
        match self {
            Self::Lmtp(pool) => pool.store().address().to_string(),
            Self::Maildir(_) => "maildir".into(),
            Self::Pipe(p) => format!("pipe:{}", p.program()),
            Self::Discard => "discard".into(),
            Self::Error(_) => "none".into(),
        }
    }

    /// Connections `(in use, idle)`, for agents that hold connections.
    pub fn connections(&self) -> Option<(usize, usize)> {
        match self {
            Self::Lmtp(pool) => {
                let s = pool.status();
                Some((s.size.saturating_sub(s.available), s.available))
            }
            _ => None,
        }
    }

    /// Runs one transaction for `recipients`. `body`: a [`SpoolBody`] from the scheduler, the
    /// session's buffer from a listener in `mode: proxy`.
    pub async fn deliver<B, F>(
        &self,
        envelope: &OutboundEnvelope,
        recipients: &[Recipient],
        body: &B,
        on_outcome: &mut F,
    ) -> Attempt
    where
        B: MessageBody + ?Sized,
        F: FnMut(usize, &Outcome),
    {
        let started = Instant::now();
        match self {
            Self::Lmtp(pool) => {
                let (report, connect) = pool
                    .transaction(envelope, recipients, body, on_outcome)
                    .await;
                Attempt {
                    report,
                    connect,
                    transfer: started.elapsed().saturating_sub(connect),
                }
            }
            Self::Maildir(store) => Attempt {
                report: store.deliver(envelope, recipients, body, on_outcome).await,
                connect: Duration::ZERO,
                transfer: started.elapsed(),
            },
            Self::Pipe(store) => Attempt {
                report: store.deliver(envelope, recipients, body, on_outcome).await,
                connect: Duration::ZERO,
                transfer: started.elapsed(),
            },
            Self::Discard => Attempt {
                report: crate::delivery::policy::discard(recipients, on_outcome),
                ..Attempt::default()
            },
            Self::Error(reply) => Attempt {
                report: crate::delivery::policy::refuse(reply, recipients, on_outcome),
                ..Attempt::default()
            },
        }
    }

    /// Is the store reachable? LMTP: a fresh connection (greeting and LHLO, STARTTLS and
    /// AUTH as configured), closed with QUIT. Other agents are always reachable.
    pub async fn probe(&self) -> Result<(), ProbeError> {
        match self {
            Self::Lmtp(pool) => match pool.store().connect().await {
                Ok(mut conn) => {
                    conn.quit().await;
                    Ok(())
                }
                Err(t) => Err(ProbeError::Store(t)),
            },
            _ => Ok(()),
        }
    }
}

/// Why a probe of a down store did not find it working; its `Display` is the reason the
/// store's breaker keeps (`postern status`, the logs).
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProbeError {
    /// The store could not be reached, or refused the session (connect, greeting, LHLO,
    /// STARTTLS, AUTH).
    #[error("{0}")]
    Store(trouble::Trouble),
    /// The scheduler stopped before the probe ended.
    #[error("shutting down")]
    ShuttingDown,
}

/// The agents by store name, each with its store's [`Gate`] (the concurrency window every
/// path to the store shares) and its [`StoreLoad`] (what the store's shard publishes for
/// the listeners' backpressure check).
#[derive(Clone, Debug, Default)]
pub struct Agents {
    map: HashMap<String, (Agent, Arc<Gate>, Arc<StoreLoad>)>,
}

impl Agents {
    /// No agents.
    pub fn new() -> Self {
        Self::default()
    }

    /// The agents for the configured stores. LMTP stores get a connection pool each (the
    /// scheduler sweeps it for idle and old connections) and a window from their `window:`
    /// settings, starting at `initial` (`delivery.initial_window`) unless they say otherwise;
    /// `hostname` is ours (LHLO, Received).
    pub fn from_config(
        stores: &[StoreConfig],
        hostname: &str,
        initial: usize,
    ) -> Result<Self, crate::delivery::lmtp::StoreError> {
        let mut agents = Self::new();
        for store in stores {
            let agent = match store {
                StoreConfig::Maildir { name, root } => {
                    Agent::Maildir(Arc::new(MaildirStore::new(name, root, hostname)))
                }
                StoreConfig::Discard { .. } => Agent::Discard,
                StoreConfig::Lmtp(l) => {
                    let lmtp = crate::delivery::RemoteStore::from_config(l, hostname)?;
                    Agent::Lmtp(StorePool::new(Arc::new(lmtp)))
                }
                StoreConfig::Smtp(s) => {
                    let relay = crate::delivery::RemoteStore::from_smtp_config(s, hostname)?;
                    Agent::Lmtp(StorePool::new(Arc::new(relay)))
                }
                StoreConfig::Pipe(p) => Agent::Pipe(Arc::new(PipeStore::from_config(p)?)),
                StoreConfig::Error { reply, .. } => Agent::Error(reply.clone()),
            };
            agents.insert_with(store.name(), agent, initial);
        }
        Ok(agents)
    }

    /// Adds (or replaces) the agent of store `name`, with a window at the default initial
    /// size.
    pub fn insert(&mut self, name: &str, agent: Agent) {
        let initial = super::SchedulerConfig::default().initial_window;
        self.insert_with(name, agent, initial);
    }

    /// Adds (or replaces) the agent of store `name`, its window starting at `initial` unless
    /// the store's `window.initial` says otherwise.
    pub fn insert_with(&mut self, name: &str, agent: Agent, initial: usize) {
        let limits = match &agent {
            Agent::Lmtp(pool) => pool.store().edge().backpressure,
            _ => crate::delivery::edge_config::BackpressureConfig::default(),
        };
        let load = Arc::new(StoreLoad::new(name, limits));
        let (settings, pool) = match &agent {
            Agent::Lmtp(pool) => {
                let w = pool.store().window();
                let max = w.max.unwrap_or(agent.max_connections());
                let settings = WindowSettings {
                    min: w.min,
                    initial: w.initial.unwrap_or(initial),
                    max,
                    latency: w.latency,
                    tolerance: w.latency_tolerance,
                };
                (settings, Some(pool.clone()))
            }
            _ => (
                WindowSettings::feedback(initial, agent.max_connections()),
                None,
            ),
        };
        let gate = Gate::new(name, Window::with_settings(settings), pool);
        self.map.insert(name.to_owned(), (agent, gate, load));
    }

    /// The agent of store `name`.
    pub fn get(&self, name: &str) -> Option<&Agent> {
        self.map.get(name).map(|(a, _, _)| a)
    }

    /// The gate of store `name`.
    pub fn gate(&self, name: &str) -> Option<&Arc<Gate>> {
        self.map.get(name).map(|(_, g, _)| g)
    }

    /// The load (backpressure state) of store `name`.
    pub fn load(&self, name: &str) -> Option<&Arc<StoreLoad>> {
        self.map.get(name).map(|(_, _, l)| l)
    }

    /// The agent of store `name` and its gate.
    pub fn entry(&self, name: &str) -> Option<(&Agent, &Arc<Gate>)> {
        self.map.get(name).map(|(a, g, _)| (a, g))
    }

    /// Every store name, agent and gate.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Agent, &Arc<Gate>)> {
        self.map.iter().map(|(n, (a, g, _))| (n.as_str(), a, g))
    }

    /// Every store name and agent.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Agent)> {
        self.map.iter().map(|(n, (a, _, _))| (n.as_str(), a))
    }
}

/// A spooled message body, readable from the start once per transaction.
#[derive(Clone, Debug)]
pub struct SpoolBody {
    spool: Spool,
    qid: QueueId,
    size: u64,
    /// The octets themselves, when the spool handed them over from memory.
    held: Option<Arc<HeldBody>>,
    corrupt: Arc<AtomicBool>,
}

impl SpoolBody {
    /// The body of `qid` (of `size` octets), `held` in memory if the spool handed it over.
    pub fn new(spool: Spool, qid: QueueId, size: u64, held: Option<HeldBody>) -> Self {
        Self {
            spool,
            qid,
            size,
            held: held.map(Arc::new),
            corrupt: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The octets, if they are held in memory.
    pub fn held(&self) -> Option<&[u8]> {
        self.held.as_deref().map(|b| &b[..])
    }

    /// A read failed its length or checksum check: the message must be quarantined.
    pub fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Relaxed)
    }

    fn open_now(&self) -> io::Result<BodyStream> {
        if let Some(held) = &self.held {
            return Ok(BodyStream {
                rx: None,
                queue: VecDeque::new(),
                chunk: Chunk::Held(Arc::clone(held)),
                pos: 0,
            });
        }
        let mut reader = self
            .spool
            .open_body(self.qid)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if self.size <= SMALL_BODY {
            // Small: its chunks read from the page cache now, no thread.
            let mut queue = VecDeque::new();
            loop {
                match reader.next_chunk() {
                    Ok(Some(chunk)) => queue.push_back(chunk),
                    Ok(None) => break,
                    Err(e) => return Err(self.failed(e)),
                }
            }
            return Ok(BodyStream {
                rx: None,
                queue,
                chunk: Chunk::Read(Vec::new()),
                pos: 0,
            });
        }
        let (tx, rx) = mpsc::channel(4);
        let corrupt = Arc::clone(&self.corrupt);
        tokio::task::spawn_blocking(move || {
            loop {
                match reader.next_chunk() {
                    Ok(None) => return,
                    Ok(Some(chunk)) => {
                        if tx.blocking_send(Ok(chunk)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        if e.kind() == io::ErrorKind::InvalidData {
                            corrupt.store(true, Ordering::Relaxed);
                        }
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        });
        Ok(BodyStream {
            rx: Some(rx),
            queue: VecDeque::new(),
            chunk: Chunk::Read(Vec::new()),
            pos: 0,
        })
    }

    fn failed(&self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::InvalidData {
            self.corrupt.store(true, Ordering::Relaxed);
        }
        e
    }
}

impl MessageBody for SpoolBody {
    type Reader<'a> = BodyStream;

    fn open(&self) -> impl Future<Output = io::Result<BodyStream>> + Send {
        std::future::ready(self.open_now())
    }
}

/// The reader of one pass over a [`SpoolBody`]: `chunk` from `pos` on, then the chunks
/// in `queue`, then those from `rx`, if any. As an [`AsyncBufRead`] it lends its chunks
/// (the agent encodes straight from them); [`AsyncRead`] copies out of them.
#[derive(Debug)]
pub struct BodyStream {
    rx: Option<mpsc::Receiver<io::Result<Vec<u8>>>>,
    queue: VecDeque<Vec<u8>>,
    chunk: Chunk,
    pos: usize,
}

/// Octets of a body being read: read from the spool, or the whole body held in memory.
#[derive(Debug)]
enum Chunk {
    Read(Vec<u8>),
    Held(Arc<HeldBody>),
}

impl std::ops::Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Read(bytes) => bytes,
            Self::Held(body) => body,
        }
    }
}

impl AsyncBufRead for BodyStream {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        while this.pos >= this.chunk.len() {
            if let Some(chunk) = this.queue.pop_front() {
                this.chunk = Chunk::Read(chunk);
                this.pos = 0;
                continue;
            }
            let Some(rx) = this.rx.as_mut() else {
                break;
            };
            match rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.chunk = Chunk::Read(chunk);
                    this.pos = 0;
                }
                Poll::Ready(Some(Err(e))) => {
                    this.rx = None;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(None) => this.rx = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(this.chunk.get(this.pos..).unwrap_or_default()))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.pos = this.pos.saturating_add(amt).min(this.chunk.len());
    }
}

impl AsyncRead for BodyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        crate::delivery::read_lent(self, cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::spool::tests::{opts, store};

    async fn read_in_small_pieces(body: &SpoolBody) -> Vec<u8> {
        let mut stream = body.open().await.unwrap();
        let (mut out, mut piece) = (Vec::new(), [0u8; 7]);
        loop {
            let n = stream.read(&mut piece).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&piece[..n]);
        }
    }

    #[tokio::test]
    async fn a_held_body_reads_as_the_spooled_one_on_every_pass() {
        let d = tempfile::tempdir().unwrap();
        let spool = Spool::open(d.path(), opts()).unwrap().0;
        let content: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let q = store(&spool, 1, &content);
        let (_, held) = spool.take_message(q).unwrap();
        assert!(held.is_some());
        let size = content.len() as u64;
        let from_memory = SpoolBody::new(spool.clone(), q, size, held);
        let from_disk = SpoolBody::new(spool.clone(), q, size, None);
        assert!(from_memory.held().is_some() && from_disk.held().is_none());
        for _ in 0..2 {
            assert_eq!(read_in_small_pieces(&from_memory).await, content);
        }
        assert_eq!(read_in_small_pieces(&from_disk).await, content);
    }
}
