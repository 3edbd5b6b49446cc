//! Dialogue replay for the client state machine's tests: the greetings observed on real
//! stores (Cyrus 3.6 and Dovecot 2.3 LMTP, see shared/backends/transcripts) and a
//! [`Session`] that replays a dialogue against a `ClientConnection`.
//!
//! Dialogue lines: `S:` is fed as server output (with CRLF, one line at a time); `C:` is what
//! the client must have written; `E:` is an event that must have been reported. Output and
//! events are checked before every `S:` line and at the end, so an `E:` line placed after an
//! `S:` line asserts that the event came as soon as that line was fed.

#![allow(dead_code, reason = "each test file uses its own part of the helpers")]

use postern_proto::address::{ForwardPath, Mailbox, ReversePath};
use postern_proto::client::{ClientConnection, ClientEvent, Protocol};
use postern_proto::params::{MailParams, RcptParams};
use postern_proto::reply::Reply;

pub(crate) const CYRUS_HELLO: &str = "
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

pub(crate) const DOVECOT_HELLO: &str = "
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
pub(crate) const PLAIN_HELLO: &str = "
S: 220 store ready
E: Greeted 220
C: LHLO gw.example.org
S: 250-store
S: 250-8BITMIME
S: 250 CHUNKING
E: Ready
";

pub(crate) struct Session {
    pub(crate) conn: ClientConnection,
}

impl Session {
    pub(crate) fn new(protocol: Protocol) -> Self {
        Self {
            conn: ClientConnection::new(protocol, "gw.example.org".to_owned()),
        }
    }

    /// A session that has replayed `hello`.
    pub(crate) fn after(protocol: Protocol, hello: &str) -> Self {
        let mut s = Self::new(protocol);
        s.run(hello);
        s
    }

    /// Replays a dialogue (see the file header); returns every event reported.
    pub(crate) fn run(&mut self, dialogue: &str) -> Vec<ClientEvent> {
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

    pub(crate) fn events(&mut self) -> Vec<ClientEvent> {
        std::iter::from_fn(|| self.conn.poll_event()).collect()
    }

    pub(crate) fn start(&mut self, recipients: &[&str]) {
        let (from, params, rcpts) = envelope(recipients);
        self.conn.start_transaction(from, params, rcpts).unwrap();
    }
}

pub(crate) fn envelope(
    recipients: &[&str],
) -> (ReversePath, MailParams, Vec<(ForwardPath, RcptParams)>) {
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

pub(crate) fn code(r: &Reply) -> String {
    match r.enhanced() {
        Some(e) => format!("{} {e}", r.code()),
        None => r.code().to_string(),
    }
}

/// One line per event, as written in `E:` lines: replies shown as code and enhanced code.
pub(crate) fn render(e: &ClientEvent) -> String {
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
