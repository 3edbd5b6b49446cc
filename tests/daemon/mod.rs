//! A spawned `postern run` for the queue-tool and drain tests: start it on a config, wait
//! for its listener, collect its log lines, send mail over SMTP, run `postern queue …`.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]
#![allow(
    unreachable_pub,
    reason = "a test helper module: pub is for the test files"
)]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helper")]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running daemon; killed (SIGKILL) if still running when dropped.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `postern --log-format json run --config CONFIG` and waits (10 s) until it
    /// listens.
    pub fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("POSTERN_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("\"listening\"") {
                    let start = line.find("\"address\":\"").unwrap() + 11;
                    let _ =
                        tx.send(line[start..start + line[start..].find('"').unwrap()].to_owned());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("postern did not listen: {:?}", log.lock().unwrap()));
        Self { child, addr, log }
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Waits up to `limit` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The text of the daemon's `/metrics` (its address is in the `metrics` log line).
    pub fn metrics(&self) -> String {
        use std::io::Read;
        let line = self
            .log_lines(&["\"message\":\"metrics\""])
            .pop()
            .expect("the metrics address is logged");
        let start = line.find("\"address\":\"").unwrap() + 11;
        let address = &line[start..start + line[start..].find('"').unwrap()];
        let mut s = TcpStream::connect(address).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        text
    }

    /// Log lines containing every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .cloned()
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `postern queue --config CONFIG ARGS…`.
pub fn queue(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_postern"))
        .arg("queue")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A blocking SMTP client.
pub struct Smtp {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Smtp {
    /// Connects and says EHLO; `None` if the server is gone or refuses.
    pub fn connect(addr: &str) -> Option<Self> {
        let stream = TcpStream::connect(addr).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let w = stream.try_clone().ok()?;
        let mut s = Self {
            w,
            r: BufReader::new(stream),
        };
        if !s.reply()?.starts_with("220") {
            return None;
        }
        s.send("EHLO client.test\r\n")?;
        s.reply()?.starts_with("250").then_some(s)
    }

    pub fn send(&mut self, text: &str) -> Option<()> {
        self.w.write_all(text.as_bytes()).ok()
    }

    /// One (possibly multi-line) reply; `None` on EOF or error.
    pub fn reply(&mut self) -> Option<String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(all);
            }
        }
    }

    /// MAIL, RCPT, DATA, the message; the queue id from the 250, `None` otherwise.
    pub fn mail(&mut self, from: &str, to: &str, subject: &str, body: &str) -> Option<String> {
        self.send(&format!("MAIL FROM:<{from}>\r\n"))?;
        if !self.reply()?.starts_with("250") {
            return None;
        }
        self.send(&format!("RCPT TO:<{to}>\r\n"))?;
        if !self.reply()?.starts_with("250") {
            return None;
        }
        self.send("DATA\r\n")?;
        if !self.reply()?.starts_with("354") {
            return None;
        }
        self.send(&format!("Subject: {subject}\r\n\r\n{body}\r\n.\r\n"))?;
        let last = self.reply()?;
        last.strip_prefix("250 2.0.0 Ok: queued as ")
            .map(|id| id.trim().to_owned())
    }
}

/// Sends one message on a new connection; panics unless it gets a 250.
pub fn send_one(addr: &str, from: &str, to: &str, subject: &str, body: &str) -> String {
    Smtp::connect(addr)
        .and_then(|mut c| c.mail(from, to, subject, body))
        .expect("message accepted")
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`.
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Subject lines of every message in `root`'s maildirs (any domain, any user).
pub fn delivered_subjects(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = vec![root.to_owned()];
    let mut steps = 0;
    while let Some(d) = dirs.pop() {
        steps += 1;
        assert!(steps < 100_000, "maildir walk runs away");
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.parent().is_some_and(|q| q.ends_with("new")) {
                if let Ok(text) = std::fs::read_to_string(&p) {
                    if let Some(l) = text.lines().find(|l| l.starts_with("Subject: ")) {
                        out.push(l["Subject: ".len()..].to_owned());
                    }
                }
            }
        }
    }
    out
}
