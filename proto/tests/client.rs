//! The client state machine, driven through dialogues observed on real stores (Cyrus 3.6 and
//! Dovecot 2.3 LMTP, see shared/backends/transcripts) and through the corner cases of the
//! in-doubt promise.
//!
//! Dialogue lines: `S:` is fed as server output (with CRLF, one line at a time); `C:` is what
//! the client must have written; `E:` is an event that must have been reported. Output and
//! events are checked before every `S:` line and at the end, so an `E:` line placed after an
//! `S:` line asserts that the event came as soon as that line was fed.

#![allow(clippy::unwrap_used, reason = "test helpers: a panic is a failed test")]

use postern_proto::address::{ForwardPath, Mailbox, ReversePath};
use postern_proto::client::{ClientConnection, ClientError, ClientEvent, Protocol, fuzz};
use postern_proto::params::{Body, MailParams, RcptParams};
use postern_proto::reply::Reply;
use proptest::prelude::*;

const CYRUS_HELLO: &str = "
S: 220 localhost Cyrus LMTP 3.6.1-Debian-3.6.1-4+deb12u5 server ready
E: Greeted 220
C: LHLO gw.example.org
S: 250-localhost
S: 250-8BITMIME
S: 250-ENHANCEDSTATUSCODES
S: 250-PIPELINING
S: 250-SIZE
S: 250-AUTH EXTERNAL
S: 250-IGNOREQUOTA
S: 250 Ok SESSIONID=<cyrus-1>
E: Ready
";

const DOVECOT_HELLO: &str = "
S: 220 localhost Dovecot (Debian) ready.
E: Greeted 220
C: LHLO gw.example.org
S: 250-localhost
S: 250-8BITMIME
S: 250-CHUNKING
S: 250-ENHANCEDSTATUSCODES
S: 250 PIPELINING
E: Ready
";

/// A LMTP store without PIPELINING.
const PLAIN_HELLO: &str = "
S: 220 store ready
E: Greeted 220
C: LHLO gw.example.org
S: 250-store
S: 250-8BITMIME
S: 250 CHUNKING
E: Ready
";

struct Session {
    conn: ClientConnection,
}

impl Session {
    fn new(protocol: Protocol) -> Self {
        Self {
            conn: ClientConnection::new(protocol, "gw.example.org".to_owned()),
        }
    }

    /// A session that has replayed `hello`.
    fn after(protocol: Protocol, hello: &str) -> Self {
        let mut s = Self::new(protocol);
        s.run(hello);
        s
    }

    /// Replays a dialogue (see the file header); returns every event reported.
    fn run(&mut self, dialogue: &str) -> Vec<ClientEvent> {
        let mut all = Vec::new();
        let mut want_out = String::new();
        let mut want_events = Vec::new();
        for line in dialogue.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (tag, text) = line.split_at(3);
            match tag {
                "C: " => want_out.push_str(&format!("{text}\r\n")),
                "E: " => want_events.push(text.to_owned()),
                "S: " => {
                    all.extend(self.check(&mut want_out, &mut want_events, line));
                    self.conn.handle_input(format!("{text}\r\n").as_bytes());
                }
                _ => panic!("bad dialogue line {line:?}"),
            }
        }
        all.extend(self.check(&mut want_out, &mut want_events, "end"));
        all
    }

    fn check(&mut self, out: &mut String, events: &mut Vec<String>, at: &str) -> Vec<ClientEvent> {
        let mut written = Vec::new();
        self.conn.poll_transmit(&mut written);
        assert_eq!(
            String::from_utf8_lossy(&written),
            *out,
            "client output before {at:?}"
        );
        let got = self.events();
        assert_eq!(
            got.iter().map(render).collect::<Vec<_>>(),
            *events,
            "events before {at:?}"
        );
        out.clear();
        events.clear();
        got
    }

    fn events(&mut self) -> Vec<ClientEvent> {
        std::iter::from_fn(|| self.conn.poll_event()).collect()
    }

    fn start(&mut self, recipients: &[&str]) {
        let (from, params, rcpts) = envelope(recipients);
        self.conn.start_transaction(from, params, rcpts).unwrap();
    }
}

fn envelope(recipients: &[&str]) -> (ReversePath, MailParams, Vec<(ForwardPath, RcptParams)>) {
    let from = ReversePath::Mailbox(Mailbox::parse("sender@example.org").unwrap());
    let rcpts = recipients
        .iter()
        .map(|r| {
            (
                ForwardPath::Mailbox(Mailbox::parse(r).unwrap()),
                RcptParams::default(),
            )
        })
        .collect();
    (from, MailParams::default(), rcpts)
}

fn code(r: &Reply) -> String {
    match r.enhanced() {
        Some(e) => format!("{} {e}", r.code()),
        None => r.code().to_string(),
    }
}

/// One line per event, as written in `E:` lines: replies shown as code and enhanced code.
fn render(e: &ClientEvent) -> String {
    match e {
        ClientEvent::Greeted(r) => format!("Greeted {}", code(r)),
        ClientEvent::Refused(r) => format!("Refused {}", code(r)),
        ClientEvent::Ready(_) => "Ready".to_owned(),
        ClientEvent::HelloRefused(r) => format!("HelloRefused {}", code(r)),
        ClientEvent::TlsGoAhead { discarded } => format!("TlsGoAhead discarded={discarded}"),
        ClientEvent::TlsRefused(r) => format!("TlsRefused {}", code(r)),
        ClientEvent::Authenticated => "Authenticated".to_owned(),
        ClientEvent::AuthFailed(r) => format!("AuthFailed {}", code(r)),
        ClientEvent::MailReply(r) => format!("Mail {}", code(r)),
        ClientEvent::RcptReply { index, reply } => format!("Rcpt {index}: {}", code(reply)),
        ClientEvent::DataGoAhead => "DataGoAhead".to_owned(),
        ClientEvent::DataRefused(r) => format!("DataRefused {}", code(r)),
        ClientEvent::BdatReply(r) => format!("Bdat {}", code(r)),
        ClientEvent::RecipientResult { index, reply } => format!("Result {index}: {}", code(reply)),
        ClientEvent::Unconfirmed { index } => format!("Unconfirmed {index}"),
        ClientEvent::NotAttempted {
            index,
            reason: None,
        } => format!("NotAttempted {index}"),
        ClientEvent::NotAttempted {
            index,
            reason: Some(r),
        } => {
            format!("NotAttempted {index} ({})", code(r))
        }
        ClientEvent::TransactionDone => "TransactionDone".to_owned(),
        ClientEvent::RsetReply(r) => format!("Rset {}", code(r)),
        ClientEvent::NoopReply(r) => format!("Noop {}", code(r)),
        ClientEvent::UnexpectedReply(r) => format!("Unexpected {}", code(r)),
        ClientEvent::ProtocolError(e) => format!("ProtocolError {e}"),
        ClientEvent::Closed => "Closed".to_owned(),
    }
}

#[test]
fn cyrus_lhlo_capabilities() {
    let s = Session::after(Protocol::Lmtp, CYRUS_HELLO);
    let caps = s.conn.capabilities().unwrap();
    assert!(caps.pipelining && caps.eight_bit_mime && caps.enhanced_status_codes);
    assert!(!caps.chunking && !caps.starttls && !caps.smtputf8);
    assert_eq!(caps.size, Some(None));
    assert_eq!(caps.auth, ["EXTERNAL"]);
    assert!(s.conn.is_idle());
}

#[test]
fn cyrus_pipelined_transaction_with_unknown_user() {
    let mut s = Session::after(Protocol::Lmtp, CYRUS_HELLO);
    s.start(&[
        "alice@example.org",
        "nosuchuser@example.org",
        "bob@example.org",
    ]);
    let events = s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<nosuchuser@example.org>
        C: RCPT TO:<bob@example.org>
        C: DATA
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        S: 550-Mailbox unknown.  Either there is no mailbox associated with this
        S: 550-name or you do not have authorization to see it.
        S: 550 5.1.1 User unknown
        E: Rcpt 1: 550 5.1.1
        S: 250 2.1.5 ok
        E: Rcpt 2: 250 2.1.5
        S: 354 go ahead
        E: DataGoAhead
        ",
    );
    let ClientEvent::RcptReply { reply, .. } = &events[2] else {
        panic!("{events:?}")
    };
    assert_eq!(reply.lines().len(), 3);
    s.conn.data_sent().unwrap();
    // One reply per recipient accepted at RCPT: none for the unknown user.
    s.run(
        "
        S: 250 2.1.5 Success SESSIONID=<cyrus-2>
        E: Result 0: 250 2.1.5
        S: 250 2.1.5 Success SESSIONID=<cyrus-2>
        E: Result 2: 250 2.1.5
        E: TransactionDone
        ",
    );
    assert!(s.conn.is_idle());
    s.conn.quit().unwrap();
    s.run("C: QUIT\nS: 221 2.0.0 bye\nE: Closed");
    assert!(s.conn.is_closed());
}

#[test]
fn dovecot_mixed_results_arrive_one_by_one() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["alice@example.org", "bob@example.org", "carol@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: RCPT TO:<carol@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 250 2.1.5 OK
        E: Rcpt 0: 250 2.1.5
        S: 250 2.1.5 OK
        E: Rcpt 1: 250 2.1.5
        S: 250 2.1.5 OK
        E: Rcpt 2: 250 2.1.5
        S: 354 OK
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run(
        "
        S: 250 2.0.0 <alice@example.org> 0PcfCQPrCGtQGAAAg+zDdQ Saved
        E: Result 0: 250 2.0.0
        S: 451 4.3.0 <bob@example.org> Temporary internal error
        E: Result 1: 451 4.3.0
        S: 552 5.2.2 <carol@example.org> Quota exceeded (mailbox for user is full)
        E: Result 2: 552 5.2.2
        E: TransactionDone
        ",
    );
    // The connection is reusable for the next transaction.
    s.start(&["dave@example.org"]);
    s.run("C: MAIL FROM:<sender@example.org>\nC: RCPT TO:<dave@example.org>\nC: DATA");
}

#[test]
fn all_recipients_refused_data_refused_then_reset() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["nosuchuser@example.org", "other@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<nosuchuser@example.org>
        C: RCPT TO:<other@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 550 5.1.1 <nosuchuser@example.org> User doesn't exist: nosuchuser@example.org
        E: Rcpt 0: 550 5.1.1
        S: 550 5.1.1 <other@example.org> User doesn't exist: other@example.org
        E: Rcpt 1: 550 5.1.1
        S: 503 5.5.0 No valid recipients
        E: DataRefused 503 5.5.0
        C: RSET
        S: 250 2.0.0 OK
        E: TransactionDone
        ",
    );
    assert!(s.conn.is_idle());
}

#[test]
fn data_refused_leaves_accepted_recipients_not_attempted() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["alice@example.org", "bob@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 250 2.1.5 OK
        E: Rcpt 0: 250 2.1.5
        S: 550 5.1.1 unknown
        E: Rcpt 1: 550 5.1.1
        S: 451 4.3.0 try later
        E: DataRefused 451 4.3.0
        E: NotAttempted 0 (451 4.3.0)
        C: RSET
        S: 250 2.0.0 OK
        E: TransactionDone
        ",
    );
}

#[test]
fn lost_after_one_of_three_results_leaves_two_unconfirmed() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["alice@example.org", "bob@example.org", "carol@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: RCPT TO:<carol@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 250 2.1.5 OK
        E: Rcpt 0: 250 2.1.5
        S: 250 2.1.5 OK
        E: Rcpt 1: 250 2.1.5
        S: 250 2.1.5 OK
        E: Rcpt 2: 250 2.1.5
        S: 354 OK
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run("S: 250 2.0.0 <alice@example.org> Saved\nE: Result 0: 250 2.0.0");
    // Half of bob's reply arrived, then the connection dropped: still in doubt.
    s.conn.handle_input(b"250 2.0.0 <bob@exa");
    s.conn.connection_lost();
    s.run("E: Unconfirmed 1\nE: Unconfirmed 2\nE: Closed");
    assert_eq!(
        s.conn
            .start_transaction(envelope(&["a@b"]).0, MailParams::default(), vec![]),
        Err(ClientError::Closed)
    );
}

#[test]
fn lost_before_the_dot_is_not_attempted() {
    // During the body: nothing can have been delivered.
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["alice@example.org", "bob@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 250 2.1.5 OK
        E: Rcpt 0: 250 2.1.5
        S: 550 5.1.1 unknown
        E: Rcpt 1: 550 5.1.1
        S: 354 OK
        E: DataGoAhead
        ",
    );
    s.conn.connection_lost();
    s.run("E: NotAttempted 0\nE: Closed");

    // Before the RCPT replies: every recipient not yet refused.
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["alice@example.org", "bob@example.org", "carol@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: RCPT TO:<carol@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 550 5.1.1 unknown
        E: Rcpt 0: 550 5.1.1
        ",
    );
    s.conn.connection_lost();
    s.run("E: NotAttempted 1\nE: NotAttempted 2\nE: Closed");
}

#[test]
fn non_pipelining_server_gets_one_command_at_a_time() {
    let mut s = Session::after(Protocol::Lmtp, PLAIN_HELLO);
    s.start(&["alice@example.org", "nosuchuser@example.org"]);
    assert_eq!(s.conn.noop(), Err(ClientError::TransactionOpen));
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        C: RCPT TO:<alice@example.org>
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        C: RCPT TO:<nosuchuser@example.org>
        S: 550 5.1.1 User unknown
        E: Rcpt 1: 550 5.1.1
        C: DATA
        S: 354 go ahead
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run("S: 250 2.1.5 Success\nE: Result 0: 250 2.1.5\nE: TransactionDone");
}

#[test]
fn non_pipelining_failures_withdraw_the_rest() {
    // MAIL refused: no RCPT is written, no RSET is needed.
    let mut s = Session::after(Protocol::Lmtp, PLAIN_HELLO);
    s.start(&["alice@example.org", "bob@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        S: 430 Authentication required
        E: Mail 430
        E: NotAttempted 0 (430)
        E: NotAttempted 1 (430)
        E: TransactionDone
        ",
    );
    // Every recipient refused: DATA is not written, the transaction is reset.
    s.start(&["x@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        C: RCPT TO:<x@example.org>
        S: 550 5.1.1 User unknown
        E: Rcpt 0: 550 5.1.1
        C: RSET
        S: 250 2.0.0 ok
        E: TransactionDone
        ",
    );
}

#[test]
fn starttls_discards_injected_bytes_and_forgets_capabilities() {
    let mut s = Session::after(
        Protocol::Smtp,
        "
        S: 220 relay.example.org ESMTP
        E: Greeted 220
        C: EHLO gw.example.org
        S: 250-relay.example.org
        S: 250-PIPELINING
        S: 250-STARTTLS
        S: 250 8BITMIME
        E: Ready
        ",
    );
    s.conn.start_tls().unwrap();
    s.run("C: STARTTLS");
    // A man in the middle appends a reply to the 220, hoping it is read after the handshake.
    let injected = b"250-relay.example.org\r\n250 AUTH PLAIN\r\n";
    let mut input = b"220 2.0.0 Ready to start TLS\r\n".to_vec();
    input.extend_from_slice(injected);
    s.conn.handle_input(&input);
    s.run(&format!("E: TlsGoAhead discarded={}", injected.len()));
    assert_eq!(s.conn.capabilities().map(|c| c.starttls), Some(true));
    s.conn.handle_input(b"250 more plaintext\r\n");
    assert_eq!(
        s.conn.start_transaction(
            envelope(&["a@b"]).0,
            MailParams::default(),
            envelope(&["a@b"]).2
        ),
        Err(ClientError::NotReady)
    );
    s.conn.tls_established().unwrap();
    assert!(s.conn.capabilities().is_none());
    s.run(
        "
        C: EHLO gw.example.org
        S: 250-relay.example.org
        S: 250 PIPELINING
        E: Ready
        ",
    );
    let caps = s.conn.capabilities().unwrap();
    assert!(caps.pipelining && !caps.starttls && caps.auth.is_empty());
    assert_eq!(s.conn.start_tls(), Err(ClientError::StartTlsNotOffered));
}

#[test]
fn starttls_refused_keeps_plaintext_session() {
    let mut s = Session::after(
        Protocol::Smtp,
        "S: 220 mx\nE: Greeted 220\nC: EHLO gw.example.org\nS: 250-mx\nS: 250 STARTTLS\nE: Ready",
    );
    s.conn.start_tls().unwrap();
    s.run("C: STARTTLS\nS: 454 4.7.0 TLS not available\nE: TlsRefused 454 4.7.0");
    assert_eq!(s.conn.tls_established(), Err(ClientError::OutOfSequence));
    assert!(s.conn.is_idle());
}

#[test]
fn cyrus_tcp_auth_required_then_auth_plain() {
    let mut s = Session::after(
        Protocol::Lmtp,
        "
        S: 220 localhost Cyrus LMTP 3.6.1-Debian-3.6.1-4+deb12u5 server ready
        E: Greeted 220
        C: LHLO gw.example.org
        S: 250-localhost
        S: 250-8BITMIME
        S: 250-ENHANCEDSTATUSCODES
        S: 250-PIPELINING
        S: 250-SIZE
        S: 250-AUTH PLAIN LOGIN
        S: 250-IGNOREQUOTA
        S: 250 Ok SESSIONID=<cyrus-test-1>
        E: Ready
        ",
    );
    s.start(&["alice@example.org"]);
    // MAIL refused: the RCPT's 503 is reported but the recipient fails for MAIL's reason.
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: DATA
        S: 430 Authentication required
        E: Mail 430
        S: 503 5.5.1 Need MAIL command
        E: Rcpt 0: 503 5.5.1
        S: 503 5.5.1 No recipients
        E: DataRefused 503 5.5.1
        E: NotAttempted 0 (430)
        E: TransactionDone
        ",
    );
    s.conn.auth_plain("", "alice", "alice").unwrap();
    s.run("C: AUTH PLAIN AGFsaWNlAGFsaWNl\nS: 501 5.5.4 undefined error!\nE: AuthFailed 501 5.5.4");
    s.conn.auth_plain("", "test", "test").unwrap();
    s.run("C: AUTH PLAIN AHRlc3QAdGVzdA==\nS: 235 Authenticated!\nE: Authenticated");
    s.start(&["alice@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: DATA
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        S: 354 go ahead
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run(
        "S: 250 2.1.5 Success SESSIONID=<cyrus-test-2>\nE: Result 0: 250 2.1.5\nE: TransactionDone",
    );
}

#[test]
fn auth_challenge_is_cancelled() {
    let mut s = Session::after(
        Protocol::Smtp,
        "S: 220 mx\nE: Greeted 220\nC: EHLO gw.example.org\nS: 250-mx\nS: 250 AUTH PLAIN\nE: Ready",
    );
    s.conn.auth_plain("", "u", "p").unwrap();
    s.run("C: AUTH PLAIN AHUAcA==\nS: 334 \nC: *\nS: 501 5.7.0 cancelled\nE: AuthFailed 501 5.7.0");
    assert!(s.conn.is_idle());
}

#[test]
fn dovecot_bdat_with_last() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    let (from, _, rcpts) = envelope(&["alice@example.org", "bob@example.org"]);
    let params = MailParams {
        size: Some(15),
        body: Some(Body::BinaryMime),
        ..MailParams::default()
    };
    s.conn.start_transaction_bdat(from, params, rcpts).unwrap();
    // Pipelined: the chunks may follow before the RCPT replies.
    s.conn.bdat_chunk(10, false).unwrap();
    s.run(
        "
        C: MAIL FROM:<sender@example.org> SIZE=15 BODY=BINARYMIME
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: BDAT 10
        ",
    );
    s.conn.bdat_chunk(5, true).unwrap();
    assert_eq!(s.conn.bdat_chunk(1, true), Err(ClientError::OutOfSequence));
    s.run(
        "
        C: BDAT 5 LAST
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 250 2.1.5 OK
        E: Rcpt 0: 250 2.1.5
        S: 250 2.1.5 OK
        E: Rcpt 1: 250 2.1.5
        S: 250 2.0.0 Added 10 octets
        E: Bdat 250 2.0.0
        S: 250 2.0.0 <alice@example.org> 0PcfCQPrCGtQGAAAg+zDdQ Saved
        E: Result 0: 250 2.0.0
        S: 552 5.2.2 <bob@example.org> Quota exceeded (mailbox for user is full)
        E: Result 1: 552 5.2.2
        E: TransactionDone
        ",
    );
}

#[test]
fn bdat_without_pipelining_waits_for_each_reply() {
    let mut s = Session::after(Protocol::Lmtp, PLAIN_HELLO);
    let (from, params, rcpts) = envelope(&["alice@example.org"]);
    s.conn.start_transaction_bdat(from, params, rcpts).unwrap();
    assert_eq!(s.conn.bdat_chunk(3, true), Err(ClientError::NotReady));
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        C: RCPT TO:<alice@example.org>
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        ",
    );
    s.conn.bdat_chunk(3, false).unwrap();
    assert_eq!(s.conn.bdat_chunk(3, true), Err(ClientError::NotReady));
    // A refused chunk fails the transaction: no further chunk (RFC 3030 §4).
    s.run(
        "
        C: BDAT 3
        S: 552 5.3.4 Message too big
        E: Bdat 552 5.3.4
        E: NotAttempted 0 (552 5.3.4)
        C: RSET
        ",
    );
    assert_eq!(
        s.conn.bdat_chunk(3, true),
        Err(ClientError::TransactionFailed)
    );
    s.run("S: 250 2.0.0 ok\nE: TransactionDone");
    assert_eq!(s.conn.bdat_chunk(3, true), Err(ClientError::NoTransaction));
}

#[test]
fn smtp_relay_one_reply_after_the_dot() {
    let mut s = Session::after(
        Protocol::Smtp,
        "
        S: 220 relay.example.org ESMTP Postfix
        E: Greeted 220
        C: EHLO gw.example.org
        S: 250-relay.example.org
        S: 250-PIPELINING
        S: 250-SIZE 10240000
        S: 250-ENHANCEDSTATUSCODES
        S: 250-8BITMIME
        S: 250-DSN
        S: 250-SMTPUTF8
        S: 250 CHUNKING
        E: Ready
        ",
    );
    assert_eq!(s.conn.capabilities().unwrap().size, Some(Some(10_240_000)));
    s.start(&["alice@example.net", "bob@example.net", "carol@example.net"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.net>
        C: RCPT TO:<bob@example.net>
        C: RCPT TO:<carol@example.net>
        C: DATA
        S: 250 2.1.0 Ok
        E: Mail 250 2.1.0
        S: 250 2.1.5 Ok
        E: Rcpt 0: 250 2.1.5
        S: 450 4.2.0 <bob@example.net>: Recipient address rejected: Greylisted
        E: Rcpt 1: 450 4.2.0
        S: 250 2.1.5 Ok
        E: Rcpt 2: 250 2.1.5
        S: 354 End data with <CR><LF>.<CR><LF>
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run(
        "
        S: 250 2.0.0 Ok: queued as 4ZxY1b2c3d
        E: Result 0: 250 2.0.0
        E: Result 2: 250 2.0.0
        E: TransactionDone
        ",
    );
}

#[test]
fn ehlo_5xx_falls_back_to_helo() {
    let mut s = Session::new(Protocol::Smtp);
    s.run(
        "
        S: 220 old.example.org SMTP
        E: Greeted 220
        C: EHLO gw.example.org
        S: 500 5.5.1 Unknown command
        C: HELO gw.example.org
        S: 250 old.example.org
        E: Ready
        ",
    );
    assert_eq!(s.conn.capabilities(), Some(&Default::default()));
    // Without PIPELINING, one command at a time.
    s.start(&["alice@example.org"]);
    s.run("C: MAIL FROM:<sender@example.org>");
}

#[test]
fn hello_refusals() {
    // Dovecot's LMTP answers EHLO and HELO with 500: in LMTP only LHLO is tried.
    let mut s = Session::new(Protocol::Smtp);
    s.run(
        "
        S: 220 localhost Dovecot (Debian) ready.
        E: Greeted 220
        C: EHLO gw.example.org
        S: 500 5.5.1 Unknown command
        C: HELO gw.example.org
        S: 500 5.5.1 Unknown command
        E: HelloRefused 500 5.5.1
        ",
    );
    assert_eq!(s.conn.noop(), Err(ClientError::NotReady));
    s.conn.quit().unwrap();
    s.run("C: QUIT\nS: 221 2.0.0 Bye\nE: Closed");

    let mut s = Session::new(Protocol::Lmtp);
    s.run(
        "
        S: 220 x
        E: Greeted 220
        C: LHLO gw.example.org
        S: 500 5.5.1 no
        E: HelloRefused 500 5.5.1
        ",
    );
    let mut s = Session::new(Protocol::Smtp);
    s.run(
        "
        S: 220 x
        E: Greeted 220
        C: EHLO gw.example.org
        S: 421 4.3.2 busy
        E: HelloRefused 421 4.3.2
        ",
    );
}

#[test]
fn greeting_refused() {
    let mut s = Session::new(Protocol::Lmtp);
    assert_eq!(s.conn.noop(), Err(ClientError::NotReady));
    s.run("S: 554 5.3.2 Too many connections\nE: Refused 554 5.3.2");
    assert_eq!(s.conn.noop(), Err(ClientError::NotReady));
    s.conn.quit().unwrap();
    assert_eq!(s.conn.quit(), Err(ClientError::NotReady));
    s.run("C: QUIT\nS: 221 bye\nE: Closed");
    assert_eq!(s.conn.quit(), Err(ClientError::Closed));
}

#[test]
fn rset_and_noop() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.conn.rset().unwrap();
    assert_eq!(s.conn.noop(), Err(ClientError::NotReady));
    s.run("C: RSET\nS: 250 2.0.0 OK\nE: Rset 250 2.0.0");
    s.conn.noop().unwrap();
    s.run("C: NOOP\nS: 250 2.0.0 OK\nE: Noop 250 2.0.0");
}

#[test]
fn misuse_is_a_typed_error() {
    let mut s = Session::new(Protocol::Lmtp);
    let (from, params, rcpts) = envelope(&["alice@example.org"]);
    let start = |s: &mut Session| {
        s.conn
            .start_transaction(from.clone(), params.clone(), rcpts.clone())
    };
    assert_eq!(start(&mut s), Err(ClientError::NotReady));
    assert_eq!(s.conn.data_sent(), Err(ClientError::NoTransaction));
    assert_eq!(s.conn.tls_established(), Err(ClientError::OutOfSequence));
    s.run(CYRUS_HELLO);
    assert_eq!(
        s.conn
            .start_transaction(from.clone(), params.clone(), vec![]),
        Err(ClientError::NoRecipients)
    );
    assert_eq!(
        s.conn
            .start_transaction_bdat(from.clone(), params.clone(), rcpts.clone()),
        Err(ClientError::ChunkingNotOffered)
    );
    assert_eq!(s.conn.start_tls(), Err(ClientError::StartTlsNotOffered));
    assert_eq!(
        s.conn.auth_plain("", "u", "p"),
        Err(ClientError::AuthNotOffered)
    );
    assert_eq!(s.conn.bdat_chunk(1, true), Err(ClientError::NoTransaction));
    start(&mut s).unwrap();
    assert_eq!(start(&mut s), Err(ClientError::TransactionOpen));
    assert_eq!(s.conn.quit(), Err(ClientError::TransactionOpen));
    assert_eq!(s.conn.data_sent(), Err(ClientError::OutOfSequence));
    assert_eq!(s.conn.bdat_chunk(1, true), Err(ClientError::OutOfSequence));
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: DATA
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        S: 354 go ahead
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    assert_eq!(s.conn.data_sent(), Err(ClientError::OutOfSequence));
    s.conn.connection_lost();
    s.run("E: Unconfirmed 0\nE: Closed");
    assert_eq!(s.conn.data_sent(), Err(ClientError::Closed));
    assert_eq!(s.conn.noop(), Err(ClientError::Closed));
    s.conn.connection_lost();
    s.conn.handle_input(b"250 ok\r\n");
    assert!(s.events().is_empty());
}

#[test]
fn malformed_reply_after_the_dot_is_in_doubt() {
    let mut s = Session::after(Protocol::Lmtp, CYRUS_HELLO);
    s.start(&["alice@example.org", "bob@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: DATA
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        S: 250 2.1.5 ok
        E: Rcpt 1: 250 2.1.5
        S: 354 go ahead
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run(
        "
        S: 250 2.1.5 Success
        E: Result 0: 250 2.1.5
        S: Success!
        E: ProtocolError malformed reply line
        E: Unconfirmed 1
        E: Closed
        ",
    );
}

#[test]
fn a_whole_session_in_one_chunk_is_unsolicited() {
    // Replies can only answer commands already written: a reply read in the same input as
    // the reply that released its command came too early.
    let (events, _) = scripted(Protocol::Lmtp, &[&CYRUS_ROUNDS.concat()]);
    assert_eq!(events, ["Greeted 220", "Unexpected 250", "Closed"]);
}

#[test]
fn unsolicited_reply_closes_the_connection() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.run("S: 421 4.3.2 Shutting down\nE: Unexpected 421 4.3.2\nE: Closed");
    // A reply to a command not yet written counts as unsolicited too.
    let mut s = Session::new(Protocol::Lmtp);
    s.conn.handle_input(b"220 ready\r\n250 too early\r\n");
    s.run("E: Greeted 220\nE: Unexpected 250\nE: Closed");
}

#[test]
fn dot_after_354_with_no_recipient() {
    // A server that says 354 although every RCPT was refused gets an empty message.
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["x@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<x@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 550 5.1.1 unknown
        E: Rcpt 0: 550 5.1.1
        S: 354 OK
        C: .
        S: 503 5.5.1 No valid recipients
        C: RSET
        S: 250 2.0.0 OK
        E: TransactionDone
        ",
    );
}

/// A whole session driven by a scripted delivery agent, fed in the given chunks.
fn scripted(protocol: Protocol, chunks: &[&[u8]]) -> (Vec<String>, Vec<u8>) {
    let mut conn = ClientConnection::new(protocol, "gw.example.org".to_owned());
    let (mut events, mut out, mut started) = (Vec::new(), Vec::new(), false);
    for chunk in chunks {
        conn.handle_input(chunk);
        while let Some(e) = conn.poll_event() {
            match e {
                ClientEvent::Ready(_) if !started => {
                    started = true;
                    let (from, params, rcpts) = envelope(&[
                        "alice@example.org",
                        "nosuchuser@example.org",
                        "bob@example.org",
                    ]);
                    conn.start_transaction(from, params, rcpts).unwrap();
                }
                ClientEvent::DataGoAhead => conn.data_sent().unwrap(),
                _ => {}
            }
            events.push(render(&e));
        }
        conn.poll_transmit(&mut out);
    }
    (events, out)
}

/// What Cyrus sends, one round per client flush: greeting; LHLO reply; the replies to the
/// pipelined MAIL, RCPTs and DATA; the replies after the dot. A round can only follow the
/// client's previous write, so chunks never span two rounds.
const CYRUS_ROUNDS: &[&[u8]] = &[
    b"220 localhost Cyrus LMTP 3.6.1-Debian-3.6.1-4+deb12u5 server ready\r\n",
    b"250-localhost\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n250-SIZE\r\n\
250-AUTH EXTERNAL\r\n250-IGNOREQUOTA\r\n250 Ok SESSIONID=<cyrus-1>\r\n",
    b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n\
550-Mailbox unknown.  Either there is no mailbox associated with this\r\n\
550-name or you do not have authorization to see it.\r\n550 5.1.1 User unknown\r\n\
250 2.1.5 ok\r\n354 go ahead\r\n",
    b"250 2.1.5 Success SESSIONID=<cyrus-2>\r\n451 4.2.0 Mailbox busy\r\n",
];

/// Splits each round at the given cut points (taken modulo the round's length).
fn cut_rounds<'a>(rounds: &[&'a [u8]], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    for round in rounds {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % round.len()).collect();
        at.push(0);
        at.push(round.len());
        at.sort_unstable();
        at.dedup();
        chunks.extend(at.windows(2).map(|w| &round[w[0]..w[1]]));
    }
    chunks
}

proptest! {
    #[test]
    fn any_chunking_gives_the_same_events(cuts in proptest::collection::vec(any::<usize>(), 0..12))
    {
        let lines: Vec<&[u8]> =
            CYRUS_ROUNDS.iter().flat_map(|r| r.split_inclusive(|&b| b == b'\n')).collect();
        let (want_events, want_out) = scripted(Protocol::Lmtp, &lines);
        prop_assert_eq!(want_events.len(), 10);
        let (events, out) = scripted(Protocol::Lmtp, &cut_rounds(CYRUS_ROUNDS, &cuts));
        prop_assert_eq!(events, want_events);
        prop_assert_eq!(out, want_out);
    }

    #[test]
    fn fuzz_entry_survives_random_bytes(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzz::client_replies(&input);
    }

    #[test]
    fn fuzz_entry_survives_reply_soup(
        seed in any::<u8>(),
        picks in proptest::collection::vec(0..REPLY_SOUP.len(), 0..30),
    ) {
        let mut input = vec![seed];
        for i in picks {
            input.extend_from_slice(REPLY_SOUP[i].as_bytes());
        }
        fuzz::client_replies(&input);
    }
}

/// Real reply lines (and a few bad ones) for the fuzz entry point to choke on.
const REPLY_SOUP: &[&str] = &[
    "220 localhost Dovecot (Debian) ready.\r\n",
    "250-localhost\r\n",
    "250-CHUNKING\r\n",
    "250-STARTTLS\r\n",
    "250-AUTH PLAIN\r\n",
    "250 PIPELINING\r\n",
    "250 2.1.0 OK\r\n",
    "250 2.1.5 OK\r\n",
    "550-Mailbox unknown.\r\n",
    "550 5.1.1 User unknown\r\n",
    "354 OK\r\n",
    "250 2.0.0 <alice@example.org> Saved\r\n",
    "451 4.3.0 Temporary failure\r\n",
    "552 5.2.2 Quota exceeded\r\n",
    "503 5.5.0 No valid recipients\r\n",
    "430 Authentication required\r\n",
    "235 Authenticated!\r\n",
    "334 \r\n",
    "220 2.0.0 Ready to start TLS\r\n",
    "421 4.3.2 Shutting down\r\n",
    "garbage\r\n",
    "250",
];

#[test]
fn fuzz_entry_replays_a_full_session() {
    // Reaches the end of a transaction without tripping its own assertions.
    let mut input = vec![0u8];
    input.extend(CYRUS_ROUNDS.concat());
    input.extend_from_slice(b"250 2.1.5 Success\r\n");
    fuzz::client_replies(&input);
}

#[test]
fn verify_asks_mail_rcpt_rset_and_sends_no_content() {
    let mut s = Session::after(Protocol::Lmtp, CYRUS_HELLO);
    let to = ForwardPath::Mailbox(Mailbox::parse("nosuchuser@example.org").unwrap());
    s.conn.verify(ReversePath::Null, to.clone()).unwrap();
    assert_eq!(s.conn.noop(), Err(ClientError::NotReady));
    s.run(
        "
        C: MAIL FROM:<>
        C: RCPT TO:<nosuchuser@example.org>
        C: RSET
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        S: 550 5.1.1 User unknown
        E: Rcpt 0: 550 5.1.1
        S: 250 2.0.0 ok
        E: Rset 250 2.0.0
        ",
    );
    assert!(s.conn.is_idle());
    // Without PIPELINING: one command at a time, the same three.
    let mut s = Session::after(Protocol::Lmtp, PLAIN_HELLO);
    s.conn.verify(ReversePath::Null, to).unwrap();
    s.run(
        "
        C: MAIL FROM:<>
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        C: RCPT TO:<nosuchuser@example.org>
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        C: RSET
        S: 250 2.0.0 ok
        E: Rset 250 2.0.0
        ",
    );
    assert!(s.conn.is_idle());
}
