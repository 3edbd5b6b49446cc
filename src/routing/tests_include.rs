//! Routing maps split over included fragments: maps merged and patterns appended in order,
//! a key defined twice named in both places, errors named by fragment file and line, and
//! relative include paths.

use super::tests::{config, fragment, local, router, to};
use super::*;

#[test]
fn included_fragments_merge_maps_and_append_patterns_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = fragment(
        dir.path(),
        "a.yaml",
        "domains:\n  frag.example: { store: local, authoritative: true }\nusers:\n  pinned@frag.example: dovecot\naliases:\n  team@frag.example: [pinned@frag.example, bob@example.org]\nclusters:\n  pair: [cyrus1, cyrus2]\npatterns:\n  - { wildcard: \"list-*@frag.example\", store: lists }\n  - { wildcard: \"*@example.org\", store: cyrus3 }\n",
    );
    let b = fragment(
        dir.path(),
        "b.yaml",
        "# comments only, then patterns\npatterns:\n  - { wildcard: \"*@frag.example\", cluster: pair }\n",
    );
    let r = router(&format!(
        "  include: [{a}, {b}]\n  domains:\n    example.org: {{ store: local }}\n  patterns:\n    - {{ wildcard: \"bob@example.org\", store: bounces }}\n"
    ));
    assert_eq!(
        r.resolve(&to("pinned@frag.example"), false),
        local("dovecot")
    );
    // The main file's pattern first, then a.yaml's, then b.yaml's.
    assert_eq!(r.resolve(&to("bob@example.org"), false), local("bounces"));
    assert_eq!(r.resolve(&to("carol@example.org"), false), local("cyrus3"));
    assert_eq!(r.resolve(&to("list-x@frag.example"), false), local("lists"));
    let pair = cluster::choose(&["cyrus1", "cyrus2"], "other@frag.example").unwrap();
    assert_eq!(r.resolve(&to("other@frag.example"), false), local(pair));
    assert_eq!(
        r.rcpt(&to("team@frag.example"), false),
        RcptRoute::Expand(vec!["pinned@frag.example".into(), "bob@example.org".into()])
    );
    // Explanations name the fragment a rule came from; main-file rules stay as they were.
    let e = r.explain(&to("pinned@frag.example"), false);
    assert_eq!(e.rule, format!("users[pinned@frag.example] (from {a})"));
    let e = r.explain(&to("list-x@frag.example"), false);
    assert_eq!(
        e.rule,
        format!("patterns[1] `list-*@frag.example` (from {a})")
    );
    let e = r.explain(&to("other@frag.example"), false);
    assert_eq!(
        e.rule,
        format!(
            "patterns[3] `*@frag.example` (from {b}) -> clusters[pair] (rendezvous) (from {a})"
        )
    );
    let e = r.explain(&to("bob@example.org"), false);
    assert_eq!(e.rule, "patterns[0] `bob@example.org`");
    let e = r.explain(&to("team@frag.example"), false);
    assert_eq!(e.rule, format!("aliases[team@frag.example] (from {a})"));
}

#[test]
fn a_key_defined_twice_names_both_places() {
    let dir = tempfile::tempdir().unwrap();
    let a = fragment(
        dir.path(),
        "a.yaml",
        "users:\n  x@example.org: local\n  alice@example.org: dovecot\ndomains:\n  Example.ORG: { store: lists }\n",
    );
    let b = fragment(
        dir.path(),
        "b.yaml",
        "aliases:\n  Team@Example.org: x@example.org\nusers:\n\n  x@example.org: lists\n",
    );
    let errors = config(&format!(
        "  include:\n    - {a}\n    - {b}\n  domains:\n    example.org: {{ store: local }}\n  users:\n    alice@example.org: local\n  aliases:\n    team@example.org: alice@example.org\n"
    ))
    .unwrap_err();
    let got: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        [
            format!(
                "{a}:5:3: domains[Example.ORG]: `Example.ORG` is already defined at test.yaml:27: routes.domains[example.org]"
            ),
            format!(
                "{a}:3:3: users[alice@example.org]: `alice@example.org` is already defined at test.yaml:29: routes.users[alice@example.org]"
            ),
            format!(
                "{b}:5:3: users[x@example.org]: `x@example.org` is already defined at {a}:2: users[x@example.org]"
            ),
            format!(
                "{b}:2:3: aliases[Team@Example.org]: `Team@Example.org` is already defined at test.yaml:31: routes.aliases[team@example.org]"
            ),
        ]
    );
}

#[test]
fn errors_in_a_fragment_name_its_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let main = |f: &str| {
        config(&format!(
            "  include: [{f}]\n  domains:\n    example.org: {{ store: local }}\n"
        ))
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
    };
    // A semantic error, found after the merge.
    let f = fragment(
        dir.path(),
        "sem.yaml",
        "# users of example.org\nusers:\n  a@example.org: local\n  b@example.org: nowhere\npatterns:\n  - { wildcard: \"*\" }\n",
    );
    assert_eq!(
        main(&f),
        [
            format!("{f}:4:3: users[b@example.org]: no store or cluster named `nowhere`"),
            format!("{f}:6:3: patterns[0]: give exactly one of `store` and `cluster`"),
        ]
    );
    // A parse error: a nested include is an unknown key (one level only).
    let f = fragment(
        dir.path(),
        "nested.yaml",
        "users:\n  a@example.org: local\ninclude: [other.yaml]\n",
    );
    let got = main(&f);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with(&format!("{f}:3:1: ")) && got[0].contains("unknown field `include`"),
        "{got:?}"
    );
    // A missing file is named at the include line of the main file.
    let missing = dir.path().join("missing.yaml").display().to_string();
    let got = main(&missing);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with(&format!(
            "test.yaml:23:3: routes.include[0]: cannot read `{missing}`: "
        )),
        "{got:?}"
    );
}

#[test]
fn relative_include_paths_are_taken_from_the_working_directory() {
    // Like users_file: relative to the process's working directory (the crate root here).
    let cwd = std::env::current_dir().unwrap();
    let target = cwd.join("target");
    std::fs::create_dir_all(&target).unwrap();
    let dir = tempfile::tempdir_in(&target).unwrap();
    let abs = dir.path().join("rel.yaml");
    std::fs::write(&abs, "users:\n  rel@example.org: dovecot\n").unwrap();
    let relative = abs.strip_prefix(&cwd).unwrap().display().to_string();
    assert!(!relative.starts_with('/'), "{relative}");
    let r = router(&format!(
        "  include: [{relative}]\n  domains:\n    example.org: {{ store: local }}\n"
    ));
    assert_eq!(r.resolve(&to("rel@example.org"), false), local("dovecot"));
}
