//! Runs the fuzz entry points (`postern_identity::fuzzing`) on the stable
//! toolchain: over every checked-in corpus file in `fuzz/corpus/<target>/`,
//! then over deterministic random inputs and mutations of the corpus. The
//! coverage-guided targets in `fuzz/` call the same functions under
//! `cargo fuzz` where a nightly toolchain exists.
//!
//! Targets: frame lengths, control messages, data frames (and the attach and
//! hello payloads), identity proofs, raw handshake messages, credentials as a
//! peer presents them (envelope, body, verification) and enrollment tickets
//! (pasted text and the CBOR inside). Configuration files, parsed by the
//! binary, are covered by `tests/fuzz_config.rs`.
//!
//! `POSTERN_FUZZ_ITERATIONS` raises the number of random inputs per target.
//! The corpus is regenerated with
//! `cargo test --test fuzz_entry_points -- --ignored regenerate_corpus`
//! (set `POSTERN_FUZZ_REGENERATE=target1,target2` to rewrite only those).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/fuzz.rs"]
mod fuzz_support;

use fuzz_support::{corpus, corpus_dir, iterations, mutate};
use postern_identity::credential::{self, CredentialBody, CredentialId, Kind, SignedCredential};
use postern_identity::fuzzing;
use postern_identity::handshake::{
    AttachInitiator, ChannelKind, Initiator, LocalParty, ProofPayload,
};
use postern_identity::ticket::{Ticket, TicketCode, TICKET_PREFIX};
use postern_identity::wire::{
    self, Attach, AttachReply, CloseReason, Control, DataFrame, Hello, RefusalCode, Side,
    TunnelToken, PROTOCOL_VERSION,
};
use postern_identity::{AttrValue, Attributes, Identifier, Identity};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TARGETS: [&str; 7] = [
    "frame_decode",
    "control_message",
    "data_frame",
    "handshake_payload",
    "handshake_message",
    "credential_decode",
    "ticket_parse",
];

fn local() -> LocalParty {
    LocalParty::new(Identity::from_secret_bytes(&[7; 32])).unwrap()
}

fn run(target: &str, local: &LocalParty, data: &[u8]) {
    match target {
        "frame_decode" => fuzzing::frame_decode(data),
        "control_message" => fuzzing::control_message(data),
        "data_frame" => fuzzing::data_frame(data),
        "handshake_payload" => fuzzing::handshake_payload(data),
        "handshake_message" => fuzzing::handshake_message(local, data),
        "credential_decode" => fuzzing::credential_decode(data),
        "ticket_parse" => fuzzing::ticket_parse(data),
        other => panic!("unknown target {other}"),
    }
}

#[test]
fn entry_points_survive_corpus_random_and_mutated_inputs() {
    let iterations = iterations("POSTERN_FUZZ_ITERATIONS", 20_000);
    let local = local();
    let mut rng = StdRng::seed_from_u64(0x0905_7e27);
    for target in TARGETS {
        let seeds = corpus(target);
        assert!(!seeds.is_empty(), "corpus of {target} is empty");
        for seed in &seeds {
            run(target, &local, seed);
        }
        // handshake_message does real crypto per input (and credential_decode
        // verifies a signature whenever an envelope decodes); keep them cheaper.
        let n = match target {
            "handshake_message" => iterations / 5,
            "credential_decode" => iterations / 2,
            _ => iterations,
        };
        for i in 0..n {
            let data = if i % 2 == 0 {
                let pick = rng.gen_range(0..seeds.len());
                mutate(&mut rng, &seeds[pick])
            } else {
                (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect()
            };
            run(target, &local, &data);
        }
    }
}

/// The corpus must contain inputs that actually decode, or mutations would
/// rarely get past the first check.
#[test]
fn corpus_holds_valid_messages() {
    let decodes = corpus("control_message")
        .iter()
        .filter(|b| wire::decode::<Control>(b).is_ok())
        .count();
    assert!(
        decodes >= 5,
        "only {decodes} valid control messages in the corpus"
    );
    let frames = corpus("data_frame")
        .iter()
        .filter(|b| DataFrame::decode(b).is_ok())
        .count();
    assert!(frames >= 4);
    let credentials = corpus("credential_decode")
        .iter()
        .filter(|b| SignedCredential::decode(b).is_ok_and(|c| c.inspect_unverified().is_ok()))
        .count();
    assert!(
        credentials >= 3,
        "only {credentials} valid credentials in the corpus"
    );
    // One seed passes every check of `fuzzing::credential_decode`, so that
    // mutations start from the end of the verification path too.
    let valid = SignedCredential::decode(
        &std::fs::read(corpus_dir("credential_decode").join("seed-valid")).unwrap(),
    )
    .unwrap();
    let trusted = [valid.claimed_issuer()].into_iter().collect();
    let subject = Identifier::from_public_key(&[9; 32]);
    credential::verify(
        &valid,
        &trusted,
        subject,
        1_700_000_000,
        &credential::NoRevocations,
    )
    .unwrap();
    let tickets = corpus("ticket_parse")
        .iter()
        .filter(|b| {
            std::str::from_utf8(b).is_ok_and(|t| Ticket::parse(t).is_ok())
                || Ticket::from_cbor(b).is_ok()
        })
        .count();
    assert!(tickets >= 4, "only {tickets} valid tickets in the corpus");
}

/// Hand-written hostile inputs for the credential and ticket decoders:
/// deep nesting, huge announced lengths, oversized inputs.
#[test]
fn credential_and_ticket_decoders_survive_hostile_inputs() {
    let mut inputs: Vec<Vec<u8>> = vec![
        vec![0x81; 100_000], // arrays nested 100,000 deep
        vec![0xa1; 100_000], // maps nested 100,000 deep
        [&[0xa1, 0x63, b'b', b'o', b'd'][..], &[0x9f; 50_000]].concat(),
        vec![0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // bytes(2^64-1)
        vec![0x7b, 0, 0, 0, 1, 0, 0, 0, 0],                         // text(2^32)
        vec![0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // map(2^64-1)
        vec![0xff; credential::MAX_CREDENTIAL_LEN + 1],
        vec![0; 1 << 20],
    ];
    inputs.push(format!("{TICKET_PREFIX}{}", "A".repeat(5000)).into_bytes());
    inputs.push(format!("{TICKET_PREFIX}{}", "gQ".repeat(1000)).into_bytes());
    let local = local();
    for data in &inputs {
        run("credential_decode", &local, data);
        run("ticket_parse", &local, data);
    }
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing the wire format"]
fn regenerate_corpus() {
    let only = std::env::var("POSTERN_FUZZ_REGENERATE").ok();
    let write = |target: &str, name: &str, bytes: &[u8]| {
        if only
            .as_deref()
            .is_some_and(|only| !only.split(',').any(|t| t.trim() == target))
        {
            return;
        }
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let svc = "db-prod".parse().unwrap();
    let token = TunnelToken {
        id: [1; 16],
        secret: [2; 32],
    };
    let controls = [
        Control::Register {
            service: "db-prod".parse().unwrap(),
        },
        Control::Registered {
            service: "db-prod".parse().unwrap(),
        },
        Control::RegisterRefused {
            service: "db-prod".parse().unwrap(),
            code: RefusalCode::Denied,
            reason: "held".into(),
        },
        Control::Open {
            request: 1,
            service: "db-prod".parse().unwrap(),
        },
        Control::Opened {
            request: 1,
            token: token.clone(),
        },
        Control::OpenRefused {
            request: 1,
            code: RefusalCode::UnknownService,
            reason: "not registered".into(),
        },
        Control::Incoming {
            service: svc,
            token: token.clone(),
            source: Some([192, 0, 2, 7].into()),
        },
        Control::Ping { seq: 7 },
        Control::Pong { seq: 7 },
        Control::Goodbye {
            code: RefusalCode::Limit,
            reason: "too many".into(),
        },
        Control::FollowRevocations { after: 3 },
        Control::Revocations {
            entries: vec![credential::RevocationEntry {
                seq: 4,
                revocation: credential::Revocation {
                    target: credential::RevocationTarget::Credential(CredentialId::from_bytes(
                        [5; 16],
                    )),
                    revoked_at: 1_700_000_000,
                },
            }],
        },
    ];
    for (i, c) in controls.iter().enumerate() {
        write(
            "control_message",
            &format!("seed-{i:02}"),
            &wire::encode(c).unwrap(),
        );
    }
    let mut buf = Vec::new();
    let frames = [
        DataFrame::Data(b"SELECT 1"),
        DataFrame::Eof,
        DataFrame::Ready,
        DataFrame::Close(CloseReason::Denied {
            reason: "no".into(),
        }),
        DataFrame::Close(CloseReason::Shutdown),
    ];
    for (i, f) in frames.iter().enumerate() {
        f.encode_into(&mut buf).unwrap();
        write("data_frame", &format!("seed-{i:02}"), &buf);
    }
    write(
        "data_frame",
        "seed-attach",
        &wire::encode(&Attach {
            version: PROTOCOL_VERSION,
            side: Side::Inlet,
            token,
        })
        .unwrap(),
    );
    write(
        "data_frame",
        "seed-attach-reply",
        &wire::encode(&AttachReply::Refused {
            code: RefusalCode::Limit,
            reason: "x".into(),
        })
        .unwrap(),
    );
    write(
        "data_frame",
        "seed-hello",
        &wire::encode(&Hello {
            service: Some("db".parse().unwrap()),
            credential: None,
        })
        .unwrap(),
    );
    for (i, f) in [
        &[0u8, 3, 1, 2, 3][..],
        &[0, 0],
        &[0xff, 0xff, 1],
        &[0x00, 0x10],
    ]
    .iter()
    .enumerate()
    {
        write("frame_decode", &format!("seed-{i:02}"), f);
    }
    let id = Identity::from_secret_bytes(&[3; 32]);
    let proof = ProofPayload {
        version: PROTOCOL_VERSION,
        identity_key: *id.public().as_bytes(),
        signature: [4; 64],
        hello: Hello::default(),
    };
    write(
        "handshake_payload",
        "seed-00",
        &wire::encode(&proof).unwrap(),
    );
    let party = local();
    let (_, msg1) = Initiator::start(&party, ChannelKind::Hop).unwrap();
    write("handshake_message", "seed-xx-msg1", &msg1);
    let relay = local();
    let (_, ik1) = AttachInitiator::start(&party, relay.static_public(), true).unwrap();
    write("handshake_message", "seed-ik-msg1", &ik1);

    // Real credentials, signed by a fixed authority. `fuzzing::credential_decode`
    // verifies at 1_700_000_000 for the subject with public key [9; 32], so
    // the first one passes every check and the others fail at one each.
    let authority = Identity::from_secret_bytes(&[5; 32]);
    let subject = Identifier::from_public_key(&[9; 32]);
    let mut attrs = Attributes::new();
    attrs.insert("team".into(), AttrValue::One("analytics".into()));
    attrs.insert("role".into(), AttrValue::One("analyst".into()));
    attrs.insert(
        "groups".into(),
        AttrValue::Many(vec!["analysts".into(), "oncall".into()]),
    );
    let body = |id: u8, subject: Identifier, kind: Kind, attributes: &Attributes, iat: u64| {
        CredentialBody {
            version: credential::CREDENTIAL_VERSION,
            id: CredentialId::from_bytes([id; 16]),
            subject,
            issuer: authority.identifier(),
            kind,
            attributes: attributes.clone(),
            issued_at: iat,
            expires_at: iat + 8 * 3600,
        }
    };
    let bodies = [
        (
            "valid",
            body(1, subject, Kind::Person, &attrs, 1_699_990_000),
        ),
        (
            "service-no-attrs",
            body(2, subject, Kind::Service, &Attributes::new(), 1_699_999_000),
        ),
        (
            "other-subject",
            body(
                3,
                Identity::from_secret_bytes(&[6; 32]).identifier(),
                Kind::Person,
                &attrs,
                1_699_990_000,
            ),
        ),
        (
            "expired",
            body(4, subject, Kind::Person, &attrs, 1_600_000_000),
        ),
    ];
    for (name, b) in &bodies {
        let signed = credential::issue(&authority, b).unwrap();
        let bytes = signed.encode().unwrap();
        write("credential_decode", &format!("seed-{name}"), &bytes);
        if *name == "valid" {
            write("credential_decode", "seed-body", &b.encode().unwrap());
            for cut in [1, 9, bytes.len() / 2, bytes.len() - 1] {
                write(
                    "credential_decode",
                    &format!("seed-truncated-{cut:03}"),
                    &bytes[..cut],
                );
            }
        }
    }

    // Real tickets: the pasted text form (also wrapped like a terminal would)
    // and the CBOR inside, plus truncations of both.
    let tickets = [
        Ticket {
            code: TicketCode::from_bytes([8; 32]),
            authority: authority.identifier(),
            authority_service: "postern-authority".parse().unwrap(),
            relay_addr: "relay.example:4000".into(),
            relay: Identity::from_secret_bytes(&[3; 32]).identifier(),
            expires_at: 1_700_000_900,
        },
        Ticket {
            code: TicketCode::from_bytes([0; 32]),
            authority: authority.identifier(),
            authority_service: "auth.eu-1".parse().unwrap(),
            relay_addr: "[2001:db8::1]:443".into(),
            relay: authority.identifier(),
            expires_at: u64::MAX,
        },
    ];
    for (i, t) in tickets.iter().enumerate() {
        let token = t.to_token().unwrap();
        let cbor = base64url_decode(&token[TICKET_PREFIX.len()..]);
        write("ticket_parse", &format!("seed-{i}-text"), token.as_bytes());
        write("ticket_parse", &format!("seed-{i}-cbor"), &cbor);
        if i == 0 {
            let wrapped: String = token
                .as_bytes()
                .chunks(60)
                .map(|c| format!("  {}\n", String::from_utf8_lossy(c)))
                .collect();
            write("ticket_parse", "seed-0-wrapped", wrapped.as_bytes());
            write(
                "ticket_parse",
                "seed-0-text-truncated",
                &token.as_bytes()[..token.len() - 7],
            );
            write(
                "ticket_parse",
                "seed-0-cbor-truncated",
                &cbor[..cbor.len() / 2],
            );
        }
    }
}

/// Unpadded base64url, as tickets use (the test has no base64 dependency).
fn base64url_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        other => panic!("not base64url: {other}"),
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for c in text.bytes() {
        acc = (acc << 6) | u32::from(value(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
