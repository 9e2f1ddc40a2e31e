//! The authority's logic ([`Authority`]) and its stores ([`AuthorityStore`],
//! [`MemoryStore`], and [`RedbStore`] in `redb_store.rs`). Everything public
//! here is re-exported at the crate root, whose documentation describes it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::oidc::{OidcError, SecretString, VerifiedLogin};
use postern_identity::credential::{
    self, format_duration, format_timestamp, CredentialBody, CredentialError, CredentialId, Kind,
    Revocation, RevocationEntry, RevocationList, RevocationTarget, SignedCredential,
    CREDENTIAL_VERSION, MAX_CREDENTIAL_LEN,
};
use postern_identity::ticket::{self, CodeHash, Ticket, TicketCode};
use postern_identity::wire::{RefusalCode, ServiceName};
use postern_identity::{Attributes, Identifier, Identity, PublicIdentity};
use tokio::sync::watch;

mod memory_store;
mod redb_store;
mod sealing;
pub use memory_store::MemoryStore;
pub use redb_store::RedbStore;
use sealing::TokenKey;
pub use sealing::{SealedToken, StoredToken, TOKEN_KEY_PURPOSE};

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
    #[error("authority database {path} is in use by another process, and no running authority answers on its admin endpoint (another admin command may hold it for a moment, or an older Postern runs the authority): try again, or stop that process")]
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
    /// The subject enrolled by logging in at an OpenID provider, and its
    /// login cannot be re-checked there, so no credential is issued without a
    /// new login. Client-caused.
    #[error("{subject} enrolled by logging in at the OpenID provider, and the authority cannot re-check that login ({reason}): log in again with `postern enroll --oidc`")]
    OidcLoginRequired {
        /// Who asked.
        subject: Identifier,
        /// Why the login cannot be re-checked.
        reason: String,
    },
    /// The OpenID Connect login or its re-check at the provider failed (a
    /// refused, expired or forged token, a user disabled at the provider, an
    /// e-mail domain not admitted, the provider unreachable or refusing the
    /// authority's client, …).
    #[error("OpenID Connect login refused: {0}")]
    Oidc(#[from] OidcError),
    /// OpenID Connect login was asked for, and the authority has no
    /// provider configured.
    #[error("this authority offers no OpenID Connect login (it runs without --oidc-config): enroll with a ticket from its admin, or ask the admin to configure the identity provider")]
    OidcUnavailable,
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
    /// A task of the authority failed (a store call on its blocking thread
    /// panicked or was cancelled). Internal.
    #[error("internal error in the authority: {0}")]
    Internal(String),
}

impl AuthorityError {
    /// Whether the requester caused this (bad, stale or used ticket; not a
    /// member; revoked; a login that must be done again; a refused or
    /// forged OpenID login), as opposed to the authority, its configuration
    /// or its OpenID provider failing.
    pub fn is_client_error(&self) -> bool {
        match self {
            AuthorityError::TicketUnknown
            | AuthorityError::TicketExpired { .. }
            | AuthorityError::TicketUsedUp { .. }
            | AuthorityError::NotAMember { .. }
            | AuthorityError::Revoked { .. }
            | AuthorityError::OidcLoginRequired { .. } => true,
            AuthorityError::Oidc(e) => {
                !e.is_config_error()
                    && !e.is_provider_error()
                    && !matches!(e, OidcError::Internal(_))
            }
            _ => false,
        }
    }

    /// What kind of refusal this is for the requesting node: whether asking
    /// again may succeed ([`RefusalCode::Limit`], [`RefusalCode::RetryLater`])
    /// or will not until someone changes something ([`RefusalCode::Denied`],
    /// [`RefusalCode::Invalid`]).
    pub fn refusal_code(&self) -> RefusalCode {
        match self {
            AuthorityError::Oidc(e) => e.refusal_code(),
            AuthorityError::InvalidRequest(_) => RefusalCode::Invalid,
            AuthorityError::OidcUnavailable => RefusalCode::Denied,
            client if client.is_client_error() => RefusalCode::Denied,
            _ => RefusalCode::RetryLater,
        }
    }

    /// What to tell the requesting node: the full message for client errors
    /// and for OpenID Connect failures (whose messages never hold tokens or
    /// secrets, and which the person needs to see: a disabled account, a
    /// domain not admitted, a misconfigured client), a generic one (no paths
    /// or internals) otherwise.
    pub fn client_message(&self) -> String {
        let shown = match self {
            AuthorityError::Oidc(OidcError::Internal(_)) => false,
            AuthorityError::Oidc(_) | AuthorityError::OidcUnavailable => true,
            other => other.is_client_error(),
        };
        if shown {
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
    /// Enrollment by an OpenID Connect login.
    Oidc,
    /// Renewal of an OpenID Connect member after the provider accepted its
    /// refresh token again.
    OidcRefresh,
}

/// The attribute that carries an OpenID Connect member's human-readable
/// name (from the configured name claim), unless `[oidc.claims]` maps an
/// attribute of that name itself.
pub const NAME_ATTRIBUTE: &str = "name";

/// What the authority keeps of a member's OpenID Connect login, to re-check
/// it at the provider when the member asks for a new credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcSession {
    /// The member's identity.
    pub identifier: Identifier,
    /// The provider's issuer URL.
    pub issuer: String,
    /// The provider's `sub` claim.
    pub subject: String,
    /// The human-readable name at the last login or refresh.
    pub name: String,
    /// The provider's refresh token, sealed under the authority's key
    /// (`None`: the provider issued none, so the login cannot be
    /// re-checked). [`Authority::oidc_refresh_token`] opens it.
    pub refresh_token: Option<StoredToken>,
    /// When the person logged in (unix seconds).
    pub logged_in_at: u64,
    /// When the provider last confirmed the login (login or refresh).
    pub checked_at: u64,
    /// When the provider refused the refresh token (the person was disabled
    /// or signed out there); the token is then gone and only a new login
    /// helps.
    #[serde(default)]
    pub refresh_refused_at: Option<u64>,
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
    /// The sequence number of the newest revocation (0 when none).
    fn latest_revocation_seq(&self) -> Result<u64, StoreError> {
        Ok(self.revocations_since(0)?.last().map_or(0, |e| e.seq))
    }

    /// Deletes tickets and issued-log entries that expired before `before`;
    /// returns how many records went.
    fn prune_expired(&self, before: u64) -> Result<usize, StoreError>;

    /// The OpenID Connect login kept for a member.
    fn oidc_session(&self, id: &Identifier) -> Result<Option<OidcSession>, StoreError>;
    /// Adds or replaces a member's OpenID Connect login.
    fn put_oidc_session(&self, session: &OidcSession) -> Result<(), StoreError>;
    /// Every OpenID Connect login kept.
    fn oidc_sessions(&self) -> Result<Vec<OidcSession>, StoreError>;

    /// Rewrites the stored data so that values replaced or deleted so far
    /// are gone from the underlying storage too (a file keeps old pages
    /// until it reuses them), not only from what reads return. Called once
    /// at start when secrets stored in clear were sealed. Nothing to do for
    /// a store without such leftovers.
    fn rewrite(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Forgets a member's OpenID Connect login; whether there was one.
    fn remove_oidc_session(&self, id: &Identifier) -> Result<bool, StoreError>;
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
    /// The authority's service name at the relay (by default its own,
    /// `authority-P…`: [`ServiceName::of_authority`]).
    pub authority_service: ServiceName,
}

/// The authority's logic over a store. See the module documentation.
#[derive(Debug)]
pub struct Authority {
    identity: Identity,
    store: Box<dyn AuthorityStore>,
    config: AuthorityConfig,
    /// The sequence number of the newest revocation, updated by every
    /// [`Authority::revoke`]: revocation feeds wait on it instead of
    /// polling the store.
    newest_revocation: watch::Sender<u64>,
    /// Seals the refresh tokens kept for OpenID Connect members.
    token_key: TokenKey,
}

impl Authority {
    /// An authority signing with `identity`, keeping state in `store`.
    /// Reads the store (the newest revocation), and seals the refresh
    /// tokens an older Postern stored in clear, then has the store rewrite
    /// itself without them ([`AuthorityStore::rewrite`]).
    pub fn new(
        identity: Identity,
        mut store: Box<dyn AuthorityStore>,
        config: AuthorityConfig,
    ) -> Result<Self, AuthorityError> {
        config.validate()?;
        let newest = store.latest_revocation_seq()?;
        let token_key = TokenKey::derive(&identity);
        let sealed = seal_plain_tokens(store.as_ref(), &token_key)?;
        if sealed > 0 {
            store.rewrite()?;
            tracing::info!(
                tokens = sealed,
                "sealed the OpenID Connect refresh tokens an older Postern stored in clear, and rewrote the store without them"
            );
        }
        Ok(Authority {
            identity,
            store,
            config,
            newest_revocation: watch::Sender::new(newest),
            token_key,
        })
    }

    /// Runs `op` on this authority on a thread where blocking is allowed
    /// (every store call blocks on file I/O): what async code must use
    /// instead of calling the authority directly on a runtime worker.
    pub async fn blocking<T, F>(self: &Arc<Self>, op: F) -> Result<T, AuthorityError>
    where
        T: Send + 'static,
        F: FnOnce(&Authority) -> Result<T, AuthorityError> + Send + 'static,
    {
        let authority = Arc::clone(self);
        tokio::task::spawn_blocking(move || op(&authority))
            .await
            .map_err(|e| AuthorityError::Internal(format!("a store task failed: {e}")))?
    }

    /// The sequence number of the newest revocation, now and as it changes:
    /// every [`Authority::revoke`] that records a new entry updates it, so
    /// a waiter learns of a revocation at once.
    pub fn watch_revocations(&self) -> watch::Receiver<u64> {
        self.newest_revocation.subscribe()
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
    ///
    /// A member that enrolled with OpenID Connect is refused
    /// ([`AuthorityError::OidcLoginRequired`]): its login must be re-checked
    /// at the provider first, and [`Authority::renew_oidc`] issues then.
    pub fn issue_for_member(
        &self,
        subject: Identifier,
        now: u64,
    ) -> Result<SignedCredential, AuthorityError> {
        let member = self.renewable_member(subject)?;
        if matches!(member.source, MemberSource::Oidc { .. }) {
            return Err(AuthorityError::OidcLoginRequired {
                subject,
                reason: "its credentials are renewed only after the OpenID provider confirms the login again".into(),
            });
        }
        self.sign_for(&member, now, IssuedVia::Member)
    }

    /// The member `subject`, if it may get a credential now: refuses a
    /// revoked identity and a non-member.
    pub fn renewable_member(&self, subject: Identifier) -> Result<Member, AuthorityError> {
        self.refuse_if_revoked(&subject)?;
        self.store
            .member(&subject)?
            .ok_or(AuthorityError::NotAMember { subject })
    }

    /// The member with this identifier, if any.
    pub fn member(&self, identifier: &Identifier) -> Result<Option<Member>, AuthorityError> {
        Ok(self.store.member(identifier)?)
    }

    /// Enrolls `subject` (the identity authenticated on the channel the
    /// login arrived on) after an OpenID Connect login the caller verified
    /// (`OidcVerifier::exchange_code` or `finish_device_login`): makes it a
    /// person member with the mapped attributes plus [`NAME_ATTRIBUTE`],
    /// keeps the login (and its refresh token) for renewals, and issues the
    /// first credential. A previous membership of `subject` is replaced.
    pub fn enroll_oidc(
        &self,
        subject: Identifier,
        login: &VerifiedLogin,
        refresh_token: Option<SecretString>,
        now: u64,
    ) -> Result<SignedCredential, AuthorityError> {
        self.refuse_if_revoked(&subject)?;
        let member = Member {
            identifier: subject,
            kind: Kind::Person,
            attributes: oidc_attributes(login)?,
            added_at: now,
            source: MemberSource::Oidc {
                issuer: login.issuer.clone(),
                subject: login.subject.clone(),
            },
        };
        let refresh_token = refresh_token
            .map(|token| self.token_key.seal(&subject, &token))
            .transpose()?;
        self.store.put_oidc_session(&OidcSession {
            identifier: subject,
            issuer: login.issuer.clone(),
            subject: login.subject.clone(),
            name: login.name.clone(),
            refresh_token,
            logged_in_at: now,
            checked_at: now,
            refresh_refused_at: None,
        })?;
        self.store.put_member(&member)?;
        self.sign_for(&member, now, IssuedVia::Oidc)
    }

    /// The OpenID Connect login kept for `subject`, if any.
    pub fn oidc_session(
        &self,
        subject: &Identifier,
    ) -> Result<Option<OidcSession>, AuthorityError> {
        Ok(self.store.oidc_session(subject)?)
    }

    /// The OpenID Connect login kept for `subject`, with its refresh token
    /// (if the provider issued one and has not refused it since).
    #[allow(clippy::type_complexity)]
    pub fn oidc_refresh_token(
        &self,
        subject: &Identifier,
    ) -> Result<Option<(OidcSession, Option<SecretString>)>, AuthorityError> {
        let Some(session) = self.store.oidc_session(subject)? else {
            return Ok(None);
        };
        let token = session
            .refresh_token
            .as_ref()
            .map(|stored| self.token_key.open(subject, stored))
            .transpose()?;
        Ok(Some((session, token)))
    }

    /// Renews the credential of an OpenID Connect member after the provider
    /// accepted its refresh token again (`OidcVerifier::refresh`): the
    /// member's attributes become those of the fresh ID token (group changes
    /// at the provider take effect), `rotated` replaces the stored refresh
    /// token when the provider issued a new one, and a credential is issued.
    /// The login must be for the member's provider and subject.
    pub fn renew_oidc(
        &self,
        subject: Identifier,
        login: &VerifiedLogin,
        rotated: Option<SecretString>,
        now: u64,
    ) -> Result<SignedCredential, AuthorityError> {
        let mut member = self.renewable_member(subject)?;
        let same = matches!(&member.source, MemberSource::Oidc { issuer, subject: sub }
            if *issuer == login.issuer && *sub == login.subject);
        if !same {
            return Err(AuthorityError::OidcLoginRequired {
                subject,
                reason: format!(
                    "the refreshed login is for {} at {}, not this member's login",
                    login.subject, login.issuer
                ),
            });
        }
        let mut session = self.store.oidc_session(&subject)?.ok_or_else(|| {
            AuthorityError::OidcLoginRequired {
                subject,
                reason: "the authority holds no login for it".into(),
            }
        })?;
        member.attributes = oidc_attributes(login)?;
        if let Some(token) = rotated {
            session.refresh_token = Some(self.token_key.seal(&subject, &token)?);
        }
        session.name = login.name.clone();
        session.checked_at = now;
        self.store.put_oidc_session(&session)?;
        self.store.put_member(&member)?;
        self.sign_for(&member, now, IssuedVia::OidcRefresh)
    }

    /// Records that the provider refused the refresh token of `subject`'s
    /// OpenID Connect login at `now`, and forgets the token (it will not
    /// work again), so that later renewals are refused without asking the
    /// provider. Whether there was a login.
    pub fn oidc_refresh_refused(
        &self,
        subject: &Identifier,
        now: u64,
    ) -> Result<bool, AuthorityError> {
        match self.store.oidc_session(subject)? {
            Some(mut session) => {
                session.refresh_token = None;
                session.refresh_refused_at = Some(now);
                self.store.put_oidc_session(&session)?;
                Ok(true)
            }
            None => Ok(false),
        }
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
        self.store.remove_oidc_session(identifier)?;
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
        let entry = self.store.revoke(Revocation {
            target,
            revoked_at: now,
        })?;
        self.newest_revocation.send_if_modified(|newest| {
            let newer = entry.seq > *newest;
            if newer {
                *newest = entry.seq;
            }
            newer
        });
        Ok(entry)
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
        let enrolling = matches!(via, IssuedVia::Ticket(_) | IssuedVia::Oidc);
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

/// Seals every refresh token `store` keeps in clear; how many there were.
fn seal_plain_tokens(store: &dyn AuthorityStore, key: &TokenKey) -> Result<usize, AuthorityError> {
    let mut sealed = 0;
    for mut session in store.oidc_sessions()? {
        if let Some(StoredToken::Plain(token)) = &session.refresh_token {
            session.refresh_token = Some(key.seal(&session.identifier, token)?);
            store.put_oidc_session(&session)?;
            sealed += 1;
        }
    }
    Ok(sealed)
}

/// A login's attributes for its member: the mapped claims, plus
/// [`NAME_ATTRIBUTE`] with the login's name unless a claim is mapped to it.
fn oidc_attributes(login: &VerifiedLogin) -> Result<Attributes, AuthorityError> {
    let mut attributes = login.attributes.clone();
    attributes
        .entry(NAME_ATTRIBUTE.to_string())
        .or_insert_with(|| postern_identity::AttrValue::One(login.name.clone()));
    check_attributes(&attributes)?;
    Ok(attributes)
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

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn login(subject: &str, groups: &[&str]) -> VerifiedLogin {
        let mut attributes = Attributes::new();
        attributes.insert(
            "groups".into(),
            postern_identity::AttrValue::Many(groups.iter().map(|g| g.to_string()).collect()),
        );
        VerifiedLogin {
            issuer: "https://id.example.com".into(),
            subject: subject.into(),
            name: format!("{subject}@example.com"),
            attributes,
            issued_at: NOW,
            expires_at: NOW + 600,
        }
    }

    fn authority(store: Box<dyn AuthorityStore>) -> Authority {
        Authority::new(Identity::generate(), store, AuthorityConfig::default()).expect("authority")
    }

    fn oidc_lifecycle(authority: &Authority) {
        let node = Identity::generate().identifier();
        let first = authority
            .enroll_oidc(
                node,
                &login("alice", &["analysts"]),
                Some(SecretString::new("rt-1")),
                NOW,
            )
            .expect("enrolled");
        let body = first.inspect_unverified().expect("body");
        assert_eq!(body.kind, Kind::Person);
        assert_eq!(
            body.attributes.get(NAME_ATTRIBUTE),
            Some(&postern_identity::AttrValue::One(
                "alice@example.com".into()
            ))
        );
        let member = authority.member(&node).expect("read").expect("member");
        assert_eq!(
            member.source,
            MemberSource::Oidc {
                issuer: "https://id.example.com".into(),
                subject: "alice".into()
            }
        );
        let (session, token) = authority
            .oidc_refresh_token(&node)
            .expect("read")
            .expect("session");
        assert_eq!(token.as_ref().map(SecretString::expose), Some("rt-1"));
        assert!(matches!(
            session.refresh_token,
            Some(StoredToken::Sealed(_))
        ));
        assert!(!format!("{session:?}").contains("rt-1"), "token redacted");

        // The plain member path does not renew an OIDC member.
        let err = authority.issue_for_member(node, NOW + 10).unwrap_err();
        assert!(matches!(err, AuthorityError::OidcLoginRequired { .. }));
        assert!(err.is_client_error() && err.client_message().contains("postern enroll --oidc"));

        // A refresh for another person is refused.
        let err = authority
            .renew_oidc(node, &login("mallory", &["admins"]), None, NOW + 20)
            .unwrap_err();
        assert!(
            matches!(err, AuthorityError::OidcLoginRequired { .. }),
            "{err}"
        );

        // The provider's answer sets the attributes and rotates the token.
        let renewed = authority
            .renew_oidc(
                node,
                &login("alice", &["analysts", "oncall"]),
                Some(SecretString::new("rt-2")),
                NOW + 30,
            )
            .expect("renewed");
        let body = renewed.inspect_unverified().expect("body");
        assert_eq!(
            body.attributes.get("groups"),
            Some(&postern_identity::AttrValue::Many(vec![
                "analysts".into(),
                "oncall".into()
            ]))
        );
        let (session, token) = authority
            .oidc_refresh_token(&node)
            .expect("read")
            .expect("session");
        assert_eq!(token.as_ref().map(SecretString::expose), Some("rt-2"));
        assert_eq!(session.checked_at, NOW + 30);
        let via: Vec<IssuedVia> = authority
            .issued(Some(&node))
            .expect("log")
            .into_iter()
            .map(|r| r.via)
            .collect();
        assert_eq!(via, [IssuedVia::Oidc, IssuedVia::OidcRefresh]);

        // Refused at the provider: the token is gone, the time kept.
        assert!(authority
            .oidc_refresh_refused(&node, NOW + 40)
            .expect("saved"));
        let session = authority
            .oidc_session(&node)
            .expect("read")
            .expect("session");
        assert!(session.refresh_token.is_none());
        assert_eq!(session.refresh_refused_at, Some(NOW + 40));

        // Revoked: no login brings it back.
        authority
            .revoke(RevocationTarget::Identity(node), NOW + 50)
            .expect("revoked");
        assert!(matches!(
            authority.enroll_oidc(node, &login("alice", &[]), None, NOW + 60),
            Err(AuthorityError::Revoked { .. })
        ));
        // Removing the member forgets the login.
        assert!(authority.remove_member(&node).expect("removed"));
        assert!(authority.oidc_session(&node).expect("read").is_none());
    }

    #[test]
    fn oidc_members_in_memory() {
        oidc_lifecycle(&authority(Box::new(MemoryStore::new())));
    }

    #[test]
    fn oidc_members_in_redb_persist() {
        let dir = std::env::temp_dir().join(format!(
            "postern-authority-oidc-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let path = dir.join("authority.redb");
        oidc_lifecycle(&authority(Box::new(RedbStore::open(&path).expect("open"))));

        let node = Identity::generate().identifier();
        {
            let a = authority(Box::new(RedbStore::open(&path).expect("open")));
            a.enroll_oidc(node, &login("bob", &["engineers"]), None, NOW)
                .expect("enrolled");
        }
        let store = RedbStore::open(&path).expect("reopen");
        let session = store.oidc_session(&node).expect("read").expect("kept");
        assert_eq!(session.subject, "bob");
        assert!(session.refresh_token.is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn oidc_errors_shown_to_the_client() {
        let e = AuthorityError::Oidc(OidcError::Internal("secret detail".into()));
        assert!(!e.client_message().contains("secret detail"));
        let e = AuthorityError::Oidc(OidcError::Config("bad client".into()));
        assert!(e.client_message().contains("bad client") && !e.is_client_error());
        let e = AuthorityError::Oidc(OidcError::NonceMismatch);
        assert!(e.is_client_error() && e.client_message().contains("nonce"));
        assert!(AuthorityError::OidcUnavailable
            .client_message()
            .contains("--oidc-config"));
    }
}
