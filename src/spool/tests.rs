//! Unit tests of the spool API: storing and reading back, ledger transitions, recovery of
//! states, holds and reported marks, and durable promises. (Damage and disk trouble:
//! `tests_trouble`.)

use std::io::Read;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use super::*;

pub(crate) fn envelope(n: usize) -> Envelope {
    Envelope {
        sender: "sender@example.org".into(),
        params: postern_proto::MailParams {
            envid: Some("ENV1".into()),
            ..Default::default()
        },
        recipients: (0..n)
            .map(|i| EnvelopeRecipient {
                address: format!("r{i}@example.net"),
                params: postern_proto::RcptParams::default(),
            })
            .collect(),
        received_at: UNIX_EPOCH + Duration::from_secs(1_764_000_000),
        client: "client.example [192.0.2.9]".into(),
    }
}

pub(crate) fn opts() -> SpoolOptions {
    SpoolOptions {
        min_free_bytes: 0,
        gc_interval: Duration::from_secs(3600),
        ..SpoolOptions::default()
    }
}

pub(crate) fn body(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + seed * 7) as u8).collect()
}

pub(crate) fn store(s: &Spool, rcpts: usize, data: &[u8]) -> QueueId {
    let mut w = s.begin(envelope(rcpts)).unwrap();
    for piece in data.chunks(1000) {
        w.write(piece).unwrap();
    }
    let q = w.queue_id();
    w.commit().wait().unwrap();
    q
}

pub(crate) fn read_body(s: &Spool, q: QueueId) -> Vec<u8> {
    let mut out = Vec::new();
    s.open_body(q).unwrap().read_to_end(&mut out).unwrap();
    out
}

pub(crate) fn reopen(dir: &Path) -> (Spool, RecoveryReport) {
    // A process spawned by another test (`mount`) holds a copy of every descriptor, the
    // lock's too, between its fork and exec: wait that moment out (bounded).
    for _ in 0..200 {
        match Spool::open(dir, opts()) {
            Err(SpoolError::Locked(_)) => std::thread::sleep(Duration::from_millis(10)),
            other => return other.unwrap(),
        }
    }
    Spool::open(dir, opts()).unwrap()
}

pub(crate) fn last_segment(dir: &Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v.pop().unwrap()
}

/// Segments holding at least one record (the newest, empty active one excluded).
pub(crate) fn data_segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .filter(|p| std::fs::metadata(p).unwrap().len() > record::SEGMENT_HEADER_LEN as u64)
        .collect();
    v.sort();
    v
}

#[test]
fn store_and_read_back() {
    let d = tempfile::tempdir().unwrap();
    let (s, r) = Spool::open(
        d.path(),
        SpoolOptions {
            chunk_size: 4096,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(r.messages, 0);
    let data = body(1, 20_000);
    let q = store(&s, 2, &data);
    assert_eq!(read_body(&s, q), data);
    assert_eq!(s.read_envelope(q).unwrap(), envelope(2));
    let snap = s.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].qid, q);
    assert_eq!(snap[0].queue, QueueState::Active);
    assert_eq!(snap[0].size, 20_000);
    assert_eq!(snap[0].recipients[1].address, "r1@example.net");
    assert_eq!(snap[0].recipients[0].state, RecipientState::Pending);
    assert_eq!(s.incoming(), 0);
}

/// Writes `data` to a spool of 1000-octet chunks in pieces of `sizes` (cycled), each with
/// `write(writer, piece number, piece)`; the body must read back the same before and after
/// a reopen.
fn written_in_pieces_survives_a_reopen(
    data: &[u8],
    sizes: &[usize],
    mut write: impl FnMut(&mut MessageWriter, usize, &[u8]),
) {
    let d = tempfile::tempdir().unwrap();
    let open = || {
        Spool::open(
            d.path(),
            SpoolOptions {
                chunk_size: 1000,
                ..opts()
            },
        )
        .unwrap()
        .0
    };
    let q = {
        let s = open();
        let mut w = s.begin(envelope(1)).unwrap();
        let mut at = 0;
        for (i, n) in sizes.iter().cycle().enumerate() {
            let end = (at + n).min(data.len());
            write(&mut w, i, &data[at..end]);
            at = end;
            if at == data.len() {
                break;
            }
        }
        let q = w.queue_id();
        w.commit().wait().unwrap();
        assert_eq!(read_body(&s, q), data);
        q
    };
    let s = open();
    assert_eq!(read_body(&s, q), data);
    assert_eq!(s.status(q).unwrap().size, data.len() as u64);
}

#[test]
fn writes_of_any_size_make_the_same_body_and_survive_a_reopen() {
    // Chunks a write completes go straight to the log (vectored, not copied), what is left
    // waits, and the tail rides with the Commit.
    let data = body(7, 12_345);
    written_in_pieces_survives_a_reopen(&data, &[1, 999, 1000, 2500, 3, 4000, 17], |w, _, p| {
        w.write(p).unwrap();
    });
}

#[test]
fn owned_and_borrowed_writes_of_any_size_make_the_same_body_and_survive_a_reopen() {
    // Owned pieces wait as they are (small ones are copied onto a piece with room, or into
    // a new buffer), a chunk is written from the pieces and the slice that completes it,
    // and what is left of a piece waits from where the chunk ended.
    let data = body(9, 23_456);
    let sizes = [1, 61, 62, 999, 1000, 2500, 3, 4000, 17, 300, 300, 300, 700];
    written_in_pieces_survives_a_reopen(&data, &sizes, |w, i, p| {
        if i % 3 == 2 {
            w.write(p).unwrap();
        } else {
            // Some pieces with room to spare: small ones after them are copied there.
            let mut piece = Vec::with_capacity(p.len() + (i % 2) * 200);
            piece.extend_from_slice(p);
            w.write_owned(piece).unwrap();
        }
    });
}

#[test]
fn a_body_of_owned_pieces_within_one_chunk_is_held_whole() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = reopen(d.path());
    let data = body(3, 30_000);
    for pieces in [1, 2, 7] {
        let mut w = s.begin(envelope(1)).unwrap();
        for piece in data.chunks(data.len().div_ceil(pieces)) {
            w.write_owned(piece.to_vec()).unwrap();
        }
        let q = w.queue_id();
        w.commit().wait().unwrap();
        let (_, held) = s.take_message(q).unwrap();
        assert_eq!(held.as_deref(), Some(&data[..]), "{pieces} pieces");
        assert_eq!(read_body(&s, q), data);
    }
}

#[test]
fn a_body_read_chunk_by_chunk_is_the_stored_one() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(
        d.path(),
        SpoolOptions {
            chunk_size: 1000,
            ..opts()
        },
    )
    .unwrap();
    let data = body(5, 4321);
    let q = store(&s, 1, &data);
    let mut reader = s.open_body(q).unwrap();
    let mut sizes = Vec::new();
    let mut all = Vec::new();
    while let Some(chunk) = reader.next_chunk().unwrap() {
        sizes.push(chunk.len());
        all.extend_from_slice(&chunk);
    }
    assert_eq!(sizes, [1000, 1000, 1000, 1000, 321]);
    assert_eq!(all, data);
    // After a partial read as a stream, the next chunk is the rest of the current one.
    let mut reader = s.open_body(q).unwrap();
    let mut first = [0u8; 10];
    reader.read_exact(&mut first).unwrap();
    let rest = reader.next_chunk().unwrap().unwrap();
    assert_eq!(rest.len(), 990);
    assert_eq!([&first[..], &rest[..]].concat(), data[..1000]);
}

#[test]
fn empty_body_and_no_recipients() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = reopen(d.path());
    let q = store(&s, 1, b"");
    assert_eq!(read_body(&s, q), b"");
    assert!(matches!(s.begin(envelope(0)), Err(SpoolError::Invalid(_))));
    drop(s);
    let (s, r) = reopen(d.path());
    assert_eq!(r.messages, 1);
    assert_eq!(read_body(&s, q), b"");
}

#[test]
fn recovery_rebuilds_states_holds_and_deletions() {
    let d = tempfile::tempdir().unwrap();
    let until = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    let (a, b, c, data) = {
        let (s, _) = reopen(d.path());
        let data = body(2, 70_000);
        let a = store(&s, 3, &data);
        let b = store(&s, 1, b"short\r\n");
        let c = store(&s, 1, b"gone\r\n");
        s.mark_in_doubt(a, &[0, 1]).wait().unwrap();
        s.ledger(
            a,
            0,
            RecipientState::Delivered {
                reply: "250 2.0.0 ok".into(),
            },
        )
        .wait()
        .unwrap();
        s.ledger(
            a,
            1,
            RecipientState::Deferred {
                until,
                reply: "452 4.2.2 full".into(),
            },
        )
        .wait()
        .unwrap();
        s.ledger(
            a,
            2,
            RecipientState::Bounced {
                reply: "550 5.1.1 no".into(),
            },
        )
        .wait()
        .unwrap();
        s.hold(b).wait().unwrap();
        s.delete(c).wait().unwrap();
        (a, b, c, data)
    };
    let (s, r) = reopen(d.path());
    assert_eq!(r.messages, 2);
    assert_eq!(r.in_doubt, 0);
    assert!(r.index_bytes > 0);
    let snap = s.snapshot();
    let ma = snap.iter().find(|m| m.qid == a).unwrap();
    assert_eq!(
        ma.recipients
            .iter()
            .map(|r| r.state.clone())
            .collect::<Vec<_>>(),
        vec![
            RecipientState::Delivered {
                reply: "250 2.0.0 ok".into()
            },
            RecipientState::Deferred {
                until,
                reply: "452 4.2.2 full".into()
            },
            RecipientState::Bounced {
                reply: "550 5.1.1 no".into()
            },
        ]
    );
    assert_eq!(ma.queue, QueueState::Deferred);
    assert_eq!(ma.next_attempt, Some(until));
    assert_eq!(
        snap.iter().find(|m| m.qid == b).unwrap().queue,
        QueueState::Hold
    );
    assert!(snap.iter().all(|m| m.qid != c));
    assert_eq!(read_body(&s, a), data);
    assert!(matches!(s.open_body(c), Err(SpoolError::NotFound(_))));
    // Ids keep increasing after a restart.
    let n = store(&s, 1, b"x");
    assert!(n > a && n > b && n > c);
    s.release(b).wait().unwrap();
    drop(s);
    let (s, _) = reopen(d.path());
    let snap = s.snapshot();
    assert_eq!(
        snap.iter().find(|m| m.qid == b).unwrap().queue,
        QueueState::Active
    );
}

#[test]
fn ledger_transitions_are_enforced() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = reopen(d.path());
    let q = store(&s, 2, b"x");
    let delivered = RecipientState::Delivered {
        reply: "250 ok".into(),
    };
    let r = s.ledger(q, 0, delivered.clone()).wait();
    assert!(matches!(r, Err(SpoolError::Transition(_))), "{r:?}");
    assert!(matches!(
        s.ledger(q, 5, RecipientState::InDoubt).wait(),
        Err(SpoolError::NoSuchRecipient { rcpt: 5, .. })
    ));
    assert!(matches!(s.finish(q).wait(), Err(SpoolError::Invalid(_))));
    s.mark_in_doubt(q, &[0, 1]).wait().unwrap();
    s.ledger(q, 0, delivered).wait().unwrap();
    assert!(s.ledger(q, 0, RecipientState::InDoubt).wait().is_err());
    s.ledger(
        q,
        1,
        RecipientState::Bounced {
            reply: "550".into(),
        },
    )
    .wait()
    .unwrap();
    assert_eq!(s.snapshot()[0].queue, QueueState::Finished);
    s.finish(q).wait().unwrap();
    assert!(s.is_empty());
    assert!(matches!(
        s.ledger(q, 0, RecipientState::InDoubt).wait(),
        Err(SpoolError::NotFound(_))
    ));
}

#[test]
fn in_doubt_recipients_come_back_in_doubt() {
    let d = tempfile::tempdir().unwrap();
    let q = {
        let (s, _) = reopen(d.path());
        let q = store(&s, 3, b"body\r\n");
        s.mark_in_doubt(q, &[0, 2]).wait().unwrap();
        q
    };
    let (s, r) = reopen(d.path());
    assert_eq!(r.in_doubt, 2);
    assert_eq!(s.stats().in_doubt_recovered, 2);
    let states: Vec<_> = s.snapshot()[0]
        .recipients
        .iter()
        .map(|r| r.state.clone())
        .collect();
    assert_eq!(
        states,
        vec![
            RecipientState::InDoubt,
            RecipientState::Pending,
            RecipientState::InDoubt
        ]
    );
    let _ = q;
}

#[test]
fn durable_is_a_future_that_does_not_block_the_runtime() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = reopen(d.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut handles = Vec::new();
        for i in 0..20 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                let mut w = s.begin(envelope(1)).unwrap();
                w.write(&body(i, 4096)).unwrap();
                let q = w.queue_id();
                w.commit().await.unwrap();
                s.mark_in_doubt(q, &[0]).await.unwrap();
                q
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
    });
    assert_eq!(s.len(), 20);
}

#[test]
fn dropped_durable_still_lands() {
    let d = tempfile::tempdir().unwrap();
    let q = {
        let (s, _) = reopen(d.path());
        let mut w = s.begin(envelope(1)).unwrap();
        w.write(b"dropped\r\n").unwrap();
        let q = w.queue_id();
        drop(w.commit());
        q
    };
    let (s, _) = reopen(d.path());
    assert_eq!(read_body(&s, q), b"dropped\r\n");
}

#[test]
fn concurrent_writers_share_syncs() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = reopen(d.path());
    std::thread::scope(|sc| {
        for t in 0..20 {
            let s = &s;
            sc.spawn(move || {
                for i in 0..25 {
                    store(s, 1, &body(t * 100 + i, 4096));
                }
            });
        }
    });
    let st = s.stats();
    assert_eq!(st.stored, 500);
    assert!(st.syncs < st.stored, "{st:?}");
}

#[test]
fn reported_marks_survive_a_restart_and_keep_the_replies() {
    let d = tempfile::tempdir().unwrap();
    let q = {
        let (s, _) = reopen(d.path());
        let q = store(&s, 3, b"x");
        s.mark_in_doubt(q, &[0, 1]).wait().unwrap();
        let delivered = RecipientState::Delivered {
            reply: "250 2.0.0 ok".into(),
        };
        s.ledger(q, 0, delivered).wait().unwrap();
        let bounced = RecipientState::Bounced {
            reply: "550 5.1.1 no".into(),
        };
        s.ledger(q, 1, bounced).wait().unwrap();
        assert!(matches!(
            s.mark_reported(q, &[2]).wait(),
            Err(SpoolError::Invalid(_))
        ));
        assert_eq!(s.status(q).unwrap().reported, vec![false, false, false]);
        s.mark_reported(q, &[0, 1]).wait().unwrap();
        s.mark_reported(q, &[1]).wait().unwrap(); // already marked: nothing written
        assert_eq!(s.status(q).unwrap().reported, vec![true, true, false]);
        q
    };
    let (s, _) = reopen(d.path());
    let m = s.message(q).unwrap();
    assert_eq!(
        m.recipients.iter().map(|r| r.reported).collect::<Vec<_>>(),
        vec![true, true, false]
    );
    assert_eq!(
        m.recipients[1].state,
        RecipientState::Bounced {
            reply: "550 5.1.1 no".into()
        }
    );
    assert_eq!(
        m.recipients[0].state,
        RecipientState::Delivered {
            reply: "250 2.0.0 ok".into()
        }
    );
    assert_eq!(m.recipients[2].state, RecipientState::Pending);
}

#[test]
fn ledger_batch_is_one_append_and_its_reported_flags_survive_a_restart() {
    let d = tempfile::tempdir().unwrap();
    let q = {
        let (s, _) = Spool::open(d.path(), opts()).unwrap();
        let q = store(&s, 3, b"x");
        s.mark_in_doubt(q, &[0, 1, 2]).wait().unwrap();
        let delivered = RecipientState::Delivered {
            reply: "250 2.0.0 ok".into(),
        };
        let deferred = RecipientState::Deferred {
            until: std::time::UNIX_EPOCH + std::time::Duration::from_secs(2_000_000_000),
            reply: "451 4.2.0 later".into(),
        };
        assert!(
            matches!(
                s.ledger_batch(q, vec![(2, deferred.clone(), true)]).wait(),
                Err(SpoolError::Invalid(_))
            ),
            "only a final state can be reported"
        );
        let before = s.stats().appends;
        s.ledger_batch(
            q,
            vec![
                (0, delivered.clone(), true),
                (1, delivered, false),
                (2, deferred, false),
            ],
        )
        .wait()
        .unwrap();
        assert_eq!(s.stats().appends - before, 1, "three records, one append");
        assert_eq!(s.status(q).unwrap().reported, vec![true, false, false]);
        q
    };
    let (s, _) = reopen(d.path());
    let m = s.message(q).unwrap();
    assert_eq!(
        m.recipients.iter().map(|r| r.reported).collect::<Vec<_>>(),
        vec![true, false, false]
    );
    assert_eq!(
        m.recipients[0].state,
        RecipientState::Delivered {
            reply: "250 2.0.0 ok".into()
        }
    );
    assert!(matches!(
        m.recipients[2].state,
        RecipientState::Deferred { .. }
    ));
}

#[test]
fn is_held_follows_hold_and_release() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = reopen(d.path());
    let q = store(&s, 1, b"x");
    assert!(!s.is_held(q));
    s.hold(q).wait().unwrap();
    assert!(s.is_held(q));
    assert!(s.status(q).unwrap().hold, "the same answer as status()");
    s.release(q).wait().unwrap();
    assert!(!s.is_held(q));
}
