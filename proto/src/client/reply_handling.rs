//! What each reply from the server does to a [`ClientConnection`]: the greeting and the
//! hello replies, a transaction's replies in order (MAIL, RCPT, DATA or BDAT, one per
//! recipient after the end of data with LMTP), the end of a transaction, and a connection
//! lost or closed. Replies are matched to the commands sent, oldest first.

use super::transaction::EndOfData;
use super::{Capabilities, ClientConnection, ClientEvent, Expect, Hello, Phase};
use crate::reply::{Reply, Severity};

impl ClientConnection {
    pub(super) fn handle_reply(&mut self, reply: Reply) {
        let Some(expect) = self.expects.pop_front() else {
            self.events.push_back(ClientEvent::UnexpectedReply(reply));
            self.lose();
            return;
        };
        match expect {
            Expect::Greeting if reply.code().get() == 220 => {
                self.events.push_back(ClientEvent::Greeted(reply));
                self.phase = Phase::Hello;
                self.send_hello(self.first_hello());
            }
            Expect::Greeting => {
                self.phase = Phase::Refused;
                self.events.push_back(ClientEvent::Refused(reply));
            }
            Expect::Hello(hello) => self.on_hello(hello, reply),
            Expect::StartTls if reply.code().get() == 220 => {
                self.phase = Phase::TlsHandshake;
                let discarded = self.parser.take_buffered().len();
                self.events.push_back(ClientEvent::TlsGoAhead { discarded });
            }
            Expect::StartTls => self.events.push_back(ClientEvent::TlsRefused(reply)),
            Expect::Auth if reply.is_positive() => {
                self.events.push_back(ClientEvent::Authenticated)
            }
            Expect::Auth if reply.severity() == Severity::PositiveIntermediate => {
                self.push("*\r\n".to_owned(), Expect::AuthCancel);
            }
            Expect::Auth | Expect::AuthCancel => {
                self.events.push_back(ClientEvent::AuthFailed(reply));
            }
            Expect::Mail
            | Expect::Rcpt(_)
            | Expect::Data
            | Expect::Bdat
            | Expect::BdatLast
            | Expect::EndOfData => self.on_transaction_reply(expect, reply),
            Expect::VerifyMail => self.events.push_back(ClientEvent::MailReply(reply)),
            Expect::VerifyRcpt => {
                let index = 0;
                self.events
                    .push_back(ClientEvent::RcptReply { index, reply });
            }
            Expect::Rset { auto: true } => self.end_transaction(),
            Expect::Rset { auto: false } => self.events.push_back(ClientEvent::RsetReply(reply)),
            Expect::Noop => self.events.push_back(ClientEvent::NoopReply(reply)),
            Expect::Quit => self.close(),
        }
        self.check_transaction();
    }

    pub(super) fn on_hello(&mut self, hello: Hello, reply: Reply) {
        if reply.is_positive() {
            let caps = match hello {
                Hello::Helo => Capabilities::default(),
                Hello::Lhlo | Hello::Ehlo => Capabilities::from_reply(&reply),
            };
            self.phase = Phase::Ready;
            self.caps = Some(caps.clone());
            self.events.push_back(ClientEvent::Ready(caps));
        } else if hello == Hello::Ehlo && reply.is_permanent() {
            self.send_hello(Hello::Helo);
        } else {
            self.phase = Phase::Refused;
            self.events.push_back(ClientEvent::HelloRefused(reply));
        }
    }

    pub(super) fn on_transaction_reply(&mut self, expect: Expect, reply: Reply) {
        let Some(txn) = self.txn.as_mut() else {
            return;
        };
        let events = &mut self.events;
        match expect {
            Expect::Mail => txn.on_mail(reply, events),
            Expect::Rcpt(index) => txn.on_rcpt(index, reply, events),
            Expect::Data => {
                if txn.on_data(reply, events) {
                    self.push(".\r\n".to_owned(), Expect::EndOfData);
                }
            }
            Expect::Bdat => txn.on_bdat(reply, events),
            _ => {
                let bdat = expect == Expect::BdatLast;
                match txn.on_end_of_data(self.protocol, bdat, reply, events) {
                    EndOfData::MoreReplies => self.expects.push_front(expect),
                    // The server ends its transaction after the end of data, whatever it
                    // replied.
                    EndOfData::Complete => self.end_transaction(),
                    EndOfData::NoRecipient => {}
                }
            }
        }
    }

    /// Ends a transaction that can no longer reach the end of data, once no reply for it is
    /// awaited: withdraws its held-back commands, settles the recipients not yet settled as
    /// not attempted, and resets the server with RSET if MAIL had been accepted.
    pub(super) fn check_transaction(&mut self) {
        let Some(txn) = self.txn.as_mut() else {
            return;
        };
        if txn.closing || !txn.doomed() {
            return;
        }
        let before = self.queue.len();
        let mut rcpts = 0;
        self.queue.retain(|c| match c.expect {
            Expect::Rcpt(_) => {
                rcpts += 1;
                false
            }
            Expect::Data => false,
            _ => true,
        });
        txn.withdraw(rcpts, before - self.queue.len());
        if txn.outstanding > 0 {
            return;
        }
        txn.settle_failed(&mut self.events);
        if txn.mail_ok {
            txn.closing = true;
            self.push("RSET\r\n".to_owned(), Expect::Rset { auto: true });
        } else {
            self.end_transaction();
        }
    }

    pub(super) fn end_transaction(&mut self) {
        self.txn = None;
        self.events.push_back(ClientEvent::TransactionDone);
    }

    /// The connection is gone (or unusable): settle the transaction, report Closed.
    pub(super) fn lose(&mut self) {
        if self.phase == Phase::Closed {
            return;
        }
        if let Some(txn) = self.txn.take() {
            txn.settle_lost(&mut self.events);
        }
        self.close();
    }

    pub(super) fn close(&mut self) {
        self.phase = Phase::Closed;
        self.txn = None;
        self.queue.clear();
        self.expects.clear();
        self.out.clear();
        self.parser.take_buffered();
        self.events.push_back(ClientEvent::Closed);
    }
}
