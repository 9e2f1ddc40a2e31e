//! The relay's listener and shared state: accepting connections within the
//! connection limits, reading the preamble, and handing each connection to
//! its hop session (`session.rs`) or data connection (`attach.rs`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use postern_identity::credential::TrustedAuthorities;
use postern_identity::handshake::LocalParty;
use postern_identity::revocation::{Alarm, StalenessAlarm};
use postern_identity::revocation::{RevocationFeeds, DEFAULT_MAX_STALENESS};
use postern_identity::wire::{Control, ServiceName, PREAMBLE_ATTACH, PREAMBLE_HOP, PREAMBLE_LEN};
use postern_identity::{Identifier, Identity};
use postern_policies::audit::AuditLog;
use postern_policies::LivePolicies;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::access;
use crate::attach::{self, Arrival};
use crate::limits::{
    decrement, RefusalLogs, Source, SourceLimits, SourceRefusal, Sources, TokenBucket,
};
use crate::registry::{Registry, SessionId};
use crate::session;

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
    /// Most connections of any kind (authenticating, hop channels, data
    /// connections, tunnels) from one source at once: an IPv4 address or an
    /// IPv6 /64.
    pub max_connections_per_source: usize,
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
    /// Most tunnels one node may be an end of at once: spliced tunnels as
    /// inlet or outlet, plus the tunnels it asked for that are still being
    /// set up (a token counts against the node that asked for it, never
    /// against the outlet it names). One node cannot take the whole relay.
    pub max_tunnels_per_node: usize,
    /// Most tunnels one node may have asked for that are still being set up
    /// (token issued, not yet spliced).
    pub max_pending_opens_per_node: usize,
    /// Most tunnels being set up that nodes from one source asked for.
    pub max_pending_opens_per_source: usize,
    /// Opens per second one identity may make on average (bursts of up to
    /// `open_burst_per_node`).
    pub opens_per_second_per_node: u32,
    /// The burst allowed above `opens_per_second_per_node`.
    pub open_burst_per_node: u32,
    /// Most service names one hop session may hold.
    pub max_services_per_session: usize,
    /// Size of the buffers a splice borrows, one per direction and only
    /// while bytes are in flight (an idle tunnel holds none).
    pub splice_buffer: usize,
    /// Most authenticated data connections one identity may keep waiting
    /// for a tunnel (nodes dial a few ahead of need to cut tunnel set-up
    /// time).
    pub max_spares_per_node: usize,
    /// A data connection that joins no tunnel for this long is closed.
    pub spare_idle_timeout: Duration,
    /// Authorities whose credentials nodes may present on their hop
    /// channels (their attributes reach `register` policies) and whose
    /// revocations the relay enforces: when one of them connects its hop
    /// channel, the relay asks it for its revocations
    /// (`Control::FollowRevocations`) and keeps listening; a node whose
    /// identity or credential is revoked loses its hop channel, and with it
    /// its registrations, within a second, and is refused when it
    /// reconnects. Empty: nodes' credentials are set aside.
    pub authorities: TrustedAuthorities,
    /// Policies deciding `register` (default deny), and `connect` too when
    /// `precheck_connect` is set. `None`: the first identity to register a
    /// name holds it while connected.
    pub policies: Option<Arc<LivePolicies>>,
    /// With `policies`, also decide `connect` for every `open` before a
    /// token is minted (without the service's attributes, which only its
    /// outlet knows; the outlet still decides too).
    pub precheck_connect: bool,
    /// Service names reserved for trusted authorities that registers under
    /// a name of their choosing (beyond the default `authority-P…`, which
    /// is theirs anyway).
    pub authority_services: Vec<(Identifier, ServiceName)>,
    /// Where registration decisions are audited, if anywhere.
    pub audit: Option<Arc<AuditLog>>,
    /// How stale a trusted authority's revocations may grow (its hop channel
    /// gone, its feed silent) before the relay refuses new registrations of
    /// nodes other than the authorities: it could no longer tell whether
    /// they are revoked.
    pub max_revocation_staleness: Duration,
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
            max_connections_per_source: 4_096,
            max_pending_handshakes: 1_024,
            max_pending_per_source: 256,
            max_tunnels: 10_000,
            max_tunnels_per_node: 1_024,
            max_pending_opens_per_node: 128,
            max_pending_opens_per_source: 256,
            opens_per_second_per_node: 5_000,
            open_burst_per_node: 5_000,
            max_services_per_session: 64,
            splice_buffer: 64 * 1024,
            max_spares_per_node: 8,
            spare_idle_timeout: Duration::from_secs(120),
            authorities: TrustedAuthorities::new(),
            policies: None,
            precheck_connect: false,
            authority_services: Vec::new(),
            audit: None,
            max_revocation_staleness: DEFAULT_MAX_STALENESS,
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

/// A live hop session, as the rest of the relay sees it.
pub(crate) struct SessionEntry {
    /// Its outbox (control messages pushed to the node).
    pub tx: mpsc::Sender<Control>,
}

/// A Noise static key with at least one live hop session: data connections
/// are accepted only from such keys, and counted against its identity.
pub(crate) struct LiveKey {
    pub node: Identifier,
    pub sessions: usize,
}

pub(crate) struct State {
    pub registry: Registry<oneshot::Sender<Arrival>>,
    pub sessions: HashMap<SessionId, SessionEntry>,
    next_session: u64,
    pub keys: HashMap<[u8; 32], LiveKey>,
    /// Authenticated data connections waiting for a tunnel, per identity.
    pub spares: HashMap<Identifier, usize>,
    pub spares_total: usize,
    /// Spliced tunnels per identity (each tunnel counts for its inlet and
    /// its outlet).
    pub spliced: HashMap<Identifier, usize>,
    /// Open rates per identity.
    pub open_rates: HashMap<Identifier, TokenBucket>,
}

impl State {
    /// Adds a hop session of `node` authenticated with `key`.
    pub fn add_session(
        &mut self,
        node: Identifier,
        key: [u8; 32],
        tx: mpsc::Sender<Control>,
    ) -> SessionId {
        let id = SessionId(self.next_session);
        self.next_session += 1;
        self.sessions.insert(id, SessionEntry { tx });
        self.keys
            .entry(key)
            .or_insert(LiveKey { node, sessions: 0 })
            .sessions += 1;
        id
    }

    /// Removes a hop session; returns the names it held.
    pub fn remove_session(
        &mut self,
        id: SessionId,
        key: &[u8; 32],
    ) -> Vec<postern_identity::wire::ServiceName> {
        self.sessions.remove(&id);
        if let Some(live) = self.keys.get_mut(key) {
            live.sessions = live.sessions.saturating_sub(1);
            if live.sessions == 0 {
                self.keys.remove(key);
            }
        }
        self.registry.remove_session(id)
    }

    /// Spliced tunnels `node` is an end of.
    pub fn spliced_of(&self, node: &Identifier) -> usize {
        self.spliced.get(node).copied().unwrap_or(0)
    }
}

pub(crate) struct Shared {
    pub local: LocalParty,
    pub config: RelayConfig,
    /// The trusted authorities' revocations, fed by their hop sessions.
    feeds: RwLock<RevocationFeeds>,
    state: Mutex<State>,
    sources: Mutex<Sources>,
    /// Data connections past their handshake (spares, tunnel ends waiting
    /// for their peer, and spliced tunnels: the second end of a tunnel hands
    /// its socket to the first and stops counting).
    pub authenticated_data: AtomicUsize,
    /// Rate limits for the warnings about refusals.
    pub logs: RefusalLogs,
}

impl Shared {
    pub(crate) fn new(local: LocalParty, config: RelayConfig) -> Self {
        let relay_id = local.identity().identifier();
        Shared {
            feeds: RwLock::new(RevocationFeeds::new(&config.authorities, Instant::now())),
            state: Mutex::new(State {
                registry: Registry::new(relay_id, config.token_ttl),
                sessions: HashMap::new(),
                next_session: 1,
                keys: HashMap::new(),
                spares: HashMap::new(),
                spares_total: 0,
                spliced: HashMap::new(),
                open_rates: HashMap::new(),
            }),
            sources: Mutex::new(Sources::default()),
            authenticated_data: AtomicUsize::new(0),
            logs: RefusalLogs::new(),
            local,
            config,
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the registry half
        // updated in a way that matters more than stopping would; keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn feeds(&self) -> RwLockReadGuard<'_, RevocationFeeds> {
        self.feeds.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a message of `authority`'s revocation feed.
    pub(crate) fn apply_feed(
        &self,
        authority: &Identifier,
        entries: Vec<postern_identity::credential::RevocationEntry>,
    ) -> usize {
        self.feeds.write().unwrap_or_else(|p| p.into_inner()).apply(
            authority,
            entries,
            Instant::now(),
        )
    }

    fn sources(&self) -> MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn identifier(&self) -> Identifier {
        self.local.identity().identifier()
    }

    /// Tunnels the relay carries or is setting up: authenticated data
    /// connections that are not idle spares.
    pub(crate) fn tunnels(&self, state: &State) -> usize {
        self.authenticated_data
            .load(Ordering::Relaxed)
            .saturating_sub(state.spares_total)
    }

    fn source_limits(&self) -> SourceLimits {
        SourceLimits {
            max_pending_total: self.config.max_pending_handshakes,
            max_pending_per_source: self.config.max_pending_per_source,
            max_per_source: self.config.max_connections_per_source,
        }
    }
}

/// Counts a spliced tunnel for its two ends while it lives.
pub(crate) struct SplicedGuard<'a> {
    shared: &'a Shared,
    ends: [Identifier; 2],
}

impl<'a> SplicedGuard<'a> {
    pub(crate) fn new(shared: &'a Shared, inlet: Identifier, outlet: Identifier) -> Self {
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
        for end in self.ends {
            decrement(&mut state.spliced, end);
        }
    }
}

/// One connection counted against its source: as authenticating until
/// [`SourceSlot::authenticated`], and as open until dropped.
struct SourceSlot<'a> {
    shared: &'a Shared,
    source: Source,
    pending: bool,
}

impl<'a> SourceSlot<'a> {
    fn take(shared: &'a Shared, source: Source) -> Result<Self, SourceRefusal> {
        shared.sources().admit(source, shared.source_limits())?;
        Ok(SourceSlot {
            shared,
            source,
            pending: true,
        })
    }

    fn authenticated(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.shared.sources().authenticated(self.source);
        }
    }
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        let mut sources = self.shared.sources();
        if self.pending {
            sources.authenticated(self.source);
        }
        sources.closed(self.source);
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

/// A bound relay, ready to [`run`](Relay::run).
pub struct Relay {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("identity", &self.shared.identifier())
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
        let local = LocalParty::new(identity)?;
        let shared = Arc::new(Shared::new(local, config));
        Ok(Relay { listener, shared })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The relay's identifier, which nodes pin.
    pub fn identifier(&self) -> Identifier {
        self.shared.identifier()
    }

    /// Serves until `shutdown` is cancelled, then closes every connection.
    pub async fn run(self, shutdown: CancellationToken) {
        let Relay { listener, shared } = self;
        let connections = Arc::new(Semaphore::new(shared.config.max_connections));
        let tasks = TaskTracker::new();
        info!(relay = %shared.identifier(), addr = ?listener.local_addr().ok(), "relay listening");
        access::report_startup(&shared.config);
        if let Some(policies) = &shared.config.policies {
            access::watch_policies(policies, shared.config.audit.clone());
        }
        let sweeper = {
            let shared = Arc::clone(&shared);
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut alarm = StalenessAlarm::default();
                let started = Instant::now();
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        _ = tick.tick() => {
                            let now = Instant::now();
                            sweep(&shared, now);
                            report_staleness(&shared, &mut alarm, now - started, now);
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
                reset_on_close(&stream);
                if let Some(suppressed) = shared.logs.connections.permit() {
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

/// Once a second: drops expired tokens, and forgets open rates that have
/// fully recovered.
fn sweep(shared: &Shared, now: Instant) {
    let (rate, burst) = (
        shared.config.opens_per_second_per_node,
        shared.config.open_burst_per_node,
    );
    let mut state = shared.state();
    let expired = state.registry.expire(now);
    state
        .open_rates
        .retain(|_, bucket| !bucket.is_full(rate, burst, now));
    drop(state);
    if expired > 0 {
        debug!(expired, "tunnel tokens expired before both ends attached");
    }
}

/// Says when a trusted authority's revocations go stale (registrations are
/// then refused) and when they are current again.
fn report_staleness(shared: &Shared, alarm: &mut StalenessAlarm, waited: Duration, now: Instant) {
    let bound = shared.config.max_revocation_staleness;
    let freshness = shared.feeds().freshness(now);
    for said in alarm.update(&freshness, bound, waited) {
        match said {
            Alarm::StillWaiting(authority, waited) => {
                warn!(%authority, "no revocations from trusted authority {authority} after {waited:.0?}: is it running and connected to this relay? Registrations by other nodes wait for them")
            }
            Alarm::Aging(authority, age) => {
                warn!(%authority, "the revocations of trusted authority {authority} are {age:.0?} old (it is not connected to this relay): registrations by other nodes will be refused once they are {bound:?} old")
            }
            Alarm::Refusing(authority, fresh) => {
                error!(%authority, "the revocations of trusted authority {authority} are too stale ({fresh}; bound {bound:?}): refusing registrations by other nodes until it is back")
            }
            Alarm::Recovered(authority) => {
                info!(%authority, "the revocations of trusted authority {authority} are current again")
            }
        }
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
pub(crate) fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Admits a connection within the per-source and pending limits while it
/// authenticates, cuts it if it has not authenticated `handshake_timeout`
/// after `accept` (however slowly it trickles bytes), and keeps counting it
/// against its source for as long as it lives.
async fn handle_connection(
    shared: &Shared,
    stream: TcpStream,
    peer_addr: SocketAddr,
    shutdown: CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let mut slot = match SourceSlot::take(shared, Source::of(peer_addr.ip())) {
        Ok(slot) => slot,
        Err(refusal) => {
            // Closing at once costs the peer a connection and us nothing.
            reset_on_close(&stream);
            if let Some(suppressed) = shared.logs.connections.permit() {
                match refusal {
                    SourceRefusal::PendingTotal(limit) => {
                        warn!(%peer_addr, limit, suppressed, "too many connections still authenticating; refusing connection (max_pending_handshakes)")
                    }
                    SourceRefusal::PendingPerSource(limit) => {
                        warn!(%peer_addr, limit, suppressed, "too many connections still authenticating from this source; refusing connection (max_pending_per_source)")
                    }
                    SourceRefusal::PerSource(limit) => {
                        warn!(%peer_addr, limit, suppressed, "too many connections from this source; refusing connection (max_connections_per_source)")
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
    slot.authenticated();
    if !authenticated {
        if let Some(suppressed) = shared.logs.cuts.permit() {
            warn!(%peer_addr, suppressed, "not authenticated within {:?} of connecting; closing", shared.config.handshake_timeout);
        }
        return;
    }
    let _counted = is_data
        .load(Ordering::Relaxed)
        .then(|| DataGuard::new(&shared.authenticated_data));
    session.await;
    drop(slot);
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
        PREAMBLE_HOP => {
            let (rd, wr) = stream.into_split();
            session::run(shared, rd, wr, peer_addr, handshake_permit, shutdown).await;
        }
        PREAMBLE_ATTACH => {
            is_data.store(true, Ordering::Relaxed);
            attach::run(shared, stream, peer_addr, handshake_permit, shutdown).await;
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
            if let Some(suppressed) = shared.logs.preambles.permit() {
                warn!(%peer_addr, suppressed, "not a Postern node{looks_like}: unknown preamble; closing");
            }
        }
    }
}
