//! Fairness, measured: how much a store that is slow (10 s per reply) or down delays the
//! delivery to the other stores. Issue 5 asks for at most 10%.
//!
//! Each round queues 1,000 messages, each with one recipient in fast stores `a` and `b` and
//! one in store `c`, and times until every `a` and `b` recipient is delivered. The baseline
//! has `c` fast too (the stricter reference, no mail for `c` at all, is printed as well);
//! the rounds alternate, three of each, and the medians are compared. Wall-clock timing, so it is a measurement to run on a quiet
//! machine, not part of the default suite:
//!
//! ```sh
//! cargo test --release --test scheduler_fairness -- --ignored --nocapture
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod fake_lmtp;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fake_lmtp::harness::{Harness, config, until};
use fake_lmtp::{FakeStore, Script};

const MESSAGES: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum C {
    /// No recipients in `c` at all: the strictest reference.
    Absent,
    Fast,
    Slow,
    Down,
}

async fn round(c: C) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let mut stores = HashMap::new();
    for n in ["a", "b", "c"] {
        stores.insert(n.to_owned(), FakeStore::start(Script::default()).await);
    }
    match c {
        C::Fast | C::Absent => {}
        C::Slow => stores["c"].update(|s| s.reply_delay = Some(Duration::from_secs(10))),
        C::Down => stores["c"].update(|s| s.max_sessions = Some(0)),
    }
    let mut cfg = config();
    cfg.minimal_backoff = postern::config::Span(Duration::from_secs(60));
    cfg.maximal_backoff = postern::config::Span(Duration::from_secs(60));
    let h = Harness::with(dir, stores, cfg).await;
    let start = Instant::now();
    for i in 0..MESSAGES {
        h.queue(
            "s@a.test",
            &[
                &format!("u{i}@a.test"),
                &format!("u{i}@b.test"),
                &format!("u{i}@c.test"),
            ],
        );
    }
    until("a and b delivered", || {
        h.store("a").delivered().len() == MESSAGES && h.store("b").delivered().len() == MESSAGES
    })
    .await;
    let took = start.elapsed();
    // The slow store's transactions are still waiting: drop them.
    h.scheduler.shutdown(Duration::from_millis(100)).await;
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "wall-clock measurement; run with --ignored on a quiet machine"]
async fn a_slow_or_down_store_delays_the_others_by_at_most_ten_percent() {
    let mut times: HashMap<&str, Vec<Duration>> = HashMap::new();
    round(C::Fast).await; // warm-up
    for _ in 0..3 {
        for (name, c) in [
            ("absent", C::Absent),
            ("baseline", C::Fast),
            ("slow", C::Slow),
            ("down", C::Down),
        ] {
            times.entry(name).or_default().push(round(c).await);
        }
    }
    let base = median(times["baseline"].clone());
    let absent = median(times["absent"].clone());
    for name in ["slow", "down"] {
        let t = median(times[name].clone());
        let ratio = t.as_secs_f64() / base.as_secs_f64();
        let strict = t.as_secs_f64() / absent.as_secs_f64();
        println!(
            "store c {name}: a+b delivered in {:.3} s; c healthy {:.3} s (x{ratio:.3}); no mail for c {:.3} s (x{strict:.3}); runs {:?}",
            t.as_secs_f64(),
            base.as_secs_f64(),
            absent.as_secs_f64(),
            times[name]
        );
        assert!(
            ratio <= 1.10,
            "store c {name} delays the others by {:.1}%",
            (ratio - 1.0) * 100.0
        );
    }
}
