//! The configuration: YAML in, a validated, typed [`Config`] out.
//!
//! Loading has two stages, and both report errors that name the file, the line and the key
//! path (`postern.yaml:14:7: listeners[0].tls.cert: ...`): serde with `deny_unknown_fields`
//! catches unknown keys, wrong types and bad units; [`Config::validate`] then checks what
//! only the whole file can tell (unique names, stores that exist, LMTP never on port 25,
//! certificates that load). A `Config` that exists is valid; nothing downstream re-checks.
//!
//! This module only assembles: each section's types live with their owner
//! ([`crate::listener::config`], [`crate::delivery::config`], [`crate::routing::config`],
//! [`crate::scheduler::config`], [`crate::tls`], [`crate::edge::config`]). The leaves
//! [`units`] (`Span`, `ByteSize`) and [`error`] (`ConfigError`) import nothing from the
//! crate, so every owner uses them without a cycle; the owners never import `Config`.

mod diagnose;
pub mod error;
mod include;
mod locate;
pub mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use error::ConfigError;
pub use include::MAX_INCLUDES;
pub use units::{ByteSize, Span};

// Each section's types live with their owner; they are named here too, as the file reads.
pub use crate::delivery::StoreConfig;
pub use crate::edge::VerifyCacheConfig;
pub use crate::listener::config::{
    BareLineEndingsPolicy, ListenAddress, ListenerConfig, ListenerMode, ListenerProtocol,
    ProxyProtocolConfig, Timeouts,
};
pub use crate::routing::config::{
    AliasTargets, DomainRoute, LocalPartCase, PatternRoute, RouteOrigins, RoutesConfig,
};
pub use crate::scheduler::config::SchedulerConfig;
pub use crate::tls::TlsConfig;

/// The embedded default configuration (`config/postern.yaml`).
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/postern.yaml");

/// The name shown for the embedded default in error messages.
pub const EMBEDDED_NAME: &str = "config/postern.yaml (embedded)";

/// The whole gateway configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Our name: in the greeting, EHLO and Received: headers.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Where a DSN that cannot be delivered goes, once (Postfix's 2bounce): default
    /// `postmaster@` + `hostname`. If that fails too, the DSN is kept in the hold queue.
    #[serde(default)]
    pub double_bounce: Option<String>,
    /// Unique per gateway (0–65535); part of every queue id, so ids never collide when
    /// several gateways feed one store.
    #[serde(default = "default_node_id")]
    pub node_id: u16,
    /// The spool.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// How long in-flight sessions may finish after SIGTERM.
    #[serde(default = "default_drain")]
    pub drain_timeout: Span,
    /// SMTP and LMTP listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Where mail is delivered.
    #[serde(default)]
    pub stores: Vec<StoreConfig>,
    /// Recipient → store.
    #[serde(default)]
    pub routes: RoutesConfig,
    /// The delivery scheduler.
    #[serde(default)]
    pub delivery: SchedulerConfig,
    /// The file this was loaded from (`None`: the embedded default or a string); a reload
    /// reads it again.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// The local admin socket for `postern queue …`.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The recipient verification cache, shared by every store ([`crate::edge`]).
    #[serde(default)]
    pub verify_cache: VerifyCacheConfig,
    /// Threads that run the sessions, the scheduler and the deliveries; none: tokio's default,
    /// one for each CPU this process may use (its affinity and cgroup quota). Fewer leave CPU
    /// to what else each message needs (the spool's committer, the kernel's side of every
    /// connection, a store or a load balancer on the same box).
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

/// The most `worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// `admin:`
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The admin socket (created mode 0600); default `<spool.path>/admin.sock`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

impl Config {
    /// Where the admin socket is: `admin.socket`, or `admin.sock` in the spool directory.
    pub fn admin_socket(&self) -> PathBuf {
        self.admin
            .socket
            .clone()
            .unwrap_or_else(|| self.spool.path.join("admin.sock"))
    }
}

/// `spool:`
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the spool.
    #[serde(default = "default_spool_path")]
    pub path: PathBuf,
    /// Below this much free space, MAIL is answered 452 4.3.1.
    #[serde(default = "default_min_free")]
    pub min_free: ByteSize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            path: default_spool_path(),
            min_free: default_min_free(),
        }
    }
}

/// `metrics:`
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` is served; loopback by default.
    #[serde(default = "default_metrics_address")]
    pub address: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            address: default_metrics_address(),
        }
    }
}

fn default_hostname() -> String {
    "localhost".into()
}
fn default_node_id() -> u16 {
    1
}
fn default_spool_path() -> PathBuf {
    PathBuf::from("./var/spool")
}
fn default_min_free() -> ByteSize {
    ByteSize(100 << 20)
}
fn default_metrics_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9325))
}
fn default_drain() -> Span {
    Span(Duration::from_secs(30))
}

impl Config {
    /// Loads and validates a file.
    pub fn load(path: &Path) -> Result<Self, Vec<ConfigError>> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![ConfigError {
                file: name.clone(),
                line: None,
                column: None,
                path: String::new(),
                message: format!("cannot read: {e}"),
            }]
        })?;
        let mut config = Self::parse(&text, &name)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// The embedded default.
    pub fn embedded() -> Result<Self, Vec<ConfigError>> {
        Self::parse(EMBEDDED_DEFAULT, EMBEDDED_NAME)
    }

    /// Loads `path`, or the embedded default when `None`.
    pub fn load_or_default(path: Option<&Path>) -> Result<Self, Vec<ConfigError>> {
        match path {
            Some(p) => Self::load(p),
            None => Self::embedded(),
        }
    }

    /// Parses and validates YAML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, Vec<ConfigError>> {
        let mut config: Self =
            serde_yaml::from_str(text).map_err(|e| diagnose::parse_errors(&e, text, file))?;
        let fragments = include::merge(&mut config.routes, text, file)?;
        let problems = config.validate();
        if problems.is_empty() {
            return Ok(config);
        }
        Err(problems
            .into_iter()
            .map(|(path, message)| {
                include::relocate(&config.routes, &fragments, &path, &message).unwrap_or_else(
                    || ConfigError::at(file, locate::position_of(text, &path), path, message),
                )
            })
            .collect())
    }

    /// The semantic checks, as `(key path, message)`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |path: String, message: String| out.push((path, message));
        if self.hostname.is_empty() || postern_proto::Domain::parse(&self.hostname).is_err() {
            bad(
                "hostname".into(),
                format!("`{}` is not a host name", self.hostname),
            );
        }
        if let Some(a) = &self.double_bounce {
            if postern_proto::Mailbox::parse(a).is_err() {
                bad("double_bounce".into(), format!("`{a}` is not an address"));
            }
        }
        if self.listeners.is_empty() {
            bad("listeners".into(), "at least one listener is needed".into());
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let at = |key: &str| format!("listeners[{i}].{key}");
            if self.listeners[..i].iter().any(|o| o.name == l.name) {
                bad(at("name"), format!("duplicate listener name `{}`", l.name));
            }
            let port_zero = matches!(l.address, ListenAddress::Tcp(a) if a.port() == 0);
            if !port_zero && self.listeners[..i].iter().any(|o| o.address == l.address) {
                bad(
                    at("address"),
                    format!("`{}` is used by another listener", l.address),
                );
            }
            if let (ListenerProtocol::Lmtp, ListenAddress::Tcp(a)) = (l.protocol, &l.address) {
                if a.port() == 25 {
                    bad(
                        at("protocol"),
                        "LMTP is never offered on port 25 (RFC 2033 §5)".into(),
                    );
                }
            }
            if l.max_connections == 0 {
                bad(at("max_connections"), "must be at least 1".into());
            }
            if l.max_connections_per_ip == 0 {
                bad(at("max_connections_per_ip"), "must be at least 1".into());
            }
            if l.max_recipients == 0 {
                bad(at("max_recipients"), "must be at least 1".into());
            }
            if l.max_errors == 0 {
                bad(at("max_errors"), "must be at least 1".into());
            }
            if let Some(pp) = &l.proxy_protocol {
                if pp.trusted_networks.is_empty() && matches!(l.address, ListenAddress::Tcp(_)) {
                    bad(
                        at("proxy_protocol.trusted_networks"),
                        "name the load balancers' networks (no one else may send a header)".into(),
                    );
                }
                if pp.timeout.0.is_zero() {
                    bad(at("proxy_protocol.timeout"), "must be above zero".into());
                }
            }
            if let Some(tls) = &l.tls {
                for (key, file) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                    if !file.is_file() {
                        bad(
                            at(key),
                            format!("`{}` is not a readable file", file.display()),
                        );
                    }
                }
                if tls.cert.is_file() && tls.key.is_file() {
                    if let Err(e) = crate::tls::server_config(tls) {
                        bad(at("tls"), e.to_string());
                    }
                }
            }
        }
        for (i, s) in self.stores.iter().enumerate() {
            let checked = match s {
                StoreConfig::Lmtp(l) => l.validate(),
                StoreConfig::Smtp(s) => s.validate_smtp(),
                StoreConfig::Pipe(p) => p.validate(),
                _ => Ok(()),
            };
            if let Err(e) = checked {
                bad(format!("stores[{i}]"), e.into());
            }
            if self.stores[..i].iter().any(|o| o.name() == s.name()) {
                bad(
                    format!("stores[{i}].name"),
                    format!("duplicate store name `{}`", s.name()),
                );
            }
        }
        let store_names: Vec<&str> = self.stores.iter().map(StoreConfig::name).collect();
        for (path, message) in crate::routing::validate(&self.routes, &store_names) {
            bad(path, message);
        }
        if let Some(n) = self.worker_threads
            && !(1..=MAX_WORKER_THREADS).contains(&n)
        {
            bad(
                "worker_threads".into(),
                format!("must be between 1 and {MAX_WORKER_THREADS}"),
            );
        }
        if let Err(e) = self.delivery.validate() {
            let (key, message) = e.split_once(": ").unwrap_or(("", &*e));
            bad(format!("delivery.{key}"), message.to_owned());
        }
        out
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_stores;
