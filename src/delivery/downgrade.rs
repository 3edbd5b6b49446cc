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
//! copy, no parsing); with one, memory is bounded by the converter's limits plus one read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use postern_proto::Reply;
use postern_proto::downgrade::Downgrade;
use tokio::io::{AsyncRead, ReadBuf};

use super::trouble;

/// The size of the reads from the inner body when converting.
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
    raw: Vec<u8>,
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
            raw: Vec::new(),
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

impl<R: AsyncRead + Unpin> AsyncRead for Downgrading<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(converter) = this.converter.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        loop {
            if this.pos < this.out.len() {
                let n = (this.out.len() - this.pos).min(buf.remaining());
                buf.put_slice(&this.out[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.out.len() {
                    this.out.clear();
                    this.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.raw.len() < READ {
                this.raw.resize(READ, 0);
            }
            let mut raw = ReadBuf::new(&mut this.raw);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw))?;
            let filled = raw.filled();
            if filled.is_empty() {
                converter.finish(&mut this.out);
                this.done = true;
            } else {
                converter.feed(filled, &mut this.out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

    use tokio::io::AsyncReadExt;

    use super::*;

    async fn read_all(body: &[u8], guard: Guard) -> Vec<u8> {
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
}
