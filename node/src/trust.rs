//! What a node trusts and what it presents: the authorities whose
//! credentials it accepts (and where to reach them), its own credential, and
//! the revocations it has heard of, per authority, with how current they
//! are.
//!
//! A node that trusts no authority decides by identifiers alone and does not
//! consult credentials. A node that trusts at least one verifies every
//! credential presented to it strictly: a forged, foreign, expired, revoked
//! or misattributed credential ends that handshake with the reason, never a
//! log line and a shrug. It also follows each trusted authority's revocation
//! feed (the node does this by itself, over its own hop channel) and refuses
//! new tunnels while any of them is staler than its bound
//! ([`Trust::require_current`]).

use std::sync::RwLock;
use std::time::Duration;

use postern_identity::credential::{
    self, CredentialError, RevocationEntry, SignedCredential, TrustedAuthorities,
    VerifiedCredential,
};
use postern_identity::revocation::{
    Freshness, RevocationFeeds, StaleRevocations, DEFAULT_MAX_STALENESS,
};
use postern_identity::wire::ServiceName;
use postern_identity::Identifier;
use tokio::sync::watch;

pub use postern_identity::time::unix_now;

/// An authority a node trusts, and the service name it is reached under at
/// the relay (by default `authority-P…`, derived from its identifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustAnchor {
    /// The authority's identifier.
    pub authority: Identifier,
    /// Its service name at the relay.
    pub service: ServiceName,
}

impl TrustAnchor {
    /// Trusts `authority`, reached under its default name.
    pub fn new(authority: Identifier) -> Self {
        TrustAnchor {
            authority,
            service: ServiceName::of_authority(&authority),
        }
    }

    /// Trusts `authority`, reached under `service`.
    pub fn with_service(authority: Identifier, service: ServiceName) -> Self {
        TrustAnchor { authority, service }
    }
}

impl std::str::FromStr for TrustAnchor {
    type Err = String;

    /// `P…` (the default name) or `P…@SERVICE`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, service) = match s.split_once('@') {
            Some((id, service)) => (id, Some(service)),
            None => (s, None),
        };
        let authority: Identifier = id.parse().map_err(|e| format!("{e}"))?;
        match service {
            None => Ok(TrustAnchor::new(authority)),
            Some(service) => Ok(TrustAnchor::with_service(
                authority,
                service.parse().map_err(|e| format!("{e}"))?,
            )),
        }
    }
}

impl std::fmt::Display for TrustAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.service == ServiceName::of_authority(&self.authority) {
            write!(f, "{}", self.authority)
        } else {
            write!(f, "{}@{}", self.authority, self.service)
        }
    }
}

/// A node's trust anchors, own credential and known revocations. Shared by
/// all of a node's tasks; the credential can be replaced while it runs.
#[derive(Debug)]
pub struct Trust {
    anchors: Vec<TrustAnchor>,
    authorities: TrustedAuthorities,
    feeds: RwLock<RevocationFeeds>,
    /// Bumped whenever a feed message arrives (readiness waits on it).
    heard: watch::Sender<u64>,
    max_staleness: Duration,
    credential: watch::Sender<Option<SignedCredential>>,
}

impl Default for Trust {
    fn default() -> Self {
        Trust::with_anchors([])
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl Trust {
    /// Trusts credentials issued by `authorities`, each reached under its
    /// default service name; presents none of its own yet.
    pub fn new(authorities: TrustedAuthorities) -> Self {
        Trust::with_anchors(authorities.iter().copied().map(TrustAnchor::new))
    }

    /// Trusts the authorities of `anchors`, each reached under the anchor's
    /// service name.
    pub fn with_anchors(anchors: impl IntoIterator<Item = TrustAnchor>) -> Self {
        let mut list: Vec<TrustAnchor> = Vec::new();
        for anchor in anchors {
            if !list.iter().any(|a| a.authority == anchor.authority) {
                list.push(anchor);
            }
        }
        let authorities: TrustedAuthorities = list.iter().map(|a| a.authority).collect();
        Trust {
            feeds: RwLock::new(RevocationFeeds::new(&authorities, now())),
            anchors: list,
            authorities,
            heard: watch::channel(0).0,
            max_staleness: DEFAULT_MAX_STALENESS,
            credential: watch::channel(None).0,
        }
    }

    /// Presents `credential` in every handshake.
    pub fn with_credential(self, credential: SignedCredential) -> Self {
        self.credential.send_replace(Some(credential));
        self
    }

    /// Refuses new tunnels once an authority's revocations are older than
    /// `bound` (default [`DEFAULT_MAX_STALENESS`]).
    pub fn with_max_staleness(mut self, bound: Duration) -> Self {
        self.max_staleness = bound;
        self
    }

    /// The authorities this node trusts.
    pub fn authorities(&self) -> &TrustedAuthorities {
        &self.authorities
    }

    /// Where each trusted authority is reached.
    pub fn anchors(&self) -> &[TrustAnchor] {
        &self.anchors
    }

    /// The bound on how stale an authority's revocations may be.
    pub fn max_staleness(&self) -> Duration {
        self.max_staleness
    }

    /// The credential presented in handshakes, if any.
    pub fn credential(&self) -> Option<SignedCredential> {
        self.credential.borrow().clone()
    }

    /// The credential to present in a new handshake: the current one while
    /// it is still valid (an expired credential would only get the
    /// handshake refused; the node presents none and renews).
    pub fn credential_to_present(&self) -> Option<SignedCredential> {
        let credential = self.credential()?;
        let body = credential.inspect_unverified().ok()?;
        (body.expires_at > unix_now()).then_some(credential)
    }

    /// Replaces the credential (after a renewal); live channels learn of it
    /// through [`Trust::watch_credential`].
    pub fn set_credential(&self, credential: SignedCredential) {
        self.credential.send_replace(Some(credential));
    }

    /// Notified whenever the credential is replaced.
    pub fn watch_credential(&self) -> watch::Receiver<Option<SignedCredential>> {
        self.credential.subscribe()
    }

    fn feeds(&self) -> std::sync::RwLockReadGuard<'_, RevocationFeeds> {
        self.feeds.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A message of `authority`'s revocation feed arrived: applies its
    /// entries (maybe none) and marks that authority's view current.
    /// Returns how many entries were new.
    pub fn apply_feed(
        &self,
        authority: &Identifier,
        entries: impl IntoIterator<Item = RevocationEntry>,
    ) -> usize {
        let applied =
            self.feeds
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .apply(authority, entries, now());
        self.heard.send_modify(|n| *n = n.wrapping_add(1));
        applied
    }

    /// The newest revocation sequence number held from `authority`.
    pub fn feed_cursor(&self, authority: &Identifier) -> u64 {
        self.feeds().cursor(authority)
    }

    /// `Err` naming an authority whose revocations are staler than the
    /// bound (or were never received): new tunnels must be refused.
    pub fn require_current(&self) -> Result<(), StaleRevocations> {
        self.feeds().require_current(now(), self.max_staleness)
    }

    /// Like [`Trust::require_current`], but when an authority's feed has
    /// not sent anything yet (the node just started or reconnected), waits
    /// up to `patience` for it before giving up.
    pub async fn wait_current(&self, patience: Duration) -> Result<(), StaleRevocations> {
        let mut heard = self.watch_feeds();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match self.require_current() {
                Err(StaleRevocations::NeverReceived { .. }) => {}
                done => return done,
            }
            match tokio::time::timeout_at(deadline, heard.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.require_current(),
            }
        }
    }

    /// How current each authority's revocations are.
    pub fn freshness(&self) -> Vec<(Identifier, Freshness)> {
        self.feeds().freshness(now())
    }

    /// Notified whenever a feed message arrives.
    pub fn watch_feeds(&self) -> watch::Receiver<u64> {
        self.heard.subscribe()
    }

    /// Whether `identity` itself has been revoked (whatever it presents).
    pub fn identity_revoked(&self, identity: &Identifier) -> bool {
        use credential::RevocationCheck;
        self.feeds().identity_revocation(identity).is_some()
    }

    /// Verifies what `peer` presented. `Ok(None)`: nothing to verify (no
    /// credential, or this node trusts no authority). `Err`: the handshake
    /// must end, with this reason.
    pub fn verify(
        &self,
        peer: Identifier,
        presented: Option<&SignedCredential>,
        now: u64,
    ) -> Result<Option<VerifiedCredential>, CredentialError> {
        if self.authorities.is_empty() {
            return Ok(None);
        }
        let Some(presented) = presented else {
            return Ok(None);
        };
        credential::verify(presented, &self.authorities, peer, now, &*self.feeds()).map(Some)
    }

    /// Re-checks a credential accepted earlier (expiry and revocations), for
    /// live tunnels.
    pub fn still_valid(
        &self,
        credential: &VerifiedCredential,
        now: u64,
    ) -> Result<(), CredentialError> {
        credential.check_still_valid(now, &*self.feeds())
    }
}

/// The revocations a node has heard of, for code that checks credentials
/// itself.
impl credential::RevocationCheck for Trust {
    fn revocation(
        &self,
        id: &credential::CredentialId,
        subject: &Identifier,
    ) -> Option<credential::Revocation> {
        self.feeds().revocation(id, subject)
    }

    fn identity_revocation(&self, subject: &Identifier) -> Option<credential::Revocation> {
        self.feeds().identity_revocation(subject)
    }
}

/// An attribute an outlet requires, from `--allow-attr NAME=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeRule {
    /// Attribute name.
    pub name: String,
    /// Required value (for list attributes: one of the elements).
    pub value: String,
}

impl std::str::FromStr for AttributeRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() && !value.is_empty() => {
                Ok(AttributeRule {
                    name: name.trim().to_owned(),
                    value: value.to_owned(),
                })
            }
            _ => Err(format!(
                "{s:?} is not an attribute rule: expected NAME=VALUE, for example role=analyst"
            )),
        }
    }
}

impl std::fmt::Display for AttributeRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.name, self.value)
    }
}

/// Whether a verified credential satisfies every rule; `Err` names the
/// first rule it fails (attribute *names* only: values may be private).
pub fn match_attributes(
    credential: &VerifiedCredential,
    rules: &[AttributeRule],
) -> Result<(), String> {
    for rule in rules {
        let ok = credential
            .attributes()
            .get(&rule.name)
            .is_some_and(|v| v.contains(&rule.value));
        if !ok {
            return Err(format!(
                "the credential's attribute \"{}\" does not have the required value",
                rule.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use postern_identity::credential::{CredentialBody, CredentialId, Kind, RevocationTarget};
    use postern_identity::{AttrValue, Attributes, Identity};

    fn credential(
        authority: &Identity,
        subject: &Identity,
        attrs: &[(&str, AttrValue)],
        life: (u64, u64),
    ) -> SignedCredential {
        let attributes: Attributes = attrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let body = CredentialBody {
            version: credential::CREDENTIAL_VERSION,
            id: CredentialId::random(),
            subject: subject.identifier(),
            issuer: authority.identifier(),
            kind: Kind::Person,
            attributes,
            issued_at: life.0,
            expires_at: life.1,
        };
        credential::issue(authority, &body).unwrap()
    }

    #[test]
    fn rules_parse_and_match() {
        assert!("role".parse::<AttributeRule>().is_err());
        assert!("=x".parse::<AttributeRule>().is_err());
        let rule: AttributeRule = "groups=analysts".parse().unwrap();
        let (authority, subject) = (Identity::generate(), Identity::generate());
        let trust = Trust::new([authority.identifier()].into_iter().collect());
        let now = unix_now();
        let cred = credential(
            &authority,
            &subject,
            &[(
                "groups",
                AttrValue::Many(vec!["oncall".into(), "analysts".into()]),
            )],
            (now - 10, now + 600),
        );
        let verified = trust
            .verify(subject.identifier(), Some(&cred), now)
            .unwrap()
            .unwrap();
        assert!(match_attributes(&verified, &[rule]).is_ok());
        let err = match_attributes(&verified, &["role=admin".parse().unwrap()]).unwrap_err();
        assert!(err.contains("\"role\"") && !err.contains("admin"), "{err}");
    }

    #[test]
    fn strict_only_when_trusting_an_authority() {
        let (authority, subject, other) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let now = unix_now();
        let cred = credential(&authority, &subject, &[], (now - 10, now + 600));
        // Trusting nobody: credentials are not consulted.
        assert!(Trust::default()
            .verify(subject.identifier(), Some(&cred), now)
            .unwrap()
            .is_none());
        let trust = Trust::new([authority.identifier()].into_iter().collect());
        // Presented by someone else: refused.
        assert!(trust.verify(other.identifier(), Some(&cred), now).is_err());
        // From an authority not trusted: refused.
        let foreign = credential(&other, &subject, &[], (now - 10, now + 600));
        assert!(trust
            .verify(subject.identifier(), Some(&foreign), now)
            .is_err());
        // Expired: refused; and a live one expires later.
        let verified = trust
            .verify(subject.identifier(), Some(&cred), now)
            .unwrap()
            .unwrap();
        assert!(trust.still_valid(&verified, now).is_ok());
        assert!(trust.still_valid(&verified, now + 3600).is_err());
        // Revoked identity: refused at once.
        trust.apply_feed(
            &authority.identifier(),
            [RevocationEntry {
                seq: 1,
                revocation: credential::Revocation {
                    target: RevocationTarget::Identity(subject.identifier()),
                    revoked_at: now,
                },
            }],
        );
        assert!(trust.identity_revoked(&subject.identifier()));
        // From an authority not trusted: ignored.
        let other_subject = Identity::generate().identifier();
        trust.apply_feed(
            &other.identifier(),
            [RevocationEntry {
                seq: 1,
                revocation: credential::Revocation {
                    target: RevocationTarget::Identity(other_subject),
                    revoked_at: now,
                },
            }],
        );
        assert!(!trust.identity_revoked(&other_subject));
        assert!(trust.still_valid(&verified, now).is_err());
        assert!(trust
            .verify(subject.identifier(), Some(&cred), now)
            .is_err());
    }

    #[test]
    fn anchors_parse_with_default_or_given_names() {
        let id = Identity::generate().identifier();
        let plain: TrustAnchor = id.to_string().parse().unwrap();
        assert_eq!(plain.service, ServiceName::of_authority(&id));
        assert_eq!(plain.to_string(), id.to_string());
        let named: TrustAnchor = format!("{id}@postern-authority").parse().unwrap();
        assert_eq!(named.service.as_str(), "postern-authority");
        assert_eq!(named.to_string(), format!("{id}@postern-authority"));
        for bad in ["P12", "", &format!("{id}@"), &format!("{id}@bad name")] {
            assert!(bad.parse::<TrustAnchor>().is_err(), "{bad}");
        }
        // One anchor per authority.
        let trust = Trust::with_anchors([plain, named]);
        assert_eq!(trust.anchors().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn new_tunnels_wait_for_current_revocations() {
        let authority = Identity::generate().identifier();
        let trust = Trust::new([authority].into_iter().collect())
            .with_max_staleness(Duration::from_secs(30));
        // Never heard from: not current, naming the authority.
        let err = trust.require_current().unwrap_err();
        assert_eq!(err.authority(), authority);
        let heard = trust.watch_feeds();
        trust.apply_feed(&authority, []);
        assert!(heard.has_changed().unwrap());
        assert!(trust.require_current().is_ok());
        tokio::time::advance(Duration::from_secs(31)).await;
        let err = trust.require_current().unwrap_err();
        assert!(err.to_string().contains("beyond"), "{err}");
        // Trusting nobody is always current.
        assert!(Trust::default().require_current().is_ok());
        // A first feed message arriving while a tunnel waits lets it through;
        // none arriving is a refusal once patience runs out.
        let trust = Arc::new(Trust::new([authority].into_iter().collect()));
        let late = Arc::clone(&trust);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            late.apply_feed(&authority, []);
        });
        assert!(trust.wait_current(Duration::from_secs(5)).await.is_ok());
        let silent = Trust::new([authority].into_iter().collect());
        assert!(matches!(
            silent.wait_current(Duration::from_secs(5)).await,
            Err(StaleRevocations::NeverReceived { .. })
        ));
    }
}
