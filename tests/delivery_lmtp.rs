//! The LMTP delivery agent and its pool against the scripted fake store (`fake_lmtp`):
//! per-recipient results as they arrive, multi-line replies, in-doubt recipients, timeouts,
//! capability refusals, DATA and BDAT, pipelining, STARTTLS and AUTH. (The pool:
//! `delivery_lmtp_pool.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod delivery_common;
mod fake_lmtp;

use std::sync::Arc;
use std::time::Duration;

use delivery_common::lmtp::{BODY, config, deliver_once, rcpts, store};
use delivery_common::{by_index, envelope, rcpt};
use fake_lmtp::{FakeStore, Rcpt, Script};
use postern::config::{ByteSize, Span};
use postern::delivery::config::{NormalizeRule, StoreAuthConfig, StoreTlsConfig, TlsMode, TreatAs};
use postern::delivery::{Outcome, Scope, StorePool};
use tokio::sync::Semaphore;

#[tokio::test]
async fn mixed_results_arrive_one_by_one() {
    let gate = Arc::new(Semaphore::new(0));
    let cyrus_unknown = "550-Mailbox unknown.  Either there is no mailbox associated with this\r\n\
                         550-name or you do not have authorization to see it.\r\n\
                         550 5.1.1 User unknown";
    let script = Script {
        gate: Some(Arc::clone(&gate)),
        ..Script::default()
    }
    .rcpt(
        "quota",
        Rcpt::new("250 2.1.5 OK", "552 5.2.2 Quota exceeded"),
    )
    .rcpt("busy", Rcpt::new("451 4.3.0 Try later", ""))
    .rcpt("gone", Rcpt::new(cyrus_unknown, ""))
    .rcpt(
        "late",
        Rcpt::new("250 2.1.5 OK", "451 4.2.0 Mailbox locked"),
    )
    .rcpt(
        "multi",
        Rcpt::new("250 2.1.5 OK", "250-2.0.0 first line\r\n250 2.0.0 Saved"),
    );
    let fake = FakeStore::start(script).await;
    let c = config(fake.addr);
    let to = rcpts(&["alice", "quota", "busy", "gone", "late", "multi"]);
    let mut conn = store(&c).connect().await.unwrap();
    let mut order = Vec::new();
    let report = conn
        .deliver(&envelope(BODY), &to, BODY, &mut |i, o: &Outcome| {
            order.push(i);
            // The fake sends the next post-dot reply only once this one was reported.
            if matches!(i, 0 | 1 | 4) {
                gate.add_permits(1);
            }
            let _ = o;
        })
        .await;
    assert_eq!(
        by_index(&report, 6),
        [
            "delivered 250 2.0.0",
            "bounced 552 5.2.2",
            "deferred 451 4.3.0",
            "bounced 550 5.1.1",
            "deferred 451 4.2.0",
            "delivered 250 2.0.0",
        ]
    );
    // RCPT refusals first (in RCPT order), then the post-dot replies in RCPT order.
    assert_eq!(order, [2, 3, 0, 1, 4, 5]);
    assert_eq!(report.scope(), Scope::Recipient);
    let gone = report.outcome(3).unwrap().reply().unwrap();
    assert_eq!(
        gone.lines().len(),
        3,
        "multi-line reply kept whole: {gone:?}"
    );
    assert!(conn.is_usable());
    let txns = fake.transactions();
    assert_eq!(txns.len(), 1);
    assert!(txns[0].pipelined, "MAIL, RCPT and DATA in one flush");
    assert_eq!(txns[0].content, BODY);
    assert_eq!(
        txns[0].mail, "MAIL FROM:<sender@example.org>",
        "no SIZE/BODY: not advertised or needed"
    );
}

#[tokio::test]
async fn data_is_dot_stuffed_and_lines_end_in_crlf() {
    let fake = FakeStore::start(Script::default()).await;
    let body = b"Subject: dots\r\n\r\n.hidden\r\n..two\nbare lf\n.\r\nend";
    let (report, _) = deliver_once(&config(fake.addr), &envelope(body), &rcpts(&["a"]), body).await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
    let t = &fake.transactions()[0];
    assert_eq!(
        t.wire,
        b"Subject: dots\r\n\r\n..hidden\r\n...two\r\nbare lf\r\n..\r\nend\r\n"
    );
    assert_eq!(
        t.content,
        b"Subject: dots\r\n\r\n.hidden\r\n..two\r\nbare lf\r\n.\r\nend\r\n"
    );
}

#[tokio::test]
async fn a_body_lent_whole_goes_out_in_blocks_intact() {
    // The agent encodes the body's own buffer 64 KiB at a time: a CR LF and a leading dot
    // fall on those boundaries here, and the body (about 200 KiB) comes in one buffer.
    const BLOCK: usize = 64 * 1024;
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let mut line = 0;
    while body.len() < 3 * BLOCK + 500 {
        let at = body.len();
        if at < BLOCK - 1 && at + 80 >= BLOCK - 1 {
            // A line whose CR is the last octet of the first block.
            body.resize(BLOCK - 1, b'x');
            body.extend_from_slice(b"\r\n");
        } else if at < 2 * BLOCK && at + 80 >= 2 * BLOCK {
            // A line that starts with a dot exactly at the second boundary.
            body.resize(2 * BLOCK - 2, b'y');
            body.extend_from_slice(b"\r\n.dot at the boundary\r\n");
        } else {
            line += 1;
            body.extend_from_slice(
                format!("line {line} of the body, .not at the start\r\n").as_bytes(),
            );
        }
    }
    body.extend_from_slice(b".\r\n..\r\nend\r\n");
    assert_eq!(&body[BLOCK - 1..BLOCK + 1], b"\r\n");
    assert_eq!(&body[2 * BLOCK..2 * BLOCK + 4], b".dot");
    let fake = FakeStore::start(Script::default()).await;
    let body = &body[..];
    let (report, _) = deliver_once(&config(fake.addr), &envelope(body), &rcpts(&["a"]), body).await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
    let t = &fake.transactions()[0];
    assert!(t.content == body, "the content arrived changed");
    let dots = body
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"."))
        .count();
    assert_eq!(
        t.wire.len(),
        body.len() + dots,
        "every line that starts with a dot is stuffed once"
    );
}

#[tokio::test]
async fn lost_after_the_dot_leaves_the_rest_in_doubt() {
    let script = Script {
        drop_after_replies: Some(1),
        ..Script::default()
    }
    .rcpt("refused", Rcpt::new("550 5.1.1 No such user", ""));
    let fake = FakeStore::start(script).await;
    let to = rcpts(&["a", "refused", "b", "c"]);
    let (report, _) = deliver_once(&config(fake.addr), &envelope(BODY), &to, BODY).await;
    assert_eq!(
        by_index(&report, 4),
        [
            "delivered 250 2.0.0",
            "bounced 550 5.1.1",
            "in-doubt",
            "in-doubt"
        ]
    );
    let trouble = report.trouble.unwrap();
    assert_eq!(trouble.scope, Scope::Connection);
    assert!(trouble.detail.contains("in doubt"), "{trouble}");
}

#[tokio::test]
async fn lost_before_the_dot_is_not_attempted() {
    for verb in ["RCPT", "DATA"] {
        let fake = FakeStore::start(Script {
            drop_at: Some(verb),
            pipelining: false,
            ..Script::default()
        })
        .await;
        let to = rcpts(&["a", "b"]);
        let (report, _) = deliver_once(&config(fake.addr), &envelope(BODY), &to, BODY).await;
        assert_eq!(
            by_index(&report, 2),
            ["not-attempted", "not-attempted"],
            "dropped at {verb}: a retry is safe"
        );
        assert_eq!(report.scope(), Scope::Connection);
    }
}

#[tokio::test]
async fn slow_reply_hits_the_end_of_data_timeout() {
    let script = Script {
        stall_after_replies: Some(1),
        ..Script::default()
    };
    let fake = FakeStore::start(script).await;
    let mut c = config(fake.addr);
    c.timeouts.end_of_data = Span(Duration::from_secs(1));
    let mut conn = store(&c).connect().await.unwrap();
    let to = rcpts(&["a", "b", "c"]);
    let report = conn
        .deliver(&envelope(BODY), &to, BODY, &mut |_, _: &Outcome| {})
        .await;
    assert_eq!(
        by_index(&report, 3),
        ["delivered 250 2.0.0", "in-doubt", "in-doubt"]
    );
    let trouble = report.trouble.unwrap();
    assert_eq!(trouble.scope, Scope::Connection);
    assert!(trouble.detail.contains("end of data"), "{trouble}");
    assert!(!conn.is_usable());
    // A broken connection takes no new transaction: nothing is attempted.
    let again = conn
        .deliver(&envelope(BODY), &to[..1], BODY, &mut |_, _: &Outcome| {})
        .await;
    assert_eq!(by_index(&again, 1), ["not-attempted"]);
}

#[tokio::test]
async fn greeting_421_beyond_max_sessions_counts_against_the_store() {
    let script = Script {
        max_sessions: Some(1),
        ..Script::default()
    };
    let fake = FakeStore::start(script).await;
    let s = store(&config(fake.addr));
    let first = s.connect().await.unwrap();
    let second = s.connect().await.unwrap_err();
    assert_eq!(second.scope, Scope::Store);
    assert_eq!(second.reply.unwrap().code().get(), 421);
    drop(first);
    assert_eq!(fake.sessions().iter().filter(|s| s.refused).count(), 1);
}

#[tokio::test]
async fn connection_refused_counts_against_the_store() {
    let unused = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = unused.local_addr().unwrap();
    drop(unused);
    let pool = StorePool::new(store(&config(addr)));
    let to = rcpts(&["a", "b"]);
    let report = pool
        .deliver(&envelope(BODY), &to, BODY, &mut |_, _: &Outcome| {})
        .await;
    assert_eq!(by_index(&report, 2), ["not-attempted", "not-attempted"]);
    assert_eq!(report.scope(), Scope::Store);
}

#[tokio::test]
async fn size_limit_bounces_before_sending() {
    let script = Script {
        size: Some(Some(1000)),
        ..Script::default()
    };
    let fake = FakeStore::start(script).await;
    let body = vec![b'x'; 1500];
    let to = rcpts(&["a", "b"]);
    let (report, _) = deliver_once(&config(fake.addr), &envelope(&body), &to, &body).await;
    assert_eq!(
        by_index(&report, 2),
        ["bounced 552 5.3.4", "bounced 552 5.3.4"]
    );
    assert_eq!(report.scope(), Scope::Message);
    assert_eq!(fake.sessions()[0].count("MAIL"), 0, "nothing sent");

    // Under the limit, SIZE= is declared.
    let (report, _) = deliver_once(&config(fake.addr), &envelope(BODY), &to, BODY).await;
    assert_eq!(report.scope(), Scope::Recipient);
    let mail = &fake.transactions()[0].mail;
    assert_eq!(
        mail,
        &format!("MAIL FROM:<sender@example.org> SIZE={}", BODY.len())
    );
}

#[tokio::test]
async fn eight_bit_is_declared_when_offered() {
    let fake = FakeStore::start(Script::default()).await;
    let body = "Subject: caf\u{e9}\r\n\r\nx\r\n".as_bytes();
    let mut env = envelope(body);
    env.eight_bit = true;
    let (report, _) = deliver_once(&config(fake.addr), &env, &rcpts(&["a"]), body).await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
    assert!(fake.transactions()[0].mail.ends_with(" BODY=8BITMIME"));
    assert_eq!(fake.transactions()[0].content, body);
}

#[tokio::test]
async fn smtputf8_needed_and_not_offered() {
    let fake = FakeStore::start(Script::default()).await;
    let to = vec![rcpt(0, "j\u{f6}rg@example.org")];
    let (report, _) = deliver_once(&config(fake.addr), &envelope(BODY), &to, BODY).await;
    assert_eq!(by_index(&report, 1), ["bounced 554 5.6.7"]);
    assert_eq!(fake.sessions()[0].count("MAIL"), 0);

    let offered = FakeStore::start(Script {
        smtputf8: true,
        ..Script::default()
    })
    .await;
    let (report, _) = deliver_once(&config(offered.addr), &envelope(BODY), &to, BODY).await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
    assert!(offered.transactions()[0].mail.ends_with(" SMTPUTF8"));
}

#[tokio::test]
async fn bdat_in_chunks_when_chunking_is_offered() {
    for (pipelining, len, sizes) in [
        (true, 2500, vec![1000, 1000, 500]),
        (true, 2000, vec![1000, 1000]),
        (false, 2500, vec![1000, 1000, 500]),
        (true, 10, vec![10]),
    ] {
        let script = Script {
            chunking: true,
            pipelining,
            ..Script::default()
        }
        .rcpt(
            "quota",
            Rcpt::new("250 2.1.5 OK", "552 5.2.2 Quota exceeded"),
        );
        let fake = FakeStore::start(script).await;
        let mut c = config(fake.addr);
        c.chunk_size = ByteSize(1000);
        // Lines starting with a dot travel unstuffed in BDAT.
        let body: Vec<u8> = b".dot\r\n".iter().copied().cycle().take(len).collect();
        let to = rcpts(&["a", "quota"]);
        let (report, _) = deliver_once(&c, &envelope(&body), &to, &body).await;
        assert_eq!(
            by_index(&report, 2),
            ["delivered 250 2.0.0", "bounced 552 5.2.2"],
            "pipelining={pipelining} len={len}"
        );
        let t = &fake.transactions()[0];
        assert_eq!(t.bdat_sizes, sizes);
        assert_eq!(t.content, body);
        assert!(t.complete);
        assert_eq!(fake.sessions()[0].count("DATA"), 0);
        if pipelining {
            assert!(t.pipelined);
        }
    }
}

#[tokio::test]
async fn bdat_can_be_turned_off() {
    let fake = FakeStore::start(Script {
        chunking: true,
        ..Script::default()
    })
    .await;
    let mut c = config(fake.addr);
    c.chunking = false;
    let (report, _) = deliver_once(&c, &envelope(BODY), &rcpts(&["a"]), BODY).await;
    assert_eq!(report.scope(), Scope::Recipient);
    assert_eq!(fake.sessions()[0].count("DATA"), 1);
    assert_eq!(fake.sessions()[0].count("BDAT"), 0);
}

#[tokio::test]
async fn without_pipelining_one_command_at_a_time() {
    let script = Script {
        pipelining: false,
        ..Script::default()
    }
    .rcpt("x", Rcpt::new("550 5.1.1 unknown", ""));
    let fake = FakeStore::start(script).await;
    let to = rcpts(&["a", "x", "b"]);
    let (report, _) = deliver_once(&config(fake.addr), &envelope(BODY), &to, BODY).await;
    assert_eq!(
        by_index(&report, 3),
        [
            "delivered 250 2.0.0",
            "bounced 550 5.1.1",
            "delivered 250 2.0.0"
        ]
    );
}

#[tokio::test]
async fn every_recipient_refused_sends_no_body() {
    let script = Script::default()
        .rcpt("x", Rcpt::new("550 5.1.1 unknown", ""))
        .rcpt("y", Rcpt::new("452 4.2.2 Over quota", ""));
    let fake = FakeStore::start(script).await;
    let s = store(&config(fake.addr));
    let mut conn = s.connect().await.unwrap();
    let to = rcpts(&["x", "y"]);
    let report = conn
        .deliver(&envelope(BODY), &to, BODY, &mut |_, _: &Outcome| {})
        .await;
    assert_eq!(
        by_index(&report, 2),
        ["bounced 550 5.1.1", "deferred 452 4.2.2"]
    );
    assert_eq!(
        report.scope(),
        Scope::Recipient,
        "the 503 to DATA fails nobody"
    );
    assert!(
        conn.is_usable(),
        "the connection survives (RSET after the 503)"
    );
    let report = conn
        .deliver(
            &envelope(BODY),
            &rcpts(&["a"]),
            BODY,
            &mut |_, _: &Outcome| {},
        )
        .await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
}

#[tokio::test]
async fn mail_refused_is_the_message_or_the_store() {
    for (mail_reply, want, scope) in [
        ("552 5.3.4 Too big", "bounced 552 5.3.4", Scope::Message),
        ("451 4.3.0 Later", "deferred 451 4.3.0", Scope::Message),
        (
            "421 4.3.2 Shutting down",
            "not-attempted 421 4.3.2",
            Scope::Store,
        ),
    ] {
        let fake = FakeStore::start(Script {
            mail_reply: mail_reply.into(),
            ..Script::default()
        })
        .await;
        let (report, _) = deliver_once(
            &config(fake.addr),
            &envelope(BODY),
            &rcpts(&["a", "b"]),
            BODY,
        )
        .await;
        assert_eq!(by_index(&report, 2), [want, want], "{mail_reply}");
        assert_eq!(report.scope(), scope, "{mail_reply}");
    }
}

#[tokio::test]
async fn normalisation_table_turns_over_quota_into_a_deferral() {
    let script = Script::default().rcpt(
        "quota",
        Rcpt::new("250 2.1.5 OK", "552 5.2.2 Quota exceeded"),
    );
    let fake = FakeStore::start(script).await;
    let mut c = config(fake.addr);
    c.normalize = vec![NormalizeRule {
        code: Some(552),
        enhanced: Some("5.2.2".into()),
        treat_as: TreatAs::Temporary,
        max_age: Some(Span(Duration::from_secs(86_400))),
        until: None,
    }];
    let (report, _) = deliver_once(&c, &envelope(BODY), &rcpts(&["a", "quota"]), BODY).await;
    assert_eq!(
        by_index(&report, 2),
        ["delivered 250 2.0.0", "deferred 552 5.2.2"]
    );
}

fn tls_material(dir: &std::path::Path) -> (Arc<rustls::ServerConfig>, std::path::PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    (Arc::new(config), ca)
}

#[tokio::test]
async fn starttls_then_auth_plain() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = tls_material(dir.path());
    let script = Script {
        tls: Some(server),
        auth_plain: Some("AGFkbWluAHMzY3JldA==".into()), // \0admin\0s3cret
        ..Script::default()
    };
    let fake = FakeStore::start(script).await;
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let mut c = config(fake.addr);
    c.tls = Some(StoreTlsConfig {
        mode: TlsMode::Required,
        ca_file: Some(ca),
        insecure_skip_verify: false,
        server_name: Some("localhost".into()),
    });
    c.auth = Some(StoreAuthConfig {
        username: "admin".into(),
        password_file: pw.clone(),
    });
    let mut conn = store(&c).connect().await.unwrap();
    assert!(conn.is_tls());
    let report = conn
        .deliver(
            &envelope(BODY),
            &rcpts(&["a"]),
            BODY,
            &mut |_, _: &Outcome| {},
        )
        .await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
    let s = &fake.sessions()[0];
    assert!(s.tls && s.authenticated);
    assert_eq!(s.count("LHLO"), 2, "LHLO again over TLS");
    assert_eq!(s.transactions[0].content, BODY);

    // A wrong password is the store's trouble.
    std::fs::write(&pw, "wrong").unwrap();
    let err = store(&c).connect().await.unwrap_err();
    assert_eq!(err.scope, Scope::Store);
    assert_eq!(err.reply.unwrap().code().get(), 535);

    // insecure_skip_verify accepts the certificate under any name.
    let mut c = config(fake.addr);
    c.tls = Some(StoreTlsConfig {
        mode: TlsMode::Required,
        ca_file: None,
        insecure_skip_verify: true,
        server_name: Some("other.example".into()),
    });
    let conn = store(&c).connect().await.unwrap();
    assert!(conn.is_tls());
}

#[tokio::test]
async fn tls_required_but_not_offered() {
    let fake = FakeStore::start(Script::default()).await;
    let mut c = config(fake.addr);
    let mut tls = StoreTlsConfig {
        mode: TlsMode::Required,
        ca_file: None,
        insecure_skip_verify: true,
        server_name: None,
    };
    c.tls = Some(tls.clone());
    let err = store(&c).connect().await.unwrap_err();
    assert_eq!(err.scope, Scope::Store);
    assert!(err.detail.contains("STARTTLS"), "{err}");

    tls.mode = TlsMode::Opportunistic;
    c.tls = Some(tls);
    let conn = store(&c).connect().await.unwrap();
    assert!(!conn.is_tls());
}

#[tokio::test]
async fn a_file_body_is_streamed_per_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("msg");
    let mut file = b"HEADER-RECORD\n".to_vec();
    let offset = file.len() as u64;
    let content: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("line {i}\r\n").into_bytes())
        .collect();
    file.extend_from_slice(&content);
    std::fs::write(&path, &file).unwrap();
    let body = postern::delivery::FileBody {
        path,
        offset,
        len: content.len() as u64,
    };
    for chunking in [false, true] {
        let fake = FakeStore::start(Script {
            chunking,
            ..Script::default()
        })
        .await;
        let mut c = config(fake.addr);
        c.recipients_per_transaction = 1;
        let pool = StorePool::new(store(&c));
        let report = pool
            .deliver(
                &envelope(&content),
                &rcpts(&["a", "b"]),
                &body,
                &mut |_, _: &Outcome| {},
            )
            .await;
        assert_eq!(report.scope(), Scope::Recipient);
        let txns = fake.transactions();
        assert_eq!(txns.len(), 2);
        assert!(
            txns.iter().all(|t| t.content == content),
            "chunking={chunking}"
        );
    }
}
