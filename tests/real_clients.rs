//! Real clients against the real binary running the embedded default configuration (with its
//! addresses and paths moved into a temporary directory): Python's smtplib, swaks and
//! Postfix's smtp-source.
//!
//! When `POSTERN_REQUIRE_CLIENTS=1` (CI sets it), a missing client is a failure, not a skip.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The running binary and what it printed.
struct Daemon {
    child: Child,
    smtp: String,
    metrics: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `postern run` on the embedded default with loopback port 0 and temp paths.
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let default = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/postern.yaml"),
        )
        .unwrap();
        let config = default
            .replace("127.0.0.1:2525", "127.0.0.1:0")
            .replace("127.0.0.1:9325", "127.0.0.1:0")
            .replace(
                "./var/spool",
                &dir.path().join("spool").display().to_string(),
            )
            .replace("./var/mail", &dir.path().join("mail").display().to_string());
        assert_ne!(
            config, default,
            "the default config changed shape; update this test"
        );
        let path = dir.path().join("postern.yaml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut smtp, mut metrics) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while smtp.is_none() || metrics.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("postern did not start");
            if line.contains("\"listening\"") {
                smtp = field(&line, "address");
            }
            if line.contains("\"metrics\"") {
                metrics = field(&line, "address");
            }
        }
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Self {
            child,
            smtp: smtp.unwrap(),
            metrics: metrics.unwrap(),
            _dir: dir,
        }
    }

    fn port(&self) -> u16 {
        self.smtp.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn metric(&self, name: &str) -> f64 {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&self.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "postern did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A string field of a JSON log line (good enough for the two we read).
fn field(line: &str, name: &str) -> Option<String> {
    let key = format!("\"{name}\":\"");
    let start = line.find(&key)? + key.len();
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_owned())
}

fn require(tool: &str) -> Option<PathBuf> {
    let found = ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("POSTERN_REQUIRE_CLIENTS").as_deref() != Ok("1"),
            "{tool} is required in CI"
        );
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

#[test]
fn python_smtplib_end_to_end() {
    let Some(python) = require("python3") else {
        return;
    };
    let daemon = Daemon::start();
    let script = r#"
import smtplib, sys
from email.message import EmailMessage
port = int(sys.argv[1])
with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as s:
    s.ehlo()
    assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("smtputf8"), s.esmtp_features
    m = EmailMessage(); m["From"] = "a@example.net"; m["To"] = "x@example.org"; m["Subject"] = "one"
    m.set_content("hello\n.leading dot\n")
    assert s.send_message(m) == {}
    refused = s.sendmail("a@example.net", ["x@example.org", "y@localhost", "v@elsewhere.example"], b"Subject: two\r\n\r\nbody\r\n")
    assert list(refused) == ["v@elsewhere.example"] and refused["v@elsewhere.example"][0] == 554, refused
    m = EmailMessage(); m["From"] = "jöran@example.org"; m["To"] = "ünï@example.org"; m["Subject"] = "grüße"
    m.set_content("hällo wörld")
    assert s.send_message(m, mail_options=["SMTPUTF8"]) == {}
    try:
        s.sendmail("a@example.net", ["v@elsewhere.example"], b"x")
        raise SystemExit("relay was accepted")
    except smtplib.SMTPRecipientsRefused as e:
        assert e.recipients["v@elsewhere.example"][0] == 554
print("ok")
"#;
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(daemon.port().to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert_eq!(daemon.metric("postern_messages_accepted_total"), 3.0);
    assert!(daemon.stop().success(), "SIGTERM is a clean exit");
}

#[test]
fn swaks_end_to_end() {
    let Some(swaks) = require("swaks") else {
        return;
    };
    let daemon = Daemon::start();
    let out = Command::new(swaks)
        .args([
            "--from",
            "a@example.net",
            "--to",
            "x@example.org",
            "--pipeline",
            "--h-Subject",
            "swaks",
        ])
        .args([
            "--server",
            "127.0.0.1",
            "--port",
            &daemon.port().to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("<-  250 2.0.0 Ok: queued as "), "{text}");
    assert_eq!(daemon.metric("postern_messages_accepted_total"), 1.0);
}

#[test]
fn smtp_source_ten_thousand_messages() {
    let Some(source) = require("smtp-source") else {
        return;
    };
    let daemon = Daemon::start();
    let target = format!("127.0.0.1:{}", daemon.port());
    let out = Command::new(source)
        .args([
            "-s",
            "20",
            "-m",
            "10000",
            "-l",
            "4096",
            "-f",
            "a@example.net",
            "-t",
            "x@example.org",
            "-d",
            &target,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "smtp-source reported: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(daemon.metric("postern_messages_accepted_total"), 10_000.0);
    assert_eq!(daemon.metric("postern_messages_rejected_total"), 0.0);
}
