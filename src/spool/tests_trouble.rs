//! Unit tests of the spool under damage and disk trouble: partial messages, torn and
//! headerless tails, damaged records, injected and real write and sync errors, the free space
//! floor, unsafe directories, a second open, and the garbage collector.

use std::path::Path;
use std::time::UNIX_EPOCH;

use super::tests::{body, data_segments, envelope, last_segment, opts, read_body, reopen, store};
use super::*;

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
    // Read chunk by chunk, the damage is found at the end just the same.
    let mut reader = s.open_body(q).unwrap();
    assert!(reader.next_chunk().unwrap().is_some());
    let err = reader.next_chunk().unwrap_err();
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
