//! postern under systemd, without systemd: the real binary with `NOTIFY_SOCKET` pointing at
//! a datagram socket of the test, which reads what a service manager would (`READY=1` only
//! once the listener and the admin socket are up, `WATCHDOG=1` at half `WATCHDOG_USEC`,
//! `RELOADING=1`/`READY=1` around SIGHUP, `STOPPING=1` on SIGTERM); and the unit file
//! `dist/systemd/postern.service` checked by `systemd-analyze verify` and `security`, with
//! its hardening and its agreement with the package's config (`config/server.yaml`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A notification as received, with its arrival time.
struct Note {
    at: Instant,
    text: String,
}

/// Kills the daemon if the test fails half-way.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(dir: &Path) -> PathBuf {
    let path = dir.join("postern.yaml");
    std::fs::write(
        &path,
        format!(
            "hostname: mx.test\nspool:\n  path: {}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\ndrain_timeout: 2s\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: sink\n    kind: discard\nroutes:\n  domains:\n    example.org: {{ store: sink }}\n",
            dir.join("spool").display()
        ),
    )
    .unwrap();
    path
}

/// The next notification that is not a watchdog ping (those are kept in `pings`).
fn next_event(rx: &mpsc::Receiver<Note>, pings: &mut Vec<Instant>, what: &str) -> Note {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let note = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no notification: waiting for {what}"));
        if note.text.trim() == "WATCHDOG=1" {
            pings.push(note.at);
        } else {
            return note;
        }
    }
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_child(child), sig).unwrap();
}

#[test]
fn ready_after_bind_watchdog_at_half_the_interval_reload_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if tx
                .send(Note {
                    at: Instant::now(),
                    text,
                })
                .is_err()
            {
                break;
            }
        }
    });
    // WatchdogSec=2s: a ping every second (each after the scheduler answered within
    // 500 ms; loose enough for a loaded CI machine running the whole suite).
    let interval = Duration::from_secs(2);
    let child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", interval.as_micros().to_string())
        .env_remove("WATCHDOG_PID")
        .env("POSTERN_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut daemon = Killed(child);
    let stderr = daemon.0.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut pings = Vec::new();

    // READY=1 comes first (no ping before it), and by then everything is bound.
    let ready = next_event(&rx, &mut pings, "READY=1");
    assert!(pings.is_empty(), "a watchdog ping before READY=1");
    let lines: Vec<&str> = ready.text.lines().collect();
    assert!(lines.contains(&"READY=1"), "{}", ready.text);
    let status = lines
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS: {}", ready.text));
    let admin = dir.path().join("spool/admin.sock");
    assert!(
        status.contains(&format!("admin socket {}", admin.display())),
        "{status}"
    );
    assert!(admin.exists(), "the admin socket is bound before READY=1");
    let address = status
        .strip_prefix("accepting mail: smtp ")
        .and_then(|s| s.split(';').next())
        .unwrap_or_else(|| panic!("{status}"));
    let stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut banner = String::new();
    BufReader::new(&stream).read_line(&mut banner).unwrap();
    assert!(banner.starts_with("220 "), "{banner}");
    drop(stream);

    // Watchdog pings, at half the interval: never a gap systemd would act on.
    let watch_until = Instant::now() + Duration::from_millis(4500);
    while let Some(left) = watch_until.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(note) => {
                assert_eq!(note.text.trim(), "WATCHDOG=1", "unexpected: {}", note.text);
                pings.push(note.at);
            }
            Err(_) => break,
        }
    }
    assert!(pings.len() >= 4, "{} pings in 4.5 s", pings.len());
    let mut last = ready.at;
    for &at in &pings {
        assert!(
            at - last < interval,
            "a gap of {:?} between watchdog pings (WatchdogSec {interval:?})",
            at - last
        );
        last = at;
    }

    // SIGHUP: RELOADING=1 (with the monotonic time systemd 253+ wants), then READY=1.
    signal(&daemon.0, rustix::process::Signal::HUP);
    let reloading = next_event(&rx, &mut pings, "RELOADING=1");
    assert!(
        reloading.text.lines().any(|l| l == "RELOADING=1"),
        "{}",
        reloading.text
    );
    assert!(
        reloading
            .text
            .lines()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{}",
        reloading.text
    );
    let reloaded = next_event(&rx, &mut pings, "READY=1 after the reload");
    assert!(
        reloaded.text.lines().any(|l| l == "READY=1"),
        "{}",
        reloaded.text
    );
    assert!(
        reloaded
            .text
            .contains("STATUS=reloaded: routes generation 2"),
        "{}",
        reloaded.text
    );

    // SIGTERM: STOPPING=1 as the drain starts, then a clean exit.
    signal(&daemon.0, rustix::process::Signal::TERM);
    let stopping = next_event(&rx, &mut pings, "STOPPING=1");
    assert!(
        stopping.text.lines().any(|l| l == "STOPPING=1"),
        "{}",
        stopping.text
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = log.join().unwrap();
    assert_eq!(code, Some(0), "{log:#?}");
    assert!(
        log.iter().any(|l| l.contains("systemd watchdog enabled")),
        "{log:#?}"
    );
    assert!(!log.iter().any(|l| l.contains("cannot notify")), "{log:#?}");
}

/// Runs the daemon with `NOTIFY_SOCKET` as given (or unset) and a 200 ms watchdog for
/// about a second of pings, stops it with SIGTERM; its exit code and log.
fn run_briefly(notify_socket: Option<&Path>) -> (Option<i32>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let mut command = Command::new(env!("CARGO_BIN_EXE_postern"));
    command
        .args(["run", "--config"])
        .arg(&config)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .env("POSTERN_LOG", "info")
        .stderr(Stdio::piped());
    match notify_socket {
        Some(path) => command.env("NOTIFY_SOCKET", path),
        None => command.env_remove("NOTIFY_SOCKET"),
    };
    let child = command.spawn().unwrap();
    let mut daemon = Killed(child);
    let stderr = daemon.0.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let listening = line.contains("listening");
        seen.push(line);
        if listening {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(1000));
    signal(&daemon.0, rustix::process::Signal::TERM);
    seen.extend(lines.map_while(Result::ok));
    let status = daemon.0.wait().unwrap();
    (status.code(), seen)
}

/// Without `NOTIFY_SOCKET` nothing is sent and nothing complains (running by hand).
#[test]
fn without_a_service_manager_nothing_is_sent() {
    let (code, log) = run_briefly(None);
    assert_eq!(code, Some(0), "{log:#?}");
    assert!(!log.iter().any(|l| l.contains("cannot notify")), "{log:#?}");
}

/// A notification socket that is gone is logged once (not at every watchdog tick) and
/// changes nothing else: the gateway runs and stops as usual.
#[test]
fn a_missing_notification_socket_is_logged_once_and_mail_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (code, log) = run_briefly(Some(&dir.path().join("gone.sock")));
    assert_eq!(code, Some(0), "{log:#?}");
    let complaints = log.iter().filter(|l| l.contains("cannot notify")).count();
    assert_eq!(complaints, 1, "{log:#?}");
    assert!(
        log.iter().any(|l| l.contains("systemd watchdog enabled")),
        "{log:#?}"
    );
}

// ---- the unit file ----

/// `systemd-analyze`, or `None` (the test is skipped) unless POSTERN_REQUIRE_CLIENTS=1.
fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("systemd-analyze");
    }
    assert!(
        std::env::var_os("POSTERN_REQUIRE_CLIENTS").is_none(),
        "systemd-analyze is missing and POSTERN_REQUIRE_CLIENTS is set"
    );
    eprintln!("skipped: systemd-analyze is not installed (Debian: apt-get install systemd)");
    None
}

fn unit_text() -> String {
    std::fs::read_to_string(format!("{ROOT}/dist/systemd/postern.service")).unwrap()
}

/// `systemd-analyze verify` on `text` saved as `postern.service`, with ExecStart pointing at
/// the binary under test (verify checks that the command exists): its complaints.
fn verify(analyze: &str, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("postern.service");
    let text = text.replace(
        "/usr/bin/postern ",
        &format!("{} ", env!("CARGO_BIN_EXE_postern")),
    );
    std::fs::write(&unit, text).unwrap();
    let out = Command::new(analyze)
        .args(["verify", "--man=no", "--recursive-errors=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let mut complaints = String::from_utf8_lossy(&out.stderr).into_owned();
    complaints.push_str(&String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        complaints.push_str(&format!("\nexit status {}", out.status));
    }
    complaints.trim().to_owned()
}

/// `Key=value` lines of the unit (comments and sections left out).
fn directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn the_unit_verifies_clean_and_a_broken_copy_does_not() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let text = unit_text();
    let complaints = verify(analyze, &text);
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify: {complaints}"
    );
    // The check can fail: a misspelt key and a bad type are reported (verify itself still
    // exits 0 for those, hence the test reads its output).
    let broken = text
        .replace("ProtectSystem=strict", "ProtectSytem=strict")
        .replace("Type=notify", "Type=notified");
    let complaints = verify(analyze, &broken);
    assert!(complaints.contains("ProtectSytem"), "{complaints}");
    assert!(complaints.contains("notified"), "{complaints}");
}

#[test]
fn the_unit_keeps_its_hardening_and_matches_the_package_config() {
    let text = unit_text();
    let d = directives(&text);
    let get = |key: &str| -> Vec<&str> {
        d.iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        (
            "ExecStart",
            "/usr/bin/postern run --config /etc/postern/postern.yaml",
        ),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("User", "postern"),
        ("Group", "postern"),
        ("KillMode", "mixed"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
    ] {
        assert!(
            get(key).contains(&want),
            "{key}={want} missing: {:?}",
            get(key)
        );
    }
    // The one writable path is the package config's spool (which holds the admin socket).
    let server = std::fs::read_to_string(format!("{ROOT}/config/server.yaml")).unwrap();
    let yaml_value = |key: &str| {
        server
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.split('#').next().unwrap().trim().to_owned())
            .unwrap_or_else(|| panic!("no {key} in config/server.yaml"))
    };
    let spool = yaml_value("path:");
    assert_eq!(get("ReadWritePaths"), [spool.as_str()]);
    assert!(yaml_value("socket:").starts_with(&format!("{spool}/")));
    // The drain fits in the stop timeout, and the watchdog is on.
    let secs = |v: &str| -> u64 {
        if let Some(m) = v.strip_suffix("min") {
            m.parse::<u64>().unwrap() * 60
        } else {
            v.trim_end_matches('s').parse().unwrap()
        }
    };
    let drain = secs(&yaml_value("drain_timeout:"));
    let stop = secs(get("TimeoutStopSec")[0]);
    assert!(
        drain + 30 <= stop,
        "drain_timeout {drain}s, TimeoutStopSec {stop}s"
    );
    assert!(secs(get("WatchdogSec")[0]) >= 10);
}

/// `systemd-analyze security` rates the unit's sandbox "OK" (exposure at most 2.0 of 10).
#[test]
fn the_unit_sandbox_is_rated_ok() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("postern.service");
    std::fs::write(&unit, unit_text()).unwrap();
    let out = Command::new(analyze)
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let verdict = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{text}{}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{verdict}");
}
