//! The running command's plumbing: its stdin fed from the message (CRLF to LF unless
//! `line_endings: crlf`), its output read up to `max_output` and the rest drained, and its
//! process group killed when it must stop.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;

use super::config::LineEndings;
use super::{QUOTED_OUTPUT, READ_SIZE};

/// The command's output, up to a limit; the rest is counted and dropped.
#[derive(Debug)]
pub(super) struct Captured {
    pub(super) kept: Vec<u8>,
    limit: usize,
    pub(super) dropped: u64,
}

impl Captured {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            kept: Vec::new(),
            limit,
            dropped: 0,
        }
    }

    pub(super) fn push(&mut self, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.kept.len()).min(bytes.len());
        self.kept.extend_from_slice(&bytes[..room]);
        self.dropped += (bytes.len() - room) as u64;
    }

    /// The first non-blank line, printable ASCII (others `_`, tabs spaces), at most
    /// [`QUOTED_OUTPUT`] characters.
    pub(super) fn first_line(&self) -> Option<String> {
        let line = self
            .kept
            .split(|b| *b == b'\n')
            .find(|l| l.iter().any(|b| !b.is_ascii_whitespace()))?;
        let clean: String = line
            .iter()
            .filter(|b| **b != b'\r')
            .take(QUOTED_OUTPUT)
            .map(|&b| match b {
                b'\t' => ' ',
                0x20..=0x7e => char::from(b),
                _ => '_',
            })
            .collect();
        Some(clean.trim().to_owned())
    }
}

/// How feeding the message to the command ended.
#[derive(Debug)]
pub(super) enum Fed {
    /// All of it, and stdin closed.
    Done,
    /// The command closed its stdin first (EPIPE): its exit status decides.
    Closed,
    /// Writing failed otherwise.
    WriteFailed(io::Error),
    /// Reading the message failed; stdin is handed back still open, so the command can be
    /// killed before it sees an end of input.
    ReadFailed(io::Error, ChildStdin),
}

pub(super) async fn feed<R: AsyncRead + Unpin>(
    mut reader: R,
    mut stdin: ChildStdin,
    eol: LineEndings,
) -> Fed {
    let mut input = vec![0u8; READ_SIZE];
    let mut converted = Vec::with_capacity(READ_SIZE);
    let mut lf = ToLf::default();
    loop {
        let n = match reader.read(&mut input).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Fed::ReadFailed(e, stdin),
        };
        let chunk = match eol {
            LineEndings::Crlf => &input[..n],
            LineEndings::Lf => {
                converted.clear();
                lf.convert(&input[..n], &mut converted);
                &converted[..]
            }
        };
        if let Err(e) = stdin.write_all(chunk).await {
            return written(e);
        }
    }
    converted.clear();
    lf.finish(&mut converted);
    if let Err(e) = stdin.write_all(&converted).await {
        return written(e);
    }
    if let Err(e) = stdin.flush().await {
        return written(e);
    }
    drop(stdin);
    Fed::Done
}

pub(super) fn written(e: io::Error) -> Fed {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Fed::Closed
    } else {
        Fed::WriteFailed(e)
    }
}

/// CRLF → LF across chunk boundaries; a bare CR is kept.
#[derive(Debug, Default)]
pub(super) struct ToLf {
    pending_cr: bool,
}

impl ToLf {
    pub(super) fn convert(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if self.pending_cr {
                self.pending_cr = false;
                if b != b'\n' {
                    out.push(b'\r');
                }
            }
            if b == b'\r' {
                self.pending_cr = true;
            } else {
                out.push(b);
            }
        }
    }

    pub(super) fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.pending_cr) {
            out.push(b'\r');
        }
    }
}

/// A pipe for the command's stdout and stderr: the write end (close-on-exec; the child gets
/// it as fds 1 and 2) and our non-blocking read end.
pub(super) fn output_pipe() -> io::Result<(OwnedFd, tokio::net::unix::pipe::Receiver)> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    Ok((
        write,
        tokio::net::unix::pipe::Receiver::from_owned_fd(read)?,
    ))
}

/// SIGKILL to the command's process group (it leads it: `process_group(0)`).
pub(super) fn kill_group(group: Option<i32>) {
    if let Some(pid) = group.and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}
