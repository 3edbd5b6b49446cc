#![no_main]
//! Fuzz target: `postern_proto::fuzzing::proxy_header`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_proto::fuzzing::proxy_header(data));
