#![no_main]

#[allow(dead_code, reason = "each target uses one function of the harness")]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::segment_scan(data));
