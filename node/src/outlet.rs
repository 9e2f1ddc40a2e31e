//! The outlet: registers a service at the relay and serves each incoming
//! tunnel by connecting it to the target, after deciding access.

use std::sync::Arc;
use std::time::Instant;

use postern_identity::handshake::{ChannelKind, LocalParty};
use postern_identity::link;
use postern_identity::transport::Sealer;
use postern_identity::wire::{CloseReason, Control, DataFrame, Hello, Side, TunnelToken};
use postern_identity::Identity;
use postern_policies::Decision;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::hop::{self, Backoff, Hop, HopEvent};
use crate::tunnel::{self, ChannelHalves, TunnelEnd};
use crate::{NodeError, NodeHandle, NodeStatus, OutletConfig, Target};

/// An outlet node. See [`Outlet::start`].
#[derive(Debug)]
pub struct Outlet;

struct Shared {
    local: Arc<LocalParty>,
    config: OutletConfig,
}

impl Outlet {
    /// Starts an outlet in the background of the current tokio runtime. It
    /// dials the relay (retrying with back-off), registers the service and
    /// serves tunnels until [`NodeHandle::shutdown`].
    pub fn start(identity: Identity, config: OutletConfig) -> Result<NodeHandle, NodeError> {
        if config.allow.is_empty() {
            warn!(service = %config.service, "the allow list is empty: this outlet admits nobody (default deny); add --allow <identifier>");
        }
        let shared = Arc::new(Shared {
            local: Arc::new(LocalParty::new(identity)?),
            config,
        });
        let stop = CancellationToken::new();
        let (status_tx, status) = watch::channel(NodeStatus::Connecting);
        let task = tokio::spawn(run(shared, stop.clone(), status_tx));
        Ok(NodeHandle {
            stop,
            task,
            status,
            local_addr: None,
        })
    }
}

async fn run(shared: Arc<Shared>, stop: CancellationToken, status: watch::Sender<NodeStatus>) {
    let cfg = &shared.config;
    let tunnels = TaskTracker::new();
    let mut backoff = Backoff::new(&cfg.timeouts);
    info!(identity = %shared.local.identity().identifier(), service = %cfg.service, target = %cfg.target, relay = %cfg.relay.address, "outlet starting");
    while !stop.is_cancelled() {
        status.send_replace(NodeStatus::Connecting);
        let ended = match hop::connect(&shared.local, &cfg.relay, &cfg.timeouts, &stop).await {
            Ok((hop, events)) => {
                serve_session(&shared, hop, events, &tunnels, &status, &mut backoff, &stop).await
            }
            Err(e) => e.to_string(),
        };
        if stop.is_cancelled() {
            break;
        }
        let delay = backoff.next_delay();
        warn!(relay = %cfg.relay.address, reason = %ended, "relay session ended; reconnecting in {delay:.1?}");
        if !matches!(*status.borrow(), NodeStatus::Refused(_)) {
            status.send_replace(NodeStatus::Disconnected(ended));
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    tunnels.close();
    if tokio::time::timeout(std::time::Duration::from_secs(5), tunnels.wait())
        .await
        .is_err()
    {
        warn!("some tunnels did not close within 5 s of shutdown");
    }
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
    let cfg = &shared.config;
    if let Err(e) = hop
        .send(Control::Register {
            service: cfg.service.clone(),
        })
        .await
    {
        return e.to_string();
    }
    loop {
        let event = tokio::select! {
            () = hop.closed.cancelled() => break,
            event = events.recv() => event,
        };
        match event {
            None => break,
            Some(HopEvent::Registered(service)) => {
                backoff.reset();
                info!(%service, relay = %cfg.relay.address, "service registered at relay");
                status.send_replace(NodeStatus::Ready);
            }
            Some(HopEvent::RegisterRefused(service, reason)) => {
                error!(%service, %reason, "relay refused the registration");
                status.send_replace(NodeStatus::Refused(reason.clone()));
                return format!("registration refused: {reason}");
            }
            Some(HopEvent::Incoming(service, token)) => {
                if service != cfg.service {
                    warn!(%service, "relay asked for a service this outlet does not serve; ignoring");
                    continue;
                }
                let shared = Arc::clone(shared);
                let hop = Arc::clone(&hop);
                // Live tunnels outlast the hop channel that announced them
                // (they have their own connections); only shutdown ends them.
                let stop = stop.clone();
                tunnels.spawn(async move { serve_tunnel(&shared, &hop, token, stop).await });
            }
        }
    }
    hop.ended_because()
        .unwrap_or_else(|| "relay session closed".into())
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

async fn serve_tunnel(shared: &Shared, hop: &Hop, token: TunnelToken, stop: CancellationToken) {
    let cfg = &shared.config;
    let started = Instant::now();
    let label = token.label();
    let (mut reader, mut writer) = match hop
        .attach(&shared.local, &cfg.timeouts, Side::Outlet, token)
        .await
    {
        Ok(halves) => halves,
        Err(e) => {
            warn!(tunnel = %label, error = %e, "could not attach to tunnel");
            return;
        }
    };
    let hello = Hello {
        service: Some(cfg.service.clone()),
    };
    let handshake = link::respond(
        &mut reader,
        &mut writer,
        &shared.local,
        ChannelKind::EndToEnd,
        &hello,
    );
    let (peer, transport) =
        match link::within(cfg.timeouts.handshake, "end-to-end handshake", handshake).await {
            Ok(ok) => ok,
            Err(e) => {
                warn!(tunnel = %label, error = %e, "end-to-end handshake failed; closing tunnel");
                return;
            }
        };
    let inlet = peer.identity.identifier();
    let (mut sealer, opener) = transport.split();
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
    if let Decision::Deny { reason } = cfg.allow.decide_connect(&inlet, &cfg.service) {
        warn!(tunnel = %label, %inlet, service = %cfg.service, decision = "deny", %reason, "access denied");
        send_close(&mut writer, &mut sealer, CloseReason::Denied { reason }).await;
        return;
    }
    info!(tunnel = %label, %inlet, service = %cfg.service, decision = "allow", "access granted");
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
    let outcome = match target {
        LocalStream::Tcp(stream) => {
            let (mut r, mut w) = stream.into_split();
            let outcome = tunnel::pump(&mut r, &mut w, channel, stop).await;
            if outcome.end.is_abort() {
                reset_tcp(r, w);
            }
            outcome
        }
        LocalStream::Unix(stream) => {
            let (r, w) = stream.into_split();
            tunnel::pump(r, w, channel, stop).await
        }
    };
    log_end(&label, &inlet.to_string(), cfg.service.as_str(), &outcome);
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
            warn!(tunnel = %label, %peer, %service, sent, received, error = %e, "tunnel aborted: channel failed")
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
