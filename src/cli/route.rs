//! `postern route`: how addresses are routed, and what a new map would change — offline,
//! from the configuration file, without a running gateway.
//!
//! `postern route ADDRESS… [--config FILE] [--trusted]` prints one explanation per address
//! (normalised form, the rule by configuration key, the store, the alias expansion).
//! `postern route --diff NEW.yaml [--config FILE]` compares NEW.yaml's map with the one of
//! the configuration in use: the explicit users that would move, and how many queued
//! recipients of its spool (read without the lock; see [`crate::routing::diff`]) would move between
//! which stores.

use std::path::PathBuf;

use postern_proto::ForwardPath;

use crate::config::{Config, ConfigError};
use crate::reload::build;
use crate::routing::diff::diff;
use crate::spool::Spool;

/// Arguments of `postern route`.
#[derive(Clone, Debug, clap::Args)]
pub struct RouteArgs {
    /// Addresses to explain (`user@domain`, or `postmaster`).
    pub addresses: Vec<String>,
    /// Configuration file in use; without it, the embedded default.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Route as for a client in `trusted_networks` (may relay).
    #[arg(long)]
    pub trusted: bool,
    /// Also ask each address's store (LMTP or SMTP) whether it knows the recipient, as
    /// recipient verification does at RCPT (the store must be running; the gateway need
    /// not be).
    #[arg(long)]
    pub verify: bool,
    /// Compare this configuration's map with the one in use instead.
    #[arg(long, value_name = "NEW.yaml")]
    pub diff: Option<PathBuf>,
}

/// What went wrong, for the exit status.
#[derive(Debug, thiserror::Error)]
pub enum RouteCliError {
    /// A configuration or map did not load (exit 2).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Config(Vec<ConfigError>),
    /// An address did not parse (exit 1).
    #[error("`{0}` is not an address: {1}")]
    Address(String, String),
    /// Nothing to do.
    #[error("give addresses to explain, or --diff NEW.yaml")]
    Usage,
}

/// Runs the command; the report goes to `out`.
pub fn run(args: &RouteArgs, out: &mut String) -> Result<(), RouteCliError> {
    let current = Config::load_or_default(args.config.as_deref()).map_err(RouteCliError::Config)?;
    let router = build(&current).map_err(RouteCliError::Config)?;
    if let Some(new_path) = &args.diff {
        let new = Config::load(new_path).map_err(RouteCliError::Config)?;
        let new_router = build(&new).map_err(RouteCliError::Config)?;
        let queued: Vec<String> = match Spool::open_read_only(&current.spool.path) {
            Ok(snapshot) => snapshot
                .messages
                .into_iter()
                .flat_map(|m| m.recipients)
                .filter(|r| !r.state.is_final())
                .map(|r| r.address)
                .collect(),
            Err(e) => {
                out.push_str(&format!(
                    "note: spool {} not read ({e}); queued recipients not compared\n",
                    current.spool.path.display()
                ));
                Vec::new()
            }
        };
        let d = diff(&router, &new_router, queued.iter().map(String::as_str));
        out.push_str(&d.to_string());
        return Ok(());
    }
    if args.addresses.is_empty() {
        return Err(RouteCliError::Usage);
    }
    for a in &args.addresses {
        let text = if a.eq_ignore_ascii_case("postmaster") || a.eq_ignore_ascii_case("<postmaster>")
        {
            "<Postmaster>".to_owned()
        } else if a.starts_with('<') {
            a.clone()
        } else {
            format!("<{a}>")
        };
        let path = ForwardPath::parse(&text)
            .map_err(|e| RouteCliError::Address(a.clone(), e.to_string()))?;
        let explanation = router.explain(&path, args.trusted);
        out.push_str(&explanation.to_string());
        if args.verify {
            verify(&current, &explanation, out);
        }
    }
    Ok(())
}

/// `--verify`: each leaf of the explanation routed to a store, asked of that store.
fn verify(config: &Config, explanation: &crate::routing::Explanation, out: &mut String) {
    let mut asks: Vec<(String, String)> = Vec::new();
    explanation.leaves(&mut |leaf| {
        if let Some(store) = leaf.decision.as_ref().and_then(|d| d.store()) {
            asks.push((leaf.address.clone(), store.to_owned()));
        }
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            out.push_str(&format!("  verify: not asked ({e})\n"));
            return;
        }
    };
    for (address, store) in asks {
        let text = if address.starts_with('<') {
            address.clone()
        } else {
            format!("<{address}>")
        };
        let line = match ForwardPath::parse(&text) {
            Ok(path) => runtime.block_on(crate::edge::ask_directly(
                &config.stores,
                &config.hostname,
                &store,
                &path,
            )),
            Err(e) => format!("not asked: {e}"),
        };
        out.push_str(&format!("  verify {address} at store {store}: {line}\n"));
    }
}
