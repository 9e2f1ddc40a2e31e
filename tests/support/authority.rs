//! A real authority service, in-process, behind a test relay: what every
//! node that trusts an authority needs, since nodes follow its revocations
//! and refuse new tunnels without them.

use std::sync::Arc;

use anyhow::Result;
use postern_authority::service::{serve, AuthorityService};
use postern_authority::{Authority, AuthorityConfig, MemoryStore};
use postern_identity::credential::{RevocationEntry, RevocationTarget};
use postern_identity::handshake::LocalParty;
use postern_identity::time::unix_now;
use postern_identity::wire::ServiceName;
use postern_identity::{Identifier, Identity};
use postern_node::{RelayEndpoint, Timeouts};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An authority with an in-memory store, registered at a relay under its
/// default name, until dropped or shut down.
pub struct TestAuthority {
    pub identity: Identity,
    pub authority: Arc<Authority>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestAuthority {
    /// Starts `identity` as an authority behind `relay`.
    pub fn start(identity: Identity, relay: RelayEndpoint) -> Result<Self> {
        let authority = Arc::new(Authority::new(
            identity.clone(),
            Box::new(MemoryStore::new()),
            AuthorityConfig::default(),
        )?);
        let local = Arc::new(LocalParty::new(identity.clone())?);
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            local,
            AuthorityService::new(Arc::clone(&authority)),
            relay,
            ServiceName::of_authority(&identity.identifier()),
            Timeouts::default(),
            stop.clone(),
        ));
        Ok(TestAuthority {
            identity,
            authority,
            stop,
            task: Some(task),
        })
    }

    /// Its identifier.
    pub fn identifier(&self) -> Identifier {
        self.identity.identifier()
    }

    /// Revokes `who` (every credential of that identity).
    pub fn revoke(&self, who: Identifier) -> Result<RevocationEntry> {
        Ok(self
            .authority
            .revoke(RevocationTarget::Identity(who), unix_now())?)
    }

    /// Stops serving (the feed goes down) and waits until it has.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestAuthority {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
