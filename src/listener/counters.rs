//! The listener's hot-path metric handles, looked up once per listener.
//!
//! A `counter!`/`gauge!`/`histogram!` with labels builds its key and finds it in the
//! registry on every call; the figures every connection and every message touch are
//! resolved here once, at the listener's first use (when the gateway's recorder is
//! installed), and shared by its sessions. Rarer figures (refusals by reason) keep the
//! macros at their call sites.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::metrics as m;

/// One listener's handles.
pub(crate) struct ListenerCounters {
    /// `postern_connections_total{outcome="accepted"}`.
    pub(crate) connections_accepted: Counter,
    /// `postern_connections_current`.
    pub(crate) connections_current: Gauge,
    /// `postern_session_duration_seconds`.
    pub(crate) session_duration: Histogram,
    /// `postern_recipients_accepted_total`.
    pub(crate) recipients_accepted: Counter,
    /// `postern_received_bytes_total`.
    pub(crate) received_bytes: Counter,
    /// `postern_accept_latency_seconds`.
    pub(crate) accept_latency: Histogram,
    /// `postern_messages_accepted_total`.
    pub(crate) messages_accepted: Counter,
}

impl ListenerCounters {
    fn new(listener: &str) -> Self {
        let l = || listener.to_owned();
        Self {
            connections_accepted: counter!(m::CONNECTIONS_TOTAL, "listener" => l(), "outcome" => "accepted"),
            connections_current: gauge!(m::CONNECTIONS_CURRENT, "listener" => l()),
            session_duration: histogram!(m::SESSION_DURATION, "listener" => l()),
            recipients_accepted: counter!(m::RECIPIENTS_ACCEPTED, "listener" => l()),
            received_bytes: counter!(m::RECEIVED_BYTES, "listener" => l()),
            accept_latency: histogram!(m::ACCEPT_LATENCY, "listener" => l()),
            messages_accepted: counter!(m::MESSAGES_ACCEPTED, "listener" => l()),
        }
    }
}

/// The handles of one listener, made at first use.
#[derive(Default)]
pub(crate) struct LazyCounters(OnceLock<ListenerCounters>);

impl LazyCounters {
    /// The handles for `listener` (the same listener at every call).
    pub(crate) fn get(&self, listener: &str) -> &ListenerCounters {
        self.0.get_or_init(|| ListenerCounters::new(listener))
    }
}
