//! Identity key files under the Postern home directory.
//!
//! Layout: `$POSTERN_HOME/identities/<name>.key` (default home `~/.postern`,
//! default name `default`). A key file is a small TOML document, mode `0600`;
//! a file that other users can read is refused. Nothing here ever creates an
//! identity unless asked to by [`create`].

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{Identifier, Identity, IdentityError};

/// The identity name used when none is given.
pub const DEFAULT_NAME: &str = "default";
const FORMAT: &str = "postern-identity/1";

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

/// Creates a new identity and writes it to `path` (mode `0600`, parent
/// directories `0700`). Refuses to overwrite an existing file.
pub fn create(path: &Path) -> Result<Identity, IdentityError> {
    let identity = Identity::generate();
    write_new(path, &identity)?;
    Ok(identity)
}

/// Writes `identity` to a new file at `path`; refuses to overwrite.
pub fn write_new(path: &Path, identity: &Identity) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io)?;
        // Best effort: tighten directories we may just have created.
        let _ = fs::set_permissions(parent, fs::Permissions::from_mode(0o700));
    }
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
    file.write_all(b"# Postern identity. Secret: keep this file private (mode 0600).\n")
        .and_then(|()| file.write_all(text.as_bytes()))
        .and_then(|()| file.sync_all())
        .map_err(io)
}

/// Loads the identity stored at `path`, refusing files readable by others.
pub fn load(path: &Path) -> Result<Identity, IdentityError> {
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
    if meta.len() > 64 * 1024 {
        return Err(bad("file is far larger than a key file can be"));
    }
    let bytes = Zeroizing::new(fs::read(path).map_err(|source| IdentityError::Io {
        path: path.to_owned(),
        source,
    })?);
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not a text file"))?;
    let file: KeyFile = toml::from_str(text).map_err(|e| bad(e.message()))?;
    if file.format != FORMAT {
        return Err(bad(&format!(
            "unsupported format {:?} (this Postern reads {FORMAT:?})",
            file.format
        )));
    }
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
