//! Keys at rest: encrypted identity files (`postern-identity/2`).
//!
//! The checked-in `vectors/identity_v2_passphrase.key` (passphrase
//! `correct horse battery staple`) makes sure files written today stay
//! readable; regenerate it with
//! `cargo test -p postern-identity --test keys_at_rest -- --ignored regenerate_vector`
//! only if the format changes on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use postern_identity::keyfile::{self, KeyFileError, KeySource};
use postern_identity::sealed::{self, Protection};
use postern_identity::{Identity, IdentityError};
use zeroize::Zeroizing;

const VECTOR_PASSPHRASE: &str = "correct horse battery staple";
/// The secret key inside the vector file.
const VECTOR_SECRET: [u8; 32] = [0x5a; 32];

fn pass(p: &str) -> KeySource {
    KeySource::Passphrase(Zeroizing::new(p.to_owned()))
}

fn vector_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/identity_v2_passphrase.key")
}

/// Secret bytes of an identity, recovered through a v1 file (the only public
/// way to see them).
fn secret_of(identity: &Identity, dir: &Path) -> [u8; 32] {
    let p = dir.join(format!("plain-{}.key", identity.identifier()));
    keyfile::write_new(&p, identity).unwrap();
    let text = fs::read_to_string(&p).unwrap();
    fs::remove_file(&p).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("secret_key"))
        .unwrap()
        .to_owned();
    let hex_part = line.split('"').nth(1).unwrap();
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).unwrap();
    out
}

fn assert_no_secret(path: &Path, secret: &[u8; 32]) {
    let bytes = fs::read(path).unwrap();
    let text = String::from_utf8_lossy(&bytes).to_string();
    assert!(
        !bytes.windows(32).any(|w| w == secret),
        "raw secret bytes in {}",
        path.display()
    );
    let lower = hex::encode(secret);
    assert!(!text.contains(&lower), "hex secret in file");
    assert!(!text.contains(&lower.to_uppercase()), "HEX secret in file");
    assert!(
        !text.contains(&lower[..16]),
        "part of the hex secret in file"
    );
}

#[test]
fn passphrase_round_trip_without_raw_key_in_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ids/alice.key");
    let created = keyfile::create_with(&path, &pass("s3cret passphrase")).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_no_secret(&path, &secret_of(&created, dir.path()));
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("postern-identity/2"), "{text}");
    assert!(text.contains("argon2id"), "{text}");
    assert!(text.contains(&created.identifier().to_string()));

    let loaded = keyfile::load_with(&path, &pass("s3cret passphrase")).unwrap();
    assert_eq!(loaded.identifier(), created.identifier());
    assert_eq!(keyfile::protection(&path).unwrap(), Protection::Passphrase);
    // Same signing key.
    let sig = loaded.sign(b"t", b"m");
    assert!(created.public().verify(b"t", b"m", &sig));
    assert!(matches!(
        keyfile::create_with(&path, &pass("x")),
        Err(KeyFileError::Identity(IdentityError::AlreadyExists { .. }))
    ));
}

#[test]
fn wrong_passphrase_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.key");
    keyfile::create_with(&path, &pass("right")).unwrap();
    let err = keyfile::load_with(&path, &pass("wrong")).unwrap_err();
    assert!(matches!(err, KeyFileError::WrongPassphrase { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "wrong passphrase for identity file {}",
            path.display()
        )),
        "{text}"
    );
    // Wrong kind of source, and none at all.
    let err = keyfile::load_with(&path, &KeySource::Env("POSTERN_KAR_UNSET_1".into()));
    assert!(
        matches!(err, Err(KeyFileError::KeySource { .. })),
        "{err:?}"
    );
    let err = keyfile::load_with(&path, &KeySource::DangerousUnencrypted).unwrap_err();
    assert!(
        matches!(err, KeyFileError::WrongKindOfSource { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("passphrase"), "{err}");
    // The plain `load` says why it cannot open the file.
    let err = keyfile::load(&path).unwrap_err();
    assert!(matches!(err, IdentityError::BadKeyFile { .. }));
    assert!(
        err.to_string().contains("encrypted with a passphrase"),
        "{err}"
    );
}

fn replace_field(path: &Path, field: &str, f: impl Fn(&str) -> String) {
    let text = fs::read_to_string(path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if let Some(value) = line
            .strip_prefix(&format!("{field} = \""))
            .and_then(|v| v.strip_suffix('"'))
        {
            out.push_str(&format!("{field} = \"{}\"\n", f(value)));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_ne!(out, text, "field {field} not found");
    fs::write(path, out).unwrap();
}

fn flip_first_hex(value: &str) -> String {
    let mut chars: Vec<char> = value.chars().collect();
    chars[0] = if chars[0] == '0' { '1' } else { '0' };
    chars.into_iter().collect()
}

#[test]
fn tampered_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = pass("pw");
    let path = dir.path().join("a.key");
    keyfile::create_with(&path, &p).unwrap();
    let original = fs::read_to_string(&path).unwrap();

    // Ciphertext altered.
    replace_field(&path, "encrypted_secret_key", flip_first_hex);
    let err = keyfile::load_with(&path, &p).unwrap_err();
    assert!(matches!(err, KeyFileError::Tampered { .. }), "{err}");
    assert!(err.to_string().contains("modified or damaged"), "{err}");

    // Nonce altered.
    fs::write(&path, &original).unwrap();
    replace_field(&path, "nonce", flip_first_hex);
    assert!(matches!(
        keyfile::load_with(&path, &p),
        Err(KeyFileError::Tampered { .. })
    ));

    // Identifier replaced.
    fs::write(&path, &original).unwrap();
    let other = Identity::generate().identifier().to_string();
    replace_field(&path, "identifier", |_| other.clone());
    assert!(matches!(
        keyfile::load_with(&path, &p),
        Err(KeyFileError::Identity(IdentityError::BadKeyFile { .. }))
    ));

    // Garbage, unknown format, missing fields.
    fs::write(&path, b"\x00\xff").unwrap();
    assert!(keyfile::load_with(&path, &p).is_err());
    fs::write(&path, "format = \"postern-identity/9\"\n").unwrap();
    let err = keyfile::load_with(&path, &p).unwrap_err();
    assert!(err.to_string().contains("unsupported format"), "{err}");
    fs::write(&path, "format = \"postern-identity/2\"\n").unwrap();
    assert!(matches!(
        keyfile::load_with(&path, &p),
        Err(KeyFileError::Identity(IdentityError::BadKeyFile { .. }))
    ));
    // Absurd KDF settings are refused before any work is done.
    fs::write(&path, &original).unwrap();
    let text = original.replace("kdf_memory_kib = 19456", "kdf_memory_kib = 4000000000");
    assert_ne!(text, original);
    fs::write(&path, text).unwrap();
    assert!(matches!(
        keyfile::load_with(&path, &p),
        Err(KeyFileError::Identity(IdentityError::BadKeyFile { .. }))
    ));
}

#[test]
fn ciphertexts_do_not_move_between_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = pass("same passphrase");
    let a = dir.path().join("a.key");
    let b = dir.path().join("b.key");
    keyfile::create_with(&a, &p).unwrap();
    keyfile::create_with(&b, &p).unwrap();
    let text_a = fs::read_to_string(&a).unwrap();
    let field = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} = ")))
            .unwrap()
            .to_owned()
    };
    // Move a's sealed secret (salt, nonce, check, ciphertext) into b.
    let mut text_b = fs::read_to_string(&b).unwrap();
    for name in ["salt", "nonce", "key_check", "encrypted_secret_key"] {
        text_b = text_b.replace(&field(&text_b, name), &field(&text_a, name));
    }
    fs::write(&b, text_b).unwrap();
    let err = keyfile::load_with(&b, &p).unwrap_err();
    assert!(matches!(err, KeyFileError::Tampered { .. }), "{err}");
}

#[test]
fn world_readable_encrypted_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.key");
    keyfile::create_with(&path, &pass("pw")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = keyfile::load_with(&path, &pass("pw")).unwrap_err();
    assert!(
        matches!(
            err,
            KeyFileError::Identity(IdentityError::Permissions { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn key_file_and_environment_sources() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("service.secret");
    sealed::write_new_key_file(&key).unwrap();
    let source = KeySource::KeyFile(key.clone());
    let path = dir.path().join("svc.key");
    let created = keyfile::create_with(&path, &source).unwrap();
    assert_no_secret(&path, &secret_of(&created, dir.path()));
    assert_eq!(keyfile::protection(&path).unwrap(), Protection::Key);
    let text = fs::read_to_string(&path).unwrap();
    assert!(!text.contains("argon2"), "{text}");
    assert_eq!(
        keyfile::load_with(&path, &source).unwrap().identifier(),
        created.identifier()
    );

    // Another key does not open it; a passphrase is the wrong kind.
    let other_key = dir.path().join("other.secret");
    sealed::write_new_key_file(&other_key).unwrap();
    let err = keyfile::load_with(&path, &KeySource::KeyFile(other_key)).unwrap_err();
    assert!(matches!(err, KeyFileError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("other.secret"), "{err}");
    let err = keyfile::load_with(&path, &pass("pw")).unwrap_err();
    assert!(
        matches!(err, KeyFileError::WrongKindOfSource { .. }),
        "{err}"
    );

    // The same key through an environment variable (unique name; no other
    // test reads it).
    let var = "POSTERN_KEYS_AT_REST_TEST_KEY";
    let key_hex = fs::read_to_string(&key).unwrap();
    std::env::set_var(var, key_hex.trim());
    let env_source = KeySource::Env(var.into());
    assert_eq!(
        keyfile::load_with(&path, &env_source).unwrap().identifier(),
        created.identifier()
    );
    let env_path = dir.path().join("env.key");
    keyfile::create_with(&env_path, &env_source).unwrap();
    assert!(keyfile::load_with(&env_path, &source).is_ok());
    std::env::set_var(var, "not hex");
    let err = keyfile::load_with(&path, &env_source).unwrap_err();
    assert!(err.to_string().contains("64 hex digits"), "{err}");
    std::env::remove_var(var);

    // A key file readable by others is refused.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = keyfile::load_with(&path, &source).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn bad_sources_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.key");
    let err = keyfile::create_with(&path, &pass("")).unwrap_err();
    assert!(err.to_string().contains("passphrase is empty"), "{err}");
    let missing = KeySource::KeyFile(dir.path().join("missing"));
    assert!(keyfile::create_with(&path, &missing).is_err());
    assert!(!path.exists());
}

#[test]
fn v1_files_keep_working_and_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.key");
    let created = keyfile::create(&path).unwrap();
    assert_eq!(keyfile::protection(&path).unwrap(), Protection::Unencrypted);
    // Loadable with or without a source.
    assert!(keyfile::load(&path).is_ok());
    assert!(keyfile::load_with(&path, &pass("anything")).is_ok());
    assert!(keyfile::load_with(&path, &KeySource::DangerousUnencrypted).is_ok());

    // Migrate to a passphrase, then change it.
    let migrated =
        keyfile::reencrypt(&path, &KeySource::DangerousUnencrypted, &pass("one")).unwrap();
    assert_eq!(migrated.identifier(), created.identifier());
    assert_eq!(keyfile::protection(&path).unwrap(), Protection::Passphrase);
    assert_no_secret(&path, &secret_of(&created, dir.path()));
    assert!(keyfile::load(&path).is_err());
    keyfile::reencrypt(&path, &pass("one"), &pass("two")).unwrap();
    assert!(matches!(
        keyfile::load_with(&path, &pass("one")),
        Err(KeyFileError::WrongPassphrase { .. })
    ));
    assert_eq!(
        keyfile::load_with(&path, &pass("two"))
            .unwrap()
            .identifier(),
        created.identifier()
    );
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // No temporary files are left behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // A wrong old passphrase leaves the file as it was.
    assert!(keyfile::reencrypt(&path, &pass("nope"), &pass("three")).is_err());
    assert!(keyfile::load_with(&path, &pass("two")).is_ok());
}

#[test]
fn checked_in_v2_file_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vector.key");
    fs::copy(vector_path(), &path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let expected = Identity::from_secret_bytes(&VECTOR_SECRET);
    let loaded = keyfile::load_with(&path, &pass(VECTOR_PASSPHRASE)).unwrap();
    assert_eq!(loaded.identifier(), expected.identifier());
    assert!(matches!(
        keyfile::load_with(&path, &pass("Correct horse battery staple")),
        Err(KeyFileError::WrongPassphrase { .. })
    ));
    assert_no_secret(&path, &VECTOR_SECRET);
}

#[test]
#[ignore = "rewrites tests/vectors/identity_v2_passphrase.key"]
fn regenerate_vector() {
    let path = vector_path();
    let _ = fs::remove_file(&path);
    keyfile::write_new_with(
        &path,
        &Identity::from_secret_bytes(&VECTOR_SECRET),
        &pass(VECTOR_PASSPHRASE),
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
}
