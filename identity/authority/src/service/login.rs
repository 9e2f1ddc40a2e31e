//! OpenID Connect on the authority's channels: a login (browser or device
//! flow) and the renewal that re-checks a login at the provider.

use std::sync::Arc;
use std::time::Duration;

use postern_identity::authority_wire::{AuthorityReply, AuthorityRequest};
use postern_identity::credential::SignedCredential;
use postern_identity::time::unix_now;
use postern_identity::Identifier;
use postern_node::authority::{recv_message, send_message};
use postern_node::service::DataChannel;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::AuthorityService;
use crate::oidc::{OidcError, OidcLogin};
use crate::{AuthorityError, MemberSource};

/// How long a browser login may take at most, from `OidcStart` to
/// `OidcFinish` (the challenge's own expiry is usually sooner).
const MAX_BROWSER_LOGIN: Duration = crate::oidc::LOGIN_TTL;

/// Renews `node`'s credential: a member enrolled with OpenID Connect only
/// after the provider accepted its refresh token again. Returns the audit
/// method (`renew` or `renew-oidc`) and the result. Every store call runs
/// off the async threads.
pub(super) async fn renew_member(
    service: &AuthorityService,
    node: Identifier,
) -> (&'static str, Result<SignedCredential, AuthorityError>) {
    let authority = &service.authority;
    let member = match authority.blocking(move |a| a.renewable_member(node)).await {
        Ok(member) => member,
        Err(e) => return ("renew", Err(e)),
    };
    let MemberSource::Oidc { issuer, subject } = member.source else {
        let issued = authority
            .blocking(move |a| a.issue_for_member(node, unix_now()))
            .await;
        return ("renew", issued);
    };
    let method = "renew-oidc";
    let required = |reason: String| {
        Err(AuthorityError::OidcLoginRequired {
            subject: node,
            reason,
        })
    };
    let Some(verifier) = &service.oidc else {
        return (
            method,
            required("this authority now runs without an OpenID provider (--oidc-config)".into()),
        );
    };
    if verifier.issuer() != issuer {
        return (
            method,
            required(format!(
                "it logged in at {issuer}, and this authority now uses {}",
                verifier.issuer()
            )),
        );
    }
    let lock = {
        let mut map = service.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, l| Arc::strong_count(l) > 1);
        Arc::clone(map.entry(node).or_default())
    };
    let _one_at_a_time = lock.lock().await;
    let session = match authority
        .blocking(move |a| a.oidc_refresh_token(&node))
        .await
    {
        Ok(session) => session,
        Err(e) => return (method, Err(e)),
    };
    let token = match session {
        None => {
            return (
                method,
                required("the authority holds no login for it".into()),
            )
        }
        Some((session, None)) => {
            let reason = match session.refresh_refused_at {
                Some(at) => format!(
                    "the provider refused the login at {}: the user was disabled or signed out there",
                    postern_identity::credential::format_timestamp(at)
                ),
                None => "the provider issued no refresh token; add offline_access to `scopes` in the authority's OIDC configuration".into(),
            };
            return (method, required(reason));
        }
        Some((_, Some(token))) => token,
    };
    match verifier.refresh(&token, &subject, unix_now()).await {
        Ok(OidcLogin {
            login,
            refresh_token,
        }) => (
            method,
            authority
                .blocking(move |a| a.renew_oidc(node, &login, refresh_token, unix_now()))
                .await,
        ),
        Err(e) => {
            if matches!(e, OidcError::RefreshRefused { .. }) {
                // The token will never work again: later attempts are
                // refused without bothering the provider.
                let forget = authority
                    .blocking(move |a| a.oidc_refresh_refused(&node, unix_now()))
                    .await;
                if let Err(forget) = forget {
                    warn!(%node, error = %forget, "cannot forget a refused refresh token");
                }
            }
            (method, Err(e.into()))
        }
    }
}

/// Runs an OpenID Connect login for `node` on `channel`. `Ok(None)`: the
/// client went away (or the authority is stopping) before it finished.
pub(super) async fn oidc_login(
    service: &AuthorityService,
    node: Identifier,
    channel: &mut DataChannel,
    plain: &mut [u8],
    device: bool,
    stop: &CancellationToken,
) -> Result<Option<OidcLogin>, AuthorityError> {
    let Some(verifier) = service.oidc.as_deref() else {
        return Err(AuthorityError::OidcUnavailable);
    };
    if device {
        if !verifier.config().allow_device_flow() {
            return Err(OidcError::DeviceFlowNotAllowed.into());
        }
        let login = verifier.start_device_login(unix_now()).await?;
        let mut prompt = login.prompt().clone();
        prompt.enrolling = Some(node);
        if let Err(e) = send_message(channel, &AuthorityReply::OidcDevice { prompt }).await {
            debug!(error = %e, "OpenID Connect login channel failed");
            return Ok(None);
        }
        let result = tokio::select! {
            () = stop.cancelled() => return Ok(None),
            // The client sends nothing more: anything, or its hang-up, ends
            // the login (and stops polling the provider).
            _ = channel.reader.next_frame(postern_identity::frame::MAX_NOISE_MESSAGE) => return Ok(None),
            result = verifier.finish_device_login(login) => result,
        };
        return Ok(Some(result?));
    }
    let challenge = verifier.new_login(unix_now())?;
    let nonce = challenge.nonce.clone();
    let wait =
        Duration::from_secs(challenge.expires_at.saturating_sub(unix_now())).min(MAX_BROWSER_LOGIN);
    let grant = async {
        send_message(channel, &AuthorityReply::OidcLogin { challenge })
            .await
            .map_err(|e| {
                debug!(error = %e, "OpenID Connect login channel failed");
                None
            })?;
        let next = tokio::select! {
            () = stop.cancelled() => return Err(None),
            next = tokio::time::timeout(wait, recv_message::<AuthorityRequest>(channel, plain)) => next,
        };
        match next {
            Err(_) => Err(Some(OidcError::UnknownLogin)),
            Ok(Err(e)) => {
                debug!(error = %e, "OpenID Connect login channel failed");
                Err(None)
            }
            Ok(Ok(None)) => Err(None),
            // The login must be the one started on this channel.
            Ok(Ok(Some(AuthorityRequest::OidcFinish { grant }))) if grant.nonce == nonce => {
                Ok(grant)
            }
            Ok(Ok(Some(AuthorityRequest::OidcFinish { .. }))) => Err(Some(OidcError::UnknownLogin)),
            Ok(Ok(Some(_))) => Err(Some(OidcError::BadGrant(
                "expected the login's result (OidcFinish) on this channel".into(),
            ))),
        }
    }
    .await;
    match grant {
        Ok(grant) => Ok(Some(verifier.exchange_code(grant, unix_now()).await?)),
        Err(why) => {
            // Unfinished: free its place among the pending logins at once.
            verifier.cancel_login(&nonce);
            match why {
                Some(e) => Err(e.into()),
                None => Ok(None),
            }
        }
    }
}
