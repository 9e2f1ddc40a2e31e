//! Building blocks for services built on Postern, such as the authority
//! (the `postern-authority` crate), that serve requests in-process instead
//! of forwarding to a target as an outlet does.
//!
//! Such a service works like an outlet: it dials out to its relay and
//! authenticates ([`connect`], which pins the relay's identity), registers
//! its name ([`Hop::send`] with `Control::Register`, answered by
//! [`HopEvent::Registered`] or [`HopEvent::RegisterRefused`]), and for each
//! [`HopEvent::Incoming`] tunnel attaches a data connection
//! ([`Hop::attach`]), runs the end-to-end handshake on it as the responder
//! (`postern_identity::link::respond`), and then exchanges sealed data
//! frames ([`send_frame`], [`recv_frame`]) over the channel's halves
//! ([`ChannelHalves`], [`DataChannel`]). [`Backoff`] spaces reconnection
//! attempts; [`Hop::closed`] and [`Hop::ended_because`] say when and why a
//! hop channel ended.
//!
//! Embedding an outlet or an inlet needs none of this.

pub use crate::hop::{connect, Backoff, DataChannel, Hop, HopEvent};
pub use crate::tunnel::{recv_frame, send_frame, ChannelHalves};
