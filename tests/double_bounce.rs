//! Undeliverable mail from `<>` (issue 13 part 4), with the real binary: it is not dropped
//! but goes once to the `double_bounce` address; if that fails too, it is kept in the hold
//! queue and logged. Never a bounce loop.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod daemon;

use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::{Daemon, delivered_subjects, eventually, queue, send_one, stdout};
use serde_json::Value;

/// `dead.test` refuses every recipient permanently; `example.org` is a maildir.
fn config(dir: &Path, double_bounce: &str) -> PathBuf {
    let path = dir.join("postern.yaml");
    std::fs::write(
        &path,
        format!(
            "hostname: mx.test\nnode_id: 8\ndrain_timeout: 1s\ndouble_bounce: {double_bounce}\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: local\n    kind: maildir\n    root: {mail}\n  - name: dead\n    kind: error\n    reply: \"550 5.1.1 no such user here\"\nroutes:\n  domains:\n    example.org: {{ store: local }}\n    dead.test: {{ store: dead }}\ndelivery:\n  minimal_backoff: 1s\n  maximal_backoff: 1s\n",
            spool = dir.join("spool").display(),
            mail = dir.join("mail").display(),
        ),
    )
    .unwrap();
    path
}

fn list(config: &Path, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["list", "--json"];
    a.extend_from_slice(args);
    stdout(&queue(config, &a))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn an_undeliverable_bounce_goes_to_the_double_bounce_address_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "admin@example.org");
    let d = Daemon::start(&config);
    send_one(
        &d.addr,
        "",
        "someone@dead.test",
        "a bounce nobody takes",
        "x",
    );
    let got = eventually(Duration::from_secs(20), "the double bounce", || {
        delivered_subjects(&dir.path().join("mail")).pop()
    });
    assert_eq!(got, "a bounce nobody takes");
    let admin = dir.path().join("mail/example.org/admin/Maildir/new");
    assert_eq!(
        std::fs::read_dir(&admin).unwrap().count(),
        1,
        "one copy, to admin"
    );
    eventually(Duration::from_secs(10), "an empty queue", || {
        list(&config, &[]).is_empty().then_some(())
    });
    assert_eq!(d.log_lines(&["double-bounce address"]).len(), 1);
}

#[test]
fn a_double_bounce_that_fails_too_is_kept_on_hold() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "postmaster@dead.test");
    let d = Daemon::start(&config);
    send_one(
        &d.addr,
        "",
        "someone@dead.test",
        "a bounce nobody takes",
        "x",
    );
    let held = eventually(Duration::from_secs(20), "the held double bounce", || {
        let v = list(&config, &["--state", "hold"]);
        (v.len() == 1).then_some(v)
    });
    assert_eq!(held[0]["recipients"][0]["address"], "postmaster@dead.test");
    // The log line follows the (durable) hold, and the daemon's stderr is read by a thread:
    // wait for it rather than racing it.
    eventually(Duration::from_secs(5), "the hold log line", || {
        let n = d
            .log_lines(&["double bounce undeliverable; kept in the hold queue"])
            .len();
        (n >= 1).then_some(())
    });
    // Nothing else: the original is gone, no further copy, nothing delivered.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(list(&config, &[]).len(), 1);
    assert!(delivered_subjects(&dir.path().join("mail")).is_empty());
    assert_eq!(
        d.log_lines(&["double bounce undeliverable; kept in the hold queue"])
            .len(),
        1,
        "logged once"
    );
}

#[test]
fn our_own_bounce_to_a_sender_we_cannot_route_goes_to_the_double_bounce_address() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "admin@example.org");
    let d = Daemon::start(&config);
    // The sender's domain is routed nowhere (no relay): the bounce for dead.test cannot be
    // routed, and is not held back by routes.unroutable_grace (it is from <>).
    send_one(
        &d.addr,
        "someone@nowhere.test",
        "x@dead.test",
        "original",
        "x",
    );
    let got = eventually(Duration::from_secs(20), "the double bounce", || {
        delivered_subjects(&dir.path().join("mail")).pop()
    });
    assert!(got.contains("Undelivered"), "the DSN itself: {got}");
    let admin = dir.path().join("mail/example.org/admin/Maildir/new");
    let dsn = std::fs::read_dir(&admin)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(dsn).unwrap();
    assert!(
        text.contains("Final-Recipient: rfc822; x@dead.test"),
        "{text}"
    );
    eventually(Duration::from_secs(10), "an empty queue", || {
        list(&config, &[]).is_empty().then_some(())
    });
}
