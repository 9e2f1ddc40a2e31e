//! `postern policy …` and `postern audit …`: offline admin tooling for Cedar
//! access policies and the hash-chained audit log. Nothing here talks to a
//! relay or a node; every command reads local files and prints a report.
//!
//! Reports go to standard output. A failed check returns an error, which
//! `main` prints as `error: …` on standard error with exit status 1.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Subcommand};
use postern_identity::wire::ServiceName;
use postern_identity::Identifier;
use postern_policies::audit::{self, ChainHead, Tamper, VerifyError, VerifyOptions};
use postern_policies::{
    attrs_from_flags, explain, read_policy_dir, run_cases, AccessRequest, Action, CaseTime,
    CasesFile, Diagnostics, PolicyEffect, PolicyEngine, PolicyError, Principal, RequestContext,
    Service, ValidateReport, DEFAULT_CASE_IDENTIFIER, SCHEMA,
};

const POLICY_EXAMPLES: &str = "\
Examples:
  postern policy schema                                  # what policies can test
  postern policy validate /etc/postern/policies
  postern policy test /etc/postern/policies --cases cases.toml
  postern policy explain /etc/postern/policies \\
      --principal-attr role=dba --service db-prod --service-attr env=prod \\
      --source-ip 10.8.3.4 --time 2025-03-04T10:00:00Z

A complete example policy set with its cases is in examples/policies/ of the source tree.";

const VALIDATE_EXAMPLES: &str = "\
Examples:
  postern policy validate /etc/postern/policies
  postern policy validate examples/policies

Output on success (one line per policy, then the summary):
    permit \"team-non-prod\" (/etc/postern/policies/teams.cedar:11)
  ok: 7 policies in 5 files are valid (5 permit, 2 forbid), 0 warnings; policy set cc1602c8…

Output on failure (exit status 1):
  error[schema]: /etc/postern/policies/production.cedar:12:25: for policy `dba-prod-working-hours`,
  attribute `rol` on entity type `Identity` not found
     |
  12 |   principal has role && principal.rol == \"dba\" &&
     |                         ^^^^^^^^^^^^^
    = help: did you mean `role`?

  error[syntax]: /etc/postern/policies/teams.cedar:16:2: unexpected end of input
     |
  16 | }
     |  ^ expected `;` or identifier

  error: /etc/postern/policies: 2 errors in 2 of 5 files; nodes refuse to load these policies";

const TEST_EXAMPLES: &str = "\
Examples:
  postern policy test /etc/postern/policies --cases cases.toml
  postern policy test examples/policies --cases examples/policies/cases.toml

A cases file holds [[case]] tables; only name, action, service and expect are required:

  [[case]]
  name = \"dba reaches production from the VPN\"
  action = \"connect\"                       # or \"register\"
  service = \"db-prod\"
  service_attrs = { env = \"prod\" }        # as the outlet declares them
  principal = { attrs = { role = \"dba\", groups = [\"oncall\"] } }   # identifier = \"P…\" optional
  context = { time = \"2025-03-04T10:00:00Z\", source_ip = \"10.8.3.4\" }
  expect = \"allow\"                         # or \"deny\"

context may also hold relay = \"P…\" and credential_expires (a time). Without a time a case is
decided at 2025-01-01T12:00:00Z, a Wednesday, so results never depend on the day you run them.";

const EXPLAIN_EXAMPLES: &str = "\
Examples:
  # May a DBA reach production now, from the VPN?
  postern policy explain /etc/postern/policies \\
      --principal-attr role=dba --service db-prod --service-attr env=prod --source-ip 10.8.3.4

  # An on-call engineer with a break-glass credential, on a Sunday night:
  postern policy explain examples/policies --principal-attr groups=oncall \\
      --principal-attr break_glass=INC-4711 --service db-prod --service-attr env=prod \\
      --source-ip 10.8.9.9 --time 2025-03-09T03:00:00Z

  # May this outlet serve db-prod at the relay?
  postern policy explain /etc/postern/policies --action register \\
      --principal P0123456789abcdef0123456789abcdef01234567 --service db-prod

Output:
  ALLOW: connect to db-prod by P0000000000000000000000000000000000000000
    reason: connect to db-prod permitted by policy \"dba-prod-working-hours\"
    decided by permit \"dba-prod-working-hours\" at /etc/postern/policies/production.cedar:8
    …";

const AUDIT_EXAMPLES: &str = "\
Examples:
  postern audit verify /var/log/postern/audit.jsonl
  postern audit verify /var/log/postern/audit.jsonl --signer P3f2a…
  postern audit verify /var/log/postern/audit.jsonl --anchor 1042:5f1c…e9
  postern audit verify audit.jsonl.2 audit.jsonl.1 audit.jsonl   # rotated files, oldest first

Each line of the log is a JSON object that records the SHA-256 of the line before it, so
changing, deleting, inserting or reordering lines breaks the chain at a place `verify` names.
A node signs the chain head with its identity at checkpoints; --signer requires those
signatures to be by that identity, so a log rewritten before the last checkpoint (every hash
recomputed) fails too. The last lines after the last checkpoint, and removing lines from the
end, are caught only by a head kept elsewhere: pass it back with --anchor.";

/// `postern policy …`
#[derive(Debug, Subcommand)]
#[command(after_help = POLICY_EXAMPLES)]
pub enum PolicyCommand {
    /// Check policy files: syntax, schema and limits.
    ///
    /// Checks the *.cedar files of a directory against Cedar's syntax, the
    /// Postern schema and Postern's limits. Exit status 0 when every policy
    /// is valid, 1 otherwise.
    ///
    /// Every problem of every file is printed with its place (file:line:column),
    /// the offending line, what Cedar expected there and, when there is one, a
    /// suggestion. Cedar's warnings are printed too; a policy that can never
    /// apply (usually a misspelt attribute behind `has`) counts as an error.
    /// Nodes refuse to load policies that fail this check.
    #[command(after_help = VALIDATE_EXAMPLES)]
    Validate {
        /// The policy directory: the *.cedar files in it (not in
        /// subdirectories), as nodes load them with --policies DIR.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Run test cases: requests and the decision each must get.
    ///
    /// Exit status 0 when every case gets its expected decision, 1 otherwise.
    /// Every case is printed as `ok` or `FAIL`. A failure shows what was
    /// expected, what was decided, the policies that decided it (id and
    /// file:line) or that no permit applied, and the request. Run the cases
    /// before deploying a change: they are the unit tests of your policies.
    #[command(after_help = TEST_EXAMPLES)]
    Test(TestArgs),
    /// Decide one request and say which policies decided it.
    ///
    /// Prints allow or deny, the deciding policies with their file:line, and
    /// any evaluation errors. The request is described by flags: the requester's identifier and
    /// credential attributes, the service and the attributes its outlet
    /// declares, the action and the context (time, source address).
    /// Exit status 0 for both allow and deny (use --exit-code to get 1 for a
    /// deny); 1 when the policies are invalid or a policy could not be
    /// evaluated for this request (a node denies such requests).
    #[command(after_help = EXPLAIN_EXAMPLES)]
    Explain(ExplainArgs),
    /// Print the Cedar schema policies are checked against.
    ///
    /// The entity types, attributes, actions and context fields policies may
    /// use, with comments.
    Schema,
}

/// `postern policy test`
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The policy directory (its *.cedar files).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// The cases file (TOML, see below).
    #[arg(long, value_name = "FILE")]
    pub cases: PathBuf,
}

/// `postern policy explain`
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The policy directory (its *.cedar files).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// The requester's identifier (`principal == Identity::"P…"` in a
    /// policy). [default: P0000000000000000000000000000000000000000]
    #[arg(long, value_name = "P…")]
    pub principal: Option<Identifier>,
    /// A credential attribute of the requester, e.g. team=data (repeatable).
    /// Repeat a name for a list: --principal-attr groups=a --principal-attr
    /// groups=b.
    #[arg(long = "principal-attr", value_name = "NAME=VALUE")]
    pub principal_attrs: Vec<String>,
    /// The service asked for (`resource == Service::"…"`).
    #[arg(long, value_name = "NAME")]
    pub service: ServiceName,
    /// An attribute the service's outlet declares, e.g. env=prod (repeatable).
    #[arg(long = "service-attr", value_name = "NAME=VALUE")]
    pub service_attrs: Vec<String>,
    /// connect (open a tunnel; decided by the outlet) or register (serve the
    /// name; decided by the relay).
    #[arg(
        long,
        default_value = "connect",
        value_name = "ACTION",
        value_parser = PossibleValuesParser::new(["connect", "register"])
            .try_map(|s| s.parse::<Action>())
    )]
    pub action: Action,
    /// The address the relay would report the requester connecting from
    /// (`context.source_ip`). Absent unless given.
    #[arg(long, value_name = "ADDR")]
    pub source_ip: Option<IpAddr>,
    /// Decision time: RFC 3339 (2025-03-04T22:00:00Z, or with an offset such
    /// as +01:00), Unix seconds, or `now`. [default: now]
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub time: Option<u64>,
    /// The relay's identifier (`context.relay`). Absent unless given.
    #[arg(long, value_name = "P…")]
    pub relay: Option<Identifier>,
    /// When the requester's credential expires, as for --time
    /// (`context.credential_expires`). Absent unless given.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub credential_expires: Option<u64>,
    /// Exit with status 1 when the decision is deny (for scripts).
    #[arg(long)]
    pub exit_code: bool,
}

/// `postern audit …`
#[derive(Debug, Subcommand)]
#[command(after_help = AUDIT_EXAMPLES)]
pub enum AuditCommand {
    /// Verify the hash chain and the signed checkpoints of an audit log.
    ///
    /// Prints `ok: N records, …`, the chain head and what the checkpoints
    /// cover, or the first line where the chain breaks and how (modified,
    /// deleted lines, inserted, reordered, malformed, truncated, bad
    /// checkpoint signature, wrong signer, not signed), with exit status 1.
    #[command(after_help = AUDIT_EXAMPLES)]
    Verify {
        /// The audit log (JSON lines, as written by nodes with --audit-log
        /// FILE). Several files: the files of a rotated log, oldest first;
        /// each must start where the one before it ended.
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// A chain head kept elsewhere, as `verify` printed it (`seq N hash
        /// H`) or as SEQ:HASH. Also detects that the last lines were removed
        /// or the anchored line rewritten. With several files: of the last.
        #[arg(long, value_name = "SEQ:HASH", value_parser = parse_anchor)]
        anchor: Option<ChainHead>,
        /// The identity of the node that wrote the log: every checkpoint must
        /// be signed by it, and no more lines than the last checkpoint allows
        /// may follow it.
        #[arg(long, value_name = "P…")]
        signer: Option<Identifier>,
    },
}

/// Runs `postern policy …`.
pub fn run_policy(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Validate { dir } => validate(&dir),
        PolicyCommand::Test(args) => test(&args),
        PolicyCommand::Explain(args) => explain_request(&args),
        PolicyCommand::Schema => {
            print!("{SCHEMA}");
            if !SCHEMA.ends_with('\n') {
                println!();
            }
            Ok(())
        }
    }
}

/// Runs `postern audit …`.
pub fn run_audit(command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Verify {
            files,
            anchor,
            signer,
        } => verify(&files, anchor, signer),
    }
}

/// `n thing` or `n things`.
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The policy files of `dir`, with a hint when `dir` is a file.
fn read_dir_sources(dir: &Path) -> Result<Vec<postern_policies::PolicySource>> {
    if dir.is_file() {
        bail!(
            "{} is a file: pass the directory that holds the *.cedar files (nodes load whole directories)",
            dir.display()
        );
    }
    read_policy_dir(dir).map_err(flat)
}

/// A library error as a message. Their `Display` already includes the
/// underlying I/O error, which `main`'s `{:#}` would print a second time.
fn flat(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

/// Prints every diagnostic, each followed by a blank line.
fn print_diagnostics(diagnostics: &Diagnostics) {
    for d in diagnostics.iter() {
        println!("{d}\n");
    }
}

/// The summary of invalid policies, used as the error message.
fn invalid_summary(dir: &Path, files: usize, diagnostics: &Diagnostics) -> String {
    let errors = diagnostics.error_count();
    let warnings = diagnostics.iter().count() - errors;
    let bad_files: BTreeSet<&str> = diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.file.as_str())
        .collect();
    let mut text = format!(
        "{}: {} in {} of {}",
        dir.display(),
        count(errors, "error", "errors"),
        bad_files.len(),
        count(files, "file", "files"),
    );
    if warnings > 0 {
        text.push_str(&format!(
            " (and {})",
            count(warnings, "warning", "warnings")
        ));
    }
    text.push_str("; nodes refuse to load these policies");
    text
}

/// Loads the engine for `test` and `explain`; invalid policies are printed
/// and refused.
fn load_engine(dir: &Path) -> Result<PolicyEngine> {
    let sources = read_dir_sources(dir)?;
    let files = sources.len();
    match PolicyEngine::from_sources(sources) {
        Ok(engine) => {
            for w in engine.warnings() {
                println!("{w}\n");
            }
            Ok(engine)
        }
        Err(PolicyError::Invalid(diagnostics)) => {
            print_diagnostics(&diagnostics);
            Err(anyhow!(
                "{}; fix them first (`postern policy validate {}` shows the same)",
                invalid_summary(dir, files, &diagnostics),
                dir.display()
            ))
        }
        Err(e) => Err(flat(e)),
    }
}

/// `postern policy validate DIR`
fn validate(dir: &Path) -> Result<()> {
    let sources = read_dir_sources(dir)?;
    let files = sources.len();
    let engine = match PolicyEngine::from_sources(sources) {
        Ok(engine) => engine,
        Err(PolicyError::Invalid(diagnostics)) => {
            print_diagnostics(&diagnostics);
            bail!("{}", invalid_summary(dir, files, &diagnostics));
        }
        Err(e) => return Err(flat(e)),
    };
    // The same report the library's `validate` returns, printed in the
    // command's own words.
    let report = ValidateReport::of(&engine);
    for p in &report.policies {
        println!(
            "  {:<6} {:?} ({}:{})",
            p.effect.to_string(),
            p.id,
            p.file,
            p.line
        );
    }
    for w in &report.warnings {
        println!("{w}\n");
    }
    let permits = report
        .policies
        .iter()
        .filter(|p| p.effect == PolicyEffect::Permit)
        .count();
    let policies = report.policies.len();
    println!(
        "ok: {} in {} {} valid ({permits} permit, {} forbid), {}; policy set {}",
        count(policies, "policy", "policies"),
        count(report.files, "file", "files"),
        if policies == 1 { "is" } else { "are" },
        policies - permits,
        count(report.warnings.len(), "warning", "warnings"),
        report.digest.get(..16).unwrap_or(&report.digest),
    );
    if report.policies.is_empty() {
        println!(
            "note: no policies in {}: a node loading them admits nobody (default deny)",
            dir.display()
        );
    }
    Ok(())
}

/// `postern policy test DIR --cases FILE`
fn test(args: &TestArgs) -> Result<()> {
    let engine = load_engine(&args.dir)?;
    let cases = CasesFile::load(&args.cases).map_err(flat)?;
    let report = run_cases(&engine, &cases);
    for (case, outcome) in cases.cases.iter().zip(&report.outcomes) {
        let d = &outcome.decision;
        let got = if d.allow { "allow" } else { "deny" };
        if outcome.passed() {
            println!("ok    {}: {got} ({})", outcome.name, d.user_reason);
        } else {
            println!(
                "FAIL  {}: expected {}, got {got}",
                outcome.name, outcome.expected
            );
            let explanation = explain(&engine, case.action, &case.request());
            for line in explanation.to_string().lines() {
                println!("        {line}");
            }
        }
    }
    let failed: Vec<&str> = report.failures().map(|o| o.name.as_str()).collect();
    let total = report.outcomes.len();
    println!(
        "{} passed, {} failed ({} against {} in {})",
        total - failed.len(),
        failed.len(),
        count(total, "case", "cases"),
        count(engine.len(), "policy", "policies"),
        count(engine.file_count(), "file", "files"),
    );
    if !failed.is_empty() {
        let names: Vec<String> = failed.iter().map(|n| format!("{n:?}")).collect();
        bail!(
            "{} of {} failed: {}",
            failed.len(),
            count(total, "case", "cases"),
            names.join(", ")
        );
    }
    Ok(())
}

/// `postern policy explain DIR …`
fn explain_request(args: &ExplainArgs) -> Result<()> {
    let principal_attrs = attrs_from_flags(args.principal_attrs.iter().map(String::as_str))
        .context("--principal-attr")?;
    let service_attrs = attrs_from_flags(args.service_attrs.iter().map(String::as_str))
        .context("--service-attr")?;
    let identifier = match args.principal {
        Some(id) => id,
        None => DEFAULT_CASE_IDENTIFIER
            .parse()
            .map_err(|e| anyhow!("internal error: the default identifier: {e}"))?,
    };
    let time = match args.time {
        Some(t) => t,
        None => unix_now()?,
    };
    let engine = load_engine(&args.dir)?;
    let request = AccessRequest {
        principal: Principal {
            identifier,
            attrs: principal_attrs,
        },
        service: Service {
            name: args.service.clone(),
            attrs: service_attrs,
        },
        context: RequestContext {
            time,
            source_ip: args.source_ip,
            relay: args.relay,
            credential_expires: args.credential_expires,
        },
    };
    let explanation = explain(&engine, args.action, &request);
    println!("{explanation}");
    let decision = &explanation.decision;
    if !decision.errors.is_empty() {
        bail!(
            "{} could not be evaluated for this request (see the error lines above); nodes deny such requests",
            count(decision.errors.len(), "policy", "policies")
        );
    }
    if args.exit_code && !decision.allow {
        bail!("denied: {}", decision.user_reason);
    }
    Ok(())
}

fn unix_now() -> Result<u64> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| anyhow!("the system clock is before 1970; give --time"))
}

/// `--time`: RFC 3339, Unix seconds, or `now` (read as the cases file reads
/// times, so both accept the same text).
fn parse_time(text: &str) -> Result<u64, String> {
    use serde::de::value::{Error, StrDeserializer, U64Deserializer};
    use serde::de::IntoDeserializer;
    use serde::Deserialize;
    let text = text.trim();
    if text == "now" {
        return unix_now().map_err(|e| e.to_string());
    }
    let parsed = match text.parse::<u64>() {
        Ok(seconds) => {
            let d: U64Deserializer<Error> = seconds.into_deserializer();
            CaseTime::deserialize(d)
        }
        Err(_) => {
            let d: StrDeserializer<Error> = text.into_deserializer();
            CaseTime::deserialize(d)
        }
    };
    parsed.map(|t| t.0).map_err(|e| e.to_string())
}

/// `--anchor`: `SEQ:HASH`, or `seq SEQ hash HASH` as `verify` prints it.
fn parse_anchor(text: &str) -> Result<ChainHead, String> {
    let text = text.trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let (seq, hash) = match (text.split_once(':'), words.as_slice()) {
        (Some((seq, hash)), _) => (seq.trim(), hash.trim()),
        (None, ["seq", seq, "hash", hash]) => (*seq, *hash),
        _ => {
            return Err(format!(
                "{:?} is not a chain head: write SEQ:HASH (1042:5f1c…) or `seq 1042 hash 5f1c…` as `postern audit verify` prints it",
                text.chars().take(80).collect::<String>()
            ))
        }
    };
    let seq: u64 = seq
        .parse()
        .map_err(|_| format!("{seq:?} is not a sequence number (a whole number)"))?;
    let hash = hash.to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{:?} is not a chain hash: 64 hex digits expected",
            hash.chars().take(80).collect::<String>()
        ));
    }
    Ok(ChainHead { seq, hash })
}

/// `postern audit verify FILE… [--anchor …] [--signer …]`
fn verify(files: &[PathBuf], anchor: Option<ChainHead>, signer: Option<Identifier>) -> Result<()> {
    let mut options = VerifyOptions::default();
    if let Some(anchor) = &anchor {
        options = options.with_anchor(anchor.clone());
    }
    if let Some(signer) = signer {
        options = options.with_signer(signer);
    }
    match audit::verify_rotated(files, &options) {
        Ok(reports) => {
            for (file, report) in files.iter().zip(&reports) {
                if files.len() > 1 {
                    println!("{}:", file.display());
                }
                println!("{report}");
                if let Some(signer) = signer {
                    println!(
                        "ok: every checkpoint is signed by {signer}; lines 1 to {} are covered, {} not yet (an anchor kept elsewhere covers them)",
                        report.covered,
                        count(report.uncovered() as usize, "line after the last checkpoint is", "lines after the last checkpoint are")
                    );
                }
            }
            if files.len() > 1 {
                println!(
                    "ok: each of the {} files continues the one before it",
                    files.len()
                );
            }
            if let Some(anchor) = anchor {
                println!(
                    "ok: the anchor (seq {}) is in the chain: no line up to it was removed or rewritten",
                    anchor.seq
                );
            }
            Ok(())
        }
        // A signature fault says itself which lines are suspect.
        Err(
            e @ VerifyError::Tampered {
                kind: Tamper::BadSignature | Tamper::WrongSigner | Tamper::Unsigned,
                ..
            },
        ) => Err(flat(e)),
        Err(e @ VerifyError::Tampered { line, .. }) => {
            let intact = if line > 1 {
                format!(
                    "; lines 1 to {} chain correctly, and everything from line {line} on is suspect",
                    line - 1
                )
            } else {
                "; everything from line 1 on is suspect".to_owned()
            };
            Err(anyhow!("{e}{intact}"))
        }
        Err(e) => Err(flat(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_like_cases_files() {
        assert_eq!(parse_time("1735732800"), Ok(1_735_732_800));
        assert_eq!(parse_time("2025-01-01T12:00:00Z"), Ok(1_735_732_800));
        assert_eq!(parse_time("2025-01-01T13:00:00+01:00"), Ok(1_735_732_800));
        assert!(parse_time("now").is_ok_and(|t| t > 1_735_732_800));
        let err = parse_time("yesterday").unwrap_err();
        assert!(err.contains("not an RFC 3339 time"), "{err}");
    }

    #[test]
    fn anchors_parse_in_both_forms() {
        let hash = "ab".repeat(32);
        let a = parse_anchor(&format!("7:{hash}")).unwrap();
        assert_eq!((a.seq, a.hash.as_str()), (7, hash.as_str()));
        let b = parse_anchor(&format!("seq 7 hash {}", hash.to_uppercase())).unwrap();
        assert_eq!(a, b);
        assert!(parse_anchor("7:abc").unwrap_err().contains("64 hex digits"));
        assert!(parse_anchor(&format!("x:{hash}")).is_err());
        assert!(parse_anchor("hello").unwrap_err().contains("SEQ:HASH"));
    }
}
