#![no_main]
#[path = "_common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| prefix_tune::fuzzing::config_json(data));
