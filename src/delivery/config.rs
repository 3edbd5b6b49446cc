//! Configuration of a store of kind `lmtp` (and of kind `smtp`, the same settings), as
//! written under `stores:`.
//!
//! ```yaml
//! stores:
//!   - kind: lmtp
//!     name: cyrus1
//!     address: 10.0.0.5:24          # or unix:/run/cyrus/socket/lmtp
//!     max_connections: 10
//!     recipients_per_transaction: 50
//!     tls: { mode: required, ca_file: /etc/postern/store-ca.pem }
//!     auth: { username: admin, password_file: /etc/postern/cyrus1.pass }
//!     timeouts: { connect: 30s, lhlo: 5m, mail_rcpt: 5m, data: 2m, end_of_data: 10m }
//!     idle_timeout: 2s
//!     reuse_limit: 2s
//!     normalize:
//!       - { code: 552, enhanced: "5.2.2", treat_as: temporary, max_age: 2d }
//!       - { code: 550, treat_as: temporary, until: "2026-05-01T06:00:00Z" }
//! ```
//!
//! A `kind: smtp` relay ([`SmtpStoreConfig`]) takes the same keys; `timeouts.ehlo` may be
//! written for `timeouts.lhlo`, and [`LmtpStoreConfig::validate_smtp`] adds its own checks.
//!
//! Plain serde structs with `deny_unknown_fields`; durations and sizes carry units
//! ([`Span`], [`ByteSize`]). [`LmtpStoreConfig::validate`] checks what serde cannot.
//! Loading the password and CA files happens in [`RemoteStore::from_config`].
//!
//! [`RemoteStore::from_config`]: super::lmtp::RemoteStore::from_config

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer};

use crate::config::units::{ByteSize, Invalid, Span, parse_str};

/// One store of kind `lmtp`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmtpStoreConfig {
    /// Name used by routes, logs and metrics.
    pub name: String,
    /// `host:port` or `unix:/path`.
    pub address: StoreAddress,
    /// Connections open at once, at most (the pool's size): 10.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// STARTTLS; none by default (a store on the same host or a private network).
    #[serde(default)]
    pub tls: Option<StoreTlsConfig>,
    /// SASL PLAIN after LHLO (Cyrus requires it on TCP unless `lmtpd -a`).
    #[serde(default)]
    pub auth: Option<StoreAuthConfig>,
    /// Recipients per LMTP transaction: 50. More are split into several transactions.
    #[serde(default = "default_recipients_per_transaction")]
    pub recipients_per_transaction: usize,
    /// Per-phase timeouts.
    #[serde(default)]
    pub timeouts: LmtpTimeouts,
    /// A pooled connection unused this long is closed: 2s, like Postfix's
    /// `lmtp_connection_cache_time_limit`. An idle session holds a store process (Cyrus,
    /// Dovecot) that another gateway may be waiting for.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Span,
    /// A connection older than this is not reused: 2s. A store that runs one process per
    /// session (Cyrus, Dovecot) then passes its processes round the gateways that share it,
    /// instead of leaving them with the first to connect; reconnecting costs a greeting and
    /// an LHLO every two seconds per session. Half of it while the store keeps our new
    /// sessions waiting, except at a concentrator ([`crate::delivery::StorePool::reuse_limit`]).
    #[serde(default = "default_reuse_limit")]
    pub reuse_limit: Span,
    /// Use BDAT when the store offers CHUNKING: true.
    #[serde(default = "default_true")]
    pub chunking: bool,
    /// Size of one BDAT chunk: 1MiB.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: ByteSize,
    /// The store's status normalisation table; the first matching rule decides.
    #[serde(default)]
    pub normalize: Vec<NormalizeRule>,
    /// The concurrency window ([`crate::scheduler::window`]): latency-steered by default.
    #[serde(default)]
    pub window: WindowConfig,
    /// Ask the store at RCPT time whether it knows the recipient ([`crate::edge`]): false.
    #[serde(default)]
    pub verify_recipients: bool,
    /// The longest a verification may take (a window slot, a connection, the replies): 5s.
    #[serde(default = "super::edge_config::default_verify_timeout")]
    pub verify_timeout: Span,
    /// What RCPT gets when the store cannot answer: `tempfail` (450 4.1.1) or `accept`.
    #[serde(default)]
    pub verify_tempfail_action: super::edge_config::TempfailAction,
    /// Refuse this store's recipients with 451 4.3.2 while it is backlogged: none.
    #[serde(default)]
    pub backpressure: super::edge_config::BackpressureConfig,
}

/// `window:` of a pooled store: how many transactions run at once, and how that is steered.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Steer by the store's latency (true, the default) or only by refusals and failures
    /// (false: Postfix's feedback). A store that offers
    /// [`TURNS_KEYWORD`](crate::delivery::lmtp::TURNS_KEYWORD) (a postern concentrator) is
    /// steered by feedback whatever this says.
    #[serde(default = "default_true")]
    pub latency: bool,
    /// Never fewer transactions at once than this: 1.
    #[serde(default = "default_window_min")]
    pub min: usize,
    /// At start and after the store recovered: `delivery.initial_window` (5).
    #[serde(default)]
    pub initial: Option<usize>,
    /// Never more than this: `max_connections`.
    #[serde(default)]
    pub max: Option<usize>,
    /// How far above its no-load baseline the latency may rise before the window shrinks:
    /// 0.5 (50 %).
    #[serde(default = "default_latency_tolerance")]
    pub latency_tolerance: f64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            latency: true,
            min: default_window_min(),
            initial: None,
            max: None,
            latency_tolerance: default_latency_tolerance(),
        }
    }
}

impl WindowConfig {
    /// Checks the keys against each other and the store's `max_connections`.
    fn validate(&self, max_connections: usize) -> Result<(), Invalid> {
        let max = self.max.unwrap_or(max_connections);
        if self.min == 0 {
            return Err("window.min: must be at least 1".into());
        }
        if max < self.min {
            return Err(format!("window.max: must be at least window.min ({})", self.min).into());
        }
        if max > max_connections {
            return Err(format!(
                "window.max: at most max_connections ({max_connections}); raise that instead"
            )
            .into());
        }
        if let Some(initial) = self.initial
            && !(self.min..=max).contains(&initial)
        {
            return Err(format!(
                "window.initial: must be between window.min ({}) and window.max ({max})",
                self.min
            )
            .into());
        }
        if !(self.latency_tolerance.is_finite()
            && self.latency_tolerance > 0.0
            && self.latency_tolerance <= 10.0)
        {
            return Err(
                "window.latency_tolerance: must be above 0 and at most 10 (0.5 is 50 %)".into(),
            );
        }
        Ok(())
    }
}

/// One store of kind `smtp`: a fixed next hop (no MX lookups), with the same settings as an
/// LMTP store; checked with [`LmtpStoreConfig::validate_smtp`].
pub type SmtpStoreConfig = LmtpStoreConfig;

impl LmtpStoreConfig {
    /// The edge settings (verification, backpressure) as the agent keeps them.
    pub fn edge(&self) -> super::edge_config::EdgeSettings {
        super::edge_config::EdgeSettings {
            verify: self
                .verify_recipients
                .then_some(super::edge_config::VerifySettings {
                    timeout: self.verify_timeout.0,
                    tempfail: self.verify_tempfail_action,
                }),
            backpressure: self.backpressure,
        }
    }

    /// A store at `address` with every default.
    pub fn new(name: &str, address: StoreAddress) -> Self {
        Self {
            name: name.to_owned(),
            address,
            max_connections: default_max_connections(),
            tls: None,
            auth: None,
            recipients_per_transaction: default_recipients_per_transaction(),
            timeouts: LmtpTimeouts::default(),
            idle_timeout: default_idle_timeout(),
            reuse_limit: default_reuse_limit(),
            chunking: true,
            chunk_size: default_chunk_size(),
            normalize: Vec::new(),
            window: WindowConfig::default(),
            verify_recipients: false,
            verify_timeout: super::edge_config::default_verify_timeout(),
            verify_tempfail_action: super::edge_config::TempfailAction::Tempfail,
            backpressure: super::edge_config::BackpressureConfig::default(),
        }
    }

    /// Checks, for a `kind: smtp` relay, what [`validate`](Self::validate) checks and: the
    /// address is `host:port` (no unix socket), and AUTH goes only over required TLS unless
    /// the relay is on this host (a password is never sent in clear across a network, nor
    /// exposed to a STARTTLS downgrade).
    pub fn validate_smtp(&self) -> Result<(), Invalid> {
        self.validate()?;
        let StoreAddress::Tcp { host, .. } = &self.address else {
            return Err("address: an SMTP relay is host:port".into());
        };
        let tls_required = self
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == TlsMode::Required);
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if self.auth.is_some() && !tls_required && !loopback {
            return Err(
                "auth: needs tls: { mode: required } (the password would cross the network in clear)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Checks what serde cannot: the message names the key.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.max_connections == 0 {
            return Err("max_connections: must be at least 1".into());
        }
        if self.recipients_per_transaction == 0 {
            return Err("recipients_per_transaction: must be at least 1".into());
        }
        if self.chunk_size.0 == 0 || self.chunk_size.0 > 1 << 30 {
            return Err("chunk_size: must be between 1 and 1GiB".into());
        }
        if let Some(tls) = &self.tls {
            if tls.insecure_skip_verify && tls.ca_file.is_some() {
                return Err("tls: ca_file and insecure_skip_verify exclude each other".into());
            }
        }
        self.window.validate(self.max_connections)?;
        self.backpressure.validate()?;
        if self.verify_timeout.0.is_zero() {
            return Err("verify_timeout: must be above 0".into());
        }
        for (i, rule) in self.normalize.iter().enumerate() {
            if rule.code.is_some_and(|c| !(400..=599).contains(&c)) {
                return Err(format!("normalize[{i}].code: must be a 4yz or 5yz code").into());
            }
        }
        Ok(())
    }
}

/// Where the store listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreAddress {
    /// `host:port`; the host may be a name or an IP address (`[::1]:24` for IPv6).
    Tcp {
        /// Name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:/path` (a unix socket).
    Unix(PathBuf),
}

impl StoreAddress {
    /// Parses `host:port` or `unix:/path`.
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("`{s}`: a unix socket path must be absolute").into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let bad = || Invalid::from(format!("`{s}` is not host:port or unix:/path"));
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Self::Tcp {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for StoreAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "{host}:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for StoreAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, Self::parse, "host:port or unix:/path")
    }
}

/// `tls:` of a store.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreTlsConfig {
    /// `required`: no STARTTLS (or a failed handshake), no delivery. `opportunistic`:
    /// plaintext when the store does not offer STARTTLS.
    pub mode: TlsMode,
    /// PEM file of the CA certificates the store's certificate must chain to; default:
    /// Debian's bundle, `/etc/ssl/certs/ca-certificates.crt`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// **Tests only**: accept any certificate. The connection is encrypted but anyone in the
    /// path can read and change it.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// The name to verify the certificate against; default: the host of `address`
    /// (`localhost` for a unix socket).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// How much TLS is demanded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS or nothing.
    Required,
    /// TLS when offered.
    Opportunistic,
}

/// `auth:` of a store: SASL PLAIN.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreAuthConfig {
    /// The authentication identity (Cyrus: an admin listed in `lmtp_admins`).
    pub username: String,
    /// A file holding the password (trailing newline ignored); kept out of the YAML.
    pub password_file: PathBuf,
}

/// `timeouts:` of a store, one per phase (Postfix's `lmtp_*_timeout`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmtpTimeouts {
    /// Opening the socket: 30s.
    #[serde(default = "default_connect")]
    pub connect: Span,
    /// The greeting and each reply of LHLO (EHLO, HELO), STARTTLS and AUTH: 5m. Also
    /// written `ehlo`.
    #[serde(default = "default_lhlo", alias = "ehlo")]
    pub lhlo: Span,
    /// Each reply to MAIL, RCPT, DATA and RSET: 5m.
    #[serde(default = "default_mail_rcpt")]
    pub mail_rcpt: Span,
    /// Each write of content, and each reply to a BDAT chunk that is not the last: 2m.
    #[serde(default = "default_data")]
    pub data: Span,
    /// Each reply after the final dot or `BDAT LAST` (the store is writing mailboxes): 10m.
    #[serde(default = "default_end_of_data")]
    pub end_of_data: Span,
}

impl Default for LmtpTimeouts {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            lhlo: default_lhlo(),
            mail_rcpt: default_mail_rcpt(),
            data: default_data(),
            end_of_data: default_end_of_data(),
        }
    }
}

/// One row of a store's normalisation table: replies that match are treated as temporary
/// (or permanent) whatever their first digit says.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizeRule {
    /// The reply code to match (`552`); any code when absent.
    #[serde(default)]
    pub code: Option<u16>,
    /// The enhanced status code (`5.2.2`), or its class and subject (`5.2`); any when absent.
    #[serde(default)]
    pub enhanced: Option<String>,
    /// What a matching reply is taken as.
    pub treat_as: TreatAs,
    /// Only while the message is younger than this: over quota is temporary for two days,
    /// then it bounces.
    #[serde(default)]
    pub max_age: Option<Span>,
    /// Only until this UTC time (`2026-05-01T06:00:00Z`): a known resync window.
    #[serde(default)]
    pub until: Option<Timestamp>,
}

/// What a matching reply is taken as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TreatAs {
    /// As a 4yz: defer.
    Temporary,
    /// As a 5yz: bounce.
    Permanent,
}

/// A UTC time written as RFC 3339 `YYYY-MM-DDTHH:MM:SSZ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    /// Parses `YYYY-MM-DDTHH:MM:SSZ` (a space may replace the `T`).
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let bad = || Invalid::from(format!("`{s}` is not a UTC time like 2026-05-01T06:00:00Z"));
        let b = s.trim().as_bytes();
        if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
            return Err(bad());
        }
        if !matches!(b[10], b'T' | b't' | b' ') || !matches!(b[19], b'Z' | b'z') {
            return Err(bad());
        }
        let num = |from: usize, to: usize| -> Result<u64, Invalid> {
            let part = &b[from..to];
            if !part.iter().all(u8::is_ascii_digit) {
                return Err(bad());
            }
            Ok(part.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
        };
        let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
        let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
        if year < 1970 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
            return Err(bad());
        }
        if hour > 23 || minute > 59 || second > 60 {
            return Err(bad());
        }
        let days = crate::date::days_from_civil(year, month, day);
        let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
        Ok(Self(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, Self::parse, "a UTC time like 2026-05-01T06:00:00Z")
    }
}

fn default_max_connections() -> usize {
    10
}
fn default_recipients_per_transaction() -> usize {
    50
}
fn default_idle_timeout() -> Span {
    Span(Duration::from_secs(2))
}
fn default_reuse_limit() -> Span {
    Span(Duration::from_secs(2))
}
fn default_window_min() -> usize {
    1
}
fn default_latency_tolerance() -> f64 {
    0.5
}
fn default_true() -> bool {
    true
}
fn default_chunk_size() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_connect() -> Span {
    Span(Duration::from_secs(30))
}
fn default_lhlo() -> Span {
    Span(Duration::from_secs(300))
}
fn default_mail_rcpt() -> Span {
    Span(Duration::from_secs(300))
}
fn default_data() -> Span {
    Span(Duration::from_secs(120))
}
fn default_end_of_data() -> Span {
    Span(Duration::from_secs(600))
}

#[cfg(test)]
mod tests;
