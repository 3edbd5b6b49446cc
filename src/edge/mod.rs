//! The edge: what the listeners ask about a recipient at RCPT beyond routing, per store —
//! is its store backlogged ([`crate::scheduler::load`]), and does its store know it (recipient
//! verification, `verify`, answers kept in [`cache`]).
//!
//! Owns: the verification cache (one for every store, `verify_cache:`), and per store the
//! handles it needs: the store's [`StoreLoad`] (written by the scheduler shard that owns the
//! store), and for a store with `verify_recipients: true` its connection pool and its
//! [`Gate`] (the window every path to the store shares), taken from the [`Agents`].
//!
//! Promises, at RCPT, for a recipient routed to store S:
//! - S over its backpressure limits: `451 4.3.2` naming the condition; other stores'
//!   recipients are not affected.
//! - S verifies: a cached answer if fresh; else one query to S for all the concurrent
//!   lookups of that address (single flight). S's 5yz becomes `550 5.1.1` with S's text;
//!   a 4yz, a timeout, no window slot or S down (its breaker open: not asked at all)
//!   becomes `450 4.1.1`, or an accept with
//!   `verify_tempfail_action: accept`; never a 5xx for that. Known and unknown answers are
//!   cached (`positive`, `negative`); temporary failures are not.
//!
//! Alias expansions are checked for backpressure (each target's store), not verified: the
//! targets are the operator's map, and a 550 for the alias because one target is unknown
//! would refuse the others' mail.
//!
//! SEE ALSO: Postfix `reject_unverified_recipient` and `address_verify_*` (the same idea
//! with a DATA-less probe), `unverified_recipient_tempfail_action`.

pub mod cache;
pub mod config;
mod verify;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use postern_proto::{ForwardPath, Reply, replies};

pub use crate::scheduler::load::{Condition, Sample, StoreLoad};
pub use cache::{Lookup, Verdict, VerifyCache};
pub use config::{BackpressureConfig, EdgeSettings, TempfailAction, VerifyCacheConfig};
pub use verify::ask_directly;

use crate::delivery::StorePool;
use crate::metrics as m;
use crate::scheduler::Agents;
use crate::scheduler::gate::Gate;

/// A RCPT the edge refuses: the reply and the `reason` label of
/// `postern_recipients_rejected_total`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What the client is told.
    pub reply: Reply,
    /// The metric's reason.
    pub reason: &'static str,
}

struct Verifying {
    settings: config::VerifySettings,
    pool: StorePool,
    gate: Arc<Gate>,
}

struct StoreEdge {
    load: Option<Arc<StoreLoad>>,
    verify: Option<Verifying>,
}

/// The edge checks of every store. Shared (`Arc`) by the listeners.
pub struct Edge {
    stores: HashMap<String, StoreEdge>,
    cache: VerifyCache,
    positive: Duration,
    negative: Duration,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("stores", &self.stores.len())
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Edge {
    /// The checks of the stores in `agents`, with one cache set up by `cache`.
    pub fn new(agents: &Agents, cache: &VerifyCacheConfig) -> Self {
        let mut stores = HashMap::new();
        for (name, agent) in agents.iter() {
            let verify = match (agent, agents.gate(name)) {
                (crate::scheduler::Agent::Lmtp(pool), Some(gate)) => {
                    pool.store().edge().verify.map(|settings| Verifying {
                        settings,
                        pool: pool.clone(),
                        gate: Arc::clone(gate),
                    })
                }
                _ => None,
            };
            let load = agents.load(name).cloned();
            stores.insert(name.to_owned(), StoreEdge { load, verify });
        }
        Self {
            stores,
            cache: VerifyCache::new(cache.max_entries),
            positive: cache.positive.0,
            negative: cache.negative.0,
        }
    }

    /// The cache (for tools and tests).
    pub fn cache(&self) -> &VerifyCache {
        &self.cache
    }

    /// `451 4.3.2` when `store` is in backpressure.
    pub fn backpressure(&self, store: &str) -> Option<Refusal> {
        let reply = self.stores.get(store)?.load.as_ref()?.refusal()?;
        Some(Refusal {
            reply,
            reason: m::reason::BACKPRESSURE,
        })
    }

    /// `store` verifies its recipients at RCPT.
    pub fn verifies(&self, store: &str) -> bool {
        self.stores.get(store).is_some_and(|s| s.verify.is_some())
    }

    /// Verifies `rcpt` with `store` (a no-op for a store that does not verify): `None` to
    /// accept, or the refusal.
    pub async fn verify(&self, store: &str, rcpt: &ForwardPath) -> Option<Refusal> {
        let s = self.stores.get(store)?;
        let v = s.verify.as_ref()?;
        // A store whose breaker is open is not asked: its answer would be a connect
        // failure after a wait, and every RCPT would pay it.
        let verdict = match &s.load {
            Some(load) if load.is_down() => Verdict::Unavailable("the store is down".into()),
            _ => self.verdict(store, v, rcpt).await,
        };
        match verdict {
            Verdict::Valid => None,
            Verdict::Invalid(reply) => Some(Refusal {
                reply: replies::recipient_unverified(&reply.text()),
                reason: m::reason::UNVERIFIED,
            }),
            Verdict::Unavailable(why) => {
                let action = match v.settings.tempfail {
                    TempfailAction::Accept => "accept",
                    TempfailAction::Tempfail => "tempfail",
                };
                tracing::info!(store = %store, recipient = %rcpt, reason = %why, action, "recipient could not be verified");
                match v.settings.tempfail {
                    TempfailAction::Accept => None,
                    TempfailAction::Tempfail => Some(Refusal {
                        reply: replies::recipient_unverified_tempfail(),
                        reason: m::reason::UNVERIFIED_TEMPFAIL,
                    }),
                }
            }
        }
    }

    async fn verdict(&self, store: &str, v: &Verifying, rcpt: &ForwardPath) -> Verdict {
        let key = cache_key(store, rcpt);
        let lookup = |outcome: &'static str| {
            counter!(m::VERIFY_CACHE, "store" => store.to_owned(), "outcome" => outcome)
                .increment(1);
        };
        let mut rx = match self.cache.lookup(&key, std::time::Instant::now()) {
            Lookup::Hit(verdict) => {
                lookup("hit");
                return verdict;
            }
            Lookup::Wait(rx) => {
                lookup("joined");
                rx
            }
            Lookup::Lead(flight, rx) => {
                lookup("miss");
                // The query runs in its own task: a client that goes away does not cancel
                // it for the others waiting on the same address.
                let (pool, gate, limit) = (v.pool.clone(), Arc::clone(&v.gate), v.settings.timeout);
                let (store, rcpt) = (store.to_owned(), rcpt.clone());
                let (positive, negative) = (self.positive, self.negative);
                tokio::spawn(async move {
                    let verdict = verify::ask(&store, &pool, &gate, &rcpt, limit).await;
                    let ttl = match verdict {
                        Verdict::Valid => Some(positive),
                        Verdict::Invalid(_) => Some(negative),
                        Verdict::Unavailable(_) => None,
                    };
                    flight.finish(verdict, ttl);
                });
                rx
            }
        };
        // The query is bounded by the same limit; a little slack for the hand-over.
        let wait = v.settings.timeout + Duration::from_millis(250);
        let answer = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        match answer {
            Ok(Ok(v)) => v
                .clone()
                .unwrap_or_else(|| Verdict::Unavailable("no answer".into())),
            Ok(Err(_)) => Verdict::Unavailable("the verification was abandoned".into()),
            Err(_) => Verdict::Unavailable("no answer in time".into()),
        }
    }
}

/// The cache key: the store and the address, its domain folded to lower case (the local
/// part is kept as given: the store decides what case means).
fn cache_key(store: &str, rcpt: &ForwardPath) -> String {
    let address = match rcpt.mailbox() {
        Some(mb) => mb.to_string(),
        None => "postmaster".to_owned(),
    };
    let mut key = String::with_capacity(store.len() + 1 + address.len());
    key.push_str(store);
    key.push('\0');
    match address.rsplit_once('@') {
        Some((local, domain)) => {
            key.push_str(local);
            key.push('@');
            key.extend(domain.chars().map(|c| c.to_ascii_lowercase()));
        }
        None => key.push_str(&address),
    }
    key
}
