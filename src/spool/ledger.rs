//! The per-recipient ledger: each recipient's delivery state and the transitions allowed.
//!
//! ```text
//!             ┌──────────── requeue (operator) ─────────────┐
//!             ▼                                             │
//!  Pending ──mark_in_doubt──▶ InDoubt ──reply──▶ Delivered  │  (final)
//!     │                        │  ▲   └─reply──▶ Bounced    │  (final)
//!     │ RCPT refused           │  │   └─reply──▶ Deferred ──┘
//!     └──▶ Deferred / Bounced  │  └──mark_in_doubt── Deferred
//!                              └─ crash or lost connection: stays InDoubt
//! ```
//!
//! A recipient is marked *in doubt* (durably) before the final dot of a delivery is sent.
//! A reply moves it to Delivered, Deferred or Bounced, one durable ledger record per reply
//! as it arrives. If the gateway crashes or the connection is lost before the reply, the
//! recipient stays in doubt: recovery reports it as in doubt, never as pending, and the
//! scheduler retries it alone in its own transaction (a duplicate is possible only for
//! such a recipient). `Delivered` is reachable only from `InDoubt`, so no recipient can be
//! delivered without first having been marked; the final states accept no transition.
//! A final state can be marked *reported* (the Ledger record's flag, written again with the
//! same state) once the DSN it owes is queued.

use std::time::SystemTime;

use super::micros::{from_micros, to_micros};

/// One recipient's state in the spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecipientState {
    /// Not yet attempted (or requeued by the operator).
    Pending,
    /// A delivery's final dot may have been sent; its reply was not recorded.
    InDoubt,
    /// The store accepted it; `reply` is the store's reply as logged (`250 2.0.0 …`).
    Delivered {
        /// The reply, in its one-line log form.
        reply: String,
    },
    /// Temporary failure: try again at `until`.
    Deferred {
        /// Next attempt.
        until: SystemTime,
        /// The last reply (or a local reason), one-line log form.
        reply: String,
    },
    /// Permanent failure: a DSN is owed (unless NOTIFY says otherwise).
    Bounced {
        /// The reply, one-line log form.
        reply: String,
    },
}

/// A transition the ledger refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("recipient cannot go from {from} to {to}")]
pub struct InvalidTransition {
    /// The current state's name.
    pub from: &'static str,
    /// The requested state's name.
    pub to: &'static str,
}

impl RecipientState {
    /// The state's name for logs and tools.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InDoubt => "in-doubt",
            Self::Delivered { .. } => "delivered",
            Self::Deferred { .. } => "deferred",
            Self::Bounced { .. } => "bounced",
        }
    }

    /// Delivered or bounced: nothing more will happen to this recipient.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Delivered { .. } | Self::Bounced { .. })
    }

    /// The last reply recorded, if the state has one.
    pub fn reply(&self) -> Option<&str> {
        match self {
            Self::Pending | Self::InDoubt => None,
            Self::Delivered { reply } | Self::Deferred { reply, .. } | Self::Bounced { reply } => {
                Some(reply)
            }
        }
    }

    /// Checks that `self → next` is allowed (see the module diagram).
    pub fn check_transition(&self, next: &Self) -> Result<(), InvalidTransition> {
        let ok = match (self, next) {
            (Self::Delivered { .. } | Self::Bounced { .. }, _) => false,
            (_, Self::Delivered { .. }) => matches!(self, Self::InDoubt),
            (Self::Pending | Self::InDoubt, Self::Pending) => false,
            _ => true,
        };
        if ok {
            Ok(())
        } else {
            Err(InvalidTransition {
                from: self.name(),
                to: next.name(),
            })
        }
    }

    /// `(tag, until µs, reply)` as stored in a Ledger record.
    pub(crate) fn parts(&self) -> (u8, u64, &str) {
        match self {
            Self::Pending => (0, 0, ""),
            Self::InDoubt => (1, 0, ""),
            Self::Delivered { reply } => (2, 0, reply),
            Self::Deferred { until, reply } => (3, to_micros(*until), reply),
            Self::Bounced { reply } => (4, 0, reply),
        }
    }

    /// The inverse of [`Self::parts`].
    pub(crate) fn from_parts(tag: u8, until: u64, reply: String) -> Option<Self> {
        Some(match tag {
            0 => Self::Pending,
            1 => Self::InDoubt,
            2 => Self::Delivered { reply },
            3 => Self::Deferred {
                until: from_micros(until),
                reply,
            },
            4 => Self::Bounced { reply },
            _ => return None,
        })
    }
}

/// A recipient's state as the index keeps it: the tag and next attempt, without the reply
/// text (which stays on disk in the ledger record and is read when a tool asks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CompactState {
    pub(crate) tag: u8,
    pub(crate) until: u64,
    /// A final state whose DSN (if it owes one) is queued.
    pub(crate) reported: bool,
}

impl CompactState {
    pub(crate) const PENDING: Self = Self {
        tag: 0,
        until: 0,
        reported: false,
    };

    pub(crate) fn of(s: &RecipientState) -> Self {
        let (tag, until, _) = s.parts();
        Self {
            tag,
            until,
            reported: false,
        }
    }

    /// The full state, with `reply` filled in from disk by the caller.
    pub(crate) fn expand(self, reply: String) -> RecipientState {
        RecipientState::from_parts(self.tag, self.until, reply).unwrap_or(RecipientState::Pending)
    }

    /// The full state with an empty reply: enough to check a transition.
    pub(crate) fn shape(self) -> RecipientState {
        self.expand(String::new())
    }

    pub(crate) fn is_final(self) -> bool {
        self.tag == 2 || self.tag == 4
    }

    pub(crate) fn is_in_doubt(self) -> bool {
        self.tag == 1
    }

    pub(crate) fn has_reply(self) -> bool {
        self.tag >= 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn all() -> Vec<RecipientState> {
        vec![
            RecipientState::Pending,
            RecipientState::InDoubt,
            RecipientState::Delivered {
                reply: "250".into(),
            },
            RecipientState::Deferred {
                until: UNIX_EPOCH,
                reply: "451".into(),
            },
            RecipientState::Bounced {
                reply: "550".into(),
            },
        ]
    }

    /// The whole transition table, row = from, column = to
    /// (pending, in-doubt, delivered, deferred, bounced).
    #[test]
    fn transition_table() {
        let table = [
            [false, true, false, true, true],    // pending
            [false, true, true, true, true],     // in doubt
            [false, false, false, false, false], // delivered
            [true, true, false, true, true],     // deferred
            [false, false, false, false, false], // bounced
        ];
        for (i, from) in all().iter().enumerate() {
            for (j, to) in all().iter().enumerate() {
                assert_eq!(
                    from.check_transition(to).is_ok(),
                    table[i][j],
                    "{} -> {}",
                    from.name(),
                    to.name()
                );
            }
        }
    }

    #[test]
    fn parts_round_trip_and_compact_form() {
        for s in all() {
            let (tag, until, reply) = s.parts();
            let back = RecipientState::from_parts(tag, until, reply.to_owned()).unwrap();
            assert_eq!(back, s);
            let c = CompactState::of(&s);
            assert_eq!(c.expand(reply.to_owned()), s);
            assert_eq!(c.is_final(), s.is_final());
            assert_eq!(c.has_reply(), s.reply().is_some());
        }
        assert!(RecipientState::from_parts(9, 0, String::new()).is_none());
    }
}
