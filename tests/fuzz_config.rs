//! Fuzzing of the TOML configuration files on the stable toolchain, through
//! the real `postern` binary: random files, and mutations of the valid
//! fixtures in `tests/config/valid/` (wrong keys and types, huge numbers,
//! bad durations, identifiers, addresses and service names, invalid UTF-8,
//! deep nesting, byte flips and truncations), given to
//! `postern relay|outlet|inlet --config FILE` in a home without identities,
//! so that every run stops after the file has been read and checked. Each
//! run must end with exit status 1 and an `error: …` on standard error:
//! never a panic (status 101, "panicked"), never a signal (a stack overflow
//! aborts), never a hang; and that error is one short line
//! (`config_errors_are_one_line`): `line L, column C: <what is wrong>`.
//!
//! Where each decoder of untrusted or user-supplied input is fuzzed:
//!
//! | Decoder | `cargo fuzz` target (`fuzz/`, nightly) | Stable test |
//! | --- | --- | --- |
//! | Frame lengths (`frame::decode`) | `frame_decode` | `tests/fuzz_entry_points.rs` |
//! | Control messages (`wire::Control`) | `control_message` | `tests/fuzz_entry_points.rs` |
//! | Data frames, close reasons, hello, attach | `data_frame` | `tests/fuzz_entry_points.rs` |
//! | Identity proofs (`verify_proof`) | `handshake_payload` | `tests/fuzz_entry_points.rs` |
//! | Raw XX / IK handshake messages | `handshake_message` | `tests/fuzz_entry_points.rs` |
//! | Credentials (envelope, body, `verify`) | `credential_decode` | `tests/fuzz_entry_points.rs` |
//! | Enrollment tickets (text, CBOR) | `ticket_parse` | `tests/fuzz_entry_points.rs` |
//! | Policy text (`scan.rs` guard, Cedar parser, validator) | `policy_text` | `tests/fuzz_policies.rs` |
//! | Audit logs (`audit::verify`, checkpoints, events) | `audit_line` | `tests/fuzz_policies.rs` |
//! | TOML config files (`config::parse_file`, binary) | none (the parser lives in the binary) | this file |
//!
//! `POSTERN_FUZZ_CONFIG_ITERATIONS` (default 90) sets the number of
//! generated files per role; at the default the test takes a few seconds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::net::PosternHome;

const ROLES: [&str; 3] = ["relay", "outlet", "inlet"];
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// Every key a role's file accepts, so that mutations also add keys that
/// exist (with bad values), not only unknown ones.
fn keys(role: &str) -> &'static [&'static str] {
    match role {
        "relay" => &[
            "identity",
            "listen",
            "handshake_timeout",
            "max_connections",
            "max_pending_handshakes",
            "max_pending_per_source",
            "max_tunnels",
            "audit_log",
            "audit_fail_closed",
        ],
        "outlet" => &[
            "identity",
            "relay",
            "relay_identity",
            "service",
            "target",
            "allow",
            "allow_attributes",
            "trust_authorities",
            "credential",
            "fallback_relays",
            "max_tunnels",
            "idle_timeout",
            "drain_grace",
            "audit_log",
            "audit_fail_closed",
        ],
        _ => &[
            "identity",
            "relay",
            "relay_identity",
            "service",
            "listen",
            "outlet_identity",
            "dangerous_allow_non_loopback",
            "trust_authorities",
            "credential",
            "fallback_relays",
            "max_tunnels",
            "idle_timeout",
            "drain_grace",
        ],
    }
}

/// Values that are wrong somewhere: types, ranges, formats, encodings.
fn hostile_values() -> Vec<String> {
    let id = "P3f2a00000000000000000000000000000000beef";
    let mut v: Vec<String> = [
        // Numbers and other types.
        "0",
        "-1",
        "1",
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775807",
        "-9223372036854775808",
        "99999999999999999999999999999999",
        "0x7fffffffffffffff",
        "0b1",
        "1_000_000",
        "1e309",
        "-0.0",
        "inf",
        "nan",
        "true",
        "false",
        "1.5",
        "[]",
        "[1, 2]",
        "[[], [[]]]",
        "{}",
        "{ a = 1 }",
        "1979-05-27T07:32:00Z",
        "07:32:00",
        // Strings: empty, blank, escapes.
        "\"\"",
        "\" \"",
        "\"\\u0000\"",
        "\"\\uD800\"",
        "\"\\x41\"",
        "'''multi\nline'''",
        // Durations.
        "\"-1s\"",
        "\"1e999s\"",
        "\"99999999999999999999d\"",
        "\"18446744073709551616s\"",
        "\"184467440737095516.16s\"",
        "\"1e308d\"",
        "\"NaNs\"",
        "\"infs\"",
        "\"inf\"",
        "\"1.5.5s\"",
        "\"ms\"",
        "\"10 years\"",
        "\"\u{663}s\"",
        "\"0.0000000001ms\"",
        "\"0\"",
        // Identifiers.
        "\"P\"",
        "\"Q3f2a\"",
        "\"P3f2a0000000000000000000000000000000beef\"",
        "\"P3f2a00000000000000000000000000000000beef0\"",
        "\"p3f2a00000000000000000000000000000000beef\"",
        "\"Pgggggggggggggggggggggggggggggggggggggggg\"",
        "\"P3f2a00000000000000000000000000000000be\u{e9}f\"",
        // Addresses, targets, relays, services, attributes, paths.
        "\"localhost\"",
        "\"localhost:4000\"",
        "\"127.0.0.1:0\"",
        "\"127.0.0.1:99999\"",
        "\"[::1]:4000\"",
        "\"[::1\"",
        "\":4000\"",
        "\"host:-1\"",
        "\"unix:\"",
        "\"unix:/\"",
        "\"unix:relative\"",
        "\"db prod\"",
        "\"-db\"",
        "\"d\u{fc}b\"",
        "\"..\"",
        "\"../../etc/passwd\"",
        "\"/dev/zero\"",
        "\"/nonexistent/credential.cred\"",
        "[\"role\"]",
        "[\"=analyst\"]",
        "[\"role=\"]",
        "[\"P\"]",
        "[\"@relay2.example:4000\"]",
        "[1]",
    ]
    .map(String::from)
    .to_vec();
    v.push(format!("[\"{id}@\"]"));
    v.push(format!("[\"{id}@relay2.example:0\"]"));
    v.push(format!("[\"{id}\", \"{id}\", 3]"));
    v.push(format!("\"{}\"", "a".repeat(64)));
    v.push(format!("\"unix:/{}\"", "a".repeat(5000)));
    v.push(format!("\"{}\"", "x".repeat(100_000)));
    v.push(format!("\"{}:4000\"", "h".repeat(300)));
    // Deep nesting.
    v.push(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)));
    v.push(format!("{}1{}", "{ a = ".repeat(5_000), " }".repeat(5_000)));
    v.push(format!("{}1{}", "[".repeat(200), "]".repeat(200)));
    v
}

/// Whole files that are wrong as a whole.
fn hostile_files() -> Vec<Vec<u8>> {
    let mut files: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"\xef\xbb\xbf".to_vec(),
        b"\xef\xbb\xbfidentity = \"relay\"\n".to_vec(),
        b"identity = \"relay\"\r\nlisten = \"127.0.0.1:0\"\r\n".to_vec(),
        b"\xff\xfe\x00i\x00d".to_vec(),
        b"identity = \"\xc3\x28\"\n".to_vec(),
        b"identity = \"a\x00b\"\n".to_vec(),
        b"\x00\x00\x00\x00".to_vec(),
        b"[relay]\nlisten = \"127.0.0.1:0\"\n".to_vec(),
        b"identity = \"a\"\nidentity = \"b\"\n".to_vec(),
        b"identity.name = \"a\"\n".to_vec(),
        b"[[identity]]\n".to_vec(),
        b"listen = 1979-05-27\n".to_vec(),
        b"max_tunnels = 1\nmax_tunnels.x = 2\n".to_vec(),
    ];
    files.push(format!("{} = 1\n", vec!["a"; 10_000].join(".")).into_bytes());
    files.push(format!("[{}]\n", vec!["a"; 10_000].join(".")).into_bytes());
    files.push(format!("a = {}{}\n", "[".repeat(100_000), "]".repeat(100_000)).into_bytes());
    files.push(format!("a = {}\n", "{ b = ".repeat(100_000)).into_bytes());
    files.push(format!("# {}\n", "c".repeat(2 << 20)).into_bytes());
    files.push("x".repeat(1 << 20).into_bytes());
    files
}

/// The valid fixtures of `role`.
fn seeds(role: &str) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config/valid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{role}-")) && n.ends_with(".toml"))
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no valid {role} fixtures in {}",
        dir.display()
    );
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

/// One structural or byte-level change to a TOML file.
fn mutate(rng: &mut StdRng, role: &str, seed: &str, values: &[String]) -> Vec<u8> {
    let mut lines: Vec<String> = seed.lines().map(String::from).collect();
    let pick_value = |rng: &mut StdRng| values[rng.gen_range(0..values.len())].clone();
    let assignment = |l: &String| l.contains('=') && !l.trim_start().starts_with('#');
    let assigned: Vec<usize> = (0..lines.len())
        .filter(|&i| assignment(&lines[i]))
        .collect();
    for _ in 0..rng.gen_range(1..=3) {
        let target = (!assigned.is_empty()).then(|| assigned[rng.gen_range(0..assigned.len())]);
        match (rng.gen_range(0..8), target) {
            // A bad value for an existing key.
            (0 | 1, Some(i)) => {
                let key = lines[i].split('=').next().unwrap_or("").trim().to_owned();
                lines[i] = format!("{key} = {}", pick_value(rng));
            }
            // A known key of this role (or another's) with a bad value.
            (2, _) => {
                let all = [keys(role), keys("relay"), keys("inlet")].concat();
                let key = all[rng.gen_range(0..all.len())];
                lines.push(format!("{key} = {}", pick_value(rng)));
            }
            // An unknown key, a misspelt one, a quoted or empty one.
            (3, Some(i)) => {
                let (key, value) = lines[i].split_once('=').unwrap_or(("", ""));
                let key = key.trim();
                let new = match rng.gen_range(0..4) {
                    0 => format!("{key}x"),
                    1 => key.to_uppercase(),
                    2 => format!("\"{key}\""),
                    _ => "\"\"".to_owned(),
                };
                lines[i] = format!("{new} ={value}");
            }
            // A duplicated or removed line.
            (4, Some(i)) => {
                if rng.gen() {
                    let line = lines[i].clone();
                    lines.push(line);
                } else {
                    lines.remove(i);
                    return lines.join("\n").into_bytes();
                }
            }
            // A table header or a dotted key.
            (5, Some(i)) => {
                let key = lines[i].split('=').next().unwrap_or("").trim().to_owned();
                if rng.gen() {
                    lines.insert(rng.gen_range(0..=lines.len()), format!("[{key}]"));
                } else {
                    lines.push(format!("{key}.inner = 1"));
                }
            }
            // Bytes: flip, truncate, insert invalid UTF-8 or NUL.
            _ => {
                let mut bytes = lines.join("\n").into_bytes();
                if bytes.is_empty() {
                    return vec![0xff];
                }
                let at = rng.gen_range(0..bytes.len());
                match rng.gen_range(0..4) {
                    0 => bytes[at] ^= 1 << rng.gen_range(0..8),
                    1 => bytes.truncate(at),
                    2 => {
                        let junk: &[u8] =
                            [&b"\xff"[..], b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\x00"]
                                [rng.gen_range(0..5)];
                        bytes.splice(at..at, junk.iter().copied());
                    }
                    _ => bytes.insert(at, rng.gen()),
                }
                return bytes;
            }
        }
    }
    lines.join("\n").into_bytes()
}

/// Random bytes, or a soup of TOML tokens.
fn garbage(rng: &mut StdRng) -> Vec<u8> {
    if rng.gen() {
        return (0..rng.gen_range(0..400)).map(|_| rng.gen()).collect();
    }
    const TOKENS: [&str; 20] = [
        "=", "[", "]", "[[", "]]", "{", "}", "\"", "'", "\n", "#", "identity", "listen", "1", ",",
        ".", "\\", "\"\"\"", "'''", " ",
    ];
    (0..rng.gen_range(0..80))
        .map(|_| TOKENS[rng.gen_range(0..TOKENS.len())])
        .collect::<String>()
        .into_bytes()
}

/// What one run of the binary did.
struct Outcome {
    status: Option<ExitStatus>,
    stderr: String,
}

/// Runs `postern <role> --config <file>`; kills it after [`RUN_TIMEOUT`].
fn run(home: &PosternHome, role: &str, file: &Path) -> Outcome {
    let mut child = home
        .command(&[role, "--config", file.to_str().unwrap()])
        .env_remove("POSTERN_PASSPHRASE")
        .env_remove("POSTERN_KEY_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = pipe.read_to_end(&mut text);
        text
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stderr = String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned();
    Outcome { status, stderr }
}

/// Why an outcome is a crash, if it is: a hang, a signal (a stack overflow
/// aborts), a panic, an exit status other than 1, or no `error: ` line.
fn crashed(outcome: &Outcome) -> Option<String> {
    let Some(status) = outcome.status else {
        return Some(format!("still running after {RUN_TIMEOUT:?}"));
    };
    let Some(code) = status.code() else {
        return Some(format!("killed by a signal ({status})"));
    };
    let err = &outcome.stderr;
    if code == 101 || err.contains("panicked") || err.contains("overflowed its stack") {
        return Some(format!("panicked (exit status {code})"));
    }
    if code != 1 {
        return Some(format!("exit status {code}, expected 1"));
    }
    if !err.starts_with("error: ") {
        return Some("standard error does not start with `error: `".into());
    }
    None
}

/// Why an error message is not one short line, if it is not.
fn not_one_line(outcome: &Outcome) -> Option<String> {
    let err = outcome.stderr.trim_end();
    if err.lines().count() != 1 {
        return Some(format!("the error takes {} lines", err.lines().count()));
    }
    if err.len() > 1000 {
        return Some(format!("a {}-byte error message", err.len()));
    }
    None
}

/// Generates the cases, runs them all (three at a time), and returns each
/// case's description with a report of what went wrong by `check`.
fn fuzz_configs(check: fn(&Outcome) -> Option<String>) -> (usize, Vec<String>) {
    let per_role: usize = std::env::var("POSTERN_FUZZ_CONFIG_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(90);
    let started = Instant::now();
    let values = hostile_values();
    let mut rng = StdRng::seed_from_u64(0xc0f1_9e55);
    // (role, description, contents)
    let mut cases: Vec<(&str, String, Vec<u8>)> = Vec::new();
    for role in ROLES {
        let seeds = seeds(role);
        for (i, seed) in seeds.iter().enumerate() {
            // A valid file also fails here (no identity), in one line.
            cases.push((
                role,
                format!("valid fixture {i}"),
                seed.clone().into_bytes(),
            ));
        }
        for (i, file) in hostile_files().into_iter().enumerate() {
            cases.push((role, format!("hostile file {i}"), file));
        }
        for key in keys(role) {
            let value = &values[rng.gen_range(0..values.len())];
            cases.push((
                role,
                format!("{key} = {:.60}", value.replace('\n', "\\n")),
                format!("{key} = {value}\n").into_bytes(),
            ));
        }
        for i in 0..per_role {
            let data = if i % 6 == 5 {
                garbage(&mut rng)
            } else {
                let seed = &seeds[rng.gen_range(0..seeds.len())];
                mutate(&mut rng, role, seed, &values)
            };
            cases.push((role, format!("generated {i}"), data));
        }
    }

    let home = PosternHome::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (n, (_, _, data)) in cases.iter().enumerate() {
        std::fs::write(dir.path().join(format!("{n}.toml")), data).unwrap();
    }
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some((role, what, data)) = cases.get(n) else {
                    break;
                };
                let file = dir.path().join(format!("{n}.toml"));
                let outcome = run(&home, role, &file);
                if let Some(why) = check(&outcome) {
                    let shown = String::from_utf8_lossy(&data[..data.len().min(300)]).into_owned();
                    failures.lock().unwrap().push(format!(
                        "postern {role} --config {} ({what}): {why}\n--- file (first 300 bytes):\n{shown}\n--- stderr (first 1000 bytes):\n{:.1000}",
                        file.display(),
                        outcome.stderr
                    ));
                }
            });
        }
    });

    // A missing file and a directory.
    for role in ROLES {
        for path in [dir.path().join("missing.toml"), dir.path().to_owned()] {
            let outcome = run(&home, role, &path);
            if let Some(why) = check(&outcome) {
                failures.lock().unwrap().push(format!(
                    "postern {role} --config {}: {why}\n{}",
                    path.display(),
                    outcome.stderr
                ));
            }
        }
    }
    let total = cases.len() + 2 * ROLES.len();
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "{total} config files in {:?}, {} failures",
        started.elapsed(),
        failures.len()
    );
    (total, failures)
}

#[test]
fn config_files_never_crash_the_binary() {
    let (total, failures) = fuzz_configs(crashed);
    assert!(
        failures.is_empty(),
        "{} of {total} runs went wrong:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Every bad file is refused in one short line, never with an excerpt of
/// the file (however long its lines).
#[test]
fn config_errors_are_one_line() {
    let (total, failures) =
        fuzz_configs(|outcome| crashed(outcome).or_else(|| not_one_line(outcome)));
    assert!(
        failures.is_empty(),
        "{} of {total} runs went wrong:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
