//! The authority's side: discovery, login challenges, code exchange, the
//! device flow, ID token verification and refresh.

use std::borrow::Cow;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod,
    CoreDeviceAuthorizationResponse, CoreGrantType, CoreIdToken, CoreIdTokenVerifier,
    CoreJsonWebKey, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm, CoreJwsSigningAlgorithm, CoreResponseMode, CoreResponseType,
    CoreSubjectIdentifierType, CoreTokenResponse,
};
use openidconnect::url::Url;
use openidconnect::{
    reqwest, AdditionalProviderMetadata, AuthorizationCode, ClaimsVerificationError, ClientId,
    ClientSecret, DeviceAuthorizationUrl, DiscoveryError, EndpointNotSet, EndpointSet,
    ErrorResponse, HttpClientError, IssuerUrl, JsonWebKeySet, JsonWebKeySetUrl, Nonce,
    OAuth2TokenResponse, PkceCodeVerifier, ProviderMetadata, RedirectUrl, RefreshToken,
    RequestTokenError, Scope, SignatureVerificationError, TokenResponse, TokenUrl,
};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use super::claims::{map_claims, quote};
use super::config::{check_loopback_redirect, is_loopback_host};
use super::{
    CodeGrant, DevicePrompt, LoginChallenge, OidcConfig, OidcError, OidcLogin, SecretString,
    VerifiedLogin,
};

/// How long a login started with [`OidcVerifier::new_login`] may take.
pub const LOGIN_TTL: Duration = Duration::from_secs(10 * 60);
/// Logins in progress at once (each holds a nonce in memory until used or
/// expired).
pub const MAX_PENDING_LOGINS: usize = 1024;
/// Longest ID token accepted. Providers that put many groups in the token
/// stay well below this.
pub const MAX_ID_TOKEN_LEN: usize = 64 * 1024;
/// The provider's key set is fetched again when a token names an unknown
/// key, at most once per this interval (the first time at once).
pub const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(60);
/// Timeout of each request to the provider.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// Clock difference tolerated between the authority and the provider.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Signature algorithms accepted for ID tokens: all asymmetric ones. `none`
/// and the HMAC algorithms (whose key is the client secret, known to every
/// copy of a public client) are refused.
const ASYMMETRIC_ALGS: [CoreJwsSigningAlgorithm; 10] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EcdsaP521Sha512,
    CoreJwsSigningAlgorithm::EdDsa,
];

const NONCE_MISSING: &str = "missing";
const NONCE_MISMATCH: &str = "mismatch";

/// The discovery document fields beyond OpenID Connect Discovery that
/// Postern reads: the device authorization endpoint (RFC 8628 §4).
#[derive(Clone, Debug, Deserialize, Serialize)]
struct DeviceEndpoint {
    #[serde(default)]
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
}
impl AdditionalProviderMetadata for DeviceEndpoint {}

type Metadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// An OAuth client that only knows the token endpoint (all the authority
/// needs; the authorization URL is built by the client side).
type TokenClient = CoreClient<
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
    EndpointNotSet,
>;

type HttpError = HttpClientError<reqwest::Error>;

/// The provider's signing keys, and when they were last fetched again.
#[derive(Debug)]
struct Keys {
    set: CoreJsonWebKeySet,
    last_refetch: Option<Instant>,
}

/// The authority's view of one OpenID provider: discovered metadata and
/// keys, the logins in progress, and the HTTP client that talks to it.
/// Share it (`Arc`) between connections; all methods take `&self`.
#[derive(Debug)]
pub struct OidcVerifier {
    config: OidcConfig,
    issuer: IssuerUrl,
    authorization_endpoint: String,
    token_endpoint: TokenUrl,
    device_endpoint: Option<DeviceAuthorizationUrl>,
    /// `None` only for verifiers built without a provider (unit tests).
    jwks_uri: Option<JsonWebKeySetUrl>,
    http: reqwest::Client,
    keys: Mutex<Keys>,
    /// Nonce → expiry (unix seconds) of logins started and not yet finished.
    pending: Mutex<HashMap<String, u64>>,
}

/// A device-flow login in progress at the authority: the [`DevicePrompt`] to
/// send to the client, and the device code, which stays here.
#[derive(Debug)]
pub struct DeviceLogin {
    prompt: DevicePrompt,
    details: CoreDeviceAuthorizationResponse,
}

impl DeviceLogin {
    /// What the person must see: the code and where to enter it.
    pub fn prompt(&self) -> &DevicePrompt {
        &self.prompt
    }
}

impl OidcVerifier {
    /// Fetches the provider's discovery document and signing keys. Fails with
    /// [`OidcError::Discovery`] when the provider cannot be reached, its
    /// document names another issuer, or it has no token endpoint.
    pub async fn discover(config: OidcConfig) -> Result<Self, OidcError> {
        let http = reqwest::Client::builder()
            // Following redirects would let the provider's answers point the
            // authority at other hosts (SSRF).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(HTTP_TIMEOUT)
            .build()
            .map_err(|e| OidcError::Internal(format!("cannot build the HTTP client: {e}")))?;
        let issuer_text = config.issuer_url().to_string();
        let discovery = |reason: String| OidcError::Discovery {
            issuer: issuer_text.clone(),
            reason,
        };
        let issuer = IssuerUrl::new(issuer_text.clone())
            .map_err(|e| discovery(format!("invalid issuer URL: {e}")))?;
        let metadata = Metadata::discover_async(issuer.clone(), &http)
            .await
            .map_err(|e| discovery(describe_discovery_error(&e)))?;

        let authorization_endpoint = metadata.authorization_endpoint().url().clone();
        check_endpoint(&authorization_endpoint)
            .map_err(|m| discovery(format!("authorization endpoint: {m}")))?;
        let token_endpoint = metadata.token_endpoint().cloned().ok_or_else(|| {
            discovery("its discovery document names no token endpoint".to_string())
        })?;
        check_endpoint(token_endpoint.url())
            .map_err(|m| discovery(format!("token endpoint: {m}")))?;
        let device_endpoint = metadata
            .additional_metadata()
            .device_authorization_endpoint
            .clone();
        if let Some(d) = &device_endpoint {
            check_endpoint(d.url())
                .map_err(|m| discovery(format!("device authorization endpoint: {m}")))?;
        }
        if let Some(why) = config.open_to_everyone() {
            tracing::warn!("{why}");
        }
        tracing::debug!(
            issuer = %issuer_text,
            keys = metadata.jwks().keys().len(),
            device_flow = device_endpoint.is_some(),
            "discovered OpenID provider"
        );
        Ok(OidcVerifier {
            issuer,
            authorization_endpoint: authorization_endpoint.to_string(),
            token_endpoint,
            device_endpoint,
            jwks_uri: Some(metadata.jwks_uri().clone()),
            http,
            keys: Mutex::new(Keys {
                set: metadata.jwks().clone(),
                last_refetch: None,
            }),
            pending: Mutex::new(HashMap::new()),
            config,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// The provider's issuer identifier.
    pub fn issuer(&self) -> &str {
        self.config.issuer_url()
    }

    /// Whether the provider offers the device flow.
    pub fn supports_device_flow(&self) -> bool {
        self.device_endpoint.is_some()
    }

    /// Starts a browser login: a fresh nonce, remembered until it is used
    /// by [`OidcVerifier::exchange_code`] or [`LOGIN_TTL`] passes. Send the
    /// challenge to the client, which runs [`super::browser_login`].
    pub fn new_login(&self, now: u64) -> Result<LoginChallenge, OidcError> {
        let nonce = random_token();
        let expires_at = now.saturating_add(LOGIN_TTL.as_secs());
        {
            let mut pending = lock(&self.pending);
            pending.retain(|_, exp| *exp > now);
            if pending.len() >= MAX_PENDING_LOGINS {
                return Err(OidcError::TooManyLogins(MAX_PENDING_LOGINS));
            }
            pending.insert(nonce.clone(), expires_at);
        }
        Ok(LoginChallenge {
            issuer: self.config.issuer_url().to_string(),
            authorization_endpoint: self.authorization_endpoint.clone(),
            client_id: self.config.client_id().to_string(),
            scopes: self.config.scopes().to_vec(),
            redirect_uri: self.config.redirect_uri().to_string(),
            nonce,
            extra_params: self.config.auth_params().to_vec(),
            expires_at,
        })
    }

    /// Finishes a browser login: uses up the login's nonce (a second attempt
    /// with the same nonce fails with [`OidcError::UnknownLogin`], whatever
    /// happened to the first), checks the redirect URI against the
    /// configuration, redeems the code with its PKCE verifier at the
    /// provider, and verifies the ID token with that nonce.
    pub async fn exchange_code(&self, grant: CodeGrant, now: u64) -> Result<OidcLogin, OidcError> {
        self.take_login(&grant.nonce, now)?;
        let redirect = self.check_redirect(&grant.redirect_uri)?;
        let response = self
            .token_client()
            .exchange_code(AuthorizationCode::new(grant.code.expose().to_string()))
            .set_pkce_verifier(PkceCodeVerifier::new(
                grant.pkce_verifier.expose().to_string(),
            ))
            .set_redirect_uri(Cow::Owned(redirect))
            .request_async(&self.http)
            .await
            .map_err(|e| token_error("code exchange", e))?;
        let (login, refresh_token) = self
            .login_from_response(&response, Some(&grant.nonce), now, "code exchange")
            .await?;
        Ok(OidcLogin {
            login,
            refresh_token,
        })
    }

    /// Starts a device-flow login (RFC 8628): asks the provider for a user
    /// code. Send [`DeviceLogin::prompt`] to the client, which shows it
    /// ([`super::show_device_prompt`]), then call
    /// [`OidcVerifier::finish_device_login`].
    pub async fn start_device_login(&self, now: u64) -> Result<DeviceLogin, OidcError> {
        let url = self
            .device_endpoint
            .clone()
            .ok_or_else(|| OidcError::DeviceFlowUnsupported {
                issuer: self.issuer().to_string(),
            })?;
        // openidconnect adds `openid` itself.
        let scopes = self
            .config
            .scopes()
            .iter()
            .filter(|s| *s != "openid")
            .map(|s| Scope::new(s.clone()));
        let details: CoreDeviceAuthorizationResponse = self
            .token_client()
            .set_device_authorization_url(url)
            .exchange_device_code()
            .add_scopes(scopes)
            .request_async(&self.http)
            .await
            .map_err(|e| token_error("device authorization", e))?;
        let prompt = DevicePrompt {
            user_code: details.user_code().secret().clone(),
            verification_uri: details.verification_uri().to_string(),
            verification_uri_complete: details
                .verification_uri_complete()
                .map(|u| u.secret().clone()),
            expires_at: now.saturating_add(details.expires_in().as_secs()),
            enrolling: None,
        };
        Ok(DeviceLogin { prompt, details })
    }

    /// Polls the provider until the person has approved the device login,
    /// honouring its interval and `slow_down`, and verifies the ID token.
    /// Fails with [`OidcError::DeviceCodeExpired`] when the code expires
    /// first and [`OidcError::AccessDenied`] when the person declines.
    /// Reads the system clock (it may run for minutes). Cancel-safe: dropping
    /// the future stops polling.
    pub async fn finish_device_login(&self, login: DeviceLogin) -> Result<OidcLogin, OidcError> {
        let remaining = login.prompt.expires_at.saturating_sub(unix_now());
        if remaining == 0 {
            return Err(OidcError::DeviceCodeExpired);
        }
        let response = self
            .token_client()
            .exchange_device_access_token(&login.details)
            .request_async(
                &self.http,
                tokio::time::sleep,
                Some(Duration::from_secs(remaining)),
            )
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(r) => {
                    let (error, description) = error_fields(&r);
                    match error.as_str() {
                        "expired_token" => OidcError::DeviceCodeExpired,
                        "access_denied" => OidcError::AccessDenied { error, description },
                        _ => OidcError::ProviderRefused {
                            during: "device login",
                            error,
                            description,
                            hint: hint_for("device login", ""),
                        },
                    }
                }
                other => token_error("device login", other),
            })?;
        let (login, refresh_token) = self
            .login_from_response(&response, None, unix_now(), "device login")
            .await?;
        Ok(OidcLogin {
            login,
            refresh_token,
        })
    }

    /// Re-checks a login at the provider with its refresh token, as the
    /// authority does before renewing a person's credential: the provider
    /// refuses a disabled or signed-out user ([`OidcError::RefreshRefused`]).
    /// The new ID token is verified like any other, must name the same
    /// `expected_subject`, and its claims give the current attributes (group
    /// changes at the provider show up here). See [`OidcLogin::refresh_token`]
    /// for rotation.
    pub async fn refresh(
        &self,
        refresh_token: &SecretString,
        expected_subject: &str,
        now: u64,
    ) -> Result<OidcLogin, OidcError> {
        let token = RefreshToken::new(refresh_token.expose().to_string());
        let response = self
            .token_client()
            .exchange_refresh_token(&token)
            .request_async(&self.http)
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(r) => {
                    let (error, description) = error_fields(&r);
                    if error == "invalid_grant" {
                        OidcError::RefreshRefused { error, description }
                    } else {
                        OidcError::ProviderRefused {
                            during: "refresh",
                            hint: hint_for("refresh", &error),
                            error,
                            description,
                        }
                    }
                }
                other => token_error("refresh", other),
            })?;
        let (login, new_token) = self
            .login_from_response(&response, None, now, "refresh")
            .await?;
        if login.subject != expected_subject {
            return Err(OidcError::SubjectChanged {
                expected: expected_subject.to_string(),
                found: quote(&login.subject),
            });
        }
        let rotated = new_token.filter(|t| {
            !bool::from(
                t.expose()
                    .as_bytes()
                    .ct_eq(refresh_token.expose().as_bytes()),
            )
        });
        Ok(OidcLogin {
            login,
            refresh_token: rotated,
        })
    }

    /// Verifies an ID token: signature against the provider's keys (fetched
    /// again, at most once per [`JWKS_REFETCH_INTERVAL`], when the token
    /// names an unknown key), issuer, audience (the configured client id, and
    /// no other untrusted audience), expiry and issue time (with
    /// 60 s of clock skew), and, when `expected_nonce` is given, the nonce;
    /// then maps its claims by the configuration. `now` is unix seconds.
    pub async fn verify_id_token(
        &self,
        id_token: &str,
        expected_nonce: Option<&str>,
        now: u64,
    ) -> Result<VerifiedLogin, OidcError> {
        match self.verify_with_current_keys(id_token, expected_nonce, now) {
            Err(OidcError::UnknownSigningKey { .. }) if self.refetch_due() => {
                self.refetch_keys().await;
                self.verify_with_current_keys(id_token, expected_nonce, now)
            }
            other => other,
        }
    }

    /// The verification itself, with the keys at hand. No I/O.
    fn verify_with_current_keys(
        &self,
        id_token: &str,
        expected_nonce: Option<&str>,
        now: u64,
    ) -> Result<VerifiedLogin, OidcError> {
        if id_token.len() > MAX_ID_TOKEN_LEN {
            return Err(OidcError::IdTokenTooLarge {
                len: id_token.len(),
                max: MAX_ID_TOKEN_LEN,
            });
        }
        let parsed = CoreIdToken::from_str(id_token)
            .map_err(|e| OidcError::MalformedIdToken(e.to_string()))?;
        let keys = lock(&self.keys).set.clone();
        let skew = CLOCK_SKEW.as_secs();
        // openidconnect refuses a token once `time_fn() >= exp`: shift the
        // clock back by the tolerated skew.
        let expiry_clock = UNIX_EPOCH + Duration::from_secs(now.saturating_sub(skew));
        let latest_iat = i64::try_from(now.saturating_add(skew)).unwrap_or(i64::MAX);
        let verifier = CoreIdTokenVerifier::new_public_client(
            ClientId::new(self.config.client_id().to_string()),
            self.issuer.clone(),
            keys,
        )
        .set_allowed_algs(ASYMMETRIC_ALGS)
        .set_time_fn(move || expiry_clock.into())
        .set_issue_time_verifier_fn(move |iat| {
            if iat.timestamp() > latest_iat {
                Err("issued in the future".to_string())
            } else {
                Ok(())
            }
        });
        let nonce_check = |claim: Option<&Nonce>| -> Result<(), String> {
            match (expected_nonce, claim) {
                (None, _) => Ok(()),
                (Some(_), None) => Err(NONCE_MISSING.to_string()),
                (Some(expected), Some(found)) => {
                    if bool::from(expected.as_bytes().ct_eq(found.secret().as_bytes())) {
                        Ok(())
                    } else {
                        Err(NONCE_MISMATCH.to_string())
                    }
                }
            }
        };
        let claims = parsed
            .claims(&verifier, nonce_check)
            .map_err(|e| self.claims_error(e, id_token, now))?;
        let subject = claims.subject().as_str().to_string();
        let issued_at = u64::try_from(claims.issue_time().timestamp()).unwrap_or(0);
        let expires_at = u64::try_from(claims.expiration().timestamp()).unwrap_or(0);

        // The token is authentic: read all its claims for the mapping.
        let payload = peek(id_token)
            .map(|p| p.payload)
            .ok_or_else(|| OidcError::MalformedIdToken("payload is not a JSON object".into()))?;
        let (name, attributes) = map_claims(&self.config, &subject, &payload)?;
        Ok(VerifiedLogin {
            issuer: self.config.issuer_url().to_string(),
            subject,
            name,
            attributes,
            issued_at,
            expires_at,
        })
    }

    /// Turns openidconnect's verdict into an error that says what is wrong,
    /// quoting the (unverified) values found in the token.
    fn claims_error(&self, e: ClaimsVerificationError, token: &str, now: u64) -> OidcError {
        let p = peek(token).unwrap_or_default();
        let str_claim = |name: &str| match p.payload.get(name) {
            Some(Value::String(s)) => quote(s),
            Some(other) => quote(&other.to_string()),
            None => "(none)".to_string(),
        };
        let time_claim = |name: &str| p.payload.get(name).and_then(Value::as_u64);
        let issuer = self.issuer().to_string();
        match e {
            ClaimsVerificationError::InvalidIssuer(_) => OidcError::WrongIssuer {
                found: str_claim("iss"),
                expected: issuer,
            },
            ClaimsVerificationError::InvalidAudience(_) => OidcError::WrongAudience {
                found: str_claim("aud"),
                expected: self.config.client_id().to_string(),
            },
            ClaimsVerificationError::Expired(msg) => {
                let skew = CLOCK_SKEW.as_secs();
                match (time_claim("exp"), time_claim("iat")) {
                    (Some(exp), _) if exp <= now.saturating_sub(skew) => OidcError::Expired {
                        expired_at: exp,
                        now,
                    },
                    (_, Some(iat)) if iat > now.saturating_add(skew) => OidcError::IssuedInFuture {
                        issued_at: iat,
                        now,
                    },
                    _ => OidcError::InvalidIdToken(msg),
                }
            }
            ClaimsVerificationError::InvalidNonce(msg) if msg == NONCE_MISSING => {
                OidcError::MissingNonce
            }
            ClaimsVerificationError::InvalidNonce(_) => OidcError::NonceMismatch,
            ClaimsVerificationError::SignatureVerification(sig) => match sig {
                SignatureVerificationError::NoMatchingKey => OidcError::UnknownSigningKey {
                    issuer,
                    kid: p.kid.as_deref().map_or_else(|| "(none)".to_string(), quote),
                },
                SignatureVerificationError::CryptoError(_) => OidcError::BadSignature { issuer },
                SignatureVerificationError::DisallowedAlg(_)
                | SignatureVerificationError::UnsupportedAlg(_)
                | SignatureVerificationError::NoSignature => OidcError::DisallowedAlgorithm(
                    p.alg
                        .as_deref()
                        .map_or_else(|| "no algorithm".to_string(), quote),
                ),
                other => OidcError::InvalidIdToken(other.to_string()),
            },
            ClaimsVerificationError::Unsupported(msg) => OidcError::MalformedIdToken(msg),
            other => OidcError::InvalidIdToken(other.to_string()),
        }
    }

    /// Verifies the ID token of a token response and takes its refresh token.
    async fn login_from_response(
        &self,
        response: &CoreTokenResponse,
        nonce: Option<&str>,
        now: u64,
        during: &'static str,
    ) -> Result<(VerifiedLogin, Option<SecretString>), OidcError> {
        let id_token = response
            .id_token()
            .ok_or(OidcError::NoIdToken { during })?
            .to_string();
        let login = self.verify_id_token(&id_token, nonce, now).await?;
        let refresh_token = response
            .refresh_token()
            .map(|t| SecretString::new(t.secret().clone()));
        Ok((login, refresh_token))
    }

    fn token_client(&self) -> TokenClient {
        let client = CoreClient::new(
            ClientId::new(self.config.client_id().to_string()),
            self.issuer.clone(),
            JsonWebKeySet::new(Vec::new()),
        )
        .set_token_uri(self.token_endpoint.clone());
        match self.config.client_secret() {
            Some(secret) => {
                client.set_client_secret(ClientSecret::new(secret.expose().to_string()))
            }
            None => client,
        }
    }

    /// Forgets a login started with [`OidcVerifier::new_login`] that will
    /// not finish (the client went away), so that it stops counting towards
    /// [`MAX_PENDING_LOGINS`]. Whether it was pending.
    pub fn cancel_login(&self, nonce: &str) -> bool {
        lock(&self.pending).remove(nonce).is_some()
    }

    /// Uses up a login's nonce.
    fn take_login(&self, nonce: &str, now: u64) -> Result<(), OidcError> {
        match lock(&self.pending).remove(nonce) {
            Some(expires_at) if expires_at > now => Ok(()),
            _ => Err(OidcError::UnknownLogin),
        }
    }

    /// The client's redirect URI must be the configured one, with any port
    /// when the configured one has none.
    fn check_redirect(&self, uri: &str) -> Result<RedirectUrl, OidcError> {
        let bad = |why: &str| OidcError::BadGrant(format!("redirect URI {}: {why}", quote(uri)));
        let url = Url::parse(uri).map_err(|_| bad("not a URL"))?;
        check_loopback_redirect(&url).map_err(|_| bad("not a loopback http URI"))?;
        let expected = self.config.redirect_url();
        let port_ok = match expected.port() {
            Some(p) => url.port() == Some(p),
            None => true,
        };
        if url.host() != expected.host() || url.path() != expected.path() || !port_ok {
            return Err(bad(&format!(
                "does not match the configured {}",
                expected.as_str()
            )));
        }
        Ok(RedirectUrl::from_url(url))
    }

    /// Whether an unknown key may trigger a key set fetch now; if so, takes
    /// the slot.
    fn refetch_due(&self) -> bool {
        if self.jwks_uri.is_none() {
            return false;
        }
        let mut keys = lock(&self.keys);
        let due = keys
            .last_refetch
            .is_none_or(|t| t.elapsed() >= JWKS_REFETCH_INTERVAL);
        if due {
            keys.last_refetch = Some(Instant::now());
        }
        due
    }

    /// Fetches the provider's key set again (key rotation). A failure keeps
    /// the old keys and is logged.
    async fn refetch_keys(&self) {
        let Some(uri) = &self.jwks_uri else { return };
        match JsonWebKeySet::fetch_async(uri, &self.http).await {
            Ok(set) => {
                tracing::info!(issuer = %self.issuer(), keys = set.keys().len(), "fetched the provider's signing keys again");
                lock(&self.keys).set = set;
            }
            Err(e) => tracing::warn!(
                issuer = %self.issuer(),
                error = %describe_discovery_error(&e),
                "cannot fetch the provider's signing keys again"
            ),
        }
    }
}

/// Parts of a JWT read without verification, for error messages and (after
/// verification) for the claim mapping.
#[derive(Default)]
struct Peek {
    kid: Option<String>,
    alg: Option<String>,
    payload: Map<String, Value>,
}

/// Decodes a compact JWS's header and payload, if they are base64url JSON
/// objects.
fn peek(token: &str) -> Option<Peek> {
    let mut parts = token.split('.');
    let decode = |part: Option<&str>| -> Option<Map<String, Value>> {
        let bytes = URL_SAFE_NO_PAD.decode(part?.trim_end_matches('=')).ok()?;
        match serde_json::from_slice(&bytes).ok()? {
            Value::Object(m) => Some(m),
            _ => None,
        }
    };
    let header = decode(parts.next())?;
    let payload = decode(parts.next())?;
    let text = |k: &str| header.get(k).and_then(Value::as_str).map(str::to_string);
    Some(Peek {
        kid: text("kid"),
        alg: text("alg"),
        payload,
    })
}

/// An OAuth error response's `error` and `error_description`.
fn error_fields<T: ErrorResponse>(response: &T) -> (String, Option<String>) {
    let value = serde_json::to_value(response).unwrap_or(Value::Null);
    let error = value
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("unknown_error")
        .to_string();
    let description = value
        .get("error_description")
        .and_then(Value::as_str)
        .map(str::to_string);
    (error, description)
}

/// What to do about an OAuth error at a given step.
fn hint_for(during: &'static str, error: &str) -> &'static str {
    match (during, error) {
        (_, "invalid_client" | "unauthorized_client") => {
            ": check `client_id` and `client_secret` in the authority's [oidc] configuration and the client's registration at the provider (allowed grant types, public or confidential)"
        }
        ("code exchange", "invalid_grant") => {
            ": the code was already used or expired, or the PKCE verifier or redirect URI does not match; log in again"
        }
        (_, "invalid_scope") => {
            ": a scope in `scopes` is not allowed for this client at the provider"
        }
        _ => "",
    }
}

/// Maps a failed token-endpoint request to an error. Never includes the
/// response body (it could hold tokens).
fn token_error<T: ErrorResponse>(
    during: &'static str,
    e: RequestTokenError<HttpError, T>,
) -> OidcError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let (error, description) = error_fields(&r);
            OidcError::ProviderRefused {
                during,
                hint: hint_for(during, &error),
                error,
                description,
            }
        }
        RequestTokenError::Request(e) => OidcError::ProviderUnreachable {
            during,
            reason: error_chain(&e),
        },
        RequestTokenError::Parse(e, _body) => OidcError::BadProviderResponse {
            during,
            reason: format!("cannot parse the answer: {e}"),
        },
        RequestTokenError::Other(m) => OidcError::BadProviderResponse { during, reason: m },
    }
}

fn describe_discovery_error(e: &DiscoveryError<HttpError>) -> String {
    match e {
        DiscoveryError::Request(e) => format!("request failed: {}", error_chain(e)),
        DiscoveryError::Response(status, _, msg) => format!("HTTP {status}: {msg}"),
        DiscoveryError::Parse(e) => format!("its answer does not parse: {e}"),
        DiscoveryError::UrlParse(e) => format!("bad URL: {e}"),
        DiscoveryError::Validation(m) => m.clone(),
        other => other.to_string(),
    }
}

/// An error and its sources, joined with ": ".
fn error_chain(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Endpoints the authority talks to, or sends browsers to: https, or http
/// on loopback.
fn check_endpoint(url: &Url) -> Result<(), String> {
    if url.scheme() == "https" || (url.scheme() == "http" && is_loopback_host(url)) {
        Ok(())
    } else {
        Err(format!("{url} must use https"))
    }
}

/// 256 random bits, base64url.
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) use postern_identity::time::unix_now;

/// Locks a mutex; the data stays consistent even if a holder panicked (every
/// critical section is a single map or field update).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
impl OidcVerifier {
    /// A verifier with fixed endpoints and keys and no provider behind it.
    fn offline(config: OidcConfig, keys: CoreJsonWebKeySet) -> Self {
        let url = |p: &str| format!("{}{p}", config.issuer_url());
        OidcVerifier {
            issuer: IssuerUrl::new(config.issuer_url().to_string()).expect("issuer"),
            authorization_endpoint: url("/auth"),
            token_endpoint: TokenUrl::new(url("/token")).expect("token url"),
            device_endpoint: None,
            jwks_uri: None,
            http: reqwest::Client::new(),
            keys: Mutex::new(Keys {
                set: keys,
                last_refetch: None,
            }),
            pending: Mutex::new(HashMap::new()),
            config,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openidconnect::core::{CoreHmacKey, CoreIdTokenClaims};
    use serde_json::json;

    const ISSUER: &str = "https://id.example.com";

    fn verifier() -> OidcVerifier {
        let config = OidcConfig::from_toml(&format!(
            "issuer_url = \"{ISSUER}\"\nclient_id = \"postern\"\n[claims]\ngroups = \"groups\"\n"
        ))
        .expect("config");
        OidcVerifier::offline(config, JsonWebKeySet::new(Vec::new()))
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn claims(now: u64) -> Value {
        json!({"iss": ISSUER, "aud": "postern", "sub": "alice", "iat": now, "exp": now + 300,
               "nonce": "n", "groups": ["a"]})
    }

    fn verify(v: &OidcVerifier, token: &str, now: u64) -> OidcError {
        v.verify_with_current_keys(token, Some("n"), now)
            .expect_err("must be refused")
    }

    #[test]
    fn hostile_tokens_are_refused_with_clear_errors() {
        let v = verifier();
        let now = 1_700_000_000;
        let e = verify(&v, "", now);
        assert!(matches!(e, OidcError::MalformedIdToken(_)), "{e}");
        let e = verify(&v, "a.b.c", now);
        assert!(matches!(e, OidcError::MalformedIdToken(_)), "{e}");
        let e = verify(&v, &"x".repeat(MAX_ID_TOKEN_LEN + 1), now);
        assert!(matches!(e, OidcError::IdTokenTooLarge { .. }), "{e}");

        // alg=none, with or without a signature part.
        let none = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims(now)));
        let e = verify(&v, &none, now);
        assert!(matches!(e, OidcError::DisallowedAlgorithm(_)), "{e}");

        // Garbage of every kind in header and payload never panics.
        for header in [
            json!({"alg": "RS256"}),
            json!({"alg": 5}),
            json!([]),
            json!({"alg": "RS256", "crit": ["x"]}),
        ] {
            for payload in [claims(now), json!({}), json!({"exp": "soon"}), json!(null)] {
                let t = format!("{}.{}.{}", b64(&header), b64(&payload), "AAAA");
                let _ = verify(&v, &t, now).to_string();
            }
        }
    }

    #[test]
    fn hmac_tokens_are_refused_even_when_the_mac_is_right() {
        let v = verifier();
        let now = 1_700_000_000;
        let claims: CoreIdTokenClaims = serde_json::from_value(claims(now)).expect("claims");
        let key = CoreHmacKey::new(b"client secret known to everyone".to_vec());
        let token = CoreIdToken::new(
            claims,
            &key,
            CoreJwsSigningAlgorithm::HmacSha256,
            None,
            None,
        )
        .expect("sign")
        .to_string();
        let e = verify(&v, &token, now);
        assert!(
            matches!(e, OidcError::DisallowedAlgorithm(ref a) if a.contains("HS256")),
            "{e}"
        );
    }

    #[test]
    fn issuer_and_audience_errors_name_both_values() {
        let v = verifier();
        let now = 1_700_000_000;
        let mut c = claims(now);
        c["iss"] = json!("https://evil.example");
        let t = format!("{}.{}.AAAA", b64(&json!({"alg": "RS256"})), b64(&c));
        let e = verify(&v, &t, now).to_string();
        assert!(e.contains("evil.example") && e.contains(ISSUER), "{e}");
        let mut c = claims(now);
        c["aud"] = json!(["other-app"]);
        let t = format!("{}.{}.AAAA", b64(&json!({"alg": "RS256"})), b64(&c));
        let e = verify(&v, &t, now).to_string();
        assert!(
            e.contains("other-app") && e.contains("postern") && e.contains("client_id"),
            "{e}"
        );
    }

    #[test]
    fn logins_are_single_use_expire_and_are_bounded() {
        let v = verifier();
        let now = 1_700_000_000;
        let c = v.new_login(now).expect("login");
        assert_eq!(c.client_id, "postern");
        assert_eq!(c.nonce.len(), 43);
        assert!(v.take_login(&c.nonce, now + 1).is_ok());
        assert!(matches!(
            v.take_login(&c.nonce, now + 1),
            Err(OidcError::UnknownLogin)
        ));
        let c = v.new_login(now).expect("login");
        assert!(matches!(
            v.take_login(&c.nonce, now + LOGIN_TTL.as_secs()),
            Err(OidcError::UnknownLogin)
        ));
        assert!(matches!(
            v.take_login("made-up", now),
            Err(OidcError::UnknownLogin)
        ));
        // A cancelled login is gone.
        let c = v.new_login(now).expect("login");
        assert!(v.cancel_login(&c.nonce));
        assert!(!v.cancel_login(&c.nonce));
        assert!(matches!(
            v.take_login(&c.nonce, now),
            Err(OidcError::UnknownLogin)
        ));
        for _ in 0..MAX_PENDING_LOGINS {
            v.new_login(now).expect("room");
        }
        assert!(matches!(v.new_login(now), Err(OidcError::TooManyLogins(_))));
        // Expired ones make room again.
        assert!(v.new_login(now + LOGIN_TTL.as_secs() + 1).is_ok());
    }

    #[test]
    fn redirect_uri_must_match_the_configuration() {
        let v = verifier();
        assert!(v.check_redirect("http://127.0.0.1:4567/callback").is_ok());
        for bad in [
            "http://127.0.0.1:4567/other",
            "http://[::1]:4567/callback",
            "https://127.0.0.1:4567/callback",
            "http://evil.example/callback",
            "http://127.0.0.1:4567/callback?x=1",
            "nonsense",
        ] {
            let e = v.check_redirect(bad).expect_err(bad);
            assert!(matches!(e, OidcError::BadGrant(_)), "{bad}: {e}");
        }
    }
}
