//! Admin tooling: policy test cases (`postern policy test`) and decision
//! explanations (`postern policy explain`).
//!
//! A cases file is TOML:
//!
//! ```toml
//! [[case]]
//! name = "analysts reach staging"
//! action = "connect"                 # or "register"
//! service = "db-staging"
//! service_attrs = { env = "staging", team = "data" }
//! principal = { attrs = { team = "data", groups = ["analysts"] } }
//! context = { time = "2025-03-04T10:00:00Z", source_ip = "10.1.2.3" }
//! expect = "allow"                   # or "deny"
//! ```
//!
//! Optional: `service_attrs`, `principal` (and in it `identifier`, default
//! [`DEFAULT_CASE_IDENTIFIER`], and `attrs`), `context` (and in it `time` as
//! Unix seconds or an RFC 3339 string, default [`DEFAULT_CASE_TIME`] so that
//! results never depend on the clock; `source_ip`; `relay`, an identifier;
//! `credential_expires`, like `time`). Unknown keys are errors.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::Read;
use std::net::IpAddr;
use std::path::Path;

use postern_identity::wire::ServiceName;
use postern_identity::{AttrValue, Attributes, Identifier};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::engine::{PolicyDecision, PolicyEngine, PolicyInfo};
use crate::request::{AccessRequest, Action, Principal, RequestContext, Service};
use crate::time;

/// Largest cases file accepted, in bytes.
pub const MAX_CASES_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The principal identifier of a case that names none
/// (`P0000000000000000000000000000000000000000`).
pub const DEFAULT_CASE_IDENTIFIER: &str = "P0000000000000000000000000000000000000000";

/// The decision time of a case that gives none: 2025-01-01T12:00:00Z, a
/// Wednesday. Fixed, so that a case means the same thing every day.
pub const DEFAULT_CASE_TIME: u64 = 1_735_732_800;

/// Why a cases file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CasesError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file exceeds [`MAX_CASES_FILE_BYTES`].
    #[error("{path} is larger than {limit} bytes, the limit for a cases file")]
    TooLarge {
        /// The file.
        path: String,
        /// The limit, bytes.
        limit: u64,
    },
    /// The TOML does not parse or does not fit the format (the message
    /// carries the line and column).
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong, where.
        message: String,
    },
}

/// A point in time in a cases file: Unix seconds, or an RFC 3339 string
/// (`"2025-03-04T22:00:00Z"`, `"2025-03-04T23:00:00+01:00"`). Always written
/// back as Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaseTime(pub u64);

impl Serialize for CaseTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for CaseTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CaseTime;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "Unix seconds or a quoted RFC 3339 time such as \"2025-03-04T22:00:00Z\"",
                )
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<CaseTime, E> {
                if v <= time::MAX_UNIX_SECONDS {
                    Ok(CaseTime(v))
                } else {
                    Err(E::custom(format!("{v} is after the year 9999")))
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<CaseTime, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is before 1970")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CaseTime, E> {
                time::parse_rfc3339(v).map(CaseTime).ok_or_else(|| {
                    E::custom(format!(
                        "{:?} is not an RFC 3339 time from 1970 on, such as \"2025-03-04T22:00:00Z\"",
                        v.chars().take(40).collect::<String>()
                    ))
                })
            }
            // An unquoted TOML datetime arrives as a one-entry map holding
            // its text.
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<CaseTime, A::Error> {
                match map.next_entry::<String, String>()? {
                    Some((_, text)) => self.visit_str(&text),
                    None => Err(serde::de::Error::custom("empty time")),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The expected outcome of a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Access should be granted.
    Allow,
    /// Access should be refused.
    Deny,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
        })
    }
}

/// The principal of a case.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasePrincipal {
    /// Its identifier; [`DEFAULT_CASE_IDENTIFIER`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<Identifier>,
    /// Its credential attributes (`team = "x"`, `groups = ["a", "b"]`).
    #[serde(default, skip_serializing_if = "Attributes::is_empty")]
    pub attrs: Attributes,
}

/// The context of a case; every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseContext {
    /// Decision time; [`DEFAULT_CASE_TIME`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<CaseTime>,
    /// The relay-observed source address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<IpAddr>,
    /// The relay's identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<Identifier>,
    /// The principal's credential expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_expires: Option<CaseTime>,
}

/// One test case: a request and the decision it should get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// A name, unique in the file.
    pub name: String,
    /// `"connect"` or `"register"`.
    pub action: Action,
    /// The service name.
    pub service: ServiceName,
    /// The service's attributes, as its outlet would declare them.
    #[serde(default, skip_serializing_if = "Attributes::is_empty")]
    pub service_attrs: Attributes,
    /// Who asks.
    #[serde(default)]
    pub principal: CasePrincipal,
    /// In which circumstances.
    #[serde(default)]
    pub context: CaseContext,
    /// `"allow"` or `"deny"`.
    pub expect: Expect,
}

impl Case {
    /// The request this case describes.
    pub fn request(&self) -> AccessRequest {
        AccessRequest {
            principal: Principal {
                identifier: self.principal.identifier.unwrap_or_else(default_identifier),
                attrs: self.principal.attrs.clone(),
            },
            service: Service {
                name: self.service.clone(),
                attrs: self.service_attrs.clone(),
            },
            context: RequestContext {
                time: self.context.time.map_or(DEFAULT_CASE_TIME, |t| t.0),
                source_ip: self.context.source_ip,
                relay: self.context.relay,
                credential_expires: self.context.credential_expires.map(|t| t.0),
            },
        }
    }
}

/// The all-zero identifier of [`DEFAULT_CASE_IDENTIFIER`].
fn default_identifier() -> Identifier {
    // 20 zero bytes; identifiers are hashes, so no real key has this one.
    // Parsing a constant cannot fail; fall back to a derived identifier
    // rather than panic should the format ever change.
    DEFAULT_CASE_IDENTIFIER
        .parse()
        .unwrap_or_else(|_| Identifier::from_public_key(&[0; 32]))
}

/// A cases file: `[[case]]` tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasesFile {
    /// The cases, in file order.
    #[serde(rename = "case")]
    pub cases: Vec<Case>,
}

impl CasesFile {
    /// Parses TOML text; `path` names it in errors. At least one case is
    /// required and names must be unique.
    pub fn from_toml_str(path: &str, text: &str) -> Result<Self, CasesError> {
        let format = |message: String| CasesError::Format {
            path: path.to_owned(),
            message,
        };
        let file: CasesFile = toml::from_str(text).map_err(|e| format(e.to_string()))?;
        if file.cases.is_empty() {
            return Err(format(
                "no [[case]] entries: an empty cases file tests nothing".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for case in &file.cases {
            if !seen.insert(case.name.as_str()) {
                return Err(format(format!(
                    "two cases are named {:?}; names must be unique",
                    case.name
                )));
            }
        }
        Ok(file)
    }

    /// Reads and parses a cases file.
    pub fn load(path: &Path) -> Result<Self, CasesError> {
        let shown = path.display().to_string();
        let mut bytes = Vec::new();
        fs::File::open(path)
            .and_then(|f| f.take(MAX_CASES_FILE_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|source| CasesError::Io {
                path: shown.clone(),
                source,
            })?;
        if bytes.len() as u64 > MAX_CASES_FILE_BYTES {
            return Err(CasesError::TooLarge {
                path: shown,
                limit: MAX_CASES_FILE_BYTES,
            });
        }
        let text = String::from_utf8(bytes).map_err(|_| CasesError::Format {
            path: shown.clone(),
            message: "not UTF-8 text".into(),
        })?;
        Self::from_toml_str(&shown, &text)
    }

    /// The cases as TOML text (times as Unix seconds).
    pub fn to_toml_string(&self) -> Result<String, CasesError> {
        toml::to_string(self).map_err(|e| CasesError::Format {
            path: "<cases>".into(),
            message: e.to_string(),
        })
    }
}

/// How one case went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseOutcome {
    /// The case's name.
    pub name: String,
    /// What it expected.
    pub expected: Expect,
    /// What the policies decided.
    pub decision: PolicyDecision,
}

impl CaseOutcome {
    /// Whether the decision matched the expectation.
    pub fn passed(&self) -> bool {
        self.decision.allow == (self.expected == Expect::Allow)
    }
}

/// The outcome of every case ([`run_cases`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasesReport {
    /// One outcome per case, in file order.
    pub outcomes: Vec<CaseOutcome>,
}

impl CasesReport {
    /// The cases whose decision did not match.
    pub fn failures(&self) -> impl Iterator<Item = &CaseOutcome> {
        self.outcomes.iter().filter(|o| !o.passed())
    }

    /// Whether every case passed (the CLI exits non-zero otherwise).
    pub fn success(&self) -> bool {
        self.failures().next().is_none()
    }
}

impl fmt::Display for CasesReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for o in &self.outcomes {
            let d = &o.decision;
            let got = if d.allow { "allow" } else { "deny" };
            if o.passed() {
                writeln!(f, "ok    {}: {got} ({})", o.name, d.user_reason)?;
            } else {
                writeln!(
                    f,
                    "FAIL  {}: expected {}, got {got} ({})",
                    o.name, o.expected, d.user_reason
                )?;
                for e in &d.errors {
                    writeln!(f, "        error: {e}")?;
                }
                for n in &d.notes {
                    writeln!(f, "        note: {n}")?;
                }
            }
        }
        let failed = self.failures().count();
        write!(
            f,
            "{} passed, {failed} failed",
            self.outcomes.len() - failed
        )
    }
}

/// Runs every case against `engine` (`postern policy test`).
pub fn run_cases(engine: &PolicyEngine, cases: &CasesFile) -> CasesReport {
    CasesReport {
        outcomes: cases
            .cases
            .iter()
            .map(|case| CaseOutcome {
                name: case.name.clone(),
                expected: case.expect,
                decision: engine.decide(case.action, &case.request()),
            })
            .collect(),
    }
}

/// Why a `NAME=VALUE` attribute flag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an attribute: write NAME=VALUE, such as team=data (repeat a name for several values)")]
pub struct BadAttrFlag(pub String);

/// Attributes from command-line flags such as `--principal-attr team=data`:
/// each item is `NAME=VALUE`; a name given once is a single value, a name
/// given several times a list (`groups=a groups=b`).
pub fn attrs_from_flags<'a>(
    flags: impl IntoIterator<Item = &'a str>,
) -> Result<Attributes, BadAttrFlag> {
    let mut attrs = Attributes::new();
    for flag in flags {
        let (name, value) = flag
            .split_once('=')
            .filter(|(name, _)| !name.trim().is_empty())
            .ok_or_else(|| BadAttrFlag(flag.chars().take(80).collect()))?;
        let (name, value) = (name.trim().to_owned(), value.to_owned());
        match attrs.remove(&name) {
            None => attrs.insert(name, AttrValue::One(value)),
            Some(AttrValue::One(first)) => attrs.insert(name, AttrValue::Many(vec![first, value])),
            Some(AttrValue::Many(mut values)) => {
                values.push(value);
                attrs.insert(name, AttrValue::Many(values))
            }
        };
    }
    Ok(attrs)
}

/// A decision with the policies behind it (`postern policy explain`).
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The request explained.
    pub request: AccessRequest,
    /// The decision.
    pub decision: PolicyDecision,
    /// The deciding policies with their places.
    pub policies: Vec<PolicyInfo>,
    /// How many policies were considered.
    pub considered: usize,
}

/// Decides `action` for `request` and says which policies decided it.
pub fn explain(engine: &PolicyEngine, action: Action, request: &AccessRequest) -> Explanation {
    let decision = engine.decide(action, request);
    let policies = decision
        .determining_policies
        .iter()
        .filter_map(|id| engine.policy(id).cloned())
        .collect();
    Explanation {
        request: request.clone(),
        decision,
        policies,
        considered: engine.len(),
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decision;
        let r = &self.request;
        writeln!(
            f,
            "{}: {} to {} by {}",
            if d.allow { "ALLOW" } else { "DENY" },
            d.action,
            d.service,
            r.principal.identifier
        )?;
        writeln!(f, "  reason: {}", d.user_reason)?;
        for p in &self.policies {
            writeln!(
                f,
                "  decided by {} {:?} at {}:{}",
                p.effect, p.id, p.file, p.line
            )?;
        }
        if self.policies.is_empty() && !d.allow && d.errors.is_empty() {
            writeln!(
                f,
                "  no permit applied among {} polic{} (default deny)",
                self.considered,
                if self.considered == 1 { "y" } else { "ies" }
            )?;
        }
        for e in &d.errors {
            writeln!(f, "  error: {e}")?;
        }
        for n in &d.notes {
            writeln!(f, "  note: {n}")?;
        }
        let attrs = |a: &Attributes| {
            if a.is_empty() {
                "(none)".to_owned()
            } else {
                serde_json::to_string(a).unwrap_or_default()
            }
        };
        writeln!(f, "  principal attributes: {}", attrs(&r.principal.attrs))?;
        writeln!(f, "  service attributes: {}", attrs(&r.service.attrs))?;
        let c = &r.context;
        write!(
            f,
            "  context: time {} ({})",
            c.time,
            time::rfc3339(c.time).unwrap_or_default()
        )?;
        if let Some(ip) = c.source_ip {
            write!(f, ", source_ip {ip}")?;
        }
        if let Some(relay) = &c.relay {
            write!(f, ", relay {relay}")?;
        }
        if let Some(exp) = c.credential_expires {
            write!(f, ", credential_expires {exp}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_flags() {
        let attrs = attrs_from_flags([
            "team=data",
            "groups=a",
            "groups=b",
            "groups=c",
            "note=x=y",
            "empty=",
        ])
        .unwrap();
        assert_eq!(attrs["team"], AttrValue::One("data".into()));
        assert_eq!(
            attrs["groups"],
            AttrValue::Many(vec!["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(attrs["note"], AttrValue::One("x=y".into()));
        assert_eq!(attrs["empty"], AttrValue::One(String::new()));
        for bad in ["team", "=x", " =x"] {
            assert!(attrs_from_flags([bad]).is_err(), "{bad}");
        }
    }

    const SAMPLE: &str = r#"
[[case]]
name = "full"
action = "connect"
service = "db-staging"
service_attrs = { env = "staging", team = "data" }
principal = { identifier = "P00112233445566778899aabbccddeeff00112233", attrs = { team = "data", groups = ["a", "b"] } }
context = { time = "2025-03-04T10:00:00Z", source_ip = "10.1.2.3", relay = "Pffeeddccbbaa99887766554433221100ffeeddcc", credential_expires = 1741086000 }
expect = "allow"

[[case]]
name = "minimal"
action = "register"
service = "db-prod"
expect = "deny"

[[case]]
name = "unquoted datetime"
action = "connect"
service = "db"
context = { time = 2025-03-04T11:00:00+01:00 }
expect = "deny"
"#;

    #[test]
    fn parses_every_field_with_defaults() {
        let file = CasesFile::from_toml_str("c.toml", SAMPLE).unwrap();
        assert_eq!(file.cases.len(), 3);
        let full = &file.cases[0];
        assert_eq!(full.action, Action::Connect);
        assert_eq!(full.expect, Expect::Allow);
        assert_eq!(
            full.principal.attrs.get("groups"),
            Some(&AttrValue::Many(vec!["a".into(), "b".into()]))
        );
        let req = full.request();
        assert_eq!(req.context.time, 1_741_082_400);
        assert_eq!(req.context.credential_expires, Some(1_741_086_000));
        assert_eq!(req.context.source_ip, Some("10.1.2.3".parse().unwrap()));
        assert_eq!(
            req.principal.identifier.to_string(),
            "P00112233445566778899aabbccddeeff00112233"
        );
        let minimal = file.cases[1].request();
        assert_eq!(
            minimal.principal.identifier.to_string(),
            DEFAULT_CASE_IDENTIFIER
        );
        assert_eq!(minimal.context, RequestContext::at(DEFAULT_CASE_TIME));
        assert!(minimal.principal.attrs.is_empty() && minimal.service.attrs.is_empty());
        assert_eq!(file.cases[2].request().context.time, 1_741_082_400);
    }

    #[test]
    fn round_trips_through_toml() {
        let file = CasesFile::from_toml_str("c.toml", SAMPLE).unwrap();
        let text = file.to_toml_string().unwrap();
        let again = CasesFile::from_toml_str("again.toml", &text).unwrap();
        assert_eq!(file, again, "{text}");
        assert_eq!(again.to_toml_string().unwrap(), text);
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values_with_positions() {
        let case = |extra: &str| {
            format!("[[case]]\nname = \"x\"\naction = \"connect\"\nservice = \"db\"\nexpect = \"deny\"\n{extra}\n")
        };
        for (text, words) in [
            (
                case("colour = \"red\""),
                vec!["unknown field `colour`", "line 6"],
            ),
            (
                case("principal = { atrs = {} }"),
                vec!["unknown field `atrs`"],
            ),
            (
                case("context = { ip = \"1.2.3.4\" }"),
                vec!["unknown field `ip`"],
            ),
            (
                case("context = { time = \"yesterday\" }"),
                vec!["\"yesterday\" is not an RFC 3339 time"],
            ),
            (case("context = { time = -5 }"), vec!["before 1970"]),
            (
                case("context = { source_ip = \"10.0.0.300\" }"),
                vec!["invalid IP address"],
            ),
            (
                case("[case.principal]\nidentifier = \"Pnope\""),
                vec!["Pnope"],
            ),
            (
                case("").replace("\"connect\"", "\"conect\""),
                vec!["unknown variant `conect`"],
            ),
            (
                case("").replace("\"deny\"", "\"maybe\""),
                vec!["unknown variant `maybe`"],
            ),
            (
                case("").replace("\"db\"", "\"db prod\""),
                vec!["not a valid service name"],
            ),
            (
                format!("{}[[cases]]\n", case("")),
                vec!["unknown field `cases`"],
            ),
            ("# nothing\n".to_owned(), vec!["missing field `case`"]),
            ("case = []\n".to_owned(), vec!["no [[case]] entries"]),
            (
                format!("{}{}", case(""), case("")),
                vec!["two cases are named \"x\""],
            ),
        ] {
            let err = CasesFile::from_toml_str("bad.toml", &text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("bad.toml: "), "{err}");
            for w in words {
                assert!(err.contains(w), "{w:?} not in {err}");
            }
        }
    }

    #[test]
    fn reports_failures_and_explains() {
        let engine = PolicyEngine::from_text(
            "p.cedar",
            "@id(\"data\") permit(principal, action == Action::\"connect\", resource)\n\
             when { principal has team && principal.team == \"data\" };",
        )
        .unwrap();
        let file = CasesFile::from_toml_str(
            "c.toml",
            r#"
[[case]]
name = "data allowed"
action = "connect"
service = "db"
principal = { attrs = { team = "data" } }
expect = "allow"

[[case]]
name = "web expected but wrong"
action = "connect"
service = "db"
principal = { attrs = { team = "web" } }
expect = "allow"
"#,
        )
        .unwrap();
        let report = run_cases(&engine, &file);
        assert!(!report.success());
        let failed: Vec<&str> = report.failures().map(|o| o.name.as_str()).collect();
        assert_eq!(failed, ["web expected but wrong"]);
        let text = report.to_string();
        assert!(
            text.contains("ok    data allowed: allow (connect to db permitted by policy \"data\")"),
            "{text}"
        );
        assert!(text.contains("FAIL  web expected but wrong: expected allow, got deny (no policy permits connect to db)"), "{text}");
        assert!(text.ends_with("1 passed, 1 failed"));

        let request = file.cases[0].request();
        let explanation = explain(&engine, Action::Connect, &request);
        let text = explanation.to_string();
        assert!(text.starts_with("ALLOW: connect to db by P0000"), "{text}");
        assert!(
            text.contains("decided by permit \"data\" at p.cedar:1"),
            "{text}"
        );
        assert!(
            text.contains("principal attributes: {\"team\":\"data\"}"),
            "{text}"
        );
        assert!(text.contains("2025-01-01T12:00:00Z"), "{text}");
        let text = explain(&engine, Action::Register, &request).to_string();
        assert!(text.starts_with("DENY: register to db"), "{text}");
        assert!(
            text.contains("no permit applied among 1 policy (default deny)"),
            "{text}"
        );
    }

    #[test]
    fn load_reads_files_and_bounds_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cases.toml");
        std::fs::write(&path, SAMPLE).unwrap();
        assert_eq!(CasesFile::load(&path).unwrap().cases.len(), 3);
        std::fs::write(&path, vec![b'#'; MAX_CASES_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            CasesFile::load(&path),
            Err(CasesError::TooLarge { .. })
        ));
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(CasesFile::load(&path)
            .unwrap_err()
            .to_string()
            .contains("not UTF-8"));
        let missing = dir.path().join("none.toml");
        assert!(matches!(
            CasesFile::load(&missing),
            Err(CasesError::Io { .. })
        ));
    }
}
