//! OpenID Connect login against a real provider: the npm package
//! `oidc-provider` (OpenID Certified), started for each test on a random
//! loopback port by `support::oidc` (run `scripts/setup.sh` once to install
//! it). A scripted user drives its login, consent and device-code forms
//! over HTTP, as a person would in a browser.
//!
//! Covered: the browser flow (authorization code + PKCE on a loopback
//! redirect, nonce issued by the authority and single use, a stray request
//! to the loopback listener ignored) with the `groups` claim mapped to
//! attributes; an e-mail address the provider did not verify never naming
//! the person; the device flow; and, through an authority service behind
//! a relay, the device flow refused unless the configuration allows it (the
//! prompt naming the identity enrolled when it does) and pending logins
//! capped per identity, an abandoned one freeing its place; refresh, and its
//! refusal once the user is disabled at the provider; a confidential
//! client; and refusals with a clear reason for an ID token issued to
//! another application (wrong audience), an expired one, one issued "in the
//! future", one whose nonce belongs to another login, and tokens signed by a
//! key that is not the provider's (same key id, and unknown key id).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, ensure, Context, Result};
use openidconnect::core::{
    CoreIdToken, CoreIdTokenClaims, CoreJwsSigningAlgorithm, CoreRsaPrivateSigningKey,
};
use openidconnect::JsonWebKeyId;
use postern_authority::oidc::{
    browser_login, CodeGrant, LoginChallenge, OidcConfig, OidcError, OidcVerifier,
};
use postern_identity::authority_wire::{AuthorityReply, AuthorityRequest};
use postern_identity::wire::RefusalCode;
use postern_identity::AttrValue;
use postern_identity::Identity;
use serde_json::json;
use support::authority::{OpenChannel, TestAuthority};
use support::net::TestRelay;
use support::oidc::{
    foreign_rsa_key_pem, FakeUser, TestProvider, OTHER_CLIENT, OTHER_CLIENT_SECRET, PUBLIC_CLIENT,
};

/// How long the scripted browser may take for a login.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn verifier_for(
    provider: &TestProvider,
    client_id: &str,
    extra: &str,
) -> Result<OidcVerifier> {
    let config = OidcConfig::from_toml(&provider.config_toml(client_id, extra))?;
    Ok(OidcVerifier::discover(config).await?)
}

async fn postern_verifier(provider: &TestProvider) -> Result<OidcVerifier> {
    verifier_for(provider, PUBLIC_CLIENT, "").await
}

/// Runs the client's browser login with `user` at the "browser"; returns
/// the grant for the authority and the page the browser ended on.
async fn browser_grant(challenge: &LoginChallenge, user: &FakeUser) -> Result<(CodeGrant, String)> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let user = user.clone();
    let grant = browser_login(challenge, LOGIN_TIMEOUT, move |url| {
        let url = url.to_string();
        tokio::spawn(async move {
            let _ = tx.send(user.authorize(&url).await);
        });
    })
    .await?;
    let (landing, page) = rx.await.context("the scripted user vanished")??;
    ensure!(
        landing.host_str() == Some("127.0.0.1") && landing.path() == "/callback",
        "the browser ended at {landing}, not the loopback listener"
    );
    Ok((grant, page))
}

/// A genuine ID token for `postern-test`, redeemed straight at the token
/// endpoint, and the nonce of its login (still unused at the verifier).
async fn genuine_id_token(
    provider: &TestProvider,
    verifier: &OidcVerifier,
) -> Result<(String, String)> {
    let challenge = verifier.new_login(now())?;
    let (grant, _) = browser_grant(&challenge, &FakeUser::new("alice")?).await?;
    let tokens = provider
        .redeem(
            PUBLIC_CLIENT,
            None,
            grant.code.expose(),
            grant.pkce_verifier.expose(),
            &grant.redirect_uri,
        )
        .await?;
    let id_token = tokens["id_token"]
        .as_str()
        .ok_or_else(|| anyhow!("no id_token in {tokens}"))?
        .to_string();
    Ok((id_token, challenge.nonce))
}

fn groups(values: &[&str]) -> AttrValue {
    AttrValue::Many(values.iter().map(|s| s.to_string()).collect())
}

/// A request to the loopback listener from another local process, with a
/// made-up state; returns the page it got.
async fn stray_request(auth_url: &str) -> Result<String> {
    let auth = reqwest::Url::parse(auth_url)?;
    let redirect = auth
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned())
        .context("no redirect_uri")?;
    let res = reqwest::get(format!("{redirect}?state=x&code=stray")).await?;
    Ok(res.text().await?)
}

#[tokio::test]
async fn browser_login_with_pkce_maps_groups_to_attributes() -> Result<()> {
    let started = Instant::now();
    let provider = TestProvider::start()?;
    let verifier = postern_verifier(&provider).await?;

    let challenge = verifier.new_login(now())?;
    assert_eq!(challenge.client_id, PUBLIC_CLIENT);
    // A stray `GET /callback?state=x` first: ignored, and the real login
    // that follows goes through.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let user = FakeUser::new("alice")?;
    let grant = browser_login(&challenge, LOGIN_TIMEOUT, move |url| {
        let url = url.to_string();
        tokio::spawn(async move {
            let stray = stray_request(&url).await;
            let _ = tx.send((stray, user.authorize(&url).await));
        });
    })
    .await?;
    let (stray, real) = rx.await.context("the scripted user vanished")?;
    let stray = stray?;
    assert!(stray.contains("was ignored"), "{stray}");
    let (_, page) = real?;
    assert!(page.contains("Login complete"), "browser page: {page}");
    assert!(grant.redirect_uri.starts_with("http://127.0.0.1:"));

    let login = verifier.exchange_code(grant.clone(), now()).await?;
    let who = &login.login;
    assert_eq!(who.issuer, provider.issuer());
    assert_eq!(who.subject, "alice");
    assert_eq!(who.name, "alice@example.com");
    assert_eq!(
        who.attributes.get("groups"),
        Some(&groups(&["analysts", "oncall"]))
    );
    assert_eq!(
        who.attributes.get("team"),
        Some(&AttrValue::One("analytics".into()))
    );
    assert_eq!(who.attributes.len(), 2);
    assert!(who.expires_at > now() && who.issued_at <= now() + 1);
    assert!(
        login.refresh_token.is_some(),
        "offline_access granted a refresh token"
    );

    // The login's nonce is single use: replaying the grant is refused
    // before the provider is even asked.
    let err = verifier.exchange_code(grant, now()).await.unwrap_err();
    assert!(matches!(err, OidcError::UnknownLogin), "{err}");
    assert!(err.to_string().contains("start the login again"), "{err}");

    // Another user gets their own groups.
    let challenge = verifier.new_login(now())?;
    let (grant, _) = browser_grant(&challenge, &FakeUser::new("bob")?).await?;
    let bob = verifier.exchange_code(grant, now()).await?.login;
    assert_eq!(bob.subject, "bob");
    assert_eq!(bob.attributes.get("groups"), Some(&groups(&["engineers"])));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn an_unverified_email_does_not_name_the_person() -> Result<()> {
    let provider = TestProvider::start()?;
    // carol's profile says ceo@example.com, which the provider never
    // verified: the name falls back to her username.
    let verifier = postern_verifier(&provider).await?;
    let challenge = verifier.new_login(now())?;
    let (grant, _) = browser_grant(&challenge, &FakeUser::new("carol")?).await?;
    let login = verifier.exchange_code(grant, now()).await?.login;
    assert_eq!(login.name, "carol");
    // The canary: alice's verified address does name her.
    let challenge = verifier.new_login(now())?;
    let (grant, _) = browser_grant(&challenge, &FakeUser::new("alice")?).await?;
    assert_eq!(
        verifier.exchange_code(grant, now()).await?.login.name,
        "alice@example.com"
    );

    // With `name_claim = "email"`, carol is refused, with the reason.
    let strict = verifier_for(&provider, PUBLIC_CLIENT, "name_claim = \"email\"").await?;
    let challenge = strict.new_login(now())?;
    let (grant, _) = browser_grant(&challenge, &FakeUser::new("carol")?).await?;
    let err = strict.exchange_code(grant, now()).await.unwrap_err();
    assert!(matches!(err, OidcError::EmailNotVerified(_)), "{err}");
    assert!(err.to_string().contains("not verified"), "{err}");
    Ok(())
}

/// An authority service with this provider, behind a relay.
async fn oidc_authority(
    provider: &TestProvider,
    extra: &str,
) -> Result<(TestRelay, TestAuthority)> {
    let verifier = std::sync::Arc::new(verifier_for(provider, PUBLIC_CLIENT, extra).await?);
    let relay = TestRelay::start().await?;
    let authority = TestAuthority::start(&relay, |s| s.with_oidc(verifier)).await?;
    Ok((relay, authority))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_flow_is_refused_unless_allowed() -> Result<()> {
    let provider = TestProvider::start()?;
    let node = Identity::generate();
    let start = AuthorityRequest::OidcStart { device: true };

    let (_relay, authority) = oidc_authority(&provider, "").await?;
    let mut channel = OpenChannel::open(&node, &authority.route, start.clone()).await?;
    match channel.next(Duration::from_secs(10)).await? {
        AuthorityReply::Refused { code, reason } => {
            assert_eq!(code, RefusalCode::Denied);
            assert!(
                reason.contains("allow_device_flow") && reason.contains("without --device"),
                "{reason}"
            );
        }
        other => panic!("the device flow was not refused: {other:?}"),
    }

    // Allowed: the prompt names the identity being enrolled.
    let (_relay, authority) = oidc_authority(&provider, "allow_device_flow = true").await?;
    let mut channel = OpenChannel::open(&node, &authority.route, start).await?;
    match channel.next(Duration::from_secs(10)).await? {
        AuthorityReply::OidcDevice { prompt } => {
            assert_eq!(prompt.enrolling, Some(node.identifier()));
            assert!(!prompt.user_code.is_empty());
        }
        other => panic!("no device prompt: {other:?}"),
    }
    channel.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_logins_are_capped_per_identity_and_an_abandoned_one_frees_its_place() -> Result<()>
{
    let provider = TestProvider::start()?;
    let (_relay, authority) = oidc_authority(&provider, "").await?;
    let start = AuthorityRequest::OidcStart { device: false };
    let wait = Duration::from_secs(10);
    let mallory = Identity::generate();
    let open = |who: Identity| {
        let (route, start) = (authority.route.clone(), start.clone());
        async move { OpenChannel::open(&who, &route, start).await }
    };

    // Two logins left waiting for a person: both get their challenge.
    let mut pending = Vec::new();
    for _ in 0..2 {
        let mut login = open(mallory.clone()).await?;
        match login.next(wait).await? {
            AuthorityReply::OidcLogin { .. } => pending.push(login),
            other => panic!("{other:?}"),
        }
    }
    // A third is refused with a Limit code, saying why.
    let mut third = open(mallory.clone()).await?;
    match third.next(wait).await? {
        AuthorityReply::Refused { code, reason } => {
            assert_eq!(code, RefusalCode::Limit);
            assert!(reason.contains("logins waiting"), "{reason}");
        }
        other => panic!("a third pending login was accepted: {other:?}"),
    }
    // Someone else is not affected.
    let mut alice = open(Identity::generate()).await?;
    assert!(matches!(
        alice.next(wait).await?,
        AuthorityReply::OidcLogin { .. }
    ));

    // Mallory abandons one (closes `postern enroll`): its place is free.
    if let Some(abandoned) = pending.pop() {
        abandoned.close().await;
    }
    let deadline = Instant::now() + wait;
    loop {
        let mut again = open(mallory.clone()).await?;
        match again.next(wait).await? {
            AuthorityReply::OidcLogin { .. } => break,
            AuthorityReply::Refused { .. } if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("the abandoned login kept its place: {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn device_flow_login_maps_groups() -> Result<()> {
    let started = Instant::now();
    let provider = TestProvider::start()?;
    let verifier = postern_verifier(&provider).await?;
    assert!(verifier.supports_device_flow());

    let device = verifier.start_device_login(now()).await?;
    let prompt = device.prompt().clone();
    assert!(!prompt.user_code.is_empty());
    assert!(prompt.verification_uri.starts_with(provider.issuer()));
    assert!(prompt.expires_at > now());

    // The authority polls while the person, elsewhere, enters the code: the
    // first poll is answered "authorization_pending", a later one succeeds.
    let user = FakeUser::new("alice")?;
    let polling = verifier.finish_device_login(device);
    tokio::pin!(polling);
    let approval = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        user.approve_device(&prompt.verification_uri, &prompt.user_code)
            .await
    };
    let login = tokio::select! {
        early = &mut polling => panic!("polling ended before the approval: {early:?}"),
        approved = approval => {
            approved.with_context(|| format!("approving the device login; provider log:\n{}", provider.log()))?;
            tokio::time::timeout(Duration::from_secs(8), polling)
                .await
                .context("no login within 8 s of the approval")??
        }
    };
    assert_eq!(login.login.subject, "alice");
    assert_eq!(
        login.login.attributes.get("groups"),
        Some(&groups(&["analysts", "oncall"]))
    );
    assert!(login.refresh_token.is_some());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn refresh_works_until_the_user_is_disabled_at_the_provider() -> Result<()> {
    let provider = TestProvider::start()?;
    let verifier = postern_verifier(&provider).await?;
    let challenge = verifier.new_login(now())?;
    let (grant, _) = browser_grant(&challenge, &FakeUser::new("alice")?).await?;
    let login = verifier.exchange_code(grant, now()).await?;
    let token = login.refresh_token.context("a refresh token")?;

    let refreshed = verifier.refresh(&token, "alice", now()).await?;
    assert_eq!(refreshed.login.subject, "alice");
    assert_eq!(
        refreshed.login.attributes.get("groups"),
        Some(&groups(&["analysts", "oncall"]))
    );
    // oidc-provider rotates the refresh tokens of public clients.
    let token = refreshed.refresh_token.unwrap_or(token);

    // Renewal must name the same person.
    let err = verifier
        .refresh(&token, "mallory", now())
        .await
        .unwrap_err();
    assert!(matches!(err, OidcError::SubjectChanged { .. }), "{err}");

    let challenge = verifier.new_login(now())?;
    let (grant, _) = browser_grant(&challenge, &FakeUser::new("alice")?).await?;
    let token = verifier
        .exchange_code(grant, now())
        .await?
        .refresh_token
        .context("a refresh token")?;
    provider.disable("alice").await?;
    let err = verifier.refresh(&token, "alice", now()).await.unwrap_err();
    assert!(matches!(err, OidcError::RefreshRefused { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("invalid_grant")
            && text.contains("disabled")
            && text.contains("log in again"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn id_token_for_another_application_is_refused() -> Result<()> {
    let provider = TestProvider::start()?;
    let verifier = postern_verifier(&provider).await?;
    let other = verifier_for(
        &provider,
        OTHER_CLIENT,
        &format!("client_secret = \"{OTHER_CLIENT_SECRET}\""),
    )
    .await?;
    let user = FakeUser::new("alice")?;

    // A confidential client's authority redeems codes with its secret.
    let challenge = other.new_login(now())?;
    let (grant, _) = browser_grant(&challenge, &user).await?;
    assert_eq!(
        other.exchange_code(grant, now()).await?.login.subject,
        "alice"
    );

    // A genuine ID token issued to the other application, presented to
    // Postern's verifier: valid signature, issuer, time and nonce, wrong
    // audience.
    let challenge = other.new_login(now())?;
    let (grant, _) = browser_grant(&challenge, &user).await?;
    let tokens = provider
        .redeem(
            OTHER_CLIENT,
            Some(OTHER_CLIENT_SECRET),
            grant.code.expose(),
            grant.pkce_verifier.expose(),
            &grant.redirect_uri,
        )
        .await?;
    let id_token = tokens["id_token"].as_str().context("id_token")?;
    other
        .verify_id_token(id_token, Some(&challenge.nonce), now())
        .await
        .context("the token is fine for its own audience")?;
    let err = verifier
        .verify_id_token(id_token, Some(&challenge.nonce), now())
        .await
        .unwrap_err();
    assert!(matches!(err, OidcError::WrongAudience { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(OTHER_CLIENT) && text.contains(PUBLIC_CLIENT) && text.contains("client_id"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn expired_id_token_is_refused() -> Result<()> {
    let provider = TestProvider::start()?;
    let verifier = postern_verifier(&provider).await?;
    let (id_token, nonce) = genuine_id_token(&provider, &verifier).await?;
    let fresh = verifier
        .verify_id_token(&id_token, Some(&nonce), now())
        .await?;

    // Within the clock-skew allowance it still passes; an hour later not.
    verifier
        .verify_id_token(&id_token, Some(&nonce), fresh.expires_at + 30)
        .await?;
    let err = verifier
        .verify_id_token(&id_token, Some(&nonce), fresh.expires_at + 3600)
        .await
        .unwrap_err();
    assert!(
        matches!(err, OidcError::Expired { expired_at, .. } if expired_at == fresh.expires_at),
        "{err}"
    );
    assert!(err.to_string().contains("expired"), "{err}");

    // A token "from the future" (the authority's clock an hour behind).
    let err = verifier
        .verify_id_token(&id_token, Some(&nonce), fresh.issued_at - 3600)
        .await
        .unwrap_err();
    assert!(matches!(err, OidcError::IssuedInFuture { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn nonce_of_another_login_is_refused() -> Result<()> {
    let provider = TestProvider::start()?;
    let verifier = postern_verifier(&provider).await?;
    let (id_token, nonce) = genuine_id_token(&provider, &verifier).await?;
    verifier
        .verify_id_token(&id_token, Some(&nonce), now())
        .await?;

    let another = verifier.new_login(now())?.nonce;
    let err = verifier
        .verify_id_token(&id_token, Some(&another), now())
        .await
        .unwrap_err();
    assert!(matches!(err, OidcError::NonceMismatch), "{err}");
    assert!(err.to_string().contains("nonce"), "{err}");
    Ok(())
}

#[tokio::test]
async fn token_signed_by_another_key_is_refused() -> Result<()> {
    let provider = TestProvider::start()?;
    let verifier = postern_verifier(&provider).await?;
    let pem = foreign_rsa_key_pem()?;
    let t = now();
    // Everything right but the key: the claims of a real login for alice,
    // plus an attacker's wish list of groups.
    let mint = |kid: &str| -> Result<String> {
        let claims: CoreIdTokenClaims = serde_json::from_value(json!({
            "iss": provider.issuer(), "aud": PUBLIC_CLIENT, "sub": "alice",
            "iat": t, "exp": t + 300, "nonce": "n", "groups": ["admins"],
        }))?;
        let key =
            CoreRsaPrivateSigningKey::from_pem(&pem, Some(JsonWebKeyId::new(kid.to_string())))
                .map_err(|e| anyhow!(e))?;
        Ok(CoreIdToken::new(
            claims,
            &key,
            CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
            None,
            None,
        )?
        .to_string())
    };

    // Claiming the provider's key id: the signature does not verify.
    let err = verifier
        .verify_id_token(&mint(provider.kid())?, Some("n"), t)
        .await
        .unwrap_err();
    assert!(matches!(err, OidcError::BadSignature { .. }), "{err}");
    assert!(err.to_string().contains("forged"), "{err}");

    // An unknown key id: the verifier fetches the provider's keys again (key
    // rotation), still finds no such key, and refuses.
    let err = verifier
        .verify_id_token(&mint("attacker-key")?, Some("n"), t)
        .await
        .unwrap_err();
    assert!(matches!(err, OidcError::UnknownSigningKey { .. }), "{err}");
    assert!(err.to_string().contains("attacker-key"), "{err}");
    Ok(())
}
