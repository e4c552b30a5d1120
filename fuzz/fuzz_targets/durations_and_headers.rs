#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| trellis_tests::fuzz::durations_and_headers(data));
