//! The SMTP relay (`kind: smtp`): the LMTP agent speaking SMTP, against the scripted fake
//! (`fake_lmtp` in SMTP mode) and against Postfix's real `smtp-sink`.
//!
//! The `smtp-sink` tests skip with a note when Postfix is not installed, unless
//! `POSTERN_REQUIRE_CLIENTS=1` (CI sets it), which makes them fail instead. Every sink is
//! bounded: `-M`/`-n` end it after the messages or sessions a test needs, and it is killed
//! when the test ends.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;
mod delivery_common;
mod fake_lmtp;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use delivery_common::{by_index, envelope, rcpt};
use fake_lmtp::{FakeStore, Rcpt, Script};
use postern::delivery::config::{StoreAddress, StoreAuthConfig, StoreTlsConfig, TlsMode};
use postern::delivery::{
    OutboundEnvelope, Outcome, Recipient, RemoteStore, Report, Scope, SmtpStoreConfig, StorePool,
};
use postern::proto::client::Protocol;

const BODY: &[u8] = b"Subject: relay\r\nFrom: a@example.org\r\n\r\nHello.\r\n.dot line\r\n";

fn config(port: u16) -> SmtpStoreConfig {
    delivery_common::store_config("relay", port)
}

fn relay(c: &SmtpStoreConfig) -> Arc<RemoteStore> {
    Arc::new(RemoteStore::from_smtp_config(c, "gw.test").unwrap())
}

fn rcpts(addresses: &[&str]) -> Vec<Recipient> {
    addresses
        .iter()
        .enumerate()
        .map(|(index, a)| rcpt(index, a))
        .collect()
}

async fn deliver_once(
    c: &SmtpStoreConfig,
    env: &OutboundEnvelope,
    to: &[Recipient],
    body: &[u8],
) -> (Report, Vec<usize>) {
    delivery_common::deliver_once(&relay(c), env, to, body).await
}

#[tokio::test]
async fn one_reply_after_the_dot_settles_every_accepted_recipient() {
    let script = Script::smtp().rcpt("gone", Rcpt::new("550 5.1.1 No such user", ""));
    let fake = FakeStore::start(script).await;
    let to = rcpts(&["a@example.net", "gone@example.net", "b@example.com"]);
    let (report, order) = deliver_once(&config(fake.addr.port()), &envelope(BODY), &to, BODY).await;
    assert_eq!(
        by_index(&report, 3),
        [
            "delivered 250 2.0.0",
            "bounced 550 5.1.1",
            "delivered 250 2.0.0"
        ]
    );
    assert_eq!(
        order,
        [1, 0, 2],
        "the RCPT refusal first, then the message's reply"
    );
    let queued = report.outcome(0).unwrap().reply().unwrap().text();
    assert_eq!(queued, "Ok: queued as FAKE1");
    assert_eq!(report.scope(), Scope::Recipient);
    let s = &fake.sessions()[0];
    assert_eq!(s.commands[0], "EHLO gw.test");
    assert_eq!(s.count("LHLO"), 0);
    let t = &s.transactions[0];
    assert!(t.pipelined, "MAIL, RCPT and DATA in one flush");
    assert_eq!(t.content, BODY);
    assert!(
        t.wire.windows(11).any(|w| w == b"\r\n..dot lin"),
        "dot-stuffed"
    );
}

#[tokio::test]
async fn the_message_reply_defers_or_bounces_them_all() {
    for (reply, want) in [
        (
            "452 4.3.1 Insufficient system storage",
            "deferred 452 4.3.1",
        ),
        ("554 5.7.1 Message rejected as spam", "bounced 554 5.7.1"),
    ] {
        let fake = FakeStore::start(Script {
            data_reply: reply.into(),
            ..Script::smtp()
        })
        .await;
        let to = rcpts(&["a@example.net", "b@example.net"]);
        let (report, _) = deliver_once(&config(fake.addr.port()), &envelope(BODY), &to, BODY).await;
        assert_eq!(by_index(&report, 2), [want, want]);
    }
}

#[tokio::test]
async fn lost_after_the_dot_leaves_every_accepted_recipient_in_doubt() {
    let script = Script {
        drop_after_replies: Some(0),
        ..Script::smtp()
    }
    .rcpt("gone", Rcpt::new("550 5.1.1 No such user", ""));
    let fake = FakeStore::start(script).await;
    let to = rcpts(&["a@example.net", "gone@example.net", "b@example.net"]);
    let (report, _) = deliver_once(&config(fake.addr.port()), &envelope(BODY), &to, BODY).await;
    assert_eq!(
        by_index(&report, 3),
        ["in-doubt", "bounced 550 5.1.1", "in-doubt"]
    );
    assert_eq!(report.scope(), Scope::Connection);
}

#[tokio::test]
async fn helo_when_ehlo_is_refused_and_nothing_is_assumed() {
    let fake = FakeStore::start(Script {
        ehlo_refused: true,
        pipelining: false,
        chunking: true,
        ..Script::smtp()
    })
    .await;
    let c = config(fake.addr.port());
    let mut conn = relay(&c).connect().await.unwrap();
    assert!(!conn.capabilities().pipelining && !conn.capabilities().chunking);
    let to = rcpts(&["a@example.net"]);
    let report = conn
        .deliver(&envelope(BODY), &to, BODY, &mut |_, _: &Outcome| {})
        .await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
    // No 8BITMIME after HELO: an 8-bit MIME part goes as quoted-printable (RFC 6152 §3).
    let eight = "Subject: accents\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\u{e9}t\u{e9}\r\n";
    let eight = eight.as_bytes();
    let mut env = envelope(eight);
    env.eight_bit = true;
    let report = conn
        .deliver(&env, &to, eight, &mut |_, _: &Outcome| {})
        .await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
    let s = &fake.sessions()[0];
    assert_eq!(&s.commands[..2], ["EHLO gw.test", "HELO gw.test"]);
    assert_eq!(
        s.transactions[1].mail, "MAIL FROM:<sender@example.org>",
        "no ESMTP parameters after HELO"
    );
    assert_eq!(
        s.transactions[1].content,
        b"Subject: accents\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9t=C3=A9\r\n"
    );
    assert_eq!(s.count("DATA"), 2);
    assert_eq!(s.count("BDAT"), 0);
    assert_eq!(s.transactions.len(), 2);
}

#[tokio::test]
async fn bdat_when_the_relay_offers_chunking() {
    let fake = FakeStore::start(Script {
        chunking: true,
        ..Script::smtp()
    })
    .await;
    let mut c = config(fake.addr.port());
    c.chunk_size = postern::config::ByteSize(16);
    let to = rcpts(&["a@example.net", "b@example.net"]);
    let (report, _) = deliver_once(&c, &envelope(BODY), &to, BODY).await;
    assert_eq!(
        by_index(&report, 2),
        ["delivered 250 2.0.0", "delivered 250 2.0.0"]
    );
    let t = &fake.transactions()[0];
    assert_eq!(t.bdat_sizes, [16, 16, 16, 10]);
    assert_eq!(t.content, BODY, "BDAT carries the content unstuffed");
}

#[tokio::test]
async fn lmtp_greeting_to_an_smtp_relay_is_refused_and_the_reverse() {
    // An LMTP store configured as an SMTP relay: EHLO is refused, then HELO too.
    let lmtp = FakeStore::start(Script::default()).await;
    let err = relay(&config(lmtp.addr.port()))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(err.scope, Scope::Store);
    assert_eq!(
        lmtp.sessions()[0].commands,
        ["EHLO gw.test", "HELO gw.test"]
    );
    let store = RemoteStore::from_config(&config(lmtp.addr.port()), "gw.test").unwrap();
    assert_eq!(store.protocol(), Protocol::Lmtp);
    assert_eq!(relay(&config(1)).protocol(), Protocol::Smtp);
}

fn tls_material(dir: &Path) -> (Arc<rustls::ServerConfig>, PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    (Arc::new(config), ca)
}

#[tokio::test]
async fn starttls_then_auth_then_ehlo_again() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = tls_material(dir.path());
    let fake = FakeStore::start(Script {
        tls: Some(server),
        auth_plain: Some("AHJlbGF5AHMzY3JldA==".into()), // \0relay\0s3cret
        ..Script::smtp()
    })
    .await;
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let mut c = config(fake.addr.port());
    c.tls = Some(StoreTlsConfig {
        mode: TlsMode::Required,
        ca_file: Some(ca),
        insecure_skip_verify: false,
        server_name: Some("localhost".into()),
    });
    c.auth = Some(StoreAuthConfig {
        username: "relay".into(),
        password_file: pw,
    });
    let (report, _) = deliver_once(&c, &envelope(BODY), &rcpts(&["a@example.net"]), BODY).await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
    let s = &fake.sessions()[0];
    assert!(s.tls && s.authenticated);
    assert_eq!(s.count("EHLO"), 2, "EHLO again over TLS");
}

#[tokio::test]
async fn pooled_relay_splits_and_reuses() {
    let fake = FakeStore::start(Script::smtp()).await;
    let mut c = config(fake.addr.port());
    c.recipients_per_transaction = 2;
    let pool = StorePool::new(relay(&c));
    let to = rcpts(&[
        "a@example.net",
        "b@example.net",
        "c@example.net",
        "d@example.net",
        "e@example.net",
    ]);
    let mut seen = 0;
    let report = pool
        .deliver(&envelope(BODY), &to, BODY, &mut |_, _: &Outcome| seen += 1)
        .await;
    assert_eq!(seen, 5);
    assert!(
        by_index(&report, 5)
            .iter()
            .all(|o| o == "delivered 250 2.0.0")
    );
    let sessions = fake.sessions();
    assert_eq!(sessions.len(), 1, "one connection");
    let sizes: Vec<usize> = sessions[0]
        .transactions
        .iter()
        .map(|t| t.rcpts.len())
        .collect();
    assert_eq!(sizes, [2, 2, 1]);
}

#[test]
fn smtp_config_checks() {
    let c = config(25);
    assert!(c.validate_smtp().is_ok());
    let mut unix = c.clone();
    unix.address = StoreAddress::Unix("/run/relay".into());
    assert!(unix.validate().is_ok(), "fine for LMTP");
    assert!(unix.validate_smtp().unwrap_err().contains("host:port"));
    let auth = StoreAuthConfig {
        username: "u".into(),
        password_file: "/etc/pw".into(),
    };
    let mut remote = c.clone();
    remote.address = StoreAddress::parse("[relay.example.net]:587").unwrap();
    remote.auth = Some(auth.clone());
    assert!(
        remote
            .validate_smtp()
            .unwrap_err()
            .starts_with("auth: needs tls")
    );
    remote.tls = Some(StoreTlsConfig {
        mode: TlsMode::Opportunistic,
        ca_file: None,
        insecure_skip_verify: false,
        server_name: None,
    });
    assert!(
        remote.validate_smtp().is_err(),
        "opportunistic TLS can be stripped"
    );
    remote.tls.as_mut().unwrap().mode = TlsMode::Required;
    assert!(remote.validate_smtp().is_ok());
    let mut local = c;
    local.auth = Some(auth);
    assert!(local.validate_smtp().is_ok(), "loopback needs no TLS");
    assert!(matches!(
        RemoteStore::from_smtp_config(&unix, "gw.test"),
        Err(postern::delivery::lmtp::StoreError::Invalid { .. })
    ));
}

// Postfix's smtp-sink.

const SINK: &str = "/usr/sbin/smtp-sink";

/// smtp-sink, or `None` (with a note) when Postfix is not installed.
fn sink_binary() -> Option<&'static str> {
    if Path::new(SINK).exists() {
        return Some(SINK);
    }
    let note = "smtp-sink is not installed (Debian package postfix)";
    assert!(
        std::env::var("POSTERN_REQUIRE_CLIENTS").as_deref() != Ok("1"),
        "POSTERN_REQUIRE_CLIENTS=1: {note}"
    );
    // Straight to the stderr handle: libtest captures eprintln! of passing tests.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {note}");
    None
}

/// A running smtp-sink, killed on drop.
struct Sink {
    child: Child,
    port: u16,
    dumps: tempfile::TempDir,
}

impl Sink {
    /// `smtp-sink -c -u nobody -d DIR/ [options] 127.0.0.1:PORT 100`, ready to accept.
    fn start(binary: &str, options: &[&str]) -> Self {
        let dumps = tempfile::tempdir().unwrap();
        // -u nobody: the sink drops privileges (needed as root) and writes its dumps as nobody.
        std::fs::set_permissions(
            dumps.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let template = format!("{}/", dumps.path().display());
        for _ in 0..5 {
            let port = {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                probe.local_addr().unwrap().port()
            };
            let mut child = Command::new(binary)
                .args(["-c", "-u", "nobody", "-d", &template])
                .args(options)
                .arg(format!("127.0.0.1:{port}"))
                .arg("100")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { child, port, dumps };
                }
                if child.try_wait().unwrap().is_some() {
                    break; // the port was taken meanwhile: try another
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("smtp-sink did not start");
    }

    /// The messages it dumped: (envelope records, content).
    fn dumps(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dumps.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned())
            .collect()
    }

    /// Stops it and returns its last counter line (`sess=… quit=… mesg=…`).
    fn finish(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut text = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut out, &mut text);
        }
        text.split(['\r', '\n'])
            .rfind(|l| l.contains("mesg="))
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn relays_to_postfix_smtp_sink() {
    let Some(bin) = sink_binary() else { return };
    let sink = Sink::start(bin, &[]);
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "secret\n").unwrap();
    let mut c = config(sink.port);
    // smtp-sink offers AUTH PLAIN and accepts any credentials; on loopback no TLS is needed.
    c.auth = Some(StoreAuthConfig {
        username: "relay".into(),
        password_file: pw,
    });
    c.recipients_per_transaction = 2;
    let pool = StorePool::new(relay(&c));
    let to = rcpts(&["a@example.net", "b@example.com", "c@example.org"]);
    for _ in 0..2 {
        let mut order = Vec::new();
        let report = pool
            .deliver(&envelope(BODY), &to, BODY, &mut |i, _: &Outcome| {
                order.push(i)
            })
            .await;
        assert_eq!(order, [0, 1, 2]);
        assert!(
            by_index(&report, 3)
                .iter()
                .all(|o| o == "delivered 250 2.0.0"),
            "{report:?}"
        );
        assert_eq!(report.scope(), Scope::Recipient);
    }
    assert_eq!(pool.status().size, 1, "one connection, reused");
    // Every transaction dumped: 2 messages × 2 transactions (2 + 1 recipients).
    let deadline = Instant::now() + Duration::from_secs(5);
    while sink.dumps().len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dumps = sink.dumps();
    assert_eq!(dumps.len(), 4);
    let rcpts_of = |d: &String| d.lines().filter(|l| l.starts_with("X-Rcpt-Args:")).count();
    let mut counts: Vec<usize> = dumps.iter().map(rcpts_of).collect();
    counts.sort_unstable();
    assert_eq!(counts, [1, 1, 2, 2]);
    for d in &dumps {
        assert!(d.contains("X-Client-Proto: ESMTP"), "{d}");
        assert!(d.contains("X-Helo-Args: gw.test"), "{d}");
        assert!(d.contains("X-Mail-Args: <sender@example.org>\n"), "{d}");
        // smtp-sink stores lines with LF, and unstuffed.
        assert!(
            d.ends_with("Subject: relay\nFrom: a@example.org\n\nHello.\n.dot line\n\n"),
            "{d}"
        );
    }
    pool.close();
    let counters = sink.finish();
    assert!(counters.contains("mesg=4"), "{counters}");
}

#[tokio::test]
async fn smtp_sink_refusals_and_disconnects() {
    let Some(bin) = sink_binary() else { return };
    let to = rcpts(&["a@example.net", "b@example.net"]);

    // RCPT refused (-f implies no PIPELINING): every recipient bounces, nothing is sent.
    let sink = Sink::start(bin, &["-f", "RCPT"]);
    let (report, _) = deliver_once(&config(sink.port), &envelope(BODY), &to, BODY).await;
    assert_eq!(
        by_index(&report, 2),
        ["bounced 500 5.3.0", "bounced 500 5.3.0"]
    );
    assert!(sink.dumps().is_empty());

    // MAIL refused temporarily: the message is deferred.
    let sink = Sink::start(bin, &["-r", "MAIL"]);
    let (report, _) = deliver_once(&config(sink.port), &envelope(BODY), &to, BODY).await;
    assert_eq!(
        by_index(&report, 2),
        ["deferred 450 4.3.0", "deferred 450 4.3.0"]
    );
    assert_eq!(report.scope(), Scope::Message);

    // Disconnect after the dot: both in doubt.
    let sink = Sink::start(bin, &["-q", "."]);
    let (report, _) = deliver_once(&config(sink.port), &envelope(BODY), &to, BODY).await;
    assert_eq!(by_index(&report, 2), ["in-doubt", "in-doubt"]);
    assert_eq!(report.scope(), Scope::Connection);

    // The final dot refused with 421: not delivered, retry later.
    let sink = Sink::start(bin, &["-Q", "."]);
    let (report, _) = deliver_once(&config(sink.port), &envelope(BODY), &to, BODY).await;
    let got = by_index(&report, 2);
    assert!(got.iter().all(|o| o.starts_with("deferred 421")), "{got:?}");

    // No ESMTP at all (-e): EHLO refused with 500, HELO, then plain DATA.
    let sink = Sink::start(bin, &["-e"]);
    let (report, _) = deliver_once(&config(sink.port), &envelope(BODY), &to, BODY).await;
    assert_eq!(
        by_index(&report, 2),
        ["delivered 250 2.0.0", "delivered 250 2.0.0"],
        "{report:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while sink.dumps().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sink.dumps()[0].contains("X-Client-Proto: SMTP"));
}

/// Through the whole gateway: a trusted client's mail to another domain is spooled, routed to
/// the `kind: smtp` store named by `routes.relay` and relayed; an untrusted client gets 554.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_relays_trusted_mail_through_the_smtp_store() {
    let fake = FakeStore::start(Script::smtp()).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "hostname: mx.test\nnode_id: 3\ndrain_timeout: 5s\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: trusted\n    address: 127.0.0.1:0\n    protocol: smtp\n    trusted_networks: [127.0.0.0/8]\n  - name: public\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - {{ name: local, kind: discard }}\n  - name: smarthost\n    kind: smtp\n    address: 127.0.0.1:{port}\nroutes:\n  domains:\n    example.org: {{ store: local }}\n  relay: smarthost\ndelivery:\n  minimal_backoff: 1s\n  maximal_backoff: 2s\n",
        spool = dir.path().join("spool").display(),
        port = fake.addr.port(),
    );
    let config =
        postern::config::Config::parse(&yaml, "relay.yaml").unwrap_or_else(|e| panic!("{e:?}"));
    let gateway = postern::gateway::Gateway::start(config).await.unwrap();

    let public = gateway.address("public").unwrap().to_owned();
    let mut c = common::Client::connect(&public).await;
    c.hello().await;
    c.cmd("MAIL FROM:<a@example.org>", 250).await;
    let r = c.cmd("RCPT TO:<bob@remote.test>", 554).await;
    assert!(r.text().contains("5.7.1"), "{}", r.text());
    c.cmd("QUIT", 221).await;

    let trusted = gateway.address("trusted").unwrap().to_owned();
    let mut c = common::Client::connect(&trusted).await;
    c.hello().await;
    c.send_mail(
        "a@example.org",
        &["bob@remote.test", "carol@other.test"],
        "Subject: out\r\n\r\nto the world\r\n",
    )
    .await;
    c.cmd("QUIT", 221).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    while !(fake.transactions().iter().any(|t| t.complete) && gateway.spool.is_empty()) {
        assert!(
            Instant::now() < deadline,
            "not relayed: {:?}",
            fake.sessions()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let txns: Vec<_> = fake
        .transactions()
        .into_iter()
        .filter(|t| t.complete)
        .collect();
    assert_eq!(txns.len(), 1, "one SMTP transaction for both recipients");
    assert!(txns[0].mail.contains("a@example.org"), "{}", txns[0].mail);
    let mut rcpts = txns[0].rcpts.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["bob@remote.test", "carol@other.test"]);
    assert!(String::from_utf8_lossy(&txns[0].content).contains("to the world"));
    assert!(
        fake.sessions()[0].commands[0].starts_with("EHLO mx.test"),
        "{:?}",
        fake.sessions()[0].commands
    );
    gateway.stop().await;
}
