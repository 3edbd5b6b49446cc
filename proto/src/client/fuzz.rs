//! Fuzzing entry point for the client state machine (not part of the API).
//!
//! [`client_replies`] plays a delivery agent against arbitrary server output and checks the
//! in-doubt promise: no recipient is ever settled twice, a finished transaction has settled
//! every recipient, and after the connection is lost every recipient is settled exactly once.

use super::{ClientConnection, ClientEvent, Protocol};
use crate::address::{ForwardPath, Mailbox, ReversePath};
use crate::params::{MailParams, RcptParams};

const RECIPIENTS: usize = 3;

/// Drives an LMTP [`ClientConnection`] with `input` as the server's output, fed in chunks of
/// varying size (the first byte seeds the sizes and picks BDAT, STARTTLS and AUTH when the
/// server offers them). A 3-recipient transaction starts at the first `Ready`. Panics only
/// if the machine breaks its promises.
pub fn client_replies(input: &[u8]) {
    let Some((&seed, mut rest)) = input.split_first() else {
        return;
    };
    let mut agent = Agent::new(seed);
    let mut step = usize::from(seed >> 4) + 1;
    while !rest.is_empty() {
        // A chunk never spans a line end: the agent reacts between replies, as it would
        // between reads (a reply in the same read as the one before it could not answer a
        // command written in between, and would end the run early as unsolicited).
        let line_end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        let (chunk, tail) = rest.split_at(step.min(line_end));
        agent.conn.handle_input(chunk);
        agent.drive();
        rest = tail;
        step = (step * 7 + usize::from(chunk[0])) % 23 + 1;
    }
    agent.conn.connection_lost();
    agent.drive();
    assert!(agent.conn.is_closed());
    if agent.started {
        assert!(
            agent.settled.iter().all(|&n| n == 1),
            "unsettled after loss: {:?}",
            agent.settled
        );
    }
}

struct Agent {
    conn: ClientConnection,
    seed: u8,
    started: bool,
    tls_tried: bool,
    auth_tried: bool,
    mail_ok: bool,
    settled: [u8; RECIPIENTS],
    transmitted: Vec<u8>,
}

impl Agent {
    fn new(seed: u8) -> Self {
        Self {
            conn: ClientConnection::new(Protocol::Lmtp, "fuzz.example".to_owned()),
            seed,
            started: false,
            tls_tried: false,
            auth_tried: false,
            mail_ok: false,
            settled: [0; RECIPIENTS],
            transmitted: Vec::new(),
        }
    }

    fn drive(&mut self) {
        loop {
            self.transmitted.clear();
            self.conn.poll_transmit(&mut self.transmitted);
            let Some(event) = self.conn.poll_event() else {
                return;
            };
            self.on_event(event);
        }
    }

    fn on_event(&mut self, event: ClientEvent) {
        match event {
            ClientEvent::Ready(caps) => {
                if caps.starttls && self.seed & 2 != 0 && !self.tls_tried {
                    self.tls_tried = true;
                    assert!(self.conn.start_tls().is_ok());
                } else if caps.supports_auth("PLAIN") && self.seed & 4 != 0 && !self.auth_tried {
                    self.auth_tried = true;
                    assert!(self.conn.auth_plain("", "fuzz", "fuzz").is_ok());
                } else if !self.started {
                    self.start(caps.chunking && self.seed & 1 != 0);
                }
            }
            ClientEvent::TlsGoAhead { .. } => assert!(self.conn.tls_established().is_ok()),
            ClientEvent::Authenticated | ClientEvent::AuthFailed(_) if !self.started => {
                self.start(false);
            }
            ClientEvent::DataGoAhead => assert!(self.conn.data_sent().is_ok()),
            ClientEvent::MailReply(reply) => self.mail_ok = reply.is_positive(),
            ClientEvent::RcptReply { index, reply } => {
                if self.mail_ok && !reply.is_positive() {
                    self.settle(index);
                }
                // The caller's side of BDAT: the whole body in one LAST chunk once allowed.
                let _ = self.conn.bdat_chunk(10, true);
            }
            ClientEvent::RecipientResult { index, .. }
            | ClientEvent::Unconfirmed { index }
            | ClientEvent::NotAttempted { index, .. } => self.settle(index),
            ClientEvent::TransactionDone => {
                assert!(
                    self.settled.iter().all(|&n| n == 1),
                    "done: {:?}",
                    self.settled
                );
            }
            _ => {}
        }
    }

    fn start(&mut self, bdat: bool) {
        let (Ok(from), Ok(a), Ok(b), Ok(c)) = (
            Mailbox::parse("sender@example.org"),
            Mailbox::parse("alice@example.org"),
            Mailbox::parse("bob@example.org"),
            Mailbox::parse("carol@example.org"),
        ) else {
            return;
        };
        let from = ReversePath::Mailbox(from);
        let recipients = [a, b, c]
            .into_iter()
            .map(|m| (ForwardPath::Mailbox(m), RcptParams::default()))
            .collect();
        let result = if bdat {
            self.conn
                .start_transaction_bdat(from, MailParams::default(), recipients)
        } else {
            self.conn
                .start_transaction(from, MailParams::default(), recipients)
        };
        assert!(result.is_ok(), "{result:?}");
        self.started = true;
        if bdat {
            let _ = self.conn.bdat_chunk(10, true);
        }
    }

    fn settle(&mut self, index: usize) {
        assert!(index < RECIPIENTS, "recipient index {index}");
        self.settled[index] += 1;
        assert_eq!(self.settled[index], 1, "recipient {index} settled twice");
        assert!(self.settled.iter().map(|&n| usize::from(n)).sum::<usize>() <= RECIPIENTS);
    }
}
