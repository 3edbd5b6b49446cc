//! Routing: which store holds a recipient's mailbox, or why it is refused.
//!
//! The map (`routes:` in the configuration, the route fragments it includes — merged by
//! `config::include` — plus an optional plain `users_file`) is compiled once into a
//! [`Router`] and then only read; a reload builds a whole new one and swaps it
//! ([`reload`](crate::reload)), so a reader sees either the old map or the new one, never
//! half of each.
//! The listener asks at RCPT ([`Router::rcpt`]: accept, expand aliases, or refuse); the
//! scheduler asks again at every delivery attempt ([`Router::resolve`], through the map in
//! force at that moment), so a changed map re-routes queued mail.
//!
//! # Resolution, in order
//!
//! 1. **Normalisation.** The domain is compared case-insensitively. The local part is
//!    folded to lower case unless the domain says `local_part_case: preserve`. An extension
//!    after the first `recipient_delimiter` character is dropped for lookups
//!    (`alice+news@` routes as `alice@`); the envelope keeps the address as sent.
//! 2. **Not a local domain:** the relay store for a trusted client (and for every address
//!    the scheduler routes: bounces, alias targets elsewhere), otherwise refused
//!    (`554 5.7.1`): never an open relay.
//! 3. **Aliases** (RCPT only): the exact address, then without its extension. Targets are
//!    routed again, recursively up to `alias_depth`; a loop or a deeper chain is a map error
//!    (`451 4.3.0`, logged), never a bounce. A target equal to the alias itself ends there
//!    (`a@x: [a@x, b@x]` keeps a copy for `a`). When the alias matched without the
//!    extension and `propagate_extensions` is on, the extension (as given) is appended to
//!    each target's local part that has none: `team+x@` → `alice+x@`, `bob+x@`.
//! 4. **Users** (pins): the exact address, then without its extension; the pin names a
//!    store or a cluster.
//! 5. **Patterns**, in order: regex or wildcard over the normalised address (with its
//!    extension, then without).
//! 6. **Catch-all alias** `@domain` (RCPT only).
//! 7. **The domain's own route**: its store, or its cluster (rendezvous hashing of the
//!    normalised mailbox, see [`cluster`]). A domain with neither, or an authoritative
//!    domain, refuses unknown users (`550 5.1.1`) — except `postmaster`, which always
//!    exists (RFC 5321 §4.5.1) and goes to the domain's route, or else to the route of the
//!    first domain (alphabetically) that has one.
//!
//! Alias expansion happens once, at RCPT (like Postfix's `virtual_alias_maps` in
//! cleanup): the spooled envelope holds the expanded recipients, each with `ORCPT=` set to
//! the address the client gave (unless the client set one). Delivery attempts route those
//! expanded addresses through steps 1, 2, 4, 5 and 7.
//!
//! A map that could not be built (an unreadable users file at start-up) answers every
//! lookup [`RcptDecision::Unavailable`] — `451 4.3.0` at RCPT, a deferral at delivery —
//! until a reload succeeds. Never a 5xx for our own trouble.

mod build;
pub mod cluster;
pub mod config;
pub mod diff;
mod explain;
mod pattern;
mod users;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_include;

use std::collections::HashMap;

use postern_proto::ForwardPath;

use config::{LocalPartCase, RoutesConfig};

pub use build::validate;
pub use explain::Explanation;

/// What routing says about one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptDecision {
    /// A local mailbox in this store.
    Local {
        /// Store name.
        store: String,
    },
    /// Mail to another domain (from a trusted client, or a bounce), through the relay store.
    Relay {
        /// Store name.
        store: String,
    },
    /// A local domain that does not know this user: 550 5.1.1.
    UnknownUser,
    /// Not a local domain, and the client may not relay: 554 5.7.1.
    RelayDenied,
    /// The map is not available or is inconsistent (failed to load, an alias loop): 451 4.3.0
    /// at RCPT, a deferral at delivery.
    Unavailable,
}

impl RcptDecision {
    /// The store, when the recipient is routed to one.
    pub fn store(&self) -> Option<&str> {
        match self {
            Self::Local { store } | Self::Relay { store } => Some(store),
            _ => None,
        }
    }
}

/// What the listener does with one RCPT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptRoute {
    /// Accept the address as given (`Local` or `Relay`).
    Accept(RcptDecision),
    /// Accept, and queue these addresses instead (alias expansion; never empty).
    Expand(Vec<String>),
    /// Refuse with this decision's reply.
    Refuse(RcptDecision),
}

/// Where a rule sends mail: a store or a cluster (by index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Store(u32),
    Cluster(u32),
}

#[derive(Clone, Debug)]
pub(crate) struct DomainEntry {
    name: Box<str>,
    default: Option<Target>,
    authoritative: bool,
    case: LocalPartCase,
}

/// Which rule matched (internal; [`Explanation`] renders it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hit {
    User { base: bool },
    Pattern(usize),
    Domain,
    Postmaster,
}

/// The compiled routing map.
#[derive(Debug, Default)]
pub struct Router {
    stores: Vec<Box<str>>,
    clusters: Vec<(Box<str>, cluster::Cluster)>,
    domains: HashMap<Box<str>, DomainEntry, users::Fast>,
    users: users::Users,
    aliases: HashMap<Box<str>, Box<[Box<str>]>>,
    alias_depth: usize,
    /// Append an unmatched extension to alias targets (`routes.propagate_extensions`).
    propagate_extensions: bool,
    /// Rule key (`users[k]`, `aliases[k]`, `patterns[i]`, `domains[d]`, `clusters[c]`) →
    /// the included file it came from; rules of the main file are not listed.
    sources: HashMap<String, Box<str>>,
    patterns: Vec<pattern::Pattern>,
    delimiters: Box<[char]>,
    relay: Option<u32>,
    postmaster: Option<Target>,
    /// Why the map is unavailable: every lookup answers [`RcptDecision::Unavailable`].
    unavailable: Option<String>,
    /// `routes.unroutable_grace`.
    unroutable_grace: std::time::Duration,
}

/// A recipient's lookup keys: one string `local@domain`, normalised, extension kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Keys {
    pub(crate) full: String,
    /// Where the `@` is.
    at: usize,
    /// Where the extension starts in the local part, when there is one.
    extension: Option<usize>,
}

impl Keys {
    /// The key without its extension, when there was one.
    pub(crate) fn base(&self) -> Option<String> {
        self.extension
            .map(|e| format!("{}{}", &self.full[..e], &self.full[self.at..]))
    }

    /// The base if any, else the full key: the mailbox as clusters and explanations see it.
    pub(crate) fn mailbox(&self) -> std::borrow::Cow<'_, str> {
        match self.base() {
            Some(b) => b.into(),
            None => self.full.as_str().into(),
        }
    }

    /// The local part as compared (extension kept).
    pub(crate) fn local(&self) -> &str {
        &self.full[..self.at]
    }

    /// The folded domain.
    pub(crate) fn domain(&self) -> &str {
        &self.full[self.at + 1..]
    }
}

/// A domain folded to lower case without allocating (domains are at most 255 octets).
struct FoldedDomain {
    buf: [u8; 256],
    len: usize,
}

impl FoldedDomain {
    fn new(domain: &str) -> Option<Self> {
        let b = domain.trim_end_matches('.').as_bytes();
        if b.len() > 256 {
            return None;
        }
        let mut buf = [0u8; 256];
        for (d, s) in buf.iter_mut().zip(b) {
            *d = s.to_ascii_lowercase();
        }
        Some(Self { buf, len: b.len() })
    }

    fn as_str(&self) -> &str {
        // ASCII lower-casing keeps UTF-8 valid.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl Router {
    /// Compiles an already validated `routes:` section. A map that cannot be built (an
    /// unreadable users file) becomes an unavailable map, whose every answer is
    /// [`RcptDecision::Unavailable`]; use [`Router::build`] to see the errors.
    pub fn new(routes: &RoutesConfig) -> Self {
        match Self::build(routes, None) {
            Ok(r) => r,
            Err(errors) => {
                let reason = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                Self::unavailable(reason)
            }
        }
    }

    /// A map that answers [`RcptDecision::Unavailable`] to everything.
    pub fn unavailable(reason: String) -> Self {
        Self {
            unavailable: Some(reason),
            ..Self::default()
        }
    }

    /// `routes.unroutable_grace`: how long a queued recipient this map does not route is
    /// deferred before it bounces (zero for a map built without a configuration).
    pub fn unroutable_grace(&self) -> std::time::Duration {
        self.unroutable_grace
    }

    /// Why the map is unavailable, if it is.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// Number of explicit user entries (both sources).
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// The explicit user keys (normalised), for the dry-run diff.
    pub fn user_keys(&self) -> impl Iterator<Item = &str> {
        self.users.keys()
    }

    /// Every store name the map can route to.
    pub fn store_names(&self) -> impl Iterator<Item = &str> {
        self.stores.iter().map(AsRef::as_ref)
    }

    /// True when `domain` (any case) is one of ours.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(fold_domain(domain).as_str())
    }

    /// Decides for one recipient at delivery (no alias expansion); `trusted` is whether the
    /// client may relay (the scheduler passes `true`: what it holds was accepted).
    pub fn resolve(&self, to: &ForwardPath, trusted: bool) -> RcptDecision {
        if self.unavailable.is_some() {
            return RcptDecision::Unavailable;
        }
        let Some(mailbox) = to.mailbox() else {
            return self.postmaster_decision();
        };
        let postern_proto::address::DomainRef::Name(name) = mailbox.domain() else {
            return self.relay_or_deny(trusted); // an address literal is never ours
        };
        let Some(domain) = FoldedDomain::new(name) else {
            return self.relay_or_deny(trusted);
        };
        let Some(entry) = self.domains.get(domain.as_str()) else {
            return self.relay_or_deny(trusted);
        };
        let keys = match mailbox.local_part().starts_with('"') {
            true => self.keys(entry, &mailbox.local_part_unquoted(), domain.as_str()),
            false => self.keys(entry, mailbox.local_part(), domain.as_str()),
        };
        match self.find(entry, &keys) {
            Some((target, _)) => self.decide(target, &keys),
            None => RcptDecision::UnknownUser,
        }
    }

    /// Decides at RCPT: accept, expand aliases, or refuse.
    pub fn rcpt(&self, to: &ForwardPath, trusted: bool) -> RcptRoute {
        let e = self.explain(to, trusted);
        if e.expansion.is_empty() {
            return match e.decision {
                Some(d @ (RcptDecision::Local { .. } | RcptDecision::Relay { .. })) => {
                    RcptRoute::Accept(d)
                }
                Some(d) => RcptRoute::Refuse(d),
                None => RcptRoute::Refuse(RcptDecision::Unavailable),
            };
        }
        let mut out: Vec<String> = Vec::new();
        let mut refusal = None;
        e.leaves(&mut |leaf| {
            if let Some(err) = &leaf.error {
                tracing::warn!(recipient = %e.address, error = %err, "alias expansion failed");
                refusal.get_or_insert(RcptDecision::Unavailable);
                return;
            }
            match &leaf.decision {
                Some(RcptDecision::Local { .. } | RcptDecision::Relay { .. }) => {
                    if !out.iter().any(|a| a.eq_ignore_ascii_case(&leaf.address)) {
                        out.push(leaf.address.clone());
                    }
                }
                Some(d) => {
                    refusal.get_or_insert(d.clone());
                }
                None => {
                    refusal.get_or_insert(RcptDecision::Unavailable);
                }
            }
        });
        match refusal {
            Some(d) => RcptRoute::Refuse(d),
            None if out.is_empty() => RcptRoute::Refuse(RcptDecision::Unavailable),
            None => RcptRoute::Expand(out),
        }
    }

    fn postmaster_decision(&self) -> RcptDecision {
        match self.postmaster {
            Some(t) => self.decide(t, &Keys::postmaster()),
            None => RcptDecision::UnknownUser,
        }
    }

    pub(crate) fn relay_or_deny(&self, trusted: bool) -> RcptDecision {
        match (self.relay, trusted) {
            (Some(store), true) => RcptDecision::Relay {
                store: self.stores[store as usize].to_string(),
            },
            _ => RcptDecision::RelayDenied,
        }
    }

    /// The lookup keys of `local@domain` (domain already folded) under `entry`'s policy.
    pub(crate) fn keys(&self, entry: &DomainEntry, local: &str, domain: &str) -> Keys {
        let mut full = String::with_capacity(local.len() + 1 + domain.len());
        match entry.case {
            LocalPartCase::Fold if local.is_ascii() => {
                full.extend(local.chars().map(|c| c.to_ascii_lowercase()));
            }
            LocalPartCase::Fold => full.push_str(&local.to_lowercase()),
            LocalPartCase::Preserve => full.push_str(local),
        }
        let at = full.len();
        let extension = full
            .char_indices()
            .find(|(i, c)| *i > 0 && self.delimiters.contains(c))
            .map(|(i, _)| i);
        full.push('@');
        full.push_str(domain);
        Keys {
            full,
            at,
            extension,
        }
    }

    /// Steps 4, 5 and 7 (no aliases): the target and the rule, or `None` for an unknown user.
    pub(crate) fn find(&self, entry: &DomainEntry, keys: &Keys) -> Option<(Target, Hit)> {
        if let Some(t) = self.users.get(&keys.full) {
            return Some((t, Hit::User { base: false }));
        }
        let base = keys.base();
        if let Some(t) = base.as_deref().and_then(|b| self.users.get(b)) {
            return Some((t, Hit::User { base: true }));
        }
        // The whole address first, then without its extension.
        let pattern = self
            .patterns
            .iter()
            .position(|p| p.matches(&keys.full) || base.as_deref().is_some_and(|b| p.matches(b)));
        if let Some(i) = pattern {
            return Some((self.patterns[i].target, Hit::Pattern(i)));
        }
        match entry.default {
            Some(t) if !entry.authoritative => return Some((t, Hit::Domain)),
            _ => {}
        }
        if keys.local().eq_ignore_ascii_case("postmaster") {
            return entry
                .default
                .or(self.postmaster)
                .map(|t| (t, Hit::Postmaster));
        }
        None
    }

    /// A target as a decision for `keys`' mailbox.
    pub(crate) fn decide(&self, target: Target, keys: &Keys) -> RcptDecision {
        match self.store_of(target, keys) {
            Some(store) => RcptDecision::Local {
                store: self.stores[store as usize].to_string(),
            },
            None => RcptDecision::Unavailable,
        }
    }

    /// The store id a target means for this mailbox (cluster: rendezvous over the mailbox
    /// without its extension, so `alice+x@` and `alice@` share a store).
    pub(crate) fn store_of(&self, target: Target, keys: &Keys) -> Option<u32> {
        match target {
            Target::Store(s) => Some(s),
            Target::Cluster(c) => self
                .clusters
                .get(c as usize)
                .and_then(|(_, cl)| cl.pick(&keys.mailbox())),
        }
    }
}

impl Keys {
    fn postmaster() -> Self {
        Self {
            full: "postmaster@".into(),
            at: "postmaster".len(),
            extension: None,
        }
    }
}

/// A domain as compared: lower case, without a trailing dot.
pub(crate) fn fold_domain(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}
