//! The running gateway: opens the spool, binds the metrics endpoint and every listener, and
//! drains on shutdown.
//!
//! Start-up is all or nothing: if the spool cannot be opened or any address cannot be bound,
//! [`Gateway::start`] fails with that error and nothing keeps running. Shutdown (the token
//! is cancelled) stops accepting at once (SMTP/LMTP listeners and the admin socket), and
//! drains against one deadline, `drain_timeout`: sessions finish their current transaction
//! (idle ones are told 421), while the scheduler starts no new delivery and waits for the
//! ones in flight. At the deadline the rest are ended: a message whose 250 was not sent is
//! not acknowledged, and a delivery cut short leaves its recipients in doubt in the ledger
//! (retried alone after a restart), so nothing accepted is lost. The stores' connection
//! pools, shared by the scheduler and the listeners in `mode: proxy`, close only after both
//! have drained, so a proxy transaction in flight at the signal is still relayed.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ListenerMode, ListenerProtocol};
use crate::edge::Edge;
use crate::listener::{Listener, ListenerError, Services};
use crate::reload::{LiveRoutes, ReloadError};
use crate::scheduler::{Agents, Clock, Scheduler, Setup};
use crate::spool::{Spool, SpoolError, SpoolOptions};

/// How often the configuration and users files are checked for a change.
const ROUTES_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The spool could not be opened (locked by another gateway, unreadable, …).
    #[error("spool {path}: {source}")]
    Spool {
        /// Its directory.
        path: String,
        /// Why.
        source: SpoolError,
    },
    /// The metrics address could not be bound.
    #[error("metrics: cannot bind {address}: {source}")]
    Metrics {
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A store's settings did not load (a password or CA file, say).
    #[error(transparent)]
    Store(crate::delivery::lmtp::StoreError),
    /// A listener could not start.
    #[error(transparent)]
    Listener(#[from] ListenerError),
    /// The admin socket could not be set up.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

/// A started gateway.
pub struct Gateway {
    /// `(listener name, bound address)`, in configuration order.
    pub listeners: Vec<(String, String)>,
    /// Where `/metrics` is served.
    pub metrics_address: SocketAddr,
    /// The admin socket (`postern queue …`).
    pub admin_socket: std::path::PathBuf,
    /// The spool (for tests and tools in the same process).
    pub spool: Spool,
    /// The scheduler, unless `delivery.enabled` is off.
    pub scheduler: Option<Scheduler>,
    routes: Arc<LiveRoutes>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Gateway {
    /// Opens the spool, binds everything, and starts serving (and, unless
    /// `delivery.enabled` is off, delivering).
    pub async fn start(config: Config) -> Result<Self, GatewayError> {
        Self::start_with_agents(config, Agents::new()).await
    }

    /// [`Gateway::start`] with extra delivery agents, by store name, next to (or instead
    /// of) the configured ones: tests, and stores built outside the configuration.
    pub async fn start_with_agents(
        config: Config,
        extra_agents: Agents,
    ) -> Result<Self, GatewayError> {
        let handle = crate::metrics::install();
        let shutdown = CancellationToken::new();
        let mut options = SpoolOptions {
            node_id: config.node_id,
            min_free_bytes: config.spool.min_free.0,
            ..SpoolOptions::default()
        };
        if !config.delivery.enabled {
            // No scheduler takes the fresh envelopes: keep none.
            options.fresh_budget = 0;
        }
        let (spool, report) =
            Spool::open(&config.spool.path, options).map_err(|source| GatewayError::Spool {
                path: config.spool.path.display().to_string(),
                source,
            })?;
        tracing::info!(path = %config.spool.path.display(), "spool open: {report}");
        let metrics_listener =
            crate::metrics::bind(config.metrics.address)
                .await
                .map_err(|source| GatewayError::Metrics {
                    address: config.metrics.address,
                    source,
                })?;
        let metrics_address = metrics_listener
            .local_addr()
            .unwrap_or(config.metrics.address);
        tracing::info!(address = %metrics_address, "metrics");
        let admin = crate::admin::AdminServer::bind(&config.admin_socket())?;
        let admin_socket = admin.path().to_owned();
        // The map in force: the listeners, the scheduler and the admin socket all read it.
        let routes = Arc::new(LiveRoutes::start(&config));
        let router = routes.router();
        if config.source.is_some() {
            tokio::spawn(Arc::clone(&routes).watch(ROUTES_POLL, shutdown.clone()));
        }
        // The agents exist whether or not the scheduler runs: a listener in `mode: proxy`
        // relays through them (a pure concentrator may run with delivery off), and the edge
        // checks (recipient verification, backpressure) use their pools, windows and loads.
        // The scheduler and the listeners share them: one pool and one window per store.
        let mut agents = Agents::from_config(
            &config.stores,
            &config.hostname,
            config.delivery.initial_window,
        )
        .map_err(GatewayError::Store)?;
        for (name, agent) in extra_agents.iter() {
            agents.insert(name, agent.clone());
        }
        let edge = Arc::new(Edge::new(&agents, &config.verify_cache));
        let scheduler = config.delivery.enabled.then(|| {
            Scheduler::start(Setup {
                spool: spool.clone(),
                router: Arc::clone(&router),
                agents: agents.clone(),
                config: config.delivery.clone(),
                hostname: config.hostname.clone(),
                double_bounce: config.double_bounce.clone(),
                clock: Clock::System,
            })
        });
        if let Some(s) = &scheduler {
            routes.attach_scheduler(s.clone());
        } else {
            for (_, agent) in agents.iter() {
                if let crate::scheduler::Agent::Lmtp(pool) = agent {
                    // The scheduler sweeps them when it runs; without it, this does.
                    pool.spawn_sweeper(pool.sweep_interval());
                }
            }
        }
        let services = Services {
            hostname: config.hostname.clone(),
            node_id: config.node_id,
            spool: spool.clone(),
            router: Arc::clone(&router),
            scheduler: scheduler.clone(),
            agents: agents.clone(),
            edge: Some(Arc::clone(&edge)),
            shutdown: shutdown.clone(),
        };
        let mut bound = Vec::new();
        for l in &config.listeners {
            if l.mode == ListenerMode::Proxy
                && l.protocol == ListenerProtocol::Smtp
                && scheduler.is_none()
            {
                tracing::warn!(
                    listener = %l.name,
                    "mode: proxy over SMTP with delivery.enabled: false: recipients a store does not take in a mixed transaction are queued and wait until delivery is enabled"
                );
            }
            bound.push(Listener::bind(l, services.clone()).await?);
        }
        let listeners = config
            .listeners
            .iter()
            .zip(&bound)
            .map(|(c, l)| (c.name.clone(), l.local_addr()))
            .collect();
        let backend = crate::admin::Backend {
            spool: spool.clone(),
            scheduler: scheduler.clone(),
            router: Arc::clone(&router),
        };
        let admin_task = tokio::spawn(admin.serve(Arc::new(backend), shutdown.clone()));
        let tracker = TaskTracker::new();
        let listener_names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        let store_names: Vec<&str> = config.stores.iter().map(|s| s.name()).collect();
        let counted = spool.clone();
        let sampler = crate::metrics::watch(
            &listener_names,
            &store_names,
            config.spool.path.clone(),
            move || crate::metrics::SpoolCounts {
                messages: counted.len(),
                quarantined: counted.quarantined(),
            },
            shutdown.clone(),
        );
        let metrics_task = tokio::spawn(crate::metrics::serve(
            metrics_listener,
            handle,
            shutdown.clone(),
        ));
        let accept_tasks: Vec<_> = bound
            .into_iter()
            .map(|l| tokio::spawn(l.serve(tracker.clone())))
            .collect();
        let drain = config.drain_timeout.0;
        let token = shutdown.clone();
        let scheduler_for_drain = scheduler.clone();
        let task = tokio::spawn(async move {
            token.cancelled().await;
            // Sessions and deliveries drain at the same time, against one deadline: the
            // gateway is gone within `drain_timeout` of the signal.
            let sessions = async {
                for t in accept_tasks {
                    let _ = t.await;
                }
                tracker.close();
                if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
                    tracing::warn!(
                        remaining = tracker.len(),
                        "drain deadline passed; ending the remaining sessions (their messages were not acknowledged)"
                    );
                }
            };
            let deliveries = async {
                if let Some(scheduler) = scheduler_for_drain {
                    scheduler.drain(drain).await;
                }
            };
            tokio::join!(sessions, deliveries);
            // The pools are shared by the scheduler and the proxy sessions: closed once both
            // have drained.
            for (_, agent) in agents.iter() {
                if let crate::scheduler::Agent::Lmtp(pool) = agent {
                    pool.close();
                }
            }
            let _ = metrics_task.await;
            let _ = admin_task.await;
            let _ = sampler.await;
        });
        Ok(Self {
            listeners,
            metrics_address,
            admin_socket,
            spool,
            scheduler,
            routes,
            shutdown,
            task,
        })
    }

    /// The address of the listener called `name`.
    pub fn address(&self, name: &str) -> Option<&str> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.as_str())
    }

    /// The routing map in force and its reload (`SIGHUP` calls [`LiveRoutes::reload`]).
    pub fn routes(&self) -> Arc<LiveRoutes> {
        Arc::clone(&self.routes)
    }

    /// Reads the configuration file again and swaps in its routing map and its live
    /// `delivery:` keys; on error the running ones stay. Returns the new generation.
    pub async fn reload(&self) -> Result<u64, ReloadError> {
        self.routes.reload_async().await
    }

    /// A token that shuts the gateway down when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the gateway has stopped (after the token was cancelled and the drain).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// Shuts down and waits for the drain.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

/// Lifts the soft open-files limit towards `want`, up to the hard limit (a gateway holding
/// thousands of connections needs more than the usual 1024).
pub fn raise_fd_limit(want: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let target = want.min(limit.maximum.unwrap_or(u64::MAX));
    if limit.current.is_some_and(|c| c < target) {
        limit.current = Some(target);
        let _ = setrlimit(Resource::Nofile, limit);
    }
}
