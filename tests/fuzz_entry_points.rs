//! Runs the fuzz entry points (`postern_identity::fuzzing`) on the stable
//! toolchain: over every checked-in corpus file in `fuzz/corpus/<target>/`,
//! then over deterministic random inputs and mutations of the corpus. The
//! coverage-guided targets in `fuzz/` call the same functions under
//! `cargo fuzz` where a nightly toolchain exists.
//!
//! `POSTERN_FUZZ_ITERATIONS` raises the number of random inputs per target.
//! The corpus is regenerated with
//! `cargo test --test fuzz_entry_points -- --ignored regenerate_corpus`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use postern_identity::fuzzing;
use postern_identity::handshake::{
    AttachInitiator, ChannelKind, Initiator, LocalParty, ProofPayload,
};
use postern_identity::wire::{
    self, Attach, AttachReply, CloseReason, Control, DataFrame, Hello, Side, TunnelToken,
    PROTOCOL_VERSION,
};
use postern_identity::Identity;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TARGETS: [&str; 5] = [
    "frame_decode",
    "control_message",
    "data_frame",
    "handshake_payload",
    "handshake_message",
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

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
        other => panic!("unknown target {other}"),
    }
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} missing ({e}); regenerate it", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        match rng.gen_range(0..5) {
            0 if !data.is_empty() => {
                let i = rng.gen_range(0..data.len());
                data[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if !data.is_empty() => {
                let cut = rng.gen_range(0..data.len());
                data.truncate(cut);
            }
            2 => {
                let i = rng.gen_range(0..=data.len());
                data.insert(i, rng.gen());
            }
            3 if !data.is_empty() => {
                let i = rng.gen_range(0..data.len());
                data[i] = [0x00, 0xff, 0x7f, 0x80, 0x9f, 0xbf, 0x5b, 0x1b][rng.gen_range(0..8)];
            }
            _ => data.extend((0..rng.gen_range(0..16)).map(|_| rng.gen::<u8>())),
        }
    }
    data
}

#[test]
fn entry_points_survive_corpus_random_and_mutated_inputs() {
    let iterations: usize = std::env::var("POSTERN_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let local = local();
    let mut rng = StdRng::seed_from_u64(0x0905_7e27);
    for target in TARGETS {
        let seeds = corpus(target);
        assert!(!seeds.is_empty(), "corpus of {target} is empty");
        for seed in &seeds {
            run(target, &local, seed);
        }
        // handshake_message does real crypto per input; keep it cheaper.
        let n = if target == "handshake_message" {
            iterations / 5
        } else {
            iterations
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
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing the wire format"]
fn regenerate_corpus() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
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
            reason: "not registered".into(),
        },
        Control::Incoming {
            service: svc,
            token: token.clone(),
        },
        Control::Ping { seq: 7 },
        Control::Pong { seq: 7 },
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
        &wire::encode(&AttachReply::Refused { reason: "x".into() }).unwrap(),
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
}
