//! One store's queue as its shard sees it ([`StoreQueue`]): the jobs, their round-robin
//! ready queue, the busy mailboxes and the jobs parked on them (one waiter woken per
//! release, no lost wake-ups), and the batch selection ([`select`], [`mailbox_key`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use crate::scheduler::agent::Agent;
use crate::scheduler::breaker::Breaker;
use crate::scheduler::gate::Gate;
use crate::scheduler::metrics as m;
use crate::scheduler::{Ctx, JobRcpt, Message};
use crate::spool::QueueId;

use super::Event;

/// Where a job with recipients to start waits.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum JobState {
    /// Not queued: nothing pending (its recipients are in flight or settled).
    Idle,
    /// In the store's round-robin `ready` queue. `woken_for`: the mailbox whose release
    /// put it there; if the job does not take that mailbox, the wake-up passes to the
    /// mailbox's next waiter (no lost wake-ups, one waiter woken per release).
    Ready { woken_for: Option<String> },
    /// Every pending recipient's mailbox is busy: waits, off the ready queue, in this
    /// mailbox's waiter list until it is released.
    Parked(String),
}

/// A job in a store queue.
#[derive(Debug)]
pub(super) struct StoreJob {
    pub(super) msg: Arc<Message>,
    pub(super) pending: VecDeque<JobRcpt>,
    pub(super) in_flight: usize,
    pub(super) state: JobState,
}

/// One store, as its shard sees it.
#[derive(Debug)]
pub(super) struct StoreQueue {
    pub(super) agent: Agent,
    pub(super) relay: String,
    pub(super) per_txn: usize,
    /// The store's window, shared with the other paths to the store (proxy sessions).
    pub(super) gate: Arc<Gate>,
    pub(super) breaker: Breaker,
    pub(super) jobs: HashMap<u64, StoreJob>,
    /// Jobs with a recipient that can start now, round robin. Dispatch costs O(work
    /// started): a job whose mailboxes are all busy is parked in `waiters`, not rescanned.
    pub(super) ready: VecDeque<u64>,
    pub(super) in_flight: usize,
    /// Mailboxes in a transaction now (per-mailbox serialisation).
    pub(super) busy: HashSet<String>,
    /// Jobs parked on a busy mailbox, in arrival order (entries whose job has moved on
    /// are skipped when popped).
    pub(super) waiters: HashMap<String, VecDeque<u64>>,
    pub(super) parked: HashSet<QueueId>,
    pub(super) queued_rcpts: usize,
    pub(super) inflight_rcpts: usize,
    /// The queue shape (`postern_queue_shape_messages`).
    pub(super) shape: m::ShapeTracker,
    /// Jobs popped off `ready` by the dispatcher
    /// ([`StoreStatus::examined`](crate::scheduler::StoreStatus::examined)).
    pub(super) examined: u64,
    /// Since when the breaker has been open (seen at a load tick; backpressure).
    pub(super) down_since: Option<SystemTime>,
}

impl StoreQueue {
    pub(super) fn new(
        ctx: &Arc<Ctx>,
        shard: usize,
        name: &str,
        agent: Agent,
        gate: Arc<Gate>,
    ) -> Self {
        let live = ctx.live.load();
        // Another path's transaction freed a slot the dispatcher had wanted.
        let weak = Arc::downgrade(ctx);
        let store = name.to_owned();
        gate.set_waker(move || {
            if let Some(ctx) = weak.upgrade() {
                ctx.send(shard, Event::Dispatch(store.clone()));
            }
        });
        Self {
            relay: agent.relay(),
            per_txn: agent.recipients_per_transaction(),
            gate,
            breaker: Breaker::new(live.breaker_failures, live.probe_interval),
            agent,
            jobs: HashMap::new(),
            ready: VecDeque::new(),
            in_flight: 0,
            busy: HashSet::new(),
            waiters: HashMap::new(),
            parked: HashSet::new(),
            queued_rcpts: 0,
            inflight_rcpts: 0,
            shape: m::ShapeTracker::default(),
            examined: 0,
            down_since: None,
        }
    }

    /// Puts a job with pending recipients on the ready queue (unless it is there).
    pub(super) fn make_ready(&mut self, id: u64) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.pending.is_empty() || matches!(job.state, JobState::Ready { .. }) {
            return;
        }
        job.state = JobState::Ready { woken_for: None };
        self.ready.push_back(id);
    }

    /// `mailbox` was released: its first (still parked) waiter goes to the ready queue.
    pub(super) fn wake(&mut self, mailbox: &str) {
        let Some(q) = self.waiters.get_mut(mailbox) else {
            return;
        };
        while let Some(id) = q.pop_front() {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            if !matches!(&job.state, JobState::Parked(m) if m == mailbox) {
                continue; // moved on since it was parked here
            }
            job.state = JobState::Ready {
                woken_for: Some(mailbox.to_owned()),
            };
            self.ready.push_back(id);
            break;
        }
        if q.is_empty() {
            self.waiters.remove(mailbox);
        }
    }
}

/// Picks the next transaction's recipients from a job: up to `per_txn`, skipping mailboxes
/// that are busy; a recipient in doubt goes alone.
pub(super) fn select(
    pending: &mut VecDeque<JobRcpt>,
    busy: &mut HashSet<String>,
    per_txn: usize,
    serialize: bool,
) -> Vec<JobRcpt> {
    let mut batch: Vec<JobRcpt> = Vec::new();
    let mut i = 0;
    while i < pending.len() && batch.len() < per_txn {
        let r = &pending[i];
        if serialize && busy.contains(&r.mailbox) {
            i += 1;
            continue;
        }
        if r.in_doubt && !batch.is_empty() {
            i += 1;
            continue;
        }
        let alone = r.in_doubt;
        let Some(r) = pending.remove(i) else { break };
        if serialize {
            busy.insert(r.mailbox.clone());
        }
        batch.push(r);
        if alone {
            break;
        }
    }
    batch
}

/// The per-mailbox serialisation key: the address lower-cased, without a `+detail`
/// extension (`Bob+lists@Example.org` and `bob@example.org` are one mailbox at the store).
pub(super) fn mailbox_key(address: &str) -> String {
    let lower = address.to_lowercase();
    match lower.rsplit_once('@') {
        Some((local, domain)) => {
            let user = local.split('+').next().unwrap_or(local);
            format!("{user}@{domain}")
        }
        None => lower,
    }
}

#[cfg(test)]
mod tests {
    use postern_proto::ForwardPath;

    use super::*;

    fn r(i: usize, mailbox: &str, in_doubt: bool) -> JobRcpt {
        JobRcpt {
            index: i,
            path: ForwardPath::parse(&format!("<{mailbox}>")).unwrap(),
            params: Default::default(),
            mailbox: mailbox.into(),
            in_doubt,
            tries: 0,
            attempts: 0,
        }
    }

    #[test]
    fn mailbox_keys() {
        assert_eq!(mailbox_key("Bob+lists@Example.ORG"), "bob@example.org");
        assert_eq!(mailbox_key("bob@example.org"), "bob@example.org");
        assert_eq!(mailbox_key("Postmaster"), "postmaster");
        assert_eq!(mailbox_key("+x@d"), "@d");
    }

    #[test]
    fn select_batches_skips_busy_mailboxes_and_isolates_in_doubt() {
        let mut pending: VecDeque<JobRcpt> = [
            r(0, "a@x", false),
            r(1, "b@x", false),
            r(2, "c@x", true),
            r(3, "a@x", false),
            r(4, "d@x", false),
        ]
        .into();
        let mut busy = HashSet::new();
        busy.insert("b@x".to_owned());
        let batch = select(&mut pending, &mut busy, 10, true);
        let idx: Vec<usize> = batch.iter().map(|r| r.index).collect();
        assert_eq!(idx, [0, 4], "b busy, c in doubt, the second a serialised");
        let batch = select(&mut pending, &mut busy, 10, true);
        assert_eq!(
            batch.iter().map(|r| r.index).collect::<Vec<_>>(),
            [2],
            "in doubt alone"
        );
        assert!(
            select(&mut pending, &mut busy, 10, true).is_empty(),
            "all busy"
        );
        busy.clear();
        let batch = select(&mut pending, &mut busy, 1, true);
        assert_eq!(batch.len(), 1, "recipients_per_transaction");
        let mut pending: VecDeque<JobRcpt> = [r(0, "a@x", false), r(1, "a@x", false)].into();
        let mut busy = HashSet::new();
        assert_eq!(
            select(&mut pending, &mut busy, 10, false).len(),
            2,
            "no serialisation"
        );
    }
}
