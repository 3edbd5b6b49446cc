//! End to end: SMTP into the gateway (listener, spool, scheduler), LMTP out to three fake
//! stores; the metrics endpoint shows the deliveries.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod common;
mod fake_lmtp;

use std::sync::Arc;
use std::time::Duration;

use fake_lmtp::{FakeStore, Script};
use postern::config::Config;
use postern::delivery::config::StoreAddress;
use postern::delivery::{LmtpStoreConfig, RemoteStore, StorePool};
use postern::gateway::Gateway;
use postern::scheduler::{Agent, Agents};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn lmtp_agent(name: &str, port: u16) -> Agent {
    let cfg = LmtpStoreConfig::new(
        name,
        StoreAddress::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
    );
    Agent::Lmtp(StorePool::new(Arc::new(
        RemoteStore::from_config(&cfg, "mx.test").unwrap(),
    )))
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_in_lmtp_out_to_three_stores() {
    let dir = tempfile::tempdir().unwrap();
    let stores = [
        FakeStore::start(Script::default()).await,
        FakeStore::start(Script::default()).await,
        FakeStore::start(Script::default()).await,
    ];
    // The stores are declared (routes must name existing stores) and their agents replaced
    // by LMTP pools to the fakes.
    let yaml = format!(
        "hostname: mx.test\nnode_id: 9\ndrain_timeout: 5s\nspool:\n  path: {}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - {{ name: a, kind: discard }}\n  - {{ name: b, kind: discard }}\n  - {{ name: c, kind: discard }}\nroutes:\n  domains:\n    a.test: {{ store: a }}\n    b.test: {{ store: b }}\n    c.test: {{ store: c }}\ndelivery:\n  minimal_backoff: 1s\n  maximal_backoff: 2s\n",
        dir.path().join("spool").display()
    );
    let config = Config::parse(&yaml, "e2e.yaml").unwrap_or_else(|e| panic!("{e:?}"));
    let mut agents = Agents::new();
    for (name, store) in ["a", "b", "c"].iter().zip(&stores) {
        agents.insert(name, lmtp_agent(name, store.addr.port()));
    }
    let gateway = Gateway::start_with_agents(config, agents).await.unwrap();
    let mut client = common::Client::connect(gateway.address("smtp").unwrap()).await;
    client.hello().await;
    for i in 0..5 {
        client
            .send_mail(
                "sender@a.test",
                &[
                    &format!("x{i}@a.test"),
                    &format!("y{i}@b.test"),
                    &format!("z{i}@c.test"),
                ],
                &format!("Subject: e2e {i}\r\n\r\nbody {i}"),
            )
            .await;
    }
    client.cmd("QUIT", 221).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(stores.iter().all(|s| s.delivered().len() == 5) && gateway.spool.is_empty()) {
        assert!(tokio::time::Instant::now() < deadline, "not all delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (store, prefix) in stores.iter().zip(["x", "y", "z"]) {
        for d in store.delivered() {
            assert!(d.to.starts_with(prefix));
            assert_eq!(d.from, "sender@a.test");
            assert!(d.body.contains("Received: from client.test"), "{}", d.body);
            assert!(d.body.contains("Subject: e2e"));
        }
    }
    let text = metrics(gateway.metrics_address).await;
    for want in [
        "postern_deliveries_total{",
        "outcome=\"sent\"",
        "postern_delivery_latency_seconds_bucket{",
        "postern_lmtp_phase_seconds_bucket{",
    ] {
        assert!(text.contains(want), "{want} missing from /metrics:\n{text}");
    }
    gateway.stop().await;
}
