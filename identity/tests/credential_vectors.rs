//! Known-answer vectors for the credential format (`vectors/credential_v1.toml`):
//! a fixed authority key and body must encode to the checked-in CBOR and
//! signature (Ed25519 is deterministic), and the checked-in credential must
//! verify. A change to either means the wire format changed: old credentials
//! would stop verifying, or peers would disagree.
//!
//! Regenerate (only for a deliberate format change, with a version bump):
//! `cargo test -p postern-identity --test credential_vectors -- --ignored regenerate`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use postern_identity::credential::{
    self, CredentialBody, CredentialError, CredentialId, Kind, NoRevocations, SignedCredential,
    TrustedAuthorities, CREDENTIAL_VERSION,
};
use postern_identity::{AttrValue, Attributes, Identity};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vector {
    comment: String,
    authority_secret: String,
    subject_secret: String,
    credential_id: String,
    kind: Kind,
    issued_at: u64,
    expires_at: u64,
    attributes: Attributes,
    /// Outputs.
    authority: String,
    subject: String,
    body_cbor: String,
    signature: String,
    credential_cbor: String,
}

fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/credential_v1.toml")
}

fn secret(hex_str: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_str, &mut out).unwrap();
    out
}

fn inputs() -> Vector {
    let mut attributes = Attributes::new();
    attributes.insert("team".into(), AttrValue::One("analytics".into()));
    attributes.insert("role".into(), AttrValue::One("analyst".into()));
    attributes.insert(
        "groups".into(),
        AttrValue::Many(vec!["analysts".into(), "oncall".into()]),
    );
    Vector {
        comment: "Postern credential v1 known-answer vector. Inputs: authority_secret, subject_secret, credential_id, kind, issued_at, expires_at, attributes. Outputs: the rest.".into(),
        authority_secret: hex::encode([0x11u8; 32]),
        subject_secret: hex::encode([0x22u8; 32]),
        credential_id: "000102030405060708090a0b0c0d0e0f".into(),
        kind: Kind::Person,
        issued_at: 1_700_000_000,
        expires_at: 1_700_028_800,
        attributes,
        authority: String::new(),
        subject: String::new(),
        body_cbor: String::new(),
        signature: String::new(),
        credential_cbor: String::new(),
    }
}

fn compute(v: &Vector) -> (Identity, CredentialBody, SignedCredential) {
    let authority = Identity::from_secret_bytes(&secret(&v.authority_secret));
    let subject = Identity::from_secret_bytes(&secret(&v.subject_secret));
    let body = CredentialBody {
        version: CREDENTIAL_VERSION,
        id: v.credential_id.parse::<CredentialId>().unwrap(),
        subject: subject.identifier(),
        issuer: authority.identifier(),
        kind: v.kind,
        attributes: v.attributes.clone(),
        issued_at: v.issued_at,
        expires_at: v.expires_at,
    };
    let signed = credential::issue(&authority, &body).unwrap();
    (authority, body, signed)
}

#[test]
fn encoding_and_signature_match_the_vector() {
    let text = std::fs::read_to_string(path()).unwrap();
    let v: Vector = toml::from_str(&text).unwrap();
    let (authority, body, signed) = compute(&v);
    assert_eq!(authority.identifier().to_string(), v.authority);
    assert_eq!(body.subject.to_string(), v.subject);
    assert_eq!(hex::encode(body.encode().unwrap()), v.body_cbor);
    assert_eq!(hex::encode(signed.body_bytes()), v.body_cbor);
    assert_eq!(hex::encode(signed.signature()), v.signature);
    assert_eq!(hex::encode(signed.encode().unwrap()), v.credential_cbor);
}

#[test]
fn the_vector_verifies_and_decodes() {
    let text = std::fs::read_to_string(path()).unwrap();
    let v: Vector = toml::from_str(&text).unwrap();
    let wire = hex::decode(&v.credential_cbor).unwrap();
    let signed = SignedCredential::decode(&wire).unwrap();
    let trusted: TrustedAuthorities = [v.authority.parse().unwrap()].into_iter().collect();
    let subject = v.subject.parse().unwrap();
    let verified =
        credential::verify(&signed, &trusted, subject, v.issued_at + 10, &NoRevocations).unwrap();
    assert_eq!(verified.attributes(), &v.attributes);
    assert_eq!(verified.kind(), v.kind);
    assert_eq!(verified.id().to_string(), v.credential_id);
    assert_eq!(verified.expires_at(), v.expires_at);
    // One flipped bit anywhere in the signed part breaks it.
    for i in 0..wire.len() {
        let mut bad = wire.clone();
        bad[i] ^= 0x01;
        if let Ok(c) = SignedCredential::decode(&bad) {
            let r = credential::verify(&c, &trusted, subject, v.issued_at + 10, &NoRevocations);
            assert!(r.is_err(), "bit flip at byte {i} still verifies");
        }
    }
    // And it expires when it says.
    let late = credential::verify(
        &signed,
        &trusted,
        subject,
        v.expires_at + 61,
        &NoRevocations,
    );
    assert!(matches!(late, Err(CredentialError::Expired { .. })));
}

#[test]
#[ignore = "rewrites tests/vectors/credential_v1.toml"]
fn regenerate() {
    let mut v = inputs();
    let (authority, body, signed) = compute(&v);
    v.authority = authority.identifier().to_string();
    v.subject = body.subject.to_string();
    v.body_cbor = hex::encode(signed.body_bytes());
    v.signature = hex::encode(signed.signature());
    v.credential_cbor = hex::encode(signed.encode().unwrap());
    std::fs::create_dir_all(path().parent().unwrap()).unwrap();
    std::fs::write(path(), toml::to_string(&v).unwrap()).unwrap();
}
