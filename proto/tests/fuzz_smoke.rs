//! A short fuzz run inside the test suite.
//!
//! Replays every corpus input kept in `fuzz/seeds/<target>/` (the seeds, the SMTP smuggling
//! variants, and any crash a real `cargo fuzz run` once found) through the same entry points
//! the libFuzzer targets call, then a bounded number of deterministic mutations of each
//! (bit flips, octet insertions from the SMTP alphabet, splices, truncations). The long runs
//! are `cargo fuzz run -s none TARGET` (see the README); this keeps every target honest on
//! every `cargo test`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use std::path::Path;

use postern_proto::fuzzing;

/// Mutants per corpus input.
const MUTANTS: usize = 3000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(v.len() + 1);
                let b = fuzzing::SMTP_ALPHABET[rng.below(fuzzing::SMTP_ALPHABET.len())];
                v.insert(i, b);
            }
            2 if !other.is_empty() => {
                let start = rng.below(other.len());
                let end = start + rng.below(other.len() - start + 1);
                let at = rng.below(v.len() + 1);
                v.splice(at..at, other[start..end].iter().copied());
            }
            3 => v.truncate(rng.below(v.len() + 1)),
            _ => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
        }
    }
    v
}

fn run(target: &str, entry: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!inputs.is_empty(), "no corpus for {target}");
    inputs.sort();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ target.len() as u64);
    for (i, input) in inputs.iter().enumerate() {
        entry(input);
        let other = &inputs[(i + 1) % inputs.len()];
        for _ in 0..MUTANTS {
            entry(&mutate(&mut rng, input, other));
        }
    }
}

#[test]
fn fuzz_command() {
    run("command", fuzzing::command_line);
}

#[test]
fn fuzz_address() {
    run("address", fuzzing::address);
}

#[test]
fn fuzz_reply() {
    run("reply", fuzzing::reply_stream);
}

#[test]
fn fuzz_data() {
    run("data", fuzzing::data_stream);
}

#[test]
fn fuzz_line() {
    run("line", fuzzing::line_framing);
}

#[test]
fn fuzz_server() {
    run("server", fuzzing::server_session);
}

#[test]
fn fuzz_client() {
    run("client", postern_proto::client::fuzz::client_replies);
}

#[test]
fn fuzz_proxy() {
    run("proxy", fuzzing::proxy_header);
}
