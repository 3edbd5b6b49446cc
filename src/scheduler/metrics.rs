//! The scheduler's metrics: names, help texts and label sets (see [`crate::metrics`]).
//!
//! Labels: `store` (configured names), `outcome` (`sent`, `deferred`, `bounced`,
//! `in_doubt`), `state` and `phase` (fixed words). Never an address or a queue id.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Recipient delivery attempts, by store and outcome.
pub const DELIVERIES: &str = "postern_deliveries_total";
/// Recipients left in doubt (connection lost after the end of data), by store.
pub const IN_DOUBT: &str = "postern_in_doubt_total";
/// In-doubt recipients retried alone in their own transaction, by store.
pub const IN_DOUBT_RETRIES: &str = "postern_in_doubt_retries_total";
/// Recipients that were in doubt when the spool was recovered at start.
pub const IN_DOUBT_RECOVERED: &str = "postern_in_doubt_recovered_total";
/// A store's concurrency window, by store.
pub const WINDOW: &str = "postern_store_window";
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
/// From acceptance to delivery, by store (histogram).
pub const DELIVERY_LATENCY: &str = "postern_delivery_latency_seconds";
/// LMTP latency by store and phase (`connect`: a connection from the pool or a new one;
/// `transaction`: MAIL to the last reply).
pub const PHASE_LATENCY: &str = "postern_lmtp_phase_seconds";
/// DSNs queued, by kind (`failure`, `success`, `delay`).
pub const DSNS: &str = "postern_dsn_total";

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
}

/// Describes every scheduler metric.
pub fn describe() {
    describe_counter!(
        DELIVERIES,
        Unit::Count,
        "Recipient delivery attempts, by store and outcome."
    );
    describe_counter!(
        IN_DOUBT,
        Unit::Count,
        "Recipients left in doubt after the end of data, by store."
    );
    describe_counter!(
        IN_DOUBT_RETRIES,
        Unit::Count,
        "In-doubt recipients retried alone, by store."
    );
    describe_counter!(
        IN_DOUBT_RECOVERED,
        Unit::Count,
        "Recipients in doubt when the spool was recovered."
    );
    describe_gauge!(
        WINDOW,
        Unit::Count,
        "Concurrency window (transactions at once), by store."
    );
    describe_gauge!(
        CONNECTIONS,
        Unit::Count,
        "Pooled store connections, by store and state."
    );
    describe_gauge!(
        BREAKER,
        Unit::Count,
        "Circuit breaker: 0 closed, 1 open, 2 probing; by store."
    );
    describe_counter!(
        BREAKER_TRIPS,
        Unit::Count,
        "Times a store was marked down, by store."
    );
    describe_gauge!(
        STORE_RECIPIENTS,
        Unit::Count,
        "Recipients queued for a store, by store and state."
    );
    describe_gauge!(
        STORE_PARKED,
        Unit::Count,
        "Messages parked while a store is down, by store."
    );
    describe_gauge!(
        OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest message queued for a store, by store."
    );
    describe_gauge!(
        QUEUE_MESSAGES,
        Unit::Count,
        "Messages in the scheduler, by state."
    );
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "Acceptance to delivery, by store."
    );
    describe_histogram!(
        PHASE_LATENCY,
        Unit::Seconds,
        "LMTP latency by store and phase."
    );
    describe_counter!(
        DSNS,
        Unit::Count,
        "Delivery status notifications queued, by kind."
    );
}
