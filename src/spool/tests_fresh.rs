//! The envelopes of just-committed messages handed to the scheduler from memory
//! (`fresh`): the same envelope the disk gives, once, and never kept past the message.

use std::time::{Duration, UNIX_EPOCH};

use super::tests::{envelope, read_body};
use super::*;

fn open(dir: &std::path::Path, fresh_budget: usize) -> Spool {
    let opts = SpoolOptions {
        min_free_bytes: 0,
        gc_interval: Duration::from_secs(3600),
        fresh_budget,
        ..SpoolOptions::default()
    };
    Spool::open(dir, opts).unwrap().0
}

fn store(s: &Spool) -> QueueId {
    let mut env = envelope(3);
    // Finer than the record keeps: the handed-over envelope must match the disk's.
    env.received_at = UNIX_EPOCH + Duration::from_nanos(1_764_000_000_123_456_789);
    let mut w = s.begin(env).unwrap();
    w.write(b"Subject: x\r\n\r\nbody\r\n").unwrap();
    let q = w.queue_id();
    w.commit().wait().unwrap();
    q
}

fn held(s: &Spool) -> usize {
    lock(&s.handle.inner.fresh).len()
}

#[test]
fn the_first_take_is_from_memory_and_equals_the_disk() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 1 << 20);
    let q = store(&s);
    assert_eq!(held(&s), 1);
    let from_disk = s.read_envelope(q).unwrap();
    assert_eq!(held(&s), 1, "read_envelope leaves the held copy alone");
    let first = s.take_message(q).unwrap().0;
    assert_eq!(held(&s), 0);
    assert_eq!(first, from_disk);
    assert_eq!(
        first.received_at,
        UNIX_EPOCH + Duration::from_micros(1_764_000_000_123_456)
    );
    // Later attempts read the Commit record.
    assert_eq!(s.take_message(q).unwrap().0, from_disk);
}

#[test]
fn a_removed_message_leaves_nothing_held() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 1 << 20);
    let q = store(&s);
    assert_eq!(held(&s), 1);
    s.delete(q).wait().unwrap();
    assert_eq!(held(&s), 0);
    assert!(matches!(s.take_message(q), Err(SpoolError::NotFound(_))));
}

#[test]
fn without_a_budget_every_envelope_comes_from_disk() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 0);
    let q = store(&s);
    assert_eq!(held(&s), 0);
    assert_eq!(s.take_message(q).unwrap().0, s.read_envelope(q).unwrap());
}

#[test]
fn a_one_chunk_body_is_handed_over_once_and_equals_the_disk() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 1 << 20);
    let q = store(&s);
    let (env, body) = s.take_message(q).unwrap();
    assert_eq!(env, s.read_envelope(q).unwrap());
    let body = body.expect("a one-chunk body comes from memory");
    assert_eq!(&body[..], &read_body(&s, q)[..]);
    assert_eq!(&body[..], b"Subject: x\r\n\r\nbody\r\n");
    // Later attempts read it from the spool.
    assert!(s.take_message(q).unwrap().1.is_none());
}

#[test]
fn a_body_over_one_chunk_or_without_a_budget_is_read_from_disk() {
    let d = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        min_free_bytes: 0,
        gc_interval: Duration::from_secs(3600),
        chunk_size: 64,
        ..SpoolOptions::default()
    };
    let s = Spool::open(d.path(), opts).unwrap().0;
    let mut w = s.begin(envelope(1)).unwrap();
    w.write(&[b'x'; 200]).unwrap();
    let q = w.queue_id();
    w.commit().wait().unwrap();
    let (_, body) = s.take_message(q).unwrap();
    assert!(body.is_none(), "written as several chunks: not held");
    assert_eq!(read_body(&s, q), vec![b'x'; 200]);
    drop(s);

    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 0);
    let q = store(&s);
    assert!(s.take_message(q).unwrap().1.is_none());
}
