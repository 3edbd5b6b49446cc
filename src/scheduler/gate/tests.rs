//! The gate's tests: turns, waiters that go away, probes beside long transactions.
use super::*;
use crate::delivery::Report;
use crate::scheduler::window::{Sample, WindowSettings};

fn gate(width: usize) -> Arc<Gate> {
    Gate::new(
        "s",
        Window::with_settings(WindowSettings::feedback(width, width)),
        None,
    )
}

#[tokio::test(start_paused = true)]
async fn waiting_clients_take_turns_and_come_before_the_scheduler() {
    let gate = gate(1);
    let held = gate.try_acquire().expect("an empty window admits");
    let (tx, mut order) = tokio::sync::mpsc::unbounded_channel();
    for client in ["a", "a", "a", "b", "c"] {
        let gate = Arc::clone(&gate);
        let tx = tx.clone();
        tokio::spawn(async move {
            let permit = gate.acquire(Duration::from_secs(60), client).await;
            let _ = tx.send(client);
            tokio::time::sleep(Duration::from_millis(1)).await;
            drop(permit);
        });
        // Let it queue before the next one comes.
        tokio::task::yield_now().await;
    }
    drop(tx);
    assert!(
        gate.try_acquire().is_none(),
        "the scheduler waits behind them"
    );
    drop(held);
    let mut got = String::new();
    while let Some(c) = order.recv().await {
        got.push_str(c);
    }
    assert_eq!(got, "abcaa");
    assert!(
        gate.try_acquire().is_some(),
        "the slot is free once nobody waits"
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_goes_away_leaves_no_slot_taken() {
    let gate = gate(1);
    let held = gate.try_acquire().expect("an empty window admits");
    // One gives up at its deadline, one is dropped while waiting.
    let timed_out = gate.acquire(Duration::from_millis(10), "a");
    let mut dropped = Box::pin(gate.acquire(Duration::from_secs(60), "b"));
    assert!(futures_poll(&mut dropped).is_none());
    assert!(timed_out.await.is_none());
    // The slot is granted to "b" when freed, but "b" is gone: it must come back.
    held.finish(&Report::default());
    drop(dropped);
    assert_eq!(gate.status().1, 0, "nothing in flight");
    assert!(gate.try_acquire().is_some());
}

/// A baseline probe admits its minimum of new transactions however many that began
/// before it are still running: one held transaction (a mailbox whose store holds its
/// reply) must not stop the store for every probe. Real time: probes start on wall-clock
/// second boundaries.
#[tokio::test]
async fn a_probe_does_not_count_the_transactions_that_began_before_it() {
    let gate = Gate::new(
        "s",
        Window::with_settings(WindowSettings::latency(4, 4)),
        None,
    );
    let held = gate.try_acquire().expect("an empty window admits");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no probe began within 10 s"
        );
        let p = gate.try_acquire().expect("below the window");
        p.finish_with(
            Signal::Success,
            Some(Sample::reused(Duration::from_millis(5))),
        );
        if gate.lock().window.is_probing() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fresh = gate
        .try_acquire()
        .expect("the probe's one new transaction runs beside the held one");
    assert!(
        gate.try_acquire().is_none(),
        "the probe admits its minimum (1) of new transactions"
    );
    drop(fresh);
    drop(held);
}

/// Polls a future once.
fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match std::pin::Pin::new(f).poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}
