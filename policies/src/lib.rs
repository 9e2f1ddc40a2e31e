//! Postern access decisions.
//!
//! Today this crate holds the outlet's allow list: the explicit set of
//! identifiers that may open tunnels to a service. Decisions are plain
//! functions with no I/O, and the default is deny: an empty list admits
//! nobody. Attribute-based policies (Cedar) will replace the list as the
//! everyday mechanism; the [`Decision`] type is what every enforcement point
//! consumes either way.
#![forbid(unsafe_code)]

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
