//! The authority as a service behind a relay, and the node side of talking
//! to it.
//!
//! The authority opens no port: like an outlet, it dials out to a relay and
//! registers a service name (by default `postern-authority`). Nodes reach it
//! through an end-to-end Noise channel pinned to the authority's identifier
//! (which an enrollment ticket carries), and exchange one CBOR message per
//! data frame:
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
//!   The client runs the person's part (`postern_identity::oidc::browser_login`:
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

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use postern_identity::authority::{Authority, AuthorityError, MemberSource};
use postern_identity::credential::{RevocationEntry, RevocationTarget, SignedCredential};
use postern_identity::handshake::{ChannelKind, LocalParty};
use postern_identity::link;
use postern_identity::oidc::{
    CodeGrant, DevicePrompt, LoginChallenge, OidcError, OidcLogin, OidcVerifier,
};
use postern_identity::ticket::{Ticket, TicketCode};
use postern_identity::wire::{self, Control, DataFrame, Hello, ServiceName, Side, TunnelToken};
use postern_identity::{Attributes, ChannelError, Identifier};
use postern_policies::audit::{AuditEvent, AuditLog, Label, Verdict};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::hop::{self, Backoff, DataChannel, Hop, HopEvent};
use crate::trust::{unix_now, Trust};
use crate::tunnel::{self, ChannelHalves};
use crate::{NodeError, RelayEndpoint, Timeouts};

/// How often an open revocation feed looks for new revocations.
const FEED_POLL: Duration = Duration::from_secs(1);

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

async fn send_message<T: Serialize>(channel: &mut DataChannel, msg: &T) -> Result<(), NodeError> {
    let bytes = wire::encode(msg).map_err(|e| tunnel_error(e.into()))?;
    let (mut scratch, mut out) = (Vec::new(), Vec::new());
    tunnel::send_frame(
        &mut channel.writer,
        &mut channel.sealer,
        &DataFrame::Data(&bytes),
        &mut scratch,
        &mut out,
    )
    .await
    .map_err(tunnel_error)
}

/// The next message, or `None` when the peer ended the channel.
async fn recv_message<T: serde::de::DeserializeOwned>(
    channel: &mut DataChannel,
    plain: &mut [u8],
) -> Result<Option<T>, NodeError> {
    loop {
        let n = match tunnel::recv_frame(&mut channel.reader, &mut channel.opener, plain).await {
            Ok(n) => n,
            Err(link::LinkError::Closed) => return Ok(None),
            Err(e) => return Err(tunnel_error(e)),
        };
        match DataFrame::decode(&plain[..n]).map_err(|e| tunnel_error(e.into()))? {
            DataFrame::Data(bytes) => {
                return wire::decode(bytes)
                    .map(Some)
                    .map_err(|e| tunnel_error(e.into()))
            }
            DataFrame::Ready | DataFrame::Credential(_) => continue,
            DataFrame::Eof => return Ok(None),
            DataFrame::Close(reason) => {
                return Err(NodeError::OpenRefused(wire::Refusal::new(
                    wire::RefusalCode::RetryLater,
                    format!("the authority closed the channel: {reason}"),
                )))
            }
        }
    }
}

fn tunnel_error(source: link::LinkError) -> NodeError {
    NodeError::Tunnel {
        service: authority_service_name(),
        source,
    }
}

fn authority_service_name() -> ServiceName {
    postern_identity::ticket::DEFAULT_AUTHORITY_SERVICE
        .parse()
        .unwrap_or_else(|_| unreachable_service())
}

#[allow(clippy::panic)]
fn unreachable_service() -> ServiceName {
    // DEFAULT_AUTHORITY_SERVICE is a valid name; a unit test checks it.
    panic!("the default authority service name is invalid")
}

// ----- the service --------------------------------------------------------------

/// How long a browser login may take at most, from `OidcStart` to
/// `OidcFinish` (the challenge's own expiry is usually sooner).
const MAX_BROWSER_LOGIN: Duration = postern_identity::oidc::LOGIN_TTL;

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
        let ended = match hop::connect(&local, &relay, &timeouts, None, &stop).await {
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
            Some(HopEvent::FollowRevocations(_)) => {}
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
    tunnel::send_frame(
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
async fn feed(
    authority: &Authority,
    channel: &mut DataChannel,
    mut after: u64,
    stop: &CancellationToken,
) -> Result<(), NodeError> {
    let mut first = true;
    loop {
        let entries = match authority.revocations_since(after) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(error = %e, "cannot read revocations");
                Vec::new()
            }
        };
        if first || !entries.is_empty() {
            after = entries.last().map_or(after, |e| e.seq);
            send_message(channel, &AuthorityReply::Revocations { entries }).await?;
            first = false;
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(FEED_POLL) => {}
            // Anything from the node (or its hang-up) ends the feed.
            _ = channel.reader.next_frame(postern_identity::frame::MAX_NOISE_MESSAGE) => return Ok(()),
        }
    }
}

// ----- the node side ----------------------------------------------------------------

/// How a node reaches its authority.
#[derive(Debug, Clone)]
pub struct AuthorityRoute {
    /// The relay the authority is registered at.
    pub relay: RelayEndpoint,
    /// The authority's identifier (pinned: any other is refused).
    pub authority: Identifier,
    /// Its service name at the relay.
    pub service: ServiceName,
}

impl AuthorityRoute {
    /// The route an enrollment ticket describes.
    pub fn from_ticket(ticket: &Ticket) -> Self {
        AuthorityRoute {
            relay: RelayEndpoint::new(ticket.relay_addr.clone(), ticket.relay),
            authority: ticket.authority,
            service: ticket.authority_service.clone(),
        }
    }
}

/// Opens an end-to-end channel to the authority through the relay.
async fn open(
    local: &Arc<LocalParty>,
    route: &AuthorityRoute,
    timeouts: &Timeouts,
    stop: &CancellationToken,
) -> Result<DataChannel, NodeError> {
    let (hop, _events) = hop::connect(local, &route.relay, timeouts, None, stop).await?;
    // Credentials are not needed here: the authority is pinned, and a node
    // enrolling has none yet.
    let (_peer, channel) = hop
        .open_end_to_end(
            local,
            timeouts,
            &route.service,
            route.authority,
            &Trust::default(),
            &[],
        )
        .await?;
    Ok(channel)
}

/// Why talking to the authority failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The relay or the channel to the authority failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The authority refused, and said why.
    #[error("the authority refused: {0}")]
    Refused(String),
    /// The authority answered something this node did not expect.
    #[error("the authority sent an unexpected answer: {0}")]
    Protocol(String),
    /// The authority did not answer in time.
    #[error("the authority did not answer within {0:?}: check that `postern authority run` is running and registered at this relay")]
    NoAnswer(Duration),
    /// The person's part of an OpenID Connect login failed (no browser
    /// login in time, a forged redirect, …).
    #[error(transparent)]
    Login(#[from] OidcError),
    /// The credential the authority issued is unusable here.
    #[error("the authority's credential is unusable: {0}")]
    BadCredential(String),
}

/// How long the authority may take to answer a request that does not wait
/// for a person (it may ask the OpenID provider: up to
/// `postern_identity::oidc::HTTP_TIMEOUT` per request, twice with a key
/// refetch).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(45);

/// The next reply, within `wait`.
async fn next_reply(
    channel: &mut DataChannel,
    plain: &mut [u8],
    wait: Duration,
) -> Result<AuthorityReply, EnrollError> {
    match tokio::time::timeout(wait, recv_message::<AuthorityReply>(channel, plain)).await {
        Err(_) => Err(EnrollError::NoAnswer(wait)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(None)) => Err(EnrollError::Protocol(
            "it closed the channel without an answer".into(),
        )),
        Ok(Ok(Some(reply))) => Ok(reply),
    }
}

/// The credential in `reply`, or why there is none.
fn expect_credential(reply: AuthorityReply) -> Result<SignedCredential, EnrollError> {
    match reply {
        AuthorityReply::Credential { credential } => Ok(credential),
        AuthorityReply::Refused { reason } => Err(EnrollError::Refused(reason)),
        other => Err(EnrollError::Protocol(format!(
            "{} instead of a credential",
            reply_kind(&other)
        ))),
    }
}

fn reply_kind(reply: &AuthorityReply) -> &'static str {
    match reply {
        AuthorityReply::Credential { .. } => "a credential",
        AuthorityReply::Revocations { .. } => "revocations",
        AuthorityReply::Refused { .. } => "a refusal",
        AuthorityReply::OidcLogin { .. } => "a browser login",
        AuthorityReply::OidcDevice { .. } => "a device login",
    }
}

/// Opens a channel to the authority, runs `exchange` on it, and closes it
/// (and the hop channel) whatever happens.
async fn with_channel<T, F>(
    local: &Arc<LocalParty>,
    route: &AuthorityRoute,
    timeouts: &Timeouts,
    exchange: F,
) -> Result<T, EnrollError>
where
    F: AsyncFnOnce(&mut DataChannel, &mut [u8]) -> Result<T, EnrollError>,
{
    let stop = CancellationToken::new();
    let result = async {
        let mut channel = open(local, route, timeouts, &stop).await?;
        let mut plain = vec![0u8; postern_identity::frame::MAX_NOISE_MESSAGE];
        exchange(&mut channel, &mut plain).await
    }
    .await;
    stop.cancel();
    result
}

/// Sends one request and returns the authority's credential.
async fn request_credential(
    local: &Arc<LocalParty>,
    route: &AuthorityRoute,
    timeouts: &Timeouts,
    request: AuthorityRequest,
) -> Result<SignedCredential, EnrollError> {
    let wait = timeouts.handshake.max(ANSWER_TIMEOUT);
    with_channel(local, route, timeouts, async |channel, plain| {
        send_message(channel, &request).await?;
        expect_credential(next_reply(channel, plain, wait).await?)
    })
    .await
}

/// Enrolls with a ticket: returns the credential the authority issued to
/// `local`'s identity, after checking that it is for us and from the
/// ticket's authority.
pub async fn enroll(
    local: &Arc<LocalParty>,
    ticket: &Ticket,
    timeouts: &Timeouts,
) -> Result<SignedCredential, EnrollError> {
    let route = AuthorityRoute::from_ticket(ticket);
    let request = AuthorityRequest::Redeem {
        code: *ticket.code.as_bytes(),
    };
    let credential = request_credential(local, &route, timeouts, request).await?;
    check_own(local, &route, credential)
}

/// Asks for a fresh credential (the identity must still be a member; one
/// that enrolled with OpenID Connect must still be accepted by the
/// provider).
pub async fn renew(
    local: &Arc<LocalParty>,
    route: &AuthorityRoute,
    timeouts: &Timeouts,
) -> Result<SignedCredential, EnrollError> {
    let credential = request_credential(local, route, timeouts, AuthorityRequest::Renew).await?;
    check_own(local, route, credential)
}

/// Enrolls by logging in at the authority's OpenID provider in a browser:
/// the authority sends the login's parameters, `present` gets the
/// authorization URL to show (print it, open a browser:
/// `postern_identity::oidc::show_login_url`), the provider redirects the
/// browser to a listener on `127.0.0.1` (RFC 8252), and the authority
/// redeems the code, verifies the ID token and issues the credential.
/// Waits at most `login_timeout` for the browser.
pub async fn enroll_oidc_browser<F>(
    local: &Arc<LocalParty>,
    route: &AuthorityRoute,
    timeouts: &Timeouts,
    login_timeout: Duration,
    present: F,
) -> Result<SignedCredential, EnrollError>
where
    F: FnOnce(&str),
{
    let wait = timeouts.handshake.max(ANSWER_TIMEOUT);
    let credential = with_channel(local, route, timeouts, async |channel, plain| {
        send_message(channel, &AuthorityRequest::OidcStart { device: false }).await?;
        let challenge = match next_reply(channel, plain, wait).await? {
            AuthorityReply::OidcLogin { challenge } => challenge,
            AuthorityReply::Refused { reason } => return Err(EnrollError::Refused(reason)),
            other => {
                return Err(EnrollError::Protocol(format!(
                    "{} instead of a browser login",
                    reply_kind(&other)
                )))
            }
        };
        // The authority forgets the login at its expiry.
        let left = Duration::from_secs(challenge.expires_at.saturating_sub(unix_now()));
        let grant =
            postern_identity::oidc::browser_login(&challenge, login_timeout.min(left), present)
                .await?;
        send_message(channel, &AuthorityRequest::OidcFinish { grant }).await?;
        expect_credential(next_reply(channel, plain, wait).await?)
    })
    .await?;
    check_own(local, route, credential)
}

/// Enrolls with the OpenID provider's device flow (RFC 8628), for a machine
/// without a browser: `show` gets the code and the address where the person
/// enters it on any device (`postern_identity::oidc::show_device_prompt`);
/// the authority polls the provider and issues the credential once the
/// person approved, before the code expires.
pub async fn enroll_oidc_device<F>(
    local: &Arc<LocalParty>,
    route: &AuthorityRoute,
    timeouts: &Timeouts,
    show: F,
) -> Result<SignedCredential, EnrollError>
where
    F: FnOnce(&DevicePrompt),
{
    let wait = timeouts.handshake.max(ANSWER_TIMEOUT);
    let credential = with_channel(local, route, timeouts, async |channel, plain| {
        send_message(channel, &AuthorityRequest::OidcStart { device: true }).await?;
        let prompt = match next_reply(channel, plain, wait).await? {
            AuthorityReply::OidcDevice { prompt } => prompt,
            AuthorityReply::Refused { reason } => return Err(EnrollError::Refused(reason)),
            other => {
                return Err(EnrollError::Protocol(format!(
                    "{} instead of a device login",
                    reply_kind(&other)
                )))
            }
        };
        show(&prompt);
        // The authority answers when the person approved, declined, or the
        // code expired; then it still verifies the ID token.
        let until_expiry = Duration::from_secs(prompt.expires_at.saturating_sub(unix_now()));
        expect_credential(next_reply(channel, plain, until_expiry + wait).await?)
    })
    .await?;
    check_own(local, route, credential)
}

fn check_own(
    local: &LocalParty,
    route: &AuthorityRoute,
    credential: SignedCredential,
) -> Result<SignedCredential, EnrollError> {
    let trusted = [route.authority].into_iter().collect();
    postern_identity::credential::verify(
        &credential,
        &trusted,
        local.identity().identifier(),
        unix_now(),
        &postern_identity::credential::NoRevocations,
    )
    .map_err(|e| EnrollError::BadCredential(e.to_string()))?;
    Ok(credential)
}

/// Keeps `trust`'s revocations current from the authority until `stop`:
/// one long-lived channel, reopened with back-off when it drops.
pub async fn follow_revocations(
    local: Arc<LocalParty>,
    route: AuthorityRoute,
    trust: Arc<Trust>,
    timeouts: Timeouts,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(&timeouts);
    while !stop.is_cancelled() {
        let result = async {
            let mut channel = open(&local, &route, &timeouts, &stop).await?;
            send_message(
                &mut channel,
                &AuthorityRequest::Revocations {
                    after: trust.revocations_seen(),
                },
            )
            .await?;
            let mut plain = vec![0u8; postern_identity::frame::MAX_NOISE_MESSAGE];
            loop {
                let reply = tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    reply = recv_message::<AuthorityReply>(&mut channel, &mut plain) => reply?,
                };
                match reply {
                    Some(AuthorityReply::Revocations { entries }) => {
                        if !entries.is_empty() {
                            info!(
                                count = entries.len(),
                                "revocations received from the authority"
                            );
                        }
                        trust.apply_revocations(entries);
                        backoff.reset();
                    }
                    Some(other) => {
                        debug!(reply = ?other, "unexpected message on the revocation feed")
                    }
                    None => {
                        return Err(NodeError::OpenRefused(wire::Refusal::new(
                            wire::RefusalCode::RetryLater,
                            "the authority closed the revocation feed",
                        )))
                    }
                }
            }
        }
        .await;
        if let Err(e) = result {
            if stop.is_cancelled() {
                break;
            }
            let delay = backoff.next_delay().max(Duration::from_millis(500));
            warn!(error = %e, "revocation feed from the authority lost; retrying in {delay:.1?}");
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_identity::authority::{AuthorityConfig, MemoryStore};
    use postern_identity::credential::Kind;
    use postern_identity::oidc::{SecretString, VerifiedLogin};
    use postern_identity::{AttrValue, Identity};

    #[test]
    fn default_service_name_is_valid_and_messages_round_trip() {
        assert_eq!(authority_service_name().as_str(), "postern-authority");
        let msg = AuthorityRequest::Redeem { code: [7; 32] };
        let back: AuthorityRequest = wire::decode(&wire::encode(&msg).unwrap()).unwrap();
        assert!(matches!(back, AuthorityRequest::Redeem { code } if code == [7; 32]));
        assert!(wire::decode::<AuthorityReply>(b"\xff\x00garbage").is_err());
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
