//! Every metric postern exports: names, help texts, units, label sets and histogram buckets,
//! in one place ([`ALL`]).
//!
//! Labels are bounded: listener and store names from the configuration, and fixed words
//! (outcome, reason, state, phase, class, bucket, kind). Never an address, a queue id or a
//! reply text. Histograms get explicit buckets so they export as Prometheus histograms
//! (aggregatable), not summaries.
//!
//! `/metrics` is served by [`serve`] (in `http`), a tiny HTTP/1.1 responder on our own tokio
//! listener: it binds loopback by default, and tests can bind port 0 and learn the port.
//! [`watch`] registers the per-store series at zero and samples the spool's size and free
//! space.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod http;

pub use http::{bind, serve};

// ---- listeners ------------------------------------------------------------------------------

/// Open connections, by listener.
pub const CONNECTIONS_CURRENT: &str = "postern_connections_current";
/// Connections handled, by listener and outcome (`accepted`, `refused_limit`, `refused_per_ip`,
/// `refused_proxy`: an untrusted peer or a bad PROXY header).
pub const CONNECTIONS_TOTAL: &str = "postern_connections_total";
/// Messages accepted (250 after they were durable), by listener.
pub const MESSAGES_ACCEPTED: &str = "postern_messages_accepted_total";
/// Messages refused, by listener and reason.
pub const MESSAGES_REJECTED: &str = "postern_messages_rejected_total";
/// Recipients accepted at RCPT, by listener.
pub const RECIPIENTS_ACCEPTED: &str = "postern_recipients_accepted_total";
/// Recipients refused at RCPT, by listener and reason.
pub const RECIPIENTS_REJECTED: &str = "postern_recipients_rejected_total";
/// Message octets received, by listener.
pub const RECEIVED_BYTES: &str = "postern_received_bytes_total";
/// Session duration, by listener.
pub const SESSION_DURATION: &str = "postern_session_duration_seconds";
/// From the end of data to the 250 (the durable store), by listener.
pub const ACCEPT_LATENCY: &str = "postern_accept_latency_seconds";
/// Build information (value 1), labelled with the version.
pub const BUILD_INFO: &str = "postern_build_info";

// ---- scheduler and delivery -----------------------------------------------------------------

/// Recipient delivery attempts, by store and outcome.
pub const DELIVERIES: &str = "postern_deliveries_total";
/// Deferred recipient attempts, by store and reply class (`4.2`, `4.4`, … of the enhanced
/// status code; `4.0` when the reply had none).
pub const DEFERRALS: &str = "postern_deferrals_total";
/// Recipients left in doubt (connection lost after the end of data), by store.
pub const IN_DOUBT: &str = "postern_in_doubt_total";
/// In-doubt recipients retried alone in their own transaction, by store.
pub const IN_DOUBT_RETRIES: &str = "postern_in_doubt_retries_total";
/// Recipients that were in doubt when the spool was recovered at start.
pub const IN_DOUBT_RECOVERED: &str = "postern_in_doubt_recovered_total";
/// A store's concurrency window, by store.
pub const WINDOW: &str = "postern_store_window";
/// A store's learned no-load latency (the window's baseline), by store.
pub const LATENCY_BASELINE: &str = "postern_store_latency_baseline_seconds";
/// A store's connections, by store and state (`in_use`, `idle`).
pub const CONNECTIONS: &str = "postern_store_connections";
/// A store's breaker: 0 closed, 1 open (down), 2 probing; by store.
pub const BREAKER: &str = "postern_store_breaker_state";
/// Times a store was marked down, by store.
pub const BREAKER_TRIPS: &str = "postern_store_breaker_trips_total";
/// Recipients queued for a store, by store and state (`queued`, `in_flight`).
pub const STORE_RECIPIENTS: &str = "postern_store_recipients";
/// Messages parked while a store is down, by store.
pub const STORE_PARKED: &str = "postern_store_parked_messages";
/// Age of the oldest message with recipients queued for a store, by store.
pub const OLDEST_AGE: &str = "postern_store_oldest_message_age_seconds";
/// Messages in the scheduler by state (`active`: an attempt is running; `waiting`: deferred
/// until a retry time; `backlog`: due, waiting for room under `active_limit`).
pub const QUEUE_MESSAGES: &str = "postern_queue_messages";
/// Queue shape: messages with open recipients for a store, by store and age bucket
/// ([`crate::shape::LABELS`]).
pub const QUEUE_SHAPE: &str = "postern_queue_shape_messages";
/// From acceptance to delivery, by store (histogram, up to 5 days).
pub const DELIVERY_LATENCY: &str = "postern_delivery_latency_seconds";
/// LMTP (and SMTP relay) latency by store and phase: `acquire` (a connection from the pool
/// or a new one), `connect` (the socket), `lhlo` (greeting, LHLO, STARTTLS, AUTH),
/// `mail_rcpt` (MAIL and RCPT replies; with BDAT, until the first chunk), `data` (the body),
/// `end_of_data` (the final replies), `transaction` (MAIL to the last reply).
pub const PHASE_LATENCY: &str = "postern_lmtp_phase_seconds";
/// DSNs queued, by kind (`failure`, `success`, `delay`).
pub const DSNS: &str = "postern_dsn_total";

// ---- edge (recipient verification, backpressure) -------------------------------------------

/// Recipient verifications asked of a store at RCPT, by store and result (`valid`,
/// `invalid`, `tempfail`).
pub const VERIFICATIONS: &str = "postern_recipient_verifications_total";
/// Verification cache lookups, by store and outcome (`hit`: a fresh answer; `miss`: a store
/// query started; `joined`: waited for a query already running).
pub const VERIFY_CACHE: &str = "postern_verify_cache_lookups_total";
/// 1 while a store's recipients get 451 4.3.2 at RCPT (backpressure), by store.
pub const STORE_BACKPRESSURE: &str = "postern_store_backpressure";

// ---- spool ----------------------------------------------------------------------------------

/// Group-commit sync latency: fdatasync of a batch's segment files (and the directory).
pub const SPOOL_SYNC: &str = "postern_spool_sync_seconds";
/// Group-commit batch size: message commits and ledger records made durable by one sync.
pub const SPOOL_BATCH_RECORDS: &str = "postern_spool_sync_batch_records";
/// Group-commit batch size in bytes appended.
pub const SPOOL_BATCH_BYTES: &str = "postern_spool_sync_batch_bytes";
/// Bytes of the spool's files on disk (segments, and the corrupt queue).
pub const SPOOL_BYTES: &str = "postern_spool_bytes";
/// Free space for unprivileged users on the spool's filesystem.
pub const SPOOL_FREE_BYTES: &str = "postern_spool_free_bytes";
/// Messages in the spool.
pub const SPOOL_MESSAGES: &str = "postern_spool_messages";
/// Messages in the poison quarantine (`postern queue list --state quarantine`).
pub const QUARANTINED: &str = "postern_quarantined_messages";

// ---- routing --------------------------------------------------------------------------------

/// The routing map's generation: 1 for the map loaded at start, one more per reload.
pub const ROUTES_GENERATION: &str = "postern_routes_generation";
/// Reloads of the routing map that failed (the old map stays).
pub const ROUTES_RELOAD_ERRORS: &str = "postern_routes_reload_errors_total";

/// Reasons for refused messages and recipients (the `reason` label).
pub mod reason {
    /// Not a local domain and not a trusted client.
    pub const RELAY: &str = "relay";
    /// Authoritative domain, unknown user.
    pub const UNKNOWN_USER: &str = "unknown_user";
    /// Over the size limit.
    pub const SIZE: &str = "size";
    /// TLS required and not active.
    pub const TLS: &str = "tls";
    /// Any other policy: loops, bare line endings, recipient limit.
    pub const POLICY: &str = "policy";
    /// The spool could not take it (full, or an I/O error).
    pub const SPOOL: &str = "spool";
    /// The routing map could not decide (did not load, an alias loop): 451 4.3.0.
    pub const ROUTING: &str = "routing";
    /// The reasons a message is refused for.
    pub const MESSAGE: [&str; 4] = [SIZE, TLS, POLICY, SPOOL];
    /// The recipient's store does not know it (verification at RCPT): 550 5.1.1.
    pub const UNVERIFIED: &str = "unverified";
    /// The recipient's store could not be asked (verification at RCPT): 450 4.1.1.
    pub const UNVERIFIED_TEMPFAIL: &str = "unverified_tempfail";
    /// The recipient's store is backlogged: 451 4.3.2.
    pub const BACKPRESSURE: &str = "backpressure";
    /// The reasons a recipient is refused for.
    pub const RECIPIENT: [&str; 6] = [
        RELAY,
        UNKNOWN_USER,
        ROUTING,
        UNVERIFIED,
        UNVERIFIED_TEMPFAIL,
        BACKPRESSURE,
    ];
}

/// The `outcome` words of [`CONNECTIONS_TOTAL`].
pub const CONNECTION_OUTCOMES: [&str; 4] = [
    "accepted",
    "refused_limit",
    "refused_per_ip",
    "refused_proxy",
];

/// The `state` words of [`QUEUE_MESSAGES`].
pub const QUEUE_STATES: [&str; 3] = ["active", "waiting", "backlog"];

/// The `kind` words of [`DSNS`].
pub const DSN_KINDS: [&str; 3] = ["failure", "success", "delay"];

/// Outcome words of [`DELIVERIES`].
pub mod outcome {
    /// Delivered.
    pub const SENT: &str = "sent";
    /// Deferred.
    pub const DEFERRED: &str = "deferred";
    /// Bounced.
    pub const BOUNCED: &str = "bounced";
    /// In doubt.
    pub const IN_DOUBT: &str = "in_doubt";
    /// Every outcome.
    pub const ALL: [&str; 4] = [SENT, DEFERRED, BOUNCED, IN_DOUBT];
}

/// The reply class of a deferral ([`DEFERRALS`]'s `class` label): `4.N` from the enhanced
/// status code `4.N.M` at the start of `reply` after the code, `4.0` without one. Bounded:
/// `4.0` to `4.7`; anything else is `4.0`.
pub fn deferral_class(reply: &str) -> &'static str {
    const CLASSES: [&str; 8] = ["4.0", "4.1", "4.2", "4.3", "4.4", "4.5", "4.6", "4.7"];
    let status = reply.split_whitespace().nth(1).unwrap_or("");
    let mut parts = status.split('.');
    match (
        parts.next(),
        parts.next().and_then(|p| p.parse::<usize>().ok()),
    ) {
        (Some("4"), Some(n)) if n < CLASSES.len() && parts.next().is_some() => CLASSES[n],
        _ => CLASSES[0],
    }
}

/// What kind of metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

/// One metric's definition.
#[derive(Clone, Copy, Debug)]
pub struct Def {
    /// The exported name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Its unit.
    pub unit: Unit,
    /// Its label names.
    pub labels: &'static [&'static str],
    /// The HELP text.
    pub help: &'static str,
    /// A histogram's bucket upper bounds (`None`: [`SECONDS_BUCKETS`]).
    pub buckets: Option<&'static [f64]>,
}

/// Default buckets of a `_seconds` histogram: 1 ms to 5 minutes.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Delivery latency: mail may wait days for a store, so 10 ms to 5 days.
pub const DELIVERY_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
    7200.0, 14400.0, 28800.0, 43200.0, 86400.0, 172_800.0, 259_200.0, 345_600.0, 432_000.0,
];

/// fdatasync latency: 50 µs to 10 s.
pub const SYNC_BUCKETS: &[f64] = &[
    0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Records per group commit.
pub const BATCH_RECORD_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Bytes per group commit: 512 B to 64 MiB.
pub const BATCH_BYTE_BUCKETS: &[f64] = &[
    512.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];

const fn def(
    name: &'static str,
    kind: MetricKind,
    unit: Unit,
    labels: &'static [&'static str],
    help: &'static str,
) -> Def {
    Def {
        name,
        kind,
        unit,
        labels,
        help,
        buckets: None,
    }
}

const fn hist(
    name: &'static str,
    unit: Unit,
    labels: &'static [&'static str],
    help: &'static str,
    buckets: &'static [f64],
) -> Def {
    Def {
        name,
        kind: MetricKind::Histogram,
        unit,
        labels,
        help,
        buckets: Some(buckets),
    }
}

use MetricKind::{Counter, Gauge};

/// Every metric postern exports.
#[rustfmt::skip]
pub const ALL: &[Def] = &[
    def(CONNECTIONS_CURRENT, Gauge, Unit::Count, &["listener"], "Open client connections, by listener."),
    def(CONNECTIONS_TOTAL, Counter, Unit::Count, &["listener", "outcome"], "Client connections by listener and outcome (accepted, refused_limit, refused_per_ip, refused_proxy)."),
    def(MESSAGES_ACCEPTED, Counter, Unit::Count, &["listener"], "Messages answered 250 after they were durable, by listener."),
    def(MESSAGES_REJECTED, Counter, Unit::Count, &["listener", "reason"], "Messages refused, by listener and reason."),
    def(RECIPIENTS_ACCEPTED, Counter, Unit::Count, &["listener"], "Recipients accepted at RCPT, by listener."),
    def(RECIPIENTS_REJECTED, Counter, Unit::Count, &["listener", "reason"], "Recipients refused at RCPT, by listener and reason."),
    def(RECEIVED_BYTES, Counter, Unit::Bytes, &["listener"], "Message octets received, by listener."),
    hist(SESSION_DURATION, Unit::Seconds, &["listener"], "Client session duration, by listener.", SECONDS_BUCKETS),
    hist(ACCEPT_LATENCY, Unit::Seconds, &["listener"], "End of data to 250 (durable store), by listener.", SECONDS_BUCKETS),
    def(VERIFICATIONS, Counter, Unit::Count, &["store", "result"], "Recipient verifications asked of a store at RCPT, by store and result (valid, invalid, tempfail)."),
    def(VERIFY_CACHE, Counter, Unit::Count, &["store", "outcome"], "Recipient verification cache lookups, by store and outcome (hit, miss, joined)."),
    def(STORE_BACKPRESSURE, Gauge, Unit::Count, &["store"], "1 while the store's recipients get 451 4.3.2 at RCPT (backpressure), by store."),
    def(BUILD_INFO, Gauge, Unit::Count, &["version"], "Build information; the value is 1."),
    def(DELIVERIES, Counter, Unit::Count, &["store", "outcome"], "Recipient delivery attempts, by store and outcome (sent, deferred, bounced, in_doubt)."),
    def(DEFERRALS, Counter, Unit::Count, &["store", "class"], "Deferred recipient attempts, by store and reply class (4.0 to 4.7)."),
    def(IN_DOUBT, Counter, Unit::Count, &["store"], "Recipients left in doubt after the end of data, by store."),
    def(IN_DOUBT_RETRIES, Counter, Unit::Count, &["store"], "In-doubt recipients retried alone, by store."),
    def(IN_DOUBT_RECOVERED, Counter, Unit::Count, &[], "Recipients in doubt when the spool was recovered."),
    def(WINDOW, Gauge, Unit::Count, &["store"], "Concurrency window (transactions at once), by store."),
    def(LATENCY_BASELINE, Gauge, Unit::Seconds, &["store"], "No-load store latency the concurrency window steers by (size-independent phases), by store."),
    def(CONNECTIONS, Gauge, Unit::Count, &["store", "state"], "Pooled store connections, by store and state (in_use, idle)."),
    def(BREAKER, Gauge, Unit::Count, &["store"], "Circuit breaker: 0 closed, 1 open, 2 probing; by store."),
    def(BREAKER_TRIPS, Counter, Unit::Count, &["store"], "Times a store was marked down, by store."),
    def(STORE_RECIPIENTS, Gauge, Unit::Count, &["store", "state"], "Recipients queued for a store, by store and state (queued, in_flight)."),
    def(STORE_PARKED, Gauge, Unit::Count, &["store"], "Messages parked while a store is down, by store."),
    def(OLDEST_AGE, Gauge, Unit::Seconds, &["store"], "Age of the oldest message queued for a store, by store."),
    def(QUEUE_MESSAGES, Gauge, Unit::Count, &["state"], "Messages in the scheduler, by state (active, waiting, backlog)."),
    def(QUEUE_SHAPE, Gauge, Unit::Count, &["store", "bucket"], "Messages with open recipients for a store, by store and age bucket (0-5m ... 1280m+)."),
    hist(DELIVERY_LATENCY, Unit::Seconds, &["store"], "Acceptance to delivery, by store.", DELIVERY_BUCKETS),
    hist(PHASE_LATENCY, Unit::Seconds, &["store", "phase"], "LMTP latency by store and phase (acquire, connect, lhlo, mail_rcpt, data, end_of_data, transaction).", SECONDS_BUCKETS),
    def(DSNS, Counter, Unit::Count, &["kind"], "Delivery status notifications queued, by kind (failure, success, delay)."),
    hist(SPOOL_SYNC, Unit::Seconds, &[], "Group-commit fdatasync latency of one batch.", SYNC_BUCKETS),
    hist(SPOOL_BATCH_RECORDS, Unit::Count, &[], "Message commits and ledger records made durable by one group commit.", BATCH_RECORD_BUCKETS),
    hist(SPOOL_BATCH_BYTES, Unit::Bytes, &[], "Bytes made durable by one group commit.", BATCH_BYTE_BUCKETS),
    def(SPOOL_BYTES, Gauge, Unit::Bytes, &[], "Bytes of the spool's files on disk."),
    def(SPOOL_FREE_BYTES, Gauge, Unit::Bytes, &[], "Free space for unprivileged users on the spool's filesystem."),
    def(SPOOL_MESSAGES, Gauge, Unit::Count, &[], "Messages in the spool."),
    def(QUARANTINED, Gauge, Unit::Count, &[], "Messages in the poison quarantine (delivery attempts kept ending abnormally; an operator releases or deletes them)."),
    def(ROUTES_GENERATION, Gauge, Unit::Count, &[], "Routing map generation: 1 at start, one more per successful reload."),
    def(ROUTES_RELOAD_ERRORS, Counter, Unit::Count, &[], "Routing map reloads that failed (the previous map stays)."),
];

/// The definition of `name`.
pub fn find(name: &str) -> Option<&'static Def> {
    ALL.iter().find(|d| d.name == name)
}

/// Describes every metric (promtool flags a metric without HELP).
pub fn describe() {
    for d in ALL {
        match d.kind {
            MetricKind::Counter => describe_counter!(d.name, d.unit, d.help),
            MetricKind::Gauge => describe_gauge!(d.name, d.unit, d.help),
            MetricKind::Histogram => describe_histogram!(d.name, d.unit, d.help),
        }
    }
}

/// Builds the Prometheus recorder with our histogram buckets (not installed).
pub fn recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
    // Only an empty bucket list fails, and ours are non-empty constants (a test checks);
    // were one empty, every histogram would export as a summary rather than fail start-up.
    let built = ALL
        .iter()
        .filter_map(|d| d.buckets.map(|b| (d.name, b)))
        .try_fold(PrometheusBuilder::new(), |builder, (name, buckets)| {
            builder.set_buckets_for_metric(Matcher::Full(name.into()), buckets)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        });
    built
        .unwrap_or_else(|_| PrometheusBuilder::new())
        .build_recorder()
}

/// Installs the global recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = recorder();
            let handle = recorder.handle();
            // A second install (tests) fails harmlessly; the first recorder stays.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            // The map read at start is generation 1; reloads count on from there.
            gauge!(ROUTES_GENERATION).set(1.0);
            counter!(ROUTES_RELOAD_ERRORS).increment(0);
            counter!(IN_DOUBT_RECOVERED).increment(0);
            handle
        })
        .clone()
}

/// How often [`watch`] samples the spool.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Registers every configured store's and listener's series at zero (so a dashboard shows
/// them, and `rate()` works, from the start), then samples the spool's size, free space and
/// message count every [`SAMPLE_EVERY`] until `shutdown`. `listeners` and `stores` are the
/// configured names; the spool lives in `dir` and `count` reads its message counts (a
/// closure, so this module needs nothing from the spool).
pub fn watch(
    listeners: &[&str],
    stores: &[&str],
    dir: PathBuf,
    count: impl Fn() -> SpoolCounts + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let count = std::sync::Arc::new(count);
    for l in listeners {
        let listener = (*l).to_owned();
        counter!(MESSAGES_ACCEPTED, "listener" => listener.clone()).increment(0);
        counter!(RECIPIENTS_ACCEPTED, "listener" => listener.clone()).increment(0);
        counter!(RECEIVED_BYTES, "listener" => listener.clone()).increment(0);
        gauge!(CONNECTIONS_CURRENT, "listener" => listener.clone()).increment(0.0);
        for outcome in CONNECTION_OUTCOMES {
            counter!(CONNECTIONS_TOTAL, "listener" => listener.clone(), "outcome" => outcome)
                .increment(0);
        }
        for why in reason::MESSAGE {
            counter!(MESSAGES_REJECTED, "listener" => listener.clone(), "reason" => why)
                .increment(0);
        }
        for why in reason::RECIPIENT {
            counter!(RECIPIENTS_REJECTED, "listener" => listener.clone(), "reason" => why)
                .increment(0);
        }
    }
    for state in QUEUE_STATES {
        gauge!(QUEUE_MESSAGES, "state" => state).increment(0.0);
    }
    for kind in DSN_KINDS {
        counter!(DSNS, "kind" => kind).increment(0);
    }
    for s in stores {
        let store = (*s).to_owned();
        for word in outcome::ALL {
            counter!(DELIVERIES, "store" => store.clone(), "outcome" => word).increment(0);
        }
        counter!(IN_DOUBT, "store" => store.clone()).increment(0);
        counter!(IN_DOUBT_RETRIES, "store" => store.clone()).increment(0);
        counter!(BREAKER_TRIPS, "store" => store.clone()).increment(0);
        gauge!(STORE_BACKPRESSURE, "store" => store).set(0.0);
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (dir, count) = (dir.clone(), std::sync::Arc::clone(&count));
            let _ = tokio::task::spawn_blocking(move || sample_spool(&dir, count())).await;
        }
    })
}

/// The spool's message counts, as [`watch`] samples them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolCounts {
    /// Messages in the spool.
    pub messages: usize,
    /// Messages set aside as corrupt.
    pub quarantined: usize,
}

/// Sets the spool gauges (a blocking directory walk and `statvfs`).
pub fn sample_spool(dir: &Path, counts: SpoolCounts) {
    gauge!(SPOOL_BYTES).set(dir_bytes(dir) as f64);
    match rustix::fs::statvfs(dir) {
        Ok(s) => gauge!(SPOOL_FREE_BYTES).set(s.f_bavail.saturating_mul(s.f_frsize) as f64),
        Err(e) => tracing::debug!(error = %e, "statvfs of the spool failed"),
    }
    gauge!(SPOOL_MESSAGES).set(counts.messages as f64);
    gauge!(QUARANTINED).set(counts.quarantined as f64);
}

/// Bytes of the regular files in `dir` and one level of subdirectories (the spool keeps its
/// segments at the top and quarantined files in `corrupt/`). Unreadable entries count 0.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut dirs: Vec<(PathBuf, bool)> = vec![(dir.to_owned(), true)];
    while let Some((d, descend)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_file() {
                total = total.saturating_add(meta.len());
            } else if meta.is_dir() && descend {
                dirs.push((entry.path(), false));
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_follow_the_conventions() {
        let mut seen = std::collections::HashSet::new();
        for d in ALL {
            assert!(seen.insert(d.name), "{} defined twice", d.name);
            assert!(d.name.starts_with("postern_"), "{}", d.name);
            assert_eq!(
                d.kind == MetricKind::Counter,
                d.name.ends_with("_total"),
                "{}",
                d.name
            );
            if d.unit == Unit::Seconds {
                assert!(d.name.ends_with("_seconds"), "{}", d.name);
            }
            if d.kind == MetricKind::Histogram {
                assert!(d.buckets.is_some_and(|b| !b.is_empty()), "{}", d.name);
            }
            for l in d.labels {
                assert!(
                    !matches!(
                        *l,
                        "address" | "sender" | "recipient" | "queue_id" | "reply"
                    ),
                    "{}: unbounded label {l}",
                    d.name
                );
            }
            assert!(!d.help.is_empty());
        }
    }

    #[test]
    fn delivery_latency_buckets_reach_five_days() {
        let last = DELIVERY_BUCKETS.last().copied().unwrap_or_default();
        assert!(last >= 5.0 * 86400.0, "{last}");
        for b in [
            SECONDS_BUCKETS,
            DELIVERY_BUCKETS,
            SYNC_BUCKETS,
            BATCH_RECORD_BUCKETS,
            BATCH_BYTE_BUCKETS,
        ] {
            assert!(b.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn deferral_classes_are_bounded() {
        assert_eq!(deferral_class("452 4.2.2 Mailbox full"), "4.2");
        assert_eq!(deferral_class("421 4.4.2 Timeout"), "4.4");
        assert_eq!(deferral_class("451 Try again"), "4.0");
        assert_eq!(deferral_class("451 4.9.1 odd"), "4.0");
        assert_eq!(deferral_class("451 4.77 odd"), "4.0");
        assert_eq!(deferral_class(""), "4.0");
    }
}
