//! The spool benchmark: `postern-bench spool`.
//!
//! Prints, in one run on the same disk:
//!
//! 1. the raw disk figures to compare with: 4 KiB `pwrite`+`fdatasync` per second from one
//!    thread (appending to one file), and create+write 4 KiB+`fsync`+rename+unlink per second
//!    from `--writers` threads (what a file-per-message queue pays);
//! 2. durable stores per second with `--writers` concurrent writers of `--size` bytes,
//!    p50/p99/max store latency (from `begin` to the durable promise resolving),
//!    `fdatasync`s per second and the mean number of messages per `fdatasync`;
//! 3. for each `--queued` count: recovery time and the RSS the rebuilt index takes
//!    (measured in a child process: RSS after `Spool::open` minus RSS before);
//! 4. `--crash-cycles` kill -9 / fault-point cycles with the checks of [`crate::torture`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use postern::spool::{Durable, Envelope, EnvelopeRecipient, Spool, SpoolError, SpoolOptions};

use crate::torture::{CrashOptions, crash_cycles};

/// Arguments of `postern-bench spool`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Work directory (on the disk to measure); default /var/tmp/postern-bench-PID.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Concurrent writers.
    #[arg(long, default_value_t = 20)]
    pub writers: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 4096)]
    pub size: usize,
    /// Durable stores to time.
    #[arg(long, default_value_t = 50_000)]
    pub messages: usize,
    /// Queue sizes for the recovery measurement (comma-separated; empty to skip).
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    pub queued: Vec<usize>,
    /// Kill/restart cycles (0 to skip).
    #[arg(long, default_value_t = 100)]
    pub crash_cycles: usize,
    /// Seconds for each raw disk measurement.
    #[arg(long, default_value_t = 3)]
    pub raw_seconds: u64,
    /// Internal: recover the spool in this directory and print the figures.
    #[arg(long, hide = true)]
    pub recover_only: Option<PathBuf>,
}

fn envelope(rcpts: usize) -> Envelope {
    Envelope {
        sender: "bench@example.org".into(),
        params: postern_proto::MailParams::default(),
        recipients: (0..rcpts)
            .map(|i| EnvelopeRecipient {
                address: format!("user{i}@example.net"),
                params: postern_proto::RcptParams::default(),
            })
            .collect(),
        received_at: UNIX_EPOCH + Duration::from_secs(1_764_000_000),
        client: "bench [127.0.0.1]".into(),
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Runs the benchmark and prints the figures.
pub fn run(a: &BenchArgs) -> Result<(), SpoolError> {
    if let Some(dir) = &a.recover_only {
        return recover_only(dir);
    }
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/tmp/postern-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    println!(
        "postern-bench spool: dir={} writers={} size={} messages={}",
        dir.display(),
        a.writers,
        a.size,
        a.messages
    );
    let secs = Duration::from_secs(a.raw_seconds.max(1));
    let single = raw_fdatasync(&dir.join("raw-append"), a.size, secs)?;
    let multi = raw_file_per_message(&dir.join("raw-files"), a.size, a.writers, secs)?;
    println!(
        "raw disk: pwrite {}B+fdatasync, 1 thread, appending: {single:.0}/s; create+write+fsync+rename+unlink, {} threads: {multi:.0}/s",
        a.size, a.writers
    );
    stores(&dir.join("store"), a)?;
    for &q in &a.queued {
        recovery(&dir.join(format!("queued-{q}")), q, a.size)?;
    }
    if a.crash_cycles > 0 {
        let exe = std::env::current_exe()?;
        let cdir = dir.join("crash");
        let _ = std::fs::remove_dir_all(&cdir);
        let start = Instant::now();
        let r = crash_cycles(&CrashOptions {
            exe,
            dir: cdir.clone(),
            cycles: a.crash_cycles,
            faults: true,
            writers: a.writers,
            messages: 3000,
            size: a.size,
            seed: 1,
        });
        match r {
            Ok(r) => println!(
                "crash cycles: {} in {:.1} s ({} killed -9, {} aborted at fault points, {} ran to the end); checked {} acknowledged stores and {} acknowledged ledger steps: none lost, none regressed; {} in-doubt recipients seen over all restarts (the only possible duplicates); {} complete unacknowledged messages kept; total recovery {:.2} s; fault points hit: {}",
                r.cycles,
                start.elapsed().as_secs_f64(),
                r.killed,
                r.aborted,
                r.finished,
                r.acked,
                r.acked_steps,
                r.in_doubt,
                r.unacked_live,
                r.recovery.as_secs_f64(),
                r.points_hit.join(" ")
            ),
            Err(e) => {
                println!("crash cycles: FAILED: {e}");
                return Err(SpoolError::Invalid("crash cycle check failed"));
            }
        }
        let _ = std::fs::remove_dir_all(&cdir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn raw_fdatasync(path: &Path, size: usize, secs: Duration) -> Result<f64, SpoolError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)?;
    let buf = vec![0x5a; size];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs {
        f.write_all_at(&buf, n * size as u64)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(path)?;
    Ok(rate)
}

fn raw_file_per_message(
    dir: &Path,
    size: usize,
    threads: usize,
    secs: Duration,
) -> Result<f64, SpoolError> {
    std::fs::create_dir_all(dir)?;
    let count = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let errors = AtomicU64::new(0);
    std::thread::scope(|sc| {
        for t in 0..threads.max(1) {
            let (count, stop, errors) = (&count, &stop, &errors);
            sc.spawn(move || {
                let buf = vec![0x5a; size];
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let tmp = dir.join(format!("t{t}-{i}.tmp"));
                    let fin = dir.join(format!("t{t}-{i}"));
                    let r = (|| -> std::io::Result<()> {
                        let mut f = File::create(&tmp)?;
                        f.write_all(&buf)?;
                        f.sync_all()?;
                        std::fs::rename(&tmp, &fin)?;
                        std::fs::remove_file(&fin)
                    })();
                    if r.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            });
        }
        std::thread::sleep(secs);
        stop.store(true, Ordering::Relaxed);
    });
    let rate = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir)?;
    Ok(rate)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e6
}

fn stores(dir: &Path, a: &BenchArgs) -> Result<(), SpoolError> {
    let _ = std::fs::remove_dir_all(dir);
    let opts = SpoolOptions {
        min_free_bytes: 0,
        ..SpoolOptions::default()
    };
    let (spool, _) = Spool::open(dir, opts)?;
    let per = a.messages / a.writers.max(1);
    let body = vec![b'x'; a.size];
    let start = Instant::now();
    let results: Vec<Result<Vec<u64>, SpoolError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..a.writers.max(1))
            .map(|_| {
                let (spool, body) = (&spool, &body);
                sc.spawn(move || -> Result<Vec<u64>, SpoolError> {
                    let mut lat = Vec::with_capacity(per);
                    for _ in 0..per {
                        let t = Instant::now();
                        let mut w = spool.begin(envelope(1))?;
                        w.write(body)?;
                        w.commit().wait()?;
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    Ok(lat)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(SpoolError::Invalid("writer panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    for r in results {
        lat.extend(r?);
    }
    lat.sort_unstable();
    let st = spool.stats();
    println!(
        "spool store: {} durable stores in {elapsed:.2} s = {:.0} stores/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} fdatasync/s, mean batch {:.1} messages/fdatasync, mean fdatasync {:.2} ms",
        lat.len(),
        lat.len() as f64 / elapsed,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        st.syncs as f64 / elapsed,
        st.stored as f64 / st.syncs.max(1) as f64,
        st.sync_time.as_secs_f64() * 1e3 / st.syncs.max(1) as f64
    );
    drop(spool);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

fn recovery(dir: &Path, queued: usize, size: usize) -> Result<(), SpoolError> {
    let _ = std::fs::remove_dir_all(dir);
    let fill = Instant::now();
    {
        let opts = SpoolOptions {
            min_free_bytes: 0,
            ..SpoolOptions::default()
        };
        let (spool, _) = Spool::open(dir, opts)?;
        let body = vec![b'q'; size];
        let writers = 4;
        std::thread::scope(|sc| -> Result<(), SpoolError> {
            let hs: Vec<_> = (0..writers)
                .map(|t| {
                    let (spool, body) = (&spool, &body);
                    sc.spawn(move || -> Result<(), SpoolError> {
                        let mut last = None;
                        for i in (t..queued).step_by(writers) {
                            let mut w = spool.begin(envelope(2))?;
                            w.write(body)?;
                            let d = w.commit();
                            if i % 1000 < writers {
                                d.wait()?;
                            } else {
                                last = Some(d);
                            }
                        }
                        last.map_or(Ok(()), Durable::wait)
                    })
                })
                .collect();
            for h in hs {
                h.join()
                    .unwrap_or(Err(SpoolError::Invalid("filler panicked")))?;
            }
            Ok(())
        })?;
    }
    let fill_s = fill.elapsed().as_secs_f64();
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("spool")
        .arg("--recover-only")
        .arg(dir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = text.split_whitespace();
    let parse = |v: Option<&str>| v.and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    let (_, secs, rss_kib, messages, est) = (
        f.next(),
        parse(f.next()),
        parse(f.next()),
        parse(f.next()),
        parse(f.next()),
    );
    let disk: u64 = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "recovery {queued} queued ({} MiB of log, filled in {fill_s:.1} s): {messages:.0} messages recovered in {secs:.2} s; index RSS {:.1} MiB = {:.0} B/message (index estimate {:.0} B/message)",
        disk >> 20,
        rss_kib / 1024.0,
        rss_kib * 1024.0 / messages.max(1.0),
        est / messages.max(1.0)
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

fn recover_only(dir: &Path) -> Result<(), SpoolError> {
    let before = rss_kib();
    let opts = SpoolOptions {
        min_free_bytes: 0,
        gc_interval: Duration::from_secs(3600),
        ..SpoolOptions::default()
    };
    let (spool, report) = Spool::open(dir, opts)?;
    let after = rss_kib();
    println!(
        "RECOVER {:.3} {} {} {}",
        report.elapsed.as_secs_f64(),
        after.saturating_sub(before),
        report.messages,
        report.index_bytes
    );
    drop(spool);
    Ok(())
}
