//! The line format and tamper detection.

use std::fs;
use std::path::{Path, PathBuf};

use postern_identity::{AttrValue, Attributes, Identifier};

use super::*;

const T0: u64 = 1_735_732_800_000;

fn who(n: u8) -> Identifier {
    Identifier::from_public_key(&[n; 32])
}

fn event(n: u64) -> AuditEvent {
    AuditEvent::TunnelClosed {
        tunnel: Label::new(&format!("t{n}")).unwrap(),
        principal: who(1),
        service: "db".parse().unwrap(),
        bytes_up: n,
        bytes_down: 2 * n,
        reason: "client closed".into(),
    }
}

/// A log of `n` records in a fresh directory.
fn log_with(n: u64) -> (tempfile::TempDir, PathBuf, ChainHead) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    for i in 1..=n {
        log.record_at(T0 + i, &event(i)).unwrap();
    }
    let head = log.head();
    (dir, path, head)
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn failure(path: &Path) -> (u64, Tamper) {
    match verify(path) {
        Err(VerifyError::Tampered { line, kind, .. }) => (line, kind),
        other => panic!("expected tampering, got {other:?}"),
    }
}

#[test]
fn lines_have_the_documented_shape() {
    let (_dir, path, head) = log_with(2);
    let lines = lines(&path);
    assert!(lines[0].starts_with(&format!(
        "{{\"seq\":1,\"time\":\"2025-01-01T12:00:00.001Z\",\"prev\":\"{GENESIS_PREV}\",\"event\":\"tunnel_closed\",\"tunnel\":\"t1\""
    )), "{}", lines[0]);
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["seq"], 2);
    assert_eq!(second["prev"], sha256_hex(lines[0].as_bytes()));
    assert_eq!(second["bytes_down"], 4);
    assert_eq!(head.seq, 2);
    assert_eq!(head.hash, sha256_hex(lines[1].as_bytes()));
    let report = verify(&path).unwrap();
    assert_eq!(report.records, 2);
    assert_eq!(report.head, head);
    assert!(report
        .to_string()
        .starts_with("ok: 2 records, chain intact"));
}

#[test]
fn the_size_check_allows_for_the_longest_chain_fields() {
    let longest = format_line(u64::MAX, "9999-12-31T23:59:59.999Z", GENESIS_PREV, "");
    assert_eq!(longest.len(), LINE_PREFIX_MAX);
}

#[test]
fn every_event_round_trips() {
    let engine =
        crate::PolicyEngine::from_text("p.cedar", "permit(principal, action, resource);").unwrap();
    let request = crate::AccessRequest {
        principal: crate::Principal::new(who(1)).with_attr("team", AttrValue::One("x".into())),
        service: crate::Service::new("db".parse().unwrap()),
        context: crate::RequestContext {
            source_ip: Some("10.0.0.1".parse().unwrap()),
            relay: Some(who(9)),
            ..crate::RequestContext::at(1_735_732_800)
        },
    };
    let decision = engine.decide(crate::Action::Connect, &request);
    let access = AccessRecord::new(&decision, &request).with_tunnel(Label::new("a1b2c3").unwrap());
    let attrs: Attributes = [("team".to_owned(), AttrValue::One("x".into()))].into();
    let events = vec![
        AuditEvent::Connect(access.clone()),
        AuditEvent::Register(AccessRecord {
            decision: Verdict::Deny,
            ..access
        }),
        AuditEvent::Enroll {
            subject: who(2),
            method: Label::new("oidc").unwrap(),
            decision: Verdict::Allow,
            attrs: attrs.clone(),
            reason: "id token verified".into(),
        },
        AuditEvent::Issue {
            credential: Label::new("c-0001").unwrap(),
            subject: who(2),
            issuer: who(3),
            attrs,
            expires: 1_735_736_400,
        },
        AuditEvent::Revoke {
            credential: Some(Label::new("c-0001").unwrap()),
            subject: None,
            by: Some(who(3)),
            reason: "laptop lost".into(),
        },
        AuditEvent::PolicyReload {
            ok: false,
            digest: engine.digest().to_owned(),
            policies: engine.len(),
            diagnostics: Some("error[syntax]: a.cedar:1:1: …".into()),
        },
        event(7),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let log = AuditLog::open(&path).unwrap();
    for e in &events {
        log.record(e).unwrap();
    }
    let names: Vec<String> = lines(&path)
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["event"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "connect",
            "register",
            "enroll",
            "issue",
            "revoke",
            "policy_reload",
            "tunnel_closed"
        ]
    );
    for (line, e) in lines(&path).iter().zip(&events) {
        let back: AuditEvent = serde_json::from_str(line).unwrap();
        assert_eq!(&back, e);
    }
    let first = &lines(&path)[0];
    assert!(
        first.contains("\"decision\":\"allow\"") && first.contains("\"source_ip\":\"10.0.0.1\"")
    );
    assert_eq!(verify(&path).unwrap().records, 7);
}

#[test]
fn odd_text_stays_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let log = AuditLog::open(&path).unwrap();
    let e = AuditEvent::Revoke {
        credential: None,
        subject: Some(who(1)),
        by: None,
        reason: "line\nbreak \"quoted\" \u{0} \u{2028} é".into(),
    };
    log.record(&e).unwrap();
    assert_eq!(lines(&path).len(), 1);
    assert_eq!(verify(&path).unwrap().records, 1);
    assert!(Label::new("has space").is_none() && Label::new("").is_none());
    assert!(Label::new(&"x".repeat(65)).is_none());
}

#[test]
fn reopening_continues_the_chain() {
    let (_dir, path, head) = log_with(3);
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.head(), head);
    log.record_at(T0 + 10, &event(4)).unwrap();
    let next = log.head();
    assert_eq!(next.seq, 4);
    drop(log);
    let log = AuditLog::open_with(
        &path,
        AuditOptions::default().with_durability(Durability::OsBuffered),
    )
    .unwrap();
    log.record_at(T0 + 11, &event(5)).unwrap();
    drop(log);
    let report = verify(&path).unwrap();
    assert_eq!(report.records, 5);
    assert_eq!(verify_with_anchor(&path, &next).unwrap().records, 5);
}

#[test]
fn concurrent_records_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jsonl");
    let log = std::sync::Arc::new(AuditLog::open(&path).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    log.record(&event(t * 100 + i)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(verify(&path).unwrap().records, 200);
    assert_eq!(log.head().seq, 200);
}

#[test]
fn an_edited_line_is_found() {
    let (_dir, path, _) = log_with(5);
    let mut l = lines(&path);
    l[2] = l[2].replace("\"bytes_up\":3", "\"bytes_up\":300");
    write_lines(&path, &l);
    assert_eq!(failure(&path), (3, Tamper::Modified));
    let err = verify(&path).unwrap_err().to_string();
    assert!(
        err.contains("at line 3: modified: line 4 recorded a different hash for line 3"),
        "{err}"
    );
}

#[test]
fn an_edit_that_breaks_json_is_found() {
    let (_dir, path, _) = log_with(5);
    let mut l = lines(&path);
    l[1].truncate(20);
    write_lines(&path, &l);
    assert_eq!(failure(&path), (2, Tamper::Malformed));
}

#[test]
fn an_edited_first_line_is_found() {
    let (_dir, path, _) = log_with(3);
    let mut l = lines(&path);
    l[0] = l[0].replace("client closed", "client closeD");
    write_lines(&path, &l);
    assert_eq!(failure(&path), (1, Tamper::Modified));
}

#[test]
fn a_deleted_line_is_found() {
    for gone in [0, 2, 3] {
        let (_dir, path, _) = log_with(5);
        let mut l = lines(&path);
        l.remove(gone);
        write_lines(&path, &l);
        assert_eq!(
            failure(&path),
            (gone as u64 + 1, Tamper::Deleted),
            "removed line {}",
            gone + 1
        );
    }
    let (_dir, path, _) = log_with(6);
    let mut l = lines(&path);
    l.drain(1..3);
    write_lines(&path, &l);
    let err = verify(&path).unwrap_err().to_string();
    assert!(
        err.contains("at line 2: deleted lines: seq jumps from 1 to 4: 2 lines are missing"),
        "{err}"
    );
}

#[test]
fn swapped_lines_are_found() {
    for first in [0, 2, 3] {
        let (_dir, path, _) = log_with(5);
        let mut l = lines(&path);
        l.swap(first, first + 1);
        write_lines(&path, &l);
        assert_eq!(
            failure(&path),
            (first as u64 + 1, Tamper::Reordered),
            "swapped {}",
            first + 1
        );
    }
    let (_dir, path, _) = log_with(5);
    let mut l = lines(&path);
    let moved = l.remove(0);
    l.insert(3, moved);
    write_lines(&path, &l);
    let (line, kind) = failure(&path);
    assert_eq!(line, 1, "{kind:?}");
}

#[test]
fn inserted_lines_are_found() {
    // A forged line that copies the chain's format exactly: seq 3 and
    // prev = hash of line 2, placed as line 3.
    let (_dir, path, _) = log_with(5);
    let mut l = lines(&path);
    let forged = l[2].replace("\"bytes_up\":3", "\"bytes_up\":999");
    l.insert(2, forged);
    write_lines(&path, &l);
    let err = verify(&path).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Tampered {
                line: 3,
                kind: Tamper::Inserted,
                ..
            }
        ),
        "{err}"
    );
    // A duplicated line.
    let (_dir, path, _) = log_with(5);
    let mut l = lines(&path);
    l.insert(2, l[1].clone());
    write_lines(&path, &l);
    assert_eq!(failure(&path).1, Tamper::Inserted);
    // Garbage.
    let (_dir, path, _) = log_with(5);
    let mut l = lines(&path);
    l.insert(4, "{\"hello\":1}".into());
    write_lines(&path, &l);
    assert_eq!(failure(&path), (5, Tamper::Malformed));
}

#[test]
fn removing_the_tail_needs_an_anchor() {
    let (_dir, path, head) = log_with(5);
    let mut l = lines(&path);
    l.pop();
    write_lines(&path, &l);
    // The chain alone cannot tell…
    assert_eq!(verify(&path).unwrap().records, 4);
    // …the anchor can.
    let err = verify_with_anchor(&path, &head).unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Tampered {
                line: 5,
                kind: Tamper::Truncated,
                ..
            }
        ),
        "{err}"
    );
    // A rewritten last line, likewise.
    let (_dir, path, head) = log_with(5);
    let mut l = lines(&path);
    l[4] = l[4].replace("client closed", "timeout");
    write_lines(&path, &l);
    assert!(verify(&path).is_ok());
    assert!(matches!(
        verify_with_anchor(&path, &head),
        Err(VerifyError::Tampered {
            line: 5,
            kind: Tamper::Modified,
            ..
        })
    ));
}

#[test]
fn a_torn_tail_is_refused_on_open_and_reported_by_verify() {
    let (_dir, path, _) = log_with(3);
    let mut bytes = fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 10);
    fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        AuditLog::open(&path),
        Err(AuditError::TornTail { .. })
    ));
    assert_eq!(failure(&path), (3, Tamper::Malformed));
    fs::write(&path, b"not json\n").unwrap();
    assert!(matches!(
        AuditLog::open(&path),
        Err(AuditError::BadTail { .. })
    ));
}

#[test]
fn empty_and_missing_logs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.jsonl");
    assert!(matches!(verify(&path), Err(VerifyError::Io { .. })));
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(
        log.head(),
        ChainHead {
            seq: 0,
            hash: GENESIS_PREV.into()
        }
    );
    let report = verify(&path).unwrap();
    assert_eq!(report.records, 0);
    assert!(matches!(
        AuditLog::open(&dir.path().join("no/such/dir.jsonl")),
        Err(AuditError::Io { .. })
    ));
}

#[test]
fn oversized_records_are_refused_and_the_log_stays_valid() {
    let (_dir, path, _) = log_with(1);
    let log = AuditLog::open(&path).unwrap();
    let huge = AuditEvent::Revoke {
        credential: None,
        subject: None,
        by: None,
        reason: "x".repeat(MAX_AUDIT_LINE_BYTES),
    };
    assert!(matches!(
        log.record(&huge),
        Err(AuditError::TooLarge { .. })
    ));
    log.record(&event(2)).unwrap();
    assert_eq!(verify(&path).unwrap().records, 2);
}

/// `line` (a log line) with its `prev` replaced.
pub(crate) fn with_prev(line: &str, prev: &str) -> String {
    let start = line.find("\"prev\":\"").unwrap() + "\"prev\":\"".len();
    format!("{}{prev}{}", &line[..start], &line[start + 64..])
}

/// `line` (a log line) with its `seq` replaced.
pub(crate) fn with_seq(line: &str, seq: u64) -> String {
    let rest = line.split_once(',').unwrap().1;
    format!("{{\"seq\":{seq},{rest}")
}

/// Lines re-chained: every `seq` and `prev` recomputed, as an attacker who
/// rewrites a log does. `checkpoint` may replace a checkpoint line, given its
/// 1-based number and its new `prev`.
pub(crate) fn rechain_with(
    lines: &[String],
    mut checkpoint: impl FnMut(u64, &str, &str) -> Option<String>,
) -> Vec<u8> {
    let mut prev = GENESIS_PREV.to_owned();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let mut line = with_prev(&with_seq(line, i as u64 + 1), &prev);
        if line.contains("\"event\":\"checkpoint\"") {
            if let Some(replaced) = checkpoint(i as u64 + 1, &line, &prev) {
                line = replaced;
            }
        }
        prev = sha256_hex(line.as_bytes());
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

/// [`rechain_with`], keeping checkpoint lines as they are (but for `prev`).
pub(crate) fn rechain(lines: &[String]) -> Vec<u8> {
    rechain_with(lines, |_, _, _| None)
}
