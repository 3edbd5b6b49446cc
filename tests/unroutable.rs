//! A reload that removes a domain with queued mail (issue 13 part 4), with the real binary:
//! the reload's log line counts the queued recipients that lost their route, they are
//! deferred `4.3.0 No route` (not bounced) while `routes.unroutable_grace` runs, then
//! bounced with a DSN to the sender as before.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod daemon;

use std::path::Path;
use std::time::Duration;

use daemon::{Daemon, delivered_subjects, eventually, queue, send_one, stdout};

/// `gone.test` goes to a store that always answers 451 (so its mail stays queued);
/// `with_gone: false` is the reloaded map without that domain.
fn config(dir: &Path, with_gone: bool, grace: &str) -> String {
    let gone = if with_gone {
        "    gone.test: { store: tempfail }\n"
    } else {
        ""
    };
    format!(
        "hostname: mx.test\nnode_id: 7\ndrain_timeout: 1s\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: local\n    kind: maildir\n    root: {mail}\n  - name: tempfail\n    kind: error\n    reply: \"451 4.3.2 closed for the test\"\nroutes:\n  unroutable_grace: {grace}\n  domains:\n    example.org: {{ store: local }}\n{gone}delivery:\n  minimal_backoff: 1s\n  maximal_backoff: 1s\n",
        spool = dir.join("spool").display(),
        mail = dir.join("mail").display(),
    )
}

#[test]
fn a_reload_removing_a_domain_defers_its_queued_mail_then_bounces_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postern.yaml");
    std::fs::write(&path, config(dir.path(), true, "4s")).unwrap();
    let d = Daemon::start(&path);
    send_one(
        &d.addr,
        "sender@example.org",
        "user@gone.test",
        "stuck",
        "x",
    );
    eventually(Duration::from_secs(10), "deferred by the store", || {
        stdout(&queue(&path, &["list"]))
            .contains("4.3.2")
            .then_some(())
    });

    std::fs::write(&path, config(dir.path(), false, "4s")).unwrap();
    d.signal(rustix::process::Signal::HUP);
    let line = eventually(Duration::from_secs(10), "the reload's warning", || {
        d.log_lines(&["lost their route"]).pop()
    });
    assert!(line.contains("\"lost_route\":1"), "{line}");
    let reloaded = d.log_lines(&["routing map reloaded"]);
    assert!(
        reloaded.iter().any(|l| l.contains("\"lost_route\":1")),
        "{reloaded:?}"
    );

    // Deferred with a "no route" reply, and no bounce while the grace runs.
    eventually(Duration::from_secs(10), "deferred 4.3.0 No route", || {
        stdout(&queue(&path, &["list"]))
            .contains("4.3.0 No route")
            .then_some(())
    });
    assert!(delivered_subjects(&dir.path().join("mail")).is_empty());

    // After the grace: bounced, the DSN delivered to the sender, the queue empty.
    let dsn = eventually(Duration::from_secs(20), "the bounce", || {
        delivered_subjects(&dir.path().join("mail")).pop()
    });
    assert!(
        dsn.contains("Undelivered") || dsn.contains("failure"),
        "{dsn}"
    );
    eventually(Duration::from_secs(10), "an empty queue", || {
        stdout(&queue(&path, &["list"]))
            .contains("empty")
            .then_some(())
    });
}
