//! Where the secret that protects an identity file comes from on the command
//! line (issue 3, "keys at rest"). The file format and the cryptography are
//! `postern_identity::keyfile` and `postern_identity::sealed`; this module
//! only decides which passphrase or key to hand them:
//!
//! - **passphrase** (people): `$POSTERN_PASSPHRASE` if set, otherwise asked
//!   on the terminal without echo (twice when creating). A passphrase is only
//!   asked for when standard input is a terminal, so a service or a test
//!   never hangs on a prompt; it gets an error naming the variable instead.
//!   A passphrase typed once is remembered for the rest of the process, so a
//!   role that loads its identity more than once asks only once.
//! - **key file** (unattended services): a file holding a random 32-byte key
//!   (`postern identity keygen --out PATH`), mode `0600`, named by
//!   `--key-file PATH` where a command has that flag, else
//!   `$POSTERN_KEY_FILE`.
//!
//! Secrets are never logged or printed, and are zeroized when dropped.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use postern_identity::keyfile::{self, KeyFileError, KeySource};
use postern_identity::sealed::Protection;
use postern_identity::{Identity, IdentityError};
use zeroize::Zeroizing;

/// The passphrase of an encrypted identity, for non-interactive use.
pub const PASSPHRASE_VAR: &str = "POSTERN_PASSPHRASE";
/// The key file that protects an encrypted identity.
pub const KEY_FILE_VAR: &str = "POSTERN_KEY_FILE";

/// How `postern identity create --encrypt` protects the new secret key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encryption {
    /// A passphrase (from POSTERN_PASSPHRASE, else asked twice on the
    /// terminal), stretched with Argon2id. For people.
    Passphrase,
    /// A random 32-byte key in a file of mode 0600 (--key-file PATH or
    /// POSTERN_KEY_FILE; see `postern identity keygen`). For services.
    KeyFile,
}

/// Passphrases typed at the terminal during this run, by identity file.
static TYPED: Mutex<Vec<(PathBuf, Zeroizing<String>)>> = Mutex::new(Vec::new());

#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Env,
    Typed,
}

/// `identity "relay" (/home/…/relay.key)`, or just the path when the
/// identity was named by its path.
fn describe(name: &str, path: &Path) -> String {
    if Path::new(name) == path {
        format!("identity file {}", path.display())
    } else {
        format!("identity {name:?} ({})", path.display())
    }
}

/// `$POSTERN_PASSPHRASE`, if set.
fn env_passphrase() -> Result<Option<Zeroizing<String>>> {
    let Some(value) = std::env::var_os(PASSPHRASE_VAR) else {
        return Ok(None);
    };
    let value = Zeroizing::new(
        value
            .into_string()
            .map_err(|_| anyhow!("{PASSPHRASE_VAR} is not valid UTF-8"))?,
    );
    if value.is_empty() {
        bail!("{PASSPHRASE_VAR} is set but empty: set it to the passphrase, or unset it to be asked on the terminal");
    }
    Ok(Some(value))
}

/// `--key-file`, else `$POSTERN_KEY_FILE`.
fn key_file_from(flag: Option<&Path>) -> Option<PathBuf> {
    flag.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(KEY_FILE_VAR)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

fn can_prompt() -> bool {
    std::io::stdin().is_terminal()
}

/// Asks on the terminal, without echo.
fn prompt(text: &str) -> Result<Zeroizing<String>> {
    rpassword::prompt_password(text)
        .map(Zeroizing::new)
        .context("cannot read a passphrase from the terminal")
}

fn remembered(path: &Path) -> Option<Zeroizing<String>> {
    let typed = TYPED.lock().unwrap_or_else(|e| e.into_inner());
    typed
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, pass)| pass.clone())
}

fn remember(path: &Path, passphrase: Zeroizing<String>) {
    let mut typed = TYPED.lock().unwrap_or_else(|e| e.into_inner());
    if !typed.iter().any(|(p, _)| p == path) {
        typed.push((path.to_owned(), passphrase));
    }
}

fn passphrase_for(name: &str, path: &Path) -> Result<(Zeroizing<String>, Origin)> {
    if let Some(pass) = env_passphrase()? {
        return Ok((pass, Origin::Env));
    }
    if let Some(pass) = remembered(path) {
        return Ok((pass, Origin::Typed));
    }
    let what = describe(name, path);
    if !can_prompt() {
        bail!(
            "{what} is encrypted with a passphrase, and none was given: set {PASSPHRASE_VAR} \
             to it, or run this command from a terminal to be asked for it"
        );
    }
    Ok((prompt(&format!("Passphrase for {what}: "))?, Origin::Typed))
}

/// Loads identity `name` (a name under `home`, or a key file path) whatever
/// its protection, getting the passphrase or key as the module documentation
/// says. `key_file` is a command's `--key-file` flag, if it has one.
pub fn load(home: &Path, name: &str, key_file: Option<&Path>) -> Result<(Identity, Protection)> {
    let path = keyfile::resolve(home, name)?;
    let protection = match keyfile::protection(&path) {
        Ok(protection) => protection,
        Err(KeyFileError::Identity(IdentityError::NotFound { path, .. })) => bail!(
            "no identity {name:?} at {}: create it first with `postern identity create{}`",
            path.display(),
            if name == keyfile::DEFAULT_NAME {
                String::new()
            } else {
                format!(" --name {name}")
            }
        ),
        Err(e) => return Err(e.into()),
    };
    let identity = match protection {
        Protection::Unencrypted => keyfile::load_with(&path, &KeySource::DangerousUnencrypted)?,
        Protection::Passphrase => {
            let (passphrase, origin) = passphrase_for(name, &path)?;
            match keyfile::load_with(&path, &KeySource::Passphrase(passphrase.clone())) {
                Ok(identity) => {
                    if origin == Origin::Typed {
                        remember(&path, passphrase);
                    }
                    identity
                }
                Err(KeyFileError::WrongPassphrase { .. }) => bail!(
                    "wrong passphrase for {}: {}",
                    describe(name, &path),
                    match origin {
                        Origin::Env =>
                            format!("the passphrase in {PASSPHRASE_VAR} does not open it"),
                        Origin::Typed => "the passphrase typed does not open it".to_owned(),
                    }
                ),
                Err(e) => return Err(e.into()),
            }
        }
        Protection::Key => {
            let Some(key_file) = key_file_from(key_file) else {
                bail!(
                    "{} is encrypted with a key, and no key file was given: set {KEY_FILE_VAR} \
                     to the key file it was created with",
                    describe(name, &path)
                );
            };
            keyfile::load_with(&path, &KeySource::KeyFile(key_file))?
        }
    };
    Ok((identity, protection))
}

/// The key source for `postern identity create`. Without `--encrypt` (and
/// without `--key-file`) the key is stored unencrypted.
pub fn source_for_create(
    name: &str,
    encrypt: Option<Encryption>,
    key_file: Option<&Path>,
) -> Result<KeySource> {
    let encrypt = encrypt.or(key_file.map(|_| Encryption::KeyFile));
    match encrypt {
        None => Ok(KeySource::DangerousUnencrypted),
        Some(Encryption::Passphrase) => {
            if key_file.is_some() {
                bail!("--key-file goes with --encrypt key-file, not with --encrypt passphrase");
            }
            if let Some(pass) = env_passphrase()? {
                return Ok(KeySource::Passphrase(pass));
            }
            if !can_prompt() {
                bail!(
                    "--encrypt passphrase needs a passphrase: set {PASSPHRASE_VAR}, or run this \
                     command from a terminal to be asked for one"
                );
            }
            let first = prompt(&format!("Passphrase for the new identity {name:?}: "))?;
            if first.is_empty() {
                bail!("the passphrase is empty; nothing was created");
            }
            let again = prompt("The same passphrase again: ")?;
            if *first != *again {
                bail!("the two passphrases differ; nothing was created");
            }
            Ok(KeySource::Passphrase(first))
        }
        Some(Encryption::KeyFile) => {
            let path = key_file_from(key_file).ok_or_else(|| {
                anyhow!(
                    "--encrypt key-file needs a key file: pass --key-file PATH or set \
                     {KEY_FILE_VAR} (create one with `postern identity keygen --out PATH`)"
                )
            })?;
            Ok(KeySource::KeyFile(path))
        }
    }
}

/// Whether `$POSTERN_PASSPHRASE` or `$POSTERN_KEY_FILE` is set (to warn when
/// `identity create` without `--encrypt` ignores them).
pub fn secret_in_env() -> Option<&'static str> {
    [PASSPHRASE_VAR, KEY_FILE_VAR]
        .into_iter()
        .find(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
}

/// `postern identity keygen --out PATH`: a new random 32-byte key, written
/// as 64 hex digits to a new file of mode `0600`.
pub fn keygen(out: &Path) -> Result<()> {
    if out.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; refusing to overwrite it (identities encrypted with a key \
             cannot be opened without that key)",
            out.display()
        );
    }
    postern_identity::sealed::write_new_key_file(out).map_err(|e| match e {
        postern_identity::sealed::SealError::KeyFileIo { source, .. } => {
            anyhow!("cannot create key file {}: {source}", out.display())
        }
        other => other.into(),
    })
}
