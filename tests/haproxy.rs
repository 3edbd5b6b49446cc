//! Scale out, as operators run it: real HAProxy on loopback (`mode tcp`, `balance
//! roundrobin`, `send-proxy-v2`, `option smtpchk`) in front of three `postern run` gateways,
//! each with its own spool, listener, metrics port and `node_id`, all delivering over LMTP
//! into ONE store (the scripted fake LMTP store: one address, every transaction recorded, so
//! the test counts each Message-ID the store took, whichever gateway sent it).
//!
//! Evidence asserted:
//! - (a) postern sees the client's address, not HAProxy's: clients bind 127.0.0.2 or
//!   127.0.0.3 before connecting; the Received line at the store and the `accepted` log line
//!   name them, and relaying (`trusted_networks: [127.0.0.2/32]`) follows that address.
//! - (b) under load, `kill -9` of gw1: HAProxy takes it out (its log says DOWN) and new
//!   sessions go to gw2 and gw3; only sessions opened before the DOWN fail, and the client
//!   retries them, as an MTA would.
//! - (c) gw1's spool, copied to a new directory (the README's procedure for moving a dead
//!   node's spool), is started with gw1's `node_id` on gw1's address: it drains.
//! - (d) every message that got a 250 reached the store; second copies are bounded by gw1's
//!   in-doubt recipients plus the sessions cut by the kill.
//!
//! Skipped (with a note) without haproxy unless `POSTERN_REQUIRE_CLIENTS=1`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod daemon;
mod fake_lmtp;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon::Daemon;
use fake_lmtp::{FakeStore, Script};
use postern::spool::Spool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::TcpSocket;

/// Messages of the load.
const MESSAGES: usize = 200;
/// Concurrent client workers (each a series of sessions).
const WORKERS: usize = 4;
/// Messages per session.
const PER_SESSION: usize = 10;
/// gw1 is killed once this many messages are acknowledged.
const KILL_AT: usize = 60;

/// The load's source address (relaying is allowed for it).
const CLIENT: &str = "127.0.0.2";
/// Another client, not trusted for relaying.
const STRANGER: &str = "127.0.0.3";

fn haproxy_binary() -> Option<PathBuf> {
    let found = [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("POSTERN_REQUIRE_CLIENTS").as_deref() != Ok("1"),
            "haproxy is required in CI"
        );
        eprintln!("skipping: haproxy is not installed");
    }
    found
}

/// HAProxy in the foreground, its stderr (health-check state changes) collected; killed on
/// drop.
struct Haproxy {
    child: Child,
    log: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Haproxy {
    fn down_at(&self, server: &str) -> Option<Instant> {
        let needle = format!("gateways/{server} is DOWN");
        self.log
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| l.contains(&needle))
            .map(|(t, _)| *t)
    }

    fn up_after(&self, server: &str, after: Instant) -> bool {
        let needle = format!("gateways/{server} is UP");
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|(t, l)| *t > after && l.contains(&needle))
    }
}

/// The HAProxy configuration of the test; the README's "Scale out" section shows the same
/// backend.
fn haproxy_config(front: u16, gateways: &[String]) -> String {
    let mut servers = String::new();
    for (i, addr) in gateways.iter().enumerate() {
        servers.push_str(&format!(
            "    server gw{} {addr} send-proxy-v2 check\n",
            i + 1
        ));
    }
    format!(
        "global
    log stderr format raw local0 notice
defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 2
    option redispatch
frontend smtp
    bind 127.0.0.1:{front}
    default_backend gateways
backend gateways
    balance roundrobin
    option smtpchk EHLO haproxy.test
    default-server inter 200ms fastinter 100ms downinter 200ms fall 2 rise 2
{servers}"
    )
}

fn start_haproxy(bin: &Path, dir: &Path, front: u16, gateways: &[String]) -> Haproxy {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(front, gateways)).unwrap();
    let mut child = Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("haproxy: {line}");
            sink.lock().unwrap().push((Instant::now(), line));
        }
    });
    Haproxy { child, log }
}

/// A free loopback port (bound and released: HAProxy's config needs a number).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn gateway_yaml(n: usize, dir: &Path, spool: &Path, listen: &str, store: SocketAddr) -> PathBuf {
    let path = dir.join(format!("gw{n}.yaml"));
    std::fs::write(
        &path,
        format!(
            "hostname: gw{n}
node_id: {node}
drain_timeout: 2s
delivery:
  minimal_backoff: 1s
  maximal_backoff: 2s
spool:
  path: {spool}
  min_free: 0
metrics:
  address: 127.0.0.1:0
listeners:
  - name: smtp
    address: {listen}
    protocol: smtp
    trusted_networks: [{CLIENT}/32]
    proxy_protocol:
      trusted_networks: [127.0.0.1/32]
stores:
  - name: store
    kind: lmtp
    address: {store}
    max_connections: 1
  - name: relay
    kind: discard
routes:
  domains:
    example.org: {{ store: store }}
  relay: relay
",
            node = 10 + n,
            spool = spool.display(),
        ),
    )
    .unwrap();
    path
}

/// A minimal SMTP client session from a chosen loopback source address.
struct Session {
    r: AsyncBufReader<tokio::net::TcpStream>,
}

impl Session {
    async fn open(front: SocketAddr, source: &str) -> Option<Self> {
        let socket = TcpSocket::new_v4().ok()?;
        socket
            .bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0))
            .ok()?;
        let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(front))
            .await
            .ok()?
            .ok()?;
        let mut s = Self {
            r: AsyncBufReader::new(stream),
        };
        if !s.reply().await?.starts_with("220") {
            return None;
        }
        s.cmd("EHLO client.test", "250").await?;
        Some(s)
    }

    async fn reply(&mut self) -> Option<String> {
        let read = async {
            let mut all = String::new();
            loop {
                let mut line = String::new();
                if self.r.read_line(&mut line).await.ok()? == 0 {
                    return None;
                }
                all.push_str(&line);
                if line.as_bytes().get(3) != Some(&b'-') {
                    return Some(all);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .ok()?
    }

    async fn cmd(&mut self, line: &str, want: &str) -> Option<String> {
        self.r
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .ok()?;
        let r = self.reply().await?;
        r.starts_with(want).then_some(r)
    }

    /// One message; true on a 250 after the dot.
    async fn mail(&mut self, to: &str, id: &str) -> Option<()> {
        self.cmd("MAIL FROM:<load@example.net>", "250").await?;
        self.cmd(&format!("RCPT TO:<{to}>"), "250").await?;
        self.cmd("DATA", "354").await?;
        self.cmd(
            &format!("Message-ID: <{id}>\r\nSubject: {id}\r\n\r\nbody of {id}\r\n."),
            "250",
        )
        .await?;
        Some(())
    }
}

/// What the load recorded.
#[derive(Default)]
struct Load {
    /// Message-ID → when its 250 arrived.
    acked: HashMap<String, Instant>,
    /// When each failed session had been opened.
    failed_opened: Vec<Instant>,
    /// Of those, how many failed before the greeting and EHLO (connect or banner).
    failed_at_open: usize,
}

/// A worker: sends its share of the messages in sessions of `PER_SESSION`, retrying a failed
/// session (after 100 ms) until every message has its 250 or the deadline passes. Its last
/// session waits (at most 10 s) for `down`: HAProxy has taken gw1 out, so some sessions are
/// surely opened after that, whatever the machine's speed.
async fn worker(
    front: SocketAddr,
    w: usize,
    load: Arc<Mutex<Load>>,
    acked: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
) {
    let mut pending: Vec<String> = (w..MESSAGES)
        .step_by(WORKERS)
        .map(|n| format!("m{n}@load.test"))
        .rev()
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pending.is_empty() && Instant::now() < deadline {
        if pending.len() <= PER_SESSION {
            let wait = Instant::now() + Duration::from_secs(10);
            while !down.load(Ordering::SeqCst) && Instant::now() < wait {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let opened = Instant::now();
        let ok = async {
            let Some(mut s) = Session::open(front, CLIENT).await else {
                load.lock().unwrap().failed_at_open += 1;
                return None;
            };
            for _ in 0..PER_SESSION {
                let Some(id) = pending.last().cloned() else {
                    break;
                };
                s.mail("user@example.org", &id).await?;
                pending.pop();
                load.lock().unwrap().acked.insert(id, Instant::now());
                acked.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = s.cmd("QUIT", "221").await;
            Some(())
        }
        .await;
        if ok.is_none() {
            load.lock().unwrap().failed_opened.push(opened);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Copies a stopped node's spool directory (regular files; the admin socket is not one).
fn copy_spool(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            copy_spool(&e.path(), &to.join(e.file_name()));
        } else if t.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn queued(spool: &Path) -> usize {
    Spool::open_read_only(spool).unwrap().messages.len()
}

/// Message-ID → copies, and Message-ID → the `by gwN` of its Received line, at the store.
fn at_store(store: &FakeStore) -> (HashMap<String, usize>, HashMap<String, String>) {
    let mut copies = HashMap::new();
    let mut by = HashMap::new();
    for t in store.transactions().into_iter().filter(|t| t.complete) {
        let text = String::from_utf8_lossy(&t.content).into_owned();
        let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: <"))
            .map(|l| l.trim_end_matches('>').to_owned())
        else {
            continue;
        };
        *copies.entry(id.clone()).or_insert(0) += 1;
        if let Some(gw) = text.split("by ").nth(1).and_then(|s| s.split(' ').next()) {
            by.insert(id.clone(), gw.to_owned());
        }
        // Keep the whole Received field for the client-address check.
        by.insert(format!("received:{id}"), text.lines().take(2).collect());
    }
    (copies, by)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_behind_haproxy_lose_nothing_when_one_is_killed() {
    let Some(haproxy_bin) = haproxy_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // One store for all: 150 ms per delivery and one connection per gateway, so gw1 still
    // holds queued mail when it is killed.
    let store = FakeStore::start(Script {
        reply_delay: Some(Duration::from_millis(150)),
        ..Script::default()
    })
    .await;

    // Three gateways; each on its own port, spool and metrics port.
    let mut gateways = Vec::new();
    let mut addrs = Vec::new();
    let mut spools = Vec::new();
    for n in 1..=3 {
        let spool = dir.path().join(format!("gw{n}-spool"));
        let cfg = gateway_yaml(n, dir.path(), &spool, "127.0.0.1:0", store.addr);
        let d = Daemon::start(&cfg);
        addrs.push(d.addr.clone());
        spools.push(spool);
        gateways.push(Some(d));
    }
    let front_port = free_port();
    let front: SocketAddr = format!("127.0.0.1:{front_port}").parse().unwrap();
    let haproxy = start_haproxy(&haproxy_bin, dir.path(), front_port, &addrs);
    // Every server UP (HAProxy starts them UP; wait for a check round and the front).
    daemon::eventually(Duration::from_secs(10), "haproxy's frontend", || {
        std::net::TcpStream::connect(front).ok()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // (a) The client's address, through HAProxy: relaying for 127.0.0.2 only.
    let mut s = Session::open(front, STRANGER).await.expect("a session");
    s.cmd("MAIL FROM:<a@example.net>", "250").await.unwrap();
    let refused = s.cmd("RCPT TO:<x@elsewhere.example>", "").await.unwrap();
    assert!(refused.starts_with("554"), "{refused}");
    s.cmd("RSET", "250").await.unwrap();
    s.mail("user@example.org", "stranger@load.test")
        .await
        .expect("local mail from a stranger is accepted");
    s.cmd("QUIT", "221").await;
    let mut s = Session::open(front, CLIENT).await.expect("a session");
    s.cmd("MAIL FROM:<a@example.net>", "250").await.unwrap();
    s.cmd("RCPT TO:<x@elsewhere.example>", "250")
        .await
        .expect("127.0.0.2 may relay");
    s.cmd("RSET", "250").await.unwrap();
    s.cmd("QUIT", "221").await;
    let stranger = format!("[{STRANGER}]");
    let logged = daemon::eventually(Duration::from_secs(5), "the accepted log line", || {
        gateways
            .iter()
            .flatten()
            .flat_map(|d| d.log_lines(&["\"accepted\"", &stranger]))
            .next()
    });
    assert!(
        logged.contains("client=") || logged.contains("\"client\""),
        "{logged}"
    );
    for d in gateways.iter().flatten() {
        let balancer = d.log_lines(&["\"accepted\"", "[127.0.0.1]"]);
        assert!(
            balancer.is_empty(),
            "HAProxy's address logged: {balancer:?}"
        );
    }

    // (b) The load, and kill -9 of gw1 in the middle of it.
    let load = Arc::new(Mutex::new(Load::default()));
    let acked = Arc::new(AtomicUsize::new(0));
    let down_seen = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            tokio::spawn(worker(
                front,
                w,
                load.clone(),
                acked.clone(),
                down_seen.clone(),
            ))
        })
        .collect();
    daemon::eventually(Duration::from_secs(20), "the load to get going", || {
        (acked.load(Ordering::SeqCst) >= KILL_AT).then_some(())
    });
    let mut gw1 = gateways[0].take().unwrap();
    gw1.child.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    gw1.child.wait().unwrap();
    let acked_at_kill = acked.load(Ordering::SeqCst);
    drop(gw1);
    let down = daemon::eventually(Duration::from_secs(10), "haproxy to take gw1 out", || {
        haproxy.down_at("gw1")
    });
    down_seen.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let load_time = started.elapsed();
    let load = Arc::try_unwrap(load).ok().unwrap().into_inner().unwrap();
    assert_eq!(load.acked.len(), MESSAGES, "every message got its 250");
    let failed_after_down = load.failed_opened.iter().filter(|t| **t > down).count();
    assert_eq!(
        failed_after_down, 0,
        "a session opened after HAProxy marked gw1 DOWN failed"
    );

    // (c) gw1 is dead: its spool, moved to "another node" (copied to a new directory), is
    // started with gw1's node_id on gw1's address, and drains.
    let moved = dir.path().join("gw1-moved-spool");
    copy_spool(&spools[0], &moved);
    let snapshot = Spool::open_read_only(&moved).unwrap();
    let left_on_gw1 = snapshot.messages.len();
    let in_doubt = snapshot.report.in_doubt;
    assert!(
        left_on_gw1 > 0,
        "gw1 had nothing queued at the kill: the drain would prove nothing"
    );
    let cfg = gateway_yaml(1, dir.path(), &moved, &addrs[0], store.addr);
    let restarted_at = Instant::now();
    let gw1 = Daemon::start(&cfg);
    // The README's step 4: `postern queue list` (through the admin socket) until empty.
    daemon::eventually(
        Duration::from_secs(30),
        "gw1's moved spool to drain",
        || {
            let out = daemon::queue(&cfg, &["list"]);
            assert!(out.status.success(), "{}", daemon::stderr(&out));
            daemon::stdout(&out)
                .contains("Mail queue is empty")
                .then_some(())
        },
    );
    assert_eq!(queued(&moved), 0);
    let drain_time = restarted_at.elapsed();
    daemon::eventually(Duration::from_secs(10), "haproxy to take gw1 back", || {
        haproxy.up_after("gw1", restarted_at).then_some(())
    });
    for spool in &spools[1..] {
        daemon::eventually(Duration::from_secs(30), "gw2 and gw3 to drain", || {
            (queued(spool) == 0).then_some(())
        });
    }

    // (d) Nothing lost; second copies only for what was in flight at the kill.
    let (copies, by) = at_store(&store);
    for id in load.acked.keys() {
        assert!(copies.get(id).copied().unwrap_or(0) >= 1, "{id} lost");
        let received = &by[&format!("received:{id}")];
        assert!(received.contains(&format!("([{CLIENT}])")), "{received}");
    }
    assert!(
        by[&"received:stranger@load.test".to_owned()].contains(&format!("([{STRANGER}])")),
        "{:?}",
        by.get("received:stranger@load.test")
    );
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    let cut = load.failed_opened.len();
    assert!(
        duplicates <= in_doubt + cut,
        "{duplicates} second copies, more than gw1's {in_doubt} in-doubt recipients and the {cut} sessions cut by the kill"
    );
    // New sessions went to the others: messages acknowledged after the DOWN were taken in by
    // gw2 and gw3, and each of the three gateways took part of the load.
    let mut per_gateway: HashMap<&str, usize> = HashMap::new();
    for (id, at) in &load.acked {
        let gw = by[id].as_str();
        *per_gateway.entry(gw).or_insert(0) += 1;
        if *at > down {
            assert_ne!(
                gw, "gw1",
                "{id} acknowledged after gw1 was DOWN came from gw1"
            );
        }
    }
    assert!(per_gateway.len() == 3, "{per_gateway:?}");
    let after_down = load.acked.values().filter(|t| **t > down).count();
    assert!(after_down >= PER_SESSION, "no session after the DOWN");
    eprintln!(
        "{MESSAGES} messages (+1) in {load_time:?}; gw1 killed after {acked_at_kill} acks, DOWN {:?} later; \
         {} sessions failed ({} before the banner) and were retried (all opened before the DOWN); {after_down} messages acked after the DOWN; \
         per gateway {per_gateway:?}; gw1 left {left_on_gw1} queued ({in_doubt} in doubt), drained in {drain_time:?} \
         from the moved spool; {duplicates} second copies at the store",
        down - killed,
        load.failed_opened.len(),
        load.failed_at_open,
    );
    // Over the whole run, no gateway logged HAProxy's address as a client's.
    for d in gateways.iter().flatten().chain([&gw1]) {
        let balancer = d.log_lines(&["\"accepted\"", "[127.0.0.1]"]);
        assert!(
            balancer.is_empty(),
            "HAProxy's address logged: {balancer:?}"
        );
        assert!(!d.log_lines(&["\"accepted\"", "[127.0.0.2]"]).is_empty() || d.addr == addrs[0]);
    }
    drop(gw1);
    drop(haproxy);
}
