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
//! This crate does not parse command lines or configuration files (the
//! `postern` binary does) and does not implement the relay.
#![forbid(unsafe_code)]

mod config;
mod error;
mod hop;
mod inlet;
mod outlet;
pub mod tunnel;

pub use config::{InletConfig, OutletConfig, RelayEndpoint, Target, Timeouts};
pub use error::NodeError;
pub use inlet::{check, CheckReport, Inlet};
pub use outlet::Outlet;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where a node stands with its relay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeStatus {
    /// Dialling or authenticating.
    Connecting,
    /// Connected (inlet) or registered (outlet).
    Ready,
    /// The relay refused the outlet's registration; retrying later.
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
    stop: CancellationToken,
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

    /// A token that stops the node when cancelled (for signal handlers).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops the node: closes its tunnels (telling each peer why) and its relay
    /// connection, and waits for its tasks to finish.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Waits until the node stops (after [`NodeHandle::stop_token`] is cancelled).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}
