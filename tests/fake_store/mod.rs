//! A small scripted LMTP store for the scheduler tests: an in-process tokio server on
//! 127.0.0.1:0.
//!
//! Per recipient (by local part) a list of post-dot replies, used in turn (the last one
//! repeats): `451 …` then `250 …` defers once and then delivers. RCPT replies can be scripted
//! too. Knobs for the whole store: greet with `421` (down), drop the connection after the
//! end of data without replying (in doubt), or hold every post-dot reply until released
//! (slow). It records every transaction's recipients and each delivered copy.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different part of the fake"
)]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helper")]

pub mod harness;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

/// One delivered copy.
#[derive(Clone, Debug)]
pub struct Delivered {
    pub from: String,
    pub to: String,
    pub body: String,
}

#[derive(Default)]
struct State {
    /// Post-dot replies by local part (lower case), used in turn.
    results: HashMap<String, Vec<String>>,
    /// RCPT replies by local part.
    rcpt: HashMap<String, String>,
    /// Attempts seen per local part.
    seen: HashMap<String, usize>,
    greet_421: bool,
    /// Drop the connection after the end of data this many more times.
    drop_after_dot: usize,
    transactions: Vec<Vec<String>>,
    delivered: Vec<Delivered>,
    sessions: usize,
    /// Post-dot replies of transactions with one of these local parts are held.
    hold_local: std::collections::HashSet<String>,
    /// Transactions between MAIL and their last reply, now and at most.
    active: usize,
    max_active: usize,
    /// Recipients in an open transaction; a second one for the same is an overlap.
    open_rcpts: std::collections::HashSet<String>,
    overlaps: usize,
    /// Wait this long before the post-dot replies (a slow store).
    reply_delay: std::time::Duration,
}

/// A running fake store.
#[derive(Clone)]
pub struct FakeStore {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// While true, post-dot replies are held; bumped on any change of the hold rules.
    hold: watch::Sender<bool>,
    changed: Arc<Notify>,
}

impl FakeStore {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (hold, _) = watch::channel(false);
        let store = Self {
            addr,
            state: Arc::new(Mutex::new(State::default())),
            hold,
            changed: Arc::new(Notify::new()),
        };
        let s = store.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move { s.session(sock).await });
            }
        });
        store
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Post-dot replies for `local`, in turn (the last one repeats).
    pub fn script(&self, local: &str, replies: &[&str]) {
        self.state.lock().unwrap().results.insert(
            local.to_lowercase(),
            replies.iter().map(|r| (*r).to_owned()).collect(),
        );
    }

    /// The RCPT reply for `local`.
    pub fn refuse_rcpt(&self, local: &str, reply: &str) {
        self.state
            .lock()
            .unwrap()
            .rcpt
            .insert(local.to_lowercase(), reply.to_owned());
    }

    /// Greet new sessions with `421` (down) or normally.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().greet_421 = down;
    }

    /// Drop the next `n` connections right after their end of data.
    pub fn drop_after_dot(&self, n: usize) {
        self.state.lock().unwrap().drop_after_dot = n;
    }

    /// Hold (or release) every post-dot reply.
    pub fn hold_replies(&self, hold: bool) {
        self.hold.send_replace(hold);
    }

    /// Hold (or release) the post-dot replies of transactions that include `local`.
    pub fn hold_local(&self, local: &str, hold: bool) {
        {
            let mut st = self.state.lock().unwrap();
            if hold {
                st.hold_local.insert(local.to_lowercase());
            } else {
                st.hold_local.remove(&local.to_lowercase());
            }
        }
        self.hold.send_modify(|_| {});
    }

    /// Wait `delay` before each transaction's post-dot replies.
    pub fn set_reply_delay(&self, delay: std::time::Duration) {
        self.state.lock().unwrap().reply_delay = delay;
    }

    /// The most transactions that were open at once.
    pub fn max_active(&self) -> usize {
        self.state.lock().unwrap().max_active
    }

    /// Times a recipient was in two open transactions at once.
    pub fn overlaps(&self) -> usize {
        self.state.lock().unwrap().overlaps
    }

    pub fn transactions(&self) -> Vec<Vec<String>> {
        self.state.lock().unwrap().transactions.clone()
    }

    pub fn delivered(&self) -> Vec<Delivered> {
        self.state.lock().unwrap().delivered.clone()
    }

    pub fn delivered_to(&self) -> Vec<String> {
        let mut v: Vec<String> = self.delivered().into_iter().map(|d| d.to).collect();
        v.sort();
        v
    }

    pub fn sessions(&self) -> usize {
        self.state.lock().unwrap().sessions
    }

    fn close_transaction(&self, rcpts: &[String]) {
        let mut st = self.state.lock().unwrap();
        st.active = st.active.saturating_sub(1);
        for r in rcpts {
            st.open_rcpts.remove(&r.to_lowercase());
        }
    }

    async fn session(&self, sock: tokio::net::TcpStream) {
        sock.set_nodelay(true).ok();
        let (r, mut w) = sock.into_split();
        let mut r = BufReader::new(r);
        let greet_421 = {
            let mut st = self.state.lock().unwrap();
            st.sessions += 1;
            st.greet_421
        };
        if greet_421 {
            let _ = w.write_all(b"421 4.3.2 fake store is down\r\n").await;
            return;
        }
        if w.write_all(b"220 fake LMTP ready\r\n").await.is_err() {
            return;
        }
        let mut from = String::new();
        let mut rcpts: Vec<String> = Vec::new();
        let mut open = false;
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                if open {
                    self.close_transaction(&rcpts);
                }
                return;
            }
            let cmd = line.trim_end().to_owned();
            let upper = cmd.to_ascii_uppercase();
            let reply: String = if upper.starts_with("LHLO") {
                "250-fake\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME".into()
            } else if upper.starts_with("MAIL FROM:") {
                from = between(&cmd, '<', '>');
                rcpts.clear();
                open = true;
                let mut st = self.state.lock().unwrap();
                st.active += 1;
                st.max_active = st.max_active.max(st.active);
                "250 2.1.0 Ok".into()
            } else if upper.starts_with("RCPT TO:") {
                let to = between(&cmd, '<', '>');
                let local = to.split('@').next().unwrap_or("").to_lowercase();
                let mut st = self.state.lock().unwrap();
                match st.rcpt.get(&local) {
                    Some(refusal) => refusal.clone(),
                    None => {
                        if !st.open_rcpts.insert(to.to_lowercase()) {
                            st.overlaps += 1;
                        }
                        rcpts.push(to);
                        "250 2.1.5 Ok".into()
                    }
                }
            } else if upper == "DATA" {
                if w.write_all(b"354 go ahead\r\n").await.is_err() {
                    return;
                }
                let mut body = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    body.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                let drop_now = {
                    let mut st = self.state.lock().unwrap();
                    st.transactions.push(rcpts.clone());
                    if st.drop_after_dot > 0 {
                        st.drop_after_dot -= 1;
                        true
                    } else {
                        false
                    }
                };
                if drop_now {
                    self.close_transaction(&rcpts);
                    return;
                }
                let locals: Vec<String> = rcpts
                    .iter()
                    .map(|t| t.split('@').next().unwrap_or("").to_lowercase())
                    .collect();
                let mut hold = self.hold.subscribe();
                loop {
                    let global = *hold.borrow_and_update();
                    let held = global || {
                        let st = self.state.lock().unwrap();
                        locals.iter().any(|l| st.hold_local.contains(l))
                    };
                    if !held {
                        break;
                    }
                    if hold.changed().await.is_err() {
                        return;
                    }
                }
                let delay = self.state.lock().unwrap().reply_delay;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                self.close_transaction(&rcpts);
                open = false;
                let mut out = String::new();
                for to in rcpts.drain(..) {
                    let local = to.split('@').next().unwrap_or("").to_lowercase();
                    let reply = {
                        let mut st = self.state.lock().unwrap();
                        let n = *st.seen.entry(local.clone()).or_default();
                        st.seen.insert(local.clone(), n + 1);
                        let reply = st
                            .results
                            .get(&local)
                            .map(|v| v[n.min(v.len() - 1)].clone())
                            .unwrap_or_else(|| "250 2.0.0 Saved".into());
                        if reply.starts_with('2') {
                            st.delivered.push(Delivered {
                                from: from.clone(),
                                to: to.clone(),
                                body: body.clone(),
                            });
                        }
                        reply
                    };
                    out.push_str(&reply);
                    out.push_str("\r\n");
                }
                self.changed.notify_waiters();
                if w.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            } else if upper == "RSET" || upper == "NOOP" {
                if open && upper == "RSET" {
                    self.close_transaction(&rcpts);
                    open = false;
                }
                rcpts.clear();
                "250 2.0.0 Ok".into()
            } else if upper == "QUIT" {
                let _ = w.write_all(b"221 2.0.0 Bye\r\n").await;
                return;
            } else {
                "502 5.5.2 unknown".into()
            };
            if w.write_all(format!("{reply}\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

fn between(s: &str, a: char, b: char) -> String {
    let start = s.find(a).map_or(0, |i| i + 1);
    let end = s[start..].find(b).map_or(s.len(), |i| start + i);
    s[start..end].to_owned()
}
