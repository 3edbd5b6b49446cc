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
//! | [`cli`] | the operator's commands beside the gateway: `postern queue …`, `postern route …` |
//! | [`config`] | YAML → validated [`config::Config`], errors with file:line:column:key |
//! | [`date`] | calendar dates in UTC: RFC 5322 dates, the queue tools' timestamps |
//! | [`delivery`] | LMTP delivery to the stores: pooled connections, per-recipient outcomes |
//! | [`edge`] | what RCPT asks of a store beyond routing: backpressure, recipient verification |
//! | [`gateway`] | start-up, the running set of listeners, drain on shutdown |
//! | [`listener`] | SMTP/LMTP listeners, connection limits, one session per connection |
//! | [`logging`] | the log's writer: lines buffered in memory, written by a thread of its own |
//! | [`metrics`] | every metric name and the `/metrics` endpoint |
//! | [`routing`] | recipient → store at RCPT time; relay policy |
//! | [`reload`] | the configuration in force and its live reload (SIGHUP, changed files) |
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
//!
//! # Layering
//!
//! Imports go down this list, never up; `tests/module_graph.rs` fails on any cycle between
//! files or between top-level modules:
//!
//! ```text
//! main (the binary)
//!  → gateway, cli, reload       the composition root; the operator's commands; live reload
//!  → config                     assembles the file from each section's owner
//!  → listener, admin, systemd   sessions; the admin socket; sd_notify
//!  → edge                       RCPT-time checks per store
//!  → scheduler                  queues, windows, retries, DSNs
//!  → routing                    recipient → store (read at RCPT and at every attempt)
//!  → spool, delivery            the durable spool; the store agents
//!  → tls, metrics, shape, logging   leaves: they import nothing from the crate
//!  → config::units, config::error, date, delivery::error, spool::micros   leaves
//!  → proto (postern-proto)
//! ```
//!
//! A leaf file (one that imports nothing from the crate) may be used from any layer, and is
//! imported by its own path (`crate::config::units::Span`, not `crate::config::Span`), so
//! that using it does not make its parent module a dependency. Section types of the
//! configuration live with their owner (`listener::config`, `delivery::config`,
//! `routing::config`, `scheduler::config`, `tls::TlsConfig`); the owners never import the
//! assembled [`config::Config`]. The issue's first sketch put routing above the scheduler;
//! the scheduler reads the routing map at every attempt, so routing sits below it.

pub mod admin;
pub mod cli;
pub mod config;
pub mod date;
pub mod delivery;
pub mod edge;
pub mod gateway;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod routing;
pub mod scheduler;
pub mod shape;
pub mod spool;
pub mod systemd;
pub mod tls;

pub use postern_proto as proto;
