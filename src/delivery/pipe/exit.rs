//! How a command's end becomes an [`Outcome`]: a `D.S.N text` first line, Postfix's
//! `sys_exits` table, a signal (in doubt), or a plain status; and the local replies with the
//! command's output quoted.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use postern_proto::reply::EnhancedCode;

use super::local;
use super::process::Captured;
use crate::delivery::trouble::Outcome;

/// How a run ended.
#[derive(Debug)]
pub(super) enum Ended {
    /// The command could not be started (or waited for).
    Spawn(io::Error),
    /// The message could not be read; the command was killed.
    Input(io::Error),
    /// Killed at the time limit.
    TimedOut(Captured),
    /// It exited (or died of a signal) by itself.
    Exited {
        status: ExitStatus,
        output: Captured,
        /// Writing its stdin failed other than by the command closing it.
        write_error: Option<io::Error>,
    },
}

/// The outcome of a command that ended by itself (Postfix's `pipe_command` and `sys_exits`).
pub(super) fn exit_outcome(
    status: ExitStatus,
    output: &Captured,
    write_error: Option<&io::Error>,
    program: &str,
) -> Outcome {
    if let Some(signal) = status.signal() {
        let text = with_output(
            format!("Command died with signal {signal}: \"{program}\""),
            output,
        );
        tracing::warn!(reason = %text, "delivery command killed; its recipients are in doubt");
        return Outcome::InDoubt;
    }
    let code = status.code().unwrap_or(-1);
    if code == 0 {
        if let Some(e) = write_error {
            let text = format!("Writing the message to \"{program}\": {e}");
            return Outcome::Deferred(local((4, 3, 0), &text));
        }
        return Outcome::Delivered(local((2, 0, 0), &format!("Delivered to \"{program}\"")));
    }
    // "D.S.N text" as the first output line decides (pipe_command.c: dsn_valid).
    if let Some(line) = output.first_line() {
        if let Some((e, text)) = EnhancedCode::parse_prefix(&line) {
            if matches!(e.class, 4 | 5) && !text.trim().is_empty() {
                return settle_status(e, text.trim());
            }
        }
    }
    let (e, text) = match sys_exit(code) {
        Some((e, text)) => (e, format!("{text} (exit status {code})")),
        None => (
            EnhancedCode::new(5, 3, 0),
            format!("Command died with status {code}: \"{program}\""),
        ),
    };
    settle_status(e, &with_output(text, output))
}

pub(super) fn settle_status(e: EnhancedCode, text: &str) -> Outcome {
    let reply = local((e.class, e.subject, e.detail), text);
    if e.class == 4 {
        Outcome::Deferred(reply)
    } else {
        Outcome::Bounced(reply)
    }
}

/// `<sysexits.h>` codes as Postfix's `global/sys_exits.c` maps them.
pub(super) fn sys_exit(code: i32) -> Option<(EnhancedCode, &'static str)> {
    let (e, text) = match code {
        64 => ((5, 3, 0), "command line usage error"),
        65 => ((5, 6, 0), "data format error"),
        66 => ((5, 3, 0), "cannot open input"),
        67 => ((5, 1, 1), "user unknown"),
        68 => ((5, 1, 2), "host name unknown"),
        69 => ((5, 3, 0), "service unavailable"),
        70 => ((5, 3, 0), "internal software error"),
        71 => ((4, 3, 0), "system resource problem"),
        72 => ((5, 3, 0), "critical OS file missing"),
        73 => ((5, 2, 0), "can't create user output file"),
        74 => ((5, 3, 0), "input/output error"),
        75 => ((4, 3, 0), "temporary failure"),
        76 => ((5, 5, 0), "remote error in protocol"),
        77 => ((5, 7, 0), "permission denied"),
        78 => ((5, 3, 5), "local configuration error"),
        _ => return None,
    };
    Some((EnhancedCode::new(e.0, e.1, e.2), text))
}

pub(super) fn with_output(text: String, output: &Captured) -> String {
    match output.first_line() {
        Some(line) => format!("{text}. Command output: {line}"),
        None => text,
    }
}
