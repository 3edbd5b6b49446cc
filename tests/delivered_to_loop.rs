//! Loop detection at delivery (issue 13 part 4), with the real binary: a message delivered
//! to a maildir (which prepends `Delivered-To:`) and sent back to the same recipient is
//! bounced `5.4.6`, not delivered again; the same message to another recipient is delivered.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod daemon;

use std::path::Path;
use std::time::Duration;

use daemon::{Daemon, Smtp, eventually, send_one};

fn files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect()
}

/// The message without the `Received:` fields this gateway added (folded lines included).
fn without_our_received(message: &str) -> String {
    // Each field with its continuation lines, in order.
    let mut fields: Vec<String> = Vec::new();
    for line in message.split_inclusive('\n') {
        match fields.last_mut() {
            Some(f) if line.starts_with(' ') || line.starts_with('\t') => f.push_str(line),
            _ => fields.push(line.to_owned()),
        }
    }
    fields
        .into_iter()
        .filter(|f| !(f.starts_with("Received:") && f.contains("(postern node 9)")))
        .collect()
}

/// Sends `content` (a whole message, CRLF lines) from `from` to `to`.
fn resend(addr: &str, from: &str, to: &str, content: &str) {
    let mut c = Smtp::connect(addr).unwrap();
    for cmd in [
        format!("MAIL FROM:<{from}>\r\n"),
        format!("RCPT TO:<{to}>\r\n"),
    ] {
        c.send(&cmd).unwrap();
        assert!(c.reply().unwrap().starts_with("250"));
    }
    c.send("DATA\r\n").unwrap();
    assert!(c.reply().unwrap().starts_with("354"));
    let mut data = content.replace("\r\n.", "\r\n..");
    if !data.ends_with("\r\n") {
        data.push_str("\r\n");
    }
    c.send(&format!("{data}.\r\n")).unwrap();
    assert!(c.reply().unwrap().starts_with("250"));
}

#[test]
fn a_message_back_at_a_recipient_it_was_delivered_to_bounces_5_4_6() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postern.yaml");
    let mail = dir.path().join("mail");
    std::fs::write(
        &config,
        format!(
            "hostname: mx.test\nnode_id: 9\ndrain_timeout: 1s\nspool:\n  path: {}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: local\n    kind: maildir\n    root: {}\nroutes:\n  domains:\n    example.org: {{ store: local }}\ndelivery:\n  minimal_backoff: 1s\n",
            dir.path().join("spool").display(),
            mail.display()
        ),
    )
    .unwrap();
    let d = Daemon::start(&config);
    let inbox = |user: &str| mail.join(format!("example.org/{user}/Maildir/new"));
    send_one(
        &d.addr,
        "sender@example.org",
        "user@example.org",
        "round trip",
        "x",
    );
    let first = eventually(Duration::from_secs(10), "the first delivery", || {
        files(&inbox("user")).pop()
    });
    assert!(first.contains("Delivered-To: user@example.org"), "{first}");
    // Our own Received field would stop it at intake already (554 5.4.6, the node marker);
    // without it (a copy that came back some other way), the delivery check must hold alone.
    let first = without_our_received(&first);

    // Forwarded back to the same recipient: a loop, bounced to the sender.
    resend(&d.addr, "sender@example.org", "USER@example.org", &first);
    let dsn = eventually(Duration::from_secs(10), "the bounce", || {
        files(&inbox("sender")).pop()
    });
    assert!(dsn.contains("Status: 5.4.6"), "{dsn}");
    assert!(dsn.contains("loop"), "{dsn}");
    assert_eq!(
        files(&inbox("user")).len(),
        1,
        "not delivered a second time"
    );

    // To someone else it is just mail.
    resend(&d.addr, "sender@example.org", "other@example.org", &first);
    eventually(Duration::from_secs(10), "the delivery to other", || {
        files(&inbox("other")).pop()
    });
}
