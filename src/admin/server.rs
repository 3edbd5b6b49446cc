//! The admin socket: a unix socket, mode 0600, that `postern queue` talks to while the
//! daemon runs.
//!
//! Promises: the socket is never reachable with looser permissions than 0600. It is bound
//! inside a fresh private (0700) directory, chmod-ed to 0600 and checked, and only then
//! renamed to its configured path; if any step fails the gateway does not start. A live
//! socket at the path (another daemon) is refused, a stale one is replaced, anything else
//! at the path is left alone and refused. The socket file is removed at shutdown.
//!
//! Each connection sends request lines and gets one response line per request
//! ([`super::protocol`]); a line longer than [`MAX_REQUEST_LINE`] or that does not parse
//! gets an error response and the connection is closed.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::handler::Backend;
use super::protocol::{MAX_REQUEST_LINE, Request, Response};

/// A connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(300);

/// Why the admin socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// An I/O step failed.
    #[error("admin socket {path}: {what}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Another process answers on the socket.
    #[error("admin socket {0}: another postern is listening on it")]
    InUse(PathBuf),
    /// Something that is not a socket is at the path.
    #[error("admin socket {0}: exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    /// The mode did not come out as 0600.
    #[error("admin socket {path}: mode is {mode:o}, not 600; refusing to serve")]
    Mode {
        /// The socket's path.
        path: PathBuf,
        /// What it came out as.
        mode: u32,
    },
}

/// A bound admin socket.
#[derive(Debug)]
pub struct AdminServer {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminServer {
    /// Binds `path` with mode 0600 (see the module header).
    pub fn bind(path: &Path) -> Result<Self, AdminError> {
        let io_err = |what: &'static str| {
            let path = path.to_owned();
            move |source| AdminError::Io { path, what, source }
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io_err("creating its directory"))?;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(AdminError::InUse(path.to_owned()));
                }
                std::fs::remove_file(path).map_err(io_err("removing the stale socket"))?;
            }
            Ok(_) => return Err(AdminError::NotASocket(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("checking the path")(e)),
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let private = parent.join(format!(".admin-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(io_err("creating a private directory"))?;
        let result = Self::bind_in(&private, path);
        let _ = std::fs::remove_file(private.join("admin.sock"));
        let _ = std::fs::remove_dir(&private);
        result
    }

    fn bind_in(private: &Path, path: &Path) -> Result<Self, AdminError> {
        let io_err = |what: &'static str| {
            let path = path.to_owned();
            move |source| AdminError::Io { path, what, source }
        };
        let tmp = private.join("admin.sock");
        let listener = UnixListener::bind(&tmp).map_err(io_err("binding"))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("setting mode 0600"))?;
        let mode = std::fs::metadata(&tmp)
            .map_err(io_err("checking the mode"))?
            .permissions()
            .mode()
            & 0o777;
        if mode != 0o600 {
            return Err(AdminError::Mode {
                path: path.to_owned(),
                mode,
            });
        }
        std::fs::rename(&tmp, path).map_err(io_err("moving into place"))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown`, then removes the socket file.
    pub async fn serve(self, backend: Arc<Backend>, shutdown: CancellationToken) {
        tracing::info!(path = %self.path.display(), "admin socket");
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    let backend = Arc::clone(&backend);
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            () = stop.cancelled() => {}
                            r = connection(stream, backend) => {
                                if let Err(e) = r {
                                    tracing::debug!(error = %e, "admin connection ended");
                                }
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn connection(stream: UnixStream, backend: Arc<Backend>) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut line = Vec::new();
        let limit = MAX_REQUEST_LINE as u64 + 1;
        let n = match tokio::time::timeout(IDLE, (&mut r).take(limit).read_until(b'\n', &mut line))
            .await
        {
            Ok(n) => n?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        let (response, close) = if line.len() > MAX_REQUEST_LINE {
            (
                error(format!("request longer than {MAX_REQUEST_LINE} bytes")),
                true,
            )
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => (backend.handle(req).await, false),
                Err(e) => (error(format!("bad request: {e}")), true),
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
        out.push(b'\n');
        w.write_all(&out).await?;
        if close {
            return Ok(());
        }
    }
}

fn error(message: String) -> Response {
    Response::Error { message }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[tokio::test]
    async fn binds_0600_refuses_a_live_socket_and_anything_else_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.sock");
        let server = AdminServer::bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(matches!(
            AdminServer::bind(&path),
            Err(AdminError::InUse(_))
        ));
        // No private directory is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("admin.sock")]);
        drop(server);
        // Stale (nobody listening): replaced.
        let again = AdminServer::bind(&path).unwrap();
        drop(again);
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            AdminServer::bind(&file),
            Err(AdminError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
