//! The relay's access decisions: who may hold a hop channel, which node may
//! register which service name, and (optionally) who may open a tunnel.
//!
//! - **Hop channels.** A node whose identity is revoked by an authority the
//!   relay trusts is refused at the handshake and cut within a second of the
//!   revocation, whether it presents a credential or not. A node presenting
//!   a credential from a trusted authority that does not verify (forged,
//!   expired, revoked, someone else's) is refused: an invalid credential is
//!   never "logged and ignored". A credential from an authority the relay
//!   does not trust carries no weight here and is set aside.
//! - **Names.** Some names are reserved whatever the policies say: a name
//!   that contains an identifier (`P` and 40 hex digits, as the authorities'
//!   default names do) belongs to that identity alone, and the legacy
//!   authority name `postern-authority` belongs to the authorities the relay
//!   trusts. With policies ([`RelayConfig::policies`]), every registration is
//!   then decided by the Cedar action `register` (default deny), on the
//!   node's identifier and the attributes of the credential it presented on
//!   its hop channel. Without policies, the first identity to register a
//!   name holds it while connected.
//! - **Opens.** With policies and [`RelayConfig::precheck_connect`], the
//!   relay refuses an `open` its policies do not permit (action `connect`)
//!   before any token is minted, so an identity that may not reach a service
//!   cannot make its outlet dial for it. The outlet's own decision stays the
//!   decisive one.
//! - **Audit.** A relay with policies and a fail-closed audit log
//!   (`AuditOptions::fail_closed`) refuses every registration, with
//!   [`RefusalCode::RetryLater`], while the log cannot be written.

use std::net::IpAddr;
use std::sync::Arc;

use postern_identity::credential::{
    self, CredentialError, RevocationCheck, SignedCredential, VerifiedCredential,
};
use postern_identity::revocation::StaleRevocations;
use postern_identity::time::unix_now;
use postern_identity::wire::{Refusal, RefusalCode, ServiceName};
use postern_identity::Identifier;
use postern_policies::audit::{AccessRecord, AuditEvent, AuditLog, Verdict};
use postern_policies::{
    AccessRequest, Action, LivePolicies, Principal, ReloadOutcome, RequestContext, Service,
};
use tracing::{info, warn};

use crate::RelayConfig;

/// What a node proved about itself on its hop channel: a verified
/// credential from an authority the relay trusts, or none.
#[derive(Debug, Clone)]
pub(crate) struct NodeCredential(Option<VerifiedCredential>);

impl NodeCredential {
    /// Verifies the credential a node presented in its hop handshake.
    /// `Err` is the reason the hop channel is refused. A relay trusting no
    /// authority sets credentials aside; so does any relay for a credential
    /// from an authority it does not trust.
    pub(crate) fn verify(
        config: &RelayConfig,
        revocations: &dyn RevocationCheck,
        node: Identifier,
        presented: Option<&SignedCredential>,
    ) -> Result<Self, String> {
        let Some(presented) = presented.filter(|_| !config.authorities.is_empty()) else {
            return Ok(NodeCredential(None));
        };
        match credential::verify(
            presented,
            &config.authorities,
            node,
            unix_now(),
            revocations,
        ) {
            Ok(verified) => Ok(NodeCredential(Some(verified))),
            Err(CredentialError::UntrustedIssuer { .. }) => Ok(NodeCredential(None)),
            Err(e) => Err(format!("credential refused by the relay: {e}")),
        }
    }

    /// Why a credential accepted earlier no longer holds (revoked or
    /// expired), if it does not.
    ///
    /// The code says what the node should make of it: an expired
    /// credential is `RetryLater` (nodes renew their credential by
    /// themselves and present the new one when they reconnect), anything
    /// else (revoked) is `Denied`.
    pub(crate) fn ended(
        &self,
        now: u64,
        revocations: &dyn RevocationCheck,
    ) -> Option<(RefusalCode, String)> {
        let verified = self.0.as_ref()?;
        let e = verified.check_still_valid(now, revocations).err()?;
        let code = match e {
            CredentialError::Expired { .. } => RefusalCode::RetryLater,
            _ => RefusalCode::Denied,
        };
        Some((code, format!("credential no longer valid: {e}")))
    }

    /// The verified credential, if any.
    pub(crate) fn verified(&self) -> Option<&VerifiedCredential> {
        self.0.as_ref()
    }
}

/// Why `node` may not hold a hop channel at all, if it may not: its
/// identity was revoked by an authority the relay trusts.
pub(crate) fn identity_revoked(
    revocations: &dyn RevocationCheck,
    node: &Identifier,
) -> Option<String> {
    revocations
        .identity_revocation(node)
        .map(|revocation| format!("{revocation}: this relay refuses it"))
}

/// The identity a name is reserved for, if it is reserved and not for
/// `node`: a name containing an identifier belongs to that identity; the
/// legacy authority name belongs to the trusted authorities.
pub(crate) fn reservation(
    config: &RelayConfig,
    node: &Identifier,
    service: &ServiceName,
) -> Option<String> {
    if let Some((owner, _)) = config.authority_services.iter().find(|(_, s)| s == service) {
        return (owner != node)
            .then(|| format!("the name \"{service}\" is reserved for trusted authority {owner}"));
    }
    if let Some(owner) = embedded_identifier(service.as_str()) {
        return (owner != *node).then(|| {
            format!("the name \"{service}\" contains identifier {owner} and is reserved for that identity")
        });
    }
    let legacy = service.as_str() == postern_identity::ticket::DEFAULT_AUTHORITY_SERVICE;
    (legacy && !config.authorities.is_empty() && !config.authorities.contains(node)).then(|| {
        format!("the name \"{service}\" is reserved for the authorities this relay trusts")
    })
}

/// Whether `service` is a name trusted authority `node` registers as its
/// own: its default `authority-P…`, one configured for it, or the legacy
/// `postern-authority`.
fn own_authority_name(config: &RelayConfig, node: &Identifier, service: &ServiceName) -> bool {
    config.authorities.contains(node)
        && (*service == ServiceName::of_authority(node)
            || service.as_str() == postern_identity::ticket::DEFAULT_AUTHORITY_SERVICE
            || config
                .authority_services
                .iter()
                .any(|(a, s)| a == node && s == service))
}

/// The first identifier (`P` or `p` followed by 40 hex digits) inside `name`.
fn embedded_identifier(name: &str) -> Option<Identifier> {
    const LEN: usize = 41;
    let bytes = name.as_bytes();
    (0..bytes.len().saturating_sub(LEN - 1)).find_map(|start| {
        let candidate = &bytes[start..start + LEN];
        let looks =
            matches!(candidate[0], b'P' | b'p') && candidate[1..].iter().all(u8::is_ascii_hexdigit);
        if !looks {
            return None;
        }
        let text = format!(
            "P{}",
            std::str::from_utf8(&candidate[1..])
                .ok()?
                .to_ascii_lowercase()
        );
        text.parse().ok()
    })
}

/// Decides whether `node` may register `service`. `Err` is the refusal
/// told to the node (policy ids, never attribute values). `current` says
/// whether the relay's revocations are current enough to admit a node
/// that is not a trusted authority (`Err`: why not).
pub(crate) fn decide_register(
    config: &RelayConfig,
    relay: Identifier,
    node: Identifier,
    credential: &NodeCredential,
    service: &ServiceName,
    source: IpAddr,
    current: Result<(), StaleRevocations>,
) -> Result<(), Refusal> {
    // A decision no policy took part in, audited as such.
    let record = |decision: Verdict, reason: String| {
        audit(
            config,
            AuditEvent::Register(AccessRecord {
                decision,
                principal: node,
                service: service.clone(),
                policies: Vec::new(),
                reason,
                errors: Vec::new(),
                source_ip: Some(source),
                relay: Some(relay),
                tunnel: None,
            }),
        );
    };
    let deny = |reason: String| {
        record(Verdict::Deny, reason.clone());
        Err(Refusal::new(RefusalCode::Denied, reason))
    };
    if let Some(reason) = reservation(config, &node, service) {
        return deny(format!(
            "registration of \"{service}\" refused by relay: {reason}"
        ));
    }
    // A trusted authority registers its own name without policies: the
    // relay's admin vouched for it with --trust-authority, and nodes need it
    // to enroll, renew and hear revocations.
    if own_authority_name(config, &node, service) {
        record(
            Verdict::Allow,
            "a trusted authority registers its own name".into(),
        );
        return Ok(());
    }
    // Whether this node is revoked cannot be known without current
    // revocations; the trusted authorities themselves are never blocked by
    // their own feeds.
    if let (Err(stale), false) = (current, config.authorities.contains(&node)) {
        return Err(Refusal::new(
            RefusalCode::RetryLater,
            format!("registration of \"{service}\" refused by relay for now: {stale}"),
        ));
    }
    let Some(policies) = &config.policies else {
        return Ok(());
    };
    // Fail-closed: no registration that could not be audited.
    if let Some(Err(e)) = config.audit.as_ref().map(|log| log.admit()) {
        warn!(%node, %service, error = %e, "register refused: the audit log cannot be written");
        return Err(Refusal::new(
            RefusalCode::RetryLater,
            format!(
                "registration of \"{service}\" refused by relay for now: the relay cannot write its audit log, so it admits no registrations until it can (fail-closed); tell its operator"
            ),
        ));
    }
    let request = request(relay, node, credential, service, source);
    let decision = policies.current().decide(Action::Register, &request);
    audit(
        config,
        AuditEvent::Register(AccessRecord::new(&decision, &request)),
    );
    if decision.allow {
        info!(%node, %service, policies = ?decision.determining_policies, "register permitted by policy");
        Ok(())
    } else {
        Err(Refusal::new(
            RefusalCode::Denied,
            format!(
                "registration of \"{service}\" denied by relay: {}",
                decision.user_reason
            ),
        ))
    }
}

/// With policies and `precheck_connect`, whether `node` may open a tunnel
/// to `service` (Cedar action `connect`, without the service's attributes,
/// which only its outlet knows). `Err` is the refusal told to the inlet.
pub(crate) fn precheck_connect(
    config: &RelayConfig,
    relay: Identifier,
    node: Identifier,
    credential: &NodeCredential,
    service: &ServiceName,
    source: IpAddr,
) -> Result<(), Refusal> {
    let Some(policies) = config.policies.as_ref().filter(|_| config.precheck_connect) else {
        return Ok(());
    };
    let request = request(relay, node, credential, service, source);
    let decision = policies.current().decide(Action::Connect, &request);
    if decision.allow {
        return Ok(());
    }
    audit(
        config,
        AuditEvent::Connect(AccessRecord::new(&decision, &request)),
    );
    Err(Refusal::new(
        RefusalCode::Denied,
        format!(
            "tunnel to \"{service}\" refused by relay (connect pre-check): {}",
            decision.user_reason
        ),
    ))
}

fn request(
    relay: Identifier,
    node: Identifier,
    credential: &NodeCredential,
    service: &ServiceName,
    source: IpAddr,
) -> AccessRequest {
    let mut principal = Principal::new(node);
    if let Some(verified) = credential.verified() {
        principal.attrs = verified.attributes().clone();
    }
    AccessRequest {
        principal,
        service: Service::new(service.clone()),
        context: RequestContext {
            time: unix_now(),
            source_ip: Some(source),
            relay: Some(relay),
            credential_expires: credential.verified().map(VerifiedCredential::expires_at),
        },
    }
}

/// Says at start-up what decides registrations.
pub(crate) fn report_startup(config: &RelayConfig) {
    let Some(policies) = &config.policies else {
        info!("no --policies: the first node to register a service name holds it while connected (names containing an identifier stay reserved for it)");
        return;
    };
    let engine = policies.current();
    if engine.is_empty() {
        warn!("no policies: nobody but the trusted authorities may register a service at this relay (default deny)");
    } else {
        info!(policies = engine.len(), digest = %&engine.digest()[..12], "policies loaded; they decide every registration");
    }
    if config.precheck_connect {
        info!("connect pre-check on: opens the policies do not permit are refused before a token is minted");
    }
}

/// Hands `event` to the relay's audit log, if it keeps one (from async code
/// this does not wait for the disk).
pub(crate) fn audit(config: &RelayConfig, event: AuditEvent) {
    if let Some(log) = &config.audit {
        write_audit(log, &event);
    }
}

/// Re-reads the relay's policy directory once a second, logging and
/// auditing each change or refused change. Live hop sessions notice a new
/// generation and re-decide the names they hold.
pub(crate) fn watch_policies(policies: &Arc<LivePolicies>, log: Option<Arc<AuditLog>>) {
    let started = policies.watch(
        std::time::Duration::from_secs(1),
        move |outcome, in_force| {
            match outcome {
                ReloadOutcome::Reloaded { policies, .. } => {
                    info!(
                        policies,
                        "relay policies reloaded; registrations are decided again"
                    );
                }
                ReloadOutcome::Refused(error) => {
                    warn!(
                        policies = in_force.len(),
                        "policy reload refused; the previous policies stay in force:\n{error}"
                    );
                }
                _ => {}
            }
            if let (Some(log), Some(event)) = (&log, outcome.audit_event(in_force)) {
                write_audit(log, &event);
            }
        },
    );
    if let Err(e) = started {
        warn!(error = %e, "cannot start the policy reload thread; policies will not be reloaded");
    }
}

/// A record that cannot be taken is logged loudly; write failures are the
/// writer's to report.
fn write_audit(log: &AuditLog, event: &AuditEvent) {
    if let Err(e) = log.record(event) {
        tracing::error!(error = %e, "cannot write the audit log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_identity::credential::{
        issue, CredentialBody, CredentialId, Kind, NoRevocations, Revocation, RevocationList,
        RevocationTarget, CREDENTIAL_VERSION,
    };

    #[test]
    fn an_expired_hop_credential_is_a_passing_refusal_a_revoked_one_is_not() {
        let authority = Identity::generate();
        let node = Identity::generate().identifier();
        let now = unix_now();
        let id = CredentialId::random();
        let signed = issue(
            &authority,
            &CredentialBody {
                version: CREDENTIAL_VERSION,
                id,
                subject: node,
                issuer: authority.identifier(),
                kind: Kind::Service,
                attributes: Default::default(),
                issued_at: now - 10,
                expires_at: now + 10,
            },
        )
        .unwrap();
        let mut config = RelayConfig::new("127.0.0.1:0".parse().unwrap());
        config.authorities = [authority.identifier()].into_iter().collect();
        let held = NodeCredential::verify(&config, &NoRevocations, node, Some(&signed)).unwrap();
        assert!(held.ended(now, &NoRevocations).is_none());
        // Expired: the node renews by itself and presents the new one.
        let later = now + 10 + postern_identity::credential::CLOCK_SKEW_SECS + 1;
        let (code, reason) = held.ended(later, &NoRevocations).unwrap();
        assert_eq!(code, RefusalCode::RetryLater, "{reason}");
        // Revoked: that needs an admin.
        let mut revoked = RevocationList::new();
        revoked.insert(Revocation {
            target: RevocationTarget::Credential(id),
            revoked_at: now,
        });
        let (code, reason) = held.ended(now, &revoked).unwrap();
        assert_eq!(code, RefusalCode::Denied, "{reason}");
    }
    use postern_identity::Identity;

    fn name(s: &str) -> ServiceName {
        s.parse().unwrap()
    }

    #[test]
    fn names_with_an_identifier_are_reserved_for_it() {
        let config = RelayConfig::new(([127, 0, 0, 1], 0).into());
        let owner = Identity::generate().identifier();
        let other = Identity::generate().identifier();
        let svc = name(&format!("authority-{owner}"));
        assert!(reservation(&config, &owner, &svc).is_none());
        let refused = reservation(&config, &other, &svc).unwrap();
        assert!(refused.contains(&owner.to_string()), "{refused}");
        // Upper-case hex and a leading lower-case p are the same identifier.
        let upper = name(&format!("x.{}", owner.to_string().to_ascii_uppercase()));
        assert!(reservation(&config, &other, &upper).is_some());
        assert!(reservation(&config, &owner, &upper).is_none());
        // Ordinary names are not reserved.
        assert!(reservation(&config, &other, &name("db-prod")).is_none());
        assert!(reservation(&config, &other, &name(&"a".repeat(63))).is_none());
    }

    #[test]
    fn the_legacy_authority_name_belongs_to_trusted_authorities() {
        let authority = Identity::generate().identifier();
        let stranger = Identity::generate().identifier();
        let legacy = name(postern_identity::ticket::DEFAULT_AUTHORITY_SERVICE);
        let mut config = RelayConfig::new(([127, 0, 0, 1], 0).into());
        // Trusting nobody: first come, first served, as before.
        assert!(reservation(&config, &stranger, &legacy).is_none());
        config.authorities = [authority].into_iter().collect();
        assert!(reservation(&config, &stranger, &legacy).is_some());
        assert!(reservation(&config, &authority, &legacy).is_none());
    }
}
