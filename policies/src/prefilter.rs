//! Choosing which policies Cedar needs to evaluate for a request.
//!
//! Cedar evaluates every policy of a set for every request and, for each,
//! first copies its whole condition; with 100 policies that costs hundreds of
//! microseconds. Most policies are about another action, another service, or
//! principals with other attributes, and that is visible without Cedar:
//!
//! - the **scope** (`principal == …`, `action == …`, `resource == …`, `in`,
//!   `is`) is matched exactly, for permits and forbids alike (Postern
//!   entities have no parents, so `in` means `==`);
//! - for **permit** policies only, the leading conjuncts of the first `when`
//!   clause are checked when they have one of a few simple forms on the
//!   principal or the resource — `has a`, `.a == "lit"` (either side),
//!   `.a != "lit"`, `.a.contains("lit")`, `.hasTag("k")`,
//!   `.getTag("k").contains("lit")` — read from the same [`View`] the Cedar
//!   entity is built from. A conjunct found false means Cedar would find the
//!   policy unsatisfied without evaluating anything after it; the checks stop
//!   at the first conjunct of another form or whose outcome is not certain.
//!
//! Forbid policies are never skipped for their conditions, so a flaw here
//! could only make a decision stricter, never turn a deny into an allow. A
//! test compares filtered decisions with full Cedar evaluations.

use cedar_policy::{
    ActionConstraint, EntityTypeName, EntityUid, Policy, PrincipalConstraint, ResourceConstraint,
};
use serde_json::Value;

use crate::request::{ContextUse, Declared, View};

/// An entity a condition talks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    Principal,
    Resource,
}

/// A conjunct the pre-filter can decide.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    /// `subject has attr`
    Has(Subject, String),
    /// `subject.attr == "lit"`, or `!=` when the flag is false
    Eq(Subject, String, String, bool),
    /// `subject.attr.contains("lit")`
    Contains(Subject, String, String),
    /// `subject.hasTag("key")`
    HasTag(Subject, String),
    /// `subject.getTag("key").contains("lit")`
    TagContains(Subject, String, String),
}

/// The pre-filter of one policy.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    principal: PrincipalConstraint,
    action: ActionConstraint,
    resource: ResourceConstraint,
    /// Leading conjuncts of a permit (always empty for a forbid).
    checks: Vec<Check>,
}

/// The request as the pre-filter sees it.
pub(crate) struct Target<'a> {
    pub(crate) principal_uid: &'a EntityUid,
    pub(crate) principal_type: &'a EntityTypeName,
    pub(crate) action_uid: &'a EntityUid,
    pub(crate) resource_uid: &'a EntityUid,
    pub(crate) resource_type: &'a EntityTypeName,
    pub(crate) principal: &'a View<'a>,
    pub(crate) resource: &'a View<'a>,
}

fn entity_matches(
    uid: &EntityUid,
    ty: &EntityTypeName,
    eq: Option<&EntityUid>,
    is: Option<&EntityTypeName>,
) -> bool {
    eq.is_none_or(|e| e == uid) && is.is_none_or(|t| t == ty)
}

impl Filter {
    /// The filter of a (static, validated) policy.
    pub(crate) fn new(policy: &Policy) -> Self {
        let checks = match policy.effect() {
            cedar_policy::Effect::Permit => policy
                .to_json()
                .map(|est| leading_checks(&est))
                .unwrap_or_default(),
            cedar_policy::Effect::Forbid => Vec::new(),
        };
        Filter {
            principal: policy.principal_constraint(),
            action: policy.action_constraint(),
            resource: policy.resource_constraint(),
            checks,
        }
    }

    /// Whether Cedar could find the policy satisfied for `t` (or fail on it).
    pub(crate) fn may_apply(&self, t: &Target<'_>) -> bool {
        let principal = match &self.principal {
            PrincipalConstraint::Any => true,
            PrincipalConstraint::Eq(e) | PrincipalConstraint::In(e) => {
                entity_matches(t.principal_uid, t.principal_type, Some(e), None)
            }
            PrincipalConstraint::Is(ty) => {
                entity_matches(t.principal_uid, t.principal_type, None, Some(ty))
            }
            PrincipalConstraint::IsIn(ty, e) => {
                entity_matches(t.principal_uid, t.principal_type, Some(e), Some(ty))
            }
        };
        let action = match &self.action {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(e) => e == t.action_uid,
            ActionConstraint::In(es) => es.contains(t.action_uid),
        };
        let resource = match &self.resource {
            ResourceConstraint::Any => true,
            ResourceConstraint::Eq(e) | ResourceConstraint::In(e) => {
                entity_matches(t.resource_uid, t.resource_type, Some(e), None)
            }
            ResourceConstraint::Is(ty) => {
                entity_matches(t.resource_uid, t.resource_type, None, Some(ty))
            }
            ResourceConstraint::IsIn(ty, e) => {
                entity_matches(t.resource_uid, t.resource_type, Some(e), Some(ty))
            }
        };
        if !(principal && action && resource) {
            return false;
        }
        for check in &self.checks {
            match evaluate(check, t) {
                Some(true) => continue,
                Some(false) => return false,
                None => return true,
            }
        }
        true
    }
}

/// `Some(outcome)` when certain, `None` when Cedar must decide (including
/// when it would fail).
fn evaluate(check: &Check, t: &Target<'_>) -> Option<bool> {
    let view = |s: &Subject| match s {
        Subject::Principal => t.principal,
        Subject::Resource => t.resource,
    };
    match check {
        Check::Has(s, attr) => Some(view(s).attr(attr).is_some()),
        Check::Eq(s, attr, lit, equal) => match view(s).attr(attr)? {
            Declared::Str(v) => Some((v == lit) == *equal),
            Declared::Set(_) => None,
        },
        Check::Contains(s, attr, lit) => match view(s).attr(attr)? {
            Declared::Set(vs) => Some(vs.contains(&lit.as_str())),
            Declared::Str(_) => None,
        },
        Check::HasTag(s, key) => Some(view(s).tag(key).is_some()),
        Check::TagContains(s, key, lit) => Some(view(s).tag(key)?.contains(lit)),
    }
}

/// The operand of a one-key JSON object `{op: {…}}`.
fn op<'a>(expr: &'a Value, name: &str) -> Option<&'a Value> {
    let obj = expr.as_object()?;
    if obj.len() == 1 {
        obj.get(name)
    } else {
        None
    }
}

fn subject(expr: &Value) -> Option<Subject> {
    match op(expr, "Var")?.as_str()? {
        "principal" => Some(Subject::Principal),
        "resource" => Some(Subject::Resource),
        _ => None,
    }
}

fn string_literal(expr: &Value) -> Option<String> {
    op(expr, "Value")?.as_str().map(str::to_owned)
}

/// `subject.attr`
fn get_attr(expr: &Value) -> Option<(Subject, String)> {
    let body = op(expr, ".")?;
    Some((subject(body.get("left")?)?, body.get("attr")?.as_str()?.to_owned()))
}

/// `subject.getTag("key")`
fn get_tag(expr: &Value) -> Option<(Subject, String)> {
    let body = op(expr, "getTag")?;
    Some((subject(body.get("left")?)?, string_literal(body.get("right")?)?))
}

fn check(expr: &Value) -> Option<Check> {
    if let Some(body) = op(expr, "has") {
        return Some(Check::Has(subject(body.get("left")?)?, body.get("attr")?.as_str()?.to_owned()));
    }
    for (name, equal) in [("==", true), ("!=", false)] {
        if let Some(body) = op(expr, name) {
            let (l, r) = (body.get("left")?, body.get("right")?);
            let ((s, attr), lit) = match (get_attr(l), string_literal(r)) {
                (Some(a), Some(lit)) => (a, lit),
                _ => (get_attr(r)?, string_literal(l)?),
            };
            return Some(Check::Eq(s, attr, lit, equal));
        }
    }
    if let Some(body) = op(expr, "contains") {
        let (l, lit) = (body.get("left")?, string_literal(body.get("right")?)?);
        if let Some((s, attr)) = get_attr(l) {
            return Some(Check::Contains(s, attr, lit));
        }
        let (s, key) = get_tag(l)?;
        return Some(Check::TagContains(s, key, lit));
    }
    if let Some(body) = op(expr, "hasTag") {
        return Some(Check::HasTag(subject(body.get("left")?)?, string_literal(body.get("right")?)?));
    }
    None
}

/// The conjuncts of `expr` in evaluation order.
fn conjuncts<'a>(expr: &'a Value, out: &mut Vec<&'a Value>) {
    match op(expr, "&&") {
        Some(body) => match (body.get("left"), body.get("right")) {
            (Some(l), Some(r)) => {
                conjuncts(l, out);
                conjuncts(r, out);
            }
            _ => out.push(expr),
        },
        None => out.push(expr),
    }
}

/// The decidable leading conjuncts of the leading `when` clauses of a
/// policy in JSON (EST) form.
fn leading_checks(est: &Value) -> Vec<Check> {
    let mut parts = Vec::new();
    let conditions = est
        .get("conditions")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for condition in conditions {
        if condition.get("kind").and_then(Value::as_str) != Some("when") {
            break;
        }
        match condition.get("body") {
            Some(body) => conjuncts(body, &mut parts),
            None => break,
        }
    }
    parts.iter().map_while(|p| check(p)).collect()
}

/// Which context fields a policy reads (`context.f`, `context has f`); any
/// other use of `context` counts as reading every field.
pub(crate) fn context_use(policy: &Policy) -> ContextUse {
    let Ok(est) = policy.to_json() else {
        return ContextUse::ALL;
    };
    let mut uses = ContextUse {
        now: false,
        source_ip: false,
    };
    walk(&est, &mut uses);
    uses
}

fn walk(v: &Value, uses: &mut ContextUse) {
    match v {
        Value::Object(obj) => {
            for key in [".", "has"] {
                if let Some(body) = op(v, key) {
                    let is_context = body
                        .get("left")
                        .and_then(|l| op(l, "Var"))
                        .and_then(Value::as_str)
                        == Some("context");
                    if is_context {
                        match body.get("attr").and_then(Value::as_str) {
                            Some("now") => uses.now = true,
                            Some("source_ip") => uses.source_ip = true,
                            Some(_) => {}
                            // `context has a.b`: the first name is what counts.
                            None => match body
                                .get("attr")
                                .and_then(Value::as_array)
                                .and_then(|a| a.first())
                                .and_then(Value::as_str)
                            {
                                Some("now") => uses.now = true,
                                Some("source_ip") => uses.source_ip = true,
                                Some(_) => {}
                                None => *uses = ContextUse::ALL,
                            },
                        }
                        return;
                    }
                }
            }
            if op(v, "Var").and_then(Value::as_str) == Some("context") {
                *uses = ContextUse::ALL;
                return;
            }
            for child in obj.values() {
                walk(child, uses);
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, uses);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn checks_of(text: &str) -> Vec<Check> {
        let policy = Policy::from_str(text).unwrap();
        Filter::new(&policy).checks
    }

    #[test]
    fn recognises_the_simple_leading_forms() {
        use Subject::{Principal as P, Resource as R};
        let checks = checks_of(
            r#"permit(principal, action, resource) when {
                principal has team && principal.team == "data" && "x" == resource.env
                && resource.env != "prod" && principal.groups.contains("g")
                && principal.hasTag("k") && principal.getTag("k").contains("v")
                && context.hour_utc > 3 && principal has role
            };"#,
        );
        assert_eq!(
            checks,
            [
                Check::Has(P, "team".into()),
                Check::Eq(P, "team".into(), "data".into(), true),
                Check::Eq(R, "env".into(), "x".into(), true),
                Check::Eq(R, "env".into(), "prod".into(), false),
                Check::Contains(P, "groups".into(), "g".into()),
                Check::HasTag(P, "k".into()),
                Check::TagContains(P, "k".into(), "v".into()),
            ],
            "stops at the first other form"
        );
        assert!(checks_of("forbid(principal, action, resource) when { principal has team };").is_empty());
        assert!(checks_of("permit(principal, action, resource) unless { principal has team };").is_empty());
        assert!(checks_of("permit(principal, action, resource) when { principal has team || true };").is_empty());
        assert_eq!(
            checks_of("permit(principal, action, resource) when { principal has team } when { principal has role };").len(),
            2
        );
    }

    #[test]
    fn finds_context_fields_read() {
        let uses = |text: &str| context_use(&Policy::from_str(text).unwrap());
        let none = ContextUse { now: false, source_ip: false };
        assert_eq!(uses("permit(principal, action, resource) when { context.hour_utc > 3 };"), none);
        assert_eq!(
            uses("permit(principal, action, resource) when { context has source_ip };"),
            ContextUse { now: false, source_ip: true }
        );
        assert_eq!(
            uses("permit(principal, action, resource) when { context.now > datetime(\"2025-01-01\") };"),
            ContextUse { now: true, source_ip: false }
        );
        assert_eq!(uses("permit(principal, action, resource) when { context == {} };"), ContextUse::ALL);
        assert_eq!(uses("permit(principal, action, resource) when { principal.team == \"context\" };"), none);
    }
}
