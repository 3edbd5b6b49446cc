//! Live reload of the routing map under SMTP load, over real sockets on 127.0.0.1: no
//! connection dropped, every message delivered exactly once to a store of a map that was in
//! force, a malformed map leaves the old one running (its error names file:line:key), and
//! a changed file is picked up without a signal.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Client;
use postern::config::Config;
use postern::gateway::Gateway;

/// Where `example.org` goes in a map version; `None` writes a malformed map.
fn config_text(dir: &Path, store: Option<&str>) -> String {
    let route = match store {
        Some(s) => format!("{{ store: {s} }}"),
        None => "{ store: nowhere }".to_owned(),
    };
    format!(
        "hostname: mx.test\nnode_id: 11\ndrain_timeout: 5s\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: a\n    kind: maildir\n    root: {a}\n  - name: b\n    kind: maildir\n    root: {b}\nroutes:\n  domains:\n    example.org: {route}\n    pinned.example: {{ store: a, authoritative: true }}\n  users:\n    known@pinned.example: a\ndelivery:\n  minimal_backoff: 1s\n  maximal_backoff: 2s\n",
        spool = dir.join("spool").display(),
        a = dir.join("a").display(),
        b = dir.join("b").display(),
    )
}

/// Replaces the file in one rename, so a reload never reads half of it.
fn write_config(dir: &Path, store: Option<&str>) -> PathBuf {
    let path = dir.join("postern.yaml");
    let tmp = dir.join("postern.yaml.tmp");
    std::fs::write(&tmp, config_text(dir, store)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Every delivered message under a maildir root: the tokens in their bodies.
fn delivered(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.parent().is_some_and(|q| q.ends_with("new")) {
                let text = std::fs::read_to_string(&p).unwrap();
                if let Some(t) = text.lines().find_map(|l| l.strip_prefix("Subject: ")) {
                    out.push(t.to_owned());
                }
            }
        }
    }
    out
}

async fn start(dir: &Path, store: &str) -> Gateway {
    let path = write_config(dir, Some(store));
    let config = Config::load(&path).unwrap();
    Gateway::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_smtp_load_drops_nothing_and_misroutes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(dir.path(), "a").await;
    let addr = gw.address("smtp").unwrap().to_owned();
    let stop = tokio_util::sync::CancellationToken::new();
    // Four clients, one connection each, sending until told to stop.
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let addr = addr.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = Client::connect(&addr).await;
                client.hello().await;
                let mut sent = Vec::new();
                for n in 0..10_000 {
                    if stop.is_cancelled() {
                        break;
                    }
                    let token = format!("c{c}-m{n}");
                    client
                        .send_mail(
                            "sender@example.net",
                            &[&format!("{token}+ext@example.org")],
                            &format!("Subject: {token}\r\n\r\nbody"),
                        )
                        .await;
                    // An authoritative domain's known user is accepted under every map.
                    client.cmd("MAIL FROM:<s@example.net>", 250).await;
                    client.cmd("RCPT TO:<known@pinned.example>", 250).await;
                    client.cmd("RCPT TO:<unknown@pinned.example>", 550).await;
                    client.cmd("RSET", 250).await;
                    sent.push(token);
                }
                client.cmd("QUIT", 221).await;
                sent
            })
        })
        .collect();

    let routes = gw.routes();
    let mut generation = routes.generation();
    assert_eq!(generation, 1);
    for round in 0..12 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        if round % 4 == 3 {
            // A malformed map: refused with file:line:key, the running map stays.
            let path = write_config(dir.path(), None);
            let err = gw.reload().await.unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "{}:22:5: routes.domains[example.org].store: no store named `nowhere`",
                    path.display()
                )),
                "{err}"
            );
            assert_eq!(
                routes.generation(),
                generation,
                "a failed reload swaps nothing"
            );
            continue;
        }
        write_config(dir.path(), Some(if round % 2 == 0 { "b" } else { "a" }));
        let g = gw.reload().await.unwrap();
        assert!(
            g > generation,
            "generation moves on: {g} after {generation}"
        );
        generation = g;
    }
    // The last map sends example.org to b; mail from now on must land there.
    write_config(dir.path(), Some("b"));
    gw.reload().await.unwrap();
    stop.cancel();
    let mut sent = Vec::new();
    for c in clients {
        sent.extend(
            c.await
                .expect("no client saw a dropped connection or a wrong reply"),
        );
    }
    assert!(sent.len() >= 8, "the load ran: {} messages", sent.len());
    let mut after = Client::connect(&addr).await;
    after.hello().await;
    let last: Vec<String> = (0..5).map(|n| format!("final-{n}")).collect();
    for t in &last {
        after
            .send_mail(
                "s@example.net",
                &[&format!("{t}@example.org")],
                &format!("Subject: {t}\r\n\r\nbody"),
            )
            .await;
    }
    after.cmd("QUIT", 221).await;

    // Every message delivered exactly once, into a or b.
    let want = sent.len() + last.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (in_a, in_b) = loop {
        let a: Vec<String> = delivered(&dir.path().join("a"))
            .into_iter()
            .filter(|s| s.starts_with('c') || s.starts_with("final"))
            .collect();
        let b = delivered(&dir.path().join("b"));
        if a.len() + b.len() >= want || tokio::time::Instant::now() > deadline {
            break (a, b);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "sent {} under load + {} after; delivered {} to a, {} to b",
        sent.len(),
        last.len(),
        in_a.len(),
        in_b.len()
    );
    let mut all: Vec<&String> = in_a.iter().chain(&in_b).collect();
    all.sort();
    let before_dedup = all.len();
    all.dedup();
    assert_eq!(before_dedup, all.len(), "a message was delivered twice");
    let mut expected: Vec<&String> = sent.iter().chain(&last).collect();
    expected.sort();
    assert_eq!(
        all, expected,
        "every accepted message delivered, nothing else"
    );
    for t in &last {
        assert!(
            in_b.contains(t),
            "{t} was sent and delivered under the final map (b)"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_changed_file_is_picked_up_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(dir.path(), "a").await;
    let routes = gw.routes();
    let router = routes.router();
    let to = postern::proto::ForwardPath::parse("<x@example.org>").unwrap();
    assert_eq!(router.load().resolve(&to, false).store(), Some("a"));
    // mtimes have a coarse granularity on some file systems: make sure this one differs.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write_config(dir.path(), Some("b"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while routes.generation() == 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(routes.generation(), 2, "the poller reloaded within 10 s");
    assert_eq!(router.load().resolve(&to, false).store(), Some("b"));
    // A malformed change is refused and counted once; the map in force stays.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write_config(dir.path(), None);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(routes.generation(), 2);
    assert_eq!(router.load().resolve(&to, false).store(), Some("b"));
    gw.stop().await;
}

#[tokio::test]
async fn an_unloadable_users_file_at_start_answers_451_until_a_reload_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.txt");
    let text = config_text(dir.path(), Some("a")).replace(
        "  users:\n",
        &format!("  users_file: {}\n  users:\n", users.display()),
    );
    let path = dir.path().join("postern.yaml");
    std::fs::write(&path, &text).unwrap();
    let gw = Gateway::start(Config::load(&path).unwrap()).await.unwrap();
    let mut c = Client::connect(gw.address("smtp").unwrap()).await;
    c.hello().await;
    c.cmd("MAIL FROM:<s@example.net>", 250).await;
    let r = c.cmd("RCPT TO:<x@example.org>", 451).await;
    assert!(r.text().starts_with("4.3.0"), "{r:?}");
    std::fs::write(&users, "zed@pinned.example b\n").unwrap();
    assert_eq!(gw.reload().await.unwrap(), 2);
    // Same connection: nothing was dropped, and the new map answers.
    c.cmd("RCPT TO:<x@example.org>", 250).await;
    c.cmd("RCPT TO:<zed@pinned.example>", 250).await;
    c.cmd("QUIT", 221).await;
    gw.stop().await;
}

#[tokio::test]
async fn queued_mail_is_rerouted_by_a_reload_at_its_next_attempt() {
    let dir = tempfile::tempdir().unwrap();
    // `paused` defers everything: mail routed there waits in the queue.
    let text = |store: &str| {
        config_text(dir.path(), Some(store)).replace(
            "stores:\n",
            "stores:\n  - { name: paused, kind: error, reply: \"451 4.3.2 Paused\" }\n",
        )
    };
    let path = dir.path().join("postern.yaml");
    std::fs::write(&path, text("paused")).unwrap();
    let gw = Gateway::start(Config::load(&path).unwrap()).await.unwrap();
    let mut c = Client::connect(gw.address("smtp").unwrap()).await;
    c.hello().await;
    c.send_mail(
        "s@example.net",
        &["waiting@example.org"],
        "Subject: rerouted\r\n\r\nbody",
    )
    .await;
    c.cmd("QUIT", 221).await;
    // Deferred, not delivered anywhere.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(delivered(&dir.path().join("b")).is_empty());
    assert_eq!(gw.spool.len(), 1, "still queued");
    std::fs::write(&path, text("b")).unwrap();
    gw.reload().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while delivered(&dir.path().join("b")).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        delivered(&dir.path().join("b")),
        ["rerouted"],
        "the retry used the new map"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_changed_route_fragment_is_picked_up_and_a_broken_one_keeps_the_map() {
    let dir = tempfile::tempdir().unwrap();
    let fragment = dir.path().join("frag.yaml");
    // Replaced in one rename, like the configuration file.
    let write_fragment = |text: &str| {
        let tmp = dir.path().join("frag.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &fragment).unwrap();
    };
    write_fragment("users:\n  moved@pinned.example: a\n");
    let text = config_text(dir.path(), Some("a")).replace(
        "  domains:\n",
        &format!("  include: [{}]\n  domains:\n", fragment.display()),
    );
    let path = dir.path().join("postern.yaml");
    std::fs::write(&path, &text).unwrap();
    let gw = Gateway::start(Config::load(&path).unwrap()).await.unwrap();
    let routes = gw.routes();
    let router = routes.router();
    let to = postern::proto::ForwardPath::parse("<moved@pinned.example>").unwrap();
    assert_eq!(router.load().resolve(&to, false).store(), Some("a"));
    // Only the fragment changes: the poller sees it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write_fragment("users:\n  moved@pinned.example: b\n");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while routes.generation() == 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(routes.generation(), 2, "the poller reloaded within 10 s");
    assert_eq!(router.load().resolve(&to, false).store(), Some("b"));
    // A broken fragment: refused, with its file and line; the map in force stays.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write_fragment("users:\n  moved@pinned.example: a\n  other@pinned.example: nowhere\n");
    let err = gw.reload().await.unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "{}:3:3: users[other@pinned.example]: no store or cluster named `nowhere`",
            fragment.display()
        )),
        "{err}"
    );
    // Nor does the poller retry the same broken file.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(routes.generation(), 2);
    assert_eq!(router.load().resolve(&to, false).store(), Some("b"));
    // Fixed: picked up again.
    write_fragment("users:\n  moved@pinned.example: a\n");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while routes.generation() == 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        routes.generation(),
        3,
        "the fixed fragment reloaded within 10 s"
    );
    assert_eq!(router.load().resolve(&to, false).store(), Some("a"));
    gw.stop().await;
}

#[tokio::test]
async fn a_reload_changes_the_retry_settings_live() {
    let dir = tempfile::tempdir().unwrap();
    // `paused` defers everything, retried every 1-2 s until the reload.
    let text = |backoff: &str| {
        config_text(dir.path(), Some("paused"))
            .replace(
                "stores:\n",
                "stores:\n  - { name: paused, kind: error, reply: \"451 4.3.2 Paused\" }\n",
            )
            .replace("  minimal_backoff: 1s\n  maximal_backoff: 2s\n", backoff)
    };
    let path = dir.path().join("postern.yaml");
    std::fs::write(
        &path,
        text("  minimal_backoff: 1s\n  maximal_backoff: 2s\n"),
    )
    .unwrap();
    let gw = Gateway::start(Config::load(&path).unwrap()).await.unwrap();
    let scheduler = gw.scheduler.clone().unwrap();
    let mut c = Client::connect(gw.address("smtp").unwrap()).await;
    c.hello().await;
    c.send_mail(
        "s@example.net",
        &["w@example.org"],
        "Subject: w\r\n\r\nbody",
    )
    .await;
    c.cmd("QUIT", 221).await;
    let qid = gw.spool.snapshot()[0].qid;
    let mut first = None;
    for _ in 0..100 {
        first = scheduler.next_attempt(qid).await;
        if first.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = first.expect("deferred");
    assert!(first <= std::time::SystemTime::now() + Duration::from_secs(3));

    // A new backoff, and a key that needs a restart (logged, not applied).
    std::fs::write(
        &path,
        text("  minimal_backoff: 1h\n  maximal_backoff: 2h\n  shards: 3\n"),
    )
    .unwrap();
    assert_eq!(gw.reload().await.unwrap(), 2);
    assert_eq!(
        scheduler.delivery().policy.minimal_backoff,
        Duration::from_secs(3600)
    );
    // The retry already scheduled (within 2 s) happens; the deferral after it uses 1 h.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let next = loop {
        // (The timer may be re-set from the ledger, which keeps microseconds.)
        if let Some(t) = scheduler.next_attempt(qid).await
            && t > first + Duration::from_millis(100)
        {
            break t;
        }
        assert!(tokio::time::Instant::now() < deadline, "never retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        next > std::time::SystemTime::now() + Duration::from_secs(2800),
        "the next retry uses the new minimal backoff: {next:?}"
    );
    gw.stop().await;
}
