//! [`Protocol`]: SMTP or LMTP, the one choice both ends of a session make the same way
//! (the server session answers in it, the client connection speaks it).

/// Which protocol a session speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// RFC 5321: HELO/EHLO, one reply after the end of data.
    Smtp,
    /// RFC 2033: LHLO, one reply per accepted recipient after the end of data.
    Lmtp,
}

impl Protocol {
    /// The word of the greeting and of a `Received:` line's `with`: `ESMTP`, `LMTP`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Smtp => "ESMTP",
            Self::Lmtp => "LMTP",
        }
    }
}
