#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmic_fuzz::agent_targets::elf(data));
