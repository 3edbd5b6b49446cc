//! Line framing with length limits (RFC 5321 §2.3.8, §4.5.3.1).
//!
//! # Summary
//!
//! [`LineFramer`] cuts the command stream of an SMTP or LMTP session into lines. It owns
//! the one place where postern decides where a line ends and how long a line may be; the
//! command and reply parsers only ever see whole lines without their terminator.
//!
//! # Description
//!
//! A line ends at the first LF. One CR immediately before that LF is stripped; any other CR
//! is left in the line for the parser to reject. A bare LF is therefore tolerated as a line
//! end on command lines (RFC 5321 §2.3.8 forbids sending it, but command lines carry no
//! message content, so accepting it cannot cause smuggling: see [`crate::data`] for the
//! strict rules that apply to message content).
//!
//! The limit is counted in octets *including* the terminator, as in RFC 5321 §4.5.3.1.4
//! (command line: 512 octets, [`COMMAND_LINE_MAX`]) and §4.5.3.1.6 (text line: 1000 octets,
//! [`TEXT_LINE_MAX`]). A line ended by a bare LF counts one octet for its terminator, a line
//! ended by CRLF counts two.
//!
//! # Invariants
//!
//! - Every [`Frame::Line`] is at most `max - 1` octets long and contains no LF.
//! - The caller never has to buffer `max` octets or more: after [`Status::Partial`] with
//!   nothing consumed, the unconsumed input is shorter than `max`.
//! - Framing does not depend on how the input was split into reads: any split of the same
//!   stream yields the same sequence of lines and [`Frame::TooLong`] events, provided the
//!   caller keeps the unconsumed bytes and appends the next read to them.
//! - No input panics.
//!
//! # Failure behaviour
//!
//! When `max` octets arrive without an LF, the framer enters *discard mode*: it consumes
//! them and answers [`Status::Partial`], and keeps consuming until the LF that ends the
//! overlong line. Only then does it report [`Frame::TooLong`], exactly once. The caller
//! answers `500 5.5.2` at that point, so the error reply stays in order with the replies to
//! any commands pipelined before and after the overlong line (RFC 2920).
//!
//! Incomplete data is not invalid: [`Status::Partial`] only means "read more".

use memchr::memchr;

/// Maximum length of a command line, in octets including CRLF (RFC 5321 §4.5.3.1.4).
pub const COMMAND_LINE_MAX: usize = 512;

/// Maximum length of a text line, in octets including CRLF (RFC 5321 §4.5.3.1.6).
pub const TEXT_LINE_MAX: usize = 1000;

/// Smallest limit a [`LineFramer`] accepts: one octet of content and CRLF.
pub const MIN_LINE_MAX: usize = 3;

/// Outcome of a parse step that may need more input.
///
/// As in `httparse`, incomplete data is not invalid: [`Status::Partial`] asks the caller to
/// read more and call again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status<T> {
    /// A complete item.
    Complete(T),
    /// More input is needed.
    Partial,
}

/// A framing event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A line, without its LF and without one CR immediately before the LF.
    Line(&'a [u8]),
    /// A line longer than the limit ended here; its octets were discarded. Reply
    /// `500 5.5.2` (RFC 5321 §4.5.3.1.10, RFC 3463).
    TooLong,
}

/// Cuts a byte stream into lines of at most `max` octets (see the [module docs](self)).
///
/// The caller keeps a buffer, appends each read to it, and calls [`LineFramer::frame`] until
/// it answers [`Status::Partial`], dropping the consumed prefix after every call:
///
/// ```
/// use postern_proto::line::{Frame, LineFramer, Status, COMMAND_LINE_MAX};
///
/// let mut framer = LineFramer::new(COMMAND_LINE_MAX);
/// let mut buf = b"NOOP\r\nQUIT\r\nMAIL FR".to_vec();
/// let mut lines = Vec::new();
/// loop {
///     let (consumed, status) = framer.frame(&buf);
///     if let Status::Complete(Frame::Line(line)) = status {
///         lines.push(line.to_vec());
///     }
///     let partial = status == Status::Partial;
///     buf.drain(..consumed);
///     if partial {
///         break;
///     }
/// }
/// assert_eq!(lines, [b"NOOP".to_vec(), b"QUIT".to_vec()]);
/// assert_eq!(buf, b"MAIL FR"); // kept for the next read
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineFramer {
    max: usize,
    discarding: bool,
}

impl LineFramer {
    /// A framer for lines of at most `max` octets including the terminator. Values below
    /// [`MIN_LINE_MAX`] are raised to it.
    #[must_use]
    pub const fn new(max: usize) -> Self {
        let max = if max < MIN_LINE_MAX {
            MIN_LINE_MAX
        } else {
            max
        };
        Self {
            max,
            discarding: false,
        }
    }

    /// The configured limit, in octets including the terminator.
    #[must_use]
    pub const fn max_len(&self) -> usize {
        self.max
    }

    /// Whether the framer is discarding the rest of an overlong line.
    #[must_use]
    pub const fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// Forgets any overlong line being discarded (for example after STARTTLS, RFC 3207 §4.2).
    pub const fn reset(&mut self) {
        self.discarding = false;
    }

    /// Looks for the next line at the start of `buf`.
    ///
    /// Returns how many octets of `buf` were consumed (the caller drops them) and either a
    /// complete [`Frame`] or [`Status::Partial`]. On `Partial` the caller must read more
    /// before calling again; the unconsumed rest of `buf` is then shorter than
    /// [`max_len`](Self::max_len).
    pub fn frame<'a>(&mut self, buf: &'a [u8]) -> (usize, Status<Frame<'a>>) {
        if self.discarding {
            return self.discard(buf, 0);
        }
        let window = &buf[..buf.len().min(self.max)];
        match memchr(b'\n', window) {
            Some(lf) => {
                let line = &buf[..lf];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                (lf + 1, Status::Complete(Frame::Line(line)))
            }
            None if buf.len() < self.max => (0, Status::Partial),
            None => {
                self.discarding = true;
                self.discard(buf, self.max)
            }
        }
    }

    /// Discard mode: consume up to and including the LF ending the overlong line, searching
    /// from `from` (octets before it are known to hold no LF).
    fn discard<'a>(&mut self, buf: &'a [u8], from: usize) -> (usize, Status<Frame<'a>>) {
        match memchr(b'\n', &buf[from..]) {
            Some(lf) => {
                self.discarding = false;
                (from + lf + 1, Status::Complete(Frame::TooLong))
            }
            None => (buf.len(), Status::Partial),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the tests compare: an owned framing event.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Event {
        Line(Vec<u8>),
        TooLong,
    }

    /// The caller model: keep the unconsumed bytes, append each chunk, frame until Partial.
    /// Returns the events and what is left buffered at the end.
    fn run(max: usize, chunks: &[&[u8]]) -> (Vec<Event>, Vec<u8>, bool) {
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
                        assert!(line.len() < framer.max_len());
                        assert!(!line.contains(&b'\n'));
                        events.push(Event::Line(line.to_vec()));
                    }
                    Status::Complete(Frame::TooLong) => events.push(Event::TooLong),
                    Status::Partial => {}
                }
                let partial = status == Status::Partial;
                buf.drain(..consumed);
                if partial {
                    assert!(buf.len() < framer.max_len(), "caller made to buffer max");
                    break;
                }
            }
        }
        (events, buf, framer.is_discarding())
    }

    fn line(s: &str) -> Event {
        Event::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn table() {
        use Event::TooLong;
        let cases: &[(usize, &str, &[Event], &str)] = &[
            // (max, input, events, left buffered)
            (512, "", &[], ""),
            (512, "NOOP\r\n", &[line("NOOP")], ""),
            (512, "NOOP\n", &[line("NOOP")], ""),
            (512, "\r\n", &[line("")], ""),
            (512, "\n", &[line("")], ""),
            (512, "NOOP", &[], "NOOP"),
            (512, "NOOP\r", &[], "NOOP\r"),
            (
                512,
                "A\r\nB\nC\r\nD",
                &[line("A"), line("B"), line("C")],
                "D",
            ),
            // Only one CR before the LF is stripped; other CRs stay for the parser.
            (512, "A\r\r\n", &[line("A\r")], ""),
            (512, "A\rB\r\n", &[line("A\rB")], ""),
            (512, "\rA\n", &[line("\rA")], ""),
            // Limit counts the terminator: 3 octets = one octet and CRLF, or two and LF.
            (3, "a\r\n", &[line("a")], ""),
            (3, "ab\n", &[line("ab")], ""),
            (3, "ab\r\n", &[TooLong], ""),
            (3, "abc\n", &[TooLong], ""),
            (3, "\r\n", &[line("")], ""),
            (3, "ab", &[], "ab"),
            // max octets without LF: discarded, nothing reported until the LF.
            (3, "abc", &[], ""),
            (3, "abcdefgh", &[], ""),
            (3, "abcdefgh\r\nx\r\n", &[TooLong, line("x")], ""),
            (3, "abcdefgh\r\nxyz", &[TooLong], ""),
            (
                3,
                "a\r\nbcdef\r\nx\r\n",
                &[line("a"), TooLong, line("x")],
                "",
            ),
            (3, "ab\r\r\n", &[TooLong], ""),
            // Values below the minimum are raised to it.
            (0, "a\r\nab\r\n", &[line("a"), TooLong], ""),
            (1, "\n", &[line("")], ""),
        ];
        for (max, input, events, rest) in cases {
            let (got, left, _) = run(*max, &[input.as_bytes()]);
            assert_eq!(&got, events, "max {max} input {input:?}");
            assert_eq!(left, rest.as_bytes(), "max {max} input {input:?}");
            // Byte at a time gives the same.
            let bytes: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
            assert_eq!(&run(*max, &bytes).0, events, "bytewise {input:?}");
        }
    }

    #[test]
    fn limits() {
        let ok = format!("{}\r\n", "x".repeat(COMMAND_LINE_MAX - 2));
        let long = format!("{}\r\n", "x".repeat(COMMAND_LINE_MAX - 1));
        let input = format!("{ok}{long}QUIT\r\n");
        let (events, left, discarding) = run(COMMAND_LINE_MAX, &[input.as_bytes()]);
        assert_eq!(
            events,
            [
                line(&"x".repeat(COMMAND_LINE_MAX - 2)),
                Event::TooLong,
                line("QUIT")
            ]
        );
        assert!(left.is_empty() && !discarding);

        let text = format!("{}\r\n", "y".repeat(TEXT_LINE_MAX - 2));
        let (events, _, _) = run(TEXT_LINE_MAX, &[text.as_bytes()]);
        assert_eq!(events, [line(&"y".repeat(TEXT_LINE_MAX - 2))]);
    }

    #[test]
    fn too_long_reported_once_after_the_lf() {
        let mut framer = LineFramer::new(4);
        assert_eq!(framer.frame(b"abcd"), (4, Status::Partial));
        assert!(framer.is_discarding());
        assert_eq!(framer.frame(b"efg"), (3, Status::Partial));
        assert_eq!(framer.frame(b""), (0, Status::Partial));
        assert_eq!(
            framer.frame(b"h\nOK\n"),
            (2, Status::Complete(Frame::TooLong))
        );
        assert!(!framer.is_discarding());
        assert_eq!(
            framer.frame(b"OK\r\n"),
            (4, Status::Complete(Frame::Line(b"OK")))
        );
    }

    #[test]
    fn reset_leaves_discard_mode() {
        let mut framer = LineFramer::new(3);
        assert_eq!(framer.frame(b"abc"), (3, Status::Partial));
        framer.reset();
        assert_eq!(
            framer.frame(b"d\n"),
            (2, Status::Complete(Frame::Line(b"d")))
        );
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

    proptest! {
        #[test]
        fn any_split_gives_the_same_events(
            input in proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'a'), Just(b' ')], 0..200),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
            max in 3usize..20,
        ) {
            let whole = run(max, &[&input]);
            let chunked = run(max, &split(&input, &cuts));
            prop_assert_eq!(&whole, &chunked);
            let bytewise: Vec<&[u8]> = input.chunks(1).collect();
            prop_assert_eq!(&whole, &run(max, &bytewise));
        }

        #[test]
        fn fuzz_entry_point(input in proptest::collection::vec(any::<u8>(), 0..400)) {
            crate::fuzzing::line_framing(&input);
        }
    }
}
