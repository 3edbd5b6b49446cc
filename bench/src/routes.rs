//! `postern-bench routes`: the scale figures of the routing map — load time, resident
//! memory and lookup latency for a big map (by default 1,000,000 users in a users file,
//! 1,000 stores, 100 clusters, 100 domains).
//!
//! It prints figures and judges nothing; the machine is shared, so the lookup latency is
//! the median of many batches, and the load is repeated `--rounds` times (median quoted).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use postern_proto::ForwardPath;

use postern::config::Config;
use postern::reload::build;

/// Arguments of `postern-bench routes`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// User entries in the users file.
    #[arg(long, default_value_t = 1_000_000)]
    pub users: usize,
    /// Stores.
    #[arg(long, default_value_t = 1_000)]
    pub stores: usize,
    /// Clusters (each over stores/clusters consecutive stores).
    #[arg(long, default_value_t = 100)]
    pub clusters: usize,
    /// Lookups to time.
    #[arg(long, default_value_t = 1_000_000)]
    pub lookups: usize,
    /// Load the map this many times (median load time quoted).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Also time this many users written inline as YAML `routes.users` (0: skip).
    #[arg(long, default_value_t = 0)]
    pub yaml_users: usize,
}

/// Why the benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Writing the map files failed.
    #[error("cannot write the map: {0}")]
    Io(#[from] std::io::Error),
    /// The map did not load.
    #[error("map did not load: {0}")]
    Map(String),
    /// Nonsense arguments.
    #[error("{0}")]
    Args(&'static str),
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn user(i: usize, domains: usize) -> String {
    format!(
        "user{i}.{:x}@d{}.example",
        i.wrapping_mul(2_654_435_761) % 65_521,
        i % domains
    )
}

/// The configuration text: stores, clusters, one domain per cluster (authoritative).
fn config_text(args: &BenchArgs, users_file: &Path, spool: &Path) -> String {
    let mut s = format!(
        "spool:\n  path: {}\nlisteners:\n  - {{ name: smtp, address: \"127.0.0.1:0\", protocol: smtp }}\nstores:\n",
        spool.display()
    );
    for i in 0..args.stores {
        let _ = writeln!(s, "  - {{ name: s{i}, kind: discard }}");
    }
    s.push_str("routes:\n");
    let _ = writeln!(s, "  users_file: {}", users_file.display());
    s.push_str("  clusters:\n");
    let per = args.stores / args.clusters;
    for c in 0..args.clusters {
        let members: Vec<String> = (c * per..(c + 1) * per).map(|i| format!("s{i}")).collect();
        let _ = writeln!(s, "    c{c}: [{}]", members.join(", "));
    }
    s.push_str("  domains:\n");
    for d in 0..args.clusters {
        let _ = writeln!(
            s,
            "    d{d}.example: {{ cluster: c{d}, authoritative: true }}"
        );
    }
    s
}

/// A scratch directory removed at the end.
struct WorkDir(std::path::PathBuf);

impl WorkDir {
    fn create() -> std::io::Result<Self> {
        let p = std::env::temp_dir().join(format!("postern-bench-routes-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the benchmark and prints its figures.
pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    if args.clusters == 0 || args.stores < args.clusters || args.users == 0 || args.rounds == 0 {
        return Err(BenchError::Args(
            "need users, rounds and clusters ≥ 1 and stores ≥ clusters",
        ));
    }
    let dir = WorkDir::create()?;
    let users_file = dir.path().join("users.txt");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&users_file)?);
        for i in 0..args.users {
            // Half pinned to a store, half to their domain's cluster.
            let domain = i % args.clusters;
            if i % 2 == 0 {
                writeln!(w, "{} s{}", user(i, args.clusters), i % args.stores)?;
            } else {
                writeln!(w, "{} c{domain}", user(i, args.clusters))?;
            }
        }
        w.flush()?;
    }
    let text = config_text(args, &users_file, &dir.path().join("spool"));
    let file_mib = std::fs::metadata(&users_file)?.len() as f64 / (1 << 20) as f64;
    println!(
        "map: {} users ({file_mib:.1} MiB users file), {} stores, {} clusters, {} domains",
        args.users, args.stores, args.clusters, args.clusters
    );
    let base_rss = status_kib("VmRSS:");
    let mut loads = Vec::new();
    let mut router = None;
    for _ in 0..args.rounds {
        drop(router.take());
        let t = Instant::now();
        let config =
            Config::parse(&text, "bench.yaml").map_err(|e| BenchError::Map(format!("{e:?}")))?;
        let r = build(&config).map_err(|e| BenchError::Map(format!("{e:?}")))?;
        loads.push(t.elapsed().as_secs_f64());
        router = Some(r);
    }
    let Some(router) = router else {
        return Err(BenchError::Args("no round ran"));
    };
    let rss = status_kib("VmRSS:");
    let hwm = status_kib("VmHWM:");
    println!(
        "load (parse + validate + users file + build), median of {}: {:.3} s (all: {})",
        args.rounds,
        median(&mut loads.clone()),
        loads
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "RSS: {} before, {} with the map loaded (map ≈ {}), peak (VmHWM) {}",
        mib(base_rss),
        mib(rss),
        mib(rss.saturating_sub(base_rss)),
        mib(hwm)
    );
    // A reload builds the new map while the old one still serves.
    let t = Instant::now();
    let config =
        Config::parse(&text, "bench.yaml").map_err(|e| BenchError::Map(format!("{e:?}")))?;
    let second = build(&config).map_err(|e| BenchError::Map(format!("{e:?}")))?;
    println!(
        "reload (a second map built while the first serves): {:.3} s, RSS {} with both, peak (VmHWM) {}",
        t.elapsed().as_secs_f64(),
        mib(status_kib("VmRSS:")),
        mib(status_kib("VmHWM:"))
    );
    drop(second);
    // Lookups: addresses chosen at random (fixed seed), parsed beforehand; a tenth unknown.
    let mut rng = fastrand::Rng::with_seed(42);
    let sample: Vec<ForwardPath> = (0..args.lookups.min(1 << 20))
        .filter_map(|_| {
            let i = rng.usize(..args.users);
            let text = if rng.u8(..10) == 0 {
                format!("<nobody{i}@d{}.example>", i % args.clusters)
            } else {
                format!("<{}>", user(i, args.clusters).to_uppercase())
            };
            ForwardPath::parse(&text).ok()
        })
        .collect();
    let batch = 1_000usize;
    let mut per_lookup = Vec::new();
    let mut found = 0usize;
    let mut done = 0usize;
    while done < args.lookups {
        let t = Instant::now();
        for k in 0..batch {
            let p = &sample[(done + k) % sample.len()];
            if router.resolve(p, false).store().is_some() {
                found += 1;
            }
        }
        per_lookup.push(t.elapsed().as_nanos() as f64 / batch as f64);
        done += batch;
    }
    let p99 = {
        let mut v = per_lookup.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() * 99 / 100).copied().unwrap_or(f64::NAN)
    };
    println!(
        "lookup of pre-parsed addresses in batches (address and map both cold): median {:.0} ns, p99 of batches {:.0} ns ({} lookups in batches of {batch}, {:.1}% routed)",
        median(&mut per_lookup),
        p99,
        done,
        100.0 * found as f64 / done as f64
    );
    drop(sample);
    // As at RCPT: the address was just parsed (hot in cache), the map was not touched
    // (cold). Each lookup timed alone; the clock's own cost is measured and shown.
    let mut single = Vec::with_capacity(args.lookups.min(1 << 20));
    let mut clock = Vec::with_capacity(single.capacity());
    for _ in 0..single.capacity() {
        let i = rng.usize(..args.users);
        let Ok(p) = ForwardPath::parse(&format!("<{}>", user(i, args.clusters))) else {
            continue;
        };
        let t = Instant::now();
        let d = router.resolve(&p, false);
        single.push(t.elapsed().as_nanos() as f64);
        let t = Instant::now();
        clock.push(t.elapsed().as_nanos() as f64);
        std::hint::black_box(d);
    }
    let p99 = {
        let mut v = single.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() * 99 / 100).copied().unwrap_or(f64::NAN)
    };
    println!(
        "lookup of a just-parsed address, each timed alone: median {:.0} ns, p99 {:.0} ns ({} lookups; the clock itself: median {:.0} ns)",
        median(&mut single),
        p99,
        single.len(),
        median(&mut clock)
    );
    if args.yaml_users > 0 {
        drop(router);
        yaml_users(args, dir.path())?;
    }
    Ok(())
}

/// The same map with `n` users inline in the YAML instead of a users file.
fn yaml_users(args: &BenchArgs, dir: &Path) -> Result<(), BenchError> {
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "")?;
    let mut text = config_text(args, &empty, &dir.join("spool"));
    text.push_str("  users:\n");
    for i in 0..args.yaml_users {
        let _ = writeln!(text, "    {}: s{}", user(i, args.clusters), i % args.stores);
    }
    let before = status_kib("VmRSS:");
    let t = Instant::now();
    let config =
        Config::parse(&text, "bench.yaml").map_err(|e| BenchError::Map(format!("{e:?}")))?;
    let r = build(&config).map_err(|e| BenchError::Map(format!("{e:?}")))?;
    println!(
        "inline YAML users: {} users loaded in {:.3} s, RSS {} → {}",
        r.user_count(),
        t.elapsed().as_secs_f64(),
        mib(before),
        mib(status_kib("VmRSS:"))
    );
    Ok(())
}
