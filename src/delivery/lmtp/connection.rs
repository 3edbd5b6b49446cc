//! One open connection to a store ([`Connection`]): its capabilities, the transactions on
//! it (MAIL, RCPT, DATA or BDAT, the replies after the end of data, one per recipient with
//! LMTP), recipient verification, RSET before reuse and QUIT. Setting a connection up
//! (connect, greeting, LHLO/EHLO, STARTTLS, AUTH) is the store's ([`super::RemoteStore`]).

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_proto::address::ForwardPath;
use postern_proto::client::{Capabilities, ClientError, ClientEvent};
use postern_proto::data::DataEncoder;
use postern_proto::params::{Body, MailParams, RcptParams};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt};
use tokio::time::timeout;

use crate::delivery::downgrade::{Downgrading, Guard};
use crate::delivery::message::{OutboundEnvelope, Recipient, Report};
use crate::delivery::trouble::{self, Outcome, Phase, Trouble};
use crate::delivery::wire::Wire;

use super::run::Run;
use super::{DATA_READ, PhaseMark, QUIT_LIMIT, RemoteStore, phase_done};

/// An open, greeted (and, as configured, encrypted and authenticated) connection to a store.
pub struct Connection {
    pub(super) store: Arc<RemoteStore>,
    pub(super) wire: Wire,
    pub(super) caps: Capabilities,
    pub(super) tls: bool,
    pub(super) created: Instant,
    pub(super) last_used: Instant,
    pub(super) transactions: u64,
    /// Closed, timed out or aborted: never to be used again.
    pub(super) broken: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("store", &self.store.name)
            .field("caps", &self.caps)
            .field("tls", &self.tls)
            .field("transactions", &self.transactions)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// What the store advertised in its (last) LHLO reply.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The store this connection goes to.
    pub fn store(&self) -> &Arc<RemoteStore> {
        &self.store
    }

    /// STARTTLS succeeded.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Can take a transaction now: open, and no command outstanding.
    pub fn is_usable(&self) -> bool {
        !self.broken && !self.wire.proto.is_closed() && self.wire.proto.is_idle()
    }

    /// Since the connection was opened.
    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// Since the last command of a transaction (or RSET).
    pub fn idle(&self) -> Duration {
        self.last_used.elapsed()
    }

    /// Transactions started on this connection.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    /// Runs one mail transaction for `recipients` (at most `recipients_per_transaction`;
    /// the caller splits, or uses [`StorePool::deliver`](crate::delivery::StorePool::deliver)).
    /// `body` is read once, to its end. Each recipient's outcome goes to `on_outcome` as
    /// soon as it is known, and is also returned in the [`Report`].
    pub async fn deliver<R, F>(
        &mut self,
        envelope: &OutboundEnvelope,
        recipients: &[Recipient],
        body: R,
        on_outcome: &mut F,
    ) -> Report
    where
        R: AsyncBufRead + Unpin,
        F: FnMut(usize, &Outcome),
    {
        let store = Arc::clone(&self.store);
        let t = store.timeouts;
        let mut run = Run::new(recipients, on_outcome, &store.policy, envelope.arrived);
        if recipients.is_empty() {
            return run.finish();
        }
        if !self.is_usable() {
            run.widen(trouble::unusable("closed, or a command is outstanding"));
            run.settle_rest(&Outcome::NotAttempted(None));
            return run.finish();
        }
        if let Some(reply) = self.refuse_locally(envelope, recipients) {
            run.widen(trouble::message_refused(&reply));
            run.settle_rest(&Outcome::Bounced(reply));
            return run.finish();
        }
        let (params, rcpts) = self.parameters(envelope, recipients);
        let bdat = store.chunking && self.caps.chunking;
        let guard = Guard {
            eight_bit: !self.caps.eight_bit_mime,
            utf8_headers: envelope.params.smtputf8 && !self.caps.smtputf8,
        };
        let mut body = Downgrading::new(body, guard);
        let proto = &mut self.wire.proto;
        let started = if bdat {
            proto.start_transaction_bdat(envelope.from.clone(), params, rcpts)
        } else {
            proto.start_transaction(envelope.from.clone(), params, rcpts)
        };
        if let Err(e) = started {
            run.widen(trouble::unusable(&e.to_string()));
            run.settle_rest(&Outcome::NotAttempted(None));
            return run.finish();
        }
        self.last_used = Instant::now();
        let new_connection = self.transactions == 0;
        self.transactions += 1;
        // Per-phase latency: with BDAT, MAIL and RCPT are pipelined with the chunks, so
        // `mail_rcpt` is their flush and `data` the chunks with whatever replies they await.
        let mut mark = self.last_used;
        let mut mail_rcpt_timed = false;

        // The window's latency sample: the size-independent phases, not the content.
        let mut latency = Duration::ZERO;
        if let Err(f) = self.wire.flush(t.mail_rcpt).await {
            run.widen(f.trouble(Phase::MailRcpt, t.mail_rcpt));
        } else if bdat {
            latency += phase_done(&store, PhaseMark::MailRcpt, &mut mark);
            mail_rcpt_timed = true;
            self.send_bdat(&mut body, &mut run, guard).await;
            phase_done(&store, PhaseMark::Data, &mut mark);
        }
        let mut data_started = false;
        loop {
            self.absorb(&mut run);
            if run.done || run.closed {
                break;
            }
            if run.go_ahead && !data_started {
                data_started = true;
                latency += phase_done(&store, PhaseMark::MailRcpt, &mut mark);
                mail_rcpt_timed = true;
                let size = usize::try_from(envelope.size).unwrap_or(DATA_READ);
                self.send_data(&mut body, &mut run, guard, size).await;
                phase_done(&store, PhaseMark::Data, &mut mark);
                continue;
            }
            let (phase, limit) = if run.end_sent {
                (Phase::EndOfData, t.end_of_data)
            } else {
                (Phase::MailRcpt, t.mail_rcpt)
            };
            if let Err(f) = self.wire.flush(limit).await {
                run.widen(f.trouble(phase, limit));
                continue;
            }
            if let Err(f) = self.wire.read(limit).await {
                run.widen(f.trouble(phase, limit));
            }
        }
        if run.end_sent {
            let wait = phase_done(&store, PhaseMark::EndOfData, &mut mark);
            latency += size_normalised(wait, envelope.size);
        } else if !mail_rcpt_timed {
            latency += phase_done(&store, PhaseMark::MailRcpt, &mut mark);
        }
        self.last_used = Instant::now();
        if run.closed || self.wire.proto.is_closed() {
            self.broken = true;
        }
        let mut report = run.finish();
        report.latency = Some(latency);
        report.new_connection = new_connection;
        report
    }

    /// RSET, to check that a pooled connection is still alive before reusing it.
    pub async fn rset(&mut self) -> Result<(), Trouble> {
        let limit = self.store.timeouts.mail_rcpt;
        if let Err(e) = self.wire.proto.rset() {
            self.broken = true;
            return Err(trouble::unusable(&e.to_string()));
        }
        let result = self.wire.until_reply(Phase::Rset, limit).await;
        match &result {
            Ok(reply) if reply.is_positive() => {
                self.last_used = Instant::now();
                return Ok(());
            }
            Ok(reply) => {
                self.broken = true;
                return Err(trouble::refused(Phase::Rset, reply));
            }
            Err(_) => self.broken = true,
        }
        result.map(|_| ())
    }

    /// Asks the store whether it would take mail for `rcpt`, without sending any: `MAIL
    /// FROM:<>`, `RCPT TO:<rcpt>`, `RSET` (pipelined when offered), each reply awaited at
    /// most `limit`. `Ok` is the store's reply to RCPT, whatever it says; `Err` when MAIL was
    /// refused or the connection failed (then it is marked unusable). After `Ok` the
    /// connection is idle again, outside any transaction, and can go back to its pool.
    pub async fn verify(
        &mut self,
        rcpt: &ForwardPath,
        limit: Duration,
    ) -> Result<postern_proto::Reply, Trouble> {
        if !self.is_usable() {
            return Err(trouble::unusable("closed, or a command is outstanding"));
        }
        if let Err(e) = self
            .wire
            .proto
            .verify(postern_proto::ReversePath::Null, rcpt.clone())
        {
            self.broken = true;
            return Err(trouble::unusable(&e.to_string()));
        }
        self.last_used = Instant::now();
        let (mut mail, mut answer) = (None, None);
        let result = 'conversation: loop {
            while let Some(event) = self.wire.proto.poll_event() {
                match event {
                    ClientEvent::MailReply(reply) => mail = Some(reply),
                    ClientEvent::RcptReply { reply, .. } => answer = Some(reply),
                    ClientEvent::RsetReply(reply) => {
                        if !reply.is_positive() {
                            self.broken = true;
                        }
                        break 'conversation Ok(());
                    }
                    ClientEvent::UnexpectedReply(reply) => {
                        break 'conversation Err(trouble::unexpected(&reply));
                    }
                    ClientEvent::ProtocolError(e) => {
                        break 'conversation Err(trouble::protocol_error(&e));
                    }
                    ClientEvent::Closed => {
                        break 'conversation Err(trouble::lost(Phase::MailRcpt, "closed"));
                    }
                    _ => {}
                }
            }
            let step = match self.wire.flush(limit).await {
                Ok(()) => self.wire.read(limit).await,
                Err(f) => Err(f),
            };
            if let Err(f) = step {
                break Err(f.trouble(Phase::MailRcpt, limit));
            }
        };
        self.last_used = Instant::now();
        if let Err(t) = result {
            self.broken = true;
            return Err(t);
        }
        match (mail, answer) {
            (Some(m), _) if !m.is_positive() => Err(trouble::refused(Phase::MailRcpt, &m)),
            (_, Some(reply)) => Ok(reply),
            _ => {
                self.broken = true;
                Err(trouble::lost(Phase::MailRcpt, "no reply to RCPT"))
            }
        }
    }

    /// Ends the session politely: QUIT and its reply (waiting at most a few seconds), then
    /// closes the socket. The connection cannot be used afterwards.
    pub async fn quit(&mut self) {
        if self.is_usable() && self.wire.proto.quit().is_ok() {
            let limit = QUIT_LIMIT.min(self.store.timeouts.mail_rcpt);
            if self.wire.flush(limit).await.is_ok() {
                while !self.wire.proto.is_closed() && self.wire.read(limit).await.is_ok() {}
            }
        }
        self.broken = true;
        timeout(QUIT_LIMIT, self.wire.io.shutdown()).await.ok();
    }

    /// The bounce for a message this store cannot take, decided before sending anything.
    fn refuse_locally(
        &self,
        envelope: &OutboundEnvelope,
        recipients: &[Recipient],
    ) -> Option<postern_proto::Reply> {
        let caps = &self.caps;
        if let Some(Some(limit)) = caps.size {
            if envelope.size > limit {
                return Some(trouble::size_exceeded(envelope.size, limit));
            }
        }
        if non_ascii_address(envelope, recipients) && !caps.smtputf8 {
            return Some(trouble::needs_smtputf8());
        }
        match envelope.params.body {
            Some(Body::BinaryMime)
                if !(caps.binarymime && caps.chunking && self.store.chunking) =>
            {
                return Some(trouble::needs_binarymime());
            }
            _ => {}
        }
        None
    }

    /// MAIL and RCPT parameters, keeping only what the store advertised.
    fn parameters(
        &self,
        envelope: &OutboundEnvelope,
        recipients: &[Recipient],
    ) -> (MailParams, Vec<(ForwardPath, RcptParams)>) {
        let caps = &self.caps;
        let declared = envelope.params.body;
        let body = match declared {
            Some(Body::BinaryMime) => Some(Body::BinaryMime),
            _ if (envelope.eight_bit || declared == Some(Body::EightBitMime))
                && caps.eight_bit_mime =>
            {
                Some(Body::EightBitMime)
            }
            _ => None,
        };
        let params = MailParams {
            size: caps.size.is_some().then_some(envelope.size),
            body,
            smtputf8: caps.smtputf8
                && (envelope.params.smtputf8 || non_ascii_address(envelope, recipients)),
            ret: envelope.params.ret.filter(|_| caps.dsn),
            envid: envelope.params.envid.clone().filter(|_| caps.dsn),
            // XXX: REQUIRETLS (RFC 8689) and AUTH= are not passed to stores: no store we
            // deliver to offers REQUIRETLS, and AUTH= means nothing to a final store.
            requiretls: false,
            auth: None,
        };
        let rcpts = recipients
            .iter()
            .map(|r| {
                let params = if caps.dsn {
                    r.params.clone()
                } else {
                    RcptParams::default()
                };
                (r.path.clone(), params)
            })
            .collect();
        (params, rcpts)
    }

    fn absorb<F: FnMut(usize, &Outcome)>(&mut self, run: &mut Run<'_, F>) {
        while let Some(event) = self.wire.proto.poll_event() {
            run.event(event);
        }
    }

    /// Ends the transaction before its end of data on purpose: every open recipient gets
    /// `outcome` instead of "not attempted".
    fn abort<F: FnMut(usize, &Outcome)>(
        &mut self,
        run: &mut Run<'_, F>,
        outcome: Outcome,
        why: Trouble,
    ) {
        run.abort = Some(outcome);
        run.widen(why);
        self.wire.proto.connection_lost();
        self.broken = true;
    }

    /// After 354: the body, dot-stuffed, then the final dot. Output is written in blocks
    /// of about `DATA_READ`; the last block carries the final dot, so a small message is one
    /// write (one segment on the wire, one wake-up of the store). `size`: the body's size,
    /// to size the buffers (a wrong value costs only extra reads).
    async fn send_data<R, F>(
        &mut self,
        body: &mut Downgrading<R>,
        run: &mut Run<'_, F>,
        guard: Guard,
        size: usize,
    ) where
        R: AsyncBufRead + Unpin,
        F: FnMut(usize, &Outcome),
    {
        let limit = self.store.timeouts.data;
        let mut encoder = DataEncoder::new();
        let want = size.saturating_add(1).clamp(4096, DATA_READ);
        let mut out = Vec::with_capacity(want + want / 32 + 8);
        loop {
            // The body's own buffer, encoded where it lies (no copy of ours before the
            // dot-stuffing); at most DATA_READ at a time, so `out` stays about that size
            // even for a body held whole in memory.
            let chunk = match body.fill_buf().await {
                Ok([]) => break,
                Ok(chunk) => chunk,
                Err(e) => {
                    let reply = trouble::local_read_error(&e);
                    let why = trouble::message_refused(&reply);
                    return self.abort(run, Outcome::Deferred(reply), why);
                }
            };
            let n = chunk.len().min(DATA_READ);
            let at = out.len();
            encoder.encode(&chunk[..n], &mut out);
            body.consume(n);
            // The encoding adds only '.', CR and LF: its octets are 8-bit where the chunk's
            // were. Nothing of this chunk is written before the check.
            if let Some(reply) = guard.check(&out[at..], body) {
                let why = trouble::message_refused(&reply);
                return self.abort(run, Outcome::Bounced(reply), why);
            }
            if out.len() >= DATA_READ {
                if let Err(f) = self.wire.write_all(&out, limit).await {
                    return run.widen(f.trouble(Phase::Data, limit));
                }
                out.clear();
            }
        }
        encoder.finish(&mut out);
        // From here a lost connection leaves the recipients in doubt: the dot may arrive even
        // if the write reports an error (the last block of the body goes with it).
        if let Err(e) = self.wire.proto.data_sent() {
            let why = trouble::unusable(&e.to_string());
            return self.abort(run, Outcome::NotAttempted(None), why);
        }
        run.end_sent = true;
        if let Err(f) = self.wire.write_all(&out, limit).await {
            run.widen(f.trouble(Phase::EndOfData, limit));
        }
    }

    /// The body in BDAT chunks of `chunk_size`; the last one is `BDAT n LAST`. With
    /// PIPELINING the chunks follow MAIL and RCPT without waiting; without it each waits for
    /// the previous reply.
    async fn send_bdat<R, F>(
        &mut self,
        body: &mut Downgrading<R>,
        run: &mut Run<'_, F>,
        guard: Guard,
    ) where
        R: AsyncBufRead + Unpin,
        F: FnMut(usize, &Outcome),
    {
        let t = self.store.timeouts;
        let size = self.store.chunk_size;
        let mut chunk = Vec::with_capacity(size);
        let mut sent_any = false;
        if let Err(e) = fill(body, &mut chunk, size).await {
            let reply = trouble::local_read_error(&e);
            let why = trouble::message_refused(&reply);
            return self.abort(run, Outcome::Deferred(reply), why);
        }
        loop {
            // One chunk is read ahead, so the last one is known to be the last.
            let mut next = Vec::new();
            let last = chunk.len() < size || {
                next.reserve(size);
                if let Err(e) = fill(body, &mut next, size).await {
                    let reply = trouble::local_read_error(&e);
                    let why = trouble::message_refused(&reply);
                    return self.abort(run, Outcome::Deferred(reply), why);
                }
                next.is_empty()
            };
            if let Some(reply) = guard.check(&chunk, body) {
                let why = trouble::message_refused(&reply);
                return self.abort(run, Outcome::Bounced(reply), why);
            }
            let len = chunk.len() as u64;
            loop {
                match self.wire.proto.bdat_chunk(len, last) {
                    Ok(()) => break,
                    Err(ClientError::NotReady) => {
                        let limit = if sent_any { t.data } else { t.mail_rcpt };
                        let phase = if sent_any {
                            Phase::Data
                        } else {
                            Phase::MailRcpt
                        };
                        let waited = match self.wire.flush(limit).await {
                            Ok(()) => self.wire.read(limit).await,
                            Err(f) => Err(f),
                        };
                        if let Err(f) = waited {
                            run.widen(f.trouble(phase, limit));
                        }
                        self.absorb(run);
                        if run.closed {
                            return;
                        }
                    }
                    // The transaction failed or the connection is gone: the events settle
                    // every recipient.
                    Err(_) => return,
                }
            }
            sent_any = true;
            if last {
                run.end_sent = true;
            }
            let phase = if last { Phase::EndOfData } else { Phase::Data };
            let written = match self.wire.flush(t.data).await {
                Ok(()) => self.wire.write_all(&chunk, t.data).await,
                Err(f) => Err(f),
            };
            if let Err(f) = written {
                return run.widen(f.trouble(phase, t.data));
            }
            if last {
                return;
            }
            // Take in any reply that has already arrived (a refused chunk stops the rest).
            if let Err(f) = self.wire.read_ready().await {
                run.widen(f.trouble(Phase::Data, t.data));
            }
            self.absorb(run);
            if run.closed {
                return;
            }
            chunk = next;
        }
    }
}

/// Content up to this size counts whole in the end-of-data latency; above, per this much.
pub(super) const LATENCY_UNIT: u64 = 64 << 10;

/// The end-of-data wait as the window's signal counts it: whole up to [`LATENCY_UNIT`] of
/// content, per [`LATENCY_UNIT`] above (a big message is slow because it is big).
pub(super) fn size_normalised(wait: Duration, size: u64) -> Duration {
    if size <= LATENCY_UNIT {
        wait
    } else {
        wait.mul_f64(LATENCY_UNIT as f64 / size as f64)
    }
}

/// An address of the message is not ASCII: it cannot go without SMTPUTF8 (a declared
/// SMTPUTF8 alone is no reason to refuse: with ASCII addresses and headers the message does
/// not need it, and 8-bit headers are caught while streaming).
pub(super) fn non_ascii_address(envelope: &OutboundEnvelope, recipients: &[Recipient]) -> bool {
    envelope.from.mailbox().is_some_and(|m| !m.is_ascii())
        || recipients
            .iter()
            .any(|r| r.path.mailbox().is_some_and(|m| !m.is_ascii()))
}

/// Reads until `buf` holds `size` octets or the body ends.
pub(super) async fn fill<R: AsyncBufRead + Unpin>(
    body: &mut R,
    buf: &mut Vec<u8>,
    size: usize,
) -> io::Result<()> {
    while buf.len() < size {
        let ready = body.fill_buf().await?;
        if ready.is_empty() {
            break;
        }
        let n = ready.len().min(size - buf.len());
        buf.extend_from_slice(&ready[..n]);
        body.consume(n);
    }
    Ok(())
}
