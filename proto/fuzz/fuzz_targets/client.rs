#![no_main]
//! Fuzz target: `postern_proto::client::fuzz::client_replies`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_proto::client::fuzz::client_replies(data));
