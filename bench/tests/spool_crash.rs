//! Crash tests with a real process: `postern-bench spool-torture` is killed with SIGKILL at
//! random moments, or aborts itself at each `POSTERN_FAULT` point inside store, ledger update,
//! segment rotation and GC; after each, the spool is recovered and checked (see
//! `bench/src/torture.rs`). The benchmark (`postern-bench spool`) runs 100 cycles.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::path::PathBuf;

use postern_bench::torture::{CrashOptions, FAULT_POINTS, crash_cycles};

#[test]
fn every_acknowledged_message_and_ledger_step_survives_kill_and_fault_points() {
    let tmp = tempfile::tempdir().unwrap();
    let cycles = 2 * FAULT_POINTS.len() + 2; // 20: 10 SIGKILLs, one abort at each fault point
    let report = crash_cycles(&CrashOptions {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_postern-bench")),
        dir: tmp.path().join("spool"),
        cycles,
        faults: true,
        writers: 20,
        messages: 600,
        size: 4096,
        seed: 7,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    println!("{report:?}");
    assert_eq!(report.cycles, cycles);
    assert!(report.acked > 100, "{report:?}");
    assert!(report.acked_steps > 100, "{report:?}");
    assert!(report.aborted >= FAULT_POINTS.len() / 2, "{report:?}");
}
