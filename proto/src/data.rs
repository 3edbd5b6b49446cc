//! Message content: the DATA dot-stuffing codec (RFC 5321 §4.5.2) and BDAT chunks (RFC 3030).
//!
//! # Summary
//!
//! [`DataDecoder`] turns the octets a client sends after `354` into message content and
//! finds the end of the message. [`DataEncoder`] does the reverse for our own delivery
//! agents. [`BdatReader`] counts out the octets of one `BDAT` chunk. Nothing else in postern
//! decides where a message ends.
//!
//! # SMTP smuggling
//!
//! In 2023 (CVE-2023-51764 Postfix, CVE-2023-51765 Sendmail, CVE-2023-51766 Exim, and
//! others) it was shown that servers disagree on what ends a message. A sender puts a
//! lookalike terminator such as `LF . LF`, `LF . CR LF`, `CR LF . LF`, `CR . CR`,
//! `CR LF . CR` or `CR . CR LF` inside a message, followed by a second SMTP transaction.
//! An outbound relay that does not treat the lookalike as the end forwards it as content; a
//! lax inbound server that does treat it as the end then runs the smuggled transaction,
//! with the relay's authentication and SPF standing.
//!
//! # Promise
//!
//! The end of data is ONLY the exact octets CR LF "." CR LF at a line start, where a line
//! start is the beginning of the data or the position right after a CR LF (RFC 5321 §4.1.1.4:
//! `<CRLF>.<CRLF>`, the first CRLF ending the last line of content). Nothing else ever ends
//! a message: after a bare LF or a bare CR there is no line start, so a "." there is plain
//! content (neither unstuffed nor an end), and every lookalike above is content.
//!
//! Bare line endings (an LF not preceded by CR, a CR not followed by LF) are counted by the
//! decoder, so the server can apply its policy: reject with `550 5.5.2` (or `554 5.6.0`),
//! or accept and normalise them to CR LF ([`BareLineEndings`]). The encoder never sends one:
//! every bare ending in its input goes out as CR LF, so what postern relays cannot be read
//! two ways by a lax receiver.
//!
//! # Invariants
//!
//! - Decoding and encoding do not depend on how the input is split into chunks: state is
//!   carried across calls (including a CR, a "." or a ". CR" at the end of a chunk).
//! - The decoder consumes the terminator and nothing after it; the rest of the input is
//!   the next pipelined command (RFC 2920) and stays with the caller.
//! - `decode(encode(x))` is `x` with bare endings turned into CR LF and a final CR LF added
//!   if the last line was not terminated.
//! - Memory does not grow beyond the output the caller asked for; no input panics.

use memchr::memchr2;

/// What [`DataDecoder`] writes for a bare LF or a bare CR in message content.
///
/// Either way the decoder counts them ([`DataDecoder::bare_lf`], [`DataDecoder::bare_cr`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BareLineEndings {
    /// Write CR LF instead (the content becomes canonical).
    #[default]
    Normalize,
    /// Write the octet as received.
    Preserve,
}

/// Result of one [`DataDecoder::decode`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Decoded {
    /// Octets of the input consumed: all of it, unless the terminator was found, in which
    /// case everything up to and including the terminator.
    pub consumed: usize,
    /// The terminator has been consumed; the message is complete.
    pub finished: bool,
}

/// Where the decoder is, relative to the line structure. Only [`State::Mid`] lets a run of
/// input be copied through; the other states hold at most two pending octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the beginning of the data or right after CR LF.
    LineStart,
    /// Inside a line (also right after a bare LF or a bare CR).
    Mid,
    /// After a CR at the end of a chunk; not written yet.
    Cr,
    /// After a "." at a line start; it is never written (removed, or part of the end).
    Dot,
    /// After "." CR at a line start; the CR is not written yet.
    DotCr,
    /// The terminator has been consumed.
    Done,
}

/// Streaming dot-unstuffing decoder for DATA (see the [module docs](self)).
///
/// ```
/// use postern_proto::data::{BareLineEndings, DataDecoder};
///
/// let mut decoder = DataDecoder::new(BareLineEndings::Normalize);
/// let mut out = Vec::new();
/// let d = decoder.decode(b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n", &mut out);
/// assert!(d.finished);
/// assert_eq!(out, b"Subject: x\r\n\r\n.dot\r\n");
/// assert_eq!(d.consumed, 24); // "QUIT\r\n" is left for the command parser
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDecoder {
    policy: BareLineEndings,
    state: State,
    bare_lf: u64,
    bare_cr: u64,
}

impl DataDecoder {
    /// A decoder at the start of a message.
    #[must_use]
    pub const fn new(policy: BareLineEndings) -> Self {
        Self {
            policy,
            state: State::LineStart,
            bare_lf: 0,
            bare_cr: 0,
        }
    }

    /// Back to the start of a message, counters cleared, for the next transaction.
    pub const fn reset(&mut self) {
        *self = Self::new(self.policy);
    }

    /// The policy for bare line endings.
    #[must_use]
    pub const fn policy(&self) -> BareLineEndings {
        self.policy
    }

    /// Bare LFs (LF not preceded by CR) seen in this message so far.
    #[must_use]
    pub const fn bare_lf(&self) -> u64 {
        self.bare_lf
    }

    /// Bare CRs (CR not followed by LF) seen in this message so far.
    #[must_use]
    pub const fn bare_cr(&self) -> u64 {
        self.bare_cr
    }

    /// Whether any bare LF or bare CR was seen in this message so far.
    #[must_use]
    pub const fn saw_bare_line_endings(&self) -> bool {
        self.bare_lf != 0 || self.bare_cr != 0
    }

    /// Whether the terminator has been consumed.
    #[must_use]
    pub const fn is_finished(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Decodes the next chunk of DATA octets, appending message content to `out`.
    ///
    /// The content includes the CR LF before the terminating ".": `a CR LF . CR LF` decodes
    /// to `a CR LF`, and `. CR LF` at the very start to nothing. Once finished, further
    /// calls consume nothing until [`reset`](Self::reset).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Decoded {
        let mut sink = Sink {
            out,
            lend: false,
            whole: None,
        };
        self.decode_to(input, &mut sink)
    }

    /// As [`decode`](Self::decode), but when this chunk's content is exactly a prefix of
    /// `input` (no dot-stuffing or line ending to undo in it) and `out` is empty, nothing
    /// is copied: the prefix's length is returned and `out` is left empty, for a caller
    /// that keeps `input[..len]` itself as the content.
    pub fn decode_lent(&mut self, input: &[u8], out: &mut Vec<u8>) -> (Decoded, Option<usize>) {
        let mut sink = Sink {
            out,
            lend: true,
            whole: None,
        };
        let decoded = self.decode_to(input, &mut sink);
        (decoded, sink.whole)
    }

    fn decode_to(&mut self, input: &[u8], out: &mut Sink<'_>) -> Decoded {
        let len = input.len();
        let normalize = self.policy == BareLineEndings::Normalize;
        let mut state = self.state;
        // input[run..i] is content not yet copied to `out`.
        let mut run = 0;
        let mut i = 0;
        if state != State::Done && !out.lend {
            out.out.reserve(len);
        }
        loop {
            match state {
                State::Mid => match memchr2(b'\r', b'\n', &input[i..]) {
                    None => {
                        i = len;
                        break;
                    }
                    Some(off) => {
                        let p = i + off;
                        if input[p] == b'\n' {
                            self.bare_lf += 1;
                            if normalize {
                                out.run(input, run, p);
                                out.push(input, b"\r\n");
                                run = p + 1;
                            }
                            i = p + 1;
                        } else if p + 1 == len {
                            // CR at the end of the chunk: hold it until we see what follows.
                            out.run(input, run, p);
                            run = len;
                            i = len;
                            state = State::Cr;
                            break;
                        } else if input[p + 1] == b'\n' {
                            i = p + 2;
                            state = State::LineStart;
                        } else {
                            self.bare_cr += 1;
                            if normalize {
                                out.run(input, run, p);
                                out.push(input, b"\r\n");
                                run = p + 1;
                            }
                            i = p + 1;
                        }
                    }
                },
                State::LineStart => {
                    if i == len {
                        break;
                    }
                    if input[i] == b'.' {
                        // Never written: either removed (dot-unstuffing) or the end.
                        out.run(input, run, i);
                        i += 1;
                        run = i;
                        state = State::Dot;
                    } else {
                        state = State::Mid;
                    }
                }
                State::Dot => {
                    if i == len {
                        break;
                    }
                    if input[i] == b'\r' {
                        i += 1;
                        run = i;
                        state = State::DotCr;
                    } else {
                        // "." followed by anything but CR LF: the dot was stuffing.
                        state = State::Mid;
                    }
                }
                State::DotCr => {
                    if i == len {
                        break;
                    }
                    if input[i] == b'\n' {
                        self.state = State::Done;
                        return Decoded {
                            consumed: i + 1,
                            finished: true,
                        };
                    }
                    // The "." was stuffing; the CR is bare.
                    self.bare_cr += 1;
                    out.push(input, if normalize { b"\r\n" } else { b"\r" });
                    state = State::Mid;
                }
                State::Cr => {
                    if i == len {
                        break;
                    }
                    if input[i] == b'\n' {
                        out.push(input, b"\r\n");
                        i += 1;
                        run = i;
                        state = State::LineStart;
                    } else {
                        self.bare_cr += 1;
                        out.push(input, if normalize { b"\r\n" } else { b"\r" });
                        state = State::Mid;
                    }
                }
                State::Done => {
                    return Decoded {
                        consumed: 0,
                        finished: true,
                    };
                }
            }
        }
        out.run(input, run, i);
        self.state = state;
        Decoded {
            consumed: len,
            finished: false,
        }
    }
}

/// Where [`DataDecoder`] puts content: appended to `out`, or, when lending is allowed and
/// the content so far is one run from the start of the input, only noted as its end.
struct Sink<'a> {
    out: &'a mut Vec<u8>,
    lend: bool,
    /// The content so far is `input[..end]`, not copied.
    whole: Option<usize>,
}

impl Sink<'_> {
    /// Content `input[from..to]`.
    fn run(&mut self, input: &[u8], from: usize, to: usize) {
        if from == to {
            return;
        }
        if self.lend && from == 0 && self.whole.is_none() && self.out.is_empty() {
            self.whole = Some(to);
            return;
        }
        self.copy_whole(input);
        self.out.extend_from_slice(&input[from..to]);
    }

    /// Content not in the input (line endings made whole).
    fn push(&mut self, input: &[u8], bytes: &[u8]) {
        self.copy_whole(input);
        self.out.extend_from_slice(bytes);
    }

    /// The content is no longer one run: what was only noted is copied after all.
    fn copy_whole(&mut self, input: &[u8]) {
        if let Some(end) = self.whole.take() {
            self.out.reserve(input.len());
            self.out.extend_from_slice(&input[..end]);
        }
    }
}

/// Streaming dot-stuffing encoder for DATA, client side (see the [module docs](self)).
///
/// Doubles a "." at the start of every line and sends every line ending as CR LF, whatever
/// the input used (bare LF, bare CR or CR LF).
///
/// ```
/// use postern_proto::data::DataEncoder;
///
/// let mut encoder = DataEncoder::new();
/// let mut out = Vec::new();
/// encoder.encode(b".hidden\nline", &mut out);
/// encoder.finish(&mut out);
/// assert_eq!(out, b"..hidden\r\nline\r\n.\r\n");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataEncoder {
    /// The next input octet starts a line.
    line_start: bool,
    /// The previous chunk ended with a CR, already sent as CR LF: skip a leading LF.
    after_cr: bool,
}

impl Default for DataEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DataEncoder {
    /// An encoder at the start of a message.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            line_start: true,
            after_cr: false,
        }
    }

    /// Back to the start of a message.
    pub const fn reset(&mut self) {
        *self = Self::new();
    }

    /// Encodes the next chunk of message content, appending wire octets to `out`.
    pub fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let len = input.len();
        if len == 0 {
            return;
        }
        out.reserve(len + len / 64 + 2);
        let mut i = 0;
        if self.after_cr {
            self.after_cr = false;
            if input[0] == b'\n' {
                i = 1;
            }
        }
        let mut run = i;
        let mut line_start = self.line_start;
        loop {
            if line_start && i < len && input[i] == b'.' {
                out.extend_from_slice(&input[run..i]);
                out.push(b'.');
                run = i;
            }
            let Some(off) = memchr2(b'\r', b'\n', &input[i..]) else {
                line_start = i == len && line_start;
                break;
            };
            let p = i + off;
            line_start = true;
            if input[p] == b'\n' {
                out.extend_from_slice(&input[run..p]);
                out.extend_from_slice(b"\r\n");
                i = p + 1;
                run = i;
            } else if p + 1 == len {
                out.extend_from_slice(&input[run..p]);
                out.extend_from_slice(b"\r\n");
                self.after_cr = true;
                run = len;
                break;
            } else if input[p + 1] == b'\n' {
                i = p + 2;
            } else {
                out.extend_from_slice(&input[run..p]);
                out.extend_from_slice(b"\r\n");
                i = p + 1;
                run = i;
            }
        }
        out.extend_from_slice(&input[run..]);
        self.line_start = line_start;
    }

    /// Ends the message: CR LF if the last line was not terminated, then ". CR LF". The
    /// encoder is then ready for the next message.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        self.reset();
    }
}

/// Counts out the octets of one `BDAT <size> [LAST]` chunk (RFC 3030 §2).
///
/// BDAT content is taken as is: no dot-stuffing, no terminator, no line structure.
///
/// ```
/// use postern_proto::data::BdatReader;
///
/// let mut chunk = BdatReader::new(5);
/// assert_eq!(chunk.take(b"abc"), (&b"abc"[..], false));
/// assert_eq!(chunk.take(b"deQUIT\r\n"), (&b"de"[..], true));
/// assert_eq!(chunk.remaining(), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BdatReader {
    remaining: u64,
}

impl BdatReader {
    /// A reader for a chunk of `size` octets.
    #[must_use]
    pub const fn new(size: u64) -> Self {
        Self { remaining: size }
    }

    /// Octets of the chunk still to come.
    #[must_use]
    pub const fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Whether the whole chunk has been taken.
    #[must_use]
    pub const fn is_done(&self) -> bool {
        self.remaining == 0
    }

    /// Takes the prefix of `input` that belongs to the chunk; the caller keeps the rest
    /// (the next command). Returns that prefix and whether the chunk is now complete.
    pub fn take<'a>(&mut self, input: &'a [u8]) -> (&'a [u8], bool) {
        let n = usize::try_from(self.remaining).map_or(input.len(), |r| r.min(input.len()));
        // n <= input.len() <= usize::MAX and n <= remaining, so neither step can wrap.
        self.remaining -= n as u64;
        (&input[..n], self.remaining == 0)
    }
}

#[cfg(test)]
#[path = "data_tests.rs"]
mod tests;
