//! The Postern authority: who is a member, which enrollment tickets are
//! open, what was revoked, and the credentials it signs; the OpenID Connect
//! login that lets people enroll with their company account; and the
//! service that answers nodes through a relay.
//!
//! - The logic and its store, at the crate root: [`Authority`],
//!   [`AuthorityStore`], [`RedbStore`], [`MemoryStore`], [`AuthorityError`],
//!   [`TicketSpec`], [`EnrollmentRoute`], … (below).
//! - [`oidc`]: the OpenID Connect client and verifier (the authority
//!   redeems authorization codes, verifies ID tokens and refreshes logins;
//!   the client only runs the browser part).
//! - [`service`]: the authority behind a relay ([`service::serve`],
//!   [`service::AuthorityService`]): enrollments, renewals, OpenID Connect
//!   logins and revocation feeds, with an optional audit log.
//! - [`admin`]: the admin commands' requests, carried out on the store
//!   directly or through a running authority's local admin endpoint (a
//!   Unix socket with a Noise channel on which both ends prove the
//!   authority's identity).
//! - [`client`]: a node enrolling with OpenID Connect
//!   ([`client::enroll_oidc_browser`], [`client::enroll_oidc_device`]).
//!
//! What it does not do: the messages it exchanges with nodes are
//! `postern_identity::authority_wire`, and credentials and tickets are
//! `postern_identity`'s; the node's side of ticket enrollment, renewal and
//! the revocation feed is `postern_node::authority`, and the hop channel the
//! service runs on is `postern_node::service`. Relays and nodes do not
//! depend on this crate, so they compile no HTTP client, TLS, RSA or
//! database; only the `postern` binary (and whoever runs an authority or
//! enrolls with OpenID Connect) does.
//!
//! # The authority and its store
//!
//! [`Authority`] is the pure logic, with no network and no clock (callers
//! pass `now`, unix seconds). Its state sits behind the [`AuthorityStore`]
//! trait so that another backend (PostgreSQL) can follow; two exist:
//!
//! - [`RedbStore`]: an embedded [`redb`] database in one file (mode `0600`),
//!   the default;
//! - [`MemoryStore`]: in memory, for tests and embedding.
//!
//! Tickets are stored by the SHA-256 hash of their one-time code only
//! ([`postern_identity::ticket::CodeHash`]). Redeeming one is a single store
//! transaction ([`AuthorityStore::redeem_ticket`]) that takes a use and
//! records the member, so a single-use ticket cannot enroll two machines even
//! when both arrive at once.
//!
//! Members who log in with OpenID Connect ([`Authority::enroll_oidc`]) get
//! an [`OidcSession`] beside their membership: the provider's issuer and
//! subject, and the provider's refresh token. Such a member's credential is
//! renewed only after the provider has been asked again
//! ([`Authority::renew_oidc`], after `OidcVerifier::refresh`), so a person
//! disabled at the provider gets no new credential; [`Authority::issue_for_member`]
//! refuses them ([`AuthorityError::OidcLoginRequired`]). The refresh token is
//! sealed before it reaches the store ([`StoredToken`]: XChaCha20-Poly1305
//! under a key derived from the authority's identity with HKDF, bound to the
//! member), so the store file holds no token bytes; tokens an older Postern
//! stored in clear are sealed, and the store rewritten without them, when
//! [`Authority::new`] opens it. Tokens are never logged.
//!
//! Store methods are blocking (redb does file I/O): async code calls the
//! authority through [`Authority::blocking`], which runs them on tokio's
//! blocking threads. Every [`Authority::revoke`] that records a new entry
//! updates [`Authority::watch_revocations`], on which revocation feeds
//! wait.
#![forbid(unsafe_code)]

pub mod admin;
mod authority;
pub mod client;
pub mod oidc;
pub mod service;

pub use authority::{
    check_attributes, member_from_ticket, take_ticket_use, Authority, AuthorityConfig,
    AuthorityError, AuthorityStore, EnrollmentRoute, IssuedRecord, IssuedVia, Member, MemberSource,
    MemoryStore, OidcSession, RedbStore, SealedToken, StoreError, StoredToken, TicketRecord,
    TicketSpec, DEFAULT_PERSON_LIFETIME, DEFAULT_SERVICE_LIFETIME, MAX_ATTRIBUTES,
    MAX_CREDENTIAL_LIFETIME, MAX_TICKET_TTL, MAX_TICKET_USES, NAME_ATTRIBUTE, TOKEN_KEY_PURPOSE,
};
