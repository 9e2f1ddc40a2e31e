use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::IdentityError;

/// Number of hash bytes kept in an identifier (160 bits).
pub(crate) const IDENTIFIER_LEN: usize = 20;
const DOMAIN: &[u8] = b"postern identifier v1\0";

/// The public name of an identity: the first 160 bits of
/// `SHA-256("postern identifier v1\0" || ed25519_public_key)`, printed as `P`
/// followed by 40 lower-case hex digits.
///
/// An identifier says nothing by itself; a peer proves it holds the matching
/// key during a handshake.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identifier([u8; IDENTIFIER_LEN]);

impl Identifier {
    /// Derives the identifier of an Ed25519 public key.
    pub fn from_public_key(key: &[u8; 32]) -> Self {
        let digest = Sha256::new()
            .chain_update(DOMAIN)
            .chain_update(key)
            .finalize();
        let mut id = [0u8; IDENTIFIER_LEN];
        id.copy_from_slice(&digest[..IDENTIFIER_LEN]);
        Identifier(id)
    }

    /// The raw identifier bytes.
    pub fn as_bytes(&self) -> &[u8; IDENTIFIER_LEN] {
        &self.0
    }

    /// A short form for logs (`P` + first 8 hex digits). Not unique; never use
    /// it for decisions.
    pub fn short(&self) -> String {
        format!("P{}", hex::encode(&self.0[..4]))
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Into a buffer on the stack: identifiers are printed in every log
        // line and audit reason.
        let mut text = [b'P'; 1 + 2 * IDENTIFIER_LEN];
        hex::encode_to_slice(self.0, &mut text[1..]).map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Identifier {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || IdentityError::MalformedIdentifier {
            input: s.chars().take(64).collect(),
        };
        let hex_part = s.trim().strip_prefix('P').ok_or_else(malformed)?;
        if hex_part.len() != IDENTIFIER_LEN * 2 {
            return Err(malformed());
        }
        let mut id = [0u8; IDENTIFIER_LEN];
        hex::decode_to_slice(hex_part.to_ascii_lowercase(), &mut id).map_err(|_| malformed())?;
        Ok(Identifier(id))
    }
}

impl Serialize for Identifier {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identifier {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let id = Identifier::from_public_key(&[7u8; 32]);
        let text = id.to_string();
        assert!(text.starts_with('P'));
        assert_eq!(text.len(), 41);
        assert_eq!(text.parse::<Identifier>().ok(), Some(id));
        assert_eq!(text.to_uppercase().parse::<Identifier>().ok(), Some(id));
    }

    #[test]
    fn known_answer() {
        // SHA-256("postern identifier v1\0" || 32 zero bytes), first 20 bytes.
        let id = Identifier::from_public_key(&[0u8; 32]);
        let digest = Sha256::new()
            .chain_update(DOMAIN)
            .chain_update([0u8; 32])
            .finalize();
        assert_eq!(id.to_string(), format!("P{}", hex::encode(&digest[..20])));
        assert_ne!(id, Identifier::from_public_key(&[1u8; 32]));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "P",
            "X0000000000000000000000000000000000000000",
            "P00",
            "Pzz00000000000000000000000000000000000000",
            "P00000000000000000000000000000000000000000",
        ] {
            let err = bad.parse::<Identifier>().err();
            assert!(
                matches!(err, Some(IdentityError::MalformedIdentifier { .. })),
                "{bad:?}"
            );
        }
    }
}
