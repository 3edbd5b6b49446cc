//! A scripted LMTP store (or SMTP relay, [`Script::smtp`]) for fault injection: an in-process
//! tokio server on 127.0.0.1:0.
//!
//! Per recipient (by local part) it answers RCPT and the post-dot reply from a script
//! (250/451/550/552, multi-line replies); it can advertise or withhold PIPELINING, CHUNKING,
//! SIZE, 8BITMIME, SMTPUTF8, STARTTLS and AUTH PLAIN; drop the connection after `k` post-dot
//! replies, stall (never answer) after `k`, hold each post-dot reply until the test releases
//! it (to prove that outcomes are reported one by one), delay the post-dot replies, script a
//! recipient for its first `n` transactions only, and greet with 421 beyond `N` sessions. It records what it received: every command line, each transaction's recipients,
//! the DATA octets as on the wire and unstuffed, BDAT chunk sizes, and whether MAIL, RCPT and
//! DATA/BDAT arrived before the first of their replies was written (pipelining).
//!
//! Pipelining is detected deterministically: when PIPELINING is advertised, replies from MAIL
//! on are held until DATA or BDAT arrives; a client that waits for each reply is answered
//! after a grace period and the transaction is recorded as not pipelined.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the fake"
)]
#![allow(
    unreachable_pub,
    reason = "a test helper module: pub is for the test files"
)]
#![allow(clippy::unwrap_used, reason = "test helper")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long a pipelining-advertising fake waits for DATA/BDAT before answering anyway.
const PIPELINING_GRACE: Duration = Duration::from_secs(2);

/// What to answer for one recipient.
#[derive(Clone, Debug)]
pub struct Rcpt {
    /// The reply to RCPT TO (`\r\n` between the lines of a multi-line reply).
    pub rcpt: String,
    /// The reply after the end of data (only if RCPT was accepted).
    pub result: String,
    /// Only for this many transactions (across sessions); then [`Rcpt::ok`].
    pub times: Option<usize>,
}

impl Rcpt {
    pub fn new(rcpt: &str, result: &str) -> Self {
        Self {
            rcpt: rcpt.into(),
            result: result.into(),
            times: None,
        }
    }

    /// This script for the first `n` transactions naming the recipient, then OK.
    pub fn times(mut self, n: usize) -> Self {
        self.times = Some(n);
        self
    }
    pub fn ok() -> Self {
        Self::new("250 2.1.5 OK", "250 2.0.0 Saved")
    }
}

/// The fake's behaviour.
#[derive(Clone)]
pub struct Script {
    pub greeting: String,
    pub pipelining: bool,
    pub chunking: bool,
    /// `Some(None)`: SIZE without a limit.
    pub size: Option<Option<u64>>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    /// The expected AUTH PLAIN initial response (base64); advertises AUTH PLAIN.
    pub auth_plain: Option<String>,
    /// Offers STARTTLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Greets the session beyond this many concurrent ones with 421.
    pub max_sessions: Option<usize>,
    /// Serves this many sessions at once; the others wait for their greeting until a served
    /// one ends (a process-per-session store's listen backlog: Cyrus `maxchild`, Dovecot
    /// `process_limit`).
    pub max_served: Option<usize>,
    pub mail_reply: String,
    /// By local part (lower case); others get [`Rcpt::ok`].
    pub rcpts: HashMap<String, Rcpt>,
    /// Close the connection after this many post-dot replies.
    pub drop_after_replies: Option<usize>,
    /// Stop answering (keep the connection open) after this many post-dot replies.
    pub stall_after_replies: Option<usize>,
    /// Before each post-dot reply but the first, take one permit.
    pub gate: Option<Arc<Semaphore>>,
    /// Close the connection, without a reply, on receiving this verb (`DATA`, `RCPT`…).
    pub drop_at: Option<&'static str>,
    /// Speak SMTP: EHLO/HELO instead of LHLO, one reply (`data_reply`) after the end of data.
    pub smtp: bool,
    /// SMTP: answer EHLO with 502 (the client falls back to HELO).
    pub ehlo_refused: bool,
    /// SMTP: the reply after the end of data, for the whole message.
    pub data_reply: String,
    /// Wait this long after the end of data before the first reply (a slow store).
    pub reply_delay: Option<Duration>,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            greeting: "220 fake.example LMTP ready".into(),
            pipelining: true,
            chunking: false,
            size: None,
            eight_bit_mime: true,
            smtputf8: false,
            auth_plain: None,
            tls: None,
            max_sessions: None,
            max_served: None,
            mail_reply: "250 2.1.0 OK".into(),
            rcpts: HashMap::new(),
            drop_after_replies: None,
            stall_after_replies: None,
            gate: None,
            drop_at: None,
            smtp: false,
            ehlo_refused: false,
            data_reply: "250 2.0.0 Ok: queued as FAKE1".into(),
            reply_delay: None,
        }
    }
}

impl Script {
    /// An SMTP relay with the defaults otherwise.
    pub fn smtp() -> Self {
        Self {
            greeting: "220 relay.example ESMTP".into(),
            smtp: true,
            ..Self::default()
        }
    }

    pub fn rcpt(mut self, local: &str, rcpt: Rcpt) -> Self {
        self.rcpts.insert(local.to_ascii_lowercase(), rcpt);
        self
    }
}

/// One mail transaction as received.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    pub mail: String,
    pub rcpts: Vec<String>,
    /// DATA: the octets between 354 and the final dot line, as on the wire.
    pub wire: Vec<u8>,
    /// The content: unstuffed DATA, or the BDAT chunks joined.
    pub content: Vec<u8>,
    pub bdat_sizes: Vec<usize>,
    /// The end of data (dot or BDAT LAST) was received.
    pub complete: bool,
    /// With PIPELINING advertised: DATA/BDAT arrived before any reply of the transaction
    /// was written.
    pub pipelined: bool,
}

/// One session as received.
#[derive(Clone, Debug, Default)]
pub struct Session {
    pub commands: Vec<String>,
    pub transactions: Vec<Txn>,
    pub tls: bool,
    pub authenticated: bool,
    /// Refused at the greeting (421 beyond max_sessions).
    pub refused: bool,
}

impl Session {
    pub fn count(&self, verb: &str) -> usize {
        self.commands
            .iter()
            .filter(|c| c.to_ascii_uppercase().starts_with(verb))
            .count()
    }
}

pub struct FakeStore {
    pub addr: SocketAddr,
    sessions: Arc<Mutex<Vec<Session>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeStore {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeStore {
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let active = Arc::new(AtomicUsize::new(0));
        let served = script
            .max_served
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        let script = Arc::new(script);
        let uses = Arc::new(Mutex::new(HashMap::new()));
        let record = Arc::clone(&sessions);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                stream.set_nodelay(true).ok();
                let id = {
                    let mut all = record.lock().unwrap();
                    all.push(Session::default());
                    all.len() - 1
                };
                let (script, record, active, served, uses) = (
                    Arc::clone(&script),
                    Arc::clone(&record),
                    Arc::clone(&active),
                    served.clone(),
                    Arc::clone(&uses),
                );
                tokio::spawn(async move {
                    // Held for the whole session: the greeting waits for a free worker.
                    let _worker = match served {
                        Some(s) => Some(s.acquire_owned().await.unwrap()),
                        None => None,
                    };
                    let n = active.fetch_add(1, Ordering::SeqCst);
                    let mut handler = Handler {
                        script,
                        record,
                        id,
                        uses,
                    };
                    if handler.script.max_sessions.is_some_and(|max| n >= max) {
                        handler.update(|s| s.refused = true);
                        let mut stream = stream;
                        let _ = stream.write_all(b"421 4.3.2 Too many sessions\r\n").await;
                    } else {
                        let _ = handler.run(Box::new(stream)).await;
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            sessions,
            task,
        }
    }

    pub fn sessions(&self) -> Vec<Session> {
        self.sessions.lock().unwrap().clone()
    }

    /// Every transaction of every session, in order.
    pub fn transactions(&self) -> Vec<Txn> {
        self.sessions()
            .into_iter()
            .flat_map(|s| s.transactions)
            .collect()
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Handler {
    script: Arc<Script>,
    record: Arc<Mutex<Vec<Session>>>,
    id: usize,
    /// Transactions that named each scripted local part so far (for [`Rcpt::times`]).
    uses: Arc<Mutex<HashMap<String, usize>>>,
}

type Stream = BufReader<Box<dyn Io>>;

impl Handler {
    fn update(&self, f: impl FnOnce(&mut Session)) {
        f(&mut self.record.lock().unwrap()[self.id]);
    }

    fn txn(&self, f: impl FnOnce(&mut Txn)) {
        self.update(|s| {
            if let Some(t) = s.transactions.last_mut() {
                f(t)
            }
        });
    }

    fn lhlo_reply(&self, tls: bool) -> String {
        let s = &self.script;
        let mut lines = vec!["fake.example".to_owned()];
        let mut add = |on: bool, kw: &str| {
            if on {
                lines.push(kw.to_owned())
            }
        };
        add(s.pipelining, "PIPELINING");
        add(s.chunking, "CHUNKING");
        add(s.eight_bit_mime, "8BITMIME");
        add(s.smtputf8, "SMTPUTF8");
        add(true, "ENHANCEDSTATUSCODES");
        add(s.tls.is_some() && !tls, "STARTTLS");
        add(s.auth_plain.is_some(), "AUTH PLAIN");
        match s.size {
            Some(Some(n)) => lines.push(format!("SIZE {n}")),
            Some(None) => lines.push("SIZE".into()),
            None => {}
        }
        multi(250, &lines)
    }

    async fn run(&mut self, stream: Box<dyn Io>) -> std::io::Result<()> {
        let mut io: Stream = BufReader::new(stream);
        let mut out = Vec::new();
        send(&mut io, &mut out, &self.script.greeting).await?;
        let mut tls = false;
        let mut accepted: Vec<String> = Vec::new();
        let mut in_txn = false;
        let mut holding = false;
        loop {
            let line = if holding {
                match tokio::time::timeout(PIPELINING_GRACE, read_line(&mut io)).await {
                    Ok(line) => line?,
                    Err(_) => {
                        // The client waits for replies: it is not pipelining.
                        holding = false;
                        flush(&mut io, &mut out).await?;
                        continue;
                    }
                }
            } else {
                read_line(&mut io).await?
            };
            let Some(line) = line else { return Ok(()) };
            self.update(|s| s.commands.push(line.clone()));
            let upper = line.to_ascii_uppercase();
            let verb = upper.split(' ').next().unwrap_or("").to_owned();
            if self.script.drop_at == Some(verb.as_str()) {
                return Ok(());
            }
            match verb.as_str() {
                "LHLO" if !self.script.smtp => queue(&mut out, &self.lhlo_reply(tls)),
                "EHLO" if self.script.smtp && self.script.ehlo_refused => {
                    queue(&mut out, "502 5.5.2 Error: command not recognized");
                }
                "EHLO" if self.script.smtp => queue(&mut out, &self.lhlo_reply(tls)),
                "HELO" if self.script.smtp => queue(&mut out, "250 relay.example"),
                "STARTTLS" if self.script.tls.is_some() && !tls => {
                    send(&mut io, &mut out, "220 2.0.0 Ready to start TLS").await?;
                    let config = self.script.tls.clone().unwrap();
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let inner = io.into_inner();
                    let stream = acceptor.accept(inner).await?;
                    io = BufReader::new(Box::new(stream));
                    tls = true;
                    self.update(|s| s.tls = true);
                    continue;
                }
                "AUTH" => {
                    let want = self.script.auth_plain.clone().unwrap_or_default();
                    let got = line.split(' ').nth(2).unwrap_or("");
                    if upper.starts_with("AUTH PLAIN ") && !want.is_empty() && got == want {
                        self.update(|s| s.authenticated = true);
                        queue(&mut out, "235 2.7.0 Authenticated");
                    } else {
                        queue(&mut out, "535 5.7.8 Authentication failed");
                    }
                }
                "MAIL" => {
                    in_txn = self.script.mail_reply.starts_with('2');
                    accepted.clear();
                    self.update(|s| {
                        s.transactions.push(Txn {
                            mail: line.clone(),
                            ..Txn::default()
                        })
                    });
                    holding = self.script.pipelining;
                    queue(&mut out, &self.script.mail_reply);
                }
                "RCPT" => {
                    let addr = line
                        .split_once('<')
                        .and_then(|(_, r)| r.split_once('>'))
                        .map(|(a, _)| a.to_owned())
                        .unwrap_or_default();
                    let local = addr.split('@').next().unwrap_or("").to_lowercase();
                    let mut script = self
                        .script
                        .rcpts
                        .get(&local)
                        .cloned()
                        .unwrap_or_else(Rcpt::ok);
                    if let Some(n) = script.times {
                        let mut uses = self.uses.lock().unwrap();
                        let used = uses.entry(local.clone()).or_insert(0);
                        *used += 1;
                        if *used > n {
                            script = Rcpt::ok();
                        }
                    }
                    self.txn(|t| t.rcpts.push(addr.clone()));
                    if in_txn && script.rcpt.starts_with('2') {
                        accepted.push(script.result.clone());
                    }
                    queue(&mut out, &script.rcpt);
                }
                "DATA" => {
                    self.txn(|t| t.pipelined = holding);
                    holding = false;
                    if !in_txn || accepted.is_empty() {
                        queue(&mut out, "503 5.5.1 No valid recipients");
                    } else {
                        send(&mut io, &mut out, "354 go ahead").await?;
                        let (wire, content) = read_data(&mut io).await?;
                        self.txn(|t| {
                            t.wire = wire;
                            t.content = content;
                            t.complete = true;
                        });
                        in_txn = false;
                        if !self.results(&mut io, &mut out, &accepted).await? {
                            return Ok(());
                        }
                        continue;
                    }
                }
                "BDAT" => {
                    self.txn(|t| t.pipelined |= holding);
                    holding = false;
                    let mut words = upper.split(' ').skip(1);
                    let size: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    let last = words.next() == Some("LAST");
                    let mut chunk = vec![0; size];
                    io.read_exact(&mut chunk).await?;
                    self.txn(|t| {
                        t.bdat_sizes.push(size);
                        t.content.extend_from_slice(&chunk);
                        t.complete = last;
                    });
                    if !in_txn || accepted.is_empty() {
                        queue(&mut out, "503 5.5.1 No valid recipients");
                    } else if !last {
                        queue(&mut out, &format!("250 2.0.0 {size} octets received"));
                    } else {
                        in_txn = false;
                        if !self.results(&mut io, &mut out, &accepted).await? {
                            return Ok(());
                        }
                        continue;
                    }
                }
                "RSET" => {
                    in_txn = false;
                    accepted.clear();
                    queue(&mut out, "250 2.0.0 OK");
                }
                "NOOP" => queue(&mut out, "250 2.0.0 OK"),
                "QUIT" => {
                    send(&mut io, &mut out, "221 2.0.0 Bye").await?;
                    return Ok(());
                }
                _ => queue(&mut out, "500 5.5.1 Unknown command"),
            }
            if !holding {
                flush(&mut io, &mut out).await?;
            }
        }
    }

    /// The post-dot replies, one write each. Returns false when the session must end.
    async fn results(
        &self,
        io: &mut Stream,
        out: &mut Vec<u8>,
        accepted: &[String],
    ) -> std::io::Result<bool> {
        flush(io, out).await?;
        if let Some(delay) = self.script.reply_delay {
            tokio::time::sleep(delay).await;
        }
        let one = [self.script.data_reply.clone()];
        let replies = if self.script.smtp { &one[..] } else { accepted };
        for (i, reply) in replies.iter().enumerate() {
            if self.script.drop_after_replies == Some(i) {
                return Ok(false);
            }
            if self.script.stall_after_replies == Some(i) {
                // Never answer; end when the client gives up and closes.
                let mut sink = Vec::new();
                let _ = io.read_to_end(&mut sink).await;
                return Ok(false);
            }
            if i > 0 {
                if let Some(gate) = &self.script.gate {
                    gate.acquire().await.unwrap().forget();
                }
            }
            send(io, out, reply).await?;
        }
        Ok(true)
    }
}

fn multi(code: u16, lines: &[String]) -> String {
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("{code}{}{l}", if i == last { ' ' } else { '-' }))
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn queue(out: &mut Vec<u8>, reply: &str) {
    out.extend_from_slice(reply.as_bytes());
    out.extend_from_slice(b"\r\n");
}

async fn flush(io: &mut Stream, out: &mut Vec<u8>) -> std::io::Result<()> {
    if !out.is_empty() {
        io.get_mut().write_all(out).await?;
        io.get_mut().flush().await?;
        out.clear();
    }
    Ok(())
}

async fn send(io: &mut Stream, out: &mut Vec<u8>, reply: &str) -> std::io::Result<()> {
    queue(out, reply);
    flush(io, out).await
}

async fn read_line(io: &mut Stream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if io.read_until(b'\n', &mut buf).await? == 0 {
        return Ok(None);
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// DATA content up to the final dot line: (wire octets without the dot line, unstuffed).
async fn read_data(io: &mut Stream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let (mut wire, mut content) = (Vec::new(), Vec::new());
    loop {
        let mut line = Vec::new();
        if io.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" {
            return Ok((wire, content));
        }
        wire.extend_from_slice(&line);
        let unstuffed = if line.starts_with(b".") {
            &line[1..]
        } else {
            &line[..]
        };
        content.extend_from_slice(unstuffed);
    }
}
