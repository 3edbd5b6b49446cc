//! Why an address goes where it goes: the normalised form, the rule that matched (named by
//! its configuration key), the store, and the alias expansion as a tree.
//!
//! This is the one implementation of alias expansion: [`Router::rcpt`] flattens the tree
//! the listener needs, and `postern route` prints it. Expansion is bounded by
//! `alias_depth` and refuses loops, so it always ends.

use std::fmt;

use postern_proto::{ForwardPath, Mailbox};

use super::{Hit, Keys, RcptDecision, Router, Target};

/// How one address was routed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The address as given.
    pub address: String,
    /// Its normalised lookup form (extension removed when one was present).
    pub normalised: String,
    /// The rule that decided, by configuration key (`users[alice@corp.example]`).
    pub rule: String,
    /// The decision; `None` when the address is an alias (see `expansion`).
    pub decision: Option<RcptDecision>,
    /// The alias targets, each explained in turn.
    pub expansion: Vec<Self>,
    /// A map error met here (an alias loop, too deep a chain).
    pub error: Option<String>,
}

impl Explanation {
    /// Calls `f` for every leaf (an address that is not itself expanded further).
    pub fn leaves(&self, f: &mut impl FnMut(&Self)) {
        if self.expansion.is_empty() {
            f(self);
        } else {
            for e in &self.expansion {
                e.leaves(f);
            }
        }
    }

    fn write_indented(&self, f: &mut fmt::Formatter<'_>, depth: usize) -> fmt::Result {
        let pad = "  ".repeat(depth);
        let outcome = match (&self.error, &self.decision) {
            (Some(e), _) => format!("error: {e}"),
            (None, Some(RcptDecision::Local { store })) => format!("store {store}"),
            (None, Some(RcptDecision::Relay { store })) => format!("relay via store {store}"),
            (None, Some(RcptDecision::UnknownUser)) => "refused: 550 5.1.1 unknown user".into(),
            (None, Some(RcptDecision::RelayDenied)) => "refused: 554 5.7.1 relay denied".into(),
            (None, Some(RcptDecision::Unavailable)) => "unavailable: 451 4.3.0".into(),
            (None, None) => format!("alias of {} address(es)", self.expansion.len()),
        };
        writeln!(
            f,
            "{pad}{}  normalised={}  rule={}  {outcome}",
            self.address, self.normalised, self.rule
        )?;
        for e in &self.expansion {
            e.write_indented(f, depth + 1)?;
        }
        Ok(())
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_indented(f, 0)
    }
}

impl Router {
    /// Explains how `to` is routed at RCPT from a client (`trusted`: may relay).
    pub fn explain(&self, to: &ForwardPath, trusted: bool) -> Explanation {
        let mut chain = Vec::new();
        match to.mailbox() {
            Some(m) => self.explain_mailbox(m, &m.to_string(), trusted, 0, &mut chain),
            None => {
                let mut e = self.leaf("Postmaster", "postmaster", "postmaster (RFC 5321)");
                e.decision = Some(match &self.unavailable {
                    Some(_) => RcptDecision::Unavailable,
                    None => self.postmaster_decision(),
                });
                e
            }
        }
    }

    fn leaf(&self, address: &str, normalised: &str, rule: &str) -> Explanation {
        Explanation {
            address: address.to_owned(),
            normalised: normalised.to_owned(),
            rule: rule.to_owned(),
            decision: None,
            expansion: Vec::new(),
            error: None,
        }
    }

    fn explain_mailbox(
        &self,
        mailbox: &Mailbox,
        address: &str,
        trusted: bool,
        depth: usize,
        chain: &mut Vec<String>,
    ) -> Explanation {
        let domain = mailbox.domain().folded();
        let local = mailbox.local_part_unquoted();
        if let Some(reason) = &self.unavailable {
            let mut e = self.leaf(address, address, &format!("map unavailable: {reason}"));
            e.decision = Some(RcptDecision::Unavailable);
            return e;
        }
        let Some(entry) = self.domains.get(domain.as_str()) else {
            let normalised = format!("{local}@{domain}");
            let decision = self.relay_or_deny(trusted);
            let rule = match decision {
                RcptDecision::Relay { .. } => "relay (not a local domain)",
                _ => "not a local domain (no relay for this client)",
            };
            let mut e = self.leaf(address, &normalised, rule);
            e.decision = Some(decision);
            return e;
        };
        let keys = self.keys(entry, &local, &domain);
        let normalised = keys.mailbox().into_owned();
        let base = keys.base();
        // Aliases: the exact address, then without its extension.
        let alias = [Some(keys.full.as_str()), base.as_deref()]
            .into_iter()
            .flatten()
            .find_map(|k| self.aliases.get(k).map(|t| (k.to_owned(), t)));
        if let Some((key, targets)) = alias {
            // Matched without its extension: the extension goes on to the targets.
            let extension = match (self.propagate_extensions, &base) {
                (true, Some(b)) if *b == key => self.extension_of(&local),
                _ => None,
            };
            let targets: Vec<Box<str>> = match extension {
                Some(ext) => targets
                    .iter()
                    .map(|t| self.with_extension(t, ext).into())
                    .collect(),
                None => targets.to_vec(),
            };
            return self.expand(address, &normalised, &key, &targets, depth, chain);
        }
        let found = self.find(entry, &keys);
        // The catch-all stands in for users the rest of the map does not know.
        if matches!(found, None | Some((_, Hit::Domain))) {
            let key = format!("@{}", keys.domain());
            if let Some(targets) = self.aliases.get(key.as_str()) {
                return self.expand(address, &normalised, &key, targets, depth, chain);
            }
        }
        let (rule, decision) = match found {
            Some((target, hit)) => (
                self.rule_text(hit, target, &keys, entry.name.as_ref()),
                self.decide(target, &keys),
            ),
            None => (
                format!(
                    "domains[{}] {}",
                    entry.name,
                    if entry.default.is_none() {
                        "(per-user only): unknown user"
                    } else {
                        "(authoritative): unknown user"
                    }
                ),
                RcptDecision::UnknownUser,
            ),
        };
        let mut e = self.leaf(address, &normalised, &rule);
        e.decision = Some(decision);
        e
    }

    #[allow(clippy::too_many_arguments, reason = "the recursion's state")]
    fn expand(
        &self,
        address: &str,
        normalised: &str,
        key: &str,
        targets: &[Box<str>],
        depth: usize,
        chain: &mut Vec<String>,
    ) -> Explanation {
        let rule = format!("aliases[{key}]");
        let mut e = self.leaf(
            address,
            normalised,
            &format!("{rule}{}", self.source(&rule)),
        );
        if depth >= self.alias_depth {
            e.error = Some(format!(
                "alias chain deeper than alias_depth {} at aliases[{key}]",
                self.alias_depth
            ));
            return e;
        }
        if chain.iter().any(|c| c == normalised) {
            e.error = Some(format!(
                "alias loop: {} -> {normalised}",
                chain.join(" -> ")
            ));
            return e;
        }
        chain.push(normalised.to_owned());
        for target in targets {
            let child = match Mailbox::parse(target) {
                Err(err) => {
                    let mut c = self.leaf(target, target, &format!("aliases[{key}]"));
                    c.error = Some(format!("`{target}` is not an address: {err}"));
                    c
                }
                // The alias names itself: deliver to that mailbox, do not expand again.
                Ok(m) if self.normalised_of(&m).as_deref() == Some(normalised) => {
                    let mut c = self.explain_mailbox_without_aliases(&m, target);
                    c.rule = format!("aliases[{key}] (itself), then {}", c.rule);
                    c
                }
                // Targets were chosen by the map's author: relayed whoever the client is.
                Ok(m) => self.explain_mailbox(&m, target, true, depth + 1, chain),
            };
            e.expansion.push(child);
        }
        chain.pop();
        e
    }

    /// The extension of a local part as given, delimiter included (`+x` of `team+x`).
    fn extension_of<'a>(&self, local: &'a str) -> Option<&'a str> {
        local
            .char_indices()
            .find(|(i, c)| *i > 0 && self.delimiters.contains(c))
            .map(|(i, _)| &local[i..])
    }

    /// `target` with `extension` appended to its local part, unless it has one already, is
    /// quoted, or would not be an address with it (an extension from a quoted local part
    /// with spaces, a local part over 64 octets): then as written.
    fn with_extension(&self, target: &str, extension: &str) -> String {
        match target.rsplit_once('@') {
            Some((local, domain))
                if !local.starts_with('"') && self.extension_of(local).is_none() =>
            {
                let extended = format!("{local}{extension}@{domain}");
                match Mailbox::parse(&extended) {
                    Ok(_) => extended,
                    Err(_) => target.to_owned(),
                }
            }
            _ => target.to_owned(),
        }
    }

    /// ` (from FILE)` when the rule `key` came from an included file.
    fn source(&self, key: &str) -> String {
        self.sources
            .get(key)
            .map_or_else(String::new, |f| format!(" (from {f})"))
    }

    /// The normalised lookup form of a local mailbox (`None` for other domains).
    fn normalised_of(&self, m: &Mailbox) -> Option<String> {
        let domain = m.domain().folded();
        let entry = self.domains.get(domain.as_str())?;
        Some(
            self.keys(entry, &m.local_part_unquoted(), &domain)
                .mailbox()
                .into_owned(),
        )
    }

    fn explain_mailbox_without_aliases(&self, m: &Mailbox, address: &str) -> Explanation {
        let to = ForwardPath::Mailbox(m.clone());
        let decision = self.resolve(&to, true);
        let normalised = self.normalised_of(m).unwrap_or_else(|| address.to_owned());
        let mut e = self.leaf(address, &normalised, "users, patterns, domain");
        e.decision = Some(decision);
        e
    }

    fn rule_text(&self, hit: Hit, target: Target, keys: &Keys, domain: &str) -> String {
        let rule = match hit {
            Hit::User { base: false } => {
                let k = format!("users[{}]", keys.full);
                format!("{k}{}", self.source(&k))
            }
            Hit::User { base: true } => {
                let k = format!("users[{}]", keys.mailbox());
                format!("{k}{}", self.source(&k))
            }
            Hit::Pattern(i) => format!(
                "patterns[{i}] `{}`{}",
                self.patterns[i].text,
                self.source(&format!("patterns[{i}]"))
            ),
            Hit::Domain => format!(
                "domains[{domain}].{}{}",
                match target {
                    Target::Store(_) => "store",
                    Target::Cluster(_) => "cluster",
                },
                self.source(&format!("domains[{domain}]"))
            ),
            Hit::Postmaster => format!("domains[{domain}] (postmaster always exists)"),
        };
        match target {
            Target::Cluster(c) => {
                let name = self
                    .clusters
                    .get(c as usize)
                    .map_or("?", |(n, _)| n.as_ref());
                let k = format!("clusters[{name}]");
                format!("{rule} -> {k} (rendezvous){}", self.source(&k))
            }
            Target::Store(_) => rule,
        }
    }
}
