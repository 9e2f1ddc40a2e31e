//! A node's hop session at the relay: the hop handshake and its admission,
//! then control messages (register, open, ping) until the node leaves, goes
//! silent, is revoked, or the relay stops.
//!
//! Timing is a small sans-IO state machine ([`SessionTimer`]): when the node
//! was last heard from, and when its trust is checked again. The loop around
//! it sleeps until the timer's one deadline, so a silent node is dropped
//! `idle_timeout` after its last message however often the relay rechecks.
//! Every ending the relay chooses is told to the node first as a
//! `Goodbye { code, reason }` inside the channel.

use std::net::SocketAddr;
use std::time::Duration;

use postern_identity::handshake::ChannelKind;
use postern_identity::link::{
    self, ControlReceiver, ControlSender, FramedReader, LinkError, CONTROL_READ_BUFFER,
};
use postern_identity::wire::{Control, Hello, Refusal, RefusalCode, ServiceName};
use postern_identity::Identifier;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::access::{self, NodeCredential};
use crate::limits::{Source, TokenBucket};
use crate::registry::{Registration, SessionId};
use crate::server::Shared;

/// How often a live session's identity, credential and registrations are
/// checked again (revocations, expiry, policy reloads).
pub(crate) const RECHECK: Duration = Duration::from_secs(1);

/// When a session must next act: drop a silent node, or recheck its trust.
#[derive(Debug, Clone)]
pub(crate) struct SessionTimer {
    idle: Duration,
    recheck: Duration,
    last_heard: Instant,
    next_recheck: Instant,
}

/// What a [`SessionTimer`] says is due now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// The node has been silent for the whole idle timeout.
    Idle,
    /// Time to recheck the node's trust.
    Recheck,
    /// Nothing yet.
    Nothing,
}

impl SessionTimer {
    pub(crate) fn new(now: Instant, idle: Duration, recheck: Duration) -> Self {
        SessionTimer {
            idle,
            recheck,
            last_heard: now,
            next_recheck: now + recheck,
        }
    }

    /// A message arrived from the node.
    pub(crate) fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// The next instant something may be due.
    pub(crate) fn deadline(&self) -> Instant {
        (self.last_heard + self.idle).min(self.next_recheck)
    }

    /// What is due at `now`; a recheck is scheduled again once reported.
    pub(crate) fn due(&mut self, now: Instant) -> Due {
        if now >= self.last_heard + self.idle {
            Due::Idle
        } else if now >= self.next_recheck {
            self.next_recheck = now + self.recheck;
            Due::Recheck
        } else {
            Due::Nothing
        }
    }
}

/// Who is at the other end of a hop channel.
pub(crate) struct Session {
    pub id: SessionId,
    pub node: Identifier,
    pub key: [u8; 32],
    pub addr: SocketAddr,
    pub credential: NodeCredential,
}

/// How a session ends: quietly (the node left or the connection broke), or
/// with a `Goodbye` telling the node why.
struct Ending {
    goodbye: Option<Refusal>,
    reason: String,
}

impl Ending {
    fn quiet(reason: impl Into<String>) -> Self {
        Ending {
            goodbye: None,
            reason: reason.into(),
        }
    }

    fn goodbye(code: RefusalCode, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Ending {
            goodbye: Some(Refusal::new(code, reason.clone())),
            reason,
        }
    }
}

/// Runs one hop session: handshake, admission, then control messages.
pub(crate) async fn run<R, W>(
    shared: &Shared,
    rd: R,
    mut wr: W,
    peer_addr: SocketAddr,
    handshake_permit: tokio::sync::SemaphorePermit<'_>,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cfg = &shared.config;
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
        match link::within(cfg.handshake_timeout, "hop handshake", handshake).await {
            Ok(ok) => ok,
            Err(e) => {
                if let Some(suppressed) = shared.logs.handshakes.permit() {
                    warn!(%peer_addr, error = %e, suppressed, "hop handshake failed; closing");
                }
                return;
            }
        };
    drop(handshake_permit);
    let node = peer.identity.identifier();
    let (sealer, opener) = transport.split();
    let mut inbox = ControlReceiver::new(reader, opener);
    let mut outbox = ControlSender::new(wr, sealer);
    let admitted = {
        let feeds = shared.feeds();
        match access::identity_revoked(&*feeds, &node) {
            Some(reason) => Err(reason),
            None => NodeCredential::verify(cfg, &*feeds, node, peer.hello.credential.as_ref()),
        }
    };
    let credential = match admitted {
        Ok(credential) => credential,
        Err(reason) => {
            if let Some(suppressed) = shared.logs.sessions.permit() {
                warn!(%node, %peer_addr, %reason, suppressed, "hop channel refused");
            }
            let _ = outbox
                .send(&Control::Goodbye {
                    code: RefusalCode::Denied,
                    reason,
                })
                .await;
            let _ = outbox.shutdown().await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Control>(256);
    let id = shared.state().add_session(node, peer.static_key, tx);
    let who = Session {
        id,
        node,
        key: peer.static_key,
        addr: peer_addr,
        credential,
    };
    info!(%node, %peer_addr, session = id.0, "node connected");
    // A trusted authority feeds the relay its revocations on this channel,
    // from where the relay's view of its log ends.
    let authority = cfg.authorities.contains(&node);
    if authority {
        let after = shared.feeds().cursor(&node);
        if let Err(e) = outbox.send(&Control::FollowRevocations { after }).await {
            warn!(%node, error = %e, "cannot ask the authority for its revocations");
        }
    }
    let idle = cfg.idle_timeout;
    let mut timer = SessionTimer::new(Instant::now(), idle, RECHECK);
    let mut generation = cfg.policies.as_ref().map(|p| p.generation());
    let ending = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ending::goodbye(RefusalCode::RetryLater, "the relay is shutting down"),
            () = tokio::time::sleep_until(timer.deadline()) => match timer.due(Instant::now()) {
                Due::Idle => break Ending::goodbye(RefusalCode::RetryLater, format!("no message for {idle:?}")),
                Due::Recheck => match recheck(shared, &who, &mut generation) {
                    Ok(withdrawn) => {
                        if let Some(e) = send_all(&mut outbox, withdrawn).await {
                            break e;
                        }
                    }
                    Err(ending) => break ending,
                },
                Due::Nothing => {}
            },
            out = rx.recv() => {
                let Some(msg) = out else { break Ending::quiet("session removed") };
                if let Err(e) = outbox.send(&msg).await {
                    break Ending::quiet(format!("send failed: {e}"));
                }
            }
            msg = inbox.recv() => {
                let msg = match msg {
                    Ok(msg) => msg,
                    Err(LinkError::Closed) => break Ending::quiet("node disconnected"),
                    Err(e) => break Ending::goodbye(RefusalCode::Invalid, format!("protocol error: {e}")),
                };
                timer.heard(Instant::now());
                if let Control::Revocations { entries } = msg {
                    if authority {
                        let applied = shared.apply_feed(&node, entries);
                        if applied > 0 {
                            info!(authority = %node, count = applied, "revocations received from the authority");
                        }
                    } else {
                        debug!(%node, "revocations from a node that is not a trusted authority; ignored");
                    }
                    continue;
                }
                if let Some(reply) = handle_control(shared, &who, msg) {
                    if let Err(e) = outbox.send(&reply).await {
                        break Ending::quiet(format!("send failed: {e}"));
                    }
                }
            }
        }
    };
    let released = shared.state().remove_session(id, &who.key);
    for service in released {
        info!(%node, %service, "service unregistered (its outlet disconnected)");
    }
    if let Some(goodbye) = ending.goodbye {
        let denied = goodbye.code == RefusalCode::Denied;
        let _ = outbox
            .send(&Control::Goodbye {
                code: goodbye.code,
                reason: goodbye.reason,
            })
            .await;
        let _ = outbox.shutdown().await;
        if denied {
            warn!(%node, session = id.0, reason = %ending.reason, "hop channel closed by the relay");
            return;
        }
    }
    info!(%node, session = id.0, reason = %ending.reason, "node disconnected");
}

async fn send_all<W: AsyncWrite + Unpin>(
    outbox: &mut ControlSender<W>,
    msgs: Vec<Control>,
) -> Option<Ending> {
    for msg in msgs {
        if let Err(e) = outbox.send(&msg).await {
            return Some(Ending::quiet(format!("send failed: {e}")));
        }
    }
    None
}

/// Checks a live session's trust again: a revoked identity or an ended
/// credential ends it; a new policy generation re-decides the names it holds
/// (the withdrawn ones are returned as `RegisterRefused` to send).
fn recheck(
    shared: &Shared,
    who: &Session,
    generation: &mut Option<u64>,
) -> Result<Vec<Control>, Ending> {
    let cfg = &shared.config;
    let ended = {
        let feeds = shared.feeds();
        access::identity_revoked(&*feeds, &who.node)
            .map(|reason| (RefusalCode::Denied, reason))
            .or_else(|| {
                who.credential
                    .ended(postern_identity::time::unix_now(), &*feeds)
                    .map(|(code, reason)| {
                        (code, format!("{reason}; its services are unregistered"))
                    })
            })
    };
    if let Some((code, reason)) = ended {
        return Err(Ending::goodbye(code, reason));
    }
    let Some(policies) = &cfg.policies else {
        return Ok(Vec::new());
    };
    let now = policies.generation();
    if *generation == Some(now) {
        return Ok(Vec::new());
    }
    *generation = Some(now);
    let names: Vec<ServiceName> = shared.state().registry.names_of(who.id).cloned().collect();
    let mut withdrawn = Vec::new();
    for service in names {
        let decided = access::decide_register(
            cfg,
            shared.identifier(),
            who.node,
            &who.credential,
            &service,
            who.addr.ip(),
            Ok(()),
        );
        let Err(refusal) = decided else { continue };
        if shared.state().registry.unregister(&service, who.id) {
            warn!(node = %who.node, %service, reason = %refusal.reason, "registration withdrawn after a policy reload");
            withdrawn.push(Control::RegisterRefused {
                service,
                code: refusal.code,
                reason: refusal.reason,
            });
        }
    }
    Ok(withdrawn)
}

pub(crate) fn handle_control(shared: &Shared, who: &Session, msg: Control) -> Option<Control> {
    match msg {
        Control::Register { service } => Some(register(shared, who, service)),
        Control::Open { request, service } => Some(match open(shared, who, &service) {
            Ok(token) => Control::Opened { request, token },
            Err(refusal) => {
                if let Some(suppressed) = shared.logs.opens.permit() {
                    warn!(inlet = %who.node, %service, code = %refusal.code, reason = %refusal.reason, suppressed, "open refused");
                }
                Control::OpenRefused {
                    request,
                    code: refusal.code,
                    reason: refusal.reason,
                }
            }
        }),
        Control::Ping { seq } => Some(Control::Pong { seq }),
        Control::Pong { .. } => None,
        other => {
            debug!(node = %who.node, message = ?other, "ignoring unexpected control message");
            None
        }
    }
}

fn register(shared: &Shared, who: &Session, service: ServiceName) -> Control {
    let cfg = &shared.config;
    let refused = |refusal: Refusal| {
        if let Some(suppressed) = shared.logs.registrations.permit() {
            warn!(node = %who.node, %service, code = %refusal.code, reason = %refusal.reason, suppressed, "registration refused");
        }
        Control::RegisterRefused {
            service: service.clone(),
            code: refusal.code,
            reason: refusal.reason,
        }
    };
    {
        let state = shared.state();
        let held = state
            .registry
            .lookup(&service)
            .is_some_and(|r| r.session == who.id);
        let max = cfg.max_services_per_session;
        if !held && state.registry.count_of(who.id) >= max {
            drop(state);
            return refused(Refusal::new(
                RefusalCode::Limit,
                format!("this hop channel already holds {max} service names, the relay's maximum (max_services_per_session)"),
            ));
        }
    }
    let current = shared
        .feeds()
        .require_current(std::time::Instant::now(), cfg.max_revocation_staleness);
    if let Err(refusal) = access::decide_register(
        cfg,
        shared.identifier(),
        who.node,
        &who.credential,
        &service,
        who.addr.ip(),
        current,
    ) {
        return refused(refusal);
    }
    let reg = Registration {
        owner: who.node,
        session: who.id,
        owner_static: who.key,
    };
    let result = shared.state().registry.register(service.clone(), reg);
    match result {
        Ok(replaced) => {
            info!(node = %who.node, %service, replaced_session = ?replaced.map(|s| s.0), "service registered");
            Control::Registered { service }
        }
        Err(e) => refused(Refusal::new(RefusalCode::RetryLater, e.to_string())),
    }
}

/// Mints a token for a tunnel from `who` to `service`, within the limits,
/// and tells the outlet. `Err` is the refusal for the inlet.
fn open(
    shared: &Shared,
    who: &Session,
    service: &ServiceName,
) -> Result<postern_identity::wire::TunnelToken, Refusal> {
    let cfg = &shared.config;
    let limit = |reason: String| Err(Refusal::new(RefusalCode::Limit, reason));
    access::precheck_connect(
        cfg,
        shared.identifier(),
        who.node,
        &who.credential,
        service,
        who.addr.ip(),
    )?;
    let now = std::time::Instant::now();
    let source = Source::of(who.addr.ip());
    let node = who.node;
    let mut state = shared.state();
    if shared.tunnels(&state) >= cfg.max_tunnels {
        let max = cfg.max_tunnels;
        return limit(format!(
            "the relay is carrying its maximum of {max} tunnels (max_tunnels); try again later"
        ));
    }
    let (rate, burst) = (cfg.opens_per_second_per_node, cfg.open_burst_per_node);
    let allowed = state
        .open_rates
        .entry(node)
        .or_insert_with(|| TokenBucket::full(burst, now))
        .try_take(rate, burst, now);
    if !allowed {
        return limit(format!(
            "this node asks for more than {rate} tunnels per second, the relay's limit per node (opens_per_second_per_node); slow down"
        ));
    }
    let pending = state.registry.pending_opened_by(&node);
    if pending >= cfg.max_pending_opens_per_node {
        return limit(format!(
            "this node has {pending} tunnels being set up, the relay's maximum per node (max_pending_opens_per_node); try again when they are done"
        ));
    }
    if state.registry.pending_from(source) >= cfg.max_pending_opens_per_source {
        let max = cfg.max_pending_opens_per_source;
        return limit(format!(
            "nodes from this address have {max} tunnels being set up, the relay's maximum per address (max_pending_opens_per_source); try again shortly"
        ));
    }
    let max = cfg.max_tunnels_per_node;
    if state.spliced_of(&node) + pending >= max {
        return limit(format!("this node is an end of {max} tunnels through this relay, its maximum per node (max_tunnels_per_node); try again when one closes"));
    }
    let outlet = state.registry.lookup(service).map(|r| r.owner);
    // A trusted authority is the far end of every node's revocation feed:
    // it is not held to the per-node limit as an outlet.
    let limited = |o: &Identifier| !cfg.authorities.contains(o) && state.spliced_of(o) >= max;
    if let Some(outlet) = outlet.filter(limited) {
        debug!(%outlet, %service, "outlet at its tunnel limit");
        return limit(format!("the outlet of this service is an end of {max} tunnels through this relay, its maximum per node (max_tunnels_per_node); try again when one closes"));
    }
    let opened = state
        .registry
        .open(service, (node, who.key), source, now)
        .map_err(|e| Refusal::new(RefusalCode::UnknownService, e.to_string()))?;
    let notified = state.sessions.get(&opened.outlet_session).map(|s| {
        s.tx.try_send(Control::Incoming {
            service: service.clone(),
            token: opened.token.clone(),
            source: Some(who.addr.ip()),
        })
    });
    if !matches!(notified, Some(Ok(()))) {
        return Err(Refusal::new(
            RefusalCode::RetryLater,
            format!(
                "the outlet of service \"{service}\" is not answering at this relay; try again"
            ),
        ));
    }
    debug!(inlet = %node, %service, outlet = %opened.outlet, token = %opened.token.label(), "tunnel opened");
    Ok(opened.token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_deadline_does_not_move_with_rechecks() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(30);
        let mut timer = SessionTimer::new(t0, idle, RECHECK);
        // Rechecks come due every second, and never push the idle deadline.
        let mut rechecks = 0;
        let now = loop {
            let now = timer.deadline();
            match timer.due(now) {
                Due::Recheck => rechecks += 1,
                Due::Idle => break now,
                Due::Nothing => panic!("woken for nothing at {:?}", now - t0),
            }
        };
        assert_eq!(
            now - t0,
            idle,
            "dropped exactly idle_timeout after the last message"
        );
        assert_eq!(rechecks, 29);
        // A message moves the idle deadline; rechecks go on.
        let mut timer = SessionTimer::new(t0, idle, RECHECK);
        timer.heard(t0 + Duration::from_secs(20));
        assert_eq!(timer.due(t0 + Duration::from_secs(31)), Due::Recheck);
        assert_eq!(timer.due(t0 + Duration::from_secs(49)), Due::Recheck);
        assert_eq!(timer.due(t0 + Duration::from_secs(50)), Due::Idle);
    }

    use postern_identity::credential::{Revocation, RevocationCheck, RevocationTarget};
    use postern_identity::handshake::LocalParty;
    use postern_identity::Identity;
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    use crate::RelayConfig;

    type NodeEnd = (
        ControlReceiver<ReadHalf<DuplexStream>>,
        ControlSender<WriteHalf<DuplexStream>>,
    );

    /// Runs one hop session of the relay (`config`) against a node with
    /// identity `node` over an in-memory pipe; `script` plays the node once
    /// its handshake is done (`None`: the relay closed the handshake) and
    /// returns what it observed.
    async fn with_session<T>(
        shared: &Shared,
        node: Identity,
        script: impl AsyncFnOnce(Option<NodeEnd>) -> T,
    ) -> T {
        let relay_static = *shared.local.static_public();
        let (node_io, relay_io) = tokio::io::duplex(64 * 1024);
        let (rr, rw) = tokio::io::split(relay_io);
        let permits = tokio::sync::Semaphore::new(1);
        let permit = permits.try_acquire().unwrap();
        let addr: SocketAddr = ([192, 0, 2, 7], 4000).into();
        let relay = run(shared, rr, rw, addr, permit, CancellationToken::new());
        let node = async move {
            let local = LocalParty::new(node).unwrap();
            let (nr, mut nw) = tokio::io::split(node_io);
            let mut reader = FramedReader::new(nr, CONTROL_READ_BUFFER);
            let hello = Hello::default();
            let shaken = link::initiate(
                &mut reader,
                &mut nw,
                &local,
                ChannelKind::Hop,
                &hello,
                |peer| {
                    assert_eq!(peer.static_key, relay_static);
                    Ok(())
                },
            )
            .await;
            let end = shaken.ok().map(|(_, transport)| {
                let (sealer, opener) = transport.split();
                (
                    ControlReceiver::new(reader, opener),
                    ControlSender::new(nw, sealer),
                )
            });
            script(end).await
        };
        let ((), observed) = tokio::join!(relay, node);
        observed
    }

    fn config(idle: Duration) -> RelayConfig {
        let mut config = RelayConfig::new(([127, 0, 0, 1], 0).into());
        config.idle_timeout = idle;
        config
    }

    fn relay(config: RelayConfig) -> Shared {
        Shared::new(LocalParty::new(Identity::generate()).unwrap(), config)
    }

    fn revoke(seq: u64, who: Identifier) -> postern_identity::credential::RevocationEntry {
        postern_identity::credential::RevocationEntry {
            seq,
            revocation: Revocation {
                target: RevocationTarget::Identity(who),
                revoked_at: 1,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_node_is_dropped_after_the_idle_timeout() {
        let idle = Duration::from_secs(30);
        let shared = relay(config(idle));
        let (goodbye, silent_for) = with_session(&shared, Identity::generate(), async |end| {
            let (mut inbox, _outbox) = end.expect("handshake");
            let started = Instant::now();
            let msg = tokio::time::timeout(Duration::from_secs(3600), inbox.recv())
                .await
                .expect("the relay never dropped the silent node")
                .expect("a goodbye, not a cut");
            (msg, started.elapsed())
        })
        .await;
        match goodbye {
            Control::Goodbye { code, reason } => {
                assert_eq!(code, RefusalCode::RetryLater);
                assert!(reason.contains("no message for 30s"), "{reason}");
            }
            other => panic!("expected a goodbye, got {other:?}"),
        }
        assert!(
            silent_for >= idle && silent_for < idle + RECHECK,
            "dropped after {silent_for:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_keeps_talking_stays() {
        let idle = Duration::from_secs(30);
        let shared = relay(config(idle));
        let lived = with_session(&shared, Identity::generate(), async |end| {
            let (mut inbox, mut outbox) = end.expect("handshake");
            let started = Instant::now();
            // Ten minutes of pings every 20 s: each is answered.
            for seq in 0..30 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                outbox.send(&Control::Ping { seq }).await.unwrap();
                match inbox.recv().await.unwrap() {
                    Control::Pong { seq: got } => assert_eq!(got, seq),
                    other => panic!("expected a pong, got {other:?}"),
                }
            }
            // Then silence: dropped 30 s after the last ping.
            let last = Instant::now();
            let said = tokio::time::timeout(Duration::from_secs(3600), inbox.recv())
                .await
                .expect("the relay never dropped the silent node");
            assert!(matches!(said, Ok(Control::Goodbye { .. })), "{said:?}");
            (last - started, last.elapsed())
        })
        .await;
        assert_eq!(lived.0, Duration::from_secs(600));
        assert!(lived.1 >= idle && lived.1 < idle + RECHECK, "{:?}", lived.1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoked_identity_is_refused_whatever_it_presents() {
        let node = Identity::generate();
        let authority = Identity::generate().identifier();
        let mut config = config(Duration::from_secs(30));
        config.authorities = [authority].into_iter().collect();
        let shared = relay(config);
        shared.apply_feed(&authority, vec![revoke(1, node.identifier())]);
        // Without any credential (the review's bypass).
        let said = with_session(&shared, node, async |end| {
            let (mut inbox, _outbox) = end.expect("handshake");
            inbox.recv().await.unwrap()
        })
        .await;
        match said {
            Control::Goodbye { code, reason } => {
                assert_eq!(code, RefusalCode::Denied);
                assert!(reason.contains("revoked"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Another identity gets in (the check is not blind).
        let said = with_session(&shared, Identity::generate(), async |end| {
            let (mut inbox, mut outbox) = end.expect("handshake");
            outbox.send(&Control::Ping { seq: 1 }).await.unwrap();
            inbox.recv().await.unwrap()
        })
        .await;
        assert!(matches!(said, Control::Pong { seq: 1 }), "{said:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn trusted_authorities_feed_the_relay_on_their_hop_channel() {
        let authority = Identity::generate();
        let authority_id = authority.identifier();
        let (victim, bystander) = (Identity::generate(), Identity::generate());
        let (victim_id, bystander_id) = (victim.identifier(), bystander.identifier());
        let mut config = config(Duration::from_secs(30));
        config.authorities = [authority_id].into_iter().collect();
        let shared = relay(config);
        // A node that is not a trusted authority cannot feed revocations.
        with_session(&shared, Identity::generate(), async |end| {
            let (mut inbox, mut outbox) = end.expect("handshake");
            outbox
                .send(&Control::Revocations {
                    entries: vec![revoke(1, bystander_id)],
                })
                .await
                .unwrap();
            outbox.send(&Control::Ping { seq: 1 }).await.unwrap();
            assert!(matches!(inbox.recv().await.unwrap(), Control::Pong { .. }));
        })
        .await;
        assert!(shared.feeds().identity_revocation(&bystander_id).is_none());
        // The authority is asked for its log from the start, and its entries
        // apply at once.
        with_session(&shared, authority, async |end| {
            let (mut inbox, mut outbox) = end.expect("handshake");
            match inbox.recv().await.unwrap() {
                Control::FollowRevocations { after } => assert_eq!(after, 0),
                other => panic!("expected FollowRevocations, got {other:?}"),
            }
            outbox
                .send(&Control::Revocations {
                    entries: vec![revoke(1, victim_id)],
                })
                .await
                .unwrap();
            outbox.send(&Control::Ping { seq: 2 }).await.unwrap();
            assert!(matches!(inbox.recv().await.unwrap(), Control::Pong { .. }));
        })
        .await;
        assert!(shared.feeds().identity_revocation(&victim_id).is_some());
        assert_eq!(shared.feeds().cursor(&authority_id), 1);
        let said = with_session(&shared, victim, async |end| {
            let (mut inbox, _outbox) = end.expect("handshake");
            inbox.recv().await.unwrap()
        })
        .await;
        assert!(
            matches!(
                said,
                Control::Goodbye {
                    code: RefusalCode::Denied,
                    ..
                }
            ),
            "{said:?}"
        );
    }
}
