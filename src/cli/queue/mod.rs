//! `postern queue …`: the operator's queue tools (the client side of [`crate::admin`]).
//!
//! | command | needs the daemon | like |
//! |---|---|---|
//! | `list [--json] [filters]` | no (reads the spool read-only when it is not running) | `postqueue -p` / `-j` |
//! | `show ID [--body]` | for the headers and body | `postcat -q` |
//! | `shape [--by store\|domain]` | no | `qshape` |
//! | `flush`, `hold`, `release`, `delete`, `requeue` `[selector] [--dry-run]` | yes | `postqueue -f`, `postsuper -h/-H/-d/-r` |
//!
//! Promises: an action never selects everything implicitly (ids, a filter or `--all`);
//! `--dry-run` prints what would be touched and changes nothing; when the daemon is not
//! running, or the spool is not where the configuration says, the error names the path
//! and the exit status is 1 (2 for a bad configuration).

pub mod client;
pub mod format;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Subcommand, ValueEnum};

use crate::admin::protocol::{
    Action, EnvelopeDetails, MessageView, Request, Response, Selector, ShapeBy,
};
use crate::admin::view;
use crate::config::units::Invalid;
use crate::config::{Config, Span};
use crate::routing::Router;
pub use client::QueueError;

/// `postern queue`.
#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Configuration file (for the spool path, the admin socket and the routes); without
    /// it, the embedded default.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: QueueCommand,
}

/// Which messages (all criteria must match).
#[derive(Debug, Clone, Default, Args)]
pub struct SelectArgs {
    /// Queue ids.
    pub ids: Vec<String>,
    /// Messages with an open recipient routed to this store.
    #[arg(long)]
    pub store: Option<String>,
    /// Messages in this queue (`--queue` is the same).
    #[arg(long, value_enum, alias = "queue")]
    pub state: Option<QueueName>,
    /// Sender: substring, or a glob with `*`/`?` (case-insensitive).
    #[arg(long)]
    pub sender: Option<String>,
    /// A recipient: substring, or a glob with `*`/`?` (case-insensitive).
    #[arg(long)]
    pub recipient: Option<String>,
    /// Arrived at least this long ago (30s, 5m, 1h, 2d).
    #[arg(long, value_parser = parse_span)]
    pub older_than: Option<Span>,
    /// Every message (actions need it when nothing else is given).
    #[arg(long)]
    pub all: bool,
}

/// The queues (`--state`).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum QueueName {
    /// Recipients pending or in doubt.
    Active,
    /// Every open recipient is deferred.
    Deferred,
    /// On hold.
    Hold,
    /// Poison quarantine (`delivery.poison_attempts` abnormal attempts); `release` puts a
    /// message back.
    Quarantine,
    /// Every recipient done; about to leave.
    Finished,
}

fn parse_span(s: &str) -> Result<Span, Invalid> {
    Span::parse(s)
}

impl SelectArgs {
    fn selector(&self) -> Selector {
        Selector {
            ids: self.ids.clone(),
            store: self.store.clone(),
            queue: self.state.map(|q| {
                match q {
                    QueueName::Active => "active",
                    QueueName::Deferred => "deferred",
                    QueueName::Hold => "hold",
                    QueueName::Quarantine => "quarantine",
                    QueueName::Finished => "finished",
                }
                .to_owned()
            }),
            sender: self.sender.clone(),
            recipient: self.recipient.clone(),
            older_than_secs: self.older_than.map(|s| s.0.as_secs()),
            all: self.all,
        }
    }
}

/// The queue commands.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List queued messages (postqueue -p); `--json`: one object per message per line.
    List {
        /// Which messages (default: all).
        #[command(flatten)]
        select: SelectArgs,
        /// One JSON object per message per line (schema in README "Operations").
        #[arg(long)]
        json: bool,
    },
    /// One message: envelope, each recipient's ledger entry, headers.
    Show {
        /// The queue id.
        id: String,
        /// Print the body after the headers.
        #[arg(long)]
        body: bool,
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Open recipients by store (or domain) and age in minutes (qshape).
    Shape {
        /// Rows by store or by recipient domain.
        #[arg(long, value_enum, default_value_t = ShapeByArg::Store)]
        by: ShapeByArg,
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Attempt the selected messages now (at each store's slow-start pace).
    Flush(ActArgs),
    /// Put the selected messages on hold: no delivery until released.
    Hold(ActArgs),
    /// Release held messages: due now.
    Release(ActArgs),
    /// Delete the selected messages from the spool, without a bounce.
    Delete(ActArgs),
    /// Route the selected messages again with the current map, and attempt them now.
    Requeue(ActArgs),
}

/// `--by`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ShapeByArg {
    /// By store.
    Store,
    /// By recipient domain.
    Domain,
}

/// Arguments of an action.
#[derive(Debug, Clone, Args)]
pub struct ActArgs {
    /// Which messages.
    #[command(flatten)]
    pub select: SelectArgs,
    /// Print what would be touched; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Runs a queue command, printing to stdout (results) and stderr (errors).
pub fn run(args: &QueueArgs) -> ExitCode {
    let config = match Config::load_or_default(args.config.as_deref()) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            return ExitCode::from(2);
        }
    };
    match execute(&config, &args.command) {
        Ok((text, ok)) => {
            print!("{text}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("postern queue: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command against `config`'s daemon (or spool): the text to print, and whether
/// everything asked for was done.
pub fn execute(config: &Config, cmd: &QueueCommand) -> Result<(String, bool), QueueError> {
    let socket = config.admin_socket();
    match cmd {
        QueueCommand::List { select, json } => {
            let selector = select.selector();
            let messages = if client::daemon_running(&socket)? {
                match client::request(&socket, &Request::List { selector })? {
                    Response::Messages { messages } => messages,
                    other => return Err(unexpected(&other)),
                }
            } else {
                let now = SystemTime::now();
                let mut v = offline_views(config)?;
                v.retain(|m| view::selected(&selector, m, now));
                v
            };
            Ok((
                if *json {
                    json_lines(&messages)
                } else {
                    format::list(&messages)
                },
                true,
            ))
        }
        QueueCommand::Show { id, body, json } => {
            let (message, envelope, headers, body) = if client::daemon_running(&socket)? {
                let req = Request::Show {
                    id: id.clone(),
                    body: *body,
                };
                match client::request(&socket, &req)? {
                    Response::Show {
                        message,
                        envelope,
                        headers,
                        body,
                    } => (message, envelope, headers, body),
                    other => return Err(unexpected(&other)),
                }
            } else {
                let m = offline_views(config)?
                    .into_iter()
                    .find(|m| m.queue_id.eq_ignore_ascii_case(id))
                    .ok_or_else(|| QueueError::Refused(format!("no message {id} in the spool")))?;
                let note = "(postern is not running: headers and body are shown only through the daemon)\n";
                (m, EnvelopeDetails::default(), note.to_owned(), None)
            };
            let text = if *json {
                let v = serde_json::json!({
                    "message": message,
                    "envelope": envelope,
                    "headers": headers,
                    "body": body,
                });
                format!("{v}\n")
            } else {
                format::show(&message, &envelope, &headers, body.as_deref())
            };
            Ok((text, true))
        }
        QueueCommand::Shape { by, json } => {
            let by = match by {
                ShapeByArg::Store => ShapeBy::Store,
                ShapeByArg::Domain => ShapeBy::Domain,
            };
            let table = if client::daemon_running(&socket)? {
                match client::request(&socket, &Request::Shape { by })? {
                    Response::Shape { table } => table,
                    other => return Err(unexpected(&other)),
                }
            } else {
                view::shape(&offline_views(config)?, by, SystemTime::now())
            };
            let text = if *json {
                format!("{}\n", serde_json::to_string(&table).unwrap_or_default())
            } else {
                format::shape(&table)
            };
            Ok((text, true))
        }
        QueueCommand::Flush(a) => act(&socket, Action::Flush, a),
        QueueCommand::Hold(a) => act(&socket, Action::Hold, a),
        QueueCommand::Release(a) => act(&socket, Action::Release, a),
        QueueCommand::Delete(a) => act(&socket, Action::Delete, a),
        QueueCommand::Requeue(a) => act(&socket, Action::Requeue, a),
    }
}

fn act(
    socket: &std::path::Path,
    action: Action,
    a: &ActArgs,
) -> Result<(String, bool), QueueError> {
    let selector = a.select.selector();
    if selector.is_empty() {
        return Err(QueueError::Usage(format!(
            "{}: nothing selected; give queue ids, a filter (--store, --state, --sender, \
             --recipient, --older-than) or --all",
            action.name()
        )));
    }
    let req = Request::Act {
        action,
        selector,
        dry_run: a.dry_run,
    };
    match client::request(socket, &req)? {
        Response::Acted {
            action,
            dry_run,
            messages,
        } => {
            let failed = messages.iter().any(|t| {
                t.skipped
                    .as_deref()
                    .is_some_and(|s| s.starts_with("failed"))
            });
            Ok((format::acted(action, dry_run, &messages), !failed))
        }
        other => Err(unexpected(&other)),
    }
}

fn unexpected(r: &Response) -> QueueError {
    QueueError::Refused(format!(
        "unexpected answer from the daemon: a `{}` response",
        r.kind()
    ))
}

fn json_lines(messages: &[MessageView]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str(&serde_json::to_string(m).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// The queue read straight from the spool (the daemon is not running), routed with the
/// configuration's map.
fn offline_views(config: &Config) -> Result<Vec<MessageView>, QueueError> {
    let snapshot = client::read_spool(&config.spool.path)?;
    let router = Router::new(&config.routes);
    Ok(snapshot
        .messages
        .iter()
        .map(|m| view::view(m, &router, None))
        .collect())
}
