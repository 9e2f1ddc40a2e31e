//! The authority as a service behind a relay.
//!
//! The authority opens no port: like an outlet, it dials out to a relay and
//! registers a service name (by default `postern-authority`). Nodes reach it
//! through an end-to-end Noise channel pinned to the authority's identifier
//! (which an enrollment ticket carries), and exchange one CBOR message per
//! data frame ([`AuthorityRequest`], [`AuthorityReply`]):
//!
//! - `Redeem { code }` → `Credential`: enrollment with a one-time ticket code;
//!   the subject is the identity the handshake authenticated.
//! - `Renew` → `Credential`: a fresh credential for a current member. For a
//!   member that enrolled with OpenID Connect, the authority first asks the
//!   provider again with the refresh token it keeps, so a person disabled at
//!   the provider is refused here.
//! - `Revocations { after }` → `Revocations` now and whenever new ones are
//!   recorded, for as long as the channel stays open (relays and outlets
//!   keep one open to learn of revocations within seconds).
//! - `OidcStart { device: false }` → `OidcLogin { challenge }`, then, on the
//!   same channel, `OidcFinish { grant }` → `Credential`: the browser login.
//!   The client runs the person's part ([`crate::oidc::browser_login`]:
//!   browser, PKCE, loopback redirect) and sends back the authorization code
//!   and PKCE verifier; the authority redeems them at the provider, verifies
//!   the ID token (signature against the provider's keys, issuer, audience,
//!   expiry, and the nonce it issued for this channel), and keeps the
//!   refresh token. Tokens never reach the client.
//! - `OidcStart { device: true }` → `OidcDevice { prompt }`, then, when the
//!   person has approved the code at the provider, `Credential` (the device
//!   flow, RFC 8628: the authority polls the provider; the device code never
//!   leaves it).
//!
//! Every refusal is a `Refused { reason }` the node's user can act on.
//! With an audit log ([`AuthorityService::with_audit`]), every enrollment
//! attempt (allowed or refused, with the reason), renewal, issued credential
//! and revocation becomes one record; tokens, codes and secrets never do.
//!
//! The node's side of these exchanges (ticket enrollment, renewal, the
//! revocation feed) is `postern_node::authority`; the OpenID Connect
//! enrollment is [`crate::client`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use postern_identity::authority_wire::{AuthorityReply, AuthorityRequest};
use postern_identity::credential::{RevocationEntry, RevocationTarget, SignedCredential};
use postern_identity::handshake::{ChannelKind, LocalParty};
use postern_identity::link;
use postern_identity::ticket::TicketCode;
use postern_identity::time::unix_now;
use postern_identity::wire::{Control, DataFrame, Hello, ServiceName, Side, TunnelToken};
use postern_identity::{Attributes, ChannelError, Identifier};
use postern_node::authority::{recv_message, send_message};
use postern_node::service::{Backoff, ChannelHalves, DataChannel, Hop, HopEvent};
use postern_node::{NodeError, RelayEndpoint, Timeouts};
use postern_policies::audit::{AuditEvent, AuditLog, Label, Verdict};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::oidc::{OidcError, OidcLogin, OidcVerifier};
use crate::{Authority, AuthorityError, MemberSource};

/// How often an open revocation feed looks for new revocations.
const FEED_POLL: Duration = Duration::from_secs(1);

use postern_identity::revocation::FEED_HEARTBEAT;
use postern_identity::wire::MAX_REVOCATIONS_PER_MESSAGE;

/// How long a browser login may take at most, from `OidcStart` to
/// `OidcFinish` (the challenge's own expiry is usually sooner).
const MAX_BROWSER_LOGIN: Duration = crate::oidc::LOGIN_TTL;

/// What the authority service serves with: the authority itself, and
/// optionally an OpenID provider for `postern enroll --oidc` and an audit
/// log.
#[derive(Debug, Clone)]
pub struct AuthorityService {
    authority: Arc<Authority>,
    oidc: Option<Arc<OidcVerifier>>,
    audit: Option<Arc<AuditLog>>,
    /// One refresh at a time per member: providers rotate refresh tokens,
    /// and two concurrent refreshes with the same token would make the
    /// second look like a replay (some providers then revoke the login).
    refreshing: Arc<StdMutex<HashMap<Identifier, Arc<tokio::sync::Mutex<()>>>>>,
}

impl AuthorityService {
    /// Tickets, renewals and revocation feeds; no OpenID Connect, no audit.
    pub fn new(authority: Arc<Authority>) -> Self {
        AuthorityService {
            authority,
            oidc: None,
            audit: None,
            refreshing: Arc::default(),
        }
    }

    /// Also logs people in with this OpenID provider
    /// (`postern enroll --oidc`), and re-checks their logins there on
    /// renewal.
    pub fn with_oidc(mut self, verifier: Arc<OidcVerifier>) -> Self {
        self.oidc = Some(verifier);
        self
    }

    /// Records every enrollment attempt, renewal, issued credential and
    /// revocation in `log`.
    pub fn with_audit(mut self, log: Arc<AuditLog>) -> Self {
        self.audit = Some(log);
        self
    }

    /// The authority.
    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// Appends `events`, in this order, off the async threads (each record
    /// is synced to disk). A failure to write is logged loudly.
    fn audit(&self, events: Vec<AuditEvent>) {
        let Some(log) = self.audit.clone() else {
            return;
        };
        let write = move || {
            for event in &events {
                if let Err(e) = log.record(event) {
                    error!(error = %e, "cannot write the audit log");
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(write);
            }
            Err(_) => write(),
        }
    }
}

/// The record of an enrollment (or renewal) decision.
fn enroll_event(
    subject: Identifier,
    method: &str,
    granted: Option<&Attributes>,
    reason: String,
) -> Option<AuditEvent> {
    Some(AuditEvent::Enroll {
        subject,
        method: Label::new(method)?,
        decision: if granted.is_some() {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        attrs: granted.cloned().unwrap_or_default(),
        reason,
    })
}

/// The record of an issued credential.
fn issue_event(credential: &SignedCredential) -> Option<AuditEvent> {
    let body = credential.inspect_unverified().ok()?;
    Some(AuditEvent::Issue {
        credential: Label::new(&body.id.to_string())?,
        subject: body.subject,
        issuer: body.issuer,
        attrs: body.attributes,
        expires: body.expires_at,
    })
}

/// The audit record of a revocation found in the store.
pub fn revoke_event(authority: &Authority, entry: &RevocationEntry, reason: String) -> AuditEvent {
    let (credential, subject) = match entry.revocation.target {
        RevocationTarget::Identity(id) => (None, Some(id)),
        RevocationTarget::Credential(id) => {
            let subject = authority
                .store()
                .issued_credential(&id)
                .ok()
                .flatten()
                .map(|r| r.subject);
            (Label::new(&id.to_string()), subject)
        }
    };
    AuditEvent::Revoke {
        credential,
        subject,
        by: Some(authority.identifier()),
        reason,
    }
}

/// Runs the authority behind `relay` under `service` until `stop`:
/// registers, serves every incoming channel, reconnects with back-off.
pub async fn serve(
    local: Arc<LocalParty>,
    authority: AuthorityService,
    relay: RelayEndpoint,
    service: ServiceName,
    timeouts: Timeouts,
    stop: CancellationToken,
) {
    let tasks = TaskTracker::new();
    let mut backoff = Backoff::new(&timeouts);
    info!(authority = %authority.authority.identifier(), %service, relay = %relay.address, "authority starting");
    if authority.audit.is_some() {
        tasks.spawn(audit_revocations(authority.clone(), stop.clone()));
    }
    while !stop.is_cancelled() {
        let ended =
            match postern_node::service::connect(&local, &relay, &timeouts, None, &stop).await {
                Ok((hop, events)) => {
                    session(
                        &local,
                        &authority,
                        &hop,
                        events,
                        &service,
                        &timeouts,
                        &tasks,
                        &mut backoff,
                        &stop,
                    )
                    .await
                }
                Err(e) => e.to_string(),
            };
        if stop.is_cancelled() {
            break;
        }
        let delay = backoff.next_delay();
        warn!(relay = %relay.address, reason = %ended, "relay session ended; reconnecting in {delay:.1?}");
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    tasks.close();
    tasks.wait().await;
    info!("authority stopped");
}

/// Audits every revocation recorded in the store while the authority runs,
/// including those `postern authority revoke` makes from another process.
async fn audit_revocations(service: AuthorityService, stop: CancellationToken) {
    let read = |after: u64| {
        let authority = Arc::clone(&service.authority);
        tokio::task::spawn_blocking(move || authority.revocations_since(after))
    };
    let mut seen = match read(0).await {
        Ok(Ok(entries)) => entries.last().map_or(0, |e| e.seq),
        Ok(Err(e)) => {
            warn!(error = %e, "cannot read revocations; revocations are not audited");
            return;
        }
        Err(_) => return,
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(FEED_POLL) => {}
        }
        let entries = match read(seen).await {
            Ok(Ok(entries)) => entries,
            Ok(Err(e)) => {
                debug!(error = %e, "cannot read revocations");
                continue;
            }
            Err(_) => return,
        };
        for entry in entries {
            seen = entry.seq;
            info!(target = %entry.revocation.target, seq = entry.seq, "revocation recorded");
            let reason = format!(
                "revoked by the authority's admin (revocation #{})",
                entry.seq
            );
            service.audit(vec![revoke_event(&service.authority, &entry, reason)]);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    local: &Arc<LocalParty>,
    authority: &AuthorityService,
    hop: &Arc<Hop>,
    mut events: tokio::sync::mpsc::Receiver<HopEvent>,
    service: &ServiceName,
    timeouts: &Timeouts,
    tasks: &TaskTracker,
    backoff: &mut Backoff,
    stop: &CancellationToken,
) -> String {
    if let Err(e) = hop
        .send(Control::Register {
            service: service.clone(),
        })
        .await
    {
        return e.to_string();
    }
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return "stopped".into(),
            () = hop.closed.cancelled() => break,
            event = events.recv() => event,
        };
        match event {
            None => break,
            Some(HopEvent::Registered(service)) => {
                backoff.reset();
                info!(%service, "authority registered at relay");
            }
            Some(HopEvent::RegisterRefused(service, reason)) => {
                error!(%service, %reason, "relay refused the authority's registration");
                return format!("registration refused: {reason}");
            }
            Some(HopEvent::FollowRevocations(after)) => {
                // The relay follows this authority's revocations on the hop
                // channel itself, for as long as it lives.
                let (authority, hop, stop) = (
                    Arc::clone(&authority.authority),
                    Arc::clone(hop),
                    stop.clone(),
                );
                tasks.spawn(async move { feed_relay(&authority, &hop, after, &stop).await });
            }
            Some(HopEvent::Incoming(_, token, _)) => {
                let (local, authority, hop) =
                    (Arc::clone(local), authority.clone(), Arc::clone(hop));
                let (service, timeouts, stop) = (service.clone(), timeouts.clone(), stop.clone());
                tasks.spawn(async move {
                    if let Err(e) =
                        serve_one(&local, &authority, &hop, token, &service, &timeouts, stop).await
                    {
                        debug!(error = %e, "authority channel ended with an error");
                    }
                });
            }
        }
    }
    hop.ended_because()
        .unwrap_or_else(|| "relay session closed".into())
}

async fn serve_one(
    local: &LocalParty,
    service: &AuthorityService,
    hop: &Hop,
    token: TunnelToken,
    service_name: &ServiceName,
    timeouts: &Timeouts,
    stop: CancellationToken,
) -> Result<(), NodeError> {
    let tunnel_error = |source| NodeError::Tunnel {
        service: service_name.clone(),
        source,
    };
    let (mut reader, mut writer) = hop.attach(local, timeouts, Side::Outlet, token).await?;
    let hello = Hello {
        service: Some(service_name.clone()),
        credential: None,
    };
    let handshake = link::respond(
        &mut reader,
        &mut writer,
        local,
        ChannelKind::EndToEnd,
        &hello,
    );
    let (peer, transport) = link::within(timeouts.handshake, "end-to-end handshake", handshake)
        .await
        .map_err(tunnel_error)?;
    let node = peer.identity.identifier();
    let (sealer, opener) = transport.split();
    let mut channel = ChannelHalves {
        reader,
        writer,
        sealer,
        opener,
    };
    let (mut scratch, mut out) = (Vec::new(), Vec::new());
    postern_node::service::send_frame(
        &mut channel.writer,
        &mut channel.sealer,
        &DataFrame::Ready,
        &mut scratch,
        &mut out,
    )
    .await
    .map_err(tunnel_error)?;
    let mut plain = vec![0u8; postern_identity::frame::MAX_NOISE_MESSAGE];
    let request = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        r = link::within(timeouts.handshake, "authority request", async {
            recv_message::<AuthorityRequest>(&mut channel, &mut plain).await.map_err(|e| link::LinkError::Channel(ChannelError::BadMessage(e.to_string())))
        }) => r.map_err(tunnel_error)?,
    };
    let Some(request) = request else {
        return Ok(());
    };
    let authority = &service.authority;
    let reply = match request {
        AuthorityRequest::Redeem { code } => {
            let code = TicketCode::from_bytes(code);
            let hash = code.hash();
            let result = authority.redeem_ticket(&code, node, unix_now());
            let detail = format!("ticket {}", hash.short());
            credential_reply(service, result, node, "ticket", &detail, "enrollment")
        }
        AuthorityRequest::Renew => {
            let (method, result) = renew_member(service, node).await;
            let detail = if method == "renew-oidc" {
                "renewal after the OpenID provider confirmed the login again"
            } else {
                "renewal of a current member"
            };
            credential_reply(service, result, node, method, detail, "renewal")
        }
        AuthorityRequest::Revocations { after } => {
            return feed(authority, &mut channel, after, &stop).await;
        }
        AuthorityRequest::OidcStart { device } => {
            let method = if device { "oidc-device" } else { "oidc" };
            let what = "OpenID Connect enrollment";
            match oidc_login(service, &mut channel, &mut plain, device, &stop).await {
                Ok(Some(OidcLogin {
                    login,
                    refresh_token,
                })) => {
                    let detail = format!(
                        "logged in at {} as {} (subject {})",
                        login.issuer, login.name, login.subject
                    );
                    // The login may have taken minutes: read the clock again.
                    let issued = authority.enroll_oidc(node, &login, refresh_token, unix_now());
                    credential_reply(service, issued, node, method, &detail, what)
                }
                Ok(None) => {
                    let reason = "the client ended the channel before the login finished";
                    info!(%node, "OpenID Connect login abandoned: {reason}");
                    service.audit(
                        enroll_event(node, method, None, reason.into())
                            .into_iter()
                            .collect(),
                    );
                    return Ok(());
                }
                Err(e) => credential_reply(service, Err(e), node, method, "", what),
            }
        }
        AuthorityRequest::OidcFinish { .. } => AuthorityReply::Refused {
            reason: "OidcFinish without OidcStart on this channel: start the login again".into(),
        },
    };
    send_message(&mut channel, &reply).await
}

/// Renews `node`'s credential: a member enrolled with OpenID Connect only
/// after the provider accepted its refresh token again. Returns the audit
/// method (`renew` or `renew-oidc`) and the result.
async fn renew_member(
    service: &AuthorityService,
    node: Identifier,
) -> (&'static str, Result<SignedCredential, AuthorityError>) {
    let authority = &service.authority;
    let member = match authority.renewable_member(node) {
        Ok(member) => member,
        Err(e) => return ("renew", Err(e)),
    };
    let MemberSource::Oidc { issuer, subject } = member.source else {
        return ("renew", authority.issue_for_member(node, unix_now()));
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
    let session = match authority.oidc_session(&node) {
        Ok(Some(session)) => session,
        Ok(None) => {
            return (
                method,
                required("the authority holds no login for it".into()),
            )
        }
        Err(e) => return (method, Err(e)),
    };
    let Some(token) = session.refresh_token else {
        let reason = match session.refresh_refused_at {
            Some(at) => format!(
                "the provider refused the login at {}: the user was disabled or signed out there",
                postern_identity::credential::format_timestamp(at)
            ),
            None => "the provider issued no refresh token; add offline_access to `scopes` in the authority's OIDC configuration".into(),
        };
        return (method, required(reason));
    };
    match verifier.refresh(&token, &subject, unix_now()).await {
        Ok(OidcLogin {
            login,
            refresh_token,
        }) => (
            method,
            authority.renew_oidc(node, &login, refresh_token, unix_now()),
        ),
        Err(e) => {
            if matches!(e, OidcError::RefreshRefused { .. }) {
                // The token will never work again: later attempts are
                // refused without bothering the provider.
                if let Err(forget) = authority.oidc_refresh_refused(&node, unix_now()) {
                    warn!(%node, error = %forget, "cannot forget a refused refresh token");
                }
            }
            (method, Err(e.into()))
        }
    }
}

/// Runs an OpenID Connect login on `channel`. `Ok(None)`: the client went
/// away (or the authority is stopping) before it finished.
async fn oidc_login(
    service: &AuthorityService,
    channel: &mut DataChannel,
    plain: &mut [u8],
    device: bool,
    stop: &CancellationToken,
) -> Result<Option<OidcLogin>, AuthorityError> {
    let Some(verifier) = service.oidc.as_deref() else {
        return Err(AuthorityError::OidcUnavailable);
    };
    if device {
        let login = verifier.start_device_login(unix_now()).await?;
        let prompt = login.prompt().clone();
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

/// Turns an issuance into the reply, and logs and audits it: `method` names
/// the way (`ticket`, `oidc`, `renew`, …), `detail` says what allowed it.
fn credential_reply(
    service: &AuthorityService,
    result: Result<SignedCredential, AuthorityError>,
    node: Identifier,
    method: &str,
    detail: &str,
    what: &str,
) -> AuthorityReply {
    match result {
        Ok(credential) => {
            let body = credential.inspect_unverified().ok();
            let id = body.as_ref().map(|b| b.id.to_string()).unwrap_or_default();
            info!(%node, credential = %id, %method, "{what}: credential issued");
            let attrs = body.map(|b| b.attributes).unwrap_or_default();
            service.audit(
                [
                    enroll_event(node, method, Some(&attrs), detail.to_string()),
                    issue_event(&credential),
                ]
                .into_iter()
                .flatten()
                .collect(),
            );
            AuthorityReply::Credential { credential }
        }
        Err(e) => {
            warn!(%node, %method, error = %e, "{what} refused");
            service.audit(
                enroll_event(node, method, None, e.to_string())
                    .into_iter()
                    .collect(),
            );
            AuthorityReply::Refused {
                reason: e.client_message(),
            }
        }
    }
}

/// Streams revocations newer than `after` until the node hangs up.
/// Streams revocations newer than `after` to the relay on its hop channel,
/// with heartbeats, until the channel ends.
async fn feed_relay(authority: &Authority, hop: &Hop, mut after: u64, stop: &CancellationToken) {
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        let entries = match authority.revocations_since(after) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(error = %e, "cannot read revocations");
                Vec::new()
            }
        };
        let heartbeat = last_sent.is_none_or(|at| at.elapsed() >= FEED_HEARTBEAT);
        if heartbeat || !entries.is_empty() {
            after = entries.last().map_or(after, |e| e.seq);
            let mut chunks = entries.chunks(MAX_REVOCATIONS_PER_MESSAGE).peekable();
            if chunks.peek().is_none()
                && hop
                    .send(Control::Revocations {
                        entries: Vec::new(),
                    })
                    .await
                    .is_err()
            {
                return;
            }
            for chunk in chunks {
                let msg = Control::Revocations {
                    entries: chunk.to_vec(),
                };
                if hop.send(msg).await.is_err() {
                    return;
                }
            }
            last_sent = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = hop.closed.cancelled() => return,
            () = tokio::time::sleep(FEED_POLL) => {}
        }
    }
}

async fn feed(
    authority: &Authority,
    channel: &mut DataChannel,
    mut after: u64,
    stop: &CancellationToken,
) -> Result<(), NodeError> {
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        let entries = match authority.revocations_since(after) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(error = %e, "cannot read revocations");
                Vec::new()
            }
        };
        // New entries at once; otherwise a heartbeat, so followers can tell
        // a quiet feed from a dead one.
        let heartbeat = last_sent.is_none_or(|at| at.elapsed() >= FEED_HEARTBEAT);
        if heartbeat || !entries.is_empty() {
            after = entries.last().map_or(after, |e| e.seq);
            send_message(channel, &AuthorityReply::Revocations { entries }).await?;
            last_sent = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(FEED_POLL) => {}
            // Anything from the node (or its hang-up) ends the feed.
            _ = channel.reader.next_frame(postern_identity::frame::MAX_NOISE_MESSAGE) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::{SecretString, VerifiedLogin};
    use crate::{AuthorityConfig, MemoryStore};
    use postern_identity::credential::Kind;
    use postern_identity::{AttrValue, Identity};

    fn service() -> AuthorityService {
        let authority = Authority::new(
            Identity::generate(),
            Box::new(MemoryStore::new()),
            AuthorityConfig::default(),
        )
        .unwrap();
        AuthorityService::new(Arc::new(authority))
    }

    fn login(subject: &str) -> VerifiedLogin {
        let mut attributes = Attributes::new();
        attributes.insert(
            "groups".into(),
            AttrValue::Many(vec!["analysts".into(), "oncall".into()]),
        );
        VerifiedLogin {
            issuer: "https://id.example.com".into(),
            subject: subject.into(),
            name: format!("{subject}@example.com"),
            attributes,
            issued_at: 1_700_000_000,
            expires_at: 1_700_000_600,
        }
    }

    #[tokio::test]
    async fn renewal_of_an_oidc_member_needs_the_provider() {
        let service = service();
        let authority = Arc::clone(service.authority());
        let node = Identity::generate().identifier();
        let credential = authority
            .enroll_oidc(
                node,
                &login("alice"),
                Some(SecretString::new("rt")),
                unix_now(),
            )
            .unwrap();
        let body = credential.inspect_unverified().unwrap();
        assert_eq!(body.kind, Kind::Person);
        assert_eq!(
            body.attributes.get("name"),
            Some(&AttrValue::One("alice@example.com".into()))
        );

        // Without a provider the login cannot be re-checked: no credential.
        let (method, result) = renew_member(&service, node).await;
        assert_eq!(method, "renew-oidc");
        let err = result.unwrap_err();
        assert!(
            matches!(err, AuthorityError::OidcLoginRequired { .. }),
            "{err}"
        );
        let text = err.client_message();
        assert!(
            text.contains("--oidc-config") && text.contains("postern enroll --oidc"),
            "{text}"
        );
        // Nor by the plain member path.
        assert!(matches!(
            authority.issue_for_member(node, unix_now()),
            Err(AuthorityError::OidcLoginRequired { .. })
        ));

        // A ticket member renews without a provider; a stranger does not.
        let stranger = Identity::generate().identifier();
        let (method, result) = renew_member(&service, stranger).await;
        assert_eq!(method, "renew");
        assert!(matches!(result, Err(AuthorityError::NotAMember { .. })));
    }

    #[test]
    fn reply_for_refusal_is_safe_and_audited_without_secrets() {
        let dir = tempdir();
        let path = dir.join("audit.jsonl");
        let log = Arc::new(AuditLog::open(&path).unwrap());
        let service = service().with_audit(log);
        let node = Identity::generate().identifier();
        let reply = credential_reply(
            &service,
            Err(AuthorityError::Oidc(OidcError::RefreshRefused {
                error: "invalid_grant".into(),
                description: Some("grant request is invalid".into()),
            })),
            node,
            "renew-oidc",
            "",
            "renewal",
        );
        let AuthorityReply::Refused { reason } = reply else {
            panic!("not refused: {reply:?}")
        };
        assert!(
            reason.contains("disabled") && reason.contains("postern enroll --oidc"),
            "{reason}"
        );
        // No runtime here: the record is written at once.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"event\":\"enroll\"")
                && text.contains("\"decision\":\"deny\"")
                && text.contains("renew-oidc"),
            "{text}"
        );
        postern_policies::audit::verify(&path).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "postern-authority-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
