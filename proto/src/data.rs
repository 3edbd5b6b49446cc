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
        let len = input.len();
        let normalize = self.policy == BareLineEndings::Normalize;
        let mut state = self.state;
        // input[run..i] is content not yet copied to `out`.
        let mut run = 0;
        let mut i = 0;
        if state != State::Done {
            out.reserve(len);
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
                                out.extend_from_slice(&input[run..p]);
                                out.extend_from_slice(b"\r\n");
                                run = p + 1;
                            }
                            i = p + 1;
                        } else if p + 1 == len {
                            // CR at the end of the chunk: hold it until we see what follows.
                            out.extend_from_slice(&input[run..p]);
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
                                out.extend_from_slice(&input[run..p]);
                                out.extend_from_slice(b"\r\n");
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
                        out.extend_from_slice(&input[run..i]);
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
                    out.extend_from_slice(if normalize { b"\r\n" } else { b"\r" });
                    state = State::Mid;
                }
                State::Cr => {
                    if i == len {
                        break;
                    }
                    if input[i] == b'\n' {
                        out.extend_from_slice(b"\r\n");
                        i += 1;
                        run = i;
                        state = State::LineStart;
                    } else {
                        self.bare_cr += 1;
                        out.extend_from_slice(if normalize { b"\r\n" } else { b"\r" });
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
        out.extend_from_slice(&input[run..i]);
        self.state = state;
        Decoded {
            consumed: len,
            finished: false,
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        out: Vec<u8>,
        consumed: usize,
        finished: bool,
        bare_lf: u64,
        bare_cr: u64,
    }

    fn decode_chunks(policy: BareLineEndings, chunks: &[&[u8]]) -> Outcome {
        let mut decoder = DataDecoder::new(policy);
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut finished = false;
        for chunk in chunks {
            let d = decoder.decode(chunk, &mut out);
            assert!(d.consumed <= chunk.len());
            consumed += d.consumed;
            if d.finished {
                finished = true;
                break;
            }
            assert_eq!(d.consumed, chunk.len());
        }
        assert_eq!(finished, decoder.is_finished());
        Outcome {
            out,
            consumed,
            finished,
            bare_lf: decoder.bare_lf(),
            bare_cr: decoder.bare_cr(),
        }
    }

    fn decode(policy: BareLineEndings, input: &[u8]) -> Outcome {
        decode_chunks(policy, &[input])
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

    /// Splits `input` at the given cut points (taken modulo the length, sorted).
    fn split<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for cut in cuts {
            chunks.push(&input[start..cut]);
            start = cut;
        }
        chunks.push(&input[start..]);
        chunks
    }

    use BareLineEndings::{Normalize, Preserve};

    #[test]
    fn terminator_and_unstuffing() {
        // (input, content, consumed)
        let cases: &[(&[u8], &[u8], usize)] = &[
            (b".\r\n", b"", 3),
            (b".\r\nQUIT\r\n", b"", 3),
            (b"a\r\n.\r\n", b"a\r\n", 6),
            (b"a\r\nb\r\n.\r\n", b"a\r\nb\r\n", 9),
            (b"a\r\n.\r\nMAIL FROM:<>\r\n", b"a\r\n", 6),
            (b"\r\n.\r\n", b"\r\n", 5),
            // Dot-unstuffing: a leading "." followed by anything else is removed.
            (b"..\r\n.\r\n", b".\r\n", 7),
            (b"...\r\n.\r\n", b"..\r\n", 8),
            (b"..x\r\n.\r\n", b".x\r\n", 8),
            (b".x\r\n.\r\n", b"x\r\n", 7),
            (b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n", 10),
            (b"a\r\n. \r\n.\r\n", b"a\r\n \r\n", 10),
            // A dot inside a line is content.
            (b"a.\r\n.\r\n", b"a.\r\n", 7),
            (b"a\r\nb.\r\n.\r\n", b"a\r\nb.\r\n", 10),
            // Trailing spaces after the dot: not the terminator; dot removed.
            (b". \r\n.\r\n", b" \r\n", 7),
        ];
        for (input, content, consumed) in cases {
            for policy in [Normalize, Preserve] {
                let got = decode(policy, input);
                assert_eq!(got.out, *content, "{:?}", String::from_utf8_lossy(input));
                assert_eq!(got.consumed, *consumed, "{input:?}");
                assert!(got.finished, "{input:?}");
                assert_eq!((got.bare_lf, got.bare_cr), (0, 0), "{input:?}");
            }
        }
    }

    #[test]
    fn unterminated_data_is_not_finished() {
        for input in [
            &b""[..],
            b".",
            b".\r",
            b"a\r\n.",
            b"a\r\n.\r",
            b"a\r\n",
            b"a",
            b"\r",
        ] {
            let got = decode(Normalize, input);
            assert!(!got.finished, "{input:?}");
            assert_eq!(got.consumed, input.len());
        }
    }

    /// Every smuggling lookalike is content, and each bare ending in it is counted.
    #[test]
    fn smuggling_variants_never_end_the_message() {
        /// (lookalike, bare LF, bare CR, content with Normalize, content with Preserve)
        type Case = (&'static [u8], u64, u64, &'static [u8], &'static [u8]);
        let cases: &[Case] = &[
            // LF . LF: no line start after the bare LF, so the "." is content.
            (b"\n.\n", 2, 0, b"\r\n.\r\n", b"\n.\n"),
            // LF . CRLF
            (b"\n.\r\n", 1, 0, b"\r\n.\r\n", b"\n.\r\n"),
            // CRLF . LF: "." at a line start followed by LF: removed, LF bare.
            (b"\r\n.\n", 1, 0, b"\r\n\r\n", b"\r\n\n"),
            // CR . CR
            (b"\r.\r", 0, 2, b"\r\n.\r\n", b"\r.\r"),
            // CRLF . CR: "." removed, CR bare.
            (b"\r\n.\r", 0, 1, b"\r\n\r\n", b"\r\n\r"),
            // CR . CRLF
            (b"\r.\r\n", 0, 1, b"\r\n.\r\n", b"\r.\r\n"),
            // LF . CR
            (b"\n.\r", 1, 1, b"\r\n.\r\n", b"\n.\r"),
            // CR . LF
            (b"\r.\n", 1, 1, b"\r\n.\r\n", b"\r.\n"),
            // Bare CR before a real CRLF . CRLF would end; here the CR LF is split by "."
            (b"\r\r\n.\n", 1, 1, b"\r\n\r\n\r\n", b"\r\r\n\n"),
            // LF LF . LF
            (b"\n\n.\n", 3, 0, b"\r\n\r\n.\r\n", b"\n\n.\n"),
        ];
        for (lookalike, lf, cr, normalized, preserved) in cases {
            // After "x" (mid-line), then one real line and the real terminator.
            let mut input = b"x".to_vec();
            input.extend_from_slice(lookalike);
            input.extend_from_slice(b"MAIL FROM:<evil>\r\n.\r\nQUIT\r\n");
            for (policy, content) in [(Normalize, normalized), (Preserve, preserved)] {
                let got = decode(policy, &input);
                let mut want = b"x".to_vec();
                want.extend_from_slice(content);
                want.extend_from_slice(b"MAIL FROM:<evil>\r\n");
                let name = String::from_utf8_lossy(lookalike);
                assert!(got.finished, "{name:?}");
                assert_eq!(got.out, want, "{policy:?} {name:?}");
                assert_eq!(got.consumed, input.len() - 6, "{name:?}");
                assert_eq!((got.bare_lf, got.bare_cr), (*lf, *cr), "{name:?}");
            }
        }
    }

    #[test]
    fn dot_after_bare_ending_is_content() {
        // ".\r\n" after a bare CR: content, the dot is kept, and it is not an end.
        let got = decode(Preserve, b"a\r.\r\nb\r\n.\r\n");
        assert_eq!(got.out, b"a\r.\r\nb\r\n");
        assert_eq!((got.bare_lf, got.bare_cr, got.finished), (0, 1, true));
        // ".." after a bare LF is not unstuffed.
        let got = decode(Normalize, b"a\n..\r\n.\r\n");
        assert_eq!(got.out, b"a\r\n..\r\n");
        assert_eq!((got.bare_lf, got.bare_cr), (1, 0));
        // A bare ending at the very start.
        let got = decode(Normalize, b"\n.\r\n.\r\n");
        assert_eq!(got.out, b"\r\n.\r\n");
        assert_eq!(got.bare_lf, 1);
        let got = decode(Preserve, b"\r.\r\n.\r\n");
        assert_eq!(got.out, b"\r.\r\n");
        assert_eq!(got.bare_cr, 1);
    }

    #[test]
    fn bare_endings_in_content() {
        let got = decode(Normalize, b"a\nb\rc\r\r\nd\n\r\n.\r\n");
        assert_eq!(got.out, b"a\r\nb\r\nc\r\n\r\nd\r\n\r\n");
        assert_eq!((got.bare_lf, got.bare_cr), (2, 2));
        let got = decode(Preserve, b"a\nb\rc\r\r\nd\n\r\n.\r\n");
        assert_eq!(got.out, b"a\nb\rc\r\r\nd\n\r\n");
        assert_eq!((got.bare_lf, got.bare_cr), (2, 2));
    }

    #[test]
    fn finished_decoder_consumes_nothing_until_reset() {
        let mut decoder = DataDecoder::new(Normalize);
        let mut out = Vec::new();
        let d = decoder.decode(b"\n.\r\n", &mut out);
        assert_eq!((d.consumed, d.finished), (4, false));
        let d = decoder.decode(b"a\r\n.\r\nb", &mut out);
        assert_eq!((d.consumed, d.finished), (6, true));
        let d = decoder.decode(b"c\r\n.\r\n", &mut out);
        assert_eq!((d.consumed, d.finished), (0, true));
        assert_eq!(out, b"\r\n.\r\na\r\n");
        assert_eq!(decoder.bare_lf(), 1);
        decoder.reset();
        assert!(!decoder.is_finished() && !decoder.saw_bare_line_endings());
        out.clear();
        let d = decoder.decode(b".\r\n", &mut out);
        assert_eq!((d.consumed, d.finished, out.len()), (3, true, 0));
    }

    #[test]
    fn every_split_position_gives_identical_output() {
        let input: &[u8] = b"..a\r\n.\rb\n.\n\r\n.x\r\r\n..\r\n\r\n.\r\r\n.\r.\r\n.\r\nNEXT\r\n";
        for policy in [Normalize, Preserve] {
            let whole = decode(policy, input);
            assert!(whole.finished);
            for i in 0..=input.len() {
                for j in i..=input.len() {
                    let parts = [&input[..i], &input[i..j], &input[j..]];
                    assert_eq!(decode_chunks(policy, &parts), whole, "split {i} {j}");
                }
            }
            let bytewise: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(decode_chunks(policy, &bytewise), whole);
        }
    }

    #[test]
    fn encoder_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"a\r\n.b\r\n..\r\n", b"a\r\n..b\r\n...\r\n.\r\n"),
            (b"a.b\r\n", b"a.b\r\n.\r\n"),
            // Bare endings go out as CR LF, and start a line (the "." is stuffed).
            (b"a\n.\n", b"a\r\n..\r\n.\r\n"),
            (b"a\r.\r", b"a\r\n..\r\n.\r\n"),
            (b"a\r\r\n.", b"a\r\n\r\n..\r\n.\r\n"),
            (b"\n", b"\r\n.\r\n"),
            (b"\r", b"\r\n.\r\n"),
            (b"\n\r", b"\r\n\r\n.\r\n"),
        ];
        for (input, wire) in cases {
            assert_eq!(
                encode_chunks(&[input]),
                *wire,
                "{:?}",
                String::from_utf8_lossy(input)
            );
            let bytewise: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(encode_chunks(&bytewise), *wire);
        }
    }

    #[test]
    fn encoder_is_reusable_after_finish() {
        let mut encoder = DataEncoder::new();
        let mut out = Vec::new();
        encoder.encode(b"a\r", &mut out);
        encoder.finish(&mut out);
        encoder.encode(b"\n.b", &mut out);
        encoder.finish(&mut out);
        assert_eq!(out, b"a\r\n.\r\n\r\n..b\r\n.\r\n");
    }

    #[test]
    fn bdat() {
        let mut chunk = BdatReader::new(0);
        assert!(chunk.is_done());
        assert_eq!(chunk.take(b"BDAT"), (&b""[..], true));

        let mut chunk = BdatReader::new(7);
        assert_eq!(chunk.take(b""), (&b""[..], false));
        assert_eq!(chunk.take(b"a\r\n."), (&b"a\r\n."[..], false));
        assert_eq!(chunk.remaining(), 3);
        assert_eq!(chunk.take(b"\r\nxNOOP\r\n"), (&b"\r\nx"[..], true));
        assert_eq!(chunk.take(b"NOOP"), (&b""[..], true));

        let mut chunk = BdatReader::new(u64::MAX);
        assert_eq!(chunk.take(b"abc"), (&b"abc"[..], false));
        assert_eq!(chunk.remaining(), u64::MAX - 3);
    }

    /// Wire-ish bytes: mostly the octets that matter to the codec.
    fn smtpish() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                3 => Just(b'\r'),
                3 => Just(b'\n'),
                3 => Just(b'.'),
                2 => Just(b'a'),
                1 => any::<u8>(),
            ],
            0..300,
        )
    }

    /// Content made of CR LF terminated lines without bare endings.
    fn crlf_lines() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            proptest::collection::vec(prop_oneof![Just(b'.'), Just(b'a'), Just(b' ')], 0..8),
            0..20,
        )
        .prop_map(|lines| {
            let mut out = Vec::new();
            for line in lines {
                out.extend_from_slice(&line);
                out.extend_from_slice(b"\r\n");
            }
            out
        })
    }

    /// `x` with bare endings as CR LF and a final CR LF if the last line is unterminated.
    fn canonical(x: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < x.len() {
            match x[i] {
                b'\r' if x.get(i + 1) == Some(&b'\n') => {
                    out.extend_from_slice(b"\r\n");
                    i += 2;
                    continue;
                }
                b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
                b => out.push(b),
            }
            i += 1;
        }
        if !out.is_empty() && !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    proptest! {
        #[test]
        fn decoder_any_split_same_result(
            input in smtpish(),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
            preserve in any::<bool>(),
        ) {
            let policy = if preserve { Preserve } else { Normalize };
            let whole = decode(policy, &input);
            prop_assert_eq!(&decode_chunks(policy, &split(&input, &cuts)), &whole);
        }

        #[test]
        fn encoder_any_split_same_result(
            input in smtpish(),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            prop_assert_eq!(encode_chunks(&split(&input, &cuts)), encode_chunks(&[&input]));
        }

        #[test]
        fn round_trip_crlf_lines(x in crlf_lines(), extra in smtpish()) {
            let mut wire = encode_chunks(&[&x]);
            let message_len = wire.len();
            wire.extend_from_slice(&extra); // pipelined after the message
            for policy in [Normalize, Preserve] {
                let got = decode(policy, &wire);
                prop_assert!(got.finished);
                prop_assert_eq!(got.consumed, message_len);
                prop_assert_eq!(&got.out, &x);
                prop_assert_eq!((got.bare_lf, got.bare_cr), (0, 0));
            }
        }

        #[test]
        fn round_trip_any_bytes(x in smtpish()) {
            let wire = encode_chunks(&[&x]);
            // The decoder never ends early on encoder output.
            let got = decode(Preserve, &wire);
            prop_assert!(got.finished);
            prop_assert_eq!(got.consumed, wire.len());
            prop_assert_eq!(&got.out, &canonical(&x));
            prop_assert_eq!((got.bare_lf, got.bare_cr), (0, 0));
        }

        #[test]
        fn fuzz_entry_point(input in proptest::collection::vec(any::<u8>(), 0..400)) {
            crate::fuzzing::data_stream(&input);
        }
    }
}
