//! Why an OpenID Connect login failed.

use std::time::Duration;

use postern_identity::credential::{format_duration, format_timestamp};
use postern_identity::wire::RefusalCode;

/// Why an OpenID Connect login, verification or refresh failed.
///
/// Three kinds, as [`OidcError::is_config_error`], [`OidcError::is_provider_error`]
/// and the rest tell apart: the authority's configuration is wrong (fix the
/// `[oidc]` section), the provider is unreachable or refused (check the
/// provider or the person's account there), or the token or login itself is
/// not acceptable (forged, replayed, expired, for another application; the
/// person should log in again). Messages never contain tokens; values taken
/// from unverified tokens are shortened and quoted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OidcError {
    /// The `[oidc]` configuration is invalid.
    #[error("invalid [oidc] configuration: {0}")]
    Config(String),
    /// The provider's discovery document or keys could not be fetched or
    /// made no sense.
    #[error("cannot use the OpenID provider at {issuer}: {reason}; check `issuer_url` in the authority's [oidc] configuration and that the authority can reach it")]
    Discovery {
        /// The configured issuer.
        issuer: String,
        /// What went wrong.
        reason: String,
    },
    /// The provider could not be reached (network, TLS, timeout).
    #[error("cannot reach the OpenID provider during {during}: {reason}")]
    ProviderUnreachable {
        /// Which step: "code exchange", "refresh", …
        during: &'static str,
        /// The transport error.
        reason: String,
    },
    /// The provider answered with an OAuth error.
    #[error("the OpenID provider refused the {during}: {error}{}{hint}", description_suffix(.description))]
    ProviderRefused {
        /// Which step.
        during: &'static str,
        /// The OAuth error code (`invalid_grant`, `invalid_client`, …).
        error: String,
        /// The provider's explanation, if any.
        description: Option<String>,
        /// What to do about it.
        hint: &'static str,
    },
    /// The provider refused to refresh the login: the person was disabled,
    /// signed out or lost consent at the provider, or the refresh token
    /// expired.
    #[error("the OpenID provider no longer accepts this login ({error}{}): the user may have been disabled or signed out at the provider; they must log in again (`postern enroll --oidc`)", description_suffix(.description))]
    RefreshRefused {
        /// The OAuth error code.
        error: String,
        /// The provider's explanation, if any.
        description: Option<String>,
    },
    /// The provider's answer was not what the protocol requires.
    #[error("the OpenID provider sent an invalid answer during {during}: {reason}")]
    BadProviderResponse {
        /// Which step.
        during: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The provider did not include an ID token.
    #[error("the OpenID provider returned no ID token during {during}: make sure the `openid` scope is requested and allowed for this client")]
    NoIdToken {
        /// Which step.
        during: &'static str,
    },
    /// The provider offers no device flow.
    #[error("the OpenID provider at {issuer} offers no device authorization endpoint: log in with the browser instead (without --device), or enable the device flow for this client at the provider")]
    DeviceFlowUnsupported {
        /// The issuer.
        issuer: String,
    },
    /// The device flow was asked for, and the authority does not allow it
    /// (`allow_device_flow` is off in its configuration).
    #[error("this authority does not allow the device flow (`allow_device_flow` is off in its [oidc] configuration: a device code can be phished, since whoever enters it enrolls the machine that asked for it): log in with the browser (without --device), or ask the authority's admin to allow the device flow")]
    DeviceFlowNotAllowed,
    /// The device code expired before the person approved it.
    #[error(
        "the device login expired before it was approved: start it again and enter the code sooner"
    )]
    DeviceCodeExpired,
    /// The person (or the provider) declined the login.
    #[error("the login was declined at the OpenID provider ({error}{}): log in again and approve the request", description_suffix(.description))]
    AccessDenied {
        /// The OAuth error code (`access_denied`, …).
        error: String,
        /// The provider's explanation, if any.
        description: Option<String>,
    },

    /// The ID token is not a well-formed signed JWT.
    #[error("the ID token is malformed: {0}")]
    MalformedIdToken(String),
    /// The ID token is larger than anything a provider sends.
    #[error("the ID token is {len} bytes long, over the {max}-byte limit: refused")]
    IdTokenTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The ID token was issued by another provider.
    #[error("ID token issuer is {found}, expected {expected}: the token comes from another provider; check `issuer_url` in the authority's [oidc] configuration")]
    WrongIssuer {
        /// What the token says (quoted).
        found: String,
        /// The configured issuer.
        expected: String,
    },
    /// The ID token was issued for another application.
    #[error("ID token audience is {found}, expected client id {expected:?}: the token was issued for another application; check `client_id` in the authority's [oidc] configuration")]
    WrongAudience {
        /// What the token says (quoted).
        found: String,
        /// The configured client id.
        expected: String,
    },
    /// The ID token has expired.
    #[error("ID token expired at {} ({} before now, allowing {} of clock skew): log in again, or check the authority's clock", format_timestamp(*.expired_at), format_duration(.now.saturating_sub(*.expired_at)), format_duration(super::verifier::CLOCK_SKEW.as_secs()))]
    Expired {
        /// The token's `exp`.
        expired_at: u64,
        /// The authority's time.
        now: u64,
    },
    /// The ID token claims to be issued in the future.
    #[error("ID token is issued at {}, {} in the future: check the clocks of the authority and the provider", format_timestamp(*.issued_at), format_duration(.issued_at.saturating_sub(*.now)))]
    IssuedInFuture {
        /// The token's `iat`.
        issued_at: u64,
        /// The authority's time.
        now: u64,
    },
    /// The ID token's nonce is not the one of this login.
    #[error("ID token nonce does not match the login this authority started: the token was replayed or belongs to another login; start the login again")]
    NonceMismatch,
    /// The ID token carries no nonce although the login sent one.
    #[error("ID token has no nonce although the login sent one: the provider ignored the nonce or the token belongs to another login; start the login again")]
    MissingNonce,
    /// The login's nonce was not issued by this authority, has expired, or
    /// was already used.
    #[error("this login is unknown to the authority, expired (logins must finish within {}), or was already used: start the login again", format_duration(super::verifier::LOGIN_TTL.as_secs()))]
    UnknownLogin,
    /// Too many logins are in progress at once.
    #[error(
        "too many OpenID logins are in progress at the authority ({0}); try again in a few minutes"
    )]
    TooManyLogins(usize),
    /// No key in the provider's key set matches the token's key id.
    #[error("no key of the provider {issuer} matches the ID token's key id {kid}: the token was not signed by this provider (or the provider rotated its keys less than {} ago); refused", format_duration(super::verifier::JWKS_REFETCH_INTERVAL.as_secs()))]
    UnknownSigningKey {
        /// The issuer.
        issuer: String,
        /// The token's `kid` (quoted), or "(none)".
        kid: String,
    },
    /// The signature does not verify.
    #[error("ID token signature does not verify against the keys of {issuer}: the token was forged or altered; refused")]
    BadSignature {
        /// The issuer.
        issuer: String,
    },
    /// The token is signed with an algorithm that is not accepted.
    #[error("ID token is signed with {0}, which the authority does not accept (only asymmetric signatures such as RS256, PS256, ES256 or EdDSA): refused")]
    DisallowedAlgorithm(String),
    /// Some other check of the ID token failed.
    #[error("ID token refused: {0}")]
    InvalidIdToken(String),
    /// A refresh returned an ID token for another person.
    #[error(
        "the refreshed ID token is for subject {found}, but the login was for {expected}: refused"
    )]
    SubjectChanged {
        /// The original subject.
        expected: String,
        /// The new one (quoted).
        found: String,
    },
    /// A mapped claim has a type that cannot become an attribute.
    #[error("claim {claim:?} (mapped to attribute {attribute:?} in [oidc.claims]) {reason}")]
    Claim {
        /// The claim.
        claim: String,
        /// The attribute it maps to.
        attribute: String,
        /// What is wrong.
        reason: String,
    },
    /// The mapped attributes are not acceptable (too long, too many).
    #[error(
        "the attributes mapped from the ID token are not acceptable: {0}; adjust [oidc.claims]"
    )]
    Attributes(String),
    /// The configured name claim is missing.
    #[error("the ID token has no string claim {0:?}, which `name_claim` in the authority's [oidc] configuration names: request the scope that carries it, or change `name_claim`")]
    NameClaimMissing(String),
    /// The e-mail domain is not admitted.
    #[error("{0}")]
    EmailNotAllowed(String),
    /// The name would come from an e-mail address the provider has not
    /// verified.
    #[error("the ID token's e-mail address {0} is not verified by the provider (`email_verified` is not true), so it cannot name the person (`name_claim = \"email\"` in the authority's [oidc] configuration): verify the address at the provider, or choose another `name_claim`")]
    EmailNotVerified(String),
    /// The person is in none of the groups the configuration admits.
    #[error("{0}")]
    GroupNotAllowed(String),

    /// The loopback listener could not be set up.
    #[error("cannot listen for the login redirect on {addr}: {source}")]
    Loopback {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// No redirect arrived in time.
    #[error("no login arrived from the browser within {}: open the URL printed above in a browser on this machine, or use the device flow (--device) on a machine without one", format_duration(.0.as_secs()))]
    Timeout(Duration),
    /// The redirect names another issuer (RFC 9207 mix-up defence).
    #[error("the login redirect came from issuer {found}, expected {expected}: refused")]
    IssuerMismatch {
        /// What the redirect said (quoted).
        found: String,
        /// Expected issuer.
        expected: String,
    },
    /// The client's answer to a login challenge is unusable (peer error).
    #[error("the client's login answer is unusable: {0}")]
    BadGrant(String),
    /// The authority sent an unusable login challenge.
    #[error("the authority sent an unusable login request: {0}")]
    BadChallenge(String),
    /// An internal step failed (building the HTTP client, …).
    #[error("internal error in the OpenID login: {0}")]
    Internal(String),
}

fn description_suffix(description: &Option<String>) -> String {
    match description {
        Some(d) if !d.is_empty() => format!(": {}", super::claims::quote(d)),
        _ => String::new(),
    }
}

impl OidcError {
    /// What kind of refusal this is for the node whose login failed:
    /// [`RefusalCode::Limit`] when too many logins are in progress,
    /// [`RefusalCode::RetryLater`] when the provider could not be reached or
    /// answered nonsense, [`RefusalCode::Invalid`] for a malformed answer
    /// from the client, [`RefusalCode::Denied`] otherwise (the login itself
    /// was refused, or the configuration must change first).
    pub fn refusal_code(&self) -> RefusalCode {
        match self {
            OidcError::TooManyLogins(_) => RefusalCode::Limit,
            OidcError::Discovery { .. }
            | OidcError::ProviderUnreachable { .. }
            | OidcError::BadProviderResponse { .. }
            | OidcError::Internal(_) => RefusalCode::RetryLater,
            OidcError::BadGrant(_) => RefusalCode::Invalid,
            _ => RefusalCode::Denied,
        }
    }

    /// Whether the authority's `[oidc]` configuration is at fault.
    pub fn is_config_error(&self) -> bool {
        matches!(self, OidcError::Config(_) | OidcError::NameClaimMissing(_))
    }

    /// Whether the provider is unreachable, misbehaving or refused.
    pub fn is_provider_error(&self) -> bool {
        matches!(
            self,
            OidcError::Discovery { .. }
                | OidcError::ProviderUnreachable { .. }
                | OidcError::ProviderRefused { .. }
                | OidcError::RefreshRefused { .. }
                | OidcError::BadProviderResponse { .. }
                | OidcError::NoIdToken { .. }
                | OidcError::DeviceFlowUnsupported { .. }
        )
    }
}
