//! The LMTP delivery agent: one connection to a store, and mail transactions over it.
//!
//! [`RemoteStore`] is a store as the agent sees it, built once from its [`LmtpStoreConfig`]
//! (the password and CA files are read then). [`RemoteStore::connect`] opens a [`Connection`]:
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
//! Every recipient gets exactly one [`Outcome`], handed to the caller's callback the moment
//! the reply that decides it is parsed (RFC 2033 §4.2: one reply per accepted recipient after
//! the end of data), so the ledger can be written reply by reply. A connection lost after `k`
//! of `n` post-dot replies yields those `k` outcomes and `n - k` [`Outcome::InDoubt`]; lost
//! before the end of data, [`Outcome::NotAttempted`]. What the replies mean, and how wide a
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
//! transaction never fails as a whole, it returns a [`Report`]. No network input panics.
//!
//! SEE ALSO: `pool` (connections reused across messages), RFC 2033, RFC 2920, RFC 3030.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use postern_proto::address::ForwardPath;
use postern_proto::client::{Capabilities, ClientConnection, ClientError, ClientEvent, Protocol};
use postern_proto::data::DataEncoder;
use postern_proto::params::{Body, MailParams, RcptParams};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::config::{LmtpStoreConfig, StoreAddress, TlsMode, WindowConfig};
use super::downgrade::{Downgrading, Guard};
use super::message::{OutboundEnvelope, Recipient, Report};
use super::trouble::{self, Outcome, Phase, Policy, Trouble, When};
use super::wire::{self, Credentials, Io, TlsSettings, Wire};

pub use super::error::StoreError;

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
            reason,
        })?;
        Self::build(config, local_name, Protocol::Lmtp)
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

    /// A connection older than this is not reused.
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
        phase_done(&self.name, "connect", &mut mark);
        let proto = ClientConnection::new(self.protocol, self.local_name.clone());
        let mut wire = Wire::new(io, proto);
        let mut caps = wire.until_ready(Phase::Lhlo, t.lhlo).await?;
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
        phase_done(&self.name, "lhlo", &mut mark);
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

/// An open, greeted (and, as configured, encrypted and authenticated) connection to a store.
pub struct Connection {
    store: Arc<RemoteStore>,
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
    pub fn store(&self) -> &Arc<RemoteStore> {
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
        envelope: &OutboundEnvelope,
        recipients: &[Recipient],
        body: R,
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
        let guard = Guard {
            eight_bit: !self.caps.eight_bit_mime,
            utf8_headers: envelope.params.smtputf8 && !self.caps.smtputf8,
        };
        let mut body = Downgrading::new(body, guard);
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
        // Per-phase latency: with BDAT, MAIL and RCPT are pipelined with the chunks, so
        // `mail_rcpt` is their flush and `data` the chunks with whatever replies they await.
        let mut mark = self.last_used;
        let mut mail_rcpt_timed = false;

        // The window's latency sample: the size-independent phases, not the content.
        let mut latency = Duration::ZERO;
        if let Err(f) = self.wire.flush(t.mail_rcpt).await {
            run.widen(f.trouble(Phase::MailRcpt, t.mail_rcpt));
        } else if bdat {
            latency += phase_done(&store.name, "mail_rcpt", &mut mark);
            mail_rcpt_timed = true;
            self.send_bdat(&mut body, &mut run, guard).await;
            phase_done(&store.name, "data", &mut mark);
        }
        let mut data_started = false;
        loop {
            self.absorb(&mut run);
            if run.done || run.closed {
                break;
            }
            if run.go_ahead && !data_started {
                data_started = true;
                latency += phase_done(&store.name, "mail_rcpt", &mut mark);
                mail_rcpt_timed = true;
                let size = usize::try_from(envelope.size).unwrap_or(DATA_READ);
                self.send_data(&mut body, &mut run, guard, size).await;
                phase_done(&store.name, "data", &mut mark);
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
        if run.end_sent {
            let wait = phase_done(&store.name, "end_of_data", &mut mark);
            latency += size_normalised(wait, envelope.size);
        } else if !mail_rcpt_timed {
            latency += phase_done(&store.name, "mail_rcpt", &mut mark);
        }
        self.last_used = Instant::now();
        if run.closed || self.wire.proto.is_closed() {
            self.broken = true;
        }
        let mut report = run.finish();
        report.latency = Some(latency);
        report
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

    /// Asks the store whether it would take mail for `rcpt`, without sending any: `MAIL
    /// FROM:<>`, `RCPT TO:<rcpt>`, `RSET` (pipelined when offered), each reply awaited at
    /// most `limit`. `Ok` is the store's reply to RCPT, whatever it says; `Err` when MAIL was
    /// refused or the connection failed (then it is marked unusable). After `Ok` the
    /// connection is idle again, outside any transaction, and can go back to its pool.
    pub async fn verify(
        &mut self,
        rcpt: &ForwardPath,
        limit: Duration,
    ) -> Result<postern_proto::Reply, Trouble> {
        if !self.is_usable() {
            return Err(trouble::unusable("closed, or a command is outstanding"));
        }
        if let Err(e) = self
            .wire
            .proto
            .verify(postern_proto::ReversePath::Null, rcpt.clone())
        {
            self.broken = true;
            return Err(trouble::unusable(&e.to_string()));
        }
        self.last_used = Instant::now();
        let (mut mail, mut answer) = (None, None);
        let result = 'conversation: loop {
            while let Some(event) = self.wire.proto.poll_event() {
                match event {
                    ClientEvent::MailReply(reply) => mail = Some(reply),
                    ClientEvent::RcptReply { reply, .. } => answer = Some(reply),
                    ClientEvent::RsetReply(reply) => {
                        if !reply.is_positive() {
                            self.broken = true;
                        }
                        break 'conversation Ok(());
                    }
                    ClientEvent::UnexpectedReply(reply) => {
                        break 'conversation Err(trouble::unexpected(&reply));
                    }
                    ClientEvent::ProtocolError(e) => {
                        break 'conversation Err(trouble::protocol_error(&e));
                    }
                    ClientEvent::Closed => {
                        break 'conversation Err(trouble::lost(Phase::MailRcpt, "closed"));
                    }
                    _ => {}
                }
            }
            let step = match self.wire.flush(limit).await {
                Ok(()) => self.wire.read(limit).await,
                Err(f) => Err(f),
            };
            if let Err(f) = step {
                break Err(f.trouble(Phase::MailRcpt, limit));
            }
        };
        self.last_used = Instant::now();
        if let Err(t) = result {
            self.broken = true;
            return Err(t);
        }
        match (mail, answer) {
            (Some(m), _) if !m.is_positive() => Err(trouble::refused(Phase::MailRcpt, &m)),
            (_, Some(reply)) => Ok(reply),
            _ => {
                self.broken = true;
                Err(trouble::lost(Phase::MailRcpt, "no reply to RCPT"))
            }
        }
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
        envelope: &OutboundEnvelope,
        recipients: &[Recipient],
    ) -> Option<postern_proto::Reply> {
        let caps = &self.caps;
        if let Some(Some(limit)) = caps.size {
            if envelope.size > limit {
                return Some(trouble::size_exceeded(envelope.size, limit));
            }
        }
        if non_ascii_address(envelope, recipients) && !caps.smtputf8 {
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
        None
    }

    /// MAIL and RCPT parameters, keeping only what the store advertised.
    fn parameters(
        &self,
        envelope: &OutboundEnvelope,
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
            smtputf8: caps.smtputf8
                && (envelope.params.smtputf8 || non_ascii_address(envelope, recipients)),
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

    /// After 354: the body, dot-stuffed, then the final dot. Output is written in blocks
    /// of about `DATA_READ`; the last block carries the final dot, so a small message is one
    /// write (one segment on the wire, one wake-up of the store). `size`: the body's size,
    /// to size the buffers (a wrong value costs only extra reads).
    async fn send_data<R, F>(
        &mut self,
        body: &mut Downgrading<R>,
        run: &mut Run<'_, F>,
        guard: Guard,
        size: usize,
    ) where
        R: AsyncRead + Unpin,
        F: FnMut(usize, &Outcome),
    {
        let limit = self.store.timeouts.data;
        let mut encoder = DataEncoder::new();
        // One more byte than the body, so that the read after the body returns 0.
        let want = size.saturating_add(1).clamp(4096, DATA_READ);
        let mut input = vec![0u8; want];
        let mut out = Vec::with_capacity(want + want / 32 + 8);
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
            if let Some(reply) = guard.check(chunk, body) {
                let why = trouble::message_refused(&reply);
                return self.abort(run, Outcome::Bounced(reply), why);
            }
            encoder.encode(chunk, &mut out);
            if out.len() >= DATA_READ {
                if let Err(f) = self.wire.write_all(&out, limit).await {
                    return run.widen(f.trouble(Phase::Data, limit));
                }
                out.clear();
            }
        }
        encoder.finish(&mut out);
        // From here a lost connection leaves the recipients in doubt: the dot may arrive even
        // if the write reports an error (the last block of the body goes with it).
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
    async fn send_bdat<R, F>(
        &mut self,
        body: &mut Downgrading<R>,
        run: &mut Run<'_, F>,
        guard: Guard,
    ) where
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
            if let Some(reply) = guard.check(&chunk, body) {
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

/// Records the time since `mark` as `phase` of `store` ([`crate::metrics::PHASE_LATENCY`])
/// and moves `mark` to now.
fn phase_done(store: &str, phase: &'static str, mark: &mut Instant) -> Duration {
    let now = Instant::now();
    let took = now.duration_since(*mark);
    metrics::histogram!(crate::metrics::PHASE_LATENCY, "store" => store.to_owned(), "phase" => phase)
        .record(took.as_secs_f64());
    *mark = now;
    took
}

/// Content up to this size counts whole in the end-of-data latency; above, per this much.
const LATENCY_UNIT: u64 = 64 << 10;

/// The end-of-data wait as the window's signal counts it: whole up to [`LATENCY_UNIT`] of
/// content, per [`LATENCY_UNIT`] above (a big message is slow because it is big).
fn size_normalised(wait: Duration, size: u64) -> Duration {
    if size <= LATENCY_UNIT {
        wait
    } else {
        wait.mul_f64(LATENCY_UNIT as f64 / size as f64)
    }
}

/// An address of the message is not ASCII: it cannot go without SMTPUTF8 (a declared
/// SMTPUTF8 alone is no reason to refuse: with ASCII addresses and headers the message does
/// not need it, and 8-bit headers are caught while streaming).
fn non_ascii_address(envelope: &OutboundEnvelope, recipients: &[Recipient]) -> bool {
    envelope.from.mailbox().is_some_and(|m| !m.is_ascii())
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
            latency: None,
        }
    }
}
