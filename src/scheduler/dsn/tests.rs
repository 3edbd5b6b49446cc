//! Tests of delivery status notifications: who is owed one and what it says.

use postern_proto::params::Notify;

use super::*;

const BODY: &[u8] = b"From: a@example.org\r\nSubject: hello\r\n\r\nline one\r\nline two\r\n";

fn envelope(notify: Option<Notify>) -> Envelope {
    Envelope {
        sender: "a@example.org".into(),
        params: MailParams {
            envid: Some("ENV-42".into()),
            ..MailParams::default()
        },
        recipients: vec![
            EnvelopeRecipient {
                address: "b@example.net".into(),
                params: RcptParams {
                    notify,
                    orcpt: Some(Orcpt {
                        addr_type: "rfc822".into(),
                        address: "B@Example.NET".into(),
                    }),
                },
            },
            EnvelopeRecipient {
                address: "c@example.net".into(),
                params: RcptParams {
                    notify,
                    orcpt: None,
                },
            },
        ],
        received_at: UNIX_EPOCH + Duration::from_secs(1_764_000_000),
        client: "x".into(),
    }
}

fn bounced(r: &str) -> RecipientState {
    RecipientState::Bounced { reply: r.into() }
}

fn delivered() -> RecipientState {
    RecipientState::Delivered {
        reply: "250 2.0.0 Ok".into(),
    }
}

fn render_str(env: &Envelope, rcpts: &[DsnRecipient]) -> String {
    let report = DsnReport {
        hostname: "gw.example",
        qid: QueueId::new(1_764_000_000_000_000, 1),
        envelope: env,
        recipients: rcpts,
        now: env.received_at + Duration::from_secs(60),
        maximal_lifetime: Duration::from_secs(5 * 86_400),
    };
    let r = render(&report, &mut &BODY[..], BODY.len() as u64).unwrap();
    String::from_utf8(r.content).unwrap()
}

#[test]
fn owes_final_agrees_with_owed() {
    let mut notifies = vec![None];
    for bits in 0..16u8 {
        notifies.push(Some(Notify {
            never: bits & 1 != 0,
            success: bits & 2 != 0,
            failure: bits & 4 != 0,
            delay: bits & 8 != 0,
        }));
    }
    for notify in notifies {
        for sender in ["", "a@example.org"] {
            let mut env = envelope(notify);
            env.sender = sender.into();
            for state in [delivered(), bounced("550 5.1.1 no")] {
                let states = [state.clone(), RecipientState::Pending];
                // From <>: no DSN, but a bounce owes a double bounce.
                let want = !owed(&env, &states, DsnKind::Final).is_empty()
                    || (sender.is_empty() && state.is_final() && state != delivered());
                assert_eq!(
                    owes_final(&env, 0, &state),
                    want,
                    "{notify:?} sender {sender:?} {state:?}"
                );
            }
        }
    }
}

#[test]
fn bounce_for_a_permanent_failure() {
    let env = envelope(None);
    let states = [
        bounced("550 5.1.1 <b@example.net>: user unknown"),
        delivered(),
    ];
    let rcpts = owed(&env, &states, DsnKind::Final);
    assert_eq!(rcpts.len(), 1, "no success DSN without NOTIFY=SUCCESS");
    let text = render_str(&env, &rcpts);
    for want in [
        "From: MAILER-DAEMON@gw.example (Mail Delivery System)\r\n",
        "To: <a@example.org>\r\n",
        "Subject: Undelivered Mail Returned to Sender\r\n",
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"",
        "Auto-Submitted: auto-replied\r\n",
        "Content-Type: message/delivery-status\r\n",
        "Reporting-MTA: dns; gw.example\r\n",
        "Original-Envelope-Id: ENV-42\r\n",
        "Final-Recipient: rfc822; b@example.net\r\n",
        "Original-Recipient: rfc822;B@Example.NET\r\n",
        "Action: failed\r\n",
        "Status: 5.1.1\r\n",
        "Diagnostic-Code: smtp; 550 5.1.1 <b@example.net>: user unknown\r\n",
        "Content-Type: message/rfc822\r\n\r\nFrom: a@example.org\r\n",
        "line two\r\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    assert!(!text.contains("c@example.net"));
    assert!(text.ends_with("--\r\n"));
    let boundary = text
        .split("boundary=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    assert_eq!(text.matches(&format!("--{boundary}\r\n")).count(), 3);
    assert_eq!(text.matches(&format!("--{boundary}--\r\n")).count(), 1);
}

#[test]
fn ret_hdrs_returns_headers_only() {
    let mut env = envelope(None);
    env.params.ret = Some(Ret::Headers);
    let rcpts = owed(
        &env,
        &[bounced("550 5.7.1 no"), bounced("554 no")],
        DsnKind::Final,
    );
    let text = render_str(&env, &rcpts);
    assert!(text.contains(
        "Content-Type: text/rfc822-headers\r\n\r\nFrom: a@example.org\r\nSubject: hello\r\n\r\n--"
    ));
    assert!(!text.contains("line one"));
    assert!(text.contains("Status: 5.7.1\r\n"));
    assert!(
        text.contains("Status: 5.0.0\r\n"),
        "no enhanced code: the class"
    );
}

#[test]
fn success_dsn_for_notify_success() {
    let notify = Notify {
        success: true,
        failure: true,
        ..Notify::default()
    };
    let env = envelope(Some(notify));
    let rcpts = owed(&env, &[delivered(), delivered()], DsnKind::Final);
    assert_eq!(rcpts.len(), 2);
    let text = render_str(&env, &rcpts);
    assert!(text.contains("Subject: Successful Mail Delivery Report\r\n"));
    assert_eq!(text.matches("Action: delivered\r\n").count(), 2);
    assert!(text.contains("Status: 2.0.0\r\n"));
    assert!(
        text.contains("Content-Type: text/rfc822-headers\r\n"),
        "headers only for success"
    );
    assert!(!text.contains("line one"));
}

#[test]
fn none_for_never_or_the_null_sender() {
    let never = Notify {
        never: true,
        ..Notify::default()
    };
    let env = envelope(Some(never));
    assert!(owed(&env, &[bounced("550 x"), bounced("550 x")], DsnKind::Final).is_empty());
    let only_success = Notify {
        success: true,
        ..Notify::default()
    };
    let env = envelope(Some(only_success));
    assert!(owed(&env, &[bounced("550 x"), bounced("550 x")], DsnKind::Final).is_empty());
    let mut env = envelope(None);
    env.sender.clear();
    assert!(owed(&env, &[bounced("550 x"), bounced("550 x")], DsnKind::Final).is_empty());
}

#[test]
fn expired_and_delayed() {
    let env = envelope(None);
    let states = [
        bounced("451 4.4.1 store down"),
        RecipientState::Deferred {
            until: UNIX_EPOCH,
            reply: "451 4.2.0 locked".into(),
        },
    ];
    let text = render_str(&env, &owed(&env, &states, DsnKind::Final));
    assert!(text.contains("Action: failed\r\nStatus: 4.4.1\r\n"));
    assert!(text.contains("(delivery time expired)"));
    let delayed = owed(&env, &states, DsnKind::Delay);
    assert_eq!(delayed.len(), 1);
    let text = render_str(&env, &delayed);
    assert!(text.contains("Subject: Delayed Mail (still being retried)\r\n"));
    assert!(text.contains("Action: delayed\r\nStatus: 4.2.0\r\nWill-Retry-Until: "));
}

#[test]
fn large_messages_return_headers_and_utf8_uses_global_types() {
    let mut env = envelope(None);
    env.params.smtputf8 = true;
    let rcpts = owed(&env, &[bounced("550 5.1.1 x"), delivered()], DsnKind::Final);
    let report = DsnReport {
        hostname: "gw.example",
        qid: QueueId::new(1, 1),
        envelope: &env,
        recipients: &rcpts,
        now: env.received_at,
        maximal_lifetime: Duration::from_secs(1),
    };
    let r = render(&report, &mut &BODY[..], RETURN_SIZE_LIMIT + 1).unwrap();
    let text = String::from_utf8(r.content).unwrap();
    assert!(text.contains("Content-Type: message/global-delivery-status\r\n"));
    assert!(text.contains("Content-Type: message/global-headers\r\n"));
    assert!(!text.contains("line one"));
}

#[test]
fn status_parsing() {
    assert_eq!(status_of("550 5.1.1 unknown"), "5.1.1");
    assert_eq!(status_of("452 4.2.2 over quota"), "4.2.2");
    assert_eq!(status_of("550 user unknown"), "5.0.0");
    assert_eq!(status_of("421 closing"), "4.0.0");
    assert_eq!(status_of("250 2.1.5.9 x"), "2.0.0");
    assert_eq!(reply_code("451 4.4.1 x"), 451);
    assert_eq!(reply_code("xyz"), 0);
}
