//! Tests of address parsing: mailboxes, paths, length limits, case folding and unquoting.

use super::*;

#[test]
fn mailboxes() {
    let ok: &[(&str, &str, &str)] = &[
        ("alice@example.org", "alice", "example.org"),
        (
            "Alice.Smith+tag@Example.ORG",
            "Alice.Smith+tag",
            "Example.ORG",
        ),
        ("\"john doe\"@example.org", "\"john doe\"", "example.org"),
        ("\"a\\\"b\"@x", "\"a\\\"b\"", "x"),
        ("\"a@b\"@x", "\"a@b\"", "x"),
        ("user@[192.0.2.1]", "user", "[192.0.2.1]"),
        ("user@[IPv6:2001:db8::1]", "user", "[IPv6:2001:db8::1]"),
        ("user@[x-tag:abc]", "user", "[x-tag:abc]"),
        ("üser@bücher.example", "üser", "bücher.example"),
        ("a!#$%&'*/=?^_`{|}~-@x.y", "a!#$%&'*/=?^_`{|}~-", "x.y"),
    ];
    for (input, local, domain) in ok {
        let m = Mailbox::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(m.local_part(), *local, "{input}");
        assert_eq!(m.domain().to_string(), *domain, "{input}");
        assert_eq!(m.to_string(), *input);
    }
    let bad: &[(&str, AddressError)] = &[
        ("alice", AddressError::MissingDomain),
        ("@example.org", AddressError::BadLocalPart),
        ("a..b@x", AddressError::BadLocalPart),
        (".a@x", AddressError::BadLocalPart),
        ("a b@x", AddressError::BadLocalPart),
        ("\"unterminated@x", AddressError::BadLocalPart),
        ("\"a\"b@x", AddressError::MissingDomain),
        ("a@", AddressError::BadDomain),
        ("a@-x.org", AddressError::BadDomain),
        ("a@x..org", AddressError::BadDomain),
        ("a@x_y.org", AddressError::BadDomain),
        ("a@[300.1.1.1]", AddressError::BadDomain),
        ("a@[IPv6:zz::1]", AddressError::BadDomain),
        ("a@[192.0.2.1", AddressError::BadDomain),
    ];
    for (input, err) in bad {
        assert_eq!(Mailbox::parse(input), Err(*err), "{input}");
    }
}

#[test]
fn length_limits() {
    let local = "a".repeat(64);
    assert!(Mailbox::parse(&format!("{local}@x")).is_ok());
    assert_eq!(
        Mailbox::parse(&format!("a{local}@x")),
        Err(AddressError::LocalPartTooLong)
    );
    let label = "b".repeat(63);
    let domain = [label.as_str(); 4].join(".");
    assert_eq!(domain.len(), 255);
    assert!(Domain::parse(&domain).is_ok());
    assert_eq!(
        Domain::parse(&format!("c{domain}")),
        Err(AddressError::DomainTooLong)
    );
    assert_eq!(Domain::parse(&"b".repeat(64)), Err(AddressError::BadDomain));
    let path = format!("<{}@{}>", "a".repeat(64), vec!["b".repeat(60); 3].join("."));
    assert!(path.len() <= MAX_PATH);
    assert!(ForwardPath::parse(&path).is_ok());
    let long = format!("<{}@{}>", "a".repeat(64), domain);
    assert_eq!(ForwardPath::parse(&long), Err(AddressError::PathTooLong));
}

#[test]
fn paths() {
    assert_eq!(ReversePath::parse("<>"), Ok(ReversePath::Null));
    assert_eq!(
        ForwardPath::parse("<POSTMASTER>"),
        Ok(ForwardPath::Postmaster)
    );
    assert_eq!(
        ForwardPath::parse("alice@x"),
        Err(AddressError::MissingBrackets)
    );
    assert_eq!(ForwardPath::parse("<>"), Err(AddressError::BadLocalPart));
    let routed = ForwardPath::parse("<@a.example,@b.example:joe@c.example>").unwrap();
    assert_eq!(routed.to_string(), "<joe@c.example>");
    assert_eq!(
        ForwardPath::parse("<@a.example:>"),
        Err(AddressError::BadLocalPart)
    );
    assert_eq!(
        ForwardPath::parse("<@:joe@x>"),
        Err(AddressError::BadSourceRoute)
    );
    assert_eq!(
        ForwardPath::parse("<@a joe@x>"),
        Err(AddressError::BadSourceRoute)
    );
    assert_eq!(ReversePath::parse("<a@x>").unwrap().to_string(), "<a@x>");
}

#[test]
fn folding_keeps_spelling() {
    let a = Domain::parse("Example.ORG").unwrap();
    let b = Domain::parse("example.org").unwrap();
    assert!(a.eq_folded(&b));
    assert_eq!(a.to_string(), "Example.ORG");
    assert_eq!(a.folded(), "example.org");
    let u = Domain::parse("BÜCHER.example").unwrap();
    assert_eq!(u.folded(), "bücher.example");
    assert!(!u.is_ascii());
    assert!(u.eq_folded(&Domain::parse("bücher.EXAMPLE").unwrap()));
}

#[test]
fn unquoting() {
    let m = Mailbox::parse("\"john \\\"jd\\\" doe\"@x").unwrap();
    assert_eq!(m.local_part_unquoted(), "john \"jd\" doe");
    assert_eq!(
        Mailbox::parse("plain@x").unwrap().local_part_unquoted(),
        "plain"
    );
}
