//! The LMTP delivery agent: one connection to a store, and mail transactions over it.
//!
//! [`LmtpStore`] is a store as the agent sees it, built once from its [`LmtpStoreConfig`]
//! (the password and CA files are read then). [`LmtpStore::connect`] opens a [`Connection`]:
//! TCP or unix socket, greeting, LHLO, optional STARTTLS (then LHLO again), optional AUTH
//! PLAIN. [`Connection::deliver`] runs one transaction with the protocol rules of
//! [`postern_proto::client`]: MAIL, RCPT and DATA in one flush when the store offers
//! PIPELINING, BDAT chunks instead of DATA when it offers CHUNKING, the body streamed from an
//! [`AsyncRead`] (dot-stuffed by [`DataEncoder`] for DATA) so a large message never sits in
//! memory whole.
//!
//! # What is checked before anything is sent
//!
//! - SIZE: a message larger than the store's limit bounces `552 5.3.4`.
//! - SMTPUTF8: a message that needs it (declared, or a non-ASCII address) and a store without
//!   it bounces `554 5.6.7`.
//! - 8BITMIME: 8-bit content (declared `BODY=8BITMIME`, or flagged in the [`Envelope`]) and a
//!   store without it bounces `554 5.6.3`; no conversion is attempted. Undeclared 8-bit octets
//!   met while streaming to such a store abort the transaction before its end (nothing is
//!   delivered) with the same bounce.
//!
//! ESMTP parameters the store did not advertise are left out (SIZE=, BODY=, SMTPUTF8, the DSN
//! parameters).
//!
//! # Results as they arrive
//!
//! Every recipient gets exactly one [`Outcome`], handed to the caller's callback the moment
//! the reply that decides it is parsed (RFC 2033 §4.2: one reply per accepted recipient after
//! the end of data), so the ledger can be written reply by reply. A connection lost after `k`
//! of `n` post-dot replies yields those `k` outcomes and `n - k` [`Outcome::InDoubt`]; lost
//! before the end of data, [`Outcome::NotAttempted`]. What the replies mean, and how wide a
//! failure is, is decided in [`super::trouble`] only.
//!
//! # Timeouts
//!
//! Per phase, per read or write (Postfix's `lmtp_*_timeout`): connect, the greeting and each
//! LHLO/STARTTLS/AUTH reply, each MAIL/RCPT/DATA reply, each content write, and each reply
//! after the end of data. A timeout ends the connection: the recipients still open are not
//! attempted (before the end of data) or in doubt (after it).
//!
//! DIAGNOSTICS: setup failures are returned as a [`Trouble`] (scope [`Scope::Store`]); a
//! transaction never fails as a whole, it returns a [`Report`]. No network input panics.
//!
//! SEE ALSO: `pool` (connections reused across messages), RFC 2033, RFC 2920, RFC 3030.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use postern_proto::address::{ForwardPath, ReversePath};
use postern_proto::client::{Capabilities, ClientConnection, ClientError, ClientEvent, Protocol};
use postern_proto::data::DataEncoder;
use postern_proto::params::{Body, MailParams, RcptParams};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::config::{LmtpStoreConfig, StoreAddress, TlsMode};
use super::trouble::{self, Outcome, Phase, Policy, Scope, Trouble, When};

/// The CA bundle used when `tls.ca_file` is not given (Debian's `ca-certificates`).
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Size of the reads from the message body in DATA mode.
const DATA_READ: usize = 64 * 1024;

/// The longest QUIT may take before the socket is simply closed.
const QUIT_LIMIT: Duration = Duration::from_secs(5);

/// Why a store's settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration is inconsistent.
    #[error("store {store}: {reason}")]
    Invalid {
        /// The store.
        store: String,
        /// What is wrong.
        reason: String,
    },
    /// The password file could not be read.
    #[error("store {store}: password file {path}: {error}")]
    PasswordFile {
        /// The store.
        store: String,
        /// The file.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The CA file could not be read or holds no certificate.
    #[error("store {store}: CA file {path}: {reason}")]
    CaFile {
        /// The store.
        store: String,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the client configuration.
    #[error("store {store}: TLS: {error}")]
    Tls {
        /// The store.
        store: String,
        /// The error.
        error: rustls::Error,
    },
}

/// Timeouts per phase, from [`super::config::LmtpTimeouts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
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
pub struct LmtpStore {
    name: String,
    address: StoreAddress,
    local_name: String,
    tls: Option<TlsSettings>,
    auth: Option<Credentials>,
    timeouts: Timeouts,
    max_connections: usize,
    recipients_per_transaction: usize,
    idle_timeout: Duration,
    reuse_limit: Duration,
    chunking: bool,
    chunk_size: usize,
    policy: Policy,
}

struct TlsSettings {
    mode: TlsMode,
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

struct Credentials {
    username: String,
    password: String,
}

impl fmt::Debug for LmtpStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LmtpStore")
            .field("name", &self.name)
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

impl LmtpStore {
    /// Loads a store's settings: validates the configuration, reads the password file and
    /// the CA file, builds the TLS client configuration. `local_name` is sent with LHLO.
    pub fn from_config(config: &LmtpStoreConfig, local_name: &str) -> Result<Self, StoreError> {
        let store = config.name.clone();
        config.validate().map_err(|reason| StoreError::Invalid {
            store: store.clone(),
            reason,
        })?;
        let tls = match &config.tls {
            None => None,
            Some(tls) => {
                let client =
                    tls_client_config(&store, tls.ca_file.as_deref(), tls.insecure_skip_verify)?;
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
            name: store,
            address: config.address.clone(),
            local_name: local_name.to_owned(),
            tls,
            auth,
            timeouts: Timeouts {
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
        })
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.name
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

    /// A connection older than this is not reused.
    pub fn reuse_limit(&self) -> Duration {
        self.reuse_limit
    }

    /// The timeouts.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The failure policy (normalisation table).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Opens a connection: socket, greeting, LHLO, STARTTLS and LHLO again (if configured),
    /// AUTH PLAIN (if configured). Any failure is the store's ([`Scope::Store`]).
    pub async fn connect(self: &Arc<Self>) -> Result<Connection, Trouble> {
        let t = self.timeouts;
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
        let proto = ClientConnection::new(Protocol::Lmtp, self.local_name.clone());
        let mut wire = Wire::new(io, proto);
        let mut caps = wire.until_ready(Phase::Lhlo, t.lhlo).await?;
        let mut tls = false;
        if let Some(settings) = &self.tls {
            if caps.starttls {
                (wire, caps, tls) = start_tls(wire, caps, settings, t.lhlo).await?;
            } else if settings.mode == TlsMode::Required {
                return Err(trouble::not_offered("STARTTLS"));
            }
        }
        if let Some(credentials) = &self.auth {
            wire.authenticate(credentials, t.lhlo).await?;
        }
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

/// The envelope of one message, as the spool holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// MAIL FROM.
    pub from: ReversePath,
    /// The parameters the message arrived with (BODY, SMTPUTF8, RET, ENVID); only those the
    /// store offers are sent on.
    pub params: MailParams,
    /// The size of the content in octets (sent as SIZE=, checked against the store's limit).
    pub size: u64,
    /// The content has octets above 127 (as found when it was received).
    pub eight_bit: bool,
    /// When the message was queued (for the normalisation rules with `max_age`).
    pub arrived: SystemTime,
}

impl Envelope {
    /// An envelope with no parameters, arrived now.
    pub fn new(from: ReversePath, size: u64) -> Self {
        Self {
            from,
            params: MailParams::default(),
            size,
            eight_bit: false,
            arrived: SystemTime::now(),
        }
    }
}

/// One recipient of a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The caller's index (its ledger slot); outcomes are reported under it.
    pub index: usize,
    /// RCPT TO.
    pub path: ForwardPath,
    /// The recipient's parameters (NOTIFY, ORCPT); sent only if the store offers DSN.
    pub params: RcptParams,
}

/// What one transaction (or one message through the pool) came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One outcome per recipient, by the caller's index, in the order they were decided.
    pub outcomes: Vec<(usize, Outcome)>,
    /// The widest failure beyond single recipients, if any.
    pub trouble: Option<Trouble>,
}

impl Report {
    /// How wide the failure is: [`Scope::Recipient`] when nothing beyond the recipients'
    /// own replies went wrong.
    pub fn scope(&self) -> Scope {
        self.trouble.as_ref().map_or(Scope::Recipient, |t| t.scope)
    }

    /// The outcome of the recipient with this index.
    pub fn outcome(&self, index: usize) -> Option<&Outcome> {
        self.outcomes
            .iter()
            .find_map(|(i, o)| (*i == index).then_some(o))
    }

    /// Adds another transaction's report (the same message, more recipients).
    pub fn merge(&mut self, other: Self) {
        self.outcomes.extend(other.outcomes);
        if let Some(t) = other.trouble {
            self.trouble = Trouble::widen(self.trouble.take(), t);
        }
    }
}

/// A message body that can be read from the start as often as needed (once per
/// transaction: a message with more recipients than `recipients_per_transaction` is sent
/// several times).
pub trait MessageBody: Sync {
    /// The reader of one pass.
    type Reader<'a>: AsyncRead + Unpin + Send + 'a
    where
        Self: 'a;

    /// A reader positioned at the first octet of the content.
    fn open(&self) -> impl Future<Output = io::Result<Self::Reader<'_>>> + Send;
}

impl MessageBody for [u8] {
    type Reader<'a> = &'a [u8];

    fn open(&self) -> impl Future<Output = io::Result<&[u8]>> + Send {
        std::future::ready(Ok(self))
    }
}

/// A body stored in a file: `len` octets from `offset` (the spool's content section).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileBody {
    /// The file.
    pub path: PathBuf,
    /// Where the content starts.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
}

impl MessageBody for FileBody {
    type Reader<'a> = tokio::io::Take<tokio::fs::File>;

    async fn open(&self) -> io::Result<Self::Reader<'_>> {
        let mut file = tokio::fs::File::open(&self.path).await?;
        file.seek(io::SeekFrom::Start(self.offset)).await?;
        Ok(file.take(self.len))
    }
}

/// An open, greeted (and, as configured, encrypted and authenticated) connection to a store.
pub struct Connection {
    store: Arc<LmtpStore>,
    wire: Wire,
    caps: Capabilities,
    tls: bool,
    created: Instant,
    last_used: Instant,
    transactions: u64,
    /// Closed, timed out or aborted: never to be used again.
    broken: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("store", &self.store.name)
            .field("caps", &self.caps)
            .field("tls", &self.tls)
            .field("transactions", &self.transactions)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// What the store advertised in its (last) LHLO reply.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The store this connection goes to.
    pub fn store(&self) -> &Arc<LmtpStore> {
        &self.store
    }

    /// STARTTLS succeeded.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Can take a transaction now: open, and no command outstanding.
    pub fn is_usable(&self) -> bool {
        !self.broken && !self.wire.proto.is_closed() && self.wire.proto.is_idle()
    }

    /// Since the connection was opened.
    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// Since the last command of a transaction (or RSET).
    pub fn idle(&self) -> Duration {
        self.last_used.elapsed()
    }

    /// Transactions started on this connection.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    /// Runs one mail transaction for `recipients` (at most `recipients_per_transaction`;
    /// the caller splits, or uses [`StorePool::deliver`](super::pool::StorePool::deliver)).
    /// `body` is read once, to its end. Each recipient's outcome goes to `on_outcome` as
    /// soon as it is known, and is also returned in the [`Report`].
    pub async fn deliver<R, F>(
        &mut self,
        envelope: &Envelope,
        recipients: &[Recipient],
        mut body: R,
        on_outcome: &mut F,
    ) -> Report
    where
        R: AsyncRead + Unpin,
        F: FnMut(usize, &Outcome),
    {
        let store = Arc::clone(&self.store);
        let t = store.timeouts;
        let mut run = Run::new(recipients, on_outcome, &store.policy, envelope.arrived);
        if recipients.is_empty() {
            return run.finish();
        }
        if !self.is_usable() {
            run.widen(trouble::unusable("closed, or a command is outstanding"));
            run.settle_rest(&Outcome::NotAttempted(None));
            return run.finish();
        }
        if let Some(reply) = self.refuse_locally(envelope, recipients) {
            run.widen(trouble::message_refused(&reply));
            run.settle_rest(&Outcome::Bounced(reply));
            return run.finish();
        }
        let (params, rcpts) = self.parameters(envelope, recipients);
        let bdat = store.chunking && self.caps.chunking;
        let check_8bit = !self.caps.eight_bit_mime;
        let proto = &mut self.wire.proto;
        let started = if bdat {
            proto.start_transaction_bdat(envelope.from.clone(), params, rcpts)
        } else {
            proto.start_transaction(envelope.from.clone(), params, rcpts)
        };
        if let Err(e) = started {
            run.widen(trouble::unusable(&e.to_string()));
            run.settle_rest(&Outcome::NotAttempted(None));
            return run.finish();
        }
        self.last_used = Instant::now();
        self.transactions += 1;

        if let Err(f) = self.wire.flush(t.mail_rcpt).await {
            run.widen(f.trouble(Phase::MailRcpt, t.mail_rcpt));
        } else if bdat {
            self.send_bdat(&mut body, &mut run, check_8bit).await;
        }
        let mut data_started = false;
        loop {
            self.absorb(&mut run);
            if run.done || run.closed {
                break;
            }
            if run.go_ahead && !data_started {
                data_started = true;
                self.send_data(&mut body, &mut run, check_8bit).await;
                continue;
            }
            let (phase, limit) = if run.end_sent {
                (Phase::EndOfData, t.end_of_data)
            } else {
                (Phase::MailRcpt, t.mail_rcpt)
            };
            if let Err(f) = self.wire.flush(limit).await {
                run.widen(f.trouble(phase, limit));
                continue;
            }
            if let Err(f) = self.wire.read(limit).await {
                run.widen(f.trouble(phase, limit));
            }
        }
        self.last_used = Instant::now();
        if run.closed || self.wire.proto.is_closed() {
            self.broken = true;
        }
        run.finish()
    }

    /// RSET, to check that a pooled connection is still alive before reusing it.
    pub async fn rset(&mut self) -> Result<(), Trouble> {
        let limit = self.store.timeouts.mail_rcpt;
        if let Err(e) = self.wire.proto.rset() {
            self.broken = true;
            return Err(trouble::unusable(&e.to_string()));
        }
        let result = self.wire.until_reply(Phase::Rset, limit).await;
        match &result {
            Ok(reply) if reply.is_positive() => {
                self.last_used = Instant::now();
                return Ok(());
            }
            Ok(reply) => {
                self.broken = true;
                return Err(trouble::refused(Phase::Rset, reply));
            }
            Err(_) => self.broken = true,
        }
        result.map(|_| ())
    }

    /// Ends the session politely: QUIT and its reply (waiting at most a few seconds), then
    /// closes the socket. The connection cannot be used afterwards.
    pub async fn quit(&mut self) {
        if self.is_usable() && self.wire.proto.quit().is_ok() {
            let limit = QUIT_LIMIT.min(self.store.timeouts.mail_rcpt);
            if self.wire.flush(limit).await.is_ok() {
                while !self.wire.proto.is_closed() && self.wire.read(limit).await.is_ok() {}
            }
        }
        self.broken = true;
        timeout(QUIT_LIMIT, self.wire.io.shutdown()).await.ok();
    }

    /// The bounce for a message this store cannot take, decided before sending anything.
    fn refuse_locally(
        &self,
        envelope: &Envelope,
        recipients: &[Recipient],
    ) -> Option<postern_proto::Reply> {
        let caps = &self.caps;
        if let Some(Some(limit)) = caps.size {
            if envelope.size > limit {
                return Some(trouble::size_exceeded(envelope.size, limit));
            }
        }
        if needs_smtputf8(envelope, recipients) && !caps.smtputf8 {
            return Some(trouble::needs_smtputf8());
        }
        match envelope.params.body {
            Some(Body::BinaryMime)
                if !(caps.binarymime && caps.chunking && self.store.chunking) =>
            {
                return Some(trouble::needs_binarymime());
            }
            _ => {}
        }
        let eight_bit = envelope.eight_bit || envelope.params.body == Some(Body::EightBitMime);
        if eight_bit && !caps.eight_bit_mime {
            return Some(trouble::needs_8bitmime());
        }
        None
    }

    /// MAIL and RCPT parameters, keeping only what the store advertised.
    fn parameters(
        &self,
        envelope: &Envelope,
        recipients: &[Recipient],
    ) -> (MailParams, Vec<(ForwardPath, RcptParams)>) {
        let caps = &self.caps;
        let declared = envelope.params.body;
        let body = match declared {
            Some(Body::BinaryMime) => Some(Body::BinaryMime),
            _ if (envelope.eight_bit || declared == Some(Body::EightBitMime))
                && caps.eight_bit_mime =>
            {
                Some(Body::EightBitMime)
            }
            _ => None,
        };
        let params = MailParams {
            size: caps.size.is_some().then_some(envelope.size),
            body,
            smtputf8: caps.smtputf8 && needs_smtputf8(envelope, recipients),
            ret: envelope.params.ret.filter(|_| caps.dsn),
            envid: envelope.params.envid.clone().filter(|_| caps.dsn),
            // XXX: REQUIRETLS (RFC 8689) and AUTH= are not passed to stores: no store we
            // deliver to offers REQUIRETLS, and AUTH= means nothing to a final store.
            requiretls: false,
            auth: None,
        };
        let rcpts = recipients
            .iter()
            .map(|r| {
                let params = if caps.dsn {
                    r.params.clone()
                } else {
                    RcptParams::default()
                };
                (r.path.clone(), params)
            })
            .collect();
        (params, rcpts)
    }

    fn absorb<F: FnMut(usize, &Outcome)>(&mut self, run: &mut Run<'_, F>) {
        while let Some(event) = self.wire.proto.poll_event() {
            run.event(event);
        }
    }

    /// Ends the transaction before its end of data on purpose: every open recipient gets
    /// `outcome` instead of "not attempted".
    fn abort<F: FnMut(usize, &Outcome)>(
        &mut self,
        run: &mut Run<'_, F>,
        outcome: Outcome,
        why: Trouble,
    ) {
        run.abort = Some(outcome);
        run.widen(why);
        self.wire.proto.connection_lost();
        self.broken = true;
    }

    /// After 354: the body, dot-stuffed, then the final dot.
    async fn send_data<R, F>(&mut self, body: &mut R, run: &mut Run<'_, F>, check_8bit: bool)
    where
        R: AsyncRead + Unpin,
        F: FnMut(usize, &Outcome),
    {
        let limit = self.store.timeouts.data;
        let mut encoder = DataEncoder::new();
        let mut input = vec![0u8; DATA_READ];
        let mut out = Vec::with_capacity(DATA_READ + DATA_READ / 32);
        loop {
            let n = match body.read(&mut input).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let reply = trouble::local_read_error(&e);
                    let why = trouble::message_refused(&reply);
                    return self.abort(run, Outcome::Deferred(reply), why);
                }
            };
            let chunk = &input[..n];
            if check_8bit && !chunk.is_ascii() {
                let reply = trouble::needs_8bitmime();
                let why = trouble::message_refused(&reply);
                return self.abort(run, Outcome::Bounced(reply), why);
            }
            out.clear();
            encoder.encode(chunk, &mut out);
            if let Err(f) = self.wire.write_all(&out, limit).await {
                return run.widen(f.trouble(Phase::Data, limit));
            }
        }
        out.clear();
        encoder.finish(&mut out);
        // From here a lost connection leaves the recipients in doubt: the dot may arrive even
        // if the write reports an error.
        if let Err(e) = self.wire.proto.data_sent() {
            let why = trouble::unusable(&e.to_string());
            return self.abort(run, Outcome::NotAttempted(None), why);
        }
        run.end_sent = true;
        if let Err(f) = self.wire.write_all(&out, limit).await {
            run.widen(f.trouble(Phase::EndOfData, limit));
        }
    }

    /// The body in BDAT chunks of `chunk_size`; the last one is `BDAT n LAST`. With
    /// PIPELINING the chunks follow MAIL and RCPT without waiting; without it each waits for
    /// the previous reply.
    async fn send_bdat<R, F>(&mut self, body: &mut R, run: &mut Run<'_, F>, check_8bit: bool)
    where
        R: AsyncRead + Unpin,
        F: FnMut(usize, &Outcome),
    {
        let t = self.store.timeouts;
        let size = self.store.chunk_size;
        let mut chunk = Vec::with_capacity(size);
        let mut sent_any = false;
        if let Err(e) = fill(body, &mut chunk, size).await {
            let reply = trouble::local_read_error(&e);
            let why = trouble::message_refused(&reply);
            return self.abort(run, Outcome::Deferred(reply), why);
        }
        loop {
            // One chunk is read ahead, so the last one is known to be the last.
            let mut next = Vec::new();
            let last = chunk.len() < size || {
                next.reserve(size);
                if let Err(e) = fill(body, &mut next, size).await {
                    let reply = trouble::local_read_error(&e);
                    let why = trouble::message_refused(&reply);
                    return self.abort(run, Outcome::Deferred(reply), why);
                }
                next.is_empty()
            };
            if check_8bit && !chunk.is_ascii() {
                let reply = trouble::needs_8bitmime();
                let why = trouble::message_refused(&reply);
                return self.abort(run, Outcome::Bounced(reply), why);
            }
            let len = chunk.len() as u64;
            loop {
                match self.wire.proto.bdat_chunk(len, last) {
                    Ok(()) => break,
                    Err(ClientError::NotReady) => {
                        let limit = if sent_any { t.data } else { t.mail_rcpt };
                        let phase = if sent_any {
                            Phase::Data
                        } else {
                            Phase::MailRcpt
                        };
                        let waited = match self.wire.flush(limit).await {
                            Ok(()) => self.wire.read(limit).await,
                            Err(f) => Err(f),
                        };
                        if let Err(f) = waited {
                            run.widen(f.trouble(phase, limit));
                        }
                        self.absorb(run);
                        if run.closed {
                            return;
                        }
                    }
                    // The transaction failed or the connection is gone: the events settle
                    // every recipient.
                    Err(_) => return,
                }
            }
            sent_any = true;
            if last {
                run.end_sent = true;
            }
            let phase = if last { Phase::EndOfData } else { Phase::Data };
            let written = match self.wire.flush(t.data).await {
                Ok(()) => self.wire.write_all(&chunk, t.data).await,
                Err(f) => Err(f),
            };
            if let Err(f) = written {
                return run.widen(f.trouble(phase, t.data));
            }
            if last {
                return;
            }
            // Take in any reply that has already arrived (a refused chunk stops the rest).
            if let Err(f) = self.wire.read_ready().await {
                run.widen(f.trouble(Phase::Data, t.data));
            }
            self.absorb(run);
            if run.closed {
                return;
            }
            chunk = next;
        }
    }
}

/// The message needs SMTPUTF8: declared, or an address is not ASCII.
fn needs_smtputf8(envelope: &Envelope, recipients: &[Recipient]) -> bool {
    envelope.params.smtputf8
        || envelope.from.mailbox().is_some_and(|m| !m.is_ascii())
        || recipients
            .iter()
            .any(|r| r.path.mailbox().is_some_and(|m| !m.is_ascii()))
}

/// Reads until `buf` holds `size` octets or the body ends.
async fn fill<R: AsyncRead + Unpin>(
    body: &mut R,
    buf: &mut Vec<u8>,
    size: usize,
) -> io::Result<()> {
    while buf.len() < size {
        let want = (size - buf.len()) as u64;
        let n = (&mut *body).take(want).read_to_end(buf).await?;
        if n == 0 {
            break;
        }
    }
    Ok(())
}

/// One transaction's bookkeeping: which recipients are settled, and the trouble seen.
struct Run<'a, F: FnMut(usize, &Outcome)> {
    /// Transaction position → the caller's index.
    indices: Vec<usize>,
    settled: Vec<bool>,
    outcomes: Vec<(usize, Outcome)>,
    on_outcome: &'a mut F,
    policy: &'a Policy,
    arrived: SystemTime,
    trouble: Option<Trouble>,
    /// Replaces "not attempted, connection lost" when the agent ended the connection itself.
    abort: Option<Outcome>,
    mail_failed: bool,
    go_ahead: bool,
    end_sent: bool,
    done: bool,
    closed: bool,
}

impl<'a, F: FnMut(usize, &Outcome)> Run<'a, F> {
    fn new(
        recipients: &[Recipient],
        on_outcome: &'a mut F,
        policy: &'a Policy,
        arrived: SystemTime,
    ) -> Self {
        Self {
            indices: recipients.iter().map(|r| r.index).collect(),
            settled: vec![false; recipients.len()],
            outcomes: Vec::with_capacity(recipients.len()),
            on_outcome,
            policy,
            arrived,
            trouble: None,
            abort: None,
            mail_failed: false,
            go_ahead: false,
            end_sent: false,
            done: false,
            closed: false,
        }
    }

    fn when(&self) -> When {
        When {
            now: SystemTime::now(),
            arrived: self.arrived,
        }
    }

    fn widen(&mut self, trouble: Trouble) {
        self.trouble = Trouble::widen(self.trouble.take(), trouble);
    }

    fn settle(&mut self, position: usize, outcome: Outcome) {
        let (Some(settled), Some(&index)) =
            (self.settled.get_mut(position), self.indices.get(position))
        else {
            return;
        };
        if *settled {
            return;
        }
        *settled = true;
        (self.on_outcome)(index, &outcome);
        self.outcomes.push((index, outcome));
    }

    fn settle_rest(&mut self, outcome: &Outcome) {
        for position in 0..self.settled.len() {
            self.settle(position, outcome.clone());
        }
    }

    /// Some recipient is not settled yet (and MAIL did not already fail them all).
    fn open(&self) -> bool {
        !self.mail_failed && self.settled.contains(&false)
    }

    fn event(&mut self, event: ClientEvent) {
        match event {
            ClientEvent::MailReply(reply) if !reply.is_positive() => {
                self.mail_failed = true;
                self.widen(trouble::refused(Phase::MailRcpt, &reply));
            }
            // While MAIL had failed a refusal is informative; NotAttempted settles it.
            ClientEvent::RcptReply { index, reply }
                if !reply.is_positive() && !self.mail_failed =>
            {
                let outcome = self.policy.recipient(reply, self.when());
                self.settle(index, outcome);
            }
            ClientEvent::DataGoAhead => self.go_ahead = true,
            // A refusal after every recipient was refused at RCPT (503 "no valid
            // recipients") fails nobody: it is no trouble of the message.
            ClientEvent::DataRefused(reply) if self.open() => {
                self.widen(trouble::refused(Phase::MailRcpt, &reply));
            }
            ClientEvent::BdatReply(reply) if !reply.is_positive() && self.open() => {
                self.widen(trouble::refused(Phase::Data, &reply));
            }
            ClientEvent::RecipientResult { index, reply } => {
                let outcome = self.policy.recipient(reply, self.when());
                self.settle(index, outcome);
            }
            ClientEvent::Unconfirmed { index } => self.settle(index, Outcome::InDoubt),
            ClientEvent::NotAttempted { index, reason } => {
                let outcome = match (&reason, &self.abort) {
                    (None, Some(abort)) => abort.clone(),
                    _ => self.policy.not_attempted(reason, self.when()),
                };
                self.settle(index, outcome);
            }
            ClientEvent::TransactionDone => self.done = true,
            ClientEvent::UnexpectedReply(reply) => self.widen(trouble::unexpected(&reply)),
            ClientEvent::ProtocolError(e) => self.widen(trouble::protocol_error(&e)),
            ClientEvent::Closed => self.closed = true,
            _ => {}
        }
    }

    fn finish(mut self) -> Report {
        // The state machine settles every recipient; this only guards the report's promise.
        if self.settled.iter().any(|s| !s) {
            self.settle_rest(&Outcome::NotAttempted(None));
        }
        Report {
            outcomes: self.outcomes,
            trouble: self.trouble,
        }
    }
}

/// The byte stream: TCP, unix socket, or TLS over either.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why the socket stopped.
#[derive(Debug)]
enum Failure {
    Timeout,
    Eof,
    Io(io::Error),
}

impl Failure {
    fn trouble(&self, phase: Phase, limit: Duration) -> Trouble {
        match self {
            Self::Timeout => trouble::timed_out(phase, limit),
            Self::Eof => trouble::lost(phase, "closed by the store"),
            Self::Io(e) => trouble::lost(phase, &e.to_string()),
        }
    }
}

/// The socket and the state machine it drives.
struct Wire {
    io: Box<dyn Io>,
    proto: ClientConnection,
    rbuf: Box<[u8]>,
    out: Vec<u8>,
}

impl Wire {
    fn new(io: Box<dyn Io>, proto: ClientConnection) -> Self {
        Self {
            io,
            proto,
            rbuf: vec![0; 16 * 1024].into_boxed_slice(),
            out: Vec::new(),
        }
    }

    /// The socket failed: the state machine settles what was open.
    fn fail(&mut self, failure: Failure) -> Result<(), Failure> {
        self.proto.connection_lost();
        Err(failure)
    }

    /// Writes what the state machine has released.
    async fn flush(&mut self, limit: Duration) -> Result<(), Failure> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let result = if self.proto.poll_transmit(&mut out) == 0 {
            Ok(())
        } else {
            self.write_all(&out, limit).await
        };
        self.out = out;
        result
    }

    async fn write_all(&mut self, bytes: &[u8], limit: Duration) -> Result<(), Failure> {
        let io = &mut self.io;
        let written = timeout(limit, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => self.fail(Failure::Io(e)),
            Err(_) => self.fail(Failure::Timeout),
        }
    }

    /// Waits (at most `limit`) for input and feeds it to the state machine.
    async fn read(&mut self, limit: Duration) -> Result<(), Failure> {
        match timeout(limit, self.io.read(&mut self.rbuf)).await {
            Ok(Ok(0)) => self.fail(Failure::Eof),
            Ok(Ok(n)) => {
                self.proto.handle_input(&self.rbuf[..n]);
                Ok(())
            }
            Ok(Err(e)) => self.fail(Failure::Io(e)),
            Err(_) => self.fail(Failure::Timeout),
        }
    }

    /// Feeds input that has already arrived, without waiting for more.
    async fn read_ready(&mut self) -> Result<(), Failure> {
        // A zero timeout still polls the read once (tokio polls the future before the
        // timer), and a read that is not ready loses nothing when dropped.
        match timeout(Duration::ZERO, self.io.read(&mut self.rbuf)).await {
            Err(_) => Ok(()),
            Ok(Ok(0)) => self.fail(Failure::Eof),
            Ok(Ok(n)) => {
                self.proto.handle_input(&self.rbuf[..n]);
                Ok(())
            }
            Ok(Err(e)) => self.fail(Failure::Io(e)),
        }
    }

    /// Drives the session until LHLO is answered: the capabilities.
    async fn until_ready(
        &mut self,
        phase: Phase,
        limit: Duration,
    ) -> Result<Capabilities, Trouble> {
        let mut seen: Option<Trouble> = None;
        loop {
            while let Some(event) = self.proto.poll_event() {
                match event {
                    ClientEvent::Ready(caps) => return Ok(caps),
                    ClientEvent::Refused(reply) | ClientEvent::HelloRefused(reply) => {
                        return Err(trouble::refused(phase, &reply));
                    }
                    ClientEvent::UnexpectedReply(reply) => {
                        seen = Some(trouble::unexpected(&reply));
                    }
                    ClientEvent::ProtocolError(e) => seen = Some(trouble::protocol_error(&e)),
                    ClientEvent::Closed => {
                        let mut t = seen.unwrap_or_else(|| trouble::lost(phase, "closed"));
                        t.scope = Scope::Store;
                        return Err(t);
                    }
                    _ => {}
                }
            }
            self.flush(limit)
                .await
                .map_err(|f| f.trouble(phase, limit))?;
            self.read(limit)
                .await
                .map_err(|f| f.trouble(phase, limit))?;
        }
    }

    /// Drives the session until the reply to RSET or NOOP.
    async fn until_reply(
        &mut self,
        phase: Phase,
        limit: Duration,
    ) -> Result<postern_proto::Reply, Trouble> {
        loop {
            while let Some(event) = self.proto.poll_event() {
                match event {
                    ClientEvent::RsetReply(reply) | ClientEvent::NoopReply(reply) => {
                        return Ok(reply);
                    }
                    ClientEvent::UnexpectedReply(reply) => {
                        return Err(trouble::unexpected(&reply));
                    }
                    ClientEvent::ProtocolError(e) => return Err(trouble::protocol_error(&e)),
                    ClientEvent::Closed => return Err(trouble::lost(phase, "closed")),
                    _ => {}
                }
            }
            self.flush(limit)
                .await
                .map_err(|f| f.trouble(phase, limit))?;
            self.read(limit)
                .await
                .map_err(|f| f.trouble(phase, limit))?;
        }
    }

    /// AUTH PLAIN with the store's credentials.
    async fn authenticate(
        &mut self,
        credentials: &Credentials,
        limit: Duration,
    ) -> Result<(), Trouble> {
        let (user, password) = (&credentials.username, &credentials.password);
        match self.proto.auth_plain("", user, password) {
            Ok(()) => {}
            Err(ClientError::AuthNotOffered) => return Err(trouble::not_offered("AUTH PLAIN")),
            Err(e) => return Err(setup_misuse(&e)),
        }
        loop {
            while let Some(event) = self.proto.poll_event() {
                match event {
                    ClientEvent::Authenticated => return Ok(()),
                    ClientEvent::AuthFailed(reply) => {
                        return Err(trouble::refused(Phase::Auth, &reply));
                    }
                    ClientEvent::Closed => return Err(trouble::lost(Phase::Auth, "closed")),
                    _ => {}
                }
            }
            self.flush(limit)
                .await
                .map_err(|f| f.trouble(Phase::Auth, limit))?;
            self.read(limit)
                .await
                .map_err(|f| f.trouble(Phase::Auth, limit))?;
        }
    }
}

fn setup_misuse(e: &ClientError) -> Trouble {
    let mut t = trouble::unusable(&e.to_string());
    t.scope = Scope::Store;
    t
}

/// STARTTLS, the handshake, and LHLO again. Returns the wire (TLS or, when the store refused
/// STARTTLS and TLS is opportunistic, still plaintext), the capabilities and whether TLS is on.
async fn start_tls(
    mut wire: Wire,
    caps: Capabilities,
    settings: &TlsSettings,
    limit: Duration,
) -> Result<(Wire, Capabilities, bool), Trouble> {
    wire.proto.start_tls().map_err(|e| setup_misuse(&e))?;
    'go_ahead: loop {
        while let Some(event) = wire.proto.poll_event() {
            match event {
                ClientEvent::TlsGoAhead { .. } => break 'go_ahead,
                ClientEvent::TlsRefused(reply) => {
                    if settings.mode == TlsMode::Opportunistic {
                        return Ok((wire, caps, false));
                    }
                    return Err(trouble::refused(Phase::StartTls, &reply));
                }
                ClientEvent::Closed => return Err(trouble::lost(Phase::StartTls, "closed")),
                _ => {}
            }
        }
        let phase = Phase::StartTls;
        wire.flush(limit)
            .await
            .map_err(|f| f.trouble(phase, limit))?;
        wire.read(limit)
            .await
            .map_err(|f| f.trouble(phase, limit))?;
    }
    let Wire { io, mut proto, .. } = wire;
    let handshake = settings.connector.connect(settings.server_name.clone(), io);
    let stream = match timeout(limit, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(trouble::tls_failed(&e)),
        Err(_) => return Err(trouble::timed_out(Phase::StartTls, limit)),
    };
    proto.tls_established().map_err(|e| setup_misuse(&e))?;
    let mut wire = Wire::new(Box::new(stream), proto);
    let caps = wire.until_ready(Phase::StartTls, limit).await?;
    Ok((wire, caps, true))
}

fn tls_client_config(
    store: &str,
    ca_file: Option<&Path>,
    insecure_skip_verify: bool,
) -> Result<Arc<rustls::ClientConfig>, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls_err = |error| StoreError::Tls {
        store: store.to_owned(),
        error,
    };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(tls_err)?;
    if insecure_skip_verify {
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth();
        return Ok(Arc::new(config));
    }
    let path = ca_file.unwrap_or(Path::new(SYSTEM_CA_FILE));
    let ca_err = |reason: String| StoreError::CaFile {
        store: store.to_owned(),
        path: path.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))? {
        let cert = cert.map_err(|e| ca_err(e.to_string()))?;
        roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca_err("no certificate in the file".into()));
    }
    let config = builder.with_root_certificates(roots).with_no_client_auth();
    Ok(Arc::new(config))
}

/// `insecure_skip_verify`, for tests only: any certificate is accepted (signatures are still
/// checked, so the handshake itself is sound).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
