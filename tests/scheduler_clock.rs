//! The scheduler's timing on tokio's paused clock (the wall clock follows it): retries,
//! the delay warning and the lifetime, crossed in virtual time. The spool is real; no
//! sockets (the stores are built-in agents).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwap;
use postern::config::{DomainRoute, RoutesConfig, Span};
use postern::delivery::MaildirStore;
use postern::proto::reply::{EnhancedCode, Reply, ReplyCode};
use postern::routing::Router;
use postern::scheduler::{Agent, Agents, Clock, Scheduler, SchedulerConfig, Setup};
use postern::spool::{Envelope, EnvelopeRecipient, RecipientState, Spool, SpoolOptions};

fn routes() -> Router {
    let mut domains = BTreeMap::new();
    for (d, s) in [("dead.test", "dead"), ("home.test", "home")] {
        domains.insert(
            d.to_owned(),
            DomainRoute {
                store: Some(s.to_owned()),
                ..DomainRoute::default()
            },
        );
    }
    Router::new(&RoutesConfig {
        domains,
        ..RoutesConfig::default()
    })
}

/// The `new/` files of a maildir mailbox, read.
fn mailbox(root: &std::path::Path, domain: &str, user: &str) -> Vec<String> {
    let dir = root.join(domain).join(user).join("Maildir").join("new");
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| std::fs::read_to_string(e.path()).unwrap())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Sleeps in real time without letting paused time move (a blocking task inhibits
/// tokio's auto-advance while it runs).
async fn real_sleep(ms: u64) {
    tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_millis(ms)))
        .await
        .unwrap();
}

/// Waits, in real time and bounded, until `f` holds.
async fn until_real(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..4000 {
        if f() {
            return;
        }
        real_sleep(5).await;
    }
    panic!("timed out waiting: {what}");
}

/// Virtual time moves only when this test advances it: paused, with auto-advance held off
/// by a blocking task for the whole test (otherwise it would jump ahead whenever the
/// runtime waits for the spool's disk thread). Each retry is stepped to exactly.
#[tokio::test(start_paused = true)]
async fn deferred_until_the_lifetime_then_bounced_with_a_delay_warning_first() {
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let hold = tokio::task::spawn_blocking(move || {
        let _ = hold_rx.recv();
    });
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(
        &dir.path().join("spool"),
        SpoolOptions {
            min_free_bytes: 0,
            ..SpoolOptions::default()
        },
    )
    .unwrap();
    let mail = dir.path().join("mail");
    let mut agents = Agents::new();
    let unreachable = Reply::new(
        ReplyCode::new(451).unwrap(),
        Some(EnhancedCode::new(4, 4, 1)),
        "connect to dead.test: Connection refused",
    );
    agents.insert("dead", Agent::Error(unreachable));
    agents.insert(
        "home",
        Agent::Maildir(Arc::new(MaildirStore::new("home", &mail, "gw.test"))),
    );
    let mut config = SchedulerConfig {
        shards: Some(2),
        minimal_backoff: Span(Duration::from_secs(300)),
        maximal_backoff: Span(Duration::from_secs(4000)),
        maximal_lifetime: Span(Duration::from_secs(6 * 3600)),
        delay_warning: Some(Span(Duration::from_secs(3600))),
        ..SchedulerConfig::default()
    };
    config.breaker.probe_interval = Span(Duration::from_secs(30));
    let clock = Clock::follow_tokio();
    let scheduler = Scheduler::start(Setup {
        spool: spool.clone(),
        router: Arc::new(ArcSwap::from_pointee(routes())),
        agents,
        config,
        hostname: "gw.test".into(),
        double_bounce: None,
        clock,
    });
    let env = Envelope {
        sender: "me@home.test".into(),
        params: Default::default(),
        recipients: vec![EnvelopeRecipient {
            address: "you@dead.test".into(),
            params: Default::default(),
        }],
        received_at: clock.now(),
        client: "test".into(),
    };
    let received = env.received_at;
    let mut w = spool.begin(env).unwrap();
    w.write(b"Subject: far away\r\n\r\nbody\r\n").unwrap();
    let qid = w.queue_id();
    w.commit().await.unwrap();
    // The spool keeps microseconds.
    let received = received
        - Duration::from_nanos(u64::from(
            received.duration_since(UNIX_EPOCH).unwrap().subsec_nanos() % 1000,
        ));
    let expires = received + Duration::from_secs(6 * 3600);
    scheduler.submit(qid);

    let state = || {
        spool
            .message(qid)
            .ok()
            .map(|m| m.recipients[0].state.clone())
    };
    let until_of = |s: &Option<RecipientState>| match s {
        Some(RecipientState::Deferred { until, .. }) => Some(*until),
        _ => None,
    };
    until_real("first deferral", || until_of(&state()).is_some()).await;
    let first = until_of(&state()).unwrap();
    let delay = first.duration_since(received).unwrap();
    assert!(
        delay >= Duration::from_secs(300) && delay <= Duration::from_secs(361),
        "jittered minimal backoff: {delay:?}"
    );
    let Some(RecipientState::Deferred { reply, .. }) = state() else {
        unreachable!()
    };
    assert!(reply.starts_with("451 4.4.1"), "{reply}");

    // Step to each retry time, as the scheduler's timer has it; the message is retried
    // there and deferred again, with a growing delay, until the attempt at the lifetime
    // bounces it.
    let mut untils = Vec::new();
    let mut last_seen = None;
    loop {
        // Wait (real time) until the attempt has settled: waiting for a new retry time, or
        // bounced.
        let mut next = None;
        for _ in 0..4000 {
            if let Some(t) = scheduler.next_attempt(qid).await
                && Some(t) != last_seen
            {
                next = Some(t);
                break;
            }
            if matches!(state(), Some(RecipientState::Bounced { .. }) | None) {
                break;
            }
            real_sleep(5).await;
        }
        let Some(at) = next else {
            break;
        };
        let ledger = until_of(&state()).expect("deferred in the ledger");
        let apart = at
            .duration_since(ledger)
            .or_else(|_| ledger.duration_since(at))
            .unwrap();
        assert!(
            apart < Duration::from_millis(1),
            "the timer is the ledger's retry time"
        );
        untils.push(ledger);
        last_seen = Some(at);
        let step = at.duration_since(clock.now()).unwrap_or_default() + Duration::from_millis(1);
        tokio::time::advance(step).await;
        until_real("the retry started", || until_of(&state()) != Some(ledger)).await;
        assert!(untils.len() < 100, "never bounced");
    }
    assert_eq!(untils[0], first);
    assert_eq!(
        *untils.last().unwrap(),
        expires,
        "the last attempt is at the lifetime"
    );
    assert!(untils.windows(2).all(|w| w[1] > w[0]));
    assert!(clock.now() >= expires, "not bounced before the lifetime");
    // 6 h: 5 min, 5 min, 10 min, 20 min, 40 min, then about an hour each (jittered).
    assert!(
        (7..=12).contains(&untils.len()),
        "{} attempts",
        untils.len()
    );

    // The delay warning (at the first deferral past 1 h) and the bounce reach the sender.
    until_real("two DSNs delivered", || {
        mailbox(&mail, "home.test", "me").len() == 2
    })
    .await;
    let dsns = mailbox(&mail, "home.test", "me");
    let warning = dsns
        .iter()
        .find(|d| d.contains("Action: delayed"))
        .expect("warning");
    assert!(warning.contains("Subject: Delayed Mail (still being retried)"));
    assert!(warning.contains("Status: 4.4.1"));
    let bounce = dsns
        .iter()
        .find(|d| d.contains("Action: failed"))
        .expect("bounce");
    assert!(bounce.contains("Status: 4.4.1"));
    assert!(bounce.contains("(delivery time expired)"));
    assert!(
        bounce.contains("Subject: far away"),
        "the message comes back"
    );
    until_real("finished", || spool.message(qid).is_err()).await;
    hold_tx.send(()).unwrap();
    hold.await.unwrap();
    scheduler.shutdown(Duration::from_secs(5)).await;
}

/// `Scheduler::update_delivery` (a reload): the retry already scheduled stays; the next
/// deferral uses the new backoff, and the message bounces at the new lifetime.
#[tokio::test(start_paused = true)]
async fn new_retry_settings_apply_from_the_next_deferral() {
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let hold = tokio::task::spawn_blocking(move || {
        let _ = hold_rx.recv();
    });
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(
        &dir.path().join("spool"),
        SpoolOptions {
            min_free_bytes: 0,
            ..SpoolOptions::default()
        },
    )
    .unwrap();
    let mail = dir.path().join("mail");
    let mut agents = Agents::new();
    let unreachable = Reply::new(
        ReplyCode::new(451).unwrap(),
        Some(EnhancedCode::new(4, 4, 1)),
        "connect to dead.test: Connection refused",
    );
    agents.insert("dead", Agent::Error(unreachable));
    agents.insert(
        "home",
        Agent::Maildir(Arc::new(MaildirStore::new("home", &mail, "gw.test"))),
    );
    let config = SchedulerConfig {
        shards: Some(2),
        minimal_backoff: Span(Duration::from_secs(300)),
        maximal_backoff: Span(Duration::from_secs(4000)),
        maximal_lifetime: Span(Duration::from_secs(6 * 3600)),
        ..SchedulerConfig::default()
    };
    let clock = Clock::follow_tokio();
    let scheduler = Scheduler::start(Setup {
        spool: spool.clone(),
        router: Arc::new(ArcSwap::from_pointee(routes())),
        agents,
        config: config.clone(),
        hostname: "gw.test".into(),
        double_bounce: None,
        clock,
    });
    let env = Envelope {
        sender: "me@home.test".into(),
        params: Default::default(),
        recipients: vec![EnvelopeRecipient {
            address: "you@dead.test".into(),
            params: Default::default(),
        }],
        received_at: clock.now(),
        client: "test".into(),
    };
    let received = env.received_at;
    let mut w = spool.begin(env).unwrap();
    w.write(b"Subject: reloaded\r\n\r\nbody\r\n").unwrap();
    let qid = w.queue_id();
    w.commit().await.unwrap();
    let received = received
        - Duration::from_nanos(u64::from(
            received.duration_since(UNIX_EPOCH).unwrap().subsec_nanos() % 1000,
        ));
    scheduler.submit(qid);
    let state = || {
        spool
            .message(qid)
            .ok()
            .map(|m| m.recipients[0].state.clone())
    };
    let until_of = |s: &Option<RecipientState>| match s {
        Some(RecipientState::Deferred { until, .. }) => Some(*until),
        _ => None,
    };
    until_real("first deferral", || until_of(&state()).is_some()).await;
    let first = until_of(&state()).unwrap();
    let delay = first.duration_since(received).unwrap();
    assert!(
        delay >= Duration::from_secs(300) && delay <= Duration::from_secs(361),
        "the old minimal backoff: {delay:?}"
    );

    // The reload: a much shorter backoff and lifetime.
    let new = SchedulerConfig {
        minimal_backoff: Span(Duration::from_secs(10)),
        maximal_backoff: Span(Duration::from_secs(60)),
        maximal_lifetime: Span(Duration::from_secs(1000)),
        ..config
    };
    assert!(new.validate().is_ok());
    scheduler.update_delivery(&new);
    assert_eq!(
        scheduler.delivery().policy.maximal_backoff,
        Duration::from_secs(60)
    );
    let mut scheduled = None;
    for _ in 0..4000 {
        scheduled = scheduler.next_attempt(qid).await;
        if scheduled.is_some() {
            break;
        }
        real_sleep(5).await;
    }
    let scheduled = scheduled.expect("waiting for its retry");
    let apart = scheduled
        .duration_since(first)
        .or_else(|_| first.duration_since(scheduled))
        .unwrap();
    assert!(
        apart < Duration::from_millis(1),
        "the retry already scheduled is not rewritten"
    );

    // Step to each retry; every new deferral is at most the new maximal backoff away, and
    // the last attempt is at the new lifetime (1000 s, not 6 h).
    let expires = received + Duration::from_secs(1000);
    let mut at = scheduled;
    let mut untils = Vec::new();
    loop {
        let step = at.duration_since(clock.now()).unwrap_or_default() + Duration::from_millis(1);
        tokio::time::advance(step).await;
        let attempted = clock.now();
        let mut next = None;
        for _ in 0..4000 {
            if let Some(t) = scheduler.next_attempt(qid).await
                && t > attempted
            {
                next = Some(t);
                break;
            }
            if matches!(state(), Some(RecipientState::Bounced { .. }) | None) {
                break;
            }
            real_sleep(5).await;
        }
        let Some(t) = next else {
            break;
        };
        let gap = t.duration_since(attempted).unwrap();
        assert!(
            gap <= Duration::from_secs(60)
                && (gap >= Duration::from_secs(48) || t >= expires - Duration::from_millis(1)),
            "the new backoff: {gap:?}"
        );
        untils.push(t);
        at = t;
        assert!(untils.len() < 100, "never bounced");
    }
    assert!(untils.len() >= 5, "{} retries", untils.len());
    let last = *untils.last().unwrap();
    let off = last
        .duration_since(expires)
        .or_else(|_| expires.duration_since(last))
        .unwrap();
    assert!(
        off < Duration::from_millis(1),
        "the last attempt is at the new lifetime"
    );
    until_real("bounced to the sender", || {
        mailbox(&mail, "home.test", "me")
            .iter()
            .any(|d| d.contains("Action: failed"))
    })
    .await;
    assert!(clock.now() < received + Duration::from_secs(1200));
    until_real("finished", || spool.message(qid).is_err()).await;
    hold_tx.send(()).unwrap();
    hold.await.unwrap();
    scheduler.shutdown(Duration::from_secs(5)).await;
}
