//! postern's benchmarks and its spool crash-test load, kept out of the product binary
//! (`cargo run --release -p postern-bench -- …`). Each benchmark prints figures and asserts
//! nothing; the crash test (`tests/spool_crash.rs`) drives `postern-bench spool-torture`
//! with the spool's `POSTERN_FAULT` points armed (the `fault-injection` feature of
//! `postern`, which only this crate turns on) and checks the spool after every kill.
//!
//! | module | command |
//! |---|---|
//! | [`intake`] | `intake`: the gateway's peak RSS for one big message, and per idle connection |
//! | [`spool`] | `spool`: durable stores/s, store latency, recovery time, index RSS, crash cycles |
//! | [`torture`] | `spool-torture` (hidden): the load the crash test kills, and its checker |
//! | [`routes`] | `routes`: load time, RSS and lookup latency of a big routing map |

pub mod intake;
pub mod routes;
pub mod spool;
pub mod torture;
