//! The socket and the client state machine it drives, and the session's setup steps.
//!
//! [`Wire`] owns the byte stream (TCP, unix socket, or TLS over either) and a
//! [`ClientConnection`]: it writes what the state machine releases, feeds it what the socket
//! reads, each with a timeout, and reports a dead socket to it (`connection_lost`), so the
//! state machine settles the open recipients. The setup steps (greeting and LHLO, STARTTLS,
//! AUTH PLAIN) live here too; their failures are the store's ([`Scope::Store`]).

use std::io;
use std::time::{Duration, Instant};

use postern_proto::client::{Capabilities, ClientConnection, ClientError, ClientEvent};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::config::TlsMode;
use super::trouble::{self, Phase, Scope, Trouble};

pub(super) struct TlsSettings {
    pub(super) mode: TlsMode,
    pub(super) connector: TlsConnector,
    pub(super) server_name: ServerName<'static>,
}

pub(super) struct Credentials {
    pub(super) username: String,
    pub(super) password: String,
}

/// The byte stream: TCP, unix socket, or TLS over either.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why the socket stopped.
#[derive(Debug)]
pub(super) enum Failure {
    Timeout,
    Eof,
    Io(io::Error),
}

impl Failure {
    pub(super) fn trouble(&self, phase: Phase, limit: Duration) -> Trouble {
        match self {
            Self::Timeout => trouble::timed_out(phase, limit),
            Self::Eof => trouble::lost(phase, "closed by the store"),
            Self::Io(e) => trouble::lost(phase, &e.to_string()),
        }
    }
}

/// The socket and the state machine it drives.
pub(super) struct Wire {
    pub(super) io: Box<dyn Io>,
    pub(super) proto: ClientConnection,
    rbuf: Box<[u8]>,
    out: Vec<u8>,
    /// When the first bytes came (the greeting).
    first_input: Option<Instant>,
}

impl Wire {
    pub(super) fn new(io: Box<dyn Io>, proto: ClientConnection) -> Self {
        Self {
            io,
            proto,
            rbuf: vec![0; 16 * 1024].into_boxed_slice(),
            out: Vec::new(),
            first_input: None,
        }
    }

    /// When the first bytes of the session came: the greeting's arrival.
    pub(super) fn first_input(&self) -> Option<Instant> {
        self.first_input
    }

    /// The socket failed: the state machine settles what was open.
    pub(super) fn fail(&mut self, failure: Failure) -> Result<(), Failure> {
        self.proto.connection_lost();
        Err(failure)
    }

    /// Writes what the state machine has released.
    pub(super) async fn flush(&mut self, limit: Duration) -> Result<(), Failure> {
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

    pub(super) async fn write_all(&mut self, bytes: &[u8], limit: Duration) -> Result<(), Failure> {
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
    pub(super) async fn read(&mut self, limit: Duration) -> Result<(), Failure> {
        match timeout(limit, self.io.read(&mut self.rbuf)).await {
            Ok(Ok(0)) => self.fail(Failure::Eof),
            Ok(Ok(n)) => {
                self.first_input.get_or_insert_with(Instant::now);
                self.proto.handle_input(&self.rbuf[..n]);
                Ok(())
            }
            Ok(Err(e)) => self.fail(Failure::Io(e)),
            Err(_) => self.fail(Failure::Timeout),
        }
    }

    /// Feeds input that has already arrived, without waiting for more.
    pub(super) async fn read_ready(&mut self) -> Result<(), Failure> {
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
    pub(super) async fn until_ready(
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
    pub(super) async fn until_reply(
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
    pub(super) async fn authenticate(
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

pub(super) fn setup_misuse(e: &ClientError) -> Trouble {
    let mut t = trouble::unusable(&e.to_string());
    t.scope = Scope::Store;
    t
}

/// STARTTLS, the handshake, and LHLO again. Returns the wire (TLS or, when the store refused
/// STARTTLS and TLS is opportunistic, still plaintext), the capabilities and whether TLS is on.
pub(super) async fn start_tls(
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
