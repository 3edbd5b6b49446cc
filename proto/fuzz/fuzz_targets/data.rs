#![no_main]
//! Fuzz target: `postern_proto::fuzzing::data_stream`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_proto::fuzzing::data_stream(data));
