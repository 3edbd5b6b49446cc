#![no_main]
//! Fuzz target: `postern_proto::fuzzing::server_session`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_proto::fuzzing::server_session(data));
