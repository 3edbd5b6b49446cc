//! One mail transaction's recipients, and the one event that settles each of them.
//!
//! A recipient is settled exactly once: refused at RCPT (while MAIL was accepted), by its
//! reply after the end of data, as not attempted (the transaction failed, or the connection
//! ended before the end of data was sent), or as unconfirmed (the connection ended after the
//! end of data was sent and before its reply: RFC 2033 §5). [`Transaction`] holds where each
//! recipient stands and turns the transaction's replies into those events; the connection
//! owns the FIFO that routes the replies here.

use std::collections::VecDeque;

use super::{ClientEvent, Protocol};
use crate::reply::{Reply, Severity};

/// How the body is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BodyMode {
    Data,
    Bdat,
}

/// Where one recipient stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rcpt {
    /// Not settled, not accepted: RCPT unanswered, or answered while MAIL had failed.
    Waiting,
    /// 2yz to RCPT while MAIL was accepted: owed a reply after the end of data.
    Accepted,
    /// Its one settling event has been reported.
    Settled,
}

/// What a reply after the end of data left to do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum EndOfData {
    /// More recipients are owed a reply (LMTP): keep the expectation at the front.
    MoreReplies,
    /// Every accepted recipient has its result: the server has ended the transaction.
    Complete,
    /// The one reply of a failed transaction, or of one without accepted recipients.
    NoRecipient,
}

/// The open transaction.
#[derive(Debug)]
pub(super) struct Transaction {
    pub(super) mode: BodyMode,
    rcpts: Vec<Rcpt>,
    /// RCPT commands not yet answered (or withdrawn).
    unanswered: usize,
    /// MAIL was answered 2yz: the server has a transaction open, RSET closes it on failure.
    pub(super) mail_ok: bool,
    /// The first MAIL, DATA or BDAT refusal: the transaction cannot deliver.
    failure: Option<Reply>,
    /// 354 received: the caller is writing the body.
    pub(super) go_ahead: bool,
    /// The final dot or BDAT LAST was written: from here a lost reply is in doubt.
    pub(super) end_sent: bool,
    /// Commands of this transaction queued or written whose reply has not arrived.
    pub(super) outstanding: usize,
    /// Settled and reset by an automatic RSET, waiting for its reply.
    pub(super) closing: bool,
}

impl Transaction {
    /// A transaction whose MAIL, RCPTs (and DATA) have been queued: `outstanding` replies.
    pub(super) fn new(mode: BodyMode, recipients: usize, outstanding: usize) -> Self {
        Self {
            mode,
            rcpts: vec![Rcpt::Waiting; recipients],
            unanswered: recipients,
            mail_ok: false,
            failure: None,
            go_ahead: false,
            end_sent: false,
            outstanding,
            closing: false,
        }
    }

    /// The end of data will deliver nothing: a refusal, or every RCPT answered and none
    /// accepted.
    pub(super) fn doomed(&self) -> bool {
        self.failure.is_some()
            || (self.mail_ok && self.unanswered == 0 && !self.rcpts.contains(&Rcpt::Accepted))
    }

    /// Commands taken back before they were written: `rcpts` RCPTs out of `total`.
    pub(super) fn withdraw(&mut self, rcpts: usize, total: usize) {
        self.unanswered -= rcpts;
        self.outstanding -= total;
    }

    pub(super) fn on_mail(&mut self, reply: Reply, events: &mut VecDeque<ClientEvent>) {
        self.outstanding -= 1;
        if reply.is_positive() {
            self.mail_ok = true;
        } else {
            self.failure = Some(reply.clone());
        }
        events.push_back(ClientEvent::MailReply(reply));
    }

    pub(super) fn on_rcpt(
        &mut self,
        index: usize,
        reply: Reply,
        events: &mut VecDeque<ClientEvent>,
    ) {
        self.outstanding -= 1;
        self.unanswered -= 1;
        if let Some(state) = self.rcpts.get_mut(index).filter(|_| self.mail_ok) {
            *state = if reply.is_positive() {
                Rcpt::Accepted
            } else {
                Rcpt::Settled
            };
        }
        events.push_back(ClientEvent::RcptReply { index, reply });
    }

    /// Returns true when the connection must end an empty message with `.` itself: a 354
    /// although nobody can receive the message (RFC 2920 §3.1).
    pub(super) fn on_data(&mut self, reply: Reply, events: &mut VecDeque<ClientEvent>) -> bool {
        self.outstanding -= 1;
        if reply.severity() != Severity::PositiveIntermediate {
            if self.failure.is_none() {
                self.failure = Some(reply.clone());
            }
            events.push_back(ClientEvent::DataRefused(reply));
            false
        } else if self.failure.is_none() && self.rcpts.contains(&Rcpt::Accepted) {
            self.go_ahead = true;
            events.push_back(ClientEvent::DataGoAhead);
            false
        } else {
            self.end_sent = true;
            self.outstanding += 1;
            true
        }
    }

    pub(super) fn on_bdat(&mut self, reply: Reply, events: &mut VecDeque<ClientEvent>) {
        self.outstanding -= 1;
        if !reply.is_positive() && self.failure.is_none() {
            self.failure = Some(reply.clone());
        }
        events.push_back(ClientEvent::BdatReply(reply));
    }

    /// A reply after the final dot or BDAT LAST. Which recipient it is for is decided now,
    /// when every RCPT reply has been seen. LMTP: the first accepted recipient without a
    /// result (RFC 2033 §4.2); SMTP: every accepted recipient.
    pub(super) fn on_end_of_data(
        &mut self,
        protocol: Protocol,
        bdat: bool,
        reply: Reply,
        events: &mut VecDeque<ClientEvent>,
    ) -> EndOfData {
        let next = match self.failure {
            None => self.rcpts.iter().position(|r| *r == Rcpt::Accepted),
            Some(_) => None,
        };
        let Some(index) = next else {
            self.outstanding -= 1;
            if bdat {
                events.push_back(ClientEvent::BdatReply(reply));
            }
            return EndOfData::NoRecipient;
        };
        match protocol {
            Protocol::Lmtp => {
                self.rcpts[index] = Rcpt::Settled;
                events.push_back(ClientEvent::RecipientResult { index, reply });
                if self.rcpts[index..].contains(&Rcpt::Accepted) {
                    return EndOfData::MoreReplies;
                }
            }
            Protocol::Smtp => {
                for (index, state) in self.rcpts.iter_mut().enumerate() {
                    if *state == Rcpt::Accepted {
                        *state = Rcpt::Settled;
                        let reply = reply.clone();
                        events.push_back(ClientEvent::RecipientResult { index, reply });
                    }
                }
            }
        }
        self.outstanding -= 1;
        EndOfData::Complete
    }

    /// The transaction failed and no reply for it is awaited: every recipient not settled
    /// was not attempted, for the reason that failed the transaction.
    pub(super) fn settle_failed(&mut self, events: &mut VecDeque<ClientEvent>) {
        for (index, state) in self.rcpts.iter_mut().enumerate() {
            if *state != Rcpt::Settled {
                *state = Rcpt::Settled;
                let reason = self.failure.clone();
                events.push_back(ClientEvent::NotAttempted { index, reason });
            }
        }
    }

    /// The connection is gone: after the end of data was sent (and nothing had failed the
    /// transaction) the recipients still owed a reply are in doubt; before, not attempted.
    pub(super) fn settle_lost(self, events: &mut VecDeque<ClientEvent>) {
        let in_doubt = self.end_sent && self.failure.is_none();
        for (index, state) in self.rcpts.into_iter().enumerate() {
            match state {
                Rcpt::Settled => {}
                Rcpt::Waiting | Rcpt::Accepted if in_doubt => {
                    events.push_back(ClientEvent::Unconfirmed { index });
                }
                Rcpt::Waiting | Rcpt::Accepted => {
                    let reason = self.failure.clone();
                    events.push_back(ClientEvent::NotAttempted { index, reason });
                }
            }
        }
    }
}
