//! The `smtp` store: relay to a fixed next hop, the route for bounces and for the mail that
//! trusted clients send to other domains.
//!
//! ```yaml
//! stores:
//!   - kind: smtp
//!     name: smarthost
//!     address: "[relay.example.net]:587"   # host:port; no MX lookup, ever
//!     max_connections: 5
//!     recipients_per_transaction: 50
//!     tls: { mode: required }
//!     auth: { username: postern, password_file: /etc/postern/relay.pass }
//!     timeouts: { connect: 30s, ehlo: 5m, mail_rcpt: 5m, data: 3m, end_of_data: 10m }
//! ```
//!
//! An SMTP relay is an [`RemoteStore`] speaking [`Protocol::Smtp`]: the same configuration
//! ([`SmtpStoreConfig`] is [`LmtpStoreConfig`](super::config::LmtpStoreConfig)), the same connection code, pool, failure
//! policy and normalisation table. What differs is in [`postern_proto::client`]:
//!
//! - EHLO after the greeting (and after STARTTLS), HELO when EHLO gets a 5yz. After HELO
//!   nothing is advertised: no PIPELINING, no CHUNKING, no SIZE, and no 8BITMIME, so 8-bit
//!   MIME parts go as quoted-printable ([`super::downgrade`]); 8-bit octets that cannot be
//!   converted bounce `5.6.3`.
//! - One reply after the final dot (or `BDAT LAST`) settles every recipient accepted at RCPT;
//!   a connection lost before it leaves all of them [`InDoubt`](super::Outcome::InDoubt).
//!
//! Everything else is as for LMTP: PIPELINING, BDAT with CHUNKING, optional STARTTLS and AUTH
//! PLAIN, SIZE/SMTPUTF8/8BITMIME checked before sending, DSN parameters passed on when the
//! relay offers DSN. [`LmtpStoreConfig::validate_smtp`](super::config::LmtpStoreConfig::validate_smtp) adds two checks: the address is
//! `host:port`, and `auth` needs `tls: { mode: required }` unless the relay is on loopback.
//!
//! ```text
//! let relay = Arc::new(RemoteStore::from_smtp_config(&cfg, &hostname)?);
//! let pool = StorePool::new(relay);            // then exactly as for an LMTP store
//! ```
//!
//! SEE ALSO: RFC 5321, Postfix `smtp(8)` with `relayhost = [host]:port`.

use postern_proto::client::Protocol;

use super::config::SmtpStoreConfig;
use super::error::StoreError;
use super::lmtp::RemoteStore;

impl RemoteStore {
    /// Loads an SMTP relay's settings ([`LmtpStoreConfig::validate_smtp`](super::config::LmtpStoreConfig::validate_smtp), then as
    /// [`RemoteStore::from_config`]). `local_name` is sent with EHLO/HELO.
    pub fn from_smtp_config(
        config: &SmtpStoreConfig,
        local_name: &str,
    ) -> Result<Self, StoreError> {
        config
            .validate_smtp()
            .map_err(|reason| StoreError::Invalid {
                store: config.name.clone(),
                reason: reason.into(),
            })?;
        Self::build(config, local_name, Protocol::Smtp)
    }
}
