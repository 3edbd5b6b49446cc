//! Mail loops at delivery: a message that already carries `Delivered-To: <recipient>`.
//!
//! postern's maildir store prepends `Delivered-To: <recipient>` (as Postfix's local and
//! virtual do); LMTP stores add their own (Dovecot does, and a Sieve redirect keeps it).
//! A message that comes back to the same recipient with that header was delivered there
//! already and forwarded back: delivering it again would go round forever. Such a recipient
//! is bounced `554 5.4.6` (RFC 3463: routing loop detected), whichever store added the
//! header, as Postfix's local(8) does. postern does not add `Delivered-To:` to LMTP
//! deliveries itself: the stores do, and Postfix's lmtp(8) does not either.
//!
//! [`delivered_to`] reads the header section (at most [`MAX_HEADER`] octets) once per
//! attempt, from memory when the spool handed the body over; [`is_loop`] compares
//! addresses case-insensitively.

use std::io::Read;

use crate::spool::{QueueId, Spool};

/// The most of a message's start read for its header section.
pub(crate) const MAX_HEADER: usize = 256 * 1024;

/// The `Delivered-To:` addresses in a header section (unfolded, angle brackets and
/// surrounding spaces removed, lower-cased). Stops at the first empty line.
pub(crate) fn parse(header: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in header.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(c) = current.as_mut() {
                c.push_str(text.trim());
            }
            continue;
        }
        if let Some(c) = current.take() {
            out.push(c);
        }
        if let Some((name, value)) = text.split_once(':') {
            if name.trim().eq_ignore_ascii_case("delivered-to") {
                current = Some(value.trim().to_owned());
            }
        }
    }
    out.extend(current);
    out.into_iter()
        .map(|v| {
            v.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|v| !v.is_empty())
        .collect()
}

/// The message's `Delivered-To:` addresses (none if its body cannot be read: the delivery
/// itself then reports that). `held` is the body if the spool handed it over from memory.
pub(crate) fn delivered_to(spool: &Spool, qid: QueueId, held: Option<&[u8]>) -> Vec<String> {
    if let Some(body) = held {
        return parse(&body[..body.len().min(MAX_HEADER)]);
    }
    let Ok(body) = spool.open_body(qid) else {
        return Vec::new();
    };
    let mut header = Vec::new();
    let mut limited = body.take(MAX_HEADER as u64);
    let mut buf = [0u8; 8192];
    loop {
        // Only the new octets (and the three before them) can complete the empty line.
        let from = header.len().saturating_sub(3);
        match limited.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => header.extend_from_slice(&buf[..n]),
        }
        let new = &header[from..];
        if new.windows(4).any(|w| w == b"\r\n\r\n") || new.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    parse(&header)
}

/// `address` is among `delivered`.
pub(crate) fn is_loop(delivered: &[String], address: &str) -> bool {
    delivered.iter().any(|d| d.eq_ignore_ascii_case(address))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::tests::{opts, store};

    #[test]
    fn finds_delivered_to_in_the_header_only() {
        let m = b"Received: x\r\nDelivered-To: Alice@Example.ORG\r\ndelivered-to:\r\n <bob@b.test>\r\nSubject: s\r\n\r\nDelivered-To: body@x.test\r\n";
        let d = parse(m);
        assert_eq!(d, ["alice@example.org", "bob@b.test"]);
        assert!(is_loop(&d, "ALICE@example.org"));
        assert!(!is_loop(&d, "body@x.test"));
        assert!(!is_loop(&d, "carol@example.org"));
        assert!(parse(b"Subject: none\n\nDelivered-To: a@b\n").is_empty());
    }

    #[test]
    fn memory_and_disk_give_the_same_addresses() {
        let d = tempfile::tempdir().unwrap();
        let spool = Spool::open(d.path(), opts()).unwrap().0;
        // The disk path reads 8 KiB at a time and the empty line's CRLF CRLF straddles the
        // first read (octets 8190..8194); both paths stop there and take no body field.
        let mut content = b"Delivered-To: Alice@Example.org\r\nX-Pad: ".to_vec();
        content.resize(8160, b'p');
        content.extend_from_slice(
            b"\r\nDelivered-To:\r\n <bob@b.test>\r\n\r\nDelivered-To: body@x.test\r\n",
        );
        assert_eq!(&content[8190..8194], b"\r\n\r\n");
        let q = store(&spool, 1, &content);
        let (_, held) = spool.take_message(q).unwrap();
        let held = held.expect("held in memory");
        let want = ["alice@example.org", "bob@b.test"];
        assert_eq!(delivered_to(&spool, q, Some(&held)), want);
        assert_eq!(delivered_to(&spool, q, None), want);
        // A header section that never ends within the read: the start is still read.
        let q = store(&spool, 1, b"Delivered-To: carol@c.test\r\nSubject: no end");
        assert_eq!(delivered_to(&spool, q, None), ["carol@c.test"]);
    }
}
