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
//! | [`config`] | YAML → validated [`config::Config`], errors with file:line:key |
//! | [`delivery`] | LMTP delivery to the stores: pooled connections, per-recipient outcomes |
//! | [`tls`] | rustls server configuration for STARTTLS |

pub mod config;
pub mod delivery;
pub mod tls;

pub use postern_proto as proto;
