//! Replies: parse and format, multi-line, enhanced status codes.
//!
//! A [`Reply`] is a three-digit code (RFC 5321 §4.2), an optional enhanced status code
//! (RFC 2034, RFC 3463) and one or more text lines. The same type is written by the server
//! side and read by the client side: [`Reply::encode`] produces the wire form
//! (`250-…` continuation lines, `250 …` last line), and [`ReplyParser`] reassembles replies
//! from arbitrary chunks of server output.
//!
//! Parsing rules, after what real stores send (Cyrus repeats the code on every line but puts
//! the enhanced code only on the last one; Dovecot puts it on each): the code of a multi-line
//! reply is taken from its last line, and the enhanced code from the last line that has one
//! whose class matches the reply's first digit.
//!
//! DIAGNOSTICS: malformed reply lines become [`ReplyError`]; a client treats that as a
//! protocol failure of the connection, never a panic. Lines are bounded by
//! [`ReplyParser::new`]'s limit and a reply by [`MAX_REPLY_LINES`].

use std::fmt;

use crate::line::{Frame, LineFramer, Status};

/// The largest number of lines one reply may have before the parser gives up on it.
pub const MAX_REPLY_LINES: usize = 100;

/// The longest reply line the client accepts, including CRLF. RFC 5321 §4.5.3.1.5 says 512;
/// real servers send longer ones (Cyrus's unknown-user text), so the client is lenient.
pub const MAX_REPLY_LINE: usize = 2048;

/// Reply class, from the first digit of the code (RFC 5321 §4.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Severity {
    /// 2yz: the requested action has been successfully completed.
    PositiveCompletion,
    /// 3yz: accepted, waiting for more (354 after DATA, 334 in AUTH).
    PositiveIntermediate,
    /// 4yz: not accepted, the condition is temporary.
    TransientNegative,
    /// 5yz: not accepted, do not repeat the same request.
    PermanentNegative,
}

/// A reply code, 200..=599.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyCode(u16);

impl ReplyCode {
    /// Checks that `code` is a valid reply code (2yz to 5yz, second digit 0–5).
    pub const fn new(code: u16) -> Option<Self> {
        if code >= 200 && code <= 599 && (code / 10) % 10 <= 5 {
            Some(Self(code))
        } else {
            None
        }
    }

    /// For the constant table in `replies`: the caller guarantees a valid code.
    pub(crate) const fn from_table(code: u16) -> Self {
        Self(code)
    }

    /// The numeric value.
    pub const fn get(self) -> u16 {
        self.0
    }

    /// The class of the reply.
    pub const fn severity(self) -> Severity {
        match self.0 / 100 {
            2 => Severity::PositiveCompletion,
            3 => Severity::PositiveIntermediate,
            4 => Severity::TransientNegative,
            _ => Severity::PermanentNegative,
        }
    }
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An enhanced mail system status code `class.subject.detail` (RFC 3463), e.g. `5.1.1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    /// 2 (success), 4 (persistent transient failure) or 5 (permanent failure).
    pub class: u8,
    /// 0–999: the subject (addressing, mailbox, mail system, network, protocol, content,
    /// security).
    pub subject: u16,
    /// 0–999: the detail within the subject.
    pub detail: u16,
}

impl EnhancedCode {
    /// Builds a code; `const` so reply tables can be constants.
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        Self {
            class,
            subject,
            detail,
        }
    }

    /// Parses `x.y.z` at the start of `text`, followed by a space or the end. Returns the code
    /// and the rest of the text after the separating space.
    pub fn parse_prefix(text: &str) -> Option<(Self, &str)> {
        let (word, rest) = match text.find(' ') {
            Some(i) => (&text[..i], &text[i + 1..]),
            None => (text, ""),
        };
        let mut parts = word.split('.');
        let class = parts.next()?;
        let subject = parts.next()?;
        let detail = parts.next()?;
        if parts.next().is_some() {
            return None;
        }
        let class: u8 = digits(class, 1)?.try_into().ok()?;
        if !matches!(class, 2 | 4 | 5) {
            return None;
        }
        let subject = digits(subject, 3)?;
        let detail = digits(detail, 3)?;
        Some((Self::new(class, subject, detail), rest))
    }
}

/// The non-empty lines of `text` split at CR and LF, appended to `out`.
fn lines_of(text: &str, out: &mut Vec<String>) {
    out.extend(
        text.split(['\r', '\n'])
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
    );
}

/// `s` as a number of 1 to `max` ASCII digits.
fn digits(s: &str, max: usize) -> Option<u16> {
    if s.is_empty() || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One reply: code, optional enhanced code, text lines (without the code prefixes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    code: ReplyCode,
    enhanced: Option<EnhancedCode>,
    lines: Vec<String>,
}

impl Reply {
    /// A one-line reply. Text containing CR or LF is split into lines, so a reply can never
    /// inject a line of its own.
    pub fn new(code: ReplyCode, enhanced: Option<EnhancedCode>, text: &str) -> Self {
        let mut lines = Vec::with_capacity(1);
        lines_of(text, &mut lines);
        Self::of(code, enhanced, lines)
    }

    /// A reply with several lines of text (written as a multi-line reply).
    pub fn with_lines(
        code: ReplyCode,
        enhanced: Option<EnhancedCode>,
        lines: impl IntoIterator<Item = String>,
    ) -> Self {
        let given = lines.into_iter();
        let mut lines: Vec<String> = Vec::with_capacity(given.size_hint().0);
        for line in given {
            if line.contains(['\r', '\n']) {
                lines_of(&line, &mut lines);
            } else if !line.is_empty() {
                lines.push(line);
            }
        }
        Self::of(code, enhanced, lines)
    }

    /// The reply of these lines, already split; none is one empty line.
    fn of(code: ReplyCode, enhanced: Option<EnhancedCode>, mut lines: Vec<String>) -> Self {
        if lines.is_empty() {
            lines.push(String::new());
        }
        Self {
            code,
            enhanced,
            lines,
        }
    }

    /// The reply code.
    pub fn code(&self) -> ReplyCode {
        self.code
    }

    /// The enhanced status code, when the reply has one.
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        self.enhanced
    }

    /// The text lines, without code prefixes.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// The text lines joined with a space: for logs and DSNs.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// The class of the reply.
    pub fn severity(&self) -> Severity {
        self.code.severity()
    }

    /// 2yz.
    pub fn is_positive(&self) -> bool {
        self.severity() == Severity::PositiveCompletion
    }

    /// 4yz.
    pub fn is_transient(&self) -> bool {
        self.severity() == Severity::TransientNegative
    }

    /// 5yz.
    pub fn is_permanent(&self) -> bool {
        self.severity() == Severity::PermanentNegative
    }

    /// Appends the wire form to `out`: `CODE-` on continuation lines, `CODE ` on the last,
    /// the enhanced code (if any) after the code on every line (RFC 2034 §4), CRLF endings.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        let last = self.lines.len().saturating_sub(1);
        out.reserve(self.lines.iter().map(|l| l.len() + 16).sum());
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            // Writing into a Vec cannot fail.
            let _ = match self.enhanced {
                Some(e) if line.is_empty() => write!(out, "{}{sep}{e}", self.code),
                Some(e) => write!(out, "{}{sep}{e} {line}", self.code),
                None => write!(out, "{}{sep}{line}", self.code),
            };
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

impl fmt::Display for Reply {
    /// One line for logs: `550 5.1.1 text text`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enhanced {
            Some(e) => write!(f, "{} {} {}", self.code, e, self.text()),
            None => write!(f, "{} {}", self.code, self.text()),
        }
    }
}

/// Why a reply could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplyError {
    /// A line did not start with a valid three-digit code and a separator.
    MalformedLine,
    /// A continuation line's code differs from the first line's.
    InconsistentCode,
    /// A line longer than the parser's limit.
    LineTooLong,
    /// More than [`MAX_REPLY_LINES`] lines.
    TooManyLines,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MalformedLine => "malformed reply line",
            Self::InconsistentCode => "reply lines carry different codes",
            Self::LineTooLong => "reply line too long",
            Self::TooManyLines => "too many reply lines",
        })
    }
}

impl std::error::Error for ReplyError {}

/// Reassembles replies from server output fed in chunks of any size.
#[derive(Debug)]
pub struct ReplyParser {
    framer: LineFramer,
    buf: Vec<u8>,
    pending: Vec<(ReplyCode, String)>,
}

impl Default for ReplyParser {
    fn default() -> Self {
        Self::new(MAX_REPLY_LINE)
    }
}

impl ReplyParser {
    /// A parser accepting lines of up to `max_line` octets including CRLF.
    pub fn new(max_line: usize) -> Self {
        Self {
            framer: LineFramer::new(max_line),
            buf: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Feeds server output.
    pub fn handle_input(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Octets fed but not yet consumed by a complete reply.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Takes the unconsumed octets (for example after a 220 to STARTTLS, where anything
    /// left over is plaintext injected before the handshake and must be discarded).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        self.pending.clear();
        std::mem::take(&mut self.buf)
    }

    /// The next complete reply, `Ok(None)` if more input is needed.
    pub fn poll_reply(&mut self) -> Result<Option<Reply>, ReplyError> {
        loop {
            let (consumed, frame) = self.framer.frame(&self.buf);
            let line = match frame {
                Status::Partial => {
                    self.buf.drain(..consumed);
                    return Ok(None);
                }
                Status::Complete(Frame::TooLong) => {
                    self.buf.drain(..consumed);
                    self.pending.clear();
                    return Err(ReplyError::LineTooLong);
                }
                Status::Complete(Frame::Line(line)) => parse_line(line),
            };
            self.buf.drain(..consumed);
            let (code, last, text) = match line {
                Ok(parsed) => parsed,
                Err(e) => {
                    self.pending.clear();
                    return Err(e);
                }
            };
            if let Some((first, _)) = self.pending.first() {
                if first.get() / 100 != code.get() / 100 {
                    self.pending.clear();
                    return Err(ReplyError::InconsistentCode);
                }
            }
            self.pending.push((code, text));
            if last {
                return Ok(Some(assemble(std::mem::take(&mut self.pending))));
            }
            if self.pending.len() >= MAX_REPLY_LINES {
                self.pending.clear();
                return Err(ReplyError::TooManyLines);
            }
        }
    }
}

/// Splits one reply line into code, last-line flag and text.
fn parse_line(line: &[u8]) -> Result<(ReplyCode, bool, String), ReplyError> {
    if line.len() < 3 {
        return Err(ReplyError::MalformedLine);
    }
    let code = std::str::from_utf8(&line[..3])
        .ok()
        .and_then(|s| digits(s, 3))
        .and_then(ReplyCode::new)
        .ok_or(ReplyError::MalformedLine)?;
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(ReplyError::MalformedLine),
    };
    Ok((code, last, String::from_utf8_lossy(text).into_owned()))
}

/// Builds a reply from its lines: code from the last line, enhanced code from the last line
/// that carries one matching the class.
fn assemble(lines: Vec<(ReplyCode, String)>) -> Reply {
    let code = lines.last().map_or(ReplyCode(500), |(c, _)| *c);
    let class = (code.get() / 100) as u8;
    let mut enhanced = None;
    let mut texts = Vec::with_capacity(lines.len());
    for (_, mut text) in lines {
        match EnhancedCode::parse_prefix(&text) {
            Some((e, rest)) if e.class == class => {
                enhanced = Some(e);
                // The rest is a suffix of the line: drop the prefix in place.
                let prefix = text.len() - rest.len();
                text.drain(..prefix);
                texts.push(text);
            }
            _ => texts.push(text),
        }
    }
    Reply {
        code,
        enhanced,
        lines: texts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(c: u16) -> ReplyCode {
        ReplyCode::new(c).unwrap()
    }

    fn parse_all(input: &[u8]) -> Vec<Result<Reply, ReplyError>> {
        let mut p = ReplyParser::default();
        p.handle_input(input);
        let mut out = Vec::new();
        loop {
            match p.poll_reply() {
                Ok(Some(r)) => out.push(Ok(r)),
                Ok(None) => return out,
                Err(e) => out.push(Err(e)),
            }
        }
    }

    #[test]
    fn reply_codes() {
        assert!(ReplyCode::new(199).is_none());
        assert!(ReplyCode::new(600).is_none());
        assert!(ReplyCode::new(260).is_none());
        assert_eq!(code(250).severity(), Severity::PositiveCompletion);
        assert_eq!(code(354).severity(), Severity::PositiveIntermediate);
        assert_eq!(code(451).severity(), Severity::TransientNegative);
        assert_eq!(code(554).severity(), Severity::PermanentNegative);
    }

    #[test]
    fn enhanced_codes() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("5.1.1 User unknown", Some(("5.1.1", "User unknown"))),
            ("2.0.0", Some(("2.0.0", ""))),
            ("4.2.2 Over quota", Some(("4.2.2", "Over quota"))),
            ("5.123.456 x", Some(("5.123.456", "x"))),
            ("3.1.1 x", None),
            ("5.1 x", None),
            ("5.1.1.1 x", None),
            ("5.1.1000 x", None),
            ("5.a.1 x", None),
            ("Mailbox unknown.", None),
            ("", None),
        ];
        for (text, want) in cases {
            let got = EnhancedCode::parse_prefix(text).map(|(e, r)| (e.to_string(), r.to_owned()));
            let want = want.map(|(e, r)| (e.to_owned(), r.to_owned()));
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn encode_single_and_multi() {
        let r = Reply::new(code(250), Some(EnhancedCode::new(2, 0, 0)), "Ok");
        assert_eq!(r.to_bytes(), b"250 2.0.0 Ok\r\n");
        let r = Reply::with_lines(code(250), None, ["mx".into(), "PIPELINING".into()]);
        assert_eq!(r.to_bytes(), b"250-mx\r\n250 PIPELINING\r\n");
        let r = Reply::new(code(221), Some(EnhancedCode::new(2, 0, 0)), "");
        assert_eq!(r.to_bytes(), b"221 2.0.0\r\n");
    }

    #[test]
    fn text_cannot_inject_lines() {
        let r = Reply::new(code(550), None, "evil\r\n250 ok");
        assert_eq!(r.to_bytes(), b"550-evil\r\n550 250 ok\r\n");
    }

    #[test]
    fn parses_cyrus_multiline_unknown_user() {
        let input = b"550-Mailbox unknown.  Either there is no mailbox associated with this\r\n\
550-name or you do not have authorization to see it.\r\n\
550 5.1.1 User unknown\r\n";
        let got = parse_all(input);
        assert_eq!(got.len(), 1);
        let r = got[0].as_ref().unwrap();
        assert_eq!(r.code(), code(550));
        assert_eq!(r.enhanced(), Some(EnhancedCode::new(5, 1, 1)));
        assert_eq!(r.lines().len(), 3);
        assert_eq!(r.lines()[2], "User unknown");
        assert!(r.is_permanent());
    }

    #[test]
    fn parses_dovecot_and_lhlo() {
        let input = b"250-localhost\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n\
552 5.2.2 <bob@example.org> Quota exceeded (mailbox for user is full)\r\n430 Authentication required\r\n";
        let got: Vec<_> = parse_all(input).into_iter().map(Result::unwrap).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0].lines(),
            [
                "localhost",
                "8BITMIME",
                "CHUNKING",
                "ENHANCEDSTATUSCODES",
                "PIPELINING"
            ]
        );
        assert_eq!(got[1].enhanced(), Some(EnhancedCode::new(5, 2, 2)));
        assert_eq!(got[2].enhanced(), None);
        assert_eq!(got[2].text(), "Authentication required");
    }

    #[test]
    fn enhanced_code_of_another_class_is_text() {
        let r = parse_all(b"451 5.1.1 odd\r\n").remove(0).unwrap();
        assert_eq!(r.enhanced(), None);
        assert_eq!(r.text(), "5.1.1 odd");
    }

    #[test]
    fn malformed_lines() {
        for bad in [
            &b"25 ok\r\n"[..],
            b"abc ok\r\n",
            b"250x\r\n",
            b"199 no\r\n",
            b"\r\n",
        ] {
            assert_eq!(
                parse_all(bad),
                vec![Err(ReplyError::MalformedLine)],
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_all(b"250-a\r\n550 b\r\n"),
            vec![Err(ReplyError::InconsistentCode)]
        );
        assert_eq!(parse_all(b"250\r\n").len(), 1);
    }

    #[test]
    fn too_many_lines_and_too_long() {
        let mut input = Vec::new();
        for _ in 0..MAX_REPLY_LINES + 5 {
            input.extend_from_slice(b"250-x\r\n");
        }
        assert!(parse_all(&input).contains(&Err(ReplyError::TooManyLines)));
        let mut long = b"250 ".to_vec();
        long.resize(MAX_REPLY_LINE + 10, b'a');
        long.extend_from_slice(b"\r\n250 ok\r\n");
        let got = parse_all(&long);
        assert_eq!(got[0], Err(ReplyError::LineTooLong));
        assert_eq!(got[1].as_ref().unwrap().text(), "ok");
    }

    #[test]
    fn byte_at_a_time_equals_whole() {
        let input = b"220 localhost ready\r\n250-a\r\n250-b\r\n250 c\r\n354 go ahead\r\n";
        let whole = parse_all(input);
        let mut p = ReplyParser::default();
        let mut got = Vec::new();
        for b in input {
            p.handle_input(&[*b]);
            while let Some(r) = p.poll_reply().unwrap() {
                got.push(Ok(r));
            }
        }
        assert_eq!(got, whole);
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn encode_parse_round_trip() {
        let replies = [
            Reply::new(code(250), Some(EnhancedCode::new(2, 1, 5)), "ok"),
            Reply::with_lines(
                code(550),
                Some(EnhancedCode::new(5, 1, 1)),
                ["a".into(), "b".into()],
            ),
            Reply::new(code(354), None, "go ahead"),
        ];
        for r in replies {
            let got = parse_all(&r.to_bytes()).remove(0).unwrap();
            assert_eq!(got, r);
        }
    }
}
