//! Real mailbox stores for integration tests: a private Cyrus IMAP 3.6 or Dovecot 2.3
//! instance in a short temporary directory, started by `tests/stores/{cyrus,dovecot}.sh`,
//! stopped when the [`Instance`] is dropped, and a minimal blocking IMAP client to read the
//! mailboxes back.
//!
//! The stores are installed by `tests/stores/install.sh` (as root; `.ci/install-stores.sh`
//! in CI). When they are missing, [`Instance::start`] prints a note and returns `None` so the
//! test passes vacuously, unless `POSTERN_REQUIRE_STORES=1` (CI sets it), where it panics.

#![allow(dead_code, reason = "each test uses a different part of the harness")]
#![allow(
    unreachable_pub,
    reason = "a test helper module: pub is for the test files"
)]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helper")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Which store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cyrus,
    Dovecot,
}

impl Kind {
    fn script(self) -> PathBuf {
        let name = match self {
            Self::Cyrus => "cyrus.sh",
            Self::Dovecot => "dovecot.sh",
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/stores")
            .join(name)
    }

    /// The binaries the scripts need (paths from install.sh).
    fn missing(self) -> Vec<&'static str> {
        let needed: &[&str] = match self {
            Self::Cyrus => &[
                "/usr/lib/cyrus/bin/master",
                "/usr/lib/cyrus/bin/lmtpd",
                "/usr/sbin/saslpasswd2",
                "/usr/bin/python3",
            ],
            Self::Dovecot => &[
                "/usr/sbin/dovecot",
                "/usr/lib/dovecot/lmtp",
                "/usr/lib/dovecot/imap",
                "/usr/bin/python3",
            ],
        };
        let mut missing: Vec<&str> = needed
            .iter()
            .copied()
            .filter(|p| !Path::new(p).exists())
            .collect();
        let imapd = [
            "/usr/lib/cyrus/bin/imapd",
            "/usr/local/lib/cyrus-imapd/imapd",
        ];
        if self == Self::Cyrus && !imapd.iter().any(|p| Path::new(p).exists()) {
            missing.push("/usr/local/lib/cyrus-imapd/imapd");
        }
        missing
    }
}

/// A running store instance; stopped on drop.
pub struct Instance {
    pub kind: Kind,
    dir: tempfile::TempDir,
    /// `backend.env`: LMTP_PORT, LMTP_SOCKET, IMAP_PORT, ADMIN_USER, ADMIN_PASSWORD…
    pub env: HashMap<String, String>,
}

impl Instance {
    /// Starts an instance with the given environment knobs (`CYRUS_LMTP_TCP_AUTH=1`…). For
    /// Dovecot, `users` are created before the start (instant); for Cyrus after it.
    pub fn start(
        kind: Kind,
        knobs: &[(&str, &str)],
        users: &[(&str, Option<u32>)],
    ) -> Option<Self> {
        let missing = kind.missing();
        if !missing.is_empty() {
            let note = format!(
                "{kind:?} is not installed (missing {}); run `sudo bash tests/stores/install.sh`",
                missing.join(", ")
            );
            if std::env::var("POSTERN_REQUIRE_STORES").as_deref() == Ok("1") {
                panic!("POSTERN_REQUIRE_STORES=1: {note}");
            }
            // Straight to the stderr handle: libtest captures eprintln! of passing tests.
            let _ = writeln!(std::io::stderr(), "SKIPPED: {note}");
            return None;
        }
        // Short: unix socket paths are limited to 107 bytes, and Dovecot's DIR to 69.
        let dir = tempfile::Builder::new()
            .prefix("pst-")
            .tempdir_in("/tmp")
            .unwrap();
        let mut instance = Self {
            kind,
            dir,
            env: HashMap::new(),
        };
        if kind == Kind::Dovecot {
            for (user, quota) in users {
                instance.mkuser(user, *quota);
            }
        }
        let mut start = instance.command("start", &[]);
        for (k, v) in knobs {
            start.env(k, v);
        }
        instance.run(&mut start);
        let env = std::fs::read_to_string(instance.dir.path().join("backend.env")).unwrap();
        instance.env = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        if kind == Kind::Cyrus {
            for (user, quota) in users {
                instance.mkuser(user, *quota);
            }
        }
        Some(instance)
    }

    fn command(&self, action: &str, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(self.kind.script())
            .arg(action)
            .arg(self.dir.path())
            .args(args);
        c
    }

    /// A user whose IMAP password is its name, with a STORAGE quota in KiB.
    pub fn mkuser(&self, user: &str, quota_kb: Option<u32>) {
        let quota = quota_kb.map(|q| q.to_string());
        let mut args = vec![user, user];
        if let Some(q) = &quota {
            args.push(q);
        }
        self.run(&mut self.command("mkuser", &args));
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn lmtp_port(&self) -> u16 {
        self.env["LMTP_PORT"].parse().unwrap()
    }

    pub fn lmtp_socket(&self) -> PathBuf {
        PathBuf::from(&self.env["LMTP_SOCKET"])
    }

    pub fn imap_port(&self) -> u16 {
        self.env["IMAP_PORT"].parse().unwrap()
    }

    /// Logs in to IMAP as `user` (password = user name) and selects INBOX.
    pub fn inbox(&self, user: &str) -> Imap {
        let mut imap = Imap::login(self.imap_port(), user, user);
        imap.select("INBOX");
        imap
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let log = self.dir.path().join("stop.log");
        if let Ok(out) = std::fs::File::create(&log) {
            let err = out
                .try_clone()
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null());
            let _ = self.command("stop", &[]).stdout(out).stderr(err).status();
        }
    }
}

impl Instance {
    /// Runs a script command. Its output goes to a file, not a pipe: the daemons it starts
    /// inherit the descriptors, and a pipe would never reach end of file.
    fn run(&self, c: &mut Command) {
        let log = self.dir.path().join("script.log");
        let out = std::fs::File::create(&log).unwrap();
        let status = c
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .status()
            .unwrap();
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "{c:?} failed:\n{output}");
    }
}

/// Just enough IMAP (RFC 9051) to read a mailbox back: LOGIN, SELECT, SEARCH, FETCH.
pub struct Imap {
    io: BufReader<TcpStream>,
    tag: u32,
    /// `* N EXISTS` of the last SELECT.
    pub exists: u32,
}

impl Imap {
    pub fn login(port: u16, user: &str, password: &str) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut imap = Self {
            io: BufReader::new(stream),
            tag: 0,
            exists: 0,
        };
        let greeting = imap.line();
        assert!(greeting.starts_with(b"* OK"), "{greeting:?}");
        imap.command(&format!("LOGIN {user} {password}"));
        imap
    }

    pub fn select(&mut self, mailbox: &str) {
        let lines = self.command(&format!("SELECT {mailbox}"));
        for l in lines {
            let l = String::from_utf8_lossy(&l).trim_end().to_owned();
            if let Some(n) = l.strip_prefix("* ").and_then(|r| r.strip_suffix(" EXISTS")) {
                self.exists = n.parse().unwrap();
            }
        }
    }

    /// Sequence numbers of the messages whose header `name` contains `value`.
    pub fn search_header(&mut self, name: &str, value: &str) -> Vec<u32> {
        let lines = self.command(&format!("SEARCH HEADER {name} \"{value}\""));
        lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).trim_end().to_owned())
            .filter_map(|l| l.strip_prefix("* SEARCH").map(str::to_owned))
            .flat_map(|rest| {
                rest.split_whitespace()
                    .map(|n| n.parse().unwrap())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }

    /// The whole message `seq` as stored.
    pub fn fetch(&mut self, seq: u32) -> Vec<u8> {
        let lines = self.command(&format!("FETCH {seq} BODY.PEEK[]"));
        for l in lines {
            if let Some(start) = l.windows(2).position(|w| w == b"}\r") {
                // "* n FETCH (BODY[] {len}\r\n<octets>)"
                let open = l[..start].iter().rposition(|b| *b == b'{').unwrap();
                let len: usize = std::str::from_utf8(&l[open + 1..start])
                    .unwrap()
                    .parse()
                    .unwrap();
                return l[start + 3..start + 3 + len].to_vec();
            }
        }
        panic!("no literal in the FETCH response");
    }

    /// Sends a command; returns its untagged responses (literals inline). Panics unless OK.
    fn command(&mut self, command: &str) -> Vec<Vec<u8>> {
        self.tag += 1;
        let tag = format!("a{}", self.tag);
        let stream = self.io.get_mut();
        stream
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .unwrap();
        let mut untagged = Vec::new();
        loop {
            let line = self.response();
            if line.starts_with(tag.as_bytes()) {
                let text = String::from_utf8_lossy(&line);
                assert!(
                    text[tag.len()..].trim_start().starts_with("OK"),
                    "{command}: {text}"
                );
                return untagged;
            }
            untagged.push(line);
        }
    }

    /// One response line, with any literals read in full.
    fn response(&mut self) -> Vec<u8> {
        let mut out = self.line();
        while out.ends_with(b"}\r\n") {
            let open = out.iter().rposition(|b| *b == b'{').unwrap();
            let len: usize = std::str::from_utf8(&out[open + 1..out.len() - 3])
                .unwrap()
                .parse()
                .unwrap();
            let mut literal = vec![0; len];
            self.io.read_exact(&mut literal).unwrap();
            out.extend_from_slice(&literal);
            out.extend_from_slice(&self.line());
        }
        out
    }

    fn line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        self.io.read_until(b'\n', &mut line).unwrap();
        assert!(!line.is_empty(), "IMAP connection closed");
        line
    }
}
