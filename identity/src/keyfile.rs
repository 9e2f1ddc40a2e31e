//! Identity key files under the Postern home directory.
//!
//! Layout: `$POSTERN_HOME/identities/<name>.key` (default home `~/.postern`,
//! default name `default`). A key file is a small TOML document, mode `0600`;
//! a file that other users can read is refused. Nothing here ever creates an
//! identity unless asked to by [`create`] or [`create_with`].
//!
//! Two formats are read:
//!
//! - `postern-identity/1`: the secret key in hex, unencrypted. Written by
//!   [`create`] and [`write_new`] (kept for existing setups and tests) and by
//!   the `_with` functions given [`KeySource::DangerousUnencrypted`].
//! - `postern-identity/2`: the secret key sealed with ChaCha20-Poly1305
//!   ([`crate::sealed`]) under a passphrase (Argon2id, parameters and salt in
//!   the file) or a 32-byte key from a key file or environment variable. The
//!   identifier and public key stay readable, and are bound to the
//!   ciphertext as associated data, so a ciphertext copied into another file
//!   does not open there. New identities should be created with
//!   [`create_with`] and a real key source.
//!
//! ```toml
//! format = "postern-identity/2"
//! identifier = "P…"
//! public_key = "<64 hex>"
//! protection = "passphrase"          # or "key"
//! kdf = "argon2id"                   # passphrase only
//! kdf_memory_kib = 19456
//! kdf_iterations = 2
//! kdf_parallelism = 1
//! salt = "<32 hex>"
//! nonce = "<24 hex>"
//! key_check = "<32 hex>"
//! encrypted_secret_key = "<96 hex>"  # ciphertext + tag
//! ```

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::sealed::{self, KdfParams, Protection, SealError, Sealed};
use crate::{Identifier, Identity, IdentityError};

pub use crate::sealed::KeySource;

/// The identity name used when none is given.
pub const DEFAULT_NAME: &str = "default";
const FORMAT: &str = "postern-identity/1";
const FORMAT_V2: &str = "postern-identity/2";
const KDF_ARGON2ID: &str = "argon2id";
const MAX_KEY_FILE_LEN: u64 = 64 * 1024;

/// Where Postern keeps its state: `$POSTERN_HOME`, else `$HOME/.postern`.
pub fn home_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("POSTERN_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let user_home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    user_home.join(".postern")
}

/// Resolves an identity reference: a name (looked up under `home`) or, if it
/// contains a `/` or ends in `.key`, a path to a key file.
pub fn resolve(home: &Path, name_or_path: &str) -> Result<PathBuf, IdentityError> {
    if name_or_path.contains('/') || name_or_path.ends_with(".key") {
        return Ok(PathBuf::from(name_or_path));
    }
    let valid = !name_or_path.is_empty()
        && !name_or_path.starts_with('.')
        && name_or_path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(IdentityError::BadName(name_or_path.to_owned()));
    }
    Ok(home.join("identities").join(format!("{name_or_path}.key")))
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: String,
    identifier: Identifier,
    public_key: String,
    secret_key: String,
}

/// Creates a new identity and writes it **unencrypted** (format
/// `postern-identity/1`) to `path` (mode `0600`, parent directories `0700`).
/// Refuses to overwrite an existing file. Prefer [`create_with`] with a
/// passphrase or key whenever one is available.
pub fn create(path: &Path) -> Result<Identity, IdentityError> {
    let identity = Identity::generate();
    write_new(path, &identity)?;
    Ok(identity)
}

/// Writes `identity` **unencrypted** (format `postern-identity/1`) to a new
/// file at `path`; refuses to overwrite. See [`write_new_with`].
pub fn write_new(path: &Path, identity: &Identity) -> Result<(), IdentityError> {
    let secret = identity.secret_bytes();
    let body = KeyFile {
        format: FORMAT.to_owned(),
        identifier: identity.identifier(),
        public_key: hex::encode(identity.public().as_bytes()),
        secret_key: hex::encode(*secret),
    };
    let text = Zeroizing::new(
        toml::to_string(&body).map_err(|e| IdentityError::BadKeyFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?,
    );
    write_text_new(
        path,
        "# Postern identity. Secret: keep this file private (mode 0600).\n",
        &text,
    )
}

/// Creates `path` (mode `0600`, parents `0700`) holding `header` and `text`;
/// refuses to overwrite.
fn write_text_new(path: &Path, header: &str, text: &str) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io)?;
        // Best effort: tighten directories we may just have created.
        let _ = fs::set_permissions(parent, fs::Permissions::from_mode(0o700));
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                io(e)
            }
        })?;
    file.write_all(header.as_bytes())
        .and_then(|()| file.write_all(text.as_bytes()))
        .and_then(|()| file.sync_all())
        .map_err(io)
}

/// Loads an unencrypted identity (format `postern-identity/1`) stored at
/// `path`, refusing files readable by others. An encrypted file is refused
/// with a message saying so: use [`load_with`].
pub fn load(path: &Path) -> Result<Identity, IdentityError> {
    match parse(path)? {
        Parsed::V1(identity) => Ok(identity),
        Parsed::V2 { sealed, .. } => Err(IdentityError::BadKeyFile {
            path: path.to_owned(),
            reason: format!(
                "its secret key is {}, and no passphrase or key was supplied to open it",
                sealed.protection
            ),
        }),
    }
}

/// Errors of encrypted key files, beyond those of [`IdentityError`]. All are
/// local: the user's files and input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Missing, unreadable, world-readable or malformed file, and the like.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The passphrase does not open the file.
    #[error("wrong passphrase for identity file {path} (if you are sure it is right, the file may be damaged: restore it from a backup)")]
    WrongPassphrase {
        /// The identity file.
        path: PathBuf,
    },
    /// The key from a key file or environment variable does not open the
    /// file.
    #[error("{given} does not unlock identity file {path}: supply the key it was encrypted with")]
    WrongKey {
        /// The identity file.
        path: PathBuf,
        /// Where the key came from.
        given: String,
    },
    /// The right key, but the encrypted secret fails authentication.
    #[error("identity file {path} was modified or damaged: its encrypted secret key fails authentication; restore it from a backup")]
    Tampered {
        /// The identity file.
        path: PathBuf,
    },
    /// A passphrase for a key-protected file, or the other way round, or
    /// nothing for an encrypted file.
    #[error("identity file {path} is {protection}, but {given} was given")]
    WrongKindOfSource {
        /// The identity file.
        path: PathBuf,
        /// How it is protected.
        protection: Protection,
        /// What was supplied.
        given: String,
    },
    /// The key source could not be used (unreadable key file, unset
    /// variable, empty passphrase, …).
    #[error("identity file {path}: {source}")]
    KeySource {
        /// The identity file.
        path: PathBuf,
        /// What went wrong with the source.
        source: SealError,
    },
}

/// How the identity file at `path` is protected, without opening it (so a
/// command knows whether to ask for a passphrase).
pub fn protection(path: &Path) -> Result<Protection, KeyFileError> {
    Ok(match parse(path)? {
        Parsed::V1(_) => Protection::Unencrypted,
        Parsed::V2 { sealed, .. } => sealed.protection,
    })
}

/// Loads the identity at `path` in either format. Unencrypted files load
/// whatever the source (so existing setups keep working; check
/// [`protection`] to warn about them); encrypted ones need a source of the
/// kind they were sealed with.
pub fn load_with(path: &Path, source: &KeySource) -> Result<Identity, KeyFileError> {
    let (identifier, public_key, sealed) = match parse(path)? {
        Parsed::V1(identity) => return Ok(identity),
        Parsed::V2 {
            identifier,
            public_key,
            sealed,
        } => (identifier, public_key, sealed),
    };
    let Some(material) = resolve_source(path, source)? else {
        return Err(KeyFileError::WrongKindOfSource {
            path: path.to_owned(),
            protection: sealed.protection,
            given: source.describe(),
        });
    };
    let secret = sealed::open(&sealed, &binding(&identifier, &public_key), &material).map_err(
        |e| match e {
            SealError::WrongKey if sealed.protection == Protection::Passphrase => {
                KeyFileError::WrongPassphrase {
                    path: path.to_owned(),
                }
            }
            SealError::WrongKey => KeyFileError::WrongKey {
                path: path.to_owned(),
                given: source.describe(),
            },
            SealError::Tampered => KeyFileError::Tampered {
                path: path.to_owned(),
            },
            SealError::WrongKindOfSource { protection, .. } => KeyFileError::WrongKindOfSource {
                path: path.to_owned(),
                protection,
                given: source.describe(),
            },
            SealError::Invalid(reason) => KeyFileError::Identity(IdentityError::BadKeyFile {
                path: path.to_owned(),
                reason,
            }),
            other => KeyFileError::KeySource {
                path: path.to_owned(),
                source: other,
            },
        },
    )?;
    let identity = Identity::from_secret_bytes(&secret);
    if identity.identifier() != identifier || identity.public().as_bytes() != &public_key {
        return Err(KeyFileError::Tampered {
            path: path.to_owned(),
        });
    }
    Ok(identity)
}

/// Creates a new identity protected by `source` and writes it to `path`
/// (mode `0600`; refuses to overwrite). The source is read before anything
/// is generated, so a bad key file or empty passphrase creates nothing.
pub fn create_with(path: &Path, source: &KeySource) -> Result<Identity, KeyFileError> {
    let material = resolve_source(path, source)?;
    let identity = Identity::generate();
    write_material(path, &identity, material.as_ref())?;
    Ok(identity)
}

/// Writes `identity` to a new file at `path` protected by `source`; refuses
/// to overwrite.
pub fn write_new_with(
    path: &Path,
    identity: &Identity,
    source: &KeySource,
) -> Result<(), KeyFileError> {
    let material = resolve_source(path, source)?;
    write_material(path, identity, material.as_ref())
}

/// Re-protects an existing identity file: opens it with `old`, writes it
/// anew under `new` to a temporary file beside it, and renames that over the
/// original. Migrates unencrypted `postern-identity/1` files, or changes a
/// passphrase.
pub fn reencrypt(path: &Path, old: &KeySource, new: &KeySource) -> Result<Identity, KeyFileError> {
    let identity = load_with(path, old)?;
    let material = resolve_source(path, new)?;
    let mut suffix = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut suffix);
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp-{}", hex::encode(suffix)));
    let tmp = path.with_file_name(tmp_name);
    write_material(&tmp, &identity, material.as_ref())?;
    if let Err(source) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(IdentityError::Io {
            path: path.to_owned(),
            source,
        }
        .into());
    }
    Ok(identity)
}

fn resolve_source(
    path: &Path,
    source: &KeySource,
) -> Result<Option<sealed::KeyMaterial>, KeyFileError> {
    source.resolve().map_err(|source| KeyFileError::KeySource {
        path: path.to_owned(),
        source,
    })
}

fn binding(identifier: &Identifier, public_key: &[u8; 32]) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(64);
    ctx.extend_from_slice(FORMAT_V2.as_bytes());
    ctx.push(0);
    ctx.extend_from_slice(identifier.as_bytes());
    ctx.extend_from_slice(public_key);
    ctx
}

fn write_material(
    path: &Path,
    identity: &Identity,
    material: Option<&sealed::KeyMaterial>,
) -> Result<(), KeyFileError> {
    let Some(material) = material else {
        return Ok(write_new(path, identity)?);
    };
    let public_key = *identity.public().as_bytes();
    let secret = identity.secret_bytes();
    let sealed = sealed::seal(
        &secret,
        &binding(&identity.identifier(), &public_key),
        material,
        KdfParams::DEFAULT,
    )
    .map_err(|source| KeyFileError::KeySource {
        path: path.to_owned(),
        source,
    })?;
    let body = KeyFileV2 {
        format: FORMAT_V2.to_owned(),
        identifier: identity.identifier(),
        public_key: hex::encode(public_key),
        protection: sealed.protection.as_str().to_owned(),
        kdf: sealed.kdf.map(|_| KDF_ARGON2ID.to_owned()),
        kdf_memory_kib: sealed.kdf.map(|k| k.memory_kib),
        kdf_iterations: sealed.kdf.map(|k| k.iterations),
        kdf_parallelism: sealed.kdf.map(|k| k.parallelism),
        salt: hex::encode(sealed.salt),
        nonce: hex::encode(sealed.nonce),
        key_check: hex::encode(sealed.key_check),
        encrypted_secret_key: hex::encode(&sealed.ciphertext),
    };
    let text = toml::to_string(&body).map_err(|e| IdentityError::BadKeyFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let header = format!(
        "# Postern identity; its secret key is {}. Keep this file private (mode 0600).\n",
        sealed.protection
    );
    Ok(write_text_new(path, &header, &text)?)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileV2 {
    format: String,
    identifier: Identifier,
    public_key: String,
    protection: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kdf: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kdf_memory_kib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kdf_iterations: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kdf_parallelism: Option<u32>,
    salt: String,
    nonce: String,
    key_check: String,
    encrypted_secret_key: String,
}

#[derive(Deserialize)]
struct FormatProbe {
    format: String,
}

enum Parsed {
    V1(Identity),
    V2 {
        identifier: Identifier,
        public_key: [u8; 32],
        sealed: Sealed,
    },
}

/// Reads and parses a key file of either format, with the permission and
/// size checks, without decrypting anything.
fn parse(path: &Path) -> Result<Parsed, IdentityError> {
    let bad = |reason: &str| IdentityError::BadKeyFile {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(IdentityError::NotFound {
                path: path.to_owned(),
                hint: String::new(),
            })
        }
        Err(source) => {
            return Err(IdentityError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.is_file() {
        return Err(bad("not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(bad("file is far larger than a key file can be"));
    }
    let bytes = Zeroizing::new(fs::read(path).map_err(|source| IdentityError::Io {
        path: path.to_owned(),
        source,
    })?);
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not a text file"))?;
    let probe: FormatProbe = toml::from_str(text).map_err(|e| bad(e.message()))?;
    match probe.format.as_str() {
        FORMAT => parse_v1(text, &bad).map(Parsed::V1),
        FORMAT_V2 => parse_v2(text, &bad),
        other => Err(bad(&format!(
            "unsupported format {other:?} (this Postern reads {FORMAT:?} and {FORMAT_V2:?}; a newer Postern may have written it)"
        ))),
    }
}

fn parse_v1(text: &str, bad: &dyn Fn(&str) -> IdentityError) -> Result<Identity, IdentityError> {
    let file: KeyFile = toml::from_str(text).map_err(|e| bad(e.message()))?;
    let mut secret = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(&file.secret_key, secret.as_mut())
        .map_err(|_| bad("secret_key is not 64 hex digits"))?;
    let identity = Identity::from_secret_bytes(&secret);
    if identity.identifier() != file.identifier
        || hex::encode(identity.public().as_bytes()) != file.public_key
    {
        return Err(bad(
            "the stored identifier or public key does not match the secret key (file corrupted or edited)",
        ));
    }
    Ok(identity)
}

fn parse_v2(text: &str, bad: &dyn Fn(&str) -> IdentityError) -> Result<Parsed, IdentityError> {
    let file: KeyFileV2 = toml::from_str(text).map_err(|e| bad(e.message()))?;
    fn fixed<const N: usize>(
        field: &str,
        value: &str,
        bad: &dyn Fn(&str) -> IdentityError,
    ) -> Result<[u8; N], IdentityError> {
        let mut out = [0u8; N];
        hex::decode_to_slice(value, &mut out)
            .map_err(|_| bad(&format!("{field} is not {} hex digits", N * 2)))?;
        Ok(out)
    }
    let public_key: [u8; 32] = fixed("public_key", &file.public_key, bad)?;
    if Identifier::from_public_key(&public_key) != file.identifier {
        return Err(bad(
            "the stored identifier does not match the public key (file corrupted or edited)",
        ));
    }
    let protection = match Protection::from_name(&file.protection) {
        Some(p @ (Protection::Passphrase | Protection::Key)) => p,
        _ => {
            return Err(bad(&format!(
                "unknown protection {:?} (expected \"passphrase\" or \"key\")",
                file.protection
            )))
        }
    };
    let kdf = match (
        protection,
        file.kdf.as_deref(),
        file.kdf_memory_kib,
        file.kdf_iterations,
        file.kdf_parallelism,
    ) {
        (Protection::Passphrase, Some(KDF_ARGON2ID), Some(m), Some(t), Some(p)) => {
            Some(KdfParams {
                memory_kib: m,
                iterations: t,
                parallelism: p,
            })
        }
        (Protection::Passphrase, ..) => {
            return Err(bad(
                "passphrase protection needs kdf = \"argon2id\" and kdf_memory_kib, kdf_iterations, kdf_parallelism",
            ))
        }
        (_, None, None, None, None) => None,
        _ => return Err(bad("key protection takes no kdf settings")),
    };
    let ciphertext = hex::decode(&file.encrypted_secret_key)
        .ok()
        .filter(|c| c.len() == 48)
        .ok_or_else(|| bad("encrypted_secret_key is not 96 hex digits"))?;
    Ok(Parsed::V2 {
        identifier: file.identifier,
        public_key,
        sealed: Sealed {
            protection,
            kdf,
            salt: fixed("salt", &file.salt, bad)?,
            nonce: fixed("nonce", &file.nonce, bad)?,
            key_check: fixed("key_check", &file.key_check, bad)?,
            ciphertext,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = resolve(dir.path(), "alice").unwrap_or_else(|e| panic!("{e}"));
        let created = create(&path).unwrap_or_else(|e| panic!("{e}"));
        let mode = fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .ok();
        assert_eq!(mode, Some(0o600));
        let loaded = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(created.identifier(), loaded.identifier());
        assert!(matches!(
            create(&path),
            Err(IdentityError::AlreadyExists { .. })
        ));
    }

    #[test]
    fn refuses_world_readable_and_reports_missing() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("x.key");
        create(&path).unwrap_or_else(|e| panic!("{e}"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("{e}"));
        let err = load(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("chmod 600"), "{err}");
        let missing = load(&dir.path().join("nope.key")).err();
        assert!(matches!(missing, Some(IdentityError::NotFound { .. })));
    }

    #[test]
    fn detects_tampering_and_garbage() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("x.key");
        create(&path).unwrap_or_else(|e| panic!("{e}"));
        let text = fs::read_to_string(&path).unwrap_or_default();
        let other = Identity::generate();
        let line = text
            .lines()
            .find(|l| l.starts_with("identifier"))
            .unwrap_or_default()
            .to_owned();
        fs::write(
            &path,
            text.replace(&line, &format!("identifier = \"{}\"", other.identifier())),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(load(&path), Err(IdentityError::BadKeyFile { .. })));
        fs::write(&path, b"\x00\xffgarbage").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(load(&path), Err(IdentityError::BadKeyFile { .. })));
    }

    #[test]
    fn names_are_checked() {
        let home = Path::new("/h");
        assert!(resolve(home, "../etc").is_ok()); // contains '/', treated as a path
        assert!(matches!(
            resolve(home, ".hidden"),
            Err(IdentityError::BadName(_))
        ));
        assert!(matches!(
            resolve(home, "a b"),
            Err(IdentityError::BadName(_))
        ));
        assert_eq!(
            resolve(home, "svc-1").ok(),
            Some(PathBuf::from("/h/identities/svc-1.key"))
        );
    }
}
