//! Line framing (interim; replaced by the codec branch).

/// What [`LineFramer::frame`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line without its line ending.
    Line(&'a [u8]),
    /// An overlong line ended; its octets were discarded.
    TooLong,
    /// More input is needed.
    Partial,
}

/// Splits input into lines of at most `max` octets including CRLF.
#[derive(Debug)]
pub struct LineFramer {
    max: usize,
    discarding: bool,
}

impl LineFramer {
    /// A framer for lines of up to `max` octets including CRLF.
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(3),
            discarding: false,
        }
    }

    /// Looks for the next line in `buf`; returns the octets consumed and the frame.
    pub fn frame<'a>(&mut self, buf: &'a [u8]) -> (usize, Frame<'a>) {
        match memchr::memchr(b'\n', buf) {
            Some(i) if self.discarding => {
                self.discarding = false;
                (i + 1, Frame::TooLong)
            }
            Some(i) if i + 1 > self.max => (i + 1, Frame::TooLong),
            Some(i) => {
                let line = &buf[..i];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                (i + 1, Frame::Line(line))
            }
            None if self.discarding || buf.len() >= self.max => {
                self.discarding = true;
                (buf.len(), Frame::Partial)
            }
            None => (0, Frame::Partial),
        }
    }
}
