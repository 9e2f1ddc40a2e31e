//! Secret keys at rest: ChaCha20-Poly1305 under a key derived from a
//! passphrase (Argon2id) or taken from a 32-byte key held in a file or an
//! environment variable (for unattended services).
//!
//! A sealed secret is stored as: protection kind, KDF parameters, a random
//! 16-byte salt, a random 12-byte nonce, a 16-byte key check and the
//! ciphertext with its tag. From the 32-byte *master key* (Argon2id output,
//! or `SHA-256("postern sealed key v1\0" || salt || key)` for a raw key) two
//! values are derived by domain-separated SHA-256: the encryption key and the
//! key check. The key check lets a wrong passphrase be told apart from a
//! damaged file without weakening anything (the AEAD tag already lets an
//! attacker test guesses; the Argon2id cost is what slows them down).
//!
//! The associated data binds the caller's context (the key file binds the
//! identifier and public key) plus the protection kind and KDF parameters, so
//! a ciphertext moved into another file does not decrypt there.
//!
//! [`crate::keyfile`] uses this for identity files; nothing here touches
//! identity files directly.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Argon2id parameters: memory in KiB, iterations, lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Number of passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl KdfParams {
    /// What new files use: 19 MiB, 2 passes, 1 lane (OWASP's Argon2id
    /// baseline). Also the minimum accepted for sealing.
    pub const DEFAULT: KdfParams = KdfParams {
        memory_kib: 19 * 1024,
        iterations: 2,
        parallelism: 1,
    };
    /// Upper bounds accepted when *opening*, so a crafted file cannot make a
    /// load take gigabytes or minutes: 1 GiB, 64 passes, 16 lanes.
    pub const MAX: KdfParams = KdfParams {
        memory_kib: 1024 * 1024,
        iterations: 64,
        parallelism: 16,
    };

    fn within_max(&self) -> bool {
        self.memory_kib <= Self::MAX.memory_kib
            && self.iterations <= Self::MAX.iterations
            && (1..=Self::MAX.parallelism).contains(&self.parallelism)
    }

    fn at_least_default(&self) -> bool {
        self.memory_kib >= Self::DEFAULT.memory_kib && self.iterations >= Self::DEFAULT.iterations
    }
}

/// How a sealed secret is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Not encrypted (identity files of format `postern-identity/1`).
    Unencrypted,
    /// Encrypted under a passphrase via Argon2id.
    Passphrase,
    /// Encrypted under a 32-byte key from a key file or environment variable.
    Key,
}

impl Protection {
    /// The name stored in files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Protection::Unencrypted => "none",
            Protection::Passphrase => "passphrase",
            Protection::Key => "key",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Protection::Unencrypted),
            "passphrase" => Some(Protection::Passphrase),
            "key" => Some(Protection::Key),
            _ => None,
        }
    }
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protection::Unencrypted => "not encrypted",
            Protection::Passphrase => "encrypted with a passphrase",
            Protection::Key => "encrypted with a key (key file or environment variable)",
        })
    }
}

/// Where the key that protects a secret comes from. Resolved (files and
/// variables read) only when used.
#[derive(Clone)]
#[non_exhaustive]
pub enum KeySource {
    /// A passphrase typed by a person (never empty).
    Passphrase(Zeroizing<String>),
    /// A file holding a 32-byte key as 64 hex digits (or 32 raw bytes), mode
    /// `0600`. Create one with [`write_new_key_file`].
    KeyFile(PathBuf),
    /// An environment variable holding a 32-byte key as 64 hex digits.
    Env(String),
    /// No encryption: the secret is stored in the clear (format
    /// `postern-identity/1`). Only for tests and for setups that protect the
    /// disk by other means.
    DangerousUnencrypted,
}

impl KeySource {
    /// What kind of protection this source gives.
    pub fn protection(&self) -> Protection {
        match self {
            KeySource::Passphrase(_) => Protection::Passphrase,
            KeySource::KeyFile(_) | KeySource::Env(_) => Protection::Key,
            KeySource::DangerousUnencrypted => Protection::Unencrypted,
        }
    }

    /// A description for messages ("a passphrase", "key file /x", …).
    pub fn describe(&self) -> String {
        match self {
            KeySource::Passphrase(_) => "a passphrase".into(),
            KeySource::KeyFile(p) => format!("key file {}", p.display()),
            KeySource::Env(var) => format!("environment variable {var}"),
            KeySource::DangerousUnencrypted => "no passphrase or key".into(),
        }
    }

    /// Reads the key material (the key file or variable). `None` for
    /// [`KeySource::DangerousUnencrypted`].
    pub fn resolve(&self) -> Result<Option<KeyMaterial>, SealError> {
        match self {
            KeySource::Passphrase(p) if p.is_empty() => Err(SealError::EmptyPassphrase),
            KeySource::Passphrase(p) => Ok(Some(KeyMaterial::Passphrase(p.clone()))),
            KeySource::KeyFile(path) => read_key_file(path).map(|k| Some(KeyMaterial::Key(k))),
            KeySource::Env(var) => {
                let value = Zeroizing::new(
                    std::env::var(var).map_err(|_| SealError::EnvMissing { var: var.clone() })?,
                );
                parse_hex_key(value.trim())
                    .map(|k| Some(KeyMaterial::Key(k)))
                    .ok_or_else(|| SealError::BadEnvKey { var: var.clone() })
            }
            KeySource::DangerousUnencrypted => Ok(None),
        }
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
            KeySource::KeyFile(p) => write!(f, "KeyFile({})", p.display()),
            KeySource::Env(var) => write!(f, "Env({var})"),
            KeySource::DangerousUnencrypted => f.write_str("DangerousUnencrypted"),
        }
    }
}

/// Resolved key material. Zeroized on drop, `Debug` redacted.
#[derive(Clone)]
pub enum KeyMaterial {
    /// A passphrase, stretched with Argon2id.
    Passphrase(Zeroizing<String>),
    /// A 32-byte key, used directly.
    Key(Zeroizing<[u8; 32]>),
}

impl KeyMaterial {
    fn protection(&self) -> Protection {
        match self {
            KeyMaterial::Passphrase(_) => Protection::Passphrase,
            KeyMaterial::Key(_) => Protection::Key,
        }
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyMaterial::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
            KeyMaterial::Key(_) => f.write_str("Key(<redacted>)"),
        }
    }
}

/// Why sealing, opening or reading a key source failed. All are local: the
/// user's input or files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// An empty passphrase was given.
    #[error("the passphrase is empty: choose a passphrase (or protect unattended services with a key file)")]
    EmptyPassphrase,
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    KeyFileIo {
        /// The key file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The key file can be read by other users.
    #[error("key file {path} is readable by other users (mode {mode:o}); refusing to use it. Fix with: chmod 600 {path}")]
    KeyFilePermissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The key file does not hold a key.
    #[error("key file {path} must hold exactly 64 hex digits (for example from `openssl rand -hex 32`) or 32 raw bytes")]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
    },
    /// The environment variable is unset.
    #[error("environment variable {var} is not set; it should hold the 64-hex-digit key that protects the identity file")]
    EnvMissing {
        /// The variable.
        var: String,
    },
    /// The environment variable does not hold a key.
    #[error("environment variable {var} must hold exactly 64 hex digits (for example from `openssl rand -hex 32`)")]
    BadEnvKey {
        /// The variable.
        var: String,
    },
    /// The source is of another kind than the one the secret was sealed with.
    #[error("the key is {protection}, but {given} was given")]
    WrongKindOfSource {
        /// How the secret is protected.
        protection: Protection,
        /// What was supplied.
        given: String,
    },
    /// The passphrase or key is not the one the secret was sealed with.
    #[error("wrong passphrase or key")]
    WrongKey,
    /// The key is right but the ciphertext fails authentication: the stored
    /// data was modified or damaged.
    #[error("the encrypted key fails authentication (modified or damaged)")]
    Tampered,
    /// KDF parameters out of bounds, or a stored field of the wrong size.
    #[error("invalid sealed key: {0}")]
    Invalid(String),
}

/// A sealed 32-byte secret and everything needed to open it, apart from the
/// key material and the caller's binding.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Passphrase or key.
    pub protection: Protection,
    /// Argon2id parameters (passphrase protection only).
    pub kdf: Option<KdfParams>,
    /// Random salt.
    pub salt: [u8; 16],
    /// Random nonce.
    pub nonce: [u8; 12],
    /// Derived check value (see the module documentation).
    pub key_check: [u8; 16],
    /// Ciphertext and tag (48 bytes for a 32-byte secret).
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("protection", &self.protection)
            .field("kdf", &self.kdf)
            .finish_non_exhaustive()
    }
}

/// Encrypts `secret` under `material`, binding `context` (for example an
/// identifier and public key) as associated data. Passphrases use `params`,
/// which must be at least [`KdfParams::DEFAULT`].
pub fn seal(
    secret: &[u8; 32],
    context: &[u8],
    material: &KeyMaterial,
    params: KdfParams,
) -> Result<Sealed, SealError> {
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let kdf = match material {
        KeyMaterial::Passphrase(p) => {
            if p.is_empty() {
                return Err(SealError::EmptyPassphrase);
            }
            if !params.at_least_default() || !params.within_max() {
                return Err(SealError::Invalid(format!(
                    "Argon2id parameters {params:?} are outside the accepted range"
                )));
            }
            Some(params)
        }
        KeyMaterial::Key(_) => None,
    };
    let mut sealed = Sealed {
        protection: material.protection(),
        kdf,
        salt,
        nonce,
        key_check: [0; 16],
        ciphertext: Vec::new(),
    };
    let (enc_key, check) = derive(&sealed, material)?;
    sealed.key_check = check;
    let aad = associated_data(&sealed, context);
    sealed.ciphertext = ChaCha20Poly1305::new(Key::from_slice(&*enc_key))
        .encrypt(
            Nonce::from_slice(&sealed.nonce),
            Payload {
                msg: secret,
                aad: &aad,
            },
        )
        .map_err(|_| SealError::Invalid("encryption failed".into()))?;
    Ok(sealed)
}

/// Decrypts a sealed secret. Distinguishes a wrong passphrase or key
/// ([`SealError::WrongKey`]) from modified data ([`SealError::Tampered`]),
/// except that modified salt or KDF parameters look like a wrong key.
pub fn open(
    sealed: &Sealed,
    context: &[u8],
    material: &KeyMaterial,
) -> Result<Zeroizing<[u8; 32]>, SealError> {
    if material.protection() != sealed.protection {
        return Err(SealError::WrongKindOfSource {
            protection: sealed.protection,
            given: match material {
                KeyMaterial::Passphrase(_) => "a passphrase".into(),
                KeyMaterial::Key(_) => "a key".into(),
            },
        });
    }
    match (sealed.protection, sealed.kdf) {
        (Protection::Passphrase, Some(p)) if p.within_max() => {}
        (Protection::Passphrase, _) => {
            return Err(SealError::Invalid(format!(
                "Argon2id parameters {:?} are missing or too large",
                sealed.kdf
            )))
        }
        (Protection::Key, None) => {}
        (Protection::Key, Some(_)) => {
            return Err(SealError::Invalid(
                "key protection takes no KDF parameters".into(),
            ))
        }
        (Protection::Unencrypted, _) => {
            return Err(SealError::Invalid("not an encrypted key".into()))
        }
    }
    let (enc_key, check) = derive(sealed, material)?;
    if !bool::from(check.ct_eq(&sealed.key_check)) {
        return Err(SealError::WrongKey);
    }
    let aad = associated_data(sealed, context);
    let plain = Zeroizing::new(
        ChaCha20Poly1305::new(Key::from_slice(&*enc_key))
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Tampered)?,
    );
    let mut secret = Zeroizing::new([0u8; 32]);
    if plain.len() != 32 {
        return Err(SealError::Tampered);
    }
    secret.copy_from_slice(&plain);
    Ok(secret)
}

type Derived = (Zeroizing<[u8; 32]>, [u8; 16]);

fn derive(sealed: &Sealed, material: &KeyMaterial) -> Result<Derived, SealError> {
    let mut master = Zeroizing::new([0u8; 32]);
    match material {
        KeyMaterial::Passphrase(passphrase) => {
            let p = sealed.kdf.unwrap_or(KdfParams::DEFAULT);
            let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
                .map_err(|e| SealError::Invalid(format!("Argon2id parameters: {e}")))?;
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into(passphrase.as_bytes(), &sealed.salt, master.as_mut())
                .map_err(|e| SealError::Invalid(format!("Argon2id: {e}")))?;
        }
        KeyMaterial::Key(key) => {
            let digest = Sha256::new()
                .chain_update(b"postern sealed key v1\0")
                .chain_update(sealed.salt)
                .chain_update(key.as_ref())
                .finalize();
            master.copy_from_slice(&digest);
        }
    }
    let mut enc = Zeroizing::new([0u8; 32]);
    enc.copy_from_slice(
        &Sha256::new()
            .chain_update(b"postern sealed encryption key v1\0")
            .chain_update(master.as_ref())
            .finalize(),
    );
    let mut check = [0u8; 16];
    check.copy_from_slice(
        &Sha256::new()
            .chain_update(b"postern sealed key check v1\0")
            .chain_update(master.as_ref())
            .finalize()[..16],
    );
    Ok((enc, check))
}

fn associated_data(sealed: &Sealed, context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64 + context.len());
    aad.extend_from_slice(b"postern sealed v1\0");
    aad.extend_from_slice(sealed.protection.as_str().as_bytes());
    aad.push(0);
    if let Some(p) = sealed.kdf {
        aad.extend_from_slice(&p.memory_kib.to_le_bytes());
        aad.extend_from_slice(&p.iterations.to_le_bytes());
        aad.extend_from_slice(&p.parallelism.to_le_bytes());
    }
    aad.extend_from_slice(&(context.len() as u64).to_le_bytes());
    aad.extend_from_slice(context);
    aad
}

fn parse_hex_key(text: &str) -> Option<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    if text.len() != 64 {
        return None;
    }
    hex::decode_to_slice(text, key.as_mut()).ok()?;
    Some(key)
}

fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, SealError> {
    let io = |source| SealError::KeyFileIo {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SealError::KeyFilePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    if !meta.is_file() || meta.len() > 1024 {
        return Err(SealError::BadKeyFile {
            path: path.to_owned(),
        });
    }
    let bytes = Zeroizing::new(fs::read(path).map_err(io)?);
    if bytes.len() == 32 {
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&bytes);
        return Ok(key);
    }
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|t| parse_hex_key(t.trim()))
        .ok_or_else(|| SealError::BadKeyFile {
            path: path.to_owned(),
        })
}

/// Writes a new random 32-byte key as 64 hex digits to `path` (mode `0600`),
/// refusing to overwrite, for [`KeySource::KeyFile`].
pub fn write_new_key_file(path: &Path) -> Result<(), SealError> {
    let io = |source| SealError::KeyFileIo {
        path: path.to_owned(),
        source,
    };
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(key.as_mut());
    let text = Zeroizing::new(format!("{}\n", hex::encode(*key)));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(p: &str) -> KeyMaterial {
        KeyMaterial::Passphrase(Zeroizing::new(p.into()))
    }

    #[test]
    fn passphrase_round_trip_and_errors() {
        let secret = [42u8; 32];
        let sealed = seal(&secret, b"ctx", &pass("hunter2"), KdfParams::DEFAULT).unwrap();
        assert_eq!(sealed.ciphertext.len(), 48);
        assert_eq!(*open(&sealed, b"ctx", &pass("hunter2")).unwrap(), secret);
        assert!(matches!(
            open(&sealed, b"ctx", &pass("hunter3")),
            Err(SealError::WrongKey)
        ));
        assert!(matches!(
            open(&sealed, b"other ctx", &pass("hunter2")),
            Err(SealError::Tampered)
        ));
        let mut t = sealed.clone();
        t.ciphertext[3] ^= 1;
        assert!(matches!(
            open(&t, b"ctx", &pass("hunter2")),
            Err(SealError::Tampered)
        ));
        let mut t = sealed.clone();
        t.kdf = Some(KdfParams {
            memory_kib: u32::MAX,
            ..KdfParams::DEFAULT
        });
        assert!(matches!(
            open(&t, b"ctx", &pass("hunter2")),
            Err(SealError::Invalid(_))
        ));
        assert!(matches!(
            open(&sealed, b"ctx", &KeyMaterial::Key(Zeroizing::new([1; 32]))),
            Err(SealError::WrongKindOfSource { .. })
        ));
        assert!(matches!(
            seal(&secret, b"", &pass(""), KdfParams::DEFAULT),
            Err(SealError::EmptyPassphrase)
        ));
        let weak = KdfParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        };
        assert!(matches!(
            seal(&secret, b"", &pass("x"), weak),
            Err(SealError::Invalid(_))
        ));
    }

    #[test]
    fn key_sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_new_key_file(&path).unwrap();
        assert!(write_new_key_file(&path).is_err());
        let Some(KeyMaterial::Key(key)) = KeySource::KeyFile(path.clone()).resolve().unwrap()
        else {
            panic!("expected a key");
        };
        let sealed = seal(
            &[1; 32],
            b"c",
            &KeyMaterial::Key(key.clone()),
            KdfParams::DEFAULT,
        )
        .unwrap();
        assert!(sealed.kdf.is_none());
        assert_eq!(
            *open(&sealed, b"c", &KeyMaterial::Key(key)).unwrap(),
            [1; 32]
        );
        assert!(matches!(
            open(&sealed, b"c", &KeyMaterial::Key(Zeroizing::new([0; 32]))),
            Err(SealError::WrongKey)
        ));

        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = KeySource::KeyFile(path.clone()).resolve().unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");

        let raw = dir.path().join("raw");
        fs::write(&raw, [7u8; 32]).unwrap();
        fs::set_permissions(&raw, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(KeySource::KeyFile(raw.clone()).resolve().is_ok());
        fs::write(&raw, b"not a key").unwrap();
        assert!(matches!(
            KeySource::KeyFile(raw).resolve(),
            Err(SealError::BadKeyFile { .. })
        ));

        let var = "POSTERN_SEALED_TEST_UNSET_VAR_9F3A";
        assert!(matches!(
            KeySource::Env(var.into()).resolve(),
            Err(SealError::EnvMissing { .. })
        ));
        assert!(matches!(
            KeySource::Passphrase(Zeroizing::new(String::new())).resolve(),
            Err(SealError::EmptyPassphrase)
        ));
        assert!(KeySource::DangerousUnencrypted.resolve().unwrap().is_none());
        let dbg = format!(
            "{:?}",
            KeySource::Passphrase(Zeroizing::new("s3cret".into()))
        );
        assert!(!dbg.contains("s3cret"));
    }
}
