//! [`SpoolError`]: why a spool operation failed, and the reply a session sends for it.
//!
//! Imports from the spool only the queue id, the ledger's [`InvalidTransition`] and the
//! record format's [`FormatError`](super::record::FormatError): no other file of the split.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use postern_proto::{Reply, replies};

use super::id::QueueId;
use super::ledger::InvalidTransition;
use super::record;

/// Why a spool operation failed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// The disk is full (ENOSPC/EDQUOT) or below the free-space floor: `452 4.3.1`.
    #[error("spool is out of space")]
    NoSpace,
    /// Any other I/O error: `451 4.3.0`.
    #[error("spool I/O error: {0}")]
    Io(Arc<io::Error>),
    /// Data on disk does not parse or does not match its checksum.
    #[error("corrupt spool data{}: {detail}", qid.map(|q| format!(" for {q}")).unwrap_or_default())]
    Corrupt {
        /// The message, when known.
        qid: Option<QueueId>,
        /// What is wrong.
        detail: String,
    },
    /// Another process holds the spool's lock.
    #[error("spool {0} is locked by another process (is a gateway running on it?)")]
    Locked(PathBuf),
    /// The spool directory is world-writable: any local user could plant, replace or
    /// remove queue files (forged mail, lost mail). Refused at [`Spool::open`](super::Spool::open).
    #[error(
        "spool directory {} is world-writable (mode {mode:04o}): any local user could forge or remove queued mail; fix it with `chmod o-w {}` (the package's spool is postern:postern 0750)",
        path.display(),
        path.display()
    )]
    WorldWritable {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No such message in the spool.
    #[error("no message {0} in the spool")]
    NotFound(QueueId),
    /// No such recipient in the message.
    #[error("message {qid} has no recipient {rcpt}")]
    NoSuchRecipient {
        /// The message.
        qid: QueueId,
        /// The index asked for.
        rcpt: usize,
    },
    /// The ledger refused a transition.
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    /// A message without recipients, or similar misuse.
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// The spool is shutting down.
    #[error("the spool is closed")]
    Closed,
}

impl From<io::Error> for SpoolError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(28 | 122) => Self::NoSpace,
            _ => Self::Io(Arc::new(e)),
        }
    }
}

impl From<record::FormatError> for SpoolError {
    fn from(e: record::FormatError) -> Self {
        Self::Corrupt {
            qid: None,
            detail: e.to_string(),
        }
    }
}

impl SpoolError {
    pub(crate) fn from_errno(errno: i32) -> Self {
        io::Error::from_raw_os_error(errno).into()
    }

    /// The reply a session sends for this failure: `452 4.3.1` when out of space,
    /// `451 4.3.0` otherwise.
    pub fn reply(&self) -> Reply {
        match self {
            Self::NoSpace => replies::insufficient_storage(),
            _ => replies::local_error(),
        }
    }
}

/// `e` with the message it concerns, when it is corrupt data.
pub(super) fn with_qid(e: SpoolError, qid: QueueId) -> SpoolError {
    match e {
        SpoolError::Corrupt { detail, .. } => SpoolError::Corrupt {
            qid: Some(qid),
            detail,
        },
        e => e,
    }
}
