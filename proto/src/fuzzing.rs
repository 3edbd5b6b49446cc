//! Entry points for the fuzz targets (`proto/fuzz`), and for the proptests that drive them.
//!
//! This module is `#[doc(hidden)]`: it is public only so that the fuzz crate can call it.
//! Every function takes arbitrary bytes, must never panic on them, and checks the
//! invariants of one part of the crate with `assert!`: a fuzzer finding a panic here has
//! found either a crash or a broken promise. Where a simple, obviously correct (and slow)
//! reference model exists, the entry point compares the real code with it.
//!
//! Fuzz inputs are often mapped onto a small alphabet first ([`into_alphabet`]), so that the
//! fuzzer spends its time on the octets the protocol cares about.

use crate::data::{BareLineEndings, DataDecoder, DataEncoder};
use crate::line::{Frame, LineFramer, Status};

/// Octets that matter to SMTP commands and replies (after Stalwart's `smtp-proto` fuzz).
pub const SMTP_ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz:=-<>,; .\r\n";

/// Octets that matter to the DATA codec.
pub const DATA_ALPHABET: &[u8] = b"\r\n.a ";

/// Maps each octet of `data` onto `alphabet` (octet value modulo the alphabet size). An empty
/// alphabet leaves `data` unchanged.
#[must_use]
pub fn into_alphabet(data: &[u8], alphabet: &[u8]) -> Vec<u8> {
    if alphabet.is_empty() {
        return data.to_vec();
    }
    data.iter()
        .map(|&b| alphabet[usize::from(b) % alphabet.len()])
        .collect()
}

/// Reads a control header from the front of a fuzz input: one flags octet, then up to seven
/// chunk sizes (their count is in bits 2..5 of the flags). Returns the flags, the sizes and
/// the rest of the input.
fn header(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let Some((&flags, rest)) = input.split_first() else {
        return (0, &[], &[]);
    };
    let n = usize::from((flags >> 2) & 7).min(rest.len());
    let (sizes, rest) = rest.split_at(n);
    (flags, sizes, rest)
}

/// Cuts `data` into chunks whose sizes cycle through `sizes` (zero sizes give empty chunks).
fn chunks<'a>(data: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    if sizes.iter().all(|&s| s == 0) {
        return vec![data];
    }
    let mut out = Vec::new();
    let mut rest = data;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(usize::from(size).min(rest.len()));
        out.push(chunk);
        rest = tail;
    }
    out
}

// ---------------------------------------------------------------------------------------
// line
// ---------------------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
enum LineEvent {
    Line(Vec<u8>),
    TooLong,
}

/// The caller model for [`LineFramer`]: events, bytes left buffered, discard mode.
fn frame_chunks(max: usize, chunks: &[&[u8]]) -> (Vec<LineEvent>, Vec<u8>, bool) {
    let mut framer = LineFramer::new(max);
    let mut buf = Vec::new();
    let mut events = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let (consumed, status) = framer.frame(&buf);
            assert!(consumed <= buf.len());
            match status {
                Status::Complete(Frame::Line(line)) => {
                    assert!(consumed > 0);
                    assert!(line.len() < framer.max_len());
                    assert!(!line.contains(&b'\n'));
                    events.push(LineEvent::Line(line.to_vec()));
                }
                Status::Complete(Frame::TooLong) => {
                    assert!(consumed > 0);
                    events.push(LineEvent::TooLong);
                }
                Status::Partial => {}
            }
            let partial = status == Status::Partial;
            buf.drain(..consumed);
            if partial {
                assert!(buf.len() < framer.max_len());
                break;
            }
        }
    }
    (events, buf, framer.is_discarding())
}

/// Reference model of line framing: split at every LF.
fn frame_reference(max: usize, data: &[u8]) -> (Vec<LineEvent>, Vec<u8>, bool) {
    let mut events = Vec::new();
    let mut rest = data;
    while let Some(lf) = rest.iter().position(|&b| b == b'\n') {
        let (segment, tail) = rest.split_at(lf + 1);
        if segment.len() <= max {
            let line = &segment[..lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            events.push(LineEvent::Line(line.to_vec()));
        } else {
            events.push(LineEvent::TooLong);
        }
        rest = tail;
    }
    if rest.len() >= max {
        (events, Vec::new(), true)
    } else {
        (events, rest.to_vec(), false)
    }
}

/// Line framing: chunk independence, limits, and agreement with a reference model.
///
/// Input: two octets for the limit (3..=1024), a flags octet (bit 0: map onto
/// [`SMTP_ALPHABET`]; bits 2..5: number of chunk sizes), the chunk sizes, the stream.
pub fn line_framing(input: &[u8]) {
    let (max, input) = match input {
        [a, b, rest @ ..] => (3 + usize::from(u16::from_le_bytes([*a, *b]) % 1022), rest),
        _ => (3, input),
    };
    let (flags, sizes, data) = header(input);
    let data = if flags & 1 == 1 {
        into_alphabet(data, SMTP_ALPHABET)
    } else {
        data.to_vec()
    };
    let whole = frame_chunks(max, &[&data]);
    assert_eq!(whole, frame_chunks(max, &chunks(&data, sizes)));
    assert_eq!(whole, frame_reference(max, &data));
}

// ---------------------------------------------------------------------------------------
// data
// ---------------------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct DataOutcome {
    out: Vec<u8>,
    consumed: usize,
    finished: bool,
    bare_lf: u64,
    bare_cr: u64,
}

fn decode_chunks(policy: BareLineEndings, chunks: &[&[u8]]) -> DataOutcome {
    let mut decoder = DataDecoder::new(policy);
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut finished = false;
    for chunk in chunks {
        let d = decoder.decode(chunk, &mut out);
        consumed += d.consumed;
        if d.finished {
            finished = true;
            break;
        }
        assert_eq!(d.consumed, chunk.len());
    }
    assert_eq!(finished, decoder.is_finished());
    DataOutcome {
        out,
        consumed,
        finished,
        bare_lf: decoder.bare_lf(),
        bare_cr: decoder.bare_cr(),
    }
}

/// Reference model of the decoder, written from the rule rather than for speed: cut the
/// stream at every CR LF; a line that is exactly "." ends the message; a line starting
/// with "." loses it; every CR or LF left inside a line is bare. An unterminated last line
/// keeps back what the streaming decoder cannot decide yet (a leading ".", a final CR).
fn decode_reference(policy: BareLineEndings, data: &[u8]) -> DataOutcome {
    let normalize = policy == BareLineEndings::Normalize;
    let mut o = DataOutcome {
        out: Vec::new(),
        consumed: data.len(),
        finished: false,
        bare_lf: 0,
        bare_cr: 0,
    };
    let content = |line: &[u8], o: &mut DataOutcome| {
        for &b in line {
            match b {
                b'\r' => o.bare_cr += 1,
                b'\n' => o.bare_lf += 1,
                _ => {}
            }
            if normalize && (b == b'\r' || b == b'\n') {
                o.out.extend_from_slice(b"\r\n");
            } else {
                o.out.push(b);
            }
        }
    };
    let mut pos = 0;
    loop {
        let rest = &data[pos..];
        let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
            let line = rest.strip_prefix(b".").unwrap_or(rest);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            content(line, &mut o);
            return o;
        };
        let line = &rest[..end];
        if line == b"." {
            o.consumed = pos + 3;
            o.finished = true;
            return o;
        }
        content(line.strip_prefix(b".").unwrap_or(line), &mut o);
        o.out.extend_from_slice(b"\r\n");
        pos += end + 2;
    }
}

/// `x` with bare endings as CR LF and a final CR LF if its last line is unterminated.
fn canonical(x: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() + 2);
    let mut i = 0;
    while let Some(&b) = x.get(i) {
        if b == b'\r' && x.get(i + 1) == Some(&b'\n') {
            i += 1;
        }
        if b == b'\r' || b == b'\n' {
            out.extend_from_slice(b"\r\n");
        } else {
            out.push(b);
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn encode_chunks(chunks: &[&[u8]]) -> Vec<u8> {
    let mut encoder = DataEncoder::new();
    let mut out = Vec::new();
    for chunk in chunks {
        encoder.encode(chunk, &mut out);
    }
    encoder.finish(&mut out);
    out
}

/// The DATA codec: chunk independence of decoder and encoder, agreement of the decoder
/// with a reference model, the shape of the terminator, and the encode→decode round trip.
///
/// Input: a flags octet (bit 0: map onto [`DATA_ALPHABET`]; bit 1: preserve bare endings;
/// bits 2..5: number of chunk sizes), the chunk sizes, the stream.
pub fn data_stream(input: &[u8]) {
    let (flags, sizes, data) = header(input);
    let data = if flags & 1 == 1 {
        into_alphabet(data, DATA_ALPHABET)
    } else {
        data.to_vec()
    };
    let policy = if flags & 2 == 2 {
        BareLineEndings::Preserve
    } else {
        BareLineEndings::Normalize
    };
    let chunked_input = chunks(&data, sizes);

    // Decoder: one shot, chunked and reference agree.
    let whole = decode_chunks(policy, &[&data]);
    assert_eq!(whole, decode_chunks(policy, &chunked_input));
    assert_eq!(whole, decode_reference(policy, &data));
    if whole.finished {
        let message = &data[..whole.consumed];
        assert!(message == b".\r\n" || message.ends_with(b"\r\n.\r\n"));
    }
    assert!(whole.out.len() <= 2 * whole.consumed);

    // Encoder: chunk independence, canonical output, round trip, never ends early.
    let wire = encode_chunks(&[&data]);
    assert_eq!(wire, encode_chunks(&chunked_input));
    let decoded = decode_chunks(BareLineEndings::Preserve, &[&wire]);
    assert!(decoded.finished);
    assert_eq!(decoded.consumed, wire.len());
    assert_eq!((decoded.bare_lf, decoded.bare_cr), (0, 0));
    assert_eq!(decoded.out, canonical(&data));
}

// ---------------------------------------------------------------------------------------
// command lines, addresses, replies, the server session
// ---------------------------------------------------------------------------------------

/// One command line: parsing never panics, every error knows a 5yz reply, and a parsed
/// command's wire form parses back to the same command.
pub fn command_line(input: &[u8]) {
    let mapped = into_alphabet(input, SMTP_ALPHABET);
    for line in [input, &mapped[..]] {
        match crate::command::Command::parse(line) {
            Ok(cmd) => {
                let wire = cmd.to_string();
                let again = crate::command::Command::parse(wire.as_bytes());
                assert_eq!(again.as_ref(), Ok(&cmd), "{wire:?}");
            }
            Err(e) => assert!(e.reply().is_permanent(), "{e:?}"),
        }
    }
}

/// One address: a parsed path prints back to a path that parses to the same value, within
/// the length limits.
pub fn address(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Ok(path) = crate::address::ForwardPath::parse(text) {
        let printed = path.to_string();
        assert_eq!(
            crate::address::ForwardPath::parse(&printed).as_ref(),
            Ok(&path)
        );
        if let Some(m) = path.mailbox() {
            assert!(m.local_part().len() <= crate::address::MAX_LOCAL_PART);
        }
    }
    if let Ok(path) = crate::address::ReversePath::parse(text) {
        assert_eq!(
            crate::address::ReversePath::parse(&path.to_string()).as_ref(),
            Ok(&path)
        );
    }
    let _ = crate::address::Domain::parse(text).map(|d| d.folded());
}

/// A stream of server replies in arbitrary chunks: the parser never panics, gives the same
/// replies whatever the chunking, and a reply re-encoded parses back to itself.
pub fn reply_stream(input: &[u8]) {
    let (_, sizes, data) = header(input);
    let collect = |parts: Vec<&[u8]>| {
        let mut p = crate::reply::ReplyParser::default();
        let mut out = Vec::new();
        for part in parts {
            p.handle_input(part);
            loop {
                match p.poll_reply() {
                    Ok(Some(r)) => out.push(Ok(r)),
                    Ok(None) => break,
                    Err(e) => out.push(Err(e)),
                }
            }
        }
        out
    };
    let whole = collect(vec![data]);
    assert_eq!(collect(chunks(data, sizes)), whole);
    for reply in whole.into_iter().flatten() {
        // The wire form may be longer than what was read: invalid UTF-8 comes back as
        // U+FFFD (3 octets) and the enhanced code is written on every line, so the
        // round trip is checked with a line limit that fits it.
        let wire = reply.to_bytes();
        let mut p = crate::reply::ReplyParser::new(wire.len() + 2);
        p.handle_input(&wire);
        assert_eq!(p.poll_reply(), Ok(Some(reply)));
    }
}

/// A whole client dialogue against the server session, in chunks, with every decision
/// accepted: no panic, the session never buffers more than its line limit plus one chunk,
/// and it always answers (every poll loop ends).
pub fn server_session(input: &[u8]) {
    use crate::server::{Protocol, ServerConfig, ServerEvent, ServerSession};
    let (flags, sizes, data) = header(input);
    let protocol = if flags & 1 == 0 {
        Protocol::Smtp
    } else {
        Protocol::Lmtp
    };
    let mut config = ServerConfig::new(protocol, "fuzz.test");
    config.max_message_size = 4096;
    config.starttls = flags & 2 != 0;
    let mapped = into_alphabet(data, SMTP_ALPHABET);
    let data = if flags & 0x80 != 0 { &mapped[..] } else { data };
    let mut session = ServerSession::new(config);
    for part in chunks(data, sizes) {
        session.handle_input(part);
        let mut polls = 0usize;
        while let Some(event) = session.poll_event() {
            polls += 1;
            assert!(polls < 1_000_000, "session loops");
            match event {
                ServerEvent::Mail { .. } | ServerEvent::Rcpt { .. } | ServerEvent::DataStart => {
                    let _ = session.accept();
                }
                ServerEvent::DataEnd => {
                    for _ in 0..session.expected_replies() {
                        let _ = session.respond(crate::replies::queued("FUZZ"));
                    }
                }
                ServerEvent::Auth { .. } | ServerEvent::AuthResponse(_) => {
                    let _ = session.respond(crate::replies::auth_cancelled());
                }
                ServerEvent::StartTls => session.tls_established(),
                _ => {}
            }
        }
        assert!(!session.is_waiting());
        assert!(session.buffered() <= crate::line::COMMAND_LINE_MAX + part.len());
    }
}

/// PROXY protocol headers: never a panic; a header's length is within the input and the
/// bound; every shorter cut of a header asks for more; a header parses the same alone.
pub fn proxy_header(input: &[u8]) {
    use crate::proxy::{MAX_HEADER, Parsed, parse};
    match parse(input) {
        Ok(Parsed::Header { header, consumed }) => {
            assert!(consumed <= input.len() && consumed <= MAX_HEADER);
            for cut in 0..consumed {
                assert_eq!(parse(&input[..cut]), Ok(Parsed::Incomplete), "cut at {cut}");
            }
            assert_eq!(
                parse(&input[..consumed]),
                Ok(Parsed::Header { header, consumed })
            );
        }
        Ok(Parsed::Incomplete) => assert!(input.len() < MAX_HEADER),
        Err(_) => {}
    }
}

/// Octets that matter to the MIME downgrade: line endings, boundaries, header syntax.
pub const MIME_ALPHABET: &[u8] = b"\r\n-=: \t;\"bxCT\xe9\x80";

/// Fuzz target `downgrade`: the 8-bit to quoted-printable converter. The output does not
/// depend on the cuts, inspection mode changes nothing, and conversion never adds an 8-bit
/// octet.
pub fn downgrade(input: &[u8]) {
    use crate::downgrade::Downgrade;
    let (flags, sizes, data) = header(input);
    let data = if flags & 1 == 1 {
        into_alphabet(data, MIME_ALPHABET)
    } else {
        data.to_vec()
    };
    let run = |convert: bool, pieces: &[&[u8]]| {
        let mut d = Downgrade::new(convert);
        let mut out = Vec::new();
        for piece in pieces {
            d.feed(piece, &mut out);
        }
        d.finish(&mut out);
        (out, d.eight_bit_headers())
    };
    let whole = run(true, &[&data]);
    assert_eq!(whole, run(true, &chunks(&data, sizes)));
    let inspected = run(false, &chunks(&data, sizes));
    assert_eq!(inspected.0, data);
    assert_eq!(inspected.1, whole.1);
    let high = |v: &[u8]| v.iter().filter(|&&b| b > 127).count();
    assert!(high(&whole.0) <= high(&data));
}
