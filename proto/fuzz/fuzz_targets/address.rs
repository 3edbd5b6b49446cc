#![no_main]
//! Fuzz target: `postern_proto::fuzzing::address`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_proto::fuzzing::address(data));
