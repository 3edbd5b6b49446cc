//! What the client state machine reports ([`ClientEvent`]) and how a caller can misuse it
//! ([`ClientError`]).

use std::fmt;

use super::capabilities::Capabilities;
use crate::reply::{Reply, ReplyError};

/// Something the caller must know or act on, from
/// [`poll_event`](super::ClientConnection::poll_event).
///
/// Per recipient of a transaction, exactly one of these settles it: a refusing
/// [`RcptReply`](Self::RcptReply) (only while MAIL was accepted),
/// [`RecipientResult`](Self::RecipientResult), [`NotAttempted`](Self::NotAttempted) or
/// [`Unconfirmed`](Self::Unconfirmed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// The server greeted with 220. LHLO/EHLO is sent automatically.
    Greeted(Reply),
    /// The greeting was not 220 (RFC 5321 §3.1: typically 554 or 421). Only
    /// [`quit`](super::ClientConnection::quit) is allowed now.
    Refused(Reply),
    /// LHLO, EHLO or HELO succeeded: the connection is ready for commands. Sent again after
    /// STARTTLS, with the capabilities advertised over TLS.
    Ready(Capabilities),
    /// LHLO failed, EHLO failed with 4yz, or both EHLO and HELO failed. Only
    /// [`quit`](super::ClientConnection::quit) is allowed now.
    HelloRefused(Reply),
    /// 220 to STARTTLS: do the TLS handshake now on the same socket, then call
    /// [`tls_established`](super::ClientConnection::tls_established). `discarded` octets the
    /// server sent after the 220 were thrown away (RFC 3207 §4.2: plaintext injected before the
    /// handshake); anything fed until `tls_established` is thrown away too.
    TlsGoAhead {
        /// Plaintext octets that followed the 220 and were discarded.
        discarded: usize,
    },
    /// STARTTLS was refused; the connection stays usable in plaintext.
    TlsRefused(Reply),
    /// 235 to AUTH.
    Authenticated,
    /// AUTH failed (anything but 235; a 334 challenge is cancelled with `*` first and this
    /// carries the reply to the cancellation).
    AuthFailed(Reply),
    /// The reply to MAIL FROM. If it is not 2yz the transaction has failed: every recipient is
    /// settled by [`NotAttempted`](Self::NotAttempted) with this reply as the reason, and the
    /// RCPT and DATA replies that still arrive (pipelining) are only informative.
    MailReply(Reply),
    /// The reply to the RCPT TO of recipient `index` (the position in the list given to
    /// `start_transaction`). Not 2yz while MAIL was accepted: the recipient is refused, final.
    RcptReply {
        /// Position of the recipient in the transaction.
        index: usize,
        /// The server's reply.
        reply: Reply,
    },
    /// 354 to DATA: write the dot-stuffed body and its final `.` CRLF, then call
    /// [`data_sent`](super::ClientConnection::data_sent).
    DataGoAhead,
    /// DATA was refused; the accepted recipients become [`NotAttempted`](Self::NotAttempted)
    /// with this reply as the reason (unless MAIL had already failed the transaction).
    DataRefused(Reply),
    /// The reply to a BDAT chunk that does not settle recipients: a non-LAST chunk, or the
    /// LAST chunk of a transaction that had already failed or had no accepted recipient. A
    /// non-2yz reply fails the transaction (RFC 3030 §4: send no further chunk).
    BdatReply(Reply),
    /// The reply after the end of data (final `.` or BDAT LAST) for recipient `index`. LMTP:
    /// the server's own reply for that recipient, reported as it arrives (RFC 2033 §4.2). SMTP:
    /// the single reply for the message, repeated for every accepted recipient.
    RecipientResult {
        /// Position of the recipient in the transaction.
        index: usize,
        /// The server's reply.
        reply: Reply,
    },
    /// The connection ended after the end of data was sent but before this recipient's reply:
    /// the message may or may not have been delivered to it (RFC 2033 §5). Not a 4yz: a retry
    /// may deliver it twice.
    Unconfirmed {
        /// Position of the recipient in the transaction.
        index: usize,
    },
    /// The end of data was never sent for this recipient (connection lost before it, or the
    /// transaction failed at MAIL, DATA or BDAT): nothing was delivered, a retry is safe.
    NotAttempted {
        /// Position of the recipient in the transaction.
        index: usize,
        /// The reply that failed the transaction, `None` when the connection was lost.
        reason: Option<Reply>,
    },
    /// Every recipient of the transaction is settled; a new transaction may start. A failed
    /// transaction is first reset with an automatic RSET (if MAIL had been accepted).
    TransactionDone,
    /// The reply to [`rset`](super::ClientConnection::rset).
    RsetReply(Reply),
    /// The reply to [`noop`](super::ClientConnection::noop).
    NoopReply(Reply),
    /// A reply when none was expected (for example an unsolicited `421`). The connection is
    /// treated as lost, [`Closed`](Self::Closed) follows.
    UnexpectedReply(Reply),
    /// The server sent something that is not a reply. The connection is treated as lost,
    /// [`Closed`](Self::Closed) follows.
    ProtocolError(ReplyError),
    /// The connection is finished (QUIT answered, connection lost, or a protocol error); the
    /// caller closes the socket. Always the last event.
    Closed,
}

/// A call that the connection cannot honour in its current state. Nothing was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientError {
    /// The greeting or LHLO/EHLO is still pending, a command awaits its reply (without
    /// PIPELINING, BDAT must wait for the previous reply too), a TLS handshake is in progress,
    /// or the server refused the greeting or LHLO/EHLO.
    NotReady,
    /// The connection is closed.
    Closed,
    /// A transaction is open; wait for [`ClientEvent::TransactionDone`].
    TransactionOpen,
    /// There is no open transaction.
    NoTransaction,
    /// A transaction needs at least one recipient.
    NoRecipients,
    /// BDAT was asked for but the server did not advertise CHUNKING.
    ChunkingNotOffered,
    /// STARTTLS was asked for but the server did not advertise it.
    StartTlsNotOffered,
    /// The AUTH mechanism was not advertised.
    AuthNotOffered,
    /// The transaction has failed (MAIL, DATA or a BDAT chunk refused, or no recipient
    /// accepted); no more data may be sent. Wait for [`ClientEvent::TransactionDone`].
    TransactionFailed,
    /// The call does not fit the protocol sequence: `data_sent` without
    /// [`ClientEvent::DataGoAhead`], BDAT in a DATA transaction or after LAST,
    /// `tls_established` without [`ClientEvent::TlsGoAhead`].
    OutOfSequence,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotReady => "connection not ready for a command",
            Self::Closed => "connection closed",
            Self::TransactionOpen => "a transaction is already open",
            Self::NoTransaction => "no transaction is open",
            Self::NoRecipients => "a transaction needs at least one recipient",
            Self::ChunkingNotOffered => "the server does not offer CHUNKING",
            Self::StartTlsNotOffered => "the server does not offer STARTTLS",
            Self::AuthNotOffered => "the server does not offer this AUTH mechanism",
            Self::TransactionFailed => "the transaction has failed",
            Self::OutOfSequence => "call out of protocol sequence",
        })
    }
}

impl std::error::Error for ClientError {}
