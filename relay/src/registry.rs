//! The relay's bookkeeping, without I/O: which session holds which service
//! name, and which single-use tunnel tokens are waiting for their two ends.
//!
//! Time is passed in by the caller, so tests drive expiry on a virtual clock.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use postern_identity::wire::{ServiceName, Side, TunnelToken};
use postern_identity::Identifier;

use crate::limits::{decrement, Source};

/// Identifies one hop session (one authenticated connection from a node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// Who holds a service name.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The outlet's identity.
    pub owner: Identifier,
    /// The hop session the outlet registered on.
    pub session: SessionId,
    /// The outlet's Noise static key on that session.
    pub owner_static: [u8; 32],
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// Another identity holds the name.
    #[error("service \"{service}\" is already registered at this relay by {holder}; only that identity may serve it")]
    HeldByOther {
        /// The name.
        service: ServiceName,
        /// Who holds it.
        holder: Identifier,
    },
}

/// Why an open request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// No outlet serves the name.
    #[error("service \"{service}\" is not registered at relay {relay}: is its outlet running and connected to this relay?")]
    NotRegistered {
        /// The name.
        service: ServiceName,
        /// This relay.
        relay: Identifier,
    },
}

/// Why an attach was refused. Deliberately vague towards the node about
/// *which* check failed for unknown tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttachError {
    /// No such token, wrong secret, or already used.
    #[error("unknown, expired or already used tunnel token")]
    UnknownToken,
    /// The token was issued to another node.
    #[error("tunnel token was issued to a different node")]
    WrongNode,
}

/// A tunnel waiting for its two ends.
#[derive(Debug)]
struct Pending<W> {
    token: TunnelToken,
    service: ServiceName,
    inlet: (Identifier, [u8; 32]),
    /// Where the inlet's hop channel comes from.
    source: Source,
    outlet: (Identifier, [u8; 32]),
    expires: Instant,
    arrived: Option<Side>,
    waiter: Option<W>,
}

/// What the relay knows about a tunnel once a data connection attached.
#[derive(Debug)]
pub struct Claim<W> {
    /// The service.
    pub service: ServiceName,
    /// The inlet's identity.
    pub inlet: Identifier,
    /// The outlet's identity.
    pub outlet: Identifier,
    /// Non-secret label of the token, for logs.
    pub label: String,
    /// `Some` when the other end is already waiting: hand it our stream.
    /// `None` when we are first: our waiter was stored.
    pub peer: Option<W>,
}

/// An open request that succeeded.
#[derive(Debug)]
pub struct Opened {
    /// The token for both ends.
    pub token: TunnelToken,
    /// The outlet's session, to notify with `Incoming`.
    pub outlet_session: SessionId,
    /// The outlet's identity.
    pub outlet: Identifier,
}

/// Services and pending tunnels. `W` is whatever the I/O layer uses to hand
/// a data connection to the task waiting for it.
///
/// Every count the relay's limits need is kept up to date here, so that no
/// decision scans the services or the pending tunnels.
#[derive(Debug)]
pub struct Registry<W> {
    relay: Identifier,
    token_ttl: Duration,
    services: HashMap<ServiceName, Registration>,
    /// The names each session holds.
    by_session: HashMap<SessionId, BTreeSet<ServiceName>>,
    pending: HashMap<[u8; 16], Pending<W>>,
    /// Pending tunnels per requesting inlet: tokens count against the node
    /// that asked for them, never against the outlet.
    pending_by_inlet: HashMap<Identifier, usize>,
    /// Pending tunnels per source of the requesting inlet.
    pending_by_source: HashMap<Source, usize>,
}

impl<W> Registry<W> {
    /// An empty registry for relay `relay`; tokens live for `token_ttl`.
    pub fn new(relay: Identifier, token_ttl: Duration) -> Self {
        Registry {
            relay,
            token_ttl,
            services: HashMap::new(),
            by_session: HashMap::new(),
            pending: HashMap::new(),
            pending_by_inlet: HashMap::new(),
            pending_by_source: HashMap::new(),
        }
    }

    /// Registers `service` for `reg.owner`. The same identity may take over
    /// its own name (a reconnecting outlet); the replaced session is returned.
    pub fn register(
        &mut self,
        service: ServiceName,
        reg: Registration,
    ) -> Result<Option<SessionId>, RegisterError> {
        if let Some(existing) = self.services.get(&service) {
            if existing.owner != reg.owner {
                return Err(RegisterError::HeldByOther {
                    service,
                    holder: existing.owner,
                });
            }
        }
        let session = reg.session;
        self.by_session
            .entry(session)
            .or_default()
            .insert(service.clone());
        let replaced = self
            .services
            .insert(service.clone(), reg)
            .map(|old| old.session);
        if let Some(old) = replaced.filter(|old| *old != session) {
            self.forget_name(old, &service);
        }
        Ok(replaced)
    }

    /// Drops `service` from `session`'s names (not from `services`).
    fn forget_name(&mut self, session: SessionId, service: &ServiceName) {
        if self
            .services
            .get(service)
            .is_some_and(|r| r.session == session)
        {
            return;
        }
        if let Some(names) = self.by_session.get_mut(&session) {
            names.remove(service);
            if names.is_empty() {
                self.by_session.remove(&session);
            }
        }
    }

    /// Who serves `service`, if anyone.
    pub fn lookup(&self, service: &ServiceName) -> Option<&Registration> {
        self.services.get(service)
    }

    /// The names `session` holds.
    pub fn names_of(&self, session: SessionId) -> impl Iterator<Item = &ServiceName> {
        self.by_session.get(&session).into_iter().flatten()
    }

    /// How many names `session` holds.
    pub fn count_of(&self, session: SessionId) -> usize {
        self.by_session.get(&session).map_or(0, BTreeSet::len)
    }

    /// Tunnels being set up (token issued, not yet spliced) that `inlet`
    /// asked for.
    pub fn pending_opened_by(&self, inlet: &Identifier) -> usize {
        self.pending_by_inlet.get(inlet).copied().unwrap_or(0)
    }

    /// Tunnels being set up that inlets from `source` asked for.
    pub(crate) fn pending_from(&self, source: Source) -> usize {
        self.pending_by_source.get(&source).copied().unwrap_or(0)
    }

    /// Withdraws `service` from `session` (a policy no longer allows it);
    /// `false` if that session did not hold it.
    pub fn unregister(&mut self, service: &ServiceName, session: SessionId) -> bool {
        if self
            .services
            .get(service)
            .is_none_or(|r| r.session != session)
        {
            return false;
        }
        self.services.remove(service);
        self.forget_name(session, service);
        true
    }

    /// Forgets everything a session registered; returns the names released.
    pub fn remove_session(&mut self, session: SessionId) -> Vec<ServiceName> {
        let names = self.by_session.remove(&session).unwrap_or_default();
        let mut released = Vec::with_capacity(names.len());
        for service in names {
            if self
                .services
                .get(&service)
                .is_some_and(|r| r.session == session)
            {
                self.services.remove(&service);
                released.push(service);
            }
        }
        released
    }

    /// Mints a single-use token for a tunnel from the inlet to `service`.
    pub fn open(
        &mut self,
        service: &ServiceName,
        inlet: (Identifier, [u8; 32]),
        source: Source,
        now: Instant,
    ) -> Result<Opened, OpenError> {
        let reg = self
            .services
            .get(service)
            .ok_or_else(|| OpenError::NotRegistered {
                service: service.clone(),
                relay: self.relay,
            })?;
        let token = TunnelToken::random();
        let opened = Opened {
            token: token.clone(),
            outlet_session: reg.session,
            outlet: reg.owner,
        };
        *self.pending_by_inlet.entry(inlet.0).or_insert(0) += 1;
        *self.pending_by_source.entry(source).or_insert(0) += 1;
        self.pending.insert(
            token.id,
            Pending {
                token,
                service: service.clone(),
                inlet,
                source,
                outlet: (reg.owner, reg.owner_static),
                expires: now + self.token_ttl,
                arrived: None,
                waiter: None,
            },
        );
        Ok(opened)
    }

    /// A data connection presents `token` as `side`, authenticated with
    /// `node_static`. The token's secret is compared in constant time and
    /// each side may attach once.
    pub fn claim(
        &mut self,
        token: &TunnelToken,
        side: Side,
        node_static: &[u8; 32],
        waiter: W,
        now: Instant,
    ) -> Result<Claim<W>, AttachError> {
        let pending = self
            .pending
            .get_mut(&token.id)
            .ok_or(AttachError::UnknownToken)?;
        if !pending.token.secret_matches(token)
            || pending.expires <= now
            || pending.arrived == Some(side)
        {
            return Err(AttachError::UnknownToken);
        }
        let expected = match side {
            Side::Inlet => &pending.inlet.1,
            Side::Outlet => &pending.outlet.1,
        };
        if expected != node_static {
            return Err(AttachError::WrongNode);
        }
        let mut claim = Claim {
            service: pending.service.clone(),
            inlet: pending.inlet.0,
            outlet: pending.outlet.0,
            label: pending.token.label(),
            peer: None,
        };
        if pending.arrived.is_some() {
            claim.peer = pending.waiter.take();
            self.remove_pending(&token.id);
        } else {
            pending.arrived = Some(side);
            pending.waiter = Some(waiter);
        }
        Ok(claim)
    }

    fn remove_pending(&mut self, id: &[u8; 16]) {
        if let Some(p) = self.pending.remove(id) {
            decrement(&mut self.pending_by_inlet, p.inlet.0);
            decrement(&mut self.pending_by_source, p.source);
        }
    }

    /// Drops tokens whose time is up (their waiters with them).
    pub fn expire(&mut self, now: Instant) -> usize {
        let expired: Vec<[u8; 16]> = self
            .pending
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.remove_pending(id);
        }
        expired.len()
    }

    /// Number of tunnels waiting for an end.
    #[cfg(test)]
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_identity::Identity;

    fn id() -> Identifier {
        Identity::generate().identifier()
    }

    fn src() -> Source {
        Source::of([127, 0, 0, 1].into())
    }

    fn setup() -> (Registry<u32>, ServiceName, Identifier, Instant) {
        let mut r = Registry::new(id(), Duration::from_secs(10));
        let svc: ServiceName = "db".parse().unwrap();
        let outlet = id();
        r.register(
            svc.clone(),
            Registration {
                owner: outlet,
                session: SessionId(1),
                owner_static: [1; 32],
            },
        )
        .unwrap();
        (r, svc, outlet, Instant::now())
    }

    #[test]
    fn name_held_by_another_identity_is_refused() {
        let (mut r, svc, outlet, _) = setup();
        let err = r
            .register(
                svc.clone(),
                Registration {
                    owner: id(),
                    session: SessionId(2),
                    owner_static: [2; 32],
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains(&outlet.to_string()));
        // The owner may take it over from a new session.
        let replaced = r
            .register(
                svc.clone(),
                Registration {
                    owner: outlet,
                    session: SessionId(3),
                    owner_static: [3; 32],
                },
            )
            .unwrap();
        assert_eq!(replaced, Some(SessionId(1)));
        assert!(r.remove_session(SessionId(1)).is_empty());
        assert_eq!(r.remove_session(SessionId(3)), vec![svc.clone()]);
        assert!(r.lookup(&svc).is_none());
    }

    #[test]
    fn unknown_service_says_so() {
        let (mut r, _, _, now) = setup();
        let err = r
            .open(&"nope".parse().unwrap(), (id(), [9; 32]), src(), now)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("\"nope\" is not registered at relay P"),
            "{err}"
        );
    }

    #[test]
    fn pairing_both_orders_and_single_use() {
        for first in [Side::Inlet, Side::Outlet] {
            let (mut r, svc, outlet, now) = setup();
            let inlet = id();
            let opened = r.open(&svc, (inlet, [9; 32]), src(), now).unwrap();
            assert_eq!(opened.outlet, outlet);
            let key = |s| {
                if s == Side::Inlet {
                    [9u8; 32]
                } else {
                    [1u8; 32]
                }
            };
            let second = if first == Side::Inlet {
                Side::Outlet
            } else {
                Side::Inlet
            };
            let c1 = r.claim(&opened.token, first, &key(first), 11, now).unwrap();
            assert!(c1.peer.is_none());
            // The same side cannot attach twice.
            assert_eq!(
                r.claim(&opened.token, first, &key(first), 12, now)
                    .unwrap_err(),
                AttachError::UnknownToken
            );
            let c2 = r
                .claim(&opened.token, second, &key(second), 13, now)
                .unwrap();
            assert_eq!(c2.peer, Some(11));
            assert_eq!((c2.inlet, c2.outlet), (inlet, outlet));
            // Used up.
            assert_eq!(
                r.claim(&opened.token, second, &key(second), 14, now)
                    .unwrap_err(),
                AttachError::UnknownToken
            );
            assert_eq!(r.pending_len(), 0);
        }
    }

    #[test]
    fn wrong_secret_wrong_node_and_expiry() {
        let (mut r, svc, _, now) = setup();
        let opened = r.open(&svc, (id(), [9; 32]), src(), now).unwrap();
        let mut forged = opened.token.clone();
        forged.secret[0] ^= 1;
        assert_eq!(
            r.claim(&forged, Side::Inlet, &[9; 32], 1, now).unwrap_err(),
            AttachError::UnknownToken
        );
        assert_eq!(
            r.claim(&opened.token, Side::Inlet, &[8; 32], 1, now)
                .unwrap_err(),
            AttachError::WrongNode
        );
        assert_eq!(
            r.claim(&opened.token, Side::Outlet, &[9; 32], 1, now)
                .unwrap_err(),
            AttachError::WrongNode
        );
        let later = now + Duration::from_secs(11);
        assert_eq!(
            r.claim(&opened.token, Side::Inlet, &[9; 32], 1, later)
                .unwrap_err(),
            AttachError::UnknownToken
        );
        assert_eq!(r.expire(later), 1);
        assert_eq!(r.pending_len(), 0);
    }

    #[test]
    fn pending_tokens_count_against_the_requester_and_expire() {
        let (mut r, svc, outlet, now) = setup();
        let (inlet, other_src) = (id(), Source::of([10, 0, 0, 9].into()));
        for _ in 0..3 {
            r.open(&svc, (inlet, [9; 32]), src(), now).unwrap();
        }
        r.open(&svc, (id(), [8; 32]), other_src, now).unwrap();
        assert_eq!(r.pending_opened_by(&inlet), 3);
        assert_eq!(r.pending_opened_by(&outlet), 0, "never against the outlet");
        assert_eq!(r.pending_from(src()), 3);
        assert_eq!(r.pending_from(other_src), 1);
        // Splicing a tunnel stops counting it.
        let opened = r.open(&svc, (inlet, [9; 32]), src(), now).unwrap();
        assert_eq!(r.pending_opened_by(&inlet), 4);
        r.claim(&opened.token, Side::Inlet, &[9; 32], 1, now)
            .unwrap();
        r.claim(&opened.token, Side::Outlet, &[1; 32], 2, now)
            .unwrap();
        assert_eq!(r.pending_opened_by(&inlet), 3);
        // Expiry forgets them all.
        assert_eq!(r.expire(now + Duration::from_secs(11)), 4);
        assert_eq!(r.pending_opened_by(&inlet), 0);
        assert_eq!(r.pending_from(src()), 0);
        assert_eq!(r.pending_from(other_src), 0);
    }

    #[test]
    fn names_per_session_and_withdrawal() {
        let (mut r, svc, outlet, _) = setup();
        let other: ServiceName = "db2".parse().unwrap();
        r.register(
            other.clone(),
            Registration {
                owner: outlet,
                session: SessionId(1),
                owner_static: [1; 32],
            },
        )
        .unwrap();
        assert_eq!(r.count_of(SessionId(1)), 2);
        // Another session of the same identity takes one name over.
        r.register(
            other.clone(),
            Registration {
                owner: outlet,
                session: SessionId(2),
                owner_static: [2; 32],
            },
        )
        .unwrap();
        assert_eq!(r.count_of(SessionId(1)), 1);
        assert_eq!(r.count_of(SessionId(2)), 1);
        // A withdrawal by the wrong session does nothing.
        assert!(!r.unregister(&other, SessionId(1)));
        assert!(r.unregister(&other, SessionId(2)));
        assert!(r.lookup(&other).is_none());
        assert_eq!(r.count_of(SessionId(2)), 0);
        assert_eq!(
            r.names_of(SessionId(1)).cloned().collect::<Vec<_>>(),
            vec![svc.clone()]
        );
        assert_eq!(r.remove_session(SessionId(1)), vec![svc]);
        assert_eq!(r.count_of(SessionId(1)), 0);
    }
}
