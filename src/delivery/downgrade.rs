//! The body as a store without 8BITMIME (or without SMTPUTF8) may receive it.
//!
//! [`Downgrading`] wraps a message body reader and runs it through
//! [`postern_proto::downgrade::Downgrade`] on the fly: 8-bit MIME parts come out as
//! quoted-printable (RFC 6152 §3), streamed, so a 50 MiB body never sits in memory. [`Guard`]
//! says what may still not go out: after conversion, any octet above 127 left (8-bit headers,
//! or 8-bit content in a part declared 7-bit) to a store without 8BITMIME bounces `5.6.3`, and
//! 8-bit headers in a message that declared SMTPUTF8 to a store without SMTPUTF8 bounce
//! `5.6.7`. The agent checks each chunk before writing it, so nothing refused reaches the
//! store's final dot.
//!
//! Promises: without a [`Guard`] that needs it, the reader is the inner reader untouched (no
//! copy, no parsing: its buffer is lent through); with one, the converter reads the inner
//! reader's buffer in place, and memory is bounded by the converter's limits plus the
//! converted output of one of those buffers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use postern_proto::Reply;
use postern_proto::downgrade::Downgrade;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

use super::trouble;

/// The most of the inner reader's buffer the converter takes at once (its output for that
/// much is what is held).
const READ: usize = 64 * 1024;

/// What a store without 8BITMIME or SMTPUTF8 may not be sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Guard {
    /// The store does not offer 8BITMIME: 8-bit parts are converted, and any 8-bit octet
    /// left is refused.
    pub eight_bit: bool,
    /// The message declared SMTPUTF8 (with ASCII addresses) and the store does not offer
    /// it: the message goes without SMTPUTF8, so 8-bit headers are refused.
    pub utf8_headers: bool,
}

impl Guard {
    /// Some check is needed (the body must go through the converter).
    pub fn active(self) -> bool {
        self.eight_bit || self.utf8_headers
    }

    /// The bounce for `chunk` (converter output about to be sent), if it may not go out.
    pub fn check<R>(self, chunk: &[u8], body: &Downgrading<R>) -> Option<Reply> {
        if self.utf8_headers && body.eight_bit_headers() {
            return Some(trouble::needs_smtputf8());
        }
        if self.eight_bit && !chunk.is_ascii() {
            return Some(trouble::needs_8bitmime());
        }
        None
    }
}

/// A body reader converting 8-bit MIME parts to quoted-printable (see the module docs).
pub struct Downgrading<R> {
    inner: R,
    converter: Option<Downgrade>,
    out: Vec<u8>,
    pos: usize,
    done: bool,
}

impl<R> Downgrading<R> {
    /// Wraps `inner`: converted when `guard.eight_bit`, inspected when the guard is
    /// otherwise active, untouched when not.
    pub fn new(inner: R, guard: Guard) -> Self {
        Self {
            inner,
            converter: guard.active().then(|| Downgrade::new(guard.eight_bit)),
            out: Vec::new(),
            pos: 0,
            done: false,
        }
    }

    /// A header line with octets above 127 was read so far.
    pub fn eight_bit_headers(&self) -> bool {
        self.converter
            .as_ref()
            .is_some_and(Downgrade::eight_bit_headers)
    }

    /// How many parts were converted to quoted-printable so far.
    pub fn converted_parts(&self) -> usize {
        self.converter
            .as_ref()
            .map_or(0, Downgrade::converted_parts)
    }
}

impl<R: AsyncBufRead + Unpin> AsyncBufRead for Downgrading<R> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let Self {
            inner,
            converter,
            out,
            pos,
            done,
        } = self.get_mut();
        let Some(converter) = converter.as_mut() else {
            return Pin::new(inner).poll_fill_buf(cx);
        };
        // The converter reads the inner reader's buffer where it lies.
        while *pos >= out.len() && !*done {
            out.clear();
            *pos = 0;
            let raw = ready!(Pin::new(&mut *inner).poll_fill_buf(cx))?;
            if raw.is_empty() {
                converter.finish(out);
                *done = true;
            } else {
                let n = raw.len().min(READ);
                converter.feed(&raw[..n], out);
                Pin::new(&mut *inner).consume(n);
            }
        }
        Poll::Ready(Ok(out.get(*pos..).unwrap_or_default()))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        if this.converter.is_none() {
            Pin::new(&mut this.inner).consume(amt);
        } else {
            this.pos = this.pos.saturating_add(amt).min(this.out.len());
        }
    }
}

impl<R: AsyncBufRead + Unpin> AsyncRead for Downgrading<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        super::message::read_lent(self, cx, buf)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

    use tokio::io::AsyncReadExt;

    use super::*;

    async fn read_all(body: &[u8], guard: Guard) -> Vec<u8> {
        read_from(body, guard).await
    }

    async fn read_from<R: AsyncBufRead + Unpin>(body: R, guard: Guard) -> Vec<u8> {
        let mut reader = Downgrading::new(body, guard);
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = reader.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[tokio::test]
    async fn converts_only_when_asked() {
        let body = b"Content-Transfer-Encoding: 8bit\r\n\r\n\xe9t\xe9\r\n";
        let converted = read_all(
            body,
            Guard {
                eight_bit: true,
                utf8_headers: false,
            },
        )
        .await;
        assert_eq!(
            converted,
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=E9t=E9\r\n"
        );
        assert_eq!(read_all(body, Guard::default()).await, body);
        let inspected = read_all(
            body,
            Guard {
                eight_bit: false,
                utf8_headers: true,
            },
        )
        .await;
        assert_eq!(inspected, body);
    }

    #[tokio::test]
    async fn converts_the_same_whatever_the_inner_buffer_lends() {
        let body = b"Content-Transfer-Encoding: 8bit\r\n\r\n\xe9t\xe9 caf\xe9\r\n.\r\nfin\r\n";
        let guard = Guard {
            eight_bit: true,
            utf8_headers: false,
        };
        let whole = read_all(body, guard).await;
        assert!(whole.is_ascii(), "converted: {whole:?}");
        for capacity in [1, 2, 5, 13] {
            let piecemeal = read_from(
                tokio::io::BufReader::with_capacity(capacity, &body[..]),
                guard,
            )
            .await;
            assert_eq!(piecemeal, whole, "inner buffer of {capacity}");
        }
    }
}
