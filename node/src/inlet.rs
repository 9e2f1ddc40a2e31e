//! The inlet: listens on loopback and turns each accepted connection into a
//! tunnel to the outlet, opened just in time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_identity::credential::{CredentialError, VerifiedCredential};
use postern_identity::handshake::LocalParty;
use postern_identity::link;
use postern_identity::time::unix_now;
use postern_identity::wire::{CloseReason, DataFrame};
use postern_identity::{Identifier, Identity};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::feeds;
use crate::hop::{self, DataChannel, Hop, RelayCycle};
use crate::outlet::{log_end, reset_tcp};
use crate::tunnel::{self, TunnelEnd};
use crate::{InletConfig, Lifecycle, NodeError, NodeHandle, NodeStatus, Trust};

/// An inlet node. See [`Inlet::start`].
#[derive(Debug)]
pub struct Inlet;

struct Shared {
    local: Arc<LocalParty>,
    config: InletConfig,
    /// The current hop channel, if connected.
    hop: watch::Sender<Option<Arc<Hop>>>,
    status: watch::Sender<NodeStatus>,
}

impl Inlet {
    /// Binds the listening socket, then connects to the relay in the
    /// background (retrying with back-off). Client connections that arrive
    /// while the relay is unreachable are refused at once, with a logged
    /// reason.
    pub async fn start(identity: Identity, config: InletConfig) -> Result<NodeHandle, NodeError> {
        if !config.require_outlet_attributes.is_empty() && config.trust.authorities().is_empty() {
            return Err(NodeError::Config(
                "--require-outlet-attr needs the authority that vouches for the outlet: add --trust-authority P…".into(),
            ));
        }
        if !config.listen.ip().is_loopback() {
            if !config.dangerous_allow_non_loopback {
                return Err(NodeError::NonLoopback(config.listen));
            }
            warn!(listen = %config.listen, "listening on a non-loopback address: anyone who can reach it can use this tunnel with your identity");
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| NodeError::Bind {
                    address: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| NodeError::Bind {
            address: config.listen,
            source,
        })?;
        let (status_tx, status) = watch::channel(NodeStatus::Connecting);
        let shared = Arc::new(Shared {
            local: Arc::new(LocalParty::new(identity)?),
            config,
            hop: watch::channel(None).0,
            status: status_tx,
        });
        let life = Lifecycle::new(shared.config.timeouts.drain_grace);
        // Revocations of the authorities that vouch for outlets, and
        // renewals of the inlet's own credential, over its own hop channel.
        feeds::spawn(
            &shared.local,
            &shared.hop.subscribe(),
            &shared.config.trust,
            &shared.config.timeouts,
            shared.config.credential_file.clone(),
            &life.stop,
        );
        let task = tokio::spawn(run(shared, listener, local_addr, life.clone()));
        Ok(NodeHandle {
            life,
            task,
            status,
            local_addr: Some(local_addr),
        })
    }
}

async fn run(shared: Arc<Shared>, listener: TcpListener, local_addr: SocketAddr, life: Lifecycle) {
    let cfg = &shared.config;
    let stop = &life.stop;
    info!(identity = %shared.local.identity().identifier(), service = %cfg.service, listen = %local_addr, relay = %cfg.relay.address, "inlet listening");
    let tunnels = TaskTracker::new();
    // The hop channel stays up while draining: clients accepted just before
    // still need it to open their tunnels.
    let keeper = tokio::spawn(keep_connected(Arc::clone(&shared), stop.clone()));
    let slots = Arc::new(Semaphore::new(cfg.max_tunnels));
    loop {
        let accepted = tokio::select! {
            () = life.drain.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (client, client_addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "accept failed; retrying shortly");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            error!(client = %client_addr, service = %cfg.service, limit = cfg.max_tunnels, "refusing client connection: this inlet already carries its maximum of {} tunnels (max_tunnels)", cfg.max_tunnels);
            let (r, w) = client.into_split();
            reset_tcp(r, w);
            continue;
        };
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        tunnels.spawn(async move {
            serve_client(&shared, client, client_addr, stop).await;
            drop(slot);
        });
    }
    drop(listener);
    life.finish(&tunnels, "inlet").await;
    let _ = keeper.await;
    shared.status.send_replace(NodeStatus::Stopped);
    info!("inlet stopped");
}

/// Keeps a hop channel to a relay up, reconnecting with back-off and
/// failing over to the next configured relay.
async fn keep_connected(shared: Arc<Shared>, stop: CancellationToken) {
    let cfg = &shared.config;
    let mut cycle = RelayCycle::new(cfg.relays(), &cfg.timeouts);
    while let Some(relay) = cycle.current().cloned() {
        if stop.is_cancelled() {
            break;
        }
        shared.status.send_replace(NodeStatus::Connecting);
        let ended = match hop::connect(
            &shared.local,
            &relay,
            &cfg.timeouts,
            cfg.trust.credential_to_present(),
            &stop,
        )
        .await
        {
            Ok((hop, _events)) => {
                info!(relay = %relay.address, "connected to relay");
                cycle.connected();
                cycle.backoff.reset();
                shared.hop.send_replace(Some(Arc::clone(&hop)));
                // Ready once the revocations of every trusted authority are
                // current (at once when it trusts none).
                let mut feeds = cfg.trust.watch_feeds();
                loop {
                    if cfg.trust.require_current().is_ok() {
                        shared.status.send_replace(NodeStatus::Ready);
                    }
                    tokio::select! {
                        () = hop.closed.cancelled() => break,
                        changed = feeds.changed() => if changed.is_err() {
                            hop.closed.cancelled().await;
                            break;
                        },
                    }
                }
                shared.hop.send_replace(None);
                match hop.goodbye().filter(|r| !r.code.is_retryable()) {
                    Some(refusal) => {
                        error!(code = %refusal.code, reason = %refusal.reason, "the relay refused this inlet");
                        format!("the relay refused this inlet: {refusal}")
                    }
                    None => hop
                        .ended_because()
                        .unwrap_or_else(|| "relay session closed".into()),
                }
            }
            Err(e) => e.to_string(),
        };
        if stop.is_cancelled() {
            break;
        }
        let delay = cycle.failed();
        let next = cycle.current().map_or("", |r| r.address.as_str());
        warn!(relay = %relay.address, reason = %ended, "no relay connection; new client connections are refused until one is back; trying {next} in {delay:.1?}");
        shared.status.send_replace(NodeStatus::Disconnected(ended));
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Opens one tunnel: token from the relay, attach, end-to-end handshake with
/// the pinned outlet.
async fn open_tunnel(
    shared: &Shared,
) -> Result<(Identifier, Option<VerifiedCredential>, DataChannel), NodeError> {
    let cfg = &shared.config;
    // The outlet's credential cannot be checked against revocations this
    // inlet does not have (just after start, wait a moment for them).
    cfg.trust.wait_current(cfg.timeouts.handshake).await?;
    let hop = shared.hop.borrow().clone();
    let Some(hop) = hop else {
        let status = match &*shared.status.borrow() {
            NodeStatus::Disconnected(reason) => reason.clone(),
            other => format!("{other:?}"),
        };
        return Err(NodeError::NotConnected {
            address: cfg.relay.address.clone(),
            status,
        });
    };
    let (peer, channel) = hop
        .open_end_to_end(
            &shared.local,
            &cfg.timeouts,
            &cfg.service,
            cfg.outlet,
            &cfg.trust,
            &cfg.require_outlet_attributes,
        )
        .await?;
    let outlet = peer.identity.identifier();
    // Verified in the handshake already; kept for the live re-checks.
    let credential = cfg
        .trust
        .verify(outlet, peer.hello.credential.as_ref(), unix_now())
        .ok()
        .flatten();
    Ok((outlet, credential, channel))
}

/// Ends a live tunnel once the outlet at its far end is no longer one this
/// inlet would open a tunnel to: its identity, or the credential it
/// presented, revoked by a trusted authority. Wakes on each revocation feed
/// update, not on a timer. The relay never cuts a spliced tunnel and a
/// revoked outlet (its key perhaps in other hands) will not close its own,
/// so this is the inlet's to do. The credential's expiry is not watched:
/// outlets renew theirs while tunnels run, and the next tunnel checks it.
pub(crate) async fn watch_outlet(
    trust: Arc<Trust>,
    outlet: Identifier,
    credential: Option<VerifiedCredential>,
    stop: CancellationToken,
    reason_out: tunnel::StopReason,
) {
    let mut feeds = trust.watch_feeds();
    loop {
        feeds.borrow_and_update();
        let ended = if trust.identity_revoked(&outlet) {
            Some(format!("outlet {outlet} has been revoked by its authority"))
        } else {
            credential
                .as_ref()
                .and_then(|c| match trust.still_valid(c, unix_now()) {
                    Err(e @ CredentialError::Revoked { .. }) => {
                        Some(format!("outlet's credential no longer valid: {e}"))
                    }
                    _ => None,
                })
        };
        if let Some(reason) = ended {
            warn!(%outlet, %reason, "closing live tunnel: the outlet is no longer trusted");
            reason_out.set(CloseReason::Aborted { reason });
            stop.cancel();
            return;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = feeds.changed() => {
                if changed.is_err() {
                    // No more feed updates: nothing left to watch.
                    return;
                }
            }
        }
    }
}

fn explain(cfg: &InletConfig, outlet: Identifier, end: &TunnelEnd) -> Option<NodeError> {
    match end {
        TunnelEnd::PeerClosed(CloseReason::Denied { reason }) => Some(NodeError::Denied {
            service: cfg.service.clone(),
            outlet,
            reason: reason.clone(),
        }),
        TunnelEnd::PeerClosed(
            reason @ (CloseReason::TargetUnavailable { .. }
            | CloseReason::ServiceMismatch { .. }
            | CloseReason::Unavailable { .. }),
        ) => Some(NodeError::ClosedByOutlet {
            service: cfg.service.clone(),
            outlet,
            reason: reason.clone(),
        }),
        _ => None,
    }
}

async fn serve_client(
    shared: &Shared,
    client: TcpStream,
    client_addr: SocketAddr,
    stop: CancellationToken,
) {
    let cfg = &shared.config;
    let started = Instant::now();
    let (outlet, credential, channel) = match open_tunnel(shared).await {
        Ok(ok) => ok,
        Err(e) => {
            error!(client = %client_addr, service = %cfg.service, "refusing client connection: {e}");
            let (r, w) = client.into_split();
            reset_tcp(r, w);
            return;
        }
    };
    debug!(client = %client_addr, %outlet, setup = ?started.elapsed(), "tunnel open");
    let (mut r, mut w) = client.into_split();
    let reason = tunnel::StopReason::default();
    let options = tunnel::PumpOptions::with_idle_timeout(cfg.timeouts.tunnel_idle)
        .with_own_credential(cfg.trust.watch_credential())
        .with_stop_reason(reason.clone());
    let stop = stop.child_token();
    let watcher = (!cfg.trust.authorities().is_empty()).then(|| {
        tokio::spawn(watch_outlet(
            Arc::clone(&cfg.trust),
            outlet,
            credential,
            stop.clone(),
            reason,
        ))
    });
    let outcome = tunnel::pump_with(&mut r, &mut w, channel, stop, &options).await;
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    if outcome.end.is_abort() {
        reset_tcp(r, w);
    }
    match explain(cfg, outlet, &outcome.end) {
        Some(e) => error!(client = %client_addr, "{e}"),
        None => log_end(
            &client_addr.to_string(),
            &outlet.to_string(),
            cfg.service.as_str(),
            &outcome,
        ),
    }
}

/// Result of [`check`].
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The outlet that answered and admitted us.
    pub outlet: Identifier,
    /// Time to connect to the relay and open the tunnel through to the
    /// outlet's `Ready`.
    pub elapsed: Duration,
}

/// Connects to the relay, opens one tunnel and waits for the outlet's
/// verdict, without any client: `Ok` means a client connection would be
/// served. Errors say exactly what refused it (relay, outlet identity, access
/// decision, target).
pub async fn check(identity: Identity, config: &InletConfig) -> Result<CheckReport, NodeError> {
    let started = Instant::now();
    let local = Arc::new(LocalParty::new(identity)?);
    let stop = CancellationToken::new();
    let (hop, _events) = hop::connect(
        &local,
        &config.relay,
        &config.timeouts,
        config.trust.credential_to_present(),
        &stop,
    )
    .await?;
    // One round of each trusted authority's revocations, so the outlet's
    // credential is checked against them.
    if let Err(e) = feeds::sync_once(&local, &hop, &config.trust, &config.timeouts).await {
        stop.cancel();
        return Err(e);
    }
    let shared = Shared {
        local,
        config: config.clone(),
        hop: watch::channel(Some(hop)).0,
        status: watch::channel(NodeStatus::Ready).0,
    };
    let result = async {
        let (outlet, _, mut channel) = open_tunnel(&shared).await?;
        let mut plain = vec![0u8; postern_identity::frame::MAX_NOISE_MESSAGE];
        let verdict = link::within(config.timeouts.handshake, "outlet verdict", async {
            let n =
                tunnel::recv_frame(&mut channel.reader, &mut channel.opener, &mut plain).await?;
            Ok(match DataFrame::decode(&plain[..n])? {
                DataFrame::Close(reason) => Some(reason),
                _ => None,
            })
        })
        .await
        .map_err(|source| NodeError::Tunnel {
            service: config.service.clone(),
            source,
        })?;
        if let Some(reason) = verdict {
            let end = TunnelEnd::PeerClosed(reason.clone());
            return Err(
                explain(config, outlet, &end).unwrap_or(NodeError::ClosedByOutlet {
                    service: config.service.clone(),
                    outlet,
                    reason,
                }),
            );
        }
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        let _ = tunnel::send_frame(
            &mut channel.writer,
            &mut channel.sealer,
            &DataFrame::Eof,
            &mut scratch,
            &mut out,
        )
        .await;
        Ok(CheckReport {
            outlet,
            elapsed: started.elapsed(),
        })
    }
    .await;
    stop.cancel();
    result
}
