//! Delivery status notifications (RFC 3464 `multipart/report`), built from the ledger.
//!
//! A DSN is owed to the envelope sender, never for the null sender `<>` (RFC 5321 §4.5.5):
//!
//! | recipient's final state | NOTIFY absent | NOTIFY= | `Action:` |
//! |---|---|---|---|
//! | bounced (5yz, or expired) | yes | FAILURE | `failed` |
//! | delivered | no | SUCCESS | `delivered` (an LMTP hop is final delivery) |
//! | still deferred at `delay_warning` | yes | DELAY | `delayed` |
//!
//! `NOTIFY=NEVER` asks for none. The report carries `Original-Envelope-Id` (ENVID),
//! `Original-Recipient` (ORCPT), `Final-Recipient`, `Status` (the enhanced code of the reply,
//! or the class's `x.0.0`) and `Diagnostic-Code: smtp; <reply>`. A bounced recipient whose
//! last reply was temporary (4yz) was bounced because the message expired; its status stays
//! the 4.x.x of the last reply, as Postfix reports it. The returned content is the whole
//! message for failures (unless `RET=HDRS`, or the message is larger than
//! [`RETURN_SIZE_LIMIT`]) and the headers otherwise. An SMTPUTF8 message gets the RFC 6533
//! `message/global*` types.
//!
//! The DSN itself is sent from `<>` (so no DSN is ever sent about a DSN), queued with
//! [`Spool::begin`](crate::spool::Spool::begin) and routed like any other message.

use std::fmt::Write as _;
use std::io::{self, Read};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postern_proto::params::{Body, Orcpt, Ret};
use postern_proto::{MailParams, RcptParams};

use crate::date::rfc5322 as rfc5322_date;
use crate::spool::{Envelope, EnvelopeRecipient, QueueId, RecipientState};

/// The whole message is returned in a failure DSN only up to this size (Postfix's
/// `bounce_size_limit`); larger ones get their headers.
pub const RETURN_SIZE_LIMIT: u64 = 50_000;

/// The longest header section returned.
const HEADERS_LIMIT: usize = 256 << 10;

/// What happened to a recipient, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Permanent failure, or expired.
    Failed,
    /// Still being retried.
    Delayed,
    /// Final delivery.
    Delivered,
}

impl Action {
    fn word(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Delayed => "delayed",
            Self::Delivered => "delivered",
        }
    }
}

/// One recipient in a DSN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DsnRecipient {
    /// The forward path, without brackets.
    pub address: String,
    /// ORCPT, if the client sent one.
    pub orcpt: Option<Orcpt>,
    /// What happened.
    pub action: Action,
    /// The reply, one-line log form (`550 5.1.1 text`).
    pub reply: String,
}

/// Which DSN is being considered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnKind {
    /// The message is done: failures and successes.
    Final,
    /// The message has been queued for `delay_warning`: deferred recipients.
    Delay,
}

/// The recipients a DSN of `kind` must report, from their states (replies filled in).
/// Empty when none is owed (null sender, NOTIFY=NEVER, nothing to report).
pub fn owed(envelope: &Envelope, states: &[RecipientState], kind: DsnKind) -> Vec<DsnRecipient> {
    if envelope.sender.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (r, state) in envelope.recipients.iter().zip(states) {
        let notify = r.params.notify;
        let (action, reply) = match (kind, state) {
            (DsnKind::Final, RecipientState::Bounced { reply })
                if notify.is_none_or(|n| n.failure && !n.never) =>
            {
                (Action::Failed, reply)
            }
            (DsnKind::Final, RecipientState::Delivered { reply })
                if notify.is_some_and(|n| n.success && !n.never) =>
            {
                (Action::Delivered, reply)
            }
            (DsnKind::Delay, RecipientState::Deferred { reply, .. })
                if notify.is_none_or(|n| n.delay && !n.never) =>
            {
                (Action::Delayed, reply)
            }
            _ => continue,
        };
        out.push(DsnRecipient {
            address: r.address.clone(),
            orcpt: r.params.orcpt.clone(),
            action,
            reply: reply.clone(),
        });
    }
    out
}

/// Whether recipient `rcpt`'s final `state` owes the sender a DSN, as [`owed`] decides
/// for [`DsnKind::Final`]. `true` for anything else (the caller then reports it the slow way).
/// For mail from `<>` a bounce owes no DSN but a double bounce (`double_bounce`), so it is
/// `true` for a bounced recipient there too.
pub fn owes_final(envelope: &Envelope, rcpt: usize, state: &RecipientState) -> bool {
    if envelope.sender.is_empty() {
        return matches!(state, RecipientState::Bounced { .. });
    }
    let Some(r) = envelope.recipients.get(rcpt) else {
        return true;
    };
    let notify = r.params.notify;
    match state {
        RecipientState::Bounced { .. } => notify.is_none_or(|n| n.failure && !n.never),
        RecipientState::Delivered { .. } => notify.is_some_and(|n| n.success && !n.never),
        _ => true,
    }
}

/// The DSN's envelope: from `<>` to the original sender, 8BITMIME when the returned
/// content needs it.
pub fn envelope(original: &Envelope, eight_bit: bool, now: SystemTime) -> Envelope {
    Envelope {
        sender: String::new(),
        params: MailParams {
            body: eight_bit.then_some(Body::EightBitMime),
            smtputf8: original.params.smtputf8,
            ..MailParams::default()
        },
        recipients: vec![EnvelopeRecipient {
            address: original.sender.clone(),
            params: RcptParams::default(),
        }],
        received_at: now,
        client: "postern (delivery status notification)".into(),
    }
}

/// Everything a DSN is made of.
#[derive(Clone, Debug)]
pub struct DsnReport<'a> {
    /// Our host name (`Reporting-MTA`, `From: MAILER-DAEMON@…`).
    pub hostname: &'a str,
    /// The original message.
    pub qid: QueueId,
    /// Its envelope.
    pub envelope: &'a Envelope,
    /// The recipients reported.
    pub recipients: &'a [DsnRecipient],
    /// Now (the `Date:`).
    pub now: SystemTime,
    /// The lifetime, for the text of delay warnings.
    pub maximal_lifetime: Duration,
}

/// The rendered DSN: its content (CRLF lines) and whether it holds 8-bit octets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The message.
    pub content: Vec<u8>,
    /// Octets above 127 (send with BODY=8BITMIME).
    pub eight_bit: bool,
}

/// Renders the DSN; `body` is the original content (`body_len` octets), read as far as the
/// returned part needs.
pub fn render(report: &DsnReport<'_>, body: &mut dyn Read, body_len: u64) -> io::Result<Rendered> {
    let env = report.envelope;
    let host = report.hostname;
    let any = |a: Action| report.recipients.iter().any(|r| r.action == a);
    let failed = any(Action::Failed);
    let subject = if failed {
        "Undelivered Mail Returned to Sender"
    } else if any(Action::Delayed) {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    };
    let micros = report
        .now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let boundary = format!("{}.{micros}/{host}", report.qid);
    let utf8 = env.params.smtputf8;
    let (status_type, message_type, headers_type) = if utf8 {
        (
            "message/global-delivery-status",
            "message/global",
            "message/global-headers",
        )
    } else {
        (
            "message/delivery-status",
            "message/rfc822",
            "text/rfc822-headers",
        )
    };
    let full = failed && env.params.ret != Some(Ret::Headers) && body_len <= RETURN_SIZE_LIMIT;
    let returned = if full {
        let mut all = Vec::with_capacity(body_len as usize);
        body.take(RETURN_SIZE_LIMIT + 1).read_to_end(&mut all)?;
        all
    } else {
        headers_of(body)?
    };
    let eight_bit = !returned.is_ascii() || report.recipients.iter().any(|r| !r.address.is_ascii());

    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        "From: MAILER-DAEMON@{host} (Mail Delivery System)\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{micros}.{qid}@{host}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         Content-Transfer-Encoding: {cte}\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         This is the mail system at host {host}.\r\n\
         \r\n",
        to = env.sender,
        date = rfc5322_date(report.now),
        qid = report.qid,
        cte = if eight_bit { "8bit" } else { "7bit" },
    );
    if failed {
        s.push_str(
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients. It's attached below.\r\n\r\n",
        );
    } else if any(Action::Delayed) {
        let age = report
            .now
            .duration_since(env.received_at)
            .unwrap_or_default();
        let _ = write!(
            s,
            "Your message could not be delivered for {}.\r\n\
             It will be retried until it is {} old.\r\n\r\n",
            human(age),
            human(report.maximal_lifetime)
        );
    } else {
        s.push_str(
            "Your message was successfully delivered to the destination(s)\r\n\
             listed below.\r\n\r\n",
        );
    }
    for r in report.recipients {
        let why = match (r.action, reply_code(&r.reply) / 100) {
            (Action::Failed, 4) => " (delivery time expired)",
            _ => "",
        };
        let _ = write!(s, "<{}>: {}{why}\r\n", r.address, one_line(&r.reply));
    }
    let _ = write!(
        s,
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: {status_type}\r\n\
         \r\n\
         Reporting-MTA: dns; {host}\r\n\
         X-Postern-Queue-ID: {qid}\r\n",
        qid = report.qid,
    );
    if let Some(envid) = &env.params.envid {
        let _ = write!(s, "Original-Envelope-Id: {}\r\n", one_line(envid));
    }
    let _ = write!(s, "Arrival-Date: {}\r\n", rfc5322_date(env.received_at));
    for r in report.recipients {
        let kind = if r.address.is_ascii() {
            "rfc822"
        } else {
            "utf-8"
        };
        let _ = write!(s, "\r\nFinal-Recipient: {kind}; {}\r\n", r.address);
        if let Some(o) = &r.orcpt {
            let _ = write!(
                s,
                "Original-Recipient: {};{}\r\n",
                one_line(&o.addr_type),
                one_line(&o.address)
            );
        }
        let _ = write!(
            s,
            "Action: {}\r\nStatus: {}\r\n",
            r.action.word(),
            status_of(&r.reply)
        );
        if r.action == Action::Delayed {
            let until = env.received_at + report.maximal_lifetime;
            let _ = write!(s, "Will-Retry-Until: {}\r\n", rfc5322_date(until));
        }
        let _ = write!(s, "Diagnostic-Code: smtp; {}\r\n", one_line(&r.reply));
    }
    let (description, ctype) = if full {
        ("Undelivered Message", message_type)
    } else {
        ("Message Headers", headers_type)
    };
    let _ = write!(
        s,
        "\r\n--{boundary}\r\n\
         Content-Description: {description}\r\n\
         Content-Type: {ctype}\r\n"
    );
    if eight_bit {
        s.push_str("Content-Transfer-Encoding: 8bit\r\n");
    }
    s.push_str("\r\n");
    let mut content = s.into_bytes();
    content.extend_from_slice(&returned);
    if !returned.ends_with(b"\r\n") {
        content.extend_from_slice(b"\r\n");
    }
    content.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Ok(Rendered { content, eight_bit })
}

/// The header section of a message (up to and including the empty line), at most
/// [`HEADERS_LIMIT`] octets.
fn headers_of(body: &mut dyn Read) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        let from = out.len().saturating_sub(3);
        out.extend_from_slice(&buf[..n]);
        if let Some(i) = out[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            out.truncate(from + i + 2);
            return Ok(out);
        }
        if out.len() >= HEADERS_LIMIT {
            out.truncate(HEADERS_LIMIT);
            return Ok(out);
        }
    }
}

/// The three-digit code of a reply in log form (0 when there is none).
pub fn reply_code(reply: &str) -> u16 {
    reply
        .get(..3)
        .and_then(|c| c.parse().ok())
        .filter(|c| (200..600).contains(c))
        .unwrap_or(0)
}

/// The RFC 3463 status of a reply in log form: its enhanced code, or the class's `x.0.0`.
pub fn status_of(reply: &str) -> String {
    let mut words = reply.split_whitespace();
    let code = words.next().unwrap_or("");
    if let Some(e) = words.next() {
        let parts: Vec<&str> = e.split('.').collect();
        let numeric = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        if numeric && matches!(parts[0], "2" | "4" | "5") {
            return e.to_owned();
        }
    }
    match code.as_bytes().first() {
        Some(b'2') => "2.0.0".into(),
        Some(b'4') => "4.0.0".into(),
        _ => "5.0.0".into(),
    }
}

fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > 900 {
        let mut end = 900;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s} seconds"),
        120..7200 => format!("{} minutes", s / 60),
        7200..172_800 => format!("{} hours", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests;
