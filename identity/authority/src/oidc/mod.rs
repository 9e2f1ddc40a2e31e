//! OpenID Connect login: a person proves who they are at the company's
//! identity provider, and the authority turns the provider's verified claims
//! into Postern attributes.
//!
//! # Who does what
//!
//! Three parties take part: the data scientist's laptop (the *client*, that
//! runs `postern enroll --oidc`), the Postern *authority*, and the OpenID
//! *provider* (Okta, Entra ID, Keycloak, Google, …). The client and the
//! authority talk over their end-to-end secure channel; both reach the
//! provider over HTTPS.
//!
//! **The authority exchanges the authorization code, and it alone ever holds
//! tokens.** The client runs only the part that needs the person: it opens
//! the browser on the provider's login page and catches the redirect on a
//! loopback port. It hands the resulting authorization code and its PKCE
//! verifier to the authority, which redeems them at the provider's token
//! endpoint, verifies the ID token, and keeps the refresh token. So:
//!
//! - the refresh token, which is what lets a login outlive its ID token,
//!   never touches the laptop, and the authority can re-check the person at
//!   the provider whenever it renews their credential ([`OidcVerifier::refresh`]):
//!   a user disabled at the provider is refused at the next refresh;
//! - a client secret, when the provider insists on a confidential client,
//!   stays in the authority's configuration;
//! - the ID token the authority verifies comes straight from the provider's
//!   token endpoint, not from the client, and the nonce in it is one the
//!   authority issued for this login ([`OidcVerifier::new_login`]) and
//!   accepts once;
//! - the device flow (RFC 8628) has the same shape: the authority asks the
//!   provider for a user code ([`OidcVerifier::start_device_login`]), the
//!   client shows it ([`show_device_prompt`]), and the authority polls the
//!   provider until the person has approved
//!   ([`OidcVerifier::finish_device_login`]). The device code never leaves
//!   the authority.
//!
//! The alternative, the client redeeming the code itself and forwarding the
//! tokens, would put the refresh token on every laptop and make the
//! authority trust whatever ID token a client chose to send.
//!
//! # The browser flow, step by step
//!
//! 1. Authority: [`OidcVerifier::new_login`] → a [`LoginChallenge`] (provider
//!    endpoint, client id, scopes, redirect URI template, and a fresh
//!    single-use nonce that expires after [`LOGIN_TTL`]), sent to the client.
//! 2. Client: [`browser_login`] binds `127.0.0.1` on a random port (RFC 8252
//!    §7.3), makes a PKCE S256 pair and a random `state`, shows the
//!    authorization URL (print it, and open the browser with
//!    [`show_login_url`]), and waits for the provider's redirect. It checks
//!    `state` (and `iss` when the provider sends it, RFC 9207) and returns a
//!    [`CodeGrant`]: code, PKCE verifier, the exact redirect URI, the nonce.
//! 3. Authority: [`OidcVerifier::exchange_code`] consumes the nonce, checks
//!    the redirect URI against its configuration, redeems the code with the
//!    verifier, and verifies the ID token ([`OidcVerifier::verify_id_token`]:
//!    signature against the provider's JWKS, issuer, audience, expiry, issue
//!    time, nonce), then maps claims to attributes ([`OidcConfig`]). The
//!    result is an [`OidcLogin`]: the [`VerifiedLogin`] and the refresh
//!    token to store.
//!
//! What this module does not do: issue credentials, store refresh tokens,
//! decide who may enroll beyond the optional e-mail domain rule, or talk the
//! Postern wire protocol. Those belong to the authority ([`crate::Authority`],
//! [`crate::service`]), the client side of enrollment ([`crate::client`]) and
//! the CLI.
//!
//! Tokens are never logged or shown; their `Debug` output is redacted.

mod claims;
mod client;
mod config;
mod error;
mod verifier;

pub use claims::map_claims;
pub use client::{browser_login, show_device_prompt, show_login_url, LOGIN_PAGE_TIMEOUT};
pub use config::{OidcConfig, DEFAULT_REDIRECT_URI, DEFAULT_SCOPES};
pub use error::OidcError;
/// The login's data that crosses the channel between client and authority.
pub use postern_identity::authority_wire::{CodeGrant, DevicePrompt, LoginChallenge, SecretString};
pub use verifier::{
    DeviceLogin, OidcVerifier, HTTP_TIMEOUT, JWKS_REFETCH_INTERVAL, LOGIN_TTL, MAX_ID_TOKEN_LEN,
    MAX_PENDING_LOGINS,
};

/// A person's identity at the provider, from a verified ID token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedLogin {
    /// The provider's issuer identifier (`iss`).
    pub issuer: String,
    /// The provider's stable identifier for the person (`sub`). Together with
    /// `issuer` this is the key to use for a member: names and e-mail
    /// addresses can change hands.
    pub subject: String,
    /// A human-readable name, from the configured name claim (see
    /// [`OidcConfig`]).
    pub name: String,
    /// Attributes mapped from the claims by the configuration.
    pub attributes: postern_identity::Attributes,
    /// When the provider issued the ID token (`iat`, unix seconds).
    pub issued_at: u64,
    /// When the ID token expires (`exp`, unix seconds).
    pub expires_at: u64,
}

/// The result of a code exchange, a device login or a refresh.
#[derive(Debug, Clone)]
pub struct OidcLogin {
    /// Who logged in.
    pub login: VerifiedLogin,
    /// The refresh token to keep at the authority for [`OidcVerifier::refresh`].
    /// After a refresh, `Some` is a new token that replaces the old one (the
    /// provider rotated it: the old one no longer works) and `None` means
    /// "keep using the old one". After a login, `None` means the provider
    /// issued none (no `offline_access` granted): the login cannot be
    /// re-checked, so the person must log in again when the credential
    /// expires.
    pub refresh_token: Option<SecretString>,
}
