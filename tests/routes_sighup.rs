//! `postern run` reloads its routing map on SIGHUP: a malformed file is refused (logged
//! with file:line:key, counted in `postern_routes_reload_errors_total`) and the process
//! keeps running; a good one moves `postern_routes_generation`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

fn config(dir: &std::path::Path, store: &str) -> String {
    format!(
        "hostname: mx.test\ndelivery:\n  enabled: false\nspool:\n  path: {}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - {{ name: a, kind: discard }}\nroutes:\n  domains:\n    example.org: {{ store: {store} }}\n",
        dir.join("spool").display()
    )
}

/// Lines of the child's stderr until one contains `what` (10 s at most).
fn wait_for(lines: &mpsc::Receiver<String>, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(l) if l.contains(what) => return l,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    panic!("no log line with `{what}` within 10 s");
}

fn metrics(address: &str) -> String {
    let mut s = std::net::TcpStream::connect(address).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not exported:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn sighup_reloads_and_a_malformed_map_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postern.yaml");
    std::fs::write(&path, config(dir.path(), "a")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["run", "--config", path.to_str().unwrap()])
        .env("POSTERN_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let pid = Pid::from_child(&child);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let line = wait_for(&lines, " metrics");
        let address = line.rsplit("address=").next().unwrap().trim().to_owned();
        wait_for(&lines, "SIGHUP reloads the routing map");
        assert_eq!(value(&metrics(&address), "postern_routes_generation"), 1.0);

        std::fs::write(&path, config(dir.path(), "missing")).unwrap();
        kill_process(pid, Signal::HUP).unwrap();
        let err = wait_for(&lines, "routing map reload failed");
        assert!(
            err.contains(&format!(
                "{}:17:5: routes.domains[example.org].store: no store named `missing`",
                path.display()
            )),
            "{err}"
        );
        let m = metrics(&address);
        assert!(
            value(&m, "postern_routes_reload_errors_total") >= 1.0,
            "{m}"
        );
        assert_eq!(value(&m, "postern_routes_generation"), 1.0);

        std::fs::write(
            &path,
            config(dir.path(), "a").replace("example.org", "example.net"),
        )
        .unwrap();
        kill_process(pid, Signal::HUP).unwrap();
        wait_for(&lines, "routing map reloaded");
        assert!(value(&metrics(&address), "postern_routes_generation") >= 2.0);
    }));
    let _ = kill_process(pid, Signal::TERM);
    let status = child.wait().unwrap();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    assert!(status.success(), "{status:?}");
}
