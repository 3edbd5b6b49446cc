//! Unit tests of the spool API, ledger transitions, recovery, GC and disk trouble.

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

fn opts() -> SpoolOptions {
    SpoolOptions {
        min_free_bytes: 0,
        gc_interval: Duration::from_secs(3600),
        ..SpoolOptions::default()
    }
}

fn body(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + seed * 7) as u8).collect()
}

fn store(s: &Spool, rcpts: usize, data: &[u8]) -> QueueId {
    let mut w = s.begin(envelope(rcpts)).unwrap();
    for piece in data.chunks(1000) {
        w.write(piece).unwrap();
    }
    let q = w.queue_id();
    w.commit().wait().unwrap();
    q
}

fn read_body(s: &Spool, q: QueueId) -> Vec<u8> {
    let mut out = Vec::new();
    s.open_body(q).unwrap().read_to_end(&mut out).unwrap();
    out
}

fn reopen(dir: &Path) -> (Spool, RecoveryReport) {
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

fn last_segment(dir: &Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v.pop().unwrap()
}

/// Segments holding at least one record (the newest, empty active one excluded).
fn data_segments(dir: &Path) -> Vec<std::path::PathBuf> {
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

#[test]
fn writes_of_any_size_make_the_same_body_and_survive_a_reopen() {
    // Small writes fill the chunk buffer, writes of a chunk or more go straight to the log
    // (vectored, not copied), and the tail rides with the Commit.
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
    let data = body(7, 12_345);
    let q = {
        let s = open();
        let mut w = s.begin(envelope(1)).unwrap();
        let mut at = 0;
        for n in [1, 999, 1000, 2500, 3, 4000, 17].into_iter().cycle() {
            let end = (at + n).min(data.len());
            w.write(&data[at..end]).unwrap();
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
fn partial_message_is_dropped() {
    let d = tempfile::tempdir().unwrap();
    let o = SpoolOptions {
        chunk_size: 1024,
        ..opts()
    };
    let kept = {
        let (s, _) = Spool::open(d.path(), o.clone()).unwrap();
        let mut w = s.begin(envelope(1)).unwrap();
        w.write(&body(3, 10_000)).unwrap();
        assert_eq!(s.incoming(), 1);
        let kept = store(&s, 1, b"kept");
        w.abort();
        assert_eq!(s.incoming(), 0);
        // A second partial: on disk, a writer dropped without commit is what a crash leaves.
        let mut w2 = s.begin(envelope(1)).unwrap();
        w2.write(&body(4, 5000)).unwrap();
        drop(w2);
        kept
    };
    let (s, r) = Spool::open(d.path(), o).unwrap();
    assert_eq!(r.messages, 1);
    assert_eq!(r.partial_dropped, 2);
    assert_eq!(s.snapshot()[0].qid, kept);
}

#[test]
fn torn_tail_is_truncated() {
    let d = tempfile::tempdir().unwrap();
    let (q, seg) = {
        let (s, _) = reopen(d.path());
        let q = store(&s, 1, b"first");
        (q, last_segment(d.path()))
    };
    // Half a commit record, then zeros: what an unsynced write leaves after a power cut.
    let mut rec = Vec::new();
    record::encode_commit(&mut rec, QueueId::new(1, 0), 0, 0, 0, &envelope(1));
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &rec[..rec.len() / 2]).unwrap();
    std::io::Write::write_all(&mut f, &[0; 100]).unwrap();
    drop(f);
    let (s, r) = reopen(d.path());
    assert_eq!(r.messages, 1);
    assert_eq!(r.truncated_bytes, (rec.len() / 2 + 100) as u64);
    assert_eq!(r.corrupt_regions, 0);
    assert_eq!(read_body(&s, q), b"first");
    drop(s);
    let (_, r) = reopen(d.path());
    assert_eq!(r.truncated_bytes, 0);
}

#[test]
fn headerless_tail_segment_is_removed() {
    let d = tempfile::tempdir().unwrap();
    {
        let (s, _) = reopen(d.path());
        store(&s, 1, b"x");
    }
    let next = d.path().join("00000099.seg");
    std::fs::write(&next, b"PSTN").unwrap();
    let (s, r) = reopen(d.path());
    assert_eq!(r.messages, 1);
    assert!(!next.exists());
    assert!(s.segment_numbers().iter().all(|&n| n != 99));
}

#[test]
fn damaged_commit_in_the_middle_goes_to_the_corrupt_queue() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = {
        let (s, _) = reopen(d.path());
        (
            store(&s, 1, b"one"),
            store(&s, 1, b"two"),
            store(&s, 1, b"three"),
        )
    };
    // Damage b's Commit record: find it by its queue id after a Commit header.
    let seg = data_segments(d.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let needle = b.to_bytes();
    let pos = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .find(|&i| bytes[i - record::HEADER_LEN + 4] == record::RecordKind::Commit as u8)
        .unwrap();
    bytes[pos + 30] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let (s, r) = reopen(d.path());
    assert_eq!(r.corrupt_regions, 1);
    assert_eq!(r.quarantined, 1);
    assert_eq!(r.messages, 2);
    assert_eq!(read_body(&s, a), b"one");
    assert_eq!(read_body(&s, c), b"three");
    assert!(matches!(s.open_body(b), Err(SpoolError::NotFound(_))));
    let corrupt = s.corrupt();
    assert_eq!(corrupt, vec![format!("{b}.txt")]);
    let text = std::fs::read_to_string(d.path().join("corrupt").join(&corrupt[0])).unwrap();
    assert!(text.contains("commit record is unreadable"), "{text}");
    assert!(text.ends_with("two"), "{text}");
    drop(s);
    // The quarantine is durable: the next start does not find it again as live.
    let (_, r) = reopen(d.path());
    assert_eq!(r.messages, 2);
}

#[test]
fn damaged_body_fails_its_checksum_and_can_be_quarantined() {
    let d = tempfile::tempdir().unwrap();
    let q = {
        let (s, _) = reopen(d.path());
        store(&s, 1, b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    };
    let seg = data_segments(d.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let pos = bytes.windows(8).position(|w| w == b"AAAAAAAA").unwrap();
    bytes[pos + 3] = b'B';
    std::fs::write(&seg, &bytes).unwrap();
    let (s, r) = reopen(d.path());
    assert_eq!(r.messages, 1);
    let mut out = Vec::new();
    let err = s.open_body(q).unwrap().read_to_end(&mut out).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    s.quarantine(q, "body checksum mismatch").wait().unwrap();
    assert!(s.is_empty());
    assert_eq!(s.corrupt().len(), 1);
}

#[test]
fn injected_enospc_fails_the_store_with_452_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(
        d.path(),
        SpoolOptions {
            chunk_size: 1024,
            ..opts()
        },
    )
    .unwrap();
    let mut w = s.begin(envelope(1)).unwrap();
    w.write(&body(1, 1500)).unwrap();
    s.inject_errors(fault::ENOSPC, 0);
    let e = w.write(&body(2, 1500)).unwrap_err();
    assert!(matches!(e, SpoolError::NoSpace));
    assert_eq!(e.reply().code().to_string(), "452");
    assert!(w.commit().wait().is_err());
    let mut w = s.begin(envelope(1)).unwrap();
    w.write(b"small").unwrap();
    let e = w.commit().wait().unwrap_err();
    assert_eq!(
        e.reply().to_string(),
        "452 4.3.1 Insufficient system storage"
    );
    assert!(s.is_empty());
    s.inject_errors(0, 0);
    let ok = store(&s, 1, b"after");
    drop(s);
    let (s, r) = reopen(d.path());
    assert_eq!(r.messages, 1);
    assert_eq!(s.snapshot()[0].qid, ok);
}

#[test]
fn injected_eio_at_sync_fails_the_store_with_451_and_withdraws_it() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = reopen(d.path());
    let before = store(&s, 1, b"before");
    s.inject_errors(0, fault::EIO);
    let mut w = s.begin(envelope(1)).unwrap();
    w.write(b"lost").unwrap();
    let e = w.commit().wait().unwrap_err();
    assert_eq!(e.reply().code().to_string(), "451");
    s.inject_errors(0, 0);
    let after = store(&s, 1, b"after");
    let live: Vec<_> = s.snapshot().iter().map(|m| m.qid).collect();
    assert_eq!(live, vec![before, after]);
    drop(s);
    let (s, _) = reopen(d.path());
    let live: Vec<_> = s.snapshot().iter().map(|m| m.qid).collect();
    assert_eq!(live, vec![before, after]);
}

#[test]
fn ledger_write_failure_is_retried_until_it_lands() {
    let d = tempfile::tempdir().unwrap();
    let q = {
        let (s, _) = reopen(d.path());
        let q = store(&s, 2, b"x");
        s.mark_in_doubt(q, &[0, 1]).wait().unwrap();
        s.inject_errors(fault::ENOSPC, 0);
        let e = s
            .ledger(
                q,
                0,
                RecipientState::Delivered {
                    reply: "250 ok".into(),
                },
            )
            .wait()
            .unwrap_err();
        assert!(matches!(e, SpoolError::NoSpace));
        // A failed sync is retried the same way.
        s.inject_errors(0, fault::EIO);
        let e = s
            .ledger(
                q,
                1,
                RecipientState::Bounced {
                    reply: "550 no".into(),
                },
            )
            .wait()
            .unwrap_err();
        assert!(matches!(e, SpoolError::Io(_)));
        // Both records are pending; the committer's retry passes (every 200 ms) take one out
        // of the count while they try it, so wait for a moment when both are in.
        // Bounded (10 s) so a loaded machine cannot miss the moment.
        let both_pending = (0..2000).any(|_| {
            let both = s.stats().ledger_retries_pending == 2;
            if !both {
                std::thread::sleep(Duration::from_millis(5));
            }
            both
        });
        assert!(both_pending, "{:?}", s.stats());
        // Memory already has the new states: nothing is delivered twice from memory.
        assert_eq!(s.snapshot()[0].queue, QueueState::Finished);
        s.inject_errors(0, 0);
        // Bounded wait for the committer's retry (every 200 ms).
        for _ in 0..400 {
            if s.stats().ledger_retries_pending == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(s.stats().ledger_retries_pending, 0);
        // One more durable op so that the retried records are surely synced.
        s.hold(q).wait().unwrap();
        q
    };
    let (s, _) = reopen(d.path());
    let m = &s.snapshot()[0];
    assert_eq!(m.qid, q);
    assert_eq!(
        m.recipients[0].state,
        RecipientState::Delivered {
            reply: "250 ok".into()
        }
    );
    assert_eq!(
        m.recipients[1].state,
        RecipientState::Bounced {
            reply: "550 no".into()
        }
    );
}

#[test]
fn begin_refuses_below_the_free_space_floor() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(
        d.path(),
        SpoolOptions {
            min_free_bytes: u64::MAX,
            ..opts()
        },
    )
    .unwrap();
    assert!(!s.has_space());
    let e = s.begin(envelope(1)).unwrap_err();
    assert!(matches!(e, SpoolError::NoSpace));
}

#[test]
fn a_world_writable_spool_directory_is_refused_before_anything_is_written() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("spool");
    std::fs::create_dir(&dir).unwrap();
    for mode in [0o777, 0o1777, 0o703] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = Spool::open(&dir, opts()).map(|_| ()).unwrap_err();
        assert!(
            matches!(&e, SpoolError::WorldWritable { path, mode: m } if *path == dir && *m == mode),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.contains(&dir.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("chmod o-w {}", dir.display())),
            "{text}"
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "nothing created"
        );
    }
    // The fix the message names works; group-writable alone is the operator's choice.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    let (s, _) = Spool::open(&dir, opts()).unwrap();
    drop(s);
}

#[test]
fn a_second_open_is_refused_but_read_only_works() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = reopen(d.path());
    let q = store(&s, 2, b"hello");
    s.mark_in_doubt(q, &[1]).wait().unwrap();
    assert!(matches!(
        Spool::open(d.path(), opts()),
        Err(SpoolError::Locked(_))
    ));
    let snap = Spool::open_read_only(d.path()).unwrap();
    assert_eq!(snap.messages.len(), 1);
    assert_eq!(snap.messages[0].qid, q);
    assert_eq!(
        snap.messages[0].recipients[1].state,
        RecipientState::InDoubt
    );
    assert_eq!(snap.report.in_doubt, 1);
}

#[test]
fn gc_deletes_dead_segments_and_compacts_old_ones() {
    let d = tempfile::tempdir().unwrap();
    let o = SpoolOptions {
        segment_size: 64 << 10,
        chunk_size: 16 << 10,
        compact_below: 0.9,
        ..opts()
    };
    let until = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let (keep, big, data) = {
        let (s, _) = Spool::open(d.path(), o.clone()).unwrap();
        // One long-deferred message in the first segment, one held multi-chunk message.
        let keep = store(&s, 2, &body(9, 3000));
        s.mark_in_doubt(keep, &[0, 1]).wait().unwrap();
        s.ledger(
            keep,
            0,
            RecipientState::Deferred {
                until,
                reply: "451 later".into(),
            },
        )
        .wait()
        .unwrap();
        let data = body(5, 40_000);
        let big = store(&s, 1, &data);
        s.hold(big).wait().unwrap();
        // Then many messages that finish.
        for i in 0..60 {
            let q = store(&s, 1, &body(i, 8000));
            s.mark_in_doubt(q, &[0]).wait().unwrap();
            s.ledger(
                q,
                0,
                RecipientState::Delivered {
                    reply: "250".into(),
                },
            )
            .wait()
            .unwrap();
            s.finish(q).wait().unwrap();
        }
        let before = s.segment_numbers();
        assert!(before.len() > 5, "{before:?}");
        s.collect_garbage().unwrap();
        let after = s.segment_numbers();
        assert!(after[0] > before[0], "{before:?} -> {after:?}");
        assert!(after.len() <= 2, "{after:?}");
        let st = s.stats();
        assert!(st.segments_deleted >= 5, "{st:?}");
        assert_eq!(st.messages_moved, 2);
        assert_eq!(read_body(&s, big), data);
        (keep, big, data)
    };
    let (s, r) = Spool::open(d.path(), o).unwrap();
    assert_eq!(r.messages, 2);
    assert_eq!(r.in_doubt, 1);
    assert_eq!(read_body(&s, big), data);
    let snap = s.snapshot();
    let k = snap.iter().find(|m| m.qid == keep).unwrap();
    assert_eq!(
        k.recipients[0].state,
        RecipientState::Deferred {
            until,
            reply: "451 later".into()
        }
    );
    assert_eq!(k.recipients[1].state, RecipientState::InDoubt);
    assert_eq!(
        snap.iter().find(|m| m.qid == big).unwrap().queue,
        QueueState::Hold
    );
    assert_eq!(s.read_envelope(keep).unwrap(), envelope(2));
}

/// Disk full for real: a 2 MiB tmpfs (needs root; CI runs as root). Stores fail with
/// NoSpace, no partial message survives, and stores work again once space returns.
#[test]
fn real_disk_full_on_a_small_tmpfs() {
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("note: skipping the tmpfs disk-full test (mount not permitted here)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&mnt);
    let dir = mnt.join("spool");
    let o = SpoolOptions {
        segment_size: 256 << 10,
        chunk_size: 8 << 10,
        ..opts()
    };
    let filler = mnt.join("filler");
    let mut acked = Vec::new();
    {
        let (s, _) = Spool::open(&dir, o.clone()).unwrap();
        std::fs::write(&filler, vec![0u8; 1200 << 10]).unwrap();
        let mut full = None;
        for i in 0..400 {
            let data = body(i, 10_000);
            let r = s.begin(envelope(1)).and_then(|mut w| {
                w.write(&data)?;
                let q = w.queue_id();
                w.commit().wait().map(|()| q)
            });
            match r {
                Ok(q) => acked.push((q, data)),
                Err(e) => {
                    full = Some(e);
                    break;
                }
            }
        }
        let e = full.expect("the tmpfs never filled up");
        assert!(matches!(e, SpoolError::NoSpace), "{e:?}");
        assert_eq!(e.reply().code().to_string(), "452");
        assert_eq!(s.len(), acked.len());
        // Space returns: the gateway takes mail again by itself.
        std::fs::remove_file(&filler).unwrap();
        let q = store(&s, 1, b"after the disk had room again");
        acked.push((q, b"after the disk had room again".to_vec()));
    }
    let (s, r) = Spool::open(&dir, o).unwrap();
    assert_eq!(r.messages, acked.len());
    for (q, data) in &acked {
        assert_eq!(&read_body(&s, *q), data);
    }
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
