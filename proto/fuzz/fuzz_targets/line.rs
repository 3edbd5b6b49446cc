#![no_main]
//! Fuzz target: `postern_proto::fuzzing::line_framing`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_proto::fuzzing::line_framing(data));
