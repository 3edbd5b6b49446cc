//! SIGTERM with the real binary under load: several SMTP clients send continuously, a
//! client is in the middle of DATA, deliveries run. The gateway stops accepting, lets the
//! transaction in DATA finish (its 250 arrives after the signal), stops delivering, and
//! exits 0; every message that got a 250 is delivered or still in the spool, and a restart
//! delivers the rest. A second SIGTERM exits at once (still 0), with nothing lost either.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod daemon;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon::{Daemon, Smtp, delivered_subjects, eventually};
use postern::spool::Spool;
use rustix::process::Signal;

const CLIENTS: usize = 4;

fn config(dir: &Path, drain: &str) -> std::path::PathBuf {
    let path = dir.join("postern.yaml");
    std::fs::write(
        &path,
        format!(
            "hostname: mx.test\nnode_id: 6\ndrain_timeout: {drain}\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: local\n    kind: maildir\n    root: {mail}\nroutes:\n  domains:\n    example.org: {{ store: local }}\ndelivery:\n  minimal_backoff: 1s\n  maximal_backoff: 2s\n",
            spool = dir.join("spool").display(),
            mail = dir.join("mail").display(),
        ),
    )
    .unwrap();
    path
}

type Acked = Arc<Mutex<HashMap<String, String>>>;

/// Sends until `stop`, reconnecting while the server accepts; records (id → subject).
fn load(addr: String, tag: String, acked: Acked, stop: Arc<AtomicBool>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(mut c) = Smtp::connect(&addr) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let subject = format!("{tag}-{n}");
            match c.mail(
                "load@example.net",
                "x@example.org",
                &subject,
                &subject.repeat(40),
            ) {
                Some(id) => {
                    acked.lock().unwrap().insert(id, subject);
                }
                None => break,
            }
        }
    }
}

/// A client that stops in the middle of DATA; it sends the rest when `go` says so.
fn half_sent(addr: &str) -> Smtp {
    let mut c = Smtp::connect(addr).unwrap();
    c.send("MAIL FROM:<slow@example.net>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
        .unwrap();
    for want in ["250", "250", "354"] {
        let r = c.reply().unwrap();
        assert!(r.starts_with(want), "{r}");
    }
    c.send("Subject: slow\r\n\r\nfirst half\r\n").unwrap();
    c
}

fn start_load(
    addr: &str,
    acked: &Acked,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..CLIENTS)
        .map(|t| {
            let (addr, acked, stop) = (addr.to_owned(), acked.clone(), stop.clone());
            std::thread::spawn(move || load(addr, format!("t{t}"), acked, stop))
        })
        .collect()
}

/// Every acknowledged message is delivered or in the spool (read-only; the daemon is
/// stopped).
fn nothing_lost(dir: &Path, acked: &HashMap<String, String>) {
    let delivered = delivered_subjects(&dir.join("mail"));
    let queued: Vec<String> = Spool::open_read_only(&dir.join("spool"))
        .unwrap()
        .messages
        .iter()
        .map(|m| m.qid.to_string())
        .collect();
    eprintln!(
        "{} acknowledged: {} delivered, {} still queued",
        acked.len(),
        acked.values().filter(|s| delivered.contains(s)).count(),
        acked.keys().filter(|id| queued.contains(id)).count()
    );
    for (id, subject) in acked {
        assert!(
            delivered.contains(subject) || queued.contains(id),
            "acknowledged {id} ({subject}) is neither delivered nor queued"
        );
    }
}

/// Restarts the gateway until every acknowledged message is delivered, then stops it.
fn restart_delivers_everything(dir: &Path, config: &Path, acked: &HashMap<String, String>) {
    let mut d = Daemon::start(config);
    eventually(
        Duration::from_secs(60),
        "every acknowledged message delivered",
        || {
            let delivered = delivered_subjects(&dir.join("mail"));
            acked.values().all(|s| delivered.contains(s)).then_some(())
        },
    );
    d.signal(Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(0));
}

#[test]
fn sigterm_drains_in_flight_transactions_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "10s");
    let mut d = Daemon::start(&config);
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = start_load(&d.addr, &acked, &stop);
    let mut slow = half_sent(&d.addr);
    eventually(
        Duration::from_secs(10),
        "some mail accepted and delivered",
        || {
            (acked.lock().unwrap().len() >= 300
                && !delivered_subjects(&dir.path().join("mail")).is_empty())
            .then_some(())
        },
    );

    // The read-only scan (`postern queue list` without the daemon) is consistent while the
    // daemon appends and delivers: whatever was acknowledged before a scan is in it, or was
    // delivered (and removed) before the scan ended.
    for _ in 0..10 {
        let before = acked.lock().unwrap().clone();
        let snapshot = Spool::open_read_only(&dir.path().join("spool")).unwrap();
        let delivered = delivered_subjects(&dir.path().join("mail"));
        let queued: std::collections::HashSet<String> = snapshot
            .messages
            .iter()
            .map(|m| m.qid.to_string())
            .collect();
        for (id, subject) in &before {
            assert!(
                queued.contains(id) || delivered.contains(subject),
                "read-only scan during load missed {id}"
            );
        }
    }

    d.signal(Signal::TERM);
    let signalled = Instant::now();
    eventually(Duration::from_secs(5), "the shutdown log line", || {
        (!d.log_lines(&["shutting down"]).is_empty()).then_some(())
    });
    // No new connections once draining.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        Smtp::connect(&d.addr).is_none(),
        "a new session was served while draining"
    );
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "exited before the DATA in flight ended"
    );
    // The transaction in DATA finishes, and is acknowledged.
    slow.send("second half\r\n.\r\n").unwrap();
    let reply = slow.reply().unwrap();
    let id = reply
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("in-flight DATA not accepted while draining: {reply}"))
        .trim()
        .to_owned();
    acked.lock().unwrap().insert(id, "slow".into());
    drop(slow);

    assert_eq!(
        d.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{:?}",
        d.log_lines(&[])
    );
    assert!(signalled.elapsed() < Duration::from_secs(12));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(
        !d.log_lines(&["\"stopped\""]).is_empty(),
        "no clean stop logged"
    );
    let acked = acked.lock().unwrap().clone();
    nothing_lost(dir.path(), &acked);
    restart_delivers_everything(dir.path(), &config, &acked);
}

#[test]
fn a_second_sigterm_exits_at_once_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "60s");
    let mut d = Daemon::start(&config);
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = start_load(&d.addr, &acked, &stop);
    // Never finished: keeps the drain waiting for its whole 60 s.
    let stuck = half_sent(&d.addr);
    eventually(Duration::from_secs(10), "some mail accepted", || {
        (acked.lock().unwrap().len() >= 300).then_some(())
    });

    d.signal(Signal::TERM);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the drain should still wait for DATA"
    );
    let second = Instant::now();
    d.signal(Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "took {:?}",
        second.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    drop(stuck);
    let acked = acked.lock().unwrap().clone();
    nothing_lost(dir.path(), &acked);
    restart_delivers_everything(dir.path(), &config, &acked);
    assert!(!delivered_subjects(&dir.path().join("mail")).contains(&"slow".to_owned()));
}

#[test]
fn the_drain_deadline_ends_a_stuck_session_and_still_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "1s");
    let mut d = Daemon::start(&config);
    let stuck = half_sent(&d.addr);
    d.signal(Signal::TERM);
    let signalled = Instant::now();
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "exit {took:?} after SIGTERM with drain_timeout 1s"
    );
    assert!(!d.log_lines(&["drain deadline passed"]).is_empty());
    drop(stuck);
    // The unfinished message was never acknowledged and is not in the spool.
    let snapshot = Spool::open_read_only(&dir.path().join("spool")).unwrap();
    assert!(snapshot.messages.is_empty());
}
