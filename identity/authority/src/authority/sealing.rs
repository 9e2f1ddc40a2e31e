//! OpenID Connect refresh tokens at rest: sealed with XChaCha20-Poly1305
//! under a key derived from the authority's own identity
//! ([`Identity::derive_key`], HKDF-SHA256 with [`TOKEN_KEY_PURPOSE`]), bound
//! to the member they belong to. A refresh token lets whoever holds it ask
//! the provider for a person's fresh ID token; sealed, the store file (its
//! backups, a copy left on a disk) is worth nothing without the
//! authority's key, which the authority holds anyway.
//!
//! Records written before tokens were sealed hold them in clear
//! ([`StoredToken::Plain`]); [`super::Authority::new`] seals them and has
//! the store rewrite itself ([`super::AuthorityStore::rewrite`]) so that the
//! clear bytes are gone from its file.

use std::fmt;

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{Key, KeyInit, XChaCha20Poly1305, XNonce};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::AuthorityError;
use crate::oidc::SecretString;
use postern_identity::{Identifier, Identity};

/// The HKDF label of the key that seals refresh tokens.
pub const TOKEN_KEY_PURPOSE: &[u8] = b"postern authority refresh tokens v1";

/// Additional data of every sealed token: this label and the member's
/// identifier, so a sealed token moved to another member's record does not
/// open.
const AAD_LABEL: &[u8] = b"postern refresh token of ";

/// A refresh token as the store keeps it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StoredToken {
    /// Sealed under the authority's token key.
    Sealed(SealedToken),
    /// In clear, as Postern stored tokens before they were sealed; sealed
    /// when the authority next starts.
    Plain(SecretString),
}

impl fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoredToken::Sealed(_) => f.write_str("Sealed(..)"),
            StoredToken::Plain(_) => f.write_str("Plain([redacted])"),
        }
    }
}

/// A sealed refresh token: a random 24-byte nonce and the ciphertext with
/// its tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedToken {
    #[serde(with = "serde_bytes")]
    nonce: [u8; 24],
    #[serde(with = "serde_bytes")]
    sealed: Vec<u8>,
}

/// The key that seals the refresh tokens of one authority.
pub(crate) struct TokenKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey([redacted])")
    }
}

fn aad(member: &Identifier) -> Vec<u8> {
    [AAD_LABEL, member.as_bytes().as_slice()].concat()
}

impl TokenKey {
    /// The token key of the authority `identity`.
    pub(crate) fn derive(identity: &Identity) -> Self {
        TokenKey(identity.derive_key(TOKEN_KEY_PURPOSE))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&self.0[..]))
    }

    /// Seals `member`'s refresh token.
    pub(crate) fn seal(
        &self,
        member: &Identifier,
        token: &SecretString,
    ) -> Result<StoredToken, AuthorityError> {
        let mut nonce = [0u8; 24];
        OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: token.expose().as_bytes(),
                    aad: &aad(member),
                },
            )
            .map_err(|_| AuthorityError::Internal("sealing a refresh token failed".into()))?;
        Ok(StoredToken::Sealed(SealedToken { nonce, sealed }))
    }

    /// Opens `member`'s stored refresh token (a plain one as it is).
    pub(crate) fn open(
        &self,
        member: &Identifier,
        stored: &StoredToken,
    ) -> Result<SecretString, AuthorityError> {
        let sealed = match stored {
            StoredToken::Plain(token) => return Ok(token.clone()),
            StoredToken::Sealed(sealed) => sealed,
        };
        let unreadable = || {
            AuthorityError::OidcLoginRequired {
                subject: *member,
                reason: "its stored login does not open with this authority's key (the store was written by another authority, or altered)".into(),
            }
        };
        let plain = Zeroizing::new(
            self.cipher()
                .decrypt(
                    XNonce::from_slice(&sealed.nonce),
                    Payload {
                        msg: &sealed.sealed,
                        aad: &aad(member),
                    },
                )
                .map_err(|_| unreadable())?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| unreadable())?;
        Ok(SecretString::new(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_open_only_for_their_member_under_their_authoritys_key() {
        let authority = Identity::generate();
        let key = TokenKey::derive(&authority);
        let (alice, bob) = (
            Identity::generate().identifier(),
            Identity::generate().identifier(),
        );
        let token = SecretString::new("rt-very-secret-refresh-token");
        let sealed = key.seal(&alice, &token).unwrap();
        assert_eq!(key.open(&alice, &sealed).unwrap(), token);
        let bytes = postern_identity::wire::encode(&sealed).unwrap();
        assert!(
            !bytes.windows(8).any(|w| w == b"rt-very-"),
            "the token is in the sealed record"
        );
        assert!(!format!("{sealed:?}").contains("rt-very"));
        // Moved to another member, or opened by another authority: refused.
        assert!(key.open(&bob, &sealed).is_err());
        let other = TokenKey::derive(&Identity::generate());
        assert!(other.open(&alice, &sealed).is_err());
        // Sealing twice gives different ciphertexts.
        assert_ne!(key.seal(&alice, &token).unwrap(), sealed);
        // A record from before sealing reads as it was.
        let legacy: StoredToken =
            postern_identity::wire::decode(&postern_identity::wire::encode(&"rt-old").unwrap())
                .unwrap();
        assert!(matches!(legacy, StoredToken::Plain(_)));
        assert_eq!(key.open(&alice, &legacy).unwrap().expose(), "rt-old");
        let back: StoredToken = postern_identity::wire::decode(&bytes).unwrap();
        assert_eq!(back, sealed);
    }
}
