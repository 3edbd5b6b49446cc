//! `listeners:` — one entry per listener: its address and protocol, limits, timeouts,
//! STARTTLS, relay networks, the PROXY protocol and the mode (spool or cut-through).
//!
//! Owns the section's types and their defaults; [`crate::config`] assembles them into the
//! whole file and checks what needs the whole file (unique names and addresses).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::config::units::{ByteSize, Invalid, Span, parse_str};
use crate::tls::TlsConfig;

/// The address a listener binds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    /// `127.0.0.1:2525`, `[::1]:2525`
    Tcp(SocketAddr),
    /// `unix:/path`
    Unix(PathBuf),
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl ListenAddress {
    /// Parses `127.0.0.1:2525`, `[::1]:2525` or `unix:/path`.
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a socket path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse().map(Self::Tcp).map_err(|_| {
            Invalid::from(format!(
                "`{s}` is not an address like 127.0.0.1:2525, [::1]:2525 or unix:/path"
            ))
        })
    }
}

impl<'de> Deserialize<'de> for ListenAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, Self::parse, "an address")
    }
}

/// `protocol:`
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// RFC 5321 ESMTP.
    Smtp,
    /// RFC 2033 LMTP.
    Lmtp,
}

/// `bare_line_endings:`
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndingsPolicy {
    /// Store bare CR/LF as CRLF.
    Normalize,
    /// Refuse the message with 550 5.5.2.
    Reject,
}

/// `timeouts:` of a listener (RFC 5321 §4.5.3.2 minimums by default).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Waiting for a command (and the greeting's answer): 5m.
    #[serde(default = "default_command_timeout")]
    pub command: Span,
    /// Waiting for the next block of DATA or BDAT content: 3m.
    #[serde(default = "default_data_timeout")]
    pub data: Span,
    /// The whole session, however busy: 1h.
    #[serde(default = "default_session_timeout")]
    pub session: Span,
    /// The TLS handshake after STARTTLS: 1m.
    #[serde(default = "default_tls_timeout")]
    pub tls_handshake: Span,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            command: default_command_timeout(),
            data: default_data_timeout(),
            session: default_session_timeout(),
            tls_handshake: default_tls_timeout(),
        }
    }
}

/// One entry of `listeners:`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Label for logs and metrics.
    pub name: String,
    /// Where to listen.
    pub address: ListenAddress,
    /// SMTP or LMTP.
    pub protocol: ListenerProtocol,
    /// STARTTLS.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Concurrent connections on this listener.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Concurrent connections from one IP address.
    #[serde(default = "default_max_per_ip")]
    pub max_connections_per_ip: usize,
    /// Largest message (SIZE).
    #[serde(default = "default_max_message_size")]
    pub max_message_size: ByteSize,
    /// Recipients per transaction.
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Refused commands before 421.
    #[serde(default = "default_max_errors")]
    pub max_errors: u32,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Clients allowed to relay to non-local domains (through the relay route).
    #[serde(default)]
    pub trusted_networks: Vec<IpNet>,
    /// Bare CR/LF in content.
    #[serde(default = "default_bare")]
    pub bare_line_endings: BareLineEndingsPolicy,
    /// Store and forward (`spool`, the default) or cut-through to the store (`proxy`).
    #[serde(default)]
    pub mode: ListenerMode,
    /// `mode: proxy`: how long a transaction waits for room in the store's concurrency
    /// window before its recipients get `451 4.3.2`.
    #[serde(default = "default_proxy_wait")]
    pub proxy_wait: Span,
    /// A load balancer in front (HAProxy's PROXY protocol, v1 or v2): connections from these
    /// networks must start with a header carrying the client's address, which then drives
    /// relay control, limits, logs and the Received line. None (the default): a `PROXY`
    /// line is just an unknown command.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolConfig>,
}

/// `listeners[].proxy_protocol:`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    /// The load balancers' addresses. A connection from anywhere else is closed without a
    /// banner. (Unix-socket peers are local and trusted.)
    pub trusted_networks: Vec<IpNet>,
    /// How long the header may take to arrive: 5s.
    #[serde(default = "default_proxy_header_timeout")]
    pub timeout: Span,
}

fn default_proxy_header_timeout() -> Span {
    Span(std::time::Duration::from_secs(5))
}

/// `mode:` of a listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Write the message to the spool, answer 250 once it is durable; the scheduler delivers.
    #[default]
    Spool,
    /// Cut-through: relay the transaction to each recipient's store and answer with the
    /// store's own reply (see `listener::cut_through`).
    Proxy,
}

fn default_command_timeout() -> Span {
    Span(Duration::from_secs(300))
}
fn default_data_timeout() -> Span {
    Span(Duration::from_secs(180))
}
fn default_session_timeout() -> Span {
    Span(Duration::from_secs(3600))
}
fn default_tls_timeout() -> Span {
    Span(Duration::from_secs(60))
}
fn default_max_connections() -> usize {
    1000
}
fn default_max_per_ip() -> usize {
    100
}
fn default_max_message_size() -> ByteSize {
    ByteSize(50 << 20)
}
fn default_max_recipients() -> usize {
    1000
}
fn default_max_errors() -> u32 {
    20
}
fn default_bare() -> BareLineEndingsPolicy {
    BareLineEndingsPolicy::Normalize
}
fn default_proxy_wait() -> Span {
    Span(Duration::from_secs(2))
}
