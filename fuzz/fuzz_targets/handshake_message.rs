#![no_main]
use std::sync::OnceLock;

use postern_identity::handshake::LocalParty;
use postern_identity::Identity;

static LOCAL: OnceLock<Option<LocalParty>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(local) = LOCAL.get_or_init(|| LocalParty::new(Identity::from_secret_bytes(&[7; 32])).ok()) {
        postern_identity::fuzzing::handshake_message(local, data);
    }
});
