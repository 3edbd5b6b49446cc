//! One session of the fake store: the protocol, following the script, recording what it
//! receives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{Delivered, Rcpt, Script, Session, State, Txn};

/// How long a pipelining-advertising fake waits for DATA/BDAT before answering anyway.
const PIPELINING_GRACE: Duration = Duration::from_secs(2);

/// Serves session `id` (already recorded, not refused) on `stream`.
pub(super) async fn serve(
    state: Arc<Mutex<State>>,
    changes: watch::Receiver<()>,
    id: usize,
    stream: TcpStream,
) {
    let mut handler = Handler {
        state,
        changes,
        id,
        accepted: Vec::new(),
        open: false,
    };
    let _ = handler.run(Box::new(stream)).await;
    handler.close_txn();
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Handler {
    state: Arc<Mutex<State>>,
    changes: watch::Receiver<()>,
    id: usize,
    /// The recipients accepted in the current transaction.
    accepted: Vec<String>,
    /// The current transaction counts as open (from MAIL to its post-dot replies).
    open: bool,
}

type Stream = BufReader<Box<dyn Io>>;

/// The address between the angle brackets of a MAIL or RCPT line.
fn path(line: &str) -> String {
    line.split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(a, _)| a.to_owned())
        .unwrap_or_default()
}

fn local_part(addr: &str) -> String {
    addr.split('@').next().unwrap_or("").to_lowercase()
}

impl Handler {
    /// The script as it is now.
    fn script(&self) -> Script {
        self.state.lock().unwrap().script.clone()
    }

    fn record(&self, f: impl FnOnce(&mut Session)) {
        f(&mut self.state.lock().unwrap().sessions[self.id]);
    }

    fn txn(&self, f: impl FnOnce(&mut Txn)) {
        self.record(|s| {
            if let Some(t) = s.transactions.last_mut() {
                f(t)
            }
        });
    }

    /// The end of data was received: the transaction is complete.
    fn complete(&self) {
        let mut st = self.state.lock().unwrap();
        let n = st.sessions[self.id].transactions.len();
        if let Some(t) = st.sessions[self.id].transactions.last_mut() {
            t.complete = true;
            st.completed.push((self.id, n - 1));
        }
    }

    fn open_txn(&mut self) {
        self.close_txn();
        let mut st = self.state.lock().unwrap();
        st.open_transactions += 1;
        st.max_open_transactions = st.max_open_transactions.max(st.open_transactions);
        self.open = true;
    }

    fn close_txn(&mut self) {
        if !self.open {
            return;
        }
        self.open = false;
        let mut st = self.state.lock().unwrap();
        st.open_transactions = st.open_transactions.saturating_sub(1);
        for r in &self.accepted {
            st.open_rcpts.remove(&r.to_lowercase());
        }
    }

    fn lhlo_reply(&self, tls: bool) -> String {
        let s = &self.script();
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
        send(&mut io, &mut out, &self.script().greeting).await?;
        let mut tls = false;
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
            self.record(|s| s.commands.push(line.clone()));
            let script = self.script();
            let upper = line.to_ascii_uppercase();
            let verb = upper.split(' ').next().unwrap_or("").to_owned();
            if script.drop_at == Some(verb.as_str()) {
                return Ok(());
            }
            match verb.as_str() {
                "LHLO" if !script.smtp => queue(&mut out, &self.lhlo_reply(tls)),
                "EHLO" if script.smtp && script.ehlo_refused => {
                    queue(&mut out, "502 5.5.2 Error: command not recognized");
                }
                "EHLO" if script.smtp => queue(&mut out, &self.lhlo_reply(tls)),
                "HELO" if script.smtp => queue(&mut out, "250 relay.example"),
                "STARTTLS" if script.tls.is_some() && !tls => {
                    send(&mut io, &mut out, "220 2.0.0 Ready to start TLS").await?;
                    let config = script.tls.clone().unwrap();
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let inner = io.into_inner();
                    let stream = acceptor.accept(inner).await?;
                    io = BufReader::new(Box::new(stream));
                    tls = true;
                    self.record(|s| s.tls = true);
                    continue;
                }
                "AUTH" => {
                    let want = script.auth_plain.clone().unwrap_or_default();
                    let got = line.split(' ').nth(2).unwrap_or("");
                    if upper.starts_with("AUTH PLAIN ") && !want.is_empty() && got == want {
                        self.record(|s| s.authenticated = true);
                        queue(&mut out, "235 2.7.0 Authenticated");
                    } else {
                        queue(&mut out, "535 5.7.8 Authentication failed");
                    }
                }
                "MAIL" => {
                    in_txn = script.mail_reply.starts_with('2');
                    self.close_txn();
                    self.accepted.clear();
                    if in_txn {
                        self.open_txn();
                    }
                    self.record(|s| {
                        s.transactions.push(Txn {
                            mail: line.clone(),
                            ..Txn::default()
                        })
                    });
                    holding = script.pipelining;
                    queue(&mut out, &script.mail_reply);
                }
                "RCPT" => {
                    let addr = path(&line);
                    let reply = script
                        .rcpts
                        .get(&local_part(&addr))
                        .map_or_else(|| Rcpt::ok().rcpt, |r| r.rcpt.clone());
                    self.txn(|t| t.rcpts.push(addr.clone()));
                    if in_txn && reply.starts_with('2') {
                        let mut st = self.state.lock().unwrap();
                        if !st.open_rcpts.insert(addr.to_lowercase()) {
                            st.overlaps += 1;
                        }
                        drop(st);
                        self.accepted.push(addr);
                    }
                    queue(&mut out, &reply);
                }
                "DATA" => {
                    self.txn(|t| t.pipelined = holding);
                    holding = false;
                    if !in_txn || self.accepted.is_empty() {
                        queue(&mut out, "503 5.5.1 No valid recipients");
                    } else {
                        send(&mut io, &mut out, "354 go ahead").await?;
                        let (wire, content) = read_data(&mut io).await?;
                        self.txn(|t| {
                            t.wire = wire;
                            t.content = content;
                        });
                        self.complete();
                        in_txn = false;
                        if !self.results(&mut io, &mut out).await? {
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
                    });
                    if last {
                        self.complete();
                    }
                    if !in_txn || self.accepted.is_empty() {
                        queue(&mut out, "503 5.5.1 No valid recipients");
                    } else if !last {
                        queue(&mut out, &format!("250 2.0.0 {size} octets received"));
                    } else {
                        in_txn = false;
                        if !self.results(&mut io, &mut out).await? {
                            return Ok(());
                        }
                        continue;
                    }
                }
                "RSET" => {
                    in_txn = false;
                    self.close_txn();
                    self.accepted.clear();
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

    /// Waits while the script holds the post-dot replies of this transaction. False when
    /// the store is gone.
    async fn wait_while_held(&mut self) -> bool {
        let locals: Vec<String> = self.accepted.iter().map(|a| local_part(a)).collect();
        loop {
            self.changes.borrow_and_update();
            let held = {
                let st = self.state.lock().unwrap();
                let s = &st.script;
                s.hold_replies || locals.iter().any(|l| s.hold_locals.contains(l))
            };
            if !held {
                return true;
            }
            if self.changes.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Whether to drop the connection before post-dot reply `i` (spends one of
    /// `drop_times`).
    fn drop_now(&self, i: usize) -> bool {
        let mut st = self.state.lock().unwrap();
        let s = &mut st.script;
        if s.drop_after_replies != Some(i) {
            return false;
        }
        match &mut s.drop_times {
            None => true,
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
        }
    }

    /// Post-dot reply `i` of the transaction to `rcpts`, recording the copies it delivers.
    fn reply(&self, i: usize, rcpts: &[String]) -> String {
        let mut st = self.state.lock().unwrap();
        let (reply, to) = if st.script.smtp {
            (st.script.data_reply.clone(), rcpts)
        } else {
            let local = local_part(&rcpts[i]);
            let turn = st.uses.entry(local.clone()).or_insert(0);
            let n = *turn;
            *turn += 1;
            let reply = st
                .script
                .rcpts
                .get(&local)
                .and_then(|r| r.results.get(n.min(r.results.len().saturating_sub(1))))
                .cloned()
                .unwrap_or_else(|| Rcpt::ok().results[0].clone());
            (reply, &rcpts[i..=i])
        };
        if !reply.starts_with('2') {
            return reply;
        }
        let Some(txn) = st.sessions[self.id].transactions.last() else {
            return reply;
        };
        let from = path(&txn.mail);
        let body = String::from_utf8_lossy(&txn.content).into_owned();
        let copies: Vec<Delivered> = to
            .iter()
            .map(|to| Delivered {
                from: from.clone(),
                to: to.clone(),
                body: body.clone(),
            })
            .collect();
        st.delivered.extend(copies);
        reply
    }

    /// The post-dot replies, one write each. Returns false when the session must end.
    async fn results(&mut self, io: &mut Stream, out: &mut Vec<u8>) -> std::io::Result<bool> {
        flush(io, out).await?;
        if !self.wait_while_held().await {
            return Ok(false);
        }
        if let Some(delay) = self.script().reply_delay {
            tokio::time::sleep(delay).await;
        }
        self.close_txn();
        let rcpts = std::mem::take(&mut self.accepted);
        let script = self.script();
        let replies = if script.smtp { 1 } else { rcpts.len() };
        for i in 0..replies {
            if self.drop_now(i) {
                return Ok(false);
            }
            if script.stall_after_replies == Some(i) {
                // Never answer; end when the client gives up and closes.
                let mut sink = Vec::new();
                let _ = io.read_to_end(&mut sink).await;
                return Ok(false);
            }
            if i > 0 {
                if let Some(gate) = &script.gate {
                    gate.acquire().await.unwrap().forget();
                }
            }
            let reply = self.reply(i, &rcpts);
            send(io, out, &reply).await?;
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
