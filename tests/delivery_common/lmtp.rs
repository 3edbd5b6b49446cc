//! What the LMTP agent's tests (`delivery_lmtp`, `delivery_lmtp_pool`) share: a short body,
//! the fake store's configuration, its `RemoteStore`, recipients by local part, and one
//! transaction on a fresh connection.

use std::net::SocketAddr;
use std::sync::Arc;

use postern::delivery::{LmtpStoreConfig, OutboundEnvelope, Recipient, RemoteStore, Report};

use super::rcpt;

pub const BODY: &[u8] = b"Subject: test\r\nFrom: a@example.org\r\n\r\nHello.\r\n";

pub fn config(addr: SocketAddr) -> LmtpStoreConfig {
    super::store_config("fake", addr.port())
}

pub fn store(c: &LmtpStoreConfig) -> Arc<RemoteStore> {
    Arc::new(RemoteStore::from_config(c, "gw.test").unwrap())
}

pub fn rcpts(locals: &[&str]) -> Vec<Recipient> {
    locals
        .iter()
        .enumerate()
        .map(|(i, l)| rcpt(i, &format!("{l}@example.org")))
        .collect()
}

/// Connects, delivers one transaction, returns the report and the callback's order.
pub async fn deliver_once(
    c: &LmtpStoreConfig,
    env: &OutboundEnvelope,
    to: &[Recipient],
    body: &[u8],
) -> (Report, Vec<usize>) {
    super::deliver_once(&store(c), env, to, body).await
}
