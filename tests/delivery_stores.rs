//! The LMTP delivery agent against the real stores: Cyrus IMAP 3.6 (TCP with AUTH, unix
//! socket) and Dovecot 2.3 (TCP, unix socket, BDAT), each checked by reading the mailboxes
//! back over IMAP. One mixed transaction per store: a known user, an unknown user (550 5.1.1
//! at RCPT; multi-line on Cyrus) and a user over quota (Cyrus: 452 4.2.2 at RCPT once the
//! mailbox is over quota; Dovecot: 552 5.2.2 after the end of data, for that recipient only).
//!
//! Skipped with a note when the stores are not installed, unless `POSTERN_REQUIRE_STORES=1`
//! (CI), where a missing store fails the test. Install: `sudo bash tests/stores/install.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common_stores;
mod delivery_common;

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use common_stores::{Instance, Kind};
use delivery_common::by_index;
use postern::config::{ByteSize, Span};
use postern::delivery::config::{NormalizeRule, StoreAddress, StoreAuthConfig, TreatAs};
use postern::delivery::pool::PoolOptions;
use postern::delivery::{
    LmtpStoreConfig, OutboundEnvelope, Outcome, Recipient, RemoteStore, Report, Scope, StorePool,
};
use postern::proto::address::{ForwardPath, Mailbox, ReversePath};
use postern::proto::params::RcptParams;

const KNOWN_UNKNOWN_QUOTA_KNOWN: [&str; 4] = ["alice", "nosuchuser", "quota", "bob"];

fn tcp(instance: &Instance) -> LmtpStoreConfig {
    let address = StoreAddress::Tcp {
        host: "127.0.0.1".into(),
        port: instance.lmtp_port(),
    };
    bounded(LmtpStoreConfig::new("real", address))
}

fn unix(instance: &Instance) -> LmtpStoreConfig {
    bounded(LmtpStoreConfig::new(
        "real",
        StoreAddress::Unix(instance.lmtp_socket()),
    ))
}

fn bounded(mut c: LmtpStoreConfig) -> LmtpStoreConfig {
    let limit = Span(Duration::from_secs(30));
    c.timeouts.connect = limit;
    c.timeouts.lhlo = limit;
    c.timeouts.mail_rcpt = limit;
    c.timeouts.data = limit;
    c.timeouts.end_of_data = limit;
    c
}

fn store(c: &LmtpStoreConfig) -> Arc<RemoteStore> {
    Arc::new(RemoteStore::from_config(c, "gw.test").unwrap())
}

/// Recipients `local@example.org`, indexed from 0.
fn rcpts(locals: &[&str]) -> Vec<Recipient> {
    locals
        .iter()
        .enumerate()
        .map(|(index, l)| Recipient {
            index,
            path: ForwardPath::Mailbox(Mailbox::parse(&format!("{l}@example.org")).unwrap()),
            params: RcptParams::default(),
        })
        .collect()
}

/// The part of the message after the headers, checked byte for byte in the mailbox: lines
/// starting with dots (dot-stuffing undone by the store) and 8-bit text.
fn body_part(pad_lines: usize) -> Vec<u8> {
    let mut body = "Hello.\r\n.leading dot\r\n..two dots\r\n.\r\nd\u{e9}j\u{e0} vu\r\n"
        .as_bytes()
        .to_vec();
    for i in 0..pad_lines {
        body.extend_from_slice(
            format!("padding line {i:05} .........................\r\n").as_bytes(),
        );
    }
    body
}

fn message(subject: &str, pad_lines: usize) -> Vec<u8> {
    let mut m = format!(
        "From: sender@example.org\r\nTo: rcpt@example.org\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@postern.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    .into_bytes();
    m.extend_from_slice(&body_part(pad_lines));
    m
}

fn envelope(message: &[u8]) -> OutboundEnvelope {
    let from = ReversePath::Mailbox(Mailbox::parse("sender@example.org").unwrap());
    let mut e = OutboundEnvelope::new(from, message.len() as u64);
    e.eight_bit = true;
    e
}

/// Delivers one message over a fresh connection; returns the report and the callback order.
async fn deliver(c: &LmtpStoreConfig, to: &[Recipient], message: &[u8]) -> (Report, Vec<usize>) {
    let mut conn = store(c).connect().await.unwrap();
    let mut order = Vec::new();
    let report = conn
        .deliver(&envelope(message), to, message, &mut |i, _: &Outcome| {
            order.push(i)
        })
        .await;
    conn.quit().await;
    (report, order)
}

/// `user`'s INBOX holds exactly one message with this subject, ending in `body`.
fn assert_delivered(instance: &Instance, user: &str, subject: &str, body: &[u8]) {
    let mut imap = instance.inbox(user);
    let hits = imap.search_header("Subject", subject);
    assert_eq!(hits.len(), 1, "{user}: messages with subject {subject}");
    let stored = imap.fetch(hits[0]);
    assert!(
        stored.ends_with(body),
        "{user}: stored body differs:\n{}",
        String::from_utf8_lossy(&stored)
    );
}

fn inbox_count(instance: &Instance, user: &str) -> u32 {
    instance.inbox(user).exists
}

fn password_file(instance: &Instance) -> std::path::PathBuf {
    let path = instance.dir().join("postern-lmtp.pass");
    std::fs::write(&path, format!("{}\n", instance.env["ADMIN_PASSWORD"])).unwrap();
    path
}

#[tokio::test]
async fn cyrus_tcp_with_auth_mixed_transaction() {
    let users = [("alice", None), ("bob", None), ("quota", Some(1))];
    let Some(cyrus) = Instance::start(Kind::Cyrus, &[("CYRUS_LMTP_TCP_AUTH", "1")], &users) else {
        return;
    };
    assert_eq!(cyrus.env["LMTP_TCP_AUTH"], "1");

    // Without AUTH, Cyrus refuses MAIL on TCP (`430 Authentication required`): the store's
    // trouble, nothing attempted.
    let plain = tcp(&cyrus);
    let m = message("cyrus-noauth", 0);
    let (report, _) = deliver(&plain, &rcpts(&["alice"]), &m).await;
    assert_eq!(by_index(&report, 1), ["not-attempted 430"]);
    assert_eq!(report.scope(), Scope::Store);

    let mut c = tcp(&cyrus);
    c.auth = Some(StoreAuthConfig {
        username: cyrus.env["ADMIN_USER"].clone(),
        password_file: password_file(&cyrus),
    });
    // Cyrus checks quota at RCPT and only once the mailbox is already over it: fill it.
    let filler = message("cyrus-filler", 60);
    let (report, _) = deliver(&c, &rcpts(&["quota"]), &filler).await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.1.5"]);

    let m = message("cyrus-tcp-mixed", 10);
    let (report, order) = deliver(&c, &rcpts(&KNOWN_UNKNOWN_QUOTA_KNOWN), &m).await;
    assert_eq!(
        by_index(&report, 4),
        [
            "delivered 250 2.1.5",
            "bounced 550 5.1.1",
            "deferred 452 4.2.2",
            "delivered 250 2.1.5",
        ]
    );
    assert_eq!(
        order,
        [1, 2, 0, 3],
        "RCPT refusals first, then per recipient"
    );
    assert_eq!(report.scope(), Scope::Recipient);
    let unknown = report.outcome(1).unwrap().reply().unwrap();
    assert_eq!(
        unknown.lines().len(),
        3,
        "Cyrus's multi-line 550: {unknown:?}"
    );

    assert_delivered(&cyrus, "alice", "cyrus-tcp-mixed", &body_part(10));
    assert_delivered(&cyrus, "bob", "cyrus-tcp-mixed", &body_part(10));
    assert_eq!(inbox_count(&cyrus, "quota"), 1, "only the filler");
}

#[tokio::test]
async fn cyrus_unix_socket_pooled() {
    let Some(cyrus) = Instance::start(Kind::Cyrus, &[], &[("alice", None)]) else {
        return;
    };
    let options = PoolOptions {
        rset_skip: Duration::ZERO,
    };
    let pool = StorePool::with_options(store(&unix(&cyrus)), options);
    for i in 0..3 {
        let m = message(&format!("cyrus-unix-{i}"), i * 5);
        let report = pool
            .deliver(
                &envelope(&m),
                &rcpts(&["alice"]),
                &m[..],
                &mut |_, _: &Outcome| {},
            )
            .await;
        assert_eq!(by_index(&report, 1), ["delivered 250 2.1.5"], "message {i}");
    }
    assert_eq!(pool.status().size, 1, "one connection, reused with RSET");
    assert_eq!(pool.sweep().await, 0);
    assert_eq!(inbox_count(&cyrus, "alice"), 3);
    assert_delivered(&cyrus, "alice", "cyrus-unix-2", &body_part(10));
}

#[tokio::test]
async fn dovecot_tcp_data_mixed_transaction() {
    let users = [("alice", None), ("bob", None), ("quota", Some(1))];
    let Some(dovecot) = Instance::start(Kind::Dovecot, &[], &users) else {
        return;
    };
    let mut c = tcp(&dovecot);
    c.chunking = false;
    let m = message("dovecot-tcp-mixed", 60);
    let (report, order) = deliver(&c, &rcpts(&KNOWN_UNKNOWN_QUOTA_KNOWN), &m).await;
    assert_eq!(
        by_index(&report, 4),
        [
            "delivered 250 2.0.0",
            "bounced 550 5.1.1",
            "bounced 552 5.2.2",
            "delivered 250 2.0.0",
        ]
    );
    assert_eq!(
        order,
        [1, 0, 2, 3],
        "the quota failure arrives after the dot, in order"
    );
    assert_delivered(&dovecot, "alice", "dovecot-tcp-mixed", &body_part(60));
    assert_delivered(&dovecot, "bob", "dovecot-tcp-mixed", &body_part(60));
    assert_eq!(inbox_count(&dovecot, "quota"), 0);

    // With the store's normalisation table, over quota is temporary for a while.
    c.normalize = vec![NormalizeRule {
        code: Some(552),
        enhanced: Some("5.2.2".into()),
        treat_as: TreatAs::Temporary,
        max_age: Some(Span(Duration::from_secs(86_400))),
        until: None,
    }];
    let m = message("dovecot-tcp-normalised", 60);
    let (report, _) = deliver(&c, &rcpts(&["quota", "alice"]), &m).await;
    assert_eq!(
        by_index(&report, 2),
        ["deferred 552 5.2.2", "delivered 250 2.0.0"]
    );
}

#[tokio::test]
async fn dovecot_unix_socket() {
    let Some(dovecot) = Instance::start(Kind::Dovecot, &[], &[("alice", None)]) else {
        return;
    };
    let mut c = unix(&dovecot);
    c.chunking = false;
    let m = message("dovecot-unix", 3);
    let (report, _) = deliver(&c, &rcpts(&["alice", "nosuchuser"]), &m).await;
    assert_eq!(
        by_index(&report, 2),
        ["delivered 250 2.0.0", "bounced 550 5.1.1"]
    );
    assert_delivered(&dovecot, "alice", "dovecot-unix", &body_part(3));
}

#[tokio::test]
async fn dovecot_bdat_chunks_mixed_transaction() {
    let users = [("alice", None), ("bob", None), ("quota", Some(1))];
    let Some(dovecot) = Instance::start(Kind::Dovecot, &[], &users) else {
        return;
    };
    let mut c = tcp(&dovecot);
    c.chunk_size = ByteSize(4096);
    let s = store(&c);
    let mut conn = s.connect().await.unwrap();
    assert!(conn.capabilities().chunking, "Dovecot offers CHUNKING");
    // About 30 KB: eight chunks, the last one short.
    let m = message("dovecot-bdat-big", 600);
    let to = rcpts(&KNOWN_UNKNOWN_QUOTA_KNOWN);
    let report = conn
        .deliver(&envelope(&m), &to, &m[..], &mut |_, _: &Outcome| {})
        .await;
    assert_eq!(
        by_index(&report, 4),
        [
            "delivered 250 2.0.0",
            "bounced 550 5.1.1",
            "bounced 552 5.2.2",
            "delivered 250 2.0.0",
        ]
    );
    assert!(conn.is_usable());
    // The same connection takes the next message (one chunk, BDAT n LAST only).
    let small = message("dovecot-bdat-small", 0);
    let report = conn
        .deliver(
            &envelope(&small),
            &rcpts(&["bob"]),
            &small[..],
            &mut |_, _: &Outcome| {},
        )
        .await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
    conn.quit().await;
    assert_delivered(&dovecot, "alice", "dovecot-bdat-big", &body_part(600));
    assert_delivered(&dovecot, "bob", "dovecot-bdat-big", &body_part(600));
    assert_delivered(&dovecot, "bob", "dovecot-bdat-small", &body_part(0));
    assert_eq!(inbox_count(&dovecot, "quota"), 0);
}

/// Issue 13 part 5 against the real stores. Both offer 8BITMIME (so the quoted-printable
/// path cannot be driven against them; `tests/delivery_downgrade.rs` proves it with the fake
/// store), and 8-bit mail goes unchanged. A store without SMTPUTF8 takes a message that only
/// declared it (ASCII addresses and headers) instead of bouncing it 5.6.7.
#[tokio::test]
async fn real_stores_8bitmime_and_a_declared_smtputf8() {
    for kind in [Kind::Cyrus, Kind::Dovecot] {
        let Some(instance) = Instance::start(kind, &[], &[("alice", None)]) else {
            return;
        };
        let mut c = unix(&instance);
        c.chunking = false;
        let mut conn = store(&c).connect().await.unwrap();
        let caps = conn.capabilities().clone();
        let _ = writeln!(
            std::io::stderr(),
            "{kind:?}: 8BITMIME={} SMTPUTF8={}",
            caps.eight_bit_mime,
            caps.smtputf8
        );
        assert!(caps.eight_bit_mime, "{kind:?} offers 8BITMIME");
        let subject = format!("{kind:?}-declared-utf8").to_lowercase();
        let m = message(&subject, 2);
        let mut env = envelope(&m);
        env.params.smtputf8 = true;
        let report = conn
            .deliver(&env, &rcpts(&["alice"]), &m[..], &mut |_, _: &Outcome| {})
            .await;
        conn.quit().await;
        let line = by_index(&report, 1);
        assert!(line[0].starts_with("delivered 250"), "{kind:?}: {line:?}");
        assert_delivered(&instance, "alice", &subject, &body_part(2));
    }
}
