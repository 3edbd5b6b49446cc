//! The scheduler against in-process fake LMTP stores: real spool, real sockets on
//! 127.0.0.1, tiny backoffs; every wait is bounded. (Its windows: `scheduler_window.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod fake_lmtp;

use std::sync::Arc;
use std::time::Duration;

use fake_lmtp::harness::{BODY, Harness, config, queue, router, router_with_grace, until};
use fake_lmtp::{FakeStore, Rcpt, Script};
use postern::spool::{QueueId, RecipientState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_in_three_stores_are_all_delivered_and_the_message_finished() {
    let h = Harness::new(&["a", "b", "c"]).await;
    let q1 = h.queue(
        "s@a.test",
        &["x1@a.test", "x2@b.test", "x3@c.test", "y1@a.test"],
    );
    let q2 = h.queue("", &["z@c.test"]);
    until("both messages finished", || h.spool.is_empty()).await;
    assert_eq!(h.store("a").delivered_to(), ["x1@a.test", "y1@a.test"]);
    assert_eq!(h.store("b").delivered_to(), ["x2@b.test"]);
    assert_eq!(h.store("c").delivered_to(), ["x3@c.test", "z@c.test"]);
    assert_eq!(
        h.store("a").completed().len(),
        1,
        "one transaction for both a recipients"
    );
    let copy = &h.store("b").delivered()[0];
    assert_eq!(copy.from, "s@a.test");
    assert!(copy.body.contains("Hello."));
    assert_ne!(q1, q2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_451_is_deferred_in_the_ledger_then_retried_and_delivered() {
    let h = Harness::new(&["a", "b"]).await;
    h.store("a").rcpt(
        "temp",
        Rcpt::result("451 4.2.0 mailbox locked").then("250 2.0.0 Saved"),
    );
    let q = h.queue("s@b.test", &["temp@a.test", "ok@a.test", "ok@b.test"]);
    // One consistent snapshot, taken when the first attempt is fully recorded.
    let mut snapshot = None;
    until("first attempt recorded", || {
        snapshot = h.spool.message(q).ok().filter(|m| {
            matches!(m.recipients[0].state, RecipientState::Deferred { .. })
                && m.recipients[1..].iter().all(|r| r.state.is_final())
        });
        snapshot.is_some()
    })
    .await;
    let states: Vec<RecipientState> = snapshot
        .unwrap()
        .recipients
        .into_iter()
        .map(|r| r.state)
        .collect();
    let RecipientState::Deferred { reply, until: at } = &states[0] else {
        panic!("{states:?}")
    };
    assert_eq!(reply, "451 4.2.0 mailbox locked");
    // The retry is due within the configured backoff (300 ms to 1 s) of the deferral; the
    // margin covers a loaded machine reading the snapshot late.
    let now = std::time::SystemTime::now();
    assert!(
        *at > now - Duration::from_secs(10) && *at < now + Duration::from_secs(10),
        "retry time {at:?}"
    );
    assert!(matches!(&states[1], RecipientState::Delivered { reply } if reply.starts_with("250")));
    until("retried and finished", || h.spool.is_empty()).await;
    assert_eq!(h.store("a").delivered_to(), ["ok@a.test", "temp@a.test"]);
    let txns: Vec<Vec<String>> = h
        .store("a")
        .completed()
        .into_iter()
        .map(|t| t.rcpts)
        .collect();
    assert_eq!(txns.len(), 2);
    assert_eq!(
        txns[1],
        ["temp@a.test"],
        "only the deferred recipient is retried"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_550_bounces_only_that_recipient_and_queues_a_dsn_to_the_sender() {
    let h = Harness::new(&["a", "b"]).await;
    h.store("a").rcpt(
        "nobody",
        Rcpt::result("550 5.1.1 <nobody@a.test>: no such user"),
    );
    h.queue("sender@b.test", &["nobody@a.test", "ok@a.test"]);
    until("bounce delivered to the sender's store", || {
        !h.store("b").delivered().is_empty() && h.spool.is_empty()
    })
    .await;
    assert_eq!(h.store("a").delivered_to(), ["ok@a.test"]);
    let dsn = &h.store("b").delivered()[0];
    assert_eq!(dsn.from, "", "a DSN comes from the null sender");
    assert_eq!(dsn.to, "sender@b.test");
    for want in [
        "Content-Type: multipart/report; report-type=delivery-status;",
        "Final-Recipient: rfc822; nobody@a.test",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1 <nobody@a.test>: no such user",
        "Subject: test",
    ] {
        assert!(dsn.body.contains(want), "{want:?} missing:\n{}", dsn.body);
    }
    assert!(!dsn.body.contains("Final-Recipient: rfc822; ok@a.test"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_does_not_block_the_others_and_drains_when_back() {
    // Retry times far away: only the breaker's probe can bring c's mail back in time.
    let mut cfg = config();
    cfg.minimal_backoff = postern::config::Span(Duration::from_secs(600));
    cfg.maximal_backoff = postern::config::Span(Duration::from_secs(600));
    let mut stores = std::collections::HashMap::new();
    for n in ["a", "b", "c"] {
        stores.insert(n.to_owned(), FakeStore::start(Script::default()).await);
    }
    let h = Harness::with(tempfile::tempdir().unwrap(), stores, cfg).await;
    h.store("c").update(|s| s.max_sessions = Some(0));
    let qs: Vec<QueueId> = (0..6)
        .map(|i| {
            h.queue(
                "s@a.test",
                &[
                    &format!("u{i}@a.test"),
                    &format!("u{i}@b.test"),
                    &format!("u{i}@c.test"),
                ],
            )
        })
        .collect();
    until("a and b delivered while c is down", || {
        h.store("a").delivered().len() == 6 && h.store("b").delivered().len() == 6
    })
    .await;
    until("c's recipients deferred", || {
        qs.iter().all(|q| {
            matches!(h.states(*q)[2], RecipientState::Deferred { ref reply, .. } if reply.contains("4."))
        })
    })
    .await;
    let c = h
        .scheduler
        .stores()
        .await
        .into_iter()
        .find(|s| s.name == "c")
        .unwrap();
    assert_ne!(
        c.breaker,
        postern::scheduler::breaker::BreakerState::Closed,
        "c is marked down"
    );
    assert!(c.parked > 0, "its messages are parked: {c:?}");
    // Only probes reach it now (about one per 200 ms): no retry storm.
    let before = h.store("c").sessions().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probes = h.store("c").sessions().len() - before;
    assert!(probes <= 4, "{probes} connections in 500 ms");
    h.store("c").update(|s| s.max_sessions = None);
    until("c's backlog delivered after recovery", || {
        h.spool.is_empty()
    })
    .await;
    assert_eq!(h.store("c").delivered().len(), 6);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_recipients_are_retried_one_per_transaction() {
    let h = Harness::new(&["a"]).await;
    h.store("a").update(|s| {
        s.drop_after_replies = Some(0);
        s.drop_times = Some(1);
    });
    h.queue("", &["r1@a.test", "r2@a.test", "r3@a.test"]);
    until("finished", || h.spool.is_empty()).await;
    let txns: Vec<Vec<String>> = h
        .store("a")
        .completed()
        .into_iter()
        .map(|t| t.rcpts)
        .collect();
    assert_eq!(
        txns[0].len(),
        3,
        "the first transaction had all three: {txns:?}"
    );
    assert!(
        txns[1..].iter().all(|t| t.len() == 1),
        "then one each: {txns:?}"
    );
    assert_eq!(
        h.store("a").delivered_to(),
        ["r1@a.test", "r2@a.test", "r3@a.test"]
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_queue_and_in_doubt_recipients_go_alone() {
    let h = Harness::new(&["a"]).await;
    h.store("a").update(|s| s.max_sessions = Some(0));
    let q1 = h.queue("", &["d1@a.test", "d2@a.test"]);
    until("deferred while the store is down", || {
        h.states(q1)
            .iter()
            .all(|s| matches!(s, RecipientState::Deferred { .. }))
    })
    .await;
    // A crash after the dot of another message: recipients left in doubt.
    let q2 = queue(&h.spool, "", &["i1@a.test", "i2@a.test"], BODY);
    h.spool.mark_in_doubt(q2, &[0, 1]).await.unwrap();
    let (dir, stores) = h.stop().await;
    stores["a"].update(|s| s.max_sessions = None);
    let h = Harness::with(dir, stores, config()).await;
    until("resumed and finished", || h.spool.is_empty()).await;
    assert_eq!(
        h.store("a").delivered_to(),
        ["d1@a.test", "d2@a.test", "i1@a.test", "i2@a.test"]
    );
    for t in h.store("a").completed().into_iter().map(|t| t.rcpts) {
        if t.iter().any(|r| r.starts_with('i')) {
            assert_eq!(t.len(), 1, "in-doubt recipients alone: {t:?}");
        }
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mail_is_rerouted_when_the_map_changes() {
    let h = Harness::new(&["a", "b"]).await;
    h.store("a")
        .rcpt("mover", Rcpt::result("451 4.3.0 store in maintenance"));
    let q = h.queue("", &["mover@a.test"]);
    until("deferred at a", || {
        matches!(h.states(q)[0], RecipientState::Deferred { .. })
    })
    .await;
    h.router
        .store(Arc::new(router(&[("a.test", "b"), ("b.test", "b")])));
    until("delivered through b at the next attempt", || {
        h.spool.is_empty()
    })
    .await;
    assert_eq!(h.store("b").delivered_to(), ["mover@a.test"]);
    assert!(h.store("a").delivered().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_does_not_block_the_small_ones_behind_it() {
    let h = Harness::new(&["a"]).await;
    h.store("a").update(|s| {
        s.hold_locals.insert("big".into());
    });
    let mut big = String::from("Subject: big\r\n\r\n");
    while big.len() < 3 << 20 {
        big.push_str(
            "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n",
        );
    }
    let qbig = queue(&h.spool, "", &["big@a.test"], &big);
    h.scheduler.submit(qbig);
    for i in 0..20 {
        h.queue("", &[&format!("small{i}@a.test")]);
    }
    until(
        "the small ones delivered while the big one is in its transaction",
        || h.store("a").delivered().len() == 20 && h.spool.len() == 1,
    )
    .await;
    h.store("a").update(|s| {
        s.hold_locals.remove("big");
    });
    until("the big one too", || h.spool.is_empty()).await;
    let copy = h
        .store("a")
        .delivered()
        .into_iter()
        .find(|d| d.to == "big@a.test")
        .unwrap();
    assert_eq!(copy.body.len(), big.len(), "streamed from the spool intact");
    assert_eq!(copy.body, big);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_transaction_leaves_recipients_in_doubt_and_a_restart_retries_them_alone() {
    let h = Harness::new(&["a"]).await;
    h.store("a").update(|s| s.hold_replies = true);
    let q = h.queue("", &["h1@a.test", "h2@a.test"]);
    until("the transaction reached the end of data", || {
        h.store("a").completed().len() == 1
    })
    .await;
    let started = std::time::Instant::now();
    let (dir, stores) = h.stop_within(Duration::from_millis(200)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the deadline bounds the shutdown"
    );
    let snapshot = postern::spool::Spool::open_read_only(&dir.path().join("spool")).unwrap();
    let m = snapshot.messages.iter().find(|m| m.qid == q).unwrap();
    assert!(
        m.recipients
            .iter()
            .all(|r| r.state == RecipientState::InDoubt),
        "{:?}",
        m.recipients
    );
    stores["a"].update(|s| s.hold_replies = false);
    let h = Harness::with(dir, stores, config()).await;
    until("delivered after the restart", || h.spool.is_empty()).await;
    let txns: Vec<Vec<String>> = h
        .store("a")
        .completed()
        .into_iter()
        .map(|t| t.rcpts)
        .collect();
    assert!(txns[1..].iter().all(|t| t.len() == 1), "{txns:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_the_new_map_does_not_route_is_deferred_then_bounced_with_a_dsn() {
    let h = Harness::new(&["a", "b"]).await;
    h.store("a")
        .rcpt("gone", Rcpt::result("451 4.3.0 try again"));
    let q = h.queue("me@b.test", &["gone@a.test"]);
    until("deferred at a", || {
        matches!(h.states(q)[0], RecipientState::Deferred { .. })
    })
    .await;
    // A reload drops a.test: deferred "no route" during routes.unroutable_grace (2s)...
    let grace = Duration::from_secs(2);
    h.router
        .store(Arc::new(router_with_grace(&[("b.test", "b")], grace)));
    let gone = std::time::Instant::now();
    until("deferred with no route", || {
        h.spool.message(q).is_ok_and(|m| {
            m.recipients[0]
                .state
                .reply()
                .is_some_and(|r| r.contains("4.3.0 No route"))
        })
    })
    .await;
    assert!(
        h.store("b").delivered().is_empty(),
        "no bounce during the grace"
    );
    // ...then bounced as before.
    until("bounced and reported", || {
        h.spool.is_empty() && !h.store("b").delivered().is_empty()
    })
    .await;
    assert!(gone.elapsed() >= grace, "bounced before the grace ended");
    let dsn = &h.store("b").delivered()[0].body;
    assert!(dsn.contains("Status: 5.7.1"), "{dsn}");
    assert!(dsn.contains("Final-Recipient: rfc822; gone@a.test"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_messages_are_attempted_at_once_than_the_active_limit() {
    let mut cfg = config();
    cfg.shards = Some(1);
    cfg.active_limit = 2;
    let mut stores = std::collections::HashMap::new();
    stores.insert("a".to_owned(), FakeStore::start(Script::default()).await);
    let h = Harness::with(tempfile::tempdir().unwrap(), stores, cfg).await;
    h.store("a").update(|s| s.hold_replies = true);
    for i in 0..20 {
        h.queue("", &[&format!("u{i}@a.test")]);
    }
    until("two transactions open", || h.store("a").max_active() == 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.store("a").max_active(),
        2,
        "the window has room for 5; the limit is 2"
    );
    h.store("a").update(|s| s.hold_replies = false);
    until("all delivered, in turn", || h.spool.is_empty()).await;
    assert_eq!(h.store("a").delivered().len(), 20);
    assert_eq!(h.store("a").max_active(), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_goes_out_at_once_while_others_wait_and_only_once_across_a_restart() {
    let mut slow = config();
    slow.minimal_backoff = postern::config::Span(Duration::from_secs(600));
    slow.maximal_backoff = postern::config::Span(Duration::from_secs(600));
    let mut stores = std::collections::HashMap::new();
    for n in ["a", "b"] {
        stores.insert(n.to_owned(), FakeStore::start(Script::default()).await);
    }
    let h = Harness::with(tempfile::tempdir().unwrap(), stores, slow).await;
    h.store("a")
        .rcpt("nobody", Rcpt::result("550 5.1.1 no such user"));
    h.store("a").rcpt(
        "later",
        Rcpt::result("451 4.2.0 locked").then("250 2.0.0 Saved"),
    );
    let q = h.queue("me@b.test", &["nobody@a.test", "later@a.test"]);
    until("the bounce delivered while the message waits", || {
        h.store("b").delivered().len() == 1
    })
    .await;
    let m = h.spool.message(q).unwrap();
    assert!(m.recipients[0].reported, "the bounce is marked reported");
    assert!(matches!(
        m.recipients[1].state,
        RecipientState::Deferred { .. }
    ));
    assert!(h.store("b").delivered()[0].body.contains("Action: failed"));
    let (dir, stores) = h.stop().await;
    let h = Harness::with(dir, stores, config()).await;
    // Its retry time (in the ledger) is ten minutes away: ask for it now, as a flush would.
    h.scheduler.submit(q);
    until(
        "the deferred recipient delivered and the message done",
        || h.spool.is_empty(),
    )
    .await;
    assert_eq!(h.store("a").delivered_to(), ["later@a.test"]);
    assert_eq!(
        h.store("b").delivered().len(),
        1,
        "no second bounce after the restart"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_mailbox_with_200_queued_messages_does_not_delay_the_others_nor_get_rescanned() {
    let h = Harness::new(&["a"]).await;
    h.store("a").update(|s| {
        s.hold_locals.insert("busy".into());
    });
    for _ in 0..200 {
        h.queue("", &["busy@a.test"]);
    }
    let status = |h: &Harness| {
        let s = h.scheduler.clone();
        async move {
            s.stores()
                .await
                .into_iter()
                .find(|s| s.name == "a")
                .unwrap()
        }
    };
    // One transaction for busy@ is open (its reply held); the 199 others wait on the
    // mailbox, off the ready queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st = status(&h).await;
        if st.mailbox_waits == 199 && st.in_flight == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for 199 parked jobs: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..100 {
        h.queue("", &[&format!("u{i}@a.test")]);
    }
    // The store records a delivery before the spool drops the message: wait for both.
    until("the other mailboxes delivered while busy@ is held", || {
        h.store("a").delivered().len() >= 100 && h.spool.len() <= 200
    })
    .await;
    assert!(
        !h.store("a")
            .delivered_to()
            .iter()
            .any(|t| t == "busy@a.test"),
        "busy@ still serialised: none delivered"
    );
    assert_eq!(h.spool.len(), 200, "busy@ still serialised: none delivered");
    let st = status(&h).await;
    assert!(
        st.examined <= 2 * 300,
        "dispatch looked at {} jobs for 300 messages: it rescans the parked ones",
        st.examined
    );
    h.store("a").update(|s| {
        s.hold_locals.remove("busy");
    });
    until("busy@ drains, one at a time", || h.spool.is_empty()).await;
    assert_eq!(
        h.store("a").overlaps(),
        0,
        "busy@ never in two transactions"
    );
    assert_eq!(h.store("a").delivered().len(), 300);
    let st = status(&h).await;
    assert_eq!(st.mailbox_waits, 0);
    assert!(
        st.examined <= 4 * 300,
        "{} jobs examined for 300 messages",
        st.examined
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactions_outcomes_are_one_ledger_record_and_finishing_writes_only_the_removal() {
    let h = Harness::new(&["a"]).await;
    // A first message, so that the start-up queue scan is over before the one measured is
    // queued (it must not be picked up by the scan before the counters are read).
    h.queue("", &["warm@a.test"]);
    until("the warm-up delivered", || h.spool.is_empty()).await;
    let rcpts: Vec<String> = (0..5).map(|i| format!("r{i}@a.test")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let q = queue(&h.spool, "sender@a.test", &rcpts, BODY);
    let before = h.spool.stats();
    h.scheduler.submit(q);
    until("delivered and finished", || h.spool.is_empty()).await;
    let after = h.spool.stats();
    assert_eq!(
        h.store("a").completed().len(),
        2,
        "one LMTP transaction each"
    );
    assert_eq!(h.store("a").delivered().len(), 6);
    // In doubt (before the dot), the five 250s (one record batch, already marked reported:
    // no DSN is owed), the removal. Before: five outcome appends and a reported mark.
    assert_eq!(
        after.appends - before.appends,
        3,
        "appends for one 5-recipient message"
    );
    assert!(
        after.syncs - before.syncs <= 3,
        "{} flushes for one message",
        after.syncs - before.syncs
    );
    h.stop().await;
}

/// The systemd watchdog's probe: every shard answers while the scheduler runs, and the
/// probe says so when the shards have exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_answered_by_every_shard_while_running_and_not_after_shutdown() {
    let h = Harness::new(&["a"]).await;
    let scheduler = h.scheduler.clone();
    let answered = tokio::time::timeout(Duration::from_secs(5), scheduler.ping()).await;
    assert_eq!(answered, Ok(true));
    h.stop().await;
    let answered = tokio::time::timeout(Duration::from_secs(5), scheduler.ping()).await;
    assert_eq!(answered, Ok(false), "the shards have exited");
}
