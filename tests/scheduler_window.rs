//! The scheduler's windows against in-process fake LMTP stores: busy replies narrow a
//! window and successes widen it, the latency window is cut once per round, one transaction
//! per mailbox within the window, a slow or silent store shrinks only its own window, and a
//! new breaker threshold applies at the next failure. Real spool, real sockets on
//! 127.0.0.1, tiny backoffs; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod fake_lmtp;

use std::time::Duration;

use fake_lmtp::harness::{Harness, config, until};
use fake_lmtp::{FakeStore, Rcpt, Script};
use postern::delivery::WindowConfig;
use postern::spool::RecipientState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_does_not_answer_holds_only_its_own_window() {
    let h = Harness::new(&["a", "c"]).await;
    h.store("c").update(|s| s.hold_replies = true);
    for i in 0..20 {
        h.queue(
            "s@a.test",
            &[&format!("u{i}@c.test"), &format!("u{i}@a.test")],
        );
    }
    until(
        "all of a's recipients delivered while c holds every reply",
        || h.store("a").delivered().len() == 20,
    )
    .await;
    assert!(h.store("c").delivered().is_empty());
    assert_eq!(h.spool.len(), 20);
    h.store("c").update(|s| s.hold_replies = false);
    until("all finished once c answers", || h.spool.is_empty()).await;
    assert_eq!(h.store("c").delivered().len(), 20);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transaction_per_mailbox_at_a_time_and_the_window_bounds_concurrency() {
    let h = Harness::new(&["a"]).await;
    h.store("a").update(|s| s.hold_replies = true);
    for i in 0..30 {
        h.queue("", &["same@a.test", &format!("u{i}@a.test")]);
    }
    until("the window's worth of transactions open", || {
        h.store("a").max_active() >= 5
    })
    .await;
    // Held replies: nothing succeeds, so the window stays at its initial 5.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.store("a").max_active(),
        5,
        "slow start: the initial window"
    );
    h.store("a").update(|s| s.hold_replies = false);
    until("all delivered", || h.spool.is_empty()).await;
    assert_eq!(
        h.store("a").overlaps(),
        0,
        "same@a.test never in two transactions at once"
    );
    assert_eq!(h.store("a").delivered().len(), 60);
    assert!(h.store("a").max_active() <= 10, "max_connections");
    h.stop().await;
}

async fn window_of(h: &Harness, store: &str) -> usize {
    let all = h.scheduler.stores().await;
    all.into_iter().find(|s| s.name == store).unwrap().window
}

/// Store `a`'s window starts at 5; four messages get `451 4.3.2` from it.
async fn four_busy_replies(h: &Harness) {
    assert_eq!(window_of(h, "a").await, 5, "slow start");
    for i in 0..4 {
        h.store("a").rcpt(
            &format!("busy{i}"),
            Rcpt::result("451 4.3.2 too busy, try later"),
        );
        h.queue("", &[&format!("busy{i}@a.test")]);
    }
    until("four busy replies", || h.store("a").completed().len() == 4).await;
}

/// Postfix's feedback (`window: {latency: false}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_replies_narrow_the_window_and_successes_widen_it_again() {
    let mut cfg = config();
    cfg.minimal_backoff = postern::config::Span(Duration::from_secs(600));
    cfg.maximal_backoff = postern::config::Span(Duration::from_secs(600));
    let mut stores = std::collections::HashMap::new();
    stores.insert("a".to_owned(), FakeStore::start(Script::default()).await);
    let feedback = WindowConfig {
        latency: false,
        ..WindowConfig::default()
    };
    let h = Harness::with_window(tempfile::tempdir().unwrap(), stores, cfg, feedback).await;
    four_busy_replies(&h).await;
    let mut w = 0;
    for _ in 0..200 {
        w = window_of(&h, "a").await;
        if w == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(w, 1, "each busy reply takes one off, down to one");
    let st = h.scheduler.stores().await.remove(0);
    assert_eq!(
        st.breaker,
        postern::scheduler::breaker::BreakerState::Closed,
        "busy is not down"
    );
    for i in 0..3 {
        h.queue("", &[&format!("ok{i}@a.test")]);
    }
    until("three successes", || h.store("a").delivered().len() == 3).await;
    let mut w = 0;
    for _ in 0..200 {
        w = window_of(&h, "a").await;
        if w == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(w, 3, "one success at window 1, a run of two at window 2");
    h.stop().await;
}

/// The latency window (the default): busy replies are a hard signal, a quarter off at most
/// once per round (one overload event fails several transactions at once), and busy is not
/// down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_replies_cut_the_latency_window_once_per_round() {
    let mut cfg = config();
    cfg.minimal_backoff = postern::config::Span(Duration::from_secs(600));
    cfg.maximal_backoff = postern::config::Span(Duration::from_secs(600));
    let mut stores = std::collections::HashMap::new();
    stores.insert("a".to_owned(), FakeStore::start(Script::default()).await);
    let h = Harness::with(tempfile::tempdir().unwrap(), stores, cfg).await;
    four_busy_replies(&h).await;
    for _ in 0..200 {
        if window_of(&h, "a").await < 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give a straggling TxnDone time to land, then check it did not cut again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(window_of(&h, "a").await, 3, "5 × ¾, once for the burst");
    let st = h.scheduler.stores().await.remove(0);
    assert_eq!(
        st.breaker,
        postern::scheduler::breaker::BreakerState::Closed,
        "busy is not down"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_breaker_threshold_applies_at_the_next_failure() {
    let mut cfg = config();
    cfg.minimal_backoff = postern::config::Span(Duration::from_secs(600));
    cfg.maximal_backoff = postern::config::Span(Duration::from_secs(600));
    cfg.breaker.failures = 1000;
    let mut stores = std::collections::HashMap::new();
    for n in ["a", "b", "c"] {
        stores.insert(n.to_owned(), FakeStore::start(Script::default()).await);
    }
    let h = Harness::with(tempfile::tempdir().unwrap(), stores, cfg.clone()).await;
    h.store("c").update(|s| s.max_sessions = Some(0));
    let breaker = || async {
        h.scheduler
            .stores()
            .await
            .into_iter()
            .find(|s| s.name == "c")
            .unwrap()
            .breaker
    };
    let q1 = h.queue("s@a.test", &["u1@c.test"]);
    until("deferred", || {
        matches!(h.states(q1)[0], RecipientState::Deferred { .. })
    })
    .await;
    assert_eq!(
        breaker().await,
        postern::scheduler::breaker::BreakerState::Closed,
        "far from 1000 failures"
    );
    cfg.breaker.failures = 1;
    h.scheduler.update_delivery(&cfg);
    let q2 = h.queue("s@a.test", &["u2@c.test"]);
    until("deferred", || {
        matches!(h.states(q2)[0], RecipientState::Deferred { .. })
    })
    .await;
    assert_ne!(
        breaker().await,
        postern::scheduler::breaker::BreakerState::Closed,
        "the new threshold opened it"
    );
    h.stop().await;
}

/// Windows are per store: a store that turns slow and busy has its own window cut, and a
/// fast store beside it (on whichever shard) keeps its own. (A store that is merely slower,
/// the same at any load, is not congested: its baseline is re-learned at the next probe.)
/// The windows steer on the hard signals only (`latency: false`): on a loaded test machine
/// the fast store's own latency samples may rise and cut it, which is not what is tested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_shrinks_only_its_own_window() {
    let mut stores = std::collections::HashMap::new();
    stores.insert("slow".to_owned(), FakeStore::start(Script::default()).await);
    stores.insert("fast".to_owned(), FakeStore::start(Script::default()).await);
    let hard_signals = WindowConfig {
        latency: false,
        ..WindowConfig::default()
    };
    let h =
        Harness::with_window(tempfile::tempdir().unwrap(), stores, config(), hard_signals).await;
    for i in 0..15 {
        h.queue("", &[&format!("warm{i}@slow.test")]);
        h.queue("", &[&format!("warm{i}@fast.test")]);
    }
    until("warm-up delivered", || {
        h.store("slow").delivered().len() == 15 && h.store("fast").delivered().len() == 15
    })
    .await;
    let fast_before = window_of(&h, "fast").await;
    // Now one store answers 100 ms late that it is too busy, and both get more mail.
    h.store("slow")
        .update(|s| s.reply_delay = Some(Duration::from_millis(100)));
    for i in 0..40 {
        h.store("slow").rcpt(
            &format!("late{i}"),
            Rcpt::result("451 4.3.2 too busy, try later"),
        );
        h.queue("", &[&format!("late{i}@slow.test")]);
        h.queue("", &[&format!("more{i}@fast.test")]);
    }
    until("all attempted", || {
        h.store("slow").completed().len() >= 55 && h.store("fast").delivered().len() == 55
    })
    .await;
    let (slow, fast) = (window_of(&h, "slow").await, window_of(&h, "fast").await);
    assert!(slow < 5, "the slow store's window was cut: {slow}");
    assert!(
        fast >= fast_before && fast >= 5,
        "the fast store's window stayed: {fast_before} -> {fast}"
    );
    h.stop().await;
}
