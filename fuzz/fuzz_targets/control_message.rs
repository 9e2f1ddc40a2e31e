#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| postern_identity::fuzzing::control_message(data));
