//! The LMTP delivery agent's pool against the scripted fake store (`fake_lmtp`): reuse with
//! RSET between transactions, the reuse limit, the idle sweep, broken connections, recipients
//! split per transaction, `max_connections`, and a transaction waiting for a greeting that
//! takes a connection given back.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod delivery_common;
mod fake_lmtp;

use std::time::Duration;

use delivery_common::lmtp::{BODY, config, rcpts, store};
use delivery_common::{by_index, envelope, rcpt};
use fake_lmtp::{FakeStore, Script};
use postern::config::Span;
use postern::delivery::pool::PoolOptions;
use postern::delivery::{Outcome, Recipient, Scope, StorePool};

#[tokio::test]
async fn pool_reuses_one_connection_with_rset_between() {
    let fake = FakeStore::start(Script::default()).await;
    let s = store(&config(fake.addr));
    let options = PoolOptions {
        rset_skip: Duration::ZERO,
    };
    let pool = StorePool::with_options(s, options);
    for i in 0..3 {
        let to = rcpts(&[&format!("user{i}")]);
        let report = pool
            .deliver(&envelope(BODY), &to, BODY, &mut |_, _: &Outcome| {})
            .await;
        assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
        assert_eq!(
            report.new_connection,
            i == 0,
            "only the first transaction ran on a connection opened for it"
        );
    }
    let sessions = fake.sessions();
    assert_eq!(sessions.len(), 1, "one connection for three messages");
    assert_eq!(sessions[0].transactions.len(), 3);
    assert_eq!(sessions[0].count("RSET"), 2, "RSET before each reuse");
    assert_eq!(pool.status().size, 1);
}

#[tokio::test]
async fn pool_skips_rset_right_after_use() {
    let fake = FakeStore::start(Script::default()).await;
    let options = PoolOptions {
        rset_skip: Duration::from_secs(3600),
    };
    let pool = StorePool::with_options(store(&config(fake.addr)), options);
    for _ in 0..2 {
        pool.deliver(
            &envelope(BODY),
            &rcpts(&["a"]),
            BODY,
            &mut |_, _: &Outcome| {},
        )
        .await;
    }
    assert_eq!(fake.sessions().len(), 1);
    assert_eq!(fake.sessions()[0].count("RSET"), 0);
}

#[tokio::test]
async fn pool_retires_connections_past_the_reuse_limit() {
    let fake = FakeStore::start(Script::default()).await;
    let mut c = config(fake.addr);
    c.reuse_limit = Span(Duration::ZERO);
    let pool = StorePool::new(store(&c));
    for _ in 0..3 {
        let report = pool
            .deliver(
                &envelope(BODY),
                &rcpts(&["a"]),
                BODY,
                &mut |_, _: &Outcome| {},
            )
            .await;
        assert_eq!(report.scope(), Scope::Recipient);
        assert!(report.new_connection, "each on a connection of its own");
    }
    let sessions = fake.sessions();
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions[0].count("QUIT"), 1, "retired politely");
    assert_eq!(sessions[1].count("QUIT"), 1);
}

#[tokio::test]
async fn pool_sweep_closes_idle_connections() {
    let fake = FakeStore::start(Script::default()).await;
    let mut c = config(fake.addr);
    c.idle_timeout = Span(Duration::ZERO);
    let pool = StorePool::new(store(&c));
    pool.deliver(
        &envelope(BODY),
        &rcpts(&["a"]),
        BODY,
        &mut |_, _: &Outcome| {},
    )
    .await;
    assert_eq!(pool.status().size, 1);
    assert_eq!(pool.sweep().await, 1);
    assert_eq!(pool.status().size, 0);
    assert_eq!(fake.sessions()[0].count("QUIT"), 1);
}

#[tokio::test]
async fn pool_drops_a_broken_connection() {
    let fake = FakeStore::start(Script {
        drop_after_replies: Some(0),
        ..Script::default()
    })
    .await;
    let pool = StorePool::new(store(&config(fake.addr)));
    let report = pool
        .deliver(
            &envelope(BODY),
            &rcpts(&["a"]),
            BODY,
            &mut |_, _: &Outcome| {},
        )
        .await;
    assert_eq!(by_index(&report, 1), ["in-doubt"]);
    assert_eq!(pool.status().size, 0, "detached, not returned");
}

#[tokio::test]
async fn recipients_split_per_transaction() {
    let fake = FakeStore::start(Script::default()).await;
    let mut c = config(fake.addr);
    c.recipients_per_transaction = 2;
    let pool = StorePool::new(store(&c));
    let to: Vec<Recipient> = (0..5)
        .map(|i| rcpt(10 + i, &format!("u{i}@example.org")))
        .collect();
    let mut seen = Vec::new();
    let report = pool
        .deliver(&envelope(BODY), &to, BODY, &mut |i, _: &Outcome| {
            seen.push(i)
        })
        .await;
    assert_eq!(seen, [10, 11, 12, 13, 14]);
    assert!(
        report
            .outcomes
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Delivered(_)))
    );
    let txns = fake.transactions();
    let per: Vec<usize> = txns.iter().map(|t| t.rcpts.len()).collect();
    assert_eq!(per, [2, 2, 1]);
    assert!(txns.iter().all(|t| t.content == BODY));
    assert_eq!(
        fake.sessions().len(),
        1,
        "the transactions share a connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_never_opens_more_than_max_connections() {
    // A third concurrent session would be greeted with 421 and its message not attempted.
    let fake = FakeStore::start(Script {
        max_sessions: Some(2),
        ..Script::default()
    })
    .await;
    let mut c = config(fake.addr);
    c.max_connections = 2;
    let pool = StorePool::new(store(&c));
    assert_eq!(pool.status().max_size, 2);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..6 {
        let pool = pool.clone();
        // Spawned: the delivery future is Send, as the scheduler needs.
        tasks.spawn(async move {
            let to = rcpts(&[&format!("user{i}")]);
            pool.deliver(&envelope(BODY), &to, BODY, &mut |_, _: &Outcome| {})
                .await
        });
    }
    while let Some(report) = tasks.join_next().await {
        assert_eq!(by_index(&report.unwrap(), 1), ["delivered 250 2.0.0"]);
    }
    // Never more than two at once: the store refuses a third with 421, and none was. (Over
    // time there may be more than two: a connect overtaken by a connection given back is
    // closed as soon as it is greeted.)
    let sessions = fake.sessions();
    assert!(sessions.iter().all(|s| !s.refused), "{sessions:?}");
    assert!(sessions.len() <= 4, "{} sessions", sessions.len());
    assert_eq!(fake.transactions().len(), 6);

    // The scheduler's window can shrink the pool.
    pool.resize(1);
    assert_eq!(pool.status().max_size, 1);
    assert!(pool.status().size <= 1);
}

/// A store that serves one session at a time and leaves the next connection unanswered in
/// its backlog (Cyrus `maxchild`, Dovecot `process_limit`). The second of two concurrent
/// transactions has to open a new connection, which is not greeted while the first holds the
/// only worker; when the first ends, its connection is handed to the second instead of
/// sitting idle in the pool (where it would keep the worker, and the second would wait for
/// its greeting until the idle timeout).
#[tokio::test]
async fn a_transaction_waiting_for_a_greeting_takes_a_connection_given_back() {
    let fake = FakeStore::start(Script {
        max_served: Some(1),
        ..Script::default()
    })
    .await;
    let mut c = config(fake.addr);
    c.max_connections = 2;
    c.idle_timeout = Span(Duration::from_secs(60));
    let pool = StorePool::new(store(&c));
    let deliver = |who: &'static str| {
        let pool = pool.clone();
        async move {
            pool.deliver(
                &envelope(BODY),
                &rcpts(&[who]),
                BODY,
                &mut |_, _: &Outcome| {},
            )
            .await
        }
    };
    let both = async { tokio::join!(deliver("first"), deliver("second")) };
    let (a, b) = tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .expect("the second transaction waited on an unanswered connect");
    assert_eq!(by_index(&a, 1), ["delivered 250 2.0.0"]);
    assert_eq!(by_index(&b, 1), ["delivered 250 2.0.0"]);
    let served: Vec<_> = fake
        .sessions()
        .into_iter()
        .filter(|s| !s.transactions.is_empty())
        .collect();
    assert_eq!(served.len(), 1, "both went over the one served session");
    assert_eq!(served[0].transactions.len(), 2);
}
