//! DATA codec (interim, byte at a time; replaced by the codec branch).

/// What to do with a bare CR or LF in content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareLineEndings {
    /// Write it as CRLF.
    Normalize,
    /// Keep it.
    Preserve,
}

/// Progress of one [`DataDecoder::decode`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Octets of input consumed.
    pub consumed: usize,
    /// The terminator was seen (and consumed).
    pub finished: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    LineStart,
    InLine,
    Cr,
    Dot,
    DotCr,
}

/// Streaming dot-unstuffing decoder.
#[derive(Debug)]
pub struct DataDecoder {
    policy: BareLineEndings,
    st: St,
    bare_lf: u64,
    bare_cr: u64,
}

impl DataDecoder {
    /// A decoder at the start of data.
    pub fn new(policy: BareLineEndings) -> Self {
        Self { policy, st: St::LineStart, bare_lf: 0, bare_cr: 0 }
    }

    /// Bare LFs seen.
    pub fn bare_lf(&self) -> u64 {
        self.bare_lf
    }

    /// Bare CRs seen.
    pub fn bare_cr(&self) -> u64 {
        self.bare_cr
    }

    /// Back to the start of data.
    pub fn reset(&mut self) {
        *self = Self::new(self.policy);
    }

    fn bare(&mut self, b: u8, out: &mut Vec<u8>) {
        if b == b'\n' {
            self.bare_lf += 1;
        } else {
            self.bare_cr += 1;
        }
        match self.policy {
            BareLineEndings::Normalize => out.extend_from_slice(b"\r\n"),
            BareLineEndings::Preserve => out.push(b),
        }
    }

    /// Decodes `input` into `out`.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Decoded {
        for (i, &b) in input.iter().enumerate() {
            self.st = match (self.st, b) {
                (St::LineStart, b'.') => St::Dot,
                (St::Dot, b'\r') => St::DotCr,
                (St::DotCr, b'\n') => return Decoded { consumed: i + 1, finished: true },
                (St::DotCr, b'\r') => {
                    self.bare('\r' as u8, out);
                    St::Cr
                }
                (St::DotCr, b) => {
                    self.bare(b'\r', out);
                    if b == b'\n' { St::InLine } else { out.push(b); St::InLine }
                }
                (St::Cr, b'\n') => {
                    out.extend_from_slice(b"\r\n");
                    St::LineStart
                }
                (St::Cr, b'\r') => {
                    self.bare(b'\r', out);
                    St::Cr
                }
                (St::Cr, b) => {
                    self.bare(b'\r', out);
                    if b == b'\n' { self.bare(b, out) } else { out.push(b) }
                    St::InLine
                }
                (_, b'\r') => St::Cr,
                (_, b'\n') => {
                    self.bare(b, out);
                    St::InLine
                }
                (_, b) => {
                    out.push(b);
                    St::InLine
                }
            };
        }
        Decoded { consumed: input.len(), finished: false }
    }
}

/// Reads the octets of one BDAT chunk.
#[derive(Debug)]
pub struct BdatReader {
    remaining: u64,
}

impl BdatReader {
    /// A reader for a chunk of `size` octets.
    pub fn new(size: u64) -> Self {
        Self { remaining: size }
    }

    /// Octets still to come.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The part of `input` that belongs to the chunk, and whether the chunk is complete.
    pub fn take<'a>(&mut self, input: &'a [u8]) -> (&'a [u8], bool) {
        let n = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(input.len());
        self.remaining -= n as u64;
        (&input[..n], self.remaining == 0)
    }
}
