//! Postern identities and the secure channels bound to them.
//!
//! This crate holds everything two Postern parties need to know *who* is on
//! the other end of a byte stream and to talk to them privately:
//!
//! - [`Identity`]: an Ed25519 key pair, its [`Identifier`] (a hash of the
//!   public key printed as `P` followed by 40 hex digits) and its key file
//!   ([`keyfile`]).
//! - [`handshake`]: a sans-IO Noise handshake (`Noise_XX_25519_AESGCM_SHA256`
//!   as implemented by `snow`) in which each side proves its identity by
//!   signing its Noise static key, and the `IK` handshake a node uses to
//!   attach a data connection to the relay.
//! - [`frame`]: the length-prefixed framing of Noise messages on a stream,
//!   with "need more bytes" kept apart from "invalid".
//! - [`transport`]: the established channel: encrypts and decrypts frames with
//!   explicit, strictly sequential nonces.
//! - [`wire`]: the typed messages carried inside those channels (CBOR).
//! - The trust lifecycle: [`credential`] (an authority's signed, short-lived
//!   statement of a member's attributes, and its verification), [`ticket`]
//!   (one-line enrollment tickets), [`authority_wire`] (the messages nodes
//!   and the authority exchange) and [`sealed`] (encryption of secret keys at
//!   rest, used by [`keyfile`]).
//! - [`secret_env`]: the environment variables that carry secrets
//!   (passphrase, key file, enrollment ticket), taken out of the process at
//!   start-up and kept from child processes.
//!
//! The authority itself (its logic and store, the OpenID Connect login, and
//! the service that answers nodes) is the `postern-authority` crate, so that
//! relays and nodes do not compile an HTTP client, TLS or a database.
//!
//! It does no I/O of its own beyond reading and writing key files (and, in
//! [`secret_env`], wiping the secret variables from the process): callers
//! feed it bytes and a clock, and send what it returns. It knows nothing of
//! relays, services or policies.
#![forbid(unsafe_code)]

pub mod attributes;
pub mod authority_wire;
pub mod credential;
mod error;
pub mod frame;
pub mod fuzzing;
pub mod handshake;
mod identifier;
mod identity;
pub mod keyfile;
pub mod link;
pub mod revocation;
pub mod sealed;
pub mod secret_env;
pub mod ticket;
pub mod time;
pub mod transport;
pub mod wire;

pub use attributes::{AttrValue, Attributes};
pub use credential::{
    CredentialError, CredentialId, Kind, SignedCredential, TrustedAuthorities, VerifiedCredential,
};
pub use error::{ChannelError, IdentityError};
pub use identifier::Identifier;
pub use identity::{Identity, PublicIdentity};
pub use ticket::{Ticket, TicketError};
