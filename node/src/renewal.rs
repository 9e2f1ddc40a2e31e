//! Keeps a node's credential fresh without dropping its tunnels.
//!
//! Two thirds of the way through a credential's life the node asks its
//! authority (through its own hop channel, like any service) for a new one
//! (`AuthorityRequest::Renew`; the identity must still be a member, and an
//! OIDC member's provider must still accept its refresh token). The new
//! credential replaces the old in [`Trust`]: new handshakes present it, and
//! every live tunnel sends it to its peer in a `DataFrame::Credential`, so
//! the peer's check of the old credential's expiry does not end the tunnel.
//! A renewal that fails is retried with back-off until the credential
//! expires; the tunnels that relied on it then close at the peer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use postern_identity::credential::SignedCredential;
use postern_identity::handshake::LocalParty;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::authority;
use crate::feeds::{current_hop, Hops};
use crate::trust::{unix_now, Trust, TrustAnchor};
use crate::Timeouts;
use postern_identity::time::format_timestamp as format_unix;

/// Shortest wait between two failed renewal attempts.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between two failed renewal attempts.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// When to renew `credential`, Unix seconds (`None`: unreadable, so never).
fn renew_at(credential: &SignedCredential) -> Option<(u64, u64)> {
    let body = credential.inspect_unverified().ok()?;
    Some((body.renew_at(), body.expires_at))
}

/// Renews `trust`'s credential before it expires, for as long as `stop` is
/// not cancelled, asking the credential's issuer through the node's hop
/// channel of the moment (`hops`), under the service name `trust` anchors
/// for it (else its default name). Each new credential is also written to
/// `save_to` (mode 0600), so a restart presents it. Returns at once when
/// there is no credential to renew.
pub(crate) async fn keep_renewed(
    local: Arc<LocalParty>,
    mut hops: Hops,
    trust: Arc<Trust>,
    timeouts: Timeouts,
    save_to: Option<PathBuf>,
    stop: CancellationToken,
) {
    let mut retry = RETRY_MIN;
    loop {
        let Some(credential) = trust.credential() else {
            return;
        };
        let Some((due, expires)) = renew_at(&credential) else {
            warn!("the credential cannot be read, so it will not be renewed");
            return;
        };
        let wait = Duration::from_secs(due.saturating_sub(unix_now()));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let issuer = credential.claimed_issuer();
        let anchor = trust
            .anchors()
            .iter()
            .find(|a| a.authority == issuer)
            .cloned()
            .unwrap_or_else(|| TrustAnchor::new(issuer));
        let renewed = tokio::select! {
            () = stop.cancelled() => return,
            renewed = async {
                let hop = current_hop(&mut hops, &stop).await?;
                Some(authority::renew_over(&local, &hop, &anchor, &timeouts).await)
            } => renewed,
        };
        let Some(renewed) = renewed else { return };
        match renewed {
            Ok(fresh) => {
                retry = RETRY_MIN;
                let until = renew_at(&fresh).map_or(0, |(_, e)| e);
                trust.set_credential(fresh.clone());
                info!(valid_until = %format_unix(until), "credential renewed; live tunnels carry the new one");
                if let Some(path) = &save_to {
                    if let Err(e) = save(path, &fresh) {
                        warn!(path = %path.display(), error = %e, "renewed credential not saved; a restart will present the old one");
                    }
                }
            }
            Err(e) => {
                let left = expires.saturating_sub(unix_now());
                warn!(error = %e, expires = %format_unix(expires), "could not renew the credential; retrying in {retry:?} ({left} s of validity left)");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
                if left == 0 {
                    warn!("the credential expired before it could be renewed; tunnels relying on it are closed by their peers; run `postern enroll` again");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(RETRY_MAX) => {}
                    }
                }
            }
        }
    }
}

/// Writes `credential` to `path` atomically, mode 0600.
fn save(path: &std::path::Path, credential: &SignedCredential) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = credential
        .encode()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let tmp = path.with_extension("cred.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
