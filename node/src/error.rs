use std::net::SocketAddr;
use std::time::Duration;

use postern_identity::link::LinkError;
use postern_identity::wire::{CloseReason, Refusal, ServiceName};
use postern_identity::Identifier;

/// Why a node operation failed. Each message says what happened and, where
/// the user can act, what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The relay could not be reached.
    #[error("cannot reach relay at {address}: {source}")]
    RelayUnreachable {
        /// The address dialled.
        address: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The relay answered with an identity other than the pinned one.
    #[error("relay at {address} proved identity {actual}, but {expected} was expected: refusing it (check --relay-identity)")]
    WrongRelay {
        /// The address dialled.
        address: String,
        /// The pinned identifier.
        expected: Identifier,
        /// What the relay proved.
        actual: Identifier,
    },
    /// The hop or attach handshake with the relay failed.
    #[error("secure channel to relay at {address} failed: {source}")]
    RelayHandshake {
        /// The address dialled.
        address: String,
        /// The cause.
        source: LinkError,
    },
    /// The connection to the relay was lost.
    #[error("connection to the relay was lost: {0}")]
    RelayLost(String),
    /// No connection to the relay right now.
    #[error("no connection to relay {address} at the moment ({status}); the node keeps retrying")]
    NotConnected {
        /// The relay.
        address: String,
        /// The last known problem.
        status: String,
    },
    /// The relay refused to open a tunnel (its code says whether trying
    /// again later may succeed).
    #[error("relay refused the tunnel: {0}")]
    OpenRefused(Refusal),
    /// The relay refused to attach a data connection.
    #[error("relay refused the data connection: {0}")]
    AttachRefused(Refusal),
    /// The relay ended the hop channel and said why (a revoked identity, a
    /// refused credential, a limit, shutdown).
    #[error("relay at {address} ended the connection: {refusal}")]
    RelayRefused {
        /// The relay's address.
        address: String,
        /// Its reason.
        refusal: Refusal,
    },
    /// The peer of the tunnel is not the expected outlet.
    #[error("the outlet answering for \"{service}\" is {actual}, but {expected} was expected: refusing it (check --outlet-identity)")]
    WrongOutlet {
        /// The service.
        service: ServiceName,
        /// The pinned identifier.
        expected: Identifier,
        /// What the peer proved.
        actual: Identifier,
    },
    /// The outlet's access check refused us.
    #[error("access to service \"{service}\" denied by outlet {outlet}: {reason}")]
    Denied {
        /// The service.
        service: ServiceName,
        /// The outlet that decided.
        outlet: Identifier,
        /// Its reason.
        reason: String,
    },
    /// The outlet closed the tunnel for another reason.
    #[error("tunnel to service \"{service}\" closed by outlet {outlet}: {reason}")]
    ClosedByOutlet {
        /// The service.
        service: ServiceName,
        /// The outlet.
        outlet: Identifier,
        /// Its reason.
        reason: CloseReason,
    },
    /// The end-to-end channel failed.
    #[error("end-to-end channel for service \"{service}\" failed: {source}")]
    Tunnel {
        /// The service.
        service: ServiceName,
        /// The cause.
        source: LinkError,
    },
    /// The inlet could not listen.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A non-loopback listen address without the explicit opt-in.
    #[error("refusing to listen on non-loopback address {0}: anyone on that network could use the tunnel. Listen on 127.0.0.1, or pass --dangerous-allow-non-loopback if you really mean it")]
    NonLoopback(SocketAddr),
    /// The node did not become ready in time.
    #[error("node not ready after {after:?}; last status: {status}")]
    NotReady {
        /// How long we waited.
        after: Duration,
        /// The last status.
        status: String,
    },
    /// The revocations of a trusted authority are too stale (or were never
    /// received) to open new tunnels that depend on it.
    #[error("{0}")]
    RevocationsStale(#[from] postern_identity::revocation::StaleRevocations),
    /// The configuration contradicts itself; the message says how to fix it.
    #[error("{0}")]
    Config(String),
    /// Setting up the node's Noise key failed.
    #[error("cannot set up the secure channel key: {0}")]
    Key(#[from] postern_identity::ChannelError),
}
