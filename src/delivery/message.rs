//! What a delivery is about: the envelope, the recipients, the body, and the report.
//!
//! The scheduler builds an [`OutboundEnvelope`] and the [`Recipient`]s from the spool, hands a
//! [`MessageBody`] that can be read from the start once per transaction ([`FileBody`] for a
//! spool file, `[u8]` in tests), and gets a [`Report`] back: one [`Outcome`] per recipient by
//! its index, and the widest [`Trouble`].

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use postern_proto::address::{ForwardPath, ReversePath};
use postern_proto::params::{MailParams, RcptParams};
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncSeekExt, BufReader, ReadBuf};

use super::trouble::{Outcome, Scope, Trouble};

/// The envelope of one message, as the spool holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundEnvelope {
    /// MAIL FROM.
    pub from: ReversePath,
    /// The parameters the message arrived with (BODY, SMTPUTF8, RET, ENVID); only those the
    /// store offers are sent on.
    pub params: MailParams,
    /// The size of the content in octets (sent as SIZE=, checked against the store's limit).
    pub size: u64,
    /// The content has octets above 127 (as found when it was received).
    pub eight_bit: bool,
    /// When the message was queued (for the normalisation rules with `max_age`).
    pub arrived: SystemTime,
}

impl OutboundEnvelope {
    /// An envelope with no parameters, arrived now.
    pub fn new(from: ReversePath, size: u64) -> Self {
        Self {
            from,
            params: MailParams::default(),
            size,
            eight_bit: false,
            arrived: SystemTime::now(),
        }
    }
}

/// One recipient of a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The caller's index (its ledger slot); outcomes are reported under it.
    pub index: usize,
    /// RCPT TO.
    pub path: ForwardPath,
    /// The recipient's parameters (NOTIFY, ORCPT); sent only if the store offers DSN.
    pub params: RcptParams,
}

/// What one transaction (or one message through the pool) came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One outcome per recipient, by the caller's index, in the order they were decided.
    pub outcomes: Vec<(usize, Outcome)>,
    /// The widest failure beyond single recipients, if any.
    pub trouble: Option<Trouble>,
    /// The store's latency for the concurrency window, when the agent measures one: the
    /// phases whose length does not depend on the message's size (getting a connection —
    /// for a new one the greeting and LHLO —, the MAIL and RCPT round trips) plus the wait
    /// for the replies after the end of data, whole up to 64 KiB of content and per 64 KiB
    /// above. Never the time spent writing the content.
    pub latency: Option<std::time::Duration>,
    /// The transaction ran on a connection opened for it: its latency includes the store's
    /// greeting (where a process-per-session store queues new sessions) and LHLO, which a
    /// transaction on a reused connection does not pay.
    pub new_connection: bool,
    /// How long the transaction waited to get its connection: for an idle pooled one, next
    /// to nothing (or an RSET); else a sibling's given back, or a new one's connect,
    /// greeting and LHLO. Part of `latency`.
    pub connection_wait: std::time::Duration,
}

impl Report {
    /// How wide the failure is: [`Scope::Recipient`] when nothing beyond the recipients'
    /// own replies went wrong.
    pub fn scope(&self) -> Scope {
        self.trouble.as_ref().map_or(Scope::Recipient, |t| t.scope)
    }

    /// The outcome of the recipient with this index.
    pub fn outcome(&self, index: usize) -> Option<&Outcome> {
        self.outcomes
            .iter()
            .find_map(|(i, o)| (*i == index).then_some(o))
    }

    /// Adds another transaction's report (the same message, more recipients).
    pub fn merge(&mut self, other: Self) {
        self.outcomes.extend(other.outcomes);
        self.latency = self.latency.max(other.latency);
        self.new_connection |= other.new_connection;
        self.connection_wait = self.connection_wait.max(other.connection_wait);
        if let Some(t) = other.trouble {
            self.trouble = Trouble::widen(self.trouble.take(), t);
        }
    }
}

/// A message body that can be read from the start as often as needed (once per
/// transaction: a message with more recipients than `recipients_per_transaction` is sent
/// several times).
pub trait MessageBody: Sync {
    /// The reader of one pass. Buffered: an agent that transforms the octets anyway (the
    /// DATA encoder's dot-stuffing) reads them where they lie, with no copy of its own.
    type Reader<'a>: AsyncBufRead + Unpin + Send + 'a
    where
        Self: 'a;

    /// A reader positioned at the first octet of the content.
    fn open(&self) -> impl Future<Output = io::Result<Self::Reader<'_>>> + Send;
}

/// `AsyncRead::poll_read` for a reader that lends its octets: copies what
/// [`AsyncBufRead::poll_fill_buf`] lends into `buf` and consumes it. For the body readers,
/// whose agents mostly read the lent buffer directly.
pub(crate) fn read_lent<R: AsyncBufRead + ?Sized>(
    mut reader: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    let lent = ready!(reader.as_mut().poll_fill_buf(cx))?;
    let n = buf.remaining().min(lent.len());
    buf.put_slice(&lent[..n]);
    reader.consume(n);
    Poll::Ready(Ok(()))
}

impl MessageBody for [u8] {
    type Reader<'a> = &'a [u8];

    fn open(&self) -> impl Future<Output = io::Result<&[u8]>> + Send {
        std::future::ready(Ok(self))
    }
}

/// A body stored in a file: `len` octets from `offset` (the spool's content section).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileBody {
    /// The file.
    pub path: PathBuf,
    /// Where the content starts.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
}

impl MessageBody for FileBody {
    type Reader<'a> = BufReader<tokio::io::Take<tokio::fs::File>>;

    async fn open(&self) -> io::Result<Self::Reader<'_>> {
        let mut file = tokio::fs::File::open(&self.path).await?;
        file.seek(io::SeekFrom::Start(self.offset)).await?;
        Ok(BufReader::new(file.take(self.len)))
    }
}
