//! The relay's access decisions: which node may register which service name.
//!
//! A relay configured with policies decides `register` for every
//! registration (default deny: no permitting policy, no name). The principal
//! is the node's identifier, proven by the hop handshake, with the attributes
//! of the credential it presented there, verified against the authorities
//! the relay trusts. A relay without policies keeps the rule of the core
//! tunnel: the first identity to register a name holds it while connected.
//! A relay with policies and a fail-closed audit log refuses every
//! registration while the log cannot be written.

use std::net::IpAddr;
use std::sync::Arc;

use postern_identity::credential::{
    self, RevocationCheck, RevocationList, SignedCredential, VerifiedCredential,
};
use postern_identity::time::unix_now;
use postern_identity::wire::ServiceName;
use postern_identity::Identifier;
use postern_policies::audit::{AccessRecord, AuditEvent, AuditLog};
use postern_policies::{
    AccessRequest, Action, LivePolicies, Principal, ReloadOutcome, RequestContext, Service,
};
use tracing::{info, warn};

use crate::RelayConfig;

/// What a node proved about itself on its hop channel.
#[derive(Debug, Clone)]
pub(crate) struct NodeCredential(Result<Option<VerifiedCredential>, String>);

impl NodeCredential {
    /// Verifies the credential a node presented in its hop handshake. A relay
    /// trusting no authority ignores credentials.
    pub(crate) fn verify(
        config: &RelayConfig,
        node: Identifier,
        presented: Option<&SignedCredential>,
    ) -> Self {
        if config.authorities.is_empty() {
            return NodeCredential(Ok(None));
        }
        let Some(presented) = presented else {
            return NodeCredential(Ok(None));
        };
        let none = RevocationList::new();
        let revocations: &dyn RevocationCheck = match &config.revocations {
            Some(r) => r.0.as_ref(),
            None => &none,
        };
        let verified = credential::verify(
            presented,
            &config.authorities,
            node,
            unix_now(),
            revocations,
        )
        .map(Some)
        .map_err(|e| e.to_string());
        if let Err(reason) = &verified {
            warn!(%node, %reason, "node presented an invalid credential; it may not register services");
        }
        NodeCredential(verified)
    }

    /// Why a credential accepted earlier no longer holds (revoked or
    /// expired), if it does not.
    pub(crate) fn ended(&self, config: &RelayConfig) -> Option<String> {
        let Ok(Some(verified)) = &self.0 else {
            return None;
        };
        let none = RevocationList::new();
        let revocations: &dyn RevocationCheck = match &config.revocations {
            Some(r) => r.0.as_ref(),
            None => &none,
        };
        verified
            .check_still_valid(unix_now(), revocations)
            .err()
            .map(|e| format!("credential no longer valid: {e}"))
    }
}

/// Decides whether `node` may register `service`. `Err` is the reason told
/// to the node (policy ids, never attribute values).
pub(crate) fn decide_register(
    config: &RelayConfig,
    relay: Identifier,
    node: Identifier,
    credential: &NodeCredential,
    service: &ServiceName,
    source: IpAddr,
) -> Result<(), String> {
    let Some(policies) = &config.policies else {
        return Ok(());
    };
    // Fail-closed: no registration that could not be audited.
    if let Some(Err(e)) = config.audit.as_ref().map(|log| log.admit()) {
        warn!(%node, %service, error = %e, "register refused: the audit log cannot be written");
        return Err(format!(
            "registration of \"{service}\" refused by relay: the relay cannot write its audit log, so it admits no registrations until it can (fail-closed); try again later, or tell its operator"
        ));
    }
    let verified = match &credential.0 {
        Ok(verified) => verified,
        Err(reason) => {
            let reason = format!(
                "registration of \"{service}\" refused by relay: credential refused: {reason}"
            );
            audit(
                config,
                AuditEvent::Register(AccessRecord {
                    decision: postern_policies::audit::Verdict::Deny,
                    principal: node,
                    service: service.clone(),
                    policies: Vec::new(),
                    reason: reason.clone(),
                    errors: Vec::new(),
                    source_ip: Some(source),
                    relay: Some(relay),
                    tunnel: None,
                }),
            );
            return Err(reason);
        }
    };
    let mut principal = Principal::new(node);
    if let Some(verified) = verified {
        principal.attrs = verified.attributes().clone();
    }
    let request = AccessRequest {
        principal,
        service: Service::new(service.clone()),
        context: RequestContext {
            time: unix_now(),
            source_ip: Some(source),
            relay: Some(relay),
            credential_expires: verified.as_ref().map(VerifiedCredential::expires_at),
        },
    };
    let decision = policies.current().decide(Action::Register, &request);
    audit(
        config,
        AuditEvent::Register(AccessRecord::new(&decision, &request)),
    );
    if decision.allow {
        info!(%node, %service, policies = ?decision.determining_policies, "register permitted by policy");
        Ok(())
    } else {
        warn!(%node, %service, reason = %decision.audit_reason, "register denied by policy");
        Err(format!(
            "registration of \"{service}\" denied by relay: {}",
            decision.user_reason
        ))
    }
}

/// Says at start-up what decides registrations, and warns about a trusted
/// authority the policies would not let register its own service (nodes
/// could not enroll or hear revocations through this relay).
pub(crate) fn report_startup(config: &RelayConfig, relay: Identifier) {
    let Some(policies) = &config.policies else {
        info!("no --policies: the first node to register a service name holds it while connected");
        return;
    };
    let engine = policies.current();
    if engine.is_empty() {
        warn!("no policies: nobody may register a service at this relay (default deny)");
    } else {
        info!(policies = engine.len(), digest = %&engine.digest()[..12], "policies loaded; they decide every registration");
    }
    let service: ServiceName = match postern_identity::ticket::DEFAULT_AUTHORITY_SERVICE.parse() {
        Ok(service) => service,
        Err(_) => return,
    };
    for authority in config.authorities.iter() {
        let request = AccessRequest {
            principal: Principal::new(*authority),
            service: Service::new(service.clone()),
            context: RequestContext {
                time: unix_now(),
                source_ip: None,
                relay: Some(relay),
                credential_expires: None,
            },
        };
        if !engine.decide(Action::Register, &request).allow {
            warn!(%authority, "the policies do not let trusted authority {authority} register \"{service}\" at this relay, so nodes cannot enroll or hear revocations through it; add: permit(principal == Identity::\"{authority}\", action == Action::\"register\", resource == Service::\"{service}\");");
        }
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
/// auditing each change or refused change.
pub(crate) fn watch_policies(policies: &Arc<LivePolicies>, log: Option<Arc<AuditLog>>) {
    let started = policies.watch(
        std::time::Duration::from_secs(1),
        move |outcome, in_force| {
            match outcome {
                ReloadOutcome::Reloaded { policies, .. } => {
                    info!(policies, "relay policies reloaded");
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
