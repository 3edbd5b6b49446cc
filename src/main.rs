//! The `postern` command: argument parsing, logging, signals, and dispatch to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use postern::config::{Config, EMBEDDED_NAME};
use postern::gateway::Gateway;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// An LMTP-focused mail gateway: a durable spool in front of Cyrus and Dovecot stores.
#[derive(Debug, Parser)]
#[command(name = "postern", version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// Configuration file; without it, the embedded default `config/postern.yaml`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Explain how addresses are routed, or what a new map would move (`--diff NEW.yaml`).
    Route(postern::cli::route::RouteArgs),
    /// Queue tools: list, show, shape, flush, hold, release, delete, requeue.
    Queue(postern::cli::queue::QueueArgs),
    /// Validate a configuration file and exit (non-zero on errors, each with file:line:column:key).
    CheckConfig {
        /// Configuration file; without it, the embedded default.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of main: dropping it flushes the log lines still queued.
    let _log = init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { config } => check_config(config),
        Command::Queue(args) => postern::cli::queue::run(&args),
        Command::Run { config } => run(config),
        Command::Route(args) => route(&args),
    }
}

/// Log lines go to stderr through [`postern::logging`]: one buffer, written out by a thread
/// of its own every few milliseconds, so a busy gateway makes one `write` per burst of lines
/// and no session waits on the log's file or pipe. Never lossy: when the output cannot keep
/// up, the logging threads wait.
fn init_logging(format: LogFormat) -> Option<postern::logging::LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POSTERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard, failed) = match postern::logging::buffered(std::io::stderr()) {
        Ok((writer, guard)) => (BoxMakeWriter::new(writer), Some(guard), None),
        // No thread for the log: each line is written directly.
        Err(e) => (BoxMakeWriter::new(std::io::stderr), None, Some(e)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(writer);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(e) = failed {
        tracing::warn!(error = %e, "cannot start the log thread; logging unbuffered");
    }
    guard
}

fn load(config: Option<&PathBuf>) -> Result<Config, ExitCode> {
    Config::load_or_default(config.map(PathBuf::as_path)).map_err(|errors| {
        for e in &errors {
            eprintln!("{e}");
        }
        ExitCode::from(2)
    })
}

fn route(args: &postern::cli::route::RouteArgs) -> ExitCode {
    use postern::cli::route::RouteCliError;
    let mut out = String::new();
    let result = postern::cli::route::run(args, &mut out);
    print!("{out}");
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ RouteCliError::Config(_)) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("postern route: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(config: Option<PathBuf>) -> ExitCode {
    let loaded = match load(config.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The users file is read and checked only when the map is built.
    if let Err(errors) = postern::reload::build(&loaded) {
        for e in &errors {
            eprintln!("{e}");
        }
        return ExitCode::from(2);
    }
    let name = config.map_or_else(|| EMBEDDED_NAME.to_owned(), |p| p.display().to_string());
    println!("{name}: ok");
    ExitCode::SUCCESS
}

fn run(config: Option<PathBuf>) -> ExitCode {
    let config = match load(config.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.worker_threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("postern: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    postern::gateway::raise_fd_limit(1 << 20);
    runtime.block_on(async move {
        // Installed before anything starts: a SIGTERM during start-up drains once started
        // instead of killing the process with the default action.
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot catch SIGTERM; only ctrl-c stops gracefully");
                None
            }
        };
        let drain = config.drain_timeout.0;
        let gateway = match Gateway::start(config).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                postern::systemd::status(&format!("cannot start: {e}"));
                return ExitCode::FAILURE;
            }
        };
        let token = gateway.shutdown_token();
        tokio::spawn(gateway.routes().on_sighup(token.clone()));
        // Everything is bound and the spool recovered: tell systemd (Type=notify).
        postern::systemd::ready(&ready_status(&gateway));
        if let Some(every) = postern::systemd::watchdog_interval() {
            tokio::spawn(postern::systemd::watchdog(
                every,
                gateway.scheduler.clone(),
                token.clone(),
            ));
        }
        tokio::spawn(async move {
            wait_for_signal(term.as_mut()).await;
            tracing::info!("shutting down: no new connections, draining sessions");
            postern::systemd::stopping(drain);
            token.cancel();
            wait_for_signal(term.as_mut()).await;
            tracing::warn!("second signal: exiting now (nothing acknowledged is lost)");
            // The log thread writes buffered lines within LINGER.
            tokio::time::sleep(postern::logging::LINGER * 2).await;
            std::process::exit(0);
        });
        gateway.wait().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// The `STATUS=` line sent with `READY=1`: what is being served.
fn ready_status(gateway: &Gateway) -> String {
    let listeners: Vec<String> = gateway
        .listeners
        .iter()
        .map(|(name, address)| format!("{name} {address}"))
        .collect();
    format!(
        "accepting mail: {}; admin socket {}; metrics {}",
        listeners.join(", "),
        gateway.admin_socket.display(),
        gateway.metrics_address
    )
}

/// SIGTERM (when it can be caught) or ctrl-c.
async fn wait_for_signal(term: Option<&mut tokio::signal::unix::Signal>) {
    match term {
        Some(term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
