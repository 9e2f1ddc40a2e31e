//! The authority: who is a member, which enrollment tickets are open, what
//! was revoked, and the credentials it signs.
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
//! ([`crate::ticket::CodeHash`]). Redeeming one is a single store
//! transaction ([`AuthorityStore::redeem_ticket`]) that takes a use and
//! records the member, so a single-use ticket cannot enroll two machines even
//! when both arrive at once.
//!
//! Store methods are blocking (redb does file I/O); async callers should use
//! `spawn_blocking` or accept short stalls.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::credential::{
    self, format_duration, format_timestamp, CredentialBody, CredentialError, CredentialId, Kind,
    Revocation, RevocationEntry, RevocationList, RevocationTarget, SignedCredential,
    CREDENTIAL_VERSION, MAX_CREDENTIAL_LEN,
};
use crate::ticket::{self, CodeHash, Ticket, TicketCode};
use crate::wire::ServiceName;
use crate::{Attributes, Identifier, Identity, PublicIdentity};

mod redb_store;
pub use redb_store::RedbStore;

/// Default credential life for people.
pub const DEFAULT_PERSON_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Default credential life for services.
pub const DEFAULT_SERVICE_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Longest credential life accepted in an [`AuthorityConfig`].
pub const MAX_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest ticket validity.
pub const MAX_TICKET_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most uses one ticket may allow.
pub const MAX_TICKET_USES: u32 = 10_000;
/// Most attributes one member may have.
pub const MAX_ATTRIBUTES: usize = 64;

/// Failures of the storage backend. Internal to the authority: a client is
/// told only that the authority failed ([`AuthorityError::client_message`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process holds the database.
    #[error("authority database {path} is in use by another process (is `postern authority` already running?)")]
    Locked {
        /// The database file.
        path: std::path::PathBuf,
    },
    /// The database could not be opened or created.
    #[error("cannot open authority database {path}: {reason}")]
    Open {
        /// The database file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// A read or write failed.
    #[error("authority database error: {0}")]
    Backend(String),
    /// A stored record cannot be decoded.
    #[error("authority database holds a record this Postern cannot read ({0}); was it written by a newer version?")]
    Corrupt(String),
}

/// Why the authority refused or failed a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// No ticket has this code (never issued, removed, or for another
    /// authority). Client-caused.
    #[error("this enrollment ticket is not known to the authority (it was removed, or is for another authority): ask your admin for a new ticket")]
    TicketUnknown,
    /// The ticket's validity has passed. Client-caused.
    #[error("this enrollment ticket expired at {} ({} ago): ask your admin for a new one", format_timestamp(*.expires_at), format_duration(.now.saturating_sub(*.expires_at)))]
    TicketExpired {
        /// When it expired.
        expires_at: u64,
        /// The authority's clock.
        now: u64,
    },
    /// The ticket has no uses left. Client-caused.
    #[error("this enrollment ticket has already been used (it allowed {uses} enrollment{}): ask your admin for a new one", if *.uses == 1 { "" } else { "s" })]
    TicketUsedUp {
        /// How many uses it allowed.
        uses: u32,
    },
    /// The subject is not a member, so no credential is issued. Client-caused.
    #[error("{subject} is not a member of this authority: enroll with `postern enroll <ticket>`, or ask your admin to add it")]
    NotAMember {
        /// Who asked.
        subject: Identifier,
    },
    /// The subject's identity is revoked. Client-caused.
    #[error("{revocation}, so the authority issues no credentials for it: ask your Postern admin")]
    Revoked {
        /// The revocation.
        revocation: Revocation,
    },
    /// An admin request was invalid (zero uses, too-long TTL, oversized
    /// attributes, unknown ticket prefix, …). Local user.
    #[error("{0}")]
    InvalidRequest(String),
    /// The store failed. Internal.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed. Internal.
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

impl AuthorityError {
    /// Whether the requester caused this (bad, stale or used ticket; not a
    /// member; revoked), as opposed to the authority itself failing.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            AuthorityError::TicketUnknown
                | AuthorityError::TicketExpired { .. }
                | AuthorityError::TicketUsedUp { .. }
                | AuthorityError::NotAMember { .. }
                | AuthorityError::Revoked { .. }
        )
    }

    /// What to tell the requesting node: the full message for client errors,
    /// a generic one (no paths or internals) otherwise.
    pub fn client_message(&self) -> String {
        if self.is_client_error() {
            self.to_string()
        } else {
            "the authority could not complete the request (internal error; its admin can see the details in its log): try again later".into()
        }
    }
}

/// How a member came to be one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MemberSource {
    /// Added by an admin.
    Admin,
    /// Enrolled with the ticket whose code has this hash.
    Ticket(CodeHash),
    /// Logged in with OpenID Connect.
    Oidc {
        /// The provider's issuer URL.
        issuer: String,
        /// The provider's `sub` claim.
        subject: String,
    },
}

impl fmt::Display for MemberSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemberSource::Admin => f.write_str("admin"),
            MemberSource::Ticket(h) => write!(f, "ticket {}", h.short()),
            MemberSource::Oidc { issuer, subject } => write!(f, "oidc {subject} at {issuer}"),
        }
    }
}

/// A member of the authority: an identity it issues credentials for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member's identity.
    pub identifier: Identifier,
    /// Person or service.
    pub kind: Kind,
    /// Attributes put into its credentials.
    pub attributes: Attributes,
    /// When it was added (unix seconds).
    pub added_at: u64,
    /// How it was added.
    pub source: MemberSource,
}

/// An open (or used, or expired) enrollment ticket as the authority stores
/// it: never the code itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketRecord {
    /// Hash of the one-time code.
    pub code_hash: CodeHash,
    /// Kind of member it enrolls.
    pub kind: Kind,
    /// Attributes bound to it.
    pub attributes: Attributes,
    /// When it was created.
    pub created_at: u64,
    /// When it stops working.
    pub expires_at: u64,
    /// Uses it allowed in total.
    pub uses_total: u32,
    /// Uses left (0 once used up; the record stays so a reuse is reported
    /// as such, not as unknown).
    pub uses_left: u32,
    /// A free-form note from the admin ("alice's laptop").
    #[serde(default)]
    pub note: Option<String>,
}

/// How a credential came to be issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum IssuedVia {
    /// Enrollment with a ticket.
    Ticket(CodeHash),
    /// Issuance (first or renewal) for an existing member.
    Member,
}

/// One entry of the issued-credential log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// The credential id.
    pub id: CredentialId,
    /// Whom it was issued to.
    pub subject: Identifier,
    /// Person or service.
    pub kind: Kind,
    /// Start of validity.
    pub issued_at: u64,
    /// End of validity.
    pub expires_at: u64,
    /// Why.
    pub via: IssuedVia,
}

/// Persistent authority state. Implementations must make
/// [`AuthorityStore::redeem_ticket`] and [`AuthorityStore::revoke`] atomic;
/// the rest are single reads or writes. Methods block.
pub trait AuthorityStore: Send + Sync + fmt::Debug {
    /// The member with this identifier.
    fn member(&self, id: &Identifier) -> Result<Option<Member>, StoreError>;
    /// All members, by identifier.
    fn members(&self) -> Result<Vec<Member>, StoreError>;
    /// Adds or replaces a member.
    fn put_member(&self, member: &Member) -> Result<(), StoreError>;
    /// Removes a member; whether it existed.
    fn remove_member(&self, id: &Identifier) -> Result<bool, StoreError>;

    /// Stores a new ticket (replacing one with the same hash, which cannot
    /// happen with random codes).
    fn insert_ticket(&self, ticket: &TicketRecord) -> Result<(), StoreError>;
    /// All tickets, including used and expired ones, by hash.
    fn tickets(&self) -> Result<Vec<TicketRecord>, StoreError>;
    /// Removes a ticket; whether it existed.
    fn remove_ticket(&self, hash: &CodeHash) -> Result<bool, StoreError>;
    /// In one transaction: finds the ticket, applies [`take_ticket_use`] to
    /// it, saves it, and stores `subject` as a member with the ticket's kind
    /// and attributes (replacing a previous membership). Returns the member.
    fn redeem_ticket(
        &self,
        hash: &CodeHash,
        subject: Identifier,
        now: u64,
    ) -> Result<Member, AuthorityError>;

    /// Appends to the issued-credential log.
    fn record_issued(&self, record: &IssuedRecord) -> Result<(), StoreError>;
    /// The log entry of one credential.
    fn issued_credential(&self, id: &CredentialId) -> Result<Option<IssuedRecord>, StoreError>;
    /// The log, oldest first, optionally only for one subject.
    fn issued(&self, subject: Option<&Identifier>) -> Result<Vec<IssuedRecord>, StoreError>;

    /// In one transaction: if `revocation.target` is not yet revoked, appends
    /// it to the revocation log under the next sequence number (1, 2, …).
    /// Returns the entry (the existing one if already revoked).
    fn revoke(&self, revocation: Revocation) -> Result<RevocationEntry, StoreError>;
    /// The revocation of `target`, if any.
    fn revocation(&self, target: &RevocationTarget) -> Result<Option<Revocation>, StoreError>;
    /// Log entries with a sequence number greater than `after_seq`, in order.
    fn revocations_since(&self, after_seq: u64) -> Result<Vec<RevocationEntry>, StoreError>;

    /// Deletes tickets and issued-log entries that expired before `before`;
    /// returns how many records went.
    fn prune_expired(&self, before: u64) -> Result<usize, StoreError>;
}

/// Takes one use of a ticket at time `now`: refuses a used-up ticket
/// ([`AuthorityError::TicketUsedUp`]) and an expired one
/// ([`AuthorityError::TicketExpired`]), else decrements `uses_left`. Shared by
/// every store's [`AuthorityStore::redeem_ticket`].
pub fn take_ticket_use(ticket: &mut TicketRecord, now: u64) -> Result<(), AuthorityError> {
    if ticket.uses_left == 0 {
        return Err(AuthorityError::TicketUsedUp {
            uses: ticket.uses_total,
        });
    }
    if now > ticket.expires_at {
        return Err(AuthorityError::TicketExpired {
            expires_at: ticket.expires_at,
            now,
        });
    }
    ticket.uses_left -= 1;
    Ok(())
}

/// The member a redeemed ticket creates.
pub fn member_from_ticket(ticket: &TicketRecord, subject: Identifier, now: u64) -> Member {
    Member {
        identifier: subject,
        kind: ticket.kind,
        attributes: ticket.attributes.clone(),
        added_at: now,
        source: MemberSource::Ticket(ticket.code_hash),
    }
}

/// Credential lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthorityConfig {
    /// Life of credentials for people (default 8 h).
    pub person_lifetime: Duration,
    /// Life of credentials for services (default 24 h).
    pub service_lifetime: Duration,
}

impl Default for AuthorityConfig {
    fn default() -> Self {
        AuthorityConfig {
            person_lifetime: DEFAULT_PERSON_LIFETIME,
            service_lifetime: DEFAULT_SERVICE_LIFETIME,
        }
    }
}

impl AuthorityConfig {
    /// The credential life for `kind`.
    pub fn lifetime(&self, kind: Kind) -> Duration {
        match kind {
            Kind::Person => self.person_lifetime,
            Kind::Service => self.service_lifetime,
        }
    }

    /// Checks that lifetimes are between 1 second and
    /// [`MAX_CREDENTIAL_LIFETIME`].
    pub fn validate(&self) -> Result<(), AuthorityError> {
        for (name, life) in [
            ("person", self.person_lifetime),
            ("service", self.service_lifetime),
        ] {
            if life.as_secs() == 0 || life > MAX_CREDENTIAL_LIFETIME {
                return Err(AuthorityError::InvalidRequest(format!(
                    "{name} credential lifetime {}s must be between 1s and {}",
                    life.as_secs(),
                    format_duration(MAX_CREDENTIAL_LIFETIME.as_secs())
                )));
            }
        }
        Ok(())
    }
}

/// What an admin asks for when creating a ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketSpec {
    /// Kind of member it enrolls.
    pub kind: Kind,
    /// Attributes bound to it.
    pub attributes: Attributes,
    /// How long it stays valid (1 s to [`MAX_TICKET_TTL`]).
    pub ttl: Duration,
    /// How many enrollments it allows (1 to [`MAX_TICKET_USES`]).
    pub uses: u32,
    /// A note for the admin.
    pub note: Option<String>,
}

/// How a new node reaches the authority: printed into every ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentRoute {
    /// The relay's address, `host:port`.
    pub relay_addr: String,
    /// The relay's identifier.
    pub relay: Identifier,
    /// The authority's service name at the relay (usually
    /// [`ticket::DEFAULT_AUTHORITY_SERVICE`]).
    pub authority_service: ServiceName,
}

/// The authority's logic over a store. See the module documentation.
#[derive(Debug)]
pub struct Authority {
    identity: Identity,
    store: Box<dyn AuthorityStore>,
    config: AuthorityConfig,
}

impl Authority {
    /// An authority signing with `identity`, keeping state in `store`.
    pub fn new(
        identity: Identity,
        store: Box<dyn AuthorityStore>,
        config: AuthorityConfig,
    ) -> Result<Self, AuthorityError> {
        config.validate()?;
        Ok(Authority {
            identity,
            store,
            config,
        })
    }

    /// The authority's identifier (what nodes trust).
    pub fn identifier(&self) -> Identifier {
        self.identity.identifier()
    }

    /// The authority's public key.
    pub fn public(&self) -> PublicIdentity {
        self.identity.public()
    }

    /// The configured lifetimes.
    pub fn config(&self) -> &AuthorityConfig {
        &self.config
    }

    /// The underlying store.
    pub fn store(&self) -> &dyn AuthorityStore {
        self.store.as_ref()
    }

    /// Creates a ticket: stores the hash of a fresh code with `spec`, and
    /// returns the printable ticket (holding the code, shown once) and the
    /// stored record.
    pub fn create_ticket(
        &self,
        spec: &TicketSpec,
        route: &EnrollmentRoute,
        now: u64,
    ) -> Result<(Ticket, TicketRecord), AuthorityError> {
        if spec.uses == 0 || spec.uses > MAX_TICKET_USES {
            return Err(AuthorityError::InvalidRequest(format!(
                "a ticket allows between 1 and {MAX_TICKET_USES} uses, not {}",
                spec.uses
            )));
        }
        if spec.ttl.as_secs() == 0 || spec.ttl > MAX_TICKET_TTL {
            return Err(AuthorityError::InvalidRequest(format!(
                "a ticket's lifetime must be between 1s and {}, not {}s",
                format_duration(MAX_TICKET_TTL.as_secs()),
                spec.ttl.as_secs()
            )));
        }
        ticket::validate_relay_addr(&route.relay_addr).map_err(AuthorityError::InvalidRequest)?;
        check_attributes(&spec.attributes)?;
        let code = TicketCode::random();
        let record = TicketRecord {
            code_hash: code.hash(),
            kind: spec.kind,
            attributes: spec.attributes.clone(),
            created_at: now,
            expires_at: now.saturating_add(spec.ttl.as_secs()),
            uses_total: spec.uses,
            uses_left: spec.uses,
            note: spec.note.clone(),
        };
        self.store.insert_ticket(&record)?;
        let ticket = Ticket {
            code,
            authority: self.identifier(),
            authority_service: route.authority_service.clone(),
            relay_addr: route.relay_addr.clone(),
            relay: route.relay,
            expires_at: record.expires_at,
        };
        Ok((ticket, record))
    }

    /// Enrolls `subject` (the identity authenticated on the channel the code
    /// arrived on) with a ticket code: takes one use of the ticket, makes
    /// `subject` a member with the ticket's attributes, and issues its first
    /// credential.
    pub fn redeem_ticket(
        &self,
        code: &TicketCode,
        subject: Identifier,
        now: u64,
    ) -> Result<SignedCredential, AuthorityError> {
        self.refuse_if_revoked(&subject)?;
        let hash = code.hash();
        let member = self.store.redeem_ticket(&hash, subject, now)?;
        self.sign_for(&member, now, IssuedVia::Ticket(hash))
    }

    /// Issues a fresh credential to an existing member (first credential
    /// after an admin added it, or a renewal).
    pub fn issue_for_member(
        &self,
        subject: Identifier,
        now: u64,
    ) -> Result<SignedCredential, AuthorityError> {
        self.refuse_if_revoked(&subject)?;
        let member = self
            .store
            .member(&subject)?
            .ok_or(AuthorityError::NotAMember { subject })?;
        self.sign_for(&member, now, IssuedVia::Member)
    }

    /// Adds (or replaces) a member. Refuses a revoked identity.
    pub fn add_member(
        &self,
        identifier: Identifier,
        kind: Kind,
        attributes: Attributes,
        source: MemberSource,
        now: u64,
    ) -> Result<Member, AuthorityError> {
        self.refuse_if_revoked(&identifier)?;
        check_attributes(&attributes)?;
        let member = Member {
            identifier,
            kind,
            attributes,
            added_at: now,
            source,
        };
        self.store.put_member(&member)?;
        Ok(member)
    }

    /// Removes a member: it gets no more credentials, but those already
    /// issued stay valid until they expire (revoke to end them at once).
    /// Returns whether it was a member.
    pub fn remove_member(&self, identifier: &Identifier) -> Result<bool, AuthorityError> {
        Ok(self.store.remove_member(identifier)?)
    }

    /// All members.
    pub fn members(&self) -> Result<Vec<Member>, AuthorityError> {
        Ok(self.store.members()?)
    }

    /// All tickets, including used and expired ones.
    pub fn tickets(&self) -> Result<Vec<TicketRecord>, AuthorityError> {
        Ok(self.store.tickets()?)
    }

    /// Removes the ticket whose code hash is or starts with `selector` (at
    /// least 8 hex digits, as shown by [`CodeHash::short`]). Refuses an
    /// ambiguous or unknown prefix.
    pub fn remove_ticket(&self, selector: &str) -> Result<TicketRecord, AuthorityError> {
        let selector = selector.trim().to_ascii_lowercase();
        if selector.len() < 8 || !selector.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AuthorityError::InvalidRequest(format!(
                "{selector:?} does not select a ticket: give at least 8 hex digits of its id (see the ticket list)"
            )));
        }
        let matching: Vec<TicketRecord> = self
            .store
            .tickets()?
            .into_iter()
            .filter(|t| t.code_hash.to_string().starts_with(&selector))
            .collect();
        match matching.as_slice() {
            [one] => {
                self.store.remove_ticket(&one.code_hash)?;
                Ok(one.clone())
            }
            [] => Err(AuthorityError::InvalidRequest(format!(
                "no ticket id starts with {selector} (see the ticket list)"
            ))),
            _ => Err(AuthorityError::InvalidRequest(format!(
                "{} tickets have ids starting with {selector}: give more digits",
                matching.len()
            ))),
        }
    }

    /// Revokes a credential or an identity from `now` on. Revoking an
    /// identity also stops issuance to it; it stays listed as a member.
    /// Revoking twice returns the first entry.
    pub fn revoke(
        &self,
        target: RevocationTarget,
        now: u64,
    ) -> Result<RevocationEntry, AuthorityError> {
        Ok(self.store.revoke(Revocation {
            target,
            revoked_at: now,
        })?)
    }

    /// Revocations after log position `after_seq`, for nodes catching up.
    pub fn revocations_since(
        &self,
        after_seq: u64,
    ) -> Result<Vec<RevocationEntry>, AuthorityError> {
        Ok(self.store.revocations_since(after_seq)?)
    }

    /// Every revocation, as a list a verifier can consult.
    pub fn revocation_list(&self) -> Result<RevocationList, AuthorityError> {
        let mut list = RevocationList::new();
        list.apply(self.store.revocations_since(0)?);
        Ok(list)
    }

    /// The issued-credential log, optionally for one subject.
    pub fn issued(
        &self,
        subject: Option<&Identifier>,
    ) -> Result<Vec<IssuedRecord>, AuthorityError> {
        Ok(self.store.issued(subject)?)
    }

    fn refuse_if_revoked(&self, subject: &Identifier) -> Result<(), AuthorityError> {
        match self
            .store
            .revocation(&RevocationTarget::Identity(*subject))?
        {
            Some(revocation) => Err(AuthorityError::Revoked { revocation }),
            None => Ok(()),
        }
    }

    fn sign_for(
        &self,
        member: &Member,
        now: u64,
        via: IssuedVia,
    ) -> Result<SignedCredential, AuthorityError> {
        let body = CredentialBody {
            version: CREDENTIAL_VERSION,
            id: CredentialId::random(),
            subject: member.identifier,
            issuer: self.identifier(),
            kind: member.kind,
            attributes: member.attributes.clone(),
            issued_at: now,
            expires_at: now.saturating_add(self.config.lifetime(member.kind).as_secs()),
        };
        let signed = credential::issue(&self.identity, &body)?;
        let enrolling = matches!(via, IssuedVia::Ticket(_));
        let logged = self.store.record_issued(&IssuedRecord {
            id: body.id,
            subject: body.subject,
            kind: body.kind,
            issued_at: body.issued_at,
            expires_at: body.expires_at,
            via,
        });
        match logged {
            Ok(()) => Ok(signed),
            // The ticket use and membership are already committed: failing
            // now would leave the new node with a used-up ticket and no
            // credential. Hand it out and let the admin see the gap.
            Err(e) if enrolling => {
                tracing::warn!(credential = %body.id, subject = %body.subject, error = %e,
                    "credential issued on enrollment but not recorded in the issued-credential log");
                Ok(signed)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Checks admin-supplied attributes: names of 1 to 128 printable characters,
/// values of at most 1024, at most [`MAX_ATTRIBUTES`], and a credential
/// carrying them must fit in [`MAX_CREDENTIAL_LEN`].
pub fn check_attributes(attributes: &Attributes) -> Result<(), AuthorityError> {
    let invalid = |m: String| Err(AuthorityError::InvalidRequest(m));
    if attributes.len() > MAX_ATTRIBUTES {
        return invalid(format!(
            "{} attributes are too many (at most {MAX_ATTRIBUTES})",
            attributes.len()
        ));
    }
    for (name, value) in attributes {
        if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
            return invalid(format!(
                "attribute name {name:?} must be 1 to 128 printable characters"
            ));
        }
        if value
            .values()
            .any(|v| v.chars().count() > 1024 || v.chars().any(char::is_control))
        {
            return invalid(format!(
                "attribute {name} has a value longer than 1024 characters or with control characters"
            ));
        }
    }
    // Size of a credential with these attributes (identifiers have fixed
    // length, so any identity gives the same size).
    let probe = CredentialBody {
        version: CREDENTIAL_VERSION,
        id: CredentialId::from_bytes([0; 16]),
        subject: Identifier::from_public_key(&[0; 32]),
        issuer: Identifier::from_public_key(&[0; 32]),
        kind: Kind::Service,
        attributes: attributes.clone(),
        issued_at: u64::MAX,
        expires_at: u64::MAX,
    };
    let body_len = probe.encode()?.len();
    // Envelope: map header, three keys, byte-string headers, key, signature.
    let envelope_len = body_len + 128;
    if envelope_len > MAX_CREDENTIAL_LEN {
        return invalid(format!(
            "these attributes would make a credential of about {envelope_len} bytes, over the {MAX_CREDENTIAL_LEN}-byte limit"
        ));
    }
    Ok(())
}

/// An in-memory [`AuthorityStore`] (tests, embedding). Everything is lost
/// when it is dropped.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    members: BTreeMap<Identifier, Member>,
    tickets: BTreeMap<CodeHash, TicketRecord>,
    issued: Vec<IssuedRecord>,
    revocations: Vec<RevocationEntry>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic while holding the lock cannot leave a half-applied change:
        // every method mutates with single map operations.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AuthorityStore for MemoryStore {
    fn member(&self, id: &Identifier) -> Result<Option<Member>, StoreError> {
        Ok(self.state().members.get(id).cloned())
    }
    fn members(&self) -> Result<Vec<Member>, StoreError> {
        Ok(self.state().members.values().cloned().collect())
    }
    fn put_member(&self, member: &Member) -> Result<(), StoreError> {
        self.state()
            .members
            .insert(member.identifier, member.clone());
        Ok(())
    }
    fn remove_member(&self, id: &Identifier) -> Result<bool, StoreError> {
        Ok(self.state().members.remove(id).is_some())
    }
    fn insert_ticket(&self, ticket: &TicketRecord) -> Result<(), StoreError> {
        self.state()
            .tickets
            .insert(ticket.code_hash, ticket.clone());
        Ok(())
    }
    fn tickets(&self) -> Result<Vec<TicketRecord>, StoreError> {
        Ok(self.state().tickets.values().cloned().collect())
    }
    fn remove_ticket(&self, hash: &CodeHash) -> Result<bool, StoreError> {
        Ok(self.state().tickets.remove(hash).is_some())
    }
    fn redeem_ticket(
        &self,
        hash: &CodeHash,
        subject: Identifier,
        now: u64,
    ) -> Result<Member, AuthorityError> {
        let mut state = self.state();
        let ticket = state
            .tickets
            .get_mut(hash)
            .ok_or(AuthorityError::TicketUnknown)?;
        take_ticket_use(ticket, now)?;
        let member = member_from_ticket(ticket, subject, now);
        state.members.insert(subject, member.clone());
        Ok(member)
    }
    fn record_issued(&self, record: &IssuedRecord) -> Result<(), StoreError> {
        self.state().issued.push(record.clone());
        Ok(())
    }
    fn issued_credential(&self, id: &CredentialId) -> Result<Option<IssuedRecord>, StoreError> {
        Ok(self.state().issued.iter().find(|r| &r.id == id).cloned())
    }
    fn issued(&self, subject: Option<&Identifier>) -> Result<Vec<IssuedRecord>, StoreError> {
        Ok(self
            .state()
            .issued
            .iter()
            .filter(|r| subject.is_none_or(|s| &r.subject == s))
            .cloned()
            .collect())
    }
    fn revoke(&self, revocation: Revocation) -> Result<RevocationEntry, StoreError> {
        let mut state = self.state();
        if let Some(existing) = state
            .revocations
            .iter()
            .find(|e| e.revocation.target == revocation.target)
        {
            return Ok(*existing);
        }
        let entry = RevocationEntry {
            seq: state.revocations.last().map_or(0, |e| e.seq) + 1,
            revocation,
        };
        state.revocations.push(entry);
        Ok(entry)
    }
    fn revocation(&self, target: &RevocationTarget) -> Result<Option<Revocation>, StoreError> {
        Ok(self
            .state()
            .revocations
            .iter()
            .find(|e| &e.revocation.target == target)
            .map(|e| e.revocation))
    }
    fn revocations_since(&self, after_seq: u64) -> Result<Vec<RevocationEntry>, StoreError> {
        Ok(self
            .state()
            .revocations
            .iter()
            .filter(|e| e.seq > after_seq)
            .copied()
            .collect())
    }
    fn prune_expired(&self, before: u64) -> Result<usize, StoreError> {
        let mut state = self.state();
        let (t, i) = (state.tickets.len(), state.issued.len());
        state.tickets.retain(|_, t| t.expires_at >= before);
        state.issued.retain(|r| r.expires_at >= before);
        Ok(t - state.tickets.len() + i - state.issued.len())
    }
}
