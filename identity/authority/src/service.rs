//! The authority as a service behind a relay.
//!
//! The authority opens no port: like an outlet, it dials out to a relay and
//! registers a service name, by default its own `authority-P…`
//! ([`ServiceName::of_authority`], which relays keep for that identity
//! alone). Nodes reach it through an end-to-end Noise channel pinned to the
//! authority's identifier (which an enrollment ticket carries, with the
//! service name), and exchange one CBOR message per data frame
//! ([`AuthorityRequest`], [`AuthorityReply`]):
//!
//! - `Redeem { code }` → `Credential`: enrollment with a one-time ticket code;
//!   the subject is the identity the handshake authenticated.
//! - `Renew` → `Credential`: a fresh credential for a current member. For a
//!   member that enrolled with OpenID Connect, the authority first asks the
//!   provider again with the refresh token it keeps, so a person disabled at
//!   the provider is refused here.
//! - `Revocations { after }` → `Revocations` with the entries after `after`,
//!   then each new one as soon as it is recorded, and an empty
//!   `Revocations` every [`FEED_HEARTBEAT`] when nothing happened, for as
//!   long as the channel stays open (relays and outlets keep one open; a
//!   follower that hears nothing for longer than its bound treats the feed
//!   as down). Entries come in batches of at most
//!   [`MAX_REVOCATIONS_PER_MESSAGE`]. Nothing polls: [`Authority::revoke`]
//!   wakes every feed ([`feed`]).
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
//!   leaves it). Only when the configuration allows it
//!   (`allow_device_flow`); the prompt names the identity being enrolled.
//!
//! The relay may also ask on the authority's own hop channel
//! (`Control::FollowRevocations { after }`, when it trusts this authority):
//! the same feed then runs there as `Control::Revocations` messages, for as
//! long as that hop session lives.
//!
//! Every refusal is a `Refused { code, reason }`: the reason for the node's
//! user, the [`RefusalCode`] for its retry logic. Work is bounded
//! ([`ServiceLimits`]): channels served at once in all and per identity,
//! revocation feeds and pending logins per identity, each refused with
//! [`RefusalCode::Limit`] beyond its cap. Every store call runs on a
//! blocking thread ([`Authority::blocking`]).
//!
//! With an audit log ([`AuthorityService::with_audit`]), every enrollment
//! attempt (allowed or refused, with the reason), renewal, issued credential
//! and revocation becomes one record; tokens, codes and secrets never do.
//!
//! The node's side of these exchanges (ticket enrollment, renewal, the
//! revocation feed) is `postern_node::authority`; the OpenID Connect
//! enrollment is [`crate::client`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use postern_identity::authority_wire::{AuthorityReply, AuthorityRequest};
use postern_identity::credential::{RevocationEntry, RevocationTarget, SignedCredential};
use postern_identity::handshake::{ChannelKind, LocalParty};
use postern_identity::link;
use postern_identity::ticket::TicketCode;
use postern_identity::time::unix_now;
use postern_identity::wire::{
    Control, DataFrame, Hello, RefusalCode, ServiceName, Side, TunnelToken,
};
use postern_identity::{Attributes, ChannelError, Identifier};
use postern_node::authority::{recv_message, send_message};
use postern_node::service::{Backoff, ChannelHalves, DataChannel, Hop, HopEvent};
use postern_node::{NodeError, RelayEndpoint, Timeouts};
use postern_policies::audit::{AuditEvent, AuditLog, Label, Verdict};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::oidc::{OidcLogin, OidcVerifier};
use crate::{Authority, AuthorityError};

mod feed;
mod limits;
mod login;

pub use feed::{FeedCursor, FeedStep, FEED_HEARTBEAT, MAX_REVOCATIONS_PER_MESSAGE};
pub use limits::ServiceLimits;

use feed::{run_feed, FeedEnd, FeedSink};
use limits::{Admission, Slot};
use login::{oidc_login, renew_member};

/// How often, at most, the service warns that it turns channels away.
const BUSY_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// What the authority service serves with: the authority itself, and
/// optionally an OpenID provider for `postern enroll --oidc` and an audit
/// log, within [`ServiceLimits`].
#[derive(Debug, Clone)]
pub struct AuthorityService {
    authority: Arc<Authority>,
    oidc: Option<Arc<OidcVerifier>>,
    audit: Option<Arc<AuditLog>>,
    /// One refresh at a time per member: providers rotate refresh tokens,
    /// and two concurrent refreshes with the same token would make the
    /// second look like a replay (some providers then revoke the login).
    refreshing: Arc<StdMutex<HashMap<Identifier, Arc<tokio::sync::Mutex<()>>>>>,
    admission: Arc<Admission>,
    /// Channels served at once.
    channels: Arc<Semaphore>,
    /// Channels taken on beyond that only to be refused with a reason.
    refusing: Arc<Semaphore>,
    /// When the service last warned that it turns channels away.
    busy_warned: Arc<StdMutex<Option<Instant>>>,
}

impl AuthorityService {
    /// Tickets, renewals and revocation feeds, within the default
    /// [`ServiceLimits`]; no OpenID Connect, no audit.
    pub fn new(authority: Arc<Authority>) -> Self {
        let limits = ServiceLimits::default();
        AuthorityService {
            authority,
            oidc: None,
            audit: None,
            refreshing: Arc::default(),
            channels: Arc::new(Semaphore::new(limits.max_channels)),
            refusing: Arc::new(Semaphore::new(limits.max_refusing)),
            admission: Admission::new(limits),
            busy_warned: Arc::default(),
        }
    }

    /// Serves within `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: ServiceLimits) -> Self {
        self.channels = Arc::new(Semaphore::new(limits.max_channels));
        self.refusing = Arc::new(Semaphore::new(limits.max_refusing));
        self.admission = Admission::new(limits);
        self
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

    /// The limits in force.
    pub fn limits(&self) -> &ServiceLimits {
        self.admission.limits()
    }

    /// Appends `events`, in this order. From async code the log only queues
    /// them (its writer thread syncs them to disk); a record that cannot be
    /// taken is logged loudly.
    fn audit(&self, events: Vec<AuditEvent>) {
        let Some(log) = &self.audit else {
            return;
        };
        for event in &events {
            if let Err(e) = log.record(event) {
                error!(error = %e, "cannot write the audit log");
            }
        }
    }

    /// Room for one more channel: to serve it, or (all taken) to refuse it
    /// with a reason; `None` when even the refusals are all taken.
    fn capacity(&self) -> Option<Capacity> {
        if let Ok(permit) = Arc::clone(&self.channels).try_acquire_owned() {
            return Some(Capacity::Serve(permit));
        }
        let warn_now = {
            let mut last = self.busy_warned.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= BUSY_WARNING_INTERVAL);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if warn_now {
            warn!(
                limit = self.limits().max_channels,
                "the authority serves as many channels as it may at once: new ones are refused (\"try again later\") until some finish"
            );
        }
        Arc::clone(&self.refusing)
            .try_acquire_owned()
            .ok()
            .map(Capacity::Refuse)
    }
}

/// Whether a channel is served or only told that the authority is busy; the
/// permit is held for as long as the channel lives.
#[derive(Debug)]
enum Capacity {
    Serve(#[allow(dead_code)] OwnedSemaphorePermit),
    Refuse(#[allow(dead_code)] OwnedSemaphorePermit),
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

/// The audit record of a revocation found in the store. Reads the store
/// (the subject of a revoked credential): call it off the async threads.
pub fn revoke_event(authority: &Authority, entry: &RevocationEntry, reason: String) -> AuditEvent {
    let subject = match entry.revocation.target {
        RevocationTarget::Identity(id) => Some(id),
        RevocationTarget::Credential(id) => authority
            .store()
            .issued_credential(&id)
            .ok()
            .flatten()
            .map(|r| r.subject),
    };
    revocation_event(authority.identifier(), entry, subject, reason)
}

/// The audit record of a revocation by authority `by`, of `subject`'s
/// identity or credential (when known).
pub fn revocation_event(
    by: Identifier,
    entry: &RevocationEntry,
    subject: Option<Identifier>,
    reason: String,
) -> AuditEvent {
    let credential = match entry.revocation.target {
        RevocationTarget::Identity(_) => None,
        RevocationTarget::Credential(id) => Label::new(&id.to_string()),
    };
    AuditEvent::Revoke {
        credential,
        subject,
        by: Some(by),
        reason,
    }
}

/// Runs the authority behind `relay` under `service` until `stop`:
/// registers, serves every incoming channel, answers the relay's request
/// for revocations, reconnects with back-off.
///
/// When `service` is not the authority's own name
/// ([`ServiceName::of_authority`]), the authority registers under that name
/// too: nodes look for their authority there to renew their credentials and
/// follow its revocations (a relay refusing it is logged, not fatal).
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
    let own = ServiceName::of_authority(&authority.authority.identifier());
    let names = if service == own {
        vec![service]
    } else {
        vec![service, own]
    };
    info!(authority = %authority.authority.identifier(), service = %names[0], relay = %relay.address, "authority starting");
    tasks.spawn(watch_revocations(authority.clone(), stop.clone()));
    while !stop.is_cancelled() {
        let ended =
            match postern_node::service::connect(&local, &relay, &timeouts, None, &stop).await {
                Ok((hop, events)) => {
                    let session = Session {
                        local: &local,
                        service: &authority,
                        hop: &hop,
                        names: &names,
                        timeouts: &timeouts,
                        tasks: &tasks,
                        stop: &stop,
                    };
                    session.run(events, &mut backoff).await
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

/// Logs, and audits when there is an audit log, every revocation recorded
/// while the authority runs, however it was made (a node's channel, the
/// admin endpoint, an embedding program), as it is recorded.
async fn watch_revocations(service: AuthorityService, stop: CancellationToken) {
    let mut newest = service.authority.watch_revocations();
    let mut seen = *newest.borrow_and_update();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = newest.changed() => if changed.is_err() { return },
        }
        newest.borrow_and_update();
        let audited = service.audit.is_some();
        let after = seen;
        let recorded = service
            .authority
            .blocking(move |a| {
                let entries = a.revocations_since(after)?;
                Ok(entries
                    .into_iter()
                    .map(|entry| {
                        let reason = format!(
                            "revoked by the authority's admin (revocation #{})",
                            entry.seq
                        );
                        let event = audited.then(|| revoke_event(a, &entry, reason));
                        (entry, event)
                    })
                    .collect::<Vec<_>>())
            })
            .await;
        let recorded = match recorded {
            Ok(recorded) => recorded,
            Err(e) => {
                warn!(error = %e, "cannot read revocations; the new ones are not audited yet");
                continue;
            }
        };
        for (entry, event) in recorded {
            seen = seen.max(entry.seq);
            info!(target = %entry.revocation.target, seq = entry.seq, "revocation recorded");
            service.audit(event.into_iter().collect());
        }
    }
}

/// One hop session to the relay and what it needs.
struct Session<'a> {
    local: &'a Arc<LocalParty>,
    service: &'a AuthorityService,
    hop: &'a Arc<Hop>,
    /// The names to register; the first one is the configured one.
    names: &'a [ServiceName],
    timeouts: &'a Timeouts,
    tasks: &'a TaskTracker,
    stop: &'a CancellationToken,
}

impl Session<'_> {
    /// Registers, then serves the relay's events until the session ends;
    /// returns why it ended.
    async fn run(
        &self,
        mut events: tokio::sync::mpsc::Receiver<HopEvent>,
        backoff: &mut Backoff,
    ) -> String {
        for name in self.names {
            let register = Control::Register {
                service: name.clone(),
            };
            if let Err(e) = self.hop.send(register).await {
                return e.to_string();
            }
        }
        // The feed the relay asked for on this session, if any.
        let mut relay_feed: Option<CancellationToken> = None;
        let ended = loop {
            let event = tokio::select! {
                () = self.stop.cancelled() => break Some("stopped".to_string()),
                () = self.hop.closed.cancelled() => break None,
                event = events.recv() => event,
            };
            match event {
                None => break None,
                Some(HopEvent::Registered(service)) => {
                    backoff.reset();
                    info!(%service, "authority registered at relay");
                }
                Some(HopEvent::RegisterRefused(service, refusal)) => {
                    if self.names.first() == Some(&service) {
                        error!(%service, reason = %refusal, "relay refused the authority's registration");
                        break Some(format!("registration refused: {refusal}"));
                    }
                    warn!(%service, reason = %refusal, "relay refused the authority's own name: nodes that look for it there (to renew, and to follow revocations) cannot reach it through this relay");
                }
                Some(HopEvent::FollowRevocations(after)) => {
                    if let Some(previous) = relay_feed.take() {
                        previous.cancel();
                    }
                    let stop = self.stop.child_token();
                    relay_feed = Some(stop.clone());
                    info!(after, "the relay follows this authority's revocations");
                    let (authority, hop) =
                        (Arc::clone(&self.service.authority), Arc::clone(self.hop));
                    let heartbeat = self.service.limits().feed_heartbeat;
                    self.tasks.spawn(async move {
                        let mut sink = HopFeed(hop);
                        let end = run_feed(&authority, after, heartbeat, &mut sink, &stop).await;
                        debug!(?end, "the relay's revocation feed ended");
                    });
                }
                Some(HopEvent::Incoming(service, token, _)) => {
                    let Some(capacity) = self.service.capacity() else {
                        debug!("a tunnel request dropped: the authority is at its limit of channels and of refusals");
                        continue;
                    };
                    let (local, authority, hop) = (
                        Arc::clone(self.local),
                        self.service.clone(),
                        Arc::clone(self.hop),
                    );
                    let (timeouts, stop) = (self.timeouts.clone(), self.stop.clone());
                    self.tasks.spawn(async move {
                        let channel = Channel {
                            local: &local,
                            service: &authority,
                            hop: &hop,
                            name: &service,
                            timeouts: &timeouts,
                        };
                        if let Err(e) = channel.serve(token, capacity, stop).await {
                            debug!(error = %e, "authority channel ended with an error");
                        }
                    });
                }
            }
        };
        if let Some(feed) = relay_feed {
            feed.cancel();
        }
        ended
            .or_else(|| self.hop.ended_because())
            .unwrap_or_else(|| "relay session closed".into())
    }
}

/// The relay's revocation feed: on the authority's own hop channel.
struct HopFeed(Arc<Hop>);

impl FeedSink for HopFeed {
    async fn send(&mut self, entries: Vec<RevocationEntry>) -> Result<(), NodeError> {
        self.0.send(Control::Revocations { entries }).await
    }

    async fn gone(&mut self) {
        self.0.closed.cancelled().await;
    }
}

/// A node's revocation feed: on its end-to-end channel. Anything the node
/// sends, or its hang-up, ends it.
struct ChannelFeed<'a>(&'a mut DataChannel);

impl FeedSink for ChannelFeed<'_> {
    async fn send(&mut self, entries: Vec<RevocationEntry>) -> Result<(), NodeError> {
        send_message(self.0, &AuthorityReply::Revocations { entries }).await
    }

    async fn gone(&mut self) {
        let _ = self
            .0
            .reader
            .next_frame(postern_identity::frame::MAX_NOISE_MESSAGE)
            .await;
    }
}

/// One end-to-end channel from a node, and what it needs.
struct Channel<'a> {
    local: &'a LocalParty,
    service: &'a AuthorityService,
    hop: &'a Hop,
    /// The name the node asked for.
    name: &'a ServiceName,
    timeouts: &'a Timeouts,
}

impl Channel<'_> {
    /// Attaches, runs the handshake, reads the node's request and answers
    /// it.
    async fn serve(
        &self,
        token: TunnelToken,
        capacity: Capacity,
        stop: CancellationToken,
    ) -> Result<(), NodeError> {
        let tunnel_error = |source| NodeError::Tunnel {
            service: self.name.clone(),
            source,
        };
        let (mut reader, mut writer) = self
            .hop
            .attach(self.local, self.timeouts, Side::Outlet, token)
            .await?;
        let hello = Hello {
            service: Some(self.name.clone()),
            credential: None,
        };
        let handshake = link::respond(
            &mut reader,
            &mut writer,
            self.local,
            ChannelKind::EndToEnd,
            &hello,
        );
        let (peer, transport) =
            link::within(self.timeouts.handshake, "end-to-end handshake", handshake)
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
            r = link::within(self.timeouts.handshake, "authority request", async {
                recv_message::<AuthorityRequest>(&mut channel, &mut plain).await.map_err(|e| link::LinkError::Channel(ChannelError::BadMessage(e.to_string())))
            }) => r.map_err(tunnel_error)?,
        };
        let Some(request) = request else {
            return Ok(());
        };
        // The request is read before any refusal, so that the node reads the
        // refusal as its answer rather than a reset.
        if let Capacity::Refuse(_) = capacity {
            let reason = format!(
                "the authority is serving as many channels as it may at once ({}): try again in a few seconds",
                self.service.limits().max_channels
            );
            debug!(%node, "channel refused: the authority is busy");
            return send_message(
                &mut channel,
                &AuthorityReply::refused(RefusalCode::Limit, reason),
            )
            .await;
        }
        let _channel_place = match self.service.admission.admit(node, Slot::Channel) {
            Ok(place) => place,
            Err(refusal) => {
                warn!(%node, reason = %refusal, "channel refused");
                return send_message(&mut channel, &refused(refusal)).await;
            }
        };
        let reply = match request {
            AuthorityRequest::Revocations { after } => {
                let _feed_place = match self.service.admission.admit(node, Slot::Feed) {
                    Ok(place) => place,
                    Err(refusal) => {
                        warn!(%node, reason = %refusal, "revocation feed refused");
                        return send_message(&mut channel, &refused(refusal)).await;
                    }
                };
                let heartbeat = self.service.limits().feed_heartbeat;
                let mut sink = ChannelFeed(&mut channel);
                let end =
                    run_feed(&self.service.authority, after, heartbeat, &mut sink, &stop).await;
                return match end {
                    FeedEnd::Send(e) => Err(e),
                    FeedEnd::Closed | FeedEnd::Store => Ok(()),
                };
            }
            AuthorityRequest::OidcStart { device } => {
                let _login_place = match self.service.admission.admit(node, Slot::Login) {
                    Ok(place) => place,
                    Err(refusal) => {
                        warn!(%node, reason = %refusal, "OpenID Connect login refused");
                        return send_message(&mut channel, &refused(refusal)).await;
                    }
                };
                match self
                    .login(node, device, &mut channel, &mut plain, &stop)
                    .await
                {
                    Some(reply) => reply,
                    None => return Ok(()),
                }
            }
            other => self.answer(node, other).await,
        };
        send_message(&mut channel, &reply).await
    }

    /// The answer to a request that needs one exchange: a ticket, a
    /// renewal, or a stray `OidcFinish`.
    async fn answer(&self, node: Identifier, request: AuthorityRequest) -> AuthorityReply {
        let service = self.service;
        match request {
            AuthorityRequest::Redeem { code } => {
                let code = TicketCode::from_bytes(code);
                let detail = format!("ticket {}", code.hash().short());
                let result = service
                    .authority
                    .blocking(move |a| a.redeem_ticket(&code, node, unix_now()))
                    .await;
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
            AuthorityRequest::OidcFinish { .. } => AuthorityReply::refused(
                RefusalCode::Invalid,
                "OidcFinish without OidcStart on this channel: start the login again",
            ),
            AuthorityRequest::Revocations { .. } | AuthorityRequest::OidcStart { .. } => {
                AuthorityReply::refused(
                    RefusalCode::Invalid,
                    "this request is not answered with one message",
                )
            }
        }
    }

    /// An OpenID Connect login for `node`, and the credential it earns;
    /// `None` when the node went away before it finished.
    async fn login(
        &self,
        node: Identifier,
        device: bool,
        channel: &mut DataChannel,
        plain: &mut [u8],
        stop: &CancellationToken,
    ) -> Option<AuthorityReply> {
        let service = self.service;
        let method = if device { "oidc-device" } else { "oidc" };
        let what = "OpenID Connect enrollment";
        match oidc_login(service, node, channel, plain, device, stop).await {
            Ok(Some(OidcLogin {
                login,
                refresh_token,
            })) => {
                let detail = if device {
                    info!(%node, name = %login.name, "device login for {node} approved by {}", login.name);
                    format!(
                        "device login for {node} approved by {} at {} (subject {})",
                        login.name, login.issuer, login.subject
                    )
                } else {
                    format!(
                        "logged in at {} as {} (subject {})",
                        login.issuer, login.name, login.subject
                    )
                };
                // The login may have taken minutes: read the clock again.
                let issued = service
                    .authority
                    .blocking(move |a| a.enroll_oidc(node, &login, refresh_token, unix_now()))
                    .await;
                Some(credential_reply(
                    service, issued, node, method, &detail, what,
                ))
            }
            Ok(None) => {
                let reason = "the client ended the channel before the login finished";
                info!(%node, "OpenID Connect login abandoned: {reason}");
                service.audit(
                    enroll_event(node, method, None, reason.into())
                        .into_iter()
                        .collect(),
                );
                None
            }
            Err(e) => Some(credential_reply(service, Err(e), node, method, "", what)),
        }
    }
}

/// A refusal by a limit, as the node receives it.
fn refused(refusal: postern_identity::wire::Refusal) -> AuthorityReply {
    AuthorityReply::refused(refusal.code, refusal.reason)
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
            AuthorityReply::refused(e.refusal_code(), e.client_message())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::{OidcError, SecretString, VerifiedLogin};
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
        let AuthorityReply::Refused { code, reason } = reply else {
            panic!("not refused: {reply:?}")
        };
        assert_eq!(code, RefusalCode::Denied);
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
