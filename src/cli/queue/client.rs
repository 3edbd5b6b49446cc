//! The client end of the admin socket, and the read-only fallback: finding the daemon (or
//! the spool) and turning every way of not finding it into a clear [`QueueError`].
//!
//! Blocking std I/O: one request, one response line, then the connection is closed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::admin::protocol::{Request, Response};
use crate::spool::{Spool, SpoolError, SpoolSnapshot};

/// How long to wait for the daemon's answer (a list of a big queue reads every envelope).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a queue command failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No daemon answers on the admin socket.
    #[error("postern is not running (no admin socket at {}{})", socket.display(), detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    NotRunning {
        /// The socket path tried.
        socket: PathBuf,
        /// What connecting said, when the file exists.
        detail: Option<String>,
    },
    /// The socket is there but may not be used (permissions).
    #[error("cannot use the admin socket {}: {source} (it is mode 0600: run as the daemon's user, or root)", socket.display())]
    Access {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The spool directory does not exist.
    #[error("spool not found at {} (spool.path in the configuration)", .0.display())]
    SpoolNotFound(PathBuf),
    /// The spool could not be read.
    #[error("cannot read the spool at {}: {source}", path.display())]
    Spool {
        /// Its directory.
        path: PathBuf,
        /// Why.
        source: SpoolError,
    },
    /// Talking to the daemon failed half-way.
    #[error("admin socket {}: {detail}", socket.display())]
    Protocol {
        /// The socket path.
        socket: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(String),
    /// The arguments do not make a request.
    #[error("{0}")]
    Usage(String),
}

/// Sends `req` to the daemon at `socket` and reads its answer.
pub fn request(socket: &Path, req: &Request) -> Result<Response, QueueError> {
    let stream = connect(socket)?;
    let proto = |detail: String| QueueError::Protocol {
        socket: socket.to_owned(),
        detail,
    };
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| proto(e.to_string()))?;
    let mut line = serde_json::to_vec(req).map_err(|e| proto(e.to_string()))?;
    line.push(b'\n');
    (&stream)
        .write_all(&line)
        .map_err(|e| proto(format!("sending: {e}")))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| proto(format!("reading the answer: {e}")))?;
    if answer.is_empty() {
        return Err(proto(
            "the daemon closed the connection without answering".into(),
        ));
    }
    match serde_json::from_str(&answer).map_err(|e| proto(format!("bad answer: {e}")))? {
        Response::Error { message } => Err(QueueError::Refused(message)),
        r => Ok(r),
    }
}

fn connect(socket: &Path) -> Result<UnixStream, QueueError> {
    UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => QueueError::Access {
            socket: socket.to_owned(),
            source: e,
        },
        _ => QueueError::NotRunning {
            socket: socket.to_owned(),
            detail: socket.exists().then(|| e.to_string()),
        },
    })
}

/// Is a daemon answering on `socket`? `Ok(false)` when none is (no socket, or a stale one);
/// an error when one may be but cannot be used (permissions).
pub fn daemon_running(socket: &Path) -> Result<bool, QueueError> {
    match connect(socket) {
        Ok(_) => Ok(true),
        Err(QueueError::NotRunning { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads the spool in `dir` without its lock (no daemon needed; safe while one appends:
/// the scan stops at the last complete record).
pub fn read_spool(dir: &Path) -> Result<SpoolSnapshot, QueueError> {
    if !dir.is_dir() {
        return Err(QueueError::SpoolNotFound(dir.to_owned()));
    }
    Spool::open_read_only(dir).map_err(|source| QueueError::Spool {
        path: dir.to_owned(),
        source,
    })
}
