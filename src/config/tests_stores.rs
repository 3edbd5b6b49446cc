//! Unit tests of the configuration's stores: LMTP stores and their window, pipe and error
//! stores, and SMTP relay stores, each loaded with its defaults and validated.

use std::time::Duration;

use super::tests::{BASE, errors};
use super::*;

#[test]
fn lmtp_stores_load_and_validate() {
    let yaml = BASE.replace(
        "routes:\n",
        "  - name: cyrus1\n    kind: lmtp\n    address: 127.0.0.1:24\n    max_connections: 20\n    recipients_per_transaction: 10\n  - name: dovecot\n    kind: lmtp\n    address: unix:/run/dovecot/lmtp\nroutes:\n",
    );
    let c = Config::parse(&yaml, "t").unwrap();
    assert_eq!(
        c.stores.iter().map(StoreConfig::name).collect::<Vec<_>>(),
        ["local", "cyrus1", "dovecot"]
    );
    assert!(
        matches!(&c.stores[1], StoreConfig::Lmtp(l) if l.max_connections == 20 && l.recipients_per_transaction == 10)
    );
    let bad = yaml.replace("max_connections: 20", "max_connections: 0");
    let joined = errors(&bad).join("\n");
    assert!(
        joined.contains("test.yaml:9:3: stores[1]: max_connections: must be at least 1"),
        "{joined}"
    );
    let typo = yaml.replace("    max_connections: 20\n", "    max_conections: 20\n");
    assert!(
        errors(&typo)[0].contains("unknown field `max_conections`"),
        "{:?}",
        errors(&typo)
    );
}

#[test]
fn a_stores_window_loads_with_defaults_and_validates() {
    let yaml = BASE.replace(
        "routes:\n",
        "  - name: cyrus1\n    kind: lmtp\n    address: 127.0.0.1:24\n    max_connections: 20\n    window: { min: 2, max: 10, latency_tolerance: 0.3 }\n  - name: dovecot\n    kind: lmtp\n    address: unix:/run/dovecot/lmtp\nroutes:\n",
    );
    let c = Config::parse(&yaml, "t").unwrap();
    let StoreConfig::Lmtp(l) = &c.stores[1] else {
        panic!("an lmtp store")
    };
    assert!(l.window.latency, "latency steering is on by default");
    assert_eq!(
        (l.window.min, l.window.max, l.window.initial),
        (2, Some(10), None)
    );
    assert!((l.window.latency_tolerance - 0.3).abs() < 1e-9);
    let StoreConfig::Lmtp(d) = &c.stores[2] else {
        panic!("an lmtp store")
    };
    assert_eq!(d.window, crate::delivery::WindowConfig::default());
    for (bad, message) in [
        ("max: 10", "max: 30"),
        ("min: 2", "min: 0"),
        ("latency_tolerance: 0.3", "latency_tolerance: 0"),
        ("min: 2", "min: 2, initial: 11"),
    ]
    .map(|(from, to)| (yaml.replace(from, to), to))
    {
        let joined = errors(&bad).join("\n");
        assert!(joined.contains("stores[1]: window."), "{message}: {joined}");
    }
    let typo = yaml.replace("min: 2", "minimum: 2");
    assert!(
        errors(&typo)[0].contains("unknown field `minimum`"),
        "{:?}",
        errors(&typo)
    );
}

#[test]
fn pipe_and_error_stores_load_and_validate() {
    let yaml = BASE.replace(
        "routes:\n",
        "  - name: lda
    kind: pipe
    argv: [/usr/lib/dovecot/dovecot-lda, -f, \"${sender}\", -a, \"${recipient}\"]
    timeout: 2m
    per_recipient: false
  - name: retired
    kind: error
    reply: \"550 5.1.6 This domain has moved\"
  - { name: paused, kind: error, reply: \"451 4.3.2 Paused\" }
routes:
",
    );
    let c = Config::parse(&yaml, "t").unwrap();
    assert_eq!(
        c.stores.iter().map(StoreConfig::name).collect::<Vec<_>>(),
        ["local", "lda", "retired", "paused"]
    );
    let StoreConfig::Pipe(p) = &c.stores[1] else {
        panic!("{:?}", c.stores[1])
    };
    assert_eq!(p.argv.len(), 5);
    assert_eq!(p.timeout, Span(Duration::from_secs(120)));
    assert!(!p.per_recipient && p.user.is_none());
    assert_eq!(p.max_output, ByteSize(64 << 10));
    assert!(
        matches!(&c.stores[2], StoreConfig::Error { reply, .. } if reply.code().get() == 550 && reply.text() == "This domain has moved")
    );
    assert!(matches!(&c.stores[3], StoreConfig::Error { reply, .. } if reply.is_transient()));

    let cases = [
        (
            yaml.replace("\"550 5.1.6 This domain has moved\"", "\"250 2.0.0 fine\""),
            // Inside a `kind:`-tagged entry serde reports the list, not the entry.
            "test.yaml:6:3: stores: `250 2.0.0 fine`: the reply must be a 4yz or a 5yz",
        ),
        (
            yaml.replace("    timeout: 2m\n", "    user: vmail\n"),
            "test.yaml:9:3: stores[1]: user: running the command as another user is not supported",
        ),
        (
            yaml.replace("[/usr/lib/dovecot/dovecot-lda,", "[dovecot-lda,"),
            "test.yaml:9:3: stores[1]: argv: `dovecot-lda` must be an absolute path",
        ),
        (
            yaml.replace("\"${recipient}\"", "\"${nexthop}\""),
            "test.yaml:9:3: stores[1]: argv: `${nexthop}`: unknown macro",
        ),
        (
            yaml.replace(
                "    per_recipient: false\n",
                "    per_recipient: false\n    shell: true\n",
            ),
            "unknown field `shell`",
        ),
    ];
    for (bad, want) in cases {
        let joined = errors(&bad).join("\n");
        assert!(joined.contains(want), "want {want}\ngot {joined}");
    }
}

#[test]
fn smtp_relay_store_loads_and_validates() {
    let yaml = BASE.replace(
        "routes:\n",
        "  - name: smarthost
    kind: smtp
    address: \"[relay.example.net]:587\"
    tls: { mode: required }
    auth: { username: postern, password_file: /etc/postern/relay.pass }
    timeouts: { ehlo: 1m }
routes:
  relay: smarthost
",
    );
    let yaml = yaml.replace("routes:\n  domains:", "  domains:");
    let c = Config::parse(&yaml, "t").unwrap();
    let StoreConfig::Smtp(s) = &c.stores[1] else {
        panic!("{:?}", c.stores[1])
    };
    assert_eq!(s.name, "smarthost");
    assert_eq!(s.address.to_string(), "relay.example.net:587");
    assert_eq!(s.timeouts.lhlo, Span(Duration::from_secs(60)));
    assert_eq!(c.routes.relay.as_deref(), Some("smarthost"));

    let plain = yaml.replace("    tls: { mode: required }\n", "");
    let joined = errors(&plain).join("\n");
    assert!(
        joined.contains("test.yaml:9:3: stores[1]: auth: needs tls: { mode: required }"),
        "{joined}"
    );
    let unix = yaml.replace("\"[relay.example.net]:587\"", "unix:/run/relay");
    let joined = errors(&unix).join("\n");
    assert!(
        joined.contains("stores[1]: address: an SMTP relay is host:port"),
        "{joined}"
    );
}
