//! A capacity model for the latency window, on an injected clock: gateways, each with its own
//! [`Window`], feed one store that runs `workers` deliveries at once and queues the rest
//! (FIFO), with a service time that may jitter. Discrete-event simulation, seeded, so every
//! run is the same and a minute of store time takes milliseconds.
//!
//! Each gateway may also have an `overhead` of its own: time every transaction of it spends
//! outside the store's queue (its own CPU, its side of the connection), which its probes
//! measure as part of its baseline. On a real box the gateways' baselines differ by a few
//! per cent this way (measured with `bench/reverse/run.py`: 28.0, 29.5 and 30.0 ms for a
//! 20 ms store), and the window must not turn such a difference into starvation.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, SystemTime};

use super::window::{Sample, Window, WindowSettings};

/// The store's side of one transaction: its network round trip.
const RTT: f64 = 0.000_5;

struct Gateway {
    window: Window,
    in_flight: usize,
    delivered: u64,
    /// Transactions in flight summed at each event, to average concurrency.
    limits: Vec<usize>,
}

/// What the model is asked to run.
struct Model {
    gateways: usize,
    workers: usize,
    service: f64,
    jitter: f64,
    seconds: f64,
    /// `(at, workers)`: the store's capacity changes.
    change: Option<(f64, usize)>,
    max: usize,
    /// Per gateway: seconds each of its transactions spends outside the store (after the
    /// store's reply, before the gateway sees it). Missing: none.
    overhead: Vec<f64>,
}

/// What it measured after `settle` seconds.
struct Figures {
    /// Deliveries per gateway after settling.
    delivered: Vec<u64>,
    /// Mean transactions at the store (queued or served) after settling.
    mean_at_store: f64,
    /// Mean transactions in flight, all gateways (what the store sees as open sessions).
    mean_in_flight: f64,
    /// Mean queueing delay after settling, seconds.
    mean_queue: f64,
    /// Each gateway's window at every completion after settling.
    limits: Vec<Vec<usize>>,
    /// Deliveries per second in one-second buckets (the whole run).
    per_second: Vec<u64>,
}

/// A time, ordered (never NaN here).
struct T(f64);
impl PartialEq for T {
    fn eq(&self, o: &Self) -> bool {
        self.0.total_cmp(&o.0).is_eq()
    }
}
impl Eq for T {}
impl PartialOrd for T {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for T {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

fn run(m: &Model, settle: f64, seed: u64) -> Figures {
    let mut rng = fastrand::Rng::with_seed(seed);
    // A round number of seconds, as the wall clock's probe boundaries are.
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let settings = WindowSettings {
        min: 1,
        initial: 5.min(m.max),
        max: m.max,
        latency: true,
        tolerance: 0.5,
    };
    let mut gws: Vec<Gateway> = (0..m.gateways)
        .map(|_| Gateway {
            window: Window::with_settings(settings),
            in_flight: 0,
            delivered: 0,
            limits: Vec::new(),
        })
        .collect();
    let mut workers = m.workers;
    let mut busy = 0usize;
    // (gateway, started, arrived at the store)
    let mut queue: VecDeque<(usize, f64, f64)> = VecDeque::new();
    // (done at, kind, gateway, started); kind 0: the store is done (its worker frees), 1: the
    // gateway sees the reply (after its overhead).
    let mut events: BinaryHeap<Reverse<(T, u8, usize, T)>> = BinaryHeap::new();
    let mut at_store_area = 0.0;
    let mut in_flight_area = 0.0;
    let mut queue_sum = 0.0;
    let mut queue_n = 0u64;
    let mut per_second = vec![0u64; m.seconds as usize + 1];
    let mut now = 0.0;
    let service = |rng: &mut fastrand::Rng| m.service * (1.0 + m.jitter * (2.0 * rng.f64() - 1.0));

    // Fill every gateway's window.
    let start = |g: usize,
                 now: f64,
                 gws: &mut Vec<Gateway>,
                 busy: &mut usize,
                 workers: usize,
                 queue: &mut VecDeque<(usize, f64, f64)>,
                 events: &mut BinaryHeap<Reverse<(T, u8, usize, T)>>,
                 rng: &mut fastrand::Rng| {
        loop {
            let in_flight = gws[g].in_flight;
            if !gws[g].window.admits(in_flight) {
                break;
            }
            gws[g].in_flight += 1;
            if gws[g].in_flight >= gws[g].window.limit() {
                gws[g].window.on_full();
            }
            if *busy < workers {
                *busy += 1;
                events.push(Reverse((T(now + RTT + service(rng)), 0, g, T(now))));
            } else {
                queue.push_back((g, now, now));
            }
        }
    };
    for g in 0..m.gateways {
        start(
            g,
            0.0,
            &mut gws,
            &mut busy,
            workers,
            &mut queue,
            &mut events,
            &mut rng,
        );
    }
    while let Some(Reverse((T(t), kind, g, T(started)))) = events.pop() {
        if t > m.seconds {
            break;
        }
        if now >= settle {
            at_store_area += (t - now) * (busy + queue.len()) as f64;
            in_flight_area += (t - now) * gws.iter().map(|g| g.in_flight).sum::<usize>() as f64;
        }
        now = t;
        if let Some((when, w)) = m.change
            && now >= when
            && workers != w
        {
            workers = w;
        }
        if kind == 0 {
            // The worker frees; the next in the queue is served.
            busy -= 1;
            while busy < workers {
                let Some((qg, qstarted, arrived)) = queue.pop_front() else {
                    break;
                };
                if now >= settle {
                    queue_sum += now - arrived;
                    queue_n += 1;
                }
                busy += 1;
                events.push(Reverse((T(now + service(&mut rng)), 0, qg, T(qstarted))));
            }
            let overhead = m.overhead.get(g).copied().unwrap_or(0.0);
            if overhead > 0.0 {
                events.push(Reverse((T(now + overhead), 1, g, T(started))));
                continue;
            }
        }
        let gw = &mut gws[g];
        gw.in_flight -= 1;
        per_second[now as usize] += 1;
        let sample = Duration::from_secs_f64(now - started);
        gw.window.on_success(
            Some(Sample::reused(sample)),
            base + Duration::from_secs_f64(started),
            base + Duration::from_secs_f64(now),
        );
        if std::env::var("SIM_TRACE3").is_ok() && per_second[now as usize] % 100 == 0 {
            eprintln!(
                "{now:.1} g{g} ceil {} base {:?}",
                gw.window.ceiling(),
                gw.window.baseline()
            );
        }
        if std::env::var("SIM_TRACE").is_ok() && g == 0 {
            eprintln!(
                "{now:.3} {} {} {:?}",
                gw.window.ceiling(),
                gw.window.limit(),
                gw.window.baseline()
            );
        }
        if now >= settle {
            gw.delivered += 1;
            gw.limits.push(gw.window.ceiling());
        }
        start(
            g,
            now,
            &mut gws,
            &mut busy,
            workers,
            &mut queue,
            &mut events,
            &mut rng,
        );
    }
    Figures {
        delivered: gws.iter().map(|g| g.delivered).collect(),
        mean_at_store: at_store_area / (now - settle).max(1e-9),
        mean_in_flight: in_flight_area / (now - settle).max(1e-9),
        mean_queue: queue_sum / queue_n.max(1) as f64,
        limits: gws.into_iter().map(|g| g.limits).collect(),
        per_second,
    }
}

fn median(v: &[usize]) -> usize {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}

#[test]
fn a_jittery_store_neither_collapses_nor_oscillates() {
    // 5 workers, 20 ms ±50 %, one gateway.
    let m = Model {
        gateways: 1,
        workers: 5,
        service: 0.020,
        jitter: 0.5,
        seconds: 120.0,
        change: None,
        max: 20,
        overhead: Vec::new(),
    };
    // Judged over many seeds, not per seed: a seed is one path of a random process, and
    // any change to the controller (even before the first probe) sends every seed down
    // another one. 80 seeds of the controller as of 455f6d5 had 0.6 % of their rounds beyond
    // ±2 in all, but single seeds from none to 9 %; a per-seed bound on five seeds was a
    // lottery on which five.
    const SEEDS: u64 = 20;
    let (mut rounds, mut beyond2, mut beyond4) = (0, 0, 0);
    for seed in 1..=SEEDS {
        let f = run(&m, 30.0, seed);
        let limits = &f.limits[0];
        let settled = median(limits);
        let off = |by: usize| {
            limits
                .iter()
                .filter(|&&l| l + by < settled || l > settled + by)
                .count()
        };
        let (lo, hi) = (
            limits.iter().min().copied().unwrap_or(0),
            limits.iter().max().copied().unwrap_or(0),
        );
        eprintln!(
            "seed {seed}: settled at {settled}, {lo}..={hi}, {} of {} beyond ±2, {} beyond ±4",
            off(2),
            limits.len(),
            off(4)
        );
        assert!(
            settled >= 5,
            "seed {seed}: settled at {settled}, below the store's 5 workers"
        );
        // No seed oscillates for long: a window that swings keeps doing it.
        assert!(
            off(2) * 100 <= 4 * limits.len(),
            "seed {seed}: {} of {} beyond ±2 of {settled}",
            off(2),
            limits.len()
        );
        rounds += limits.len();
        beyond2 += off(2);
        beyond4 += off(4);
    }
    // Within ±2 of the settled value 99 % of the time. The rare rounds beyond are the
    // probe's deliberate cut (a quarter, on a contended store) meeting a latency cut, or a
    // probe that measured the baseline a little high; beyond ±4 next to never.
    assert!(
        beyond2 * 100 <= rounds,
        "{beyond2} of {rounds} rounds beyond ±2"
    );
    assert!(
        beyond4 * 2000 <= rounds,
        "{beyond4} of {rounds} rounds beyond ±4"
    );
}

#[test]
fn a_jittery_store_with_room_to_spare_keeps_the_window_open() {
    // Far more workers than the window may use: latency never rises, only jitters.
    let m = Model {
        gateways: 1,
        workers: 1000,
        service: 0.020,
        jitter: 0.5,
        seconds: 60.0,
        change: None,
        max: 20,
        overhead: Vec::new(),
    };
    let f = run(&m, 10.0, 7);
    assert!(
        f.limits[0].iter().all(|&l| l == 20),
        "the window left its maximum: {:?}",
        f.limits[0].iter().min()
    );
}

/// Three gateways (window max 20) share a store of 5 workers at 20 ms each for 180 s;
/// `overhead` is each gateway's own part of a transaction.
fn three_gateways(overhead: Vec<f64>) -> Model {
    Model {
        gateways: 3,
        workers: 5,
        service: 0.020,
        jitter: 0.2,
        seconds: 180.0,
        change: None,
        max: 20,
        overhead,
    }
}

/// Every gateway delivered within 20 % of an equal share of the total.
fn assert_fair_shares(delivered: &[u64], seed: u64) {
    let fair = delivered.iter().sum::<u64>() as f64 / delivered.len() as f64;
    for (g, d) in delivered.iter().enumerate() {
        assert!(
            (*d as f64 - fair).abs() <= 0.2 * fair,
            "seed {seed}: gateway {g} delivered {d}, not within 20 % of {fair}"
        );
    }
}

#[test]
fn three_gateways_settle_near_capacity_with_fair_shares() {
    let m = three_gateways(Vec::new());
    let settle = 30.0;
    for seed in 1..=6 {
        let f = run(&m, settle, seed);
        let total: u64 = f.delivered.iter().sum();
        let capacity = 5.0 / 0.020 * (m.seconds - settle);
        assert!(
            total as f64 >= 0.9 * capacity,
            "seed {seed}: throughput {total} is under 90 % of {capacity}"
        );
        assert!(
            f.mean_at_store <= 10.0,
            "seed {seed}: {} transactions at the store on average, more than 2 × 5 workers",
            f.mean_at_store
        );
        assert!(
            f.mean_queue <= 2.0 * 0.020,
            "seed {seed}: queueing delay {} s over twice the service time",
            f.mean_queue
        );
        eprintln!(
            "seed {seed}: delivered {:?}, {:.1} at the store, queueing {:.1} ms",
            f.delivered,
            f.mean_at_store,
            f.mean_queue * 1e3
        );
        // Shares: each within 20 % of 1/N (the model lands within 16 % for these seeds).
        assert_fair_shares(&f.delivered, seed);
    }
}

#[test]
fn throughput_follows_when_the_store_doubles() {
    let m = Model {
        gateways: 3,
        workers: 5,
        service: 0.020,
        jitter: 0.2,
        seconds: 120.0,
        change: Some((60.0, 10)),
        max: 20,
        overhead: Vec::new(),
    };
    let f = run(&m, 0.0, 11);
    // Within 30 s of the change the rate is at 90 % of the new capacity (500/s).
    let after: u64 = f.per_second[85..90].iter().sum();
    assert!(
        after as f64 >= 0.9 * 500.0 * 5.0,
        "{after} deliveries in 5 s, 25 s after the store doubled"
    );
}

#[test]
fn gateways_whose_baselines_differ_a_little_still_share_fairly() {
    // As measured on the bench: each gateway's own side of a transaction takes 8 to 10 ms,
    // so their baselines differ by a few per cent (28, 29.5, 30 ms for a 20 ms store).
    // Judging the latency against each one's own baseline with one threshold starved the
    // gateways with the lower baselines: the one with the highest saw the least rise.
    let m = three_gateways(vec![0.008, 0.0095, 0.010]);
    let settle = 30.0;
    for seed in 1..=6 {
        let f = run(&m, settle, seed);
        let total: u64 = f.delivered.iter().sum();
        let capacity = 5.0 / 0.020 * (m.seconds - settle);
        eprintln!(
            "seed {seed}: delivered {:?} ({:.0} % of capacity), {:.1} in flight, {:.1} at the \
             store, queueing {:.1} ms",
            f.delivered,
            100.0 * total as f64 / capacity,
            f.mean_in_flight,
            f.mean_at_store,
            f.mean_queue * 1e3
        );
        assert!(
            total as f64 >= 0.9 * capacity,
            "seed {seed}: throughput {total} is under 90 % of {capacity}"
        );
        assert_fair_shares(&f.delivered, seed);
        assert!(
            f.mean_in_flight <= 10.0,
            "seed {seed}: {} transactions in flight on average, more than 2 × 5 workers",
            f.mean_in_flight
        );
    }
}
