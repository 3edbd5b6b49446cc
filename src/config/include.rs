//! `routes.include`: route fragments in separate YAML files, merged into `routes:`.
//!
//! Each included file is one YAML document holding the map keys of `routes:` — `domains`,
//! `users`, `aliases`, `patterns`, `clusters` — and nothing else: the settings
//! (`recipient_delimiter`, `relay`, `users_file`, …) stay in the main file, and a fragment
//! may not include another (one level; an `include:` in a fragment is an unknown key).
//! Relative paths are taken from the working directory, like `users_file`.
//!
//! Merge rules: maps are merged; a key defined twice — in two fragments, or in the main
//! file and a fragment — is an error naming both places (`file:line: key`), never a silent
//! override (domains are compared case-insensitively, users and aliases as the map
//! compares them: `Alice@X` is `alice@x` unless the domain preserves case); patterns are appended after the main
//! file's, in include order. [`RouteOrigins`] remembers which file every merged entry came
//! from, so later errors and `postern route` name the fragment.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;

use super::error::ConfigError;
use super::locate;
use crate::routing::config::{
    AliasTargets, DomainRoute, LocalPartCase, PatternRoute, RouteOrigins, RoutesConfig,
};

/// At most this many files may be included.
pub const MAX_INCLUDES: usize = 256;

/// One included file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fragment {
    #[serde(default)]
    domains: BTreeMap<String, DomainRoute>,
    #[serde(default)]
    users: BTreeMap<String, String>,
    #[serde(default)]
    aliases: BTreeMap<String, AliasTargets>,
    #[serde(default)]
    patterns: Vec<PatternRoute>,
    #[serde(default)]
    clusters: BTreeMap<String, Vec<String>>,
}

/// A domain as compared for duplicates.
fn fold(d: &str) -> String {
    d.trim_end_matches('.').to_ascii_lowercase()
}

/// An address as the map compares it: the domain folded, the local part folded unless the
/// domain preserves case (`preserve`: folded domains that do). A catch-all `@domain` is
/// its folded domain.
fn address_key(address: &str, preserve: &HashSet<String>) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => {
            let domain = fold(domain);
            let local = local.trim_matches('"');
            match preserve.contains(&domain) {
                true => format!("{local}@{domain}"),
                false => format!("{}@{domain}", local.to_lowercase()),
            }
        }
        None => address.to_owned(),
    }
}

/// The folded domains whose local parts keep their case.
fn preserving(routes: &RoutesConfig) -> HashSet<String> {
    routes
        .domains
        .iter()
        .filter(|(_, r)| r.local_part_case == LocalPartCase::Preserve)
        .map(|(d, _)| fold(d))
        .collect()
}

/// Where an entry was defined, for a duplicate's message: `file:line: key`.
struct Place<'a> {
    main_file: &'a str,
    main_text: &'a str,
    texts: &'a [String],
    origins: &'a RouteOrigins,
}

impl Place<'_> {
    fn of(&self, section: &str, key: &str) -> String {
        let entry = format!("{section}[{key}]");
        let (file, path, text) = match self.origins.entries.get(&entry) {
            Some(&f) => (
                self.origins.files[f].display().to_string(),
                entry,
                self.texts[f].as_str(),
            ),
            None => (
                self.main_file.to_owned(),
                format!("routes.{entry}"),
                self.main_text,
            ),
        };
        let line = locate::line_of(text, &path).map_or_else(|| "?".to_owned(), |l| l.to_string());
        format!("{file}:{line}: {path}")
    }
}

/// Reads and merges `routes.include` into `routes`. Returns the fragments' texts (indexed
/// like `routes.origins.files`, for [`relocate`]) or every problem found.
pub(super) fn merge(
    routes: &mut RoutesConfig,
    main_text: &str,
    main_file: &str,
) -> Result<Vec<String>, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut texts: Vec<String> = Vec::new();
    let includes = std::mem::take(&mut routes.include);
    let at_main = |i: usize, message: String| {
        let path = format!("routes.include[{i}]");
        ConfigError::at(
            main_file,
            locate::position_of(main_text, &path),
            path,
            message,
        )
    };
    if includes.len() > MAX_INCLUDES {
        errors.push(at_main(
            MAX_INCLUDES,
            format!("at most {MAX_INCLUDES} files may be included"),
        ));
    }
    // Users and aliases as the map compares them → the key as written, so `Alice@x` in one
    // file and `alice@x` in another are the same entry.
    let mut users: HashMap<String, String> = HashMap::new();
    let mut aliases: HashMap<String, String> = HashMap::new();
    if !includes.is_empty() {
        let preserve = preserving(routes);
        for k in routes.users.keys() {
            users.insert(address_key(k, &preserve), k.clone());
        }
        for k in routes.aliases.keys() {
            aliases.insert(address_key(k, &preserve), k.clone());
        }
    }
    for (i, path) in includes.iter().enumerate().take(MAX_INCLUDES) {
        let name = path.display().to_string();
        if includes[..i].contains(path) {
            errors.push(at_main(i, format!("`{name}` is included twice")));
            continue;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(at_main(i, format!("cannot read `{name}`: {e}")));
                continue;
            }
        };
        let fragment = match serde_yaml::from_str::<Option<Fragment>>(&text) {
            Ok(f) => f.unwrap_or_default(),
            Err(e) => {
                errors.push(locate::parse_error(&e, &text, &name));
                continue;
            }
        };
        let f = routes.origins.files.len();
        routes.origins.files.push(path.clone());
        texts.push(text);
        let dup = |section: &str, key: &str, earlier: &str, origins: &RouteOrigins| {
            let place = Place {
                main_file,
                main_text,
                texts: &texts,
                origins,
            };
            let here = format!("{section}[{key}]");
            ConfigError::at(
                name.clone(),
                locate::position_of(&texts[f], &here),
                here,
                format!(
                    "`{key}` is already defined at {}",
                    place.of(section, earlier)
                ),
            )
        };
        for (k, v) in fragment.domains {
            let earlier = routes.domains.keys().find(|e| fold(e) == fold(&k)).cloned();
            match earlier {
                Some(e) => errors.push(dup("domains", &k, &e, &routes.origins)),
                None => {
                    routes.origins.entries.insert(format!("domains[{k}]"), f);
                    routes.domains.insert(k, v);
                }
            }
        }
        let preserve = preserving(routes);
        for (k, v) in fragment.users {
            let normal = address_key(&k, &preserve);
            if let Some(earlier) = users.get(&normal) {
                errors.push(dup("users", &k, earlier, &routes.origins));
            } else {
                routes.origins.entries.insert(format!("users[{k}]"), f);
                users.insert(normal, k.clone());
                routes.users.insert(k, v);
            }
        }
        for (k, v) in fragment.aliases {
            let normal = address_key(&k, &preserve);
            if let Some(earlier) = aliases.get(&normal) {
                errors.push(dup("aliases", &k, earlier, &routes.origins));
            } else {
                routes.origins.entries.insert(format!("aliases[{k}]"), f);
                aliases.insert(normal, k.clone());
                routes.aliases.insert(k, v);
            }
        }
        for (k, v) in fragment.clusters {
            if routes.clusters.contains_key(&k) {
                errors.push(dup("clusters", &k, &k, &routes.origins));
            } else {
                routes.origins.entries.insert(format!("clusters[{k}]"), f);
                routes.clusters.insert(k, v);
            }
        }
        for (local, p) in fragment.patterns.into_iter().enumerate() {
            let merged = routes.patterns.len();
            routes
                .origins
                .entries
                .insert(format!("patterns[{merged}]"), f);
            routes.origins.pattern_local.insert(merged, local);
            routes.patterns.push(p);
        }
    }
    routes.include = includes;
    if errors.is_empty() {
        Ok(texts)
    } else {
        Err(errors)
    }
}

/// A semantic error at key path `path` (`routes.users[k]…`), located in the fragment the
/// entry came from; `None` when it is the main file's.
pub(super) fn relocate(
    routes: &RoutesConfig,
    texts: &[String],
    path: &str,
    message: &str,
) -> Option<ConfigError> {
    let rest = path.strip_prefix("routes.")?;
    let open = rest.find('[')?;
    let close = open + rest[open..].find(']')?;
    let section = &rest[..open];
    let key = &rest[open + 1..close];
    let tail = &rest[close + 1..];
    let entry = format!("{section}[{key}]");
    let f = *routes.origins.entries.get(&entry)?;
    let local = match section {
        "patterns" => {
            let merged: usize = key.parse().ok()?;
            format!("patterns[{}]", routes.origins.pattern_local.get(&merged)?)
        }
        _ => entry,
    };
    let at = format!("{local}{tail}");
    let position = texts.get(f).and_then(|t| locate::position_of(t, &at));
    Some(ConfigError::at(
        routes.origins.files.get(f)?.display().to_string(),
        position,
        at,
        message,
    ))
}
