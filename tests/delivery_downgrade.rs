//! 8-bit mail to a 7-bit store (issue 13 part 5), against the scripted fake store: 8-bit
//! MIME parts arrive as quoted-printable (DATA and BDAT), what cannot be converted still
//! bounces before the end of data, and a declared SMTPUTF8 on an all-ASCII message is no
//! reason to bounce.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod delivery_common;
mod fake_lmtp;

use delivery_common::{by_index, envelope, rcpt};
use fake_lmtp::{FakeStore, Script};
use postern::config::ByteSize;
use postern::delivery::{Recipient, Scope};
use postern_proto::params::Body;

const MIME_8BIT: &str = "From: a@example.org\r\nSubject: accents\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
d\u{e9}j\u{e0} vu\r\n.leading dot\r\n\
--b1\r\nContent-Type: text/plain\r\n\r\nplain\r\n--b1--\r\n";

const MIME_QP: &str = "From: a@example.org\r\nSubject: accents\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
d=C3=A9j=C3=A0 vu\r\n.leading dot\r\n\
--b1\r\nContent-Type: text/plain\r\n\r\nplain\r\n--b1--\r\n";

fn seven_bit() -> Script {
    Script {
        eight_bit_mime: false,
        smtputf8: false,
        ..Script::default()
    }
}

fn to() -> Vec<Recipient> {
    vec![rcpt(0, "a@example.org")]
}

#[tokio::test]
async fn eight_bit_parts_arrive_quoted_printable_over_data_and_bdat() {
    for chunking in [false, true] {
        let fake = FakeStore::start(Script {
            chunking,
            ..seven_bit()
        })
        .await;
        let mut c = delivery_common::store_config("fake", fake.addr.port());
        c.chunk_size = ByteSize(64);
        let body = MIME_8BIT.as_bytes();
        let mut env = envelope(body);
        env.eight_bit = true;
        env.params.body = Some(Body::EightBitMime);
        let store = std::sync::Arc::new(
            postern::delivery::RemoteStore::from_config(&c, "gw.test").unwrap(),
        );
        let (report, _) = delivery_common::deliver_once(&store, &env, &to(), body).await;
        assert_eq!(
            by_index(&report, 1),
            ["delivered 250 2.0.0"],
            "chunking={chunking}"
        );
        let t = &fake.transactions()[0];
        assert_eq!(
            String::from_utf8_lossy(&t.content),
            MIME_QP,
            "chunking={chunking}"
        );
        assert!(t.complete);
        assert!(!t.mail.contains("BODY="), "{}", t.mail);
        if chunking {
            assert!(t.bdat_sizes.len() > 1, "several chunks: {:?}", t.bdat_sizes);
        }
    }
}

#[tokio::test]
async fn what_cannot_be_converted_still_bounces_before_the_end() {
    let fake = FakeStore::start(seven_bit()).await;
    let store_config = delivery_common::store_config("fake", fake.addr.port());
    let store = std::sync::Arc::new(
        postern::delivery::RemoteStore::from_config(&store_config, "gw.test").unwrap(),
    );
    // 8-bit in a header, and 8-bit in a body that never declared it.
    for body in [
        "Subject: caf\u{e9}\r\n\r\nx\r\n",
        "Subject: x\r\n\r\nd\u{e9}j\u{e0} vu\r\n",
    ] {
        let body = body.as_bytes();
        let mut env = envelope(body);
        env.eight_bit = true;
        let before = fake.transactions().len();
        let (report, _) = delivery_common::deliver_once(&store, &env, &to(), body).await;
        assert_eq!(by_index(&report, 1), ["bounced 554 5.6.3"]);
        assert_eq!(report.scope(), Scope::Message);
        let txns = fake.transactions();
        assert_eq!(txns.len(), before + 1);
        assert!(!txns[before].complete, "no final dot was sent");
    }
}

#[tokio::test]
async fn declared_smtputf8_on_ascii_goes_without_it() {
    let fake = FakeStore::start(seven_bit()).await;
    let store_config = delivery_common::store_config("fake", fake.addr.port());
    let store = std::sync::Arc::new(
        postern::delivery::RemoteStore::from_config(&store_config, "gw.test").unwrap(),
    );
    let body = b"Subject: plain\r\n\r\nascii only\r\n";
    let mut env = envelope(body);
    env.params.smtputf8 = true;
    let (report, _) = delivery_common::deliver_once(&store, &env, &to(), body).await;
    assert_eq!(by_index(&report, 1), ["delivered 250 2.0.0"]);
    let t = &fake.transactions()[0];
    assert!(!t.mail.contains("SMTPUTF8"), "{}", t.mail);
    assert_eq!(t.content, body);

    // UTF-8 in the headers does need it: 5.6.7, and no final dot.
    let body = "Subject: gr\u{fc}\u{df}e\r\n\r\nx\r\n".as_bytes();
    let mut env = envelope(body);
    env.params.smtputf8 = true;
    let (report, _) = delivery_common::deliver_once(&store, &env, &to(), body).await;
    assert_eq!(by_index(&report, 1), ["bounced 554 5.6.7"]);
    assert!(!fake.transactions()[1].complete);

    // Even to a store with 8BITMIME (headers are checked, not only 8-bit octets).
    let eight = FakeStore::start(Script {
        smtputf8: false,
        ..Script::default()
    })
    .await;
    let c = delivery_common::store_config("fake", eight.addr.port());
    let store =
        std::sync::Arc::new(postern::delivery::RemoteStore::from_config(&c, "gw.test").unwrap());
    let (report, _) = delivery_common::deliver_once(&store, &env, &to(), body).await;
    assert_eq!(by_index(&report, 1), ["bounced 554 5.6.7"]);

    // A non-ASCII address still needs it: refused before MAIL.
    let (report, _) = delivery_common::deliver_once(
        &store,
        &envelope(body),
        &[rcpt(0, "j\u{f6}rg@example.org")],
        body,
    )
    .await;
    assert_eq!(by_index(&report, 1), ["bounced 554 5.6.7"]);
    assert_eq!(eight.sessions().last().unwrap().count("MAIL"), 0);
}
