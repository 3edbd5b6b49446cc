//! systemd integration: readiness, reload, stop and watchdog notifications (`sd_notify(3)`
//! over `$NOTIFY_SOCKET`, through the `sd-notify` crate; no libsystemd).
//!
//! Every function here does nothing when the process was not started by a service manager
//! (no `NOTIFY_SOCKET` in the environment), so the same binary runs by hand, in the tests and
//! under the `Type=notify` unit `dist/systemd/postern.service`. What is sent, and when:
//!
//! | when | message |
//! |---|---|
//! | [`Gateway::start`](crate::gateway::Gateway::start) returned: the spool is recovered, the metrics endpoint, the admin socket and every listener are bound | `READY=1`, `STATUS=…` ([`ready`]) |
//! | SIGHUP: the reload starts | `RELOADING=1`, `MONOTONIC_USEC=…` ([`reloading`]) |
//! | the reload has ended, applied or refused | `READY=1`, `STATUS=…` ([`reloaded`]) |
//! | SIGTERM (or ctrl-c): the drain starts | `STOPPING=1`, `STATUS=draining…` ([`stopping`]) |
//! | start-up failed | `STATUS=cannot start: …` ([`status`]), then the exit code says the rest |
//! | every half `WatchdogSec=` (`$WATCHDOG_USEC`) | `WATCHDOG=1` ([`watchdog`]) |
//!
//! The watchdog task runs on the gateway's runtime and its timer, so a ping proves that the
//! runtime still polls tasks and fires timers; while the gateway runs (not draining), it
//! also waits for every scheduler shard to answer a [`Scheduler::ping`] within a quarter of
//! the interval, so a wedged scheduler stops the pings and systemd restarts the service
//! (`Restart=on-failure`) once `WatchdogSec=` passes without one. During the drain the
//! scheduler is stopping on purpose: the pings then only prove the runtime alive.
//!
//! A notification that cannot be sent is logged once and otherwise ignored: losing the
//! service manager's socket must not stop mail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::scheduler::Scheduler;

/// Set once a send failed (the failure is logged once, not at every watchdog tick).
static SEND_FAILED: AtomicBool = AtomicBool::new(false);

/// Sends `states` to the service manager, if there is one.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        if !SEND_FAILED.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
        }
    }
}

/// Start-up is complete: the spool is recovered and everything is bound.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A free-form status line (`systemctl status` shows it).
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// A reload (SIGHUP) starts. systemd 253 and later want the monotonic time with it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// The reload has ended (`status` says how); the service is ready again.
pub fn reloaded(status: &str) {
    ready(status);
}

/// The drain starts (SIGTERM): no new connections, sessions and deliveries finishing.
pub fn stopping(drain: Duration) {
    let status = format!(
        "draining: no new connections; sessions and deliveries in flight finish (up to {}s)",
        drain.as_secs()
    );
    notify(&[NotifyState::Stopping, NotifyState::Status(&status)]);
}

/// The watchdog interval systemd asked for (`WatchdogSec=`, as `$WATCHDOG_USEC`), unless
/// `$WATCHDOG_PID` names another process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Sends `WATCHDOG=1` every half `every`, for as long as the runtime runs it: each time
/// after every shard of `scheduler` answered within a quarter of `every` (see the module
/// documentation), or at once once `shutdown` is cancelled or without a scheduler.
pub async fn watchdog(every: Duration, scheduler: Option<Scheduler>, shutdown: CancellationToken) {
    let period = every / 2;
    let budget = every / 4;
    tracing::info!(
        interval_ms = every.as_millis() as u64,
        ping_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld = false;
    loop {
        tick.tick().await;
        let alive = match &scheduler {
            Some(s) if !shutdown.is_cancelled() => {
                tokio::time::timeout(budget, s.ping()).await == Ok(true)
            }
            _ => true,
        };
        if alive {
            notify(&[NotifyState::Watchdog]);
            if withheld {
                tracing::info!("the scheduler answers again; watchdog pings resumed");
                withheld = false;
            }
        } else if !shutdown.is_cancelled() {
            tracing::warn!(
                budget_ms = budget.as_millis() as u64,
                "the scheduler did not answer in time: watchdog ping withheld (systemd restarts the service if none is sent for WatchdogSec)"
            );
            withheld = true;
        }
    }
}
