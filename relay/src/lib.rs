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
//! With policies ([`RelayConfig::policies`]) it decides who may register
//! which service name (Cedar action `register`, default deny), using the
//! attributes of the credential each node presents on its hop channel. It
//! does not decide who may reach a service (the outlet does) and does not
//! terminate or inspect tunnelled traffic.
#![forbid(unsafe_code)]

mod access;
pub mod registry;
mod server;

pub use server::{Relay, RelayConfig, RelayError, Revocations};
