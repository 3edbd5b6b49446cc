//! The client state machine for postern's delivery agents: LMTP to the stores, SMTP to a relay.
//!
//! [`ClientConnection`] owns one connection's protocol state, from the greeting to QUIT: the
//! automatic LHLO/EHLO (HELO fallback), STARTTLS, AUTH PLAIN, and mail transactions with DATA
//! or BDAT. It does no I/O and reads no clock, in the quinn-proto style:
//!
//! - `handle_input` / `connection_lost` take what the socket produced;
//! - mutators (`start_transaction`, `data_sent`, `bdat_chunk`, `start_tls`, `auth_plain`,
//!   `rset`, `noop`, `verify`, `quit`) queue commands, or return a [`ClientError`] and write nothing;
//! - `poll_transmit` hands out the bytes to write, `poll_event` the [`ClientEvent`]s.
//!
//! Timeouts are the caller's; the message body is the caller's too (it writes the dot-stuffed
//! body after [`ClientEvent::DataGoAhead`], or `n` octets after each `BDAT n`).
//!
//! # The Expect FIFO
//!
//! Every command written pushes what its reply will mean onto a FIFO (`Expect`); every reply
//! parsed pops the front and becomes an event. Replies come back in command order
//! (RFC 5321 §4.1.1, RFC 2920 §3.1), so this holds whether commands went one at a time or
//! pipelined. With PIPELINING (RFC 2920) MAIL, every RCPT and DATA (or BDAT) go out in one
//! flush; without it, queued commands are released one at a time, each after the previous
//! reply, and a failed MAIL (or a transaction left with no accepted recipient) withdraws the
//! commands not yet written. The end of data is the one expectation that answers several
//! replies: in LMTP, one per recipient accepted at RCPT, in RCPT order (RFC 2033 §4.2). Which
//! recipients those are is only known once every RCPT reply is in, so it is decided when the
//! end-of-data expectation reaches the front of the FIFO, not when the dot is written (with
//! pipelined BDAT, LAST may go out before the RCPT replies arrive). Each of those replies is
//! reported as soon as it is parsed. In SMTP one reply covers the message and is repeated for
//! every accepted recipient.
//!
//! # The in-doubt promise
//!
//! Every recipient of a transaction is settled by exactly one event: a refusing
//! [`ClientEvent::RcptReply`] (while MAIL was accepted), [`ClientEvent::RecipientResult`],
//! [`ClientEvent::NotAttempted`] (the end of data was never sent, or the transaction failed
//! at MAIL, DATA or BDAT: a retry cannot duplicate) or [`ClientEvent::Unconfirmed`] (the end
//! of data was sent and the connection ended before the recipient's reply: RFC 2033 §5, the
//! message may have been delivered). A malformed or unsolicited reply is handled as a lost
//! connection.
//!
//! # Automatic commands
//!
//! - LHLO (LMTP) or EHLO (SMTP) after the greeting and again after STARTTLS; HELO when EHLO
//!   gets a 5yz (RFC 5321 §3.2).
//! - RSET after a failed transaction whose MAIL had been accepted, so the next MAIL finds the
//!   server outside a transaction; [`ClientEvent::TransactionDone`] follows its reply.
//! - `*` to cancel an AUTH challenge (there should be none: PLAIN sends its initial response).
//! - `.` after a 354 that came although no recipient was accepted (RFC 2920 §3.1).
//!
//! STARTTLS (RFC 3207 §4.2): octets the server sent after its 220 are discarded, and every
//! capability is forgotten until the LHLO/EHLO sent over TLS is answered.
//!
//! # Example
//!
//! ```
//! use postern_proto::address::{ForwardPath, Mailbox, ReversePath};
//! use postern_proto::client::{ClientConnection, ClientEvent, Protocol};
//! use postern_proto::params::{MailParams, RcptParams};
//!
//! let mut conn = ClientConnection::new(Protocol::Lmtp, "gw.example.org".to_owned());
//! let alice = ForwardPath::Mailbox(Mailbox::parse("alice@example.org")?);
//! let (mut wire, mut results) = (Vec::new(), Vec::new());
//! for read in [&b"220 store ready\r\n"[..], b"250-store\r\n250 PIPELINING\r\n",
//!              b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 OK\r\n", b"250 2.0.0 Saved\r\n"] {
//!     conn.handle_input(read); // what the socket read
//!     while let Some(event) = conn.poll_event() {
//!         match event {
//!             ClientEvent::Ready(_) => conn.start_transaction(ReversePath::Null,
//!                 MailParams::default(), vec![(alice.clone(), RcptParams::default())])?,
//!             ClientEvent::DataGoAhead => {
//!                 wire.extend_from_slice(b"Subject: hi\r\n\r\nhello\r\n.\r\n"); // the body
//!                 conn.data_sent()?;
//!             }
//!             ClientEvent::RecipientResult { index, reply } => results.push((index, reply)),
//!             _ => {}
//!         }
//!     }
//!     conn.poll_transmit(&mut wire); // what the socket must write
//! }
//! assert_eq!(results[0].1.code().get(), 250);
//! let commands = "LHLO gw.example.org\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n";
//! assert!(wire.starts_with(commands.as_bytes()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! DIAGNOSTICS: misuse returns a [`ClientError`]; server misbehaviour becomes
//! [`ClientEvent::ProtocolError`] or [`ClientEvent::UnexpectedReply`], then
//! [`ClientEvent::Closed`]. No input panics.
//!
//! SEE ALSO: RFC 5321 (SMTP), RFC 2033 (LMTP), RFC 2920 (PIPELINING), RFC 3030 (CHUNKING),
//! RFC 3207 (STARTTLS), RFC 4954 (AUTH).

mod capabilities;
mod event;
#[doc(hidden)]
pub mod fuzz;
mod reply_handling;
mod sasl;
mod transaction;

use std::collections::VecDeque;

use crate::address::{ForwardPath, ReversePath};
use crate::params::{MailParams, RcptParams};
use crate::reply::ReplyParser;
use transaction::{BodyMode, Transaction};

pub use capabilities::Capabilities;
pub use event::{ClientError, ClientEvent};

pub use crate::protocol::Protocol;

/// One client connection's protocol state. See the [module documentation](self).
#[derive(Debug)]
pub struct ClientConnection {
    protocol: Protocol,
    /// Our name for LHLO/EHLO/HELO, printable ASCII only.
    local_name: String,
    parser: ReplyParser,
    phase: Phase,
    /// Known once LHLO/EHLO is answered; forgotten at STARTTLS.
    caps: Option<Capabilities>,
    /// Commands queued but held back until the previous reply (no PIPELINING).
    queue: VecDeque<Command>,
    /// What the replies to the commands written mean, in order.
    expects: VecDeque<Expect>,
    /// Bytes released for the caller to write.
    out: Vec<u8>,
    events: VecDeque<ClientEvent>,
    txn: Option<Transaction>,
}

impl ClientConnection {
    /// A connection that waits for the server's greeting. `local_name` is sent with
    /// LHLO/EHLO/HELO; characters other than printable ASCII are dropped from it.
    pub fn new(protocol: Protocol, local_name: String) -> Self {
        let mut local_name = local_name;
        local_name.retain(|c| c.is_ascii_graphic());
        Self {
            protocol,
            local_name,
            parser: ReplyParser::default(),
            phase: Phase::Greeting,
            caps: None,
            queue: VecDeque::new(),
            expects: VecDeque::from([Expect::Greeting]),
            out: Vec::new(),
            events: VecDeque::new(),
            txn: None,
        }
    }

    /// The protocol given to [`new`](Self::new).
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// What the server advertised, once [`ClientEvent::Ready`] was reported (and until
    /// STARTTLS).
    pub fn capabilities(&self) -> Option<&Capabilities> {
        self.caps.as_ref()
    }

    /// Ready for a new command: greeted, no reply awaited, no transaction open.
    pub fn is_idle(&self) -> bool {
        self.check_idle().is_ok()
    }

    /// Whether [`ClientEvent::Closed`] has been reported (or is queued).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    // Handlers for what the socket produced.

    /// Feeds octets read from the server, in chunks of any size. Commands that the replies
    /// release are written at the end of the call: a reply in the same input that seems to
    /// answer one of them came before the command was sent, and is reported as
    /// [`ClientEvent::UnexpectedReply`] (the connection is then lost). Between
    /// [`ClientEvent::TlsGoAhead`] and [`tls_established`](Self::tls_established) input is
    /// discarded.
    pub fn handle_input(&mut self, bytes: &[u8]) {
        if self.phase != Phase::Closed && self.phase != Phase::TlsHandshake {
            self.parser.handle_input(bytes);
        }
        while self.phase != Phase::Closed && self.phase != Phase::TlsHandshake {
            match self.parser.poll_reply() {
                Ok(Some(reply)) => self.handle_reply(reply),
                Ok(None) => break,
                Err(e) => {
                    self.events.push_back(ClientEvent::ProtocolError(e));
                    self.lose();
                }
            }
        }
        self.release();
    }

    /// Reports end of file or an I/O error on the socket. Settles the open transaction's
    /// recipients ([`ClientEvent::Unconfirmed`] after the end of data was sent,
    /// [`ClientEvent::NotAttempted`] before), then reports [`ClientEvent::Closed`].
    pub fn connection_lost(&mut self) {
        self.lose();
    }

    // Polling for what the caller must do.

    /// Appends the octets to write to `buf`; returns how many.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> usize {
        let n = self.out.len();
        buf.append(&mut self.out);
        n
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    // Mutators.

    /// Opens a transaction sent with DATA: queues MAIL FROM, one RCPT TO per recipient and
    /// DATA (one flush with PIPELINING). Wait for [`ClientEvent::DataGoAhead`], write the
    /// body, then call [`data_sent`](Self::data_sent).
    pub fn start_transaction(
        &mut self,
        from: ReversePath,
        mail_params: MailParams,
        recipients: Vec<(ForwardPath, RcptParams)>,
    ) -> Result<(), ClientError> {
        self.open(BodyMode::Data, &from, &mail_params, &recipients)
    }

    /// Opens a transaction sent with BDAT (RFC 3030; the server must advertise CHUNKING):
    /// queues MAIL FROM and one RCPT TO per recipient; then send the body with
    /// [`bdat_chunk`](Self::bdat_chunk).
    pub fn start_transaction_bdat(
        &mut self,
        from: ReversePath,
        mail_params: MailParams,
        recipients: Vec<(ForwardPath, RcptParams)>,
    ) -> Result<(), ClientError> {
        self.open(BodyMode::Bdat, &from, &mail_params, &recipients)
    }

    /// The caller has written the whole body, final `.` CRLF included, after
    /// [`ClientEvent::DataGoAhead`]. From now on a lost connection leaves the accepted
    /// recipients in doubt ([`ClientEvent::Unconfirmed`]).
    pub fn data_sent(&mut self) -> Result<(), ClientError> {
        let txn = self.transaction()?;
        if !txn.go_ahead || txn.end_sent {
            return Err(ClientError::OutOfSequence);
        }
        txn.end_sent = true;
        txn.outstanding += 1;
        self.expects.push_back(Expect::EndOfData);
        Ok(())
    }

    /// Queues `BDAT len` (`BDAT len LAST` if `last`). The caller then writes what
    /// [`poll_transmit`](Self::poll_transmit) gives, then exactly `len` octets of the message,
    /// before feeding more input. Without PIPELINING this is refused with
    /// [`ClientError::NotReady`] until the previous reply (RCPT or BDAT) has been reported.
    pub fn bdat_chunk(&mut self, len: u64, last: bool) -> Result<(), ClientError> {
        let pipelining = self.pipelining();
        let idle = self.expects.is_empty() && self.queue.is_empty();
        let txn = self.transaction()?;
        if txn.mode != BodyMode::Bdat || txn.end_sent {
            return Err(ClientError::OutOfSequence);
        }
        if txn.closing || txn.doomed() {
            return Err(ClientError::TransactionFailed);
        }
        if !pipelining && !idle {
            return Err(ClientError::NotReady);
        }
        txn.outstanding += 1;
        txn.end_sent = last;
        let (line, expect) = if last {
            (format!("BDAT {len} LAST\r\n"), Expect::BdatLast)
        } else {
            (format!("BDAT {len}\r\n"), Expect::Bdat)
        };
        self.send(line, expect);
        Ok(())
    }

    /// Queues STARTTLS (RFC 3207). On [`ClientEvent::TlsGoAhead`] do the handshake, then call
    /// [`tls_established`](Self::tls_established).
    pub fn start_tls(&mut self) -> Result<(), ClientError> {
        self.check_idle()?;
        if !self.caps.as_ref().is_some_and(|c| c.starttls) {
            return Err(ClientError::StartTlsNotOffered);
        }
        self.send("STARTTLS\r\n".to_owned(), Expect::StartTls);
        Ok(())
    }

    /// The TLS handshake succeeded: capabilities are forgotten and LHLO/EHLO is sent again over
    /// TLS; [`ClientEvent::Ready`] follows.
    pub fn tls_established(&mut self) -> Result<(), ClientError> {
        match self.phase {
            Phase::Closed => return Err(ClientError::Closed),
            Phase::TlsHandshake => {}
            _ => return Err(ClientError::OutOfSequence),
        }
        self.parser = ReplyParser::default();
        self.caps = None;
        self.phase = Phase::Hello;
        self.send_hello(self.first_hello());
        self.release();
        Ok(())
    }

    /// Queues `AUTH PLAIN` with the initial response (RFC 4954, RFC 4616); the server must
    /// have advertised PLAIN. [`ClientEvent::Authenticated`] or [`ClientEvent::AuthFailed`]
    /// follows.
    pub fn auth_plain(
        &mut self,
        authzid: &str,
        user: &str,
        password: &str,
    ) -> Result<(), ClientError> {
        self.check_idle()?;
        if !self.caps.as_ref().is_some_and(|c| c.supports_auth("PLAIN")) {
            return Err(ClientError::AuthNotOffered);
        }
        let response = sasl::plain_initial_response(authzid, user, password);
        self.send(format!("AUTH PLAIN {response}\r\n"), Expect::Auth);
        Ok(())
    }

    /// Queues RSET; [`ClientEvent::RsetReply`] follows. Not needed between transactions (a
    /// failed one is reset automatically); useful before reusing a pooled connection.
    pub fn rset(&mut self) -> Result<(), ClientError> {
        self.check_idle()?;
        self.send("RSET\r\n".to_owned(), Expect::Rset { auto: false });
        Ok(())
    }

    /// Queues a recipient check outside any transaction: `MAIL FROM:<from>`, `RCPT TO:<to>`
    /// and `RSET` (one flush with PIPELINING, else one at a time). No content is ever sent,
    /// so nothing can be delivered. [`ClientEvent::MailReply`], then
    /// [`ClientEvent::RcptReply`] (index 0; only meaningful if MAIL was accepted), then
    /// [`ClientEvent::RsetReply`] follow; after the RSET reply the connection is idle again.
    /// This is what Postfix's `reject_unverified_recipient` probe asks, without its DATA.
    pub fn verify(&mut self, from: ReversePath, to: ForwardPath) -> Result<(), ClientError> {
        self.check_idle()?;
        self.push(format!("MAIL FROM:{from}\r\n"), Expect::VerifyMail);
        self.push(format!("RCPT TO:{to}\r\n"), Expect::VerifyRcpt);
        self.push("RSET\r\n".to_owned(), Expect::Rset { auto: false });
        self.release();
        Ok(())
    }

    /// Queues NOOP; [`ClientEvent::NoopReply`] follows (a liveness check for pooled
    /// connections).
    pub fn noop(&mut self) -> Result<(), ClientError> {
        self.check_idle()?;
        self.send("NOOP\r\n".to_owned(), Expect::Noop);
        Ok(())
    }

    /// Queues QUIT; [`ClientEvent::Closed`] follows its reply. Allowed when idle and after a
    /// refused greeting or LHLO/EHLO. To abandon an open transaction, close the socket and
    /// call [`connection_lost`](Self::connection_lost).
    pub fn quit(&mut self) -> Result<(), ClientError> {
        let refused = self.phase == Phase::Refused && self.expects.is_empty();
        if !refused {
            self.check_idle()?;
        }
        self.send("QUIT\r\n".to_owned(), Expect::Quit);
        Ok(())
    }

    // Internals: queueing and releasing commands.

    fn check_idle(&self) -> Result<(), ClientError> {
        match self.phase {
            Phase::Closed => return Err(ClientError::Closed),
            Phase::Ready => {}
            _ => return Err(ClientError::NotReady),
        }
        if self.txn.is_some() {
            return Err(ClientError::TransactionOpen);
        }
        if !self.expects.is_empty() || !self.queue.is_empty() {
            return Err(ClientError::NotReady);
        }
        Ok(())
    }

    fn transaction(&mut self) -> Result<&mut Transaction, ClientError> {
        if self.phase == Phase::Closed {
            return Err(ClientError::Closed);
        }
        self.txn.as_mut().ok_or(ClientError::NoTransaction)
    }

    fn pipelining(&self) -> bool {
        self.caps.as_ref().is_some_and(|c| c.pipelining)
    }

    /// Queues a command; [`release`](Self::release) writes it when its turn comes. Called
    /// while handling input, the release waits for the end of that input: no reply already
    /// received can answer a command not yet written.
    fn push(&mut self, line: String, expect: Expect) {
        self.queue.push_back(Command { line, expect });
    }

    /// Queues a command and writes it if its turn has come (from the mutators).
    fn send(&mut self, line: String, expect: Expect) {
        self.push(line, expect);
        self.release();
    }

    /// Moves queued commands to the output: all of them with PIPELINING, else one when no
    /// reply is awaited.
    fn release(&mut self) {
        let pipelining = self.pipelining();
        while !self.queue.is_empty() && (pipelining || self.expects.is_empty()) {
            let Some(command) = self.queue.pop_front() else {
                break;
            };
            self.out.extend_from_slice(command.line.as_bytes());
            self.expects.push_back(command.expect);
        }
    }

    fn first_hello(&self) -> Hello {
        match self.protocol {
            Protocol::Lmtp => Hello::Lhlo,
            Protocol::Smtp => Hello::Ehlo,
        }
    }

    fn send_hello(&mut self, hello: Hello) {
        let verb = match hello {
            Hello::Lhlo => "LHLO",
            Hello::Ehlo => "EHLO",
            Hello::Helo => "HELO",
        };
        let line = format!("{verb} {}\r\n", self.local_name);
        self.push(line, Expect::Hello(hello));
    }

    fn open(
        &mut self,
        mode: BodyMode,
        from: &ReversePath,
        mail_params: &MailParams,
        recipients: &[(ForwardPath, RcptParams)],
    ) -> Result<(), ClientError> {
        self.check_idle()?;
        if recipients.is_empty() {
            return Err(ClientError::NoRecipients);
        }
        if mode == BodyMode::Bdat && !self.caps.as_ref().is_some_and(|c| c.chunking) {
            return Err(ClientError::ChunkingNotOffered);
        }
        self.push(format!("MAIL FROM:{from}{mail_params}\r\n"), Expect::Mail);
        for (index, (to, params)) in recipients.iter().enumerate() {
            self.push(format!("RCPT TO:{to}{params}\r\n"), Expect::Rcpt(index));
        }
        let mut outstanding = 1 + recipients.len();
        if mode == BodyMode::Data {
            self.push("DATA\r\n".to_owned(), Expect::Data);
            outstanding += 1;
        }
        self.txn = Some(Transaction::new(mode, recipients.len(), outstanding));
        self.release();
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the 220 greeting.
    Greeting,
    /// LHLO/EHLO/HELO sent, capabilities unknown.
    Hello,
    /// Capabilities known; commands may be issued.
    Ready,
    /// 220 to STARTTLS received; waiting for `tls_established`.
    TlsHandshake,
    /// Greeting or LHLO/EHLO refused: only QUIT.
    Refused,
    Closed,
}

/// A command queued but not yet written.
#[derive(Debug)]
struct Command {
    line: String,
    expect: Expect,
}

/// What the reply to a written command means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Greeting,
    Hello(Hello),
    StartTls,
    Auth,
    /// The reply to `*` after an AUTH challenge.
    AuthCancel,
    Mail,
    /// RCPT of the recipient at this index.
    Rcpt(usize),
    Data,
    Bdat,
    /// One reply per accepted recipient (LMTP) or one reply (SMTP).
    BdatLast,
    /// One reply per accepted recipient (LMTP) or one reply (SMTP).
    EndOfData,
    /// MAIL of a recipient check ([`ClientConnection::verify`]), outside any transaction.
    VerifyMail,
    /// RCPT of a recipient check.
    VerifyRcpt,
    /// `auto`: sent by the machine to close a failed transaction.
    Rset {
        auto: bool,
    },
    Noop,
    Quit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hello {
    Lhlo,
    Ehlo,
    Helo,
}
