//! Enrolling by logging in at the authority's OpenID provider: the node's
//! side of `OidcStart`/`OidcFinish` (see [`crate::service`]), for
//! `postern enroll --oidc`.
//!
//! Both flows run on one end-to-end channel to the authority
//! (`postern_node::authority::with_channel`). The browser flow runs the
//! person's part here ([`crate::oidc::browser_login`]: browser, PKCE,
//! loopback redirect) and hands the authorization code to the authority,
//! which redeems it; the device flow only shows the code the authority got
//! from the provider. Either way the authority verifies the ID token and
//! issues the credential, which is checked to be ours before it is
//! returned. Tokens never reach this side.

use std::sync::Arc;
use std::time::Duration;

use postern_identity::authority_wire::{AuthorityReply, AuthorityRequest, DevicePrompt};
use postern_identity::credential::SignedCredential;
use postern_identity::handshake::LocalParty;
use postern_identity::time::unix_now;
use postern_node::authority::{
    answer_wait, check_own_credential, expect_credential, with_channel, AuthorityChannel,
    AuthorityRoute, EnrollError,
};
use postern_node::Timeouts;

use crate::oidc::{self, OidcError};

/// Why an OpenID Connect enrollment failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OidcEnrollError {
    /// The relay or the channel to the authority failed, or the authority
    /// refused or answered something unexpected.
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    /// The person's part of an OpenID Connect login failed (no browser
    /// login in time, a forged redirect, …).
    #[error(transparent)]
    Login(#[from] OidcError),
}

/// Enrolls by logging in at the authority's OpenID provider in a browser:
/// the authority sends the login's parameters, `present` gets the
/// authorization URL to show (print it, open a browser:
/// [`oidc::show_login_url`]), the provider redirects the browser to a
/// listener on `127.0.0.1` (RFC 8252), and the authority redeems the code,
/// verifies the ID token and issues the credential. Waits at most
/// `login_timeout` for the browser.
pub async fn enroll_oidc_browser<F>(
    local: &Arc<LocalParty>,
    route: &AuthorityRoute,
    timeouts: &Timeouts,
    login_timeout: Duration,
    present: F,
) -> Result<SignedCredential, OidcEnrollError>
where
    F: FnOnce(&str),
{
    let wait = answer_wait(timeouts);
    let credential = with_channel::<_, OidcEnrollError, _>(
        local,
        route,
        timeouts,
        async |channel: &mut AuthorityChannel| {
            channel
                .send(&AuthorityRequest::OidcStart { device: false })
                .await?;
            let challenge = match channel.reply(wait).await? {
                AuthorityReply::OidcLogin { challenge } => challenge,
                AuthorityReply::Refused { reason, .. } => {
                    return Err(EnrollError::Refused(reason).into())
                }
                other => {
                    return Err(EnrollError::Protocol(format!(
                        "{} instead of a browser login",
                        other.kind()
                    ))
                    .into())
                }
            };
            // The authority forgets the login at its expiry.
            let left = Duration::from_secs(challenge.expires_at.saturating_sub(unix_now()));
            let grant = oidc::browser_login(&challenge, login_timeout.min(left), present).await?;
            channel
                .send(&AuthorityRequest::OidcFinish { grant })
                .await?;
            Ok(expect_credential(channel.reply(wait).await?)?)
        },
    )
    .await?;
    Ok(check_own_credential(local, route, credential)?)
}

/// Enrolls with the OpenID provider's device flow (RFC 8628), for a machine
/// without a browser: `show` gets the code, the address where the person
/// enters it on any device, and the identity being enrolled
/// ([`oidc::show_device_prompt`] prints them, with a warning against
/// entering a code someone else sent); the authority polls the provider and
/// issues the credential once the person approved, before the code expires.
/// The authority must allow the device flow (`allow_device_flow`).
pub async fn enroll_oidc_device<F>(
    local: &Arc<LocalParty>,
    route: &AuthorityRoute,
    timeouts: &Timeouts,
    show: F,
) -> Result<SignedCredential, OidcEnrollError>
where
    F: FnOnce(&DevicePrompt),
{
    let wait = answer_wait(timeouts);
    let credential = with_channel::<_, OidcEnrollError, _>(
        local,
        route,
        timeouts,
        async |channel: &mut AuthorityChannel| {
            channel
                .send(&AuthorityRequest::OidcStart { device: true })
                .await?;
            let prompt = match channel.reply(wait).await? {
                AuthorityReply::OidcDevice { prompt } => prompt,
                AuthorityReply::Refused { reason, .. } => {
                    return Err(EnrollError::Refused(reason).into())
                }
                other => {
                    return Err(EnrollError::Protocol(format!(
                        "{} instead of a device login",
                        other.kind()
                    ))
                    .into())
                }
            };
            // The authority names the identity its channel authenticated:
            // ours, or something is wrong between us.
            let own = local.identity().identifier();
            if let Some(other) = prompt.enrolling.filter(|who| *who != own) {
                return Err(EnrollError::Protocol(format!(
                    "the authority's device login enrolls {other}, not this machine's {own}"
                ))
                .into());
            }
            show(&prompt);
            // The authority answers when the person approved, declined, or the
            // code expired; then it still verifies the ID token.
            let until_expiry = Duration::from_secs(prompt.expires_at.saturating_sub(unix_now()));
            Ok(expect_credential(
                channel.reply(until_expiry + wait).await?,
            )?)
        },
    )
    .await?;
    Ok(check_own_credential(local, route, credential)?)
}
