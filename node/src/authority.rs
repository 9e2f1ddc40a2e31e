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
//! - `Renew` → `Credential`: a fresh credential for a current member.
//! - `Revocations { after }` → `Revocations` now and whenever new ones are
//!   recorded, for as long as the channel stays open (relays and outlets
//!   keep one open to learn of revocations within seconds).

use std::sync::Arc;
use std::time::Duration;

use postern_identity::authority::Authority;
use postern_identity::credential::{RevocationEntry, SignedCredential};
use postern_identity::handshake::{ChannelKind, LocalParty};
use postern_identity::link;
use postern_identity::ticket::{Ticket, TicketCode};
use postern_identity::wire::{self, Control, DataFrame, Hello, ServiceName, Side, TunnelToken};
use postern_identity::{ChannelError, Identifier};
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
                return Err(NodeError::OpenRefused(format!(
                    "the authority closed the channel: {reason}"
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

/// Runs the authority behind `relay` under `service` until `stop`:
/// registers, serves every incoming channel, reconnects with back-off.
pub async fn serve(
    local: Arc<LocalParty>,
    authority: Arc<Authority>,
    relay: RelayEndpoint,
    service: ServiceName,
    timeouts: Timeouts,
    stop: CancellationToken,
) {
    let tasks = TaskTracker::new();
    let mut backoff = Backoff::new(&timeouts);
    info!(authority = %authority.identifier(), %service, relay = %relay.address, "authority starting");
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

#[allow(clippy::too_many_arguments)]
async fn session(
    local: &Arc<LocalParty>,
    authority: &Arc<Authority>,
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
            Some(HopEvent::Incoming(_, token, _)) => {
                let (local, authority, hop) =
                    (Arc::clone(local), Arc::clone(authority), Arc::clone(hop));
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
    authority: &Authority,
    hop: &Hop,
    token: TunnelToken,
    service: &ServiceName,
    timeouts: &Timeouts,
    stop: CancellationToken,
) -> Result<(), NodeError> {
    let (mut reader, mut writer) = hop.attach(local, timeouts, Side::Outlet, token).await?;
    let hello = Hello {
        service: Some(service.clone()),
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
    let now = unix_now();
    let reply = match request {
        AuthorityRequest::Redeem { code } => {
            let result = authority.redeem_ticket(&TicketCode::from_bytes(code), node, now);
            credential_reply(result, node, "enrollment")
        }
        AuthorityRequest::Renew => {
            let result = authority.issue_for_member(node, now);
            credential_reply(result, node, "renewal")
        }
        AuthorityRequest::Revocations { after } => {
            return feed(authority, &mut channel, after, &stop).await;
        }
    };
    send_message(&mut channel, &reply).await
}

fn credential_reply(
    result: Result<SignedCredential, postern_identity::authority::AuthorityError>,
    node: Identifier,
    what: &str,
) -> AuthorityReply {
    match result {
        Ok(credential) => {
            let id = credential
                .inspect_unverified()
                .map(|b| b.id.to_string())
                .unwrap_or_default();
            info!(%node, credential = %id, "{what}: credential issued");
            AuthorityReply::Credential { credential }
        }
        Err(e) => {
            warn!(%node, error = %e, "{what} refused");
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

/// Sends one request and returns the authority's credential.
async fn request_credential(
    local: &Arc<LocalParty>,
    route: &AuthorityRoute,
    timeouts: &Timeouts,
    request: AuthorityRequest,
) -> Result<SignedCredential, NodeError> {
    let stop = CancellationToken::new();
    let result = async {
        let mut channel = open(local, route, timeouts, &stop).await?;
        send_message(&mut channel, &request).await?;
        let mut plain = vec![0u8; postern_identity::frame::MAX_NOISE_MESSAGE];
        let reply = tokio::time::timeout(
            timeouts.handshake,
            recv_message::<AuthorityReply>(&mut channel, &mut plain),
        )
        .await
        .map_err(|_| {
            NodeError::OpenRefused(format!(
                "the authority did not answer within {:?}",
                timeouts.handshake
            ))
        })??;
        match reply {
            Some(AuthorityReply::Credential { credential }) => Ok(credential),
            Some(AuthorityReply::Refused { reason }) => Err(NodeError::OpenRefused(format!(
                "the authority refused: {reason}"
            ))),
            Some(AuthorityReply::Revocations { .. }) | None => Err(NodeError::OpenRefused(
                "the authority sent no credential".into(),
            )),
        }
    }
    .await;
    stop.cancel();
    result
}

/// Enrolls with a ticket: returns the credential the authority issued to
/// `local`'s identity, after checking that it is for us and from the
/// ticket's authority.
pub async fn enroll(
    local: &Arc<LocalParty>,
    ticket: &Ticket,
    timeouts: &Timeouts,
) -> Result<SignedCredential, NodeError> {
    let route = AuthorityRoute::from_ticket(ticket);
    let request = AuthorityRequest::Redeem {
        code: *ticket.code.as_bytes(),
    };
    let credential = request_credential(local, &route, timeouts, request).await?;
    check_own(local, &route, credential)
}

/// Asks for a fresh credential (the identity must still be a member).
pub async fn renew(
    local: &Arc<LocalParty>,
    route: &AuthorityRoute,
    timeouts: &Timeouts,
) -> Result<SignedCredential, NodeError> {
    let credential = request_credential(local, route, timeouts, AuthorityRequest::Renew).await?;
    check_own(local, route, credential)
}

fn check_own(
    local: &LocalParty,
    route: &AuthorityRoute,
    credential: SignedCredential,
) -> Result<SignedCredential, NodeError> {
    let trusted = [route.authority].into_iter().collect();
    postern_identity::credential::verify(
        &credential,
        &trusted,
        local.identity().identifier(),
        unix_now(),
        &postern_identity::credential::NoRevocations,
    )
    .map_err(|e| NodeError::OpenRefused(format!("the authority's credential is unusable: {e}")))?;
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
                        return Err(NodeError::OpenRefused(
                            "the authority closed the revocation feed".into(),
                        ))
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

    #[test]
    fn default_service_name_is_valid_and_messages_round_trip() {
        assert_eq!(authority_service_name().as_str(), "postern-authority");
        let msg = AuthorityRequest::Redeem { code: [7; 32] };
        let back: AuthorityRequest = wire::decode(&wire::encode(&msg).unwrap()).unwrap();
        assert!(matches!(back, AuthorityRequest::Redeem { code } if code == [7; 32]));
        assert!(wire::decode::<AuthorityReply>(b"\xff\x00garbage").is_err());
    }
}
