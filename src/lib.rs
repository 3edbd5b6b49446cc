//! postern: an LMTP-focused mail gateway.
//!
//! Accepts mail over SMTP and LMTP, writes every message durably to its spool before it
//! answers 250, and delivers each recipient over pooled LMTP connections to the store that
//! holds its mailbox. The wire protocol lives in the sans-IO crate [`postern_proto`].
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`admin`] | the admin socket (mode 0600) that `postern queue` talks to |
//! | [`bench`] | `postern bench …`: benchmark commands that print figures |
//! | [`config`] | YAML → validated [`config::Config`], errors with file:line:key |
//! | [`delivery`] | LMTP delivery to the stores: pooled connections, per-recipient outcomes |
//! | [`gateway`] | start-up, the running set of listeners, drain on shutdown |
//! | [`listener`] | SMTP/LMTP listeners, connection limits, one session per connection |
//! | [`metrics`] | every metric name and the `/metrics` endpoint |
//! | [`routing`] | recipient → store at RCPT time; relay policy |
//! | [`queue`] | `postern queue …`: the operator's queue tools (client side) |
//! | [`scheduler`] | sharded delivery scheduling: windows, breakers, retries, DSNs |
//! | [`shape`] | queue shape: qshape's message-age buckets |
//! | [`spool`] | the durable, group-committed spool and per-recipient ledger |
//! | [`systemd`] | `sd_notify`: READY, RELOADING, STOPPING and the watchdog under a `Type=notify` unit |
//! | [`tls`] | rustls server configuration for STARTTLS |
//!
//! # Data flow
//!
//! ```text
//! client ──SMTP/LMTP──▶ listener::session ──(RCPT)──▶ routing
//!                              │
//!                              ├──(content)──▶ spool (group commit, fdatasync)
//!                              └──250 queued as ID (only after durable)
//! ```

pub mod admin;
pub mod bench;
pub mod config;
pub mod delivery;
pub mod edge;
pub mod gateway;
pub mod listener;
pub mod metrics;
pub mod queue;
pub mod routing;
pub mod scheduler;
pub mod shape;
pub mod spool;
pub mod systemd;
pub mod tls;

pub use postern_proto as proto;
