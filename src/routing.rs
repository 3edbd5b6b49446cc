//! Routing at RCPT time: which store holds a recipient's mailbox, or why it is refused.
//!
//! This is the first cut of the routing map (local domains, per-user pins, authoritative
//! domains, the relay route); aliases, patterns and clusters extend it. The promises that
//! hold from now on: a non-local domain from an untrusted client is refused (never an open
//! relay); an unknown user is refused only where the domain is authoritative; a lookup that
//! cannot be answered is a temporary failure, never a 5xx.

use std::collections::HashMap;

use postern_proto::ForwardPath;

use crate::config::RoutesConfig;

/// What routing says about one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptDecision {
    /// A local mailbox in this store.
    Local {
        /// Store name.
        store: String,
    },
    /// Mail to another domain from a trusted client, through the relay store.
    Relay {
        /// Store name.
        store: String,
    },
    /// A local domain that is authoritative and does not know this user: 550 5.1.1.
    UnknownUser,
    /// Not a local domain, and the client may not relay: 554 5.7.1.
    RelayDenied,
}

/// The compiled routing map.
#[derive(Clone, Debug, Default)]
pub struct Router {
    domains: HashMap<String, (String, bool)>,
    users: HashMap<String, String>,
    relay: Option<String>,
    postmaster_store: Option<String>,
}

impl Router {
    /// Compiles the `routes:` section (already validated).
    pub fn new(routes: &RoutesConfig) -> Self {
        let domains: HashMap<String, (String, bool)> = routes
            .domains
            .iter()
            .map(|(d, r)| (d.to_ascii_lowercase(), (r.store.clone(), r.authoritative)))
            .collect();
        let users = routes
            .users
            .iter()
            .map(|(u, s)| (u.to_lowercase(), s.clone()))
            .collect();
        let postmaster_store = routes.domains.values().next().map(|r| r.store.clone());
        Self {
            domains,
            users,
            relay: routes.relay.clone(),
            postmaster_store,
        }
    }

    /// True when `domain` (any case) is one of ours.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(&domain.to_lowercase())
    }

    /// Decides for one recipient; `trusted` is whether the client is in the listener's
    /// `trusted_networks`.
    pub fn resolve(&self, to: &ForwardPath, trusted: bool) -> RcptDecision {
        let Some(mailbox) = to.mailbox() else {
            // <Postmaster> without a domain must always be accepted (RFC 5321 §4.5.1).
            return match &self.postmaster_store {
                Some(store) => RcptDecision::Local {
                    store: store.clone(),
                },
                None => self.relay_or_deny(trusted),
            };
        };
        let domain = mailbox.domain().folded();
        let Some((store, authoritative)) = self.domains.get(&domain) else {
            return self.relay_or_deny(trusted);
        };
        let key = format!("{}@{domain}", mailbox.local_part_unquoted().to_lowercase());
        match self.users.get(&key) {
            Some(pinned) => RcptDecision::Local {
                store: pinned.clone(),
            },
            None if *authoritative && !mailbox.local_part().eq_ignore_ascii_case("postmaster") => {
                RcptDecision::UnknownUser
            }
            None => RcptDecision::Local {
                store: store.clone(),
            },
        }
    }

    fn relay_or_deny(&self, trusted: bool) -> RcptDecision {
        match (&self.relay, trusted) {
            (Some(store), true) => RcptDecision::Relay {
                store: store.clone(),
            },
            _ => RcptDecision::RelayDenied,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::DomainRoute;

    fn router() -> Router {
        let mut domains = BTreeMap::new();
        domains.insert(
            "example.org".into(),
            DomainRoute {
                store: "local".into(),
                authoritative: false,
            },
        );
        domains.insert(
            "Corp.Example".into(),
            DomainRoute {
                store: "cyrus".into(),
                authoritative: true,
            },
        );
        let mut users = BTreeMap::new();
        users.insert("Alice@corp.example".into(), "cyrus2".into());
        users.insert("bob@example.org".into(), "dovecot".into());
        Router::new(&RoutesConfig {
            domains,
            users,
            relay: Some("relay".into()),
        })
    }

    fn to(s: &str) -> ForwardPath {
        ForwardPath::parse(s).unwrap()
    }

    #[test]
    fn decisions() {
        let r = router();
        let local = |s: &str| RcptDecision::Local { store: s.into() };
        let cases = [
            ("<anyone@example.org>", false, local("local")),
            ("<anyone@EXAMPLE.ORG>", false, local("local")),
            ("<Bob@example.org>", false, local("dovecot")),
            ("<alice@corp.example>", false, local("cyrus2")),
            ("<carol@corp.example>", false, RcptDecision::UnknownUser),
            ("<postmaster@corp.example>", false, local("cyrus")),
            ("<x@elsewhere.example>", false, RcptDecision::RelayDenied),
            (
                "<x@elsewhere.example>",
                true,
                RcptDecision::Relay {
                    store: "relay".into(),
                },
            ),
            ("<x@[192.0.2.1]>", false, RcptDecision::RelayDenied),
            ("<Postmaster>", false, local("cyrus")),
        ];
        for (addr, trusted, want) in cases {
            assert_eq!(
                r.resolve(&to(addr), trusted),
                want,
                "{addr} trusted={trusted}"
            );
        }
    }

    #[test]
    fn no_relay_route_means_no_relay_even_for_trusted_clients() {
        let r = Router::new(&RoutesConfig::default());
        assert_eq!(
            r.resolve(&to("<x@y.example>"), true),
            RcptDecision::RelayDenied
        );
    }
}
