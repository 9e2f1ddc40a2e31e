//! Runs the trust-lifecycle fuzz entry points
//! (`postern_identity::fuzzing::{credential_decode, ticket_parse}`) on the
//! stable toolchain: over valid inputs, every truncation and single-byte
//! mutation of them, and deterministic random bytes. `POSTERN_FUZZ_ITERATIONS`
//! raises the number of random inputs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use postern_identity::credential::{self, CredentialBody, CredentialId, Kind};
use postern_identity::fuzzing;
use postern_identity::ticket::{Ticket, TicketCode};
use postern_identity::{AttrValue, Attributes, Identity};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn iterations() -> usize {
    std::env::var("POSTERN_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn valid_credential() -> Vec<u8> {
    let authority = Identity::from_secret_bytes(&[1; 32]);
    let mut attributes = Attributes::new();
    attributes.insert("role".into(), AttrValue::One("analyst".into()));
    attributes.insert(
        "groups".into(),
        AttrValue::Many(vec!["a".into(), "b".into()]),
    );
    let body = CredentialBody {
        version: 1,
        id: CredentialId::from_bytes([7; 16]),
        subject: Identity::from_secret_bytes(&[9; 32]).identifier(),
        issuer: authority.identifier(),
        kind: Kind::Person,
        attributes,
        issued_at: 1_700_000_000,
        expires_at: 1_700_028_800,
    };
    credential::issue(&authority, &body)
        .unwrap()
        .encode()
        .unwrap()
}

fn valid_ticket() -> Ticket {
    Ticket {
        code: TicketCode::from_bytes([5; 32]),
        authority: Identity::from_secret_bytes(&[1; 32]).identifier(),
        authority_service: "postern-authority".parse().unwrap(),
        relay_addr: "[::1]:7443".into(),
        relay: Identity::from_secret_bytes(&[2; 32]).identifier(),
        expires_at: 1_700_000_900,
    }
}

fn mutations(seed: &[u8], rng: &mut StdRng, f: impl Fn(&[u8])) {
    f(seed);
    for cut in 0..seed.len() {
        f(&seed[..cut]);
    }
    for _ in 0..iterations() {
        let mut m = seed.to_vec();
        for _ in 0..rng.gen_range(1..4) {
            let i = rng.gen_range(0..m.len());
            m[i] = rng.gen();
        }
        f(&m);
    }
}

#[test]
fn credential_decode_never_panics() {
    let mut rng = StdRng::seed_from_u64(0xC4ED);
    let valid = valid_credential();
    mutations(&valid, &mut rng, fuzzing::credential_decode);
    // The body alone, too.
    let signed = postern_identity::SignedCredential::decode(&valid).unwrap();
    mutations(signed.body_bytes(), &mut rng, fuzzing::credential_decode);
    for _ in 0..iterations() {
        let len = rng.gen_range(0..600);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        fuzzing::credential_decode(&data);
    }
    for hostile in [&[0x9f; 9000][..], &[0x81; 300][..], &[0xbf; 300][..]] {
        fuzzing::credential_decode(hostile);
    }
}

#[test]
fn ticket_parse_never_panics() {
    let mut rng = StdRng::seed_from_u64(0x71C7);
    let ticket = valid_ticket();
    let token = ticket.to_token().unwrap();
    mutations(token.as_bytes(), &mut rng, fuzzing::ticket_parse);
    let cbor = {
        use base64::Engine;
        let body = token.strip_prefix("pstn-ticket:").unwrap();
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap()
    };
    mutations(&cbor, &mut rng, fuzzing::ticket_parse);
    for _ in 0..iterations() {
        let len = rng.gen_range(0..400);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        fuzzing::ticket_parse(&data);
    }
    fuzzing::ticket_parse("pstn-ticket:".repeat(200).as_bytes());
    fuzzing::ticket_parse("pstn-ticket:é\u{0}".as_bytes());
}
