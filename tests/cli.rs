//! The `postern` binary's command line.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::process::Command;

fn postern(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn version_names_the_package_version() {
    let out = postern(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("postern {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_lists_the_subcommands() {
    let out = postern(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Usage: postern"), "{text}");
    assert!(text.contains("run"), "{text}");
}

#[test]
fn unknown_subcommand_fails() {
    let out = postern(&["frobnicate"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unrecognized subcommand"));
}

#[test]
fn check_config_accepts_the_embedded_default() {
    let out = postern(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "config/postern.yaml (embedded): ok"
    );
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/config/postern.yaml");
    let out = postern(&["check-config", "--config", file]);
    assert!(out.status.success());
}

#[test]
fn check_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "listeners:\n  - name: smtp\n    address: 127.0.0.1:2525\n    protocol: smtp\n    max_conections: 5\n",
    )
    .unwrap();
    let out = postern(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:5:5: listeners[0]: unknown field `max_conections`",
            path.display()
        )),
        "{err}"
    );

    std::fs::write(
        &path,
        "listeners:\n  - name: lmtp\n    address: 127.0.0.1:25\n    protocol: lmtp\n",
    )
    .unwrap();
    let out = postern(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":4:5: listeners[0].protocol: LMTP is never offered on port 25"),
        "{err}"
    );
}

#[test]
fn check_config_lists_every_error_with_a_suggestion_for_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three.yaml");
    std::fs::write(
        &path,
        "hostnme: mx.example\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:2525\n    protocol: smtp\n    max_errors: lots\ndrain_timeout: 5 parsecs\n",
    )
    .unwrap();
    let out = postern(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    let file = path.display().to_string();
    assert!(
        lines[0].starts_with(&format!("{file}:1:1: "))
            && lines[0].contains("did you mean `hostname`?"),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!("{file}:6:5: listeners[0].max_errors: ")),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!("{file}:7:1: drain_timeout: ")),
        "{err}"
    );
}

#[test]
fn run_refuses_a_bad_config_without_starting() {
    let out = postern(&["run", "--config", "/nonexistent/postern.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/postern.yaml: cannot read")
    );
}

/// Every example in `config/` is valid, and the cluster example routes as its comments say.
#[test]
fn every_example_config_checks_and_the_cluster_example_routes() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = postern(&["check-config", "--config", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            seen += 1;
        }
    }
    assert!(seen >= 2, "the default and the cluster example");
    let cluster = concat!(env!("CARGO_MANIFEST_DIR"), "/config/cyrus-cluster.yaml");
    let out = postern(&[
        "route",
        "--config",
        cluster,
        "alice@corp.example",
        "zed@corp.example",
        "x-archive@corp.example",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line for {start}: {text}"))
            .to_owned()
    };
    assert!(
        line("alice@corp.example").ends_with("store cyrus1"),
        "{text}"
    );
    assert!(line("zed@corp.example").contains("550 5.1.1"), "{text}");
    assert!(
        line("x-archive@corp.example").ends_with("store archive"),
        "{text}"
    );
}

/// `postern run` on a world-writable spool directory stops before binding anything, with
/// an error naming the directory and the fix.
#[test]
fn run_refuses_a_world_writable_spool() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o777)).unwrap();
    let config = d.path().join("postern.yaml");
    std::fs::write(
        &config,
        format!(
            "spool:\n  path: {}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n  - name: sink\n    kind: discard\nroutes:\n  domains:\n    example.org: {{ store: sink }}\n",
            spool.display()
        ),
    )
    .unwrap();
    let out = postern(&["run", "--config", config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("world-writable"), "{err}");
    assert!(
        err.contains(&format!("chmod o-w {}", spool.display())),
        "{err}"
    );
    assert!(!err.contains("listening"), "nothing was bound: {err}");
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
}
