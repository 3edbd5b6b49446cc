//! Per-store backpressure at RCPT: a store over `max_queued`, with a recipient older than
//! `max_oldest`, or down longer than `max_oldest`, gets `451 4.3.2` for its recipients while
//! another store's recipients in the same session get 250; it leaves backpressure when
//! drained. The store is tests/fake_lmtp with its post-dot replies held (a slow store).
//! Entering and leaving are logged and set `postern_store_backpressure{store}`: seen with
//! the real binary (tests/daemon), whose log lines and metrics are its own.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;
mod daemon;
mod fake_lmtp;

use std::time::{Duration, Instant};

use common::{Client, TestGateway, metric};
use daemon::{Daemon, Smtp, eventually, send_one};
use fake_lmtp::{FakeStore, Script};
use postern::config::Config;
use postern::gateway::Gateway;

async fn gateway(store_a: &str, backpressure: &str, delivery_extra: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "hostname: mx.test\nnode_id: 7\ndrain_timeout: 2s\ndelivery:\n  minimal_backoff: 1h\n{delivery_extra}spool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: a\n    kind: lmtp\n    address: {store_a}\n    backpressure: {backpressure}\n  - name: b\n    kind: discard\nroutes:\n  domains:\n    a.example: {{ store: a }}\n    b.example: {{ store: b }}\n",
        spool = dir.path().join("spool").display(),
    );
    let config = Config::parse(&text, "test.yaml").unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    let gateway = Gateway::start(config).await.unwrap();
    TestGateway { gateway, dir }
}

async fn session(gw: &TestGateway) -> Client {
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.cmd("MAIL FROM:<sender@remote.example>", 250).await;
    c
}

/// Asks RCPT for `to` in new sessions until the reply has `code` (at most 15 s); the reply.
async fn until(gw: &TestGateway, to: &str, code: u16) -> common::Reply {
    until_text(gw, to, code, "").await
}

/// [`until`], and the reply's text must contain `text`.
async fn until_text(gw: &TestGateway, to: &str, code: u16, text: &str) -> common::Reply {
    let start = Instant::now();
    loop {
        let mut c = session(gw).await;
        c.line(&format!("RCPT TO:<{to}>")).await;
        let r = c.reply().await;
        if r.code == code && r.text().contains(text) {
            return r;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "still {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn over_max_queued_refuses_that_store_only_until_drained() {
    let store = FakeStore::start(Script {
        hold_replies: true,
        ..Script::default()
    })
    .await;
    let gw = gateway(&store.addr.to_string(), "{ max_queued: 2 }", "").await;
    let mut c = session(&gw).await;
    c.cmd("RCPT TO:<one@a.example>", 250).await;
    c.cmd("RCPT TO:<two@a.example>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);

    let r = until(&gw, "three@a.example", 451).await;
    assert_eq!(r.text(), "4.3.2 Store a is backlogged: 2 recipients queued");
    // The same session: the other store's recipient is accepted, this store's is not.
    let mut c = session(&gw).await;
    c.cmd("RCPT TO:<three@a.example>", 451).await;
    c.cmd("RCPT TO:<someone@b.example>", 250).await;

    store.update(|s| s.hold_replies = false);
    until(&gw, "three@a.example", 250).await;
    assert_eq!(store.delivered_to().len(), 2);
    gw.gateway.stop().await;
}

/// The same with the real binary: entering backpressure is logged once (a warning naming
/// the condition), leaving it once, and the gauge is 1 in between, 0 before and after.
#[test]
fn entering_and_leaving_are_logged_once_each_and_set_the_gauge() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(FakeStore::start(Script {
        hold_replies: true,
        ..Script::default()
    }));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postern.yaml");
    std::fs::write(
        &config,
        format!(
            "hostname: mx.test\nnode_id: 7\ndrain_timeout: 1s\ndelivery:\n  minimal_backoff: 1h\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: a\n    kind: lmtp\n    address: {addr}\n    backpressure: {{ max_queued: 2 }}\n  - name: b\n    kind: discard\nroutes:\n  domains:\n    a.example: {{ store: a }}\n    b.example: {{ store: b }}\n",
            spool = dir.path().join("spool").display(),
            addr = store.addr,
        ),
    )
    .unwrap();
    let d = Daemon::start(&config);
    let gauge = || metric(&d.metrics(), "postern_store_backpressure{store=\"a\"}");
    assert_eq!(gauge(), Some(0.0), "registered at zero");
    let entering = "store in backpressure: its recipients get 451 4.3.2 at RCPT";
    let leaving = "store left backpressure: its recipients are accepted again";

    for to in ["one@a.example", "two@a.example"] {
        send_one(&d.addr, "sender@remote.example", to, "x", "body");
    }
    let line = eventually(Duration::from_secs(15), "the log line entering", || {
        d.log_lines(&[entering]).pop()
    });
    for want in [
        "\"level\":\"WARN\"",
        "\"store\":\"a\"",
        "\"queued\":2",
        "\"reason\":\"Store a is backlogged: 2 recipients queued\"",
    ] {
        assert!(line.contains(want), "{want} missing: {line}");
    }
    // The gauge is set before the line is written.
    assert_eq!(gauge(), Some(1.0), "in backpressure");
    let mut c = Smtp::connect(&d.addr).unwrap();
    c.send("MAIL FROM:<sender@remote.example>\r\nRCPT TO:<three@a.example>\r\n")
        .unwrap();
    assert!(c.reply().unwrap().starts_with("250"));
    let r = c.reply().unwrap();
    assert!(r.starts_with("451 4.3.2 "), "{r}");

    store.update(|s| s.hold_replies = false);
    let line = eventually(Duration::from_secs(15), "the log line leaving", || {
        d.log_lines(&[leaving]).pop()
    });
    for want in ["\"level\":\"INFO\"", "\"store\":\"a\""] {
        assert!(line.contains(want), "{want} missing: {line}");
    }
    assert_eq!(gauge(), Some(0.0), "out of backpressure");
    assert_eq!(d.log_lines(&[entering]).len(), 1, "entering logged once");
    assert_eq!(d.log_lines(&[leaving]).len(), 1, "leaving logged once");
    drop(d);
    drop(rt);
}

#[tokio::test]
async fn an_old_recipient_refuses_that_store_until_drained() {
    let store = FakeStore::start(Script {
        hold_replies: true,
        ..Script::default()
    })
    .await;
    let gw = gateway(&store.addr.to_string(), "{ max_oldest: 2s }", "").await;
    let mut c = session(&gw).await;
    c.cmd("RCPT TO:<one@a.example>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    // Young: accepted.
    let mut c = session(&gw).await;
    c.cmd("RCPT TO:<two@a.example>", 250).await;

    let r = until(&gw, "two@a.example", 451).await;
    assert!(
        r.text()
            .starts_with("4.3.2 Store a is backlogged: oldest queued recipient waiting "),
        "{r:?}"
    );
    let mut c = session(&gw).await;
    c.cmd("RCPT TO:<someone@b.example>", 250).await;

    store.update(|s| s.hold_replies = false);
    until(&gw, "two@a.example", 250).await;
    gw.gateway.stop().await;
}

#[tokio::test]
async fn a_store_down_longer_than_max_oldest_is_refused() {
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    };
    let gw = gateway(
        &dead,
        "{ max_oldest: 1s }",
        "  breaker: { failures: 1, probe_interval: 1h }\n",
    )
    .await;
    let mut c = session(&gw).await;
    c.cmd("RCPT TO:<one@a.example>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    // First its oldest recipient passes max_oldest; a tick later, the breaker's time too.
    let r = until_text(&gw, "two@a.example", 451, "is down").await;
    assert!(r.text().starts_with("4.3.2 Store a is down for "), "{r:?}");
    let mut c = session(&gw).await;
    c.cmd("RCPT TO:<someone@b.example>", 250).await;
    gw.gateway.stop().await;
}

/// A verifying store whose breaker is open is not asked at RCPT: the recipient gets the
/// tempfail action at once (here: accept), and the store sees no new session.
#[tokio::test]
async fn a_down_store_is_not_asked_to_verify() {
    let store = FakeStore::start(Script {
        max_sessions: Some(0),
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "hostname: mx.test\nnode_id: 7\ndrain_timeout: 2s\ndelivery:\n  minimal_backoff: 1h\n  breaker: {{ failures: 1, probe_interval: 1h }}\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: a\n    kind: lmtp\n    address: {addr}\n    verify_recipients: true\n    verify_tempfail_action: accept\nroutes:\n  domains:\n    a.example: {{ store: a }}\n",
        spool = dir.path().join("spool").display(),
        addr = store.addr,
    );
    let config = Config::parse(&text, "test.yaml").unwrap();
    let gw = TestGateway {
        gateway: Gateway::start(config).await.unwrap(),
        dir,
    };
    let mut c = session(&gw).await;
    c.cmd("RCPT TO:<one@a.example>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    // The delivery fails at the greeting and opens the breaker; the shard publishes it.
    let scheduler = gw.gateway.scheduler.clone().unwrap();
    let start = Instant::now();
    while scheduler.stores().await[0].breaker == postern::scheduler::breaker::BreakerState::Closed {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the breaker opens"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = store.sessions().len();
    for i in 0..5 {
        let mut c = session(&gw).await;
        c.cmd(&format!("RCPT TO:<new{i}@a.example>"), 250).await;
    }
    assert_eq!(
        store.sessions().len(),
        before,
        "no session opened to verify"
    );
    gw.gateway.stop().await;
}
