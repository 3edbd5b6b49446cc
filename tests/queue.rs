//! `postern queue …` against a running daemon (the real binary): every command, the JSON
//! schema of `list --json`, `--dry-run` changing nothing, the socket's mode, hold keeping
//! mail from a store that works again, release delivering it, delete removing it, requeue
//! and flush starting an attempt; then, with the daemon stopped: the offline listing, and
//! the errors for a daemon that is not running and a spool that is not there.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod daemon;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use daemon::{Daemon, delivered_subjects, eventually, queue, send_one, stderr, stdout};
use serde_json::Value;

/// `local` is a maildir whose root is a plain file (every delivery defers with 451 until the
/// test removes it); `tempfail` always answers 451; retries are an hour apart, so nothing
/// moves unless a queue command moves it.
fn config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("postern.yaml");
    std::fs::write(
        &path,
        format!(
            "hostname: mx.test\nnode_id: 5\ndrain_timeout: 5s\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: local\n    kind: maildir\n    root: {mail}\n  - name: tempfail\n    kind: error\n    reply: \"451 4.3.2 store closed for the test\"\nroutes:\n  domains:\n    example.org: {{ store: local }}\n    slow.test: {{ store: tempfail }}\ndelivery:\n  minimal_backoff: 1h\n  maximal_backoff: 2h\n",
            spool = dir.join("spool").display(),
            mail = dir.join("mail").display(),
        ),
    )
    .unwrap();
    path
}

fn list_json(config: &Path, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["list", "--json"];
    a.extend_from_slice(args);
    let out = queue(config, &a);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn ids(v: &[Value]) -> Vec<&str> {
    v.iter().map(|m| m["queue_id"].as_str().unwrap()).collect()
}

fn find<'a>(v: &'a [Value], id: &str) -> Option<&'a Value> {
    v.iter().find(|m| m["queue_id"] == id)
}

/// Every key of `list --json` with its JSON type; nothing else.
fn check_schema(m: &Value) {
    let obj = m.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "arrival_time",
            "message_size",
            "next_attempt",
            "queue_id",
            "queue_name",
            "recipients",
            "sender"
        ],
        "{m}"
    );
    assert!(m["queue_name"].is_string() && m["queue_id"].is_string() && m["sender"].is_string());
    assert!(m["arrival_time"].is_u64() && m["message_size"].is_u64());
    assert!(m["next_attempt"].is_u64() || m["next_attempt"].is_null());
    for r in m["recipients"].as_array().unwrap() {
        let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["address", "last_reply", "next_attempt", "state", "store"],
            "{r}"
        );
        assert!(r["address"].is_string() && r["state"].is_string());
        assert!(r["store"].is_string() || r["store"].is_null());
        assert!(r["last_reply"].is_string() || r["last_reply"].is_null());
        assert!(r["next_attempt"].is_u64() || r["next_attempt"].is_null());
    }
}

fn deliveries(d: &Daemon, id: &str) -> usize {
    d.log_lines(&["postern::delivery", id]).len()
}

#[test]
fn every_queue_command_against_a_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    std::fs::write(dir.path().join("mail"), b"not a directory").unwrap();
    let mut d = Daemon::start(&config);

    // The socket: where the config says by default, a socket, mode 0600.
    let socket = dir.path().join("spool/admin.sock");
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let m1 = send_one(
        &d.addr,
        "alice@example.net",
        "bob@example.org",
        "m1",
        "body-one",
    );
    let m2 = send_one(
        &d.addr,
        "zed@sender.test",
        "carol@slow.test",
        "m2",
        "body-two",
    );
    let m3 = send_one(
        &d.addr,
        "alice@example.net",
        "dave@example.org",
        "m3",
        "body-three",
    );
    let all = eventually(Duration::from_secs(10), "three deferred messages", || {
        let v = list_json(&config, &[]);
        (v.len() == 3 && v.iter().all(|m| m["queue_name"] == "deferred")).then_some(v)
    });

    // list --json: schema, store, last reply.
    for m in &all {
        check_schema(m);
    }
    let v1 = find(&all, &m1).unwrap();
    assert_eq!(v1["sender"], "alice@example.net");
    assert_eq!(v1["recipients"][0]["address"], "bob@example.org");
    assert_eq!(v1["recipients"][0]["store"], "local");
    assert_eq!(v1["recipients"][0]["state"], "deferred");
    assert!(
        v1["recipients"][0]["last_reply"]
            .as_str()
            .unwrap()
            .starts_with("451")
    );
    let v2 = find(&all, &m2).unwrap();
    assert_eq!(v2["recipients"][0]["store"], "tempfail");
    assert!(
        v2["recipients"][0]["last_reply"]
            .as_str()
            .unwrap()
            .contains("store closed for the test"),
        "{v2}"
    );

    // list (human), like postqueue -p.
    let out = queue(&config, &["list"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for id in [&m1, &m2, &m3] {
        assert!(text.contains(id.as_str()), "{text}");
    }
    assert!(
        text.contains("carol@slow.test  [deferred via tempfail]"),
        "{text}"
    );
    assert!(
        text.contains("(451 4.3.2 store closed for the test)"),
        "{text}"
    );
    assert!(text.contains("in 3 Requests."), "{text}");

    // Filters.
    assert_eq!(
        ids(&list_json(&config, &["--store", "tempfail"])),
        vec![m2.as_str()]
    );
    assert_eq!(
        ids(&list_json(&config, &["--recipient", "dave@*"])),
        vec![m3.as_str()]
    );
    assert_eq!(
        ids(&list_json(&config, &["--sender", "sender.test"])),
        vec![m2.as_str()]
    );
    assert_eq!(list_json(&config, &["--state", "deferred"]).len(), 3);
    assert!(list_json(&config, &["--state", "hold"]).is_empty());
    assert!(list_json(&config, &["--older-than", "1h"]).is_empty());
    assert_eq!(ids(&list_json(&config, &[&m1])), vec![m1.as_str()]);

    // show: envelope, ledger, headers; the body only with --body.
    let out = queue(&config, &["show", &m1]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("sender:       alice@example.net"), "{text}");
    assert!(
        text.contains("client:       ") && text.contains("127.0.0.1"),
        "{text}"
    );
    assert!(
        text.contains("bob@example.org  deferred  store=local"),
        "{text}"
    );
    assert!(text.contains("last reply: 451"), "{text}");
    assert!(text.contains("Subject: m1"), "{text}");
    assert!(!text.contains("body-one"), "{text}");
    let text = stdout(&queue(&config, &["show", &m1, "--body"]));
    assert!(text.contains("body-one"), "{text}");
    let out = queue(&config, &["show", "0000000000000ZZ"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no message"), "{}", stderr(&out));

    // shape, by store and by domain.
    let out = queue(&config, &["shape"]);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0]
            .trim_start()
            .starts_with("T 5 10 20 40 80 160 320 640 1280 1280+"),
        "{text}"
    );
    let row = |name: &str| -> Vec<u64> {
        let line = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row {name}: {text}"));
        line.split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect()
    };
    assert_eq!(row("TOTAL")[..2], [3, 3]);
    assert_eq!(row("local")[..2], [2, 2]);
    assert_eq!(row("tempfail")[..2], [1, 1]);
    let text = stdout(&queue(&config, &["shape", "--by", "domain"]));
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("example.org 2 2")),
        "{text}"
    );
    let table: Value =
        serde_json::from_str(&stdout(&queue(&config, &["shape", "--json"]))).unwrap();
    assert_eq!(table["rows"][0]["name"], "TOTAL");
    assert_eq!(table["rows"][0]["total"], 3);

    // Actions need a selection; --dry-run changes nothing.
    let out = queue(&config, &["hold"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("nothing selected"),
        "{}",
        stderr(&out)
    );
    let out = queue(&config, &["hold", &m1, "--dry-run"]);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains(&format!("would hold {m1}")),
        "{}",
        stdout(&out)
    );
    let out = queue(&config, &["delete", "--all", "--dry-run"]);
    assert!(
        stdout(&out).contains("3 messages would be deleted"),
        "{}",
        stdout(&out)
    );
    let now = list_json(&config, &[]);
    assert_eq!(now.len(), 3);
    assert!(now.iter().all(|m| m["queue_name"] == "deferred"));

    // hold, then the store works again: flush delivers m3, never the held m1.
    let out = queue(&config, &["hold", &m1]);
    assert!(
        stdout(&out).contains(&format!("held {m1}")),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        find(&list_json(&config, &[]), &m1).unwrap()["queue_name"],
        "hold"
    );
    assert!(stdout(&queue(&config, &["list"])).contains(&format!("{m1}!")));
    std::fs::remove_file(dir.path().join("mail")).unwrap();
    let out = queue(&config, &["flush", "--store", "local"]);
    let text = stdout(&out);
    assert!(text.contains(&format!("flushed {m3}")), "{text}");
    assert!(text.contains(&format!("skipped {m1}: on hold")), "{text}");
    eventually(Duration::from_secs(10), "m3 delivered", || {
        (find(&list_json(&config, &[]), &m3).is_none()).then_some(())
    });
    assert!(delivered_subjects(&dir.path().join("mail")).contains(&"m3".to_owned()));
    let attempts = deliveries(&d, &m1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        deliveries(&d, &m1),
        attempts,
        "a held message was attempted"
    );
    assert!(!delivered_subjects(&dir.path().join("mail")).contains(&"m1".to_owned()));
    let out = queue(&config, &["flush", &m1]);
    assert!(stdout(&out).contains("on hold"), "{}", stdout(&out));

    // release: delivered now.
    let out = queue(&config, &["release", &m1]);
    assert!(
        stdout(&out).contains(&format!("released {m1}")),
        "{}",
        stdout(&out)
    );
    eventually(Duration::from_secs(10), "m1 delivered", || {
        delivered_subjects(&dir.path().join("mail"))
            .contains(&"m1".to_owned())
            .then_some(())
    });
    eventually(Duration::from_secs(10), "m1 gone from the queue", || {
        (find(&list_json(&config, &[]), &m1).is_none()).then_some(())
    });

    // requeue and flush start a new attempt of m2 (its store still says 451).
    let before = deliveries(&d, &m2);
    assert!(before >= 1);
    let out = queue(&config, &["requeue", "--recipient", "carol@slow.test"]);
    assert!(
        stdout(&out).contains(&format!("requeued {m2}")),
        "{}",
        stdout(&out)
    );
    eventually(
        Duration::from_secs(10),
        "a new attempt after requeue",
        || (deliveries(&d, &m2) > before).then_some(()),
    );
    let before = deliveries(&d, &m2);
    let out = queue(&config, &["flush", "--all"]);
    assert!(out.status.success());
    eventually(Duration::from_secs(10), "a new attempt after flush", || {
        (deliveries(&d, &m2) > before).then_some(())
    });
    assert_eq!(
        find(&list_json(&config, &[]), &m2).unwrap()["queue_name"],
        "deferred"
    );

    // delete: gone, no bounce.
    let out = queue(&config, &["delete", &m2]);
    assert!(
        stdout(&out).contains(&format!("deleted {m2}")),
        "{}",
        stdout(&out)
    );
    assert!(list_json(&config, &[]).is_empty());
    assert!(stdout(&queue(&config, &["list"])).contains("Mail queue is empty"));
    let out = queue(&config, &["delete", &m2]);
    assert!(
        stdout(&out).contains("not in the queue"),
        "{}",
        stdout(&out)
    );

    // Stopped: the listing reads the spool directly; actions say the daemon is not running.
    let m4 = send_one(
        &d.addr,
        "alice@example.net",
        "erin@slow.test",
        "m4",
        "body-four",
    );
    eventually(Duration::from_secs(10), "m4 deferred", || {
        list_json(&config, &[])
            .first()
            .is_some_and(|m| m["queue_name"] == "deferred")
            .then_some(())
    });
    d.signal(rustix::process::Signal::TERM);
    assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(0));
    assert!(!socket.exists(), "the socket is removed at shutdown");
    let offline = list_json(&config, &[]);
    assert_eq!(ids(&offline), vec![m4.as_str()]);
    check_schema(&offline[0]);
    assert!(
        offline[0]["recipients"][0]["last_reply"]
            .as_str()
            .unwrap()
            .starts_with("451")
    );
    let text = stdout(&queue(&config, &["shape"]));
    assert!(text.contains("tempfail"), "{text}");
    let out = queue(&config, &["hold", &m4]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "postern is not running (no admin socket at {})",
            socket.display()
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_missing_spool_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let out = queue(&config, &["list"]);
    assert_eq!(out.status.code(), Some(1));
    let spool = dir.path().join("spool");
    assert!(
        stderr(&out).contains(&format!("spool not found at {}", spool.display())),
        "{}",
        stderr(&out)
    );
    let out = queue(&config, &["flush", "--all"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("postern is not running"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_bad_config_exits_2() {
    let out = queue(Path::new("/nonexistent/postern.yaml"), &["list"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn actions_are_durable_and_a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let socket = dir.path().join("spool/admin.sock");
    let mut d = Daemon::start(&config);
    let id = send_one(&d.addr, "s@example.net", "carol@slow.test", "held", "x");
    eventually(Duration::from_secs(10), "deferred", || {
        (list_json(&config, &[])[0]["queue_name"] == "deferred").then_some(())
    });
    // The hold is durable once the command returns: kill -9 right after it.
    let out = queue(&config, &["hold", &id]);
    assert!(
        stdout(&out).contains(&format!("held {id}")),
        "{}",
        stdout(&out)
    );
    d.child.kill().unwrap(); // SIGKILL: the socket file stays behind
    d.child.wait().unwrap();
    assert!(socket.exists());
    assert_eq!(list_json(&config, &[])[0]["queue_name"], "hold");
    let d = Daemon::start(&config);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(list_json(&config, &[])[0]["queue_name"], "hold");
    // Deleted, then killed: gone for good.
    assert!(queue(&config, &["delete", &id]).status.success());
    drop(d);
    assert!(list_json(&config, &[]).is_empty());
    let d = Daemon::start(&config);
    assert!(list_json(&config, &[]).is_empty());

    // Another gateway (its own spool) configured with the same admin socket does not start.
    let other = dir.path().join("other.yaml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &dir.path().join("spool").display().to_string(),
        &dir.path().join("spool2").display().to_string(),
    ) + &format!("admin:\n  socket: {}\n", socket.display());
    std::fs::write(&other, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["run", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("another postern is listening"),
        "{}",
        stderr(&out)
    );
    drop(d);
}

/// A hold that lands while the message's recipient waits behind a busy mailbox (its
/// attempt has started, its transaction not): the transaction is not run.
#[test]
fn a_hold_stops_a_recipient_already_waiting_for_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let script = dir.path().join("slow.sh");
    std::fs::write(
        &script,
        format!(
            "f=$(mktemp {0}/d.XXXXXX)\ncat > \"$f.tmp\"\nmv \"$f.tmp\" \"$f.msg\"\nsleep 2\n",
            out.display()
        ),
    )
    .unwrap();
    let config = dir.path().join("postern.yaml");
    std::fs::write(
        &config,
        format!(
            "hostname: mx.test\nnode_id: 5\ndrain_timeout: 5s\nspool:\n  path: {spool}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: slow\n    kind: pipe\n    argv: [/bin/sh, {script}]\nroutes:\n  domains:\n    pipe.test: {{ store: slow }}\ndelivery:\n  minimal_backoff: 1h\n  maximal_backoff: 2h\n",
            spool = dir.path().join("spool").display(),
            script = script.display(),
        ),
    )
    .unwrap();
    let subjects = || -> Vec<String> {
        std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "msg"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
            })
            .collect()
    };
    let d = Daemon::start(&config);
    let a = send_one(&d.addr, "s@example.net", "x@pipe.test", "first", "a");
    eventually(
        Duration::from_secs(10),
        "the first message in the pipe",
        || subjects().contains(&"first".to_owned()).then_some(()),
    );
    // Same mailbox: waits until the first transaction (2 s of sleep) is over.
    let b = send_one(&d.addr, "s@example.net", "x@pipe.test", "second", "b");
    let held = queue(&config, &["hold", &b]);
    assert!(
        stdout(&held).contains(&format!("held {b}")),
        "{}",
        stdout(&held)
    );
    eventually(Duration::from_secs(10), "the first message done", || {
        find(&list_json(&config, &[]), &a).is_none().then_some(())
    });
    let v = eventually(
        Duration::from_secs(10),
        "the held recipient settled",
        || {
            let v = list_json(&config, &[&b]);
            (v[0]["recipients"][0]["state"] == "deferred").then_some(v)
        },
    );
    assert_eq!(v[0]["queue_name"], "hold");
    assert_eq!(
        v[0]["recipients"][0]["last_reply"],
        "451 4.0.0 Held by the operator"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !subjects().contains(&"second".to_owned()),
        "a held message was delivered"
    );

    let out_release = queue(&config, &["release", &b]);
    assert!(out_release.status.success());
    eventually(
        Duration::from_secs(10),
        "the second message delivered after release",
        || subjects().contains(&"second".to_owned()).then_some(()),
    );
}
