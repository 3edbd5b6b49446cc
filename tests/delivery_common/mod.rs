//! What the delivery-agent tests share: a store configuration bounded by short timeouts,
//! recipients and envelopes, one transaction on a fresh connection, and outcomes printed
//! compactly for assertions.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different part of the harness"
)]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

pub mod lmtp;

use std::sync::Arc;
use std::time::Duration;

use postern::config::Span;
use postern::delivery::config::StoreAddress;
use postern::delivery::{
    LmtpStoreConfig, OutboundEnvelope, Outcome, Recipient, RemoteStore, Report,
};
use postern::proto::address::{ForwardPath, Mailbox, ReversePath};
use postern::proto::params::RcptParams;

/// Store `name` at 127.0.0.1:`port`, every phase limited to 10 s (bounded even when
/// something goes wrong). An `smtp` store takes the same configuration.
pub fn store_config(name: &str, port: u16) -> LmtpStoreConfig {
    let address = StoreAddress::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let mut c = LmtpStoreConfig::new(name, address);
    let ten = Span(Duration::from_secs(10));
    c.timeouts.connect = ten;
    c.timeouts.lhlo = ten;
    c.timeouts.mail_rcpt = ten;
    c.timeouts.data = ten;
    c.timeouts.end_of_data = ten;
    c
}

pub fn rcpt(index: usize, address: &str) -> Recipient {
    Recipient {
        index,
        path: ForwardPath::Mailbox(Mailbox::parse(address).unwrap()),
        params: RcptParams::default(),
    }
}

pub fn envelope(body: &[u8]) -> OutboundEnvelope {
    let from = ReversePath::Mailbox(Mailbox::parse("sender@example.org").unwrap());
    OutboundEnvelope::new(from, body.len() as u64)
}

/// (kind, code, enhanced) of an outcome, for compact assertions.
pub fn show(o: &Outcome) -> String {
    let kind = match o {
        Outcome::Delivered(_) => "delivered",
        Outcome::Deferred(_) => "deferred",
        Outcome::Bounced(_) => "bounced",
        Outcome::InDoubt => "in-doubt",
        Outcome::NotAttempted(_) => "not-attempted",
    };
    match o.reply() {
        Some(r) => match r.enhanced() {
            Some(e) => format!("{kind} {} {e}", r.code()),
            None => format!("{kind} {}", r.code()),
        },
        None => kind.to_owned(),
    }
}

pub fn by_index(report: &Report, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| show(report.outcome(i).expect("every recipient has an outcome")))
        .collect()
}

/// Connects, delivers one transaction, returns the report and the callback's order.
pub async fn deliver_once(
    store: &Arc<RemoteStore>,
    env: &OutboundEnvelope,
    to: &[Recipient],
    body: &[u8],
) -> (Report, Vec<usize>) {
    let mut conn = store.connect().await.unwrap();
    let mut order = Vec::new();
    let report = conn
        .deliver(env, to, body, &mut |i, _: &Outcome| order.push(i))
        .await;
    (report, order)
}
