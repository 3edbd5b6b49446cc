//! Poison-message quarantine with the real binary (issue 13 part 3): a message whose
//! deliveries keep ending abnormally is moved to the quarantine queue after
//! `delivery.poison_attempts` attempts, counting attempts the gateway itself did not survive
//! (killed with SIGKILL while the store held the message past its final dot) and a `pipe`
//! command killed on the message; the operator
//! sees it with `postern queue list --queue quarantine` and puts it back with `release`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod daemon;
mod fake_lmtp;

use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::{Daemon, eventually, queue, send_one, stderr, stdout};
use fake_lmtp::{FakeStore, Script};
use serde_json::Value;

fn config(dir: &Path, port: u16, poison: u32) -> PathBuf {
    let path = dir.join("postern.yaml");
    std::fs::write(
        &path,
        format!(
            "hostname: mx.test\nnode_id: 6\ndrain_timeout: 1s\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: fake\n    kind: lmtp\n    address: 127.0.0.1:{port}\nroutes:\n  domains:\n    example.org: {{ store: fake }}\ndelivery:\n  minimal_backoff: 1s\n  maximal_backoff: 2s\n  poison_attempts: {poison}\n",
            spool = dir.join("spool").display(),
        ),
    )
    .unwrap();
    path
}

/// `postern_quarantined_messages` as the daemon's /metrics shows it.
fn quarantined_gauge(d: &Daemon) -> f64 {
    let text = d.metrics();
    text.lines()
        .find_map(|l| l.strip_prefix("postern_quarantined_messages "))
        .unwrap_or_else(|| panic!("postern_quarantined_messages not exported:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn list(config: &Path, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["list", "--json"];
    a.extend_from_slice(args);
    let out = queue(config, &a);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Transactions the fake store received whole (final dot and all).
fn complete(fake: &FakeStore) -> usize {
    fake.transactions().iter().filter(|t| t.complete).count()
}

#[test]
fn attempts_the_gateway_did_not_survive_count_and_quarantine_the_message() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The store takes the message and never answers after the final dot (it "hangs" on it).
    let fake = rt.block_on(FakeStore::start(Script {
        stall_after_replies: Some(0),
        ..Script::default()
    }));
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), fake.addr.port(), 2);

    // Two attempts, each ended by killing the gateway while the store holds the message.
    let mut qid = String::new();
    for kill in 1..=2 {
        let d = Daemon::start(&config);
        if kill == 1 {
            let reply = send_one(
                &d.addr,
                "s@example.net",
                "poison@example.org",
                "poison",
                "x",
            );
            qid = reply.rsplit(' ').next().unwrap().trim().to_owned();
        }
        eventually(Duration::from_secs(20), "the final dot", || {
            (complete(&fake) >= kill).then_some(())
        });
        drop(d); // SIGKILL
    }
    let d = Daemon::start(&config);
    let line = eventually(Duration::from_secs(20), "the quarantine log line", || {
        d.log_lines(&["message quarantined", &qid]).pop()
    });
    assert!(line.contains("2 delivery attempts"), "{line}");
    let q = list(&config, &["--queue", "quarantine"]);
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0]["queue_id"], qid.as_str());
    assert_eq!(q[0]["queue_name"], "quarantine");
    let text = stdout(&queue(&config, &["list"]));
    assert!(text.contains(&format!("{qid}#")), "{text}");
    // Not tried again while quarantined, even after its retry time.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(complete(&fake), 2);
    assert!(list(&config, &["--state", "active"]).is_empty());
    assert_eq!(quarantined_gauge(&d), 1.0);

    // The operator releases it: tried again at once (its count starts from zero).
    let out = queue(&config, &["release", &qid]);
    assert!(out.status.success(), "{}", stderr(&out));
    eventually(
        Duration::from_secs(20),
        "a new attempt after release",
        || (complete(&fake) >= 3).then_some(()),
    );
    assert!(list(&config, &["--queue", "quarantine"]).is_empty());
    assert_eq!(quarantined_gauge(&d), 0.0, "set at the release");
    drop(d);
}

#[test]
fn connections_lost_after_the_dot_quarantine_without_any_crash() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The store closes the connection right after the final dot, every time.
    let fake = rt.block_on(FakeStore::start(Script {
        drop_after_replies: Some(0),
        ..Script::default()
    }));
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), fake.addr.port(), 3);
    let d = Daemon::start(&config);
    let reply = send_one(&d.addr, "s@example.net", "lost@example.org", "lost", "x");
    let qid = reply.rsplit(' ').next().unwrap().trim().to_owned();
    eventually(Duration::from_secs(30), "the quarantine", || {
        (list(&config, &["--queue", "quarantine"]).len() == 1).then_some(())
    });
    assert_eq!(
        complete(&fake),
        3,
        "exactly poison_attempts attempts reached the store"
    );
    eventually(Duration::from_secs(5), "the quarantine log line", || {
        (d.log_lines(&["message quarantined", &qid]).len() == 1).then_some(())
    });
}

#[test]
fn a_delivery_command_killed_on_the_message_quarantines_it() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("runs");
    let script = dir.path().join("crash.sh");
    // Counts its runs, then dies of SIGKILL (a filter that crashes on this message).
    std::fs::write(&script, "echo run >> \"$1\"\ncat > /dev/null\nkill -9 $$\n").unwrap();
    let path = dir.path().join("postern.yaml");
    std::fs::write(
        &path,
        format!(
            "hostname: mx.test\nnode_id: 6\ndrain_timeout: 1s\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: filter\n    kind: pipe\n    argv: [/bin/sh, {script}, {count}]\nroutes:\n  domains:\n    example.org: {{ store: filter }}\ndelivery:\n  minimal_backoff: 1s\n  maximal_backoff: 1s\n  poison_attempts: 3\n",
            spool = dir.path().join("spool").display(),
            script = script.display(),
            count = count.display(),
        ),
    )
    .unwrap();
    let d = Daemon::start(&path);
    let qid = send_one(
        &d.addr,
        "s@example.net",
        "u@example.org",
        "crashes the filter",
        "x",
    );
    eventually(Duration::from_secs(30), "the quarantine", || {
        (list(&path, &["--queue", "quarantine"]).len() == 1).then_some(())
    });
    let runs = std::fs::read_to_string(&count).unwrap().lines().count();
    assert_eq!(runs, 3, "poison_attempts runs of the command");
    let line = eventually(Duration::from_secs(5), "the quarantine log line", || {
        d.log_lines(&["message quarantined", &qid]).pop()
    });
    assert!(line.contains("3 delivery attempts"), "{line}");
}
