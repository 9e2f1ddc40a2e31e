//! How much work the authority service takes on, in all and per identity.
//!
//! Identities are free to make, so per-identity caps stop one careless or
//! hostile node from crowding out the others, and the overall cap bounds
//! what many identities can take together. A refusal says which limit was
//! reached, with [`RefusalCode::Limit`], so a node backs off and retries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use postern_identity::wire::{Refusal, RefusalCode};
use postern_identity::Identifier;

use super::feed::FEED_HEARTBEAT;

/// Limits of the authority service ([`super::AuthorityService::with_limits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLimits {
    /// Channels served at once, all identities together (default 1,024).
    /// Each holds a task and about 200 KiB of buffers; open revocation
    /// feeds count, for as long as they stay open.
    pub max_channels: usize,
    /// Channels accepted beyond `max_channels` only to be refused with a
    /// reason, at once (default 16). Beyond those, a tunnel request is
    /// dropped unanswered (the requester's attach times out).
    pub max_refusing: usize,
    /// Channels one identity may have open at once (default 8).
    pub max_channels_per_identity: usize,
    /// Revocation feeds one identity may follow at once (default 4: a node
    /// needs one per authority it trusts, and this authority is one).
    pub max_feeds_per_identity: usize,
    /// OpenID Connect logins one identity may have waiting for a person
    /// (default 2). A browser login holds its place until its challenge
    /// expires or its channel closes; a device login until its code
    /// expires or its channel closes.
    pub max_pending_logins_per_identity: usize,
    /// How often an open revocation feed says "nothing new" when nothing
    /// happened (default [`FEED_HEARTBEAT`], 5 s: what followers expect).
    pub feed_heartbeat: Duration,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        ServiceLimits {
            max_channels: 1024,
            max_refusing: 16,
            max_channels_per_identity: 8,
            max_feeds_per_identity: 4,
            max_pending_logins_per_identity: 2,
            feed_heartbeat: FEED_HEARTBEAT,
        }
    }
}

/// What an identity holds a place for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// An open channel.
    Channel,
    /// An open revocation feed.
    Feed,
    /// An OpenID Connect login waiting for a person.
    Login,
}

#[derive(Debug, Default, Clone, Copy)]
struct Held {
    channels: usize,
    feeds: usize,
    logins: usize,
}

impl Held {
    fn count(&mut self, slot: Slot) -> &mut usize {
        match slot {
            Slot::Channel => &mut self.channels,
            Slot::Feed => &mut self.feeds,
            Slot::Login => &mut self.logins,
        }
    }

    fn is_empty(&self) -> bool {
        self.channels == 0 && self.feeds == 0 && self.logins == 0
    }
}

/// The places each identity holds, against [`ServiceLimits`]. No I/O: the
/// service asks for a place and holds the [`Place`] for as long as it uses
/// it.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: ServiceLimits,
    held: Mutex<HashMap<Identifier, Held>>,
}

/// A place an identity holds; given back when dropped.
#[derive(Debug)]
pub(crate) struct Place {
    admission: Arc<Admission>,
    who: Identifier,
    slot: Slot,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut held = self.admission.lock();
        if let Some(h) = held.get_mut(&self.who) {
            let n = h.count(self.slot);
            *n = n.saturating_sub(1);
            if h.is_empty() {
                held.remove(&self.who);
            }
        }
    }
}

impl Admission {
    pub(crate) fn new(limits: ServiceLimits) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            held: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn limits(&self) -> &ServiceLimits {
        &self.limits
    }

    /// The map stays consistent even if a holder panicked: every critical
    /// section is a single counter update.
    fn lock(&self) -> MutexGuard<'_, HashMap<Identifier, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place of kind `slot` for `who`, or a refusal saying which limit
    /// it reached.
    pub(crate) fn admit(self: &Arc<Self>, who: Identifier, slot: Slot) -> Result<Place, Refusal> {
        let (max, what, hint) = match slot {
            Slot::Channel => (
                self.limits.max_channels_per_identity,
                "channels open at once",
                "close some, or wait for them to finish",
            ),
            Slot::Feed => (
                self.limits.max_feeds_per_identity,
                "revocation feeds open at once",
                "a node needs one per authority it trusts; close the others",
            ),
            Slot::Login => (
                self.limits.max_pending_logins_per_identity,
                "OpenID Connect logins waiting for a person",
                "finish or abandon one (closing its `postern enroll` ends it) and try again",
            ),
        };
        let mut held = self.lock();
        let h = held.entry(who).or_default();
        let n = h.count(slot);
        if *n >= max {
            if h.is_empty() {
                held.remove(&who);
            }
            return Err(Refusal::new(
                RefusalCode::Limit,
                format!("{who} already has {max} {what} at this authority, its limit: {hint}"),
            ));
        }
        *n += 1;
        Ok(Place {
            admission: Arc::clone(self),
            who,
            slot,
        })
    }

    /// How many places of kind `slot` `who` holds now.
    #[cfg(test)]
    pub(crate) fn held(&self, who: &Identifier, slot: Slot) -> usize {
        self.lock().get(who).map_or(0, |h| match slot {
            Slot::Channel => h.channels,
            Slot::Feed => h.feeds,
            Slot::Login => h.logins,
        })
    }

    /// Identities holding any place (to check nothing leaks).
    #[cfg(test)]
    pub(crate) fn identities(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_identity::Identity;

    #[test]
    fn caps_are_per_identity_and_places_come_back() {
        let admission = Admission::new(ServiceLimits::default());
        let (mallory, alice) = (
            Identity::generate().identifier(),
            Identity::generate().identifier(),
        );
        let feeds: Vec<Place> = (0..4)
            .map(|_| admission.admit(mallory, Slot::Feed).unwrap())
            .collect();
        let refused = admission.admit(mallory, Slot::Feed).unwrap_err();
        assert_eq!(refused.code, RefusalCode::Limit);
        assert!(
            refused.reason.contains("4 revocation feeds")
                && refused.reason.contains(&mallory.to_string()),
            "{}",
            refused.reason
        );
        // Another identity, and another kind of place, are unaffected.
        let alice_feed = admission.admit(alice, Slot::Feed).unwrap();
        let _login = admission.admit(mallory, Slot::Login).unwrap();
        assert_eq!(admission.held(&mallory, Slot::Feed), 4);

        // A closed feed frees its place.
        drop(feeds);
        assert_eq!(admission.held(&mallory, Slot::Feed), 0);
        let _again = admission.admit(mallory, Slot::Feed).unwrap();

        let logins = admission.admit(mallory, Slot::Login).unwrap();
        assert_eq!(
            admission.admit(mallory, Slot::Login).unwrap_err().code,
            RefusalCode::Limit
        );
        drop(logins);
        assert!(admission.admit(mallory, Slot::Login).is_ok());
        drop(alice_feed);
        assert_eq!(admission.held(&alice, Slot::Feed), 0);
    }

    #[test]
    fn nothing_is_kept_for_identities_that_hold_nothing() {
        let admission = Admission::new(ServiceLimits {
            max_channels_per_identity: 0,
            ..ServiceLimits::default()
        });
        for _ in 0..100 {
            let who = Identity::generate().identifier();
            assert!(admission.admit(who, Slot::Channel).is_err());
            drop(admission.admit(who, Slot::Feed).unwrap());
        }
        assert_eq!(admission.identities(), 0);
    }
}
