//! What the proxy-mode tests (`proxy`, `proxy_window`) share: a gateway on 127.0.0.1:0
//! (hostname `mx.test`, node 7) with an LMTP and an SMTP listener in proxy mode and one in
//! spool mode, in front of an LMTP store on a given port; a port nothing listens on; a
//! client's greeting and one transaction.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different part of the harness"
)]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use postern::config::Config;
use postern::gateway::Gateway;

use crate::common::{Client, Reply, TestGateway};

/// The gateway's YAML: listeners `lmtp` and `smtp` in proxy mode, `spool` in spool mode;
/// `store.test` at the LMTP store on `port` (with `store_keys`), `example.org` in a maildir,
/// `team@store.test` an alias of alice and bob.
pub fn yaml(dir: &std::path::Path, port: u16, delivery: bool, store_keys: &str) -> String {
    format!(
        "hostname: mx.test
node_id: 7
drain_timeout: 5s
delivery:
  enabled: {delivery}
  minimal_backoff: 1s
  maximal_backoff: 2s
spool:
  path: {spool}
  min_free: 0
metrics:
  address: 127.0.0.1:0
listeners:
  - {{ name: lmtp, address: 127.0.0.1:0, protocol: lmtp, mode: proxy, proxy_wait: 500ms }}
  - {{ name: smtp, address: 127.0.0.1:0, protocol: smtp, mode: proxy, proxy_wait: 500ms }}
  - {{ name: spool, address: 127.0.0.1:0, protocol: smtp }}
stores:
  - {{ name: store, kind: lmtp, address: \"127.0.0.1:{port}\", {store_keys} }}
  - {{ name: local, kind: maildir, root: {mail} }}
routes:
  domains:
    store.test: {{ store: store }}
    example.org: {{ store: local }}
  aliases:
    team@store.test: [alice@store.test, bob@store.test]
",
        spool = dir.join("spool").display(),
        mail = dir.join("mail").display(),
    )
}

pub async fn start(port: u16, delivery: bool, max_connections: usize) -> TestGateway {
    start_with(
        port,
        delivery,
        &format!("max_connections: {max_connections}"),
    )
    .await
}

pub async fn start_with(port: u16, delivery: bool, store_keys: &str) -> TestGateway {
    start_edited(port, delivery, store_keys, |text| text).await
}

/// [`start_with`], the YAML passed through `edit` first.
pub async fn start_edited(
    port: u16,
    delivery: bool,
    store_keys: &str,
    edit: impl FnOnce(String) -> String,
) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let text = edit(yaml(dir.path(), port, delivery, store_keys));
    let config = Config::parse(&text, "proxy.yaml").unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    let gateway = Gateway::start(config).await.unwrap();
    TestGateway { gateway, dir }
}

/// A port nothing listens on.
pub async fn dead_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// Greeting and LHLO/EHLO.
pub async fn hello(gw: &TestGateway, listener: &str) -> Client {
    let mut c = gw.connect(listener).await;
    assert_eq!(c.reply().await.code, 220);
    let verb = if listener == "lmtp" { "LHLO" } else { "EHLO" };
    c.cmd(&format!("{verb} client.test"), 250).await;
    c
}

/// MAIL, every RCPT (each must get 250), DATA, the content; then `n` replies.
pub async fn transaction(c: &mut Client, to: &[&str], content: &str, n: usize) -> Vec<Reply> {
    c.cmd("MAIL FROM:<sender@edge.test>", 250).await;
    for rcpt in to {
        c.cmd(&format!("RCPT TO:<{rcpt}>"), 250).await;
    }
    c.cmd("DATA", 354).await;
    c.send(content.as_bytes()).await;
    c.send(b"\r\n.\r\n").await;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(c.reply().await);
    }
    out
}

pub fn line(r: &Reply) -> String {
    format!("{} {}", r.code, r.text())
}
