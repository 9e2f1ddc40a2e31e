//! Credentials: an authority's signed statement that an identity has some
//! attributes, for a short time.
//!
//! A credential is two layers of CBOR (`cbor4ii` + serde):
//!
//! - the **body** ([`CredentialBody`]): version, credential id, subject,
//!   issuer, kind, attributes, issued-at and expires-at (unix seconds);
//! - the **envelope** ([`SignedCredential`]): the body's exact encoded bytes,
//!   the issuer's Ed25519 public key and the issuer's signature over those
//!   bytes, made with [`Identity::sign`] under the label
//!   [`SIGNATURE_LABEL`].
//!
//! The signature covers the exact bytes, so a verifier never re-encodes what
//! it checks. [`verify`] checks, in order: the issuer is trusted (by
//! identifier; the key in the envelope must hash to it), the signature, the
//! body's version and shape, the subject is the authenticated peer, the time
//! is within the validity window (with [`CLOCK_SKEW_SECS`] of slack on each
//! side) and the credential is not revoked. Only then do its attributes count.
//!
//! This module does no I/O and reads no clock: callers pass `now`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Attributes, Identifier, Identity, PublicIdentity};

/// The only credential version this code issues and accepts.
pub const CREDENTIAL_VERSION: u8 = 1;
/// Largest encoded [`SignedCredential`] accepted, checked before decoding.
pub const MAX_CREDENTIAL_LEN: usize = 8 * 1024;
/// Clock skew tolerated on either side of a credential's validity window.
pub const CLOCK_SKEW_SECS: u64 = 60;
/// Domain-separation label of credential signatures.
pub const SIGNATURE_LABEL: &[u8] = b"postern credential v1";

/// Why a credential was not issued, decoded or accepted.
///
/// Most variants are caused by the peer that presented the credential (or its
/// authority); [`CredentialError::Internal`] and
/// [`CredentialError::InvalidBody`] are local bugs or misuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The encoded credential is larger than [`MAX_CREDENTIAL_LEN`].
    #[error("credential of {len} bytes is larger than the {max}-byte limit: ask the authority admin to reduce the attributes it issues")]
    TooLarge {
        /// Size received.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a credential (truncated, wrong types, extra fields).
    #[error("credential is malformed ({0}): re-enroll with `postern enroll` to get a fresh one")]
    Malformed(String),
    /// The body has a version this code does not understand.
    #[error("credential has version {found}, but this Postern only understands version {CREDENTIAL_VERSION}: use the same Postern version on both ends")]
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// The issuer is not one of the authorities this node trusts.
    #[error("credential issued by {issuer} which this node does not trust (trusted: {}): enroll with a trusted authority, or add {issuer} to this node's trusted authorities", list_identifiers(.trusted))]
    UntrustedIssuer {
        /// Who signed it.
        issuer: Identifier,
        /// Who this node trusts.
        trusted: Vec<Identifier>,
    },
    /// The signature does not verify: forged or altered.
    #[error("credential signature does not verify under the key of authority {issuer}: it was forged or altered")]
    BadSignature {
        /// The claimed issuer.
        issuer: Identifier,
    },
    /// The credential names someone other than the authenticated peer.
    #[error("credential was issued to {subject}, but the peer authenticated as {peer}: a credential only works for the identity it names")]
    SubjectMismatch {
        /// The credential's subject.
        subject: Identifier,
        /// The authenticated peer.
        peer: Identifier,
    },
    /// The credential's validity ended (beyond the clock skew allowance).
    #[error("credential expired at {} ({} ago): run `postern enroll` again or check the clock", format_timestamp(*.expires_at), format_duration(.now.saturating_sub(*.expires_at)))]
    Expired {
        /// End of validity.
        expires_at: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The credential's validity has not begun (beyond the clock skew
    /// allowance).
    #[error("credential is not valid until {} ({} from now): check the clock on both machines", format_timestamp(*.issued_at), format_duration(.issued_at.saturating_sub(*.now)))]
    NotYetValid {
        /// Start of validity.
        issued_at: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The authority revoked this credential or its subject.
    #[error("{revocation}: ask your Postern admin")]
    Revoked {
        /// Which revocation applies.
        revocation: Revocation,
    },
    /// A body handed to [`issue`] is inconsistent (a caller bug).
    #[error("refusing to issue credential: {0}")]
    InvalidBody(String),
    /// Encoding failed (a bug, not the peer).
    #[error("internal credential error: {0}")]
    Internal(String),
}

/// A random 128-bit credential id, printed as 32 hex digits. Revocations can
/// name a single credential by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CredentialId(#[serde(with = "serde_bytes")] [u8; 16]);

impl CredentialId {
    /// A fresh random id.
    pub fn random() -> Self {
        use rand::RngCore;
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        CredentialId(id)
    }

    /// Wraps raw id bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        CredentialId(bytes)
    }

    /// The raw id bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialId({self})")
    }
}

/// A string that is not a credential id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a credential id: expected 32 hex digits (see `postern credential show`)")]
pub struct BadCredentialId(pub String);

impl FromStr for CredentialId {
    type Err = BadCredentialId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 16];
        let t = s.trim();
        if t.len() != 32 || hex::decode_to_slice(t.to_ascii_lowercase(), &mut id).is_err() {
            return Err(BadCredentialId(s.chars().take(64).collect()));
        }
        Ok(CredentialId(id))
    }
}

/// What sort of party a credential is for. It sets the default lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A person (a laptop's inlet). Short-lived credentials.
    Person,
    /// A service (an outlet, a relay, an unattended inlet).
    Service,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Person => "person",
            Kind::Service => "service",
        })
    }
}

/// A string that is not a [`Kind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a kind of member: use \"person\" or \"service\"")]
pub struct BadKind(pub String);

impl FromStr for Kind {
    type Err = BadKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "person" => Ok(Kind::Person),
            "service" => Ok(Kind::Service),
            other => Err(BadKind(other.chars().take(40).collect())),
        }
    }
}

/// The signed content of a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialBody {
    /// Format version: [`CREDENTIAL_VERSION`].
    #[serde(rename = "v")]
    pub version: u8,
    /// Random id, for revocation and the issuance log.
    #[serde(rename = "id")]
    pub id: CredentialId,
    /// Whom the credential describes.
    #[serde(rename = "sub")]
    pub subject: Identifier,
    /// The authority that signed it.
    #[serde(rename = "iss")]
    pub issuer: Identifier,
    /// Person or service.
    #[serde(rename = "kind")]
    pub kind: Kind,
    /// What the authority vouches for.
    #[serde(rename = "attrs")]
    pub attributes: Attributes,
    /// Start of validity (unix seconds).
    #[serde(rename = "iat")]
    pub issued_at: u64,
    /// End of validity (unix seconds).
    #[serde(rename = "exp")]
    pub expires_at: u64,
}

#[derive(Deserialize)]
struct VersionProbe {
    #[serde(rename = "v")]
    version: u8,
}

impl CredentialBody {
    /// Encodes the body as CBOR (the bytes that get signed).
    pub fn encode(&self) -> Result<Vec<u8>, CredentialError> {
        cbor4ii::serde::to_vec(Vec::new(), self)
            .map_err(|e| CredentialError::Internal(format!("CBOR encoding failed: {e}")))
    }

    /// Decodes a body, refusing unknown versions with
    /// [`CredentialError::UnsupportedVersion`]. Does not check any signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, CredentialError> {
        if bytes.len() > MAX_CREDENTIAL_LEN {
            return Err(CredentialError::TooLarge {
                len: bytes.len(),
                max: MAX_CREDENTIAL_LEN,
            });
        }
        let probe: VersionProbe =
            decode_exact(bytes).map_err(|e| CredentialError::Malformed(format!("body: {e}")))?;
        if probe.version != CREDENTIAL_VERSION {
            return Err(CredentialError::UnsupportedVersion {
                found: probe.version,
            });
        }
        decode_exact(bytes).map_err(|e| CredentialError::Malformed(format!("body: {e}")))
    }

    /// When a holder should renew: two thirds of the way through validity.
    pub fn renew_at(&self) -> u64 {
        let life = self.expires_at.saturating_sub(self.issued_at);
        self.issued_at.saturating_add(life / 3 * 2)
    }
}

/// A credential as carried on the wire: the body's exact bytes, the issuer's
/// public key and its signature. Encoded as a CBOR map
/// `{"body": bytes, "key": bytes(32), "sig": bytes(64)}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Envelope", into = "Envelope")]
pub struct SignedCredential {
    body: Vec<u8>,
    issuer_key: [u8; 32],
    signature: [u8; 64],
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    key: [u8; 32],
    #[serde(with = "serde_bytes")]
    sig: [u8; 64],
}

impl TryFrom<Envelope> for SignedCredential {
    type Error = String;
    fn try_from(e: Envelope) -> Result<Self, String> {
        if e.body.len() > MAX_CREDENTIAL_LEN {
            return Err(format!(
                "credential body of {} bytes exceeds the {MAX_CREDENTIAL_LEN}-byte limit",
                e.body.len()
            ));
        }
        Ok(SignedCredential {
            body: e.body,
            issuer_key: e.key,
            signature: e.sig,
        })
    }
}

impl From<SignedCredential> for Envelope {
    fn from(c: SignedCredential) -> Self {
        Envelope {
            body: c.body,
            key: c.issuer_key,
            sig: c.signature,
        }
    }
}

impl SignedCredential {
    /// Encodes the envelope as CBOR for the wire or a file.
    pub fn encode(&self) -> Result<Vec<u8>, CredentialError> {
        cbor4ii::serde::to_vec(Vec::new(), self)
            .map_err(|e| CredentialError::Internal(format!("CBOR encoding failed: {e}")))
    }

    /// Decodes an envelope, checking the size before anything else. Does not
    /// verify it: see [`verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, CredentialError> {
        if bytes.len() > MAX_CREDENTIAL_LEN {
            return Err(CredentialError::TooLarge {
                len: bytes.len(),
                max: MAX_CREDENTIAL_LEN,
            });
        }
        decode_exact(bytes).map_err(|e| CredentialError::Malformed(e.to_string()))
    }

    /// The exact signed body bytes.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body
    }

    /// The issuer's public key as carried in the envelope (not yet trusted).
    pub fn issuer_key(&self) -> &[u8; 32] {
        &self.issuer_key
    }

    /// The signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// The identifier of the key in the envelope (not yet trusted).
    pub fn claimed_issuer(&self) -> Identifier {
        Identifier::from_public_key(&self.issuer_key)
    }

    /// Decodes the body **without verifying anything**, for display (`postern
    /// credential show`) and for a holder inspecting its own credential. Never
    /// base an access decision on this; use [`verify`].
    pub fn inspect_unverified(&self) -> Result<CredentialBody, CredentialError> {
        CredentialBody::decode(&self.body)
    }
}

impl fmt::Debug for SignedCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SignedCredential");
        d.field("issuer", &self.claimed_issuer());
        match self.inspect_unverified() {
            Ok(body) => d
                .field("id", &body.id)
                .field("subject", &body.subject)
                .field("expires_at", &body.expires_at),
            Err(_) => d.field("body_len", &self.body.len()),
        };
        d.finish()
    }
}

/// Signs `body` as `authority`. Refuses a body whose issuer is not
/// `authority`, whose version is not [`CREDENTIAL_VERSION`], whose validity
/// window is empty, or which would exceed [`MAX_CREDENTIAL_LEN`].
pub fn issue(
    authority: &Identity,
    body: &CredentialBody,
) -> Result<SignedCredential, CredentialError> {
    if body.issuer != authority.identifier() {
        return Err(CredentialError::InvalidBody(format!(
            "body names issuer {} but the signing identity is {}",
            body.issuer,
            authority.identifier()
        )));
    }
    if body.version != CREDENTIAL_VERSION {
        return Err(CredentialError::InvalidBody(format!(
            "version {} is not {CREDENTIAL_VERSION}",
            body.version
        )));
    }
    if body.expires_at <= body.issued_at {
        return Err(CredentialError::InvalidBody(
            "expires_at must be after issued_at".into(),
        ));
    }
    let bytes = body.encode()?;
    let signed = sign_bytes(authority, bytes);
    let len = signed.encode()?.len();
    if len > MAX_CREDENTIAL_LEN {
        return Err(CredentialError::TooLarge {
            len,
            max: MAX_CREDENTIAL_LEN,
        });
    }
    Ok(signed)
}

/// Signs arbitrary body bytes (no checks). Crate-internal: tests use it to
/// build credentials that [`issue`] would refuse.
pub(crate) fn sign_bytes(authority: &Identity, body: Vec<u8>) -> SignedCredential {
    let signature = authority.sign(SIGNATURE_LABEL, &body);
    SignedCredential {
        body,
        issuer_key: *authority.public().as_bytes(),
        signature,
    }
}

/// The authorities a node trusts, by identifier. A credential's envelope
/// carries the issuer's public key; it is accepted only if the key hashes to
/// one of these identifiers (the same 160-bit binding that pins peers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedAuthorities {
    ids: BTreeSet<Identifier>,
}

impl TrustedAuthorities {
    /// An empty set: every credential is refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an authority by identifier.
    pub fn insert(&mut self, authority: Identifier) {
        self.ids.insert(authority);
    }

    /// Adds an authority by its public key.
    pub fn insert_key(&mut self, authority: &PublicIdentity) {
        self.ids.insert(authority.identifier());
    }

    /// Whether `authority` is trusted.
    pub fn contains(&self, authority: &Identifier) -> bool {
        self.ids.contains(authority)
    }

    /// Whether no authority is trusted.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The trusted identifiers, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &Identifier> {
        self.ids.iter()
    }
}

impl FromIterator<Identifier> for TrustedAuthorities {
    fn from_iter<I: IntoIterator<Item = Identifier>>(iter: I) -> Self {
        TrustedAuthorities {
            ids: iter.into_iter().collect(),
        }
    }
}

/// What a revocation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RevocationTarget {
    /// One credential.
    Credential(CredentialId),
    /// Every credential of one identity.
    Identity(Identifier),
}

impl fmt::Display for RevocationTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RevocationTarget::Credential(id) => write!(f, "credential {id}"),
            RevocationTarget::Identity(id) => write!(f, "identity {id}"),
        }
    }
}

/// A string that is neither an identifier nor a credential id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither an identifier (P followed by 40 hex digits) nor a credential id (32 hex digits)")]
pub struct BadRevocationTarget(pub String);

impl FromStr for RevocationTarget {
    type Err = BadRevocationTarget;
    /// Parses `P` + 40 hex digits as an identity, 32 hex digits as a
    /// credential id.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(id) = s.parse::<Identifier>() {
            return Ok(RevocationTarget::Identity(id));
        }
        if let Ok(id) = s.parse::<CredentialId>() {
            return Ok(RevocationTarget::Credential(id));
        }
        Err(BadRevocationTarget(s.chars().take(64).collect()))
    }
}

/// A revocation: what, and when (unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// What is revoked.
    pub target: RevocationTarget,
    /// When the authority revoked it.
    pub revoked_at: u64,
}

impl fmt::Display for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} was revoked at {}",
            self.target,
            format_timestamp(self.revoked_at)
        )
    }
}

/// A source of revocations consulted by [`verify`].
pub trait RevocationCheck {
    /// The revocation that applies to a credential with this id and subject,
    /// if any.
    fn revocation(&self, id: &CredentialId, subject: &Identifier) -> Option<Revocation>;

    /// The revocation of `subject` itself (every credential of it, and the
    /// identity wherever it is admitted without one), if any.
    fn identity_revocation(&self, subject: &Identifier) -> Option<Revocation>;
}

/// A [`RevocationCheck`] that revokes nothing (for nodes that do not yet
/// receive revocations, and for tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRevocations;

impl RevocationCheck for NoRevocations {
    fn revocation(&self, _: &CredentialId, _: &Identifier) -> Option<Revocation> {
        None
    }

    fn identity_revocation(&self, _: &Identifier) -> Option<Revocation> {
        None
    }
}

/// An in-memory set of revocations, as a node holds what its authority
/// published. Entries carry the authority's sequence number so a node can ask
/// for what it missed ([`RevocationList::latest_seq`]).
#[derive(Debug, Clone, Default)]
pub struct RevocationList {
    entries: BTreeMap<RevocationTarget, u64>,
    latest_seq: u64,
}

/// A revocation with its position in the authority's log (1, 2, 3, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationEntry {
    /// Position in the authority's revocation log; strictly increasing.
    pub seq: u64,
    /// The revocation.
    pub revocation: Revocation,
}

impl RevocationList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a revocation (keeping the earliest time if already present).
    pub fn insert(&mut self, revocation: Revocation) {
        self.entries
            .entry(revocation.target)
            .and_modify(|t| *t = (*t).min(revocation.revoked_at))
            .or_insert(revocation.revoked_at);
    }

    /// Adds entries from the authority's log and advances
    /// [`RevocationList::latest_seq`].
    pub fn apply(&mut self, entries: impl IntoIterator<Item = RevocationEntry>) {
        for e in entries {
            self.insert(e.revocation);
            self.latest_seq = self.latest_seq.max(e.seq);
        }
    }

    /// The highest log position applied so far (0 if none).
    pub fn latest_seq(&self) -> u64 {
        self.latest_seq
    }

    /// The revocation of `target`, if any.
    pub fn get(&self, target: &RevocationTarget) -> Option<Revocation> {
        self.entries.get(target).map(|&revoked_at| Revocation {
            target: *target,
            revoked_at,
        })
    }

    /// Number of revoked targets.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl RevocationCheck for RevocationList {
    fn revocation(&self, id: &CredentialId, subject: &Identifier) -> Option<Revocation> {
        self.get(&RevocationTarget::Credential(*id))
            .or_else(|| self.identity_revocation(subject))
    }

    fn identity_revocation(&self, subject: &Identifier) -> Option<Revocation> {
        self.get(&RevocationTarget::Identity(*subject))
    }
}

/// A credential that passed [`verify`]. It can only be made by verification,
/// so holding one means its attributes were vouched for by a trusted
/// authority for this peer at the time of the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCredential {
    body: CredentialBody,
    signed: SignedCredential,
}

impl VerifiedCredential {
    /// The credential id.
    pub fn id(&self) -> CredentialId {
        self.body.id
    }
    /// The subject (equal to the authenticated peer).
    pub fn subject(&self) -> Identifier {
        self.body.subject
    }
    /// The trusted authority that issued it.
    pub fn issuer(&self) -> Identifier {
        self.body.issuer
    }
    /// Person or service.
    pub fn kind(&self) -> Kind {
        self.body.kind
    }
    /// The vouched-for attributes.
    pub fn attributes(&self) -> &Attributes {
        &self.body.attributes
    }
    /// Start of validity.
    pub fn issued_at(&self) -> u64 {
        self.body.issued_at
    }
    /// End of validity.
    pub fn expires_at(&self) -> u64 {
        self.body.expires_at
    }
    /// The whole decoded body.
    pub fn body(&self) -> &CredentialBody {
        &self.body
    }
    /// The signed form, to present again or forward.
    pub fn signed(&self) -> &SignedCredential {
        &self.signed
    }

    /// Re-checks time and revocation for a live channel (after a revocation
    /// arrives, or periodically so an expired credential closes its tunnels).
    pub fn check_still_valid(
        &self,
        now: u64,
        revocations: &dyn RevocationCheck,
    ) -> Result<(), CredentialError> {
        check_time(&self.body, now)?;
        check_revocation(&self.body, revocations)
    }
}

/// Verifies a credential presented by the peer that authenticated as
/// `expected_subject`, at time `now` (unix seconds). See the module
/// documentation for what is checked and in which order.
pub fn verify(
    credential: &SignedCredential,
    trusted: &TrustedAuthorities,
    expected_subject: Identifier,
    now: u64,
    revocations: &dyn RevocationCheck,
) -> Result<VerifiedCredential, CredentialError> {
    let issuer = credential.claimed_issuer();
    if !trusted.contains(&issuer) {
        return Err(CredentialError::UntrustedIssuer {
            issuer,
            trusted: trusted.iter().copied().collect(),
        });
    }
    let key = PublicIdentity::from_bytes(&credential.issuer_key)
        .ok_or(CredentialError::BadSignature { issuer })?;
    if !key.verify(SIGNATURE_LABEL, &credential.body, &credential.signature) {
        return Err(CredentialError::BadSignature { issuer });
    }
    let body = CredentialBody::decode(&credential.body)?;
    if body.issuer != issuer {
        return Err(CredentialError::Malformed(format!(
            "body names issuer {} but was signed by {issuer}",
            body.issuer
        )));
    }
    if body.subject != expected_subject {
        return Err(CredentialError::SubjectMismatch {
            subject: body.subject,
            peer: expected_subject,
        });
    }
    check_time(&body, now)?;
    check_revocation(&body, revocations)?;
    Ok(VerifiedCredential {
        body,
        signed: credential.clone(),
    })
}

fn check_time(body: &CredentialBody, now: u64) -> Result<(), CredentialError> {
    if now < body.issued_at.saturating_sub(CLOCK_SKEW_SECS) {
        return Err(CredentialError::NotYetValid {
            issued_at: body.issued_at,
            now,
        });
    }
    if now > body.expires_at.saturating_add(CLOCK_SKEW_SECS) {
        return Err(CredentialError::Expired {
            expires_at: body.expires_at,
            now,
        });
    }
    Ok(())
}

fn check_revocation(
    body: &CredentialBody,
    revocations: &dyn RevocationCheck,
) -> Result<(), CredentialError> {
    match revocations.revocation(&body.id, &body.subject) {
        Some(revocation) => Err(CredentialError::Revoked { revocation }),
        None => Ok(()),
    }
}

/// Why [`decode_exact`] failed.
pub(crate) enum CborFail {
    /// The input ended in the middle of a value.
    Truncated,
    /// Anything else (wrong types, bad structure, trailing bytes).
    Invalid(String),
}

impl fmt::Display for CborFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CborFail::Truncated => f.write_str("input ends too early"),
            CborFail::Invalid(reason) => f.write_str(reason),
        }
    }
}

/// Decodes exactly one CBOR value filling all of `bytes`: truncation is told
/// apart from other errors, and trailing bytes are refused. Nesting is limited
/// by `cbor4ii` (256 levels).
pub(crate) fn decode_exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CborFail> {
    use cbor4ii::core::error::DecodeError as Core;
    let mut rest = bytes;
    let value = cbor4ii::serde::from_reader(&mut rest).map_err(|e| match e {
        cbor4ii::serde::DecodeError::Core(Core::Eof { .. }) => CborFail::Truncated,
        other => CborFail::Invalid(other.to_string()),
    })?;
    if !rest.is_empty() {
        return Err(CborFail::Invalid(format!(
            "{} unexpected bytes after the end",
            rest.len()
        )));
    }
    Ok(value)
}

fn list_identifiers(ids: &[Identifier]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter()
        .map(Identifier::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

pub use crate::time::format_timestamp;

/// Formats a number of seconds for people: `45s`, `12m 5s`, `3h 20m`,
/// `2d 4h`.
pub fn format_duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AttrValue;

    const NOW: u64 = 1_700_000_000;

    fn body(authority: &Identity, subject: Identifier) -> CredentialBody {
        let mut attributes = Attributes::new();
        attributes.insert("role".into(), AttrValue::One("analyst".into()));
        attributes.insert(
            "groups".into(),
            AttrValue::Many(vec!["a".into(), "b".into()]),
        );
        CredentialBody {
            version: CREDENTIAL_VERSION,
            id: CredentialId::random(),
            subject,
            issuer: authority.identifier(),
            kind: Kind::Person,
            attributes,
            issued_at: NOW,
            expires_at: NOW + 8 * 3600,
        }
    }

    fn trusting(a: &Identity) -> TrustedAuthorities {
        [a.identifier()].into_iter().collect()
    }

    #[test]
    fn issue_verify_round_trip() {
        let authority = Identity::generate();
        let subject = Identity::generate().identifier();
        let b = body(&authority, subject);
        let signed = issue(&authority, &b).unwrap();
        let wire = signed.encode().unwrap();
        let back = SignedCredential::decode(&wire).unwrap();
        assert_eq!(back, signed);
        let v = verify(&back, &trusting(&authority), subject, NOW, &NoRevocations).unwrap();
        assert_eq!(v.body(), &b);
        assert_eq!(v.attributes()["groups"], b.attributes["groups"]);
        assert_eq!(v.signed(), &signed);
    }

    #[test]
    fn every_refusal_has_its_own_error() {
        let authority = Identity::generate();
        let subject = Identity::generate().identifier();
        let b = body(&authority, subject);
        let signed = issue(&authority, &b).unwrap();
        let trusted = trusting(&authority);

        // Forged: body altered after signing.
        let mut forged = signed.clone();
        let last = forged.body.len() - 1;
        forged.body[last] ^= 1;
        let err = verify(&forged, &trusted, subject, NOW, &NoRevocations).unwrap_err();
        assert!(matches!(err, CredentialError::BadSignature { .. }), "{err}");
        assert!(err.to_string().contains("forged"));

        // Forged: signed by another key but carrying the trusted key.
        let mallory = Identity::generate();
        let mut b2 = b.clone();
        b2.issuer = mallory.identifier();
        let mut stolen_key = issue(&mallory, &b2).unwrap();
        stolen_key.issuer_key = *authority.public().as_bytes();
        let err = verify(&stolen_key, &trusted, subject, NOW, &NoRevocations).unwrap_err();
        assert!(matches!(err, CredentialError::BadSignature { .. }), "{err}");

        // Untrusted issuer.
        let err = verify(
            &issue(&mallory, &b2).unwrap(),
            &trusted,
            subject,
            NOW,
            &NoRevocations,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CredentialError::UntrustedIssuer { .. }));
        assert!(text.contains(&mallory.identifier().to_string()), "{text}");
        assert!(text.contains(&authority.identifier().to_string()), "{text}");
        assert!(text.contains("does not trust"), "{text}");

        // Subject mismatch.
        let other = Identity::generate().identifier();
        let err = verify(&signed, &trusted, other, NOW, &NoRevocations).unwrap_err();
        assert_eq!(
            err,
            CredentialError::SubjectMismatch {
                subject,
                peer: other
            }
        );

        // Time, with 60 s of skew either side.
        let ok = |now| verify(&signed, &trusted, subject, now, &NoRevocations);
        assert!(ok(NOW - 60).is_ok());
        assert!(ok(b.expires_at + 60).is_ok());
        let err = ok(NOW - 61).unwrap_err();
        assert!(matches!(err, CredentialError::NotYetValid { .. }), "{err}");
        assert!(err.to_string().contains("check the clock"));
        let err = ok(b.expires_at + 3600).unwrap_err();
        assert!(matches!(err, CredentialError::Expired { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("postern enroll") && text.contains("1h 0m ago"),
            "{text}"
        );
        assert!(text.contains("2023-11-15 06:13:20 UTC"), "{text}");

        // Revoked, by credential id and by subject.
        let mut list = RevocationList::new();
        list.insert(Revocation {
            target: RevocationTarget::Credential(b.id),
            revoked_at: NOW + 5,
        });
        let err = verify(&signed, &trusted, subject, NOW, &list).unwrap_err();
        assert!(matches!(err, CredentialError::Revoked { .. }), "{err}");
        assert!(err.to_string().contains(&b.id.to_string()));
        let mut list = RevocationList::new();
        list.apply([RevocationEntry {
            seq: 4,
            revocation: Revocation {
                target: RevocationTarget::Identity(subject),
                revoked_at: NOW + 5,
            },
        }]);
        assert_eq!(list.latest_seq(), 4);
        let err = verify(&signed, &trusted, subject, NOW, &list).unwrap_err();
        assert!(err.to_string().contains(&subject.to_string()), "{err}");

        // A live credential notices later expiry and revocation.
        let v = verify(&signed, &trusted, subject, NOW, &NoRevocations).unwrap();
        assert!(v.check_still_valid(NOW + 10, &NoRevocations).is_ok());
        assert!(v.check_still_valid(NOW + 10, &list).is_err());
        assert!(v
            .check_still_valid(b.expires_at + 61, &NoRevocations)
            .is_err());
    }

    #[test]
    fn unknown_version_and_issuer_mismatch_are_refused_even_when_signed() {
        let authority = Identity::generate();
        let subject = Identity::generate().identifier();
        let trusted = trusting(&authority);
        let mut b = body(&authority, subject);
        b.version = 2;
        assert!(matches!(
            issue(&authority, &b),
            Err(CredentialError::InvalidBody(_))
        ));
        let signed = sign_bytes(&authority, b.encode().unwrap());
        let err = verify(&signed, &trusted, subject, NOW, &NoRevocations).unwrap_err();
        assert_eq!(err, CredentialError::UnsupportedVersion { found: 2 });

        // A v2 body with a different shape still reports the version.
        #[derive(Serialize)]
        struct Future {
            v: u8,
            something: Vec<u32>,
        }
        let bytes = cbor4ii::serde::to_vec(
            Vec::new(),
            &Future {
                v: 9,
                something: vec![1],
            },
        )
        .unwrap();
        let signed = sign_bytes(&authority, bytes);
        let err = verify(&signed, &trusted, subject, NOW, &NoRevocations).unwrap_err();
        assert_eq!(err, CredentialError::UnsupportedVersion { found: 9 });

        // Body names another issuer than the signing key.
        let mut b = body(&authority, subject);
        b.issuer = subject;
        let signed = sign_bytes(&authority, b.encode().unwrap());
        let err = verify(&signed, &trusted, subject, NOW, &NoRevocations).unwrap_err();
        assert!(matches!(err, CredentialError::Malformed(_)), "{err}");

        // Extra fields in a signed v1 body are refused.
        #[derive(Serialize)]
        struct Extra<'a> {
            #[serde(flatten)]
            body: &'a CredentialBody,
            extra: u8,
        }
        let b = body(&authority, subject);
        let bytes = cbor4ii::serde::to_vec(Vec::new(), &Extra { body: &b, extra: 1 }).unwrap();
        let signed = sign_bytes(&authority, bytes);
        let err = verify(&signed, &trusted, subject, NOW, &NoRevocations).unwrap_err();
        assert!(matches!(err, CredentialError::Malformed(_)), "{err}");
    }

    #[test]
    fn issue_refuses_inconsistent_bodies() {
        let authority = Identity::generate();
        let subject = Identity::generate().identifier();
        let mut b = body(&authority, subject);
        b.issuer = subject;
        assert!(matches!(
            issue(&authority, &b),
            Err(CredentialError::InvalidBody(_))
        ));
        let mut b = body(&authority, subject);
        b.expires_at = b.issued_at;
        assert!(matches!(
            issue(&authority, &b),
            Err(CredentialError::InvalidBody(_))
        ));
        let mut b = body(&authority, subject);
        b.attributes
            .insert("big".into(), AttrValue::One("x".repeat(MAX_CREDENTIAL_LEN)));
        assert!(matches!(
            issue(&authority, &b),
            Err(CredentialError::TooLarge { .. })
        ));
    }

    #[test]
    fn hostile_bytes_are_errors() {
        let big = vec![0u8; MAX_CREDENTIAL_LEN + 1];
        assert!(matches!(
            SignedCredential::decode(&big),
            Err(CredentialError::TooLarge { .. })
        ));
        let inputs: [&[u8]; 6] = [
            &[],
            &[0xff],
            &[0x9f; 4096],
            &[0xbf, 0x61],
            &[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[0xa1, 0x61, 0x76, 0x18, 0xff],
        ];
        for input in inputs {
            assert!(SignedCredential::decode(input).is_err());
            assert!(CredentialBody::decode(input).is_err());
        }
        // Truncations of a valid credential never decode to something else.
        let authority = Identity::generate();
        let signed = issue(&authority, &body(&authority, authority.identifier())).unwrap();
        let wire = signed.encode().unwrap();
        for cut in 0..wire.len() {
            assert!(SignedCredential::decode(&wire[..cut]).is_err(), "{cut}");
        }
        let mut trailing = wire.clone();
        trailing.push(0);
        assert!(SignedCredential::decode(&trailing).is_err());
        let mut body_bytes = signed.body_bytes().to_vec();
        body_bytes.push(0);
        assert!(CredentialBody::decode(&body_bytes).is_err());
    }

    #[test]
    fn ids_targets_kinds_parse() {
        let id = CredentialId::random();
        assert_eq!(id.to_string().parse::<CredentialId>(), Ok(id));
        assert!("abc".parse::<CredentialId>().is_err());
        let ident = Identity::generate().identifier();
        assert_eq!(
            ident.to_string().parse::<RevocationTarget>(),
            Ok(RevocationTarget::Identity(ident))
        );
        assert_eq!(
            id.to_string().parse::<RevocationTarget>(),
            Ok(RevocationTarget::Credential(id))
        );
        assert!("nope".parse::<RevocationTarget>().is_err());
        assert_eq!("service".parse::<Kind>(), Ok(Kind::Service));
        assert!("robot".parse::<Kind>().is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(format_timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_timestamp(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_timestamp(1_700_000_000), "2023-11-14 22:13:20 UTC");
        let _ = format_timestamp(u64::MAX);
        assert_eq!(format_duration(45), "45s");
        assert_eq!(format_duration(3600), "1h 0m");
        assert_eq!(format_duration(90_000), "1d 1h");
        let b = CredentialBody {
            version: 1,
            id: CredentialId::from_bytes([0; 16]),
            subject: Identity::generate().identifier(),
            issuer: Identity::generate().identifier(),
            kind: Kind::Service,
            attributes: Attributes::new(),
            issued_at: 300,
            expires_at: 600,
        };
        assert_eq!(b.renew_at(), 500);
    }
}
