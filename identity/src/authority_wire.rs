//! The authority protocol's messages: what a node sends the authority and
//! what it answers, one CBOR message per data frame on an end-to-end channel
//! pinned to the authority's identifier (see the `postern-authority` crate
//! for the service, and `postern_node::authority` for the node's side).
//!
//! Besides [`AuthorityRequest`] and [`AuthorityReply`], this module holds the
//! plain data of an OpenID Connect login that crosses that channel:
//! [`LoginChallenge`] (authority to client), [`CodeGrant`] (client to
//! authority), [`DevicePrompt`] (authority to client) and [`SecretString`]
//! (codes and verifiers: zeroized on drop, redacted in `Debug`). None of it
//! needs an OpenID Connect library; the login itself lives in the authority
//! crate.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::credential::{RevocationEntry, SignedCredential};
use crate::wire::RefusalCode;
use crate::Identifier;

/// A node's request to the authority.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AuthorityRequest {
    /// Enroll with a ticket's one-time code.
    Redeem {
        /// The code (the authority stores only its hash).
        #[serde(with = "serde_bytes")]
        code: [u8; 32],
    },
    /// A fresh credential for the authenticated identity, a current member.
    Renew,
    /// Revocations with a sequence number above `after`, then a live feed.
    Revocations {
        /// The newest sequence number the node already has.
        after: u64,
    },
    /// Start an OpenID Connect login: answered by
    /// [`AuthorityReply::OidcLogin`] (browser) or
    /// [`AuthorityReply::OidcDevice`] (device flow), then, on the same
    /// channel, by `Credential` or `Refused`.
    OidcStart {
        /// The device flow (RFC 8628) instead of the browser.
        device: bool,
    },
    /// The browser login's result, on the channel its `OidcStart` opened:
    /// the authorization code and PKCE verifier for the authority to redeem.
    OidcFinish {
        /// What the loopback redirect delivered.
        grant: CodeGrant,
    },
}

/// The authority's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AuthorityReply {
    /// A credential for the authenticated identity.
    Credential {
        /// The signed credential.
        credential: SignedCredential,
    },
    /// Revocations, oldest first.
    Revocations {
        /// The entries.
        entries: Vec<RevocationEntry>,
    },
    /// The request was refused, and why (safe to show the node's user).
    Refused {
        /// What kind of refusal, so that a node retries only what may
        /// succeed: `Limit` and `RetryLater` may pass later, `Denied` and
        /// `Invalid` will not until someone changes something. A refusal
        /// from an authority older than this field reads as `Denied`.
        #[serde(default = "unknown_refusal")]
        code: RefusalCode,
        /// The reason.
        reason: String,
    },
    /// Everything the client needs to send the person to the provider's
    /// login page; answer with [`AuthorityRequest::OidcFinish`].
    OidcLogin {
        /// The provider's endpoint, client id, scopes, redirect URI and the
        /// nonce the authority issued.
        challenge: LoginChallenge,
    },
    /// What to show the person for a device-flow login; the credential (or
    /// a refusal) follows once they approved at the provider.
    OidcDevice {
        /// The user code and where to enter it.
        prompt: DevicePrompt,
    },
}

/// What a refusal without a code (from an older authority) counts as: not
/// worth retrying on its own.
fn unknown_refusal() -> RefusalCode {
    RefusalCode::Denied
}

impl AuthorityReply {
    /// A refusal of kind `code` saying `reason`.
    pub fn refused(code: RefusalCode, reason: impl Into<String>) -> Self {
        AuthorityReply::Refused {
            code,
            reason: reason.into(),
        }
    }

    /// What kind of answer this is, for messages (`"a credential"`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            AuthorityReply::Credential { .. } => "a credential",
            AuthorityReply::Revocations { .. } => "revocations",
            AuthorityReply::Refused { .. } => "a refusal",
            AuthorityReply::OidcLogin { .. } => "a browser login",
            AuthorityReply::OidcDevice { .. } => "a device login",
        }
    }
}

/// A secret string (authorization code, PKCE verifier, refresh token, client
/// secret): serialized as a plain string, zeroized on drop, redacted in
/// `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// What the authority sends the client to start a browser login: everything
/// the client needs to build the authorization request, so the client needs
/// no OIDC configuration of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginChallenge {
    /// The provider's issuer identifier (checked against the `iss` parameter
    /// of the redirect when the provider sends one).
    pub issuer: String,
    /// The provider's authorization endpoint.
    pub authorization_endpoint: String,
    /// The client id registered at the provider.
    pub client_id: String,
    /// Scopes to request.
    pub scopes: Vec<String>,
    /// The loopback redirect URI as registered; the client fills in the port
    /// of its listener when this one has none.
    pub redirect_uri: String,
    /// The nonce the ID token must carry: issued by the authority, single use.
    pub nonce: String,
    /// Extra authorization request parameters (`prompt=consent`, …).
    pub extra_params: Vec<(String, String)>,
    /// When the authority stops accepting this login (unix seconds).
    pub expires_at: u64,
}

/// What the client sends back to the authority after the browser login: the
/// means to redeem the authorization code. Only the authority redeems it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeGrant {
    /// The nonce of the [`LoginChallenge`] this answers.
    pub nonce: String,
    /// The authorization code from the provider's redirect.
    pub code: SecretString,
    /// The PKCE code verifier matching the challenge sent to the provider.
    pub pkce_verifier: SecretString,
    /// The exact redirect URI used (with the listener's port).
    pub redirect_uri: String,
}

/// What the client shows the person for a device-flow login (RFC 8628).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePrompt {
    /// The code to type in.
    pub user_code: String,
    /// Where to type it.
    pub verification_uri: String,
    /// A link with the code filled in, when the provider offers one.
    pub verification_uri_complete: Option<String>,
    /// When the code stops working (unix seconds).
    pub expires_at: u64,
    /// The identity this login enrolls (the one the authority's channel
    /// authenticated): the client shows it, so that the person can tell
    /// their own enrollment from someone else's code. Absent from older
    /// authorities.
    #[serde(default)]
    pub enrolling: Option<Identifier>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    #[test]
    fn messages_round_trip() {
        let msg = AuthorityRequest::Redeem { code: [7; 32] };
        let back: AuthorityRequest = wire::decode(&wire::encode(&msg).unwrap()).unwrap();
        assert!(matches!(back, AuthorityRequest::Redeem { code } if code == [7; 32]));
        assert!(wire::decode::<AuthorityReply>(b"\xff\x00garbage").is_err());
    }

    #[test]
    fn refusals_carry_their_code_and_old_ones_read_as_denied() {
        let reply = AuthorityReply::refused(RefusalCode::Limit, "too many feeds");
        let back: AuthorityReply = wire::decode(&wire::encode(&reply).unwrap()).unwrap();
        assert!(matches!(
            back,
            AuthorityReply::Refused { code: RefusalCode::Limit, ref reason } if reason == "too many feeds"
        ));
        /// The reply as authorities before the code sent it.
        #[derive(Serialize)]
        enum Old {
            Refused { reason: String },
        }
        let old = wire::encode(&Old::Refused {
            reason: "no".into(),
        })
        .unwrap();
        assert!(matches!(
            wire::decode::<AuthorityReply>(&old).unwrap(),
            AuthorityReply::Refused {
                code: RefusalCode::Denied,
                ..
            }
        ));
    }

    #[test]
    fn oidc_messages_round_trip() {
        let grant = CodeGrant {
            nonce: "n".into(),
            code: SecretString::new("the-code"),
            pkce_verifier: SecretString::new("the-verifier"),
            redirect_uri: "http://127.0.0.1:5555/callback".into(),
        };
        let msg = AuthorityRequest::OidcFinish {
            grant: grant.clone(),
        };
        assert!(!format!("{msg:?}").contains("the-code"), "code redacted");
        let back: AuthorityRequest = wire::decode(&wire::encode(&msg).unwrap()).unwrap();
        assert!(matches!(back, AuthorityRequest::OidcFinish { grant: g } if g == grant));
        let start: AuthorityRequest =
            wire::decode(&wire::encode(&AuthorityRequest::OidcStart { device: true }).unwrap())
                .unwrap();
        assert!(matches!(
            start,
            AuthorityRequest::OidcStart { device: true }
        ));

        let prompt = DevicePrompt {
            user_code: "ABCD-EFGH".into(),
            verification_uri: "https://id.example.com/device".into(),
            verification_uri_complete: None,
            expires_at: 1_700_000_600,
            enrolling: Some(crate::Identity::generate().identifier()),
        };
        let reply = AuthorityReply::OidcDevice {
            prompt: prompt.clone(),
        };
        let back: AuthorityReply = wire::decode(&wire::encode(&reply).unwrap()).unwrap();
        assert!(matches!(back, AuthorityReply::OidcDevice { prompt: p } if p == prompt));
        let challenge = LoginChallenge {
            issuer: "https://id.example.com".into(),
            authorization_endpoint: "https://id.example.com/auth".into(),
            client_id: "postern".into(),
            scopes: vec!["openid".into()],
            redirect_uri: "http://127.0.0.1/callback".into(),
            nonce: "n".into(),
            extra_params: vec![("prompt".into(), "consent".into())],
            expires_at: 1_700_000_600,
        };
        let reply = AuthorityReply::OidcLogin {
            challenge: challenge.clone(),
        };
        let back: AuthorityReply = wire::decode(&wire::encode(&reply).unwrap()).unwrap();
        assert!(matches!(back, AuthorityReply::OidcLogin { challenge: c } if c == challenge));
    }
}
