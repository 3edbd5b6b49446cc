//! The configuration: YAML in, a validated, typed [`Config`] out.
//!
//! Loading has two stages, and both report errors that name the file, the line and the key
//! path (`postern.yaml:14: listeners[0].tls.cert: ...`): serde with `deny_unknown_fields`
//! catches unknown keys, wrong types and bad units; [`Config::validate`] then checks what
//! only the whole file can tell (unique names, stores that exist, LMTP never on port 25,
//! certificates that load). A `Config` that exists is valid; nothing downstream re-checks.

mod include;
mod locate;
pub mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub use include::{MAX_INCLUDES, RouteOrigins};
pub use units::{ByteSize, Span};

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
    pub delivery: crate::scheduler::config::SchedulerConfig,
    /// The file this was loaded from (`None`: the embedded default or a string); a reload
    /// reads it again.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// The local admin socket for `postern queue …`.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The recipient verification cache, shared by every store ([`crate::edge`]).
    #[serde(default)]
    pub verify_cache: crate::edge::VerifyCacheConfig,
}

/// `admin:`
#[derive(Clone, Debug, Default, Deserialize)]
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
#[derive(Clone, Debug, Deserialize)]
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
#[derive(Clone, Debug, Deserialize)]
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

/// The address a listener binds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    /// `127.0.0.1:2525`, `[::1]:2525`
    Tcp(SocketAddr),
    /// `unix:/path`
    Unix(PathBuf),
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl ListenAddress {
    /// Parses `127.0.0.1:2525`, `[::1]:2525` or `unix:/path`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a socket path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse().map(Self::Tcp).map_err(|_| {
            format!("`{s}` is not an address like 127.0.0.1:2525, [::1]:2525 or unix:/path")
        })
    }
}

impl<'de> Deserialize<'de> for ListenAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        units::parse_str(d, Self::parse, "an address")
    }
}

/// `protocol:`
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// RFC 5321 ESMTP.
    Smtp,
    /// RFC 2033 LMTP.
    Lmtp,
}

/// `bare_line_endings:`
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndings {
    /// Store bare CR/LF as CRLF.
    Normalize,
    /// Refuse the message with 550 5.5.2.
    Reject,
}

/// `tls:` of a listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Refuse mail transactions before STARTTLS (530 5.7.0).
    #[serde(default)]
    pub required: bool,
}

/// `timeouts:` of a listener (RFC 5321 §4.5.3.2 minimums by default).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Waiting for a command (and the greeting's answer): 5m.
    #[serde(default = "default_command_timeout")]
    pub command: Span,
    /// Waiting for the next block of DATA or BDAT content: 3m.
    #[serde(default = "default_data_timeout")]
    pub data: Span,
    /// The whole session, however busy: 1h.
    #[serde(default = "default_session_timeout")]
    pub session: Span,
    /// The TLS handshake after STARTTLS: 1m.
    #[serde(default = "default_tls_timeout")]
    pub tls_handshake: Span,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            command: default_command_timeout(),
            data: default_data_timeout(),
            session: default_session_timeout(),
            tls_handshake: default_tls_timeout(),
        }
    }
}

/// One entry of `listeners:`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Label for logs and metrics.
    pub name: String,
    /// Where to listen.
    pub address: ListenAddress,
    /// SMTP or LMTP.
    pub protocol: ListenerProtocol,
    /// STARTTLS.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Concurrent connections on this listener.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Concurrent connections from one IP address.
    #[serde(default = "default_max_per_ip")]
    pub max_connections_per_ip: usize,
    /// Largest message (SIZE).
    #[serde(default = "default_max_message_size")]
    pub max_message_size: ByteSize,
    /// Recipients per transaction.
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Refused commands before 421.
    #[serde(default = "default_max_errors")]
    pub max_errors: u32,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Clients allowed to relay to non-local domains (through the relay route).
    #[serde(default)]
    pub trusted_networks: Vec<IpNet>,
    /// Bare CR/LF in content.
    #[serde(default = "default_bare")]
    pub bare_line_endings: BareLineEndings,
    /// Store and forward (`spool`, the default) or cut-through to the store (`proxy`).
    #[serde(default)]
    pub mode: ListenerMode,
    /// `mode: proxy`: how long a transaction waits for room in the store's concurrency
    /// window before its recipients get `451 4.3.2`.
    #[serde(default = "default_proxy_wait")]
    pub proxy_wait: Span,
    /// A load balancer in front (HAProxy's PROXY protocol, v1 or v2): connections from these
    /// networks must start with a header carrying the client's address, which then drives
    /// relay control, limits, logs and the Received line. None (the default): a `PROXY`
    /// line is just an unknown command.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolConfig>,
}

/// `listeners[].proxy_protocol:`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    /// The load balancers' addresses. A connection from anywhere else is closed without a
    /// banner. (Unix-socket peers are local and trusted.)
    pub trusted_networks: Vec<IpNet>,
    /// How long the header may take to arrive: 5s.
    #[serde(default = "default_proxy_header_timeout")]
    pub timeout: Span,
}

fn default_proxy_header_timeout() -> Span {
    Span(std::time::Duration::from_secs(5))
}

/// `mode:` of a listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Write the message to the spool, answer 250 once it is durable; the scheduler delivers.
    #[default]
    Spool,
    /// Cut-through: relay the transaction to each recipient's store and answer with the
    /// store's own reply (see `listener::cut_through`).
    Proxy,
}

/// One entry of `stores:`, by `kind:`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// Local maildirs under `root/<domain>/<user>/Maildir` (like Postfix's virtual(8)).
    Maildir {
        /// Name used by routes.
        name: String,
        /// Root directory.
        root: PathBuf,
    },
    /// Accept and drop (a policy route).
    Discard {
        /// Name used by routes.
        name: String,
    },
    /// A mailbox store reached over LMTP (Cyrus, Dovecot).
    Lmtp(Box<crate::delivery::LmtpStoreConfig>),
    /// A relay to a fixed next hop over SMTP (bounces, mail to other domains).
    Smtp(Box<crate::delivery::SmtpStoreConfig>),
    /// A command with the message on stdin (like Postfix's pipe(8)).
    Pipe(Box<crate::delivery::PipeStoreConfig>),
    /// Every recipient gets this reply: 4yz deferred, 5yz bounced (a policy route).
    Error {
        /// Name used by routes.
        name: String,
        /// `550 5.7.1 text`, as on the wire.
        #[serde(deserialize_with = "crate::delivery::policy::deserialize_fixed_reply")]
        reply: postern_proto::Reply,
    },
}

impl StoreConfig {
    /// The store's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Maildir { name, .. } | Self::Discard { name } | Self::Error { name, .. } => name,
            Self::Lmtp(l) | Self::Smtp(l) => &l.name,
            Self::Pipe(p) => &p.name,
        }
    }
}

/// `routes:` — see [`crate::routing`] for what each rule means and their precedence.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    /// Local domains.
    #[serde(default)]
    pub domains: BTreeMap<String, DomainRoute>,
    /// Per-user pins, `user@domain: store-or-cluster`.
    #[serde(default)]
    pub users: BTreeMap<String, String>,
    /// More pins from a plain file, one `user@domain store-or-cluster` a line (`#` comments):
    /// the format for big user lists. Entries in `users` win over the file's.
    #[serde(default)]
    pub users_file: Option<PathBuf>,
    /// Virtual aliases: `address: target` or `address: [targets]`; `@domain` is that
    /// domain's catch-all.
    #[serde(default)]
    pub aliases: BTreeMap<String, AliasTargets>,
    /// How deep alias expansion may nest before the recipient is refused as a loop.
    #[serde(default = "default_alias_depth")]
    pub alias_depth: usize,
    /// Regex or wildcard rules, tried in order after exact entries.
    #[serde(default)]
    pub patterns: Vec<PatternRoute>,
    /// Named sets of stores; a domain or a user sent to a cluster lands on one of its stores
    /// by rendezvous hashing of the normalised mailbox.
    #[serde(default)]
    pub clusters: BTreeMap<String, Vec<String>>,
    /// The separator of address extensions: `alice+news@` routes as `alice@` (empty: none).
    #[serde(default = "default_recipient_delimiter")]
    pub recipient_delimiter: String,
    /// The store for mail that trusted clients send to other domains, and for bounces.
    #[serde(default)]
    pub relay: Option<String>,
    /// When `team+x@d` expands through the alias `team@d` (the extension matched no entry
    /// itself), append `+x` to each target's local part (`alice+x@…`) unless the target has
    /// an extension already: Postfix's `propagate_unmatched_extensions`.
    #[serde(default = "default_true")]
    pub propagate_extensions: bool,
    /// Route fragments: YAML files holding `domains`, `users`, `aliases`, `patterns` and
    /// `clusters`, merged into this section (see `config::include`). Relative paths are
    /// taken from the working directory, like `users_file`.
    #[serde(default)]
    pub include: Vec<PathBuf>,
    /// A queued recipient the map no longer routes (a reload removed its domain or user)
    /// is deferred `451 4.3.0` for this long after it was first found unroutable, then
    /// bounced: 1d. A message from `<>` is not held back.
    #[serde(default = "default_unroutable_grace")]
    pub unroutable_grace: Span,
    /// Which fragment each merged entry came from (filled by loading, not by YAML).
    #[serde(skip)]
    pub origins: RouteOrigins,
}

/// The same defaults as an empty `routes:` section (a configuration without one, and
/// `RoutesConfig { .., ..Default::default() }` in code).
impl Default for RoutesConfig {
    fn default() -> Self {
        Self {
            domains: BTreeMap::new(),
            users: BTreeMap::new(),
            users_file: None,
            aliases: BTreeMap::new(),
            alias_depth: default_alias_depth(),
            patterns: Vec::new(),
            clusters: BTreeMap::new(),
            recipient_delimiter: default_recipient_delimiter(),
            relay: None,
            propagate_extensions: true,
            include: Vec::new(),
            unroutable_grace: default_unroutable_grace(),
            origins: RouteOrigins::default(),
        }
    }
}

/// One alias's targets: one address or a list.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum AliasTargets {
    /// `alias: target@domain`
    One(String),
    /// `alias: [a@domain, b@domain]`
    Many(Vec<String>),
}

impl AliasTargets {
    /// The targets as a slice.
    pub fn as_slice(&self) -> &[String] {
        match self {
            Self::One(t) => std::slice::from_ref(t),
            Self::Many(v) => v,
        }
    }
}

/// One entry of `routes.patterns`: exactly one of `regex` / `wildcard`, and exactly one of
/// `store` / `cluster`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PatternRoute {
    /// A regular expression over the normalised address `user@domain` (anchor it yourself).
    #[serde(default)]
    pub regex: Option<String>,
    /// A wildcard over the normalised address: `*` any run, `?` one character.
    #[serde(default)]
    pub wildcard: Option<String>,
    /// The store.
    #[serde(default)]
    pub store: Option<String>,
    /// Or the cluster.
    #[serde(default)]
    pub cluster: Option<String>,
}

/// How a domain treats the case of local parts.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LocalPartCase {
    /// `Alice` and `alice` are one mailbox (the usual choice).
    #[default]
    Fold,
    /// Local parts are compared exactly (RFC 5321 allows a store to tell them apart).
    Preserve,
}

/// One local domain: its mailboxes are in `store`, spread over `cluster`, or (neither)
/// resolved per user through `users` and `patterns` only.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DomainRoute {
    /// The store holding its mailboxes.
    #[serde(default)]
    pub store: Option<String>,
    /// Or the cluster they are spread over.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Only users listed in `routes.users`, the users file, `aliases` or `patterns` exist;
    /// others are refused at RCPT (550 5.1.1). Otherwise the store decides (pass-through).
    #[serde(default)]
    pub authoritative: bool,
    /// Local-part case policy.
    #[serde(default)]
    pub local_part_case: LocalPartCase,
}

fn default_true() -> bool {
    true
}
fn default_alias_depth() -> usize {
    8
}
fn default_unroutable_grace() -> Span {
    Span(Duration::from_secs(86_400))
}
fn default_recipient_delimiter() -> String {
    "+".into()
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
fn default_command_timeout() -> Span {
    Span(Duration::from_secs(300))
}
fn default_data_timeout() -> Span {
    Span(Duration::from_secs(180))
}
fn default_session_timeout() -> Span {
    Span(Duration::from_secs(3600))
}
fn default_tls_timeout() -> Span {
    Span(Duration::from_secs(60))
}
fn default_max_connections() -> usize {
    1000
}
fn default_max_per_ip() -> usize {
    100
}
fn default_max_message_size() -> ByteSize {
    ByteSize(50 << 20)
}
fn default_max_recipients() -> usize {
    1000
}
fn default_max_errors() -> u32 {
    20
}
fn default_bare() -> BareLineEndings {
    BareLineEndings::Normalize
}
fn default_proxy_wait() -> Span {
    Span(Duration::from_secs(2))
}

/// A configuration error, located.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{}: {path}: {message}", line.map_or_else(|| "?".to_owned(), |l| l.to_string()))]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The key path, e.g. `listeners[0].tls.cert`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl Config {
    /// Loads and validates a file.
    pub fn load(path: &Path) -> Result<Self, Vec<ConfigError>> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![ConfigError {
                file: name.clone(),
                line: None,
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
            serde_yaml::from_str(text).map_err(|e| vec![locate::parse_error(&e, text, file)])?;
        let fragments = include::merge(&mut config.routes, text, file)?;
        let problems = config.validate();
        if problems.is_empty() {
            return Ok(config);
        }
        Err(problems
            .into_iter()
            .map(|(path, message)| {
                include::relocate(&config.routes, &fragments, &path, &message).unwrap_or_else(
                    || ConfigError {
                        file: file.to_owned(),
                        line: locate::line_of(text, &path),
                        path,
                        message,
                    },
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
                bad(format!("stores[{i}]"), e);
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
        if let Err(e) = self.delivery.validate() {
            let (key, message) = e.split_once(": ").unwrap_or(("", e.as_str()));
            bad(format!("delivery.{key}"), message.to_owned());
        }
        out
    }
}

#[cfg(test)]
mod tests;
