//! The SMTP and LMTP listeners: accept, enforce connection limits, run one session per
//! connection.
//!
//! Each configured listener binds its TCP or unix-socket address and accepts until shutdown.
//! A connection over the listener's `max_connections` or `max_connections_per_ip` is
//! answered `421 4.7.0` and closed at once, holding no session state. Sessions are tracked so
//! that shutdown can wait for them to finish their transaction (up to the drain deadline).
//! Accept errors (EMFILE and the like) back off briefly instead of spinning.
//!
//! A listener runs in one of two modes (`listeners[].mode`): `spool` stores every message
//! durably before it answers 250 (`session`); `proxy` relays each transaction to the
//! recipients' stores and answers with their replies (`cut_through`).

pub mod config;
mod counters;
mod cut_through;
mod proxy_protocol;
mod read_buffer;
mod received;
mod session;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use metrics::counter;
use postern_proto::replies;
use postern_proto::server::{BarePolicy, Protocol, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use proxy_protocol::Rewind;
pub use received::{HopCounter, MAX_HOPS, own_marker};
use session::{Conversation, Ending};

use crate::edge::Edge;
use crate::metrics as m;
use crate::routing::Router;
use crate::scheduler::{Agents, Scheduler};
use crate::spool::Spool;
use config::{
    BareLineEndingsPolicy, ListenAddress, ListenerConfig, ListenerMode, ListenerProtocol,
};

/// What the gateway gives every listener.
#[derive(Clone, Debug)]
pub struct Services {
    /// Our host name (greeting, `Received:`).
    pub hostname: String,
    /// Our `node_id` (`Received:`, the loop check).
    pub node_id: u16,
    /// The spool.
    pub spool: Spool,
    /// The routing map in force (swapped whole by a reload).
    pub router: Arc<ArcSwap<Router>>,
    /// Told about each committed message (none: accept and queue only).
    pub scheduler: Option<Scheduler>,
    /// The stores' delivery agents, shared with the scheduler (its pools and windows):
    /// `mode: proxy` relays through them. They exist with `delivery.enabled: false` too.
    pub agents: Agents,
    /// Backpressure and recipient verification at RCPT (none: routing only).
    pub edge: Option<Arc<Edge>>,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
}

/// What every session of one listener shares.
pub(crate) struct Shared {
    pub(crate) config: ListenerConfig,
    pub(crate) server_config: ServerConfig,
    pub(crate) hostname: String,
    pub(crate) node_id: u16,
    /// `by HOST (postern node N)`: found in a `Received:` field, the message is back.
    pub(crate) marker: String,
    pub(crate) spool: Spool,
    /// The routing map in force (swapped whole by a reload).
    pub(crate) router: Arc<ArcSwap<Router>>,
    /// Told about each committed message (none: accept and queue only).
    pub(crate) scheduler: Option<Scheduler>,
    pub(crate) agents: Agents,
    /// Backpressure and recipient verification at RCPT (none: routing only).
    pub(crate) edge: Option<Arc<Edge>>,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) shutdown: CancellationToken,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    counters: counters::LazyCounters,
}

impl Shared {
    /// This listener's hot-path metric handles.
    pub(crate) fn counters(&self) -> &counters::ListenerCounters {
        self.counters.get(&self.config.name)
    }
}

/// A bound listener, ready to serve.
pub struct Listener {
    shared: Arc<Shared>,
    socket: Socket,
    slots: Arc<Semaphore>,
}

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Binding the address failed.
    #[error("listener {name}: cannot bind {address}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        address: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS certificate or key did not load.
    #[error("listener {name}: {source}")]
    Tls {
        /// Listener name.
        name: String,
        /// Why.
        source: crate::tls::TlsError,
    },
}

impl Listener {
    /// Binds the listener's address.
    pub async fn bind(config: &ListenerConfig, services: Services) -> Result<Self, ListenerError> {
        let Services {
            hostname,
            node_id,
            spool,
            router,
            scheduler,
            agents,
            edge,
            shutdown,
        } = services;
        let bind_err = |source| ListenerError::Bind {
            name: config.name.clone(),
            address: config.address.to_string(),
            source,
        };
        let socket = match &config.address {
            ListenAddress::Tcp(addr) => {
                Socket::Tcp(TcpListener::bind(addr).await.map_err(bind_err)?)
            }
            ListenAddress::Unix(path) => {
                // A stale socket from a previous run would make bind fail.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    let _ = std::fs::remove_file(path);
                }
                Socket::Unix(UnixListener::bind(path).map_err(bind_err)?, path.clone())
            }
        };
        let tls = match &config.tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(
                crate::tls::server_config(t).map_err(|source| ListenerError::Tls {
                    name: config.name.clone(),
                    source,
                })?,
            )),
            None => None,
        };
        let protocol = match config.protocol {
            ListenerProtocol::Smtp => Protocol::Smtp,
            ListenerProtocol::Lmtp => Protocol::Lmtp,
        };
        let mut server_config = ServerConfig::new(protocol, &hostname);
        server_config.max_message_size = config.max_message_size.0;
        server_config.max_recipients = config.max_recipients;
        server_config.max_errors = config.max_errors;
        server_config.starttls = tls.is_some();
        server_config.tls_required = config.tls.as_ref().is_some_and(|t| t.required);
        server_config.bare_line_endings = match config.bare_line_endings {
            BareLineEndingsPolicy::Normalize => BarePolicy::Normalize,
            BareLineEndingsPolicy::Reject => BarePolicy::Reject,
        };
        if config.mode == ListenerMode::Proxy {
            // The gateways that relay through us learn that we give them turns.
            let turns = crate::delivery::lmtp::TURNS_KEYWORD;
            server_config.private_keywords.push(turns.to_owned());
        }
        let shared = Arc::new(Shared {
            config: config.clone(),
            server_config,
            marker: own_marker(&hostname, node_id),
            hostname,
            node_id,
            spool,
            router,
            scheduler,
            agents,
            edge,
            tls,
            shutdown,
            per_ip: Mutex::new(HashMap::new()),
            counters: counters::LazyCounters::default(),
        });
        Ok(Self {
            slots: Arc::new(Semaphore::new(config.max_connections)),
            shared,
            socket,
        })
    }

    /// The bound address (`unix:/path` for unix sockets), for tests and logs.
    pub fn local_addr(&self) -> String {
        match &self.socket {
            Socket::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string()),
            Socket::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Accepts until shutdown; sessions are spawned on `tracker`.
    pub async fn serve(self, tracker: TaskTracker) {
        let name = self.shared.config.name.clone();
        tracing::info!(listener = %name, address = %self.local_addr(), "listening");
        loop {
            let shutdown = self.shared.shutdown.clone();
            match &self.socket {
                Socket::Tcp(l) => {
                    let accepted = tokio::select! {
                        () = shutdown.cancelled() => break,
                        a = l.accept() => a,
                    };
                    match accepted {
                        Ok((stream, peer)) => {
                            let _ = stream.set_nodelay(true);
                            self.admit(stream, Some(peer.ip()), &tracker);
                        }
                        Err(e) => accept_backoff(&name, &e).await,
                    }
                }
                Socket::Unix(l, _) => {
                    let accepted = tokio::select! {
                        () = shutdown.cancelled() => break,
                        a = l.accept() => a,
                    };
                    match accepted {
                        Ok((stream, _)) => self.admit(stream, None, &tracker),
                        Err(e) => accept_backoff(&name, &e).await,
                    }
                }
            }
        }
        if let Socket::Unix(_, path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!(listener = %name, "stopped accepting");
    }

    /// Applies the connection limits, then spawns the session. Behind a load balancer
    /// (`proxy_protocol`), the peer must be a trusted one and the per-address limit applies
    /// to the client its header names, once read.
    fn admit<S>(&self, stream: S, peer: Option<IpAddr>, tracker: &TaskTracker)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let name = self.shared.config.name.clone();
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            refused(&name, "refused_limit");
            tracker.spawn(refuse_connection(stream));
            return;
        };
        let shared = self.shared.clone();
        let Some(pp) = shared.config.proxy_protocol.clone() else {
            let Some(ip_slot) = IpSlot::for_peer(&shared, peer) else {
                refused(&name, "refused_per_ip");
                tracker.spawn(refuse_connection(stream));
                return;
            };
            // Boxed: a session's future is about 11 KiB, and tokio copies a spawned
            // future by value into its task and again when it finishes.
            tracker.spawn(Box::pin(converse(shared, stream, peer, permit, ip_slot)));
            return;
        };
        if let Some(ip) = peer
            && !pp.trusted_networks.iter().any(|n| n.contains(&ip))
        {
            // Not our load balancer: it may not speak for anyone. No banner.
            refused(&name, "refused_proxy");
            tracing::warn!(listener = %name, peer = %ip, "connection from outside proxy_protocol.trusted_networks; closed");
            drop(stream);
            return;
        }
        tracker.spawn(Box::pin(async move {
            let mut stream = stream;
            let (client, rest) =
                match proxy_protocol::read_header(&mut stream, peer, pp.timeout.0).await {
                    Ok(read) => read,
                    Err(e) => {
                        refused(&shared.config.name, "refused_proxy");
                        let from = peer.map_or_else(|| "local".to_owned(), |p| p.to_string());
                        tracing::warn!(listener = %shared.config.name, peer = %from, reason = %e, "PROXY protocol header refused; closed without a banner");
                        return;
                    }
                };
            let stream = Rewind::new(rest, stream);
            let Some(ip_slot) = IpSlot::for_peer(&shared, client) else {
                refused(&shared.config.name, "refused_per_ip");
                refuse_connection(stream).await;
                return;
            };
            converse(shared, stream, client, permit, ip_slot).await;
        }));
    }
}

/// Counts a connection refused for `outcome`.
fn refused(listener: &str, outcome: &'static str) {
    counter!(m::CONNECTIONS_TOTAL, "listener" => listener.to_owned(), "outcome" => outcome)
        .increment(1);
}

/// One session over `stream` for the client at `peer`, STARTTLS included.
async fn converse<S>(
    shared: Arc<Shared>,
    mut stream: S,
    peer: Option<IpAddr>,
    permit: OwnedSemaphorePermit,
    ip_slot: Option<IpSlot>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _permit = permit;
    let _ip_slot = ip_slot;
    let counters = shared.counters();
    counters.connections_accepted.increment(1);
    counters.connections_current.increment(1.0);
    let started = Instant::now();
    let mut conversation = Conversation::new(shared.clone(), peer);
    if let Ending::StartTls = conversation.run(&mut stream).await {
        if let Some(acceptor) = shared.tls.clone() {
            if let Some(mut tls) =
                handshake(&acceptor, stream, shared.config.timeouts.tls_handshake.0).await
            {
                conversation.tls_info = Some(crate::tls::describe(tls.get_ref().1));
                conversation.session.tls_established();
                let _ = conversation.run(&mut tls).await;
            }
        }
    }
    let counters = shared.counters();
    counters.connections_current.decrement(1.0);
    counters
        .session_duration
        .record(started.elapsed().as_secs_f64());
}

/// A connection we will not serve: one 421 line, then close.
async fn refuse_connection<S: AsyncWrite + Unpin>(mut stream: S) {
    let reply = replies::too_many_connections().to_bytes();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(&reply).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn accept_backoff(name: &str, e: &std::io::Error) {
    tracing::warn!(listener = %name, error = %e, "accept failed; backing off");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// One connection's share of its IP's allowance; released on drop.
struct IpSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl IpSlot {
    /// The peer's share, if it has an address: `Some(None)` for a unix-socket peer, `None`
    /// when the address has used up its allowance.
    fn for_peer(shared: &Arc<Shared>, peer: Option<IpAddr>) -> Option<Option<Self>> {
        match peer {
            Some(ip) => Self::take(shared, ip).map(Some),
            None => Some(None),
        }
    }

    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<Self> {
        let mut map = shared
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(ip).or_insert(0);
        if *n >= shared.config.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(Self {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .per_ip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Runs the STARTTLS handshake with the listener's acceptor, bounded by its timeout.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    acceptor: &tokio_rustls::TlsAcceptor,
    io: S,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<S>> {
    match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}
