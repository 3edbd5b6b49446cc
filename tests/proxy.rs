//! `listeners[].mode: proxy`: the gateway relays each transaction to the route's store while
//! the client waits and answers with the store's replies; the loop check in both modes.
//!
//! A gateway on 127.0.0.1:0 (hostname `mx.test`, node 7) with an LMTP and an SMTP listener
//! in proxy mode and one in spool mode, in front of a scripted fake LMTP store.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod common;
mod delivery_common;
mod fake_lmtp;

use std::time::Duration;

use common::{Client, Reply, TestGateway};
use fake_lmtp::{FakeStore, Rcpt, Script};
use postern::config::Config;
use postern::gateway::Gateway;

/// The gateway's YAML: listeners `lmtp` and `smtp` in proxy mode, `spool` in spool mode;
/// `store.test` at the LMTP store on `port` (with `store_keys`), `example.org` in a maildir,
/// `team@store.test` an alias of alice and bob.
fn yaml(dir: &std::path::Path, port: u16, delivery: bool, store_keys: &str) -> String {
    format!(
        "hostname: mx.test
node_id: 7
drain_timeout: 5s
delivery:
  enabled: {delivery}
  minimal_backoff: 1s
  maximal_backoff: 2s
spool:
  path: {spool}
  min_free: 0
metrics:
  address: 127.0.0.1:0
listeners:
  - {{ name: lmtp, address: 127.0.0.1:0, protocol: lmtp, mode: proxy, proxy_wait: 500ms }}
  - {{ name: smtp, address: 127.0.0.1:0, protocol: smtp, mode: proxy, proxy_wait: 500ms }}
  - {{ name: spool, address: 127.0.0.1:0, protocol: smtp }}
stores:
  - {{ name: store, kind: lmtp, address: \"127.0.0.1:{port}\", {store_keys} }}
  - {{ name: local, kind: maildir, root: {mail} }}
routes:
  domains:
    store.test: {{ store: store }}
    example.org: {{ store: local }}
  aliases:
    team@store.test: [alice@store.test, bob@store.test]
",
        spool = dir.join("spool").display(),
        mail = dir.join("mail").display(),
    )
}

async fn start(port: u16, delivery: bool, max_connections: usize) -> TestGateway {
    start_with(
        port,
        delivery,
        &format!("max_connections: {max_connections}"),
    )
    .await
}

async fn start_with(port: u16, delivery: bool, store_keys: &str) -> TestGateway {
    start_edited(port, delivery, store_keys, |text| text).await
}

/// [`start_with`], the YAML passed through `edit` first.
async fn start_edited(
    port: u16,
    delivery: bool,
    store_keys: &str,
    edit: impl FnOnce(String) -> String,
) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let text = edit(yaml(dir.path(), port, delivery, store_keys));
    let config = Config::parse(&text, "proxy.yaml").unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    let gateway = Gateway::start(config).await.unwrap();
    TestGateway { gateway, dir }
}

/// A port nothing listens on.
async fn dead_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// Greeting and LHLO/EHLO.
async fn hello(gw: &TestGateway, listener: &str) -> Client {
    let mut c = gw.connect(listener).await;
    assert_eq!(c.reply().await.code, 220);
    let verb = if listener == "lmtp" { "LHLO" } else { "EHLO" };
    c.cmd(&format!("{verb} client.test"), 250).await;
    c
}

/// MAIL, every RCPT (each must get 250), DATA, the content; then `n` replies.
async fn transaction(c: &mut Client, to: &[&str], content: &str, n: usize) -> Vec<Reply> {
    c.cmd("MAIL FROM:<sender@edge.test>", 250).await;
    for rcpt in to {
        c.cmd(&format!("RCPT TO:<{rcpt}>"), 250).await;
    }
    c.cmd("DATA", 354).await;
    c.send(content.as_bytes()).await;
    c.send(b"\r\n.\r\n").await;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(c.reply().await);
    }
    out
}

fn line(r: &Reply) -> String {
    format!("{} {}", r.code, r.text())
}

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

/// The store's window (`max_connections: 1`) is held by a slow transaction: a second one
/// waits `proxy_wait` (500 ms here) for a slot, then gets `451 4.3.2`, and never reaches
/// the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_window_waits_proxy_wait_then_451_4_3_2() {
    let store = FakeStore::start(Script {
        reply_delay: Some(Duration::from_secs(3)),
        ..Script::default()
    })
    .await;
    let gw = start(store.addr.port(), false, 1).await;
    let mut first = hello(&gw, "lmtp").await;
    let slow =
        tokio::spawn(async move { transaction(&mut first, &["a@store.test"], "slow", 1).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !store.transactions().first().is_some_and(|t| t.complete) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut second = hello(&gw, "lmtp").await;
    let started = tokio::time::Instant::now();
    let replies = transaction(&mut second, &["b@store.test"], "fast", 1).await;
    let waited = started.elapsed();
    assert_eq!(replies[0].code, 451, "{replies:?}");
    assert!(replies[0].text().starts_with("4.3.2 "), "{replies:?}");
    assert!(replies[0].text().contains("busy"), "{replies:?}");
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_millis(2500),
        "waited {waited:?}"
    );
    let first = slow.await.unwrap();
    assert_eq!(line(&first[0]), "250 2.0.0 Saved");
    assert_eq!(
        store.transactions().len(),
        1,
        "the second never reached the store"
    );
    assert!(gw.gateway.spool.is_empty());
    gw.gateway.stop().await;
}

/// SIGTERM while a proxy transaction is in its DATA: the transaction finishes with the
/// store's reply (the scheduler draining at the same time leaves the shared pool open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_in_flight_at_shutdown_is_still_relayed() {
    let store = FakeStore::start(Script::default()).await;
    let gw = start(store.addr.port(), true, 10).await;
    let mut c = hello(&gw, "lmtp").await;
    c.cmd("MAIL FROM:<sender@edge.test>", 250).await;
    c.cmd("RCPT TO:<a@store.test>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: late\r\n\r\n").await;
    let token = gw.gateway.shutdown_token();
    token.cancel();
    // Let the scheduler drain (it has nothing to do) before the end of data arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(b"x\r\n.\r\n").await;
    let r = c.reply().await;
    assert_eq!(line(&r), "250 2.0.0 Saved");
    assert_eq!(store.transactions().len(), 1);
    gw.gateway.wait().await;
}

/// The store refuses the session (421 at the greeting): `451 4.3.2` for every recipient,
/// and the transaction's further batches (`recipients_per_transaction: 2`) are not tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refusing_the_session_is_tried_once_per_transaction() {
    let store = FakeStore::start(Script {
        max_sessions: Some(0),
        ..Script::default()
    })
    .await;
    let gw = start_with(store.addr.port(), false, "recipients_per_transaction: 2").await;
    let mut c = hello(&gw, "lmtp").await;
    let to = [
        "a@store.test",
        "b@store.test",
        "c@store.test",
        "d@store.test",
    ];
    let replies = transaction(&mut c, &to, "x", 4).await;
    for r in &replies {
        assert_eq!(r.code, 451, "{replies:?}");
        assert!(r.text().starts_with("4.3.2 "), "{replies:?}");
    }
    assert_eq!(
        store.sessions().len(),
        1,
        "one session tried, not one per batch"
    );
    assert!(gw.gateway.spool.is_empty());
    gw.gateway.stop().await;
}

/// Edges waiting for a full window take turns (by the name they gave in LHLO): an edge that
/// queued several transactions does not get them all through before another edge's one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_waiting_for_a_full_window_take_turns() {
    let store = FakeStore::start(Script {
        reply_delay: Some(Duration::from_millis(400)),
        ..Script::default()
    })
    .await;
    // One slot at the store; the waiting ones must not give up before their turn.
    let gw = start_edited(store.addr.port(), false, "max_connections: 1", |text| {
        text.replace("proxy_wait: 500ms", "proxy_wait: 10s")
    })
    .await;
    let mut waiting = Vec::new();
    for (i, (edge, rcpt)) in [
        ("edge-a", "a1"),
        ("edge-a", "a2"),
        ("edge-a", "a3"),
        ("edge-b", "b1"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = gw.connect("lmtp").await;
        assert_eq!(c.reply().await.code, 220);
        c.cmd(&format!("LHLO {edge}"), 250).await;
        let to = format!("{rcpt}@store.test");
        waiting.push(tokio::spawn(async move {
            transaction(&mut c, &[to.as_str()], rcpt, 1).await
        }));
        if i == 0 {
            // a1 holds the slot before the others come.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while store.transactions().is_empty() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a1 never reached the store"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // Each waits at the window before the next comes.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for w in waiting {
        let replies = w.await.unwrap();
        assert_eq!(line(&replies[0]), "250 2.0.0 Saved");
    }
    let order: Vec<String> = store
        .completed()
        .iter()
        .map(|t| t.rcpts.join(","))
        .collect();
    let at = |r: &str| {
        order
            .iter()
            .position(|o| o.contains(r))
            .unwrap_or_else(|| panic!("{r} not delivered: {order:?}"))
    };
    assert!(at("a1") < at("a2"), "{order:?}");
    assert!(
        at("b1") < at("a3"),
        "edge b waited behind all of edge a's transactions: {order:?}"
    );
    gw.gateway.stop().await;
}

/// A listener in proxy mode offers `XPOSTERN-TURNS` in its LHLO/EHLO reply, one in spool
/// mode does not; a gateway whose store offers it leaves the sharing to that concentrator:
/// its window there stops steering by latency (which would read its place in the turns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concentrator_offers_turns_and_its_edges_leave_the_sharing_to_it() {
    use postern::delivery::{RemoteStore, StorePool};
    use postern::scheduler::gate::{Gate, Signal};
    use postern::scheduler::window::{Sample, Window, WindowSettings};
    use std::sync::Arc;

    let store = FakeStore::start(Script::default()).await;
    let gw = start(store.addr.port(), false, 5).await;
    for (listener, offered) in [("lmtp", true), ("smtp", true), ("spool", false)] {
        let mut c = gw.connect(listener).await;
        assert_eq!(c.reply().await.code, 220);
        let verb = if listener == "lmtp" { "LHLO" } else { "EHLO" };
        let r = c.cmd(&format!("{verb} edge.test"), 250).await;
        let offers = r.lines.iter().any(|l| l.contains("XPOSTERN-TURNS"));
        assert_eq!(offers, offered, "{listener}: {}", r.text());
    }
    let port = |addr: String| addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let pool = |name: &str, port: u16| {
        let c = delivery_common::store_config(name, port);
        StorePool::new(Arc::new(RemoteStore::from_config(&c, "edge.test").unwrap()))
    };
    let body = b"Subject: turns\r\n\r\nHello.\r\n";
    for (pool, turns) in [
        (pool("conc", port(gw.addr("lmtp"))), true),
        (pool("store", store.addr.port()), false),
    ] {
        let gate = Gate::new(
            "s",
            Window::with_settings(WindowSettings::latency(4, 10)),
            Some(pool.clone()),
        );
        let to = [delivery_common::rcpt(0, "alice@store.test")];
        let envelope = delivery_common::envelope(body);
        let report = tokio::time::timeout(
            Duration::from_secs(10),
            pool.deliver(&envelope, &to, &body[..], &mut |_, _| {}),
        )
        .await
        .expect("delivered in time");
        assert_eq!(
            delivery_common::by_index(&report, 1),
            ["delivered 250 2.0.0"],
            "{}",
            pool.store().name()
        );
        assert_eq!(pool.store().gives_turns(), turns);
        assert!(gate.steers_by_latency(), "until a transaction is fed");
        let permit = gate.try_acquire().expect("a slot");
        permit.finish_with(
            Signal::Success,
            Some(Sample::reused(Duration::from_millis(20))),
        );
        assert_eq!(gate.steers_by_latency(), !turns, "{}", pool.store().name());
    }
    gw.gateway.stop().await;
}
