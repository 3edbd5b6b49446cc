//! The SMTP and LMTP wire protocol, sans-IO.
//!
//! This crate holds everything postern knows about the bytes on the wire and nothing about
//! sockets, clocks or runtimes: bytes go in, and commands, replies and events come out. The
//! listeners (server side), the delivery agents (client side), the tests and the fuzzers all
//! speak through it, so the protocol rules live in exactly one place.
//!
//! # Layout
//!
//! | module | owns | RFC |
//! |---|---|---|
//! | [`mod@line`] | CRLF line framing with length limits, `Complete`/`Partial` | 5321 §4.5.3.1 |
//! | [`command`] | command verbs and their arguments | 5321 §4.1, 2033, 1869, 3030, 3207, 4954 |
//! | [`address`] | mailboxes, paths, domains, address literals | 5321 §4.1.2, 6531 |
//! | [`params`] | typed ESMTP MAIL/RCPT parameters | 1870, 6152, 3030, 6531, 3461, 8689, 4954 |
//! | [`proxy`] | PROXY protocol v1/v2 headers from a trusted load balancer | HAProxy `proxy-protocol.txt` |
//! | [`reply`] | replies, enhanced status codes, severity; parse and format | 5321 §4.2, 2034, 3463 |
//! | [`replies`] | every reply text postern itself sends | |
//! | [`data`] | DATA dot-stuffing codec (smuggling-proof) and BDAT chunks | 5321 §4.5.2, 3030 |
//! | [`downgrade`] | 8-bit MIME parts to quoted-printable for a store without 8BITMIME | 6152 §3, 2045, 2046 |
//! | [`server`] | the server session state machine (SMTP and LMTP) | 5321, 2033, 2920, 3207 |
//! | [`client`] | the client state machine for delivery agents (LMTP and SMTP) | 2033 §4.2 §5, 2920, 3030, 3207, 4954 |
//!
//! # Promises
//!
//! - No I/O, no clock, no global state: every type is deterministic and can be driven from a
//!   test byte by byte.
//! - No input panics: malformed input becomes a typed error that knows the reply to send.
//! - Buffers are bounded by the configured line and chunk limits; nothing grows with the size
//!   of a message.

#![warn(missing_docs)]

pub mod address;
pub mod client;
pub mod command;
pub mod data;
pub mod downgrade;
pub mod line;
pub mod params;
mod protocol;
pub mod proxy;
pub mod replies;
pub mod reply;
pub mod server;

#[doc(hidden)]
pub mod fuzzing;

pub use address::{Domain, ForwardPath, Mailbox, ReversePath};
pub use command::{Command, CommandError};
pub use params::{MailParams, RcptParams};
pub use protocol::Protocol;
pub use reply::{EnhancedCode, Reply, ReplyCode, Severity};
