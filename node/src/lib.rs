//! Postern nodes: the **outlet** that serves a target (a database) through a
//! relay, and the **inlet** that gives local clients a loopback port leading
//! to it.
//!
//! Both only ever dial *out* to the relay. Each client connection accepted by
//! an inlet becomes one tunnel: the inlet asks the relay (over its hop
//! channel) for a single-use token, both ends attach a fresh data connection
//! with it, and inlet and outlet run an end-to-end Noise XX handshake through
//! the relay's splice. The outlet decides access; the inlet checks that it
//! reached the outlet it expected.
//!
//! Trust is enforced by the library, not by the `postern` binary. Given a
//! [`Trust`] (the authorities to trust, as [`TrustAnchor`]s, and a
//! credential to present), an outlet or inlet follows each authority's
//! revocations over its own hop channel (one cursor per authority), closes
//! the tunnels of revoked identities (outlet), refuses new tunnels while an
//! authority's revocations are staler than its bound
//! ([`Trust::with_max_staleness`], 2 minutes by default), and renews its
//! credential before it expires. An embedded node is as protected as the
//! CLI.
//!
//! # Embedding an outlet
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use postern_node::{Outlet, OutletConfig, RelayEndpoint, Target};
//! let identity = postern_identity::keyfile::load("/etc/myservice/postern.key".as_ref())?;
//! let config = OutletConfig::new(
//!     RelayEndpoint::new("relay.example:4000", "P3f2a0000000000000000000000000000000000ff".parse()?),
//!     "db-prod".parse()?,
//!     Target::Tcp("127.0.0.1:5432".into()),
//!     postern_policies::AllowList::new(["P1111111111111111111111111111111111111111".parse()?]),
//! );
//! let mut outlet = Outlet::start(identity, config)?;
//! outlet.wait_ready(std::time::Duration::from_secs(10)).await?;
//! // ... run the service ...
//! outlet.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Beyond outlet and inlet
//!
//! - [`authority`]: the node's side of the authority (enrolling with a
//!   ticket, renewing, and the channel the OpenID Connect enrollment of the
//!   `postern-authority` crate is built on); [`trust`] holds the trust
//!   anchors, the node's credential and the revocations heard per
//!   authority, and checks peers' credentials.
//! - [`service`]: the hop channel and data-frame pieces a service built on
//!   Postern (the authority) uses to register at a relay and serve tunnels.
//!
//! This crate does not parse command lines or configuration files (the
//! `postern` binary does), does not implement the relay, and does not hold
//! the authority's logic or its OpenID Connect login (`postern-authority`
//! does), so it compiles no HTTP client, TLS or database.
#![forbid(unsafe_code)]

mod access;
pub mod authority;
mod config;
mod error;
mod feeds;
mod hop;
mod inlet;
mod outlet;
mod renewal;
pub mod service;
pub mod trust;
pub mod tunnel;

pub use config::{InletConfig, OutletConfig, RelayEndpoint, Target, Timeouts, DEFAULT_MAX_TUNNELS};
pub use error::NodeError;
pub use inlet::{check, CheckReport, Inlet};
pub use outlet::{Outlet, REFUSED_RETRY_DELAY};
pub use trust::{AttributeRule, Trust, TrustAnchor};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How long a node waits for its tunnels to close once they were told to.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The two ways a node stops. `drain` stops taking new tunnels (the inlet
/// closes its listener, the outlet leaves the relay) and lets open tunnels
/// run for a grace period; `stop` closes every tunnel now, telling each
/// peer why. `drain` is a child of `stop`, so stopping also drains.
#[derive(Debug, Clone)]
pub(crate) struct Lifecycle {
    pub stop: CancellationToken,
    pub drain: CancellationToken,
    grace: Arc<Mutex<Duration>>,
}

impl Lifecycle {
    pub fn new(grace: Duration) -> Self {
        let stop = CancellationToken::new();
        Lifecycle {
            drain: stop.child_token(),
            stop,
            grace: Arc::new(Mutex::new(grace)),
        }
    }

    fn set_grace(&self, grace: Duration) {
        *self.grace.lock().unwrap_or_else(|p| p.into_inner()) = grace;
    }

    fn grace(&self) -> Duration {
        *self.grace.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends a node's tunnels once it stopped accepting new ones: on a drain,
    /// waits up to the grace period for them to finish by themselves, then
    /// closes the rest; on a stop, closes them all at once. Says what it did.
    pub async fn finish(&self, tunnels: &TaskTracker, role: &str) {
        tunnels.close();
        if !self.stop.is_cancelled() {
            let grace = self.grace();
            let open = tunnels.len();
            if open > 0 {
                info!(%role, tunnels = open, "draining: no new tunnels; waiting up to {grace:?} for {open} open tunnel(s) to finish");
                tokio::select! {
                    () = tunnels.wait() => {
                        info!(%role, "drained: every tunnel finished within the grace period");
                    }
                    () = tokio::time::sleep(grace) => {
                        let left = tunnels.len();
                        warn!(%role, tunnels = left, "grace period of {grace:?} over: closing {left} tunnel(s) still open");
                    }
                    () = self.stop.cancelled() => {
                        let left = tunnels.len();
                        warn!(%role, tunnels = left, "stop requested while draining: closing {left} tunnel(s) now");
                    }
                }
            }
        } else if !tunnels.is_empty() {
            info!(%role, tunnels = tunnels.len(), "closing every open tunnel");
        }
        self.stop.cancel();
        if tokio::time::timeout(CLOSE_WAIT, tunnels.wait())
            .await
            .is_err()
        {
            warn!(%role, tunnels = tunnels.len(), "some tunnels did not close within {CLOSE_WAIT:?} of shutdown");
        }
    }
}

/// Where a node stands with its relay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeStatus {
    /// Dialling or authenticating.
    Connecting,
    /// Connected (inlet) or registered (outlet).
    Ready,
    /// The relay refused the outlet's registration, or ended its hop
    /// channel, for a reason that needs an admin (a denied registration, a
    /// revoked identity); the outlet asks again every
    /// [`REFUSED_RETRY_DELAY`]. Refusals that pass by themselves
    /// (stale revocations, a limit, a fail-closed audit log) show as
    /// `Disconnected` and are retried after the usual back-off.
    Refused(String),
    /// The last attempt failed; retrying after a back-off.
    Disconnected(String),
    /// Stopped.
    Stopped,
}

/// A running node. Dropping the handle does not stop the node; call
/// [`NodeHandle::shutdown`].
#[derive(Debug)]
pub struct NodeHandle {
    life: Lifecycle,
    task: JoinHandle<()>,
    status: watch::Receiver<NodeStatus>,
    local_addr: Option<SocketAddr>,
}

impl NodeHandle {
    /// The current status.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// The inlet's bound address (`None` for an outlet).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Waits until the node is [`NodeStatus::Ready`], or fails with the last
    /// status after `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), NodeError> {
        let waited =
            tokio::time::timeout(timeout, self.status.wait_for(|s| *s == NodeStatus::Ready))
                .await
                .is_ok_and(|r| r.is_ok());
        match waited {
            true => Ok(()),
            false => Err(NodeError::NotReady {
                after: timeout,
                status: format!("{:?}", self.status()),
            }),
        }
    }

    /// Subscribes to status changes.
    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// A token that stops the node when cancelled (for signal handlers):
    /// every tunnel is closed at once.
    pub fn stop_token(&self) -> CancellationToken {
        self.life.stop.clone()
    }

    /// A token that drains the node when cancelled (for signal handlers): it
    /// stops taking new tunnels and closes the open ones after
    /// [`Timeouts::drain_grace`] (or the grace given to
    /// [`NodeHandle::shutdown_gracefully`]). Cancelling
    /// [`NodeHandle::stop_token`] meanwhile cuts the grace period short.
    pub fn drain_token(&self) -> CancellationToken {
        self.life.drain.clone()
    }

    /// Stops the node: closes its tunnels (telling each peer why) and its relay
    /// connection, and waits for its tasks to finish.
    pub async fn shutdown(self) {
        self.life.stop.cancel();
        let _ = self.task.await;
    }

    /// Stops the node gracefully: it stops accepting new tunnels at once (an
    /// inlet closes its listening port, an outlet leaves the relay), lets
    /// the open tunnels run for up to `grace`, then closes those still open,
    /// telling each peer why. Logs what it did. Returns when the node stopped.
    pub async fn shutdown_gracefully(self, grace: Duration) {
        self.life.set_grace(grace);
        self.life.drain.cancel();
        let _ = self.task.await;
    }

    /// Waits until the node stops (after [`NodeHandle::stop_token`] is cancelled).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}
