//! `listeners[].mode: proxy`: the gateway relays each transaction to the route's store while
//! the client waits and answers with the store's replies; the loop check in both modes.
//! (A full window, shutdown and turns: `proxy_window.rs`.)
//!
//! A gateway on 127.0.0.1:0 (hostname `mx.test`, node 7) with an LMTP and an SMTP listener
//! in proxy mode and one in spool mode, in front of a scripted fake LMTP store.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod common;
mod fake_lmtp;
mod proxy_common;

use std::time::Duration;

use fake_lmtp::{FakeStore, Rcpt, Script};
use proxy_common::{dead_port, hello, line, start, transaction};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lmtp_upstream_gets_each_recipients_reply_from_the_store() {
    let store = FakeStore::start(
        Script::default()
            .rcpt("nobody", Rcpt::new("550 5.1.1 No such user here", ""))
            .rcpt("full", Rcpt::new("250 2.1.5 OK", "452 4.2.2 Mailbox full")),
    )
    .await;
    let gw = start(store.addr.port(), false, 10).await;
    let mut c = hello(&gw, "lmtp").await;
    let replies = transaction(
        &mut c,
        &["alice@store.test", "nobody@store.test", "full@store.test"],
        "Subject: cut through\r\n\r\nhello",
        3,
    )
    .await;
    let got: Vec<String> = replies.iter().map(line).collect();
    assert_eq!(
        got,
        [
            "250 2.0.0 Saved",
            "550 5.1.1 No such user here",
            "452 4.2.2 Mailbox full"
        ]
    );
    let txns = store.transactions();
    assert_eq!(txns.len(), 1, "{txns:?}");
    assert_eq!(txns[0].mail, "MAIL FROM:<sender@edge.test>");
    let content = String::from_utf8_lossy(&txns[0].content).into_owned();
    assert!(
        content.starts_with("Received: from client.test ([127.0.0.1])\r\n\tby mx.test (postern node 7) with LMTP id "),
        "{content}"
    );
    assert!(
        content.ends_with("Subject: cut through\r\n\r\nhello\r\n"),
        "{content}"
    );
    assert!(
        gw.gateway.spool.is_empty(),
        "nothing is written to the spool"
    );
    c.cmd("QUIT", 221).await;
    gw.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lmtp_alias_expansion_is_one_reply_per_rcpt() {
    let store = FakeStore::start(Script::default().rcpt(
        "bob",
        Rcpt::new("250 2.1.5 OK", "451 4.2.0 Try later").then("250 2.0.0 Saved"),
    ))
    .await;
    let gw = start(store.addr.port(), false, 10).await;
    let mut c = hello(&gw, "lmtp").await;
    // alice delivered, bob deferred: the alias's one reply is 250, bob is queued here.
    let replies = transaction(&mut c, &["team@store.test", "carol@store.test"], "x", 2).await;
    assert_eq!(replies[0].code, 250, "{replies:?}");
    assert!(replies[0].text().contains("queued as"), "{replies:?}");
    assert_eq!(line(&replies[1]), "250 2.0.0 Saved");
    let txns = store.transactions();
    assert_eq!(
        txns[0].rcpts,
        ["alice@store.test", "bob@store.test", "carol@store.test"]
    );
    let queued = gw.gateway.spool.snapshot();
    assert_eq!(queued.len(), 1);
    let rcpts: Vec<&str> = queued[0]
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(rcpts, ["bob@store.test"]);
    // All delivered: the store's reply, nothing more queued.
    let replies = transaction(&mut c, &["team@store.test"], "x", 1).await;
    assert_eq!(line(&replies[0]), "250 2.0.0 Saved");
    assert_eq!(gw.gateway.spool.len(), 1);
    gw.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_mixed_outcome_spools_the_rest_and_the_scheduler_delivers_it() {
    let store = FakeStore::start(Script::default().rcpt(
        "later",
        Rcpt::new("250 2.1.5 OK", "451 4.2.0 Try later").then("250 2.0.0 Saved"),
    ))
    .await;
    let gw = start(store.addr.port(), true, 10).await;
    let mut c = hello(&gw, "smtp").await;
    let replies = transaction(
        &mut c,
        &["alice@store.test", "later@store.test"],
        "Subject: mixed\r\n\r\nbody",
        1,
    )
    .await;
    assert_eq!(replies[0].code, 250, "{replies:?}");
    assert!(replies[0].text().contains("queued as"), "{replies:?}");
    // The scheduler delivers the spooled rest (only `later`) once the store takes it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(store.transactions().len() == 2 && gw.gateway.spool.is_empty()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            store.transactions()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let txns = store.transactions();
    assert_eq!(txns[0].rcpts, ["alice@store.test", "later@store.test"]);
    assert_eq!(
        txns[1].rcpts,
        ["later@store.test"],
        "only the rest was spooled"
    );
    assert!(txns[1].complete);
    let alice = txns
        .iter()
        .filter(|t| t.rcpts.iter().any(|r| r == "alice@store.test"))
        .count();
    assert_eq!(alice, 1, "the delivered recipient is delivered once");
    let content = String::from_utf8_lossy(&txns[1].content).into_owned();
    assert_eq!(
        content.matches("(postern node 7)").count(),
        1,
        "one Received: of ours: {content}"
    );
    gw.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_all_refused_gets_the_stores_reply() {
    let refuse = || Rcpt::new("550 5.1.1 No such user here", "");
    let store = FakeStore::start(Script::default().rcpt("x", refuse()).rcpt("y", refuse())).await;
    let gw = start(store.addr.port(), false, 10).await;
    let mut c = hello(&gw, "smtp").await;
    let replies = transaction(&mut c, &["x@store.test", "y@store.test"], "x", 1).await;
    assert_eq!(line(&replies[0]), "550 5.1.1 No such user here");
    // Every recipient deferred alike: the store's 4yz.
    let full = Rcpt::new("250 2.1.5 OK", "452 4.2.2 Mailbox full");
    let deferring = FakeStore::start(Script::default().rcpt("z", full)).await;
    let gw2 = start(deferring.addr.port(), false, 10).await;
    let mut c2 = hello(&gw2, "smtp").await;
    let replies = transaction(&mut c2, &["z@store.test"], "x", 1).await;
    assert_eq!(line(&replies[0]), "452 4.2.2 Mailbox full");
    assert!(gw.gateway.spool.is_empty() && gw2.gateway.spool.is_empty());
    gw.gateway.stop().await;
    gw2.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_is_451_4_3_2_and_nothing_spooled() {
    let gw = start(dead_port().await, true, 10).await;
    for listener in ["smtp", "lmtp"] {
        let mut c = hello(&gw, listener).await;
        let n = if listener == "lmtp" { 2 } else { 1 };
        let replies = transaction(&mut c, &["a@store.test", "b@store.test"], "x", n).await;
        for r in &replies {
            assert_eq!(r.code, 451, "{listener}: {replies:?}");
            assert!(r.text().starts_with("4.3.2 "), "{listener}: {replies:?}");
            assert!(
                r.text().contains("not reachable"),
                "{listener}: {replies:?}"
            );
        }
    }
    assert!(gw.gateway.spool.is_empty(), "nothing spooled");
    gw.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maildir_route_is_delivered_in_place() {
    let gw = start(dead_port().await, false, 10).await;
    let mut c = hello(&gw, "smtp").await;
    let replies = transaction(&mut c, &["dora@example.org"], "Subject: local\r\n\r\nx", 1).await;
    assert_eq!(replies[0].code, 250, "{replies:?}");
    let new = gw.dir.path().join("mail/example.org/dora/Maildir/new");
    let files: Vec<_> = std::fs::read_dir(&new).unwrap().collect();
    assert_eq!(files.len(), 1, "{new:?}");
    assert!(gw.gateway.spool.is_empty());
    gw.gateway.stop().await;
}

/// The store closes the connection after the end of data, having answered `k` recipients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_killed_mid_transaction_never_gets_a_false_250() {
    for k in [0, 1, 2] {
        let store = FakeStore::start(Script {
            drop_after_replies: Some(k),
            ..Script::default()
        })
        .await;
        let gw = start(store.addr.port(), false, 10).await;
        let mut c = hello(&gw, "lmtp").await;
        let to = ["a@store.test", "b@store.test", "c@store.test"];
        let replies = transaction(&mut c, &to, "x", 3).await;
        let txns = store.transactions();
        assert_eq!(txns.len(), 1, "k={k}");
        assert!(txns[0].complete, "k={k}: the store got the whole message");
        for (i, r) in replies.iter().enumerate() {
            if i < k {
                // The store answered this one before it went away: its 250 stands.
                assert_eq!(line(r), "250 2.0.0 Saved", "k={k} #{i}");
                assert_eq!(txns[0].rcpts[i], to[i]);
            } else {
                assert_eq!(r.code, 451, "k={k} #{i}: {replies:?}");
                assert!(r.text().starts_with("4.4.2 "), "k={k} #{i}: {replies:?}");
                assert!(r.text().contains("may have been delivered"), "{replies:?}");
            }
        }
        assert!(gw.gateway.spool.is_empty(), "k={k}: LMTP spools nothing");
        gw.gateway.stop().await;
    }
}

/// The store closes the connection at DATA: nothing was sent, `451 4.3.2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_killed_before_the_end_of_data_is_451_4_3_2() {
    let store = FakeStore::start(Script {
        drop_at: Some("DATA"),
        ..Script::default()
    })
    .await;
    let gw = start(store.addr.port(), false, 10).await;
    let mut c = hello(&gw, "lmtp").await;
    let replies = transaction(&mut c, &["a@store.test", "b@store.test"], "x", 2).await;
    for r in &replies {
        assert_eq!(r.code, 451, "{replies:?}");
        assert!(r.text().starts_with("4.3.2 "), "{replies:?}");
    }
    assert!(gw.gateway.spool.is_empty());
    gw.gateway.stop().await;
}

/// SMTP upstream, the store killed after one reply: the one it answered is delivered, the
/// others are spooled (they may be duplicates, never lost), and the client gets 250.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_store_killed_after_one_reply_spools_the_rest() {
    let store = FakeStore::start(Script {
        drop_after_replies: Some(1),
        ..Script::default()
    })
    .await;
    let gw = start(store.addr.port(), false, 10).await;
    let mut c = hello(&gw, "smtp").await;
    let replies = transaction(&mut c, &["a@store.test", "b@store.test"], "x", 1).await;
    assert_eq!(replies[0].code, 250, "{replies:?}");
    let qid = common::queue_id(&replies[0]);
    let summary = gw
        .gateway
        .spool
        .snapshot()
        .into_iter()
        .find(|m| m.qid.to_string() == qid)
        .expect("the rest is in the spool");
    let rcpts: Vec<&str> = summary
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(rcpts, ["b@store.test"]);
    gw.gateway.stop().await;
}

const OURS: &str = "Received: from edge.test (localhost)\r\n\tby mx.test (postern node 7) with LMTP id X;\r\n\tFri, 04 Dec 2026 10:00:00 +0000\r\n";
const OTHER: &str = "Received: from edge.test (localhost)\r\n\tby mx.test (postern node 8) with LMTP id X;\r\n\tFri, 04 Dec 2026 10:00:00 +0000\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_carrying_our_marker_is_refused_in_both_modes() {
    let store = FakeStore::start(Script::default()).await;
    let gw = start(store.addr.port(), false, 10).await;
    for listener in ["spool", "smtp", "lmtp"] {
        let mut c = hello(&gw, listener).await;
        let back = format!("{OURS}Subject: back again\r\n\r\nx");
        let replies = transaction(&mut c, &["a@store.test"], &back, 1).await;
        assert_eq!(replies[0].code, 554, "{listener}: {replies:?}");
        assert!(replies[0].text().starts_with("5.4.6 "), "{replies:?}");
        assert!(replies[0].text().contains("loop"), "{replies:?}");
        // Another node's marker passes.
        let passing = format!("{OTHER}Subject: passing through\r\n\r\nx");
        let replies = transaction(&mut c, &["a@store.test"], &passing, 1).await;
        assert_eq!(replies[0].code, 250, "{listener}: {replies:?}");
    }
    // Nothing of the looping message reached the store; the passing one did, twice (two
    // proxy listeners), and the spool holds the spool listener's copy.
    let txns = store.transactions();
    assert_eq!(txns.len(), 2, "{txns:?}");
    for t in &txns {
        let content = String::from_utf8_lossy(&t.content).into_owned();
        assert!(content.contains("passing through"), "{content}");
    }
    assert_eq!(gw.gateway.spool.len(), 1);
    gw.gateway.stop().await;
}
