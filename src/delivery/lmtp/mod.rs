//! The LMTP delivery agent: one connection to a store, and mail transactions over it.
//!
//! [`RemoteStore`] is a store as the agent sees it, built once from its [`LmtpStoreConfig`]
//! (the password and CA files are read then). [`RemoteStore::connect`] opens a [`Connection`]:
//! TCP or unix socket, greeting, LHLO, optional STARTTLS (then LHLO again), optional AUTH
//! PLAIN. [`Connection::deliver`] runs one transaction with the protocol rules of
//! [`postern_proto::client`]: MAIL, RCPT and DATA in one flush when the store offers
//! PIPELINING, BDAT chunks instead of DATA when it offers CHUNKING, the body streamed from an
//! [`AsyncBufRead`](tokio::io::AsyncBufRead) (dot-stuffed by
//! [`DataEncoder`](postern_proto::data::DataEncoder) for DATA straight from the reader's
//! buffer) so a large message never sits in memory whole and is copied only by the encoding.
//!
//! # What is checked before anything is sent
//!
//! - SIZE: a message larger than the store's limit bounces `552 5.3.4`.
//! - SMTPUTF8: a message with a non-ASCII address and a store without it bounces `554 5.6.7`.
//!   A message that only declared SMTPUTF8 goes without it; 8-bit headers met while streaming
//!   then abort the transaction before its end with the same bounce.
//! - 8BITMIME: a store without it gets the body through [`super::downgrade`]: 8-bit MIME
//!   parts (declared `8bit`/`binary`) are converted to quoted-printable (RFC 6152 §3, as
//!   Postfix does). 8-bit octets that survive the conversion (8-bit headers, 8-bit content in
//!   a part declared 7-bit) abort the transaction before its end (nothing is delivered) with
//!   `554 5.6.3`. SIZE= still declares the spooled size (an estimate, RFC 1870).
//!
//! ESMTP parameters the store did not advertise are left out (SIZE=, BODY=, SMTPUTF8, the DSN
//! parameters).
//!
//! # Results as they arrive
//!
//! Every recipient gets exactly one [`Outcome`](crate::delivery::Outcome), handed to the
//! caller's callback the moment the reply that decides it is parsed (RFC 2033 §4.2: one
//! reply per accepted recipient after the end of data), so the ledger can be written reply
//! by reply. A connection lost after `k` of `n` post-dot replies yields those `k` outcomes
//! and `n - k` [`Outcome::InDoubt`](crate::delivery::Outcome::InDoubt); lost before the end
//! of data, [`Outcome::NotAttempted`](crate::delivery::Outcome::NotAttempted). What the
//! replies mean, and how wide a
//! failure is, is decided in [`super::trouble`] only.
//!
//! # PhaseTimeouts
//!
//! Per phase, per read or write (Postfix's `lmtp_*_timeout`): connect, the greeting and each
//! LHLO/STARTTLS/AUTH reply, each MAIL/RCPT/DATA reply, each content write, and each reply
//! after the end of data. A timeout ends the connection: the recipients still open are not
//! attempted (before the end of data) or in doubt (after it).
//!
//! DIAGNOSTICS: setup failures are returned as a [`Trouble`] (scope [`Scope::Store`](super::Scope::Store)); a
//! transaction never fails as a whole, it returns a [`Report`](crate::delivery::Report). No
//! network input panics.
//!
//! Files: this one sets a connection up ([`RemoteStore`]: connect, greeting, LHLO or EHLO,
//! STARTTLS, AUTH); `connection` runs transactions on it ([`Connection`]); `run` keeps one
//! transaction's bookkeeping.
//!
//! SEE ALSO: `pool` (connections reused across messages), RFC 2033, RFC 2920, RFC 3030.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postern_proto::client::{ClientConnection, Protocol};
use rustls::pki_types::ServerName;
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::config::{LmtpStoreConfig, StoreAddress, TlsMode, WindowConfig};
use super::trouble::{self, Phase, Policy, Trouble};
use super::wire::{self, Credentials, Io, TlsSettings, Wire};

pub use super::error::StoreError;
pub use connection::Connection;

mod connection;
mod run;

/// Size of the reads from the message body in DATA mode.
const DATA_READ: usize = 64 * 1024;

/// The longest QUIT may take before the socket is simply closed.
const QUIT_LIMIT: Duration = Duration::from_secs(5);

/// PhaseTimeouts per phase, from [`super::config::LmtpTimeouts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseTimeouts {
    /// Opening the socket.
    pub connect: Duration,
    /// The greeting and each LHLO, STARTTLS (handshake included) and AUTH reply.
    pub lhlo: Duration,
    /// Each MAIL, RCPT, DATA and RSET reply.
    pub mail_rcpt: Duration,
    /// Each content write, and each reply to a BDAT chunk that is not the last.
    pub data: Duration,
    /// Each reply after the end of data.
    pub end_of_data: Duration,
}

/// An LMTP store, ready to connect to. Shared (`Arc`) by its pool and its connections.
///
/// The same type, with [`Protocol::Smtp`], is an SMTP relay ([`RemoteStore::from_smtp_config`],
/// in [`super::smtp`]): EHLO (HELO fallback) instead of LHLO, one reply after the end of data
/// for every accepted recipient; everything else is shared.
pub struct RemoteStore {
    name: String,
    protocol: Protocol,
    address: StoreAddress,
    local_name: String,
    tls: Option<TlsSettings>,
    auth: Option<Credentials>,
    timeouts: PhaseTimeouts,
    max_connections: usize,
    recipients_per_transaction: usize,
    idle_timeout: Duration,
    reuse_limit: Duration,
    chunking: bool,
    chunk_size: usize,
    policy: Policy,
    window: WindowConfig,
    edge: super::edge_config::EdgeSettings,
    /// The per-phase latency histograms, looked up once (at first use, when the gateway's
    /// recorder is installed) rather than by name and labels on every phase.
    phases: std::sync::OnceLock<PhaseHistograms>,
    /// Whether the store keeps our new sessions waiting (from its greetings).
    backlog: crate::delivery::backlog::BacklogSign,
    /// The store's last LHLO offered [`TURNS_KEYWORD`].
    turns: AtomicBool,
}

/// The private LHLO keyword (RFC 5321 §2.2.2) of a postern concentrator's listener in
/// `mode: proxy`: it relays each transaction to its store under one window and gives the
/// gateways that wait for a slot turns, one transaction of each in turn. A gateway whose
/// store offers it leaves the concentrator to share the store: its window there stops
/// steering by latency ([`RemoteStore::gives_turns`]).
pub const TURNS_KEYWORD: &str = "XPOSTERN-TURNS";

/// The phases of [`crate::metrics::PHASE_LATENCY`]: the scheduler times the first and the
/// last, this module the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseMark {
    /// Waiting for a pooled connection (or a new one).
    Acquire,
    /// TCP or unix-socket connect.
    Connect,
    /// Greeting, LHLO, STARTTLS, AUTH.
    Lhlo,
    /// MAIL and RCPT, to their replies.
    MailRcpt,
    /// DATA and the content.
    Data,
    /// From the final dot to the last reply.
    EndOfData,
    /// The whole transaction.
    Transaction,
}

impl PhaseMark {
    const ALL: [Self; 7] = [
        Self::Acquire,
        Self::Connect,
        Self::Lhlo,
        Self::MailRcpt,
        Self::Data,
        Self::EndOfData,
        Self::Transaction,
    ];

    /// The `phase` label.
    const fn label(self) -> &'static str {
        match self {
            Self::Acquire => "acquire",
            Self::Transaction => "transaction",
            Self::Connect => "connect",
            Self::Lhlo => "lhlo",
            Self::MailRcpt => "mail_rcpt",
            Self::Data => "data",
            Self::EndOfData => "end_of_data",
        }
    }
}

/// One store's histogram handle per [`PhaseMark`].
struct PhaseHistograms([metrics::Histogram; 7]);

impl PhaseHistograms {
    fn new(store: &str) -> Self {
        Self(PhaseMark::ALL.map(|p| {
            metrics::histogram!(crate::metrics::PHASE_LATENCY, "store" => store.to_owned(), "phase" => p.label())
        }))
    }
}

impl fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteStore")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field("address", &self.address)
            .field("tls", &self.tls.as_ref().map(|t| t.mode))
            .field("auth", &self.auth.as_ref().map(|c| &c.username))
            .field("timeouts", &self.timeouts)
            .field("max_connections", &self.max_connections)
            .field(
                "recipients_per_transaction",
                &self.recipients_per_transaction,
            )
            .finish_non_exhaustive()
    }
}

impl RemoteStore {
    /// Loads a store's settings: validates the configuration, reads the password file and
    /// the CA file, builds the TLS client configuration. `local_name` is sent with LHLO.
    pub fn from_config(config: &LmtpStoreConfig, local_name: &str) -> Result<Self, StoreError> {
        config.validate().map_err(|reason| StoreError::Invalid {
            store: config.name.clone(),
            reason: reason.into(),
        })?;
        Self::build(config, local_name, Protocol::Lmtp)
    }

    /// Records `took` as `phase` of this store ([`crate::metrics::PHASE_LATENCY`]).
    pub fn record_phase(&self, phase: PhaseMark, took: Duration) {
        let PhaseHistograms(histograms) =
            self.phases.get_or_init(|| PhaseHistograms::new(&self.name));
        histograms[phase as usize].record(took.as_secs_f64());
    }

    /// The store for a validated configuration, speaking `protocol`.
    pub(super) fn build(
        config: &LmtpStoreConfig,
        local_name: &str,
        protocol: Protocol,
    ) -> Result<Self, StoreError> {
        let store = config.name.clone();
        let tls = match &config.tls {
            None => None,
            Some(tls) => {
                let client = super::tls::client_config(
                    &store,
                    tls.ca_file.as_deref(),
                    tls.insecure_skip_verify,
                )?;
                let name = match (&tls.server_name, &config.address) {
                    (Some(name), _) => name.clone(),
                    (None, StoreAddress::Tcp { host, .. }) => host.clone(),
                    (None, StoreAddress::Unix(_)) => "localhost".to_owned(),
                };
                let server_name =
                    ServerName::try_from(name.clone()).map_err(|_| StoreError::Invalid {
                        store: store.clone(),
                        reason: format!("tls: `{name}` is not a valid server name"),
                    })?;
                Some(TlsSettings {
                    mode: tls.mode,
                    connector: TlsConnector::from(client),
                    server_name,
                })
            }
        };
        let auth = match &config.auth {
            None => None,
            Some(auth) => {
                let password = std::fs::read_to_string(&auth.password_file).map_err(|error| {
                    StoreError::PasswordFile {
                        store: store.clone(),
                        path: auth.password_file.clone(),
                        error,
                    }
                })?;
                let password = password.trim_end_matches(['\r', '\n']).to_owned();
                Some(Credentials {
                    username: auth.username.clone(),
                    password,
                })
            }
        };
        let t = &config.timeouts;
        Ok(Self {
            phases: std::sync::OnceLock::new(),
            backlog: crate::delivery::backlog::BacklogSign::default(),
            turns: AtomicBool::new(false),
            name: store,
            protocol,
            address: config.address.clone(),
            local_name: local_name.to_owned(),
            tls,
            auth,
            timeouts: PhaseTimeouts {
                connect: t.connect.0,
                lhlo: t.lhlo.0,
                mail_rcpt: t.mail_rcpt.0,
                data: t.data.0,
                end_of_data: t.end_of_data.0,
            },
            max_connections: config.max_connections,
            recipients_per_transaction: config.recipients_per_transaction,
            idle_timeout: config.idle_timeout.0,
            reuse_limit: config.reuse_limit.0,
            chunking: config.chunking,
            // validate() bounds it to 1 GiB.
            chunk_size: usize::try_from(config.chunk_size.0).unwrap_or(1 << 20),
            policy: Policy::new(config.normalize.clone()),
            window: config.window,
            edge: config.edge(),
        })
    }

    /// The `window:` settings.
    pub fn window(&self) -> WindowConfig {
        self.window
    }

    /// Recipient verification and backpressure settings ([`crate::edge`]).
    pub fn edge(&self) -> super::edge_config::EdgeSettings {
        self.edge
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// LMTP, or SMTP for a relay.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Where it listens.
    pub fn address(&self) -> &StoreAddress {
        &self.address
    }

    /// The pool's size.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Recipients per transaction; more are split.
    pub fn recipients_per_transaction(&self) -> usize {
        self.recipients_per_transaction
    }

    /// A pooled connection idle this long is closed.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// How long a pooled connection may stay idle now: `idle_timeout`, or much less while
    /// the store keeps our new sessions waiting in its backlog ([`crate::delivery::backlog`]).
    pub fn idle_limit(&self) -> Duration {
        self.backlog.idle_limit(self.idle_timeout, Instant::now())
    }

    /// The store kept one of our new sessions waiting lately ([`crate::delivery::backlog`]).
    pub fn queues_sessions(&self) -> bool {
        self.backlog.queues(Instant::now())
    }

    /// The store is a postern concentrator that gives its clients turns ([`TURNS_KEYWORD`] in
    /// its last LHLO reply).
    pub fn gives_turns(&self) -> bool {
        self.turns.load(Ordering::Relaxed)
    }

    /// A connection older than this is not reused (a pool halves it while the store keeps
    /// our new sessions waiting: [`StorePool::reuse_limit`](crate::delivery::StorePool::reuse_limit)).
    pub fn reuse_limit(&self) -> Duration {
        self.reuse_limit
    }

    /// The timeouts.
    pub fn timeouts(&self) -> PhaseTimeouts {
        self.timeouts
    }

    /// The failure policy (normalisation table).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Opens a connection: socket, greeting, LHLO (EHLO, or HELO when EHLO is refused, for
    /// SMTP), STARTTLS and LHLO/EHLO again (if configured), AUTH PLAIN (if configured). Any failure is the store's ([`Scope::Store`](super::Scope::Store)).
    pub async fn connect(self: &Arc<Self>) -> Result<Connection, Trouble> {
        let t = self.timeouts;
        let mut mark = Instant::now();
        let io: Box<dyn Io> = match &self.address {
            StoreAddress::Tcp { host, port } => {
                let stream = timeout(t.connect, TcpStream::connect((host.as_str(), *port)))
                    .await
                    .map_err(|_| trouble::timed_out(Phase::Connect, t.connect))?
                    .map_err(|e| trouble::connect_failed(&self.address.to_string(), &e))?;
                // Commands and replies are small: do not wait to coalesce them.
                stream.set_nodelay(true).ok();
                Box::new(stream)
            }
            StoreAddress::Unix(path) => {
                let stream = timeout(t.connect, UnixStream::connect(path))
                    .await
                    .map_err(|_| trouble::timed_out(Phase::Connect, t.connect))?
                    .map_err(|e| trouble::connect_failed(&self.address.to_string(), &e))?;
                Box::new(stream)
            }
        };
        phase_done(self, PhaseMark::Connect, &mut mark);
        let proto = ClientConnection::new(self.protocol, self.local_name.clone());
        let mut wire = Wire::new(io, proto);
        let mut caps = wire.until_ready(Phase::Lhlo, t.lhlo).await?;
        // Greeting and LHLO only (not STARTTLS or AUTH): how long the store left us waiting,
        // and the LHLO round trip that followed the greeting.
        let now = Instant::now();
        let greeted = wire.first_input().unwrap_or(now);
        self.backlog.observe(
            greeted.saturating_duration_since(mark),
            now.saturating_duration_since(greeted),
            now,
        );
        let mut tls = false;
        if let Some(settings) = &self.tls {
            if caps.starttls {
                (wire, caps, tls) = wire::start_tls(wire, caps, settings, t.lhlo).await?;
            } else if settings.mode == TlsMode::Required {
                return Err(trouble::not_offered("STARTTLS"));
            }
        }
        if let Some(credentials) = &self.auth {
            wire.authenticate(credentials, t.lhlo).await?;
        }
        phase_done(self, PhaseMark::Lhlo, &mut mark);
        self.turns
            .store(caps.offers(TURNS_KEYWORD), Ordering::Relaxed);
        let now = Instant::now();
        Ok(Connection {
            store: Arc::clone(self),
            wire,
            caps,
            tls,
            created: now,
            last_used: now,
            transactions: 0,
            broken: false,
        })
    }
}

/// Records the time since `mark` as `phase` of `store` ([`crate::metrics::PHASE_LATENCY`])
/// and moves `mark` to now. Returns the time recorded.
fn phase_done(store: &RemoteStore, phase: PhaseMark, mark: &mut Instant) -> Duration {
    let now = Instant::now();
    let took = now.duration_since(*mark);
    store.record_phase(phase, took);
    *mark = now;
    took
}
