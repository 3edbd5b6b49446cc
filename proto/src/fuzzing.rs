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

use crate::line::{Frame, LineFramer, Status};

/// Octets that matter to SMTP commands and replies (after Stalwart's `smtp-proto` fuzz).
pub const SMTP_ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz:=-<>,; .\r\n";

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
