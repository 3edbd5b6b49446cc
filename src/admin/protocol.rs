//! The admin socket's wire protocol: one JSON [`Request`] per line from the client, one
//! JSON [`Response`] per line back, in order, on the same connection.
//!
//! The types are shared by the daemon ([`super::server`]) and `postern queue` (the client),
//! so both ends always agree. [`MessageView`] is also what `postern queue list --json`
//! prints, one object per line: its field names and types are a stable interface
//! (documented in README "Operations"; tested in `tests/queue.rs`).

use serde::{Deserialize, Serialize};

/// The longest request line the daemon reads (bytes).
pub const MAX_REQUEST_LINE: usize = 64 << 10;

/// Which messages an operation applies to. Empty (no criterion, not `all`) selects
/// nothing: there is no implicit "everything".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    /// These queue ids (a message must also match the other criteria).
    #[serde(default)]
    pub ids: Vec<String>,
    /// Messages with an open recipient routed to this store.
    #[serde(default)]
    pub store: Option<String>,
    /// Messages in this queue (`active`, `deferred`, `hold`, `finished`).
    #[serde(default)]
    pub queue: Option<String>,
    /// Sender pattern (see [`super::view::matches_pattern`]).
    #[serde(default)]
    pub sender: Option<String>,
    /// Recipient pattern: a message matches if one of its recipients does.
    #[serde(default)]
    pub recipient: Option<String>,
    /// Messages that arrived at least this many seconds ago.
    #[serde(default)]
    pub older_than_secs: Option<u64>,
    /// Every message (required when no other criterion is given).
    #[serde(default)]
    pub all: bool,
}

impl Selector {
    /// No criterion at all (and not `all`): selects nothing.
    pub fn is_empty(&self) -> bool {
        !self.all
            && self.ids.is_empty()
            && self.store.is_none()
            && self.queue.is_none()
            && self.sender.is_none()
            && self.recipient.is_none()
            && self.older_than_secs.is_none()
    }
}

/// An operator action on selected messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Attempt now (deferred or waiting messages), at the store's slow-start pace.
    Flush,
    /// Stop delivering until released (durable).
    Hold,
    /// Deliver again, now (durable).
    Release,
    /// Remove from the spool, no bounce (durable).
    Delete,
    /// Route again with the current map and attempt now.
    Requeue,
}

impl Action {
    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flush => "flush",
            Self::Hold => "hold",
            Self::Release => "release",
            Self::Delete => "delete",
            Self::Requeue => "requeue",
        }
    }
}

/// Rows of the shape table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeBy {
    /// By the store each open recipient routes to.
    Store,
    /// By recipient domain.
    Domain,
}

/// One request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// The selected messages ([`Response::Messages`]).
    List {
        /// Which; an empty selector lists everything.
        selector: Selector,
    },
    /// One message in full ([`Response::Show`]).
    Show {
        /// Its queue id.
        id: String,
        /// Include the body after the headers.
        body: bool,
    },
    /// The qshape table ([`Response::Shape`]).
    Shape {
        /// Rows by store or by domain.
        by: ShapeBy,
    },
    /// An action on the selected messages ([`Response::Acted`]).
    Act {
        /// What.
        action: Action,
        /// Which.
        selector: Selector,
        /// Only say what would be touched.
        dry_run: bool,
    },
}

/// One recipient of a [`MessageView`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientView {
    /// The address (`postmaster` for `<Postmaster>`).
    pub address: String,
    /// `pending`, `in-doubt`, `deferred`, `delivered` or `bounced`.
    pub state: String,
    /// The store it routes to now (`null` when routing refuses it).
    pub store: Option<String>,
    /// The last reply recorded for it (`null` before any).
    pub last_reply: Option<String>,
    /// For a deferred recipient: the next attempt (Unix seconds).
    pub next_attempt: Option<u64>,
}

/// One queued message: a line of `postern queue list --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    /// `active`, `deferred`, `hold` or `finished`.
    pub queue_name: String,
    /// The queue id.
    pub queue_id: String,
    /// Arrival (Unix seconds).
    pub arrival_time: u64,
    /// Body size in bytes.
    pub message_size: u64,
    /// The envelope sender (`""` for `<>`).
    pub sender: String,
    /// The next attempt of the message (Unix seconds), if known.
    pub next_attempt: Option<u64>,
    /// Recipients in envelope order.
    pub recipients: Vec<RecipientView>,
}

/// What `show` adds to a [`MessageView`]: the client and the ESMTP parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeDetails {
    /// The client as logged (HELO name and address).
    pub client: String,
    /// MAIL FROM parameters as on the wire (`SIZE=… RET=HDRS ENVID=…`), `""` for none.
    pub mail_params: String,
    /// Each recipient's RCPT TO parameters (`NOTIFY=… ORCPT=…`), in envelope order.
    pub rcpt_params: Vec<String>,
}

/// One row of a [`ShapeTable`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeRow {
    /// Store or domain (`TOTAL` for the sum).
    pub name: String,
    /// Open recipients in the row.
    pub total: u64,
    /// Open recipients per age bucket ([`crate::shape::bucket`]; heads in
    /// [`ShapeTable::labels`]).
    pub buckets: Vec<u64>,
}

/// The qshape table: open (not yet delivered or bounced) recipients by age.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeTable {
    /// `store` or `domain`.
    pub by: ShapeBy,
    /// The column heads, in minutes: `5 10 20 … 1280 1280+` (a column holds ages below its
    /// head and at or above the previous one).
    pub labels: Vec<String>,
    /// `TOTAL` first, then the rows by descending total.
    pub rows: Vec<ShapeRow>,
}

/// A message touched (or that would be) by an action, or skipped with the reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touched {
    /// The queue id.
    pub queue_id: String,
    /// `None` when done (or to be done); the reason it was skipped otherwise.
    pub skipped: Option<String>,
}

/// One response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Response {
    /// For [`Request::List`].
    Messages {
        /// Oldest first.
        messages: Vec<MessageView>,
    },
    /// For [`Request::Show`].
    Show {
        /// The envelope and ledger.
        message: MessageView,
        /// The rest of the envelope.
        #[serde(default)]
        envelope: EnvelopeDetails,
        /// The header section as received (lossy UTF-8).
        headers: String,
        /// The rest, when asked for.
        body: Option<String>,
    },
    /// For [`Request::Shape`].
    Shape {
        /// The table.
        table: ShapeTable,
    },
    /// For [`Request::Act`].
    Acted {
        /// What.
        action: Action,
        /// Nothing was changed.
        dry_run: bool,
        /// Each selected message.
        messages: Vec<Touched>,
    },
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

impl Response {
    /// The response's `kind` as on the wire (`messages`, `show`, `shape`, `acted`, `error`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Messages { .. } => "messages",
            Self::Show { .. } => "show",
            Self::Shape { .. } => "shape",
            Self::Acted { .. } => "acted",
            Self::Error { .. } => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_responses_kind_is_its_wire_tag() {
        let r = Response::Error {
            message: "no".into(),
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["kind"], r.kind());
    }

    #[test]
    fn requests_round_trip_as_one_json_line() {
        let r = Request::Act {
            action: Action::Hold,
            selector: Selector {
                store: Some("s1".into()),
                ..Selector::default()
            },
            dry_run: true,
        };
        let line = serde_json::to_string(&r).unwrap_or_default();
        assert!(!line.contains('\n'));
        assert!(line.contains(r#""op":"act""#), "{line}");
        assert!(line.contains(r#""action":"hold""#), "{line}");
        let back: Request =
            serde_json::from_str(&line).unwrap_or(Request::Shape { by: ShapeBy::Store });
        assert_eq!(back, r);
    }

    #[test]
    fn an_empty_selector_selects_nothing() {
        assert!(Selector::default().is_empty());
        let all = Selector {
            all: true,
            ..Selector::default()
        };
        assert!(!all.is_empty());
    }
}
