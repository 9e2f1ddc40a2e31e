//! Unit tests of the policy engine (loading, ids, decisions, reasons, bad
//! input).

use super::*;
use crate::request::{Principal, RequestContext, Service};
use postern_identity::{AttrValue, Identifier};
use std::net::IpAddr;

const T: u64 = 1_735_732_800; // 2025-01-01T12:00:00Z, a Wednesday

fn id(n: u8) -> Identifier {
    Identifier::from_public_key(&[n; 32])
}

fn one(v: &str) -> AttrValue {
    AttrValue::One(v.into())
}

fn many(vs: &[&str]) -> AttrValue {
    AttrValue::Many(vs.iter().map(|v| v.to_string()).collect())
}

fn request(principal: Principal, service: Service) -> AccessRequest {
    AccessRequest {
        principal,
        service,
        context: RequestContext::at(T),
    }
}

fn svc(name: &str) -> Service {
    Service::new(name.parse().unwrap())
}

/// The examples of the issue, verbatim apart from the `has` guards the
/// schema requires for optional attributes.
const ISSUE_EXAMPLE: &str = r#"
permit(principal, action == Action::"connect", resource)
when { principal has team && resource has team && principal.team == resource.team
       && principal has groups && principal.groups.contains("analysts")
       && resource has env && resource.env != "prod" };
permit(principal, action == Action::"register", resource == Service::"db-prod")
when { principal has role && principal.role == "db-outlet" };
"#;

#[test]
fn schema_parses_and_declares_the_actions() {
    let schema = schema().unwrap();
    let actions: Vec<String> = schema.actions().map(|a| a.to_string()).collect();
    assert!(
        actions.contains(&r#"Action::"connect""#.to_string()),
        "{actions:?}"
    );
    assert!(
        actions.contains(&r#"Action::"register""#.to_string()),
        "{actions:?}"
    );
    assert!(SCHEMA.contains("tags Set<String>"));
}

#[test]
fn issue_example_decides_as_described() {
    let engine = PolicyEngine::from_text("issue.cedar", ISSUE_EXAMPLE).unwrap();
    assert_eq!(engine.len(), 2);
    assert_eq!(engine.policies()[0].id, "issue.cedar:2");
    assert_eq!(engine.policies()[1].id, "issue.cedar:6");
    let analyst = Principal::new(id(1))
        .with_attr("team", one("data"))
        .with_attr("groups", many(&["analysts", "oncall"]));
    let staging = svc("db-staging")
        .with_attr("team", one("data"))
        .with_attr("env", one("staging"));
    let d = engine.decide(Action::Connect, &request(analyst.clone(), staging.clone()));
    assert!(d.allow, "{d:?}");
    assert_eq!(d.determining_policies, ["issue.cedar:2"]);
    assert_eq!(
        d.user_reason,
        r#"connect to db-staging permitted by policy "issue.cedar:2""#
    );
    assert!(d.to_decision().is_allowed());

    // Same principal, production service: denied, and the user is told so
    // without attribute values.
    let prod = svc("db-prod")
        .with_attr("team", one("data"))
        .with_attr("env", one("prod"));
    let d = engine.decide(Action::Connect, &request(analyst.clone(), prod));
    assert!(!d.allow);
    assert_eq!(d.user_reason, "no policy permits connect to db-prod");
    assert!(d.determining_policies.is_empty() && d.errors.is_empty());
    assert!(!d.user_reason.contains("data") && !d.user_reason.contains("analysts"));
    assert!(
        d.audit_reason.contains(r#""team":"data""#),
        "{}",
        d.audit_reason
    );
    assert!(d.audit_reason.contains(&id(1).to_string()));
    assert!(
        matches!(d.to_decision(), Decision::Deny { reason } if reason == "no policy permits connect to db-prod")
    );

    // Lacking the group attribute: denied.
    let no_group = Principal::new(id(2)).with_attr("team", one("data"));
    assert!(
        !engine
            .decide(Action::Connect, &request(no_group, staging.clone()))
            .allow
    );

    // Register: only the db-outlet role, only db-prod.
    let outlet = Principal::new(id(3)).with_attr("role", one("db-outlet"));
    assert!(
        engine
            .decide(Action::Register, &request(outlet.clone(), svc("db-prod")))
            .allow
    );
    assert!(
        !engine
            .decide(Action::Register, &request(outlet, svc("db-other")))
            .allow
    );
    assert!(
        !engine
            .decide(Action::Register, &request(analyst, svc("db-prod")))
            .allow
    );
    // Connect permission does not imply register.
    let d = engine.decide(Action::Register, &request(Principal::new(id(4)), staging));
    assert_eq!(d.user_reason, "no policy permits register to db-staging");
}

#[test]
fn empty_engine_denies_everything_and_says_why() {
    let engine = PolicyEngine::empty().unwrap();
    assert!(engine.is_empty());
    let d = engine.decide(Action::Connect, &request(Principal::new(id(1)), svc("db")));
    assert!(!d.allow);
    assert!(
        d.user_reason.contains("no policies are loaded"),
        "{}",
        d.user_reason
    );
    assert!(d.user_reason.contains("default deny"));
    // Whitespace and comments only: still empty.
    let engine = PolicyEngine::from_text("c.cedar", "// nothing yet\n\n").unwrap();
    assert!(engine.is_empty());
}

#[test]
fn forbid_overrides_permit_and_ids_come_from_annotations() {
    let text = r#"
@id("everyone")
permit(principal, action, resource);
@id("no-contractors")
forbid(principal, action == Action::"connect", resource)
when { principal has role && principal.role == "contractor" };
"#;
    let engine = PolicyEngine::from_text("f.cedar", text).unwrap();
    let info = engine.policy("no-contractors").unwrap();
    assert_eq!((info.line, info.effect), (4, PolicyEffect::Forbid));
    let contractor = Principal::new(id(1)).with_attr("role", one("contractor"));
    let d = engine.decide(Action::Connect, &request(contractor.clone(), svc("db")));
    assert!(!d.allow);
    assert_eq!(d.determining_policies, ["no-contractors"]);
    assert_eq!(
        d.user_reason,
        r#"connect to db forbidden by policy "no-contractors""#
    );
    assert!(
        d.audit_reason
            .contains(r#"forbid "no-contractors" (f.cedar:4)"#),
        "{}",
        d.audit_reason
    );
    assert!(
        engine
            .decide(Action::Register, &request(contractor, svc("db")))
            .allow
    );
    let d = engine.decide(Action::Connect, &request(Principal::new(id(2)), svc("db")));
    assert!(d.allow);
    assert_eq!(d.determining_policies, ["everyone"]);
}

#[test]
fn generated_ids_are_unique_even_on_one_line() {
    let text = "permit(principal, action, resource); permit(principal, action, resource);\n\
                forbid(principal, action, resource) when { context.weekday == 8 };";
    let engine = PolicyEngine::from_text("dir/x.cedar", text).unwrap();
    let ids: Vec<&str> = engine.policies().iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["x.cedar:1", "x.cedar:1:38", "x.cedar:2"]);
    assert!(engine.warnings().is_empty());
}

#[test]
fn duplicate_ids_are_refused_with_both_places() {
    let a = PolicySource::new(
        "a.cedar",
        "@id(\"same\")\npermit(principal, action, resource);",
    );
    let b = PolicySource::new(
        "b.cedar",
        "\n\n@id(\"same\") forbid(principal, action, resource);",
    );
    let err = PolicyEngine::from_sources(vec![a, b]).unwrap_err();
    let PolicyError::Invalid(diags) = &err else {
        panic!("{err}")
    };
    let d = diags.iter().next().unwrap();
    assert_eq!((d.file.as_str(), d.line, d.column), ("b.cedar", 3, 1));
    assert!(
        d.message
            .contains("already used by the policy at a.cedar:1"),
        "{err}"
    );
    let err = PolicyEngine::from_text("e.cedar", "@id(\"\") permit(principal, action, resource);")
        .unwrap_err();
    assert!(err.to_string().contains("non-empty"), "{err}");
}

#[test]
fn source_address_rules_use_the_ip_extension() {
    let text = r#"
@id("office")
permit(principal, action == Action::"connect", resource)
when { context has source_ip && context.source_ip.isInRange(ip("10.0.0.0/8")) };
"#;
    let engine = PolicyEngine::from_text("ip.cedar", text).unwrap();
    let mut req = request(Principal::new(id(1)), svc("db"));
    assert!(
        !engine.decide(Action::Connect, &req).allow,
        "unknown address"
    );
    req.context.source_ip = Some("10.9.8.7".parse::<IpAddr>().unwrap());
    assert!(engine.decide(Action::Connect, &req).allow);
    req.context.source_ip = Some("11.0.0.1".parse::<IpAddr>().unwrap());
    assert!(!engine.decide(Action::Connect, &req).allow);
    req.context.source_ip = Some("2001:db8::1".parse::<IpAddr>().unwrap());
    assert!(!engine.decide(Action::Connect, &req).allow);
}

#[test]
fn time_window_rules_see_hour_weekday_and_datetime() {
    let text = r#"
permit(principal, action, resource)
when { context.weekday <= 5 && context.hour_utc >= 9 && context.hour_utc < 17 };
permit(principal, action, resource)
when { context.now >= datetime("2030-01-01") && context.now.toTime() < duration("1h") };
"#;
    let engine = PolicyEngine::from_text("t.cedar", text).unwrap();
    let mut req = request(Principal::new(id(1)), svc("db"));
    let at = |req: &mut AccessRequest, t: u64| {
        req.context.time = t;
        engine.decide(Action::Connect, req)
    };
    assert_eq!(at(&mut req, T).determining_policies, ["t.cedar:2"]); // Wed 12:00
    assert!(!at(&mut req, T + 6 * 3600).allow); // Wed 18:00
    assert!(!at(&mut req, T + 3 * 86_400).allow); // Sat 12:00
    let d = at(&mut req, 1_893_456_000 + 1800); // 2030-01-01T00:30Z
    assert_eq!(d.determining_policies, ["t.cedar:4"]);
    // Beyond Cedar's datetime range: an error, so a deny.
    let d = at(&mut req, u64::MAX);
    assert!(!d.allow && !d.errors.is_empty(), "{d:?}");
    assert!(d.user_reason.contains("could not be evaluated"));
}

#[test]
fn every_attribute_is_a_tag_and_odd_ones_never_crash() {
    let text = r#"
@id("finance")
permit(principal, action, resource)
when { principal.hasTag("department") && principal.getTag("department").contains("finance")
       && resource.hasTag("data class") && resource.getTag("data class").contains("pii") };
"#;
    let engine = PolicyEngine::from_text("tags.cedar", text).unwrap();
    let p = Principal::new(id(1))
        .with_attr("department", one("finance"))
        .with_attr("", one(""))
        .with_attr(
            "\u{0}\n\"weird\" name",
            many(&["\u{202e}", "x\"; permit(principal,action,resource);"]),
        );
    let s = svc("db").with_attr("data class", many(&["pii", "eu"]));
    let d = engine.decide(Action::Connect, &request(p, s));
    assert!(d.allow, "{d:?}");
    assert_eq!(d.determining_policies, ["finance"]);
    // The audit reason quotes the odd values as JSON: one line, escaped.
    assert!(!d.audit_reason.contains('\n'), "{}", d.audit_reason);
    assert!(
        d.audit_reason.contains(r#"\u0000\n\"weird\" name"#),
        "{}",
        d.audit_reason
    );
}

#[test]
fn values_are_data_not_policy_text() {
    let text = r#"
permit(principal, action, resource)
when { principal has team && principal.team == "data" };
"#;
    let engine = PolicyEngine::from_text("inj.cedar", text).unwrap();
    for evil in [
        r#"x" || true || "x"#,
        "data\"",
        "\"data\"",
        "data\n",
        "data\u{0}",
        r#"" }; permit(principal, action, resource); //"#,
    ] {
        let p = Principal::new(id(1)).with_attr("team", one(evil));
        let d = engine.decide(Action::Connect, &request(p, svc("db")));
        assert!(!d.allow, "{evil:?}");
        assert!(d.errors.is_empty(), "{evil:?}: {:?}", d.errors);
    }
}

#[test]
fn declared_attributes_of_the_wrong_shape_are_noted_not_fatal() {
    let text = r#"
@id("by-team") permit(principal, action, resource)
when { principal has team && principal.team == "data" };
@id("by-team-tag") permit(principal, action, resource)
when { principal.hasTag("team") && principal.getTag("team").contains("web") };
@id("by-group") permit(principal, action, resource)
when { principal has groups && principal.groups.contains("solo") };
"#;
    let engine = PolicyEngine::from_text("shape.cedar", text).unwrap();
    // Two teams: `team` stays unset (noted), the tag still has both.
    let p = Principal::new(id(1)).with_attr("team", many(&["data", "web"]));
    let d = engine.decide(Action::Connect, &request(p, svc("db")));
    assert_eq!(d.determining_policies, ["by-team-tag"], "{d:?}");
    assert!(
        d.notes.iter().any(|n| n.contains("\"team\" has 2 values")),
        "{d:?}"
    );
    assert!(d.audit_reason.contains("notes:"));
    // A one-element list fills a string attribute; a single string fills a set.
    let p = Principal::new(id(1)).with_attr("team", many(&["data"]));
    assert!(engine.decide(Action::Connect, &request(p, svc("db"))).allow);
    let p = Principal::new(id(1)).with_attr("groups", one("solo"));
    assert!(engine.decide(Action::Connect, &request(p, svc("db"))).allow);
}

#[test]
fn reserved_attributes_cannot_be_spoofed() {
    let me = id(7);
    let text = format!(
        "permit(principal, action, resource) when {{ principal.identifier == \"{me}\" }};\n\
         permit(principal, action, resource) when {{ resource.name == \"db-prod\" }};"
    );
    let engine = PolicyEngine::from_text("r.cedar", &text).unwrap();
    let spoof = Principal::new(id(8)).with_attr("identifier", one(&me.to_string()));
    let service = svc("db-dev").with_attr("name", one("db-prod"));
    let d = engine.decide(Action::Connect, &request(spoof, service));
    assert!(!d.allow, "{d:?}");
    assert_eq!(d.notes.len(), 2, "{d:?}");
    assert!(
        engine
            .decide(Action::Connect, &request(Principal::new(me), svc("db-dev")))
            .allow
    );
    assert!(
        engine
            .decide(
                Action::Connect,
                &request(Principal::new(id(9)), svc("db-prod"))
            )
            .allow
    );
}

#[test]
fn an_evaluation_error_anywhere_means_deny() {
    // The second policy overflows; Cedar would skip it and allow by the
    // first, Postern refuses.
    let text = r#"
@id("all") permit(principal, action, resource);
@id("overflow") forbid(principal, action, resource)
when { context.time * 9223372036854775807 < 0 };
"#;
    let engine = PolicyEngine::from_text("err.cedar", text).unwrap();
    let d = engine.decide(Action::Connect, &request(Principal::new(id(1)), svc("db")));
    assert!(!d.allow);
    assert_eq!(d.errors.len(), 1, "{d:?}");
    assert!(d.errors[0].contains("overflow"), "{d:?}");
    assert!(d.user_reason.contains("could not be evaluated"));
    assert!(d.audit_reason.contains("overflow"));
}

#[test]
fn credential_expiry_and_relay_reach_the_context() {
    let relay = id(5);
    let text = format!(
        "permit(principal, action, resource) when {{ context has relay && context.relay == \"{relay}\" \
         && context has credential_expires && context.credential_expires > context.time }};"
    );
    let engine = PolicyEngine::from_text("c.cedar", &text).unwrap();
    let mut req = request(Principal::new(id(1)), svc("db"));
    assert!(!engine.decide(Action::Connect, &req).allow);
    req.context.relay = Some(relay);
    req.context.credential_expires = Some(T + 60);
    assert!(engine.decide(Action::Connect, &req).allow);
    req.context.credential_expires = Some(T - 1);
    assert!(!engine.decide(Action::Connect, &req).allow);
    req.context.credential_expires = Some(u64::MAX);
    let d = engine.decide(Action::Connect, &req);
    assert!(!d.allow && d.errors[0].contains("out of range"), "{d:?}");
}

#[test]
fn engine_is_shareable_and_digest_tracks_content() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PolicyEngine>();
    let a = PolicyEngine::from_text("a.cedar", "permit(principal, action, resource);").unwrap();
    let b = PolicyEngine::from_text("a.cedar", "permit(principal, action, resource);").unwrap();
    let c = PolicyEngine::from_text("a.cedar", "forbid(principal, action, resource);").unwrap();
    assert_eq!(a.digest(), b.digest());
    assert_ne!(a.digest(), c.digest());
    assert_eq!(a.digest().len(), 64);
    assert!(format!("{a:?}").contains("policies: 1"));
}

/// The largest inputs the limits admit must parse, validate and evaluate on
/// a 2 MiB stack (the default for spawned threads and tokio workers).
#[test]
fn worst_case_accepted_policies_fit_a_small_stack() {
    use crate::scan::{MAX_NESTING_DEPTH, MAX_POLICY_OPERATORS as OPS};
    let depth = MAX_NESTING_DEPTH - 1; // and `when {`
    let nested = format!(
        "{}context.hour_utc > 3{}",
        "(".repeat(depth),
        ")".repeat(depth)
    );
    // The longest chains the operator limit allows (operators per term:
    // 3 for `context.hour_utc == 99 ||`, 3 for `!(principal has team) &&`,
    // 1 for `+ 1`).
    let or_chain = vec!["context.hour_utc == 99"; OPS / 3].join(" || ");
    let plus_chain = format!("context.hour_utc{} > 0", " + 1".repeat(OPS - 2));
    let members = vec!["!(principal has team)"; OPS / 3].join(" && ");
    let set = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let sets = format!("{set} == {set}");
    let nested_ops = format!(
        "{}context.hour_utc{} > 0",
        "(".repeat(depth),
        " + 1)".repeat(depth) + &" + 1".repeat(OPS - depth - 2)
    );
    let bodies = [nested, or_chain, plus_chain, members, sets, nested_ops];
    let text: String = bodies
        .iter()
        .map(|body| format!("permit(principal, action, resource) when {{ {body} }};\n"))
        .collect();
    for (n, line) in text.lines().enumerate() {
        assert!(
            crate::scan::check("x", line).is_ok(),
            "body {n} exceeds a limit"
        );
    }
    let handle = std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            let engine = PolicyEngine::from_text("big.cedar", &text).map_err(|e| e.to_string())?;
            let d = engine.decide(Action::Connect, &request(Principal::new(id(1)), svc("db")));
            Ok::<_, String>((engine.len(), d))
        })
        .unwrap();
    let (len, d) = handle.join().unwrap().unwrap();
    assert_eq!(len, bodies.len());
    assert!(d.allow && d.errors.is_empty(), "{:?}", d.errors);
}

#[test]
fn oversized_text_is_refused_before_parsing() {
    let huge = " ".repeat(MAX_POLICY_FILE_BYTES as usize + 1);
    let err = PolicyEngine::from_text("huge.cedar", &huge).unwrap_err();
    assert!(matches!(err, PolicyError::FileTooLarge { .. }), "{err}");
    let long = format!(
        "permit(principal, action, resource) when {{ {} }};",
        vec!["true"; crate::scan::MAX_POLICY_OPERATORS + 2].join(" && ")
    );
    let err = PolicyEngine::from_text("long.cedar", &long).unwrap_err();
    assert!(err.to_string().contains("more than 256 operators"), "{err}");
}

#[test]
fn policies_that_can_never_apply_are_errors() {
    for (text, line) in [
        ("permit(principal, action, resource)\nwhen { principal has tema && principal.tema == \"x\" };", 1),
        ("\n@id(\"off\")\nforbid(principal, action, resource) when { false };", 2),
    ] {
        let err = PolicyEngine::from_text("i.cedar", text).unwrap_err();
        let PolicyError::Invalid(diags) = &err else { panic!("{err}") };
        let d = diags.iter().next().unwrap();
        assert_eq!((d.kind, d.line), (DiagnosticKind::Schema, line), "{err}");
        assert!(err.to_string().contains("policy is impossible"), "{err}");
        assert!(err.to_string().contains("hasTag"), "{err}");
    }
}

#[test]
fn hidden_bidirectional_text_is_refused() {
    let text = "permit(principal, action, resource) when { principal has role && principal.role == \"admin\u{202e}\" };";
    let err = PolicyEngine::from_text("b.cedar", text).unwrap_err();
    assert!(err.to_string().contains("error[unsupported]"), "{err}");
}

/// The shortcuts of `decide` (pre-filter, cached sets, values built without
/// Cedar's schema checks, context fields left out when unread) must not
/// change any decision: compare with Cedar evaluating every policy over
/// schema-checked input, on many requests.
#[test]
fn shortcuts_agree_with_full_evaluation() {
    let fixtures = concat!(
        include_str!("../tests/fixtures/valid/teams.cedar"),
        include_str!("../tests/fixtures/valid/prod.cedar")
    );
    // Families of policies that differ only in a literal: the index groups
    // them by their leading check (guarded `==` and `contains` on attributes,
    // tags, and the unguarded `==` on an attribute always present).
    let families = r#"
@id("fam-team-data") permit(principal, action == Action::"connect", resource) when { principal has team && principal.team == "data" && resource has env };
@id("fam-team-web") permit(principal, action == Action::"connect", resource) when { principal has team && principal.team == "web" };
@id("fam-team-x") permit(principal, action == Action::"connect", resource) when { principal has team && principal.team == "x" };
@id("fam-group-analysts") permit(principal, action, resource) when { principal has groups && principal.groups.contains("analysts") && context.time > 0 };
@id("fam-group-oncall") forbid(principal, action == Action::"register", resource) when { principal has groups && principal.groups.contains("oncall") };
@id("fam-group-none") permit(principal, action, resource) when { principal has groups && principal.groups.contains("none") };
@id("fam-dept-fin") permit(principal, action, resource) when { principal.hasTag("dept") && principal.getTag("dept").contains("fin") && resource has env && resource.env == "staging" };
@id("fam-dept-ops") forbid(principal, action == Action::"connect", resource) when { principal.hasTag("dept") && principal.getTag("dept").contains("ops") && resource.hasTag("class") };
@id("fam-dept-hr") permit(principal, action, resource) when { principal.hasTag("dept") && principal.getTag("dept").contains("hr") };
@id("fam-name-a") permit(principal, action == Action::"register", resource) when { resource.name == "svc-a" && principal has role };
@id("fam-name-b") permit(principal, action == Action::"register", resource) when { resource.name == "svc-b" };
@id("fam-name-other") forbid(principal, action == Action::"register", resource) when { resource.name == "other" };
"#;
    let extra = r#"
@id("svc-a-data") permit(principal, action == Action::"connect", resource == Service::"svc-a")
when { principal has team && principal.team == "data" };
@id("svc-b-any") permit(principal, action in [Action::"connect", Action::"register"], resource == Service::"svc-b");
@id("team-match") permit(principal, action, resource)
when { principal has team && resource has team && principal.team == resource.team && resource has env && resource.env != "prod" };
@id("not-web") permit(principal, action == Action::"connect", resource is Service)
when { principal has team && principal.team != "web" && principal has role } unless { resource has env };
@id("tags") permit(principal, action, resource)
when { principal.hasTag("dept") && principal.getTag("dept").contains("fin") && resource.hasTag("class") };
@id("overflow-when-oncall") permit(principal, action, resource)
when { principal has groups && principal.groups.contains("oncall") && context.time * 9223372036854775807 < 0 };
@id("no-contractors") forbid(principal, action, resource)
when { principal has role && principal.role == "contractor" };
@id("late") permit(principal, action == Action::"connect", resource)
when { principal has email && context.now.toTime() > duration("20h") };
@id("me") permit(principal == Identity::"P0000000000000000000000000000000000000001", action, resource);
"#;
    let engine = PolicyEngine::from_sources(vec![
        PolicySource::new("fixtures.cedar", fixtures),
        PolicySource::new("extra.cedar", extra),
        PolicySource::new("families.cedar", families),
    ])
    .unwrap();
    let uses = engine
        .context_use
        .iter()
        .fold(ContextUse::NONE, |a, b| a.union(*b));
    assert!(uses.now && uses.source_ip && !uses.relay);
    // The families are grouped: team, groups and dept for connect; groups,
    // dept and name for register.
    assert_eq!(
        (engine.index[0].groups.len(), engine.index[1].groups.len()),
        (3, 3)
    );

    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut pick = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let teams = [
        None,
        Some(one("data")),
        Some(one("web")),
        Some(many(&["data", "web"])),
        Some(many(&["data"])),
    ];
    let groups = [
        None,
        Some(many(&["analysts"])),
        Some(one("oncall")),
        Some(many(&["analysts", "oncall"])),
    ];
    let roles = [None, Some("dba"), Some("db-outlet"), Some("contractor")];
    let services = ["db-prod", "db-staging", "svc-a", "svc-b", "other"];
    let envs = [None, Some("prod"), Some("staging")];
    let ips = [
        None,
        Some("10.20.1.1"),
        Some("10.9.9.9"),
        Some("203.0.113.5"),
        Some("::1"),
    ];
    let times = [T, T + 9 * 3600, T + 3 * 86_400 - 5 * 3600];
    let identifiers = [
        id(1),
        "P0000000000000000000000000000000000000001".parse().unwrap(),
    ];
    let (mut allowed, mut errored) = (0, 0);
    for _ in 0..1500 {
        let mut p = Principal::new(identifiers[pick(2)]);
        if let Some(t) = &teams[pick(teams.len())] {
            p = p.with_attr("team", t.clone());
        }
        if let Some(g) = &groups[pick(groups.len())] {
            p = p.with_attr("groups", g.clone());
        }
        if let Some(r) = roles[pick(roles.len())] {
            p = p.with_attr("role", one(r));
        }
        if pick(2) == 0 {
            p = p
                .with_attr("incident", one("open"))
                .with_attr("email", one("a@b"));
        }
        if pick(3) == 0 {
            p = p.with_attr("dept", many(&["fin", "ops"]));
        }
        let mut s = svc(services[pick(services.len())]);
        if let Some(e) = envs[pick(envs.len())] {
            s = s.with_attr("env", one(e));
        }
        if pick(2) == 0 {
            s = s
                .with_attr("team", one("data"))
                .with_attr("class", one("pii"));
        }
        let context = RequestContext {
            time: times[pick(times.len())],
            source_ip: ips[pick(ips.len())].map(|ip| ip.parse().unwrap()),
            relay: None,
            credential_expires: [None, Some(T + 600), Some(T + 86_400)][pick(3)],
        };
        let req = AccessRequest {
            principal: p,
            service: s,
            context,
        };
        let action = [Action::Connect, Action::Register][pick(2)];
        let fast = engine.decide(action, &req);
        let (cedar_allow, policies, errors) = engine.evaluate_reference(action, &req).unwrap();
        let reference_allow = cedar_allow && errors.is_empty();
        assert_eq!(
            (fast.allow, &fast.determining_policies, &fast.errors),
            (reference_allow, &policies, &errors),
            "{action} {req:?}"
        );
        allowed += usize::from(fast.allow);
        errored += usize::from(!fast.errors.is_empty());
    }
    // The sample must exercise allows, denies and errors.
    assert!(
        allowed > 50 && allowed < 1450 && errored > 20,
        "{allowed} allowed, {errored} errors"
    );
}

/// Entities and context built without Cedar's schema checks still conform.
#[test]
fn built_values_conform_to_the_schema() {
    let engine = PolicyEngine::empty().unwrap();
    let p = Principal::new(id(1))
        .with_attr("team", many(&["a", "b"]))
        .with_attr("groups", one("g"))
        .with_attr("role", many(&["r"]))
        .with_attr("identifier", one("x"))
        .with_attr("odd \u{0} name", many(&[]));
    let s = svc("db")
        .with_attr("name", one("x"))
        .with_attr("tier", one("1"))
        .with_attr("free", many(&["a", "b"]));
    let req = AccessRequest {
        principal: p,
        service: s,
        context: RequestContext {
            time: T,
            source_ip: Some("2001:db8::1".parse().unwrap()),
            relay: Some(id(3)),
            credential_expires: Some(T + 1),
        },
    };
    for action in [Action::Connect, Action::Register] {
        engine.evaluate_reference(action, &req).unwrap();
    }

    // The engine builds entities and context as Cedar values directly; they
    // equal what Cedar's checked public API builds from the same request.
    let mut notes = Vec::new();
    let identifier = req.principal.identifier.to_string();
    let views = [
        View::principal(&req.principal, identifier.clone(), &mut notes),
        View::service(&req.service, &mut notes),
    ];
    let uids = [
        engine.names.principal_uid(&identifier),
        engine.names.service_uid(&req.service.name),
    ];
    for (view, uid) in views.iter().zip(uids) {
        let direct = view.core_entity(uid.clone().into(), &Referenced::all());
        let checked = view.entity(uid).unwrap();
        assert!(direct.deep_eq(checked.as_ref()), "{direct:?}\n{checked:?}");
    }
    let fields = request::context_fields(&req.context, ContextUse::ALL).unwrap();
    assert_eq!(fields.len(), 7, "{fields:?}");
    let direct = eval::context(
        fields
            .into_iter()
            .map(|(name, field)| (name, engine.value(field).unwrap()))
            .collect(),
    );
    let checked = request::context(&req.context, ContextUse::ALL).unwrap();
    assert_eq!(&direct, checked.as_ref());
    // Cached extension values are the same values.
    let again = engine
        .value(Field::Ip("2001:db8::1".parse().unwrap()))
        .unwrap();
    assert_eq!(
        Some(&again),
        match checked.as_ref() {
            cedar_policy_core::ast::Context::Value(map) => map.get("source_ip"),
            _ => None,
        }
    );
}

#[test]
fn bounded_cache_keeps_its_bound_and_the_newest_entry() {
    let cache = BoundedCache::new(3);
    for i in 0..10u32 {
        cache.insert(i, i * 2);
        assert_eq!(cache.get(&i), Some(i * 2));
        assert!(cache.map.lock().unwrap().len() <= 3);
    }
    // Replacing a present key evicts nothing.
    let before: Vec<u32> = cache.map.lock().unwrap().keys().copied().collect();
    cache.insert(before[0], 99);
    assert_eq!(cache.map.lock().unwrap().len(), 3);
    assert_eq!(cache.get(&before[0]), Some(99));
    assert_eq!(cache.get_or_try_insert::<()>(42, || Ok(1)), Ok(1));
    assert_eq!(cache.get_or_try_insert::<()>(42, || Err(())), Ok(1));
}
