//! The crash test: a store-and-ledger load run by the real binary, killed at random
//! moments (or aborted at a `POSTERN_FAULT` point), restarted, and checked.
//!
//! `postern-bench spool-torture --dir D` runs `--writers` threads storing `--messages` messages
//! (2 recipients each) and walking each through a planned prefix ([`planned_steps`]) of this
//! ledger script:
//!
//! | step | operation | states after |
//! |---|---|---|
//! | 1 | mark both in doubt | in-doubt, in-doubt |
//! | 2 | rcpt 0 delivered | delivered, in-doubt |
//! | 3 | rcpt 1 deferred | delivered, deferred |
//! | 4 | rcpt 1 in doubt again | delivered, in-doubt |
//! | 5 | rcpt 1 bounced | delivered, bounced |
//! | 6 | finish | (gone) |
//!
//! It prints, line-buffered, `ACK <qid> <len> <crc> <planned steps>` once a store is
//! durable and `OP <qid> <step>` once a step is durable. [`crash_cycles`] reads those lines,
//! kills the child, opens the spool like a restarting daemon and checks: every acknowledged
//! message is there with its envelope and an intact body (unless its planned `finish` may
//! have been written), its recipients are in the state of a step at or after the last
//! acknowledged one (so an acknowledged delivery never comes back undelivered, and a
//! recipient whose reply was not yet acknowledged can only come back *in doubt* — the only
//! source of duplicate deliveries), the state stays the same over later restarts, and every
//! live message, acknowledged or not, has a complete body (no partial survives).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use postern::spool::{
    Envelope, EnvelopeRecipient, QueueId, RecipientState, Spool, SpoolError, SpoolOptions,
};

/// Arguments of `postern-bench spool-torture`.
#[derive(Clone, Debug, clap::Args)]
pub struct TortureArgs {
    /// Spool directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Concurrent writer threads.
    #[arg(long, default_value_t = 20)]
    pub writers: usize,
    /// Messages to store in total.
    #[arg(long, default_value_t = 2000)]
    pub messages: usize,
    /// Typical body size (every tenth message is 16 times larger, several chunks).
    #[arg(long, default_value_t = 4096)]
    pub size: usize,
    /// Segment size (small, so that rotation, GC and compaction happen under load).
    #[arg(long, default_value_t = 256 << 10)]
    pub segment_size: u64,
    /// Seed of the body contents.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Spool options shared by the torture load and its checker.
pub fn torture_options(segment_size: u64) -> SpoolOptions {
    SpoolOptions {
        segment_size,
        min_free_bytes: 0,
        chunk_size: 16 << 10,
        compact_below: 0.5,
        gc_interval: Duration::from_millis(20),
        ..SpoolOptions::default()
    }
}

fn deferred_until() -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_secs(2_000_000_000)
}

/// The recipients' states after `k` steps; `None` once finished.
pub fn expected_after(k: usize) -> Option<[RecipientState; 2]> {
    let delivered = || RecipientState::Delivered {
        reply: "250 2.0.0 ok".into(),
    };
    Some(match k {
        0 => [RecipientState::Pending, RecipientState::Pending],
        1 => [RecipientState::InDoubt, RecipientState::InDoubt],
        2 => [delivered(), RecipientState::InDoubt],
        3 => [
            delivered(),
            RecipientState::Deferred {
                until: deferred_until(),
                reply: "451 4.4.1 later".into(),
            },
        ],
        4 => [delivered(), RecipientState::InDoubt],
        5 => [
            delivered(),
            RecipientState::Bounced {
                reply: "550 5.1.1 no such user".into(),
            },
        ],
        _ => return None,
    })
}

fn torture_envelope() -> Envelope {
    Envelope {
        sender: "torture@example.org".into(),
        params: postern_proto::MailParams::default(),
        recipients: ["a@example.net", "b@example.net"]
            .iter()
            .map(|a| EnvelopeRecipient {
                address: (*a).into(),
                params: postern_proto::RcptParams::default(),
            })
            .collect(),
        received_at: UNIX_EPOCH + Duration::from_secs(1_764_000_000),
        client: "torture [127.0.0.1]".into(),
    }
}

/// How many script steps message `i` goes through: two thirds finish (so segments die and
/// the collector and compaction have work), the rest stop at every earlier step.
pub fn planned_steps(i: usize) -> usize {
    if i % 3 == 0 { (i / 3) % 6 } else { 6 }
}

/// Deterministic body bytes.
pub fn body_bytes(seed: u64, i: usize, size: usize) -> Vec<u8> {
    let len = if i % 10 == 9 {
        size * 16
    } else {
        size + (i % 7) * 100
    };
    let mut x = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn step(s: &Spool, q: QueueId, k: usize) -> Result<(), SpoolError> {
    let r = match k {
        1 => s.mark_in_doubt(q, &[0, 1]),
        2 => s.ledger(
            q,
            0,
            RecipientState::Delivered {
                reply: "250 2.0.0 ok".into(),
            },
        ),
        3 => s.ledger(
            q,
            1,
            RecipientState::Deferred {
                until: deferred_until(),
                reply: "451 4.4.1 later".into(),
            },
        ),
        4 => s.mark_in_doubt(q, &[1]),
        5 => s.ledger(
            q,
            1,
            RecipientState::Bounced {
                reply: "550 5.1.1 no such user".into(),
            },
        ),
        _ => s.finish(q),
    };
    r.wait()
}

/// Runs the load; prints ACK/OP lines to stdout as operations become durable.
pub fn run(args: &TortureArgs) -> Result<(), SpoolError> {
    let (spool, report) = Spool::open(&args.dir, torture_options(args.segment_size))?;
    let out = Mutex::new(std::io::stdout());
    let say = |line: String| {
        let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(o, "{line}");
        let _ = o.flush();
    };
    say(format!("RECOVERED {} {}", report.messages, report.in_doubt));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|sc| {
        for _ in 0..args.writers.max(1) {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= args.messages || failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let body = body_bytes(args.seed, i, args.size);
                    let planned = planned_steps(i);
                    let r = (|| -> Result<(), SpoolError> {
                        let mut w = spool.begin(torture_envelope())?;
                        for piece in body.chunks(5000) {
                            w.write(piece)?;
                        }
                        let q = w.queue_id();
                        w.commit().wait()?;
                        say(format!(
                            "ACK {q} {} {} {planned}",
                            body.len(),
                            crc32fast::hash(&body)
                        ));
                        for k in 1..=planned {
                            step(&spool, q, k)?;
                            say(format!("OP {q} {k}"));
                        }
                        Ok(())
                    })();
                    if let Err(e) = r {
                        eprintln!("spool-torture: {e}");
                        failed.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    if failed.load(Ordering::Relaxed) {
        return Err(SpoolError::Invalid("a store or ledger update failed"));
    }
    say("DONE".into());
    Ok(())
}

/// What the test knows about one acknowledged message.
#[derive(Clone, Debug)]
struct Known {
    len: u64,
    crc: u32,
    planned: usize,
    acked: usize,
    /// The step observed at the first recovery after it was acknowledged
    /// (`Some(None)`: gone).
    observed: Option<Option<usize>>,
}

/// Options of [`crash_cycles`].
#[derive(Clone, Debug)]
pub struct CrashOptions {
    /// The `postern` binary.
    pub exe: PathBuf,
    /// Spool directory (kept over all cycles).
    pub dir: PathBuf,
    /// Number of kill/restart cycles.
    pub cycles: usize,
    /// Every other cycle aborts at a fault point instead of being killed.
    pub faults: bool,
    /// Writers per run.
    pub writers: usize,
    /// Messages per run.
    pub messages: usize,
    /// Body size.
    pub size: usize,
    /// Seed for the kill moments.
    pub seed: u64,
}

/// Totals over all cycles.
#[derive(Clone, Debug, Default)]
pub struct CrashReport {
    /// Cycles run.
    pub cycles: usize,
    /// Cycles ended by SIGKILL.
    pub killed: usize,
    /// Cycles ended by a fault point's abort.
    pub aborted: usize,
    /// Runs that finished before they were killed.
    pub finished: usize,
    /// Acknowledged stores checked.
    pub acked: usize,
    /// Acknowledged ledger steps.
    pub acked_steps: usize,
    /// In-doubt recipients found by the checks, summed over all restarts (a recipient still
    /// in doubt is counted again at each later restart); the only possible duplicates.
    pub in_doubt: usize,
    /// Live messages that were stored but not acknowledged (complete; a duplicate at most).
    pub unacked_live: usize,
    /// Recovery time, summed.
    pub recovery: Duration,
    /// The fault points at which a run aborted.
    pub points_hit: Vec<String>,
}

/// The fault points the cycles go through.
pub const FAULT_POINTS: &[&str] = &[
    "store.after_append",
    "store.before_sync",
    "store.after_sync",
    "ledger.after_append",
    "ledger.before_sync",
    "ledger.after_sync",
    "segment.after_create",
    "gc.after_copy",
    "gc.before_unlink",
];

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

/// Runs `cycles` kill/restart/check cycles on one spool directory.
pub fn crash_cycles(o: &CrashOptions) -> Result<CrashReport, String> {
    let mut rng = Rng(o.seed.wrapping_add(0x5EED));
    let mut known: HashMap<QueueId, Known> = HashMap::new();
    let mut rep = CrashReport::default();
    for c in 0..o.cycles {
        let mut cmd = Command::new(&o.exe);
        cmd.arg("spool-torture")
            .arg("--dir")
            .arg(&o.dir)
            .args(["--writers", &o.writers.to_string()])
            .args(["--messages", &o.messages.to_string()])
            .args(["--size", &o.size.to_string()])
            .args(["--seed", &(o.seed + c as u64).to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("POSTERN_FAULT");
        let fault = (o.faults && c % 2 == 1).then(|| FAULT_POINTS[(c / 2) % FAULT_POINTS.len()]);
        let kill_after = 5 + rng.below(400) as usize;
        if let Some(p) = fault {
            // Rotation and GC points are reached less often than store and ledger points.
            let spread = if p.starts_with("store") || p.starts_with("ledger") {
                30
            } else {
                3
            };
            cmd.env("POSTERN_FAULT", p)
                .env("POSTERN_FAULT_AFTER", (1 + rng.below(spread)).to_string());
        }
        let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut stderr = child.stderr.take().ok_or("no stderr")?;
        let child = Arc::new(Mutex::new(child));
        // Watchdog: no cycle runs longer than 60 s.
        let done = Arc::new(AtomicBool::new(false));
        let dog = {
            let (child, done) = (Arc::clone(&child), Arc::clone(&done));
            std::thread::spawn(move || {
                let start = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    if start.elapsed() > Duration::from_secs(60) {
                        let _ = child.lock().map(|mut c| c.kill());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let mut lines = Vec::new();
        let mut killed = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            lines.push(line);
            if fault.is_none() && lines.len() >= kill_after && !killed {
                let _ = child.lock().map(|mut c| c.kill());
                killed = true;
            }
        }
        done.store(true, Ordering::Relaxed);
        let _ = dog.join();
        let status = child
            .lock()
            .map_err(|_| "child lock")?
            .wait()
            .map_err(|e| format!("wait: {e}"))?;
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        let finished = lines.last().is_some_and(|l| l == "DONE");
        if finished {
            rep.finished += 1;
        } else if killed {
            rep.killed += 1;
        } else if let Some(p) = fault {
            rep.aborted += 1;
            if !rep.points_hit.iter().any(|h| h == p) {
                rep.points_hit.push(p.to_owned());
            }
        } else {
            return Err(format!("cycle {c}: child failed ({status}): {err}"));
        }
        if !finished && !killed && status.success() {
            return Err(format!(
                "cycle {c}: child stopped early without a fault: {err}"
            ));
        }
        for l in &lines {
            let w: Vec<&str> = l.split(' ').collect();
            match w.as_slice() {
                ["ACK", q, len, crc, planned] => {
                    let q: QueueId = q.parse().map_err(|e| format!("{e}"))?;
                    known.insert(
                        q,
                        Known {
                            len: len.parse().map_err(|_| "len")?,
                            crc: crc.parse().map_err(|_| "crc")?,
                            planned: planned.parse().map_err(|_| "planned")?,
                            acked: 0,
                            observed: None,
                        },
                    );
                    rep.acked += 1;
                }
                ["OP", q, k] => {
                    let q: QueueId = q.parse().map_err(|e| format!("{e}"))?;
                    let k: usize = k.parse().map_err(|_| "step")?;
                    let e = known.get_mut(&q).ok_or("OP before ACK")?;
                    if k != e.acked + 1 {
                        return Err(format!("{q}: step {k} after {}", e.acked));
                    }
                    e.acked = k;
                    rep.acked_steps += 1;
                }
                ["RECOVERED", ..] | ["DONE"] => {}
                _ => return Err(format!("cycle {c}: unexpected line {l:?}")),
            }
        }
        check(o, &mut known, &mut rep).map_err(|e| {
            format!(
                "cycle {c} ({}): {e}",
                fault.map_or_else(
                    || format!("killed after {kill_after} lines"),
                    |p| format!("fault {p}")
                )
            )
        })?;
        rep.cycles += 1;
    }
    Ok(rep)
}

fn check(
    o: &CrashOptions,
    known: &mut HashMap<QueueId, Known>,
    rep: &mut CrashReport,
) -> Result<(), String> {
    let opts = SpoolOptions {
        gc_interval: Duration::from_secs(3600),
        ..torture_options(256 << 10)
    };
    let (spool, report) = Spool::open(&o.dir, opts).map_err(|e| format!("reopen: {e}"))?;
    rep.recovery += report.elapsed;
    rep.in_doubt += report.in_doubt;
    let live: HashMap<QueueId, _> = spool.snapshot().into_iter().map(|m| (m.qid, m)).collect();
    for (q, m) in &live {
        // Every live message has a complete body: the reader checks length and CRC.
        let mut body = Vec::new();
        spool
            .open_body(*q)
            .and_then(|mut r| r.read_to_end(&mut body).map_err(SpoolError::from))
            .map_err(|e| format!("{q}: body unreadable: {e}"))?;
        if m.sender != "torture@example.org" || m.recipients.len() != 2 {
            return Err(format!("{q}: wrong envelope {m:?}"));
        }
        let Some(k) = known.get(q) else {
            rep.unacked_live += 1;
            continue;
        };
        if body.len() as u64 != k.len || crc32fast::hash(&body) != k.crc {
            return Err(format!("{q}: body differs from the acknowledged one"));
        }
    }
    for (q, k) in known.iter_mut() {
        let now = match live.get(q) {
            None if k.planned == 6 => None,
            None => return Err(format!("{q}: acknowledged (step {}) but lost", k.acked)),
            Some(m) => {
                let states: Vec<RecipientState> =
                    m.recipients.iter().map(|r| r.state.clone()).collect();
                let step = (k.acked..=k.planned.min(5))
                    .find(|&s| expected_after(s).is_some_and(|e| e[..] == states[..]))
                    .ok_or_else(|| {
                        format!(
                            "{q}: states {states:?} not reachable from acknowledged step {} (planned {})",
                            k.acked, k.planned
                        )
                    })?;
                Some(step)
            }
        };
        match k.observed {
            None => k.observed = Some(now),
            Some(prev) if prev != now => {
                return Err(format!(
                    "{q}: was at {prev:?}, now at {now:?} after a restart"
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}
