//! A listener behind a load balancer (`proxy_protocol`): the header's client address drives
//! the session; untrusted peers and bad headers are closed without a banner, each alone.
//! Headers are written by the `ppp` crate, as a balancer would write them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Client, TestGateway, queue_id, start_with};
use ppp::v2::{Builder, Command, Protocol, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v1(src: &str, dst: &str) -> Vec<u8> {
    ppp::v1::Addresses::from((addr(src), addr(dst)))
        .to_string()
        .into_bytes()
}

fn v2(src: &str, dst: &str) -> Vec<u8> {
    Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (addr(src), addr(dst)),
    )
    .build()
    .unwrap()
}

/// A gateway whose `smtp` listener trusts 127.0.0.1 to send headers, and relays for
/// 192.0.2.0/24 (a client only the header can name).
async fn behind_balancer(extra: &str) -> TestGateway {
    start_with(
        &format!(
            "    trusted_networks: [192.0.2.0/24]\n    max_connections_per_ip: 1\n    proxy_protocol:\n      trusted_networks: [127.0.0.0/8]\n      timeout: 300ms\n{extra}"
        ),
        "",
        "",
    )
    .await
}

/// A client that sent `header` first.
async fn through(gw: &TestGateway, header: &[u8]) -> Client {
    let mut c = Client::connect(&gw.addr("smtp")).await;
    c.send(header).await;
    c
}

/// The Received line of a stored message.
fn received(gw: &TestGateway, id: &str) -> String {
    let mut body = Vec::new();
    gw.gateway
        .spool
        .open_body(id.parse().unwrap())
        .unwrap()
        .read_to_end(&mut body)
        .unwrap();
    let body = String::from_utf8_lossy(&body).into_owned();
    body.lines().next().unwrap().to_owned()
}

#[tokio::test]
async fn the_headers_client_drives_relay_limits_and_received() {
    let gw = behind_balancer("").await;
    for header in [
        v1("192.0.2.7:40000", "198.51.100.1:25"),
        v2("192.0.2.8:40000", "198.51.100.1:25"),
    ] {
        let mut c = through(&gw, &header).await;
        assert_eq!(c.reply().await.code, 220);
        c.cmd("EHLO client.test", 250).await;
        c.cmd("MAIL FROM:<a@example.net>", 250).await;
        // Relaying is for 192.0.2.0/24, which only the header can claim to be.
        c.cmd("RCPT TO:<someone@elsewhere.example>", 250).await;
        c.cmd("DATA", 354).await;
        c.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n").await;
        let id = queue_id(&c.reply().await);
        let line = received(&gw, &id);
        assert!(
            line.contains("([192.0.2.7])") || line.contains("([192.0.2.8])"),
            "{line}"
        );
        c.cmd("QUIT", 221).await;
        assert!(c.closed().await);
    }
    // A LOCAL header (the balancer's health check) keeps the balancer's own address: no
    // relaying for it.
    let local = Builder::with_addresses(
        Version::Two | Command::Local,
        Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .unwrap();
    let mut c = through(&gw, &local).await;
    assert_eq!(c.reply().await.code, 220);
    c.cmd("EHLO check", 250).await;
    c.cmd("MAIL FROM:<a@example.net>", 250).await;
    c.cmd("RCPT TO:<someone@elsewhere.example>", 554).await;
    c.cmd("QUIT", 221).await;
    // The per-address limit (1) is the client's, not the balancer's: one client may not
    // open two sessions, two clients may.
    let mut a = through(&gw, &v1("192.0.2.9:1", "198.51.100.1:25")).await;
    assert_eq!(a.reply().await.code, 220);
    let mut b = through(&gw, &v1("192.0.2.10:1", "198.51.100.1:25")).await;
    assert_eq!(b.reply().await.code, 220);
    let mut again = through(&gw, &v1("192.0.2.9:2", "198.51.100.1:25")).await;
    assert_eq!(again.reply().await.code, 421);
    a.cmd("QUIT", 221).await;
    b.cmd("QUIT", 221).await;
}

/// Nothing at all comes back: no banner, just the close.
async fn closed_without_banner(gw: &TestGateway, bytes: &[u8], then_close: bool) {
    let mut s = TcpStream::connect(gw.addr("smtp")).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if then_close {
        s.shutdown().await.unwrap();
    }
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "not closed: {bytes:?}"
    );
    assert!(
        got.is_empty(),
        "{:?} got {:?}",
        bytes,
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test]
async fn bad_headers_close_that_connection_only() {
    let gw = behind_balancer("").await;
    let good = v2("192.0.2.7:40000", "198.51.100.1:25");
    let mut tlv_garbage = good.clone();
    tlv_garbage.extend_from_slice(&[0x04, 0x00, 0x09, 1]);
    let len = u16::from_be_bytes([tlv_garbage[14], tlv_garbage[15]]) + 4;
    tlv_garbage[14..16].copy_from_slice(&len.to_be_bytes());
    let mut family_mismatch = good.clone();
    family_mismatch[13] = 0x21; // says TCP over IPv6, carries 12 octets of IPv4
    let mut past_the_buffer = good.clone();
    past_the_buffer[14..16].copy_from_slice(&60000u16.to_be_bytes());
    let cases: [(&str, Vec<u8>, bool); 7] = [
        ("SMTP without a header", b"EHLO client\r\n".to_vec(), false),
        ("a wrong signature", b"\r\n\r\n\0\r\nQUIX\n".to_vec(), false),
        ("truncated, then closed", good[..20].to_vec(), true),
        ("a v2 length past the buffer", past_the_buffer, false),
        ("TLV garbage", tlv_garbage, false),
        ("an address family mismatch", family_mismatch, false),
        (
            "a v1 line without its end",
            [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat(),
            false,
        ),
    ];
    for (what, bytes, close) in cases {
        eprintln!("{what}");
        closed_without_banner(&gw, &bytes, close).await;
    }
    // Too slow: half a header, then nothing for longer than the timeout.
    closed_without_banner(&gw, &good[..10], false).await;
    // And the listener still serves a good one.
    let mut c = through(&gw, &good).await;
    assert_eq!(c.reply().await.code, 220);
    c.cmd("QUIT", 221).await;
}

#[tokio::test]
async fn a_second_header_inside_the_session_closes_it() {
    let gw = behind_balancer("").await;
    let mut c = through(&gw, &v1("192.0.2.7:1", "198.51.100.1:25")).await;
    assert_eq!(c.reply().await.code, 220);
    c.cmd("EHLO client.test", 250).await;
    c.send(&v1("192.0.2.99:1", "198.51.100.1:25")).await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn an_untrusted_peer_gets_no_banner() {
    let gw = start_with(
        "    proxy_protocol:\n      trusted_networks: [10.0.0.0/8]\n",
        "",
        "",
    )
    .await;
    closed_without_banner(&gw, &v1("192.0.2.7:1", "198.51.100.1:25"), false).await;
}

#[tokio::test]
async fn without_the_setting_a_proxy_line_is_an_unknown_command() {
    let gw = start_with("", "", "").await;
    let mut c = Client::connect(&gw.addr("smtp")).await;
    assert_eq!(c.reply().await.code, 220);
    c.send(&v1("192.0.2.7:1", "198.51.100.1:25")).await;
    assert_eq!(c.reply().await.code, 500);
    c.cmd("QUIT", 221).await;
}
