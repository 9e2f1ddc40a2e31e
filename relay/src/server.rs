use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postern_identity::credential::{RevocationCheck, TrustedAuthorities};
use postern_identity::handshake::{AttachResponder, ChannelKind, LocalParty};
use postern_identity::link::{
    self, ControlReceiver, ControlSender, FramedReader, LinkError, CONTROL_READ_BUFFER,
};
use postern_identity::wire::{
    Attach, AttachReply, Control, Hello, PREAMBLE_ATTACH, PREAMBLE_HOP, PREAMBLE_LEN,
};
use postern_identity::{Identifier, Identity};
use postern_policies::audit::AuditLog;
use postern_policies::LivePolicies;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::access::{self, NodeCredential};
use crate::registry::{Registration, Registry, SessionId};

/// Relay settings. [`RelayConfig::new`] gives safe defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Longest time a connection may take to authenticate, counted from its
    /// arrival (preamble included): a connection still unauthenticated then
    /// is closed, however slowly it keeps sending.
    pub handshake_timeout: Duration,
    /// Longest time between `open` and both ends attaching.
    pub token_ttl: Duration,
    /// A hop channel silent for this long is closed (nodes ping every few seconds).
    pub idle_timeout: Duration,
    /// Most connections (hop and data) at once.
    pub max_connections: usize,
    /// Most connections still authenticating at once. A connection counts
    /// from `accept` until its handshake succeeds, and is cut after
    /// `handshake_timeout` in all (preamble included).
    pub max_pending_handshakes: usize,
    /// Most connections still authenticating at once from one source: an
    /// IPv4 address, or an IPv6 /64 (one host usually holds a whole /64).
    pub max_pending_per_source: usize,
    /// Most tunnels (spliced, or waiting for their second end) at once. An
    /// `open` beyond it is refused with a reason; established tunnels are
    /// not disturbed.
    pub max_tunnels: usize,
    /// Most tunnels (spliced, or being set up) one node may be an end of at
    /// once, as inlet or outlet: one node cannot take the whole relay.
    pub max_tunnels_per_node: usize,
    /// Buffer size of each direction of a splice.
    pub splice_buffer: usize,
    /// Most authenticated data connections one node may keep waiting for a
    /// tunnel (nodes dial a few ahead of need to cut tunnel set-up time).
    pub max_spares_per_node: usize,
    /// A data connection that joins no tunnel for this long is closed.
    pub spare_idle_timeout: Duration,
    /// Authorities whose credentials nodes may present on their hop
    /// channels (their attributes reach `register` policies). Empty: nodes'
    /// credentials are ignored.
    pub authorities: TrustedAuthorities,
    /// Policies deciding `register` (default deny). `None`: the first
    /// identity to register a name holds it while connected.
    pub policies: Option<Arc<LivePolicies>>,
    /// Where registration decisions are audited, if anywhere.
    pub audit: Option<Arc<AuditLog>>,
    /// Revocations heard from the trusted authorities (the `postern`
    /// binary follows their feeds): a node whose credential is revoked
    /// loses its hop channel, and with it its registrations, within a
    /// second, and its credential is refused when it reconnects.
    pub revocations: Option<Revocations>,
}

/// A shared, live source of revocations.
#[derive(Clone)]
pub struct Revocations(pub Arc<dyn RevocationCheck + Send + Sync>);

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Revocations(..)")
    }
}

impl RelayConfig {
    /// Defaults for listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        RelayConfig {
            listen,
            handshake_timeout: Duration::from_secs(10),
            token_ttl: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_connections: 20_000,
            max_pending_handshakes: 1_024,
            max_pending_per_source: 256,
            max_tunnels: 10_000,
            max_tunnels_per_node: 1_024,
            splice_buffer: 64 * 1024,
            max_spares_per_node: 8,
            spare_idle_timeout: Duration::from_secs(120),
            authorities: TrustedAuthorities::new(),
            policies: None,
            audit: None,
            revocations: None,
        }
    }
}

/// Why the relay could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Setting up the relay's Noise key failed.
    #[error("cannot set up the relay's secure channel key: {0}")]
    Key(#[from] postern_identity::ChannelError),
}

/// A data connection handed from the second end to arrive to the first.
struct Arrival {
    stream: TcpStream,
    leftover: Vec<u8>,
}

struct State {
    registry: Registry<oneshot::Sender<Arrival>>,
    sessions: HashMap<SessionId, mpsc::Sender<Control>>,
    next_session: u64,
    /// Authenticated data connections waiting for a tunnel, per node key.
    spares: HashMap<[u8; 32], usize>,
    /// Spliced tunnels per node (each tunnel counts for its inlet and its
    /// outlet).
    spliced: HashMap<Identifier, usize>,
}

impl State {
    /// Tunnels `node` is an end of: spliced, or being set up.
    fn tunnels_of(&self, node: &Identifier) -> usize {
        self.spliced.get(node).copied().unwrap_or(0) + self.registry.pending_involving(node)
    }
}

/// Counts a spliced tunnel for its two ends while it lives.
struct SplicedGuard<'a> {
    shared: &'a Shared,
    ends: [Identifier; 2],
}

impl<'a> SplicedGuard<'a> {
    fn new(shared: &'a Shared, inlet: Identifier, outlet: Identifier) -> Self {
        let mut state = shared.state();
        for end in [inlet, outlet] {
            *state.spliced.entry(end).or_insert(0) += 1;
        }
        SplicedGuard {
            shared,
            ends: [inlet, outlet],
        }
    }
}

impl Drop for SplicedGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        for end in &self.ends {
            if let Some(count) = state.spliced.get_mut(end) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    state.spliced.remove(end);
                }
            }
        }
    }
}

struct Shared {
    local: LocalParty,
    config: RelayConfig,
    state: Mutex<State>,
    pending: Mutex<Pending>,
    /// Data connections past their handshake (spares, tunnel ends waiting
    /// for their peer, and spliced tunnels: the second end of a tunnel hands
    /// its socket to the first and stops counting).
    authenticated_data: AtomicUsize,
    /// Connections refused at a limit (logged at most once a second).
    refusals: RateLimited,
    /// Connections cut at the handshake deadline.
    cuts: RateLimited,
    /// Opens refused at the tunnel limit.
    open_refusals: RateLimited,
}

/// Where a connection comes from, for per-source limits: an IPv4 address,
/// or the /64 of an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    Source::V6Prefix(prefix)
                }
            },
        }
    }
}

/// Connections still authenticating, in total and per source.
#[derive(Debug, Default)]
struct Pending {
    total: usize,
    per_source: HashMap<Source, usize>,
}

/// Why a new connection was refused before reading a byte.
enum PendingRefusal {
    Total(usize),
    PerSource(usize),
}

/// One connection counted in [`Pending`] until dropped.
struct PendingGuard<'a> {
    shared: &'a Shared,
    source: Source,
}

impl<'a> PendingGuard<'a> {
    fn take(shared: &'a Shared, source: Source) -> Result<Self, PendingRefusal> {
        let (max_total, max_per_source) = (
            shared.config.max_pending_handshakes,
            shared.config.max_pending_per_source,
        );
        let mut pending = shared.pending();
        if pending.total >= max_total {
            return Err(PendingRefusal::Total(max_total));
        }
        let count = pending.per_source.entry(source).or_insert(0);
        if *count >= max_per_source {
            return Err(PendingRefusal::PerSource(max_per_source));
        }
        *count += 1;
        pending.total += 1;
        Ok(PendingGuard { shared, source })
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut pending = self.shared.pending();
        pending.total = pending.total.saturating_sub(1);
        if let Some(count) = pending.per_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                pending.per_source.remove(&self.source);
            }
        }
    }
}

/// Counts one authenticated data connection while it lives.
struct DataGuard<'a>(&'a AtomicUsize);

impl<'a> DataGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        DataGuard(counter)
    }
}

impl Drop for DataGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Lets through at most one warning per second about refused connections,
/// and says how many were not logged meanwhile: a flood must not become a
/// flood of log lines.
#[derive(Debug)]
struct RateLimited {
    start: Instant,
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimited {
    const EVERY_MS: u64 = 1_000;

    fn new() -> Self {
        RateLimited {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed since the last one)` when this event may be logged.
    fn permit(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let now = now.saturating_add(Self::EVERY_MS);
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= Self::EVERY_MS
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tunnels the relay carries or is setting up: authenticated data
    /// connections that are not idle spares.
    fn tunnels(&self) -> usize {
        let spares: usize = self.state().spares.values().sum();
        self.authenticated_data
            .load(Ordering::Relaxed)
            .saturating_sub(spares)
    }

    /// Why a new tunnel must be refused now, if it must.
    fn tunnel_refusal(&self) -> Option<String> {
        let tunnels = self.tunnels();
        let max = self.config.max_tunnels;
        (tunnels >= max).then(|| {
            format!(
                "the relay is carrying its maximum of {max} tunnels (max_tunnels); try again later"
            )
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the registry half
        // updated in a way that matters more than stopping would; keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A bound relay, ready to [`run`](Relay::run).
pub struct Relay {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("identity", &self.shared.local.identity().identifier())
            .field("listen", &self.listener.local_addr().ok())
            .finish()
    }
}

impl Relay {
    /// Binds the listening socket.
    pub async fn bind(identity: Identity, config: RelayConfig) -> Result<Relay, RelayError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| RelayError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let relay_id = identity.identifier();
        let local = LocalParty::new(identity)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            authenticated_data: AtomicUsize::new(0),
            refusals: RateLimited::new(),
            cuts: RateLimited::new(),
            open_refusals: RateLimited::new(),
            state: Mutex::new(State {
                registry: Registry::new(relay_id, config.token_ttl),
                sessions: HashMap::new(),
                next_session: 1,
                spares: HashMap::new(),
                spliced: HashMap::new(),
            }),
            local,
            config,
        });
        Ok(Relay { listener, shared })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The relay's identifier, which nodes pin.
    pub fn identifier(&self) -> Identifier {
        self.shared.local.identity().identifier()
    }

    /// Serves until `shutdown` is cancelled, then closes every connection.
    pub async fn run(self, shutdown: CancellationToken) {
        let Relay { listener, shared } = self;
        let connections = Arc::new(Semaphore::new(shared.config.max_connections));
        let tasks = TaskTracker::new();
        info!(relay = %shared.local.identity().identifier(), addr = ?listener.local_addr().ok(), "relay listening");
        access::report_startup(&shared.config, shared.local.identity().identifier());
        if let Some(policies) = &shared.config.policies {
            access::watch_policies(policies, shared.config.audit.clone());
        }
        let sweeper = {
            let shared = Arc::clone(&shared);
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        _ = tick.tick() => {
                            let expired = shared.state().registry.expire(Instant::now());
                            if expired > 0 {
                                debug!(expired, "tunnel tokens expired before both ends attached");
                            }
                        }
                    }
                }
            })
        };
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer_addr) = match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(5);
                    pair
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    warn!(error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                if let Some(suppressed) = shared.refusals.permit() {
                    warn!(%peer_addr, limit = shared.config.max_connections, suppressed, "connection limit reached; refusing connection");
                }
                continue;
            };
            let shared = Arc::clone(&shared);
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                handle_connection(&shared, stream, peer_addr, shutdown).await;
                drop(permit);
            });
        }
        drop(listener);
        sweeper.abort();
        tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .is_err()
        {
            warn!("some relay connections did not close within 5 s of shutdown");
        }
        info!("relay stopped");
    }
}

/// `TCP_NODELAY`, and keepalive probes that find a vanished peer (no FIN,
/// no reset) after about 30 s: 15 s of silence, then 3 probes 5 s apart.
fn tune_socket(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Makes dropping the socket send a reset instead of a FIN. With a zero
/// linger time the close does not block.
fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Admits a connection while it authenticates, within the pending limits,
/// and cuts it if it has not authenticated `handshake_timeout` after
/// `accept`, however slowly it trickles bytes.
async fn handle_connection(
    shared: &Shared,
    stream: TcpStream,
    peer_addr: SocketAddr,
    shutdown: CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let pending = match PendingGuard::take(shared, Source::of(peer_addr.ip())) {
        Ok(guard) => guard,
        Err(refusal) => {
            // Closing at once costs the peer a connection and us nothing.
            reset_on_close(&stream);
            if let Some(suppressed) = shared.refusals.permit() {
                match refusal {
                    PendingRefusal::Total(limit) => {
                        warn!(%peer_addr, limit, suppressed, "too many connections still authenticating; refusing connection (max_pending_handshakes)")
                    }
                    PendingRefusal::PerSource(limit) => {
                        warn!(%peer_addr, limit, suppressed, "too many connections still authenticating from this source; refusing connection (max_pending_per_source)")
                    }
                }
            }
            return;
        }
    };
    tune_socket(&stream);
    // The session functions release the one permit of `authenticating` when
    // their handshake succeeds; watching it tells us when to stop counting
    // this connection as pending, and whether it beat the deadline.
    let authenticating = Semaphore::new(1);
    let Ok(handshake_permit) = authenticating.try_acquire() else {
        return;
    };
    let is_data = AtomicBool::new(false);
    let session = dispatch(
        shared,
        stream,
        peer_addr,
        handshake_permit,
        shutdown,
        &is_data,
    );
    tokio::pin!(session);
    let authenticated = tokio::select! {
        () = &mut session => return,
        released = authenticating.acquire() => released.is_ok(),
        () = tokio::time::sleep_until(deadline) => false,
    };
    drop(pending);
    if !authenticated {
        if let Some(suppressed) = shared.cuts.permit() {
            warn!(%peer_addr, suppressed, "not authenticated within {:?} of connecting; closing", shared.config.handshake_timeout);
        }
        return;
    }
    let _counted = is_data
        .load(Ordering::Relaxed)
        .then(|| DataGuard::new(&shared.authenticated_data));
    session.await;
}

/// Reads the preamble and runs the hop or data connection it announces.
async fn dispatch(
    shared: &Shared,
    mut stream: TcpStream,
    peer_addr: SocketAddr,
    handshake_permit: tokio::sync::SemaphorePermit<'_>,
    shutdown: CancellationToken,
    is_data: &AtomicBool,
) {
    let mut preamble = [0u8; PREAMBLE_LEN];
    let timeout = shared.config.handshake_timeout;
    match tokio::time::timeout(timeout, stream.read_exact(&mut preamble)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            debug!(%peer_addr, error = %e, "connection closed before sending a preamble");
            return;
        }
        Err(_) => {
            debug!(%peer_addr, "no preamble within {timeout:?}; closing");
            return;
        }
    }
    match preamble {
        PREAMBLE_HOP => hop_session(shared, stream, peer_addr, handshake_permit, shutdown).await,
        PREAMBLE_ATTACH => {
            is_data.store(true, Ordering::Relaxed);
            attach(shared, stream, peer_addr, handshake_permit, shutdown).await;
        }
        other => {
            let looks_like = if other.starts_with(b"GET ")
                || other.starts_with(b"POST")
                || other.starts_with(b"HEAD")
            {
                " (an HTTP request)"
            } else if other[0] == 0x16 && other[1] == 0x03 {
                " (a TLS ClientHello)"
            } else {
                ""
            };
            warn!(%peer_addr, "not a Postern node{looks_like}: unknown preamble; closing");
        }
    }
}

async fn hop_session(
    shared: &Shared,
    stream: TcpStream,
    peer_addr: SocketAddr,
    handshake_permit: tokio::sync::SemaphorePermit<'_>,
    shutdown: CancellationToken,
) {
    let (rd, mut wr) = stream.into_split();
    let mut reader = FramedReader::new(rd, CONTROL_READ_BUFFER);
    let hello = Hello::default();
    let handshake = link::respond(
        &mut reader,
        &mut wr,
        &shared.local,
        ChannelKind::Hop,
        &hello,
    );
    let (peer, transport) =
        match link::within(shared.config.handshake_timeout, "hop handshake", handshake).await {
            Ok(ok) => ok,
            Err(e) => {
                warn!(%peer_addr, error = %e, "hop handshake failed; closing");
                return;
            }
        };
    drop(handshake_permit);
    let node = peer.identity.identifier();
    let credential = NodeCredential::verify(&shared.config, node, peer.hello.credential.as_ref());
    let who = Session {
        id: SessionId(0),
        node,
        node_static: peer.static_key,
        addr: peer_addr,
        credential,
    };
    let (sealer, opener) = transport.split();
    let mut inbox = ControlReceiver::new(reader, opener);
    let mut outbox = ControlSender::new(wr, sealer);
    let (tx, mut rx) = mpsc::channel::<Control>(256);
    let session = {
        let mut state = shared.state();
        let id = SessionId(state.next_session);
        state.next_session += 1;
        state.sessions.insert(id, tx.clone());
        id
    };
    let who = Session { id: session, ..who };
    info!(%node, %peer_addr, session = session.0, "node connected");
    let idle = shared.config.idle_timeout;
    let mut recheck = tokio::time::interval(Duration::from_secs(1));
    let reason = loop {
        tokio::select! {
            () = shutdown.cancelled() => break "relay shutting down".to_owned(),
            _ = recheck.tick() => {
                if let Some(ended) = who.credential.ended(&shared.config) {
                    warn!(%node, reason = %ended, "closing the hop channel of a node whose credential ended; its services are unregistered");
                    break ended;
                }
            }
            out = rx.recv() => {
                let Some(msg) = out else { break "session replaced".to_owned() };
                if let Err(e) = outbox.send(&msg).await {
                    break format!("send failed: {e}");
                }
            }
            msg = tokio::time::timeout(idle, inbox.recv()) => {
                let msg = match msg {
                    Err(_) => break format!("no message for {idle:?}"),
                    Ok(Err(LinkError::Closed)) => break "node disconnected".to_owned(),
                    Ok(Err(e)) => break format!("protocol error: {e}"),
                    Ok(Ok(msg)) => msg,
                };
                let reply = match over_tunnel_limit(shared, node, &msg) {
                    Some(refused) => Some(refused),
                    None => handle_control(shared, &who, msg),
                };
                if let Some(reply) = reply {
                    if let Err(e) = outbox.send(&reply).await {
                        break format!("send failed: {e}");
                    }
                }
            }
        }
    };
    let released = {
        let mut state = shared.state();
        state.sessions.remove(&session);
        state.registry.remove_session(session)
    };
    for service in released {
        info!(%node, %service, "service unregistered (its outlet disconnected)");
    }
    info!(%node, session = session.0, %reason, "node disconnected");
}

/// An `open` the relay cannot carry (it is at `max_tunnels`) gets its
/// refusal here, before any token is minted.
fn over_tunnel_limit(shared: &Shared, node: Identifier, msg: &Control) -> Option<Control> {
    let Control::Open { request, service } = msg else {
        return None;
    };
    let reason = shared.tunnel_refusal()?;
    if let Some(suppressed) = shared.open_refusals.permit() {
        warn!(inlet = %node, %service, limit = shared.config.max_tunnels, suppressed, "open refused: tunnel limit reached");
    }
    Some(Control::OpenRefused {
        request: *request,
        reason,
    })
}

/// Who is at the other end of a hop channel.
struct Session {
    id: SessionId,
    node: Identifier,
    node_static: [u8; 32],
    addr: SocketAddr,
    credential: NodeCredential,
}

fn handle_control(shared: &Shared, who: &Session, msg: Control) -> Option<Control> {
    let (session, node, node_static) = (who.id, who.node, &who.node_static);
    match msg {
        Control::Register { service } => {
            if let Err(reason) = access::decide_register(
                &shared.config,
                shared.local.identity().identifier(),
                node,
                &who.credential,
                &service,
                who.addr.ip(),
            ) {
                return Some(Control::RegisterRefused { service, reason });
            }
            let reg = Registration {
                owner: node,
                session,
                owner_static: *node_static,
            };
            let result = shared.state().registry.register(service.clone(), reg);
            Some(match result {
                Ok(replaced) => {
                    info!(%node, %service, replaced_session = ?replaced.map(|s| s.0), "service registered");
                    Control::Registered { service }
                }
                Err(e) => {
                    warn!(%node, %service, reason = %e, "registration refused");
                    Control::RegisterRefused {
                        service,
                        reason: e.to_string(),
                    }
                }
            })
        }
        Control::Open { request, service } => {
            let mut state = shared.state();
            let max = shared.config.max_tunnels_per_node;
            let outlet = state.registry.lookup(&service).map(|r| r.owner);
            let busy = [(node, "this node")]
                .into_iter()
                .chain(outlet.map(|o| (o, "the outlet of this service")))
                .find(|(who, _)| state.tunnels_of(who) >= max);
            if let Some((who, what)) = busy {
                if let Some(suppressed) = shared.open_refusals.permit() {
                    warn!(inlet = %node, %service, node = %who, limit = max, suppressed, "open refused: per-node tunnel limit reached");
                }
                return Some(Control::OpenRefused {
                    request,
                    reason: format!("{what} is an end of {max} tunnels through this relay, its maximum per node (max_tunnels_per_node); try again when one closes"),
                });
            }
            let opened = state
                .registry
                .open(&service, (node, *node_static), Instant::now());
            let opened = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    info!(inlet = %node, %service, reason = %e, "open refused");
                    return Some(Control::OpenRefused {
                        request,
                        reason: e.to_string(),
                    });
                }
            };
            let notified = state.sessions.get(&opened.outlet_session).map(|tx| {
                tx.try_send(Control::Incoming {
                    service: service.clone(),
                    token: opened.token.clone(),
                    source: Some(who.addr.ip()),
                })
            });
            if !matches!(notified, Some(Ok(()))) {
                warn!(%service, outlet = %opened.outlet, "outlet session is overloaded or gone; refusing open");
                return Some(Control::OpenRefused {
                    request,
                    reason: format!("the outlet of service \"{service}\" is not answering at this relay; try again"),
                });
            }
            debug!(inlet = %node, %service, outlet = %opened.outlet, token = %opened.token.label(), "tunnel opened");
            Some(Control::Opened {
                request,
                token: opened.token,
            })
        }
        Control::Ping { seq } => Some(Control::Pong { seq }),
        Control::Pong { .. } => None,
        other => {
            debug!(%node, message = ?other, "ignoring unexpected control message");
            None
        }
    }
}

/// Counts one node's spare data connections; the count drops with the guard.
struct SpareGuard<'a> {
    shared: &'a Shared,
    node_static: [u8; 32],
}

impl<'a> SpareGuard<'a> {
    fn take(shared: &'a Shared, node_static: [u8; 32]) -> Option<Self> {
        let mut state = shared.state();
        let count = state.spares.entry(node_static).or_insert(0);
        if *count >= shared.config.max_spares_per_node {
            return None;
        }
        *count += 1;
        Some(SpareGuard {
            shared,
            node_static,
        })
    }
}

impl Drop for SpareGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        if let Some(count) = state.spares.get_mut(&self.node_static) {
            *count -= 1;
            if *count == 0 {
                state.spares.remove(&self.node_static);
            }
        }
    }
}

/// A data connection: IK handshake (bounded by the handshake timeout), then
/// a wait (bounded by the spare idle timeout) for the one frame that names
/// its tunnel, then the splice.
async fn attach(
    shared: &Shared,
    mut stream: TcpStream,
    peer_addr: SocketAddr,
    handshake_permit: tokio::sync::SemaphorePermit<'_>,
    shutdown: CancellationToken,
) {
    let (tx, rx) = oneshot::channel::<Arrival>();
    let outcome = {
        let (rd, mut wr) = stream.split();
        let mut reader = FramedReader::new(rd, CONTROL_READ_BUFFER);
        let handshake = async {
            let msg1 = reader
                .next_frame(postern_identity::frame::MAX_NOISE_MESSAGE)
                .await?;
            let (responder, node_static, hello) =
                AttachResponder::handle_request(&shared.local, msg1)?;
            let guard = if hello.spare {
                SpareGuard::take(shared, node_static).map(Some)
            } else {
                Some(None)
            };
            let Some(guard) = guard else {
                let reason = format!(
                    "this node already has {} idle data connections at the relay",
                    shared.config.max_spares_per_node
                );
                link::send_raw(&mut wr, &responder.refuse(&reason)?).await?;
                return Err(LinkError::Channel(
                    postern_identity::ChannelError::BadMessage(reason),
                ));
            };
            let (msg2, transport) = responder.accept()?;
            link::send_raw(&mut wr, &msg2).await?;
            Ok::<_, LinkError>((node_static, guard, transport))
        };
        let (node_static, guard, transport) = match link::within(
            shared.config.handshake_timeout,
            "attach handshake",
            handshake,
        )
        .await
        {
            Ok(ok) => ok,
            Err(e) => {
                warn!(%peer_addr, error = %e, "data connection handshake failed; closing");
                return;
            }
        };
        drop(handshake_permit);
        let (mut sealer, mut opener) = transport.split();
        let join = async {
            let body = reader
                .next_frame(postern_identity::link::MAX_CONTROL_FRAME)
                .await?;
            let mut plain = vec![0u8; body.len()];
            let n = opener.open(body, &mut plain)?;
            let request: Attach = postern_identity::wire::decode(&plain[..n])?;
            if request.version != postern_identity::wire::PROTOCOL_VERSION {
                return Err(LinkError::Channel(
                    postern_identity::ChannelError::BadMessage(format!(
                        "attach version {} is not supported",
                        request.version
                    )),
                ));
            }
            let claimed = shared.state().registry.claim(
                &request.token,
                request.side,
                &node_static,
                tx,
                Instant::now(),
            );
            let reply = match &claimed {
                Ok(_) => AttachReply::Accepted,
                Err(e) => AttachReply::Refused {
                    reason: e.to_string(),
                },
            };
            let mut out = Vec::new();
            sealer.seal(&postern_identity::wire::encode(&reply)?, &mut out)?;
            wr.write_all(&out).await?;
            Ok::<_, LinkError>((claimed, request.side))
        };
        let idle = if guard.is_some() {
            shared.config.spare_idle_timeout
        } else {
            shared.config.handshake_timeout
        };
        let joined = tokio::select! {
            () = shutdown.cancelled() => return,
            joined = tokio::time::timeout(idle, join) => joined,
        };
        drop(guard);
        match joined {
            Ok(Ok((claimed, side))) => claimed.map(|c| (c, side, reader.into_parts().1)),
            Ok(Err(LinkError::Closed)) => {
                debug!(%peer_addr, "spare data connection closed by the node");
                return;
            }
            Ok(Err(e)) => {
                warn!(%peer_addr, error = %e, "data connection failed before joining a tunnel; closing");
                return;
            }
            Err(_) => {
                debug!(%peer_addr, "spare data connection idle for {idle:?}; closing");
                return;
            }
        }
    };
    let (claim, side, leftover) = match outcome {
        Ok(ok) => ok,
        Err(e) => {
            warn!(%peer_addr, reason = %e, "attach refused");
            return;
        }
    };
    if let Some(peer) = claim.peer {
        // The other end is waiting: hand it our connection; it splices.
        let _ = peer.send(Arrival { stream, leftover });
        return;
    }
    let wait = shared.config.token_ttl;
    let arrival = tokio::select! {
        () = shutdown.cancelled() => return,
        arrival = tokio::time::timeout(wait, rx) => arrival,
    };
    let Ok(Ok(other)) = arrival else {
        info!(service = %claim.service, token = %claim.label, ?side, "the other end of the tunnel did not attach within {wait:?}; closing");
        return;
    };
    let Arrival {
        stream: mut other_stream,
        leftover: other_leftover,
    } = other;
    debug!(service = %claim.service, inlet = %claim.inlet, outlet = %claim.outlet, token = %claim.label, "tunnel spliced");
    let _counted = SplicedGuard::new(shared, claim.inlet, claim.outlet);
    let spliced = async {
        if !leftover.is_empty() {
            other_stream.write_all(&leftover).await?;
        }
        if !other_leftover.is_empty() {
            stream.write_all(&other_leftover).await?;
        }
        let size = shared.config.splice_buffer;
        tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut other_stream, size, size).await
    };
    let result = tokio::select! {
        () = shutdown.cancelled() => Err(io::Error::other("relay shutting down")),
        r = spliced => r,
    };
    match result {
        Ok((a_to_b, b_to_a)) => {
            let (up, down) = if side == postern_identity::wire::Side::Inlet {
                (a_to_b, b_to_a)
            } else {
                (b_to_a, a_to_b)
            };
            info!(service = %claim.service, inlet = %claim.inlet, outlet = %claim.outlet, bytes_up = up, bytes_down = down, "tunnel closed");
        }
        Err(e) => {
            // Propagate a reset: abort both connections instead of closing them.
            reset_on_close(&stream);
            reset_on_close(&other_stream);
            info!(service = %claim.service, inlet = %claim.inlet, outlet = %claim.outlet, error = %e, "tunnel aborted");
        }
    }
}
