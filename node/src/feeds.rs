//! Following the revocations of every trusted authority, and renewing the
//! node's own credential, over the node's own hop channel.
//!
//! Outlets and inlets start these tasks themselves ([`spawn`]): an embedded
//! node is exactly as protected as the `postern` binary. Each trusted
//! authority ([`TrustAnchor`]) gets one long-lived end-to-end channel to its
//! service, opened through whichever hop channel the node has at the
//! moment, asking for the revocations after the node's cursor for *that*
//! authority. Every message on it (entries, or the authority's periodic
//! "nothing new") marks that authority's revocations current
//! ([`Trust::apply_feed`]). While a feed is down the node keeps retrying,
//! warns once its view is half as old as the bound, and refuses new tunnels
//! beyond it ([`Trust::require_current`]); a [`StalenessAlarm`] decides what
//! to say and when.

use std::sync::Arc;
use std::time::Duration;

use postern_identity::authority_wire::{AuthorityReply, AuthorityRequest};
use postern_identity::handshake::LocalParty;
use postern_identity::revocation::{Alarm, StalenessAlarm};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::authority::{recv_message, send_message};
use crate::hop::{Backoff, DataChannel, Hop};
use crate::trust::{Trust, TrustAnchor};
use crate::{renewal, NodeError, Timeouts};

/// The node's hop channel of the moment (`None` while reconnecting).
pub(crate) type Hops = watch::Receiver<Option<Arc<Hop>>>;

/// How often the staleness of the feeds is looked at.
const ALARM_EVERY: Duration = Duration::from_secs(1);

/// Starts following every authority `trust` anchors, watching their
/// staleness, and renewing the node's credential (saved to `save_to`), all
/// over `hops`, until `stop`.
pub(crate) fn spawn(
    local: &Arc<LocalParty>,
    hops: &Hops,
    trust: &Arc<Trust>,
    timeouts: &Timeouts,
    save_to: Option<std::path::PathBuf>,
    stop: &CancellationToken,
) {
    for anchor in trust.anchors() {
        tokio::spawn(follow(
            Arc::clone(local),
            hops.clone(),
            Arc::clone(trust),
            anchor.clone(),
            timeouts.clone(),
            stop.clone(),
        ));
    }
    if !trust.anchors().is_empty() {
        tokio::spawn(watch_staleness(Arc::clone(trust), stop.clone()));
    }
    if trust.credential().is_some() {
        tokio::spawn(renewal::keep_renewed(
            Arc::clone(local),
            hops.clone(),
            Arc::clone(trust),
            timeouts.clone(),
            save_to,
            stop.clone(),
        ));
    }
}

/// The current hop channel, waiting for one while there is none; `None`
/// once `stop` is cancelled.
pub(crate) async fn current_hop(hops: &mut Hops, stop: &CancellationToken) -> Option<Arc<Hop>> {
    loop {
        let hop = hops.borrow_and_update().clone();
        if let Some(hop) = hop.filter(|h| !h.closed.is_cancelled()) {
            return Some(hop);
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            changed = hops.changed() => if changed.is_err() { return None },
        }
    }
}

/// Follows one authority's feed for as long as the node runs.
async fn follow(
    local: Arc<LocalParty>,
    mut hops: Hops,
    trust: Arc<Trust>,
    anchor: TrustAnchor,
    timeouts: Timeouts,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(&timeouts);
    let mut failures = 0u32;
    loop {
        let Some(hop) = current_hop(&mut hops, &stop).await else {
            return;
        };
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = feed_once(&local, &hop, &trust, &anchor, &timeouts, &mut backoff, &mut failures) => result,
        };
        let Err(e) = result;
        failures += 1;
        if failures == 1 || failures.is_multiple_of(60) {
            warn!(authority = %anchor.authority, service = %anchor.service, error = %e, "revocation feed unavailable; retrying");
        } else {
            debug!(authority = %anchor.authority, error = %e, "revocation feed unavailable; retrying");
        }
        let delay = backoff.next_delay().max(Duration::from_millis(500));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One feed channel, through `hop`: the revocations after the node's cursor
/// for this authority, then every new one and the heartbeats, until the
/// channel fails.
async fn feed_once(
    local: &LocalParty,
    hop: &Hop,
    trust: &Trust,
    anchor: &TrustAnchor,
    timeouts: &Timeouts,
    backoff: &mut Backoff,
    failures: &mut u32,
) -> Result<std::convert::Infallible, NodeError> {
    let mut channel = request_feed(local, hop, trust, anchor, timeouts).await?;
    let mut plain = vec![0u8; postern_identity::frame::MAX_NOISE_MESSAGE];
    loop {
        match recv_message::<AuthorityReply>(&mut channel, &mut plain).await? {
            Some(AuthorityReply::Revocations { entries }) => {
                let applied = trust.apply_feed(&anchor.authority, entries);
                if applied > 0 {
                    info!(authority = %anchor.authority, count = applied, "revocations received from the authority");
                }
                if *failures > 0 {
                    info!(authority = %anchor.authority, "revocation feed connected");
                }
                *failures = 0;
                backoff.reset();
            }
            Some(AuthorityReply::Refused { reason, .. }) => {
                return Err(NodeError::Config(format!(
                    "authority {} refused the revocation feed: {reason}",
                    anchor.authority
                )))
            }
            Some(other) => debug!(
                reply = other.kind(),
                "unexpected message on the revocation feed"
            ),
            None => {
                return Err(NodeError::RelayLost(
                    "the authority closed the revocation feed".into(),
                ))
            }
        }
    }
}

/// Opens a channel to `anchor`'s authority and asks for the revocations
/// after this node's cursor for it.
async fn request_feed(
    local: &LocalParty,
    hop: &Hop,
    trust: &Trust,
    anchor: &TrustAnchor,
    timeouts: &Timeouts,
) -> Result<DataChannel, NodeError> {
    let mut channel = hop.open_to_authority(local, timeouts, anchor).await?;
    let after = trust.feed_cursor(&anchor.authority);
    send_message(&mut channel, &AuthorityRequest::Revocations { after }).await?;
    Ok(channel)
}

/// Fetches one round of every anchor's feed through `hop` (for one-shot
/// commands such as `inlet --check`): the revocations after the node's
/// cursors, which also marks each authority current.
pub(crate) async fn sync_once(
    local: &LocalParty,
    hop: &Hop,
    trust: &Trust,
    timeouts: &Timeouts,
) -> Result<(), NodeError> {
    for anchor in trust.anchors() {
        let mut channel = request_feed(local, hop, trust, anchor, timeouts).await?;
        let mut plain = vec![0u8; postern_identity::frame::MAX_NOISE_MESSAGE];
        let reply = tokio::time::timeout(
            timeouts.handshake,
            recv_message::<AuthorityReply>(&mut channel, &mut plain),
        )
        .await
        .map_err(|_| {
            NodeError::RelayLost(format!(
                "authority {} sent no revocations within {:?}",
                anchor.authority, timeouts.handshake
            ))
        })??;
        match reply {
            Some(AuthorityReply::Revocations { entries }) => {
                trust.apply_feed(&anchor.authority, entries);
            }
            Some(AuthorityReply::Refused { reason, .. }) => {
                return Err(NodeError::Config(format!(
                    "authority {} refused the revocation feed: {reason}",
                    anchor.authority
                )))
            }
            _ => {
                return Err(NodeError::RelayLost(format!(
                    "authority {} did not answer with its revocations",
                    anchor.authority
                )))
            }
        }
    }
    Ok(())
}

/// Logs the staleness alarms of `trust`'s feeds until `stop`.
async fn watch_staleness(trust: Arc<Trust>, stop: CancellationToken) {
    let started = tokio::time::Instant::now();
    let bound = trust.max_staleness();
    let mut alarm = StalenessAlarm::default();
    let mut tick = tokio::time::interval(ALARM_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for said in alarm.update(&trust.freshness(), bound, started.elapsed()) {
            match said {
                Alarm::StillWaiting(authority, waited) => {
                    warn!(%authority, "no revocations received from authority {authority} after {waited:.0?}: new tunnels wait for them (is the authority running and registered at the relay?)")
                }
                Alarm::Aging(authority, age) => {
                    warn!(%authority, "the revocations of authority {authority} are {age:.0?} old (its feed is down): new tunnels will be refused once they are {bound:?} old")
                }
                Alarm::Refusing(authority, fresh) => {
                    error!(%authority, "the revocations of authority {authority} are too stale ({fresh}; bound {bound:?}): refusing new tunnels until its feed is back")
                }
                Alarm::Recovered(authority) => {
                    info!(%authority, "the revocations of authority {authority} are current again")
                }
            }
        }
    }
}
