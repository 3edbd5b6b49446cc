//! Crash test of the whole path with the real binary: SMTP clients send mail while
//! `postern run` (delivering into maildirs) is killed with SIGKILL at a random moment. After
//! each kill the spool is opened: every message that got a 250 and is not yet delivered must
//! be there, envelope and body intact. After the last cycle the gateway runs until its queue
//! is empty, and every message that got a 250 must be in a maildir at least once.
//! 20 cycles on one spool (so recovery runs on top of earlier recoveries).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern::spool::{Spool, SpoolOptions};

const CYCLES: usize = 20;
const CLIENTS: usize = 4;

fn start(config: &std::path::Path) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .env("POSTERN_LOG", "warn,postern::listener=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("postern exited before listening")
            .unwrap();
        if line.contains("\"listening\"") {
            let start = line.find("\"address\":\"").unwrap() + 11;
            break line[start..start + line[start..].find('"').unwrap()].to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    (child, addr)
}

/// Sends messages until the connection dies; records (queue id → tag) for every 250.
fn client(
    addr: String,
    tag: String,
    acked: Arc<Mutex<HashMap<String, String>>>,
    stop: Arc<AtomicBool>,
) {
    let Ok(stream) = TcpStream::connect(&addr) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut reply = || -> Option<String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(all);
            }
        }
    };
    if reply().is_none() {
        return;
    }
    if w.write_all(b"EHLO crash.test\r\n").is_err() || reply().is_none() {
        return;
    }
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let body_tag = format!("{tag}-{n}");
        let msg = format!(
            "MAIL FROM:<c@example.net>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nSubject: {body_tag}\r\n\r\n{}\r\n.\r\n",
            body_tag.repeat(50)
        );
        if w.write_all(msg.as_bytes()).is_err() {
            return;
        }
        for _ in 0..3 {
            if reply().is_none() {
                return;
            }
        }
        let Some(last) = reply() else { return };
        if let Some(id) = last.strip_prefix("250 2.0.0 Ok: queued as ") {
            acked.lock().unwrap().insert(id.trim().to_owned(), body_tag);
        }
    }
}

#[test]
fn every_acknowledged_message_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let config = dir.path().join("postern.yaml");
    std::fs::write(
        &config,
        format!(
            "node_id: 3\nspool:\n  path: {}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: local\n    kind: maildir\n    root: {}\nroutes:\n  domains:\n    example.org: {{ store: local }}\n",
            spool_dir.display(),
            dir.path().join("mail").display()
        ),
    )
    .unwrap();
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let mut seed = 0x9e37_79b9_u64;
    for cycle in 0..CYCLES {
        let (mut child, addr) = start(&config);
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let (addr, acked, stop) = (addr.clone(), acked.clone(), stop.clone());
                std::thread::spawn(move || client(addr, format!("c{cycle}t{t}"), acked, stop))
            })
            .collect();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(50 + seed % 400));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        // Every acknowledged message is in the recovered spool, intact.
        let started = Instant::now();
        let (spool, _report) = Spool::open(
            &spool_dir,
            SpoolOptions {
                node_id: 3,
                min_free_bytes: 0,
                ..SpoolOptions::default()
            },
        )
        .unwrap();
        let acked = acked.lock().unwrap();
        let delivered = delivered_tags(&dir.path().join("mail"));
        for (id, tag) in acked.iter() {
            let qid = id.parse().unwrap();
            let Ok(env) = spool.read_envelope(qid) else {
                assert!(
                    delivered.contains(tag),
                    "cycle {cycle}: acknowledged {id} ({tag}) neither queued nor delivered"
                );
                continue;
            };
            assert_eq!(env.recipients[0].address, "x@example.org");
            let mut body = String::new();
            spool
                .open_body(qid)
                .unwrap()
                .read_to_string(&mut body)
                .unwrap();
            assert!(
                body.contains(&format!("Subject: {tag}\r\n")) && body.contains(&tag.repeat(50)),
                "cycle {cycle}: {id} body differs"
            );
        }
        drop(spool);
        eprintln!(
            "cycle {cycle}: {} acknowledged so far, verified in {:?}",
            acked.len(),
            started.elapsed()
        );
    }
    let acked = acked.lock().unwrap();
    assert!(
        acked.len() > CYCLES,
        "the load should have produced acknowledged messages"
    );
    // A last, undisturbed run delivers whatever is still queued.
    let (mut child, _addr) = start(&config);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let delivered = delivered_tags(&dir.path().join("mail"));
        let missing: Vec<_> = acked.values().filter(|t| !delivered.contains(*t)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged messages never delivered, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    eprintln!(
        "all {} acknowledged messages delivered at least once",
        acked.len()
    );
}

/// The Subject tags of every message in x@example.org's maildir.
fn delivered_tags(root: &std::path::Path) -> std::collections::HashSet<String> {
    let mut tags = std::collections::HashSet::new();
    let Ok(entries) = std::fs::read_dir(root.join("example.org/x/Maildir/new")) else {
        return tags;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Some(line) = text.lines().find(|l| l.starts_with("Subject: ")) {
            tags.insert(line["Subject: ".len()..].to_owned());
        }
    }
    tags
}
