//! Every metric postern exports: names, help texts, units and label sets, in one place.
//!
//! Labels are bounded: listener and store names from the configuration, and fixed outcome and
//! reason words. Never an address, a queue id or a reply text. Histograms get explicit
//! buckets so they export as Prometheus histograms (aggregatable), not summaries.
//!
//! `/metrics` is served by [`serve`], a tiny HTTP/1.1 responder on our own tokio listener:
//! it binds loopback by default, and tests can bind port 0 and learn the port.

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Open connections, by listener.
pub const CONNECTIONS_CURRENT: &str = "postern_connections_current";
/// Connections handled, by listener and outcome (`accepted`, `refused_limit`, `refused_per_ip`).
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
}

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Describes every metric (promtool flags a metric without HELP).
pub fn describe() {
    describe_gauge!(
        CONNECTIONS_CURRENT,
        Unit::Count,
        "Open client connections, by listener."
    );
    describe_counter!(
        CONNECTIONS_TOTAL,
        Unit::Count,
        "Client connections by listener and outcome."
    );
    describe_counter!(
        MESSAGES_ACCEPTED,
        Unit::Count,
        "Messages answered 250 after they were durable, by listener."
    );
    describe_counter!(
        MESSAGES_REJECTED,
        Unit::Count,
        "Messages refused, by listener and reason."
    );
    describe_counter!(
        RECIPIENTS_ACCEPTED,
        Unit::Count,
        "Recipients accepted at RCPT, by listener."
    );
    describe_counter!(
        RECIPIENTS_REJECTED,
        Unit::Count,
        "Recipients refused at RCPT, by listener and reason."
    );
    describe_counter!(
        RECEIVED_BYTES,
        Unit::Bytes,
        "Message octets received, by listener."
    );
    describe_histogram!(
        SESSION_DURATION,
        Unit::Seconds,
        "Client session duration, by listener."
    );
    describe_histogram!(
        ACCEPT_LATENCY,
        Unit::Seconds,
        "End of data to 250 (durable store), by listener."
    );
    describe_gauge!(
        BUILD_INFO,
        Unit::Count,
        "Build information; the value is 1."
    );
    crate::scheduler::metrics::describe();
    crate::routing::reload::describe();
}

/// Builds the Prometheus recorder with our histogram buckets (not installed).
pub fn recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
    // Only an empty bucket list fails; ours is a non-empty constant. Summaries otherwise.
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
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
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// Serves `GET /metrics` on `listener` until `shutdown`; runs the exporter's upkeep.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf));
            let Ok(Ok(n)) = read.await else { return };
            let request = String::from_utf8_lossy(&buf[..n]);
            let response = if request.starts_with("GET /metrics ") || request.starts_with("GET / ")
            {
                handle.run_upkeep();
                let body = handle.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
