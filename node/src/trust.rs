//! What a node trusts and what it presents: the authorities whose
//! credentials it accepts, its own credential, and the revocations it has
//! heard of.
//!
//! A node that trusts no authority decides by identifiers alone and does not
//! consult credentials. A node that trusts at least one verifies every
//! credential presented to it strictly: a forged, foreign, expired, revoked
//! or misattributed credential ends that handshake with the reason, never a
//! log line and a shrug.

use std::sync::RwLock;

use postern_identity::credential::{
    self, CredentialError, RevocationEntry, RevocationList, RevocationTarget, SignedCredential,
    TrustedAuthorities, VerifiedCredential,
};
use postern_identity::Identifier;
use tokio::sync::watch;

pub use postern_identity::time::unix_now;

/// A node's trust anchors, own credential and known revocations. Shared by
/// all of a node's tasks; the credential can be replaced while it runs.
#[derive(Debug)]
pub struct Trust {
    authorities: TrustedAuthorities,
    revocations: RwLock<RevocationList>,
    credential: watch::Sender<Option<SignedCredential>>,
}

impl Default for Trust {
    fn default() -> Self {
        Trust::new(TrustedAuthorities::new())
    }
}

impl Trust {
    /// Trusts credentials issued by `authorities`; presents none of its own yet.
    pub fn new(authorities: TrustedAuthorities) -> Self {
        Trust {
            authorities,
            revocations: RwLock::new(RevocationList::new()),
            credential: watch::channel(None).0,
        }
    }

    /// Presents `credential` in every handshake.
    pub fn with_credential(self, credential: SignedCredential) -> Self {
        self.credential.send_replace(Some(credential));
        self
    }

    /// The authorities this node trusts.
    pub fn authorities(&self) -> &TrustedAuthorities {
        &self.authorities
    }

    /// The credential presented in handshakes, if any.
    pub fn credential(&self) -> Option<SignedCredential> {
        self.credential.borrow().clone()
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

    /// Records revocations published by an authority.
    pub fn apply_revocations(&self, entries: impl IntoIterator<Item = RevocationEntry>) {
        self.revocations
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .apply(entries);
    }

    /// The sequence number of the newest revocation known.
    pub fn revocations_seen(&self) -> u64 {
        self.revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .latest_seq()
    }

    /// Whether `identity` itself has been revoked (whatever it presents).
    pub fn identity_revoked(&self, identity: &Identifier) -> bool {
        self.revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&RevocationTarget::Identity(*identity))
            .is_some()
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
        let revocations = self.revocations.read().unwrap_or_else(|p| p.into_inner());
        credential::verify(presented, &self.authorities, peer, now, &*revocations).map(Some)
    }

    /// Re-checks a credential accepted earlier (expiry and revocations), for
    /// live tunnels.
    pub fn still_valid(
        &self,
        credential: &VerifiedCredential,
        now: u64,
    ) -> Result<(), CredentialError> {
        let revocations = self.revocations.read().unwrap_or_else(|p| p.into_inner());
        credential.check_still_valid(now, &*revocations)
    }
}

/// The revocations a node has heard of, for code that checks credentials
/// itself (a relay following an authority's feed).
impl credential::RevocationCheck for Trust {
    fn revocation(
        &self,
        id: &credential::CredentialId,
        subject: &Identifier,
    ) -> Option<credential::Revocation> {
        self.revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .revocation(id, subject)
    }

    fn identity_revocation(&self, subject: &Identifier) -> Option<credential::Revocation> {
        self.revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .identity_revocation(subject)
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
    use postern_identity::credential::{CredentialBody, CredentialId, Kind};
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
        trust.apply_revocations([RevocationEntry {
            seq: 1,
            revocation: credential::Revocation {
                target: RevocationTarget::Identity(subject.identifier()),
                revoked_at: now,
            },
        }]);
        assert!(trust.identity_revoked(&subject.identifier()));
        assert!(trust.still_valid(&verified, now).is_err());
        assert!(trust
            .verify(subject.identifier(), Some(&cred), now)
            .is_err());
    }
}
