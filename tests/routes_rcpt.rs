//! Routing at RCPT over a real socket: alias expansion into the spooled envelope (with
//! ORCPT, the unmatched extension propagated to the targets), the replies of each refusal,
//! and the extension kept in the queued address.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod common;

use common::{Client, queue_id};
use postern::config::Config;
use postern::gateway::Gateway;

fn config(dir: &std::path::Path) -> Config {
    let text = format!(
        "hostname: mx.test\nnode_id: 12\ndrain_timeout: 5s\ndelivery:\n  enabled: false\nspool:\n  path: {}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - {{ name: local, kind: discard }}\n  - {{ name: c1, kind: discard }}\n  - {{ name: c2, kind: discard }}\nroutes:\n  clusters:\n    cyrus: [c1, c2]\n  domains:\n    example.org: {{ store: local }}\n    corp.example: {{ cluster: cyrus, authoritative: true }}\n  users:\n    alice@corp.example: cyrus\n    bob@corp.example: c2\n  aliases:\n    team@example.org: [alice@corp.example, bob@corp.example]\n    ring1@example.org: ring2@example.org\n    ring2@example.org: ring1@example.org\n",
        dir.join("spool").display()
    );
    Config::parse(&text, "rcpt.yaml").unwrap_or_else(|e| panic!("{e:?}"))
}

#[tokio::test]
async fn aliases_expand_into_the_envelope_with_orcpt_and_refusals_have_their_replies() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(config(dir.path())).await.unwrap();
    let mut c = Client::connect(gw.address("smtp").unwrap()).await;
    c.hello().await;
    c.cmd("MAIL FROM:<s@example.net>", 250).await;
    c.cmd("RCPT TO:<Team+x@example.org>", 250).await;
    c.cmd("RCPT TO:<Alice+News@corp.example>", 250).await;
    let r = c.cmd("RCPT TO:<nobody@corp.example>", 550).await;
    assert_eq!(r.text(), "5.1.1 Recipient address rejected: User unknown");
    let r = c.cmd("RCPT TO:<ring1@example.org>", 451).await;
    assert_eq!(r.text(), "4.3.0 Local error in processing, try again later");
    let r = c.cmd("RCPT TO:<x@elsewhere.example>", 554).await;
    assert_eq!(r.text(), "5.7.1 Relay access denied");
    c.cmd("DATA", 354).await;
    c.send(b"Subject: t\r\n\r\nbody\r\n.\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    let id = queue_id(&r);
    c.cmd("QUIT", 221).await;
    let env = gw.spool.read_envelope(id.parse().unwrap()).unwrap();
    let got: Vec<(String, Option<String>)> = env
        .recipients
        .iter()
        .map(|r| {
            (
                r.address.clone(),
                r.params
                    .orcpt
                    .as_ref()
                    .map(|o| format!("{};{}", o.addr_type, o.address)),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "alice+x@corp.example".to_owned(),
                Some("rfc822;Team+x@example.org".to_owned())
            ),
            (
                "bob+x@corp.example".to_owned(),
                Some("rfc822;Team+x@example.org".to_owned())
            ),
            // Not an alias: queued as sent, extension and case kept, no ORCPT added.
            ("Alice+News@corp.example".to_owned(), None),
        ]
    );
    gw.stop().await;
}
