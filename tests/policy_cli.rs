//! The admin commands, run as the real `postern` binary:
//!
//! - `postern policy validate` accepts the example policy set and reports
//!   syntax and schema errors with file:line:column, exit status 1;
//! - `postern policy test` passes the examples' cases, and names a failing
//!   case with what was expected and what decided it, exit status 1;
//! - `postern policy explain` says allow or deny and which policy decided it;
//! - `postern policy schema` prints the shipped schema;
//! - `postern audit verify` accepts a log written by
//!   `postern_policies::audit::AuditLog` and names the line of a changed,
//!   deleted or swapped record, exit status 1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use postern_identity::Identifier;
use postern_policies::audit::{AccessRecord, AuditEvent, AuditLog, Label};
use postern_policies::{
    AccessRequest, Action, CasesFile, PolicyEngine, Principal, RequestContext, Service, SCHEMA,
};

/// `examples/policies` of the source tree.
fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies")
}

/// The result of one `postern …` run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    fn assert_ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "{}", self.show());
        self
    }

    fn assert_failed(&self) -> &Self {
        assert_eq!(self.code, Some(1), "{}", self.show());
        assert!(
            self.stderr.contains("error: "),
            "no error line: {}",
            self.show()
        );
        assert!(!self.stderr.contains("panicked"), "panic: {}", self.show());
        self
    }

    fn assert_stdout(&self, words: &[&str]) -> &Self {
        for w in words {
            assert!(
                self.stdout.contains(w),
                "{w:?} not in stdout: {}",
                self.show()
            );
        }
        self
    }

    fn assert_stderr(&self, words: &[&str]) -> &Self {
        for w in words {
            assert!(
                self.stderr.contains(w),
                "{w:?} not in stderr: {}",
                self.show()
            );
        }
        self
    }
}

/// Runs `postern args…` with an empty home and no inherited log settings.
fn postern(args: &[&str]) -> Run {
    let home = tempfile::tempdir().unwrap();
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .env("POSTERN_HOME", home.path())
        .env_remove("POSTERN_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run {
        code: status.code(),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A temporary policy directory holding `files` (name, text).
fn policy_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

const GOOD: &str = r#"@id("data-staging")
permit(principal, action == Action::"connect", resource == Service::"db-staging")
when { principal has team && principal.team == "data" };
"#;

#[test]
fn the_examples_validate_and_every_policy_decides_some_case() {
    let engine = PolicyEngine::from_dir(&examples()).unwrap();
    let ids: Vec<&str> = engine.policies().iter().map(|p| p.id.as_str()).collect();
    assert!(ids.len() >= 7, "{ids:?}");

    let run = postern(&["policy", "validate", s(&examples())]);
    run.assert_ok().assert_stdout(&[&format!(
        "ok: {} policies in {} files are valid",
        ids.len(),
        engine.file_count()
    )]);
    assert!(
        run.stdout.contains(", 0 warnings; policy set "),
        "{}",
        run.show()
    );
    // Every policy is listed with its place.
    for p in engine.policies() {
        run.assert_stdout(&[&format!("{:?} ({}:{})", p.id, p.file, p.line)]);
    }

    let cases_path = examples().join("cases.toml");
    let cases = CasesFile::load(&cases_path).unwrap();
    let run = postern(&["policy", "test", s(&examples()), "--cases", s(&cases_path)]);
    run.assert_ok().assert_stdout(&[&format!(
        "{} passed, 0 failed ({} cases against {} policies in {} files)",
        cases.cases.len(),
        cases.cases.len(),
        ids.len(),
        engine.file_count()
    )]);
    assert!(!run.stdout.contains("FAIL"), "{}", run.show());
    let ok_lines = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("ok    "))
        .count();
    assert_eq!(ok_lines, cases.cases.len(), "{}", run.show());
    // Each example policy decides at least one case: the cases cover them all.
    for id in &ids {
        assert!(
            run.stdout.contains(&format!("{id:?}")),
            "no case is decided by policy {id:?}: {}",
            run.show()
        );
    }
    // Both outcomes and both actions are exercised.
    for words in [
        ": allow (connect to",
        ": deny (connect to",
        ": allow (register to",
        ": deny (no policy permits register",
        "forbidden by policy",
    ] {
        run.assert_stdout(&[words]);
    }
}

#[test]
fn a_syntax_error_is_reported_at_its_line_and_column() {
    let bad = "@id(\"missing-semicolon\")\n\
               permit(principal, action == Action::\"connect\", resource)\n\
               when { principal has team && principal.team == \"data\" }\n";
    let dir = policy_dir(&[("good.cedar", GOOD), ("bad.cedar", bad)]);
    let run = postern(&["policy", "validate", s(dir.path())]);
    let place = format!("{}:3:56", s(&dir.path().join("bad.cedar")));
    run.assert_failed()
        .assert_stdout(&[
            &format!("error[syntax]: {place}: unexpected end of input"),
            "3 | when { principal has team",
            "^ expected `;`",
        ])
        .assert_stderr(&["1 error in 1 of 2 files", "nodes refuse to load"]);
    assert!(!run.stdout.contains("are valid"), "{}", run.show());
    // The same directory cannot be tested or explained either.
    postern(&[
        "policy",
        "explain",
        s(dir.path()),
        "--service",
        "db-staging",
    ])
    .assert_failed()
    .assert_stdout(&[&place])
    .assert_stderr(&["fix them first"]);

    // A missing directory, or a file where the directory belongs.
    let run = postern(&["policy", "validate", s(&dir.path().join("none"))]);
    run.assert_failed().assert_stderr(&["cannot read", "none"]);
    assert_eq!(
        run.stderr.matches("os error 2").count(),
        1,
        "{}",
        run.show()
    );
    postern(&["policy", "validate", s(&dir.path().join("good.cedar"))])
        .assert_failed()
        .assert_stderr(&["good.cedar is a file: pass the directory"]);
}

#[test]
fn a_schema_error_names_the_unknown_attribute() {
    let typo =
        "// a typo\n@id(\"typo\")\npermit(principal, action == Action::\"connect\", resource)\n\
                when { principal.tema == \"data\" };\n";
    let dir = policy_dir(&[("a.cedar", GOOD), ("typo.cedar", typo)]);
    let run = postern(&["policy", "validate", s(dir.path())]);
    run.assert_failed()
        .assert_stdout(&[
            &format!("error[schema]: {}:4:8", s(&dir.path().join("typo.cedar"))),
            "tema",
            "did you mean `team`?",
        ])
        .assert_stderr(&["1 error in 1 of 2 files"]);

    // An attribute tested behind `has` that the schema does not declare
    // makes a policy that never applies: refused too, with advice.
    let never = "permit(principal, action, resource) when { principal has departmnt };\n";
    let dir = policy_dir(&[("never.cedar", never)]);
    postern(&["policy", "validate", s(dir.path())])
        .assert_failed()
        .assert_stdout(&["error[schema]: ", "never.cedar:1:", "hasTag"]);
}

#[test]
fn a_failing_case_is_named_with_what_decided_it() {
    let cases = r#"
[[case]]
name = "dba from the VPN on a Tuesday"
action = "connect"
service = "db-prod"
service_attrs = { env = "prod" }
principal = { attrs = { role = "dba" } }
context = { time = "2025-03-04T10:00:00Z", source_ip = "10.8.3.4" }
expect = "allow"

[[case]]
name = "wrongly expects a public address to work"
action = "connect"
service = "db-prod"
service_attrs = { env = "prod" }
principal = { attrs = { role = "dba" } }
context = { time = "2025-03-04T10:00:00Z", source_ip = "203.0.113.7" }
expect = "allow"

[[case]]
name = "wrongly expects analysts in production"
action = "connect"
service = "db-prod"
service_attrs = { env = "prod", team = "data" }
principal = { attrs = { team = "data" } }
context = { source_ip = "10.8.3.4" }
expect = "allow"
"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cases.toml");
    std::fs::write(&path, cases).unwrap();
    let engine = PolicyEngine::from_dir(&examples()).unwrap();
    let forbid = engine.policy("prod-from-allowed-networks-only").unwrap();
    let run = postern(&["policy", "test", s(&examples()), "--cases", s(&path)]);
    run.assert_failed()
        .assert_stdout(&[
            "ok    dba from the VPN on a Tuesday: allow (connect to db-prod permitted by policy \"dba-prod-working-hours\")",
            "FAIL  wrongly expects a public address to work: expected allow, got deny",
            &format!(
                "decided by forbid \"prod-from-allowed-networks-only\" at {}:{}",
                forbid.file, forbid.line
            ),
            "source_ip 203.0.113.7",
            "FAIL  wrongly expects analysts in production: expected allow, got deny",
            "no permit applied among",
            "(default deny)",
            "1 passed, 2 failed (3 cases against",
        ])
        .assert_stderr(&[
            "2 of 3 cases failed",
            "\"wrongly expects a public address to work\"",
            "\"wrongly expects analysts in production\"",
        ]);
    assert!(
        !run.stderr.contains("dba from the VPN"),
        "a passing case is named as failed: {}",
        run.show()
    );

    // A cases file with a mistake says where.
    std::fs::write(
        &path,
        cases.replace("expect = \"allow\"", "expect = \"maybe\""),
    )
    .unwrap();
    postern(&["policy", "test", s(&examples()), "--cases", s(&path)])
        .assert_failed()
        .assert_stderr(&["cases.toml", "unknown variant `maybe`", "line 9"]);
}

#[test]
fn explain_says_allow_or_deny_and_which_policy_decided() {
    let engine = PolicyEngine::from_dir(&examples()).unwrap();
    let at = |id: &str| {
        let p = engine.policy(id).unwrap();
        format!("{}:{}", p.file, p.line)
    };
    let examples = examples();
    let dir = s(&examples);
    let dba = [
        "policy",
        "explain",
        dir,
        "--principal-attr",
        "role=dba",
        "--service",
        "db-prod",
        "--service-attr",
        "env=prod",
        "--source-ip",
        "10.8.3.4",
    ];

    let mut args = dba.to_vec();
    args.extend(["--time", "2025-03-04T10:00:00Z"]);
    postern(&args).assert_ok().assert_stdout(&[
        "ALLOW: connect to db-prod by P0000000000000000000000000000000000000000",
        &format!(
            "decided by permit \"dba-prod-working-hours\" at {}",
            at("dba-prod-working-hours")
        ),
        "principal attributes: {\"role\":\"dba\"}",
        "service attributes: {\"env\":\"prod\"}",
        "2025-03-04T10:00:00Z",
        "source_ip 10.8.3.4",
    ]);

    // Saturday: no permit applies. Exit status 0 unless --exit-code.
    let mut args = dba.to_vec();
    args.extend(["--time", "1741428000"]); // 2025-03-08T10:00:00Z
    let run = postern(&args);
    run.assert_ok().assert_stdout(&[
        "DENY: connect to db-prod",
        "reason: no policy permits connect to db-prod",
        "(default deny)",
        "2025-03-08T10:00:00Z",
    ]);
    assert!(!run.stdout.contains("decided by"), "{}", run.show());
    args.push("--exit-code");
    postern(&args)
        .assert_failed()
        .assert_stderr(&["denied: no policy permits connect to db-prod"]);

    // A forbid decides, even though a permit applies.
    let mut args = dba.to_vec();
    args[10] = "203.0.113.7";
    args.extend(["--time", "2025-03-04T10:00:00+01:00"]);
    postern(&args).assert_ok().assert_stdout(&[
        "DENY: connect to db-prod",
        "forbidden by policy \"prod-from-allowed-networks-only\"",
        &format!(
            "decided by forbid \"prod-from-allowed-networks-only\" at {}",
            at("prod-from-allowed-networks-only")
        ),
    ]);

    // Register, with a pinned identifier.
    postern(&[
        "policy",
        "explain",
        dir,
        "--action",
        "register",
        "--principal",
        "P5a1e5000000000000000000000000000000000a1",
        "--service",
        "payments",
    ])
    .assert_ok()
    .assert_stdout(&[
        "ALLOW: register to payments by P5a1e5000000000000000000000000000000000a1",
        &format!(
            "decided by permit \"payments-outlet-registers-payments\" at {}",
            at("payments-outlet-registers-payments")
        ),
    ]);

    // Bad flags say what to write.
    postern(&[
        "policy",
        "explain",
        dir,
        "--service",
        "db",
        "--principal-attr",
        "team",
    ])
    .assert_failed()
    .assert_stderr(&["--principal-attr", "write NAME=VALUE"]);
    let run = postern(&[
        "policy",
        "explain",
        dir,
        "--service",
        "db",
        "--action",
        "conect",
    ]);
    assert_eq!(run.code, Some(2), "{}", run.show());
    run.assert_stderr(&["conect", "connect", "register"]);
    let run = postern(&[
        "policy",
        "explain",
        dir,
        "--service",
        "db",
        "--time",
        "yesterday",
    ]);
    assert_eq!(run.code, Some(2), "{}", run.show());
    run.assert_stderr(&["not an RFC 3339 time"]);
}

#[test]
fn schema_and_help_teach() {
    let run = postern(&["policy", "schema"]);
    run.assert_ok();
    assert_eq!(run.stdout.trim_end(), SCHEMA.trim_end());
    assert!(run.stdout.contains("source_ip?: ipaddr"));

    let help: [(&[&str], &[&str]); 6] = [
        (
            &["policy", "--help"],
            &["validate", "test", "explain", "schema", "Examples:"],
        ),
        (
            &["policy", "validate", "--help"],
            &["file:line:column", "Examples:", "postern policy validate"],
        ),
        (
            &["policy", "test", "--help"],
            &["[[case]]", "expect = \"allow\"", "--cases"],
        ),
        (
            &["policy", "explain", "--help"],
            &[
                "--principal-attr",
                "--source-ip",
                "break_glass",
                "Examples:",
            ],
        ),
        (
            &["audit", "verify", "--help"],
            &["--anchor", "Examples:", "postern audit verify"],
        ),
        (&["--help"], &["policy", "audit"]),
    ];
    for (args, words) in help {
        postern(args).assert_ok().assert_stdout(words);
    }
}

// ----- audit verify ----------------------------------------------------------

/// An audit log of six records, written the way nodes write it: access
/// decisions by the example policies, a reload and closed tunnels.
fn write_log(path: &Path) -> Vec<String> {
    let engine = PolicyEngine::from_dir(&examples()).unwrap();
    let log = AuditLog::open(path).unwrap();
    let who = |n: u8| Identifier::from_public_key(&[n; 32]);
    log.record(&AuditEvent::PolicyReload {
        ok: true,
        digest: engine.digest().to_owned(),
        policies: engine.len(),
        diagnostics: None,
    })
    .unwrap();
    for (n, ip) in [(1u8, "10.8.3.4"), (2, "203.0.113.7"), (3, "198.51.100.20")] {
        let request = AccessRequest {
            principal: Principal::new(who(n))
                .with_attr("role", postern_identity::AttrValue::One("dba".into())),
            service: Service::new("db-prod".parse().unwrap())
                .with_attr("env", postern_identity::AttrValue::One("prod".into())),
            context: RequestContext {
                source_ip: Some(ip.parse().unwrap()),
                ..RequestContext::at(1_741_082_400)
            },
        };
        let decision = engine.decide(Action::Connect, &request);
        let tunnel = Label::new(&format!("t-{n}")).unwrap();
        log.record(&AuditEvent::Connect(
            AccessRecord::new(&decision, &request).with_tunnel(tunnel),
        ))
        .unwrap();
    }
    log.record(&AuditEvent::TunnelClosed {
        tunnel: Label::new("t-1").unwrap(),
        principal: who(1),
        service: "db-prod".parse().unwrap(),
        bytes_up: 1200,
        bytes_down: 98_000,
        reason: "client closed".into(),
    })
    .unwrap();
    log.record(&AuditEvent::TunnelClosed {
        tunnel: Label::new("t-3").unwrap(),
        principal: who(3),
        service: "db-prod".parse().unwrap(),
        bytes_up: 10,
        bytes_down: 20,
        reason: "client closed".into(),
    })
    .unwrap();
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 6);
    assert!(lines[2].contains("\"decision\":\"deny\""), "{}", lines[2]);
    lines
}

fn rewrite(path: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn audit_verify_accepts_an_intact_log_and_names_the_tampered_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let lines = write_log(&path);
    let file = s(&path);

    let run = postern(&["audit", "verify", file]);
    run.assert_ok()
        .assert_stdout(&["ok: 6 records, chain intact; head seq 6 hash "]);
    // The printed head is an anchor.
    let head = run
        .stdout
        .split("head ")
        .nth(1)
        .and_then(|rest| rest.split(" (").next())
        .unwrap()
        .to_owned();
    assert!(head.starts_with("seq 6 hash "), "{head}");
    postern(&["audit", "verify", file, "--anchor", &head])
        .assert_ok()
        .assert_stdout(&["ok: the anchor (seq 6) is in the chain"]);

    // A changed decision (deny rewritten as allow) in line 3.
    let mut changed = lines.clone();
    changed[2] = changed[2].replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
    assert_ne!(changed[2], lines[2]);
    rewrite(&path, &changed);
    postern(&["audit", "verify", file])
        .assert_failed()
        .assert_stderr(&[
            "fails verification at line 3: modified: line 4 recorded a different hash for line 3",
            "lines 1 to 2 chain correctly",
        ]);

    // A deleted line 3.
    let mut deleted = lines.clone();
    deleted.remove(2);
    rewrite(&path, &deleted);
    postern(&["audit", "verify", file])
        .assert_failed()
        .assert_stderr(&["at line 3: deleted lines: seq jumps from 2 to 4: 1 line is missing"]);

    // Lines 4 and 5 swapped.
    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    rewrite(&path, &swapped);
    postern(&["audit", "verify", file])
        .assert_failed()
        .assert_stderr(&["at line 4: reordered: lines 4 and 5 are swapped"]);

    // The last line removed: the chain alone is intact, the anchor is not.
    rewrite(&path, &lines[..5]);
    postern(&["audit", "verify", file])
        .assert_ok()
        .assert_stdout(&["ok: 5 records"]);
    postern(&["audit", "verify", file, "--anchor", &head])
        .assert_failed()
        .assert_stderr(&["at line 6: truncated", "the last 1 line"]);
    let (seq, hash) = head
        .strip_prefix("seq ")
        .and_then(|r| r.split_once(" hash "))
        .unwrap();
    postern(&[
        "audit",
        "verify",
        file,
        "--anchor",
        &format!("{seq}:{hash}"),
    ])
    .assert_failed()
    .assert_stderr(&["truncated"]);

    // A bad anchor and a missing file say what is wrong.
    let run = postern(&["audit", "verify", file, "--anchor", "6:abc"]);
    assert_eq!(run.code, Some(2), "{}", run.show());
    run.assert_stderr(&["64 hex digits"]);
    let run = postern(&["audit", "verify", s(&dir.path().join("none.jsonl"))]);
    run.assert_failed()
        .assert_stderr(&["cannot read audit log", "none.jsonl"]);
    assert_eq!(
        run.stderr.matches("os error 2").count(),
        1,
        "{}",
        run.show()
    );
}
