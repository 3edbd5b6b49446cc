//! The scheduler's timing on tokio's paused clock (the wall clock follows it): retries,
//! the delay warning and the lifetime, crossed in virtual time. The spool is real; no
//! sockets (the stores are built-in agents).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use postern::config::{DomainRoute, RoutesConfig, Span};
use postern::delivery::MaildirStore;
use postern::proto::reply::{EnhancedCode, Reply, ReplyCode};
use postern::routing::Router;
use postern::scheduler::{Agent, Agents, Clock, Scheduler, SchedulerConfig, Setup};
use postern::spool::{Envelope, EnvelopeRecipient, RecipientState, Spool, SpoolOptions};
use tokio::time::Instant;

fn routes() -> Router {
    let mut domains = BTreeMap::new();
    for (d, s) in [("dead.test", "dead"), ("home.test", "home")] {
        domains.insert(
            d.to_owned(),
            DomainRoute {
                store: s.to_owned(),
                authoritative: false,
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

#[tokio::test(start_paused = true)]
async fn deferred_until_the_lifetime_then_bounced_with_a_delay_warning_first() {
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
        clock,
    });
    let start = Instant::now();
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
    let mut w = spool.begin(env).unwrap();
    w.write(b"Subject: far away\r\n\r\nbody\r\n").unwrap();
    let qid = w.queue_id();
    w.commit().await.unwrap();
    scheduler.submit(qid);

    // Deferred, with a retry time between 5 and 6 minutes away (jittered minimal backoff).
    let mut deferred_at = None;
    for _ in 0..1000 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if let Ok(m) = spool.message(qid)
            && let RecipientState::Deferred { until, reply } = &m.recipients[0].state
        {
            assert!(reply.starts_with("451 4.4.1"));
            deferred_at = Some(until.duration_since(m.arrival).unwrap());
            break;
        }
    }
    let first = deferred_at.expect("deferred");
    assert!(
        first >= Duration::from_secs(300) && first <= Duration::from_secs(361),
        "{first:?}"
    );

    // Virtual hours pass; the message goes away at its lifetime.
    while spool.message(qid).is_ok() {
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            start.elapsed() < Duration::from_secs(7 * 3600),
            "not bounced at the lifetime"
        );
    }
    let lived = start.elapsed();
    assert!(
        lived >= Duration::from_secs(6 * 3600),
        "bounced early: {lived:?}"
    );
    assert!(
        lived < Duration::from_secs(6 * 3600 + 300),
        "bounced late: {lived:?}"
    );
    // Let the DSNs be delivered to the sender's maildir.
    for _ in 0..600 {
        if mailbox(&mail, "home.test", "me").len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let dsns = mailbox(&mail, "home.test", "me");
    assert_eq!(dsns.len(), 2, "one delay warning, one bounce");
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
    scheduler.shutdown(Duration::from_secs(5)).await;
}
