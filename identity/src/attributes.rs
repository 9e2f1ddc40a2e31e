//! Attributes: what an authority vouches for about an identity (`team`,
//! `role`, `groups`, …). They travel inside credentials and become the
//! principal's attributes in access policies.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One attribute value: a single string or a list of strings (for example
/// the `groups` claim of an OIDC login).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttrValue {
    /// A single string, such as `role = "analyst"`.
    One(String),
    /// A list of strings, such as `groups = ["analysts", "oncall"]`.
    Many(Vec<String>),
}

impl AttrValue {
    /// The values as a slice-like iterator (one element for [`AttrValue::One`]).
    pub fn values(&self) -> impl Iterator<Item = &str> {
        let (one, many) = match self {
            AttrValue::One(v) => (Some(v.as_str()), [].iter()),
            AttrValue::Many(vs) => (None, vs.iter()),
        };
        one.into_iter().chain(many.map(String::as_str))
    }

    /// Whether `value` is this value or one of its elements.
    pub fn contains(&self, value: &str) -> bool {
        self.values().any(|v| v == value)
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::One(v) => f.write_str(v),
            AttrValue::Many(vs) => write!(f, "[{}]", vs.join(", ")),
        }
    }
}

/// Attribute name → value, ordered so that encodings are deterministic.
pub type Attributes = BTreeMap<String, AttrValue>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_contains() {
        let one = AttrValue::One("analyst".into());
        let many = AttrValue::Many(vec!["a".into(), "b".into()]);
        assert_eq!(one.values().collect::<Vec<_>>(), ["analyst"]);
        assert_eq!(many.values().collect::<Vec<_>>(), ["a", "b"]);
        assert!(many.contains("b") && !many.contains("c"));
        assert_eq!(many.to_string(), "[a, b]");
    }
}
