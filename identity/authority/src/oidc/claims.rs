//! Claims → attributes, by the rules documented on [`OidcConfig`].

use serde_json::{Map, Value};

use super::{OidcConfig, OidcError};
use postern_identity::{AttrValue, Attributes};

/// Longest piece of untrusted text quoted in an error message.
const MAX_QUOTED: usize = 120;

/// Quotes untrusted text for an error message: escaped, and shortened.
pub(crate) fn quote(text: &str) -> String {
    if text.chars().count() <= MAX_QUOTED {
        format!("{text:?}")
    } else {
        let short: String = text.chars().take(MAX_QUOTED).collect();
        format!("{short:?}…")
    }
}

/// Maps the claims of a verified ID token to the human-readable name and
/// the attributes, by the configuration's rules (see [`OidcConfig`]). Also
/// applies `allowed_email_domains` and `allowed_groups`. A plain function
/// over JSON, so the rules can be tested and fuzzed without a provider.
pub fn map_claims(
    config: &OidcConfig,
    subject: &str,
    claims: &Map<String, Value>,
) -> Result<(String, Attributes), OidcError> {
    check_email_domain(config, claims)?;
    check_groups(config, claims)?;

    // An e-mail address names the person only when the provider verified
    // it: otherwise anyone may have typed it into their profile.
    let usable = |claim: &str| match claims.get(claim) {
        Some(Value::String(s)) if !s.is_empty() => {
            if claim == "email" && !email_verified(claims) {
                Err(s)
            } else {
                Ok(Some(s.clone()))
            }
        }
        _ => Ok(None),
    };
    let name = match config.name_claim() {
        Some(claim) => match usable(claim) {
            Ok(Some(name)) => name,
            Ok(None) => return Err(OidcError::NameClaimMissing(claim.to_string())),
            Err(unverified) => return Err(OidcError::EmailNotVerified(quote(unverified))),
        },
        None => OidcConfig::default_name_claims()
            .iter()
            .find_map(|c| usable(c).ok().flatten())
            .unwrap_or_else(|| subject.to_string()),
    };

    let mut attributes = Attributes::new();
    for (attribute, claim) in config.claims() {
        let fail = |reason: &str| OidcError::Claim {
            claim: claim.clone(),
            attribute: attribute.clone(),
            reason: reason.to_string(),
        };
        let value = match claims.get(claim) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(items)) => {
                let mut values = Vec::with_capacity(items.len());
                for item in items {
                    values.push(scalar(item).ok_or_else(|| {
                        fail("is a list holding something other than strings, numbers and booleans; only those can become attribute values")
                    })?);
                }
                AttrValue::Many(values)
            }
            Some(Value::Object(_)) => {
                return Err(fail(
                    "is a JSON object; only strings, numbers, booleans and lists of those can become attributes",
                ))
            }
            Some(other) => AttrValue::One(
                scalar(other).ok_or_else(|| fail("has an unsupported type"))?,
            ),
        };
        attributes.insert(attribute.clone(), value);
    }
    crate::authority::check_attributes(&attributes)
        .map_err(|e| OidcError::Attributes(e.to_string()))?;
    Ok((name, attributes))
}

/// A string, number or boolean as text.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether the provider says it verified the `email` claim (`true`, or the
/// string `"true"` some providers send).
fn email_verified(claims: &Map<String, Value>) -> bool {
    match claims.get("email_verified") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

fn check_groups(config: &OidcConfig, claims: &Map<String, Value>) -> Result<(), OidcError> {
    let allowed = config.allowed_groups();
    if allowed.is_empty() {
        return Ok(());
    }
    let claim = config.groups_claim();
    let held: Vec<&str> = match claims.get(claim) {
        Some(Value::String(g)) => vec![g.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if held.iter().any(|g| allowed.iter().any(|a| a == g)) {
        return Ok(());
    }
    Err(OidcError::GroupNotAllowed(format!(
        "the ID token's {claim:?} claim holds none of the groups this authority admits ({}){}: ask the admin to add you to one of them at the provider",
        allowed.join(", "),
        if held.is_empty() {
            format!(" (it has no such claim: request the scope that carries {claim:?})")
        } else {
            String::new()
        }
    )))
}

fn check_email_domain(config: &OidcConfig, claims: &Map<String, Value>) -> Result<(), OidcError> {
    let allowed = config.allowed_email_domains();
    if allowed.is_empty() {
        return Ok(());
    }
    let refuse = |why: String| Err(OidcError::EmailNotAllowed(why));
    let email = match claims.get("email") {
        Some(Value::String(e)) => e,
        _ => {
            return refuse(
                "the ID token has no email claim, and `allowed_email_domains` is set in the authority's [oidc] configuration: request the `email` scope".into(),
            )
        }
    };
    if !email_verified(claims) {
        return refuse(format!(
            "the e-mail address {} is not verified by the provider, and `allowed_email_domains` admits only verified addresses",
            quote(email)
        ));
    }
    let domain = email
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default();
    if allowed.contains(&domain) {
        Ok(())
    } else {
        refuse(format!(
            "e-mail address {} is not in an allowed domain ({}): ask the admin to add the domain to `allowed_email_domains`",
            quote(email),
            allowed.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(extra: &str) -> OidcConfig {
        OidcConfig::from_toml(&format!(
            "issuer_url = \"https://id.example.com\"\nclient_id = \"p\"\n{extra}"
        ))
        .expect("valid config")
    }

    fn claims(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn lists_strings_numbers_and_booleans_map() {
        let c = config(
            "[claims]\ngroups = \"groups\"\nteam = \"team\"\nlevel = \"lvl\"\nmfa = \"mfa\"\nmissing = \"nope\"\nnull = \"nil\"\n",
        );
        let (name, attrs) = map_claims(
            &c,
            "sub-1",
            &claims(json!({
                "email": "a@example.com", "email_verified": true,
                "groups": ["x", "y", 3, true], "team": "t",
                "lvl": 7, "mfa": false, "nil": null
            })),
        )
        .expect("maps");
        assert_eq!(name, "a@example.com");
        assert_eq!(
            attrs.get("groups"),
            Some(&AttrValue::Many(vec![
                "x".into(),
                "y".into(),
                "3".into(),
                "true".into()
            ]))
        );
        assert_eq!(attrs.get("team"), Some(&AttrValue::One("t".into())));
        assert_eq!(attrs.get("level"), Some(&AttrValue::One("7".into())));
        assert_eq!(attrs.get("mfa"), Some(&AttrValue::One("false".into())));
        assert!(!attrs.contains_key("missing") && !attrs.contains_key("null"));
    }

    #[test]
    fn objects_and_nested_lists_are_refused_naming_the_claim() {
        let c = config("[claims]\naddr = \"address\"\n");
        let err = map_claims(&c, "s", &claims(json!({"address": {"street": "x"}})))
            .expect_err("object refused")
            .to_string();
        assert!(
            err.contains("\"address\"") && err.contains("object"),
            "{err}"
        );
        let err = map_claims(&c, "s", &claims(json!({"address": [["x"]]})))
            .expect_err("nested refused")
            .to_string();
        assert!(err.contains("list"), "{err}");
    }

    #[test]
    fn an_unverified_email_does_not_name_anyone() {
        let c = config("");
        let name = |v| map_claims(&c, "the-sub", &claims(v)).expect("maps").0;
        assert_eq!(
            name(
                json!({"email": "ceo@example.com", "email_verified": true, "preferred_username": "al"})
            ),
            "ceo@example.com"
        );
        assert_eq!(
            name(json!({"email": "ceo@example.com", "email_verified": "true"})),
            "ceo@example.com"
        );
        // Unverified, or not said: the next claim, or the subject.
        for verified in [json!(false), json!("false"), json!(null), json!("yes")] {
            assert_eq!(
                name(
                    json!({"email": "ceo@example.com", "email_verified": verified, "preferred_username": "mallory"})
                ),
                "mallory"
            );
        }
        assert_eq!(name(json!({"email": "ceo@example.com"})), "the-sub");
        // Named explicitly: refused, with the reason.
        let c = config("name_claim = \"email\"");
        let err = map_claims(
            &c,
            "s",
            &claims(json!({"email": "ceo@example.com", "email_verified": false})),
        )
        .expect_err("unverified");
        assert!(
            matches!(err, OidcError::EmailNotVerified(_))
                && err.to_string().contains("not verified"),
            "{err}"
        );
    }

    #[test]
    fn allowed_groups() {
        let c = config("allowed_groups = [\"postern-users\", \"dba\"]");
        let ok = |v| map_claims(&c, "s", &claims(v));
        assert!(ok(json!({"groups": ["x", "dba"]})).is_ok());
        assert!(ok(json!({"groups": "postern-users"})).is_ok());
        for bad in [
            json!({"groups": ["x"]}),
            json!({}),
            json!({"groups": [["dba"]]}),
        ] {
            let err = ok(bad.clone()).expect_err("refused");
            assert!(matches!(err, OidcError::GroupNotAllowed(_)), "{bad}: {err}");
        }
        let c = config("allowed_groups = [\"dba\"]\ngroups_claim = \"roles\"");
        assert!(map_claims(&c, "s", &claims(json!({"roles": ["dba"]}))).is_ok());
        assert!(map_claims(&c, "s", &claims(json!({"groups": ["dba"]}))).is_err());
    }

    #[test]
    fn name_rule() {
        let c = config("");
        let name = |v| map_claims(&c, "the-sub", &claims(v)).expect("maps").0;
        assert_eq!(
            name(json!({"preferred_username": "al", "name": "Al"})),
            "al"
        );
        assert_eq!(name(json!({"name": "Al"})), "Al");
        assert_eq!(name(json!({"email": 5})), "the-sub");
        let c = config("name_claim = \"upn\"");
        assert_eq!(
            map_claims(&c, "s", &claims(json!({"upn": "al@corp"})))
                .expect("maps")
                .0,
            "al@corp"
        );
        let err = map_claims(&c, "s", &claims(json!({"email": "x@y"}))).expect_err("missing");
        assert!(matches!(err, OidcError::NameClaimMissing(_)), "{err}");
    }

    #[test]
    fn email_domains() {
        let c = config("allowed_email_domains = [\"example.com\"]");
        let ok = |v| map_claims(&c, "s", &claims(v));
        assert!(ok(json!({"email": "a@EXAMPLE.com", "email_verified": true})).is_ok());
        assert!(ok(json!({"email": "a@example.com", "email_verified": "true"})).is_ok());
        for bad in [
            json!({"email": "a@example.com"}),
            json!({"email": "a@example.com", "email_verified": false}),
            json!({"email": "a@evil.com", "email_verified": true}),
            json!({"email": "a@example.com.evil.com", "email_verified": true}),
            json!({}),
        ] {
            let err = ok(bad.clone()).expect_err("refused");
            assert!(matches!(err, OidcError::EmailNotAllowed(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn oversized_values_are_refused() {
        let c = config("[claims]\ng = \"groups\"\n");
        let huge = "x".repeat(5000);
        let err = map_claims(&c, "s", &claims(json!({"groups": [huge]}))).expect_err("too long");
        assert!(matches!(err, OidcError::Attributes(_)), "{err}");
    }

    #[test]
    fn quote_escapes_and_shortens() {
        assert_eq!(quote("a\nb"), "\"a\\nb\"");
        assert!(quote(&"y".repeat(500)).ends_with('…'));
    }
}
