//! The `postern` command: argument parsing and dispatch to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// An LMTP-focused mail gateway: a durable spool in front of Cyrus and Dovecot stores.
#[derive(Debug, Parser)]
#[command(name = "postern", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => {
            // Until the listener lands, `postern` with no subcommand explains itself.
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            ExitCode::SUCCESS
        }
        Some(command) => match command {},
    }
}
