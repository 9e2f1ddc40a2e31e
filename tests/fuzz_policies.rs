//! Runs the fuzz entry points of the policies crate
//! (`postern_policies::fuzzing`) on the stable toolchain: over every
//! checked-in corpus file in `fuzz/corpus/<target>/`, then over
//! deterministic random inputs and mutations of the corpus. The
//! coverage-guided targets `policy_text` and `audit_line` in `fuzz/` call
//! the same functions under `cargo fuzz` where a nightly toolchain exists.
//!
//! - `policy_text`: policy files as nodes load them. The lexical guard in
//!   `policies/src/scan.rs` exists because Cedar's parser recurses without a
//!   limit; this test runs on the test harness's ordinary 2 MiB threads, so
//!   an input that slipped past the guard would abort it with a stack
//!   overflow.
//! - `audit_line`: audit logs as `postern audit verify` reads them (chain,
//!   checkpoint signatures, anchor, required signer) and lines as events.
//!
//! `POSTERN_FUZZ_POLICY_ITERATIONS` (default 5,000: Cedar parses and
//! validates every input) and `POSTERN_FUZZ_AUDIT_ITERATIONS` (default
//! 20,000) set the number of random inputs. The corpus is regenerated with
//! `cargo test --test fuzz_policies -- --ignored regenerate_corpus`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/fuzz.rs"]
mod fuzz_support;

use std::path::Path;

use fuzz_support::{corpus, corpus_dir, iterations, mutate};
use postern_identity::{Identifier, Identity};
use postern_policies::audit::{
    verify, verify_with, AuditEvent, AuditLog, AuditOptions, Label, VerifyOptions,
};
use postern_policies::{fuzzing, PolicyEngine, MAX_NESTING_DEPTH};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

/// Tokens policies are made of, for random policies that get past the
/// parser more often than random bytes do.
const TOKENS: &[&str] = &[
    "permit",
    "forbid",
    "(",
    ")",
    "{",
    "}",
    "[",
    "]",
    "principal",
    "action",
    "resource",
    "context",
    "when",
    "unless",
    "==",
    "!=",
    "<",
    ">=",
    "&&",
    "||",
    "!",
    "-",
    "+",
    "*",
    ".",
    ",",
    ";",
    "in",
    "has",
    "like",
    "is",
    "if",
    "then",
    "else",
    "Identity::\"P1\"",
    "Action::\"connect\"",
    "Service::\"db-prod\"",
    "team",
    "groups",
    "\"data\"",
    "\"db-*\"",
    "contains",
    "hasTag",
    "getTag",
    "isInRange",
    "ip(\"10.0.0.0/8\")",
    "1",
    "-9223372036854775808",
    "@id(\"x\")",
    "true",
    "false",
    "datetime(\"2025-01-01\")",
    "// c\n",
    " ",
];

fn random_policy(rng: &mut StdRng) -> Vec<u8> {
    let mut text = String::new();
    for _ in 0..rng.gen_range(1..200) {
        text.push_str(TOKENS[rng.gen_range(0..TOKENS.len())]);
        text.push(' ');
    }
    text.into_bytes()
}

fn run(target: &str, data: &[u8]) {
    match target {
        "policy_text" => fuzzing::policy_text(data),
        "audit_line" => fuzzing::audit_line(data),
        other => panic!("unknown target {other}"),
    }
}

#[test]
fn entry_points_survive_corpus_random_and_mutated_inputs() {
    let mut rng = StdRng::seed_from_u64(0x0a0d_17ed);
    for (target, n) in [
        (
            "policy_text",
            iterations("POSTERN_FUZZ_POLICY_ITERATIONS", 5_000),
        ),
        (
            "audit_line",
            iterations("POSTERN_FUZZ_AUDIT_ITERATIONS", 20_000),
        ),
    ] {
        let seeds = corpus(target);
        assert!(!seeds.is_empty(), "corpus of {target} is empty");
        for seed in &seeds {
            run(target, seed);
        }
        for i in 0..n {
            let data = match (i % 3, target) {
                (0 | 1, _) => {
                    let pick = rng.gen_range(0..seeds.len());
                    mutate(&mut rng, &seeds[pick])
                }
                (_, "policy_text") => random_policy(&mut rng),
                _ => (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect(),
            };
            run(target, &data);
        }
    }
}

/// The corpora must hold inputs that get all the way through, or mutations
/// would rarely get past the first check.
#[test]
fn corpus_holds_valid_inputs() {
    let loads = corpus("policy_text")
        .iter()
        .filter(|b| PolicyEngine::from_text("seed.cedar", &String::from_utf8_lossy(b)).is_ok())
        .count();
    assert!(loads >= 5, "only {loads} valid policy files in the corpus");
    let dir = corpus_dir("audit_line");
    let signer = Identity::from_secret_bytes(&[3; 32]).identifier();
    let strict = VerifyOptions::default().with_signer(signer);
    let signed = ["seed-signed", "seed-rotated", "seed-lost"]
        .iter()
        .filter(|name| verify_with(&dir.join(name), &strict).is_ok())
        .count();
    assert_eq!(signed, 3, "the signed seeds must verify with --signer");
    assert!(verify(&dir.join("seed-rotated"))
        .unwrap()
        .continues
        .is_some());
}

/// Hand-written hostile policy text: nesting at and past the guard's limit
/// in every bracket, long operator chains, huge literals.
#[test]
fn policy_text_survives_hostile_inputs() {
    let deep = |open: &str, close: &str, n: usize| {
        format!(
            "permit(principal, action, resource) when {{ {}true{} }};",
            open.repeat(n),
            close.repeat(n)
        )
    };
    let mut inputs = Vec::new();
    for n in [MAX_NESTING_DEPTH - 2, MAX_NESTING_DEPTH, 1_000, 100_000] {
        inputs.push(deep("(", ")", n));
        inputs.push(deep("[", "]", n));
        inputs.push(deep("!", "", n));
        inputs.push(deep("-", "", n));
        inputs.push(deep("if true then ", " else false", n.min(5_000)));
    }
    inputs.push(format!(
        "permit(principal, action, resource) when {{ {} }};",
        vec!["1 < 2"; 10_000].join(" && ")
    ));
    inputs.push(format!(
        "permit(principal, action, resource) when {{ context has {} }};",
        "a.".repeat(50_000)
    ));
    inputs.push(format!(
        "@id(\"{}\") permit(principal, action, resource);",
        "x".repeat(1 << 20)
    ));
    inputs.push("{".repeat(1 << 20));
    inputs.push("\"".repeat(100_001));
    for text in &inputs {
        fuzzing::policy_text(text.as_bytes());
    }
}

fn write_seed(name: &str, bytes: &[u8]) {
    let (target, file) = name.split_once('/').unwrap();
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(file), bytes).unwrap();
}

fn event(n: u64) -> AuditEvent {
    AuditEvent::TunnelClosed {
        tunnel: Label::new(&format!("t{n}")).unwrap(),
        principal: Identifier::from_public_key(&[1; 32]),
        service: "db-prod".parse().unwrap(),
        bytes_up: n,
        bytes_down: 2 * n,
        reason: "client closed".into(),
    }
}

/// A log written by the real writer, signed by the fixed identity
/// `fuzzing::audit_line` requires, with a checkpoint every 3 lines.
fn signed_log(path: &Path, records: u64) {
    let mut options = AuditOptions::default().with_signer(Identity::from_secret_bytes(&[3; 32]));
    options.checkpoint_records = 3;
    let log = AuditLog::open_with(path, options).unwrap();
    for n in 1..=records {
        log.record(&event(n)).unwrap();
    }
    log.close().unwrap();
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing the policy language or the log format"]
fn regenerate_corpus() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies");
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cedar") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            write_seed(
                &format!("policy_text/seed-{name}"),
                &std::fs::read(&path).unwrap(),
            );
        }
    }
    write_seed(
        "policy_text/seed-minimal",
        b"permit(principal, action, resource);",
    );
    let nested = format!(
        "permit(principal, action == Action::\"connect\", resource) when {{ {}context.hour_utc < 18{} }};",
        "(".repeat(MAX_NESTING_DEPTH - 2),
        ")".repeat(MAX_NESTING_DEPTH - 2)
    );
    write_seed("policy_text/seed-nested-at-limit", nested.as_bytes());
    write_seed(
        "policy_text/seed-tags-and-ranges",
        br#"@id("tags")
permit(principal, action == Action::"connect", resource == Service::"db-prod")
when {
  principal.hasTag("dept") && principal.getTag("dept").contains("finance") &&
  context has source_ip && (context.source_ip.isInRange(ip("10.0.0.0/8")) || context.source_ip.isInRange(ip("192.168.0.0/16")))
}
unless { resource has tier && resource.tier == "restricted" };
"#,
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    signed_log(&path, 7);
    let signed = std::fs::read(&path).unwrap();
    write_seed("audit_line/seed-signed", &signed);
    // One line of each kind, on its own.
    for (i, line) in signed.split(|&b| b == b'\n').take(4).enumerate() {
        write_seed(
            &format!("audit_line/seed-line-{i}"),
            &[line, b"\n"].concat(),
        );
    }
    // A rotated file: its first line links to the previous file's head.
    let log = AuditLog::open_with(
        &dir.path().join("rotating.jsonl"),
        AuditOptions::default().with_signer(Identity::from_secret_bytes(&[3; 32])),
    )
    .unwrap();
    log.record(&event(1)).unwrap();
    std::fs::rename(
        dir.path().join("rotating.jsonl"),
        dir.path().join("rotating.jsonl.1"),
    )
    .unwrap();
    log.reopen().unwrap();
    log.record(&event(2)).unwrap();
    log.close().unwrap();
    write_seed(
        "audit_line/seed-rotated",
        &std::fs::read(dir.path().join("rotating.jsonl")).unwrap(),
    );
    // A `records_lost` line (written when the queue overflowed while the
    // disk was full), chained and then signed over by the real writer.
    let lost_path = dir.path().join("lost.jsonl");
    signed_log(&lost_path, 2);
    let mut text = std::fs::read(&lost_path).unwrap();
    let last = text[..text.len() - 1]
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap()
        .to_vec();
    let seq = text.iter().filter(|&&b| b == b'\n').count() + 1;
    let line = format!(
        "{{\"seq\":{seq},\"time\":\"2025-01-01T12:00:00.000Z\",\"prev\":\"{}\",\"event\":\"records_lost\",\"count\":3,\"first\":\"2025-01-01T11:59:58.000Z\",\"last\":\"2025-01-01T11:59:59.000Z\"}}\n",
        hex::encode(Sha256::digest(&last))
    );
    text.extend_from_slice(line.as_bytes());
    std::fs::write(&lost_path, &text).unwrap();
    signed_log(&lost_path, 1);
    write_seed("audit_line/seed-lost", &std::fs::read(&lost_path).unwrap());
    write_seed("audit_line/seed-empty", b"");
}
