//! `routes:` — local domains, user pins, aliases, patterns, clusters and the relay: the
//! section's types and defaults, and [`RouteOrigins`] (which included fragment each merged
//! entry came from). What each rule means is in [`crate::routing`]; the fragments are merged
//! by `config::include`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::units::Span;

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

/// Where the merged entries of `routes:` came from; an entry not listed is the main file's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteOrigins {
    /// The included files, in include order, as named in `routes.include`.
    pub files: Vec<PathBuf>,
    /// `domains[k]`, `users[k]`, `aliases[k]`, `clusters[k]` (keys as written) and
    /// `patterns[i]` (merged index) → index into `files`.
    pub entries: BTreeMap<String, usize>,
    /// Merged pattern index → its index within its own file.
    pub pattern_local: BTreeMap<usize, usize>,
}

impl RouteOrigins {
    /// The file an entry (`users[k]`, `patterns[3]`, …) came from, when a fragment.
    pub fn file_of(&self, entry: &str) -> Option<&PathBuf> {
        self.entries.get(entry).and_then(|f| self.files.get(*f))
    }
}
