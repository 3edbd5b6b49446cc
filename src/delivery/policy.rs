//! The policy stores: `discard` (accept and drop) and `error` (a fixed reply).
//!
//! Neither touches the message. [`discard`] reports every recipient
//! [`Outcome::Delivered`] with `250 2.0.0 discarded`; [`refuse`] gives every recipient the
//! configured reply, [`Outcome::Deferred`] for a 4yz and [`Outcome::Bounced`] for a 5yz
//! (Postfix's `discard(8)` and `error(8)`). The scheduler's discard and error agents call
//! them.
//!
//! ```yaml
//! stores:
//!   - { kind: discard, name: blackhole }
//!   - { kind: error, name: retired, reply: "550 5.1.6 This domain has moved to example.net" }
//!   - { kind: error, name: frozen, reply: "451 4.3.2 Deliveries to this domain are paused" }
//! ```
//!
//! The reply is written as on the wire: a 4yz or 5yz code, an optional enhanced status code
//! whose class matches, and text ([`parse_fixed_reply`]); anything else is a configuration
//! error at load time.

use postern_proto::reply::{EnhancedCode, Reply, ReplyCode, ReplyParser, Severity};
use serde::Deserializer;

use super::message::{Recipient, Report};
use super::trouble::Outcome;
use crate::config::units::Invalid;

/// Every recipient delivered with `250 2.0.0 discarded`.
pub fn discard<F: FnMut(usize, &Outcome)>(recipients: &[Recipient], on_outcome: &mut F) -> Report {
    let reply = Reply::new(ReplyCode::OK, Some(EnhancedCode::new(2, 0, 0)), "discarded");
    settle_all(recipients, &Outcome::Delivered(reply), on_outcome)
}

/// Every recipient refused with `reply`: deferred if it is a 4yz, bounced otherwise (a reply
/// that is not a failure, which configuration never lets through, bounces too rather than
/// counting as delivered).
pub fn refuse<F: FnMut(usize, &Outcome)>(
    reply: &Reply,
    recipients: &[Recipient],
    on_outcome: &mut F,
) -> Report {
    let outcome = if reply.is_transient() {
        Outcome::Deferred(reply.clone())
    } else {
        Outcome::Bounced(reply.clone())
    };
    settle_all(recipients, &outcome, on_outcome)
}

/// Gives every recipient the same outcome, reporting each through `on_outcome`.
pub fn settle_all<F: FnMut(usize, &Outcome)>(
    recipients: &[Recipient],
    outcome: &Outcome,
    on_outcome: &mut F,
) -> Report {
    let outcomes = recipients
        .iter()
        .map(|r| {
            on_outcome(r.index, outcome);
            (r.index, outcome.clone())
        })
        .collect();
    Report {
        outcomes,
        trouble: None,
        ..Report::default()
    }
}

/// Parses a configured reply such as `550 5.7.1 Relaying to this domain is closed`: one line,
/// a 4yz or 5yz code, an optional enhanced status code of the same class.
pub fn parse_fixed_reply(s: &str) -> Result<Reply, Invalid> {
    let s = s.trim();
    if s.contains(['\r', '\n']) {
        return Err("a reply is one line".into());
    }
    let mut parser = ReplyParser::default();
    parser.handle_input(s.as_bytes());
    parser.handle_input(b"\r\n");
    let Ok(Some(reply)) = parser.poll_reply() else {
        return Err(format!("`{s}` is not a reply like \"550 5.7.1 text\"").into());
    };
    if !matches!(
        reply.severity(),
        Severity::TransientNegative | Severity::PermanentNegative
    ) {
        return Err(format!("`{s}`: the reply must be a 4yz or a 5yz").into());
    }
    // The parser keeps an enhanced code of another class as text.
    if let (None, Some((e, _))) = (reply.enhanced(), EnhancedCode::parse_prefix(&reply.text())) {
        return Err(format!(
            "`{s}`: the enhanced status code {e} does not match the reply code's class"
        )
        .into());
    }
    if reply.text().trim().is_empty() {
        return Err(format!("`{s}`: the reply needs a text").into());
    }
    Ok(reply)
}

/// serde: a [`parse_fixed_reply`] string.
pub fn deserialize_fixed_reply<'de, D: Deserializer<'de>>(d: D) -> Result<Reply, D::Error> {
    crate::config::units::parse_str(d, parse_fixed_reply, "a reply like \"550 5.7.1 text\"")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use postern_proto::{ForwardPath, Mailbox, RcptParams};

    use super::*;

    fn rcpts(n: usize) -> Vec<Recipient> {
        (0..n)
            .map(|i| Recipient {
                index: i * 2,
                path: ForwardPath::Mailbox(Mailbox::parse(&format!("u{i}@example.org")).unwrap()),
                params: RcptParams::default(),
            })
            .collect()
    }

    #[test]
    fn discard_delivers_everyone_without_reading() {
        let mut seen = Vec::new();
        let report = discard(&rcpts(3), &mut |i, o: &Outcome| {
            seen.push((i, o.clone()));
        });
        assert_eq!(report.outcomes, seen);
        assert_eq!(seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 2, 4]);
        for (_, o) in &seen {
            let Outcome::Delivered(r) = o else {
                panic!("{o:?}")
            };
            assert_eq!(r.to_string(), "250 2.0.0 discarded");
        }
        assert!(report.trouble.is_none());
    }

    #[test]
    fn error_store_defers_or_bounces_by_class() {
        let bounce = parse_fixed_reply("550 5.1.6 Moved").unwrap();
        let report = refuse(&bounce, &rcpts(2), &mut |_, _: &Outcome| {});
        assert!(
            report.outcomes.iter().all(
                |(_, o)| matches!(o, Outcome::Bounced(r) if r.to_string() == "550 5.1.6 Moved")
            )
        );
        let defer = parse_fixed_reply("451 4.3.2 Paused").unwrap();
        let mut n = 0;
        let report = refuse(&defer, &rcpts(2), &mut |_, _: &Outcome| n += 1);
        assert_eq!(n, 2);
        assert!(
            report
                .outcomes
                .iter()
                .all(|(_, o)| matches!(o, Outcome::Deferred(r) if r.code().get() == 451))
        );
        assert_eq!(defer.enhanced(), Some(EnhancedCode::new(4, 3, 2)));
    }

    #[test]
    fn fixed_replies() {
        let r = parse_fixed_reply("  554 No thanks ").unwrap();
        assert_eq!(
            (r.code().get(), r.enhanced(), r.text()),
            (554, None, "No thanks".into())
        );
        for (bad, why) in [
            ("250 2.0.0 fine", "4yz or a 5yz"),
            ("354 go on", "4yz or a 5yz"),
            ("550 4.1.1 mixed", "does not match"),
            ("55 short", "not a reply"),
            ("hello", "not a reply"),
            ("550", "needs a text"),
            ("550 5.1.1", "needs a text"),
            ("550 a\nb", "one line"),
        ] {
            let err = parse_fixed_reply(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
