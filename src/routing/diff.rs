//! The dry run of a map change: which users and how many queued recipients would move
//! between stores, before anyone reloads.
//!
//! Users compared are the explicit ones of either map (the `users:` entries and the users
//! file, pins to clusters included: a cluster change shows who moves). Queued recipients
//! are routed as the scheduler would at its next attempt (no alias expansion, as a trusted
//! sender). The spool is read without its lock ([`crate::spool::Spool::open_read_only`]),
//! so the daemon may keep running; the figures are the queue at that moment.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use postern_proto::ForwardPath;

use super::{RcptDecision, Router};

/// One user whose store changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The normalised address.
    pub user: String,
    /// Where it goes now.
    pub from: String,
    /// Where it would go.
    pub to: String,
}

/// The result of comparing two maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteDiff {
    /// Explicit users compared.
    pub users: usize,
    /// Those whose store changes, sorted by address.
    pub moves: Vec<Move>,
    /// Queued, not yet final recipients compared.
    pub queued: usize,
    /// `(from, to)` → how many queued recipients would move.
    pub queued_moves: BTreeMap<(String, String), usize>,
}

/// A decision as the diff prints it.
fn label(d: &RcptDecision) -> String {
    match d {
        RcptDecision::Local { store } => store.clone(),
        RcptDecision::Relay { store } => format!("{store} (relay)"),
        RcptDecision::UnknownUser => "(unknown user)".into(),
        RcptDecision::RelayDenied => "(relay denied)".into(),
        RcptDecision::Unavailable => "(unavailable)".into(),
    }
}

fn route(router: &Router, address: &str) -> String {
    let text = if address.eq_ignore_ascii_case("postmaster") {
        "<Postmaster>".to_owned()
    } else {
        format!("<{address}>")
    };
    match ForwardPath::parse(&text) {
        Ok(p) => label(&router.resolve(&p, true)),
        Err(_) => "(bad address)".into(),
    }
}

/// Compares `old` and `new` over their explicit users and the `queued` recipient addresses.
pub fn diff<'a>(
    old: &Router,
    new: &Router,
    queued: impl IntoIterator<Item = &'a str>,
) -> RouteDiff {
    let users: BTreeSet<&str> = old.user_keys().chain(new.user_keys()).collect();
    let mut out = RouteDiff {
        users: users.len(),
        ..RouteDiff::default()
    };
    for user in users {
        let (from, to) = (route(old, user), route(new, user));
        if from != to {
            out.moves.push(Move {
                user: user.to_owned(),
                from,
                to,
            });
        }
    }
    for address in queued {
        out.queued += 1;
        let (from, to) = (route(old, address), route(new, address));
        if from != to {
            *out.queued_moves.entry((from, to)).or_default() += 1;
        }
    }
    out
}

/// How many of `queued` `old` routes to a store and `new` refuses (unknown user, or a
/// domain it does not route): the recipients a reload leaves without a route (deferred
/// `4.3.0` for `routes.unroutable_grace`, then bounced).
pub fn lost_routes<'a>(
    old: &Router,
    new: &Router,
    queued: impl IntoIterator<Item = &'a str>,
) -> usize {
    let routed = |r: &Router, a: &str| {
        let text = if a.eq_ignore_ascii_case("postmaster") {
            "<Postmaster>".to_owned()
        } else {
            format!("<{a}>")
        };
        ForwardPath::parse(&text).map(|p| r.resolve(&p, true)).ok()
    };
    queued
        .into_iter()
        .filter(|a| {
            matches!(
                routed(old, a),
                Some(RcptDecision::Local { .. } | RcptDecision::Relay { .. })
            ) && matches!(
                routed(new, a),
                Some(RcptDecision::UnknownUser | RcptDecision::RelayDenied)
            )
        })
        .count()
}

impl fmt::Display for RouteDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "users moving: {} of {}", self.moves.len(), self.users)?;
        for m in &self.moves {
            writeln!(f, "  {}: {} -> {}", m.user, m.from, m.to)?;
        }
        let moving: usize = self.queued_moves.values().sum();
        writeln!(f, "queued recipients moving: {moving} of {}", self.queued)?;
        for ((from, to), n) in &self.queued_moves {
            writeln!(f, "  {from} -> {to}: {n}")?;
        }
        Ok(())
    }
}
