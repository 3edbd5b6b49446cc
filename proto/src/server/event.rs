//! What a server session hands its caller: [`ServerEvent`], the greeting verb
//! [`HelloVerb`], and [`DecisionError`] for misuse of the decision API.
//!
//! Owns: the event vocabulary between the sans-IO session and the listener that drives it.
//! Promises: every event that asks for a decision says which call answers it
//! ([`super::ServerSession::accept`] or [`super::ServerSession::respond`]).
//! Fails: [`DecisionError`] is a caller bug reported instead of a panic.
//! SEE ALSO: [`super::ServerSession::poll_event`].

use crate::address::{ForwardPath, ReversePath};
use crate::params::{MailParams, RcptParams};
use crate::reply::Reply;

#[cfg(doc)]
use super::ServerSession;

/// Which greeting command opened the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloVerb {
    /// HELO: no extensions.
    Helo,
    /// EHLO.
    Ehlo,
    /// LHLO.
    Lhlo,
}

/// What the caller must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// Write this reply (flush when `poll_event` returns `None`).
    Reply(Reply),
    /// The client greeted us (already answered).
    Hello {
        /// HELO, EHLO or LHLO.
        verb: HelloVerb,
        /// The name the client gave.
        domain: String,
    },
    /// Decide on a sender: [`ServerSession::accept`] or [`ServerSession::respond`].
    Mail {
        /// The reverse path.
        from: ReversePath,
        /// Its parameters (DSN ones are to be stored with the envelope).
        params: MailParams,
    },
    /// Decide on a recipient: accept or respond (routing happens here).
    Rcpt {
        /// The forward path.
        to: ForwardPath,
        /// Its parameters.
        params: RcptParams,
    },
    /// Content is about to start (DATA, or the first BDAT chunk): open the spool file, then
    /// accept (DATA gets 354) or respond with a refusal.
    DataStart,
    /// Message content, decoded (dot-unstuffed), in order.
    Data(Vec<u8>),
    /// The content is complete: make it durable, then answer with [`ServerSession::respond`]
    /// [`ServerSession::expected_replies`] times (SMTP once; LMTP once per accepted
    /// recipient, in RCPT order).
    DataEnd,
    /// The content received so far is refused (over the size limit, bare line endings, or
    /// an RSET between BDAT chunks): discard it. The session answers the client itself.
    DataAborted,
    /// The envelope was dropped (RSET, a new greeting, STARTTLS).
    Reset,
    /// The 220 to STARTTLS has been queued: write the replies, run the TLS handshake, then
    /// call [`ServerSession::tls_established`].
    StartTls,
    /// Decide on AUTH (RFC 4954): respond with 334 (challenge), 235 or a refusal.
    Auth {
        /// The mechanism, upper-cased.
        mechanism: String,
        /// The initial response, if sent.
        initial_response: Option<String>,
    },
    /// A client response line in a SASL exchange: respond with 334, 235 or a refusal.
    AuthResponse(String),
    /// Write the replies, then close the connection.
    Close,
}

/// Misuse of the decision API (a caller bug, reported instead of panicking).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionError {
    /// No decision was pending.
    NothingPending,
}
