//! The outlet's access decision for a new tunnel, and its re-checks while
//! the tunnel runs.
//!
//! Two modes. With Cedar policies ([`OutletConfig::policies`]) the outlet
//! decides `connect` for the inlet's identity and the attributes of its
//! verified credential, with the context the outlet knows (time, the relay,
//! the inlet's address as the relay saw it, the credential's expiry). Without
//! policies it admits the identifiers on its allow list and the holders of
//! credentials with the required attributes. Either way a revoked identity or
//! an invalid credential is refused first, every decision goes to the audit
//! log if one is kept (while a fail-closed log cannot be written, every new
//! tunnel is refused before anything else), and a live tunnel is closed,
//! with the reason sent to the inlet, as soon as its access ends: a
//! revocation, an expired credential, or a policy change (or a time window)
//! that no longer permits it. Tunnels still permitted are not disturbed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_identity::credential::{SignedCredential, VerifiedCredential};
use postern_identity::wire::{CloseReason, ServiceName};
use postern_identity::Identifier;
use postern_policies::audit::{AccessRecord, AuditEvent, AuditLog, Label, Verdict};
use postern_policies::{
    AccessRequest, Action, Decision, LivePolicies, PolicyDecision, Principal, RequestContext,
    Service,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::trust::{match_attributes, unix_now, Trust};
use crate::tunnel::StopReason;
use crate::OutletConfig;

/// How often live tunnels are re-checked against revocations, expiry and
/// policy changes.
const ACCESS_RECHECK: Duration = Duration::from_secs(1);

/// Live tunnels are re-decided at least this often even when the policies
/// did not change, so that time windows close on time.
const POLICY_RECHECK_EVERY: u32 = 10;

/// What the outlet knows about a tunnel request besides the handshake.
#[derive(Debug, Clone)]
pub(crate) struct Circumstances {
    /// The tunnel's label, for logs and audit records.
    pub tunnel: String,
    /// The relay the request came through.
    pub relay: Identifier,
    /// The inlet's address as the relay saw it (relay-asserted).
    pub source: Option<IpAddr>,
}

/// A granted tunnel: what was verified, and what to re-decide later.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    pub inlet: Identifier,
    pub credential: Option<VerifiedCredential>,
    /// The policy request (policy mode only).
    pub request: Option<AccessRequest>,
}

/// Decides whether `inlet` may open a tunnel to the outlet's service. `Err`
/// is the close reason told to the inlet's user: no secrets, no attribute
/// values.
pub(crate) fn decide(
    cfg: &OutletConfig,
    inlet: Identifier,
    presented: Option<&SignedCredential>,
    seen: &Circumstances,
) -> Result<Admission, CloseReason> {
    let denied = |reason: String| {
        warn!(tunnel = %seen.tunnel, %inlet, service = %cfg.service, decision = "deny", %reason, "access denied");
        audit_plain(cfg, inlet, seen, Verdict::Deny, &reason);
        Err(CloseReason::Denied { reason })
    };
    // Fail-closed: no tunnel that could not be audited.
    if let Some(Err(e)) = cfg.audit.as_ref().map(|log| log.admit()) {
        warn!(tunnel = %seen.tunnel, %inlet, service = %cfg.service, decision = "deny", error = %e, "access refused: the audit log cannot be written");
        return Err(CloseReason::Unavailable {
            reason: format!(
                "the outlet of \"{}\" cannot write its audit log, so it admits no new tunnels until it can (fail-closed); try again later, or tell its operator",
                cfg.service
            ),
        });
    }
    if cfg.trust.identity_revoked(&inlet) {
        return denied(format!(
            "identity {inlet} has been revoked by its authority"
        ));
    }
    // Revocations this outlet cannot vouch for: whatever it would decide
    // might admit a revoked identity, so nothing new is admitted.
    if let Err(stale) = cfg.trust.require_current() {
        let reason = format!("the outlet cannot check revocations right now: {stale}");
        warn!(tunnel = %seen.tunnel, %inlet, service = %cfg.service, decision = "deny", %reason, "access refused: revocations too stale");
        audit_plain(cfg, inlet, seen, Verdict::Deny, &reason);
        return Err(CloseReason::Unavailable { reason });
    }
    let credential = match cfg.trust.verify(inlet, presented, unix_now()) {
        Ok(credential) => credential,
        Err(e) => return denied(format!("credential refused: {e}")),
    };
    if let Some(policies) = &cfg.policies {
        let request = request(cfg, inlet, credential.as_ref(), seen);
        let decision = policies.current().decide(Action::Connect, &request);
        audit_decision(cfg, &decision, &request, &seen.tunnel);
        if !decision.allow {
            warn!(tunnel = %seen.tunnel, %inlet, service = %cfg.service, decision = "deny", reason = %decision.audit_reason, "access denied by policy");
            return Err(CloseReason::Denied {
                reason: decision.user_reason,
            });
        }
        info!(tunnel = %seen.tunnel, %inlet, service = %cfg.service, decision = "allow", policies = ?decision.determining_policies, credential = ?credential.as_ref().map(|c| c.id().to_string()), "access granted by policy");
        return Ok(Admission {
            inlet,
            credential,
            request: Some(request),
        });
    }
    let admitted = match cfg.allow.decide_connect(&inlet, &cfg.service) {
        Decision::Allow => Ok(()),
        Decision::Deny { reason } if cfg.allow_attributes.is_empty() => Err(reason),
        Decision::Deny { .. } => match &credential {
            Some(verified) => match_attributes(verified, &cfg.allow_attributes),
            None if cfg.trust.authorities().is_empty() => Err(format!(
                "this outlet admits by attributes but trusts no authority; its operator must add --trust-authority (identity {inlet} is not on the allow list either)"
            )),
            None => Err(format!(
                "identity {inlet} presented no credential and is not on the allow list; enroll with `postern enroll` to get a credential"
            )),
        },
    };
    if let Err(reason) = admitted {
        return denied(reason);
    }
    info!(tunnel = %seen.tunnel, %inlet, service = %cfg.service, decision = "allow", credential = ?credential.as_ref().map(|c| c.id().to_string()), "access granted");
    audit_plain(
        cfg,
        inlet,
        seen,
        Verdict::Allow,
        "admitted by the allow list or attribute rules",
    );
    Ok(Admission {
        inlet,
        credential,
        request: None,
    })
}

/// The Cedar request for `inlet` at this moment.
fn request(
    cfg: &OutletConfig,
    inlet: Identifier,
    credential: Option<&VerifiedCredential>,
    seen: &Circumstances,
) -> AccessRequest {
    let mut principal = Principal::new(inlet);
    if let Some(verified) = credential {
        principal.attrs = verified.attributes().clone();
    }
    AccessRequest {
        principal,
        service: Service::with_string_attrs(cfg.service.clone(), &cfg.service_attributes),
        context: RequestContext {
            time: unix_now(),
            source_ip: seen.source,
            relay: Some(seen.relay),
            credential_expires: credential.map(VerifiedCredential::expires_at),
        },
    }
}

/// Closes a live tunnel (through `stop`, telling the inlet why) when its
/// access ends. Takes the inlet's renewed credentials from `renewals` (each
/// verified like the first; an invalid one ends the tunnel). Runs until
/// `stop` is cancelled.
pub(crate) async fn watch(
    cfg: Arc<OutletConfig>,
    admission: Admission,
    seen: Circumstances,
    mut renewals: mpsc::Receiver<SignedCredential>,
    stop: CancellationToken,
    reason_out: StopReason,
) {
    let Admission {
        inlet,
        mut credential,
        mut request,
    } = admission;
    let trust: &Trust = &cfg.trust;
    let mut generation = cfg.policies.as_ref().map(|p| p.generation());
    let mut tick = tokio::time::interval(ACCESS_RECHECK);
    let mut ticks = 0u32;
    let mut renewed = false;
    loop {
        let mut ended = None;
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
            Some(presented) = renewals.recv() => {
                match trust.verify(inlet, Some(&presented), unix_now()) {
                    Ok(Some(verified)) => {
                        info!(tunnel = %seen.tunnel, %inlet, credential = %verified.id(), "inlet renewed its credential");
                        if let Some(request) = request.as_mut() {
                            request.principal.attrs = verified.attributes().clone();
                            request.context.credential_expires = Some(verified.expires_at());
                        }
                        credential = Some(verified);
                        renewed = true;
                    }
                    // This outlet trusts no authority: credentials do not count.
                    Ok(None) => continue,
                    Err(e) => ended = Some(format!("renewed credential refused: {e}")),
                }
            }
        }
        ticks = ticks.wrapping_add(1);
        let ended = ended.or_else(|| {
            if trust.identity_revoked(&inlet) {
                Some(format!("identity {inlet} has been revoked"))
            } else if let Some(verified) = &credential {
                trust
                    .still_valid(verified, unix_now())
                    .err()
                    .map(|e| format!("credential no longer valid: {e}"))
            } else {
                None
            }
        });
        let mut ended = ended;
        // Without policies, a renewed credential must still satisfy the
        // attribute rules, unless the identity is on the allow list.
        if let (None, true, None, Some(verified)) = (&ended, renewed, &cfg.policies, &credential) {
            renewed = false;
            let listed = cfg.allow.decide_connect(&inlet, &cfg.service).is_allowed();
            if !listed && !cfg.allow_attributes.is_empty() {
                ended = match_attributes(verified, &cfg.allow_attributes)
                    .err()
                    .map(|e| {
                        format!("access withdrawn: the renewed credential no longer qualifies: {e}")
                    });
            }
        }
        if let (None, Some(policies), Some(request)) = (&ended, &cfg.policies, request.as_mut()) {
            let now = policies.generation();
            if Some(now) != generation || ticks.is_multiple_of(POLICY_RECHECK_EVERY) || renewed {
                renewed = false;
                generation = Some(now);
                request.context.time = unix_now();
                let decision = policies.current().decide(Action::Connect, request);
                if !decision.allow {
                    audit_decision(&cfg, &decision, request, &seen.tunnel);
                    warn!(tunnel = %seen.tunnel, %inlet, reason = %decision.audit_reason, "policy no longer permits a live tunnel");
                    ended = Some(format!("access withdrawn: {}", decision.user_reason));
                }
            }
        }
        if let Some(reason) = ended {
            warn!(tunnel = %seen.tunnel, %inlet, %reason, "closing live tunnel: access ended");
            reason_out.set(CloseReason::Denied { reason });
            stop.cancel();
            return;
        }
    }
}

fn audit_decision(
    cfg: &OutletConfig,
    decision: &PolicyDecision,
    request: &AccessRequest,
    tunnel: &str,
) {
    let mut record = AccessRecord::new(decision, request);
    if let Some(label) = Label::new(tunnel) {
        record = record.with_tunnel(label);
    }
    audit(cfg.audit.as_ref(), AuditEvent::Connect(record));
}

fn audit_plain(
    cfg: &OutletConfig,
    inlet: Identifier,
    seen: &Circumstances,
    decision: Verdict,
    reason: &str,
) {
    audit(
        cfg.audit.as_ref(),
        AuditEvent::Connect(AccessRecord {
            decision,
            principal: inlet,
            service: cfg.service.clone(),
            policies: Vec::new(),
            reason: reason.to_owned(),
            errors: Vec::new(),
            source_ip: seen.source,
            relay: Some(seen.relay),
            tunnel: Label::new(&seen.tunnel),
        }),
    );
}

/// Records a tunnel's end: who, which service, bytes each way, why.
pub(crate) fn audit_closed(
    log: Option<&Arc<AuditLog>>,
    tunnel: &str,
    principal: Identifier,
    service: &ServiceName,
    bytes: (u64, u64),
    reason: String,
) {
    let Some(tunnel) = Label::new(tunnel) else {
        return;
    };
    audit(
        log,
        AuditEvent::TunnelClosed {
            tunnel,
            principal,
            service: service.clone(),
            bytes_up: bytes.0,
            bytes_down: bytes.1,
            reason,
        },
    );
}

/// Hands `event` to the audit log's writer, if one is kept (from async code
/// this does not wait for the disk). A record that cannot be taken is
/// logged loudly; write failures are the writer's to report.
pub(crate) fn audit(log: Option<&Arc<AuditLog>>, event: AuditEvent) {
    if let Some(Err(e)) = log.map(|log| log.record(&event)) {
        tracing::error!(error = %e, "cannot write the audit log");
    }
}

/// Logs (and audits) what a policy reload did.
pub(crate) fn report_reload(
    role: &'static str,
    audit_log: Option<Arc<AuditLog>>,
) -> impl FnMut(&postern_policies::ReloadOutcome, &postern_policies::PolicyEngine) + Send + 'static
{
    move |outcome, in_force| {
        use postern_policies::ReloadOutcome;
        match outcome {
            ReloadOutcome::Reloaded { policies, digest } => {
                info!(%role, policies, digest = %&digest[..digest.len().min(12)], "policies reloaded");
                if *policies == 0 {
                    warn!(%role, "no policies any more: admitting nobody (default deny)");
                }
            }
            ReloadOutcome::Refused(error) => {
                warn!(%role, policies = in_force.len(), "policy reload refused; the previous policies stay in force:\n{error}");
            }
            _ => {}
        }
        if let Some(event) = outcome.audit_event(in_force) {
            audit(audit_log.as_ref(), event);
        }
    }
}

/// Starts re-reading the policy directory of `policies` once a second.
pub(crate) fn watch_policies(
    role: &'static str,
    policies: &Arc<LivePolicies>,
    audit_log: Option<Arc<AuditLog>>,
) {
    if let Err(e) = policies.watch(ACCESS_RECHECK, report_reload(role, audit_log)) {
        warn!(%role, error = %e, "cannot start the policy reload thread; policies will not be reloaded");
    }
}
