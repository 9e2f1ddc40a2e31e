//! Evaluating the candidate policies of one request with Cedar's own
//! evaluator (`cedar-policy-core`), without the authorizer around it.
//!
//! `cedar_policy::Authorizer::is_authorized` evaluates every policy
//! *partially* (to allow unknowns), rebuilds each policy's condition from its
//! scope and clauses on every call, clones ids and annotations into a partial
//! response and then concretizes it: for two candidate policies that
//! bookkeeping cost several times the evaluation itself. Here only the
//! candidates are evaluated — policies whose scope the engine's index and
//! pre-filter matched exactly against the request (Postern entities have no
//! parents, so scope matching is plain comparison; see `prefilter`) — and of
//! each only its `when`/`unless` conditions, with [`Evaluator::interpret`],
//! the evaluator the authorizer calls, on entities and a context built
//! directly as Cedar values. Policies the pre-filter found wholly satisfied
//! are counted without evaluation. The combination rule is Cedar's: any
//! satisfied forbid denies, else any satisfied permit allows, else deny;
//! errors are collected (and the engine denies on any). A randomised test
//! compares every outcome with `Authorizer::is_authorized` over all the
//! policies.
//!
//! `cedar-policy-core` is Cedar's internal crate: its API may change between
//! releases, which is why both crates are pinned to one version.

use std::sync::Arc;

use cedar_policy_core::ast::{self, EntityUIDEntry, Literal, Value, ValueKind};
use cedar_policy_core::entities::Entities;
use cedar_policy_core::evaluator::Evaluator;
use cedar_policy_core::extensions::Extensions;

/// One loaded policy, ready to evaluate.
pub(crate) struct Compiled {
    /// The policy (for its slot environment, empty for static policies).
    policy: ast::Policy,
    /// Its `when` and `unless` clauses as one expression (none: always
    /// satisfied once the scope is).
    conditions: Option<Arc<ast::Expr>>,
    /// `forbid` rather than `permit`.
    forbid: bool,
    /// Its id as Cedar prints it in evaluation errors.
    id: String,
}

impl Compiled {
    pub(crate) fn new(policy: &cedar_policy::Policy) -> Self {
        let core: &ast::Policy = policy.as_ref();
        Compiled {
            conditions: core.non_scope_constraints_arc().cloned(),
            forbid: core.effect() == ast::Effect::Forbid,
            id: policy.id().to_string(),
            policy: core.clone(),
        }
    }
}

/// The outcome of evaluating some policies: indices of the satisfied
/// permits and forbids, and the evaluation errors (in Cedar's words).
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) permits: Vec<u32>,
    pub(crate) forbids: Vec<u32>,
    pub(crate) errors: Vec<String>,
}

impl Outcome {
    /// The outcome of `satisfied` (policy indices, ascending), known to be
    /// satisfied without evaluating them.
    pub(crate) fn of_satisfied(policies: &[Compiled], satisfied: &[u32]) -> Self {
        let mut outcome = Outcome::default();
        for &i in satisfied {
            match policies.get(i as usize) {
                Some(p) => outcome.satisfied(i, p),
                None => outcome.out_of_range(i),
            }
        }
        outcome
    }

    /// Records policy `i`, `p`, as satisfied.
    fn satisfied(&mut self, i: u32, p: &Compiled) {
        if p.forbid {
            self.forbids.push(i);
        } else {
            self.permits.push(i);
        }
    }

    fn out_of_range(&mut self, i: u32) {
        self.errors
            .push(format!("internal error: policy index {i} out of range"));
    }

    /// Cedar's decision: no satisfied forbid and at least one satisfied
    /// permit. (The engine also denies on any error.)
    pub(crate) fn allowed(&self) -> bool {
        self.forbids.is_empty() && !self.permits.is_empty()
    }

    /// The policies that decided, as Cedar reports them: the satisfied
    /// forbids when any, else the satisfied permits.
    pub(crate) fn determining(&self) -> &[u32] {
        if self.forbids.is_empty() {
            &self.permits
        } else {
            &self.forbids
        }
    }
}

/// The request as Cedar's evaluator takes it.
pub(crate) fn request(
    principal: &EntityUIDEntry,
    action: &EntityUIDEntry,
    resource: &EntityUIDEntry,
    context: ast::Context,
) -> ast::Request {
    ast::Request::new_unchecked(
        principal.clone(),
        action.clone(),
        resource.clone(),
        Some(context),
    )
}

/// A known entity uid as a request component.
pub(crate) fn known(uid: &cedar_policy::EntityUid) -> EntityUIDEntry {
    EntityUIDEntry::known(uid.clone().into(), None)
}

/// Evaluates `policies[i]` for each `i` of `candidates` (ascending, in
/// range; an index out of range is reported as an error), adding those of
/// `satisfied`, known to be satisfied. The scope of each candidate must admit
/// the request: it is not evaluated again.
pub(crate) fn evaluate(
    policies: &[Compiled],
    satisfied: &[u32],
    candidates: &[u32],
    request: ast::Request,
    entities: &Entities,
) -> Outcome {
    let evaluator = Evaluator::new(request, entities, Extensions::all_available());
    let mut outcome = Outcome::of_satisfied(policies, satisfied);
    for &i in candidates {
        let Some(p) = policies.get(i as usize) else {
            outcome.out_of_range(i);
            continue;
        };
        let value = match &p.conditions {
            Some(conditions) => evaluator.interpret(conditions, p.policy.env()),
            None => Ok(Value::from(true)),
        };
        match value {
            Ok(Value {
                value: ValueKind::Lit(Literal::Bool(satisfied)),
                ..
            }) => {
                if satisfied {
                    outcome.satisfied(i, p);
                }
            }
            // Validation guarantees a boolean; say so if it ever is not.
            Ok(other) => outcome.errors.push(format!(
                "error while evaluating policy `{}`: the condition gave {other}, not a boolean",
                p.id
            )),
            Err(e) => outcome
                .errors
                .push(format!("error while evaluating policy `{}`: {e}", p.id)),
        }
    }
    if !satisfied.is_empty() {
        // In policy order, as Cedar reports them.
        outcome.permits.sort_unstable();
        outcome.forbids.sort_unstable();
    }
    outcome
}

/// A context record of concrete values.
pub(crate) fn context(fields: Vec<(&'static str, Value)>) -> ast::Context {
    ast::Context::Value(Arc::new(
        fields.into_iter().map(|(k, v)| (k.into(), v)).collect(),
    ))
}

/// The value of a restricted expression, such as an extension constructor
/// (`ip("10.0.0.1")`), through Cedar's own evaluation.
pub(crate) fn value_of(expr: cedar_policy::RestrictedExpression) -> Result<Value, String> {
    let ctx = cedar_policy::Context::from_pairs([("v".to_owned(), expr)])
        .map_err(|e| format!("context: {e}"))?;
    match ctx.as_ref() {
        ast::Context::Value(fields) => fields
            .get("v")
            .cloned()
            .ok_or_else(|| "context: value missing".to_owned()),
        ast::Context::RestrictedResidual(_) => Err("context: value not concrete".to_owned()),
    }
}
