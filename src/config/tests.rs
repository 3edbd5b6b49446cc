//! Unit tests of the configuration: the embedded default, defaults and units, every error
//! listed and located (file, line, key path, a suggestion), and each section's keys and
//! bounds. (The stores' sections: `tests_stores`.)

use std::time::Duration;

use super::*;

pub(super) fn errors(yaml: &str) -> Vec<String> {
    Config::parse(yaml, "test.yaml")
        .expect_err("should fail")
        .iter()
        .map(ToString::to_string)
        .collect()
}

pub(super) const BASE: &str = "\
listeners:
  - name: smtp
    address: 127.0.0.1:2525
    protocol: smtp
stores:
  - name: local
    kind: maildir
    root: /tmp/mail
routes:
  domains:
    example.org: { store: local }
";

#[test]
fn embedded_default_is_valid_and_safe() {
    let c = Config::embedded().unwrap();
    assert_eq!(c.listeners.len(), 1);
    let l = &c.listeners[0];
    assert_eq!(
        l.address,
        ListenAddress::Tcp("127.0.0.1:2525".parse().unwrap())
    );
    assert_eq!(l.protocol, ListenerProtocol::Smtp);
    assert!(
        l.trusted_networks.is_empty(),
        "never an open relay by default"
    );
    assert_eq!(c.metrics.address, "127.0.0.1:9325".parse().unwrap());
    assert_eq!(c.spool.path, PathBuf::from("./var/spool"));
    assert!(
        c.routes.domains.contains_key("example.org") && c.routes.domains.contains_key("localhost")
    );
    assert!(
        matches!(&c.stores[0], StoreConfig::Maildir { root, .. } if root == Path::new("./var/mail"))
    );
}

#[test]
fn defaults_and_units() {
    let yaml = BASE.replace(
        "    protocol: smtp\n",
        "    protocol: smtp\n    max_message_size: 10MiB\n    timeouts: { command: 2m, data: 90s }\n    trusted_networks: [10.0.0.0/8, \"::1/128\"]\n",
    );
    let c = Config::parse(&yaml, "t").unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.max_message_size, ByteSize(10 << 20));
    assert_eq!(l.timeouts.command, Span(Duration::from_secs(120)));
    assert_eq!(l.timeouts.data, Span(Duration::from_secs(90)));
    assert_eq!(l.timeouts.session, Span(Duration::from_secs(3600)));
    assert_eq!(l.trusted_networks.len(), 2);
    assert_eq!(l.max_recipients, 1000);
    assert_eq!(l.bare_line_endings, BareLineEndingsPolicy::Normalize);
    assert_eq!(l.mode, ListenerMode::Spool, "store and forward unless told");
    assert_eq!(l.proxy_wait, Span(Duration::from_secs(2)));
    assert_eq!(c.node_id, 1);
}

#[test]
fn proxy_mode_and_its_wait() {
    let yaml = BASE.replace(
        "    protocol: smtp\n",
        "    protocol: smtp\n    mode: proxy\n    proxy_wait: 750ms\n",
    );
    let c = Config::parse(&yaml, "t").unwrap();
    assert_eq!(c.listeners[0].mode, ListenerMode::Proxy);
    assert_eq!(c.listeners[0].proxy_wait, Span(Duration::from_millis(750)));
    let e = errors(&BASE.replace(
        "    protocol: smtp\n",
        "    protocol: smtp\n    mode: cut\n",
    ));
    assert!(
        e[0].starts_with("test.yaml:5:11: listeners[0].mode: unknown variant `cut`"),
        "{}",
        e[0]
    );
}

#[test]
fn unknown_key_names_file_line_and_path() {
    let yaml = BASE.replace(
        "    protocol: smtp\n",
        "    protocol: smtp\n    max_conections: 5\n",
    );
    let e = errors(&yaml);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("test.yaml:5:5: listeners[0]: unknown field `max_conections`"),
        "{}",
        e[0]
    );
}

#[test]
fn every_error_of_a_file_is_listed_not_only_the_first() {
    let yaml = BASE.replace(
        "    protocol: smtp\n",
        "    protocol: smtp\n    max_conections: 5\n    max_errors: lots\n",
    ) + "hostnme: mx.example\ndrain_timeout: 5 parsecs\n";
    let e = errors(&yaml);
    assert_eq!(e.len(), 4, "{e:#?}");
    assert!(
        e[0].starts_with("test.yaml:5:5: listeners[0]: unknown field `max_conections`")
            && e[0].ends_with("; did you mean `max_connections`?"),
        "{e:#?}"
    );
    assert!(
        e[1].starts_with("test.yaml:6:5: listeners[0].max_errors: invalid type"),
        "{e:#?}"
    );
    assert!(
        e[2].starts_with("test.yaml:14:1: unknown field `hostnme`")
            && e[2].ends_with("; did you mean `hostname`?"),
        "{e:#?}"
    );
    assert!(
        e[3].starts_with("test.yaml:15:1: drain_timeout: "),
        "{e:#?}"
    );
}

#[test]
fn semantic_errors_are_listed_with_the_parse_errors_in_file_order() {
    let yaml = BASE.replace(
        "    protocol: smtp\n",
        "    protocol: smtp\n    max_errors: 0\n    tmeouts: {}\n",
    );
    let e = errors(&yaml);
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[1].contains("unknown field `tmeouts`") && e[1].contains("did you mean `timeouts`?"),
        "{e:#?}"
    );
    assert!(
        e[0].starts_with("test.yaml:5:5: listeners[0].max_errors: must be at least 1"),
        "{e:#?}"
    );
}

#[test]
fn a_yaml_syntax_error_is_the_only_error() {
    let e = errors("listeners: [\n  - name: x\n");
    assert_eq!(e.len(), 1, "{e:#?}");
}

#[test]
fn an_unknown_value_gets_a_suggestion_too() {
    let e = errors(&BASE.replace("protocol: smtp", "protocol: lmpt"));
    assert!(e[0].ends_with("; did you mean `lmtp`?"), "{e:#?}");
    let e = errors(&BASE.replace("protocol: smtp", "protocol: carrier"));
    assert!(!e[0].contains("did you mean"), "{e:#?}");
}

#[test]
fn bad_values_are_located() {
    let e = errors(&BASE.replace("protocol: smtp", "protocol: smtpx"));
    assert!(
        e[0].starts_with("test.yaml:4:15: listeners[0].protocol: unknown variant `smtpx`"),
        "{}",
        e[0]
    );
    let e = errors(&BASE.replace(
        "protocol: smtp\n",
        "protocol: smtp\n    max_message_size: 5 furlongs\n",
    ));
    assert!(
        e[0].contains(
            "test.yaml:5:23: listeners[0].max_message_size: unknown size unit `furlongs`"
        ),
        "{}",
        e[0]
    );
    let e = errors(&BASE.replace("127.0.0.1:2525", "localhost:25x"));
    assert!(
        e[0].contains("test.yaml:3:14: listeners[0].address: `localhost:25x` is not an address"),
        "{}",
        e[0]
    );
    let e = errors(&BASE.replace("kind: maildir", "kind: carrier-pigeon"));
    assert!(
        e[0].contains("stores[0]") && e[0].contains("carrier-pigeon"),
        "{}",
        e[0]
    );
}

#[test]
fn semantic_errors_are_located() {
    let yaml = "\
listeners:
  - name: smtp
    address: 127.0.0.1:2525
    protocol: smtp
  - name: lmtp
    address: 127.0.0.1:25
    protocol: lmtp
    tls:
      cert: /nonexistent/cert.pem
      key: /nonexistent/key.pem
stores:
  - name: local
    kind: maildir
    root: /tmp/mail
routes:
  domains:
    example.org: { store: nowhere }
  relay: gone
";
    let joined = errors(yaml).join("\n");
    assert!(
        joined.contains("test.yaml:7:5: listeners[1].protocol: LMTP is never offered on port 25"),
        "{joined}"
    );
    assert!(
        joined.contains(
            "test.yaml:9:7: listeners[1].tls.cert: `/nonexistent/cert.pem` is not a readable file"
        ),
        "{joined}"
    );
    assert!(
        joined.contains("test.yaml:10:7: listeners[1].tls.key:"),
        "{joined}"
    );
    assert!(
        joined.contains(
            "test.yaml:17:5: routes.domains[example.org].store: no store named `nowhere`"
        ),
        "{joined}"
    );
    assert!(
        joined.contains("test.yaml:18:3: routes.relay: no store named `gone`"),
        "{joined}"
    );
}

#[test]
fn duplicates_and_bounds() {
    let yaml = BASE.replace(
        "stores:\n",
        "  - name: smtp\n    address: 127.0.0.1:2525\n    protocol: smtp\n    max_connections: 0\nstores:\n",
    );
    let joined = errors(&yaml).join("\n");
    assert!(
        joined.contains("test.yaml:5:5: listeners[1].name: duplicate listener name `smtp`"),
        "{joined}"
    );
    assert!(
        joined.contains(
            "test.yaml:6:5: listeners[1].address: `127.0.0.1:2525` is used by another listener"
        ),
        "{joined}"
    );
    assert!(
        joined.contains("test.yaml:8:5: listeners[1].max_connections: must be at least 1"),
        "{joined}"
    );
    let joined = errors(&format!("node_id: 70000\n{BASE}")).join("\n");
    assert!(
        joined.contains("test.yaml:1:10: node_id: invalid value: integer `70000`"),
        "{joined}"
    );
}

#[test]
fn locate_paths() {
    let text =
        "a:\n  b:\n    - x: 1\n      y: 2\n    - x: 3\n      z:\n        w: 4\nc: { d: 1 }\n";
    assert_eq!(locate::line_of(text, "a.b[0].y"), Some(4));
    assert_eq!(locate::line_of(text, "a.b[1].x"), Some(5));
    assert_eq!(locate::line_of(text, "a.b[1].z.w"), Some(7));
    assert_eq!(
        locate::line_of(text, "c.d"),
        Some(8),
        "flow mapping: its line"
    );
    assert_eq!(locate::line_of(text, "nope"), None);
    let zero_indent = "list:\n- name: a\n- name: b\n  port: 2\n";
    assert_eq!(locate::line_of(zero_indent, "list[1].port"), Some(4));
}

#[test]
fn unreadable_file_is_reported() {
    let e = Config::load(Path::new("/nonexistent/postern.yaml")).unwrap_err();
    assert!(
        e[0].to_string()
            .starts_with("/nonexistent/postern.yaml: cannot read"),
        "{}",
        e[0]
    );
}

#[test]
fn delivery_section_is_validated_with_its_key_path() {
    let yaml = format!("{BASE}delivery:\n  minimal_backoff: 10m\n  maximal_backoff: 5m\n");
    let joined = errors(&yaml).join("\n");
    assert!(
        joined.contains("delivery.maximal_backoff: must not be less than minimal_backoff"),
        "{joined}"
    );
    let yaml = format!("{BASE}delivery:\n  shards: 0\n");
    let joined = errors(&yaml).join("\n");
    assert!(
        joined.contains("delivery.shards: must be at least 1"),
        "{joined}"
    );
}

#[test]
fn admin_socket_defaults_to_the_spool_and_can_be_set() {
    let c = Config::parse(&format!("spool:\n  path: /var/spool/p\n{BASE}"), "t.yaml").unwrap();
    assert_eq!(
        c.admin_socket(),
        std::path::PathBuf::from("/var/spool/p/admin.sock")
    );
    let c = Config::parse(
        &format!("admin:\n  socket: /run/postern/admin.sock\n{BASE}"),
        "t.yaml",
    )
    .unwrap();
    assert_eq!(
        c.admin_socket(),
        std::path::PathBuf::from("/run/postern/admin.sock")
    );
    let e = errors(&format!("admin:\n  sockett: /x\n{BASE}"));
    assert!(
        e[0].contains("test.yaml:2:3: admin: unknown field `sockett`"),
        "{e:?}"
    );
}

#[test]
fn no_routes_section_means_the_defaults_of_an_empty_one() {
    let base = BASE.split("routes:").next().unwrap_or_default().to_owned();
    let without = Config::parse(&base, "t.yaml").unwrap_or_else(|e| panic!("{e:?}"));
    let empty = Config::parse(&format!("{base}routes: {{}}\n"), "t.yaml")
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(without.routes, empty.routes);
    assert_eq!(without.routes, crate::config::RoutesConfig::default());
    assert_eq!(without.routes.alias_depth, 8);
    assert!(without.routes.propagate_extensions);
}

#[test]
fn poison_unroutable_and_double_bounce_keys_default_and_validate() {
    let c = Config::parse(BASE, "test.yaml").unwrap();
    assert_eq!(c.double_bounce, None);
    assert_eq!(c.delivery.poison_attempts, 5);
    assert_eq!(c.routes.unroutable_grace, Span(Duration::from_secs(86_400)));
    let yaml = format!(
        "double_bounce: admin@example.org\ndelivery:\n  poison_attempts: 0\n{}  unroutable_grace: 2h\n",
        BASE
    );
    let c = Config::parse(&yaml, "test.yaml").unwrap();
    assert_eq!(c.double_bounce.as_deref(), Some("admin@example.org"));
    assert_eq!(c.delivery.poison_attempts, 0);
    assert_eq!(c.routes.unroutable_grace, Span(Duration::from_secs(7200)));
    let e = errors(&format!("double_bounce: not an address\n{BASE}"));
    assert!(e.iter().any(|l| l.contains("double_bounce")), "{e:?}");
}

#[test]
fn edge_keys_load_with_defaults_and_validate() {
    let yaml = BASE.replace(
        "routes:\n",
        "  - name: cyrus1\n    kind: lmtp\n    address: 127.0.0.1:24\n    verify_recipients: true\n    verify_tempfail_action: accept\n    backpressure: { max_queued: 5000, max_oldest: 30m }\n  - name: dovecot\n    kind: lmtp\n    address: unix:/run/dovecot/lmtp\nroutes:\n",
    );
    let c = Config::parse(&yaml, "t").unwrap();
    assert_eq!(c.verify_cache, crate::edge::VerifyCacheConfig::default());
    assert_eq!(
        (
            c.verify_cache.positive.0,
            c.verify_cache.negative.0,
            c.verify_cache.max_entries
        ),
        (
            Duration::from_secs(3600),
            Duration::from_secs(600),
            1_000_000
        )
    );
    let StoreConfig::Lmtp(l) = &c.stores[1] else {
        panic!("an lmtp store")
    };
    let edge = l.edge();
    let verify = edge.verify.unwrap();
    assert_eq!(verify.timeout, Duration::from_secs(5));
    assert_eq!(verify.tempfail, crate::edge::TempfailAction::Accept);
    assert_eq!(edge.backpressure.max_queued, Some(5000));
    assert_eq!(
        edge.backpressure.max_oldest.map(|s| s.0),
        Some(Duration::from_secs(1800))
    );
    let StoreConfig::Lmtp(d) = &c.stores[2] else {
        panic!("an lmtp store")
    };
    assert_eq!(
        d.edge(),
        crate::edge::EdgeSettings::default(),
        "off by default"
    );

    for (from, to, key) in [
        (
            "max_queued: 5000",
            "max_queued: 0",
            "stores[1]: backpressure.max_queued",
        ),
        (
            "max_oldest: 30m",
            "max_oldest: 0s",
            "stores[1]: backpressure.max_oldest",
        ),
        (
            "verify_recipients: true",
            "verify_timeout: 0s",
            "stores[1]: verify_timeout",
        ),
    ] {
        let joined = errors(&yaml.replace(from, to)).join("\n");
        assert!(joined.contains(key), "{to}: {joined}");
    }
    let typo = yaml.replace("accept", "bounce");
    assert!(
        errors(&typo)[0].contains("unknown variant `bounce`, expected `tempfail` or `accept`"),
        "{:?}",
        errors(&typo)
    );
    let cache = format!("verify_cache: {{ positive: 2h, max_entries: 10 }}\n{yaml}");
    let c = Config::parse(&cache, "t").unwrap();
    assert_eq!(c.verify_cache.positive.0, Duration::from_secs(7200));
    assert_eq!(c.verify_cache.max_entries, 10);
}

#[test]
fn worker_threads_default_to_the_runtimes_own_and_validate() {
    let c = Config::parse(BASE, "t.yaml").unwrap();
    assert_eq!(c.worker_threads, None, "tokio's default: one for each CPU");
    let c = Config::parse(&format!("worker_threads: 3\n{BASE}"), "t.yaml").unwrap();
    assert_eq!(c.worker_threads, Some(3));
    for bad in ["0", "1025"] {
        let joined = errors(&format!("worker_threads: {bad}\n{BASE}")).join("\n");
        assert!(
            joined.contains("worker_threads: must be between 1 and 1024"),
            "{joined}"
        );
    }
}
