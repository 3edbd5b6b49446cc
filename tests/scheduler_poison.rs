//! Poison counting in the scheduler (issue 13 part 3), with the fake store: a recipient in
//! doubt whose store is down is not tried abnormally (the transaction never reached the
//! store), so its count does not grow and it is not quarantined; a recipient the store keeps
//! dropping after the final dot is, after `delivery.poison_attempts` attempts.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod fake_lmtp;

use std::collections::HashMap;
use std::time::Duration;

use fake_lmtp::harness::{BODY, Harness, config, queue, spool_options, until};
use fake_lmtp::{FakeStore, Script};
use postern::spool::Spool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_down_does_not_count_toward_quarantine() {
    let dir = tempfile::tempdir().unwrap();
    // Left in doubt once by an earlier run (a crash after the final dot).
    let q = {
        let (spool, _) = Spool::open(&dir.path().join("spool"), spool_options()).unwrap();
        let q = queue(&spool, "me@a.test", &["u@a.test"], BODY);
        spool.mark_in_doubt_counted(q, &[(0, 1)]).wait().unwrap();
        q
    };
    let store = FakeStore::start(Script {
        max_sessions: Some(0),
        ..Script::default()
    })
    .await;
    let mut stores = HashMap::new();
    stores.insert("a".to_owned(), store);
    let mut cfg = config();
    cfg.poison_attempts = 2;
    let h = Harness::with(dir, stores, cfg).await;
    // Attempts every 300 ms to 1 s against a store that greets 421.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sessions = h.store("a").sessions().len();
    assert!(
        sessions >= 2,
        "attempted while down: {sessions} {:?}",
        h.spool.status(q)
    );
    assert!(!h.spool.is_quarantined(q), "a store down is no poison");
    assert_eq!(h.spool.status(q).unwrap().attempts, vec![1]);
    h.store("a").update(|s| s.max_sessions = None);
    until("delivered", || h.spool.is_empty()).await;
    assert_eq!(h.store("a").delivered().len(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_dropping_the_connection_after_the_dot_quarantines_the_message() {
    let mut stores = HashMap::new();
    let store = FakeStore::start(Script {
        drop_after_replies: Some(0),
        drop_times: Some(100),
        ..Script::default()
    })
    .await;
    stores.insert("a".to_owned(), store);
    let mut cfg = config();
    cfg.poison_attempts = 3;
    let h = Harness::with(tempfile::tempdir().unwrap(), stores, cfg).await;
    let q = h.queue("me@a.test", &["u@a.test"]);
    until("quarantined", || h.spool.is_quarantined(q)).await;
    assert_eq!(h.spool.status(q).unwrap().attempts, vec![3]);
    let dots = h.store("a").completed().len();
    assert_eq!(dots, 3, "three attempts reached the store");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h.store("a").completed().len(),
        dots,
        "not tried while quarantined"
    );
    h.stop().await;
}
