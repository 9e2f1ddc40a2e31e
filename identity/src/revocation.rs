//! What a node knows of its authorities' revocations, per authority, and how
//! current that knowledge is.
//!
//! Each trusted authority publishes an ordered log of revocations (sequence
//! numbers 1, 2, 3, …). A node follows every authority it trusts with its own
//! cursor, so that entries of one authority are never skipped because another
//! authority's log is longer. Every message of a feed (new entries, or an
//! empty "nothing new" heartbeat) marks that authority's view as current at
//! the moment it arrives.
//!
//! **Failing closed.** A node that has not heard from an authority's feed
//! for longer than its bound on staleness (or has never heard from it) must
//! not admit what depends on that authority: [`RevocationFeeds::require_current`]
//! names the authority that is too stale, so the refusal can say why. Feeds
//! arrive inside channels authenticated end to end with the authority (or on
//! the authority's own hop channel, at a relay), in order: whoever sits in
//! between can delay or stop a feed, which only makes it stale, but cannot
//! forge, reorder or selectively drop entries.
//!
//! Plain data with the clock passed in; the I/O that follows the feeds lives
//! in the node and relay crates.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use crate::credential::{
    CredentialId, Revocation, RevocationCheck, RevocationEntry, RevocationList, TrustedAuthorities,
};
use crate::Identifier;

/// Default bound on how stale an authority's revocations may be before new
/// tunnels that depend on it are refused.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(120);

/// How often an authority's feed says "nothing new" when nothing happened,
/// so followers can tell a quiet feed from a dead one.
pub const FEED_HEARTBEAT: Duration = Duration::from_secs(5);

/// One authority's revocations, as far as this node has heard.
#[derive(Debug, Clone, Default)]
struct Feed {
    list: RevocationList,
    /// When the feed last said it was current.
    heard: Option<Instant>,
}

/// Per-authority revocation lists with their cursors and freshness.
#[derive(Debug, Clone)]
pub struct RevocationFeeds {
    feeds: BTreeMap<Identifier, Feed>,
    /// When following began: an authority never heard from is "stale since
    /// then".
    since: Instant,
}

/// Why new tunnels that depend on an authority are refused now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StaleRevocations {
    /// Nothing has been received from this authority's feed yet.
    #[error("the revocations of authority {authority} have not been received yet (waiting {waited:?} for its feed): is the authority running and registered at the relay?")]
    NeverReceived {
        /// The authority.
        authority: Identifier,
        /// How long the node has been waiting.
        waited: Duration,
    },
    /// The feed went quiet for longer than the bound.
    #[error("the revocations of authority {authority} are {age:?} old, beyond the {bound:?} this node accepts (its feed is down): new tunnels are refused until it is back")]
    Stale {
        /// The authority.
        authority: Identifier,
        /// Time since its feed was last heard.
        age: Duration,
        /// The bound.
        bound: Duration,
    },
}

impl StaleRevocations {
    /// The authority concerned.
    pub fn authority(&self) -> Identifier {
        match self {
            StaleRevocations::NeverReceived { authority, .. }
            | StaleRevocations::Stale { authority, .. } => *authority,
        }
    }
}

/// How current one authority's revocations are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Never heard from.
    Never,
    /// Last heard this long ago.
    Age(Duration),
}

impl fmt::Display for Freshness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Freshness::Never => f.write_str("never heard"),
            Freshness::Age(age) => write!(f, "heard {age:.1?} ago"),
        }
    }
}

impl RevocationFeeds {
    /// Follows `authorities`, none heard from yet, starting `now`.
    pub fn new(authorities: &TrustedAuthorities, now: Instant) -> Self {
        RevocationFeeds {
            feeds: authorities.iter().map(|a| (*a, Feed::default())).collect(),
            since: now,
        }
    }

    /// Whether no authority is followed.
    pub fn is_empty(&self) -> bool {
        self.feeds.is_empty()
    }

    /// The authorities followed.
    pub fn authorities(&self) -> impl Iterator<Item = &Identifier> {
        self.feeds.keys()
    }

    /// The newest sequence number held from `authority` (0 if none): ask
    /// its feed for what follows.
    pub fn cursor(&self, authority: &Identifier) -> u64 {
        self.feeds.get(authority).map_or(0, |f| f.list.latest_seq())
    }

    /// A message of `authority`'s feed arrived at `now`: its entries (maybe
    /// none) are applied and its view is current. Returns how many entries
    /// were new; entries of an authority not followed are ignored (0).
    pub fn apply(
        &mut self,
        authority: &Identifier,
        entries: impl IntoIterator<Item = RevocationEntry>,
        now: Instant,
    ) -> usize {
        let Some(feed) = self.feeds.get_mut(authority) else {
            return 0;
        };
        let before = feed.list.len();
        feed.list.apply(entries);
        feed.heard = Some(feed.heard.map_or(now, |h| h.max(now)));
        feed.list.len() - before
    }

    /// How current each authority's view is at `now`.
    pub fn freshness(&self, now: Instant) -> Vec<(Identifier, Freshness)> {
        self.feeds
            .iter()
            .map(|(a, f)| {
                let fresh = f.heard.map_or(Freshness::Never, |h| {
                    Freshness::Age(now.saturating_duration_since(h))
                });
                (*a, fresh)
            })
            .collect()
    }

    /// `Err` naming the first authority whose revocations are older than
    /// `bound` at `now` (or were never received): what depends on it must
    /// be refused.
    pub fn require_current(&self, now: Instant, bound: Duration) -> Result<(), StaleRevocations> {
        for (authority, feed) in &self.feeds {
            match feed.heard {
                None => {
                    return Err(StaleRevocations::NeverReceived {
                        authority: *authority,
                        waited: now.saturating_duration_since(self.since),
                    })
                }
                Some(heard) => {
                    let age = now.saturating_duration_since(heard);
                    if age > bound {
                        return Err(StaleRevocations::Stale {
                            authority: *authority,
                            age,
                            bound,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// A revocation from any followed authority applies.
impl RevocationCheck for RevocationFeeds {
    fn revocation(&self, id: &CredentialId, subject: &Identifier) -> Option<Revocation> {
        self.feeds
            .values()
            .find_map(|f| f.list.revocation(id, subject))
    }

    fn identity_revocation(&self, subject: &Identifier) -> Option<Revocation> {
        self.feeds
            .values()
            .find_map(|f| f.list.identity_revocation(subject))
    }
}

/// How long a follower waits for an authority's first feed message before
/// it says so.
pub const FIRST_FEED_PATIENCE: Duration = Duration::from_secs(10);

/// How loudly a feed's staleness has been reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Current,
    Waiting,
    Aging,
    Refusing,
}

/// What [`StalenessAlarm::update`] says about one authority's feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alarm {
    /// No feed message yet after a while.
    StillWaiting(Identifier, Duration),
    /// Half the bound passed without a message.
    Aging(Identifier, Duration),
    /// Beyond the bound: new tunnels are refused.
    Refusing(Identifier, Freshness),
    /// The feed is current again after an alarm.
    Recovered(Identifier),
}

/// Decides, from each feed's freshness, when to warn that revocations are
/// going stale and when to say new tunnels are refused: once per change,
/// not once per second.
#[derive(Debug, Default)]
pub struct StalenessAlarm {
    levels: HashMap<Identifier, Level>,
}

impl StalenessAlarm {
    /// What to say, given each feed's `freshness`, the `bound`, and how long
    /// the follower has been `waited` for first messages.
    pub fn update(
        &mut self,
        freshness: &[(Identifier, Freshness)],
        bound: Duration,
        waited: Duration,
    ) -> Vec<Alarm> {
        let mut alarms = Vec::new();
        for (authority, fresh) in freshness {
            let level = match fresh {
                Freshness::Never if waited > bound => Level::Refusing,
                Freshness::Never if waited > FIRST_FEED_PATIENCE => Level::Waiting,
                Freshness::Never => Level::Current,
                Freshness::Age(age) if *age > bound => Level::Refusing,
                Freshness::Age(age) if *age > bound / 2 => Level::Aging,
                Freshness::Age(_) => Level::Current,
            };
            let before = self
                .levels
                .insert(*authority, level)
                .unwrap_or(Level::Current);
            if level == before {
                continue;
            }
            alarms.push(match (level, fresh) {
                (Level::Current, _) => Alarm::Recovered(*authority),
                (Level::Waiting, _) => Alarm::StillWaiting(*authority, waited),
                (Level::Aging, Freshness::Age(age)) => Alarm::Aging(*authority, *age),
                (Level::Aging, Freshness::Never) => Alarm::StillWaiting(*authority, waited),
                (Level::Refusing, fresh) => Alarm::Refusing(*authority, *fresh),
            });
        }
        alarms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::RevocationTarget;
    use crate::Identity;

    fn entry(seq: u64, target: RevocationTarget) -> RevocationEntry {
        RevocationEntry {
            seq,
            revocation: Revocation {
                target,
                revoked_at: 1_700_000_000 + seq,
            },
        }
    }

    #[test]
    fn each_authority_has_its_own_cursor() {
        let (a, b) = (
            Identity::generate().identifier(),
            Identity::generate().identifier(),
        );
        let t0 = Instant::now();
        let mut feeds = RevocationFeeds::new(&[a, b].into_iter().collect(), t0);
        let (x, y) = (
            Identity::generate().identifier(),
            Identity::generate().identifier(),
        );
        // A's log is long; B's entry #1 must still be applied.
        let long: Vec<_> = (1..=50)
            .map(|n| entry(n, RevocationTarget::Credential(CredentialId::random())))
            .collect();
        assert_eq!(feeds.apply(&a, long, t0), 50);
        assert_eq!(feeds.cursor(&a), 50);
        assert_eq!(feeds.cursor(&b), 0, "B's cursor does not follow A's");
        assert_eq!(
            feeds.apply(&b, [entry(1, RevocationTarget::Identity(x))], t0),
            1
        );
        assert!(feeds.identity_revocation(&x).is_some());
        assert!(feeds.revocation(&CredentialId::random(), &x).is_some());
        assert!(feeds.identity_revocation(&y).is_none());
        // An authority not followed is ignored.
        let stranger = Identity::generate().identifier();
        assert_eq!(
            feeds.apply(&stranger, [entry(1, RevocationTarget::Identity(y))], t0),
            0
        );
        assert!(feeds.identity_revocation(&y).is_none());
    }

    #[test]
    fn staleness_fails_closed() {
        let (a, b) = (
            Identity::generate().identifier(),
            Identity::generate().identifier(),
        );
        let t0 = Instant::now();
        let bound = Duration::from_secs(60);
        let mut feeds = RevocationFeeds::new(&[a, b].into_iter().collect(), t0);
        // Nothing heard yet: refused, naming an authority.
        let err = feeds.require_current(t0, bound).unwrap_err();
        assert!(matches!(err, StaleRevocations::NeverReceived { .. }));
        feeds.apply(&a, [], t0);
        let err = feeds.require_current(t0, bound).unwrap_err();
        assert_eq!(err.authority(), b, "{err}");
        feeds.apply(&b, [], t0 + Duration::from_secs(10));
        assert!(feeds
            .require_current(t0 + Duration::from_secs(60), bound)
            .is_ok());
        // A goes quiet past the bound; B keeps talking.
        feeds.apply(&b, [], t0 + Duration::from_secs(61));
        let err = feeds
            .require_current(t0 + Duration::from_secs(61), bound)
            .unwrap_err();
        assert_eq!(err.authority(), a);
        assert!(err.to_string().contains(&a.to_string()), "{err}");
        // A heartbeat makes it current again.
        feeds.apply(&a, [], t0 + Duration::from_secs(62));
        assert!(feeds
            .require_current(t0 + Duration::from_secs(62), bound)
            .is_ok());
        let fresh = feeds.freshness(t0 + Duration::from_secs(62));
        assert!(fresh.iter().all(|(_, f)| matches!(f, Freshness::Age(_))));
    }

    #[test]
    fn following_nobody_is_always_current() {
        let feeds = RevocationFeeds::new(&TrustedAuthorities::new(), Instant::now());
        assert!(feeds.is_empty());
        assert!(feeds
            .require_current(
                Instant::now() + Duration::from_secs(1_000_000),
                Duration::ZERO
            )
            .is_ok());
    }

    #[test]
    fn the_alarm_speaks_once_per_change() {
        let a = Identity::generate().identifier();
        let bound = Duration::from_secs(60);
        let mut alarm = StalenessAlarm::default();
        let at = |age: u64| vec![(a, Freshness::Age(Duration::from_secs(age)))];
        assert!(alarm.update(&at(1), bound, Duration::ZERO).is_empty());
        assert!(alarm.update(&at(29), bound, Duration::ZERO).is_empty());
        assert_eq!(
            alarm.update(&at(31), bound, Duration::ZERO),
            vec![Alarm::Aging(a, Duration::from_secs(31))]
        );
        assert!(alarm.update(&at(45), bound, Duration::ZERO).is_empty());
        assert!(matches!(
            alarm.update(&at(61), bound, Duration::ZERO)[..],
            [Alarm::Refusing(x, _)] if x == a
        ));
        assert!(alarm.update(&at(600), bound, Duration::ZERO).is_empty());
        assert_eq!(
            alarm.update(&at(0), bound, Duration::ZERO),
            vec![Alarm::Recovered(a)]
        );
        // Never heard from: patience, then a warning, then refusal.
        let never = vec![(a, Freshness::Never)];
        let mut alarm = StalenessAlarm::default();
        assert!(alarm
            .update(&never, bound, Duration::from_secs(5))
            .is_empty());
        assert_eq!(
            alarm.update(&never, bound, Duration::from_secs(11)),
            vec![Alarm::StillWaiting(a, Duration::from_secs(11))]
        );
        assert!(matches!(
            alarm.update(&never, bound, Duration::from_secs(61))[..],
            [Alarm::Refusing(..)]
        ));
    }
}
