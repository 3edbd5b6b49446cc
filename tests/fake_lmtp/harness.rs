//! A scheduler on a temporary spool with fake LMTP stores, for the scheduler tests.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different part"
)]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helper")]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use postern::config::{DomainRoute, RoutesConfig, Span};
use postern::delivery::config::{StoreAddress, WindowConfig};
use postern::delivery::{LmtpStoreConfig, RemoteStore, StorePool};
use postern::routing::Router;
use postern::scheduler::{Agent, Agents, Clock, Scheduler, SchedulerConfig, Setup};
use postern::spool::{Envelope, EnvelopeRecipient, QueueId, RecipientState, Spool, SpoolOptions};

use super::{FakeStore, Script};

pub const BODY: &str = "From: s@a.test\r\nSubject: test\r\n\r\nHello.\r\n";

pub fn router(routes: &[(&str, &str)]) -> Router {
    router_with_grace(routes, RoutesConfig::default().unroutable_grace.0)
}

/// [`router`] with this `routes.unroutable_grace`.
pub fn router_with_grace(routes: &[(&str, &str)], grace: std::time::Duration) -> Router {
    let domains: BTreeMap<String, DomainRoute> = routes
        .iter()
        .map(|(d, s)| {
            (
                (*d).to_owned(),
                DomainRoute {
                    store: Some((*s).to_owned()),
                    ..DomainRoute::default()
                },
            )
        })
        .collect();
    Router::new(&RoutesConfig {
        domains,
        unroutable_grace: postern::config::Span(grace),
        ..RoutesConfig::default()
    })
}

pub fn lmtp_agent(name: &str, port: u16) -> Agent {
    lmtp_agent_with(name, port, WindowConfig::default())
}

/// An LMTP agent whose window has these settings.
pub fn lmtp_agent_with(name: &str, port: u16, window: WindowConfig) -> Agent {
    let mut cfg = LmtpStoreConfig::new(
        name,
        StoreAddress::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
    );
    cfg.window = window;
    Agent::Lmtp(StorePool::new(Arc::new(
        RemoteStore::from_config(&cfg, "gw.test").unwrap(),
    )))
}

pub fn config() -> SchedulerConfig {
    let mut c = SchedulerConfig {
        shards: Some(2),
        minimal_backoff: Span(Duration::from_millis(300)),
        maximal_backoff: Span(Duration::from_secs(1)),
        ..SchedulerConfig::default()
    };
    c.breaker.failures = 2;
    c.breaker.probe_interval = Span(Duration::from_millis(200));
    c
}

pub fn spool_options() -> SpoolOptions {
    SpoolOptions {
        min_free_bytes: 0,
        ..SpoolOptions::default()
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub spool: Spool,
    pub router: Arc<ArcSwap<Router>>,
    pub scheduler: Scheduler,
    pub stores: HashMap<String, FakeStore>,
}

impl Harness {
    /// Fake stores `names`, domain `<name>.test` routed to each.
    pub async fn new(names: &[&str]) -> Self {
        // Log lines (one per recipient attempt) show with --nocapture.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut stores = HashMap::new();
        for n in names {
            stores.insert((*n).to_owned(), FakeStore::start(Script::default()).await);
        }
        Self::with(dir, stores, config()).await
    }

    pub async fn with(
        dir: tempfile::TempDir,
        stores: HashMap<String, FakeStore>,
        config: SchedulerConfig,
    ) -> Self {
        Self::with_window(dir, stores, config, WindowConfig::default()).await
    }

    /// Every store's window with these settings.
    pub async fn with_window(
        dir: tempfile::TempDir,
        stores: HashMap<String, FakeStore>,
        config: SchedulerConfig,
        window: WindowConfig,
    ) -> Self {
        // After a stop, the last task of the previous scheduler may still be dropping its
        // handle on another worker thread for a moment: wait for the lock (bounded).
        let mut opened = None;
        for _ in 0..200 {
            match Spool::open(&dir.path().join("spool"), spool_options()) {
                Err(postern::spool::SpoolError::Locked(_)) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => {
                    opened = Some(other.unwrap());
                    break;
                }
            }
        }
        let (spool, _) = opened.expect("the spool lock was released");
        let routes: Vec<(String, String)> = stores
            .keys()
            .map(|n| (format!("{n}.test"), n.clone()))
            .collect();
        let routes: Vec<(&str, &str)> = routes
            .iter()
            .map(|(d, s)| (d.as_str(), s.as_str()))
            .collect();
        let router = Arc::new(ArcSwap::from_pointee(router(&routes)));
        let mut agents = Agents::new();
        for (n, s) in &stores {
            agents.insert(n, lmtp_agent_with(n, s.addr.port(), window));
        }
        let scheduler = Scheduler::start(Setup {
            spool: spool.clone(),
            router: Arc::clone(&router),
            agents,
            config,
            hostname: "gw.test".into(),
            double_bounce: None,
            clock: Clock::System,
        });
        Self {
            dir,
            spool,
            router,
            scheduler,
            stores,
        }
    }

    pub fn store(&self, name: &str) -> &FakeStore {
        &self.stores[name]
    }

    pub fn queue(&self, sender: &str, rcpts: &[&str]) -> QueueId {
        let q = queue(&self.spool, sender, rcpts, BODY);
        self.scheduler.submit(q);
        q
    }

    pub fn states(&self, q: QueueId) -> Vec<RecipientState> {
        self.spool
            .message(q)
            .unwrap()
            .recipients
            .into_iter()
            .map(|r| r.state)
            .collect()
    }

    pub async fn stop(self) -> (tempfile::TempDir, HashMap<String, FakeStore>) {
        self.stop_within(Duration::from_secs(5)).await
    }

    /// Shuts the scheduler down, giving transactions in flight `deadline`.
    pub async fn stop_within(
        self,
        deadline: Duration,
    ) -> (tempfile::TempDir, HashMap<String, FakeStore>) {
        self.scheduler.shutdown(deadline).await;
        drop(self.spool);
        (self.dir, self.stores)
    }
}

pub fn queue(spool: &Spool, sender: &str, rcpts: &[&str], body: &str) -> QueueId {
    let env = Envelope {
        sender: sender.into(),
        params: Default::default(),
        recipients: rcpts
            .iter()
            .map(|r| EnvelopeRecipient {
                address: (*r).into(),
                params: Default::default(),
            })
            .collect(),
        received_at: std::time::SystemTime::now(),
        client: "test".into(),
    };
    let mut w = spool.begin(env).unwrap();
    w.write(body.as_bytes()).unwrap();
    let q = w.queue_id();
    w.commit().wait().unwrap();
    q
}

/// Waits (bounded) until `f` holds.
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
