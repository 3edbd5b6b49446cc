//! How soon appends reach the disk (`log::Flush`) and the segments written ahead with zeros
//! (`log::PREALLOCATE`), through the spool's API: an outcome shares the next Commit's sync,
//! in-doubt marks and Done records take no sync of their own, and a zero tail is the clean
//! end of a segment, after a stop and after a crash.

use std::path::Path;
use std::time::{Duration, Instant};

use super::tests::envelope;
use super::*;

fn opts() -> SpoolOptions {
    SpoolOptions {
        min_free_bytes: 0,
        gc_interval: Duration::from_secs(3600),
        ..SpoolOptions::default()
    }
}

fn store(s: &Spool, data: &[u8]) -> QueueId {
    let mut w = s.begin(envelope(1)).unwrap();
    w.write(data).unwrap();
    let q = w.queue_id();
    w.commit().wait().unwrap();
    q
}

fn delivered() -> RecipientState {
    RecipientState::Delivered {
        reply: "250 2.0.0 ok".into(),
    }
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn an_outcome_rides_the_sync_of_the_next_commit() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), opts()).unwrap();
    // Each trial: an outcome, then at once a Commit. One sync covers both unless the box
    // stalled us for more than log::SOON between the two appends; three trials make that
    // stall a non-event, and an outcome synced on its own fails all three.
    let mut syncs = Vec::new();
    for _ in 0..3 {
        let q = store(&s, b"first");
        s.mark_in_doubt(q, &[0]).wait().unwrap();
        let before = s.stats().syncs;
        let outcome = s.ledger(q, 0, delivered());
        let _next = store(&s, b"second");
        outcome.wait().unwrap();
        syncs.push(s.stats().syncs - before);
    }
    assert!(syncs.contains(&1), "syncs per outcome+commit: {syncs:?}");
}

#[test]
fn an_outcome_alone_is_synced_within_a_few_milliseconds() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), opts()).unwrap();
    let q = store(&s, b"x");
    s.mark_in_doubt(q, &[0]).wait().unwrap();
    let before = s.stats().syncs;
    let t = Instant::now();
    s.ledger(q, 0, delivered()).wait().unwrap();
    assert_eq!(s.stats().syncs - before, 1);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn in_doubt_marks_and_done_records_take_no_sync_of_their_own() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), opts()).unwrap();
    let q = store(&s, b"x");
    let before = s.stats().syncs;
    s.mark_in_doubt(q, &[0]).wait().unwrap();
    s.ledger(q, 0, delivered()).wait().unwrap();
    let after_outcome = s.stats().syncs;
    s.finish(q).wait().unwrap();
    // The mark rode the outcome's sync; the Done record waits for the next batch.
    assert_eq!(after_outcome - before, 1);
    assert_eq!(s.stats().syncs, after_outcome);
    // ...which comes within log::LAZY even when nothing else is written.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.stats().syncs == after_outcome && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.stats().syncs, after_outcome + 1);
    drop(s);
    let (s, r) = Spool::open(d.path(), opts()).unwrap();
    assert_eq!(r.messages, 0, "the Done record was written");
    assert!(s.is_empty());
}

#[test]
fn appends_do_not_change_the_size_of_the_active_segment() {
    let d = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), opts()).unwrap();
    store(&s, b"x");
    let seg = segments(d.path()).pop().unwrap();
    let size = std::fs::metadata(&seg).unwrap().len();
    assert!(size >= log::PREALLOCATE, "written ahead: {size}");
    for i in 0..50 {
        store(&s, &vec![b'a'; 1000 + i]);
    }
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), size);
    // A clean stop trims the zeros; the next start finds nothing to cut.
    drop(s);
    let trimmed = std::fs::metadata(&seg).unwrap().len();
    assert!(trimmed < 100_000, "{trimmed}");
    let (s, r) = Spool::open(d.path(), opts()).unwrap();
    assert_eq!(r.messages, 51);
    assert_eq!((r.truncated_bytes, r.corrupt_regions), (0, 0));
    drop(s);
}

#[test]
fn a_crash_leaves_a_zero_tail_that_recovery_reads_as_the_end() {
    let d = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(d.path(), opts()).unwrap();
    let q = store(&s, b"acknowledged");
    // What a crash leaves: the files as they are while the spool is open.
    for seg in segments(d.path()) {
        std::fs::copy(&seg, copy.path().join(seg.file_name().unwrap())).unwrap();
    }
    drop(s);
    let (s, r) = Spool::open(copy.path(), opts()).unwrap();
    assert_eq!(r.messages, 1);
    assert_eq!(r.corrupt_regions, 0, "zeros are not damage");
    assert!(r.truncated_bytes > 0, "the zero tail is cut: {r:?}");
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut s.open_body(q).unwrap(), &mut body).unwrap();
    assert_eq!(body, b"acknowledged");
}
