//! The policy fixtures: every valid fixture loads and passes its cases; every
//! invalid one is refused with a diagnostic at the right line and column.

use std::fs;
use std::path::{Path, PathBuf};

use postern_policies::{
    run_cases, validate, CasesFile, DiagnosticKind, PolicyEngine, PolicyError, PolicySource,
    MAX_POLICY_FILE_BYTES,
};

fn fixtures(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind)
}

#[test]
fn valid_fixtures_validate_and_pass_their_cases() {
    let dir = fixtures("valid");
    let report = validate(&dir).unwrap();
    assert_eq!(report.files, 2);
    let ids: Vec<&str> = report.policies.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "dba-prod-office-hours",
            "break-glass",
            "private-networks-only",
            "team-non-prod",
            "db-outlet-registers-db-prod",
        ]
    );
    assert!(report.warnings.is_empty(), "{report}");
    let shown = report.to_string();
    assert!(
        shown.contains("ok: 2 files, 5 policies (4 permit, 1 forbid), 0 warnings"),
        "{shown}"
    );
    assert!(shown.contains("prod.cedar:3)"), "{shown}");

    let engine = PolicyEngine::from_dir(&dir).unwrap();
    let cases = CasesFile::load(&dir.join("cases.toml")).unwrap();
    let report = run_cases(&engine, &cases);
    assert!(report.success(), "{report}");
    assert_eq!(report.outcomes.len(), 11);
    assert!(report.to_string().ends_with("11 passed, 0 failed"));
}

/// `(file, line, column, kind, words the message or help must contain)`.
const INVALID: &[(&str, usize, usize, DiagnosticKind, &[&str])] = &[
    (
        "syntax.cedar",
        3,
        56,
        DiagnosticKind::Syntax,
        &["unexpected end of input", "expected `;`"],
    ),
    (
        "unknown_attribute.cedar",
        4,
        8,
        DiagnosticKind::Schema,
        &["tema", "did you mean `team`?"],
    ),
    (
        "type_mismatch.cedar",
        3,
        8,
        DiagnosticKind::Schema,
        &["Long", "String"],
    ),
    (
        "unknown_action.cedar",
        2,
        29,
        DiagnosticKind::Schema,
        &["conect", "did you mean `Action::\"connect\"`?"],
    ),
    (
        "template.cedar",
        1,
        1,
        DiagnosticKind::Unsupported,
        &["templates"],
    ),
    (
        "deep.cedar",
        3,
        39,
        DiagnosticKind::Unsupported,
        &["nested more than 32 deep"],
    ),
    (
        "impossible.cedar",
        2,
        1,
        DiagnosticKind::Schema,
        &["policy is impossible", "hasTag"],
    ),
    (
        "unguarded_optional.cedar",
        3,
        8,
        DiagnosticKind::Schema,
        &["source_ip", "context has source_ip"],
    ),
];

#[test]
fn each_invalid_fixture_is_refused_with_a_positioned_diagnostic() {
    let dir = fixtures("invalid");
    for &(file, line, column, kind, words) in INVALID {
        let path = dir.join(file);
        let text = fs::read_to_string(&path).unwrap();
        let shown = path.display().to_string();
        let err = PolicyEngine::from_text(&shown, &text).unwrap_err();
        let PolicyError::Invalid(diags) = &err else {
            panic!("{file}: {err}")
        };
        let first = diags.iter().next().unwrap();
        let rendered = err.to_string();
        assert_eq!(
            (first.line, first.column, first.kind),
            (line, column, kind),
            "{file}: {rendered}"
        );
        assert!(
            rendered.contains(&format!("{shown}:{line}:{column}")),
            "{rendered}"
        );
        for w in words {
            assert!(rendered.contains(w), "{file}: {w:?} not in\n{rendered}");
        }
        // The excerpt shows the offending line with a caret under the column.
        let source_line = text.lines().nth(line - 1).unwrap_or("");
        assert!(
            rendered.contains(&format!("{line} | {source_line}")),
            "{rendered}"
        );
        assert!(
            rendered.contains(&format!("| {}^", " ".repeat(column - 1))),
            "{rendered}"
        );
    }
}

#[test]
fn validating_the_invalid_directory_reports_every_file() {
    let err = validate(&fixtures("invalid")).unwrap_err();
    let PolicyError::Invalid(diags) = &err else {
        panic!("{err}")
    };
    // One run reports every file, sorted by file and position.
    let mut files: Vec<&str> = diags
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.file.rsplit('/').next().unwrap())
        .collect();
    let sorted = files.clone();
    files.dedup();
    let mut expected: Vec<&str> = INVALID.iter().map(|c| c.0).collect();
    expected.sort();
    assert_eq!(files, expected, "{err}");
    assert_eq!(sorted.len(), INVALID.len(), "one error per file: {err}");
    assert!(
        err.to_string()
            .contains(&format!("{} errors", sorted.len())),
        "{err}"
    );
}

#[test]
fn huge_and_too_many_files_are_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let huge = "// padding\n".repeat((MAX_POLICY_FILE_BYTES as usize / 11) + 10);
    fs::write(dir.path().join("huge.cedar"), &huge).unwrap();
    let err = validate(dir.path()).unwrap_err();
    assert!(matches!(err, PolicyError::FileTooLarge { .. }), "{err}");
    assert!(err
        .to_string()
        .contains("huge.cedar is larger than 1048576 bytes"));
    let err = PolicyEngine::from_sources(vec![PolicySource::new("x.cedar", huge)]).unwrap_err();
    assert!(matches!(err, PolicyError::FileTooLarge { .. }), "{err}");

    let dir = tempfile::tempdir().unwrap();
    for i in 0..=postern_policies::MAX_POLICY_FILES {
        fs::write(dir.path().join(format!("{i}.cedar")), "").unwrap();
    }
    let err = validate(dir.path()).unwrap_err();
    assert!(matches!(err, PolicyError::TooManyFiles { .. }), "{err}");
}

#[test]
fn directory_rules_empty_dirs_other_files_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let report = validate(dir.path()).unwrap();
    assert!(report.policies.is_empty());
    assert!(report.to_string().contains("admits nobody"));

    fs::write(dir.path().join(".a.cedar"), "garbage").unwrap();
    fs::write(dir.path().join("notes.txt"), "garbage").unwrap();
    fs::create_dir(dir.path().join("sub.cedar")).unwrap();
    fs::write(
        dir.path().join("p.cedar"),
        "permit(principal, action, resource);",
    )
    .unwrap();
    let engine = PolicyEngine::from_dir(dir.path()).unwrap();
    assert_eq!(engine.len(), 1);
    assert_eq!(engine.policies()[0].id, "p.cedar:1");

    fs::write(dir.path().join("bin.cedar"), [0xff, 0xfe, 0x00]).unwrap();
    let err = PolicyEngine::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, PolicyError::NotUtf8 { .. }), "{err}");

    let err = PolicyEngine::from_dir(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(err, PolicyError::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing"));
}
