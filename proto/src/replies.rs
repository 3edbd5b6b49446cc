//! Every reply postern itself sends, in one place.
//!
//! Codes follow RFC 5321 §4.2.2/§4.3.2, enhanced codes RFC 3463 (and RFC 3030, 3207, 4954,
//! 6531 for their extensions). The server session and the listeners call these functions;
//! nothing else in postern spells a reply text inline, so an operator can read every
//! answer postern can give in this file.

use crate::address::AddressError;
use crate::reply::{EnhancedCode, Reply, ReplyCode};

fn reply(code: u16, enhanced: (u8, u16, u16), text: &str) -> Reply {
    // Every code in this file is a valid literal; the fallback is never taken.
    let code = ReplyCode::new(code).unwrap_or(ReplyCode::LOCAL_ERROR);
    Reply::new(
        code,
        Some(EnhancedCode::new(enhanced.0, enhanced.1, enhanced.2)),
        text,
    )
}

/// 220 greeting. No enhanced code: RFC 2034 puts none on the greeting.
pub fn greeting(hostname: &str, protocol: &str) -> Reply {
    Reply::new(
        ReplyCode::SERVICE_READY,
        None,
        &format!("{hostname} {protocol} postern ready"),
    )
}

/// 221 after QUIT.
pub fn bye() -> Reply {
    reply(221, (2, 0, 0), "Bye")
}

/// 250 for RSET and NOOP.
pub fn ok() -> Reply {
    reply(250, (2, 0, 0), "Ok")
}

/// 250 for an accepted MAIL FROM.
pub fn sender_ok() -> Reply {
    reply(250, (2, 1, 0), "Sender ok")
}

/// 250 for an accepted RCPT TO.
pub fn recipient_ok() -> Reply {
    reply(250, (2, 1, 5), "Recipient ok")
}

/// 354 after DATA.
pub fn start_data() -> Reply {
    Reply::new(
        ReplyCode::START_DATA,
        None,
        "End data with <CR><LF>.<CR><LF>",
    )
}

/// 250 after the end of data, once the message is durable.
pub fn queued(queue_id: &str) -> Reply {
    reply(250, (2, 0, 0), &format!("Ok: queued as {queue_id}"))
}

/// 250 for a non-last BDAT chunk.
pub fn chunk_ok(octets: u64) -> Reply {
    reply(250, (2, 0, 0), &format!("{octets} octets received"))
}

/// 220 to STARTTLS.
pub fn tls_go_ahead() -> Reply {
    reply(220, (2, 0, 0), "Ready to start TLS")
}

/// 214 to HELP.
pub fn help() -> Reply {
    reply(214, (2, 0, 0), "See RFC 5321 and RFC 2033")
}

/// 252 to VRFY: we never disclose mailboxes.
pub fn cannot_verify() -> Reply {
    reply(
        252,
        (2, 1, 5),
        "Cannot VRFY user, but will accept message and attempt delivery",
    )
}

/// 221 when the client exceeds the error limit (RFC 5321 §4.3.2 allows closing).
pub fn too_many_errors() -> Reply {
    reply(421, (4, 7, 0), "Too many errors, closing connection")
}

/// 421 when the listener is at its connection limit.
pub fn too_many_connections() -> Reply {
    reply(421, (4, 7, 0), "Too many connections, try again later")
}

/// 421 when a command or data timeout expires.
pub fn timeout() -> Reply {
    reply(421, (4, 4, 2), "Timeout, closing connection")
}

/// 421 when the gateway is shutting down.
pub fn shutting_down() -> Reply {
    reply(421, (4, 3, 2), "Service shutting down, try again later")
}

/// 500 for an unknown verb.
pub fn unrecognized_command() -> Reply {
    reply(500, (5, 5, 1), "Command unrecognized")
}

/// 500 for a command line over the limit (RFC 5321 §4.5.3.1.4).
pub fn line_too_long() -> Reply {
    reply(500, (5, 5, 2), "Line too long")
}

/// 501 with the expected syntax.
pub fn syntax(syntax: &str) -> Reply {
    reply(501, (5, 5, 4), &format!("Syntax: {syntax}"))
}

/// 501 for a bad MAIL FROM address.
pub fn bad_sender(e: &AddressError) -> Reply {
    reply(501, (5, 1, 7), &format!("Bad sender address syntax: {e}"))
}

/// 501 for a bad RCPT TO address.
pub fn bad_recipient(e: &AddressError) -> Reply {
    reply(
        501,
        (5, 1, 3),
        &format!("Bad recipient address syntax: {e}"),
    )
}

/// 555 for an unknown or unoffered parameter (RFC 5321 §4.1.1.11).
pub fn unknown_parameter(keyword: &str) -> Reply {
    reply(555, (5, 5, 4), &format!("Unsupported parameter {keyword}"))
}

/// 501 for a known parameter with a bad value.
pub fn bad_parameter(detail: &str) -> Reply {
    reply(501, (5, 5, 4), &format!("Invalid parameter: {detail}"))
}

/// 502 for a recognised command we do not implement.
pub fn not_implemented(verb: &str) -> Reply {
    reply(502, (5, 5, 1), &format!("{verb} not implemented"))
}

/// 503 for a command out of sequence, with what was expected.
pub fn bad_sequence(detail: &str) -> Reply {
    reply(
        503,
        (5, 5, 1),
        &format!("Bad sequence of commands: {detail}"),
    )
}

/// 554 to DATA in SMTP when every RCPT was refused (RFC 5321 §3.3).
pub fn no_valid_recipients() -> Reply {
    reply(554, (5, 5, 1), "No valid recipients")
}

/// 500 for HELO/EHLO on LMTP or LHLO on SMTP.
pub fn wrong_protocol(verb: &str, protocol: &str) -> Reply {
    reply(
        500,
        (5, 5, 1),
        &format!("{verb} is not a {protocol} command"),
    )
}

/// 530 when TLS is required and not active (RFC 3207 §4).
pub fn tls_required() -> Reply {
    reply(530, (5, 7, 0), "Must issue a STARTTLS command first")
}

/// 454 when the TLS handshake could not be started.
pub fn tls_unavailable() -> Reply {
    reply(454, (4, 7, 0), "TLS not available due to temporary reason")
}

/// 503 to AUTH when none is offered.
pub fn auth_not_enabled() -> Reply {
    reply(503, (5, 5, 1), "Authentication not enabled")
}

/// 504 to AUTH with an unknown mechanism.
pub fn auth_mechanism_unknown() -> Reply {
    reply(504, (5, 5, 4), "Unrecognized authentication mechanism")
}

/// 501 when the client cancels a SASL exchange with `*`.
pub fn auth_cancelled() -> Reply {
    reply(501, (5, 0, 0), "Authentication cancelled")
}

/// 552 when a message is over the size limit (RFC 1870 §6).
pub fn message_too_big() -> Reply {
    reply(552, (5, 3, 4), "Message size exceeds fixed limit")
}

/// 452 when a transaction has reached the recipient limit (RFC 5321 §4.5.3.1.10).
pub fn too_many_recipients() -> Reply {
    reply(452, (4, 5, 3), "Too many recipients")
}

/// 553 for a UTF-8 address without SMTPUTF8 (RFC 6531 §3.5).
pub fn utf8_address_needs_smtputf8() -> Reply {
    reply(553, (5, 6, 7), "Non-ASCII address requires SMTPUTF8")
}

/// 550 for content with bare CR or LF when the listener rejects it.
pub fn bare_line_ending() -> Reply {
    reply(
        550,
        (5, 5, 2),
        "Message contains bare CR or LF, use CRLF line endings",
    )
}

/// 503 to DATA for a BODY=BINARYMIME transaction (RFC 3030 §3).
pub fn binarymime_needs_bdat() -> Reply {
    reply(503, (5, 5, 1), "BODY=BINARYMIME requires BDAT")
}

/// 550 for an unknown local user (routing, at RCPT).
pub fn unknown_user() -> Reply {
    reply(550, (5, 1, 1), "Recipient address rejected: User unknown")
}

/// 550 for a recipient its store does not know (recipient verification at RCPT): the
/// store's own text after our prefix, printable ASCII only and at most 200 octets of it.
pub fn recipient_unverified(store_text: &str) -> Reply {
    let text: String = store_text
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect();
    let text = text.trim();
    let text = if text.is_empty() {
        "User unknown"
    } else {
        text
    };
    reply(
        550,
        (5, 1, 1),
        &format!("Recipient address rejected: {text}"),
    )
}

/// 450 when the recipient's store could not say whether it knows the recipient (a 4yz, a
/// timeout, the store busy or down): never a 5xx for that.
pub fn recipient_unverified_tempfail() -> Reply {
    reply(
        450,
        (4, 1, 1),
        "Recipient address rejected: unverified address, try again later",
    )
}

/// 451 for a recipient whose store is backlogged (per-store backpressure); `text` names
/// the condition ("Store cyrus1 is backlogged: 5000 recipients queued").
pub fn store_backlogged(text: &str) -> Reply {
    reply(451, (4, 3, 2), text)
}

/// 554 for mail to a domain that is not ours from an untrusted client.
pub fn relay_denied() -> Reply {
    reply(554, (5, 7, 1), "Relay access denied")
}

/// 451 when a lookup or the spool failed; never a 5xx for our own trouble.
pub fn local_error() -> Reply {
    reply(451, (4, 3, 0), "Local error in processing, try again later")
}

/// 452 at MAIL when the spool is below its free-space floor.
pub fn insufficient_storage() -> Reply {
    reply(452, (4, 3, 1), "Insufficient system storage")
}

/// 554 for a message with too many Received: headers.
pub fn mail_loop() -> Reply {
    reply(554, (5, 4, 6), "Too many hops, mail loop detected")
}

/// 554 for a message that carries this gateway's own `Received:` marker: it came back.
pub fn mail_returned() -> Reply {
    reply(
        554,
        (5, 4, 6),
        "Mail loop detected: this message has passed through this gateway already",
    )
}

/// 250 for a cut-through transaction that every recipient's store accepted (more than one
/// recipient, so no single store reply stands for them all).
pub fn relayed(recipients: usize) -> Reply {
    reply(
        250,
        (2, 0, 0),
        &format!("Ok: delivered to {recipients} recipients"),
    )
}

/// 451 for a cut-through recipient whose store could not take it now (`why`: not reachable,
/// busy, did not answer in time). Nothing was delivered: try again later.
pub fn store_unavailable(store: &str, why: &str) -> Reply {
    reply(
        451,
        (4, 3, 2),
        &format!("Store {store} {why}, try again later"),
    )
}

/// 451 for a cut-through recipient whose store went silent after the message was sent: it
/// may have been delivered, so a retry may deliver it twice (never lose it).
pub fn store_in_doubt(store: &str) -> Reply {
    reply(
        451,
        (4, 4, 2),
        &format!(
            "Connection to store {store} lost after the message was sent; it may have been delivered, try again later"
        ),
    )
}

impl ReplyCode {
    /// 220
    pub const SERVICE_READY: Self = Self::from_table(220);
    /// 250
    pub const OK: Self = Self::from_table(250);
    /// 354
    pub const START_DATA: Self = Self::from_table(354);
    /// 451
    pub const LOCAL_ERROR: Self = Self::from_table(451);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_match_enhanced_classes() {
        let all = [
            bye(),
            ok(),
            sender_ok(),
            recipient_ok(),
            queued("X"),
            chunk_ok(1),
            tls_go_ahead(),
            help(),
            cannot_verify(),
            too_many_errors(),
            too_many_connections(),
            timeout(),
            shutting_down(),
            unrecognized_command(),
            line_too_long(),
            syntax("X"),
            bad_sender(&AddressError::BadDomain),
            bad_recipient(&AddressError::BadDomain),
            unknown_parameter("X"),
            bad_parameter("X"),
            not_implemented("X"),
            bad_sequence("X"),
            no_valid_recipients(),
            wrong_protocol("X", "Y"),
            tls_required(),
            tls_unavailable(),
            auth_not_enabled(),
            auth_mechanism_unknown(),
            auth_cancelled(),
            message_too_big(),
            too_many_recipients(),
            utf8_address_needs_smtputf8(),
            bare_line_ending(),
            binarymime_needs_bdat(),
            unknown_user(),
            relay_denied(),
            local_error(),
            insufficient_storage(),
            mail_loop(),
            mail_returned(),
            relayed(2),
            store_unavailable("s", "is busy"),
            store_in_doubt("s"),
        ];
        for r in all {
            let e = r.enhanced().unwrap();
            assert_eq!(u16::from(e.class), r.code().get() / 100, "{r}");
            assert!(!r.text().is_empty(), "{r}");
        }
        assert_eq!(
            greeting("mx", "ESMTP").to_bytes(),
            b"220 mx ESMTP postern ready\r\n"
        );
        assert_eq!(start_data().code().get(), 354);
    }
}
