//! The admin socket: how `postern queue …` reaches the running daemon.
//!
//! | module | owns |
//! |---|---|
//! | [`protocol`] | the request/response types (one JSON object per line), `list --json`'s schema |
//! | [`server`] | the unix socket (mode 0600), connections, line framing |
//! | [`handler`] | answering requests: reads from the spool, changes through the scheduler |
//! | [`view`] | pure: message views, selectors and patterns, the qshape table |
//!
//! Promises: the socket is only ever reachable with mode 0600; mutations (hold, release,
//! delete) are durable in the spool before they are answered; nothing is selected
//! implicitly (actions need ids, a filter or `all`); `dry_run` changes nothing.

pub mod handler;
pub mod protocol;
pub mod server;
pub mod view;

pub use handler::Backend;
pub use server::{AdminError, AdminServer};
