//! The server session state machine, for SMTP (RFC 5321) and LMTP (RFC 2033) listeners.
//!
//! A [`ServerSession`] owns one connection's protocol state and nothing else: the caller
//! feeds the octets it read ([`ServerSession::handle_input`]) and polls
//! ([`ServerSession::poll_event`]) for what to do next: write a [`Reply`], look at an
//! envelope event, store message content, start TLS, close. Decisions that need the world
//! (routing a recipient, opening a spool file, making a message durable) are events the
//! session waits on: until the caller answers with [`ServerSession::accept`] or
//! [`ServerSession::respond`], `poll_event` returns `None` and pipelined input stays queued,
//! so replies always leave in command order (RFC 2920).
//!
//! # Promises
//!
//! - Sequence rules (RFC 5321 §4.1.4) are enforced here: 503 for MAIL before HELO/EHLO/LHLO or
//!   inside a transaction, RCPT before MAIL, DATA/BDAT without an accepted recipient (SMTP
//!   answers 554 when every RCPT was refused, §3.3), DATA after BDAT, DATA with
//!   BODY=BINARYMIME (RFC 3030 §3).
//! - LMTP (RFC 2033 §4.2): after the end of data the session expects exactly one reply per
//!   accepted recipient, in RCPT order; it refuses HELO/EHLO, SMTP refuses LHLO.
//! - STARTTLS (RFC 3207 §4.2): after the 220, all buffered plaintext is discarded and the
//!   session is reset to its initial state once the caller reports the handshake.
//! - Only `CRLF.CRLF` ends DATA ([`crate::data`]); bare CR/LF are normalised or, with
//!   [`BarePolicy::Reject`], the message is refused with 550 5.5.2.
//! - Memory: the input buffer holds at most one command line (the framer discards overlong
//!   lines) plus whatever one `handle_input` call brought; content is handed out as
//!   [`ServerEvent::Data`] as it is decoded. Size limits are enforced while receiving.
//! - No input panics; every refusal is a reply from [`crate::replies`]. After `max_errors`
//!   refused commands the session says 421 and closes.
//!
//! # Layout
//!
//! | file | owns |
//! |---|---|
//! | this file | [`ServerSession`]: its state, input framing, DATA/BDAT content, the decision API |
//! | `commands` | the command handlers: greeting and extensions, sequence rules, STARTTLS, AUTH |
//! | `config` | [`ServerConfig`], [`BarePolicy`] |
//! | `event` | [`ServerEvent`], [`HelloVerb`], [`DecisionError`] |

mod commands;
mod config;
mod event;

use std::collections::VecDeque;

use crate::data::{BareLineEndings, BdatReader, DataDecoder};
use crate::line::{Frame, LineFramer, Status};
use crate::params::MailParams;
use crate::replies;
use crate::reply::{Reply, Severity};

pub use crate::protocol::Protocol;
pub use config::{BarePolicy, ServerConfig};
pub use event::{DecisionError, HelloVerb, ServerEvent};

/// Content shorter than this is copied by [`ServerSession::handle_input_owned`], not
/// lent.
const MIN_LENT: usize = 4096;

/// A decision the session waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Mail,
    Rcpt,
    DataStart { bdat: Option<(u64, bool)> },
    DataEnd { remaining: usize },
    Auth,
}

/// Why the content of the current transaction is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Abort {
    TooBig,
    BareLineEnding,
}

/// The content phase of the transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    None,
    Bdat,
    /// A BDAT chunk was refused: further chunks get 503 until RSET.
    Failed,
}

#[derive(Debug)]
enum Phase {
    Command,
    Data,
    Bdat {
        reader: BdatReader,
        last: bool,
        refusal: Option<Reply>,
    },
    AwaitTls,
    AuthExchange,
    Closed,
}

/// The mail transaction in progress.
#[derive(Debug, Default)]
struct Transaction {
    open: bool,
    params: MailParams,
    attempted: usize,
    accepted: usize,
    size: u64,
    abort: Option<Abort>,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct ServerSession {
    config: ServerConfig,
    hello: Option<HelloVerb>,
    tls_active: bool,
    authenticated: bool,
    phase: Phase,
    pending: Option<Pending>,
    content: Content,
    txn: Transaction,
    input: Vec<u8>,
    events: VecDeque<ServerEvent>,
    framer: LineFramer,
    decoder: DataDecoder,
    decoded: Vec<u8>,
    errors: u32,
}

impl ServerSession {
    /// A new session; its first event is the 220 greeting.
    pub fn new(config: ServerConfig) -> Self {
        let policy = match config.bare_line_endings {
            BarePolicy::Normalize => BareLineEndings::Normalize,
            BarePolicy::Reject => BareLineEndings::Preserve,
        };
        let mut events = VecDeque::new();
        events.push_back(ServerEvent::Reply(replies::greeting(
            &config.hostname,
            config.protocol.name(),
        )));
        Self {
            framer: LineFramer::new(config.max_line),
            decoder: DataDecoder::new(policy),
            config,
            hello: None,
            tls_active: false,
            authenticated: false,
            phase: Phase::Command,
            pending: None,
            content: Content::None,
            txn: Transaction::default(),
            input: Vec::new(),
            events,
            decoded: Vec::new(),
            errors: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// TLS is active on this connection.
    pub fn is_tls(&self) -> bool {
        self.tls_active
    }

    /// Octets received from the client. Ignored after close and between the 220 to
    /// STARTTLS and the handshake (that plaintext must not be acted on).
    pub fn handle_input(&mut self, bytes: &[u8]) {
        if matches!(self.phase, Phase::AwaitTls | Phase::Closed) {
            return;
        }
        if matches!(self.phase, Phase::Data) && self.input.is_empty() && self.pending.is_none() {
            // Message content is decoded straight from the caller's octets (the decoder's
            // output is the only copy); what follows the end of the content waits here.
            let consumed = self.decode_content(bytes);
            self.input.extend_from_slice(&bytes[consumed..]);
            return;
        }
        self.input.extend_from_slice(bytes);
    }

    /// As [`handle_input`](Self::handle_input), but message content that is a prefix of
    /// `bytes` itself (no dot-stuffing or line ending to undo in this read) is not copied:
    /// the session takes the buffer (`bytes` is left empty, without capacity) and its
    /// [`ServerEvent::Data`] carries it, shrunk to fit if the content fills less than half
    /// of it (so a kept buffer is never mostly empty). Content under 4 KiB is copied: the
    /// caller's next buffer would cost more than the copy.
    pub fn handle_input_owned(&mut self, bytes: &mut Vec<u8>) {
        if !(matches!(self.phase, Phase::Data) && self.input.is_empty() && self.pending.is_none()) {
            return self.handle_input(bytes);
        }
        let (progress, whole) = self.decoder.decode_lent(bytes, &mut self.decoded);
        let lent = match whole {
            Some(end) if end >= MIN_LENT => {
                let mut content = std::mem::take(bytes);
                self.input.extend_from_slice(&content[progress.consumed..]);
                content.truncate(end);
                if end.saturating_mul(2) < content.capacity() {
                    // Mostly empty: give the rest back (allocators shrink in place).
                    content.shrink_to_fit();
                }
                Some(content)
            }
            Some(end) => {
                self.decoded.extend_from_slice(&bytes[..end]);
                self.input.extend_from_slice(&bytes[progress.consumed..]);
                None
            }
            None => {
                self.input.extend_from_slice(&bytes[progress.consumed..]);
                None
            }
        };
        self.content_decoded(progress.finished, lent);
    }

    /// Octets buffered and not yet processed.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    /// True while the session waits for a decision.
    pub fn is_waiting(&self) -> bool {
        self.pending.is_some()
    }

    /// How many more replies the pending end of data expects.
    pub fn expected_replies(&self) -> usize {
        match self.pending {
            Some(Pending::DataEnd { remaining }) => remaining,
            _ => 0,
        }
    }

    /// The next thing to do, or `None` when more input (or a decision) is needed.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Some(event);
            }
            if self.pending.is_some() || !self.step() {
                return None;
            }
        }
    }

    /// Accepts the pending decision with the standard reply (250 for MAIL and RCPT, 354 for
    /// DATA, nothing for the first BDAT chunk).
    pub fn accept(&mut self) -> Result<(), DecisionError> {
        let reply = match self.pending {
            Some(Pending::Mail) => replies::sender_ok(),
            Some(Pending::Rcpt) => replies::recipient_ok(),
            Some(Pending::DataStart { .. }) => replies::start_data(),
            _ => return Err(DecisionError::NothingPending),
        };
        self.respond(reply)
    }

    /// Answers the pending decision with `reply`; its class decides what happens (a 2yz
    /// accepts a sender or recipient, 3yz opens DATA, anything else refuses).
    pub fn respond(&mut self, reply: Reply) -> Result<(), DecisionError> {
        let pending = self.pending.take().ok_or(DecisionError::NothingPending)?;
        let positive = reply.is_positive();
        match pending {
            Pending::Mail => {
                if positive {
                    self.txn.open = true;
                } else {
                    self.txn = Transaction::default();
                }
                self.reply(reply);
            }
            Pending::Rcpt => {
                if positive {
                    self.txn.accepted += 1;
                }
                self.reply(reply);
            }
            Pending::DataStart { bdat: None } => {
                if reply.severity() == Severity::PositiveIntermediate {
                    self.decoder.reset();
                    self.phase = Phase::Data;
                } else {
                    self.reset_transaction(false);
                }
                self.reply(reply);
            }
            Pending::DataStart {
                bdat: Some((size, last)),
            } => {
                let refusal =
                    if reply.is_positive() || reply.severity() == Severity::PositiveIntermediate {
                        self.content = Content::Bdat;
                        None
                    } else {
                        self.content = Content::Failed;
                        Some(reply)
                    };
                self.start_chunk(size, last, refusal);
            }
            Pending::DataEnd { remaining } => {
                self.reply(reply);
                if remaining > 1 {
                    self.pending = Some(Pending::DataEnd {
                        remaining: remaining - 1,
                    });
                } else {
                    self.reset_transaction(false);
                }
            }
            Pending::Auth => {
                match reply.code().get() {
                    334 => self.phase = Phase::AuthExchange,
                    235 => self.authenticated = true,
                    _ => {}
                }
                self.reply(reply);
            }
        }
        Ok(())
    }

    /// Reports that the TLS handshake after STARTTLS succeeded: the session starts over
    /// (RFC 3207 §4.2) and no longer offers STARTTLS.
    pub fn tls_established(&mut self) {
        self.tls_active = true;
        self.hello = None;
        self.authenticated = false;
        self.input.clear();
        self.phase = Phase::Command;
    }

    /// The caller's read timed out: say 421 and close.
    pub fn timeout(&mut self) {
        self.close_with(replies::timeout());
    }

    /// The gateway is shutting down: say 421 and close.
    pub fn shutdown(&mut self) {
        self.close_with(replies::shutting_down());
    }

    fn close_with(&mut self, reply: Reply) {
        if !matches!(self.phase, Phase::Closed) {
            if self.txn_has_content() {
                self.events.push_back(ServerEvent::DataAborted);
            }
            self.reply(reply);
            self.events.push_back(ServerEvent::Close);
            self.phase = Phase::Closed;
            self.pending = None;
            self.input.clear();
        }
    }

    fn reply(&mut self, reply: Reply) {
        self.events.push_back(ServerEvent::Reply(reply));
    }

    /// A refused command: reply, and close after too many.
    fn error(&mut self, reply: Reply) {
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            self.reply(reply);
            self.close_with(replies::too_many_errors());
        } else {
            self.reply(reply);
        }
    }

    fn txn_has_content(&self) -> bool {
        matches!(self.phase, Phase::Data | Phase::Bdat { .. }) || self.content == Content::Bdat
    }

    /// Drops the transaction; `announce` emits `Reset` (and `DataAborted` for BDAT content).
    fn reset_transaction(&mut self, announce: bool) {
        if announce && self.txn.open {
            if self.content == Content::Bdat {
                self.events.push_back(ServerEvent::DataAborted);
            }
            self.events.push_back(ServerEvent::Reset);
        }
        self.txn = Transaction::default();
        self.content = Content::None;
    }

    /// Processes some input; false when more is needed.
    fn step(&mut self) -> bool {
        match &mut self.phase {
            Phase::Command | Phase::AuthExchange => self.step_line(),
            Phase::Data => self.step_data(),
            Phase::Bdat { .. } => self.step_bdat(),
            Phase::AwaitTls | Phase::Closed => false,
        }
    }

    fn step_line(&mut self) -> bool {
        let (consumed, frame) = self.framer.frame(&self.input);
        let line = match frame {
            Status::Partial => {
                self.input.drain(..consumed);
                return false;
            }
            Status::Complete(Frame::TooLong) => None,
            Status::Complete(Frame::Line(line)) => Some(line.to_vec()),
        };
        self.input.drain(..consumed);
        match (line, &self.phase) {
            (None, Phase::AuthExchange) => {
                self.phase = Phase::Command;
                self.error(replies::line_too_long());
            }
            (None, _) => self.error(replies::line_too_long()),
            (Some(line), Phase::AuthExchange) => {
                self.phase = Phase::Command;
                if line == b"*" {
                    self.error(replies::auth_cancelled());
                } else {
                    self.events.push_back(ServerEvent::AuthResponse(
                        String::from_utf8_lossy(&line).into_owned(),
                    ));
                    self.pending = Some(Pending::Auth);
                }
            }
            (Some(line), _) => self.handle_command(&line),
        }
        true
    }

    fn step_data(&mut self) -> bool {
        if self.input.is_empty() {
            return false;
        }
        let input = std::mem::take(&mut self.input);
        let consumed = self.decode_content(&input);
        self.input = input;
        self.input.drain(..consumed);
        true
    }

    /// Decodes message content from `input` into events; returns how much of it was
    /// content (up to and including the end-of-data line, once it came).
    fn decode_content(&mut self, input: &[u8]) -> usize {
        let progress = self.decoder.decode(input, &mut self.decoded);
        self.content_decoded(progress.finished, None);
        progress.consumed
    }

    /// Content was decoded into `self.decoded`, or is `lent` (a buffer taken whole): counts
    /// it, hands it on as [`ServerEvent::Data`] unless the content is refused, and ends the
    /// content once `finished`.
    fn content_decoded(&mut self, finished: bool, lent: Option<Vec<u8>>) {
        let n = lent.as_ref().map_or(self.decoded.len(), Vec::len);
        self.count_content(n as u64);
        if self.txn.abort.is_none()
            && self.config.bare_line_endings == BarePolicy::Reject
            && self.decoder.bare_lf() + self.decoder.bare_cr() > 0
        {
            self.txn.abort = Some(Abort::BareLineEnding);
            self.events.push_back(ServerEvent::DataAborted);
        }
        if self.txn.abort.is_none() && n > 0 {
            let content = lent.unwrap_or_else(|| std::mem::take(&mut self.decoded));
            self.events.push_back(ServerEvent::Data(content));
        }
        self.decoded.clear();
        if finished {
            self.phase = Phase::Command;
            self.end_of_content();
        }
    }

    fn step_bdat(&mut self) -> bool {
        let Phase::Bdat { reader, .. } = &mut self.phase else {
            return false;
        };
        let (chunk, done) = reader.take(&self.input);
        let taken = chunk.len();
        if taken == 0 && !done {
            return false;
        }
        let keep = self.content == Content::Bdat && self.txn.abort.is_none();
        if keep && taken > 0 {
            self.events.push_back(ServerEvent::Data(chunk.to_vec()));
        }
        self.input.drain(..taken);
        if done {
            let Phase::Bdat { last, refusal, .. } =
                std::mem::replace(&mut self.phase, Phase::Command)
            else {
                return true;
            };
            self.chunk_complete(last, refusal);
        }
        true
    }

    /// Adds decoded octets to the transaction size; refuses the content once over the limit.
    fn count_content(&mut self, n: u64) {
        self.txn.size = self.txn.size.saturating_add(n);
        let max = self.config.max_message_size;
        if max > 0 && self.txn.size > max && self.txn.abort.is_none() {
            self.txn.abort = Some(Abort::TooBig);
            self.events.push_back(ServerEvent::DataAborted);
        }
    }

    /// How many replies the end of data takes.
    fn replies_due(&self) -> usize {
        match self.config.protocol {
            Protocol::Smtp => 1,
            Protocol::Lmtp => self.txn.accepted.max(1),
        }
    }

    /// The end of DATA or of the last BDAT chunk.
    fn end_of_content(&mut self) {
        let refusal = match self.txn.abort {
            Some(Abort::TooBig) => replies::message_too_big(),
            Some(Abort::BareLineEnding) => replies::bare_line_ending(),
            None => {
                self.events.push_back(ServerEvent::DataEnd);
                self.pending = Some(Pending::DataEnd {
                    remaining: self.replies_due(),
                });
                return;
            }
        };
        for _ in 0..self.replies_due() {
            self.reply(refusal.clone());
        }
        self.reset_transaction(false);
    }

    fn start_chunk(&mut self, size: u64, last: bool, refusal: Option<Reply>) {
        if refusal.is_none() {
            let max = self.config.max_message_size;
            if max > 0 && self.txn.size.saturating_add(size) > max && self.txn.abort.is_none() {
                self.txn.abort = Some(Abort::TooBig);
                self.events.push_back(ServerEvent::DataAborted);
            }
            if self.txn.abort.is_none() {
                self.txn.size += size;
            }
        }
        self.phase = Phase::Bdat {
            reader: BdatReader::new(size),
            last,
            refusal,
        };
    }

    fn chunk_complete(&mut self, last: bool, refusal: Option<Reply>) {
        if let Some(reply) = refusal {
            self.error(reply);
            return;
        }
        if last {
            self.end_of_content();
        } else if self.txn.abort == Some(Abort::TooBig) {
            self.content = Content::Failed;
            self.reply(replies::message_too_big());
        } else if let Phase::Command = self.phase {
            let size = self.txn.size;
            self.reply(replies::chunk_ok(size));
        }
    }
}
