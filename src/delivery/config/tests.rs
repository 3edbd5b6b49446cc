//! Tests of the store configuration: a full example, the defaults, addresses, timestamps,
//! and errors that name the key.
#![allow(clippy::unwrap_used, reason = "tests")]

use super::*;

/// As the lead's `stores:` will hold it: internally tagged by `kind`.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum Store {
    Lmtp(LmtpStoreConfig),
}

fn load(yaml: &str) -> Result<LmtpStoreConfig, String> {
    let Store::Lmtp(c) = serde_yaml::from_str::<Store>(yaml).map_err(|e| e.to_string())?;
    c.validate()?;
    Ok(c)
}

#[test]
fn full_example() {
    let c = load(
        r#"
kind: lmtp
name: cyrus1
address: 10.0.0.5:24
max_connections: 4
recipients_per_transaction: 20
tls: { mode: required, ca_file: /etc/ca.pem }
auth: { username: admin, password_file: /etc/pw }
timeouts: { connect: 5s, end_of_data: 1m }
idle_timeout: 30s
reuse_limit: 2m
chunking: false
chunk_size: 64KiB
normalize:
  - { code: 552, enhanced: "5.2.2", treat_as: temporary, max_age: 2d }
  - { code: 550, treat_as: temporary, until: "2026-05-01T06:00:00Z" }
"#,
    )
    .unwrap();
    assert_eq!(
        c.address,
        StoreAddress::Tcp {
            host: "10.0.0.5".into(),
            port: 24
        }
    );
    assert_eq!(c.max_connections, 4);
    assert_eq!(c.tls.as_ref().unwrap().mode, TlsMode::Required);
    assert_eq!(c.timeouts.connect.0, Duration::from_secs(5));
    assert_eq!(c.timeouts.lhlo.0, Duration::from_secs(300));
    assert_eq!(c.timeouts.end_of_data.0, Duration::from_secs(60));
    assert_eq!(c.chunk_size.0, 65_536);
    assert_eq!(c.normalize.len(), 2);
    assert_eq!(c.normalize[0].max_age.unwrap().0.as_secs(), 172_800);
    let until = c.normalize[1].until.unwrap().0;
    let secs = until
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(secs, 1_777_615_200);
}

#[test]
fn defaults() {
    let c = load("kind: lmtp\nname: d\naddress: unix:/run/dovecot/lmtp\n").unwrap();
    assert_eq!(c.address, StoreAddress::Unix("/run/dovecot/lmtp".into()));
    assert_eq!(c.recipients_per_transaction, 50);
    assert_eq!(c.max_connections, 10);
    assert_eq!(c.reuse_limit.0, Duration::from_secs(2));
    assert_eq!(c.timeouts.data.0, Duration::from_secs(120));
    assert_eq!(c.timeouts.end_of_data.0, Duration::from_secs(600));
    assert!(c.chunking && c.tls.is_none() && c.normalize.is_empty());
}

#[test]
fn errors_name_the_key() {
    let cases = [
        ("kind: lmtp\nname: x\naddress: nowhere\n", "host:port"),
        ("kind: lmtp\nname: x\naddress: unix:rel\n", "absolute"),
        (
            "kind: lmtp\nname: x\naddress: h:1\nbogus: 1\n",
            "unknown field",
        ),
        (
            "kind: lmtp\nname: x\naddress: h:1\ntimeouts: { data: 5 fortnights }\n",
            "unknown duration unit",
        ),
        (
            "kind: lmtp\nname: x\naddress: h:1\nmax_connections: 0\n",
            "max_connections",
        ),
        (
            "kind: lmtp\nname: x\naddress: h:1\nnormalize: [{ treat_as: maybe }]\n",
            "unknown variant",
        ),
        (
            "kind: lmtp\nname: x\naddress: h:1\nnormalize: [{ treat_as: temporary, until: tomorrow }]\n",
            "UTC time",
        ),
        (
            "kind: lmtp\nname: x\naddress: h:1\ntls: { mode: required, ca_file: /a, insecure_skip_verify: true }\n",
            "exclude",
        ),
    ];
    for (yaml, want) in cases {
        let err = load(yaml).unwrap_err();
        assert!(err.contains(want), "{yaml}: {err}");
    }
}

#[test]
fn addresses() {
    let ok = [
        ("127.0.0.1:24", "127.0.0.1:24"),
        ("store.example:2003", "store.example:2003"),
        ("[::1]:24", "[::1]:24"),
        ("unix:/var/run/lmtp", "unix:/var/run/lmtp"),
    ];
    for (s, shown) in ok {
        assert_eq!(StoreAddress::parse(s).unwrap().to_string(), shown);
    }
    for s in ["", "host", "host:0", ":24", "host:99999", "unix:"] {
        assert!(StoreAddress::parse(s).is_err(), "{s}");
    }
}

#[test]
fn timestamps() {
    let t = |s: &str| {
        Timestamp::parse(s).map(|t| {
            t.0.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        })
    };
    assert_eq!(t("1970-01-01T00:00:00Z"), Ok(0));
    assert_eq!(t("2000-03-01T00:00:00Z"), Ok(951_868_800));
    assert_eq!(t("2024-02-29 12:34:56Z"), Ok(1_709_210_096));
    for bad in [
        "2024-13-01T00:00:00Z",
        "2024-01-01T00:00:00",
        "1969-12-31T23:59:59Z",
    ] {
        assert!(t(bad).is_err(), "{bad}");
    }
}
