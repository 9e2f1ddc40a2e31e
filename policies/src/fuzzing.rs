//! Entry points for fuzzing the inputs this crate reads from files an
//! operator (or an attacker with write access) controls: policy text and
//! audit logs.
//!
//! Each function takes arbitrary bytes and must never panic or overflow
//! the stack, whatever they are. They are used by the `cargo fuzz` targets
//! `policy_text` and `audit_line` in `fuzz/` (nightly) and by the
//! stable-toolchain test `tests/fuzz_policies.rs`, which runs them over the
//! checked-in corpora and over random and mutated inputs.

use postern_identity::{AttrValue, Identifier};

use crate::audit::{self, AuditEvent, ChainHead, VerifyOptions};
use crate::{
    explain, AccessRequest, Action, PolicyEngine, PolicySource, Principal, RequestContext,
};
use crate::{Service, MAX_NESTING_DEPTH};

/// A request with the attributes policies most often test.
fn request() -> Option<AccessRequest> {
    let text = |s: &str| AttrValue::One(s.to_owned());
    Some(AccessRequest {
        principal: Principal::new(Identifier::from_public_key(&[7; 32]))
            .with_attr("team", text("data"))
            .with_attr("role", text("dba"))
            .with_attr(
                "groups",
                AttrValue::Many(vec!["analysts".into(), "oncall".into()]),
            ),
        service: Service::new("db-prod".parse().ok()?).with_attr("env", text("prod")),
        context: RequestContext {
            source_ip: Some([10, 8, 3, 4].into()),
            relay: Some(Identifier::from_public_key(&[9; 32])),
            credential_expires: Some(1_741_100_000),
            ..RequestContext::at(1_741_082_400)
        },
    })
}

/// Policy text as nodes load it: the lexical guard (`scan.rs`) that keeps
/// Cedar's recursive parser from overflowing the stack, Cedar's parser and
/// the schema validator, in one file and split across two; when it loads,
/// a decision of both actions and an explanation, which must agree.
pub fn policy_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let (Ok(engine), Some(request)) = (PolicyEngine::from_text("fuzz.cedar", &text), request()) {
        for action in [Action::Connect, Action::Register] {
            let decision = engine.decide(action, &request);
            let explained = explain(&engine, action, &request);
            assert_eq!(decision.allow, explained.decision.allow);
        }
        assert!(engine.len() <= text.matches(';').count());
    }
    // The same text as two files, cut at a character boundary.
    let cut = (0..=text.len() / 2)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let _ = PolicyEngine::from_sources(vec![
        PolicySource::new("a.cedar", &text[..cut]),
        PolicySource::new("b.cedar", &text[cut..]),
    ]);
    // Nesting right at and just past the guard's limit, around the input.
    for depth in [MAX_NESTING_DEPTH, MAX_NESTING_DEPTH + 1] {
        let wrapped = format!(
            "permit(principal, action, resource) when {{ {}{text}{} }};",
            "(".repeat(depth - 1),
            ")".repeat(depth - 1)
        );
        let _ = PolicyEngine::from_text("nested.cedar", &wrapped);
    }
}

/// An audit log as `postern audit verify` reads it (hash chain, checkpoint
/// signatures, with and without a required signer and an anchor), and each
/// line as a typed event. A log that verifies with a signer required also
/// verifies without, and its report adds up.
pub fn audit_line(data: &[u8]) {
    let plain = audit::verify_bytes(data, &VerifyOptions::default());
    let signer = Identifier::from_public_key(&[3; 32]);
    let strict = VerifyOptions::default()
        .with_signer(signer)
        .with_anchor(ChainHead {
            seq: 2,
            hash: "0".repeat(64),
        });
    if let Ok(report) = audit::verify_bytes(data, &VerifyOptions::default().with_signer(signer)) {
        assert!(plain.is_ok());
        assert!(report.signers.iter().all(|s| *s == signer));
    }
    if let Ok(report) = &plain {
        assert!(report.covered <= report.records);
        assert_eq!(report.head.seq, report.records);
        assert_eq!(
            report.records,
            data.iter().filter(|&&b| b == b'\n').count() as u64
        );
        let _ = report.to_string();
    }
    let _ = audit::verify_bytes(data, &strict);
    for line in data.split(|&b| b == b'\n') {
        if let Ok(event) = serde_json::from_slice::<AuditEvent>(line) {
            // Whatever parses must serialize again.
            assert!(serde_json::to_string(&event).is_ok());
        }
    }
}
