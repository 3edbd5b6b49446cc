//! The configuration in force, and its live reload: the routing map, the live keys of
//! `delivery:`, and which other changes need a restart.
//!
//! [`LiveRoutes`] owns the `Arc<ArcSwap<Router>>` that the listener (at RCPT) and the
//! scheduler (at every attempt) read. A reload — `SIGHUP`, or a change of the configuration
//! file, the users file or an included route fragment seen by [`LiveRoutes::watch`] —
//! re-reads the configuration file (and its includes), validates it and builds a complete
//! new [`Router`] off to the side, then swaps it in with one atomic store: a reader holds
//! either the old map or the new one, never a mix, and no connection is touched. On any
//! error the running map stays, every problem is logged with file:line:column:key,
//! `postern_routes_reload_errors_total` is incremented, and the generation does not move.
//! The same reload puts the retry keys of `delivery:` (`minimal_backoff`, `maximal_backoff`,
//! `maximal_lifetime`, `delay_warning`, `breaker.failures`, `breaker.probe_interval`) in
//! force in the scheduler attached with
//! [`LiveRoutes::attach_scheduler`], each change logged as `delivery.key: old -> new, live`;
//! the next retry time computed uses them (those already scheduled are not rewritten).
//! Other keys cannot change live: a change to them is logged as needing a restart, by key
//! (`hostname`, `delivery.shards`, …), and otherwise ignored; a route to a store that was
//! not configured at start-up (its delivery agent does not exist) fails the reload.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use metrics::{counter, gauge};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, StoreConfig};
use crate::routing::Router;
use crate::scheduler::Scheduler;

/// Reloads that failed (the running map was kept); described in [`crate::metrics`].
pub const RELOAD_ERRORS: &str = crate::metrics::ROUTES_RELOAD_ERRORS;
/// The routing map's generation: 1 at start, +1 at each successful reload.
pub const GENERATION: &str = crate::metrics::ROUTES_GENERATION;

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway runs on the embedded default: there is no file to read again.
    #[error("no configuration file (running on the embedded default): nothing to reload")]
    NoFile,
    /// The new configuration or map did not load; each error names file:line:column:key.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

/// What a reload compares against; locked for the whole of a reload, so reloads run one
/// at a time.
struct Running {
    config: Config,
    stamps: Vec<(PathBuf, Option<SystemTime>)>,
}

/// The routing map in force and how to replace it.
pub struct LiveRoutes {
    current: Arc<ArcSwap<Router>>,
    generation: AtomicU64,
    running: Mutex<Running>,
    /// Where the live `delivery:` keys go (none while delivery is off).
    scheduler: OnceLock<Scheduler>,
}

fn store_names(config: &Config) -> Vec<&str> {
    config.stores.iter().map(StoreConfig::name).collect()
}

/// Builds the map of `config`, with its users file checked against its stores.
pub fn build(config: &Config) -> Result<Router, Vec<ConfigError>> {
    Router::build(&config.routes, Some(&store_names(config)))
}

/// The files whose change triggers a reload, with their modification times.
fn stamps(config: &Config) -> Vec<(PathBuf, Option<SystemTime>)> {
    config
        .source
        .iter()
        .chain(config.routes.users_file.iter())
        .chain(config.routes.include.iter())
        .map(|p| {
            let t = std::fs::metadata(p).and_then(|m| m.modified()).ok();
            (p.clone(), t)
        })
        .collect()
}

impl LiveRoutes {
    /// Builds the first map. One that does not build (an unreadable users file) runs as an
    /// unavailable map — `451 4.3.0` to every recipient — until a reload succeeds.
    pub fn start(config: &Config) -> Self {
        let router = match build(config) {
            Ok(r) => r,
            Err(errors) => {
                for e in &errors {
                    tracing::error!(error = %e, "routing map did not load; answering 451 4.3.0 until a reload succeeds");
                }
                counter!(RELOAD_ERRORS).increment(1);
                let reason = errors.iter().map(ToString::to_string).collect::<Vec<_>>();
                Router::unavailable(reason.join("; "))
            }
        };
        gauge!(GENERATION).set(1.0);
        Self {
            current: Arc::new(ArcSwap::from_pointee(router)),
            generation: AtomicU64::new(1),
            running: Mutex::new(Running {
                stamps: stamps(config),
                config: config.clone(),
            }),
            scheduler: OnceLock::new(),
        }
    }

    /// Reloads from now on also put the live `delivery:` keys in force in `scheduler`
    /// ([`Scheduler::update_delivery`]). Only the first scheduler attached is kept.
    pub fn attach_scheduler(&self, scheduler: Scheduler) {
        let _ = self.scheduler.set(scheduler);
    }

    /// The shared handle readers load the current map from.
    pub fn router(&self) -> Arc<ArcSwap<Router>> {
        Arc::clone(&self.current)
    }

    /// The generation in force.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True when the configuration file, the users file or an included file changed since
    /// the last reload (false while a reload is running: it will record what it read).
    pub fn changed(&self) -> bool {
        let running = match self.running.try_lock() {
            Ok(r) => r,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        running.stamps != stamps(&running.config)
    }

    /// Reads the configuration file again and swaps in its map and its live `delivery:`
    /// keys; blocking (a big users file
    /// takes a while), so call it from a blocking thread. Returns the new generation.
    pub fn reload(&self) -> Result<u64, ReloadError> {
        let mut running = self.lock();
        let Some(path) = running.config.source.clone() else {
            return Err(ReloadError::NoFile);
        };
        let started = Instant::now();
        let result = Config::load(&path).and_then(|new| {
            let router = build(&new)?;
            let missing: Vec<String> = router
                .store_names()
                .filter(|s| !store_names(&running.config).contains(s))
                .map(|s| format!("`{s}`"))
                .collect();
            if !missing.is_empty() {
                return Err(vec![ConfigError {
                    file: path.display().to_string(),
                    line: None,
                    column: None,
                    path: "stores".into(),
                    message: format!(
                        "routes name stores not running since start-up ({}); new stores need a restart",
                        missing.join(", ")
                    ),
                }]);
            }
            Ok((new, router))
        });
        match result {
            Ok((new, router)) => {
                let restart = needs_restart(&running.config, &new);
                if !restart.is_empty() {
                    tracing::warn!(keys = %restart.join(", "), "configuration changed in keys that cannot change live; needs a restart to take effect");
                }
                let users = router.user_count();
                // Queued recipients the new map leaves without a route (deferred, not
                // bounced, for routes.unroutable_grace): counted only when delivering.
                let lost_route = self.scheduler.get().map(|s| {
                    let old = self.current.load();
                    let queued = s.open_recipients();
                    crate::routing::diff::lost_routes(
                        &old,
                        &router,
                        queued.iter().map(String::as_str),
                    )
                });
                self.current.store(Arc::new(router));
                let delivery = running.config.delivery.diff(&new.delivery);
                if !delivery.live.is_empty() {
                    if let Some(scheduler) = self.scheduler.get() {
                        running.config.delivery.apply_live(&new.delivery);
                        scheduler.update_delivery(&running.config.delivery);
                        for change in &delivery.live {
                            tracing::info!("{change}, live");
                        }
                    } else {
                        tracing::info!(keys = %delivery.live.join(", "), "delivery: changed; delivery is off, nothing to apply");
                    }
                }
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                running.config.routes = new.routes;
                running.stamps = stamps(&running.config);
                gauge!(GENERATION).set(generation as f64);
                if let Some(n) = lost_route.filter(|&n| n > 0) {
                    tracing::warn!(
                        generation,
                        lost_route = n,
                        grace = %running.config.routes.unroutable_grace,
                        "queued recipients lost their route in this reload; deferred 4.3.0 until routes.unroutable_grace, then bounced"
                    );
                }
                tracing::info!(
                    generation,
                    users,
                    lost_route = lost_route.unwrap_or(0),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "routing map reloaded"
                );
                Ok(generation)
            }
            Err(errors) => {
                // Counted before it is logged: whoever reads the log line sees the count.
                counter!(RELOAD_ERRORS).increment(1);
                for e in &errors {
                    tracing::error!(error = %e, "routing map reload failed; keeping the running map");
                }
                // Do not retry the same broken files every poll; the next change retries.
                let mut probe = running.config.clone();
                if let Ok(text) = std::fs::read_to_string(&path) {
                    if let Ok(c) = serde_yaml::from_str::<Config>(&text) {
                        probe.routes.users_file = c.routes.users_file;
                        probe.routes.include = c.routes.include;
                    }
                }
                running.stamps = stamps(&probe);
                Err(ReloadError::Invalid(errors))
            }
        }
    }

    /// [`LiveRoutes::reload`] on a blocking thread.
    pub async fn reload_async(self: &Arc<Self>) -> Result<u64, ReloadError> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || me.reload())
            .await
            .unwrap_or_else(|e| {
                Err(ReloadError::Invalid(vec![ConfigError {
                    file: String::new(),
                    line: None,
                    column: None,
                    path: "routes".into(),
                    message: format!("reload task failed: {e}"),
                }]))
            })
    }

    /// Polls the files' modification times every `every` and reloads on a change, until
    /// `stop` is cancelled.
    pub async fn watch(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if self.changed() {
                // Errors are logged and counted by reload itself.
                let _ = self.reload_async().await;
            }
        }
    }

    /// Reloads at every `SIGHUP`, until `stop` is cancelled.
    pub async fn on_sighup(self: Arc<Self>, stop: CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by changing the files");
                return;
            }
        };
        tracing::info!("SIGHUP reloads the routing map");
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            tracing::info!("SIGHUP: reloading the routing map");
            // Under systemd (`ExecReload=` sends this SIGHUP) the reload is bracketed by
            // RELOADING=1 and READY=1, whatever its outcome: a refused configuration leaves
            // the running one in force, so the service is ready either way.
            crate::systemd::reloading();
            let outcome = match self.reload_async().await {
                Ok(generation) => format!("reloaded: routes generation {generation}"),
                Err(ReloadError::NoFile) => {
                    "reload: nothing to reload (embedded default configuration)".to_owned()
                }
                Err(ReloadError::Invalid(errors)) => format!(
                    "reload refused ({} error(s), see the log): the running configuration stays",
                    errors.len()
                ),
            };
            if stop.is_cancelled() {
                return;
            }
            crate::systemd::reloaded(&outcome);
        }
    }
}

/// The top-level keys other than `routes:` that differ, and the keys of `delivery:` that
/// differ and cannot change live (`delivery.shards`).
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let changed = [
        ("hostname", old.hostname != new.hostname),
        ("node_id", old.node_id != new.node_id),
        ("spool", old.spool != new.spool),
        ("metrics", old.metrics != new.metrics),
        ("drain_timeout", old.drain_timeout != new.drain_timeout),
        ("listeners", old.listeners != new.listeners),
        ("stores", old.stores != new.stores),
        ("verify_cache", old.verify_cache != new.verify_cache),
        ("worker_threads", old.worker_threads != new.worker_threads),
    ];
    let mut out: Vec<&'static str> = changed
        .into_iter()
        .filter_map(|(key, differs)| differs.then_some(key))
        .collect();
    out.extend(old.delivery.diff(&new.delivery).restart);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_outside_routes_need_a_restart() {
        let old = Config::embedded().unwrap();
        let mut new = old.clone();
        assert!(needs_restart(&old, &new).is_empty());
        new.hostname = "mx.example".into();
        new.routes.relay = None;
        new.stores.clear();
        assert_eq!(needs_restart(&old, &new), ["hostname", "stores"]);
        let mut new = old.clone();
        new.delivery.maximal_backoff = crate::config::units::Span(Duration::from_secs(600));
        new.delivery.delay_warning = Some(crate::config::units::Span(Duration::from_secs(3600)));
        assert!(
            needs_restart(&old, &new).is_empty(),
            "the retry keys are live"
        );
        new.delivery.shards = Some(7);
        new.delivery.active_limit = 3;
        assert_eq!(
            needs_restart(&old, &new),
            ["delivery.shards", "delivery.active_limit"]
        );
    }
}
