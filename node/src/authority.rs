//! The node's side of talking to the authority: enrolling with a ticket,
//! renewing a credential, following the revocation feed, and the channel
//! that other clients of the authority (the OpenID Connect enrollment in the
//! `postern-authority` crate) are built on.
//!
//! The authority is a service behind a relay, registered under a name: by
//! default its own `authority-P…` (`ServiceName::of_authority`), which
//! relays keep for that identity alone, or one its admin chose (an
//! enrollment ticket carries it, a trust anchor names it as `P…@SERVICE`;
//! the fixed `postern-authority` of older versions is such a legacy name).
//! A node reaches it through an end-to-end Noise channel pinned to the
//! authority's identifier (which an enrollment ticket carries) and
//! exchanges one CBOR message per data frame: an
//! [`AuthorityRequest`], answered by one or more [`AuthorityReply`]s
//! (`postern_identity::authority_wire` describes them). The authority's side
//! is `postern_authority::service`.
//!
//! - [`enroll`]: `Redeem { code }` with a ticket's one-time code.
//! - [`renew`]: `Renew`, a fresh credential for a current member.
//! - `renew_over` (crate-internal): `Renew` through the node's own hop
//!   channel, to the authority a [`TrustAnchor`] names (the renewal task's).
//! - Following revocations (`Revocations { after }`, kept open, one feed per
//!   trusted authority with its own cursor) and renewing are done by the
//!   node itself, in the library, over its existing hop channel
//!   (`feeds.rs`, `renewal.rs`).
//! - [`with_channel`] and [`AuthorityChannel`]: open a channel, send
//!   requests, read replies, for exchanges defined elsewhere.
//! - [`send_message`] and [`recv_message`]: one message per data frame on an
//!   established channel, for either end.

use std::sync::Arc;
use std::time::Duration;

use postern_identity::authority_wire::{AuthorityReply, AuthorityRequest};
use postern_identity::credential::SignedCredential;
use postern_identity::handshake::LocalParty;
use postern_identity::link;
use postern_identity::ticket::Ticket;
use postern_identity::wire::{self, DataFrame, ServiceName};
use postern_identity::Identifier;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::hop::{self, DataChannel, Hop};
use crate::trust::{unix_now, Trust, TrustAnchor};
use crate::tunnel;
use crate::{NodeError, RelayEndpoint, Timeouts};

/// Sends `msg` as one CBOR message in one data frame on an established
/// authority channel (either end).
pub async fn send_message<T: Serialize>(
    channel: &mut DataChannel,
    msg: &T,
) -> Result<(), NodeError> {
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

/// The next message on an established authority channel (either end), or
/// `None` when the peer ended the channel. `plain` holds the decrypted
/// frame: give it [`postern_identity::frame::MAX_NOISE_MESSAGE`] bytes.
/// Frames other than data (`Ready`, a credential) are skipped; a `Close` is
/// an error.
pub async fn recv_message<T: serde::de::DeserializeOwned>(
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

/// The name errors on an authority channel are labelled with. Only a label
/// (the legacy `postern-authority`): where a node looks for an authority is
/// its route's or trust anchor's service, by default `authority-P…`.
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
    /// The credential the authority issued is unusable here.
    #[error("the authority's credential is unusable: {0}")]
    BadCredential(String),
}

/// How long the authority may take to answer a request that does not wait
/// for a person (it may ask the OpenID provider: up to
/// `postern_authority::oidc::HTTP_TIMEOUT` per request, twice with a key
/// refetch).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(45);

/// How long to wait for the authority's answer to a request that does not
/// wait for a person: 45 s, or the handshake timeout if longer.
pub fn answer_wait(timeouts: &Timeouts) -> Duration {
    timeouts.handshake.max(ANSWER_TIMEOUT)
}

/// An open end-to-end channel to the authority, lent to the exchange given
/// to [`with_channel`].
#[derive(Debug)]
pub struct AuthorityChannel {
    channel: DataChannel,
    plain: Vec<u8>,
}

impl AuthorityChannel {
    /// Sends one request.
    pub async fn send(&mut self, request: &AuthorityRequest) -> Result<(), EnrollError> {
        Ok(send_message(&mut self.channel, request).await?)
    }

    /// The next reply, within `wait`.
    pub async fn reply(&mut self, wait: Duration) -> Result<AuthorityReply, EnrollError> {
        let next = recv_message::<AuthorityReply>(&mut self.channel, &mut self.plain);
        match tokio::time::timeout(wait, next).await {
            Err(_) => Err(EnrollError::NoAnswer(wait)),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(None)) => Err(EnrollError::Protocol(
                "it closed the channel without an answer".into(),
            )),
            Ok(Ok(Some(reply))) => Ok(reply),
        }
    }
}

/// The credential in `reply`, or why there is none.
pub fn expect_credential(reply: AuthorityReply) -> Result<SignedCredential, EnrollError> {
    match reply {
        AuthorityReply::Credential { credential } => Ok(credential),
        AuthorityReply::Refused { reason, .. } => Err(EnrollError::Refused(reason)),
        other => Err(EnrollError::Protocol(format!(
            "{} instead of a credential",
            other.kind()
        ))),
    }
}

/// Opens a channel to the authority, runs `exchange` on it, and closes it
/// (and the hop channel) whatever happens.
pub async fn with_channel<T, E, F>(
    local: &Arc<LocalParty>,
    route: &AuthorityRoute,
    timeouts: &Timeouts,
    exchange: F,
) -> Result<T, E>
where
    E: From<EnrollError>,
    F: AsyncFnOnce(&mut AuthorityChannel) -> Result<T, E>,
{
    let stop = CancellationToken::new();
    let result = async {
        let channel = open(local, route, timeouts, &stop)
            .await
            .map_err(|e| E::from(e.into()))?;
        let mut channel = AuthorityChannel {
            channel,
            plain: vec![0u8; postern_identity::frame::MAX_NOISE_MESSAGE],
        };
        exchange(&mut channel).await
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
    let wait = answer_wait(timeouts);
    with_channel(
        local,
        route,
        timeouts,
        async |channel: &mut AuthorityChannel| {
            channel.send(&request).await?;
            expect_credential(channel.reply(wait).await?)
        },
    )
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
    check_own_credential(local, &route, credential)
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
    check_own_credential(local, route, credential)
}

/// Checks that `credential`, just received from the authority of `route`,
/// is valid now, issued by that authority, and for `local`'s identity.
pub fn check_own_credential(
    local: &LocalParty,
    route: &AuthorityRoute,
    credential: SignedCredential,
) -> Result<SignedCredential, EnrollError> {
    check_issued(local, route.authority, credential)
}

fn check_issued(
    local: &LocalParty,
    authority: Identifier,
    credential: SignedCredential,
) -> Result<SignedCredential, EnrollError> {
    let trusted = [authority].into_iter().collect();
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

/// Asks `anchor`'s authority for a fresh credential through the node's own
/// hop channel `hop` (the identity must still be a member).
pub(crate) async fn renew_over(
    local: &LocalParty,
    hop: &Hop,
    anchor: &TrustAnchor,
    timeouts: &Timeouts,
) -> Result<SignedCredential, EnrollError> {
    let channel = hop.open_to_authority(local, timeouts, anchor).await?;
    let mut channel = AuthorityChannel {
        channel,
        plain: vec![0u8; postern_identity::frame::MAX_NOISE_MESSAGE],
    };
    channel.send(&AuthorityRequest::Renew).await?;
    let credential = expect_credential(channel.reply(answer_wait(timeouts)).await?)?;
    check_issued(local, anchor.authority, credential)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_service_name_is_valid() {
        assert_eq!(authority_service_name().as_str(), "postern-authority");
    }
}
