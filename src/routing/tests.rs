//! Table tests of every rule kind and their precedence, built from YAML as operators write
//! it (so validation runs too), plus the users file and the error texts. (Included
//! fragments: `tests_include`.)

use std::fmt::Write as _;

use postern_proto::ForwardPath;

use super::*;
use crate::config::Config;

const STORES: &[&str] = &[
    "local", "cyrus1", "cyrus2", "cyrus3", "dovecot", "lists", "bounces", "relay",
];

fn yaml(routes: &str) -> String {
    let mut s = String::from(
        "listeners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n",
    );
    for st in STORES {
        let _ = writeln!(s, "  - name: {st}\n    kind: discard");
    }
    s.push_str("routes:\n");
    s.push_str(routes);
    s
}

pub(super) fn config(routes: &str) -> Result<Config, Vec<crate::config::ConfigError>> {
    Config::parse(&yaml(routes), "test.yaml")
}

pub(super) fn router(routes: &str) -> Router {
    let c = config(routes).unwrap_or_else(|e| panic!("{e:?}"));
    crate::reload::build(&c).unwrap_or_else(|e| panic!("{e:?}"))
}

pub(super) fn to(s: &str) -> ForwardPath {
    if s.eq_ignore_ascii_case("postmaster") {
        return ForwardPath::Postmaster;
    }
    ForwardPath::parse(&format!("<{s}>")).unwrap()
}

pub(super) fn local(s: &str) -> RcptDecision {
    RcptDecision::Local { store: s.into() }
}

const MAP: &str = r#"
  recipient_delimiter: "+-"
  relay: relay
  clusters:
    cyrus: [cyrus1, cyrus2, cyrus3]
  domains:
    example.org: { store: local }
    Corp.Example: { cluster: cyrus, authoritative: true }
    per-user.example: {}
    case.example: { store: local, local_part_case: preserve }
    lists.example: { store: local }
  users:
    Alice@corp.example: cyrus3
    bob@corp.example: cyrus
    carol+special@corp.example: dovecot
    exact@lists.example: dovecot
    known@per-user.example: local
    Mixed@case.example: dovecot
  aliases:
    sales@example.org: [alice@corp.example, bob@corp.example]
    team@example.org: sales@example.org
    outside@example.org: someone@elsewhere.example
    loop1@example.org: loop2@example.org
    loop2@example.org: loop1@example.org
    keep@example.org: [keep@example.org, bob@corp.example]
    "@lists.example": exact@lists.example
    chain1@example.org: chain2@example.org
    chain2@example.org: chain3@example.org
    chain3@example.org: chain4@example.org
    chain4@example.org: final@example.org
    exact@lists.example: [bob@corp.example]
  alias_depth: 3
  patterns:
    - { wildcard: "*@lists.example", store: lists }
    - { regex: "^bounce-[0-9]+@example\\.org$", store: bounces }
    - { wildcard: "dev-*@corp.example", cluster: cyrus }
"#;

#[test]
fn resolve_table_every_rule_and_precedence() {
    let r = router(MAP);
    let bob = cluster::choose(&["cyrus1", "cyrus2", "cyrus3"], "bob@corp.example").unwrap();
    // `-` is a delimiter here: the cluster hashes the mailbox without its extension.
    let dev = cluster::choose(&["cyrus1", "cyrus2", "cyrus3"], "dev@corp.example").unwrap();
    let cases: Vec<(&str, bool, RcptDecision)> = vec![
        // domain store, any case
        ("anyone@example.org", false, local("local")),
        ("anyone@EXAMPLE.ORG", false, local("local")),
        // pins: a store, a cluster; local part folded; extension stripped (both delimiters)
        ("alice@corp.example", false, local("cyrus3")),
        ("ALICE@Corp.Example", false, local("cyrus3")),
        ("alice+news@corp.example", false, local("cyrus3")),
        ("alice-news@corp.example", false, local("cyrus3")),
        ("bob@corp.example", false, local(bob)),
        ("bob+x@corp.example", false, local(bob)),
        // the exact address with its extension wins over the base
        ("carol+special@corp.example", false, local("dovecot")),
        ("carol@corp.example", false, RcptDecision::UnknownUser),
        // authoritative: unknown refused, postmaster always exists (goes to the cluster)
        ("nobody@corp.example", false, RcptDecision::UnknownUser),
        // patterns after exact entries; first match wins; a pattern to a cluster
        ("exact@lists.example", false, local("dovecot")),
        ("any@lists.example", false, local("lists")),
        ("bounce-12@example.org", false, local("bounces")),
        ("bounce-x@example.org", false, local("local")),
        ("dev-x@corp.example", false, local(dev)),
        // per-user domain: only what is listed
        ("known@per-user.example", false, local("local")),
        ("other@per-user.example", false, RcptDecision::UnknownUser),
        ("postmaster@per-user.example", false, local("local")),
        // case policy preserve: exact local part only
        ("Mixed@case.example", false, local("dovecot")),
        ("mixed@case.example", false, local("local")),
        // relay route
        ("x@elsewhere.example", false, RcptDecision::RelayDenied),
        (
            "x@elsewhere.example",
            true,
            RcptDecision::Relay {
                store: "relay".into(),
            },
        ),
        ("x@[192.0.2.1]", false, RcptDecision::RelayDenied),
        ("postmaster", false, local("local")),
    ];
    for (addr, trusted, want) in cases {
        assert_eq!(
            r.resolve(&to(addr), trusted),
            want,
            "{addr} trusted={trusted}"
        );
    }
    let pm = r.resolve(&to("postmaster@corp.example"), false);
    assert!(
        matches!(&pm, RcptDecision::Local { store } if store.starts_with("cyrus")),
        "{pm:?}"
    );
}

#[test]
fn rcpt_table_aliases() {
    let r = router(MAP);
    let expand = |v: &[&str]| RcptRoute::Expand(v.iter().map(|s| (*s).to_owned()).collect());
    let cases: Vec<(&str, bool, RcptRoute)> = vec![
        (
            "anyone@example.org",
            false,
            RcptRoute::Accept(local("local")),
        ),
        // one to many
        (
            "sales@example.org",
            false,
            expand(&["alice@corp.example", "bob@corp.example"]),
        ),
        // recursive; the unmatched extension goes on to the targets
        (
            "team+x@example.org",
            false,
            expand(&["alice+x@corp.example", "bob+x@corp.example"]),
        ),
        // a target elsewhere is relayed even for an untrusted client
        (
            "outside@example.org",
            false,
            expand(&["someone@elsewhere.example"]),
        ),
        // loop and depth are map errors: 451, never a bounce
        (
            "loop1@example.org",
            false,
            RcptRoute::Refuse(RcptDecision::Unavailable),
        ),
        (
            "chain1@example.org",
            false,
            RcptRoute::Refuse(RcptDecision::Unavailable),
        ),
        // itself: delivered there and not expanded again
        (
            "keep@example.org",
            false,
            expand(&["keep@example.org", "bob@corp.example"]),
        ),
        // the alias wins over the pin; the catch-all only for unknown users
        ("exact@lists.example", false, expand(&["bob@corp.example"])),
        (
            "stranger@lists.example",
            false,
            RcptRoute::Accept(local("lists")),
        ),
        (
            "nobody@corp.example",
            false,
            RcptRoute::Refuse(RcptDecision::UnknownUser),
        ),
        (
            "x@elsewhere.example",
            false,
            RcptRoute::Refuse(RcptDecision::RelayDenied),
        ),
    ];
    for (addr, trusted, want) in cases {
        assert_eq!(r.rcpt(&to(addr), trusted), want, "{addr}");
    }
}

#[test]
fn catch_all_takes_unknown_users_of_a_domain_without_patterns() {
    let r = router(
        "  domains:\n    example.org: { store: local, authoritative: true }\n  users:\n    a@example.org: dovecot\n  aliases:\n    \"@example.org\": a@example.org\n",
    );
    assert_eq!(
        r.rcpt(&to("zz@example.org"), false),
        RcptRoute::Expand(vec!["a@example.org".into()])
    );
    assert_eq!(
        r.rcpt(&to("a@example.org"), false),
        RcptRoute::Accept(local("dovecot"))
    );
}

#[test]
fn explanation_names_normal_form_rule_store_and_expansion() {
    let r = router(MAP);
    let e = r.explain(&to("Alice+News@Corp.Example"), false);
    assert_eq!(e.normalised, "alice@corp.example");
    assert_eq!(e.rule, "users[alice@corp.example]");
    assert_eq!(e.decision, Some(local("cyrus3")));
    let e = r.explain(&to("bob@corp.example"), false);
    assert_eq!(
        e.rule,
        "users[bob@corp.example] -> clusters[cyrus] (rendezvous)"
    );
    let e = r.explain(&to("any@lists.example"), false);
    assert_eq!(e.rule, "patterns[0] `*@lists.example`");
    let e = r.explain(&to("team@example.org"), false);
    let text = e.to_string();
    assert!(text.starts_with("team@example.org  normalised=team@example.org  rule=aliases[team@example.org]  alias of 1 address(es)\n  sales@example.org"), "{text}");
    assert!(text.contains("    alice@corp.example  normalised=alice@corp.example  rule=users[alice@corp.example]  store cyrus3"), "{text}");
    let e = r.explain(&to("loop1@example.org"), false);
    assert!(
        e.to_string().contains(
            "error: alias loop: loop1@example.org -> loop2@example.org -> loop1@example.org"
        ),
        "{e}"
    );
    let e = r.explain(&to("chain1@example.org"), false);
    assert!(
        e.to_string().contains(
            "error: alias chain deeper than alias_depth 3 at aliases[chain4@example.org]"
        ),
        "{e}"
    );
}

#[test]
fn an_unavailable_map_answers_451_never_5xx() {
    let r = Router::unavailable("users file unreadable".into());
    for (addr, trusted) in [
        ("a@example.org", false),
        ("x@elsewhere.example", true),
        ("postmaster", false),
    ] {
        assert_eq!(
            r.resolve(&to(addr), trusted),
            RcptDecision::Unavailable,
            "{addr}"
        );
        assert_eq!(
            r.rcpt(&to(addr), trusted),
            RcptRoute::Refuse(RcptDecision::Unavailable),
            "{addr}"
        );
    }
}

#[test]
fn users_file_entries_load_and_yaml_entries_win() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.txt");
    std::fs::write(
        &file,
        "# comment\nAlice@Corp.Example cyrus1\n\nbob@corp.example   cyrus   # to the cluster\nzed@corp.example dovecot\n",
    )
    .unwrap();
    let r = router(&format!(
        "  users_file: {}\n  clusters:\n    cyrus: [cyrus1, cyrus2]\n  domains:\n    corp.example: {{ store: local, authoritative: true }}\n  users:\n    zed@corp.example: lists\n",
        file.display()
    ));
    assert_eq!(r.user_count(), 3);
    assert_eq!(r.resolve(&to("alice@corp.example"), false), local("cyrus1"));
    assert_eq!(r.resolve(&to("zed@corp.example"), false), local("lists"));
    let bob = cluster::choose(&["cyrus1", "cyrus2"], "bob@corp.example").unwrap();
    assert_eq!(r.resolve(&to("bob@corp.example"), false), local(bob));
}

#[test]
fn users_file_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.txt");
    std::fs::write(
        &file,
        "ok@corp.example local\nbad-line\nx@elsewhere.example local\ny@corp.example nowhere\n",
    )
    .unwrap();
    let c = config(&format!(
        "  users_file: {}\n  domains:\n    corp.example: {{ store: local }}\n",
        file.display()
    ))
    .unwrap();
    let errors: Vec<String> = crate::reload::build(&c)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    let f = file.display();
    assert_eq!(
        errors,
        [
            format!("{f}:2: routes.users_file: expected `user@domain store` (two fields)"),
            format!(
                "{f}:3: routes.users_file: `x@elsewhere.example`: the domain is not in routes.domains"
            ),
            format!(
                "{f}:4: routes.users_file: `y@corp.example`: no store or cluster named `nowhere`"
            ),
        ]
    );
    // Router::new turns a map that does not build into an unavailable one.
    let r = Router::new(&c.routes);
    assert!(r.unavailable_reason().is_some());
}

#[test]
fn validation_errors_name_line_and_key() {
    let cases = [
        (
            "  domains:\n    example.org: { store: local, cluster: c }\n",
            "test.yaml:24:5: routes.domains[example.org]: give `store` or `cluster`, not both",
        ),
        (
            "  domains:\n    example.org: { cluster: nope }\n",
            "test.yaml:24:5: routes.domains[example.org].cluster: no cluster named `nope`",
        ),
        (
            "  clusters:\n    c: [cyrus1, gone]\n",
            "test.yaml:24:5: routes.clusters[c][1]: no store named `gone`",
        ),
        (
            "  clusters:\n    local: [cyrus1]\n",
            "test.yaml:24:5: routes.clusters[local]: `local` is also a store name",
        ),
        (
            "  domains:\n    example.org: { store: local }\n  patterns:\n    - { regex: \"^(x\", store: local }\n",
            "test.yaml:26:5: routes.patterns[0].regex: bad regex: ",
        ),
        (
            "  domains:\n    example.org: { store: local }\n  patterns:\n    - { wildcard: \"*\" }\n",
            "test.yaml:26:5: routes.patterns[0]: give exactly one of `store` and `cluster`",
        ),
        (
            "  domains:\n    example.org: { store: local }\n  aliases:\n    a@elsewhere.example: b@example.org\n",
            "test.yaml:26:5: routes.aliases[a@elsewhere.example]: `elsewhere.example` is not in routes.domains",
        ),
        (
            "  domains:\n    example.org: { store: local }\n  aliases:\n    a@example.org: [\"not an address\"]\n",
            "test.yaml:26:5: routes.aliases[a@example.org][0]: `not an address` is not an address user@domain",
        ),
        (
            "  domains:\n    example.org: { store: local }\n  users:\n    a@example.org: nowhere\n",
            "test.yaml:26:5: routes.users[a@example.org]: no store or cluster named `nowhere`",
        ),
        (
            "  alias_depth: 0\n",
            "test.yaml:23:3: routes.alias_depth: must be at least 1",
        ),
        (
            "  domains:\n    example.org: { stor: local }\n",
            "test.yaml:24:20: routes.domains.example.org: unknown field `stor`",
        ),
    ];
    for (routes, want) in cases {
        let errors = config(routes).unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().any(|e| e.starts_with(want)),
            "want {want}\ngot {text:#?}"
        );
    }
}

#[test]
fn a_thousand_stores_and_a_hundred_clusters_in_one_map() {
    let stores: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    let mut text = String::from(
        "listeners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\nstores:\n",
    );
    for s in &stores {
        let _ = writeln!(text, "  - {{ name: {s}, kind: discard }}");
    }
    text.push_str("routes:\n  clusters:\n");
    for c in 0..100 {
        let members: Vec<&str> = stores[c * 10..c * 10 + 10]
            .iter()
            .map(String::as_str)
            .collect();
        let _ = writeln!(text, "    c{c}: [{}]", members.join(", "));
    }
    text.push_str("  domains:\n");
    for c in 0..100 {
        let _ = writeln!(text, "    d{c}.example: {{ cluster: c{c} }}");
    }
    let config = Config::parse(&text, "big.yaml").unwrap_or_else(|e| panic!("{e:?}"));
    let r = crate::reload::build(&config).unwrap();
    assert_eq!(r.store_names().count(), 1000);
    let mut seen = std::collections::HashSet::new();
    for c in 0..100 {
        for u in 0..50 {
            let d = r.resolve(&to(&format!("u{u}@d{c}.example")), false);
            let store = d.store().unwrap().to_owned();
            let n: usize = store[1..].parse().unwrap();
            assert_eq!(n / 10, c, "d{c} goes to its own cluster's stores");
            seen.insert(store);
        }
    }
    assert!(
        seen.len() > 950,
        "50 users per 10-store cluster reach most stores: {}",
        seen.len()
    );
}

#[test]
fn an_unmatched_extension_goes_on_to_the_alias_targets() {
    let map = "  relay: relay\n  domains:\n    example.org: { store: local }\n    corp.example: { store: cyrus1, authoritative: true }\n  users:\n    alice@corp.example: cyrus2\n    bob@corp.example: cyrus3\n    carol@corp.example: dovecot\n  aliases:\n    team@example.org: [alice@corp.example, bob+fixed@corp.example, someone@elsewhere.example]\n    team+exact@example.org: carol@corp.example\n    group@example.org: team@example.org\n";
    let r = router(map);
    let cases: Vec<(&str, Vec<&str>)> = vec![
        // no extension: nothing to propagate
        (
            "team@example.org",
            vec![
                "alice@corp.example",
                "bob+fixed@corp.example",
                "someone@elsewhere.example",
            ],
        ),
        // propagated, except to a target that has an extension of its own
        (
            "team+x@example.org",
            vec![
                "alice+x@corp.example",
                "bob+fixed@corp.example",
                "someone+x@elsewhere.example",
            ],
        ),
        // the extension as the client wrote it
        (
            "Team+News@Example.org",
            vec![
                "alice+News@corp.example",
                "bob+fixed@corp.example",
                "someone+News@elsewhere.example",
            ],
        ),
        // an extension that matched an entry itself is not propagated
        ("team+exact@example.org", vec!["carol@corp.example"]),
        // an extension that would not make an address: the targets as written
        (
            "\"team+a b\"@example.org",
            vec![
                "alice@corp.example",
                "bob+fixed@corp.example",
                "someone@elsewhere.example",
            ],
        ),
        // through a chain: group+y -> team+y -> alice+y, ...
        (
            "group+y@example.org",
            vec![
                "alice+y@corp.example",
                "bob+fixed@corp.example",
                "someone+y@elsewhere.example",
            ],
        ),
    ];
    for (addr, want) in &cases {
        let want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(r.rcpt(&to(addr), false), RcptRoute::Expand(want), "{addr}");
    }
    // The targets with the extension route like their mailbox.
    let e = r.explain(&to("team+x@example.org"), false);
    let text = e.to_string();
    assert!(
        text.contains("  alice+x@corp.example  normalised=alice@corp.example  rule=users[alice@corp.example]  store cyrus2"),
        "{text}"
    );
    // Switched off: the targets as written.
    let r = router(&format!("  propagate_extensions: false\n{map}"));
    assert_eq!(
        r.rcpt(&to("team+x@example.org"), false),
        RcptRoute::Expand(vec![
            "alice@corp.example".into(),
            "bob+fixed@corp.example".into(),
            "someone@elsewhere.example".into(),
        ])
    );
}

#[test]
fn case_variants_are_duplicates_unless_the_domain_preserves_case() {
    let dir = tempfile::tempdir().unwrap();
    let f = fragment(
        dir.path(),
        "f.yaml",
        "users:\n  mixed@case.example: dovecot\n  ALICE@example.org: dovecot\n",
    );
    let errors = config(&format!(
        "  include: [{f}]\n  domains:\n    example.org: {{ store: local }}\n    case.example: {{ store: local, local_part_case: preserve }}\n  users:\n    Mixed@case.example: lists\n    alice@Example.ORG: lists\n"
    ))
    .unwrap_err();
    let got: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        [format!(
            "{f}:3:3: users[ALICE@example.org]: `ALICE@example.org` is already defined at test.yaml:29: routes.users[alice@Example.ORG]"
        )]
    );
}

/// Writes `name` in `dir` and returns its path as written in YAML.
pub(super) fn fragment(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}
