//! Recipient verification at RCPT against a scripted LMTP store (tests/fake_lmtp): the
//! store's 550 becomes the edge's 550 5.1.1, a known recipient 250, a down store 450 4.1.1
//! (or an accept when configured), answers are cached, and a burst of concurrent RCPTs for
//! one address makes one store query. Verifications are counted by result, cache lookups
//! by outcome (`/metrics`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;
mod fake_lmtp;

use common::{Client, TestGateway, metric};
use fake_lmtp::{FakeStore, Rcpt, Script};
use postern::config::Config;
use postern::gateway::Gateway;

/// A gateway whose `example.org` goes to the LMTP store `cyrus1` at `store` (verifying),
/// with `store_extra` under the store and `top_extra` at the top level.
async fn gateway(store: &str, store_extra: &str, top_extra: &str) -> TestGateway {
    gateway_named("cyrus1", store, store_extra, top_extra).await
}

/// [`gateway`] with the store named `name`: the metrics recorder is shared by every test
/// in this binary, so a test that reads counters gives its store a name of its own.
async fn gateway_named(name: &str, store: &str, store_extra: &str, top_extra: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "hostname: mx.test\nnode_id: 7\ndrain_timeout: 5s\ndelivery:\n  enabled: false\n{top_extra}\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\n    max_connections: 3000\n    max_connections_per_ip: 3000\nstores:\n  - name: {name}\n    kind: lmtp\n    address: {store}\n    verify_recipients: true\n{store_extra}  - name: other\n    kind: discard\nroutes:\n  domains:\n    example.org: {{ store: {name} }}\n    other.example: {{ store: other }}\n",
        spool = dir.path().join("spool").display(),
    );
    let config = Config::parse(&text, "test.yaml").unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    let gateway = Gateway::start(config).await.unwrap();
    TestGateway { gateway, dir }
}

fn script() -> Script {
    Script {
        // Replies at once (a pipelining fake holds them until DATA, which never comes).
        pipelining: false,
        ..Script::default()
    }
    .rcpt(
        "nosuch",
        Rcpt::new("550 5.1.1 <nosuch@example.org> User unknown", ""),
    )
    .rcpt("busy", Rcpt::new("451 4.3.0 Mailbox locked", ""))
}

/// RCPT queries of the fake for `local`.
fn queries(store: &FakeStore, local: &str) -> usize {
    store
        .sessions()
        .iter()
        .flat_map(|s| s.commands.clone())
        .filter(|c| {
            c.to_ascii_lowercase()
                .starts_with(&format!("rcpt to:<{local}@"))
        })
        .count()
}

/// `postern_recipient_verifications_total` of `store` with `result` in a `/metrics` text
/// (0 when not exported: a series appears at its first count).
fn verifications(text: &str, store: &str, result: &str) -> f64 {
    let series =
        format!("postern_recipient_verifications_total{{store=\"{store}\",result=\"{result}\"}}");
    metric(text, &series).unwrap_or(0.0)
}

/// `postern_verify_cache_lookups_total` of `store` with `outcome`, likewise.
fn cache_lookups(text: &str, store: &str, outcome: &str) -> f64 {
    let series =
        format!("postern_verify_cache_lookups_total{{store=\"{store}\",outcome=\"{outcome}\"}}");
    metric(text, &series).unwrap_or(0.0)
}

async fn session(gw: &TestGateway) -> Client {
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.cmd("MAIL FROM:<sender@remote.example>", 250).await;
    c
}

#[tokio::test]
async fn unknown_is_550_known_is_250_and_nothing_is_delivered() {
    let store = FakeStore::start(script()).await;
    let gw = gateway(&store.addr.to_string(), "", "").await;
    let mut c = session(&gw).await;
    let r = c.cmd("RCPT TO:<nosuch@example.org>", 550).await;
    assert_eq!(
        r.text(),
        "5.1.1 Recipient address rejected: <nosuch@example.org> User unknown"
    );
    c.cmd("RCPT TO:<alice@example.org>", 250).await;
    // A store that is not verifying is not asked.
    c.cmd("RCPT TO:<bob@other.example>", 250).await;
    // The store saw MAIL FROM:<>, RCPT, RSET: never DATA.
    let commands: Vec<String> = store
        .sessions()
        .iter()
        .flat_map(|s| s.commands.clone())
        .collect();
    assert!(commands.iter().any(|c| c == "MAIL FROM:<>"), "{commands:?}");
    assert!(commands.iter().any(|c| c == "RSET"), "{commands:?}");
    assert!(
        !commands
            .iter()
            .any(|c| c.starts_with("DATA") || c.starts_with("BDAT"))
    );
    assert_eq!(queries(&store, "bob"), 0);
    gw.gateway.stop().await;
}

#[tokio::test]
async fn a_cached_answer_makes_no_second_query() {
    let store = FakeStore::start(script()).await;
    let gw = gateway_named("cached", &store.addr.to_string(), "", "").await;
    for _ in 0..3 {
        let mut c = session(&gw).await;
        c.cmd("RCPT TO:<nosuch@example.org>", 550).await;
        c.cmd("RCPT TO:<alice@example.org>", 250).await;
        // The domain's case does not make another key.
        c.cmd("RCPT TO:<alice@EXAMPLE.org>", 250).await;
    }
    assert_eq!(queries(&store, "nosuch"), 1);
    assert_eq!(queries(&store, "alice"), 1);
    // Nine lookups: the first of each address asks the store, the other seven are hits.
    let text = gw.metrics().await;
    assert_eq!(verifications(&text, "cached", "invalid"), 1.0, "{text}");
    assert_eq!(verifications(&text, "cached", "valid"), 1.0, "{text}");
    assert_eq!(verifications(&text, "cached", "tempfail"), 0.0, "{text}");
    assert_eq!(cache_lookups(&text, "cached", "miss"), 2.0, "{text}");
    assert_eq!(cache_lookups(&text, "cached", "hit"), 7.0, "{text}");
    assert_eq!(cache_lookups(&text, "cached", "joined"), 0.0, "{text}");
    gw.gateway.stop().await;
}

#[tokio::test]
async fn a_temporary_answer_is_450_and_not_cached() {
    let store = FakeStore::start(script()).await;
    let gw = gateway_named("busy", &store.addr.to_string(), "", "").await;
    for _ in 0..2 {
        let mut c = session(&gw).await;
        let r = c.cmd("RCPT TO:<busy@example.org>", 450).await;
        assert!(r.text().starts_with("4.1.1 "), "{r:?}");
    }
    assert_eq!(queries(&store, "busy"), 2);
    // Each RCPT asked the store (a miss) and was told to wait: two tempfails, no hit.
    let text = gw.metrics().await;
    assert_eq!(verifications(&text, "busy", "tempfail"), 2.0, "{text}");
    assert_eq!(verifications(&text, "busy", "valid"), 0.0, "{text}");
    assert_eq!(verifications(&text, "busy", "invalid"), 0.0, "{text}");
    assert_eq!(cache_lookups(&text, "busy", "miss"), 2.0, "{text}");
    assert_eq!(cache_lookups(&text, "busy", "hit"), 0.0, "{text}");
    gw.gateway.stop().await;
}

/// An address nobody listens on.
async fn dead_address() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    addr
}

#[tokio::test]
async fn a_down_store_is_450_never_5xx_or_accepted_when_configured() {
    let dead = dead_address().await;
    let gw = gateway(&dead, "", "").await;
    let mut c = session(&gw).await;
    let r = c.cmd("RCPT TO:<anyone@example.org>", 450).await;
    assert!(r.text().starts_with("4.1.1 "), "{r:?}");
    gw.gateway.stop().await;

    let gw = gateway(&dead, "    verify_tempfail_action: accept\n", "").await;
    let mut c = session(&gw).await;
    c.cmd("RCPT TO:<anyone@example.org>", 250).await;
    gw.gateway.stop().await;
}

/// 1,000 sessions send RCPT for one unknown address at the same moment. The cache keeps
/// nothing (`max_entries: 0`), so only the single flight can spare the store: one query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_1000_rcpts_for_one_unknown_address_makes_one_query() {
    postern::gateway::raise_fd_limit(8192);
    let slow = Script {
        // Holds its replies until DATA (never sent) for 2 s: the query is slow.
        pipelining: true,
        ..script()
    };
    let store = FakeStore::start(slow).await;
    let gw = gateway(
        &store.addr.to_string(),
        "",
        "verify_cache: { max_entries: 0 }",
    )
    .await;
    const N: usize = 1000;
    // The sessions are opened one after the other (no accept backlog overflow), then every
    // RCPT is written before any reply is read: they reach the gateway within milliseconds,
    // while the one query is held for 2 s by the store.
    let burst = async {
        let mut clients = Vec::with_capacity(N);
        for _ in 0..N {
            clients.push(session(&gw).await);
        }
        for c in &mut clients {
            c.line("RCPT TO:<nosuch@example.org>").await;
        }
        let mut codes = Vec::with_capacity(N);
        for c in &mut clients {
            codes.push(c.reply().await.code);
        }
        codes
    };
    let codes = tokio::time::timeout(std::time::Duration::from_secs(60), burst)
        .await
        .expect("the burst is answered within 60 s");
    assert!(codes.iter().all(|&c| c == 550), "{codes:?}");
    assert_eq!(queries(&store, "nosuch"), 1);
    gw.gateway.stop().await;
}

/// One RCPT's round trip (it must be accepted).
async fn rcpt_time(c: &mut Client, to: &str) -> std::time::Duration {
    let t = std::time::Instant::now();
    c.line(&format!("RCPT TO:<{to}>")).await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    t.elapsed()
}

fn median_us(mut v: Vec<std::time::Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

/// Figures, not assertions: `cargo test --release --test edge_verify -- --ignored
/// --nocapture`. RCPT latency (one session, median) to a store that does not verify, and
/// with verification cold (a store query each) and hot (cached); verified RCPTs per second
/// with a warm cache (8 sessions, pipelined in batches of 100); and the cache lookup alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn bench_rcpt_latency_cold_and_hot() {
    use std::time::{Duration, Instant};
    const N: usize = 450;
    let store = FakeStore::start(script()).await;
    let gw = gateway(&store.addr.to_string(), "", "").await;
    let mut c = session(&gw).await;
    let (mut plain, mut cold, mut hot) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..N {
        cold.push(rcpt_time(&mut c, &format!("u{i}@example.org")).await);
    }
    c.cmd("RSET", 250).await;
    c.cmd("MAIL FROM:<sender@remote.example>", 250).await;
    // Interleaved, so that both see the same machine: a store that does not verify, and
    // the verifying store's cached answers.
    for i in 0..N {
        plain.push(rcpt_time(&mut c, &format!("u{i}@other.example")).await);
        hot.push(rcpt_time(&mut c, &format!("u{i}@example.org")).await);
    }
    let (p, co, h) = (median_us(plain), median_us(cold), median_us(hot));
    println!(
        "RCPT latency, median of {N}: no verification {p:.1} µs, verification cold {co:.1} µs, hot (cached) {h:.1} µs, hot - none {:.1} µs",
        h - p
    );

    // Throughput with a warm cache: 8 sessions, 100 pipelined RCPTs then RSET, for 2 s.
    let addr = gw.addr("smtp");
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr).await;
            c.hello().await;
            let mut done = 0usize;
            while Instant::now() < deadline {
                c.cmd("MAIL FROM:<sender@remote.example>", 250).await;
                let mut batch = String::new();
                for i in 0..100 {
                    batch.push_str(&format!("RCPT TO:<u{}@example.org>\r\n", (done + i) % N));
                }
                c.send(batch.as_bytes()).await;
                for _ in 0..100 {
                    assert_eq!(c.reply().await.code, 250);
                }
                c.cmd("RSET", 250).await;
                done += 100;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    println!(
        "verified RCPTs per second, warm cache, 8 sessions: {:.0}",
        total as f64 / 2.0
    );

    // The cache alone: a hit.
    let cache = postern::edge::VerifyCache::new(1_000_000);
    for i in 0..100_000 {
        if let postern::edge::Lookup::Lead(f, _) =
            cache.lookup(&format!("s\0u{i}@example.org"), Instant::now())
        {
            f.finish(
                postern::edge::Verdict::Valid,
                Some(Duration::from_secs(3600)),
            );
        }
    }
    let keys: Vec<String> = (0..100_000)
        .map(|i| format!("s\0u{i}@example.org"))
        .collect();
    let t = Instant::now();
    for k in &keys {
        assert!(matches!(
            cache.lookup(k, Instant::now()),
            postern::edge::Lookup::Hit(_)
        ));
    }
    println!(
        "cache hit (lookup alone, 100,000 entries): {:.2} µs",
        t.elapsed().as_secs_f64() * 1e6 / keys.len() as f64
    );
    assert_eq!(queries(&store, "u0"), 1);
    gw.gateway.stop().await;
}

/// `postern route ADDRESS --verify` asks the store directly, without a running gateway.
#[tokio::test]
async fn route_verify_shows_the_stores_answer() {
    let store = FakeStore::start(script()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postern.yaml");
    let text = format!(
        "listeners:\n  - {{ name: smtp, address: 127.0.0.1:0, protocol: smtp }}\nspool:\n  path: {spool}\nstores:\n  - name: cyrus1\n    kind: lmtp\n    address: {addr}\nroutes:\n  domains:\n    example.org: {{ store: cyrus1 }}\n",
        spool = dir.path().join("spool").display(),
        addr = store.addr,
    );
    std::fs::write(&path, text).unwrap();
    let args = postern::cli::route::RouteArgs {
        addresses: vec!["nosuch@example.org".into(), "alice@example.org".into()],
        config: Some(path),
        trusted: false,
        verify: true,
        diff: None,
    };
    // The command runs its own runtime: on a blocking thread, while this one serves the fake.
    let out = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        postern::cli::route::run(&args, &mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(
        out.contains("verify nosuch@example.org at store cyrus1: invalid (550 5.1.1 <nosuch@example.org> User unknown)"),
        "{out}"
    );
    assert!(
        out.contains("verify alice@example.org at store cyrus1: valid (250 "),
        "{out}"
    );
}
