//! The `postern` command: argument parsing and dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// An LMTP-focused mail gateway: a durable spool in front of Cyrus and Dovecot stores.
#[derive(Debug, Parser)]
#[command(name = "postern", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the listeners arrive with the edge front end).
    Run {
        /// Configuration file; without it, the embedded default `config/postern.yaml`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    // --- spool (issue 4) ---
    /// Spool benchmark: durable stores/s, store latency, recovery time, index RSS, crash cycles.
    BenchSpool(postern::spool::bench::BenchArgs),
    /// Spool crash-test load (run and killed by the crash tests).
    #[command(hide = true)]
    SpoolTorture(postern::spool::torture::TortureArgs),
    // --- end spool ---
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => {
            let _ = Cli::command().print_help();
            ExitCode::SUCCESS
        }
        Some(Command::Run { .. }) => {
            eprintln!(
                "postern: no listener is built yet; this build only speaks the wire protocol."
            );
            let _ = Cli::command().print_help();
            ExitCode::SUCCESS
        }
        // --- spool (issue 4) ---
        Some(Command::BenchSpool(args)) => exit(postern::spool::bench::run(&args)),
        Some(Command::SpoolTorture(args)) => exit(postern::spool::torture::run(&args)),
        // --- end spool ---
    }
}

// --- spool (issue 4) ---
fn exit(r: Result<(), postern::spool::SpoolError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postern: {e}");
            ExitCode::FAILURE
        }
    }
}
// --- end spool ---
