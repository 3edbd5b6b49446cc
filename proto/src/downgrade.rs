//! 8-bit MIME to 7-bit: quoted-printable conversion for a store without 8BITMIME, sans-IO.
//!
//! [`Downgrade`] is fed a message's content in chunks of any size and writes the converted
//! content out as it goes (RFC 6152 §3, RFC 2045 §6.7, RFC 2046 §5.1; what Postfix's
//! `mime_state` does with `MIME_OPT_DOWNGRADE`):
//!
//! - Headers are never changed, except a part's `Content-Transfer-Encoding`: a leaf part
//!   declared `8bit` or `binary` gets `quoted-printable` and its body is encoded; a
//!   `multipart/*` or `message/*` part declared `8bit` or `binary` gets `7bit`, and its
//!   parts (or the attached message) are converted in turn.
//! - Multipart boundaries are followed (nested, up to [`MAX_DEPTH`]); boundary lines,
//!   preambles and epilogues pass through. Children of `multipart/digest` default to
//!   `message/rfc822`.
//! - Nothing else is rewritten: a part declared `7bit` (or not declared) that carries 8-bit
//!   octets anyway, or 8-bit octets in headers, pass through unchanged and are reported by
//!   [`Downgrade::eight_bit_headers`] / are visible in the output; the caller decides (the
//!   LMTP agent then bounces `5.6.3` or `5.6.7` as before).
//!
//! # Promises
//!
//! - Chunk independence: the output does not depend on how the input is cut.
//! - Bounded memory: a partial line is held up to [`MAX_LINE`] octets, a header block up to
//!   [`MAX_HEADER`]; beyond, the line (or the block) is passed on unconverted-as-is, never
//!   dropped. Nothing grows with the size of the message.
//! - A converted leaf's output is 7-bit and its lines are at most 76 octets (soft line
//!   breaks); decoding it as quoted-printable gives back the part's octets, with line
//!   endings as CRLF.
//! - No input panics.

/// The longest line held whole; a longer one is passed on (or encoded) in pieces.
pub const MAX_LINE: usize = 8 * 1024;

/// The largest header block held for inspection; a larger one passes through unchanged and
/// its part is not converted.
pub const MAX_HEADER: usize = 256 * 1024;

/// The deepest multipart nesting followed; deeper parts pass through unchanged.
pub const MAX_DEPTH: usize = 32;

/// The longest encoded line, soft line break included (RFC 2045 §6.7 rule 5).
const QP_LINE: usize = 76;

/// One multipart level being followed.
#[derive(Debug)]
struct Level {
    /// The boundary, without the leading `--`.
    boundary: Vec<u8>,
    /// `multipart/digest`: children default to `message/rfc822`.
    digest: bool,
}

/// Where in the message the converter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reading a header block; the flag: the part's default type is `message/rfc822`.
    Headers { digest_child: bool },
    /// A body passed through unchanged (a 7-bit leaf, a preamble or an epilogue).
    Plain,
    /// A leaf body being encoded as quoted-printable.
    Quoted,
    /// A header block too large to inspect, or nesting too deep: everything passes through
    /// and no boundary is followed any more.
    Opaque,
}

/// The streaming converter: see the module documentation.
#[derive(Debug)]
pub struct Downgrade {
    convert: bool,
    mode: Mode,
    levels: Vec<Level>,
    /// The current partial line (input octets).
    line: Vec<u8>,
    /// The current line was already partly passed on (too long): it is not a line start.
    continued: bool,
    /// The header block being read (raw lines).
    header: Vec<u8>,
    /// Column of the encoded output line (quoted-printable).
    column: usize,
    /// A space or tab held back at the end of a partial encoded line.
    held: Option<u8>,
    eight_bit_headers: bool,
    converted: usize,
}

impl Downgrade {
    /// A converter for a message. With `convert` false nothing is rewritten (the content
    /// passes through as is) but headers are still inspected for
    /// [`eight_bit_headers`](Self::eight_bit_headers).
    #[must_use]
    pub fn new(convert: bool) -> Self {
        Self {
            convert,
            mode: Mode::Headers {
                digest_child: false,
            },
            levels: Vec::new(),
            line: Vec::new(),
            continued: false,
            header: Vec::new(),
            column: 0,
            held: None,
            eight_bit_headers: false,
            converted: 0,
        }
    }

    /// Some header line seen so far has octets above 127.
    #[must_use]
    pub fn eight_bit_headers(&self) -> bool {
        self.eight_bit_headers
    }

    /// How many parts were converted to quoted-printable so far.
    #[must_use]
    pub fn converted_parts(&self) -> usize {
        self.converted
    }

    /// Converts `input`, appending to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        while !rest.is_empty() {
            if let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                self.line.extend_from_slice(&rest[..=nl]);
                rest = &rest[nl + 1..];
                let line = std::mem::take(&mut self.line);
                self.complete_line(&line, out);
                self.line = line;
                self.line.clear();
                self.continued = false;
            } else {
                let room = MAX_LINE.saturating_sub(self.line.len()).max(1);
                let take = room.min(rest.len());
                self.line.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if self.line.len() >= MAX_LINE {
                    // A CR at the cut stays: it may be the start of the line ending.
                    let keep = usize::from(self.line.last() == Some(&b'\r'));
                    let mut line = std::mem::take(&mut self.line);
                    let cut = line.len() - keep;
                    self.partial_line(&line[..cut], out);
                    line.drain(..cut);
                    self.line = line;
                    self.continued = true;
                }
            }
        }
    }

    /// Ends the content: whatever is held is written out.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() {
            // The last line without its line ending.
            match self.mode {
                Mode::Headers { .. } => {
                    self.note_header(&line);
                    self.header.extend_from_slice(&line);
                }
                Mode::Quoted => self.encode(&line, true, out),
                Mode::Plain | Mode::Opaque => out.extend_from_slice(&line),
            }
        }
        if matches!(self.mode, Mode::Headers { .. }) {
            out.append(&mut self.header);
        }
        if let Some(b) = self.held.take() {
            push_escaped(b, out);
        }
    }

    fn note_header(&mut self, line: &[u8]) {
        if !line.is_ascii() {
            self.eight_bit_headers = true;
        }
    }

    /// A piece of a line longer than [`MAX_LINE`] (no line ending in it).
    fn partial_line(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        match self.mode {
            Mode::Headers { .. } => {
                self.note_header(piece);
                self.header.extend_from_slice(piece);
                if self.header.len() > MAX_HEADER {
                    out.append(&mut self.header);
                    self.mode = Mode::Opaque;
                }
            }
            Mode::Quoted => self.encode(piece, false, out),
            Mode::Plain | Mode::Opaque => out.extend_from_slice(piece),
        }
    }

    /// A line with its line ending (LF, or CRLF).
    fn complete_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        if !self.continued && self.mode != Mode::Opaque {
            if let Some((depth, last)) = self.boundary(line) {
                if self.mode == Mode::Quoted {
                    self.end_quoted(out);
                }
                if matches!(self.mode, Mode::Headers { .. }) {
                    out.append(&mut self.header);
                }
                out.extend_from_slice(line);
                self.levels.truncate(depth + 1);
                if last {
                    self.levels.pop();
                    self.mode = Mode::Plain;
                } else {
                    let digest_child = self.levels.last().is_some_and(|l| l.digest);
                    self.mode = Mode::Headers { digest_child };
                }
                return;
            }
        }
        match self.mode {
            Mode::Headers { digest_child } => {
                self.note_header(line);
                let blank = !self.continued && (line == b"\r\n" || line == b"\n");
                self.header.extend_from_slice(line);
                if blank {
                    self.end_of_header(digest_child, out);
                } else if self.header.len() > MAX_HEADER {
                    out.append(&mut self.header);
                    self.mode = Mode::Opaque;
                }
            }
            Mode::Quoted => {
                let body = strip_eol(line);
                self.encode(body, true, out);
                out.extend_from_slice(b"\r\n");
                self.column = 0;
            }
            Mode::Plain | Mode::Opaque => out.extend_from_slice(line),
        }
    }

    /// The line is a boundary of a level being followed: its index, and whether it is the
    /// closing one.
    fn boundary(&self, line: &[u8]) -> Option<(usize, bool)> {
        let rest = line.strip_prefix(b"--")?;
        let rest = strip_eol(rest);
        for (i, level) in self.levels.iter().enumerate().rev() {
            if let Some(after) = rest.strip_prefix(level.boundary.as_slice()) {
                let (last, pad) = match after.strip_prefix(b"--") {
                    Some(pad) => (true, pad),
                    None => (false, after),
                };
                if pad.iter().all(|&b| b == b' ' || b == b'\t') {
                    return Some((i, last));
                }
            }
        }
        None
    }

    /// The blank line after a header block: decide what the part is, write the headers.
    fn end_of_header(&mut self, digest_child: bool, out: &mut Vec<u8>) {
        let header = std::mem::take(&mut self.header);
        let fields = Fields::parse(&header);
        let ctype = fields.content_type();
        let cte = fields.transfer_encoding();
        let eight = cte.is_some_and(|c| c == "8bit" || c == "binary");
        let (major, params) = match &ctype {
            Some((major, _, params)) => (major.as_str(), params.as_slice()),
            None if digest_child => ("message", &[][..]),
            None => ("text", &[][..]),
        };
        let (next, rewrite) = match major {
            "multipart" => {
                let boundary = params
                    .iter()
                    .find(|(k, _)| k == "boundary")
                    .map(|(_, v)| v.clone());
                match boundary {
                    Some(b) if !b.is_empty() && self.levels.len() < MAX_DEPTH => {
                        let digest = ctype.as_ref().is_some_and(|(_, sub, _)| sub == "digest");
                        self.levels.push(Level {
                            boundary: b.into_bytes(),
                            digest,
                        });
                        (Mode::Plain, eight.then_some("7bit"))
                    }
                    Some(_) if self.levels.len() >= MAX_DEPTH => (Mode::Opaque, None),
                    _ => (Mode::Plain, None),
                }
            }
            "message" => (
                Mode::Headers {
                    digest_child: false,
                },
                eight.then_some("7bit"),
            ),
            _ if eight => (Mode::Quoted, Some("quoted-printable")),
            _ => (Mode::Plain, None),
        };
        match rewrite {
            Some(cte) if self.convert => {
                fields.write_with_encoding(&header, cte, out);
                if next == Mode::Quoted {
                    self.converted += 1;
                }
                self.mode = next;
            }
            _ => {
                out.extend_from_slice(&header);
                self.mode = if next == Mode::Quoted {
                    Mode::Plain
                } else {
                    next
                };
            }
        }
        self.column = 0;
    }

    /// The end of a quoted part: a held whitespace octet is written escaped.
    fn end_quoted(&mut self, out: &mut Vec<u8>) {
        if let Some(b) = self.held.take() {
            push_escaped(b, out);
        }
        self.column = 0;
    }

    /// Encodes `data` (no line ending in it); `end`: the line ends after it, so trailing
    /// whitespace must be escaped.
    fn encode(&mut self, data: &[u8], end: bool, out: &mut Vec<u8>) {
        let held = self.held.take();
        let iter = held.into_iter().chain(data.iter().copied());
        let total = usize::from(held.is_some()) + data.len();
        for (i, b) in iter.enumerate() {
            let last = i + 1 == total;
            if last && !end && (b == b' ' || b == b'\t') {
                // It may be the line's last octet: decide when the next octet comes.
                self.held = Some(b);
                return;
            }
            let literal = matches!(b, 33..=60 | 62..=126) || ((b == b' ' || b == b'\t') && !last);
            let width = if literal { 1 } else { 3 };
            // Room for the octet and, unless it ends the line, a soft break after it.
            let limit = if last && end { QP_LINE } else { QP_LINE - 1 };
            if self.column + width > limit {
                out.extend_from_slice(b"=\r\n");
                self.column = 0;
            }
            if literal {
                out.push(b);
            } else {
                push_escaped(b, out);
            }
            self.column += width;
        }
    }
}

fn push_escaped(b: u8, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
}

fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A `Content-Type`: type, subtype (lowercased) and parameters (names lowercased).
type ContentType = (String, String, Vec<(String, String)>);

/// A header block as fields: each field's octet range in the block and its unfolded value.
struct Fields {
    /// (name lowercased, start, end, value unfolded)
    fields: Vec<(String, usize, usize, String)>,
}

impl Fields {
    fn parse(block: &[u8]) -> Self {
        let mut fields: Vec<(String, usize, usize, String)> = Vec::new();
        let mut at = 0;
        while at < block.len() {
            let end = block[at..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(block.len(), |p| at + p + 1);
            let line = &block[at..end];
            let text = String::from_utf8_lossy(strip_eol(line));
            if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
                if let Some(last) = fields.last_mut() {
                    last.2 = end;
                    last.3.push_str(&text);
                }
            } else if let Some((name, value)) = text.split_once(':') {
                fields.push((name.trim().to_ascii_lowercase(), at, end, value.to_owned()));
            }
            at = end;
        }
        Self { fields }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|f| f.0 == name)
            .map(|f| f.3.as_str())
    }

    /// `Content-Type`: the type and subtype lowercased, and the parameters (names
    /// lowercased, values unquoted).
    fn content_type(&self) -> Option<ContentType> {
        let value = strip_comments(self.get("content-type")?);
        let mut parts = split_params(&value).into_iter();
        let kind = parts.next()?;
        let (major, minor) = kind.split_once('/')?;
        let params = parts
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .map_or_else(|| v.to_owned(), |v| v.replace("\\\"", "\""));
                Some((k.trim().to_ascii_lowercase(), v))
            })
            .collect();
        Some((
            major.trim().to_ascii_lowercase(),
            minor.trim().to_ascii_lowercase(),
            params,
        ))
    }

    fn transfer_encoding(&self) -> Option<String> {
        let value = strip_comments(self.get("content-transfer-encoding")?);
        Some(value.trim().to_ascii_lowercase())
    }

    /// Writes `block` with every `Content-Transfer-Encoding` field replaced by one saying
    /// `cte` (a folded field is replaced whole).
    fn write_with_encoding(&self, block: &[u8], cte: &str, out: &mut Vec<u8>) {
        let mut at = 0;
        for (name, start, end, _) in &self.fields {
            if name == "content-transfer-encoding" {
                out.extend_from_slice(&block[at..*start]);
                out.extend_from_slice(b"Content-Transfer-Encoding: ");
                out.extend_from_slice(cte.as_bytes());
                out.extend_from_slice(b"\r\n");
                at = *end;
            }
        }
        out.extend_from_slice(&block[at..]);
    }
}

/// Removes RFC 822 comments (outside quoted strings).
fn strip_comments(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    for c in value.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// Splits at `;` outside quoted strings.
fn split_params(value: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let (mut quoted, mut escaped) = (false, false);
    for c in value.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == ';' && !quoted {
            parts.push(String::new());
            continue;
        }
        if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts.retain(|p| !p.trim().is_empty());
    parts
}

/// Decodes quoted-printable (for tests and the fuzz target): soft breaks removed, `=XX`
/// decoded, line endings kept.
#[must_use]
pub fn decode_quoted_printable(encoded: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        let b = encoded[i];
        if b == b'=' {
            if encoded[i + 1..].starts_with(b"\r\n") {
                i += 3;
                continue;
            }
            let hex = |c: u8| char::from(c).to_digit(16);
            if let (Some(h), Some(l)) = (
                encoded.get(i + 1).and_then(|&c| hex(c)),
                encoded.get(i + 2).and_then(|&c| hex(c)),
            ) {
                out.push(u8::try_from(h * 16 + l).unwrap_or(0));
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

#[cfg(test)]
#[path = "downgrade_tests.rs"]
mod tests;
