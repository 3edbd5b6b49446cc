//! The `Received:` trace header we prepend (RFC 5321 §4.4) and the loop checks we make.
//!
//! Our header names this gateway as `by HOST (postern node N)`: the host name and the
//! `node_id`, so that gateways in a chain (edge gateways in front of a concentrator) can tell
//! each other apart even when they share a host name.
//!
//! [`HopCounter`] reads the header section of a message as it streams past, in chunks of any
//! size, holding no more than one header name and one partial match: it counts `Received:`
//! fields (more than [`MAX_HOPS`] is a mail loop, 554 5.4.6, RFC 5321 §6.3), and, given our
//! own marker, notices a `Received:` field (folded or not, any case, any run of white space)
//! that says this very node handled the message already: a loop too, however short the
//! chain.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

/// More `Received:` fields than this is a loop.
pub const MAX_HOPS: usize = 50;

/// What goes into one `Received:` header.
#[derive(Debug)]
pub(crate) struct Trace<'a> {
    /// The name the client gave in HELO/EHLO/LHLO.
    pub helo: &'a str,
    /// The client's address (none for a unix socket).
    pub peer: Option<IpAddr>,
    /// Our host name.
    pub hostname: &'a str,
    /// Our `node_id`.
    pub node_id: u16,
    /// `SMTP`, `ESMTP`, `ESMTPS`, `LMTP`, … (RFC 3848).
    pub with: &'a str,
    /// The queue id.
    pub queue_id: &'a str,
    /// The recipient, when there is exactly one.
    pub recipient: Option<&'a str>,
    /// TLS details, when TLS is active.
    pub tls: Option<&'a str>,
    /// When.
    pub now: SystemTime,
}

/// Formats the header, folded, CRLF-terminated.
pub(crate) fn received_header(t: &Trace<'_>) -> String {
    let mut h = String::with_capacity(256);
    let peer = match t.peer {
        Some(IpAddr::V4(a)) => format!("[{a}]"),
        Some(IpAddr::V6(a)) => format!("[IPv6:{a}]"),
        None => "localhost".to_owned(),
    };
    let _ = write!(
        h,
        "Received: from {} ({peer})\r\n\tby {} (postern node {}) with {} id {}",
        clean(t.helo),
        t.hostname,
        t.node_id,
        t.with,
        t.queue_id
    );
    if let Some(tls) = t.tls {
        let _ = write!(h, "\r\n\t(using {tls})");
    }
    if let Some(rcpt) = t.recipient {
        let _ = write!(h, "\r\n\tfor <{}>", clean(rcpt));
    }
    let _ = write!(h, ";\r\n\t{}\r\n", crate::date::rfc5322(t.now));
    h
}

/// Keeps a client-supplied word from breaking the header.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && *c != '(' && *c != ')' && *c != ';')
        .take(255)
        .collect()
}

/// The words of our `Received:` header that identify this node: `by HOST (postern node N)`.
///
/// Matching starts at a word boundary (a leading space), is case-insensitive, and treats
/// every run of white space (including a fold) as one space; `clean` strips parentheses
/// from what a client writes into our header, so a HELO name cannot forge the marker there.
pub fn own_marker(hostname: &str, node_id: u16) -> String {
    format!(
        " by {} (postern node {node_id})",
        hostname.to_ascii_lowercase()
    )
}

/// Counts `Received:` header fields while the message streams past, and looks for our own
/// marker in them.
#[derive(Debug, Default)]
pub struct HopCounter {
    hops: usize,
    /// The start of the current line, up to the length of "received:".
    line_start: Vec<u8>,
    /// Inside a line whose first octets were already judged.
    mid_line: bool,
    /// After the empty line that ends the header section.
    body: bool,
    /// A CR was the last octet of the previous chunk.
    pending_cr: bool,
    /// Inside a `Received:` field (after its name, through its continuation lines).
    in_received: bool,
    /// Our marker, when we look for it.
    marker: Option<Matcher>,
    /// Our marker was found in a `Received:` field.
    own: bool,
}

const NAME: &[u8] = b"received:";

impl HopCounter {
    /// A counter that also looks for `marker` (see [`own_marker`]) in `Received:` fields.
    pub fn with_marker(marker: &str) -> Self {
        Self {
            marker: Matcher::new(marker.as_bytes()),
            ..Self::default()
        }
    }

    /// Feeds message octets (as stored: CRLF line endings).
    pub fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if self.body {
                return;
            }
            if b == b'\n' {
                if !self.mid_line && self.line_start.is_empty() {
                    // An empty line (CRLF alone): the header section is over.
                    self.body = true;
                }
                self.line_start.clear();
                self.mid_line = false;
                self.pending_cr = false;
                self.scan(b' ');
                continue;
            }
            if b == b'\r' {
                self.pending_cr = true;
                continue;
            }
            if !self.mid_line && self.line_start.is_empty() && b != b' ' && b != b'\t' {
                // A new field begins (a continuation line would start with white space).
                self.in_received = false;
            }
            self.scan(b);
            if self.mid_line {
                continue;
            }
            self.line_start.push(b.to_ascii_lowercase());
            if self.line_start.len() == NAME.len() {
                if self.line_start == NAME {
                    self.hops += 1;
                    self.in_received = true;
                    if let Some(m) = self.marker.as_mut() {
                        m.restart();
                    }
                }
                self.mid_line = true;
            } else if !NAME.starts_with(&self.line_start) {
                self.mid_line = true;
            }
        }
    }

    /// One octet of a `Received:` field's value into the marker search.
    fn scan(&mut self, b: u8) {
        if !self.in_received {
            return;
        }
        if let Some(m) = self.marker.as_mut() {
            self.own |= m.feed(b);
        }
    }

    /// `Received:` fields seen so far.
    pub fn hops(&self) -> usize {
        self.hops
    }

    /// Our own marker was in a `Received:` field: this node handled the message before.
    pub fn seen_own_marker(&self) -> bool {
        self.own
    }

    /// More than [`MAX_HOPS`], or our own marker seen.
    pub fn is_loop(&self) -> bool {
        self.hops > MAX_HOPS || self.own
    }
}

/// A streaming substring search (Knuth–Morris–Pratt) over lower-cased octets with white
/// space runs collapsed to one space.
#[derive(Debug)]
struct Matcher {
    needle: Vec<u8>,
    /// `fail[i]`: the longest proper border of `needle[..=i]`.
    fail: Vec<usize>,
    matched: usize,
    last_space: bool,
}

impl Matcher {
    fn new(needle: &[u8]) -> Option<Self> {
        let needle: Vec<u8> = needle.iter().map(u8::to_ascii_lowercase).collect();
        if needle.is_empty() {
            return None;
        }
        let mut fail = vec![0; needle.len()];
        let mut k = 0;
        for i in 1..needle.len() {
            while k > 0 && needle[i] != needle[k] {
                k = fail[k - 1];
            }
            if needle[i] == needle[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Some(Self {
            needle,
            fail,
            matched: 0,
            last_space: false,
        })
    }

    /// A new field: forget any partial match; the field's value starts after a boundary.
    fn restart(&mut self) {
        self.matched = 0;
        self.last_space = false;
        self.feed(b' ');
    }

    /// One octet; true when it completes a match.
    fn feed(&mut self, b: u8) -> bool {
        let c = if matches!(b, b' ' | b'\t' | b'\r' | b'\n') {
            if self.last_space {
                return false;
            }
            self.last_space = true;
            b' '
        } else {
            self.last_space = false;
            b.to_ascii_lowercase()
        };
        while self.matched > 0 && self.needle[self.matched] != c {
            self.matched = self.fail[self.matched - 1];
        }
        if self.needle[self.matched] == c {
            self.matched += 1;
        }
        if self.matched == self.needle.len() {
            self.matched = self.fail[self.matched - 1];
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn header_shape() {
        let h = received_header(&Trace {
            helo: "client.example",
            peer: Some("192.0.2.7".parse().unwrap()),
            hostname: "mx.test",
            node_id: 7,
            with: "ESMTPS",
            queue_id: "Q1",
            recipient: Some("a@example.org"),
            tls: Some("version=TLSv1_3"),
            now: UNIX_EPOCH,
        });
        assert_eq!(
            h,
            "Received: from client.example ([192.0.2.7])\r\n\tby mx.test (postern node 7) with ESMTPS id Q1\r\n\t(using version=TLSv1_3)\r\n\tfor <a@example.org>;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"
        );
        let injected = received_header(&Trace {
            helo: "x\r\nBcc: evil",
            peer: None,
            hostname: "h",
            node_id: 1,
            with: "SMTP",
            queue_id: "Q",
            recipient: None,
            tls: None,
            now: UNIX_EPOCH,
        });
        assert!(!injected.contains("\r\nBcc"), "{injected}");
    }

    #[test]
    fn hop_counting_any_chunking() {
        let mut msg = String::new();
        for _ in 0..3 {
            msg.push_str("Received: from a by b\r\n\tcontinued\r\n");
        }
        msg.push_str(
            "RECEIVED: x\r\nX-Received: no\r\nSubject: received: no\r\n\r\nReceived: in body\r\n",
        );
        let whole = {
            let mut c = HopCounter::default();
            c.feed(msg.as_bytes());
            c.hops()
        };
        assert_eq!(whole, 4);
        for size in 1..12 {
            let mut c = HopCounter::default();
            for chunk in msg.as_bytes().chunks(size) {
                c.feed(chunk);
            }
            assert_eq!(c.hops(), 4, "chunk size {size}");
        }
        let mut c = HopCounter::default();
        c.feed("Received: x\r\n".repeat(51).as_bytes());
        assert!(c.is_loop());
    }

    fn own(msg: &str, chunk: usize) -> bool {
        let mut c = HopCounter::with_marker(&own_marker("MX.test", 7));
        for part in msg.as_bytes().chunks(chunk) {
            c.feed(part);
        }
        assert_eq!(
            c.is_loop(),
            c.seen_own_marker(),
            "few hops: only the marker loops"
        );
        c.seen_own_marker()
    }

    #[test]
    fn own_marker_in_a_received_field_is_a_loop() {
        let ours = received_header(&Trace {
            helo: "edge.test",
            peer: None,
            hostname: "mx.test",
            node_id: 7,
            with: "LMTP",
            queue_id: "Q",
            recipient: None,
            tls: None,
            now: UNIX_EPOCH,
        });
        let refolded = "Received: from edge.test (localhost) BY   mx.TEST\r\n (postern\r\n\tnode 7) with LMTP;\r\n\tdate\r\n";
        let cases: &[(&str, bool)] = &[
            (&ours, true),
            (refolded, true),
            // Another node, another host, a longer node id: not us.
            (
                "Received: from a by mx.test (postern node 8) with ESMTP\r\n",
                false,
            ),
            (
                "Received: from a by mx.test (postern node 70) with ESMTP\r\n",
                false,
            ),
            (
                "Received: from a by xmx.test (postern node 7) with ESMTP\r\n",
                false,
            ),
            (
                "Received: from a by other.test (postern node 7) with ESMTP\r\n",
                false,
            ),
            // Our words outside a Received field, or after the header section.
            ("Subject: by mx.test (postern node 7)\r\n", false),
            ("X-Received: from a by mx.test (postern node 7)\r\n", false),
            (
                "Received: from a\r\nX: by mx.test (postern node 7)\r\n",
                false,
            ),
            (
                "Subject: hi\r\n\r\nReceived: from a by mx.test (postern node 7)\r\n",
                false,
            ),
        ];
        for (header, want) in cases {
            let msg = format!(
                "Received: from z by y (postern node 1)\r\n{header}Subject: x\r\n\r\nbody\r\n"
            );
            for size in [1, 2, 3, 5, 7, 11, 64, 4096] {
                assert_eq!(own(&msg, size), *want, "chunk {size}: {header:?}");
            }
        }
    }
}
