//! One client connection: drives a [`ServerSession`] over a socket and hands the message to
//! the spool.
//!
//! The loop is: poll the session until it needs input, answering its decisions (routing at
//! RCPT, opening a spool message at the start of content, waiting for durability at the end);
//! write the replies it produced in one flush (pipelined replies leave together); read with
//! the timeout of the current phase; repeat. STARTTLS hands the socket back to the caller,
//! which runs the handshake and calls back in with the TLS stream and the same state.
//!
//! Promises: a 250 after the end of data is sent only once the spool says the message is
//! durable (LMTP: one 250 per recipient, each after that point); a spool failure answers
//! 451 4.3.0 (452 4.3.1 when full) and leaves nothing behind; any I/O error or timeout closes
//! this connection only. Memory per connection: the read buffer ([`ReadBuffer`]), the
//! session's line buffer, and the content not yet in a chunk record (less than a chunk,
//! kept in the buffers it was read into); never the message.
//!
//! In `mode: proxy` the message is held in memory instead (bounded by `max_message_size`)
//! and relayed at the end of data ([`super::cut_through`]); its 250s are the stores'.
//!
//! Both modes refuse a message with more than 50 `Received:` fields, or one that carries
//! our own `Received:` marker (it was here before), with 554 5.4.6.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use metrics::counter;
use postern_proto::replies;
use postern_proto::server::{Protocol, ServerEvent, ServerSession};
use postern_proto::{ForwardPath, MailParams, Reply, ReversePath};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Shared;
use super::config::ListenerMode;
use super::cut_through::{self, Target};
use super::read_buffer::ReadBuffer;
use super::received::{HopCounter, Trace, received_header};
use crate::edge::Refusal;
use crate::metrics::{self as m, reason};
use crate::routing::{RcptDecision, RcptRoute};
use crate::spool::{Envelope, EnvelopeRecipient, MessageWriter, QueueId, SpoolError};

/// How a conversation ended.
pub(crate) enum Ending {
    /// The client quit, or we closed (timeout, errors, shutdown).
    Closed,
    /// STARTTLS was accepted: run the handshake, then continue.
    StartTls,
}

/// The state of one connection that survives a STARTTLS upgrade.
pub(crate) struct Conversation {
    pub(crate) session: ServerSession,
    shared: Arc<Shared>,
    peer: Option<IpAddr>,
    trusted: bool,
    helo: String,
    pub(crate) tls_info: Option<String>,
    sender: Option<(ReversePath, MailParams)>,
    recipients: Vec<EnvelopeRecipient>,
    /// `mode: proxy`: where each of `recipients` goes.
    targets: Vec<Target>,
    /// RCPTs accepted in this transaction.
    accepted: usize,
    pending_rcpt: Option<EnvelopeRecipient>,
    message: Option<Message>,
    out: Vec<u8>,
    deadline: Instant,
}

/// The message being received.
struct Message {
    /// Its queue id (in spool mode the spool's; in proxy mode one allocated for the logs).
    id: QueueId,
    writer: Option<MessageWriter>,
    /// `mode: proxy`: our `Received:` header and the content, in memory.
    buffer: Option<Vec<u8>>,
    failed: Option<SpoolError>,
    hops: HopCounter,
    octets: u64,
}

impl Conversation {
    pub(crate) fn new(shared: Arc<Shared>, peer: Option<IpAddr>) -> Self {
        let trusted = peer.is_some_and(|ip| {
            shared
                .config
                .trusted_networks
                .iter()
                .any(|n| n.contains(&ip))
        });
        let session = ServerSession::new(shared.server_config.clone());
        let deadline = Instant::now() + shared.config.timeouts.session.0;
        Self {
            session,
            shared,
            peer,
            trusted,
            helo: String::new(),
            tls_info: None,
            sender: None,
            recipients: Vec::new(),
            targets: Vec::new(),
            accepted: 0,
            pending_rcpt: None,
            message: None,
            out: Vec::with_capacity(512),
            deadline,
        }
    }

    fn listener(&self) -> String {
        self.shared.config.name.clone()
    }

    /// Runs the conversation on `io` until it ends.
    pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut S) -> Ending {
        let mut buf = ReadBuffer::new();
        loop {
            let ending = self.drain_events().await;
            if !self.out.is_empty() {
                if io.write_all(&self.out).await.is_err() || io.flush().await.is_err() {
                    self.abort_message();
                    return Ending::Closed;
                }
                self.out.clear();
            }
            if let Some(ending) = ending {
                if matches!(ending, Ending::Closed) {
                    let _ = io.shutdown().await;
                }
                return ending;
            }
            let phase_timeout = if self.message.is_some() {
                self.shared.config.timeouts.data.0
            } else {
                self.shared.config.timeouts.command.0
            };
            let timeout =
                phase_timeout.min(self.deadline.saturating_duration_since(Instant::now()));
            let read = tokio::select! {
                r = tokio::time::timeout(timeout, io.read_buf(buf.next_read())) => r,
                () = self.shared.shutdown.cancelled(), if self.message.is_none() => {
                    self.session.shutdown();
                    continue;
                }
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.abort_message();
                    return Ending::Closed;
                }
                Ok(Ok(_)) => {
                    if self.shared.config.proxy_protocol.is_some()
                        && self.message.is_none()
                        && super::proxy_protocol::starts_with_header(buf.octets())
                    {
                        // A second header, inside the session: a broken chain of balancers,
                        // or someone trying to speak for another client. This connection
                        // only is closed.
                        tracing::warn!(listener = %self.listener(), client = %self.log_client(), "a PROXY protocol header inside the session; closed");
                        self.abort_message();
                        return Ending::Closed;
                    }
                    buf.hand_over(&mut self.session, self.message.is_some());
                }
                Err(_) => self.session.timeout(),
            }
        }
    }

    /// Polls the session until it needs input; `Some` when the connection must close or
    /// upgrade.
    async fn drain_events(&mut self) -> Option<Ending> {
        let mut ending = None;
        while let Some(event) = self.session.poll_event() {
            match event {
                ServerEvent::Reply(reply) => {
                    self.count_reply(&reply);
                    reply.encode(&mut self.out);
                }
                ServerEvent::Hello { domain, .. } => self.helo = domain,
                ServerEvent::Mail { from, params } => self.mail(from, params),
                ServerEvent::Rcpt { to, params } => self.rcpt(to, params).await,
                ServerEvent::DataStart => self.data_start(),
                ServerEvent::Data(bytes) => self.data(bytes),
                ServerEvent::DataEnd => self.data_end().await,
                ServerEvent::DataAborted => self.abort_message(),
                ServerEvent::Reset => self.reset(),
                ServerEvent::StartTls => ending = Some(Ending::StartTls),
                ServerEvent::Auth { .. } | ServerEvent::AuthResponse(_) => {
                    // No AUTH is offered, so the session never asks; answer safely anyway.
                    let _ = self.session.respond(replies::auth_not_enabled());
                }
                ServerEvent::Close => ending = Some(Ending::Closed),
            }
        }
        ending
    }

    fn count_reply(&self, reply: &Reply) {
        // Content refusals decided inside the session (size, bare line endings).
        let code = reply.code().get();
        let reason = match reply.enhanced().map(|e| (e.class, e.subject, e.detail)) {
            Some((5, 3, 4)) => reason::SIZE,
            Some((5, 5, 2)) if code == 550 => reason::POLICY,
            Some((5, 7, 0)) => reason::TLS,
            _ => return,
        };
        counter!(m::MESSAGES_REJECTED, "listener" => self.listener(), "reason" => reason)
            .increment(1);
    }

    fn reset(&mut self) {
        self.abort_message();
        self.sender = None;
        self.recipients.clear();
        self.targets.clear();
        self.accepted = 0;
        self.pending_rcpt = None;
    }

    /// The client as logs name it, Postfix's way: `helo[ip]`.
    fn log_client(&self) -> String {
        format!(
            "{}[{}]",
            self.helo,
            self.peer
                .map_or_else(|| "local".to_owned(), |p| p.to_string())
        )
    }

    /// The client as the spool records it: `helo [ip]`.
    fn client(&self) -> String {
        format!(
            "{} [{}]",
            self.helo,
            self.peer
                .map_or_else(|| "local".to_owned(), |p| p.to_string())
        )
    }

    fn proxy(&self) -> bool {
        self.shared.config.mode == ListenerMode::Proxy
    }

    fn mail(&mut self, from: ReversePath, params: MailParams) {
        self.reset();
        if !self.shared.spool.has_space() {
            counter!(m::MESSAGES_REJECTED, "listener" => self.listener(), "reason" => reason::SPOOL).increment(1);
            let _ = self.session.respond(replies::insufficient_storage());
            return;
        }
        self.sender = Some((from, params));
        let _ = self.session.accept();
    }

    async fn rcpt(&mut self, to: ForwardPath, params: postern_proto::RcptParams) {
        let route = self.shared.router.load().rcpt(&to, self.trusted);
        if let Some(refusal) = self.edge_check(&to, &route).await {
            counter!(m::RECIPIENTS_REJECTED, "listener" => self.listener(), "reason" => refusal.reason)
                .increment(1);
            let _ = self.session.respond(refusal.reply);
            return;
        }
        let address = match &to {
            ForwardPath::Postmaster => "Postmaster".to_owned(),
            ForwardPath::Mailbox(mb) => mb.to_string(),
        };
        let (proxy, rcpt_no) = (self.proxy(), self.accepted);
        let refusal = match route {
            RcptRoute::Accept(decision) => {
                if proxy {
                    self.targets.push(Target::accepted(rcpt_no, to, &decision));
                }
                self.recipients.push(EnvelopeRecipient { address, params });
                None
            }
            RcptRoute::Expand(targets) => {
                // Alias expansion happens here, once: the envelope holds the targets, each
                // remembering the address the client gave (ORCPT, RFC 3461 §4.2).
                let orcpt = params
                    .orcpt
                    .clone()
                    .unwrap_or(postern_proto::params::Orcpt {
                        addr_type: "rfc822".into(),
                        address,
                    });
                for target in targets {
                    if proxy {
                        let router = self.shared.router.load();
                        self.targets
                            .push(Target::expanded(rcpt_no, &target, &router));
                    }
                    let mut p = params.clone();
                    p.orcpt = Some(orcpt.clone());
                    self.recipients.push(EnvelopeRecipient {
                        address: target,
                        params: p,
                    });
                }
                None
            }
            RcptRoute::Refuse(RcptDecision::UnknownUser) => {
                Some((replies::unknown_user(), reason::UNKNOWN_USER))
            }
            RcptRoute::Refuse(RcptDecision::Unavailable) => {
                Some((replies::local_error(), reason::ROUTING))
            }
            RcptRoute::Refuse(_) => Some((replies::relay_denied(), reason::RELAY)),
        };
        match refusal {
            Some((reply, why)) => {
                counter!(m::RECIPIENTS_REJECTED, "listener" => self.listener(), "reason" => why)
                    .increment(1);
                let _ = self.session.respond(reply);
            }
            None => {
                self.accepted += 1;
                self.shared.counters().recipients_accepted.increment(1);
                let _ = self.session.accept();
            }
        }
    }

    /// The edge's checks of an accepted route ([`crate::edge`]): each store the recipient
    /// (or its alias targets) goes to must not be in backpressure, and a store that verifies
    /// must know the recipient as given.
    async fn edge_check(&self, to: &ForwardPath, route: &RcptRoute) -> Option<Refusal> {
        let edge = self.shared.edge.as_ref()?;
        match route {
            RcptRoute::Accept(decision) => {
                let store = decision.store()?;
                if let Some(r) = edge.backpressure(store) {
                    return Some(r);
                }
                match decision {
                    RcptDecision::Local { store } if edge.verifies(store) => {
                        edge.verify(store, to).await
                    }
                    _ => None,
                }
            }
            RcptRoute::Expand(targets) => {
                let router = self.shared.router.load();
                targets.iter().find_map(|t| {
                    let path = ForwardPath::parse(&format!("<{t}>")).ok()?;
                    let decision = router.resolve(&path, true);
                    edge.backpressure(decision.store()?)
                })
            }
            RcptRoute::Refuse(_) => None,
        }
    }

    fn data_start(&mut self) {
        let Some((from, params)) = self.sender.clone() else {
            let _ = self.session.respond(replies::local_error());
            return;
        };
        let envelope = Envelope {
            sender: from.mailbox().map(ToString::to_string).unwrap_or_default(),
            params,
            recipients: self.recipients.clone(),
            received_at: SystemTime::now(),
            client: self.client(),
        };
        let writer = if self.proxy() {
            None
        } else {
            match self.shared.spool.begin(envelope) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(listener = %self.shared.config.name, error = %e, "spool refused a new message");
                    counter!(m::MESSAGES_REJECTED, "listener" => self.listener(), "reason" => reason::SPOOL).increment(1);
                    let _ = self.session.respond(e.reply());
                    return;
                }
            }
        };
        let id = writer
            .as_ref()
            .map_or_else(|| self.shared.spool.allocate_id(), MessageWriter::queue_id);
        let queue_id = id.to_string();
        let with = match (self.shared.server_config.protocol, self.tls_info.is_some()) {
            (Protocol::Lmtp, false) => "LMTP",
            (Protocol::Lmtp, true) => "LMTPS",
            (Protocol::Smtp, false) => "ESMTP",
            (Protocol::Smtp, true) => "ESMTPS",
        };
        let recipient = match self.recipients.as_slice() {
            [one] => Some(one.address.as_str()),
            _ => None,
        };
        let header = received_header(&Trace {
            helo: &self.helo,
            peer: self.peer,
            hostname: &self.shared.hostname,
            node_id: self.shared.node_id,
            with,
            queue_id: &queue_id,
            recipient,
            tls: self.tls_info.as_deref(),
            now: SystemTime::now(),
        });
        let (mut writer, mut buffer) = (writer, None);
        let failed = match writer.as_mut() {
            Some(w) => w.write_owned(header.into_bytes()).err(),
            None => {
                buffer = Some(header.into_bytes());
                None
            }
        };
        self.message = Some(Message {
            id,
            writer,
            buffer,
            failed,
            hops: HopCounter::with_marker(&self.shared.marker),
            octets: 0,
        });
        let _ = self.session.accept();
    }

    fn data(&mut self, bytes: Vec<u8>) {
        let Some(msg) = self.message.as_mut() else {
            return;
        };
        msg.octets += bytes.len() as u64;
        msg.hops.feed(&bytes);
        if msg.failed.is_some() {
            return;
        }
        if let Some(buffer) = msg.buffer.as_mut() {
            // Bounded: the session refuses content over max_message_size (DataAborted).
            buffer.extend_from_slice(&bytes);
        }
        if let Some(writer) = msg.writer.as_mut() {
            // The decoded octets themselves are kept for the spool (no copy).
            if let Err(e) = writer.write_owned(bytes) {
                msg.failed = Some(e);
            }
        }
    }

    async fn data_end(&mut self) {
        let shared = Arc::clone(&self.shared);
        let listener = &shared.config.name;
        let n = self.session.expected_replies();
        let Some(mut msg) = self.message.take() else {
            for _ in 0..n {
                let _ = self.session.respond(replies::local_error());
            }
            return;
        };
        self.shared.counters().received_bytes.increment(msg.octets);
        let refusal = if msg.hops.is_loop() {
            counter!(m::MESSAGES_REJECTED, "listener" => listener.clone(), "reason" => reason::POLICY).increment(1);
            if msg.hops.seen_own_marker() {
                tracing::warn!(id = %msg.id, listener = %listener, "mail loop: our own Received: marker is in the message; refused");
                Some(replies::mail_returned())
            } else {
                Some(replies::mail_loop())
            }
        } else if let Some(e) = msg.failed.take() {
            tracing::warn!(listener = %listener, error = %e, "spool write failed; message refused");
            counter!(m::MESSAGES_REJECTED, "listener" => listener.clone(), "reason" => reason::SPOOL).increment(1);
            Some(e.reply())
        } else {
            None
        };
        if let (None, Some(body)) = (&refusal, msg.buffer.take()) {
            self.relay(msg.id, msg.octets, body).await;
            return;
        }
        let writer = msg.writer.take();
        let reply = match (refusal, writer) {
            (Some(r), writer) => {
                if let Some(w) = writer {
                    w.abort();
                }
                r
            }
            (None, None) => replies::local_error(),
            (None, Some(writer)) => {
                let qid = writer.queue_id();
                let queue_id = qid.to_string();
                let started = Instant::now();
                match writer.commit().await {
                    Ok(()) => {
                        if let Some(scheduler) = &self.shared.scheduler {
                            scheduler.submit(qid);
                        }
                        let counters = self.shared.counters();
                        counters
                            .accept_latency
                            .record(started.elapsed().as_secs_f64());
                        counters.messages_accepted.increment(1);
                        tracing::info!(
                            queue_id = %queue_id,
                            listener = %listener,
                            from = %self.sender.as_ref().map(|(f, _)| f.to_string()).unwrap_or_default(),
                            nrcpt = self.recipients.len(),
                            size = msg.octets,
                            client = %self.log_client(),
                            "accepted"
                        );
                        replies::queued(&queue_id)
                    }
                    Err(e) => {
                        tracing::warn!(queue_id = %queue_id, error = %e, "spool commit failed; message refused");
                        counter!(m::MESSAGES_REJECTED, "listener" => listener.clone(), "reason" => reason::SPOOL).increment(1);
                        e.reply()
                    }
                }
            }
        };
        for _ in 0..n {
            let _ = self.session.respond(reply.clone());
        }
        self.end_transaction();
    }

    fn end_transaction(&mut self) {
        self.sender = None;
        self.recipients.clear();
        self.targets.clear();
        self.accepted = 0;
    }

    /// `mode: proxy`: relays the message to the stores and answers with their replies.
    async fn relay(&mut self, id: QueueId, octets: u64, body: Vec<u8>) {
        let listener = self.listener();
        let n = self.session.expected_replies();
        let Some((from, params)) = self.sender.clone() else {
            for _ in 0..n {
                let _ = self.session.respond(replies::local_error());
            }
            return;
        };
        let client = self.client();
        let lmtp = self.shared.server_config.protocol == Protocol::Lmtp;
        let replies = cut_through::run(
            &self.shared,
            cut_through::Transaction {
                id,
                from: &from,
                params: &params,
                recipients: &self.recipients,
                targets: &self.targets,
                body,
                client,
                lmtp,
            },
        )
        .await;
        let positive = replies.iter().filter(|r| r.is_positive()).count();
        if positive > 0 {
            self.shared.counters().messages_accepted.increment(1);
        }
        tracing::info!(
            id = %id,
            listener = %listener,
            from = %from,
            nrcpt = self.recipients.len(),
            size = octets,
            client = %self.helo,
            accepted = positive,
            "relayed"
        );
        if replies.len() != n {
            // The session's count and ours disagree: never guess a 250.
            tracing::warn!(id = %id, expected = n, got = replies.len(), "reply count mismatch");
            for _ in 0..n {
                let _ = self.session.respond(replies::local_error());
            }
        } else {
            for reply in replies {
                let _ = self.session.respond(reply);
            }
        }
        self.end_transaction();
    }

    fn abort_message(&mut self) {
        if let Some(mut msg) = self.message.take() {
            if let Some(w) = msg.writer.take() {
                w.abort();
            }
        }
    }
}
