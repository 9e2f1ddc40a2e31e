use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::rngs::OsRng;

use crate::Identifier;

/// An Ed25519 key pair that names a Postern party. The secret half is zeroized
/// on drop and never printed.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
    identifier: Identifier,
}

impl Identity {
    /// Generates a new random identity. Only `postern identity create` (or an
    /// explicit call from an embedding program) should do this: Postern never
    /// invents an identity silently.
    pub fn generate() -> Self {
        Self::from_secret_bytes(&SigningKey::generate(&mut OsRng).to_bytes())
    }

    /// Rebuilds an identity from its 32 secret bytes.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(secret);
        let identifier = Identifier::from_public_key(key.verifying_key().as_bytes());
        Identity { key, identifier }
    }

    /// The secret bytes, for storage in a key file only.
    pub(crate) fn secret_bytes(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.key.to_bytes())
    }

    /// This identity's identifier.
    pub fn identifier(&self) -> Identifier {
        self.identifier
    }

    /// The public half.
    pub fn public(&self) -> PublicIdentity {
        PublicIdentity {
            key: self.key.verifying_key(),
            identifier: self.identifier,
        }
    }

    /// Signs `message` prefixed with a domain-separation `label`.
    pub fn sign(&self, label: &[u8], message: &[u8]) -> [u8; 64] {
        self.key.sign(&labelled(label, message)).to_bytes()
    }

    /// A 32-byte symmetric key for `purpose`, derived from the secret key
    /// with HKDF-SHA256 (RFC 5869: no salt, `purpose` as the info), so that
    /// whoever holds the identity can encrypt data at rest without a key
    /// of its own. Different purposes give independent keys; the key says
    /// nothing about the identity's secret. Give every use its own
    /// versioned label (`b"postern … v1"`).
    pub fn derive_key(&self, purpose: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
        hkdf_sha256(&self.secret_bytes()[..], purpose)
    }
}

/// HKDF-SHA256 (RFC 5869) with an empty salt and one output block.
fn hkdf_sha256(ikm: &[u8], info: &[u8]) -> zeroize::Zeroizing<[u8; 32]> {
    use hmac::digest::{FixedOutput, KeyInit, Update};
    type HmacSha256 = hmac::Hmac<sha2::Sha256>;
    // HMAC pads a key shorter than the hash's 64-byte block with zeros, so
    // a 32-byte key zero-extended to a block is that same key; and an empty
    // salt is a key of zeros (RFC 5869 §2.2).
    let keyed = |key: &[u8; 32]| {
        let mut block = zeroize::Zeroizing::new([0u8; 64]);
        block[..32].copy_from_slice(key);
        <HmacSha256 as KeyInit>::new(&(*block).into())
    };
    let mut extract = keyed(&[0; 32]);
    extract.update(ikm);
    let prk = zeroize::Zeroizing::new(<[u8; 32]>::from(extract.finalize_fixed()));
    let mut expand = keyed(&prk);
    expand.update(info);
    expand.update(&[1]);
    zeroize::Zeroizing::new(<[u8; 32]>::from(expand.finalize_fixed()))
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("identifier", &self.identifier)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The public half of an identity, as a peer presents it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicIdentity {
    key: VerifyingKey,
    identifier: Identifier,
}

impl PublicIdentity {
    /// Parses a 32-byte Ed25519 public key. Fails on bytes that are not a
    /// valid curve point.
    pub fn from_bytes(bytes: &[u8; 32]) -> Option<Self> {
        let key = VerifyingKey::from_bytes(bytes).ok()?;
        if key.is_weak() {
            return None;
        }
        Some(PublicIdentity {
            key,
            identifier: Identifier::from_public_key(bytes),
        })
    }

    /// The raw public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }

    /// The identifier derived from this key.
    pub fn identifier(&self) -> Identifier {
        self.identifier
    }

    /// Verifies a signature made by [`Identity::sign`] with the same label.
    /// Uses strict verification (no malleable signatures, no small-order keys).
    pub fn verify(&self, label: &[u8], message: &[u8], signature: &[u8; 64]) -> bool {
        let sig = Signature::from_bytes(signature);
        self.key
            .verify_strict(&labelled(label, message), &sig)
            .is_ok()
    }
}

impl fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicIdentity({})", self.identifier)
    }
}

fn labelled(label: &[u8], message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len() + 1 + message.len());
    out.extend_from_slice(label);
    out.push(0);
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_with_labels() {
        let id = Identity::generate();
        let sig = id.sign(b"label-a", b"message");
        assert!(id.public().verify(b"label-a", b"message", &sig));
        assert!(!id.public().verify(b"label-b", b"message", &sig));
        assert!(!id.public().verify(b"label-a", b"messagE", &sig));
        let other = Identity::generate();
        assert!(!other.public().verify(b"label-a", b"message", &sig));
    }

    #[test]
    fn debug_redacts_secret() {
        let id = Identity::generate();
        let secret_hex = hex::encode(*id.secret_bytes());
        let dbg = format!("{id:?}");
        assert!(!dbg.contains(&secret_hex));
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn derived_keys_follow_rfc_5869_and_differ_by_purpose() {
        // RFC 5869, test case 3 (empty salt, empty info): the first 32 bytes.
        let okm = hkdf_sha256(&[0x0b; 22], b"");
        assert_eq!(
            hex::encode(*okm),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
        );
        let id = Identity::generate();
        let a = id.derive_key(b"postern test a v1");
        assert_eq!(*a, *id.derive_key(b"postern test a v1"));
        assert_ne!(*a, *id.derive_key(b"postern test b v1"));
        assert_ne!(*a, *Identity::generate().derive_key(b"postern test a v1"));
        assert_ne!(&a[..], &id.secret_bytes()[..]);
    }

    #[test]
    fn round_trip_secret() {
        let id = Identity::generate();
        let again = Identity::from_secret_bytes(&id.secret_bytes());
        assert_eq!(id.identifier(), again.identifier());
        assert_eq!(
            PublicIdentity::from_bytes(id.public().as_bytes()),
            Some(id.public())
        );
    }
}
