//! The authority's `[oidc]` configuration.

use std::collections::BTreeMap;
use std::net::IpAddr;

use openidconnect::url::{Host, Url};
use serde::Deserialize;

use super::{OidcError, SecretString};

/// Scopes requested when the configuration names none. `offline_access` asks
/// for a refresh token, without which a login cannot be re-checked at the
/// provider.
pub const DEFAULT_SCOPES: &[&str] = &["openid", "profile", "email", "offline_access"];

/// The loopback redirect URI used when the configuration names none. Register
/// it at the provider as a native / public client's redirect URI; the client
/// adds a random port (RFC 8252 §7.3).
pub const DEFAULT_REDIRECT_URI: &str = "http://127.0.0.1/callback";

/// Claims tried, in order, for the human-readable name when `name_claim` is
/// not set; the subject is used when none is present.
const DEFAULT_NAME_CLAIMS: &[&str] = &["email", "preferred_username", "name"];

/// Authorization request parameters that Postern sets itself.
const RESERVED_AUTH_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
];

/// How the authority logs people in with OpenID Connect, as written in its
/// TOML configuration:
///
/// ```toml
/// [oidc]
/// issuer_url = "https://login.example.com/realms/corp"
/// client_id = "postern"
/// # client_secret = "…"   # only if the provider insists on a confidential client
/// scopes = ["openid", "profile", "email", "groups", "offline_access"]
/// name_claim = "email"    # default: email (if verified), then preferred_username, then name, then sub
/// allowed_email_domains = ["example.com"]   # default: any
/// allowed_groups = ["postern-users"]         # default: any
/// allow_device_flow = true  # default: false (a device code can be phished)
/// redirect_uri = "http://127.0.0.1/callback" # default; register it at the provider
/// auth_params = { prompt = "consent" }       # extra authorization parameters
///
/// [oidc.claims]            # attribute name = claim name
/// groups = "groups"
/// team = "department"
/// ```
///
/// Rules:
///
/// - `issuer_url` must be `https`, except on a loopback address (a provider
///   on the same machine, as in tests).
/// - `scopes` must contain `openid`. With `offline_access` (the default) the
///   authority gets a refresh token and re-checks the person at the provider
///   whenever it renews their credential; `prompt=consent` is then added to
///   the authorization request, as OpenID Connect Core §11 requires, unless
///   `auth_params` sets `prompt` itself.
/// - `[oidc.claims]` maps attribute names to claim names. A string claim
///   becomes a single value; a list of strings (such as `groups`) a list;
///   numbers and booleans are written as text (`true`, `42`); a missing claim
///   (or `null`) gives no attribute; an object, or a list holding anything
///   but strings, numbers and booleans, is refused, naming the claim.
/// - The name comes from `name_claim`, which must then be a string claim
///   present in every ID token; without it, the first string among `email`
///   (only when `email_verified` is `true`: an address the provider did not
///   verify may belong to anyone), `preferred_username` and `name`, or else
///   the subject. `name_claim = "email"` refuses an unverified address.
/// - `allowed_email_domains`, when not empty, admits only ID tokens whose
///   `email` ends in `@` one of these domains (case-insensitive) and whose
///   `email_verified` is `true`.
/// - `allowed_groups`, when not empty, admits only ID tokens whose
///   `groups_claim` (default `groups`: a list of strings, or one string)
///   holds at least one of these groups.
/// - `allow_device_flow` (default `false`) lets people enroll with the device
///   flow (`postern enroll --oidc --device`). A device code can be phished:
///   whoever persuades a person to enter it enrolls *their own* machine with
///   that person's attributes. Allow it only where machines without a
///   browser must enroll, and watch the audit log (`oidc-device` records name
///   the identity enrolled and the person who approved).
/// - With the issuer of a provider that admits accounts of any organisation
///   (Entra ID's `common`, `organizations` and `consumers`, Google, …),
///   configure `allowed_email_domains` or `allowed_groups`:
///   [`OidcConfig::open_to_everyone`] says when one is missing, and the
///   verifier warns at start-up.
/// - `redirect_uri` must be `http` on `127.0.0.1` or `[::1]` (RFC 8252 §8.3
///   advises against `localhost`); leave the port out so the client can pick
///   a free one, which providers accept for native clients.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawOidcConfig")]
pub struct OidcConfig {
    /// Kept as written: issuers are compared as exact strings, and parsing
    /// would add a trailing slash to a bare host.
    issuer_url: String,
    client_id: String,
    client_secret: Option<SecretString>,
    scopes: Vec<String>,
    claims: BTreeMap<String, String>,
    name_claim: Option<String>,
    allowed_email_domains: Vec<String>,
    allowed_groups: Vec<String>,
    groups_claim: String,
    allow_device_flow: bool,
    redirect_uri: Url,
    auth_params: Vec<(String, String)>,
}

/// Issuers whose provider admits accounts of any organisation (or any
/// person): the host, and the first path segment when it names the tenant
/// (`None`: any path).
const MULTI_TENANT_ISSUERS: &[(&str, Option<&str>)] = &[
    ("login.microsoftonline.com", Some("common")),
    ("login.microsoftonline.com", Some("organizations")),
    ("login.microsoftonline.com", Some("consumers")),
    // The tenant of personal Microsoft accounts.
    (
        "login.microsoftonline.com",
        Some("9188040d-6c67-4c5b-b112-36a304b66dad"),
    ),
    ("login.live.com", None),
    ("accounts.google.com", None),
    ("appleid.apple.com", None),
    ("gitlab.com", None),
    ("token.actions.githubusercontent.com", None),
];

/// The configuration as written, before its checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidcConfig {
    issuer_url: String,
    client_id: String,
    #[serde(default)]
    client_secret: Option<SecretString>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    claims: BTreeMap<String, String>,
    #[serde(default)]
    name_claim: Option<String>,
    #[serde(default)]
    allowed_email_domains: Vec<String>,
    #[serde(default)]
    allowed_groups: Vec<String>,
    #[serde(default)]
    groups_claim: Option<String>,
    #[serde(default)]
    allow_device_flow: bool,
    #[serde(default)]
    redirect_uri: Option<String>,
    #[serde(default)]
    auth_params: BTreeMap<String, String>,
}

impl TryFrom<RawOidcConfig> for OidcConfig {
    type Error = OidcError;

    fn try_from(raw: RawOidcConfig) -> Result<Self, OidcError> {
        fn bad<T>(m: String) -> Result<T, OidcError> {
            Err(OidcError::Config(m))
        }

        let issuer_url = Url::parse(&raw.issuer_url).or_else(|e| {
            bad(format!(
                "issuer_url {:?} is not a URL ({e}): give the provider's issuer, e.g. https://login.example.com/realms/corp",
                raw.issuer_url
            ))
        })?;
        check_issuer(&issuer_url)?;
        let issuer_url = raw.issuer_url;

        if raw.client_id.is_empty() || raw.client_id.chars().any(char::is_control) {
            return bad(
                "client_id must be the non-empty client id registered at the provider".into(),
            );
        }
        if let Some(secret) = &raw.client_secret {
            if secret.expose().is_empty() {
                return bad(
                    "client_secret is empty: remove it for a public client, or give the secret"
                        .into(),
                );
            }
        }

        let scopes = match raw.scopes {
            Some(s) => s,
            None => DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect(),
        };
        if !scopes.iter().any(|s| s == "openid") {
            return bad(format!(
                "scopes {scopes:?} lack \"openid\": without it the provider returns no ID token"
            ));
        }
        if let Some(s) = scopes
            .iter()
            .find(|s| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return bad(format!("scope {s:?} must be one non-empty word"));
        }

        for (attribute, claim) in &raw.claims {
            if attribute.is_empty()
                || attribute.chars().count() > 128
                || attribute.chars().any(char::is_control)
            {
                return bad(format!(
                    "[oidc.claims]: attribute name {attribute:?} must be 1 to 128 printable characters"
                ));
            }
            if claim.is_empty() {
                return bad(format!(
                    "[oidc.claims]: attribute {attribute} maps to an empty claim name"
                ));
            }
        }
        if raw.claims.len() > crate::authority::MAX_ATTRIBUTES {
            return bad(format!(
                "[oidc.claims] maps {} attributes, more than a credential can carry ({})",
                raw.claims.len(),
                crate::authority::MAX_ATTRIBUTES
            ));
        }
        if raw.name_claim.as_deref() == Some("") {
            return bad("name_claim is empty: remove it to use the default (email, preferred_username, name)".into());
        }

        let mut allowed_email_domains = Vec::new();
        for d in raw.allowed_email_domains {
            let d = d.trim().trim_start_matches('@').to_ascii_lowercase();
            if d.is_empty() || d.contains('@') || d.chars().any(|c| c.is_whitespace()) {
                return bad(format!(
                    "allowed_email_domains: {d:?} is not a domain such as \"example.com\""
                ));
            }
            allowed_email_domains.push(d);
        }

        if let Some(g) = raw
            .allowed_groups
            .iter()
            .find(|g| g.is_empty() || g.chars().any(char::is_control))
        {
            return bad(format!(
                "allowed_groups: {g:?} is not a group name (give them as the provider writes them in the groups claim)"
            ));
        }
        let groups_claim = raw.groups_claim.unwrap_or_else(|| "groups".into());
        if groups_claim.is_empty() {
            return bad("groups_claim is empty: remove it to use the default (groups)".into());
        }

        let redirect_text = raw
            .redirect_uri
            .unwrap_or_else(|| DEFAULT_REDIRECT_URI.to_string());
        let redirect_uri = Url::parse(&redirect_text).or_else(|e| {
            bad(format!(
                "redirect_uri {redirect_text:?} is not a URL ({e}); the default is {DEFAULT_REDIRECT_URI}"
            ))
        })?;
        check_loopback_redirect(&redirect_uri)?;

        let mut auth_params: Vec<(String, String)> = Vec::new();
        for (k, v) in raw.auth_params {
            if RESERVED_AUTH_PARAMS.contains(&k.as_str()) {
                return bad(format!(
                    "auth_params may not set {k:?}: Postern sets it itself"
                ));
            }
            auth_params.push((k, v));
        }
        if scopes.iter().any(|s| s == "offline_access")
            && !auth_params.iter().any(|(k, _)| k == "prompt")
        {
            auth_params.push(("prompt".into(), "consent".into()));
        }

        Ok(OidcConfig {
            issuer_url,
            client_id: raw.client_id,
            client_secret: raw.client_secret,
            scopes,
            claims: raw.claims,
            name_claim: raw.name_claim,
            allowed_email_domains,
            allowed_groups: raw.allowed_groups,
            groups_claim,
            allow_device_flow: raw.allow_device_flow,
            redirect_uri,
            auth_params,
        })
    }
}

impl OidcConfig {
    /// Reads a configuration from the TOML text of an `[oidc]` table's
    /// contents (tests, and callers that keep it in a file of its own).
    pub fn from_toml(text: &str) -> Result<Self, OidcError> {
        toml::from_str(text).map_err(|e| OidcError::Config(e.to_string()))
    }

    /// The provider's issuer URL.
    pub fn issuer_url(&self) -> &str {
        &self.issuer_url
    }

    /// The client id registered at the provider.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Whether a client secret is configured (a confidential client).
    pub fn is_confidential(&self) -> bool {
        self.client_secret.is_some()
    }

    pub(crate) fn client_secret(&self) -> Option<&SecretString> {
        self.client_secret.as_ref()
    }

    /// Scopes requested.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// Attribute name → claim name.
    pub fn claims(&self) -> &BTreeMap<String, String> {
        &self.claims
    }

    /// The configured name claim, if any.
    pub fn name_claim(&self) -> Option<&str> {
        self.name_claim.as_deref()
    }

    pub(crate) fn default_name_claims() -> &'static [&'static str] {
        DEFAULT_NAME_CLAIMS
    }

    /// E-mail domains admitted (empty: any).
    pub fn allowed_email_domains(&self) -> &[String] {
        &self.allowed_email_domains
    }

    /// Groups admitted (empty: any), read from [`OidcConfig::groups_claim`].
    pub fn allowed_groups(&self) -> &[String] {
        &self.allowed_groups
    }

    /// The claim `allowed_groups` reads (default `groups`).
    pub fn groups_claim(&self) -> &str {
        &self.groups_claim
    }

    /// Whether people may enroll with the device flow.
    pub fn allow_device_flow(&self) -> bool {
        self.allow_device_flow
    }

    /// `Some(why)` when the issuer is a provider that admits accounts of
    /// any organisation or person, and neither `allowed_email_domains` nor
    /// `allowed_groups` restricts who may enroll: then anyone with an
    /// account there (millions of people) can enroll.
    pub fn open_to_everyone(&self) -> Option<String> {
        if !self.allowed_email_domains.is_empty() || !self.allowed_groups.is_empty() {
            return None;
        }
        let url = Url::parse(&self.issuer_url).ok()?;
        let host = url.host_str()?.to_ascii_lowercase();
        let tenant = url
            .path_segments()
            .and_then(|mut s| s.next())
            .unwrap_or("")
            .to_ascii_lowercase();
        let open = MULTI_TENANT_ISSUERS
            .iter()
            .any(|(h, t)| *h == host && t.is_none_or(|t| t == tenant));
        open.then(|| {
            format!(
                "issuer {} admits accounts of any organisation, and neither `allowed_email_domains` nor `allowed_groups` is set in the [oidc] configuration: anyone with an account there can enroll; restrict it to your domain or groups (or use your organisation's own tenant as the issuer)",
                self.issuer_url
            )
        })
    }

    /// The loopback redirect URI template.
    pub fn redirect_uri(&self) -> &str {
        self.redirect_uri.as_str()
    }

    pub(crate) fn redirect_url(&self) -> &Url {
        &self.redirect_uri
    }

    /// Extra authorization request parameters, including the `prompt=consent`
    /// added for `offline_access`.
    pub fn auth_params(&self) -> &[(String, String)] {
        &self.auth_params
    }
}

/// Whether a URL's host is a loopback address (or `localhost`).
pub(crate) fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// `https`, or `http` on loopback; no query or fragment.
fn check_issuer(url: &Url) -> Result<(), OidcError> {
    let ok_scheme = url.scheme() == "https" || (url.scheme() == "http" && is_loopback_host(url));
    if !ok_scheme {
        return Err(OidcError::Config(format!(
            "issuer_url {url} must use https (plain http is accepted only for a provider on this machine's loopback address)"
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(OidcError::Config(format!(
            "issuer_url {url} must not have a query or fragment: give the issuer exactly as the provider's discovery document states it"
        )));
    }
    Ok(())
}

/// `http` on `127.0.0.1` or `[::1]`, no query or fragment, no credentials.
pub(crate) fn check_loopback_redirect(url: &Url) -> Result<(), OidcError> {
    let ip_loopback = match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        _ => false,
    };
    if url.scheme() != "http"
        || !ip_loopback
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
    {
        return Err(OidcError::Config(format!(
            "redirect_uri {url} must be a plain http URI on 127.0.0.1 or [::1] without query, such as {DEFAULT_REDIRECT_URI} (RFC 8252 loopback redirect)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OidcConfig, OidcError> {
        OidcConfig::from_toml(text)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("issuer_url = \"https://id.example.com\"\nclient_id = \"postern\"\n")
            .expect("valid");
        assert_eq!(c.scopes(), DEFAULT_SCOPES);
        assert_eq!(c.redirect_uri(), DEFAULT_REDIRECT_URI);
        assert!(c.claims().is_empty());
        assert!(!c.is_confidential());
        assert_eq!(
            c.auth_params(),
            [("prompt".to_string(), "consent".to_string())]
        );
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"
            issuer_url = "http://127.0.0.1:8080/realms/x"
            client_id = "postern"
            client_secret = "s3cret"
            scopes = ["openid", "groups"]
            name_claim = "preferred_username"
            allowed_email_domains = ["@Example.COM"]
            redirect_uri = "http://[::1]:8765/cb"
            auth_params = { access_type = "offline" }
            [claims]
            groups = "groups"
            team = "department"
            "#,
        )
        .expect("valid");
        assert!(c.is_confidential());
        assert_eq!(c.issuer_url(), "http://127.0.0.1:8080/realms/x");
        assert_eq!(c.allowed_email_domains(), ["example.com"]);
        assert_eq!(c.claims().len(), 2);
        // No offline_access: no prompt=consent added.
        assert_eq!(
            c.auth_params(),
            [("access_type".to_string(), "offline".to_string())]
        );
        assert!(!format!("{c:?}").contains("s3cret"), "secret redacted");
    }

    #[test]
    fn multi_tenant_issuers_without_a_restriction_are_flagged() {
        let config = |issuer: &str, extra: &str| {
            parse(&format!(
                "issuer_url = \"{issuer}\"\nclient_id = \"p\"\n{extra}"
            ))
            .expect("valid")
        };
        for open in [
            "https://login.microsoftonline.com/common/v2.0",
            "https://login.microsoftonline.com/organizations/v2.0",
            "https://login.microsoftonline.com/consumers/v2.0",
            "https://accounts.google.com",
            "https://gitlab.com",
        ] {
            let why = config(open, "").open_to_everyone();
            assert!(
                why.as_deref()
                    .is_some_and(|w| w.contains(open) && w.contains("allowed_email_domains")),
                "{open}: {why:?}"
            );
            assert_eq!(
                config(open, "allowed_email_domains = [\"example.com\"]").open_to_everyone(),
                None
            );
            assert_eq!(
                config(open, "allowed_groups = [\"postern-users\"]").open_to_everyone(),
                None
            );
        }
        for single in [
            "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0",
            "https://login.example.com/realms/corp",
            "https://example.okta.com",
        ] {
            assert_eq!(config(single, "").open_to_everyone(), None, "{single}");
        }
    }

    #[test]
    fn device_flow_is_off_unless_allowed() {
        let base = "issuer_url = \"https://id.example.com\"\nclient_id = \"p\"\n";
        assert!(!parse(base).unwrap().allow_device_flow());
        assert!(parse(&format!("{base}allow_device_flow = true"))
            .unwrap()
            .allow_device_flow());
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let cases = [
            ("issuer_url = \"http://id.example.com\"\nclient_id = \"p\"", "https"),
            ("issuer_url = \"not a url\"\nclient_id = \"p\"", "not a URL"),
            ("issuer_url = \"https://x\"\nclient_id = \"\"", "client_id"),
            ("issuer_url = \"https://x\"\nclient_id = \"p\"\nscopes = [\"email\"]", "openid"),
            ("issuer_url = \"https://x\"\nclient_id = \"p\"\nredirect_uri = \"http://localhost/cb\"", "127.0.0.1"),
            ("issuer_url = \"https://x\"\nclient_id = \"p\"\nredirect_uri = \"https://127.0.0.1/cb\"", "plain http"),
            ("issuer_url = \"https://x\"\nclient_id = \"p\"\nauth_params = { nonce = \"x\" }", "sets it itself"),
            ("issuer_url = \"https://x\"\nclient_id = \"p\"\nclaims = { \"\" = \"groups\" }", "attribute name"),
            ("issuer_url = \"https://x\"\nclient_id = \"p\"\nsurprise = 1", "unknown field"),
            ("issuer_url = \"https://x\"\nclient_id = \"p\"\nallowed_email_domains = [\"a@b\"]", "domain"),
            ("issuer_url = \"https://x/?a=b\"\nclient_id = \"p\"", "query"),
            ("issuer_url = \"https://x\"\nclient_id = \"p\"\nallowed_groups = [\"\"]", "group name"),
            ("issuer_url = \"https://x\"\nclient_id = \"p\"\nallow_device_flow = \"yes\"", "bool"),
        ];
        for (text, needle) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err:?} lacks {needle:?}");
        }
    }
}
