//! The edge front end over real sockets on 127.0.0.1: every reply the listener promises.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod common;

use std::io::Read;

use common::{Client, TestGateway, queue_id, start, start_with};

/// The stored message (body as spooled, Received: header included).
fn stored(gw: &TestGateway, id: &str) -> (postern::spool::Envelope, String) {
    let qid = id.parse().unwrap();
    let env = gw.gateway.spool.read_envelope(qid).unwrap();
    let mut body = Vec::new();
    gw.gateway
        .spool
        .open_body(qid)
        .unwrap()
        .read_to_end(&mut body)
        .unwrap();
    (env, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn accepts_and_stores_durably_with_received_header() {
    let gw = start().await;
    let mut c = gw.connect("smtp").await;
    let ehlo = c.hello().await;
    for ext in [
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "DSN",
        "CHUNKING",
    ] {
        assert!(
            ehlo.lines.iter().any(|l| l == ext),
            "{ext} missing: {ehlo:?}"
        );
    }
    assert!(
        !ehlo.lines.iter().any(|l| l == "STARTTLS"),
        "no TLS configured"
    );
    c.cmd("MAIL FROM:<sender@example.net> RET=HDRS ENVID=abc", 250)
        .await;
    c.cmd("RCPT TO:<alice@example.org> NOTIFY=FAILURE,DELAY", 250)
        .await;
    c.cmd("RCPT TO:<bob@example.org>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: hi\r\n\r\n..dotted\r\nbody\r\n.\r\n")
        .await;
    let r = c.reply().await;
    assert_eq!(r.code, 250);
    assert!(r.text().starts_with("2.0.0 Ok: queued as "), "{r:?}");
    let id = queue_id(&r);
    c.cmd("QUIT", 221).await;

    let (env, body) = stored(&gw, &id);
    assert_eq!(env.sender, "sender@example.net");
    assert_eq!(env.recipients.len(), 2);
    assert_eq!(env.recipients[0].address, "alice@example.org");
    assert!(env.recipients[0].params.notify.unwrap().delay);
    assert_eq!(env.params.envid.as_deref(), Some("abc"));
    assert!(
        body.starts_with(
            "Received: from client.test ([127.0.0.1])\r\n\tby mx.test (postern node 7) with ESMTP id "
        ),
        "{body}"
    );
    assert!(body.contains(&format!(" id {id}")), "{body}");
    assert!(
        body.ends_with("Subject: hi\r\n\r\n.dotted\r\nbody\r\n"),
        "{body}"
    );
    gw.gateway.stop().await;
}

#[tokio::test]
async fn a_large_message_and_the_next_one_pipelined_behind_it_are_stored_exactly() {
    // About 300 KiB of content in one write: the session reads it in growing pieces and
    // decodes it as it comes; the next transaction follows the dot in the same write.
    let gw = start().await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    let mut content = String::from("Subject: large\r\n\r\n");
    let mut n = 0;
    while content.len() < 300 << 10 {
        n += 1;
        if n % 7 == 0 {
            content.push_str(&format!(".line {n} starts with a dot\r\n"));
        } else {
            content.push_str(&format!("line {n} {}\r\n", "x".repeat(n % 90)));
        }
    }
    let stuffed = content.replace("\r\n.", "\r\n..");
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.cmd("DATA", 354).await;
    let mut wire = stuffed.into_bytes();
    wire.extend_from_slice(b".\r\nMAIL FROM:<>\r\nRCPT TO:<y@example.org>\r\nDATA\r\n");
    c.send(&wire).await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    let first = queue_id(&r);
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.reply().await.code, 354);
    c.send(b"Subject: small\r\n\r\n..after\r\n.\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    let second = queue_id(&r);
    c.cmd("QUIT", 221).await;

    let (_, body) = stored(&gw, &first);
    let (_, received) = body.split_once("Subject: large").unwrap();
    assert!(
        format!("Subject: large{received}") == content,
        "the large message was stored changed ({} octets stored, {} sent)",
        received.len() + 14,
        content.len()
    );
    let (env, body) = stored(&gw, &second);
    assert_eq!(env.recipients[0].address, "y@example.org");
    assert!(body.ends_with("Subject: small\r\n\r\n.after\r\n"), "{body}");
    gw.gateway.stop().await;
}

#[tokio::test]
async fn pipelined_transactions_get_ordered_replies() {
    let gw = start().await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.send(
        b"MAIL FROM:<a@example.net>\r\nRCPT TO:<x@example.org>\r\nRCPT TO:<y@elsewhere.example>\r\nDATA\r\none\r\n.\r\n\
MAIL FROM:<>\r\nRCPT TO:<z@example.org>\r\nDATA\r\ntwo\r\n.\r\nQUIT\r\n",
    )
    .await;
    let codes: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..10 {
            v.push(c.reply().await.code);
        }
        v
    };
    assert_eq!(codes, [250, 250, 554, 354, 250, 250, 250, 354, 250, 221]);
    gw.gateway.stop().await;
}

#[tokio::test]
async fn never_an_open_relay() {
    let gw = start().await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.cmd("MAIL FROM:<spammer@example.net>", 250).await;
    for to in [
        "<victim@elsewhere.example>",
        "<victim@[192.0.2.1]>",
        "<@example.org:victim@elsewhere.example>",
        "<victim%elsewhere.example@[127.0.0.1]>",
    ] {
        let r = c.cmd(&format!("RCPT TO:{to}"), 554).await;
        assert!(r.text().starts_with("5.7.1"), "{to}: {r:?}");
    }
    let r = c.cmd("DATA", 554).await;
    assert!(r.text().contains("No valid recipients"));
    let r = c.cmd("RCPT TO:<carol@corp.example>", 550).await;
    assert!(r.text().starts_with("5.1.1"), "authoritative domain: {r:?}");
    c.cmd("RCPT TO:<alice@corp.example>", 250).await;
    gw.gateway.stop().await;
}

#[tokio::test]
async fn trusted_networks_may_relay_through_the_relay_route() {
    let gw = start_with("    trusted_networks: [127.0.0.0/8]\n", "", "").await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.send_mail(
        "a@example.org",
        &["someone@elsewhere.example"],
        "Subject: out\r\n\r\nx",
    )
    .await;
    gw.gateway.stop().await;
}

#[tokio::test]
async fn smuggling_variants_stay_inside_one_message() {
    let gw = start().await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: s\r\n\r\na\n.\nMAIL FROM:<e@x>\r\nb\r\n.\nRCPT TO:<v@example.org>\r\nc\r.\rDATA\r\nd\n.\r\n").await;
    c.send(b"e\r\n.\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    let (_, body) = stored(&gw, &queue_id(&r));
    assert!(
        body.contains("MAIL FROM:<e@x>") && body.contains("RCPT TO:<v@example.org>"),
        "{body}"
    );
    assert!(
        !body.contains('\n') || !body.replace("\r\n", "").contains('\n'),
        "bare LF normalised: {body:?}"
    );
    c.cmd("NOOP", 250).await;
    gw.gateway.stop().await;
}

#[tokio::test]
async fn bare_line_endings_can_be_rejected() {
    let gw = start_with("    bare_line_endings: reject\n", "", "").await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"a\nb\r\n.\r\n").await;
    let r = c.reply().await;
    assert_eq!(
        (r.code, r.text().starts_with("5.5.2")),
        (550, true),
        "{r:?}"
    );
    gw.gateway.stop().await;
}

#[tokio::test]
async fn size_limit_at_mail_and_while_receiving() {
    let gw = start_with("    max_message_size: 1KiB\n", "", "").await;
    let mut c = gw.connect("smtp").await;
    let ehlo = c.hello().await;
    assert!(ehlo.lines.iter().any(|l| l == "SIZE 1024"), "{ehlo:?}");
    let r = c.cmd("MAIL FROM:<a@example.net> SIZE=2048", 552).await;
    assert!(r.text().starts_with("5.3.4"));
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.cmd("DATA", 354).await;
    for _ in 0..100 {
        c.send(&[b'x'; 1000]).await;
        c.send(b"\r\n").await;
    }
    c.send(b".\r\n").await;
    let r = c.reply().await;
    assert_eq!(
        (r.code, r.text().starts_with("5.3.4")),
        (552, true),
        "{r:?}"
    );
    c.cmd("NOOP", 250).await;
    gw.gateway.stop().await;
}

#[tokio::test]
async fn overlong_lines_and_error_limit() {
    let gw = start_with("    max_errors: 3\n", "", "").await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    let long = format!("NOOP {}", "x".repeat(600));
    let r = c.cmd(&long, 500).await;
    assert!(r.text().starts_with("5.5.2"), "{r:?}");
    c.cmd("BOGUS", 500).await;
    c.line("BOGUS").await;
    assert_eq!(c.reply().await.code, 500);
    let r = c.reply().await;
    assert_eq!(
        (r.code, r.text().starts_with("4.7.0")),
        (421, true),
        "{r:?}"
    );
    assert!(c.closed().await);
    gw.gateway.stop().await;
}

#[tokio::test]
async fn recipient_limit() {
    let gw = start_with("    max_recipients: 2\n", "", "").await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.cmd("RCPT TO:<y@example.org>", 250).await;
    let r = c.cmd("RCPT TO:<z@example.org>", 452).await;
    assert!(r.text().starts_with("4.5.3"));
    gw.gateway.stop().await;
}

#[tokio::test]
async fn bdat_8bit_and_smtputf8() {
    let gw = start().await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.cmd("MAIL FROM:<a@example.net> BODY=BINARYMIME", 250)
        .await;
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.send(b"BDAT 9\r\nSubject: ").await;
    assert_eq!(c.reply().await.code, 250);
    c.send(b"BDAT 7 LAST\r\n\xff\r\n\r\n.\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    let (_, body) = stored(&gw, &queue_id(&r));
    assert!(body.ends_with("Subject: \u{fffd}\r\n\r\n.\n"), "{body:?}");

    c.cmd(
        "MAIL FROM:<jöran@bücher.example> SMTPUTF8 BODY=8BITMIME",
        250,
    )
    .await;
    c.cmd("RCPT TO:<ünïcode@example.org>", 250).await;
    c.cmd("DATA", 354).await;
    c.send("Subject: grüße\r\n\r\nhällo\r\n.\r\n".as_bytes())
        .await;
    let r = c.reply().await;
    assert_eq!(r.code, 250);
    let (env, body) = stored(&gw, &queue_id(&r));
    assert_eq!(env.sender, "jöran@bücher.example");
    assert!(env.params.smtputf8);
    assert!(body.contains("hällo"));
    let r = c.cmd("MAIL FROM:<jöran@bücher.example>", 553).await;
    assert!(r.text().starts_with("5.6.7"));
    gw.gateway.stop().await;
}

#[tokio::test]
async fn mail_loops_are_refused() {
    let gw = start().await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.cmd("DATA", 354).await;
    c.send("Received: from a by b; now\r\n".repeat(51).as_bytes())
        .await;
    c.send(b"\r\nbody\r\n.\r\n").await;
    let r = c.reply().await;
    assert_eq!(
        (r.code, r.text().starts_with("5.4.6")),
        (554, true),
        "{r:?}"
    );
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.cmd("DATA", 354).await;
    c.send("Received: from a by b; now\r\n".repeat(50).as_bytes())
        .await;
    c.send(b"\r\nbody\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250, "50 hops are allowed");
    gw.gateway.stop().await;
}

#[tokio::test]
async fn spool_below_its_floor_answers_452_at_mail() {
    let gw = start_with("", "", "").await;
    drop(gw);
    let dir = tempfile::tempdir().unwrap();
    let text =
        common::yaml(dir.path(), "", "", "").replace("min_free: 0", "min_free: 100000000GiB");
    let config = postern::config::Config::parse(&text, "t").unwrap();
    let gateway = postern::gateway::Gateway::start(config).await.unwrap();
    let mut c = Client::connect(gateway.address("smtp").unwrap()).await;
    c.hello().await;
    let r = c.cmd("MAIL FROM:<a@example.net>", 452).await;
    assert!(r.text().starts_with("4.3.1"), "{r:?}");
    gateway.stop().await;
}

#[tokio::test]
async fn connection_limits_answer_421() {
    let gw = start_with("    max_connections: 2\n", "", "").await;
    let mut a = gw.connect("smtp").await;
    let mut b = gw.connect("smtp").await;
    a.hello().await;
    b.hello().await;
    let mut c = gw.connect("smtp").await;
    let r = c.reply().await;
    assert_eq!(
        (r.code, r.text().starts_with("4.7.0")),
        (421, true),
        "{r:?}"
    );
    assert!(c.closed().await);
    a.cmd("QUIT", 221).await;
    assert!(a.closed().await);
    // The slot is free again (the session ends shortly after QUIT).
    let mut ok = false;
    for _ in 0..50 {
        let mut d = gw.connect("smtp").await;
        if d.reply().await.code == 220 {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok, "a slot should free up after QUIT");
    gw.gateway.stop().await;

    let gw = start_with("    max_connections_per_ip: 1\n", "", "").await;
    let mut a = gw.connect("smtp").await;
    a.hello().await;
    let mut b = gw.connect("smtp").await;
    assert_eq!(b.reply().await.code, 421);
    gw.gateway.stop().await;
}

#[tokio::test]
async fn idle_and_slowloris_clients_are_dropped() {
    let gw = start_with("    timeouts: { command: 1s, data: 1s }\n", "", "").await;
    let mut idle = gw.connect("smtp").await;
    idle.hello().await;
    let r = idle.reply().await;
    assert_eq!(
        (r.code, r.text().starts_with("4.4.2")),
        (421, true),
        "{r:?}"
    );
    assert!(idle.closed().await);

    let mut slow = gw.connect("smtp").await;
    slow.hello().await;
    slow.cmd("MAIL FROM:<a@example.net>", 250).await;
    slow.cmd("RCPT TO:<x@example.org>", 250).await;
    slow.cmd("DATA", 354).await;
    slow.send(b"Subject: slow\r\n").await;
    let r = slow.reply().await;
    assert_eq!(r.code, 421, "{r:?}");
    assert!(slow.closed().await);
    gw.gateway.stop().await;
}

#[tokio::test]
async fn lmtp_listener_replies_per_recipient() {
    let gw = start_with(
        "",
        "  - name: lmtp\n    address: 127.0.0.1:0\n    protocol: lmtp\n",
        "",
    )
    .await;
    let mut c = gw.connect("lmtp").await;
    let r = c.reply().await;
    assert!(r.text().contains("LMTP"), "{r:?}");
    c.cmd("EHLO x", 500).await;
    c.cmd("LHLO gw.test", 250).await;
    c.send(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<x@example.org>\r\nRCPT TO:<nobody@corp.example>\r\nRCPT TO:<y@example.org>\r\nDATA\r\n").await;
    let codes: Vec<u16> = [
        c.reply().await.code,
        c.reply().await.code,
        c.reply().await.code,
        c.reply().await.code,
        c.reply().await.code,
    ]
    .into();
    assert_eq!(codes, [250, 250, 550, 250, 354]);
    c.send(b"Subject: l\r\n\r\nx\r\n.\r\n").await;
    let first = c.reply().await;
    let second = c.reply().await;
    assert_eq!((first.code, second.code), (250, 250));
    assert_eq!(
        queue_id(&first),
        queue_id(&second),
        "one spooled copy, one reply per recipient"
    );
    gw.gateway.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_transaction_in_flight() {
    let gw = start().await;
    let mut busy = gw.connect("smtp").await;
    busy.hello().await;
    busy.cmd("MAIL FROM:<a@example.net>", 250).await;
    busy.cmd("RCPT TO:<x@example.org>", 250).await;
    busy.cmd("DATA", 354).await;
    busy.send(b"Subject: in flight\r\n\r\n").await;
    let mut idle = gw.connect("smtp").await;
    idle.hello().await;
    let addr = gw.addr("smtp");
    let token = gw.gateway.shutdown_token();
    token.cancel();
    let r = idle.reply().await;
    assert_eq!(
        (r.code, r.text().starts_with("4.3.2")),
        (421, true),
        "idle session told to go: {r:?}"
    );
    busy.send(b"still here\r\n.\r\n").await;
    let r = busy.reply().await;
    assert_eq!(r.code, 250, "the transaction in flight completes: {r:?}");
    let id = queue_id(&r);
    let r = busy.reply().await;
    assert_eq!(r.code, 421, "then the session is closed: {r:?}");
    let (_, body) = stored(&gw, &id);
    assert!(body.ends_with("still here\r\n"));
    let TestGateway { gateway, dir } = gw;
    gateway.wait().await;
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "no longer accepting"
    );
    drop(dir);
}

#[tokio::test]
async fn metrics_endpoint_exports_the_listener_metrics() {
    let gw = start().await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.send_mail("a@example.net", &["x@example.org"], "Subject: m\r\n\r\nx")
        .await;
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<v@elsewhere.example>", 554).await;
    let mut s = tokio::net::TcpStream::connect(gw.gateway.metrics_address)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    for name in [
        "postern_connections_total{listener=\"smtp\",outcome=\"accepted\"}",
        "postern_messages_accepted_total{listener=\"smtp\"}",
        "postern_recipients_rejected_total{listener=\"smtp\",reason=\"relay\"}",
        "postern_accept_latency_seconds_bucket",
        "postern_received_bytes_total",
        "postern_build_info",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    gw.gateway.stop().await;
}

#[tokio::test]
async fn spool_errors_answer_4xx_and_leave_nothing_behind() {
    let gw = start().await;
    let spool = gw.gateway.spool.clone();
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    let before = spool.len();
    // EIO on every append: the message cannot be stored.
    spool.inject_errors(postern::spool::fault::EIO, 0);
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(&b"Subject: doomed\r\n\r\n".repeat(10_000)).await;
    c.send(b".\r\n").await;
    let r = c.reply().await;
    assert_eq!(
        (r.code, r.text().starts_with("4.3.0")),
        (451, true),
        "{r:?}"
    );
    // EIO on the fdatasync: the commit fails, the message is withdrawn.
    spool.inject_errors(0, postern::spool::fault::EIO);
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: doomed too\r\n\r\nx\r\n.\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 451, "{r:?}");
    assert_eq!(
        spool.len(),
        before,
        "no partial or withdrawn message is left live"
    );
    // ENOSPC: 452 4.3.1.
    spool.inject_errors(postern::spool::fault::ENOSPC, 0);
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: no room\r\n\r\nx\r\n.\r\n").await;
    let r = c.reply().await;
    assert_eq!(
        (r.code, r.text().starts_with("4.3.1")),
        (452, true),
        "disk full: {r:?}"
    );
    // The disk recovers: mail flows again on the same connection.
    spool.inject_errors(0, 0);
    c.send_mail(
        "a@example.net",
        &["x@example.org"],
        "Subject: fine\r\n\r\nx",
    )
    .await;
    assert_eq!(spool.len(), before + 1);
    gw.gateway.stop().await;
}
