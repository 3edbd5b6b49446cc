//! Recipient verification at RCPT against the real stores, Cyrus IMAP 3.6 and Dovecot 2.3
//! (their LMTP unix sockets): an unknown user answers 550 5.1.1 at the edge, a known one 250,
//! and nothing is delivered by asking.
//!
//! Skipped with a note when the stores are not installed, unless `POSTERN_REQUIRE_STORES=1`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;
mod common_stores;

use common::TestGateway;
use common_stores::{Instance, Kind};
use postern::config::Config;
use postern::gateway::Gateway;

async fn gateway(instance: &Instance) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "hostname: mx.test\nnode_id: 7\ndrain_timeout: 5s\ndelivery:\n  enabled: false\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: real\n    kind: lmtp\n    address: unix:{socket}\n    verify_recipients: true\n    verify_timeout: 20s\nroutes:\n  domains:\n    example.org: {{ store: real }}\n",
        spool = dir.path().join("spool").display(),
        socket = instance.lmtp_socket().display(),
    );
    let config = Config::parse(&text, "test.yaml").unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    let gateway = Gateway::start(config).await.unwrap();
    TestGateway { gateway, dir }
}

async fn check(instance: &Instance) {
    let gw = gateway(instance).await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.cmd("MAIL FROM:<sender@remote.example>", 250).await;
    let r = c.cmd("RCPT TO:<nosuchuser@example.org>", 550).await;
    assert!(
        r.text().starts_with("5.1.1 Recipient address rejected: "),
        "{:?}: {r:?}",
        instance.kind
    );
    c.cmd("RCPT TO:<alice@example.org>", 250).await;
    gw.gateway.stop().await;
    assert_eq!(instance.inbox("alice").exists, 0, "asking delivers nothing");
}

#[tokio::test]
async fn cyrus_unknown_user_is_550_at_the_edge_known_250() {
    let Some(cyrus) = Instance::start(Kind::Cyrus, &[], &[("alice", None)]) else {
        return;
    };
    check(&cyrus).await;
}

#[tokio::test]
async fn dovecot_unknown_user_is_550_at_the_edge_known_250() {
    let Some(dovecot) = Instance::start(Kind::Dovecot, &[], &[("alice", None)]) else {
        return;
    };
    check(&dovecot).await;
}
