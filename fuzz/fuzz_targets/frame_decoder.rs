#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmic_fuzz::host_targets::frame_decoder(data));
