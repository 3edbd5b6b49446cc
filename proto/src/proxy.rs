//! PROXY protocol headers (HAProxy's `proxy-protocol.txt`, versions 1 and 2), read at the start
//! of a connection from a trusted load balancer, sans-IO.
//!
//! A listener that trusts its peer to send a header feeds the first bytes of the connection to
//! [`parse`] until it answers [`Parsed::Header`] (the header and how many bytes it took) or an
//! error; [`Parsed::Incomplete`] asks for more. The parsing itself is the `ppp` crate's; this
//! module owns the policy around it:
//!
//! - **Bounded.** A header longer than [`MAX_HEADER`] octets (a v1 line over the spec's 107, or
//!   a v2 length past it) is [`ProxyError::TooLong`], decided as soon as the bytes seen say so.
//! - **Fail fast.** Bytes that cannot begin either signature are [`ProxyError::NotProxy`] at
//!   once, so a client speaking SMTP straight to a PROXY listener is not kept waiting.
//! - **Strict.** Every v2 TLV must be well formed, the address block must fit the family, and
//!   only TCP over IPv4/IPv6 carries an address; anything else is [`ProxyError::Malformed`].
//! - **What it means.** [`ProxyHeader::Proxied`] carries the client's address (the source)
//!   and the address it connected to; [`ProxyHeader::Local`] — v2 `LOCAL` (a health check),
//!   v1 `UNKNOWN`, v2 `UNSPEC` or a unix-socket family — says: keep the connection's own
//!   addresses.
//!
//! What to do on an error is the caller's (postern closes the connection without a banner).

use std::fmt;
use std::net::SocketAddr;

use ppp::v1;
use ppp::v2::{self, Command, Protocol};

/// The longest header accepted, in octets: a v2 header with room for the TLVs HAProxy sends
/// (SSL details, unique id, authority). A v1 line is at most 107 by the spec.
pub const MAX_HEADER: usize = 1024;

/// The longest v1 line, `\r\n` included (the spec's 107 octets).
pub const MAX_V1: usize = 107;

/// The v2 signature's twelve octets.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// The v1 prefix.
const V1_PREFIX: &[u8] = b"PROXY ";

/// What a header said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The connection was relayed for `source` (the client), which connected to
    /// `destination`.
    Proxied {
        /// The client's address.
        source: SocketAddr,
        /// The address the client connected to (the load balancer's front).
        destination: SocketAddr,
    },
    /// Keep the connection's own addresses: v2 `LOCAL` (the balancer's own health check), v1
    /// `UNKNOWN`, an unspecified or unix-socket family.
    Local,
}

/// How far [`parse`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header, `consumed` octets long; what follows it is the session.
    Header {
        /// The header.
        header: ProxyHeader,
        /// Its length in octets.
        consumed: usize,
    },
    /// A header may follow: read more (up to [`MAX_HEADER`] in all).
    Incomplete,
}

/// Why the bytes are not an acceptable header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// Neither signature: not a PROXY header at all.
    NotProxy,
    /// Longer than [`MAX_HEADER`] (or a v1 line over [`MAX_V1`]).
    TooLong,
    /// A header, but broken: the reason, for the log.
    Malformed(String),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotProxy => f.write_str("not a PROXY protocol header"),
            Self::TooLong => write!(f, "PROXY protocol header over {MAX_HEADER} octets"),
            Self::Malformed(why) => write!(f, "malformed PROXY protocol header: {why}"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Reads a header from the start of `input` (all the connection's bytes so far).
pub fn parse(input: &[u8]) -> Result<Parsed, ProxyError> {
    if could_be(input, V2_SIGNATURE) {
        parse_v2(input)
    } else if could_be(input, V1_PREFIX) {
        parse_v1(input)
    } else {
        Err(ProxyError::NotProxy)
    }
}

/// Version 1: one line. Parsed once its end is in (a prefix of a line can look like a
/// finished but wrong one: `… 12345 ` before the port), refused past [`MAX_V1`].
fn parse_v1(input: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &input[..input.len().min(MAX_V1)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if input.len() >= MAX_V1 {
            Err(ProxyError::TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = &input[..end + 2];
    let h = v1::Header::try_from(line).map_err(|e| ProxyError::Malformed(format!("v1: {e}")))?;
    let header = match h.addresses {
        v1::Addresses::Tcp4(a) => ProxyHeader::Proxied {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        },
        v1::Addresses::Tcp6(a) => ProxyHeader::Proxied {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        },
        v1::Addresses::Unknown => ProxyHeader::Local,
    };
    Ok(Parsed::Header {
        header,
        consumed: line.len(),
    })
}

/// Version 2: the signature, version and command, family and protocol, a length, then the
/// address block and TLVs.
fn parse_v2(input: &[u8]) -> Result<Parsed, ProxyError> {
    if input.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let consumed = 16 + usize::from(u16::from_be_bytes([input[14], input[15]]));
    if consumed > MAX_HEADER {
        return Err(ProxyError::TooLong);
    }
    if input.len() < consumed {
        return Ok(Parsed::Incomplete);
    }
    match input[12] {
        // LOCAL: the balancer's own connection (a health check). The spec has the receiver
        // ignore the family and address block, whatever they hold.
        0x20 => Ok(Parsed::Header {
            header: ProxyHeader::Local,
            consumed,
        }),
        0x21 => {
            let h = v2::Header::try_from(&input[..consumed])
                .map_err(|e| ProxyError::Malformed(format!("v2: {e}")))?;
            v2_header(&h)
        }
        other => Err(ProxyError::Malformed(format!(
            "v2: version and command octet {other:#04x}"
        ))),
    }
}

/// The meaning of a whole v2 header, its TLVs checked.
fn v2_header(h: &v2::Header<'_>) -> Result<Parsed, ProxyError> {
    if let Some(Err(e)) = h.tlvs().find(Result::is_err) {
        return Err(ProxyError::Malformed(format!("v2 TLV: {e}")));
    }
    let consumed = h.len();
    let header = match h.command {
        Command::Local => ProxyHeader::Local,
        Command::Proxy => match (h.protocol, h.addresses) {
            (_, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => ProxyHeader::Local,
            (Protocol::Stream, v2::Addresses::IPv4(a)) => ProxyHeader::Proxied {
                source: (a.source_address, a.source_port).into(),
                destination: (a.destination_address, a.destination_port).into(),
            },
            (Protocol::Stream, v2::Addresses::IPv6(a)) => ProxyHeader::Proxied {
                source: (a.source_address, a.source_port).into(),
                destination: (a.destination_address, a.destination_port).into(),
            },
            (Protocol::Datagram | Protocol::Unspecified, _) => {
                return Err(ProxyError::Malformed(
                    "v2: an address over a transport other than TCP".into(),
                ));
            }
        },
    };
    Ok(Parsed::Header { header, consumed })
}

/// Are the bytes seen so far a prefix of `signature`, or do they start with it?
fn could_be(input: &[u8], signature: &[u8]) -> bool {
    let n = input.len().min(signature.len());
    input[..n] == signature[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_ipv4(command: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(command);
        h.push(0x11); // TCP over IPv4
        h.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    const ADDRS: [u8; 12] = [192, 0, 2, 7, 10, 0, 0, 1, 0x30, 0x39, 0, 25];

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 12345 25\r\nEHLO x\r\n";
        assert_eq!(
            parse(line),
            Ok(Parsed::Header {
                header: ProxyHeader::Proxied {
                    source: "192.0.2.7:12345".parse().unwrap(),
                    destination: "10.0.0.1:25".parse().unwrap(),
                },
                consumed: 40,
            })
        );
        let six = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n";
        assert!(matches!(
            parse(six),
            Ok(Parsed::Header { header: ProxyHeader::Proxied { source, .. }, .. })
                if source == "[2001:db8::7]:40000".parse().unwrap()
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Header {
                header: ProxyHeader::Local,
                consumed: 15
            })
        );
    }

    #[test]
    fn partial_headers_ask_for_more_at_every_cut() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 12345 25\r\n";
        for n in 0..line.len() {
            assert_eq!(parse(&line[..n]), Ok(Parsed::Incomplete), "cut at {n}");
        }
        let v2 = v2_ipv4(0x21, &ADDRS);
        for n in 0..v2.len() {
            assert_eq!(parse(&v2[..n]), Ok(Parsed::Incomplete), "cut at {n}");
        }
    }

    #[test]
    fn v2_proxy_and_local() {
        let h = v2_ipv4(0x21, &ADDRS);
        assert_eq!(
            parse(&h),
            Ok(Parsed::Header {
                header: ProxyHeader::Proxied {
                    source: "192.0.2.7:12345".parse().unwrap(),
                    destination: "10.0.0.1:25".parse().unwrap(),
                },
                consumed: 28,
            })
        );
        let local = v2_ipv4(0x20, &[]);
        assert_eq!(
            parse(&local),
            Ok(Parsed::Header {
                header: ProxyHeader::Local,
                consumed: 16
            })
        );
    }

    #[test]
    fn bad_headers_are_refused() {
        // SMTP straight to a PROXY listener: refused at the first octet that cannot fit.
        assert_eq!(parse(b"EHLO client\r\n"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"PROXZ"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Err(ProxyError::NotProxy));
        // A v1 line without its end, past the spec's length.
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Err(ProxyError::TooLong));
        // A v2 length past the bound, decided from the length field alone.
        let mut big = v2_ipv4(0x21, &ADDRS);
        big[14..16].copy_from_slice(&4000u16.to_be_bytes());
        assert_eq!(parse(&big[..16]), Err(ProxyError::TooLong));
        // Garbage TLV after the addresses.
        let tlv = v2_ipv4(0x21, &[ADDRS.as_slice(), &[0x04, 0x00, 0x09, 1]].concat());
        assert!(
            matches!(parse(&tlv), Err(ProxyError::Malformed(_))),
            "{:?}",
            parse(&tlv)
        );
        // Family IPv4 with too short an address block.
        let short = v2_ipv4(0x21, &ADDRS[..6]);
        assert!(
            matches!(parse(&short), Err(ProxyError::Malformed(_))),
            "{:?}",
            parse(&short)
        );
        // A v2 address over UDP.
        let mut udp = v2_ipv4(0x21, &ADDRS);
        udp[13] = 0x12;
        assert!(matches!(parse(&udp), Err(ProxyError::Malformed(_))));
        // Version 1 written in binary form, and a bad v1 address.
        let mut v1bin = v2_ipv4(0x21, &ADDRS);
        v1bin[12] = 0x11;
        assert!(matches!(parse(&v1bin), Err(ProxyError::Malformed(_))));
        assert!(matches!(
            parse(b"PROXY TCP4 300.0.2.7 10.0.0.1 1 25\r\n"),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 2001:db8::1 10.0.0.1 1 25\r\n"),
            Err(ProxyError::Malformed(_))
        ));
    }

    #[test]
    fn well_formed_tlvs_pass() {
        // NOOP with one octet, then AUTHORITY "mx".
        let tlvs = [0x04, 0x00, 0x01, 42, 0x02, 0x00, 0x02, b'm', b'x'];
        let h = v2_ipv4(0x21, &[ADDRS.as_slice(), &tlvs].concat());
        assert!(matches!(
            parse(&h),
            Ok(Parsed::Header {
                header: ProxyHeader::Proxied { .. },
                consumed: 37
            })
        ));
    }
}
