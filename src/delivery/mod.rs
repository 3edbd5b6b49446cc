//! Delivery to the stores: the agents the scheduler calls (LMTP, SMTP relay, maildir, pipe,
//! discard, error).
//!
//! Owns everything between "deliver this message to these recipients of that store" and one
//! [`Outcome`] per recipient:
//!
//! | module | owns |
//! |---|---|
//! | [`backlog`] | whether a store keeps our new sessions waiting, and how long idle ones may then stay |
//! | [`config`] | `kind: lmtp` and `kind: smtp` settings (address, TLS, AUTH, timeouts, normalisation) |
//! | [`message`] | envelope, recipients, re-readable body, the per-recipient report |
//! | [`downgrade`] | the body for a store without 8BITMIME: 8-bit parts as quoted-printable |
//! | [`lmtp`] | one connection: connect, STARTTLS, AUTH, transactions with DATA or BDAT |
//! | [`maildir`] | the built-in maildir store (like Postfix's virtual(8)) |
//! | [`pipe`] | `kind: pipe`: a command with the message on stdin (like Postfix's pipe(8)) |
//! | [`policy`] | `kind: discard` and `kind: error` (a fixed reply) |
//! | `wire` | the socket and the client state machine; greeting, LHLO, STARTTLS, AUTH |
//! | `tls` | rustls client configuration (CA file, or `insecure_skip_verify` for tests) |
//! | [`smtp`] | `kind: smtp`: a relay to a fixed next hop (the LMTP code speaking SMTP) |
//! | [`pool`] | connections per store, reused across messages (deadpool) |
//! | [`trouble`] | the failure policy: reply or error → outcome and [`Scope`] |
//!
//! # Invariants
//!
//! - Every recipient handed to a delivery gets exactly one [`Outcome`], reported through the
//!   caller's callback as soon as it is known (the ledger is written reply by reply).
//! - A recipient is [`Outcome::InDoubt`] only if the end of data was sent and its reply never
//!   came (for `kind: pipe`: the command ran and died of a signal): a retry may duplicate
//!   it, nothing else can be.
//! - Delivery results are data ([`Report`]), never errors.
//!
//! # How the scheduler calls it
//!
//! ```text
//! let store = Arc::new(RemoteStore::from_config(&cfg, &hostname)?);   // once, at start/reload
//! let pool = StorePool::new(store);                                 // once per store
//! pool.spawn_sweeper(Duration::from_secs(30));
//! // per message and store, inside the scheduler's per-store window (semaphore):
//! let report = pool.deliver(&envelope, &recipients, &body, &mut |index, outcome| {
//!     ledger.record(index, outcome);                                // per reply
//! }).await;
//! match report.scope() { Scope::Store => back off the store, … }
//! ```
//!
//! DIAGNOSTICS: store settings that do not load are a [`lmtp::StoreError`] at start.
//!
//! SEE ALSO: RFC 2033 (LMTP), Postfix `lmtp(8)`, `smtp/smtp_trouble.c`.

pub mod backlog;
pub mod config;
pub mod downgrade;
pub mod edge_config;
pub mod error;
pub mod lmtp;
pub mod maildir;
pub mod message;
pub mod pipe;
pub mod policy;
pub mod pool;
pub mod smtp;
mod store_config;
mod tls;
pub mod trouble;
mod wire;

pub use config::{LmtpStoreConfig, SmtpStoreConfig, WindowConfig};
pub use lmtp::{Connection, PhaseMark, RemoteStore};
pub use maildir::MaildirStore;
pub(crate) use message::read_lent;
pub use message::{FileBody, MessageBody, OutboundEnvelope, Recipient, Report};
pub use pipe::{PipeStore, PipeStoreConfig};
pub use pool::StorePool;
pub use store_config::StoreConfig;
pub use trouble::{Outcome, Scope, Trouble};
