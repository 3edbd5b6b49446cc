//! The `postern-bench` command: argument parsing and dispatch to the library.
//!
//! ```text
//! cargo run --release -p postern-bench -- intake [--size 1GiB] [--idle 10000]
//! cargo run --release -p postern-bench -- spool [--crash-cycles 100]
//! cargo run --release -p postern-bench -- routes [--users 1000000 --stores 1000]
//! ```
//!
//! `intake` measures the real gateway: it starts the `postern` binary next to this one
//! (`cargo build --release -p postern` first) or the one given with `--postern`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postern_bench::{intake, routes, spool, torture};

/// postern's benchmarks: figures printed, nothing asserted.
#[derive(Debug, Parser)]
#[command(name = "postern-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Edge benchmark: one big message's peak RSS, idle connections' RSS.
    Intake {
        /// Size of the big message (units: 1GiB, 100MiB …).
        #[arg(long, default_value = "1GiB")]
        size: String,
        /// Idle connections to hold.
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
        /// The gateway binary to measure; default: `postern` beside this program.
        #[arg(long)]
        postern: Option<PathBuf>,
    },
    /// Spool benchmark: durable stores/s, store latency, recovery time, index RSS, crash cycles.
    Spool(spool::BenchArgs),
    /// Spool crash-test load (run and killed by the crash tests).
    #[command(hide = true)]
    SpoolTorture(torture::TortureArgs),
    /// Routing benchmark: load time, RSS and lookup latency of a big map.
    Routes(routes::BenchArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Intake {
            size,
            idle,
            postern,
        } => intake(&size, idle, postern),
        Command::Spool(args) => spool::run(&args).map_err(|e| e.to_string()),
        Command::SpoolTorture(args) => torture::run(&args).map_err(|e| e.to_string()),
        Command::Routes(args) => routes::run(&args).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postern-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn intake(size: &str, idle: usize, postern: Option<PathBuf>) -> Result<(), String> {
    let size = postern::config::units::ByteSize::parse(size)?;
    let postern = match postern {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("postern"),
    };
    if !postern.is_file() {
        return Err(format!(
            "{} not found: build it (cargo build --release -p postern) or name it with --postern",
            postern.display()
        ));
    }
    intake::run(&intake::IntakeArgs {
        size: size.0,
        idle,
        postern,
    })
}
