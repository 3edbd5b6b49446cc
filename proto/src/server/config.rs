//! The server session's settings: [`ServerConfig`] (what is offered, the limits) and
//! [`BarePolicy`].
//!
//! Owns: the settings a listener builds once per session from its configuration; the
//! session only reads them.
//! Promises: [`ServerConfig::new`] gives the defaults documented on it; nothing here reads
//! the world.
//! SEE ALSO: [`super::ServerSession`], which enforces them.

use crate::line::COMMAND_LINE_MAX;
use crate::protocol::Protocol;

/// What the listener does with bare CR or LF in message content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarePolicy {
    /// Store them as CRLF.
    Normalize,
    /// Refuse the message with 550 5.5.2.
    Reject,
}

/// The session's settings: what is offered and the limits.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// SMTP or LMTP.
    pub protocol: Protocol,
    /// Our name, in the greeting and the EHLO reply.
    pub hostname: String,
    /// Largest message in octets, advertised with SIZE; 0 for no limit.
    pub max_message_size: u64,
    /// Most accepted recipients per transaction.
    pub max_recipients: usize,
    /// Longest command line including CRLF (RFC 5321: 512).
    pub max_line: usize,
    /// Refused commands before 421 and close.
    pub max_errors: u32,
    /// Offer PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// Offer 8BITMIME (RFC 6152).
    pub eight_bit_mime: bool,
    /// Offer SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// Offer DSN (RFC 3461).
    pub dsn: bool,
    /// Offer CHUNKING and BINARYMIME (RFC 3030).
    pub chunking: bool,
    /// A TLS certificate is configured: offer STARTTLS.
    pub starttls: bool,
    /// Refuse mail transactions until TLS is active (530 5.7.0).
    pub tls_required: bool,
    /// SASL mechanisms to offer; empty: no AUTH.
    pub auth_mechanisms: Vec<String>,
    /// Bare CR/LF handling.
    pub bare_line_endings: BarePolicy,
    /// Private service extensions to offer, one keyword (with its parameters) per EHLO/LHLO
    /// line, after the standard ones: keywords starting with X, which RFC 5321 §2.2.2 leaves
    /// to bilateral agreement. Empty by default.
    pub private_keywords: Vec<String>,
}

impl ServerConfig {
    /// Defaults: every extension offered except STARTTLS and AUTH, 512-octet lines, no size
    /// limit, 1000 recipients, 20 errors, bare line endings normalised.
    pub fn new(protocol: Protocol, hostname: impl Into<String>) -> Self {
        Self {
            protocol,
            hostname: hostname.into(),
            max_message_size: 0,
            max_recipients: 1000,
            max_line: COMMAND_LINE_MAX,
            max_errors: 20,
            pipelining: true,
            eight_bit_mime: true,
            smtputf8: true,
            dsn: true,
            chunking: true,
            starttls: false,
            tls_required: false,
            auth_mechanisms: Vec::new(),
            bare_line_endings: BarePolicy::Normalize,
            private_keywords: Vec::new(),
        }
    }
}
