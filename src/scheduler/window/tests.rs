//! The window's own tests (the capacity model is in `window_sim`).

use super::*;
use postern_proto::reply::{EnhancedCode, ReplyCode};

#[test]
fn slow_start_then_grows_after_runs_of_success() {
    let mut w = Window::new(5, 20);
    assert_eq!(w.limit(), 5);
    for _ in 0..4 {
        w.on_success(None, SystemTime::now(), SystemTime::now());
    }
    assert_eq!(
        w.limit(),
        5,
        "a run shorter than the window changes nothing"
    );
    w.on_success(None, SystemTime::now(), SystemTime::now());
    assert_eq!(w.limit(), 6);
    for _ in 0..6 {
        w.on_success(None, SystemTime::now(), SystemTime::now());
    }
    assert_eq!(w.limit(), 7);
    for _ in 0..1000 {
        w.on_success(None, SystemTime::now(), SystemTime::now());
    }
    assert_eq!(w.limit(), 20, "capped at max_connections");
}

#[test]
fn failures_lower_it_and_break_the_run() {
    let mut w = Window::new(5, 20);
    for _ in 0..4 {
        w.on_success(None, SystemTime::now(), SystemTime::now());
    }
    w.on_failure();
    assert_eq!(w.limit(), 4);
    for _ in 0..3 {
        w.on_success(None, SystemTime::now(), SystemTime::now());
    }
    assert_eq!(w.limit(), 4, "the run restarted at the failure");
    w.on_success(None, SystemTime::now(), SystemTime::now());
    assert_eq!(w.limit(), 5);
    for _ in 0..10 {
        w.on_failure();
    }
    assert_eq!(w.limit(), 1, "never below one");
    w.on_success(None, SystemTime::now(), SystemTime::now());
    assert_eq!(w.limit(), 2);
    w.restart();
    assert_eq!(w.limit(), 5);
}

/// A latency window from 1 to 20 starting at `initial`.
fn latency_window(initial: usize) -> Window {
    Window::with_settings(WindowSettings::latency(initial, 20))
}

/// `n` ms after a fixed instant (the injected clock).
fn ms(n: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(n)
}

/// A round of five 20 ms transactions from `from` ms on: the window learns its first
/// baseline (the next second's first sample begins its first probe).
fn learn_a_round(w: &mut Window, from: u64) {
    for i in 0..5 {
        w.on_success(
            Some(Sample::reused(Duration::from_millis(20))),
            ms(from + i),
            ms(from + 20 + i),
        );
    }
}

#[test]
fn a_probe_without_samples_ends_at_its_time_limit() {
    let mut w = latency_window(5);
    learn_a_round(&mut w, 0);
    w.on_success(
        Some(Sample::reused(Duration::from_millis(20))),
        ms(1000),
        ms(1020),
    );
    assert!(w.is_probing());
    assert_eq!(w.limit(), 1, "a probe runs at the minimum");
    assert_eq!(w.ceiling(), 5, "and keeps the window for after");
    // No sample comes (the one slot is held by a long transaction).
    assert!(!w.end_overdue_probe(ms(1020) + PROBE_LIMIT / 2));
    // Its drain (two round trips) and PROBE_LIMIT after it began.
    assert!(w.end_overdue_probe(ms(1020) + PROBE_LIMIT + Duration::from_millis(40)));
    assert!(!w.is_probing());
    assert_eq!(w.limit(), 5);
}

#[test]
fn a_probe_measures_the_store_not_the_wait_for_a_connection() {
    let mut w = latency_window(10);
    let sample = |latency: u64, wait: u64, new_connection: bool| {
        Some(Sample {
            latency: Duration::from_millis(latency),
            new_connection,
            connection_wait: Duration::from_millis(wait),
        })
    };
    // The first second: rounds of 20 ms.
    for i in 0..10 {
        w.on_success(sample(20, 0, false), ms(i), ms(100 + i));
    }
    // The next second's first sample starts the first probe (it drains for 40 ms).
    w.on_success(sample(20, 0, false), ms(1000), ms(1020));
    assert!(w.is_probing());
    // Its transactions waited half a second for connections given back (behind this
    // gateway's own earlier transactions), and a few for a new connection's greeting.
    for i in 0..16 {
        w.on_success(sample(521, 500, false), ms(1100 + i), ms(1700 + i));
        if i % 4 == 0 {
            w.on_success(sample(900, 880, true), ms(1100 + i), ms(1700 + i));
        }
    }
    assert!(!w.is_probing(), "16 samples on reused connections end it");
    let baseline = w.baseline().expect("the probe measured it").as_secs_f64();
    assert!((baseline - 0.021).abs() < 1e-6, "{baseline}");
}

#[test]
fn initial_is_capped_by_max() {
    assert_eq!(Window::new(5, 2).limit(), 2);
    assert_eq!(Window::new(0, 0).limit(), 1);
}

#[test]
fn busy_replies() {
    let r = |c: u16, e: Option<(u8, u16, u16)>| {
        Reply::new(
            ReplyCode::new(c).unwrap(),
            e.map(|(a, b, c)| EnhancedCode::new(a, b, c)),
            "x",
        )
    };
    assert!(is_busy(&r(421, None)));
    assert!(is_busy(&r(451, Some((4, 3, 2)))));
    assert!(is_busy(&r(450, Some((4, 7, 0)))));
    assert!(!is_busy(&r(451, Some((4, 2, 0)))));
    assert!(!is_busy(&r(550, Some((5, 7, 0)))));
    assert!(!is_busy(&r(250, Some((2, 0, 0)))));
}

#[test]
fn a_window_that_stops_steering_by_latency_keeps_its_width_and_takes_feedback() {
    let mut w = latency_window(4);
    let fast = || Some(Sample::reused(Duration::from_millis(20)));
    for i in 0..8 {
        w.on_success(fast(), ms(i), ms(100 + i));
    }
    let width = w.limit();
    w.steer_by_feedback();
    assert!(!w.steers_by_latency());
    // Latency ten times the baseline no longer narrows it; a full run of successes widens it.
    let slow = || Some(Sample::reused(Duration::from_millis(200)));
    for i in 0..width as u64 {
        w.on_success(slow(), ms(300 + i), ms(600 + i));
    }
    assert_eq!(
        w.limit(),
        width + 1,
        "feedback: one more after a run of successes"
    );
    // No probe: a probe boundary passes without dropping it to its minimum.
    w.on_success(slow(), ms(10_000), ms(10_200));
    assert!(!w.is_probing());
    // A busy reply still cuts it.
    w.on_failure();
    assert!(w.limit() < width + 1, "{}", w.limit());
}

#[test]
fn gateways_that_began_their_second_probe_together_take_the_next_one_together() {
    // Two gateways started in second 17 (the clock's ten-second boundaries are at 10 and
    // 20 s here): both probe in seconds 18 and 19, and the second probe of one ends before
    // the boundary at 20 s, the other's after it (its samples came slower).
    let twenty = || Some(Sample::reused(Duration::from_millis(20)));
    let mut gateways = [(latency_window(5), 19_800), (latency_window(5), 20_300)];
    for (w, second_ends) in &mut gateways {
        learn_a_round(w, 17_000);
        for (begin, end) in [(18_000, 18_500), (19_000, *second_ends)] {
            // The second's first sample begins the probe; it drains for 40 ms.
            w.on_success(twenty(), ms(begin - 20), ms(begin));
            assert!(w.is_probing(), "a probe began at {begin} ms");
            // Steady samples: it ends with its fewest, the last of them at `end`.
            for i in 0..PROBE_SAMPLES as u64 {
                if !w.is_probing() {
                    break;
                }
                let done = if i + 1 >= MIN_PROBE_SAMPLES as u64 {
                    end
                } else {
                    begin + 100 + 20 * i
                };
                w.on_success(twenty(), ms(done - 20), ms(done));
            }
            assert!(!w.is_probing(), "the probe that began at {begin} ms ended");
        }
    }
    // The first sample after the boundary at 20 s, at 20.4 s, in both.
    for (w, _) in &mut gateways {
        w.on_success(twenty(), ms(20_380), ms(20_400));
    }
    assert!(
        gateways.iter().all(|(w, _)| w.is_probing()),
        "both probe at the boundary after the second they began their second probe in: {:?}",
        gateways
            .iter()
            .map(|(w, _)| w.is_probing())
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_probe_whose_first_samples_waited_behind_a_queue_steers_as_a_clean_one() {
    // Two gateways see the same store; the probe of one had its first four samples wait
    // 100 ms behind a queue that had not drained. Both then read the same queue.
    let mut clean = latency_window(5);
    let mut disturbed = latency_window(5);
    for (w, outliers) in [(&mut clean, 0), (&mut disturbed, 4)] {
        learn_a_round(w, 17_000);
        // The next second's first sample begins the probe; it drains for 40 ms.
        w.on_success(
            Some(Sample::reused(Duration::from_millis(20))),
            ms(17_980),
            ms(18_000),
        );
        assert!(w.is_probing());
        for i in 0..PROBE_SAMPLES as u64 {
            if !w.is_probing() {
                break;
            }
            let latency = if i < outliers {
                120.0
            } else if i % 2 == 0 {
                19.5
            } else {
                20.5
            };
            let done = 18_200 + 10 * i;
            w.on_success(
                Some(Sample::reused(Duration::from_secs_f64(latency / 1e3))),
                ms(done - latency as u64),
                ms(done),
            );
        }
        assert!(!w.is_probing());
        let baseline = w.baseline().expect("measured").as_secs_f64();
        assert!(
            (baseline - 0.020).abs() < 1e-6,
            "{outliers} outliers: baseline {baseline}"
        );
        // Then the store queues: 30 ms, of which 10 are waiting, at a full window.
        let mut t = 18_400;
        while t < 18_990 {
            w.on_full();
            w.on_success(
                Some(Sample::reused(Duration::from_millis(30))),
                ms(t - 30),
                ms(t),
            );
            t += 8;
        }
    }
    assert!(
        clean.ceiling() < 5,
        "a third of the latency is queueing: the window shrinks"
    );
    assert_eq!(disturbed.ceiling(), clean.ceiling());
}

#[test]
fn before_its_first_probe_a_window_grows_by_one_a_round_and_doubles_after_it() {
    // Gateways started together at a store already busy with each other: the lowest round
    // before any probe is no baseline (it holds their queue), and doubling on it took three
    // gateways' windows to 10–20 each at a store of 5 workers (`bench/reverse/run.py
    // --scenario a`).
    let mut w = latency_window(5);
    let twenty = || Some(Sample::reused(Duration::from_millis(20)));
    w.on_full();
    learn_a_round(&mut w, 0);
    assert_eq!(
        w.ceiling(),
        6,
        "no queue seen, window full: one more, not twice"
    );
    w.on_full();
    for i in 0..6 {
        w.on_success(twenty(), ms(100 + i), ms(120 + i));
    }
    assert_eq!(w.ceiling(), 7);
    // The next second's first sample begins the first probe; it measures the same 20 ms.
    w.on_success(twenty(), ms(1000), ms(1020));
    assert!(w.is_probing());
    for i in 0..MIN_PROBE_SAMPLES as u64 {
        w.on_success(twenty(), ms(1100 + 30 * i), ms(1120 + 30 * i));
    }
    assert!(
        !w.is_probing(),
        "a steady store is measured in the fewest samples"
    );
    // Measured: no queue at 20 ms, so the slow start doubles, as it always did.
    w.on_full();
    for i in 0..7 {
        w.on_success(twenty(), ms(1500 + i), ms(1520 + i));
    }
    assert_eq!(w.ceiling(), 14);
}
