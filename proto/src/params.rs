//! STAND-IN: a minimal placeholder for the lead engineer's `params` module, written only so
//! the `client` branch builds. It has the public surface the client uses and nothing more; the
//! real module (typed ESMTP MAIL/RCPT parameters) replaces this file on merge.

use std::fmt;

/// The BODY= parameter (RFC 6152, RFC 3030).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// `BODY=7BIT`.
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
    /// `BODY=BINARYMIME`.
    BinaryMime,
}

/// MAIL FROM parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=n` (RFC 1870).
    pub size: Option<u64>,
    /// `BODY=…`.
    pub body: Option<Body>,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
}

impl fmt::Display for MailParams {
    /// Each parameter preceded by a space; nothing when there are none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(size) = self.size {
            write!(f, " SIZE={size}")?;
        }
        match self.body {
            Some(Body::SevenBit) => f.write_str(" BODY=7BIT")?,
            Some(Body::EightBitMime) => f.write_str(" BODY=8BITMIME")?,
            Some(Body::BinaryMime) => f.write_str(" BODY=BINARYMIME")?,
            None => {}
        }
        if self.smtputf8 {
            f.write_str(" SMTPUTF8")?;
        }
        Ok(())
    }
}

/// RCPT TO parameters (none in this stand-in).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RcptParams {}

impl fmt::Display for RcptParams {
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Ok(())
    }
}
