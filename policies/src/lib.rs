//! Postern access decisions: Cedar policies, the allow list, admin tooling
//! and the tamper-evident audit log.
//!
//! - [`PolicyEngine`] loads `*.cedar` files, validates them against the
//!   Postern schema ([`SCHEMA`]) and decides requests ([`PolicyEngine::decide`]).
//!   Default deny: no policies means nothing is permitted, and an evaluation
//!   error in any policy turns the decision into a deny.
//! - [`AllowList`] is the outlet's simple list of admitted identifiers.
//! - [`validate`], [`run_cases`] and [`explain`] back the
//!   `postern policy validate|test|explain` commands and return printable
//!   reports.
//! - [`audit`] writes and verifies the hash-chained audit log: one writer
//!   thread per log (group commit, file lock, rotation, fail-closed
//!   admission, signed checkpoints).
//! - [`fuzzing`] holds the entry points of the `policy_text` and
//!   `audit_line` fuzz targets.
//! - [`LivePolicies`] holds the policies a node enforces and swaps in a
//!   policy directory's new contents when they are valid
//!   ([`LivePolicies::reload_if_changed`]); broken files keep the old ones.
//!
//! What this crate does not do: networking, watching files for changes, or
//! deciding when to re-evaluate live tunnels. Its only I/O is reading policy
//! and cases files, and the audit log (each open log has a writer thread
//! that appends to it; verification reads it); decision time is passed in
//! by the caller ([`RequestContext::time`]).
//!
//! # The schema
//!
//! Namespace-free, so policies write `Action::"connect"`,
//! `Service::"db-prod"` and `Identity::"P…"`. See [`SCHEMA`] for the text.
//!
//! - Principal `Identity`: `identifier` (always), optional `team`, `role`,
//!   `name`, `email` (strings) and `groups` (set of strings) from credentials,
//!   and **every** credential attribute as a tag holding a set of strings:
//!   `principal.hasTag("dept") && principal.getTag("dept").contains("x")`.
//! - Resource `Service`: `name` (always), optional `env`, `team`, `owner`,
//!   `tier`, `region`, and every outlet-declared attribute as a tag.
//! - Actions `connect` and `register`.
//! - Context: `time` (Unix seconds), `now` (datetime), `hour_utc`,
//!   `weekday` (1 = Monday … 7 = Sunday), and, when known, `source_ip`
//!   (ipaddr, relay-asserted), `relay` and `credential_expires`.
//!
//! # Cost
//!
//! A decision takes a few microseconds and is made once per tunnel (and on
//! policy changes and renewals), never per packet. What keeps it small:
//!
//! - **Only the policies that can apply reach Cedar.** Their scope (action,
//!   service, principal) is matched exactly from an index; policies that
//!   differ only in the literal of a leading attribute test (`team == "…"`,
//!   `groups.contains("…")`, `getTag("k").contains("…")`) are grouped, and
//!   the request's value picks the few that can pass; simple leading
//!   conditions (`has`, `==`, `!=`, `contains`, `hasTag`,
//!   `getTag(…).contains`) are then checked without Cedar. A policy whose
//!   whole condition is such tests, all true, is satisfied without Cedar.
//! - **Cedar's evaluator, not its authorizer.** The candidates are evaluated
//!   with `cedar-policy-core`'s `Evaluator` on each policy's conditions,
//!   built once at load; the authorizer's partial evaluation and response
//!   bookkeeping cost several times the evaluation itself.
//! - **Values built once.** Entities are built as Cedar values from the
//!   attributes policies can read (Cedar cannot list the others), and kept
//!   per principal–service pair together with its candidate policies; a
//!   service's entity is shared by all principals. Context fields that no
//!   candidate reads are not built (`now` and `source_ip` are the costly
//!   ones, and their values are cached).
//!
//! A randomised test compares every shortcut with `cedar_policy::Authorizer`
//! evaluating all policies on schema-checked input. Policies cost least when
//! they name their action and service in the scope and start with attribute
//! tests. `cargo bench --bench policy` measures it (BENCHMARKS.md).
//!
//! # Limits
//!
//! Policy files of at most [`MAX_POLICY_FILE_BYTES`], [`MAX_POLICY_FILES`] per
//! directory, brackets nested at most [`MAX_NESTING_DEPTH`] deep and at most
//! [`MAX_POLICY_OPERATORS`] operators per policy: Cedar's parser recurses
//! without a guard, and these bounds keep every accepted policy within an
//! ordinary 2 MiB thread stack.
#![forbid(unsafe_code)]

pub mod audit;
mod cases;
mod diagnostics;
mod engine;
mod eval;
pub mod fuzzing;
mod live;
mod prefilter;
mod request;
mod scan;
mod time;

pub use cases::{
    attrs_from_flags, explain, run_cases, BadAttrFlag, Case, CaseContext, CaseOutcome,
    CasePrincipal, CaseTime, CasesError, CasesFile, CasesReport, Expect, Explanation,
    DEFAULT_CASE_IDENTIFIER, DEFAULT_CASE_TIME, MAX_CASES_FILE_BYTES,
};
pub use diagnostics::{Diagnostic, DiagnosticKind, Diagnostics};
pub use engine::{
    read_policy_dir, validate, PolicyDecision, PolicyEffect, PolicyEngine, PolicyError, PolicyInfo,
    PolicySource, ValidateReport, MAX_POLICY_FILES, MAX_POLICY_FILE_BYTES, MAX_POLICY_TOTAL_BYTES,
    SCHEMA,
};
pub use live::{LivePolicies, ReloadOutcome};
pub use request::{AccessRequest, Action, BadAction, Principal, RequestContext, Service};
pub use scan::{MAX_NESTING_DEPTH, MAX_POLICY_OPERATORS, MAX_POLICY_TOKENS};

use std::collections::BTreeSet;
use std::fmt;

use postern_identity::wire::ServiceName;
use postern_identity::Identifier;

/// The outcome of an access check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Access granted.
    Allow,
    /// Access refused.
    Deny {
        /// Why, in words the requesting user may see (no secrets).
        reason: String,
    },
}

impl Decision {
    /// Whether access was granted.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Identifiers admitted to connect. Empty means nobody.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    allowed: BTreeSet<Identifier>,
}

impl AllowList {
    /// A list admitting exactly `ids`.
    pub fn new(ids: impl IntoIterator<Item = Identifier>) -> Self {
        AllowList {
            allowed: ids.into_iter().collect(),
        }
    }

    /// Whether the list admits nobody.
    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }

    /// Number of admitted identities.
    pub fn len(&self) -> usize {
        self.allowed.len()
    }

    /// May `principal` open a tunnel to `service`?
    pub fn decide_connect(&self, principal: &Identifier, service: &ServiceName) -> Decision {
        if self.allowed.contains(principal) {
            Decision::Allow
        } else if self.allowed.is_empty() {
            Decision::Deny {
                reason: format!("the outlet of \"{service}\" admits no identities (default deny); its operator must add --allow {principal}"),
            }
        } else {
            Decision::Deny {
                reason: format!("identity {principal} is not on the allow list of \"{service}\"; ask its operator to add --allow {principal}"),
            }
        }
    }
}

impl fmt::Debug for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(&self.allowed).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_identity::Identity;

    #[test]
    fn default_deny_and_membership() {
        let svc: ServiceName = "db".parse().unwrap();
        let (a, b) = (
            Identity::generate().identifier(),
            Identity::generate().identifier(),
        );
        let empty = AllowList::default();
        let d = empty.decide_connect(&a, &svc);
        assert!(!d.is_allowed());
        assert!(matches!(&d, Decision::Deny { reason } if reason.contains("default deny")));
        let list = AllowList::new([a]);
        assert!(list.decide_connect(&a, &svc).is_allowed());
        let d = list.decide_connect(&b, &svc);
        assert!(
            matches!(&d, Decision::Deny { reason } if reason.contains(&b.to_string()) && reason.contains("not on the allow list"))
        );
    }
}
