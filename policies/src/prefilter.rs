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
//! - the leading conjuncts of the leading `when` clauses are checked when
//!   they have one of a few simple forms on the principal or the resource —
//!   `has a`, `.a == "lit"` (either side), `.a != "lit"`,
//!   `.a.contains("lit")`, `.hasTag("k")`, `.getTag("k").contains("lit")` —
//!   read from the same [`View`] the Cedar entity is built from. A conjunct
//!   found false means Cedar would find the policy unsatisfied, without an
//!   error, before evaluating anything after it (`&&` stops at the first
//!   false operand; scope, then `when` clauses, are evaluated in order). The
//!   checks stop at the first conjunct of another form or whose outcome is not
//!   certain (for example an absent attribute, which Cedar reports as an
//!   error), leaving the policy to Cedar.
//! - When those conjuncts are the policy's whole condition (only `when`
//!   clauses, every conjunct of a decidable form) and all are true, Cedar
//!   would find the policy satisfied without an error: it is not evaluated
//!   at all.
//!
//! These rules apply to forbid policies too: skipping one wrongly would turn
//! a deny into an allow, so the model is kept to forms whose Cedar semantics
//! are exact string and set operations, and a randomised test compares every
//! shortcut decision with Cedar evaluating all policies.

use cedar_policy::{
    ActionConstraint, EntityTypeName, EntityUid, Policy, PrincipalConstraint, ResourceConstraint,
};
use serde_json::Value;

use crate::request::{AttrName, AttrRef, ContextUse, Referenced, View};

/// An entity a condition talks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Subject {
    Principal,
    Resource,
}

/// A conjunct the pre-filter can decide.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    /// `subject has attr`
    Has(Subject, AttrName),
    /// `subject.attr == "lit"`, or `!=` when the flag is false
    Eq(Subject, AttrName, String, bool),
    /// `subject.attr.contains("lit")`
    Contains(Subject, AttrName, String),
    /// `subject.hasTag("key")`
    HasTag(Subject, String),
    /// `subject.getTag("key").contains("lit")`
    TagContains(Subject, String, String),
}

/// The pre-filter of one policy.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    principal: EntityScope,
    /// Action ids admitted (`None`: any).
    actions: Option<Vec<String>>,
    resource: EntityScope,
    /// Leading conjuncts that can be decided here.
    checks: Vec<Check>,
    /// Whether `checks` are the policy's whole condition, so that all of
    /// them true means satisfied.
    whole: bool,
}

/// What the pre-filter says of one policy and request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Assessment {
    /// Cedar would find it unsatisfied, without an error.
    Unsatisfied,
    /// Cedar would find it satisfied, without an error.
    Satisfied,
    /// Only Cedar can tell.
    Evaluate,
}

/// A principal or resource scope constraint as plain strings. Postern
/// entities have no parents, so `in E` admits exactly `E`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EntityScope {
    /// Required entity type, from `is T`.
    ty: Option<String>,
    /// Required entity `(type, id)`, from `== E` or `in E`.
    uid: Option<(String, String)>,
}

impl EntityScope {
    fn new(ty: Option<&EntityTypeName>, uid: Option<&EntityUid>) -> Self {
        EntityScope {
            ty: ty.map(ToString::to_string),
            uid: uid.map(|u| (u.type_name().to_string(), u.id().unescaped().to_owned())),
        }
    }

    fn admits(&self, ty: &str, id: &str) -> bool {
        self.ty.as_deref().is_none_or(|t| t == ty)
            && self.uid.as_ref().is_none_or(|(t, i)| i == id && t == ty)
    }
}

/// The request as the pre-filter sees it.
pub(crate) struct Target<'a> {
    /// Principal entity type and id.
    pub(crate) principal: (&'a str, &'a str),
    /// Action id.
    pub(crate) action: &'a str,
    /// Resource entity type and id.
    pub(crate) resource: (&'a str, &'a str),
    pub(crate) principal_view: &'a View<'a>,
    pub(crate) resource_view: &'a View<'a>,
}

impl Filter {
    /// The filter of a (static, validated) policy.
    pub(crate) fn new(policy: &Policy) -> Self {
        let (checks, whole) = policy
            .to_json()
            .map(|est| leading_checks(&est))
            .unwrap_or_default();
        let principal = match policy.principal_constraint() {
            PrincipalConstraint::Any => EntityScope::new(None, None),
            PrincipalConstraint::Eq(e) | PrincipalConstraint::In(e) => {
                EntityScope::new(None, Some(&e))
            }
            PrincipalConstraint::Is(t) => EntityScope::new(Some(&t), None),
            PrincipalConstraint::IsIn(t, e) => EntityScope::new(Some(&t), Some(&e)),
        };
        let resource = match policy.resource_constraint() {
            ResourceConstraint::Any => EntityScope::new(None, None),
            ResourceConstraint::Eq(e) | ResourceConstraint::In(e) => {
                EntityScope::new(None, Some(&e))
            }
            ResourceConstraint::Is(t) => EntityScope::new(Some(&t), None),
            ResourceConstraint::IsIn(t, e) => EntityScope::new(Some(&t), Some(&e)),
        };
        // Action ids of another type than `Action` cannot occur in a
        // validated policy; keeping only ids of `Action` would be as exact.
        let action_id = |e: &EntityUid| {
            if e.type_name().to_string() == "Action" {
                e.id().unescaped().to_owned()
            } else {
                String::new()
            }
        };
        let actions = match policy.action_constraint() {
            ActionConstraint::Any => None,
            ActionConstraint::Eq(e) => Some(vec![action_id(&e)]),
            ActionConstraint::In(es) => Some(es.iter().map(action_id).collect()),
        };
        Filter {
            principal,
            actions,
            resource,
            checks,
            whole,
        }
    }

    /// Whether the scope admits action `id`.
    pub(crate) fn admits_action(&self, id: &str) -> bool {
        self.actions
            .as_ref()
            .is_none_or(|a| a.iter().any(|x| x == id))
    }

    /// The one resource `(type, id)` the scope admits, if it names one.
    pub(crate) fn resource(&self) -> Option<(&str, &str)> {
        self.resource
            .uid
            .as_ref()
            .map(|(t, i)| (t.as_str(), i.as_str()))
    }

    /// What Cedar would find for `t`, when the pre-filter can tell.
    pub(crate) fn assess(&self, t: &Target<'_>) -> Assessment {
        if !(self.principal.admits(t.principal.0, t.principal.1)
            && self.admits_action(t.action)
            && self.resource.admits(t.resource.0, t.resource.1))
        {
            return Assessment::Unsatisfied;
        }
        for check in &self.checks {
            match evaluate(check, t) {
                Some(true) => continue,
                Some(false) => return Assessment::Unsatisfied,
                None => return Assessment::Evaluate,
            }
        }
        if self.whole {
            Assessment::Satisfied
        } else {
            Assessment::Evaluate
        }
    }
}

/// A leading check that many policies share but for its literal, such as
/// `principal has team && principal.team == "…"`: policies can be grouped by
/// it, and a request's attribute value picks the few of a group that pass it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct GroupKey {
    subject: Subject,
    /// The attribute (`Some`), or tag key.
    attr: Option<AttrName>,
    tag: String,
    /// `contains` rather than `==` (always `contains` for tags).
    contains: bool,
    /// Preceded by `has` / `hasTag` of the same name.
    guarded: bool,
}

/// Which policies of a group pass its key check for a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Selection<'a> {
    /// None of them.
    Nothing,
    /// Those keyed by one of these values (whose literal equals the value,
    /// or is an element of it).
    Values(Vec<&'a str>),
    /// Maybe all of them: the pre-filter must look at each.
    All,
}

impl Filter {
    /// The group key and literal of this policy, when its checks start with
    /// a groupable check (optionally after the `has` that guards it).
    pub(crate) fn group(&self) -> Option<(GroupKey, &str)> {
        let (guarded, check) = match (self.checks.first()?, self.checks.get(1)) {
            (
                Check::Has(s, a),
                Some(next @ (Check::Eq(s2, a2, _, true) | Check::Contains(s2, a2, _))),
            ) if s == s2 && a == a2 => (true, next),
            (Check::HasTag(s, k), Some(next @ Check::TagContains(s2, k2, _)))
                if s == s2 && k == k2 =>
            {
                (true, next)
            }
            (first, _) => (false, first),
        };
        let (subject, attr, tag, contains, lit) = match check {
            Check::Eq(s, a, lit, true) => (*s, Some(a.clone()), String::new(), false, lit),
            Check::Contains(s, a, lit) => (*s, Some(a.clone()), String::new(), true, lit),
            Check::TagContains(s, k, lit) => (*s, None, k.clone(), true, lit),
            _ => return None,
        };
        Some((
            GroupKey {
                subject,
                attr,
                tag,
                contains,
                guarded,
            },
            lit.as_str(),
        ))
    }
}

impl GroupKey {
    /// Which policies of the group can pass its key check for `t`: exactly
    /// those the check (and its guard) would not find false.
    pub(crate) fn select<'t>(&self, t: &'t Target<'_>) -> Selection<'t> {
        let view = match self.subject {
            Subject::Principal => t.principal_view,
            Subject::Resource => t.resource_view,
        };
        let absent = if self.guarded {
            // `has` is false: the policy is not satisfied.
            Selection::Nothing
        } else {
            // Cedar would report the missing attribute or tag.
            Selection::All
        };
        match &self.attr {
            Some(attr) => match (view.attr_at(attr), self.contains) {
                (None, _) => absent,
                (Some(AttrRef::Str(v)), false) => Selection::Values(vec![v]),
                (Some(AttrRef::Set(vs)), true) => Selection::Values(vs.to_vec()),
                // A value of the other shape: Cedar decides (a type error).
                (Some(_), _) => Selection::All,
            },
            None => match view.tag(&self.tag) {
                None => absent,
                Some(values) => Selection::Values(values.values().collect()),
            },
        }
    }
}

/// `Some(outcome)` when certain, `None` when Cedar must decide (including
/// when it would fail).
fn evaluate(check: &Check, t: &Target<'_>) -> Option<bool> {
    let view = |s: &Subject| match s {
        Subject::Principal => t.principal_view,
        Subject::Resource => t.resource_view,
    };
    match check {
        Check::Has(s, attr) => Some(view(s).attr_at(attr).is_some()),
        Check::Eq(s, attr, lit, equal) => match view(s).attr_at(attr)? {
            AttrRef::Str(v) => Some((v == lit) == *equal),
            AttrRef::Set(_) => None,
        },
        Check::Contains(s, attr, lit) => match view(s).attr_at(attr)? {
            AttrRef::Set(vs) => Some(vs.contains(&lit.as_str())),
            AttrRef::Str(_) => None,
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
fn get_attr(expr: &Value) -> Option<(Subject, AttrName)> {
    let body = op(expr, ".")?;
    Some((
        subject(body.get("left")?)?,
        AttrName::new(body.get("attr")?.as_str()?),
    ))
}

/// `subject.getTag("key")`
fn get_tag(expr: &Value) -> Option<(Subject, String)> {
    let body = op(expr, "getTag")?;
    Some((
        subject(body.get("left")?)?,
        string_literal(body.get("right")?)?,
    ))
}

fn check(expr: &Value) -> Option<Check> {
    if let Some(body) = op(expr, "has") {
        return Some(Check::Has(
            subject(body.get("left")?)?,
            AttrName::new(body.get("attr")?.as_str()?),
        ));
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
        return Some(Check::HasTag(
            subject(body.get("left")?)?,
            string_literal(body.get("right")?)?,
        ));
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
/// Also says whether they are the whole condition: every clause a `when`,
/// every conjunct decidable.
fn leading_checks(est: &Value) -> (Vec<Check>, bool) {
    let mut parts = Vec::new();
    let conditions = est
        .get("conditions")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let mut whole = true;
    for condition in conditions {
        if condition.get("kind").and_then(Value::as_str) != Some("when") {
            whole = false;
            break;
        }
        match condition.get("body") {
            Some(body) => conjuncts(body, &mut parts),
            None => {
                whole = false;
                break;
            }
        }
    }
    let checks: Vec<Check> = parts.iter().map_while(|p| check(p)).collect();
    let whole = whole && checks.len() == parts.len();
    (checks, whole)
}

/// Which context fields a policy reads (`context.f`, `context has f`); any
/// other use of `context` counts as reading every field.
pub(crate) fn context_use(policy: &Policy) -> ContextUse {
    let Ok(est) = policy.to_json() else {
        return ContextUse::ALL;
    };
    let mut uses = ContextUse::NONE;
    visit_objects(&est, &mut |node| {
        for key in [".", "has"] {
            let Some(body) = op(node, key) else { continue };
            let on_context = body
                .get("left")
                .and_then(|l| op(l, "Var"))
                .and_then(Value::as_str)
                == Some("context");
            if on_context {
                // `context has a.b`: the first name is the context field.
                let attr = body.get("attr");
                let name = attr.and_then(Value::as_str).or_else(|| {
                    attr.and_then(Value::as_array)
                        .and_then(|a| a.first())
                        .and_then(Value::as_str)
                });
                match name {
                    Some(name) => uses.mark(name),
                    None => uses = ContextUse::ALL,
                }
                return false;
            }
        }
        if op(node, "Var").and_then(Value::as_str) == Some("context") {
            uses = ContextUse::ALL;
            return false;
        }
        true
    });
    uses
}

/// The attribute names and tag keys a policy can read (a superset: every
/// name after `.` or `has`, on any entity or record; every literal tag key;
/// all tags when a key is not a literal).
pub(crate) fn referenced(policy: &Policy) -> Referenced {
    let Ok(est) = policy.to_json() else {
        return Referenced::all();
    };
    let mut found = Referenced::none();
    visit_objects(&est, &mut |node| {
        for key in [".", "has"] {
            match op(node, key).and_then(|body| body.get("attr")) {
                None => {}
                Some(Value::String(name)) => found.attr(name),
                // `has a.b.c`
                Some(Value::Array(names)) => {
                    for name in names {
                        match name.as_str() {
                            Some(name) => found.attr(name),
                            None => found = Referenced::all(),
                        }
                    }
                }
                Some(_) => found = Referenced::all(),
            }
        }
        for key in ["getTag", "hasTag"] {
            if let Some(body) = op(node, key) {
                match body.get("right").and_then(string_literal) {
                    Some(tag) => found.tag(&tag),
                    None => found.all_tags(),
                }
            }
        }
        true
    });
    found
}

/// Calls `visit` on every object of a policy's JSON form, parents first,
/// and goes on into the children of those it returns `true` for.
fn visit_objects(v: &Value, visit: &mut impl FnMut(&Value) -> bool) {
    match v {
        Value::Object(obj) if visit(v) => {
            for child in obj.values() {
                visit_objects(child, visit);
            }
        }
        Value::Array(items) => {
            for item in items {
                visit_objects(item, visit);
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
        assert_eq!(
            checks_of("forbid(principal, action, resource) when { principal has team };").len(),
            1
        );
        assert!(
            checks_of("permit(principal, action, resource) unless { principal has team };")
                .is_empty()
        );
        assert!(checks_of(
            "permit(principal, action, resource) when { principal has team || true };"
        )
        .is_empty());
        assert_eq!(
            checks_of("permit(principal, action, resource) when { principal has team } when { principal has role };").len(),
            2
        );
    }

    #[test]
    fn knows_when_the_checks_are_the_whole_condition() {
        let whole = |text: &str| Filter::new(&Policy::from_str(text).unwrap()).whole;
        assert!(whole("permit(principal, action, resource);"));
        assert!(whole(
            "permit(principal, action, resource) when { principal has team && principal.team == \"a\" };"
        ));
        assert!(whole(
            "permit(principal, action, resource) when { principal has team } when { resource.hasTag(\"x\") };"
        ));
        assert!(!whole(
            "permit(principal, action, resource) when { principal has team && context.hour_utc > 3 };"
        ));
        assert!(!whole(
            "permit(principal, action, resource) when { principal has team } unless { principal has role };"
        ));
        assert!(!whole("permit(principal, action, resource) when { true };"));
    }

    #[test]
    fn finds_attributes_and_tags_read() {
        let of = |text: &str| referenced(&Policy::from_str(text).unwrap());
        let r = of(r#"permit(principal, action, resource) when {
            principal has team && principal.role == "x" && resource["env"] == "y"
            && principal.getTag("dept").contains("z") && !resource.hasTag("class")
            && context has source_ip && Identity::"P1".email == "e"
        };"#);
        for name in ["team", "role", "env", "source_ip", "email"] {
            assert!(r.has_attr(name), "{name}");
        }
        assert!(!r.has_attr("groups") && !r.has_attr("dept"));
        assert!(r.has_tag("dept") && r.has_tag("class") && !r.has_tag("team"));
        let dynamic = of(r#"permit(principal, action, resource) when {
            principal has role && principal.hasTag(principal.role)
        };"#);
        assert!(dynamic.has_tag("anything") && !dynamic.has_attr("team"));
        let nothing = of("permit(principal, action, resource);");
        assert!(!nothing.has_attr("team") && !nothing.has_tag("team"));
    }

    #[test]
    fn finds_context_fields_read() {
        let uses = |text: &str| context_use(&Policy::from_str(text).unwrap());
        let none = ContextUse::NONE;
        assert_eq!(
            uses("permit(principal, action, resource) when { context.hour_utc > 3 };"),
            ContextUse {
                hour_utc: true,
                ..none
            }
        );
        assert_eq!(
            uses("permit(principal, action, resource) when { context has source_ip };"),
            ContextUse {
                source_ip: true,
                ..none
            }
        );
        assert_eq!(
            uses("permit(principal, action, resource) when { context.now > datetime(\"2025-01-01\") && context[\"relay\"] == \"x\" };"),
            ContextUse { now: true, relay: true, ..none }
        );
        assert_eq!(
            uses("permit(principal, action, resource) when { context == {} };"),
            ContextUse::ALL
        );
        assert_eq!(
            uses("permit(principal, action, resource) when { principal.team == \"context\" };"),
            none
        );
        assert_eq!(uses("permit(principal, action, resource);"), none);
    }
}
