//! STARTTLS over real sockets with a test certificate (rcgen), rustls on both ends.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod common;

use std::io::Read;
use std::sync::Arc;

use common::{Client, TestGateway, start_with};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A gateway whose `smtp` listener has a certificate for `mx.test`; returns the CA-less
/// trust anchor (the self-signed certificate itself).
async fn tls_gateway(
    required: bool,
) -> (
    TestGateway,
    rustls::pki_types::CertificateDer<'static>,
    tempfile::TempDir,
) {
    let certified = rcgen::generate_simple_self_signed(vec!["mx.test".to_owned()]).unwrap();
    let pem_dir = tempfile::tempdir().unwrap();
    let cert = pem_dir.path().join("cert.pem");
    let key = pem_dir.path().join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let extra = format!(
        "    tls: {{ cert: {}, key: {}, required: {required} }}\n",
        cert.display(),
        key.display()
    );
    let gw = start_with(&extra, "", "").await;
    (gw, certified.cert.der().clone(), pem_dir)
}

fn connector(anchor: rustls::pki_types::CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(anchor).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> (u16, Vec<String>) {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).await.unwrap() > 0,
            "closed after {lines:?}"
        );
        let code = line[..3].parse().unwrap();
        lines.push(line[4..].trim_end().to_owned());
        if line.as_bytes()[3] == b' ' {
            return (code, lines);
        }
    }
}

#[tokio::test]
async fn starttls_then_a_transaction_with_tls_in_received() {
    let (gw, anchor, _pem) = tls_gateway(true).await;
    let mut c = gw.connect("smtp").await;
    let ehlo = c.hello().await;
    assert!(ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
    let r = c.cmd("MAIL FROM:<a@example.net>", 530).await;
    assert!(r.text().starts_with("5.7.0"), "TLS required: {r:?}");
    // Plaintext pipelined after STARTTLS must be discarded (CVE-2011-0411 class).
    c.send(b"STARTTLS\r\nRSET\r\n").await;
    assert_eq!(c.reply().await.code, 220);
    let stream = c.reader.into_inner();
    let tls = connector(anchor)
        .connect(ServerName::try_from("mx.test").unwrap(), stream)
        .await
        .unwrap();
    let mut tls = BufReader::new(tls);
    tls.get_mut()
        .write_all(b"EHLO client.test\r\n")
        .await
        .unwrap();
    let (code, lines) = read_reply(&mut tls).await;
    assert_eq!(
        code, 250,
        "the first reply after the handshake answers EHLO, not the injected RSET"
    );
    assert!(
        !lines.iter().any(|l| l == "STARTTLS"),
        "not offered twice: {lines:?}"
    );
    tls.get_mut()
        .write_all(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
        .await
        .unwrap();
    for want in [250, 250, 354] {
        assert_eq!(read_reply(&mut tls).await.0, want);
    }
    tls.get_mut()
        .write_all(b"Subject: secret\r\n\r\nover TLS\r\n.\r\n")
        .await
        .unwrap();
    let (code, lines) = read_reply(&mut tls).await;
    assert_eq!(code, 250);
    let id = lines[0].rsplit(' ').next().unwrap().to_owned();
    let mut body = String::new();
    gw.gateway
        .spool
        .open_body(id.parse().unwrap())
        .unwrap()
        .read_to_string(&mut body)
        .unwrap();
    assert!(body.contains("with ESMTPS id"), "{body}");
    assert!(body.contains("(using version=TLSv1.3"), "{body}");
    gw.gateway.stop().await;
}

#[tokio::test]
async fn starttls_optional_leaves_plaintext_working() {
    let (gw, _anchor, _pem) = tls_gateway(false).await;
    let mut c: Client = gw.connect("smtp").await;
    c.hello().await;
    c.send_mail(
        "a@example.net",
        &["x@example.org"],
        "Subject: plain\r\n\r\nx",
    )
    .await;
    gw.gateway.stop().await;
}

#[tokio::test]
async fn failed_handshake_closes_only_that_connection() {
    let (gw, _anchor, _pem) = tls_gateway(false).await;
    let mut c = gw.connect("smtp").await;
    c.hello().await;
    c.cmd("STARTTLS", 220).await;
    c.send(b"this is not a TLS ClientHello\r\n").await;
    assert!(c.closed().await);
    let mut d = gw.connect("smtp").await;
    d.hello().await;
    gw.gateway.stop().await;
}
