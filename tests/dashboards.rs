//! The Grafana dashboards in `dashboards/` against a running gateway.
//!
//! A gateway delivers a few messages over LMTP to a fake store (one recipient deferred with
//! `452 4.2.2`), so every family of metrics has samples. Then, for every panel of every
//! dashboard:
//! - the JSON is importable as is: a `datasource` variable of type `datasource`, panels of
//!   known types with a grid position, every query on `${datasource}`;
//! - every metric an expression names is defined in `postern::metrics::ALL` and present in
//!   the scrape of `/metrics`;
//! - with promtool (Debian's `prometheus` package): the scrape passes `promtool check
//!   metrics`, and every expression (template variables replaced) parses, as a recording
//!   rule under `promtool check rules`;
//! - with the Prometheus server from the same package: it scrapes the gateway, and every
//!   expression returns at least one series — no panel is left empty.
//!
//! Without promtool or prometheus those checks are skipped with a note, unless
//! `POSTERN_REQUIRE_CLIENTS=1` (CI sets it), which makes a missing one a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod common;
mod fake_lmtp;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_lmtp::{FakeStore, Rcpt, Script};
use postern::config::Config;
use postern::delivery::config::StoreAddress;
use postern::delivery::{LmtpStoreConfig, RemoteStore, StorePool};
use postern::gateway::Gateway;
use postern::metrics::{ALL, MetricKind};
use postern::scheduler::{Agent, Agents};
use serde_yaml::Value;

/// The store the store dashboard is checked with.
const STORE: &str = "a";

/// Template variables and what they become in the checks.
const VARIABLES: &[(&str, &str)] = &[
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    ("$__range", "1h"),
    ("${store}", STORE),
    ("$store", STORE),
    ("${instance}", ".*"),
    ("$instance", ".*"),
];

fn require_clients() -> bool {
    std::env::var("POSTERN_REQUIRE_CLIENTS").as_deref() == Ok("1")
}

/// `Some(path)` if `tool` runs; `None` (a skip note) or a panic under
/// `POSTERN_REQUIRE_CLIENTS=1` if not.
fn tool(name: &str) -> Option<&str> {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some(name);
    }
    let note = format!("{name} not found (Debian's prometheus package)");
    assert!(!require_clients(), "POSTERN_REQUIRE_CLIENTS=1: {note}");
    eprintln!("skipping the {name} checks: {note}");
    None
}

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

/// One query of one panel.
#[derive(Debug)]
struct Query {
    dashboard: String,
    panel: String,
    expr: String,
}

impl Query {
    fn at(&self) -> String {
        format!("{} / {:?}: {}", self.dashboard, self.panel, self.expr)
    }
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Checks a dashboard's structure and returns its queries (variables replaced).
fn load(path: &Path) -> Vec<Query> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let body = std::fs::read_to_string(path).unwrap();
    let board: Value = serde_yaml::from_str(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        board.get("schemaVersion").and_then(Value::as_u64) >= Some(36),
        "{name}: schemaVersion"
    );
    assert!(!text(&board, "uid").is_empty(), "{name}: uid");
    assert!(!text(&board, "title").is_empty(), "{name}: title");
    let vars = board["templating"]["list"].as_sequence().unwrap();
    assert!(
        vars.iter().any(|v| text(v, "name") == "datasource"
            && text(v, "type") == "datasource"
            && text(v, "query") == "prometheus"),
        "{name}: no datasource variable of type datasource for prometheus"
    );
    let mut queries = Vec::new();
    for v in vars.iter().filter(|v| text(v, "type") == "query") {
        assert_eq!(
            v["datasource"]["uid"].as_str(),
            Some("${datasource}"),
            "{name}"
        );
        // label_values(METRIC, LABEL) lists LABEL's values: checked as count by (LABEL) (METRIC).
        let q = text(v, "definition");
        let (metric, label) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.split_once(','))
            .unwrap_or_else(|| panic!("{name}: variable query {q}"));
        queries.push(Query {
            dashboard: name.clone(),
            panel: format!("variable {}", text(v, "name")),
            expr: format!("count by ({}) ({})", label.trim(), metric.trim()),
        });
    }
    let panels = board["panels"].as_sequence().unwrap();
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = text(p, "title").to_owned();
        assert!(ids.insert(p["id"].as_u64().unwrap()), "{name}: id twice");
        for k in ["x", "y", "w", "h"] {
            assert!(
                p["gridPos"][k].as_u64().is_some(),
                "{name} / {title}: gridPos"
            );
        }
        let kind = text(p, "type");
        if kind == "row" {
            continue;
        }
        assert!(
            matches!(kind, "timeseries" | "stat" | "bargauge"),
            "{name} / {title}: panel type {kind}"
        );
        assert_eq!(p["datasource"]["uid"].as_str(), Some("${datasource}"));
        let targets = p["targets"].as_sequence().unwrap();
        assert!(!targets.is_empty(), "{name} / {title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"].as_str(), Some("${datasource}"));
            let mut expr = text(t, "expr").to_owned();
            assert!(!expr.is_empty(), "{name} / {title}: empty expr");
            for (var, value) in VARIABLES {
                expr = expr.replace(var, value);
            }
            assert!(
                !expr.contains('$'),
                "{name} / {title}: unknown variable in {expr}"
            );
            queries.push(Query {
                dashboard: name.clone(),
                panel: title.clone(),
                expr,
            });
        }
    }
    queries
}

/// The metric names an expression uses (every one of ours starts with `postern_`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("postern_") {
        let start = i + at;
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_' || b == b':')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        // A label value ("postern_…" inside quotes) is not a metric; ours never are.
        let quoted = start > 0 && bytes[start - 1] == b'"';
        if boundary && !quoted {
            out.push(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// The definition a (possibly suffixed) series name belongs to.
fn defined(name: &str) -> bool {
    ALL.iter().any(|d| {
        d.name == name
            || (d.kind == MetricKind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(d.name)))
    })
}

/// Series names with at least one sample in a scrape.
fn scraped_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// `GET path` over HTTP/1.0 (no chunking); returns the body.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

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

/// A gateway with LMTP store `a` (a fake) that has delivered three messages and deferred a
/// recipient of each.
async fn busy_gateway(dir: &Path) -> (Gateway, FakeStore) {
    let store = FakeStore::start(Script::default()).await;
    store.rcpt("full", Rcpt::result("452 4.2.2 Mailbox full"));
    let yaml = format!(
        "hostname: mx.test\nnode_id: 11\ndrain_timeout: 2s\nspool:\n  path: {}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - {{ name: {STORE}, kind: discard }}\nroutes:\n  domains:\n    a.test: {{ store: {STORE}, authoritative: true }}\n  users:\n    x@a.test: {STORE}\n    full@a.test: {STORE}\ndelivery:\n  minimal_backoff: 1s\n  maximal_backoff: 2s\n",
        dir.join("spool").display()
    );
    let config = Config::parse(&yaml, "dashboards.yaml").unwrap_or_else(|e| panic!("{e:?}"));
    let mut agents = Agents::new();
    agents.insert(STORE, lmtp_agent(STORE, store.addr.port()));
    let gateway = Gateway::start_with_agents(config, agents).await.unwrap();
    let mut client = common::Client::connect(gateway.address("smtp").unwrap()).await;
    client.hello().await;
    for i in 0..3 {
        client
            .send_mail(
                "sender@a.test",
                &["x@a.test", "full@a.test"],
                &format!("Subject: dashboards {i}\r\n\r\nbody {i}"),
            )
            .await;
    }
    // An unknown user of an authoritative domain: a refused recipient.
    client.cmd("MAIL FROM:<sender@a.test>", 250).await;
    client.cmd("RCPT TO:<nobody@a.test>", 550).await;
    client.cmd("QUIT", 221).await;
    (gateway, store)
}

async fn scrape(gateway: &Gateway) -> String {
    let addr = gateway.metrics_address.to_string();
    tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
        .await
        .unwrap()
        .unwrap()
        .1
}

/// A Prometheus server on loopback, killed when dropped.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(bin: &str, dir: &Path, target: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: postern\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child,
            addr: format!("127.0.0.1:{port}"),
        }
    }

    /// Runs an instant query; returns the number of series (or the error body).
    fn query(&self, expr: &str) -> Result<usize, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let (code, body) = http_get(&self.addr, &path).map_err(|e| e.to_string())?;
        let v: Value = serde_yaml::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if code != 200 || text(&v, "status") != "success" {
            return Err(body);
        }
        Ok(v["data"]["result"].as_sequence().map_or(0, Vec::len))
    }

    /// The value of an instant query's first series (none while not ready).
    fn value(&self, expr: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let (_, body) = http_get(&self.addr, &path).ok()?;
        let v: Value = serde_yaml::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_is_valid_and_has_data() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["overview.json", "store.json", "spool.json"] {
        assert!(names.iter().any(|n| n == want), "dashboards/{want} missing");
    }
    let queries: Vec<Query> = files.iter().flat_map(|p| load(p)).collect();
    assert!(queries.len() >= 30, "only {} queries", queries.len());

    // Every metric named is one of ours.
    for q in &queries {
        let used = metric_names(&q.expr);
        assert!(!used.is_empty(), "{}: names no postern metric", q.at());
        for n in used {
            assert!(
                defined(&n),
                "{}: {n} is not in postern::metrics::ALL",
                q.at()
            );
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let (gateway, store) = busy_gateway(dir.path()).await;

    // Wait (bounded) until the deliveries, the deferrals and the per-store gauges show.
    let want = [
        "postern_deliveries_total{",
        "postern_deferrals_total{",
        "postern_queue_shape_messages{",
        "postern_store_connections{",
        "postern_spool_sync_seconds_bucket{",
        "postern_lmtp_phase_seconds_bucket{",
        "postern_delivery_latency_seconds_bucket{",
        "postern_spool_free_bytes ",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = scrape(&gateway).await;
    while !(store.delivered().len() >= 3 && want.iter().all(|w| text.contains(w))) {
        assert!(
            Instant::now() < deadline,
            "delivered {}; metrics so far:\n{text}",
            store.delivered().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = scrape(&gateway).await;
    }
    assert!(text.contains(r#"class="4.2""#), "{text}");

    // Every series a panel reads is exported by the running gateway.
    let scraped = scraped_names(&text);
    let mut missing = BTreeSet::new();
    for q in &queries {
        for n in metric_names(&q.expr) {
            if !scraped.contains(&n) {
                missing.insert(format!("{n} ({})", q.at()));
            }
        }
    }
    assert!(missing.is_empty(), "not in /metrics: {missing:#?}\n{text}");

    if let Some(promtool) = tool("promtool") {
        // Lint the exposition.
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        // Parse every expression: one recording rule each.
        let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
        for (i, q) in queries.iter().enumerate() {
            let quoted = serde_yaml::to_string(&Value::String(q.expr.clone())).unwrap();
            rules.push_str(&format!(
                "      - record: dashboard_query_{i}\n        expr: {}\n",
                quoted.trim_end()
            ));
        }
        let file = dir.path().join("dashboards.rules.yml");
        std::fs::write(&file, &rules).unwrap();
        let out = Command::new(promtool)
            .args(["check", "rules"])
            .arg(&file)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "promtool check rules:\n{said}\n{rules}"
        );
        assert!(
            said.contains(&format!("{} rules found", queries.len())),
            "{said}"
        );
        eprintln!(
            "promtool: the scrape lints clean; {} queries parse",
            queries.len()
        );
    }

    if let Some(bin) = tool("prometheus") {
        let prom_dir = dir.path().join("prometheus");
        std::fs::create_dir_all(&prom_dir).unwrap();
        let target = gateway.metrics_address.to_string();
        let prom = tokio::task::spawn_blocking({
            let prom_dir = prom_dir.clone();
            move || Prometheus::start(bin, &prom_dir, &target)
        })
        .await
        .unwrap();
        let prom = Arc::new(prom);
        // Ready, and at least four scrapes in (rate() needs two samples in its range).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let p = Arc::clone(&prom);
            let scrapes = tokio::task::spawn_blocking(move || {
                p.value("count_over_time(postern_build_info[1m])")
            })
            .await
            .unwrap();
            if scrapes.is_some_and(|n| n >= 4.0) {
                break;
            }
            let log = std::fs::read_to_string(prom_dir.join("prometheus.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "prometheus did not scrape:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut empty = Vec::new();
        for q in &queries {
            let p = Arc::clone(&prom);
            let expr = q.expr.clone();
            let got = tokio::task::spawn_blocking(move || p.query(&expr))
                .await
                .unwrap();
            match got {
                Ok(n) if n > 0 => {}
                Ok(_) => empty.push(format!("no data: {}", q.at())),
                Err(e) => empty.push(format!("error {e}: {}", q.at())),
            }
        }
        assert!(empty.is_empty(), "{empty:#?}");
        eprintln!("prometheus: all {} queries return data", queries.len());
    }

    gateway.stop().await;
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metric_names(r#"sum by (le) (rate(postern_a_bucket{x="postern_no"}[1m])) / postern_b"#),
        ["postern_a_bucket", "postern_b"]
    );
    assert!(defined("postern_spool_sync_seconds_bucket"));
    assert!(!defined("postern_spool_sync_seconds_total"));
    assert!(!defined("postern_nothing"));
}

#[test]
fn the_readme_metrics_table_lists_every_metric_with_its_type_and_labels() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut listed = BTreeSet::new();
    for line in readme.lines().filter(|l| l.starts_with("| `postern_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`');
        let def = ALL
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("README lists {name}, which postern::metrics::ALL does not"));
        let kind = match def.kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        assert_eq!(cells[2], kind, "{name}");
        assert_eq!(cells[3], def.labels.join(", "), "{name}: labels");
        assert!(listed.insert(name.to_owned()), "{name} listed twice");
    }
    let defined: BTreeSet<String> = ALL.iter().map(|d| d.name.to_owned()).collect();
    let unlisted: Vec<_> = defined.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "not in the README's table: {unlisted:?}"
    );
}
