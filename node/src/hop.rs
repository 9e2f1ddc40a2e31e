//! A node's hop channel to its relay: dialling, the pinned-identity
//! handshake, heartbeats, and request/response over control messages. Also
//! the dialling of data connections that attach to a tunnel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_identity::credential::SignedCredential;
use postern_identity::handshake::{ChannelKind, LocalParty, Peer};
use postern_identity::link::{
    self, ControlReceiver, ControlSender, FramedReader, LinkError, CONTROL_READ_BUFFER,
    DATA_READ_BUFFER,
};
use postern_identity::transport::Transport;
use postern_identity::wire::{
    Attach, AttachReply, Control, Hello, Refusal, RefusalCode, ServiceName, Side, TunnelToken,
    PREAMBLE_ATTACH, PREAMBLE_HOP, PROTOCOL_VERSION,
};
use postern_identity::{ChannelError, Identifier};
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::trust::{match_attributes, unix_now, AttributeRule, Trust};
use crate::tunnel::ChannelHalves;
use crate::{NodeError, RelayEndpoint, Timeouts};

type OpenReply = Result<TunnelToken, Refusal>;

/// Events the relay pushes to a node.
#[derive(Debug)]
pub enum HopEvent {
    /// The relay registered the service under this name.
    Registered(ServiceName),
    /// The relay refused to register the service (or withdrew it), and
    /// said why.
    RegisterRefused(ServiceName, Refusal),
    /// The relay asks an authority for its revocations after this sequence
    /// number (sent only to the hop session of an authority it trusts).
    FollowRevocations(u64),
    /// A tunnel request: the service, its token, and the inlet's address as
    /// the relay saw it.
    Incoming(ServiceName, TunnelToken, Option<std::net::IpAddr>),
}

/// An authenticated hop channel, shared by the node's tasks.
#[derive(Debug)]
pub struct Hop {
    pub(crate) relay: RelayEndpoint,
    pub(crate) relay_static: [u8; 32],
    outbox: mpsc::Sender<Control>,
    opens: Mutex<HashMap<u64, oneshot::Sender<OpenReply>>>,
    next_request: AtomicU64,
    /// Cancelled when the channel ends, for whatever reason.
    pub closed: CancellationToken,
    end_reason: Mutex<Option<String>>,
    /// The relay's own reason when it ended the channel (`Goodbye`).
    goodbye: Mutex<Option<Refusal>>,
    /// Data connections dialled ahead of need.
    spares: Mutex<Vec<Spare>>,
    /// Wakes the task that keeps `spares` full.
    refill: Notify,
}

type DataConnection = (FramedReader<OwnedReadHalf>, OwnedWriteHalf);

/// An authenticated data connection not yet joined to a tunnel.
struct Spare {
    reader: FramedReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    transport: Transport,
    born: Instant,
}

impl std::fmt::Debug for Spare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spare").field("born", &self.born).finish()
    }
}

/// TCP keepalive on every relay connection: a peer that vanished without a
/// FIN or reset (power loss, a dropped route) is detected after 15 s of
/// silence plus 3 unanswered probes 5 s apart, about 30 s in all.
pub(crate) fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

async fn dial(
    relay: &RelayEndpoint,
    timeouts: &Timeouts,
    preamble: &[u8],
) -> Result<TcpStream, NodeError> {
    let unreachable = |source| NodeError::RelayUnreachable {
        address: relay.address.clone(),
        source,
    };
    let mut stream = tokio::time::timeout(timeouts.connect, TcpStream::connect(&relay.address))
        .await
        .map_err(|_| {
            unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", timeouts.connect),
            ))
        })?
        .map_err(unreachable)?;
    tune(&stream);
    stream.write_all(preamble).await.map_err(unreachable)?;
    Ok(stream)
}

/// Dials the relay and authenticates, pinning its identity and presenting
/// `credential` (a relay's `register` policies read its attributes).
/// Returns the shared channel, the stream of pushed events, and runs the
/// channel's driver in a background task until `stop` or failure.
pub async fn connect(
    local: &Arc<LocalParty>,
    relay: &RelayEndpoint,
    timeouts: &Timeouts,
    credential: Option<SignedCredential>,
    stop: &CancellationToken,
) -> Result<(Arc<Hop>, mpsc::Receiver<HopEvent>), NodeError> {
    let stream = dial(relay, timeouts, &PREAMBLE_HOP).await?;
    let (rd, mut wr) = stream.into_split();
    let mut reader = FramedReader::new(rd, CONTROL_READ_BUFFER);
    let expected = relay.identifier;
    let hello = Hello {
        service: None,
        credential,
    };
    let handshake = link::initiate(
        &mut reader,
        &mut wr,
        local,
        ChannelKind::Hop,
        &hello,
        |peer| expect_identity(peer, expected),
    );
    let (peer, transport) = match link::within(timeouts.handshake, "hop handshake", handshake).await
    {
        Ok(ok) => ok,
        Err(LinkError::Channel(ChannelError::UnexpectedPeer { actual, .. })) => {
            return Err(NodeError::WrongRelay {
                address: relay.address.clone(),
                expected,
                actual,
            })
        }
        Err(source) => {
            return Err(NodeError::RelayHandshake {
                address: relay.address.clone(),
                source,
            })
        }
    };
    let (sealer, opener) = transport.split();
    let (outbox, outbox_rx) = mpsc::channel(256);
    let (events_tx, events) = mpsc::channel(256);
    let hop = Arc::new(Hop {
        relay: relay.clone(),
        relay_static: peer.static_key,
        outbox,
        opens: Mutex::new(HashMap::new()),
        next_request: AtomicU64::new(1),
        closed: stop.child_token(),
        end_reason: Mutex::new(None),
        goodbye: Mutex::new(None),
        spares: Mutex::new(Vec::new()),
        refill: Notify::new(),
    });
    let driver = Driver {
        hop: Arc::clone(&hop),
        inbox: ControlReceiver::new(reader, opener),
        outbox: ControlSender::new(wr, sealer),
        outbox_rx,
        events: events_tx,
        timeouts: timeouts.clone(),
        write_failed: false,
    };
    tokio::spawn(driver.run());
    if timeouts.spare_connections > 0 {
        tokio::spawn(keep_spares(
            Arc::clone(&hop),
            Arc::clone(local),
            timeouts.clone(),
        ));
    }
    Ok((hop, events))
}

struct Driver {
    hop: Arc<Hop>,
    inbox: ControlReceiver<OwnedReadHalf>,
    outbox: ControlSender<OwnedWriteHalf>,
    outbox_rx: mpsc::Receiver<Control>,
    events: mpsc::Sender<HopEvent>,
    timeouts: Timeouts,
    /// Whether the channel ended because a write to the relay failed.
    write_failed: bool,
}

impl Driver {
    async fn run(mut self) {
        let mut reason = self.drive().await;
        if self.write_failed {
            // The relay may have said why before it closed (a Goodbye still
            // in the receive buffer): that is what the user should hear.
            if let Some(said) = self.last_words().await {
                reason = said;
            }
        }
        debug!(relay = %self.hop.relay.address, %reason, "hop channel ended");
        *self
            .hop
            .end_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.hop.closed.cancel();
        let _ = self.outbox.shutdown().await;
        // Fail every request still waiting for an answer.
        self.hop.lock_opens().clear();
    }

    /// Notes that a write to the relay failed; the reason to report.
    fn send_failed(&mut self, e: &LinkError) -> String {
        self.write_failed = true;
        format!("send failed: {e}")
    }

    /// Reads what is left from the relay, briefly, for a `Goodbye`.
    async fn last_words(&mut self) -> Option<String> {
        let read = async {
            loop {
                match self.inbox.recv().await {
                    Ok(Control::Goodbye { code, reason }) => {
                        let said = format!("the relay ended the session: {reason}");
                        *self.hop.goodbye.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(Refusal { code, reason });
                        return Some(said);
                    }
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        };
        tokio::time::timeout(LAST_WORDS, read).await.ok().flatten()
    }

    async fn drive(&mut self) -> String {
        let mut heartbeat = tokio::time::interval(self.timeouts.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = tokio::time::Instant::now();
        let mut seq = 0u64;
        loop {
            let deadline = last_heard + self.timeouts.dead_after;
            tokio::select! {
                () = self.hop.closed.cancelled() => return "stopped".into(),
                () = tokio::time::sleep_until(deadline) => {
                    return format!("relay silent for {:?} (no answer to heartbeats)", self.timeouts.dead_after);
                }
                _ = heartbeat.tick() => {
                    seq += 1;
                    if let Err(e) = self.outbox.send(&Control::Ping { seq }).await {
                        return self.send_failed(&e);
                    }
                }
                out = self.outbox_rx.recv() => {
                    let Some(msg) = out else { return "node dropped its channel".into() };
                    if let Err(e) = self.outbox.send(&msg).await {
                        return self.send_failed(&e);
                    }
                }
                msg = self.inbox.recv() => {
                    let msg = match msg {
                        Ok(msg) => msg,
                        Err(LinkError::Closed) => return "relay closed the connection".into(),
                        Err(e) => return format!("{e}"),
                    };
                    last_heard = tokio::time::Instant::now();
                    if let Some(reason) = self.dispatch(msg).await {
                        return reason;
                    }
                }
            }
        }
    }

    async fn dispatch(&mut self, msg: Control) -> Option<String> {
        let event = match msg {
            Control::Ping { seq } => {
                let sent = self.outbox.send(&Control::Pong { seq }).await;
                return sent.err().map(|e| self.send_failed(&e));
            }
            Control::Pong { .. } => return None,
            Control::Opened { request, token } => {
                self.hop.answer(request, Ok(token));
                return None;
            }
            Control::OpenRefused {
                request,
                code,
                reason,
            } => {
                self.hop.answer(request, Err(Refusal { code, reason }));
                return None;
            }
            Control::Registered { service } => HopEvent::Registered(service),
            Control::RegisterRefused {
                service,
                code,
                reason,
            } => HopEvent::RegisterRefused(service, Refusal { code, reason }),
            Control::FollowRevocations { after } => HopEvent::FollowRevocations(after),
            Control::Goodbye { code, reason } => {
                let said = format!("the relay ended the session: {reason}");
                *self.hop.goodbye.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Refusal { code, reason });
                return Some(said);
            }
            Control::Incoming {
                service,
                token,
                source,
            } => HopEvent::Incoming(service, token, source),
            other => {
                warn!(message = ?other, "relay sent a message nodes do not accept; ignoring it");
                return None;
            }
        };
        // A node that stopped listening for events is shutting down.
        let _ = self.events.send(event).await;
        None
    }
}

impl Hop {
    fn lock_opens(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<OpenReply>>> {
        self.opens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The relay's own reason, if it ended the channel with a `Goodbye`.
    pub fn goodbye(&self) -> Option<Refusal> {
        self.goodbye
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the channel ended, once it has.
    pub fn ended_because(&self) -> Option<String> {
        self.end_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn answer(&self, request: u64, reply: OpenReply) {
        if let Some(tx) = self.lock_opens().remove(&request) {
            let _ = tx.send(reply);
        }
    }

    /// Queues a control message.
    pub async fn send(&self, msg: Control) -> Result<(), NodeError> {
        self.outbox.send(msg).await.map_err(|_| {
            NodeError::RelayLost(
                self.ended_because()
                    .unwrap_or_else(|| "channel closed".into()),
            )
        })
    }

    /// Asks the relay for a tunnel to `service`.
    pub(crate) async fn open(
        &self,
        service: &ServiceName,
        timeout: Duration,
    ) -> Result<TunnelToken, NodeError> {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock_opens().insert(request, tx);
        self.send(Control::Open {
            request,
            service: service.clone(),
        })
        .await?;
        let answer = tokio::select! {
            answer = tokio::time::timeout(timeout, rx) => answer,
            () = self.closed.cancelled() => {
                return Err(NodeError::RelayLost(self.ended_because().unwrap_or_else(|| "channel closed".into())));
            }
        };
        match answer {
            Ok(Ok(Ok(token))) => Ok(token),
            Ok(Ok(Err(reason))) => Err(NodeError::OpenRefused(reason)),
            Ok(Err(_)) => Err(NodeError::RelayLost(
                self.ended_because()
                    .unwrap_or_else(|| "channel closed".into()),
            )),
            Err(_) => {
                self.lock_opens().remove(&request);
                Err(NodeError::OpenRefused(Refusal::new(
                    RefusalCode::RetryLater,
                    format!("relay did not answer within {timeout:?}"),
                )))
            }
        }
    }

    /// [`Hop::open`], asked again (after each of [`OPEN_RETRY_DELAYS`], all
    /// within `timeout`) while the relay's
    /// refusal is one that may pass by itself: the outlet is reconnecting
    /// (`UnknownService`), a limit is reached (`Limit`), or the relay cannot
    /// decide right now (`RetryLater`). A denial is final at once.
    pub(crate) async fn open_retrying(
        &self,
        service: &ServiceName,
        timeout: Duration,
    ) -> Result<TunnelToken, NodeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut delays = OPEN_RETRY_DELAYS.iter();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let refusal = match self.open(service, left).await {
                Err(NodeError::OpenRefused(refusal)) if refusal.code.is_retryable() => refusal,
                other => return other,
            };
            let Some(&delay) = delays
                .next()
                .filter(|&&d| tokio::time::Instant::now() + d < deadline)
            else {
                return Err(NodeError::OpenRefused(refusal));
            };
            debug!(%service, code = %refusal.code, reason = %refusal.reason, "relay refused the open for now; asking again in {delay:?}");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.closed.cancelled() => return Err(NodeError::OpenRefused(refusal)),
            }
        }
    }

    /// Dials a data connection and authenticates it with the relay.
    async fn dial_data(
        &self,
        local: &LocalParty,
        timeouts: &Timeouts,
        spare: bool,
    ) -> Result<Spare, NodeError> {
        let stream = dial(&self.relay, timeouts, &PREAMBLE_ATTACH).await?;
        let (rd, mut writer) = stream.into_split();
        let mut reader = FramedReader::new(rd, DATA_READ_BUFFER);
        let handshake =
            link::attach_handshake(&mut reader, &mut writer, local, &self.relay_static, spare);
        let answer = link::within(timeouts.handshake, "data connection handshake", handshake)
            .await
            .map_err(|source| NodeError::RelayHandshake {
                address: self.relay.address.clone(),
                source,
            })?;
        match answer {
            Ok(transport) => Ok(Spare {
                reader,
                writer,
                transport,
                born: Instant::now(),
            }),
            Err(reason) => Err(NodeError::AttachRefused(reason)),
        }
    }

    /// A fresh spare, if one is ready; asks for a replacement.
    fn take_spare(&self, max_age: Duration) -> Option<Spare> {
        let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        spares.retain(|s| s.born.elapsed() < max_age);
        let spare = spares.pop();
        drop(spares);
        self.refill.notify_one();
        spare
    }

    /// Joins a data connection to the tunnel of `token`: a spare one if
    /// ready, else one dialled now.
    pub async fn attach(
        &self,
        local: &LocalParty,
        timeouts: &Timeouts,
        side: Side,
        token: TunnelToken,
    ) -> Result<DataConnection, NodeError> {
        let request = Attach {
            version: PROTOCOL_VERSION,
            side,
            token,
        };
        let mut spare = self.take_spare(timeouts.spare_max_age);
        loop {
            let from_pool = spare.is_some();
            let Spare {
                mut reader,
                mut writer,
                transport,
                ..
            } = match spare.take() {
                Some(spare) => spare,
                None => self.dial_data(local, timeouts, false).await?,
            };
            let joined = link::within(
                timeouts.handshake,
                "attach",
                link::attach_request(&mut reader, &mut writer, transport, &request),
            )
            .await;
            match joined {
                Ok(AttachReply::Accepted) => return Ok((reader, writer)),
                Ok(AttachReply::Refused { code, reason }) => {
                    return Err(NodeError::AttachRefused(Refusal { code, reason }))
                }
                // A spare the relay dropped meanwhile: dial a fresh one.
                Err(e) if from_pool => {
                    debug!(error = %e, "spare data connection was stale; dialling a new one");
                }
                Err(source) => {
                    return Err(NodeError::RelayHandshake {
                        address: self.relay.address.clone(),
                        source,
                    })
                }
            }
        }
    }
}

/// Keeps `timeouts.spare_connections` authenticated data connections ready
/// while the hop channel lives, replacing those that grow old.
async fn keep_spares(hop: Arc<Hop>, local: Arc<LocalParty>, timeouts: Timeouts) {
    let mut backoff = Backoff::new(&timeouts);
    loop {
        let (missing, oldest) = {
            let mut spares = hop.spares.lock().unwrap_or_else(|p| p.into_inner());
            spares.retain(|s| s.born.elapsed() < timeouts.spare_max_age);
            let oldest = spares.iter().map(|s| s.born).min();
            (
                timeouts.spare_connections.saturating_sub(spares.len()),
                oldest,
            )
        };
        if missing > 0 {
            let dialled = tokio::select! {
                () = hop.closed.cancelled() => return,
                dialled = hop.dial_data(&local, &timeouts, true) => dialled,
            };
            match dialled {
                Ok(spare) => {
                    backoff.reset();
                    hop.spares
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(spare);
                }
                Err(e) => {
                    debug!(error = %e, "could not dial a spare data connection");
                    let delay = backoff.next_delay();
                    tokio::select! {
                        () = hop.closed.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
            continue;
        }
        let renew_at = oldest.map_or_else(
            || Instant::now() + timeouts.spare_max_age,
            |born| born + timeouts.spare_max_age,
        );
        tokio::select! {
            () = hop.closed.cancelled() => return,
            () = hop.refill.notified() => {}
            () = tokio::time::sleep_until(renew_at.into()) => {}
        }
    }
}

/// The handshake check shared by every pinned peer (relay, outlet,
/// authority): the peer must prove the `expected` identity.
pub(crate) fn expect_identity(peer: &Peer, expected: Identifier) -> Result<(), ChannelError> {
    let actual = peer.identity.identifier();
    if actual == expected {
        Ok(())
    } else {
        Err(ChannelError::UnexpectedPeer { expected, actual })
    }
}

impl Hop {
    /// Opens an end-to-end channel to the authority `anchor` names (its
    /// service at this relay, pinned to its identifier; the authority
    /// presents no credential of its own to check).
    pub(crate) async fn open_to_authority(
        &self,
        local: &LocalParty,
        timeouts: &Timeouts,
        anchor: &crate::TrustAnchor,
    ) -> Result<DataChannel, NodeError> {
        let (_peer, channel) = self
            .open_end_to_end(
                local,
                timeouts,
                &anchor.service,
                anchor.authority,
                &Trust::default(),
                &[],
            )
            .await?;
        Ok(channel)
    }

    /// Opens an end-to-end channel to `service` through this relay: asks for
    /// a token, joins a data connection, and runs the XX handshake as
    /// initiator. The answering outlet must prove `expected`, claim
    /// `service`, and present a valid credential if it presents one and
    /// `trust` trusts an authority.
    pub(crate) async fn open_end_to_end(
        &self,
        local: &LocalParty,
        timeouts: &Timeouts,
        service: &ServiceName,
        expected: Identifier,
        trust: &Trust,
        required: &[AttributeRule],
    ) -> Result<(Peer, DataChannel), NodeError> {
        let token = self.open_retrying(service, timeouts.handshake).await?;
        let (mut reader, mut writer) = self.attach(local, timeouts, Side::Inlet, token).await?;
        let hello = Hello {
            service: Some(service.clone()),
            credential: trust.credential(),
        };
        let handshake = link::initiate(
            &mut reader,
            &mut writer,
            local,
            ChannelKind::EndToEnd,
            &hello,
            |peer| {
                expect_identity(peer, expected)?;
                if trust.identity_revoked(&expected) {
                    return Err(ChannelError::BadIdentityProof(format!(
                        "outlet {expected} has been revoked by its authority"
                    )));
                }
                if peer.hello.service.as_ref() != Some(service) {
                    return Err(ChannelError::BadIdentityProof(format!(
                        "outlet claims to serve {:?}, not \"{service}\"",
                        peer.hello.service.as_ref().map(|s| s.as_str())
                    )));
                }
                let verified = trust
                    .verify(expected, peer.hello.credential.as_ref(), unix_now())
                    .map_err(|e| {
                        ChannelError::BadIdentityProof(format!("outlet's credential refused: {e}"))
                    })?;
                if required.is_empty() {
                    return Ok(());
                }
                match verified {
                    Some(verified) => match_attributes(&verified, required).map_err(|e| {
                        ChannelError::BadIdentityProof(format!(
                            "outlet refused: {e} (--require-outlet-attr)"
                        ))
                    }),
                    None => Err(ChannelError::BadIdentityProof(
                        "outlet refused: it presented no credential from a trusted authority, and --require-outlet-attr needs one".into(),
                    )),
                }
            },
        );
        match link::within(timeouts.handshake, "end-to-end handshake", handshake).await {
            Ok((peer, transport)) => {
                let (sealer, opener) = transport.split();
                Ok((
                    peer,
                    ChannelHalves {
                        reader,
                        writer,
                        sealer,
                        opener,
                    },
                ))
            }
            Err(LinkError::Channel(ChannelError::UnexpectedPeer { actual, .. })) => {
                Err(NodeError::WrongOutlet {
                    service: service.clone(),
                    expected,
                    actual,
                })
            }
            Err(source) => Err(NodeError::Tunnel {
                service: service.clone(),
                source,
            }),
        }
    }
}

/// The two halves of an end-to-end channel over a data connection.
pub type DataChannel = ChannelHalves<OwnedReadHalf, OwnedWriteHalf>;

/// How long a hop channel whose write failed still listens for the relay's
/// `Goodbye` (the reason it closed).
const LAST_WORDS: Duration = Duration::from_millis(250);

/// The pauses between the asks of [`Hop::open_retrying`] for one tunnel: about 1.5 s in all, enough for an outlet
/// to reconnect after a relay restart or for a rate limit to refill.
pub(crate) const OPEN_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1000),
];

/// Jittered exponential back-off between reconnection attempts.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `timeouts.reconnect_min`, growing to `reconnect_max`.
    pub fn new(timeouts: &Timeouts) -> Self {
        Backoff {
            next: timeouts.reconnect_min,
            min: timeouts.reconnect_min,
            max: timeouts.reconnect_max,
        }
    }

    /// The delay before the next attempt (between half and all of the
    /// current step), and doubles the step.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::thread_rng().gen_range(0.5..=1.0);
        step.mul_f64(jitter)
    }

    /// Starts again from the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Which relay to dial next. Relays are tried in the configured order; after
/// a failure (a dial, a handshake, or a session that ended) the node moves
/// on to the next one at once, and waits a jittered, growing back-off only
/// once every relay has failed in turn. A node stays on the relay that works
/// (it does not hop back to the first one), so nodes that fail over together
/// meet on the same relay.
#[derive(Debug)]
pub(crate) struct RelayCycle {
    relays: Vec<RelayEndpoint>,
    current: usize,
    failures_in_a_row: usize,
    pub backoff: Backoff,
}

impl RelayCycle {
    /// Cycles through `relays` (the first is tried first). An empty list is
    /// not possible from the configs (the primary relay is mandatory).
    pub fn new(relays: Vec<RelayEndpoint>, timeouts: &Timeouts) -> Self {
        RelayCycle {
            relays,
            current: 0,
            failures_in_a_row: 0,
            backoff: Backoff::new(timeouts),
        }
    }

    /// The relay to dial now.
    pub fn current(&self) -> Option<&RelayEndpoint> {
        self.relays.get(self.current)
    }

    /// Every relay, for logs.
    pub fn describe(&self) -> String {
        self.relays
            .iter()
            .map(|r| r.address.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A session is up on the current relay.
    pub fn connected(&mut self) {
        self.failures_in_a_row = 0;
    }

    /// The current relay failed: moves to the next and returns how long to
    /// wait before dialling it (zero while some relay is still untried in
    /// this round).
    pub fn failed(&mut self) -> Duration {
        let n = self.relays.len().max(1);
        self.current = (self.current + 1) % n;
        self.failures_in_a_row += 1;
        if self.failures_in_a_row.is_multiple_of(n) {
            self.backoff.next_delay()
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16) -> RelayEndpoint {
        let id = "P0000000000000000000000000000000000000001"
            .parse()
            .unwrap_or_else(|e| panic!("test identifier: {e}"));
        RelayEndpoint::new(format!("127.0.0.1:{port}"), id)
    }

    #[test]
    fn one_relay_backs_off_on_every_failure() {
        let timeouts = Timeouts::default();
        let mut cycle = RelayCycle::new(vec![endpoint(1)], &timeouts);
        for _ in 0..5 {
            assert_eq!(cycle.current(), Some(&endpoint(1)));
            let delay = cycle.failed();
            assert!(delay > Duration::ZERO && delay <= timeouts.reconnect_max);
        }
    }

    #[test]
    fn fails_over_at_once_and_backs_off_after_a_full_round() {
        let timeouts = Timeouts::default();
        let mut cycle = RelayCycle::new(vec![endpoint(1), endpoint(2), endpoint(3)], &timeouts);
        assert_eq!(cycle.current(), Some(&endpoint(1)));
        assert_eq!(cycle.failed(), Duration::ZERO);
        assert_eq!(cycle.current(), Some(&endpoint(2)));
        assert_eq!(cycle.failed(), Duration::ZERO);
        assert_eq!(cycle.current(), Some(&endpoint(3)));
        assert!(cycle.failed() > Duration::ZERO, "a full round failed");
        assert_eq!(cycle.current(), Some(&endpoint(1)));
        // A session on relay 1, then it is lost: straight to relay 2, and
        // the node stays there while it works.
        cycle.connected();
        assert_eq!(cycle.failed(), Duration::ZERO);
        assert_eq!(cycle.current(), Some(&endpoint(2)));
        cycle.connected();
        assert_eq!(cycle.current(), Some(&endpoint(2)));
    }
}
