//! Benchmarks as commands (`postern bench …`): they print figures and assert nothing.

pub mod intake;
