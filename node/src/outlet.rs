//! The outlet: registers a service at the relay and serves each incoming
//! tunnel by connecting it to the target, after deciding access.

use std::sync::Arc;
use std::time::Instant;

use postern_identity::handshake::{ChannelKind, LocalParty, Peer};
use postern_identity::link;
use postern_identity::transport::Sealer;
use postern_identity::wire::{CloseReason, Control, DataFrame, Hello, Side, TunnelToken};
use postern_identity::Identity;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::hop::{self, Backoff, Hop, HopEvent, RelayCycle};
use crate::tunnel::{self, ChannelHalves, TunnelEnd};
use crate::{access, feeds};
use crate::{Lifecycle, NodeError, NodeHandle, NodeStatus, OutletConfig, Target};

/// An outlet node. See [`Outlet::start`].
#[derive(Debug)]
pub struct Outlet;

struct Shared {
    local: Arc<LocalParty>,
    config: Arc<OutletConfig>,
    /// One permit per tunnel served at once (`max_tunnels`).
    slots: Arc<Semaphore>,
    /// The hop channel of the moment, which the revocation feeds and the
    /// renewals go through.
    hop: watch::Sender<Option<Arc<Hop>>>,
}

impl Outlet {
    /// Starts an outlet in the background of the current tokio runtime. It
    /// dials the relay (retrying with back-off), registers the service and
    /// serves tunnels until [`NodeHandle::shutdown`].
    ///
    /// With [`OutletConfig::policies`], Cedar policies decide every tunnel
    /// and `allow`/`allow_attributes` must be empty (a configuration mixing
    /// them is refused); a policy directory is re-read once a second.
    pub fn start(identity: Identity, config: OutletConfig) -> Result<NodeHandle, NodeError> {
        let service = &config.service;
        match &config.policies {
            Some(_) if !config.allow.is_empty() || !config.allow_attributes.is_empty() => {
                return Err(NodeError::Config(format!(
                    "the outlet of \"{service}\" has policies and also an allow list or attribute rules; with policies, express those as policies (permit(principal == Identity::\"P…\", action == Action::\"connect\", resource == Service::\"{service}\");) and drop --allow/--allow-attr"
                )));
            }
            Some(policies) => {
                let engine = policies.current();
                let from = policies.dir().map_or_else(
                    || "the embedding program".to_owned(),
                    |d| d.display().to_string(),
                );
                if engine.is_empty() {
                    warn!(%service, policies = %from, "no policies: this outlet admits nobody (default deny); add a permit policy for action \"connect\"");
                } else {
                    info!(%service, policies = engine.len(), files = engine.file_count(), from = %from, digest = %&engine.digest()[..12], "policies loaded; they decide every tunnel");
                }
                for warning in engine.warnings() {
                    warn!(%service, "policy warning: {warning}");
                }
                access::watch_policies("outlet", policies, config.audit.clone());
            }
            None if config.allow.is_empty() && config.allow_attributes.is_empty() => {
                warn!(%service, "no policies and an empty allow list: this outlet admits nobody (default deny); add --policies DIR, --allow <identifier> or --allow-attr NAME=VALUE");
            }
            None => {}
        }
        let life = Lifecycle::new(config.timeouts.drain_grace);
        let shared = Arc::new(Shared {
            local: Arc::new(LocalParty::new(identity)?),
            slots: Arc::new(Semaphore::new(config.max_tunnels)),
            hop: watch::channel(None).0,
            config: Arc::new(config),
        });
        // Revocations of every trusted authority, and renewals of the
        // outlet's own credential, over its own hop channel.
        feeds::spawn(
            &shared.local,
            &shared.hop.subscribe(),
            &shared.config.trust,
            &shared.config.timeouts,
            shared.config.credential_file.clone(),
            &life.stop,
        );
        let (status_tx, status) = watch::channel(NodeStatus::Connecting);
        let task = tokio::spawn(run(shared, life.clone(), status_tx));
        Ok(NodeHandle {
            life,
            task,
            status,
            local_addr: None,
        })
    }
}

/// How long an outlet waits before asking again after a refusal that needs
/// an admin (a denied registration, a revoked identity): long enough not to
/// flood the relay and its audit log, short enough to pick up a fixed
/// policy without a restart.
pub const REFUSED_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(30);

async fn run(shared: Arc<Shared>, life: Lifecycle, status: watch::Sender<NodeStatus>) {
    let cfg = &shared.config;
    let tunnels = TaskTracker::new();
    let mut cycle = RelayCycle::new(cfg.relays(), &cfg.timeouts);
    info!(identity = %shared.local.identity().identifier(), service = %cfg.service, target = %cfg.target, relays = %cycle.describe(), "outlet starting");
    // Draining closes the hop channel (the relay forgets the service, so no
    // new tunnel arrives); open tunnels keep running until `life.stop`.
    let drain = &life.drain;
    while let Some(relay) = cycle.current().cloned() {
        if drain.is_cancelled() {
            break;
        }
        status.send_replace(NodeStatus::Connecting);
        let ended = match hop::connect(
            &shared.local,
            &relay,
            &cfg.timeouts,
            cfg.trust.credential_to_present(),
            drain,
        )
        .await
        {
            Ok((hop, events)) => {
                cycle.connected();
                serve_session(
                    &shared,
                    hop,
                    events,
                    &tunnels,
                    &status,
                    &mut cycle.backoff,
                    &life.stop,
                )
                .await
            }
            Err(e) => e.to_string(),
        };
        if drain.is_cancelled() {
            break;
        }
        let mut delay = cycle.failed();
        // A refusal that needs an admin is not cured by asking fast.
        if matches!(*status.borrow(), NodeStatus::Refused(_)) {
            delay = delay.max(REFUSED_RETRY_DELAY);
        }
        let next = cycle.current().map_or("", |r| r.address.as_str());
        warn!(relay = %relay.address, reason = %ended, "relay session ended; connecting to {next} in {delay:.1?}");
        if !matches!(*status.borrow(), NodeStatus::Refused(_)) {
            status.send_replace(NodeStatus::Disconnected(ended));
        }
        tokio::select! {
            () = drain.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    life.finish(&tunnels, "outlet").await;
    status.send_replace(NodeStatus::Stopped);
    info!("outlet stopped");
}

/// Serves one hop session; returns why it ended.
async fn serve_session(
    shared: &Arc<Shared>,
    hop: Arc<Hop>,
    mut events: tokio::sync::mpsc::Receiver<HopEvent>,
    tunnels: &TaskTracker,
    status: &watch::Sender<NodeStatus>,
    backoff: &mut Backoff,
    stop: &CancellationToken,
) -> String {
    shared.hop.send_replace(Some(Arc::clone(&hop)));
    let ended = serve_events(shared, &hop, &mut events, tunnels, status, backoff, stop).await;
    shared.hop.send_replace(None);
    ended
}

/// The events of one hop session; returns why it ended.
async fn serve_events(
    shared: &Arc<Shared>,
    hop: &Arc<Hop>,
    events: &mut tokio::sync::mpsc::Receiver<HopEvent>,
    tunnels: &TaskTracker,
    status: &watch::Sender<NodeStatus>,
    backoff: &mut Backoff,
    stop: &CancellationToken,
) -> String {
    let cfg = &shared.config;
    if let Err(e) = hop
        .send(Control::Register {
            service: cfg.service.clone(),
        })
        .await
    {
        return e.to_string();
    }
    // Ready once registered and able to vouch for current revocations of
    // every authority it trusts.
    let mut registered = false;
    let mut feeds = cfg.trust.watch_feeds();
    loop {
        let event = tokio::select! {
            () = hop.closed.cancelled() => break,
            event = events.recv() => event,
            changed = feeds.changed(), if registered => {
                if changed.is_ok() {
                    report_ready(cfg, status, registered);
                }
                continue;
            }
        };
        match event {
            None => break,
            Some(HopEvent::Registered(service)) => {
                backoff.reset();
                info!(%service, relay = %hop.relay.address, "service registered at relay");
                registered = true;
                report_ready(cfg, status, registered);
            }
            Some(HopEvent::RegisterRefused(service, refusal)) => {
                if refusal.code.is_retryable() {
                    warn!(%service, code = %refusal.code, reason = %refusal.reason, "relay refused the registration for now");
                } else {
                    error!(%service, code = %refusal.code, reason = %refusal.reason, "relay refused the registration");
                    status.send_replace(NodeStatus::Refused(refusal.reason.clone()));
                }
                return format!("registration refused: {refusal}");
            }
            Some(HopEvent::FollowRevocations(after)) => {
                debug!(after, "the relay asked for revocations, but this outlet is not an authority; ignoring");
            }
            Some(HopEvent::Incoming(service, token, source)) => {
                if service != cfg.service {
                    warn!(%service, "relay asked for a service this outlet does not serve; ignoring");
                    continue;
                }
                let shared = Arc::clone(shared);
                let hop = Arc::clone(hop);
                let Ok(slot) = Arc::clone(&shared.slots).try_acquire_owned() else {
                    tunnels.spawn(async move { refuse_tunnel(&shared, &hop, token).await });
                    continue;
                };
                // Live tunnels outlast the hop channel that announced them
                // (they have their own connections); only shutdown ends them.
                let stop = stop.clone();
                tunnels.spawn(async move {
                    serve_tunnel(&shared, &hop, token, source, stop).await;
                    drop(slot);
                });
            }
        }
    }
    if let Some(refusal) = hop.goodbye().filter(|r| !r.code.is_retryable()) {
        error!(code = %refusal.code, reason = %refusal.reason, "the relay refused this outlet");
        status.send_replace(NodeStatus::Refused(refusal.reason));
    }
    hop.ended_because()
        .unwrap_or_else(|| "relay session closed".into())
}

/// Says `Ready` once registered with current revocations, and why not yet
/// otherwise.
fn report_ready(cfg: &OutletConfig, status: &watch::Sender<NodeStatus>, registered: bool) {
    if !registered {
        return;
    }
    match cfg.trust.require_current() {
        Ok(()) => {
            status.send_if_modified(|s| {
                let changed = *s != NodeStatus::Ready;
                *s = NodeStatus::Ready;
                changed
            });
        }
        Err(stale) => {
            status.send_replace(NodeStatus::Connecting);
            debug!(reason = %stale, "registered; waiting for current revocations before serving");
        }
    }
}

/// Answers a tunnel beyond `max_tunnels`: completes the end-to-end handshake
/// only to tell the inlet why, so it does not wait for a timeout.
async fn refuse_tunnel(shared: &Shared, hop: &Hop, token: TunnelToken) {
    let cfg = &shared.config;
    let label = token.label();
    let reason = format!(
        "outlet for \"{}\" is serving its maximum of {} tunnels at once (max_tunnels); try again later",
        cfg.service, cfg.max_tunnels
    );
    warn!(tunnel = %label, limit = cfg.max_tunnels, "refusing tunnel: at the tunnel limit");
    if let Some((_, mut channel)) = accept(shared, hop, token, &label).await {
        send_close(
            &mut channel.writer,
            &mut channel.sealer,
            CloseReason::TargetUnavailable { reason },
        )
        .await;
    }
}

/// Attaches a data connection to the tunnel of `token` and answers the
/// inlet's end-to-end handshake, claiming the service and presenting the
/// outlet's credential. `None` (logged) when either fails.
async fn accept(
    shared: &Shared,
    hop: &Hop,
    token: TunnelToken,
    label: &str,
) -> Option<(Peer, hop::DataChannel)> {
    let cfg = &shared.config;
    let (mut reader, mut writer) = match hop
        .attach(&shared.local, &cfg.timeouts, Side::Outlet, token)
        .await
    {
        Ok(halves) => halves,
        Err(e) => {
            warn!(tunnel = %label, error = %e, "could not attach to tunnel");
            return None;
        }
    };
    let hello = Hello {
        service: Some(cfg.service.clone()),
        credential: cfg.trust.credential(),
    };
    let handshake = link::respond(
        &mut reader,
        &mut writer,
        &shared.local,
        ChannelKind::EndToEnd,
        &hello,
    );
    match link::within(cfg.timeouts.handshake, "end-to-end handshake", handshake).await {
        Ok((peer, transport)) => {
            let (sealer, opener) = transport.split();
            Some((
                peer,
                ChannelHalves {
                    reader,
                    writer,
                    sealer,
                    opener,
                },
            ))
        }
        Err(e) => {
            warn!(tunnel = %label, error = %e, "end-to-end handshake failed; closing tunnel");
            None
        }
    }
}

async fn send_close(writer: &mut OwnedWriteHalf, sealer: &mut Sealer, reason: CloseReason) {
    let (mut scratch, mut out) = (Vec::new(), Vec::new());
    let _ = tunnel::send_frame(
        writer,
        sealer,
        &DataFrame::Close(reason),
        &mut scratch,
        &mut out,
    )
    .await;
}

async fn serve_tunnel(
    shared: &Shared,
    hop: &Hop,
    token: TunnelToken,
    source: Option<std::net::IpAddr>,
    stop: CancellationToken,
) {
    let cfg = &shared.config;
    let started = Instant::now();
    let label = token.label();
    let Some((peer, channel)) = accept(shared, hop, token, &label).await else {
        return;
    };
    let inlet = peer.identity.identifier();
    let ChannelHalves {
        reader,
        mut writer,
        mut sealer,
        opener,
    } = channel;
    if peer.hello.service.as_ref() != Some(&cfg.service) {
        let reason = format!(
            "this outlet serves \"{}\", not {:?}",
            cfg.service,
            peer.hello.service.as_ref().map(|s| s.as_str())
        );
        warn!(tunnel = %label, %inlet, %reason, "refusing tunnel: service mismatch");
        send_close(
            &mut writer,
            &mut sealer,
            CloseReason::ServiceMismatch { reason },
        )
        .await;
        return;
    }
    // Just after start (or a reconnect) the first revocations may still be
    // on their way: wait a moment for them rather than refuse at once.
    let _ = cfg.trust.wait_current(cfg.timeouts.handshake).await;
    let seen = access::Circumstances {
        tunnel: label.clone(),
        relay: hop.relay.identifier,
        source,
    };
    let admission = match access::decide(cfg, inlet, peer.hello.credential.as_ref(), &seen) {
        Ok(admission) => admission,
        Err(refusal) => {
            send_close(&mut writer, &mut sealer, refusal).await;
            return;
        }
    };
    // Revocations, expiry and policy changes end the tunnel while it runs,
    // telling the inlet why.
    let stop = stop.child_token();
    let stop_reason = tunnel::StopReason::default();
    let (renewals_tx, renewals) = tokio::sync::mpsc::channel(4);
    let watchdog = tokio::spawn(access::watch(
        Arc::clone(&shared.config),
        admission,
        seen,
        renewals,
        stop.clone(),
        stop_reason.clone(),
    ));
    let _watchdog = AbortOnDrop(watchdog);
    let target = match connect_target(&cfg.target, cfg.timeouts.connect).await {
        Ok(target) => target,
        Err(e) => {
            let reason = format!(
                "the outlet cannot connect to its target {}: {e}",
                cfg.target
            );
            error!(tunnel = %label, %reason, "target unavailable");
            send_close(
                &mut writer,
                &mut sealer,
                CloseReason::TargetUnavailable { reason },
            )
            .await;
            return;
        }
    };
    let (mut scratch, mut out) = (Vec::new(), Vec::new());
    if let Err(e) = tunnel::send_frame(
        &mut writer,
        &mut sealer,
        &DataFrame::Ready,
        &mut scratch,
        &mut out,
    )
    .await
    {
        warn!(tunnel = %label, error = %e, "tunnel lost before it was ready");
        return;
    }
    debug!(tunnel = %label, setup = ?started.elapsed(), "tunnel ready");
    let channel = ChannelHalves {
        reader,
        writer,
        sealer,
        opener,
    };
    let options = tunnel::PumpOptions::with_idle_timeout(cfg.timeouts.tunnel_idle)
        .with_stop_reason(stop_reason.clone())
        .with_own_credential(cfg.trust.watch_credential())
        .with_peer_credentials(renewals_tx);
    let outcome = match target {
        LocalStream::Tcp(stream) => {
            let (mut r, mut w) = stream.into_split();
            let outcome = tunnel::pump_with(&mut r, &mut w, channel, stop, &options).await;
            if outcome.end.is_abort() {
                reset_tcp(r, w);
            }
            outcome
        }
        LocalStream::Unix(stream) => {
            let (r, w) = stream.into_split();
            tunnel::pump_with(r, w, channel, stop, &options).await
        }
    };
    log_end(&label, &inlet.to_string(), cfg.service.as_str(), &outcome);
    let why = match (&outcome.end, stop_reason.get()) {
        (TunnelEnd::Cancelled, Some(reason)) => reason.to_string(),
        (end, _) => end.describe(),
    };
    access::audit_closed(
        cfg.audit.as_ref(),
        &label,
        inlet,
        &cfg.service,
        (outcome.received, outcome.sent),
        why,
    );
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) fn log_end(label: &str, peer: &str, service: &str, outcome: &tunnel::TunnelOutcome) {
    let (sent, received) = (outcome.sent, outcome.received);
    match &outcome.end {
        TunnelEnd::Clean => {
            info!(tunnel = %label, %peer, %service, sent, received, "tunnel closed")
        }
        TunnelEnd::Cancelled => {
            info!(tunnel = %label, %peer, %service, sent, received, "tunnel closed by shutdown")
        }
        TunnelEnd::LocalFailed(e) => {
            info!(tunnel = %label, %peer, %service, sent, received, error = %e, "tunnel aborted: local connection failed")
        }
        TunnelEnd::PeerClosed(reason) => {
            info!(tunnel = %label, %peer, %service, sent, received, %reason, "tunnel closed by peer")
        }
        TunnelEnd::LinkFailed(e) => {
            warn!(tunnel = %label, %peer, %service, sent, received, error = %e, "tunnel aborted: its connection through the relay failed (relay or peer gone?)")
        }
        TunnelEnd::IdleTimeout(after) => {
            info!(tunnel = %label, %peer, %service, sent, received, idle = ?after, "tunnel closed: idle timeout")
        }
    }
}

/// Closes the connection with a reset, so an abort at one end of a tunnel is
/// seen as an abort at the other. The write half is released without the
/// `shutdown(Write)` its drop would do: a FIN sent first would reach the peer
/// as a clean end of stream before the reset.
pub(crate) fn reset_tcp(read: OwnedReadHalf, write: OwnedWriteHalf) {
    let stream: &TcpStream = read.as_ref();
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
    write.forget();
    drop(read);
}

enum LocalStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn connect_target(
    target: &Target,
    timeout: std::time::Duration,
) -> std::io::Result<LocalStream> {
    let connect = async {
        match target {
            Target::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await?;
                let _ = stream.set_nodelay(true);
                Ok(LocalStream::Tcp(stream))
            }
            Target::Unix(path) => Ok(LocalStream::Unix(UnixStream::connect(path).await?)),
        }
    };
    tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ))
        })
}
