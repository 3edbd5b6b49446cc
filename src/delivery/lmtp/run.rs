//! One transaction's bookkeeping ([`Run`]): which recipients are settled, the outcome
//! each gets from its reply (through the store's policy), and the widest trouble seen.

use std::time::SystemTime;

use postern_proto::client::ClientEvent;

use crate::delivery::message::{Recipient, Report};
use crate::delivery::trouble::{self, Outcome, Phase, Policy, Trouble, When};

/// One transaction's bookkeeping: which recipients are settled, and the trouble seen.
pub(super) struct Run<'a, F: FnMut(usize, &Outcome)> {
    /// Transaction position → the caller's index.
    pub(super) indices: Vec<usize>,
    pub(super) settled: Vec<bool>,
    pub(super) outcomes: Vec<(usize, Outcome)>,
    pub(super) on_outcome: &'a mut F,
    pub(super) policy: &'a Policy,
    pub(super) arrived: SystemTime,
    pub(super) trouble: Option<Trouble>,
    /// Replaces "not attempted, connection lost" when the agent ended the connection itself.
    pub(super) abort: Option<Outcome>,
    pub(super) mail_failed: bool,
    pub(super) go_ahead: bool,
    pub(super) end_sent: bool,
    pub(super) done: bool,
    pub(super) closed: bool,
}

impl<'a, F: FnMut(usize, &Outcome)> Run<'a, F> {
    pub(super) fn new(
        recipients: &[Recipient],
        on_outcome: &'a mut F,
        policy: &'a Policy,
        arrived: SystemTime,
    ) -> Self {
        Self {
            indices: recipients.iter().map(|r| r.index).collect(),
            settled: vec![false; recipients.len()],
            outcomes: Vec::with_capacity(recipients.len()),
            on_outcome,
            policy,
            arrived,
            trouble: None,
            abort: None,
            mail_failed: false,
            go_ahead: false,
            end_sent: false,
            done: false,
            closed: false,
        }
    }

    pub(super) fn when(&self) -> When {
        When {
            now: SystemTime::now(),
            arrived: self.arrived,
        }
    }

    pub(super) fn widen(&mut self, trouble: Trouble) {
        self.trouble = Trouble::widen(self.trouble.take(), trouble);
    }

    pub(super) fn settle(&mut self, position: usize, outcome: Outcome) {
        let (Some(settled), Some(&index)) =
            (self.settled.get_mut(position), self.indices.get(position))
        else {
            return;
        };
        if *settled {
            return;
        }
        *settled = true;
        (self.on_outcome)(index, &outcome);
        self.outcomes.push((index, outcome));
    }

    pub(super) fn settle_rest(&mut self, outcome: &Outcome) {
        for position in 0..self.settled.len() {
            self.settle(position, outcome.clone());
        }
    }

    /// Some recipient is not settled yet (and MAIL did not already fail them all).
    pub(super) fn open(&self) -> bool {
        !self.mail_failed && self.settled.contains(&false)
    }

    pub(super) fn event(&mut self, event: ClientEvent) {
        match event {
            ClientEvent::MailReply(reply) if !reply.is_positive() => {
                self.mail_failed = true;
                self.widen(trouble::refused(Phase::MailRcpt, &reply));
            }
            // While MAIL had failed a refusal is informative; NotAttempted settles it.
            ClientEvent::RcptReply { index, reply }
                if !reply.is_positive() && !self.mail_failed =>
            {
                let outcome = self.policy.recipient(reply, self.when());
                self.settle(index, outcome);
            }
            ClientEvent::DataGoAhead => self.go_ahead = true,
            // A refusal after every recipient was refused at RCPT (503 "no valid
            // recipients") fails nobody: it is no trouble of the message.
            ClientEvent::DataRefused(reply) if self.open() => {
                self.widen(trouble::refused(Phase::MailRcpt, &reply));
            }
            ClientEvent::BdatReply(reply) if !reply.is_positive() && self.open() => {
                self.widen(trouble::refused(Phase::Data, &reply));
            }
            ClientEvent::RecipientResult { index, reply } => {
                let outcome = self.policy.recipient(reply, self.when());
                self.settle(index, outcome);
            }
            ClientEvent::Unconfirmed { index } => self.settle(index, Outcome::InDoubt),
            ClientEvent::NotAttempted { index, reason } => {
                let outcome = match (&reason, &self.abort) {
                    (None, Some(abort)) => abort.clone(),
                    _ => self.policy.not_attempted(reason, self.when()),
                };
                self.settle(index, outcome);
            }
            ClientEvent::TransactionDone => self.done = true,
            ClientEvent::UnexpectedReply(reply) => self.widen(trouble::unexpected(&reply)),
            ClientEvent::ProtocolError(e) => self.widen(trouble::protocol_error(&e)),
            ClientEvent::Closed => self.closed = true,
            _ => {}
        }
    }

    pub(super) fn finish(mut self) -> Report {
        // The state machine settles every recipient; this only guards the report's promise.
        if self.settled.iter().any(|s| !s) {
            self.settle_rest(&Outcome::NotAttempted(None));
        }
        Report {
            outcomes: self.outcomes,
            trouble: self.trouble,
            ..Report::default()
        }
    }
}
