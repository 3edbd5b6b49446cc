//! The tests' fake LMTP store: a scriptable LMTP server (or SMTP relay, [`Script::smtp`]) on
//! 127.0.0.1:0, in-process on tokio, for fault injection. Every test binary that needs a
//! store to deliver to uses this one (`mod fake_lmtp;`).
//!
//! What it is told, by a [`Script`] at [`FakeStore::start`]; [`FakeStore::update`] and
//! [`FakeStore::rcpt`] change the script of a running store, for what it does from then on:
//! - per recipient (by local part, [`Rcpt`]): the RCPT reply and the post-dot replies, one per
//!   transaction in turn, the last one repeating (`451` then `250`: deferred once, then
//!   delivered); multi-line replies;
//! - the greeting, the MAIL reply, the extensions it advertises or withholds (PIPELINING,
//!   CHUNKING, SIZE, 8BITMIME, SMTPUTF8, STARTTLS, AUTH PLAIN), SMTP instead of LMTP;
//! - capacity: greet with 421 beyond `max_sessions` concurrent sessions (`Some(0)`: the store
//!   is down), or serve `max_served` sessions at once and leave the others waiting for their
//!   greeting (a process-per-session store's listen backlog);
//! - faults after the end of data: delay the replies; hold them until the test releases them
//!   (all, or those of transactions naming given local parts); release them one at a time
//!   through a semaphore; drop the connection after `k` of them (every time, or a number of
//!   times); stall (never answer) after `k`; or drop the connection on receiving a verb.
//!
//! What it records: every session (its command lines, STARTTLS, AUTH, refused at the
//! greeting) and its transactions (the MAIL line, the RCPT addresses, the DATA octets as on
//! the wire and unstuffed, the BDAT chunk sizes, whether the data ended, whether it was
//! pipelined); the transactions in the order their data ended ([`FakeStore::completed`]); each
//! copy delivered (a 2xx post-dot reply); the most transactions open at once and the times a
//! recipient was in two open transactions at once.
//!
//! Pipelining is detected deterministically: when PIPELINING is advertised, replies from MAIL
//! on are held until DATA or BDAT arrives; a client that waits for each reply is answered
//! after a grace period and the transaction is recorded as not pipelined.
//!
//! Promises: every reply follows the script as it is when the reply is due (but
//! `max_served`, read at the start), nothing else (no timeouts of its own but the
//! pipelining grace); what it received is recorded before it replies to it, so a test
//! that has seen a reply finds its command, its transaction's end of data and its
//! delivered copy in the records; the records are copies, taken under one lock. Dropping
//! the [`FakeStore`] stops accepting connections and ends the sessions waiting for held
//! replies.
//!
//! [`harness`]: a scheduler on a temporary spool routed to fake stores (the scheduler tests).

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the fake"
)]
#![allow(
    unreachable_pub,
    reason = "a test helper module: pub is for the test files"
)]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helper")]

pub mod harness;
mod session;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// What to answer for one recipient.
#[derive(Clone, Debug)]
pub struct Rcpt {
    /// The reply to RCPT TO (`\r\n` between the lines of a multi-line reply).
    pub rcpt: String,
    /// The replies after the end of data (only if RCPT was accepted), one per transaction
    /// that reaches them, in turn; the last one repeats.
    pub results: Vec<String>,
}

impl Rcpt {
    pub fn new(rcpt: &str, result: &str) -> Self {
        Self {
            rcpt: rcpt.into(),
            results: vec![result.into()],
        }
    }

    /// Accepted at RCPT; `result` after the end of data.
    pub fn result(result: &str) -> Self {
        Self::new("250 2.1.5 OK", result)
    }

    /// After the replies so far (one transaction each), `result`.
    pub fn then(mut self, result: &str) -> Self {
        self.results.push(result.into());
        self
    }

    pub fn ok() -> Self {
        Self::result("250 2.0.0 Saved")
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
    /// Greets the session beyond this many concurrent ones with 421; `Some(0)`: every one
    /// (the store is down).
    pub max_sessions: Option<usize>,
    /// Serves this many sessions at once; the others wait for their greeting until a served
    /// one ends (a process-per-session store's listen backlog: Cyrus `maxchild`, Dovecot
    /// `process_limit`). Read at [`FakeStore::start`] only.
    pub max_served: Option<usize>,
    pub mail_reply: String,
    /// By local part (lower case); others get [`Rcpt::ok`].
    pub rcpts: HashMap<String, Rcpt>,
    /// Close the connection after this many post-dot replies.
    pub drop_after_replies: Option<usize>,
    /// `drop_after_replies` applies this many more times (then never); `None`: every time.
    pub drop_times: Option<usize>,
    /// Stop answering (keep the connection open) after this many post-dot replies.
    pub stall_after_replies: Option<usize>,
    /// Before each post-dot reply but the first, take one permit.
    pub gate: Option<Arc<Semaphore>>,
    /// Hold every transaction's post-dot replies while set.
    pub hold_replies: bool,
    /// Hold the post-dot replies of the transactions naming one of these local parts (lower
    /// case) while they are in the set.
    pub hold_locals: HashSet<String>,
    /// Close the connection, without a reply, on receiving this verb (`DATA`, `RCPT`…).
    pub drop_at: Option<&'static str>,
    /// Speak SMTP: EHLO/HELO instead of LHLO, one reply (`data_reply`) after the end of data.
    pub smtp: bool,
    /// SMTP: answer EHLO with 502 (the client falls back to HELO).
    pub ehlo_refused: bool,
    /// SMTP: the reply after the end of data, for the whole message.
    pub data_reply: String,
    /// Wait this long after the end of data (once released, if held) before the first reply
    /// (a slow store).
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
            drop_times: None,
            stall_after_replies: None,
            gate: None,
            hold_replies: false,
            hold_locals: HashSet::new(),
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

    /// Scripts recipient `local` (any case).
    pub fn rcpt(mut self, local: &str, rcpt: Rcpt) -> Self {
        self.rcpts.insert(local.to_ascii_lowercase(), rcpt);
        self
    }
}

/// One mail transaction as received.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    pub mail: String,
    /// Every RCPT TO address, accepted or not.
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

/// One copy delivered: a recipient whose post-dot reply was 2xx (SMTP: the message's).
#[derive(Clone, Debug)]
pub struct Delivered {
    /// The reverse path (without the angle brackets).
    pub from: String,
    pub to: String,
    /// The content, as [`Txn::content`].
    pub body: String,
}

/// The script and what was received, behind one lock.
#[derive(Default)]
struct State {
    script: Script,
    sessions: Vec<Session>,
    /// (session, transaction) of each transaction whose data ended, in that order.
    completed: Vec<(usize, usize)>,
    delivered: Vec<Delivered>,
    /// Post-dot replies given so far per local part (the turn in [`Rcpt::results`]).
    uses: HashMap<String, usize>,
    /// Sessions being served (for `max_sessions`).
    open_sessions: usize,
    /// Transactions between MAIL and their post-dot replies (or their end), now and at most.
    open_transactions: usize,
    max_open_transactions: usize,
    /// Recipients of the open transactions; one named again is an overlap.
    open_rcpts: HashSet<String>,
    overlaps: usize,
}

/// A running fake store; dropping it stops accepting connections.
pub struct FakeStore {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Told of every change of the script (held replies wait on it).
    changed: watch::Sender<()>,
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
        let served = script.max_served.map(|n| Arc::new(Semaphore::new(n)));
        let state = Arc::new(Mutex::new(State {
            script,
            ..State::default()
        }));
        let (changed, changes) = watch::channel(());
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                stream.set_nodelay(true).ok();
                let id = {
                    let mut st = shared.lock().unwrap();
                    st.sessions.push(Session::default());
                    st.sessions.len() - 1
                };
                let (state, changes, served) =
                    (Arc::clone(&shared), changes.clone(), served.clone());
                tokio::spawn(async move {
                    // Held for the whole session: the greeting waits for a free worker.
                    let _worker = match served {
                        Some(s) => Some(s.acquire_owned().await.unwrap()),
                        None => None,
                    };
                    let refused = {
                        let mut st = state.lock().unwrap();
                        let n = st.open_sessions;
                        st.open_sessions += 1;
                        let refused = st.script.max_sessions.is_some_and(|max| n >= max);
                        st.sessions[id].refused = refused;
                        refused
                    };
                    if refused {
                        let mut stream = stream;
                        let _ = stream.write_all(b"421 4.3.2 Too many sessions\r\n").await;
                    } else {
                        session::serve(Arc::clone(&state), changes, id, stream).await;
                    }
                    state.lock().unwrap().open_sessions -= 1;
                });
            }
        });
        Self {
            addr,
            state,
            changed,
            task,
        }
    }

    /// Changes the script: new sessions, commands and post-dot replies follow it (held
    /// replies are released when it no longer holds them).
    pub fn update(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.state.lock().unwrap().script);
        self.changed.send_replace(());
    }

    /// [`Script::rcpt`] on the running store.
    pub fn rcpt(&self, local: &str, rcpt: Rcpt) {
        self.update(|s| {
            s.rcpts.insert(local.to_ascii_lowercase(), rcpt);
        });
    }

    pub fn sessions(&self) -> Vec<Session> {
        self.state.lock().unwrap().sessions.clone()
    }

    /// Every transaction of every session, session by session.
    pub fn transactions(&self) -> Vec<Txn> {
        self.sessions()
            .into_iter()
            .flat_map(|s| s.transactions)
            .collect()
    }

    /// The transactions whose data ended, in the order it did (whatever the replies).
    pub fn completed(&self) -> Vec<Txn> {
        let st = self.state.lock().unwrap();
        st.completed
            .iter()
            .map(|&(s, t)| st.sessions[s].transactions[t].clone())
            .collect()
    }

    /// The copies delivered, in the order of their replies.
    pub fn delivered(&self) -> Vec<Delivered> {
        self.state.lock().unwrap().delivered.clone()
    }

    /// The recipients of [`FakeStore::delivered`], sorted.
    pub fn delivered_to(&self) -> Vec<String> {
        let mut v: Vec<String> = self.delivered().into_iter().map(|d| d.to).collect();
        v.sort();
        v
    }

    /// The most transactions that were open (from MAIL to their post-dot replies) at once.
    pub fn max_active(&self) -> usize {
        self.state.lock().unwrap().max_open_transactions
    }

    /// Times a recipient was in two open transactions at once.
    pub fn overlaps(&self) -> usize {
        self.state.lock().unwrap().overlaps
    }
}
