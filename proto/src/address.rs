//! STAND-IN: a minimal placeholder for the lead engineer's `address` module, written only so
//! the `client` branch builds. It has the public surface the client uses and nothing more; the
//! real module (RFC 5321 §4.1.2 paths, RFC 6531 UTF-8 mailboxes) replaces this file on merge.

use std::fmt;

/// Why an address could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressError;

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid mailbox")
    }
}

impl std::error::Error for AddressError {}

/// A mailbox `local-part@domain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    local: String,
    domain: String,
}

impl Mailbox {
    /// Parses `alice@example.org` (no angle brackets).
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        let (local, domain) = s.rsplit_once('@').ok_or(AddressError)?;
        let bad = |b: u8| b <= b' ' || b == 0x7f || b == b'<' || b == b'>';
        if local.is_empty() || domain.is_empty() || s.bytes().any(bad) {
            return Err(AddressError);
        }
        Ok(Self {
            local: local.to_owned(),
            domain: domain.to_owned(),
        })
    }

    /// The part before the `@`.
    pub fn local_part(&self) -> &str {
        &self.local
    }

    /// The part after the `@`.
    pub fn domain(&self) -> &str {
        &self.domain
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// The MAIL FROM path: `<>` or a mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReversePath {
    /// `<>`, for bounces.
    Null,
    /// `<mailbox>`.
    Mailbox(Mailbox),
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => f.write_str("<>"),
            Self::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// The RCPT TO path: `<Postmaster>` or a mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardPath {
    /// `<Postmaster>`.
    Postmaster,
    /// `<mailbox>`.
    Mailbox(Mailbox),
}

impl fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Postmaster => f.write_str("<Postmaster>"),
            Self::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}
