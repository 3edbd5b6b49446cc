//! Building a [`Router`] from `routes:`: the checks only the whole section can make
//! ([`validate`], run by `Config::validate` so `check-config` sees them), then compilation
//! ([`Router::build`]) with the users file read and checked line by line.
//!
//! Promises: a map that builds is complete and consistent (every name resolves to a store;
//! every cluster has members); a map that does not build names each problem by file, line
//! and key. Building never touches a running map.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::Path;

use postern_proto::{Domain, Mailbox};

use super::cluster::{Cluster, store_seed};
use super::config::{LocalPartCase, RoutesConfig};
use super::pattern::Pattern;
use super::users::Users;
use super::{DomainEntry, Router, Target, fold_domain};
use crate::config::error::ConfigError;

/// At most this many problems are listed from one users file.
const MAX_FILE_ERRORS: usize = 20;

/// The semantic checks of `routes:` against the configured store names, as
/// `(key path, message)`.
pub fn validate(routes: &RoutesConfig, stores: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut bad = |path: String, message: String| out.push((path, message));
    // Sets, not scans: a map may hold a million users and a thousand stores.
    let store_set: HashSet<&str> = stores.iter().copied().collect();
    let store = |n: &str| store_set.contains(n);
    let cluster = |n: &str| routes.clusters.contains_key(n);
    let folded: HashSet<String> = routes.domains.keys().map(|k| fold_domain(k)).collect();
    let local = |d: &str| folded.contains(&fold_domain(d));
    for (name, members) in &routes.clusters {
        let at = format!("routes.clusters[{name}]");
        if store(name) {
            bad(at.clone(), format!("`{name}` is also a store name"));
        }
        if members.is_empty() {
            bad(at.clone(), "a cluster needs at least one store".into());
        }
        for (i, m) in members.iter().enumerate() {
            if !store(m) {
                bad(format!("{at}[{i}]"), format!("no store named `{m}`"));
            } else if members[..i].contains(m) {
                bad(format!("{at}[{i}]"), format!("`{m}` is listed twice"));
            }
        }
    }
    for (domain, route) in &routes.domains {
        let at = format!("routes.domains[{domain}]");
        if Domain::parse(domain).is_err() {
            bad(at.clone(), format!("`{domain}` is not a domain"));
        }
        if routes
            .domains
            .keys()
            .any(|k| k != domain && fold_domain(k) == fold_domain(domain))
        {
            bad(
                at.clone(),
                format!("`{domain}` is listed twice (in another case)"),
            );
        }
        match (&route.store, &route.cluster) {
            (Some(_), Some(_)) => bad(at.clone(), "give `store` or `cluster`, not both".into()),
            (Some(s), None) if !store(s) => {
                bad(format!("{at}.store"), format!("no store named `{s}`"));
            }
            (None, Some(c)) if !cluster(c) => {
                bad(format!("{at}.cluster"), format!("no cluster named `{c}`"));
            }
            _ => {}
        }
    }
    for (user, target) in &routes.users {
        let at = format!("routes.users[{user}]");
        match Mailbox::parse(user) {
            Err(_) => bad(
                at.clone(),
                format!("`{user}` is not an address user@domain"),
            ),
            Ok(m) if !local(&m.domain().to_string()) => bad(
                at.clone(),
                format!("`{}` is not in routes.domains", m.domain()),
            ),
            Ok(_) => {}
        }
        if !store(target) && !cluster(target) {
            bad(at, format!("no store or cluster named `{target}`"));
        }
    }
    for (alias, targets) in &routes.aliases {
        let at = format!("routes.aliases[{alias}]");
        let domain = match alias.strip_prefix('@') {
            Some(d) => Domain::parse(d).ok().map(|_| d.to_owned()),
            None => Mailbox::parse(alias).ok().map(|m| m.domain().to_string()),
        };
        match domain {
            None => bad(
                at.clone(),
                format!("`{alias}` is not an address user@domain or a catch-all @domain"),
            ),
            Some(d) if !local(&d) => {
                bad(at.clone(), format!("`{d}` is not in routes.domains"));
            }
            Some(_) => {}
        }
        if targets.as_slice().is_empty() {
            bad(at.clone(), "an alias needs at least one target".into());
        }
        for (i, t) in targets.as_slice().iter().enumerate() {
            if Mailbox::parse(t).is_err() {
                bad(
                    format!("{at}[{i}]"),
                    format!("`{t}` is not an address user@domain"),
                );
            }
        }
    }
    for (i, p) in routes.patterns.iter().enumerate() {
        let at = format!("routes.patterns[{i}]");
        match (&p.regex, &p.wildcard) {
            (Some(r), None) => {
                if let Err(e) = Pattern::regex(r, Target::Store(0)) {
                    bad(format!("{at}.regex"), e.to_string());
                }
            }
            (None, Some(w)) => {
                if let Err(e) = Pattern::wildcard(w, Target::Store(0)) {
                    bad(format!("{at}.wildcard"), e.to_string());
                }
            }
            _ => bad(
                at.clone(),
                "give exactly one of `regex` and `wildcard`".into(),
            ),
        }
        match (&p.store, &p.cluster) {
            (Some(s), None) if !store(s) => {
                bad(format!("{at}.store"), format!("no store named `{s}`"));
            }
            (None, Some(c)) if !cluster(c) => {
                bad(format!("{at}.cluster"), format!("no cluster named `{c}`"));
            }
            (Some(_), None) | (None, Some(_)) => {}
            _ => bad(at, "give exactly one of `store` and `cluster`".into()),
        }
    }
    if let Some(relay) = &routes.relay {
        if !store(relay) {
            bad("routes.relay".into(), format!("no store named `{relay}`"));
        }
    }
    if routes.alias_depth == 0 {
        bad("routes.alias_depth".into(), "must be at least 1".into());
    }
    if routes
        .recipient_delimiter
        .chars()
        .any(|c| c == '@' || c == '"' || c.is_whitespace())
    {
        bad(
            "routes.recipient_delimiter".into(),
            "may not contain `@`, `\"` or white space".into(),
        );
    }
    out
}

/// Store and cluster names during a build.
struct Names<'a> {
    stores: Vec<Box<str>>,
    store_ids: HashMap<String, u32>,
    clusters: HashMap<&'a str, u32>,
    /// When known, names outside this list are refused.
    allowed: Option<&'a [&'a str]>,
}

impl Names<'_> {
    fn store(&mut self, name: &str) -> Option<u32> {
        if let Some(id) = self.store_ids.get(name) {
            return Some(*id);
        }
        if self.allowed.is_some_and(|a| !a.contains(&name)) {
            return None;
        }
        let id = u32::try_from(self.stores.len()).ok()?;
        self.stores.push(name.into());
        self.store_ids.insert(name.to_owned(), id);
        Some(id)
    }

    fn target(&mut self, name: &str) -> Option<Target> {
        match self.clusters.get(name) {
            Some(c) => Some(Target::Cluster(*c)),
            None => self.store(name).map(Target::Store),
        }
    }
}

fn error(file: &str, line: Option<usize>, path: &str, message: String) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        line,
        column: None,
        path: path.to_owned(),
        message,
    }
}

impl Router {
    /// Compiles `routes` (validated by [`validate`]) and reads its users file. `stores`,
    /// when given, is the list of store names the users file may name.
    pub fn build(routes: &RoutesConfig, stores: Option<&[&str]>) -> Result<Self, Vec<ConfigError>> {
        let internal = |path: &str, message: String| vec![error("routes", None, path, message)];
        let mut names = Names {
            stores: Vec::new(),
            store_ids: HashMap::new(),
            clusters: HashMap::new(),
            allowed: stores,
        };
        let mut clusters = Vec::new();
        // Rule key as explained → the fragment it came from.
        let mut sources: HashMap<String, Box<str>> = HashMap::new();
        let origin = |sources: &mut HashMap<String, Box<str>>, entry: String, key: String| {
            if let Some(file) = routes.origins.file_of(&entry) {
                sources.insert(key, file.display().to_string().into());
            }
        };
        for (i, (name, members)) in routes.clusters.iter().enumerate() {
            let mut compiled = Vec::new();
            for m in members {
                let id = names.store(m).ok_or_else(|| {
                    internal(
                        &format!("routes.clusters[{name}]"),
                        format!("no store named `{m}`"),
                    )
                })?;
                compiled.push((id, store_seed(m)));
            }
            let id =
                u32::try_from(i).map_err(|_| internal("routes.clusters", "too many".into()))?;
            names.clusters.insert(name, id);
            origin(
                &mut sources,
                format!("clusters[{name}]"),
                format!("clusters[{name}]"),
            );
            clusters.push((Box::from(name.as_str()), Cluster { members: compiled }));
        }
        let unknown =
            |path: String, n: &str| internal(&path, format!("no store or cluster named `{n}`"));
        let mut domains = HashMap::default();
        for (name, route) in &routes.domains {
            let default = match route.store.as_deref().or(route.cluster.as_deref()) {
                Some(n) => Some(
                    names
                        .target(n)
                        .ok_or_else(|| unknown(format!("routes.domains[{name}]"), n))?,
                ),
                None => None,
            };
            let folded = fold_domain(name);
            origin(
                &mut sources,
                format!("domains[{name}]"),
                format!("domains[{name}]"),
            );
            domains.insert(
                Box::from(folded.as_str()),
                DomainEntry {
                    name: Box::from(name.as_str()),
                    default,
                    authoritative: route.authoritative,
                    case: route.local_part_case,
                },
            );
        }
        let mut router = Self {
            domains,
            alias_depth: routes.alias_depth,
            propagate_extensions: routes.propagate_extensions,
            unroutable_grace: routes.unroutable_grace.0,
            delimiters: routes.recipient_delimiter.chars().collect(),
            ..Self::default()
        };
        if let Some(file) = &routes.users_file {
            router.users = read_users_file(file, &router, &mut names)?;
        }
        for (user, target) in &routes.users {
            let key = router.user_key(user).ok_or_else(|| {
                internal(
                    &format!("routes.users[{user}]"),
                    "not a local address".into(),
                )
            })?;
            let t = names
                .target(target)
                .ok_or_else(|| unknown(format!("routes.users[{user}]"), target))?;
            origin(
                &mut sources,
                format!("users[{user}]"),
                format!("users[{key}]"),
            );
            router.users.insert(&key, t);
        }
        for (alias, targets) in &routes.aliases {
            let key = match alias.strip_prefix('@') {
                Some(d) => format!("@{}", fold_domain(d)),
                None => router.user_key(alias).ok_or_else(|| {
                    internal(
                        &format!("routes.aliases[{alias}]"),
                        "not a local address".into(),
                    )
                })?,
            };
            let targets: Box<[Box<str>]> = targets
                .as_slice()
                .iter()
                .map(|t| Box::from(t.as_str()))
                .collect();
            origin(
                &mut sources,
                format!("aliases[{alias}]"),
                format!("aliases[{key}]"),
            );
            router.aliases.insert(key.into(), targets);
        }
        for (i, p) in routes.patterns.iter().enumerate() {
            let at = format!("routes.patterns[{i}]");
            let name = p
                .store
                .as_deref()
                .or(p.cluster.as_deref())
                .unwrap_or_default();
            let target = names
                .target(name)
                .ok_or_else(|| unknown(at.clone(), name))?;
            let compiled = match (&p.regex, &p.wildcard) {
                (Some(r), _) => Pattern::regex(r, target),
                (None, Some(w)) => Pattern::wildcard(w, target),
                (None, None) => return Err(internal(&at, "no regex or wildcard".into())),
            };
            router
                .patterns
                .push(compiled.map_err(|e| internal(&at, e.to_string()))?);
            origin(
                &mut sources,
                format!("patterns[{i}]"),
                format!("patterns[{i}]"),
            );
        }
        if let Some(relay) = &routes.relay {
            router.relay =
                Some(names.store(relay).ok_or_else(|| {
                    internal("routes.relay", format!("no store named `{relay}`"))
                })?);
        }
        // Postmaster of a domain without a route: the route of the first domain (in
        // alphabetical order of the folded names) that has one.
        let mut folded: Vec<&str> = router.domains.keys().map(AsRef::as_ref).collect();
        folded.sort_unstable();
        router.postmaster = folded
            .iter()
            .filter_map(|d| router.domains.get(*d))
            .find_map(|e| e.default);
        router.stores = names.stores;
        router.clusters = clusters;
        router.sources = sources;
        Ok(router)
    }

    /// The normalised user key of `user@domain` for a local domain (`None` otherwise).
    fn user_key(&self, address: &str) -> Option<String> {
        let (local, domain) = address.rsplit_once('@')?;
        let domain = fold_domain(domain);
        let entry = self.domains.get(domain.as_str())?;
        let local = local.trim_matches('"');
        Some(match entry.case {
            LocalPartCase::Fold => format!("{}@{domain}", local.to_lowercase()),
            LocalPartCase::Preserve => format!("{local}@{domain}"),
        })
    }
}

/// Reads `user@domain target` lines (`#` comments, blank lines skipped).
fn read_users_file(
    path: &Path,
    router: &Router,
    names: &mut Names<'_>,
) -> Result<Users, Vec<ConfigError>> {
    let file = path.display().to_string();
    let cannot = |e: std::io::Error| {
        vec![error(
            &file,
            None,
            "routes.users_file",
            format!("cannot read: {e}"),
        )]
    };
    // Counted first (a fast pass over the octets) so the table is sized once: growing or
    // shrinking a million-entry table would hold two of them at once.
    let mut lines = 1usize;
    {
        let mut counter =
            std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(path).map_err(cannot)?);
        loop {
            let chunk = counter.fill_buf().map_err(cannot)?;
            if chunk.is_empty() {
                break;
            }
            lines += chunk.iter().filter(|b| **b == b'\n').count();
            let n = chunk.len();
            counter.consume(n);
        }
    }
    let handle = std::fs::File::open(path).map_err(cannot)?;
    let mut users = Users::with_capacity(lines);
    let mut reader = std::io::BufReader::with_capacity(1 << 16, handle);
    let mut raw = String::new();
    let mut errors = Vec::new();
    let mut extra = 0usize;
    let mut n = 0usize;
    loop {
        raw.clear();
        if reader.read_line(&mut raw).map_err(cannot)? == 0 {
            break;
        }
        n += 1;
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let problem = match (fields.next(), fields.next(), fields.next()) {
            (Some(user), Some(target), None) => match router.user_key(user) {
                None if !user.contains('@') => {
                    Some(format!("`{user}` is not an address user@domain"))
                }
                None => Some(format!("`{user}`: the domain is not in routes.domains")),
                Some(key) => match names.target(target) {
                    Some(t) => {
                        users.insert(&key, t);
                        None
                    }
                    None => Some(format!("`{user}`: no store or cluster named `{target}`")),
                },
            },
            _ => Some("expected `user@domain store` (two fields)".to_owned()),
        };
        if let Some(message) = problem {
            if errors.len() < MAX_FILE_ERRORS {
                errors.push(error(&file, Some(n), "routes.users_file", message));
            } else {
                extra += 1;
            }
        }
    }
    if extra > 0 {
        errors.push(error(
            &file,
            None,
            "routes.users_file",
            format!("and {extra} more problems"),
        ));
    }
    if errors.is_empty() {
        users.shrink_to_fit();
        Ok(users)
    } else {
        Err(errors)
    }
}
