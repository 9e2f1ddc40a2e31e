//! Entry points for fuzzing every decoder that untrusted bytes reach.
//!
//! Each function takes arbitrary bytes and must never panic, whatever they
//! are. They are used by the `cargo fuzz` targets in `fuzz/` (nightly) and by
//! the stable-toolchain test `tests/fuzz_entry_points.rs`, which runs them
//! over the checked-in corpora and over random inputs.

use crate::frame;
use crate::handshake::{verify_proof, AttachResponder, ChannelKind, LocalParty, Responder};
use crate::wire::{self, Attach, AttachHello, AttachReply, CloseReason, Control, DataFrame, Hello};

/// Frame length parsing with several caller bounds.
pub fn frame_decode(data: &[u8]) {
    for max in [0, 16, 1024, usize::MAX] {
        if let Ok(Some((body, used))) = frame::decode(data, max) {
            assert!(used == body.len() + frame::LEN_PREFIX && used <= data.len());
        }
    }
}

/// Control messages (hop channel plaintext).
pub fn control_message(data: &[u8]) {
    if let Ok(msg) = wire::decode::<Control>(data) {
        // Whatever decodes must encode again.
        let _ = wire::encode(&msg);
    }
}

/// Data-channel frame plaintext, close reasons, hellos and attach payloads.
pub fn data_frame(data: &[u8]) {
    if let Ok(frame) = DataFrame::decode(data) {
        let mut out = Vec::new();
        let _ = frame.encode_into(&mut out);
    }
    let _ = wire::decode::<CloseReason>(data);
    let _ = wire::decode::<Hello>(data);
    let _ = wire::decode::<Attach>(data);
    let _ = wire::decode::<AttachHello>(data);
    let _ = wire::decode::<AttachReply>(data);
}

/// Identity proofs as carried in XX messages 2 and 3 (after decryption).
pub fn handshake_payload(data: &[u8]) {
    let _ = verify_proof(data, &[9u8; 32]);
}

/// Raw handshake messages as a relay or outlet receives them from the
/// network: XX message 1 and IK message 1.
pub fn handshake_message(local: &LocalParty, data: &[u8]) {
    if let Ok(responder) = Responder::new(local, ChannelKind::Hop) {
        let _ = responder.handle_hello(data, local, &Hello::default());
    }
    let _ = AttachResponder::handle_request(local, data);
}

/// Credentials as presented by a peer: the envelope decoder, the body
/// decoder, and verification against a fixed trust set. Whatever decodes
/// must encode again and verification must fail cleanly.
pub fn credential_decode(data: &[u8]) {
    use crate::credential::{self, CredentialBody, NoRevocations, SignedCredential};
    let _ = CredentialBody::decode(data);
    if let Ok(signed) = SignedCredential::decode(data) {
        if let Ok(bytes) = signed.encode() {
            assert!(SignedCredential::decode(&bytes).is_ok_and(|again| again == signed));
        }
        let _ = signed.inspect_unverified();
        let _ = format!("{signed:?}");
        // Trust whoever the envelope names, so that the signature, body and
        // time checks are reached too.
        let trusted = [signed.claimed_issuer()].into_iter().collect();
        let subject = crate::Identifier::from_public_key(&[9u8; 32]);
        let _ = credential::verify(&signed, &trusted, subject, 1_700_000_000, &NoRevocations);
    }
}

/// Enrollment tickets: the text parser (as pasted by a person) and the CBOR
/// inside. A ticket that parses must print and parse back to itself.
pub fn ticket_parse(data: &[u8]) {
    use crate::ticket::{Ticket, TICKET_PREFIX};
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Ticket::parse(text);
    }
    if let Ok(ticket) = Ticket::from_cbor(data) {
        if let Ok(token) = ticket.to_token() {
            assert!(Ticket::parse(&token).is_ok_and(|again| again == ticket));
        }
    }
    let mut text = String::from(TICKET_PREFIX);
    base64::Engine::encode_string(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        data,
        &mut text,
    );
    let _ = Ticket::parse(&text);
}
