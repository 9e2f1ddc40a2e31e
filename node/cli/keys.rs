//! Where the secret that protects an identity file comes from on the command
//! line (issue 3, "keys at rest"; issue 11, "secrets"). The file format and
//! the cryptography are `postern_identity::keyfile` and
//! `postern_identity::sealed`; this module only decides which passphrase or
//! key to hand them:
//!
//! - **passphrase** (people): `$POSTERN_PASSPHRASE` if it was set when the
//!   process started, otherwise asked on the terminal without echo (twice
//!   when creating). A passphrase is only asked for when standard input is a
//!   terminal, so a service or a test never hangs on a prompt; it gets an
//!   error naming the variable instead. A passphrase typed once is
//!   remembered for the rest of the process, so a role that loads its
//!   identity more than once asks only once.
//! - **key file** (unattended services): a file holding a random 32-byte key
//!   (`postern identity keygen --out PATH`), mode `0600`, named by
//!   `--key-file PATH` where a command has that flag, else
//!   `$POSTERN_KEY_FILE`.
//!
//! The variables are read once, in `main`, and removed from the process
//! (`postern_identity::secret_env`); their values reach this module as a
//! [`SecretEnv`].
//!
//! A new identity (`postern identity create`, or `postern enroll` creating
//! one) is encrypted with a passphrase by default when standard input is a
//! terminal: a person is there to choose one. `--encrypt none` opts out.
//! Without a terminal (services, scripts) the default stays unencrypted, and
//! the output says so and how to encrypt it (`postern identity encrypt`).
//!
//! Secrets are never logged or printed, and are zeroized when dropped.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use postern_identity::keyfile::{self, KeyFileError, KeySource};
use postern_identity::sealed::Protection;
use postern_identity::secret_env::{SecretEnv, KEY_FILE_VAR, PASSPHRASE_VAR};
use postern_identity::{Identity, IdentityError};
use zeroize::Zeroizing;

/// How `--encrypt` protects a secret key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encryption {
    /// A passphrase (from POSTERN_PASSPHRASE, else asked twice on the
    /// terminal), stretched with Argon2id. For people; the default at a
    /// terminal.
    Passphrase,
    /// A random 32-byte key in a file of mode 0600 (--key-file PATH or
    /// POSTERN_KEY_FILE; see `postern identity keygen`). For services.
    KeyFile,
    /// Not encrypted: protected only by the file's mode (0600). The
    /// explicit opt-out; the default only without a terminal.
    None,
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

/// `$POSTERN_PASSPHRASE` as it was at start-up, if set.
fn env_passphrase(secrets: &SecretEnv) -> Result<Option<Zeroizing<String>>> {
    let Some(value) = secrets.text(PASSPHRASE_VAR)? else {
        return Ok(None);
    };
    if value.is_empty() {
        bail!("{PASSPHRASE_VAR} is set but empty: set it to the passphrase, or unset it to be asked on the terminal");
    }
    Ok(Some(value))
}

/// `--key-file`, else `$POSTERN_KEY_FILE`.
fn key_file_from(flag: Option<&Path>, secrets: &SecretEnv) -> Option<PathBuf> {
    flag.map(Path::to_path_buf).or_else(|| secrets.key_file())
}

/// Whether a person can be asked: standard input is a terminal.
pub fn can_prompt() -> bool {
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

fn passphrase_for(
    name: &str,
    path: &Path,
    secrets: &SecretEnv,
) -> Result<(Zeroizing<String>, Origin)> {
    if let Some(pass) = env_passphrase(secrets)? {
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

/// The key file of identity `name` and how it is protected; an error
/// saying how to create it if there is none.
fn existing(home: &Path, name: &str) -> Result<(PathBuf, Protection)> {
    let path = keyfile::resolve(home, name)?;
    match keyfile::protection(&path) {
        Ok(protection) => Ok((path, protection)),
        Err(KeyFileError::Identity(IdentityError::NotFound { path, .. })) => bail!(
            "no identity {name:?} at {}: create it first with `postern identity create{}`",
            path.display(),
            name_flag(name)
        ),
        Err(e) => Err(e.into()),
    }
}

/// Loads identity `name` (a name under `home`, or a key file path) whatever
/// its protection, getting the passphrase or key as the module documentation
/// says. `key_file` is a command's `--key-file` flag, if it has one.
pub fn load(
    home: &Path,
    name: &str,
    key_file: Option<&Path>,
    secrets: &SecretEnv,
) -> Result<(Identity, Protection)> {
    let (path, protection) = existing(home, name)?;
    let identity = match protection {
        Protection::Unencrypted => keyfile::load_with(&path, &KeySource::DangerousUnencrypted)?,
        Protection::Passphrase => {
            let (passphrase, origin) = passphrase_for(name, &path, secrets)?;
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
            let Some(key_file) = key_file_from(key_file, secrets) else {
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

/// The key source for a new identity, as `--encrypt` (and `--key-file`,
/// which implies `--encrypt key-file`) ask. Without either, a passphrase
/// when standard input is a terminal, otherwise no encryption (the caller
/// says so: [`report_created`]).
fn source_for_create(
    name: &str,
    encrypt: Option<Encryption>,
    key_file: Option<&Path>,
    secrets: &SecretEnv,
) -> Result<KeySource> {
    let how = match (encrypt, key_file) {
        (Some(how), _) => how,
        (None, Some(_)) => Encryption::KeyFile,
        (None, None) if can_prompt() => {
            eprintln!(
                "The secret key of the new identity {name:?} will be encrypted with a passphrase \
                 (for an unattended service use --encrypt key-file; --encrypt none stores it \
                 unencrypted)."
            );
            Encryption::Passphrase
        }
        (None, None) => Encryption::None,
    };
    new_source(
        &format!("the new identity {name:?}"),
        how,
        key_file,
        secrets,
    )
}

/// The key source `how` names, for protecting identity `what` anew: the
/// passphrase from `$POSTERN_PASSPHRASE` or asked twice, or the key file.
fn new_source(
    what: &str,
    how: Encryption,
    key_file: Option<&Path>,
    secrets: &SecretEnv,
) -> Result<KeySource> {
    if key_file.is_some() && how != Encryption::KeyFile {
        let how = clap::ValueEnum::to_possible_value(&how)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default();
        bail!("--key-file goes with --encrypt key-file, not with --encrypt {how}");
    }
    match how {
        Encryption::None => Ok(KeySource::DangerousUnencrypted),
        Encryption::Passphrase => {
            if let Some(pass) = env_passphrase(secrets)? {
                return Ok(KeySource::Passphrase(pass));
            }
            if !can_prompt() {
                bail!(
                    "encrypting with a passphrase needs one: set {PASSPHRASE_VAR}, or run this \
                     command from a terminal to be asked for one"
                );
            }
            let first = prompt(&format!("Passphrase for {what}: "))?;
            if first.is_empty() {
                bail!("the passphrase is empty; nothing was changed");
            }
            let again = prompt("The same passphrase again: ")?;
            if *first != *again {
                bail!("the two passphrases differ; nothing was changed");
            }
            Ok(KeySource::Passphrase(first))
        }
        Encryption::KeyFile => {
            let path = key_file_from(key_file, secrets).ok_or_else(|| {
                anyhow!(
                    "--encrypt key-file needs a key file: pass --key-file PATH or set \
                     {KEY_FILE_VAR} (create one with `postern identity keygen --out PATH`)"
                )
            })?;
            Ok(KeySource::KeyFile(path))
        }
    }
}

/// The `--name` flag that selects identity `name` in a suggested command.
fn name_flag(name: &str) -> String {
    if name == keyfile::DEFAULT_NAME {
        String::new()
    } else {
        format!(" --name {name}")
    }
}

/// Creates identity `name` (refusing an existing one before asking for
/// anything), protected as [`source_for_create`] decides, and reports it
/// with [`report_created`].
pub fn create(
    home: &Path,
    name: &str,
    encrypt: Option<Encryption>,
    key_file: Option<&Path>,
    secrets: &SecretEnv,
) -> Result<Identity> {
    let path = keyfile::resolve(home, name)?;
    // Refuse before asking for a passphrase that would be wasted.
    if path.symlink_metadata().is_ok() {
        return Err(IdentityError::AlreadyExists { path }.into());
    }
    let source = source_for_create(name, encrypt, key_file, secrets)?;
    let identity = keyfile::create_with(&path, &source)?;
    report_created(name, &path, &source, encrypt, secrets);
    Ok(identity)
}

/// Says on standard error where the new identity is and how its key is
/// protected; an unencrypted key gets a plain warning and the command that
/// encrypts it, unless `--encrypt none` asked for exactly that.
fn report_created(
    name: &str,
    path: &Path,
    source: &KeySource,
    encrypt: Option<Encryption>,
    secrets: &SecretEnv,
) {
    let protection = source.protection();
    eprintln!(
        "created identity {name:?} in {} (keep this file private; its secret key is {protection})",
        path.display()
    );
    // `--encrypt none` asked for exactly this, and the line above says it.
    if protection != Protection::Unencrypted || encrypt == Some(Encryption::None) {
        return;
    }
    let encrypt_it = format!("postern identity encrypt{}", name_flag(name));
    if let Some(var) = [PASSPHRASE_VAR, KEY_FILE_VAR]
        .into_iter()
        .find(|var| secrets.is_set(var))
    {
        eprintln!(
            "note: {var} is set but was not used: without a terminal, a new key is encrypted \
             only when --encrypt is given"
        );
    }
    eprintln!(
        "warning: the secret key is NOT encrypted (no terminal to ask for a passphrase, and no \
         --encrypt): anyone who can read {} or a backup of it can act as this identity. Encrypt \
         it with `{encrypt_it}` (asks for a passphrase, or reads {PASSPHRASE_VAR}), or for a \
         service `{encrypt_it} --encrypt key-file --key-file PATH` (see `postern identity \
         keygen`). Give --encrypt none to store keys unencrypted on purpose.",
        path.display()
    );
}

/// `postern identity encrypt`: encrypts the secret key of an existing,
/// unencrypted identity in place (written anew beside it, then renamed over
/// it). Returns the identity and its new protection.
pub fn encrypt_existing(
    home: &Path,
    name: &str,
    encrypt: Option<Encryption>,
    key_file: Option<&Path>,
    secrets: &SecretEnv,
) -> Result<(Identity, Protection)> {
    let (path, protection) = existing(home, name)?;
    if protection != Protection::Unencrypted {
        bail!(
            "{} is already {protection}; nothing was changed",
            describe(name, &path)
        );
    }
    let how = match (encrypt, key_file) {
        (Some(Encryption::None), _) => {
            bail!(
                "--encrypt none: {} is already not encrypted",
                describe(name, &path)
            )
        }
        (Some(how), _) => how,
        (None, Some(_)) => Encryption::KeyFile,
        (None, None) => Encryption::Passphrase,
    };
    let source = new_source(&describe(name, &path), how, key_file, secrets)?;
    let identity = keyfile::reencrypt(&path, &KeySource::DangerousUnencrypted, &source)?;
    Ok((identity, source.protection()))
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
