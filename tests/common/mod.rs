//! Shared test harness: a gateway on 127.0.0.1:0 with a temporary spool, and a line-level
//! SMTP client over a real socket.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different part of the harness"
)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::time::Duration;

use postern::config::Config;
use postern::gateway::Gateway;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A gateway and the temporary directory it lives in.
pub struct TestGateway {
    pub gateway: Gateway,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    pub fn addr(&self, listener: &str) -> String {
        self.gateway.address(listener).unwrap().to_owned()
    }

    pub async fn connect(&self, listener: &str) -> Client {
        Client::connect(&self.addr(listener)).await
    }

    /// The text of the gateway's `/metrics`. The recorder is global to the test process:
    /// a test that counts must use labels (a store name) no other test in its binary uses.
    pub async fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.gateway.metrics_address)
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        text
    }
}

/// The value of `series` (a metric name with its labels, as exported:
/// `postern_store_backpressure{store="a"}`) in a `/metrics` text; `None` if not exported.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// The YAML of a test gateway: listener `smtp` (and any extra YAML appended to the
/// listeners list), spool in `dir`, example.org local. Delivery is off: these tests look
/// at what was queued.
pub fn yaml(
    dir: &std::path::Path,
    listener_extra: &str,
    extra_listeners: &str,
    top_extra: &str,
) -> String {
    format!(
        "hostname: mx.test\nnode_id: 7\ndrain_timeout: 5s\ndelivery:\n  enabled: false\n{top_extra}\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\n{listener_extra}{extra_listeners}stores:\n  - name: local\n    kind: maildir\n    root: {mail}\n  - name: relay\n    kind: discard\nroutes:\n  domains:\n    example.org: {{ store: local }}\n    corp.example: {{ store: local, authoritative: true }}\n  users:\n    alice@corp.example: local\n  relay: relay\n",
        spool = dir.join("spool").display(),
        mail = dir.join("mail").display(),
    )
}

pub async fn start_with(
    listener_extra: &str,
    extra_listeners: &str,
    top_extra: &str,
) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let text = yaml(dir.path(), listener_extra, extra_listeners, top_extra);
    let config = Config::parse(&text, "test.yaml").unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    let gateway = Gateway::start(config).await.unwrap();
    TestGateway { gateway, dir }
}

pub async fn start() -> TestGateway {
    start_with("", "", "").await
}

/// A reply: code and text lines.
#[derive(Debug)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// A plain-text client over a real socket.
pub struct Client {
    pub reader: BufReader<TcpStream>,
}

impl Client {
    pub async fn connect(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        Self {
            reader: BufReader::new(stream),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).await.unwrap();
    }

    pub async fn line(&mut self, line: &str) {
        self.send(format!("{line}\r\n").as_bytes()).await;
    }

    /// Reads one reply; panics after 10 s.
    pub async fn reply(&mut self) -> Reply {
        tokio::time::timeout(Duration::from_secs(10), self.reply_inner())
            .await
            .expect("reply within 10 s")
    }

    async fn reply_inner(&mut self) -> Reply {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.unwrap();
            assert!(n > 0, "connection closed; got so far: {lines:?}");
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            let code: u16 = line[..3].parse().unwrap();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line[4.min(line.len())..].to_owned());
            if last {
                return Reply { code, lines };
            }
        }
    }

    /// Sends a command and checks the reply code; returns the reply.
    pub async fn cmd(&mut self, line: &str, code: u16) -> Reply {
        self.line(line).await;
        let r = self.reply().await;
        assert_eq!(r.code, code, "{line} → {r:?}");
        r
    }

    /// Greeting + EHLO.
    pub async fn hello(&mut self) -> Reply {
        assert_eq!(self.reply().await.code, 220);
        self.cmd("EHLO client.test", 250).await
    }

    /// A whole transaction; returns the queue id from the 250.
    pub async fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> String {
        self.cmd(&format!("MAIL FROM:<{from}>"), 250).await;
        for rcpt in to {
            self.cmd(&format!("RCPT TO:<{rcpt}>"), 250).await;
        }
        self.cmd("DATA", 354).await;
        self.send(body.as_bytes()).await;
        self.send(b"\r\n.\r\n").await;
        let r = self.reply().await;
        assert_eq!(r.code, 250, "{r:?}");
        queue_id(&r)
    }

    /// True when the server closed the connection (EOF or reset) within 10 s; octets still
    /// in flight before the close (a TLS alert, say) are skipped.
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 512];
        let eof = async {
            loop {
                match self.reader.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), eof)
            .await
            .is_ok()
    }
}

/// The id from `250 2.0.0 Ok: queued as ID`.
pub fn queue_id(r: &Reply) -> String {
    r.text().rsplit(' ').next().unwrap().to_owned()
}
