//! The `pipe` store: runs a command with the message on its stdin, like Postfix's pipe(8).
//!
//! ```yaml
//! stores:
//!   - kind: pipe
//!     name: lda
//!     argv: [/usr/lib/dovecot/dovecot-lda, -f, "${sender}", -a, "${recipient}"]
//!     timeout: 10m          # then the command (and its process group) is killed: 4.3.0
//!     max_output: 64KiB     # stdout+stderr kept for the reply text; the rest is discarded
//!     per_recipient: true   # one run per recipient (false: one run for all)
//!     line_endings: lf      # the message as the command sees it (lf like Postfix, or crlf)
//! ```
//!
//! # The command
//!
//! `argv[0]` is an absolute path, executed directly: no shell, no `PATH` search. Arguments
//! may contain `${sender}` (the envelope sender, empty for `<>`), `${recipient}` (the
//! recipient as received), `${user}` (its local part up to the first `+`) and `${domain}`
//! (its domain), whole or inside a longer argument; they are never split or re-parsed. With
//! `per_recipient: false` an argument that mentions a recipient macro is repeated once per
//! recipient, as in Postfix. A value that would begin an argument with `-` (an address such
//! as `-oQ/tmp@x` turned into an option) is refused: the recipient bounces `5.1.3` (the
//! sender: every recipient bounces `5.1.7`), as Postfix refuses such addresses
//! (`allow_min_user`).
//!
//! The command runs in its own process group, with an empty environment but
//! `PATH=/usr/bin:/bin`, in `/`, as postern's own user (`user:` is refused at load: changing
//! user needs privileges postern does not keep). Its stdin is the message, streamed from the
//! spool with CRLF turned into LF unless `line_endings: crlf`; its stdout and stderr are one
//! pipe (as in Postfix: the output keeps its order), read up to `max_output`, the excess read
//! and dropped. If reading the message fails
//! half-way, the command is killed before its stdin closes, so it never sees a truncated
//! message as complete.
//!
//! # The result
//!
//! | how it ended | outcome |
//! |---|---|
//! | exit 0 | delivered `250 2.0.0` (even if it did not read all its input) |
//! | exit ≠ 0, first output line `D.S.N text` | that status: 4.x.x deferred, 5.x.x bounced |
//! | exit 64–78 (sysexits) | Postfix's `sys_exits` table: 75 `EX_TEMPFAIL` and 71 `EX_OSERR` defer `4.3.0`; 67 `EX_NOUSER` bounces `5.1.1`, 68 `5.1.2`, 73 `5.2.0`, 65 `5.6.0`, 76 `5.5.0`, 77 `5.7.0`, 78 `5.3.5`, the others `5.3.0` |
//! | other exit status | bounced `5.3.0` |
//! | killed by a signal | in doubt (it ran, and may have delivered before it died): retried alone, and counted toward `delivery.poison_attempts` (a message that keeps killing its command is quarantined) |
//! | time limit | killed (whole process group), deferred `4.3.0` |
//! | cannot start | every recipient not attempted, [`Scope::Store`] (a configuration problem) |
//!
//! The reply text names the reason and carries the command's first line of output,
//! printable ASCII only, at most 200 characters. A time limit defers rather than bounces
//! (Postfix bounces): a command that hangs is usually a store that is down.
//!
//! Files: `config` (the settings), `argv` (templates and macros), `process` (stdin, output,
//! the process group), `exit` (how it ended → outcome); the run itself is here.
//!
//! SEE ALSO: Postfix `pipe(8)`, `global/pipe_command.c`, `global/sys_exits.c`.

mod argv;
mod config;
mod exit;
mod process;

use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use postern_proto::ReversePath;
use postern_proto::reply::{EnhancedCode, Reply, ReplyCode};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::time::Instant;

use super::error::StoreError;
use super::message::{MessageBody, OutboundEnvelope, Recipient, Report};
use super::trouble::{self, Outcome, Scope, Trouble};
use crate::config::units::{Invalid, Span};

use argv::{Arg, Values, parse_argv, unsafe_value};
pub use config::{LineEndings, PipeStoreConfig};
use exit::{Ended, exit_outcome, with_output};
use process::{Captured, Fed, feed, kill_group, output_pipe};

/// The command's `PATH` (Postfix's `_PATH_DEFPATH`).
const COMMAND_PATH: &str = "/usr/bin:/bin";

/// How long output is still read after the command exited (offspring may hold the pipes).
const AFTER_EXIT: Duration = Duration::from_secs(1);

/// The longest piece of command output quoted in a reply.
const QUOTED_OUTPUT: usize = 200;

/// Reads from the message and from the command's output.
const READ_SIZE: usize = 64 * 1024;

/// A pipe store, ready to run.
#[derive(Debug)]
pub struct PipeStore {
    name: String,
    program: String,
    args: Vec<Arg>,
    timeout: Duration,
    max_output: usize,
    per_recipient: bool,
    line_endings: LineEndings,
}

impl PipeStore {
    /// Loads a store's settings (validated again here).
    pub fn from_config(config: &PipeStoreConfig) -> Result<Self, StoreError> {
        let invalid = |reason: Invalid| StoreError::Invalid {
            store: config.name.clone(),
            reason: reason.into(),
        };
        config.validate().map_err(invalid)?;
        let args = parse_argv(&config.argv).map_err(invalid)?;
        Ok(Self {
            name: config.name.clone(),
            program: config.argv[0].clone(),
            args,
            timeout: config.timeout.0,
            // validate() bounds it to 16 MiB.
            max_output: usize::try_from(config.max_output.0).unwrap_or(64 << 10),
            per_recipient: config.per_recipient,
            line_endings: config.line_endings,
        })
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The command's path.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// One run per recipient.
    pub fn per_recipient(&self) -> bool {
        self.per_recipient
    }

    /// Delivers one message: one run per recipient (or one for all), each reading the body
    /// from its start. Each outcome goes to `on_outcome` as soon as its run has ended.
    pub async fn deliver<B, F>(
        &self,
        envelope: &OutboundEnvelope,
        recipients: &[Recipient],
        body: &B,
        on_outcome: &mut F,
    ) -> Report
    where
        B: MessageBody + ?Sized,
        F: FnMut(usize, &Outcome),
    {
        let sender = match &envelope.from {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(m) => m.to_string(),
        };
        let mut report = Report::default();
        let mut settle = |report: &mut Report, index: usize, outcome: Outcome| {
            on_outcome(index, &outcome);
            report.outcomes.push((index, outcome));
        };
        // Expand per recipient; a refused expansion settles the recipient at once.
        let mut runnable: Vec<(&Recipient, Values<'_>)> = Vec::with_capacity(recipients.len());
        for r in recipients {
            let values = Values::new(&sender, Some(&r.path));
            match self
                .args
                .iter()
                .try_for_each(|a| a.expand(&values).map(drop))
            {
                Ok(()) => runnable.push((r, values)),
                Err(var) => settle(&mut report, r.index, Outcome::Bounced(unsafe_value(var))),
            }
        }
        if self.per_recipient {
            let mut broken: Option<Outcome> = None;
            for (r, values) in &runnable {
                if let Some(outcome) = &broken {
                    settle(&mut report, r.index, outcome.clone());
                    continue;
                }
                let argv = self.argv(std::slice::from_ref(values));
                let (outcome, trouble) = self.judge(self.run(&argv, body).await);
                if trouble.as_ref().is_some_and(|t| t.scope == Scope::Store) {
                    broken = Some(outcome.clone());
                }
                if let Some(t) = trouble {
                    report.trouble = Trouble::widen(report.trouble.take(), t);
                }
                settle(&mut report, r.index, outcome);
            }
        } else if !runnable.is_empty() {
            let values: Vec<Values<'_>> = runnable
                .iter_mut()
                .map(|(_, v)| std::mem::take(v))
                .collect();
            let argv = self.argv(&values);
            let (outcome, trouble) = self.judge(self.run(&argv, body).await);
            if let Some(t) = trouble {
                report.trouble = Trouble::widen(report.trouble.take(), t);
            }
            for (r, _) in &runnable {
                settle(&mut report, r.index, outcome.clone());
            }
        }
        report
    }

    /// The command line for these recipients (values already checked by `expand`).
    fn argv(&self, recipients: &[Values<'_>]) -> Vec<String> {
        let mut argv = Vec::with_capacity(self.args.len() + recipients.len());
        for arg in &self.args {
            if arg.of_recipient() {
                argv.extend(recipients.iter().filter_map(|v| arg.expand(v).ok()));
            } else if let Some(v) = recipients.first() {
                argv.extend(arg.expand(v).ok());
            }
        }
        argv
    }

    /// One run of the command with the message on its stdin.
    async fn run<B: MessageBody + ?Sized>(&self, argv: &[String], body: &B) -> Ended {
        let reader = match body.open().await {
            Ok(reader) => reader,
            Err(e) => return Ended::Input(e),
        };
        let Some((program, args)) = argv.split_first() else {
            return Ended::Spawn(io::Error::other("empty command line"));
        };
        // stdout and stderr share one pipe, so the output keeps the order it was written in.
        let (output_end, mut output_pipe) = match output_pipe() {
            Ok(ends) => ends,
            Err(e) => return Ended::Spawn(e),
        };
        let stderr_end = match output_end.try_clone() {
            Ok(fd) => fd,
            Err(e) => return Ended::Spawn(e),
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .env("PATH", COMMAND_PATH)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(output_end))
            .stderr(Stdio::from(stderr_end))
            .process_group(0)
            .kill_on_drop(true);
        let spawned = command.spawn();
        // Our copies of the output pipe's write end close with the command: the end of
        // output is seen once the command (and whatever inherited them) has closed its own.
        drop(command);
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => return Ended::Spawn(e),
        };
        let group = child.id().and_then(|id| i32::try_from(id).ok());
        let Some(stdin) = child.stdin.take() else {
            kill_group(group);
            return Ended::Spawn(io::Error::other("the command's stdin is missing"));
        };
        let mut output = Captured::new(self.max_output);
        let feed = feed(reader, stdin, self.line_endings);
        tokio::pin!(feed);
        let limit = tokio::time::sleep(self.timeout);
        tokio::pin!(limit);
        let mut buf = vec![0u8; READ_SIZE];
        let mut output_open = true;
        let mut fed: Option<Fed> = None;
        let mut status: Option<io::Result<ExitStatus>> = None;
        let mut timed_out = false;
        loop {
            if let Some(Fed::ReadFailed(..)) = fed {
                break;
            }
            if status.is_some() && fed.is_some() && !output_open {
                break;
            }
            tokio::select! {
                r = &mut feed, if fed.is_none() => fed = Some(r),
                r = output_pipe.read(&mut buf), if output_open => match r {
                    Ok(n) if n > 0 => output.push(&buf[..n]),
                    _ => output_open = false,
                },
                s = child.wait(), if status.is_none() => {
                    status = Some(s);
                    // Offspring may keep the pipes open: read a moment longer, no more.
                    let soon = Instant::now() + AFTER_EXIT;
                    if soon < limit.deadline() {
                        limit.as_mut().reset(soon);
                    }
                }
                () = &mut limit => {
                    timed_out = status.is_none();
                    break;
                }
            }
        }
        if let Some(Fed::ReadFailed(e, stdin)) = fed {
            // Killed while its stdin is still open: it never sees the end of the message.
            kill_group(group);
            let _ = child.wait().await;
            drop(stdin);
            return Ended::Input(e);
        }
        if timed_out {
            kill_group(group);
            let _ = child.wait().await;
            return Ended::TimedOut(output);
        }
        let status = match status {
            Some(Ok(status)) => status,
            Some(Err(e)) => return Ended::Spawn(e),
            None => return Ended::TimedOut(output),
        };
        let write_error = match fed {
            Some(Fed::WriteFailed(e)) => Some(e),
            _ => None,
        };
        Ended::Exited {
            status,
            output,
            write_error,
        }
    }

    /// What a run's end means for its recipients, and any trouble beyond them.
    fn judge(&self, ended: Ended) -> (Outcome, Option<Trouble>) {
        let program = &self.program;
        match ended {
            Ended::Spawn(e) => {
                let reply = local((4, 3, 0), &format!("Cannot run command \"{program}\": {e}"));
                let trouble = Trouble {
                    scope: Scope::Store,
                    detail: format!("pipe {}: cannot run {program}: {e}", self.name),
                    reply: Some(reply.clone()),
                };
                (Outcome::NotAttempted(Some(reply)), Some(trouble))
            }
            Ended::Input(e) => {
                let reply = trouble::local_read_error(&e);
                let trouble = trouble::message_refused(&reply);
                (Outcome::Deferred(reply), Some(trouble))
            }
            Ended::TimedOut(output) => {
                let text = with_output(
                    format!(
                        "Command time limit ({}) exceeded: \"{program}\"",
                        Span(self.timeout)
                    ),
                    &output,
                );
                let reply = local((4, 3, 0), &text);
                let trouble = Trouble {
                    scope: Scope::Message,
                    detail: format!(
                        "pipe {}: {program} killed after {}",
                        self.name,
                        Span(self.timeout)
                    ),
                    reply: Some(reply.clone()),
                };
                (Outcome::Deferred(reply), Some(trouble))
            }
            Ended::Exited {
                status,
                output,
                write_error,
            } => (
                exit_outcome(status, &output, write_error.as_ref(), program),
                None,
            ),
        }
    }
}

/// A locally made reply: `250`, `451`, or `550`/`554` by the enhanced code's subject.
fn local(e: (u8, u16, u16), text: &str) -> Reply {
    let code = match e {
        (2, ..) => 250,
        (4, ..) => 451,
        (_, 1 | 7, _) => 550,
        (_, 2, 2) => 552,
        _ => 554,
    };
    let code = ReplyCode::new(code).unwrap_or(ReplyCode::LOCAL_ERROR);
    Reply::new(code, Some(EnhancedCode::new(e.0, e.1, e.2)), text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::os::unix::process::ExitStatusExt;

    use super::argv::Var;
    use super::process::ToLf;
    use postern_proto::ForwardPath;

    use postern_proto::Mailbox;

    use super::*;

    fn values<'a>(sender: &'a str, to: &str) -> Values<'a> {
        Values::new(
            sender,
            Some(&ForwardPath::Mailbox(Mailbox::parse(to).unwrap())),
        )
    }

    #[test]
    fn templates() {
        let a = Arg::parse("--to=${user}+x@${domain}").unwrap();
        let v = values("s@example.net", "Bob+tag@Example.ORG");
        assert_eq!(a.expand(&v).unwrap(), "--to=Bob+x@Example.ORG");
        assert!(a.of_recipient());
        let s = Arg::parse("${sender}").unwrap();
        assert!(!s.of_recipient());
        assert_eq!(s.expand(&v).unwrap(), "s@example.net");
        assert_eq!(
            Arg::parse("$5 and $").unwrap().expand(&v).unwrap(),
            "$5 and $"
        );
        assert_eq!(Arg::parse("").unwrap().expand(&v).unwrap(), "");
        assert_eq!(
            Arg::parse("${recipient}").unwrap().expand(&v).unwrap(),
            "Bob+tag@Example.ORG"
        );
        for (bad, why) in [
            ("${nexthop}", "unknown macro"),
            ("${sender", "closing"),
            ("$sender", "write `${sender}`"),
        ] {
            let e = Arg::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn leading_dash_is_refused_only_where_a_macro_starts_the_argument() {
        let v = values("s@example.net", "\"-oQ/tmp\"@example.org");
        assert_eq!(Arg::parse("${user}").unwrap().expand(&v), Err(Var::User));
        assert_eq!(
            Arg::parse("--rcpt=${user}").unwrap().expand(&v).unwrap(),
            "--rcpt=-oQ/tmp"
        );
        let v = values("-x@example.net", "a@example.org");
        assert_eq!(
            Arg::parse("${sender}").unwrap().expand(&v),
            Err(Var::Sender)
        );
    }

    #[test]
    fn argv_checks() {
        let check =
            |argv: &[&str]| parse_argv(&argv.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>());
        assert!(check(&["/bin/cat", "${recipient}"]).is_ok());
        assert!(check(&[]).unwrap_err().contains("missing"));
        assert!(check(&["cat"]).unwrap_err().contains("absolute"));
        assert!(check(&["/usr/${user}"]).unwrap_err().contains("no macros"));
        let mut c = PipeStoreConfig::new("p", &["/bin/cat"]);
        assert!(c.validate().is_ok());
        c.user = Some("vmail".into());
        assert!(c.validate().unwrap_err().starts_with("user:"));
    }

    #[test]
    fn batch_argv_repeats_recipient_arguments() {
        let mut c = PipeStoreConfig::new(
            "p",
            &["/bin/x", "-f", "${sender}", "--to=${recipient}", "end"],
        );
        c.per_recipient = false;
        let store = PipeStore::from_config(&c).unwrap();
        let vs = [
            values("s@x", "a@example.org"),
            values("s@x", "b@example.org"),
        ];
        assert_eq!(
            store.argv(&vs),
            [
                "/bin/x",
                "-f",
                "s@x",
                "--to=a@example.org",
                "--to=b@example.org",
                "end"
            ]
        );
    }

    #[test]
    fn crlf_to_lf_across_chunks() {
        let mut lf = ToLf::default();
        let mut out = Vec::new();
        for chunk in [&b"a\r"[..], b"\nb\rc\r", b"\r\n", b"d\r"] {
            lf.convert(chunk, &mut out);
        }
        lf.finish(&mut out);
        assert_eq!(out, b"a\nb\rc\r\nd\r");
    }

    #[test]
    fn captured_output_is_bounded_and_sanitised() {
        let mut c = Captured::new(10);
        c.push(b"\n  \r\nab\tc\x01\xff");
        c.push(b"more than the limit");
        assert_eq!(c.kept.len(), 10);
        assert_eq!(c.dropped, 1 + 19);
        assert_eq!(c.first_line().unwrap(), "ab c_");
        assert_eq!(Captured::new(10).first_line(), None);
    }

    #[test]
    fn exit_statuses_like_postfix() {
        let out = Captured::new(100);
        let show = |code: i32| {
            let o = exit_outcome(ExitStatus::from_raw(code << 8), &out, None, "/bin/x");
            let r = o.reply().unwrap();
            let kind = if o.is_final() {
                if matches!(o, Outcome::Delivered(_)) {
                    "D"
                } else {
                    "B"
                }
            } else {
                "T"
            };
            format!("{kind} {} {}", r.code(), r.enhanced().unwrap())
        };
        let table = [
            (0, "D 250 2.0.0"),
            (1, "B 554 5.3.0"),
            (64, "B 554 5.3.0"),
            (65, "B 554 5.6.0"),
            (66, "B 554 5.3.0"),
            (67, "B 550 5.1.1"),
            (68, "B 550 5.1.2"),
            (69, "B 554 5.3.0"),
            (70, "B 554 5.3.0"),
            (71, "T 451 4.3.0"),
            (72, "B 554 5.3.0"),
            (73, "B 554 5.2.0"),
            (74, "B 554 5.3.0"),
            (75, "T 451 4.3.0"),
            (76, "B 554 5.5.0"),
            (77, "B 550 5.7.0"),
            (78, "B 554 5.3.5"),
            (100, "B 554 5.3.0"),
        ];
        for (code, want) in table {
            assert_eq!(show(code), want, "exit {code}");
        }
        // Killed by SIGKILL (raw status 9).
        let o = exit_outcome(ExitStatus::from_raw(9), &out, None, "/bin/x");
        assert_eq!(o, Outcome::InDoubt, "it may have delivered before it died");
        // "D.S.N text" on the first output line wins over the exit status.
        let mut said = Captured::new(100);
        said.push(b"4.2.2 mailbox full\nmore\n");
        let o = exit_outcome(ExitStatus::from_raw(1 << 8), &said, None, "/bin/x");
        assert_eq!(o.reply().unwrap().to_string(), "451 4.2.2 mailbox full");
        assert!(matches!(o, Outcome::Deferred(_)));
        // Exit 0 after a write error that was not EPIPE.
        let e = io::Error::other("boom");
        let o = exit_outcome(ExitStatus::from_raw(0), &out, Some(&e), "/bin/x");
        assert!(matches!(o, Outcome::Deferred(_)));
    }
}
