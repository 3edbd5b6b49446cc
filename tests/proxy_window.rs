//! `mode: proxy` when the store's window is full or the gateway stops: a transaction waits
//! `proxy_wait` for a slot and then gets `451 4.3.2`, one in flight at shutdown is still
//! relayed, a store refusing the session is tried once per transaction, and edges waiting at a
//! concentrator take turns (it offers them `XPOSTERN-TURNS`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod common;
mod delivery_common;
mod fake_lmtp;
mod proxy_common;

use std::time::Duration;

use fake_lmtp::{FakeStore, Script};
use proxy_common::{hello, line, start, start_edited, start_with, transaction};

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
