//! Tests of the record format (`record`): golden files for every record kind
//! (`src/spool/testdata/`, rewritten with `UPDATE_GOLDEN=1`), round trips, and damage (bit
//! flips, truncations, arbitrary bytes) found as a `FormatError`, never a panic.

use std::path::PathBuf;

use postern_proto::params::{Body, Notify, Orcpt, Ret};
use postern_proto::{MailParams, RcptParams};

use super::id::QueueId;
use super::ledger::RecipientState;
use super::micros::from_micros;
use super::record::*;

fn qid() -> QueueId {
    QueueId::new(1_764_215_000_123_456, 0x0102)
}

fn sample_envelope() -> Envelope {
    Envelope {
        sender: "alice@example.org".into(),
        params: MailParams {
            size: Some(4096),
            body: Some(Body::EightBitMime),
            smtputf8: true,
            ret: Some(Ret::Headers),
            envid: Some("env+id-1".into()),
            requiretls: false,
            auth: Some("<>".into()),
        },
        recipients: vec![
            EnvelopeRecipient {
                address: "bob@example.net".into(),
                params: RcptParams {
                    notify: Some(Notify {
                        never: false,
                        success: true,
                        failure: true,
                        delay: false,
                    }),
                    orcpt: Some(Orcpt {
                        addr_type: "rfc822".into(),
                        address: "Bob@Example.NET".into(),
                    }),
                },
            },
            EnvelopeRecipient {
                address: "carol@example.net".into(),
                params: RcptParams::default(),
            },
        ],
        received_at: from_micros(1_764_215_000_000_000),
        client: "mx.example.org [192.0.2.1]".into(),
    }
}

fn golden(name: &str, bytes: &[u8]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/spool/testdata")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        bytes,
        &want[..],
        "{name} differs from its golden file: a format change needs a version bump"
    );
}

fn round_trip(bytes: &[u8], want: &Record) {
    let (h, rec) = parse_full(bytes).unwrap();
    assert_eq!(&rec, want);
    assert_eq!(h.total_len() as usize, bytes.len());
}

#[test]
fn golden_segment_header() {
    let h = SegmentHeader {
        number: 42,
        node: 7,
        created: 1_764_215_000_000_000,
    };
    let b = h.encode();
    golden("segment_header.bin", &b);
    assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
    let mut bad = b;
    bad[13] ^= 1;
    assert_eq!(SegmentHeader::decode(&bad), Err(FormatError::BadCrc));
    let mut v2 = b;
    v2[8] = 2;
    let crc = crc32fast::hash(&v2[..24]);
    v2[24..28].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(SegmentHeader::decode(&v2), Err(FormatError::Version(2)));
}

#[test]
fn chunk_head_is_encode_chunk_without_the_body() {
    let mut whole = Vec::new();
    encode_chunk(&mut whole, qid(), b"body bytes");
    let mut parts = chunk_head(qid(), 10);
    parts.extend_from_slice(b"body bytes");
    assert_eq!(parts, whole);
}

#[test]
fn golden_chunk() {
    let mut b = Vec::new();
    encode_chunk(&mut b, qid(), b"Subject: hi\r\n\r\nbody\r\n");
    golden("chunk.bin", &b);
    round_trip(
        &b,
        &Record::Chunk {
            qid: qid(),
            len: 21,
        },
    );
    // The chunk CRC covers the qid, not the data: data damage is found by the body CRC.
    let last = b.len() - 1;
    b[last] ^= 0xff;
    assert!(parse_full(&b).is_ok());
    b[HEADER_LEN] ^= 1;
    assert_eq!(parse_full(&b).unwrap_err(), FormatError::BadCrc);
}

#[test]
fn golden_commit() {
    let mut b = Vec::new();
    encode_commit(&mut b, qid(), 0, 21, 0xDEAD_BEEF, &sample_envelope());
    golden("commit.bin", &b);
    round_trip(
        &b,
        &Record::Commit {
            qid: qid(),
            body_len: 21,
            body_crc: 0xDEAD_BEEF,
            envelope: sample_envelope(),
        },
    );
}

#[test]
fn golden_ledger_states() {
    let states = [
        ("ledger_pending.bin", RecipientState::Pending),
        ("ledger_in_doubt.bin", RecipientState::InDoubt),
        (
            "ledger_delivered.bin",
            RecipientState::Delivered {
                reply: "250 2.1.5 Ok".into(),
            },
        ),
        (
            "ledger_deferred.bin",
            RecipientState::Deferred {
                until: from_micros(1_764_215_600_000_000),
                reply: "452 4.2.2 Over quota".into(),
            },
        ),
        (
            "ledger_bounced.bin",
            RecipientState::Bounced {
                reply: "550 5.1.1 No such user".into(),
            },
        ),
    ];
    for (name, state) in states {
        let mut b = Vec::new();
        encode_ledger(&mut b, qid(), 1, &state);
        golden(name, &b);
        round_trip(
            &b,
            &Record::Ledger {
                qid: qid(),
                rcpt: 1,
                state,
                reported: false,
                attempts: 0,
            },
        );
    }
}

#[test]
fn in_doubt_attempts_and_quarantine_round_trip() {
    let mut b = Vec::new();
    encode_ledger_parts(&mut b, qid(), 2, (1, 4, ""), false);
    round_trip(
        &b,
        &Record::Ledger {
            qid: qid(),
            rcpt: 2,
            state: RecipientState::InDoubt,
            reported: false,
            attempts: 4,
        },
    );
    let mut b = Vec::new();
    encode_quarantine(&mut b, qid());
    round_trip(
        &b,
        &Record::Hold {
            qid: qid(),
            poison: true,
        },
    );
}

#[test]
fn golden_done_hold_release() {
    let mut b = Vec::new();
    encode_done(&mut b, qid(), DoneReason::Finished);
    encode_hold(&mut b, qid(), true);
    encode_hold(&mut b, qid(), false);
    golden("done_hold_release.bin", &b);
    let (h1, r1) = parse_full(&b).unwrap();
    assert_eq!(
        r1,
        Record::Done {
            qid: qid(),
            reason: DoneReason::Finished
        }
    );
    let rest = &b[h1.total_len() as usize..];
    let (h2, r2) = parse_full(rest).unwrap();
    assert_eq!(
        r2,
        Record::Hold {
            qid: qid(),
            poison: false
        }
    );
    let (_, r3) = parse_full(&rest[h2.total_len() as usize..]).unwrap();
    assert_eq!(r3, Record::Release { qid: qid() });
}

#[test]
fn every_single_bit_flip_in_a_commit_is_detected() {
    let mut b = Vec::new();
    encode_commit(&mut b, qid(), 0, 21, 7, &sample_envelope());
    for i in 0..b.len() {
        for bit in 0..8 {
            let mut c = b.clone();
            c[i] ^= 1 << bit;
            assert!(parse_full(&c).is_err(), "flip of bit {bit} in byte {i}");
        }
    }
}

#[test]
fn truncations_are_errors_not_panics() {
    let mut b = Vec::new();
    encode_commit(&mut b, qid(), 0, 21, 7, &sample_envelope());
    for n in 0..b.len() {
        assert!(parse_full(&b[..n]).is_err());
    }
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
        let _ = parse_full(&data);
        let _ = SegmentHeader::decode(&data);
    }

    #[test]
    fn envelopes_round_trip(sender in "[a-z@.]{0,20}", client in "\\PC{0,20}",
                            rcpts in proptest::collection::vec("[a-z@.]{1,20}", 0..5),
                            size in proptest::option::of(proptest::num::u64::ANY)) {
        let mut env = sample_envelope();
        env.sender = sender;
        env.client = client;
        env.params.size = size;
        env.recipients = rcpts.into_iter().map(|address| EnvelopeRecipient {
            address, params: RcptParams::default() }).collect();
        let mut b = Vec::new();
        encode_commit(&mut b, qid(), FLAG_MOVED, 1, 2, &env);
        let (h, rec) = parse_full(&b).unwrap();
        proptest::prop_assert_eq!(h.flags, FLAG_MOVED);
        proptest::prop_assert_eq!(rec, Record::Commit { qid: qid(), body_len: 1, body_crc: 2, envelope: env });
    }
}
