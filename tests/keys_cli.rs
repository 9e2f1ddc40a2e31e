//! Identity keys at rest, through the real `postern` binary (issue 3):
//! `identity create --encrypt passphrase|key-file`, `identity keygen`,
//! `identity show`, and a role (the relay) starting from an encrypted
//! identity with `POSTERN_PASSPHRASE` or `POSTERN_KEY_FILE`.
//!
//! Every child runs with standard input from `/dev/null`, so it is never
//! asked for a passphrase on a terminal: it must say which variable to set.
//! Each passphrase operation runs Argon2id once with the library's
//! parameters (19 MiB, 2 passes), a few tens of milliseconds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use postern_identity::keyfile::{self, KeySource};
use postern_identity::{Identifier, Identity};
use support::net::PosternHome;
use zeroize::Zeroizing;

const PASSPHRASE: &str = "correct horse battery staple";

/// Runs `postern args…` in `home` with exactly the secret variables in `env`.
fn run(home: &PosternHome, args: &[&str], env: &[(&str, &str)]) -> Output {
    home.command(args)
        .env_remove("POSTERN_PASSPHRASE")
        .env_remove("POSTERN_KEY_FILE")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running postern {args:?}: {e}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn succeeds(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        stdout(out),
        stderr(out)
    );
}

/// Fails with a clean error (no panic) that mentions every one of `needles`
/// and none of `secrets`.
fn fails_with(what: &str, out: &Output, needles: &[&str], secrets: &[&str]) {
    let all = format!("{}{}", stdout(out), stderr(out));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: expected exit status 1:\n{all}"
    );
    assert!(!all.contains("panicked"), "{what}: panicked:\n{all}");
    assert!(
        stderr(out).starts_with("error: "),
        "{what}: no `error:` line:\n{all}"
    );
    for needle in needles {
        assert!(all.contains(needle), "{what}: lacks {needle:?}:\n{all}");
    }
    for secret in secrets {
        assert!(!all.contains(secret), "{what}: prints a secret:\n{all}");
    }
}

fn identifier(out: &Output) -> Identifier {
    stdout(out)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("not an identifier on stdout ({e}): {}", stdout(out)))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The secret key of `identity`, read back from an unencrypted copy (the
/// library does not hand out secret keys otherwise).
fn secret_key_of(identity: &Identity) -> [u8; 32] {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("plain.key");
    keyfile::write_new(&copy, identity).unwrap();
    let text = std::fs::read_to_string(&copy).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("secret_key = "))
        .unwrap_or_else(|| panic!("no secret_key in {text}"));
    let mut key = [0u8; 32];
    hex::decode_to_slice(line.trim_matches('"'), &mut key).unwrap();
    key
}

/// The key file on disk is format 2 and holds neither the secret key of
/// `identity` (in hex or raw) nor `secret`.
fn assert_sealed(path: &Path, identity: &Identity, secret: &str) {
    let secret_key = &secret_key_of(identity);
    let bytes = std::fs::read(path).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("format = \"postern-identity/2\""), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("secret_key")), "{text}");
    assert!(!text.contains(&hex::encode(secret_key)), "{text}");
    assert!(
        !bytes.windows(32).any(|w| w == secret_key),
        "raw secret key in the file"
    );
    assert!(!secret.is_empty() && !text.contains(secret), "{text}");
}

#[test]
fn passphrase_protected_identity() {
    let home = PosternHome::new().unwrap();
    let pass = [("POSTERN_PASSPHRASE", PASSPHRASE)];

    // No passphrase and no terminal: a clear error, and nothing created.
    let out = run(
        &home,
        &[
            "identity",
            "create",
            "--name",
            "alice",
            "--encrypt",
            "passphrase",
        ],
        &[],
    );
    fails_with(
        "create without a passphrase",
        &out,
        &["POSTERN_PASSPHRASE"],
        &[],
    );
    assert!(!home.key_path("alice").exists());
    let out = run(
        &home,
        &[
            "identity",
            "create",
            "--name",
            "alice",
            "--encrypt",
            "passphrase",
        ],
        &[("POSTERN_PASSPHRASE", "")],
    );
    fails_with("create with an empty passphrase", &out, &["empty"], &[]);

    let started = Instant::now();
    let out = run(
        &home,
        &[
            "identity",
            "create",
            "--name",
            "alice",
            "--encrypt",
            "passphrase",
        ],
        &pass,
    );
    let create_time = started.elapsed();
    succeeds("create --encrypt passphrase", &out);
    let id = identifier(&out);
    assert!(
        stderr(&out).contains("encrypted with a passphrase"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(PASSPHRASE));
    let path = home.key_path("alice");
    assert_eq!(mode(&path), 0o600);

    // The file does not hold the key, and the library's unencrypted loader
    // refuses it; the passphrase opens it.
    assert!(keyfile::load(&path).is_err());
    let identity = keyfile::load_with(
        &path,
        &KeySource::Passphrase(Zeroizing::new(PASSPHRASE.into())),
    )
    .unwrap();
    assert_eq!(identity.identifier(), id);
    assert_sealed(&path, &identity, PASSPHRASE);

    // `identity show`: the right passphrase, a wrong one, none.
    let started = Instant::now();
    let out = run(&home, &["identity", "show", "--name", "alice"], &pass);
    let show_time = started.elapsed();
    succeeds("show with the passphrase", &out);
    assert_eq!(identifier(&out), id);
    assert!(stderr(&out).contains("encrypted with a passphrase"));
    eprintln!("create with a passphrase: {create_time:?}, show: {show_time:?}");

    let out = run(
        &home,
        &["identity", "show", "--name", "alice"],
        &[("POSTERN_PASSPHRASE", "wrong horse")],
    );
    fails_with(
        "show with a wrong passphrase",
        &out,
        &[
            "wrong passphrase for identity \"alice\"",
            "POSTERN_PASSPHRASE",
        ],
        &["wrong horse", PASSPHRASE],
    );
    let out = run(&home, &["identity", "show", "--name", "alice"], &[]);
    fails_with(
        "show without a passphrase",
        &out,
        &["encrypted with a passphrase", "POSTERN_PASSPHRASE"],
        &[],
    );
    // A key file given for a passphrase-protected identity does not help.
    let out = run(
        &home,
        &["identity", "show", "--name", "alice"],
        &[("POSTERN_KEY_FILE", "/nonexistent")],
    );
    fails_with("show with a key file", &out, &["POSTERN_PASSPHRASE"], &[]);

    // Encrypted or not, a key file others can read is refused, with the fix.
    chmod(&path, 0o640);
    let out = run(&home, &["identity", "show", "--name", "alice"], &pass);
    fails_with(
        "group-readable identity",
        &out,
        &["chmod 600"],
        &[PASSPHRASE],
    );
    chmod(&path, 0o600);

    // Never overwritten, and refused before any passphrase is used.
    let out = run(
        &home,
        &[
            "identity",
            "create",
            "--name",
            "alice",
            "--encrypt",
            "passphrase",
        ],
        &pass,
    );
    fails_with(
        "create over an existing identity",
        &out,
        &["refusing to overwrite"],
        &[],
    );
}

#[test]
fn unencrypted_default_with_a_hint() {
    let home = PosternHome::new().unwrap();
    let out = run(
        &home,
        &["identity", "create"],
        &[("POSTERN_PASSPHRASE", PASSPHRASE)],
    );
    succeeds("create", &out);
    let err = stderr(&out);
    assert!(
        err.contains("not encrypted") && err.contains("--encrypt"),
        "{err}"
    );
    assert!(
        err.contains("POSTERN_PASSPHRASE is set but was not used"),
        "{err}"
    );
    let text = std::fs::read_to_string(home.key_path("default")).unwrap();
    assert!(text.contains("postern-identity/1"), "{text}");
    let out = run(&home, &["identity", "show"], &[]);
    succeeds("show", &out);
    assert!(stderr(&out).contains("not encrypted"), "{}", stderr(&out));
}

#[test]
fn key_file_protected_identity() {
    let home = PosternHome::new().unwrap();
    let key = home.path().join("svc.hexkey");
    let key_arg = key.to_str().unwrap();

    // --encrypt key-file needs a key file, and says how to make one.
    let out = run(
        &home,
        &[
            "identity",
            "create",
            "--name",
            "svc",
            "--encrypt",
            "key-file",
        ],
        &[],
    );
    fails_with(
        "create without a key file",
        &out,
        &["--key-file", "POSTERN_KEY_FILE", "postern identity keygen"],
        &[],
    );

    let out = run(&home, &["identity", "keygen", "--out", key_arg], &[]);
    succeeds("keygen", &out);
    assert_eq!(mode(&key), 0o600);
    let key_text = std::fs::read_to_string(&key).unwrap();
    let key_hex = key_text.trim();
    assert!(
        key_hex.len() == 64 && key_hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{key_text:?}"
    );
    assert!(!format!("{}{}", stdout(&out), stderr(&out)).contains(key_hex));
    let out = run(&home, &["identity", "keygen", "--out", key_arg], &[]);
    fails_with(
        "keygen over an existing key",
        &out,
        &["refusing to overwrite"],
        &[],
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), key_text);

    // A key file others can read is refused, with the fix, and nothing is
    // created.
    chmod(&key, 0o644);
    let out = run(
        &home,
        &[
            "identity",
            "create",
            "--name",
            "svc",
            "--encrypt",
            "key-file",
            "--key-file",
            key_arg,
        ],
        &[],
    );
    fails_with(
        "create with a 0644 key file",
        &out,
        &[&format!("chmod 600 {key_arg}")],
        &[key_hex],
    );
    assert!(!home.key_path("svc").exists());
    chmod(&key, 0o600);

    // --key-file implies --encrypt key-file.
    let out = run(
        &home,
        &["identity", "create", "--name", "svc", "--key-file", key_arg],
        &[],
    );
    succeeds("create --key-file", &out);
    let id = identifier(&out);
    assert!(
        stderr(&out).contains("encrypted with a key"),
        "{}",
        stderr(&out)
    );
    let path = home.key_path("svc");
    assert_eq!(mode(&path), 0o600);
    let identity = keyfile::load_with(&path, &KeySource::KeyFile(key.clone())).unwrap();
    assert_eq!(identity.identifier(), id);
    assert_sealed(&path, &identity, key_hex);

    // `identity show`: from the variable, from the flag, without, with
    // another key, with a key file others can read.
    let env = [("POSTERN_KEY_FILE", key_arg)];
    let out = run(&home, &["identity", "show", "--name", "svc"], &env);
    succeeds("show with POSTERN_KEY_FILE", &out);
    assert_eq!(identifier(&out), id);
    assert!(stderr(&out).contains("encrypted with a key"));
    let out = run(
        &home,
        &["identity", "show", "--name", "svc", "--key-file", key_arg],
        &[],
    );
    succeeds("show --key-file", &out);
    assert_eq!(identifier(&out), id);
    let out = run(&home, &["identity", "show", "--name", "svc"], &[]);
    fails_with("show without a key file", &out, &["POSTERN_KEY_FILE"], &[]);
    let other = home.path().join("other.hexkey");
    succeeds(
        "keygen",
        &run(
            &home,
            &["identity", "keygen", "--out", other.to_str().unwrap()],
            &[],
        ),
    );
    let out = run(
        &home,
        &["identity", "show", "--name", "svc"],
        &[("POSTERN_KEY_FILE", other.to_str().unwrap())],
    );
    fails_with(
        "show with another key",
        &out,
        &["does not unlock"],
        &[key_hex],
    );
    let out = run(
        &home,
        &["identity", "show", "--name", "svc"],
        &[("POSTERN_PASSPHRASE", PASSPHRASE)],
    );
    fails_with(
        "show with a passphrase",
        &out,
        &["POSTERN_KEY_FILE"],
        &[PASSPHRASE],
    );
    chmod(&key, 0o644);
    let out = run(&home, &["identity", "show", "--name", "svc"], &env);
    fails_with(
        "show with a 0644 key file",
        &out,
        &[&format!("chmod 600 {key_arg}")],
        &[key_hex],
    );
}

/// A `postern` child whose stderr lines arrive on a channel; killed on drop.
struct Spawned {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: String,
}

impl Spawned {
    fn start(home: &PosternHome, args: &[&str], env: &[(&str, &str)]) -> Spawned {
        let mut child = home
            .command(args)
            .env_remove("POSTERN_PASSPHRASE")
            .env_remove("POSTERN_KEY_FILE")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pipe = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Spawned {
            child,
            lines,
            seen: String::new(),
        }
    }

    /// Waits for a line containing `needle`; `Err` with everything seen if
    /// the process ends (or `timeout` passes) first.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => return Err(self.seen.clone()),
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn relay_starts_from_an_encrypted_identity() {
    let home = PosternHome::new().unwrap();
    let pass = [("POSTERN_PASSPHRASE", PASSPHRASE)];
    let out = run(
        &home,
        &[
            "identity",
            "create",
            "--name",
            "relay",
            "--encrypt",
            "passphrase",
        ],
        &pass,
    );
    succeeds("create", &out);
    let id = identifier(&out);
    let relay_args = ["relay", "--identity", "relay", "--listen", "127.0.0.1:0"];

    let started = Instant::now();
    let mut relay = Spawned::start(&home, &relay_args, &pass);
    let line = relay
        .wait_for("listening on", Duration::from_secs(20))
        .unwrap_or_else(|seen| panic!("the relay did not start:\n{seen}"));
    eprintln!("relay up in {:?}: {line}", started.elapsed());
    assert!(line.contains(&id.to_string()), "{line}");
    assert!(!relay.seen.contains(PASSPHRASE));
    drop(relay);

    // Without the passphrase, or with a wrong one, it does not start.
    let out = run(&home, &relay_args, &[]);
    fails_with(
        "relay without a passphrase",
        &out,
        &["POSTERN_PASSPHRASE"],
        &[],
    );
    let out = run(&home, &relay_args, &[("POSTERN_PASSPHRASE", "nope nope")]);
    fails_with(
        "relay with a wrong passphrase",
        &out,
        &["wrong passphrase for identity \"relay\""],
        &["nope nope", PASSPHRASE],
    );

    // The same with a key file, for an unattended relay.
    let key = home.path().join("relay.hexkey");
    let key_arg = key.to_str().unwrap();
    succeeds(
        "keygen",
        &run(&home, &["identity", "keygen", "--out", key_arg], &[]),
    );
    let out = run(
        &home,
        &[
            "identity",
            "create",
            "--name",
            "relay2",
            "--encrypt",
            "key-file",
            "--key-file",
            key_arg,
        ],
        &[],
    );
    succeeds("create relay2", &out);
    let id2 = identifier(&out);
    let mut relay = Spawned::start(
        &home,
        &["relay", "--identity", "relay2", "--listen", "127.0.0.1:0"],
        &[("POSTERN_KEY_FILE", key_arg)],
    );
    let line = relay
        .wait_for("listening on", Duration::from_secs(20))
        .unwrap_or_else(|seen| panic!("the relay did not start:\n{seen}"));
    assert!(line.contains(&id2.to_string()), "{line}");
}
