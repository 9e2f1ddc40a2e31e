//! The Postern relay.
//!
//! The relay is the only Postern component with a port other machines can
//! reach. It authenticates nodes on hop channels (Noise XX bound to their
//! identities), lets outlets register service names, answers inlets' open
//! requests with single-use tokens, and splices the two data connections that
//! present a token. The bytes it splices are the end-to-end Noise channel
//! between inlet and outlet: the relay holds none of its keys and can read
//! none of it.
//!
//! It refuses, on the hop handshake and within a second afterwards, nodes
//! whose identity or credential an authority it trusts has revoked, and
//! nodes presenting an invalid credential from such an authority (one from
//! an authority it does not trust is set aside). It hears each trusted
//! authority's revocations on that authority's own hop channel, with a
//! cursor per authority, and dials nothing itself; while an authority's
//! revocations are staler than [`RelayConfig::max_revocation_staleness`],
//! it refuses registrations by every other node for now. A name containing
//! an identifier (such as an authority's `authority-P…`) is reserved for
//! that identity. Tunnels already spliced are never cut by the relay: the
//! outlet closes a revoked inlet's. Data connections are accepted
//! only from the Noise key of a live hop channel. Every resource a node can
//! make the relay hold is bounded per source address and per identity
//! ([`RelayConfig`] lists the limits), and every refusal reaches the node as
//! a typed code beside its reason.
//!
//! With policies ([`RelayConfig::policies`]) it decides who may register
//! which service name (Cedar action `register`, default deny), using the
//! attributes of the credential each node presents on its hop channel, and
//! re-decides live registrations when the policies change; optionally it
//! pre-checks `connect` before minting a token. The outlet remains the
//! decisive check of who may reach a service; the relay does not terminate or
//! inspect tunnelled traffic.
#![forbid(unsafe_code)]

mod access;
mod attach;
mod limits;
mod registry;
mod server;
mod session;
mod splice;

pub use server::{Relay, RelayConfig, RelayError};
