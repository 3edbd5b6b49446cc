//! The log's group-commit timing and segment names.

use super::*;

fn log(dir: &Path) -> Log {
    Log::create(dir, 1, 1 << 20, BTreeMap::new(), 1, Arc::default()).unwrap()
}

/// Whether the committer would take a batch right now (without waiting).
fn due_now(log: &Log) -> bool {
    log.next_batch(Duration::ZERO).is_some()
}

#[test]
fn an_outcome_waits_for_intake_only_while_there_is_intake() {
    let d = tempfile::tempdir().unwrap();
    let log = log(d.path());
    // No message accepted lately: an outcome is due at once.
    log.append(b"outcome", Reg::None, Flush::Soon).unwrap();
    assert!(
        due_now(&log),
        "an outcome alone waited for a commit that is not coming"
    );
    // A commit just now: the next outcome waits (up to SOON) to share its sync. (Three
    // trials: a box that stalls us for SOON between two appends fails one, not all.)
    let mut waited = Vec::new();
    for _ in 0..3 {
        log.append(b"commit", Reg::None, Flush::Now).unwrap();
        assert!(due_now(&log));
        log.append(b"outcome", Reg::None, Flush::Soon).unwrap();
        waited.push(!due_now(&log));
        std::thread::sleep(SOON * 2);
        assert!(due_now(&log), "the waiting outcome was not due after SOON");
    }
    assert!(
        waited.contains(&true),
        "an outcome during intake never waited to ride a commit"
    );
    // Long after the last commit: at once again.
    log.append(b"outcome", Reg::None, Flush::Soon).unwrap();
    assert!(due_now(&log));
    // A Lazy append is never due on its own before LAZY.
    log.append(b"done", Reg::None, Flush::Lazy).unwrap();
    assert!(!due_now(&log));
}

#[test]
fn segment_names() {
    assert_eq!(segment_name(42), "00000042.seg");
    assert_eq!(parse_segment_name("00000042.seg"), Some(42));
    assert_eq!(parse_segment_name("42.seg"), None);
    assert_eq!(parse_segment_name("0000004x.seg"), None);
    assert_eq!(parse_segment_name("00000042.tmp"), None);
}
