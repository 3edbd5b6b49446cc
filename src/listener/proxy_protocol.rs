//! The PROXY protocol header that a trusted load balancer sends before the session
//! (`listeners[].proxy_protocol`).
//!
//! Owns reading the header off the connection — bounded by
//! [`postern_proto::proxy::MAX_HEADER`] and by the listener's `proxy_protocol.timeout`,
//! parsed by [`postern_proto::proxy`] — and handing the session the bytes that came after it
//! ([`Rewind`]). Promises: nothing is written to the connection before a whole, valid header
//! has been read (a refused connection gets no banner); the carried client address is the
//! one the session uses for relay control, limits, logs and its Received line.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use postern_proto::proxy::{self, MAX_HEADER, Parsed, ProxyError, ProxyHeader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Why a connection got no session.
#[derive(Debug)]
pub(crate) enum HeaderFailure {
    /// Nothing whole within the timeout.
    Timeout,
    /// The peer closed or the read failed before a whole header.
    Closed,
    /// Not an acceptable header.
    Bad(ProxyError),
}

impl fmt::Display for HeaderFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("no PROXY protocol header in time"),
            Self::Closed => f.write_str("closed before a whole PROXY protocol header"),
            Self::Bad(e) => e.fmt(f),
        }
    }
}

/// Reads the header at the start of `stream`: the client it names (`peer` itself for a
/// `LOCAL` header, the balancer's own connection) and the bytes read past it.
pub(crate) async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: Option<IpAddr>,
    limit: Duration,
) -> Result<(Option<IpAddr>, Vec<u8>), HeaderFailure> {
    let mut buf = Vec::with_capacity(256);
    let read = async {
        let mut chunk = [0u8; 512];
        loop {
            match proxy::parse(&buf) {
                Ok(Parsed::Header { header, consumed }) => {
                    let client = match header {
                        ProxyHeader::Proxied { source, .. } => Some(source.ip()),
                        ProxyHeader::Local => peer,
                    };
                    return Ok((client, buf.split_off(consumed)));
                }
                Ok(Parsed::Incomplete) => {}
                Err(e) => return Err(HeaderFailure::Bad(e)),
            }
            let room = (MAX_HEADER + 1).saturating_sub(buf.len()).min(chunk.len());
            match stream.read(&mut chunk[..room.max(1)]).await {
                Ok(0) | Err(_) => return Err(HeaderFailure::Closed),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or(Err(HeaderFailure::Timeout))
}

/// Does a command chunk begin with a PROXY header (a second one, inside the session)?
pub(crate) fn starts_with_header(input: &[u8]) -> bool {
    input.starts_with(b"PROXY ") || input.starts_with(b"\r\n\r\n\0\r\nQUIT\n")
}

/// A stream that yields some bytes already read before its own.
pub(crate) struct Rewind<S> {
    pre: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// `pre` first, then `inner`.
    pub(crate) fn new(pre: Vec<u8>, inner: S) -> Self {
        Self { pre, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.pre.len() {
            let n = (self.pre.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.pre[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
