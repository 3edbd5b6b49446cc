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
//! | [`tls`] | rustls server configuration for STARTTLS |

pub mod config;
pub mod tls;

pub use postern_proto as proto;

// --- spool (issue 4) ---
pub mod spool;
// --- end spool ---
