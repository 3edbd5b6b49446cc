//! A store that keeps new sessions waiting in its listen backlog (one process per session:
//! Cyrus `maxchild`, Dovecot `process_limit`) is shared by that line. Once a greeting showed
//! the line, one connect holds this gateway's place in it, and the store's gate runs as many
//! transactions as the store serves us sessions, and two more (one in the line, one ready
//! for the next session given back), whatever the window, and each session is handed back
//! at half the store's `reuse_limit`. Where the window steers, a baseline probe gives back
//! the sessions it does not use.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod delivery_common;
mod fake_lmtp;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use delivery_common::{by_index, envelope, rcpt};
use fake_lmtp::harness::until;
use fake_lmtp::{FakeStore, Script};
use postern::config::Span;
use postern::delivery::{Outcome, RemoteStore, Report, StorePool};
use postern::scheduler::gate::{Gate, Signal};
use postern::scheduler::window::{Sample, Window, WindowSettings};

const BODY: &[u8] = b"Subject: test\r\nFrom: a@example.org\r\n\r\nHello.\r\n";
const LIMIT: Duration = Duration::from_secs(5);

/// A store of one process, and a pool to it whose sessions retire after 200 ms.
async fn one_process_store() -> (FakeStore, StorePool) {
    let fake = FakeStore::start(Script {
        max_served: Some(1),
        ..Script::default()
    })
    .await;
    let mut c = delivery_common::store_config("fake", fake.addr.port());
    c.max_connections = 10;
    c.idle_timeout = Span(Duration::from_secs(60));
    c.reuse_limit = Span(Duration::from_millis(200));
    let store = Arc::new(RemoteStore::from_config(&c, "gw.test").unwrap());
    (fake, StorePool::new(store))
}

async fn deliver(pool: &StorePool, local: &str) -> Report {
    let to = [rcpt(0, &format!("{local}@example.org"))];
    let report = tokio::time::timeout(
        LIMIT,
        pool.deliver(&envelope(BODY), &to, BODY, &mut |_, _: &Outcome| {}),
    )
    .await
    .expect("delivered in time");
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"], "{local}");
    report
}

/// Makes the pool see the line: a new connection waits 300 ms for its greeting while the
/// one process serves a held transaction. Leaves one session, idle, in the pool.
async fn show_the_line(fake: &FakeStore, pool: &StorePool) {
    deliver(pool, "warm").await;
    assert!(
        !pool.store().queues_sessions(),
        "a quick greeting is no line"
    );
    fake.update(|s| {
        s.hold_locals.insert("held".into());
    });
    let held = tokio::spawn({
        let pool = pool.clone();
        async move { deliver(&pool, "held").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let next = tokio::spawn({
        let pool = pool.clone();
        async move { deliver(&pool, "next").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.update(|s| {
        s.hold_locals.clear();
    });
    held.await.unwrap();
    next.await.unwrap();
    // The held transaction's session retired (past 200 ms): the process greeted the
    // connection that had waited in the line.
    assert!(
        pool.store().queues_sessions(),
        "the greeting waited in the line"
    );
    assert_eq!(pool.status().size, 1);
}

/// A gate with a latency window of one on a store whose line the pool has seen (one
/// session served, idle in the pool): its limit is the line, three.
async fn gate_at_the_line() -> (FakeStore, StorePool, Arc<Gate>) {
    let (fake, pool) = one_process_store().await;
    show_the_line(&fake, &pool).await;
    let window = Window::with_settings(WindowSettings::latency(1, 20));
    let gate = Gate::new("fake", window, Some(pool.clone()));
    (fake, pool, gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connect_holds_our_place_in_the_line() {
    let (fake, pool) = one_process_store().await;
    show_the_line(&fake, &pool).await;
    let before = fake.sessions().len();
    // The one process serves a held transaction; three more wait for a session.
    fake.update(|s| {
        s.hold_locals.insert("held".into());
    });
    let mut tasks = tokio::task::JoinSet::new();
    for local in ["held", "w1", "w2", "w3"] {
        let pool = pool.clone();
        tasks.spawn(async move { deliver(&pool, local).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        fake.sessions().len(),
        before + 1,
        "one new connection waits in the store's line, not one per waiting transaction"
    );
    fake.update(|s| {
        s.hold_locals.clear();
    });
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_runs_as_many_transactions_as_the_store_serves_us_sessions_and_two() {
    let window = |initial| Window::with_settings(WindowSettings::latency(initial, 20));
    // A store that greets at once: the window alone is the limit.
    let (_quick, pool) = one_process_store().await;
    let gate = Gate::new("quick", window(10), Some(pool));
    let permits: Vec<_> = (0..10).filter_map(|_| gate.try_acquire()).collect();
    assert_eq!(permits.len(), 10);
    assert!(gate.try_acquire().is_none(), "the window is full");

    // A store whose line the pool has seen, serving us one session: three, even with a
    // window of one.
    let (_fake, pool, gate) = gate_at_the_line().await;
    assert_eq!(gate.status().0, 3, "the window as the gauge shows it");
    assert_eq!(
        pool.status().max_size,
        10,
        "the pool follows the line (max_connections), not a window of one"
    );
    let first = gate.try_acquire().expect("the session the store serves us");
    let _second = gate.try_acquire().expect("our place in the line");
    let _third = gate
        .try_acquire()
        .expect("ready for the session given back");
    assert!(
        gate.try_acquire().is_none(),
        "more would only wait for a session here"
    );
    drop(first);
    assert!(gate.try_acquire().is_some(), "a slot freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_store_greets_lets_the_scheduler_in_before_any_transaction_ends() {
    let (_fake, pool, gate) = gate_at_the_line().await;
    // The idle session retires (past its 200 ms): the store serves us none, the line is two.
    tokio::time::sleep(Duration::from_millis(250)).await;
    pool.sweep().await;
    assert_eq!(pool.status().size, 0, "the retired session is closed");
    let woken = Arc::new(AtomicUsize::new(0));
    let w = Arc::clone(&woken);
    gate.set_waker(move || {
        w.fetch_add(1, Ordering::SeqCst);
    });
    let _first = gate.try_acquire().expect("our place in the line");
    let _second = gate
        .try_acquire()
        .expect("ready for the session given back");
    assert!(gate.try_acquire().is_none(), "the line of two is full");
    // The store greets a new session of ours (no transaction of the gate ends): the line
    // grows by it, and the scheduler that found it full is told at once.
    deliver(&pool, "greeted").await;
    assert_eq!(woken.load(Ordering::SeqCst), 1, "the scheduler is woken");
    assert!(gate.try_acquire().is_some(), "a third transaction runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concentrator_keeps_the_stores_line_and_its_edges_take_turns_in_it() {
    let (_fake, _pool, gate) = gate_at_the_line().await;
    assert_eq!(gate.status().0, 3, "the line: one session served, and two");
    let mut relayed = Vec::new();
    for edge in ["edge1", "edge2", "edge1"] {
        let permit = gate.relay(Duration::from_millis(50), edge).await;
        relayed.push(permit.expect("the line has room for three"));
    }
    assert_eq!(
        gate.status(),
        (3, 3),
        "relaying: still the line, not the window"
    );
    assert!(
        gate.relay(Duration::from_millis(50), "edge2")
            .await
            .is_none(),
        "a fourth relayed transaction waits its turn: the line of three is full"
    );
    assert!(
        gate.try_acquire().is_none(),
        "the concentrator's own mail too keeps to the line"
    );
}

/// The log lines of this test binary (the gate logs on whichever thread sees the change).
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    /// Every thread's log lines from now on (once per process).
    fn capture(&self) {
        let log = self.clone();
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_writer(move || log.clone())
                .with_ansi(false)
                .finish(),
        )
        .expect("the only subscriber of this test binary");
    }

    fn lines(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// A line says `what` of the store `name`.
    fn says(&self, name: &str, what: &str) -> bool {
        let field = format!("store={name}");
        self.lines()
            .lines()
            .any(|l| l.contains(what) && l.split_whitespace().any(|w| w == field))
    }
}

/// While the store keeps our new sessions waiting, a session is a turn at one of its
/// processes, and it ends at half the store's `reuse_limit` (not at a concentrator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_keeps_sessions_waiting_gets_them_back_at_half_the_reuse_limit() {
    let (fake, pool) = one_process_store().await;
    assert_eq!(pool.reuse_limit(), Duration::from_millis(200));
    show_the_line(&fake, &pool).await;
    assert_eq!(pool.reuse_limit(), Duration::from_millis(100));
    // The session the line greeted, kept busy for 150 ms: past 100 ms it is handed back
    // at the end of a transaction, and the next one opens a new session.
    let before = fake.sessions().len();
    let busy = tokio::time::Instant::now();
    let mut n = 0;
    while busy.elapsed() < Duration::from_millis(150) {
        deliver(&pool, &format!("busy{n}")).await;
        n += 1;
    }
    assert!(
        pool.store().queues_sessions(),
        "one session greeted at once does not clear the line"
    );
    let sessions = fake.sessions();
    assert!(
        sessions.len() > before,
        "a session is handed back within 150 ms ({n} transactions on {} sessions)",
        sessions.len()
    );
    until("the session handed back says QUIT", || {
        fake.sessions()[before - 1].count("QUIT") == 1
    })
    .await;
    // A concentrator, the store's only client, has nobody to take turns with.
    pool.relaying();
    assert!(pool.store().queues_sessions());
    assert_eq!(pool.reuse_limit(), Duration::from_millis(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_greeted_at_once_again_end_the_line() {
    let log = Log::default();
    log.capture();
    // A store name of its own: the other tests' gates log too.
    let (fake, pool) = one_process_store().await;
    show_the_line(&fake, &pool).await;
    let window = Window::with_settings(WindowSettings::latency(1, 20));
    let gate = Gate::new("at-once", window, Some(pool.clone()));
    assert_eq!(gate.status().0, 3, "the line: one session served, and two");
    assert!(
        log.says("at-once", "store keeps new sessions waiting"),
        "the operator is told: {}",
        log.lines()
    );
    // The store has a free process again: each new session of ours is greeted at once.
    // A few in a row and the window (one) steers again, so that a store that greets every
    // connect cannot draw the line out to max_connections.
    let mut fresh = 0;
    while pool.store().queues_sessions() && fresh < 12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        pool.sweep().await;
        assert_eq!(pool.status().size, 0, "the retired session is closed");
        deliver(&pool, &format!("fresh{fresh}")).await;
        fresh += 1;
    }
    assert!(
        !pool.store().queues_sessions(),
        "{fresh} sessions greeted at once did not clear the line"
    );
    assert!(
        fresh >= 3,
        "one session greeted at once is not enough: {fresh}"
    );
    assert_eq!(gate.status().0, 1, "the window again, not the line");
    assert!(
        log.says("at-once", "store greets new sessions at once again"),
        "the operator is told: {}",
        log.lines()
    );
}

/// During a baseline probe the window runs its minimum of transactions. The sessions beyond
/// it go back to the store, and open again once the probe is over: at a store that runs one
/// process per session they would hold processes for the whole probe, idle, while another
/// gateway's session waited for one in the store's line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_baseline_probe_gives_back_the_sessions_it_does_not_use() {
    let fake = FakeStore::start(Script {
        max_served: Some(4),
        ..Script::default()
    })
    .await;
    let config = |name: &str| {
        let mut c = delivery_common::store_config(name, fake.addr.port());
        c.max_connections = 10;
        c.idle_timeout = Span(Duration::from_secs(60));
        c.reuse_limit = Span(Duration::from_secs(60));
        StorePool::new(Arc::new(RemoteStore::from_config(&c, "gw.test").unwrap()))
    };
    let (pool, other) = (config("probed"), config("other"));
    let window = Window::with_settings(WindowSettings::latency(4, 4));
    let gate = Gate::new("probed", window, Some(pool.clone()));

    // Four transactions at once: four sessions, one per store process, idle afterwards.
    let locals = ["s0", "s1", "s2", "s3"];
    fake.update(|s| s.hold_locals.extend(locals.iter().map(|l| l.to_string())));
    let mut tasks = tokio::task::JoinSet::new();
    for local in locals {
        let permit = gate.try_acquire().expect("a window of four");
        let pool = pool.clone();
        tasks.spawn(async move {
            let report = deliver(&pool, local).await;
            permit.finish(&report);
        });
    }
    until("four sessions open", || fake.sessions().len() == 4).await;
    fake.update(|s| s.hold_locals.clear());
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!((pool.status().size, pool.status().max_size), (4, 4));

    // One quick transaction at a time, through the gate, until `done` holds.
    let quick_until = |what: &'static str, done: fn(&StorePool) -> bool| {
        let (gate, pool) = (Arc::clone(&gate), pool.clone());
        until(what, move || {
            if done(&pool) {
                return true;
            }
            let permit = gate
                .try_acquire()
                .expect("the window (or the probe) admits one");
            permit.finish_with(
                Signal::Success,
                Some(Sample::reused(Duration::from_millis(5))),
            );
            false
        })
    };
    // Until a probe begins (on a wall-clock second boundary).
    quick_until("a probe shrinks the pool", |p| p.status().max_size < 4).await;
    assert_eq!(
        pool.status().size,
        1,
        "the probe keeps the one session its minimum uses"
    );
    // Another gateway's session gets one of the processes given back, during the probe.
    tokio::time::timeout(Duration::from_secs(1), deliver(&other, "other"))
        .await
        .expect("a store process came free for the other gateway");

    // The probe ends on its samples: the pool may hold the window's four sessions again.
    quick_until("the probe ends", |p| p.status().max_size == 4).await;
}
