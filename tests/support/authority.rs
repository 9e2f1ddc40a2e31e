//! An authority service running in-process behind a [`TestRelay`], and
//! clients that talk to it as nodes do.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use postern_authority::service::{self, AuthorityService};
use postern_authority::{Authority, AuthorityConfig, RedbStore};
use postern_identity::authority_wire::{AuthorityReply, AuthorityRequest};
use postern_identity::handshake::LocalParty;
use postern_identity::wire::ServiceName;
use postern_identity::Identity;
use postern_node::authority::{with_channel, AuthorityChannel, AuthorityRoute, EnrollError};
use postern_node::Timeouts;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::net::TestRelay;

/// How long a test waits for the authority to register.
const REGISTERED: Duration = Duration::from_secs(10);

/// An authority behind a test relay, stopped on drop.
#[derive(Debug)]
pub struct TestAuthority {
    /// Its identity.
    pub identity: Identity,
    /// The authority (its store is open here).
    pub authority: Arc<Authority>,
    /// How nodes reach it.
    pub route: AuthorityRoute,
    /// Where its store is (the admin endpoint listens beside it, when
    /// started).
    pub store: std::path::PathBuf,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl TestAuthority {
    /// Starts an authority (a redb store in a temporary directory) behind
    /// `relay`, serving with what `configure` makes of its service, and
    /// waits until nodes can reach it.
    pub async fn start(
        relay: &TestRelay,
        configure: impl FnOnce(AuthorityService) -> AuthorityService,
    ) -> Result<Self> {
        Self::start_as(Identity::generate(), relay, configure).await
    }

    /// Like [`TestAuthority::start`], as `identity` (for tests that also
    /// sign credentials with the authority's key).
    pub async fn start_as(
        identity: Identity,
        relay: &TestRelay,
        configure: impl FnOnce(AuthorityService) -> AuthorityService,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = dir.path().join("authority.redb");
        let authority = Arc::new(Authority::new(
            identity.clone(),
            Box::new(RedbStore::open(&store)?),
            AuthorityConfig::default(),
        )?);
        let local = Arc::new(LocalParty::new(identity.clone())?);
        let stop = CancellationToken::new();
        let service_name = ServiceName::of_authority(&identity.identifier());
        tokio::spawn(service::serve(
            Arc::clone(&local),
            configure(AuthorityService::new(Arc::clone(&authority))),
            relay.endpoint(),
            service_name.clone(),
            Timeouts::default(),
            stop.clone(),
        ));
        let endpoint = postern_authority::admin::AdminEndpoint::bind(&store)?;
        tokio::spawn(endpoint.serve(local, Arc::clone(&authority), stop.clone()));
        let route = AuthorityRoute {
            relay: relay.endpoint(),
            authority: identity.identifier(),
            service: service_name,
        };
        let started = TestAuthority {
            identity,
            authority,
            route,
            store,
            _dir: dir,
            stop,
        };
        started.wait_registered().await?;
        Ok(started)
    }

    /// Its identifier.
    pub fn identifier(&self) -> postern_identity::Identifier {
        self.identity.identifier()
    }

    /// Revokes `who` (every credential of that identity); open feeds hear
    /// of it at once.
    pub fn revoke(
        &self,
        who: postern_identity::Identifier,
    ) -> Result<postern_identity::credential::RevocationEntry> {
        Ok(self.authority.revoke(
            postern_identity::credential::RevocationTarget::Identity(who),
            postern_identity::time::unix_now(),
        )?)
    }

    /// Waits until a channel to the authority opens (it registered).
    async fn wait_registered(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + REGISTERED;
        let probe = Arc::new(LocalParty::new(Identity::generate())?);
        loop {
            let opened = with_channel(
                &probe,
                &self.route,
                &Timeouts::default(),
                async |_: &mut AuthorityChannel| Ok::<_, EnrollError>(()),
            )
            .await;
            match opened {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(anyhow!("the authority did not register: {e}"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for TestAuthority {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A channel to the authority held open by a task: the replies it
/// receives, and a way to close it.
#[derive(Debug)]
pub struct OpenChannel {
    /// Every reply, in order; closed when the channel ends.
    pub replies: mpsc::UnboundedReceiver<AuthorityReply>,
    close: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), EnrollError>>,
}

impl OpenChannel {
    /// Opens a channel for `identity`, sends `request`, and keeps reading
    /// replies until [`OpenChannel::close`] or the authority ends it.
    pub async fn open(
        identity: &Identity,
        route: &AuthorityRoute,
        request: AuthorityRequest,
    ) -> Result<Self> {
        let local = Arc::new(LocalParty::new(identity.clone())?);
        let route = route.clone();
        let (tx, replies) = mpsc::unbounded_channel();
        let (close, closed) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            with_channel(
                &local,
                &route,
                &Timeouts::default(),
                async move |channel: &mut AuthorityChannel| {
                    channel.send(&request).await?;
                    tokio::pin!(closed);
                    loop {
                        tokio::select! {
                            _ = &mut closed => return Ok(()),
                            reply = channel.reply(Duration::from_secs(3600)) => {
                                if tx.send(reply?).is_err() {
                                    return Ok(());
                                }
                            }
                        }
                    }
                },
            )
            .await
        });
        Ok(OpenChannel {
            replies,
            close: Some(close),
            task,
        })
    }

    /// The next reply, within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Result<AuthorityReply> {
        tokio::time::timeout(wait, self.replies.recv())
            .await
            .with_context(|| format!("no reply within {wait:?}"))?
            .ok_or_else(|| anyhow!("the channel ended"))
    }

    /// Closes the channel (the node hangs up) and waits for its task.
    pub async fn close(mut self) {
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for OpenChannel {
    fn drop(&mut self) {
        self.task.abort();
    }
}
