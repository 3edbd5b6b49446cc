//! Reverse mode end to end: an edge gateway (spool mode, node 3) delivers over LMTP on a
//! unix socket to a concentrator (proxy mode, node 100) beside a fake LMTP store; and a
//! routing loop between two gateways stops at the first return.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod common;
mod fake_lmtp;

use std::path::Path;
use std::time::Duration;

use fake_lmtp::{FakeStore, Rcpt, Script};
use postern::config::Config;
use postern::gateway::Gateway;

/// A gateway named `mx.test` (both are: the node id tells them apart) with an SMTP
/// listener, an LMTP listener on `dir/NAME.sock` in `mode`, and `stores_and_routes`.
async fn gateway(dir: &Path, name: &str, node: u16, mode: &str, rest: &str) -> Gateway {
    let text = format!(
        "hostname: mx.test
node_id: {node}
drain_timeout: 5s
delivery:
  minimal_backoff: 1s
  maximal_backoff: 2s
spool:
  path: {spool}
  min_free: 0
metrics:
  address: 127.0.0.1:0
listeners:
  - {{ name: smtp, address: 127.0.0.1:0, protocol: smtp }}
  - {{ name: lmtp, address: \"unix:{sock}\", protocol: lmtp, mode: {mode} }}
{rest}",
        spool = dir.join(format!("{name}-spool")).display(),
        sock = dir.join(format!("{name}.sock")).display(),
    );
    let config = Config::parse(&text, "chain.yaml").unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    Gateway::start(config).await.unwrap()
}

async fn send(gw: &Gateway, to: &str, body: &str) {
    let mut c = common::Client::connect(gw.address("smtp").unwrap()).await;
    c.hello().await;
    c.send_mail("sender@edge.test", &[to], body).await;
    c.cmd("QUIT", 221).await;
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_through_the_concentrator_to_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = FakeStore::start(
        Script::default().rcpt("busy", Rcpt::new("250 2.1.5 OK", "452 4.2.2 Mailbox full")),
    )
    .await;
    let concentrator = gateway(
        dir.path(),
        "conc",
        100,
        "proxy",
        &format!(
            "stores:\n  - {{ name: store, kind: lmtp, address: \"127.0.0.1:{}\" }}\nroutes:\n  domains:\n    store.test: {{ store: store }}\n",
            store.addr.port()
        ),
    )
    .await;
    let edge = gateway(
        dir.path(),
        "edge",
        3,
        "spool",
        &format!(
            "stores:\n  - {{ name: conc, kind: lmtp, address: \"unix:{}\" }}\nroutes:\n  domains:\n    store.test: {{ store: conc }}\n",
            dir.path().join("conc.sock").display()
        ),
    )
    .await;
    send(&edge, "alice@store.test", "Subject: through\r\n\r\nx").await;
    until("delivered to the store", || {
        store.transactions().len() == 1 && edge.spool.is_empty()
    })
    .await;
    let content = String::from_utf8_lossy(&store.transactions()[0].content).into_owned();
    let conc_at = content
        .find("by mx.test (postern node 100) with LMTP")
        .expect(&content);
    let edge_at = content
        .find("by mx.test (postern node 3) with ESMTP")
        .expect(&content);
    assert!(
        conc_at < edge_at,
        "the concentrator's line on top: {content}"
    );
    // The store defers: the edge keeps the message; the concentrator stored nothing.
    send(&edge, "busy@store.test", "Subject: later\r\n\r\nx").await;
    until("the store's deferral", || store.transactions().len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(edge.spool.len(), 1, "the edge keeps it and retries");
    assert!(
        concentrator.spool.is_empty(),
        "the concentrator stores nothing"
    );
    edge.stop().await;
    concentrator.stop().await;
}

/// The edge routes `loop.test` to the concentrator, which routes it back to the edge: the
/// edge sees its own marker on the first return and refuses (554 5.4.6), the concentrator
/// passes that on, and the edge bounces the recipient with that reason — not after 50 hops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_between_two_gateways_stops_at_the_first_return() {
    let dir = tempfile::tempdir().unwrap();
    let sock = |n: &str| dir.path().join(format!("{n}.sock")).display().to_string();
    let concentrator = gateway(
        dir.path(),
        "conc",
        100,
        "proxy",
        &format!(
            "stores:\n  - {{ name: edge, kind: lmtp, address: \"unix:{}\" }}\nroutes:\n  domains:\n    loop.test: {{ store: edge }}\n",
            sock("edge")
        ),
    )
    .await;
    let mail = dir.path().join("mail");
    let edge = gateway(
        dir.path(),
        "edge",
        3,
        "spool",
        &format!(
            "stores:\n  - {{ name: conc, kind: lmtp, address: \"unix:{}\" }}\n  - {{ name: local, kind: maildir, root: {} }}\nroutes:\n  domains:\n    loop.test: {{ store: conc }}\n    edge.test: {{ store: local }}\n",
            sock("conc"),
            mail.display()
        ),
    )
    .await;
    send(&edge, "x@loop.test", "Subject: round and round\r\n\r\nx").await;
    // The bounce (a DSN to sender@edge.test, in the edge's maildir) names the reason.
    let inbox = mail.join("edge.test/sender/Maildir/new");
    until("the bounce", || {
        std::fs::read_dir(&inbox).is_ok_and(|d| d.count() == 1) && edge.spool.is_empty()
    })
    .await;
    let dsn = std::fs::read_dir(&inbox).unwrap().next().unwrap().unwrap();
    let text = std::fs::read_to_string(dsn.path()).unwrap();
    assert!(
        text.contains("5.4.6") && text.contains("passed through this gateway already"),
        "{text}"
    );
    assert_eq!(
        text.matches("(postern node ").count(),
        1,
        "the returned message went round once, not until the hop limit: {text}"
    );
    assert!(concentrator.spool.is_empty());
    edge.stop().await;
    concentrator.stop().await;
}
