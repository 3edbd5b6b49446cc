#![no_main]
//! Fuzz target: `postern_proto::fuzzing::command_line`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_proto::fuzzing::command_line(data));
