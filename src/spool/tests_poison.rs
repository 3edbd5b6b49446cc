//! Poison-message quarantine in the spool: attempt counts carried by the in-doubt marks,
//! the quarantine flag on the Hold record, both surviving a restart and a compaction, and a
//! release resetting the counts.

use std::time::Duration;

use super::tests::envelope;
use super::*;

fn opts() -> SpoolOptions {
    SpoolOptions {
        min_free_bytes: 0,
        gc_interval: Duration::from_secs(3600),
        segment_size: 64 << 10,
        chunk_size: 16 << 10,
        compact_below: 0.9,
        ..SpoolOptions::default()
    }
}

fn store(s: &Spool, rcpts: usize, len: usize) -> QueueId {
    let mut w = s.begin(envelope(rcpts)).unwrap();
    w.write(&vec![b'x'; len]).unwrap();
    let q = w.queue_id();
    w.commit().wait().unwrap();
    q
}

#[test]
fn attempts_and_quarantine_survive_restart_and_compaction() {
    let d = tempfile::tempdir().unwrap();
    let q = {
        let (s, _) = Spool::open(d.path(), opts()).unwrap();
        let q = store(&s, 2, 100);
        s.mark_in_doubt_counted(q, &[(0, 1), (1, 1)])
            .wait()
            .unwrap();
        s.mark_in_doubt_counted(q, &[(0, 2)]).wait().unwrap();
        s.ledger(
            q,
            1,
            RecipientState::Delivered {
                reply: "250 ok".into(),
            },
        )
        .wait()
        .unwrap();
        assert_eq!(s.status(q).unwrap().attempts, vec![2, 0]);
        q
    };
    // Restart: the count comes back from the in-doubt record.
    let (s, r) = Spool::open(d.path(), opts()).unwrap();
    assert_eq!(r.in_doubt, 1);
    assert_eq!(s.status(q).unwrap().attempts, vec![2, 0]);
    s.mark_in_doubt_counted(q, &[(0, 3)]).wait().unwrap();
    s.quarantine_poison(q, "test").wait().unwrap();
    assert!(s.is_quarantined(q) && s.is_held(q));
    assert_eq!(s.quarantined(), 1);
    // Compaction copies the message: the copy keeps the count and the quarantine.
    for _ in 0..40 {
        let n = store(&s, 1, 8000);
        s.delete(n).wait().unwrap();
    }
    s.collect_garbage().unwrap();
    assert!(s.stats().messages_moved >= 1, "{:?}", s.stats());
    drop(s);
    let (s, _) = Spool::open(d.path(), opts()).unwrap();
    assert_eq!(s.status(q).unwrap().attempts, vec![3, 0]);
    assert!(s.is_quarantined(q));
    let m = s.message(q).unwrap();
    assert_eq!(m.queue, QueueState::Quarantine);
    // Release: back in the active queue, counts from zero, after a restart too.
    s.release(q).wait().unwrap();
    assert!(!s.is_held(q) && !s.is_quarantined(q));
    assert_eq!(s.status(q).unwrap().attempts, vec![0, 0]);
    drop(s);
    let (s, _) = Spool::open(d.path(), opts()).unwrap();
    assert_eq!(s.status(q).unwrap().attempts, vec![0, 0]);
    assert_eq!(s.message(q).unwrap().queue, QueueState::Active);
    assert_eq!(s.quarantined(), 0);
}

#[test]
fn an_operator_hold_is_not_a_quarantine() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), opts()).unwrap();
    let q = store(&s, 1, 10);
    s.hold(q).wait().unwrap();
    // Quarantining a held message leaves the operator's hold as it is.
    s.quarantine_poison(q, "test").wait().unwrap();
    assert!(s.is_held(q) && !s.is_quarantined(q));
    assert_eq!(s.message(q).unwrap().queue, QueueState::Hold);
}
