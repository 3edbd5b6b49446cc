//! Failure policy: what a reply or an error means for each recipient and for the store.
//!
//! This is the one place that turns what happened on an LMTP connection into decisions, in
//! the manner of Postfix's `smtp_trouble.c`. Two questions are answered:
//!
//! - **The outcome of each recipient** ([`Outcome`]): a 2yz reply delivered it, a 4yz defers
//!   it, a 5yz bounces it, a lost connection after the end of data leaves it in doubt
//!   (RFC 2033 §5), and a transaction that never reached the end of data did not attempt it.
//!   A per-store normalisation table ([`Policy`], configured as [`NormalizeRule`]s) can turn
//!   a permanent reply into a temporary one (over quota for a while, a `550` during a known
//!   resync) or the other way round.
//! - **How wide the trouble is** ([`Scope`]): one recipient, the message, this connection, or
//!   the whole store. Connect, TLS, greeting, LHLO and AUTH failures count against the store
//!   (the scheduler backs off and narrows its window); a lost or timed-out connection in a
//!   transaction is this connection's; a refused MAIL or DATA, or a message the store cannot
//!   take (SIZE, 8BITMIME, SMTPUTF8), is the message's.
//!
//! DIAGNOSTICS: nothing here fails; every input has an outcome.
//!
//! SEE ALSO: `lmtp` (which feeds this module), RFC 3463 (enhanced status codes).

use std::fmt;
use std::time::{Duration, SystemTime};

use postern_proto::reply::{EnhancedCode, Reply, ReplyCode, Severity};

use super::config::{NormalizeRule, TreatAs};
use crate::config::units::Span;

/// What became of one recipient in one delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The store took responsibility for it (2yz): cross it off.
    Delivered(Reply),
    /// Temporary failure (4yz, or a 5yz that the policy treats as temporary): retry later.
    Deferred(Reply),
    /// Permanent failure (5yz, or a local refusal such as `5.3.4`): return it to the sender.
    Bounced(Reply),
    /// The end of data was sent but the connection ended before this recipient's reply: it
    /// may have been delivered. A retry may deliver it twice.
    InDoubt,
    /// The end of data was never sent for it: nothing was delivered and a retry is safe; it
    /// does not count as an attempt against the recipient. `Some` carries the store's reply
    /// when the store refused the session (`421`, authentication required).
    NotAttempted(Option<Reply>),
}

impl Outcome {
    /// Delivered or bounced: the recipient is done with.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Delivered(_) | Self::Bounced(_))
    }

    /// The store's (or the local) reply, when there is one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Self::Delivered(r) | Self::Deferred(r) | Self::Bounced(r) => Some(r),
            Self::NotAttempted(r) => r.as_ref(),
            Self::InDoubt => None,
        }
    }
}

/// How far a failure reaches, narrowest first (Postfix: recipient, message, session, site).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Only the recipients whose own replies failed them; nothing beyond them went wrong.
    Recipient,
    /// The message: MAIL or DATA refused, or a message this store cannot take.
    Message,
    /// This connection: lost or timed out during a transaction. Retry on another one.
    Connection,
    /// The store: it cannot be reached, refused the session, or failed LHLO, TLS or AUTH.
    /// Counts against the store (back off, narrow the concurrency window).
    Store,
}

/// A failure wider than one recipient, with the reason for logs and DSNs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trouble {
    /// How wide it is.
    pub scope: Scope,
    /// What happened, for logs: `connect to 127.0.0.1:24: Connection refused`.
    pub detail: String,
    /// The store's reply, when a reply caused it.
    pub reply: Option<Reply>,
}

impl Trouble {
    fn new(scope: Scope, detail: impl Into<String>, reply: Option<Reply>) -> Self {
        Self {
            scope,
            detail: detail.into(),
            reply,
        }
    }

    /// Keeps the wider of two troubles (the first one on a tie: it happened first).
    pub fn widen(current: Option<Self>, new: Self) -> Option<Self> {
        match current {
            Some(c) if c.scope >= new.scope => Some(c),
            _ => Some(new),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Recipient => "recipient",
            Self::Message => "message",
            Self::Connection => "connection",
            Self::Store => "store",
        })
    }
}

impl fmt::Display for Trouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.scope, self.detail)?;
        if let Some(r) = &self.reply {
            write!(f, " ({} {})", r.code(), r.text())?;
        }
        Ok(())
    }
}

impl std::error::Error for Trouble {}

/// Where in the session something happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Opening the socket.
    Connect,
    /// The greeting and LHLO.
    Lhlo,
    /// STARTTLS and the handshake.
    StartTls,
    /// AUTH PLAIN.
    Auth,
    /// MAIL FROM and RCPT TO (and the reply to DATA).
    MailRcpt,
    /// Writing the content (DATA or BDAT chunks).
    Data,
    /// Waiting for the replies after the final dot or `BDAT LAST`.
    EndOfData,
    /// RSET before reusing a pooled connection.
    Rset,
}

/// The phase as the protocol names it: `LHLO`, `MAIL/RCPT`, `end of data` …
impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::Lhlo => "LHLO",
            Self::StartTls => "STARTTLS",
            Self::Auth => "AUTH",
            Self::MailRcpt => "MAIL/RCPT",
            Self::Data => "DATA",
            Self::EndOfData => "end of data",
            Self::Rset => "RSET",
        })
    }
}

impl Phase {
    /// Before any transaction: failures here count against the store.
    fn is_setup(self) -> bool {
        matches!(
            self,
            Self::Connect | Self::Lhlo | Self::StartTls | Self::Auth
        )
    }
}

/// The connection could not be opened.
pub fn connect_failed(address: &str, error: &std::io::Error) -> Trouble {
    Trouble::new(Scope::Store, format!("connect to {address}: {error}"), None)
}

/// Nothing came within the phase's timeout.
pub fn timed_out(phase: Phase, limit: Duration) -> Trouble {
    let scope = if phase.is_setup() {
        Scope::Store
    } else {
        Scope::Connection
    };
    let detail = format!("timeout ({}) in {phase}", Span(limit));
    Trouble::new(scope, detail, None)
}

/// The connection ended (end of file, an I/O error, or a malformed reply).
///
/// A session the store drops during its greeting or LHLO is the store being busy, not
/// broken: Dovecot drops the sessions over its `process_limit` that way, Cyrus the ones over
/// `maxchild` when its backlog overflows. That is [`Scope::Connection`]: the window takes it
/// as a hard signal, the breaker does not count it, and the recipients are tried again as
/// soon as the window allows, not after a full backoff.
pub fn lost(phase: Phase, why: &str) -> Trouble {
    let scope = if phase.is_setup() && phase != Phase::Lhlo {
        Scope::Store
    } else {
        Scope::Connection
    };
    let detail = match phase {
        Phase::EndOfData => format!("connection lost after the end of data ({why}): in doubt"),
        _ => format!("connection lost in {phase} ({why})"),
    };
    Trouble::new(scope, detail, None)
}

/// The store refused a command of the session or of the transaction.
pub fn refused(phase: Phase, reply: &Reply) -> Trouble {
    let scope = if phase.is_setup() || refuses_session(reply) {
        Scope::Store
    } else {
        Scope::Message
    };
    let detail = format!("{phase} refused");
    Trouble::new(scope, detail, Some(reply.clone()))
}

/// A setup step that needs something the store did not offer (STARTTLS, AUTH PLAIN).
pub fn not_offered(what: &str) -> Trouble {
    Trouble::new(
        Scope::Store,
        format!("the store does not offer {what}"),
        None,
    )
}

/// The TLS handshake failed.
pub fn tls_failed(error: &std::io::Error) -> Trouble {
    Trouble::new(Scope::Store, format!("TLS handshake: {error}"), None)
}

/// A reply nobody asked for (an unsolicited `421`, typically): the connection is over.
pub fn unexpected(reply: &Reply) -> Trouble {
    let scope = if refuses_session(reply) {
        Scope::Store
    } else {
        Scope::Connection
    };
    Trouble::new(scope, "unexpected reply", Some(reply.clone()))
}

/// The store sent something that is not a reply.
pub fn protocol_error(error: &dyn fmt::Display) -> Trouble {
    Trouble::new(Scope::Connection, format!("protocol error: {error}"), None)
}

/// The connection cannot take a transaction (closed, or in the middle of something).
pub fn unusable(why: &str) -> Trouble {
    Trouble::new(
        Scope::Connection,
        format!("connection unusable: {why}"),
        None,
    )
}

/// The message cannot go to this store, decided before sending anything (see
/// [`size_exceeded`], [`needs_8bitmime`], [`needs_smtputf8`]) or while reading it.
pub fn message_refused(reply: &Reply) -> Trouble {
    let detail = "message refused locally";
    Trouble::new(Scope::Message, detail, Some(reply.clone()))
}

/// Local reply: the store's SIZE limit is smaller than the message (RFC 1870, RFC 3463).
pub fn size_exceeded(size: u64, limit: u64) -> Reply {
    let text = format!("Message size {size} exceeds the store's limit of {limit} octets");
    local_reply(C552, EnhancedCode::new(5, 3, 4), &text)
}

/// Local reply: 8-bit content for a store without 8BITMIME (RFC 6152; no conversion).
pub fn needs_8bitmime() -> Reply {
    let text = "8-bit content and the store does not offer 8BITMIME";
    local_reply(C554, EnhancedCode::new(5, 6, 3), text)
}

/// Local reply: internationalised mail for a store without SMTPUTF8 (RFC 6531 §3.2).
pub fn needs_smtputf8() -> Reply {
    let text = "SMTPUTF8 is required and the store does not offer it";
    local_reply(C554, EnhancedCode::new(5, 6, 7), text)
}

/// Local reply: BINARYMIME content for a store without BINARYMIME and CHUNKING (RFC 3030).
pub fn needs_binarymime() -> Reply {
    let text = "binary content and the store does not offer BINARYMIME";
    local_reply(C554, EnhancedCode::new(5, 6, 3), text)
}

/// Local reply: the spooled message could not be read; try again later.
pub fn local_read_error(error: &std::io::Error) -> Reply {
    let text = format!("Local error reading the message: {error}");
    local_reply(C451, EnhancedCode::new(4, 3, 0), &text)
}

/// Replies that end the session rather than refuse the message: `421` (closing), and the
/// authentication-required replies (`530 5.7.0`, and Cyrus's `430` on TCP without AUTH).
fn refuses_session(reply: &Reply) -> bool {
    matches!(reply.code().get(), 421 | 430 | 530)
}

const fn code(n: u16) -> ReplyCode {
    match ReplyCode::new(n) {
        Some(c) => c,
        None => panic!("not a reply code"),
    }
}
const C451: ReplyCode = code(451);
const C552: ReplyCode = code(552);
const C554: ReplyCode = code(554);

fn local_reply(code: ReplyCode, enhanced: EnhancedCode, text: &str) -> Reply {
    Reply::new(code, Some(enhanced), text)
}

/// When a reply is judged: the rules with `max_age` and `until` depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct When {
    /// Now.
    pub now: SystemTime,
    /// When the message was queued.
    pub arrived: SystemTime,
}

/// A store's failure policy: its normalisation table. The default policy takes replies at
/// their word (2yz delivered, 4yz deferred, 5yz bounced).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<NormalizeRule>,
}

impl Policy {
    /// A policy with these rules; the first rule that matches a reply decides.
    pub fn new(rules: Vec<NormalizeRule>) -> Self {
        Self { rules }
    }

    /// The outcome of a reply that settles one recipient: its RCPT refusal, or its reply
    /// after the end of data.
    pub fn recipient(&self, reply: Reply, when: When) -> Outcome {
        match self.severity(&reply, when) {
            Severity::PositiveCompletion => Outcome::Delivered(reply),
            Severity::TransientNegative => Outcome::Deferred(reply),
            // A 3yz where a final reply belongs is a broken store: try again later.
            Severity::PositiveIntermediate => Outcome::Deferred(reply),
            Severity::PermanentNegative => Outcome::Bounced(reply),
        }
    }

    /// The outcome of a recipient whose transaction never reached the end of data. `reason`
    /// is the reply that failed the transaction (MAIL, DATA or BDAT refused), `None` when the
    /// connection was lost. A store closing the session (`421`, authentication required)
    /// says nothing about the message: not attempted.
    pub fn not_attempted(&self, reason: Option<Reply>, when: When) -> Outcome {
        match reason {
            None => Outcome::NotAttempted(None),
            Some(r) if refuses_session(&r) => Outcome::NotAttempted(Some(r)),
            Some(r) => match self.recipient(r, when) {
                // A 2yz cannot fail a transaction; do not count it as delivered.
                Outcome::Delivered(r) => Outcome::Deferred(r),
                other => other,
            },
        }
    }

    /// The reply's class after the normalisation table.
    pub fn severity(&self, reply: &Reply, when: When) -> Severity {
        let natural = reply.severity();
        if !matches!(
            natural,
            Severity::TransientNegative | Severity::PermanentNegative
        ) {
            return natural;
        }
        match self.rules.iter().find(|r| rule_matches(r, reply, when)) {
            Some(rule) => match rule.treat_as {
                TreatAs::Temporary => Severity::TransientNegative,
                TreatAs::Permanent => Severity::PermanentNegative,
            },
            None => natural,
        }
    }
}

fn rule_matches(rule: &NormalizeRule, reply: &Reply, when: When) -> bool {
    if rule.code.is_some_and(|c| c != reply.code().get()) {
        return false;
    }
    if let Some(want) = &rule.enhanced {
        // Compare the text form: `5.2.2` matches, and so does a class-and-subject prefix `5.2`.
        let have = reply.enhanced().map(|e| e.to_string()).unwrap_or_default();
        let prefix = have
            .strip_prefix(want.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
        if !prefix {
            return false;
        }
    }
    if let Some(max_age) = rule.max_age {
        let age = when.now.duration_since(when.arrived).unwrap_or_default();
        if age >= max_age.0 {
            return false;
        }
    }
    if let Some(until) = rule.until {
        if when.now >= until.0 {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::config::units::Span;
    use crate::delivery::config::Timestamp;

    fn reply(code: u16, enhanced: Option<(u8, u16, u16)>) -> Reply {
        let e = enhanced.map(|(a, b, c)| EnhancedCode::new(a, b, c));
        Reply::new(ReplyCode::new(code).unwrap(), e, "text")
    }

    fn at(secs_after_arrival: u64) -> When {
        let arrived = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        When {
            now: arrived + Duration::from_secs(secs_after_arrival),
            arrived,
        }
    }

    fn rule(code: Option<u16>, enhanced: Option<&str>, treat_as: TreatAs) -> NormalizeRule {
        NormalizeRule {
            code,
            enhanced: enhanced.map(str::to_owned),
            treat_as,
            max_age: None,
            until: None,
        }
    }

    #[test]
    fn operator_texts_name_phases_and_scopes_in_words() {
        let t = timed_out(Phase::EndOfData, Duration::from_secs(600));
        assert_eq!(t.to_string(), "connection: timeout (10m) in end of data");
        let t = lost(Phase::MailRcpt, "reset by peer");
        assert_eq!(
            t.to_string(),
            "connection: connection lost in MAIL/RCPT (reset by peer)"
        );
        let t = connect_failed("127.0.0.1:24", &std::io::Error::other("refused"));
        assert_eq!(t.to_string(), "store: connect to 127.0.0.1:24: refused");
    }

    #[test]
    fn replies_at_their_word() {
        let p = Policy::default();
        let cases = [
            (250, "Delivered"),
            (451, "Deferred"),
            (452, "Deferred"),
            (550, "Bounced"),
            (552, "Bounced"),
            (354, "Deferred"),
        ];
        for (code, want) in cases {
            let got = p.recipient(reply(code, None), at(0));
            assert!(format!("{got:?}").starts_with(want), "{code}: {got:?}");
        }
    }

    #[test]
    fn over_quota_temporary_for_a_while() {
        let mut r = rule(Some(552), Some("5.2.2"), TreatAs::Temporary);
        r.max_age = Some(Span(Duration::from_secs(3600)));
        let p = Policy::new(vec![r]);
        let quota = reply(552, Some((5, 2, 2)));
        assert!(matches!(
            p.recipient(quota.clone(), at(10)),
            Outcome::Deferred(_)
        ));
        assert!(matches!(p.recipient(quota, at(3600)), Outcome::Bounced(_)));
        // Another 552 is not over quota.
        let other = reply(552, Some((5, 3, 4)));
        assert!(matches!(p.recipient(other, at(10)), Outcome::Bounced(_)));
        // The same enhanced code without a code given in the rule also matches.
        let p = Policy::new(vec![rule(None, Some("5.2"), TreatAs::Temporary)]);
        let q = reply(550, Some((5, 2, 2)));
        assert!(matches!(p.recipient(q, at(0)), Outcome::Deferred(_)));
        let q = reply(550, Some((5, 20, 1)));
        assert!(matches!(p.recipient(q, at(0)), Outcome::Bounced(_)));
    }

    #[test]
    fn resync_window_until() {
        let mut r = rule(Some(550), None, TreatAs::Temporary);
        let w = at(0);
        r.until = Some(Timestamp(w.now + Duration::from_secs(60)));
        let p = Policy::new(vec![r]);
        let unknown = reply(550, Some((5, 1, 1)));
        assert!(matches!(
            p.recipient(unknown.clone(), at(59)),
            Outcome::Deferred(_)
        ));
        assert!(matches!(p.recipient(unknown, at(60)), Outcome::Bounced(_)));
    }

    #[test]
    fn temporary_made_permanent_and_first_rule_wins() {
        let p = Policy::new(vec![
            rule(Some(452), Some("4.2.2"), TreatAs::Permanent),
            rule(Some(452), None, TreatAs::Temporary),
        ]);
        let q = reply(452, Some((4, 2, 2)));
        assert!(matches!(p.recipient(q, at(0)), Outcome::Bounced(_)));
        let q = reply(452, Some((4, 3, 1)));
        assert!(matches!(p.recipient(q, at(0)), Outcome::Deferred(_)));
        // A 2yz is never normalised.
        let p = Policy::new(vec![rule(None, None, TreatAs::Permanent)]);
        assert!(matches!(
            p.recipient(reply(250, None), at(0)),
            Outcome::Delivered(_)
        ));
    }

    #[test]
    fn transaction_failures() {
        let p = Policy::default();
        assert_eq!(p.not_attempted(None, at(0)), Outcome::NotAttempted(None));
        let closing = reply(421, Some((4, 3, 2)));
        assert_eq!(
            p.not_attempted(Some(closing.clone()), at(0)),
            Outcome::NotAttempted(Some(closing.clone()))
        );
        let cyrus_auth = reply(430, None);
        assert!(matches!(
            p.not_attempted(Some(cyrus_auth.clone()), at(0)),
            Outcome::NotAttempted(Some(_))
        ));
        assert!(matches!(
            p.not_attempted(Some(reply(554, None)), at(0)),
            Outcome::Bounced(_)
        ));
        assert!(matches!(
            p.not_attempted(Some(reply(451, None)), at(0)),
            Outcome::Deferred(_)
        ));
        assert_eq!(refused(Phase::MailRcpt, &closing).scope, Scope::Store);
        assert_eq!(refused(Phase::MailRcpt, &cyrus_auth).scope, Scope::Store);
        assert_eq!(
            refused(Phase::MailRcpt, &reply(451, None)).scope,
            Scope::Message
        );
        assert_eq!(refused(Phase::Lhlo, &reply(500, None)).scope, Scope::Store);
    }

    #[test]
    fn scopes() {
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(connect_failed("127.0.0.1:1", &e).scope, Scope::Store);
        let d = Duration::from_secs(1);
        assert_eq!(timed_out(Phase::Lhlo, d).scope, Scope::Store);
        assert_eq!(timed_out(Phase::EndOfData, d).scope, Scope::Connection);
        assert_eq!(lost(Phase::Data, "eof").scope, Scope::Connection);
        // A session dropped in its greeting or LHLO: the store is busy, not down.
        assert_eq!(lost(Phase::Lhlo, "closed").scope, Scope::Connection);
        assert_eq!(lost(Phase::Auth, "closed").scope, Scope::Store);
        assert!(lost(Phase::EndOfData, "eof").detail.contains("in doubt"));
        let narrow = message_refused(&needs_8bitmime());
        let wide = lost(Phase::Data, "eof");
        let w = Trouble::widen(Some(narrow.clone()), wide.clone());
        assert_eq!(w, Some(wide.clone()));
        assert_eq!(Trouble::widen(Some(wide.clone()), narrow), Some(wide));
    }

    #[test]
    fn local_replies() {
        let r = size_exceeded(10, 5);
        assert_eq!(
            (r.code().get(), r.enhanced().unwrap().to_string()),
            (552, "5.3.4".into())
        );
        assert_eq!(needs_8bitmime().enhanced().unwrap().to_string(), "5.6.3");
        assert_eq!(needs_smtputf8().enhanced().unwrap().to_string(), "5.6.7");
        let e = std::io::Error::other("disk");
        assert!(local_read_error(&e).is_transient());
    }
}
