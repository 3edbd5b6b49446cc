//! `postern route`: explanations, the dry-run diff (users and queued recipients), and the
//! exit statuses and error texts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use postern::spool::{Envelope, EnvelopeRecipient, Spool, SpoolOptions};

fn postern(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .env("POSTERN_LOG", "error")
        .output()
        .unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A configuration whose `corp.example` users spread over `members`.
fn write_config(dir: &Path, name: &str, members: &str, bob: &str) -> String {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "spool:\n  path: {spool}\nlisteners:\n  - {{ name: smtp, address: \"127.0.0.1:0\", protocol: smtp }}\nstores:\n  - {{ name: local, kind: discard }}\n  - {{ name: c1, kind: discard }}\n  - {{ name: c2, kind: discard }}\n  - {{ name: c3, kind: discard }}\n  - {{ name: out, kind: discard }}\nroutes:\n  relay: out\n  clusters:\n    cyrus: [{members}]\n  domains:\n    example.org: {{ store: local }}\n    corp.example: {{ cluster: cyrus, authoritative: true }}\n  users:\n{users}    bob@corp.example: {bob}\n  aliases:\n    team@example.org: [u1@corp.example, bob@corp.example]\n",
            spool = dir.join("spool").display(),
            users = (0..60).map(|i| format!("    u{i}@corp.example: cyrus\n")).collect::<String>(),
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[test]
fn route_explains_normal_form_rule_store_and_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "p.yaml", "c1, c2", "c3");
    let out = postern(&[
        "route",
        "--config",
        &cfg,
        "Bob+Lists@Corp.Example",
        "team@example.org",
        "x@elsewhere.example",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("Bob+Lists@Corp.Example  normalised=bob@corp.example  rule=users[bob@corp.example]  store c3\n"),
        "{text}"
    );
    assert!(
        text.contains("team@example.org  normalised=team@example.org  rule=aliases[team@example.org]  alias of 2 address(es)\n  u1@corp.example  normalised=u1@corp.example  rule=users[u1@corp.example] -> clusters[cyrus] (rendezvous)  store c"),
        "{text}"
    );
    assert!(
        text.contains("x@elsewhere.example  normalised=x@elsewhere.example  rule=not a local domain (no relay for this client)  refused: 554 5.7.1 relay denied\n"),
        "{text}"
    );
    let out = postern(&[
        "route",
        "--config",
        &cfg,
        "--trusted",
        "x@elsewhere.example",
    ]);
    assert!(
        stdout(&out).contains("rule=relay (not a local domain)  relay via store out"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn route_refuses_bad_input_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "p.yaml", "c1, nope", "c3");
    let out = postern(&["route", "--config", &cfg, "a@example.org"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!(
            "{cfg}:14:5: routes.clusters[cyrus][1]: no store named `nope`"
        )),
        "{}",
        stderr(&out)
    );
    let cfg = write_config(dir.path(), "q.yaml", "c1", "c3");
    let out = postern(&["route", "--config", &cfg, "not an address"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("postern route: `not an address` is not an address"),
        "{}",
        stderr(&out)
    );
    let out = postern(&["route", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("give addresses to explain, or --diff NEW.yaml"));
}

#[test]
fn diff_shows_moving_users_and_queued_recipients_before_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let cur = write_config(dir.path(), "current.yaml", "c1, c2", "c3");
    // Queue mail for every pinned user, then close the spool (a running daemon would keep
    // it open; the diff reads it without the lock either way).
    {
        let (spool, _) = Spool::open(&dir.path().join("spool"), SpoolOptions::default()).unwrap();
        for i in 0..60 {
            let env = Envelope {
                sender: "s@example.net".into(),
                params: Default::default(),
                recipients: vec![EnvelopeRecipient {
                    address: format!("u{i}@corp.example"),
                    params: Default::default(),
                }],
                received_at: SystemTime::now(),
                client: "test".into(),
            };
            let mut w = spool.begin(env).unwrap();
            w.write(b"Subject: x\r\n\r\nbody\r\n").unwrap();
            w.commit().wait().unwrap();
        }
    }
    // Adding c3 to the cluster moves about a third of the users, all to c3; bob moves too.
    let new = write_config(dir.path(), "new.yaml", "c1, c2, c3", "c1");
    let out = postern(&["route", "--config", &cur, "--diff", &new]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let first = text.lines().next().unwrap();
    let moved: usize = first
        .strip_prefix("users moving: ")
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(first.ends_with(" of 61"), "{text}");
    assert!(
        (8..=35).contains(&moved),
        "about 1/3 of 60 plus bob: {text}"
    );
    assert!(text.contains("  bob@corp.example: c3 -> c1\n"), "{text}");
    for line in text.lines().skip(1).take_while(|l| l.starts_with("  u")) {
        assert!(
            line.ends_with("-> c3"),
            "a cluster grown by one store moves users only to it: {line}"
        );
    }
    let queued = text
        .lines()
        .find(|l| l.starts_with("queued recipients moving: "))
        .unwrap();
    assert_eq!(
        queued,
        format!("queued recipients moving: {} of 60", moved - 1),
        "{text}"
    );
    // Same map: nothing moves.
    let out = postern(&["route", "--config", &cur, "--diff", &cur]);
    assert_eq!(
        stdout(&out),
        "users moving: 0 of 61\nqueued recipients moving: 0 of 60\n"
    );
}

#[test]
fn route_names_the_fragment_of_a_rule_and_check_config_reads_fragments() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "p.yaml", "c1, c2", "c3");
    let frag = dir.path().join("lists.yaml");
    std::fs::write(
        &frag,
        "users:\n  carol@corp.example: c1\naliases:\n  staff@example.org: [carol@corp.example, bob@corp.example]\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "  relay: out\n",
        &format!("  relay: out\n  include: [{}]\n", frag.display()),
    );
    std::fs::write(&cfg, text).unwrap();
    let out = postern(&["route", "--config", &cfg, "staff@example.org"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let f = frag.display();
    assert_eq!(
        stdout(&out),
        format!(
            "staff@example.org  normalised=staff@example.org  rule=aliases[staff@example.org] (from {f})  alias of 2 address(es)\n  carol@corp.example  normalised=carol@corp.example  rule=users[carol@corp.example] (from {f})  store c1\n  bob@corp.example  normalised=bob@corp.example  rule=users[bob@corp.example]  store c3\n"
        )
    );
    // check-config reads the fragments too: a broken one is named with its line.
    std::fs::write(&frag, "users:\n  carol@corp.example: nowhere\n").unwrap();
    let out = postern(&["check-config", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!(
            "{f}:2:3: users[carol@corp.example]: no store or cluster named `nowhere`"
        )),
        "{}",
        stderr(&out)
    );
    // A key defined both in the main file and a fragment: both places named.
    std::fs::write(&frag, "users:\n  bob@corp.example: c1\n").unwrap();
    let out = postern(&["check-config", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!(
            "{f}:2:3: users[bob@corp.example]: `bob@corp.example` is already defined at {cfg}:"
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn route_shows_an_unmatched_extension_propagated_to_the_alias_targets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "p.yaml", "c1, c2", "c3");
    let out = postern(&["route", "--config", &cfg, "Team+News@example.org"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("Team+News@example.org  normalised=team@example.org  rule=aliases[team@example.org]  alias of 2 address(es)\n  u1+News@corp.example  normalised=u1@corp.example  rule=users[u1@corp.example] -> clusters[cyrus] (rendezvous)  store c"),
        "{text}"
    );
    assert!(
        text.ends_with("  bob+News@corp.example  normalised=bob@corp.example  rule=users[bob@corp.example]  store c3\n"),
        "{text}"
    );
}
