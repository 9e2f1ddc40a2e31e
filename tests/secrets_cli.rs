//! Secrets handled like secrets, through the real `postern` binary (issue
//! 11): enrollment tickets never from the command line, the secret
//! variables gone from a running process's environment, and the keys of
//! people encrypted by default at a terminal.
//!
//! The terminal is a real pseudo-terminal: `tests/support/pty_run.py`
//! (Python's `pty` module) runs `postern` on one, waits for each prompt and
//! for echo to be off, and types the answer, as a person would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use postern_identity::keyfile::{self, KeySource};
use postern_identity::sealed::Protection;
use postern_identity::Identifier;
use support::net::{postern_bin, relay_and_authority, PosternHome, PosternProcess};
use support::oidc::{login_url_in, FakeUser, TestProvider, PUBLIC_CLIENT};
use zeroize::Zeroizing;

const PASSPHRASE: &str = "correct horse battery staple";
const STARTUP: Duration = Duration::from_secs(20);

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn all(out: &Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

/// `postern args…` in `home` with exactly the secret variables in `env`
/// and no terminal.
fn run(home: &PosternHome, args: &[&str], env: &[(&str, &str)]) -> Output {
    without_secrets(home.command(args))
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running postern {args:?}: {e}"))
}

fn without_secrets(mut command: Command) -> Command {
    for var in ["POSTERN_PASSPHRASE", "POSTERN_KEY_FILE", "POSTERN_TICKET"] {
        command.env_remove(var);
    }
    command
}

/// `postern args…` in `home` on a pseudo-terminal, answering each
/// `(prompt, text)` in turn; the output is the terminal's transcript.
fn on_terminal(
    home: &PosternHome,
    args: &[&str],
    answers: &[(&str, &str)],
    env: &[(&str, &str)],
) -> Output {
    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/pty_run.py");
    let mut command = Command::new("python3");
    command.arg(driver);
    for (prompt, text) in answers {
        command.args(["--answer", prompt, text]);
    }
    command.arg("--").arg(postern_bin()).args(args);
    without_secrets(command)
        .env("POSTERN_HOME", home.path())
        .env_remove("POSTERN_IDENTITY")
        .env_remove("POSTERN_LOG")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("python3 is needed to run postern on a pseudo-terminal (scripts/setup.sh)")
}

fn identifier_in(text: &str) -> Identifier {
    text.split_whitespace()
        .find_map(|w| w.parse::<Identifier>().ok())
        .unwrap_or_else(|| panic!("no identifier in:\n{text}"))
}

fn protection(home: &PosternHome, name: &str) -> Protection {
    keyfile::protection(&home.key_path(name)).unwrap()
}

fn opens_with(home: &PosternHome, name: &str, passphrase: &str) -> Identifier {
    keyfile::load_with(
        &home.key_path(name),
        &KeySource::Passphrase(Zeroizing::new(passphrase.into())),
    )
    .unwrap_or_else(|e| panic!("identity {name} does not open with its passphrase: {e}"))
    .identifier()
}

#[test]
fn people_at_a_terminal_get_encrypted_keys() {
    let home = PosternHome::new().unwrap();
    let twice = [
        ("Passphrase for the new identity", PASSPHRASE),
        ("The same passphrase again", PASSPHRASE),
    ];

    // A person at a terminal, no flags: asked twice, without echo; the file
    // holds the key sealed, and the passphrase opens it.
    let out = on_terminal(
        &home,
        &["identity", "create", "--name", "alice"],
        &twice,
        &[],
    );
    let transcript = all(&out);
    assert!(out.status.success(), "{transcript}");
    assert!(!transcript.contains(PASSPHRASE), "echoed:\n{transcript}");
    assert!(
        transcript.contains("--encrypt none"),
        "the opt-out is not named:\n{transcript}"
    );
    assert_eq!(protection(&home, "alice"), Protection::Passphrase);
    assert!(keyfile::load(&home.key_path("alice")).is_err());
    assert_eq!(
        opens_with(&home, "alice", PASSPHRASE),
        identifier_in(&transcript)
    );
    // Every role opens it at a terminal by asking once.
    let out = on_terminal(
        &home,
        &["identity", "show", "--name", "alice"],
        &[("Passphrase for identity \"alice\"", PASSPHRASE)],
        &[],
    );
    assert!(out.status.success(), "{}", all(&out));
    assert!(all(&out).contains("encrypted with a passphrase"));

    // Two different passphrases: nothing is created.
    let out = on_terminal(
        &home,
        &["identity", "create", "--name", "bob"],
        &[
            ("Passphrase for the new identity", PASSPHRASE),
            ("The same passphrase again", "something else"),
        ],
        &[],
    );
    assert!(
        !out.status.success() && all(&out).contains("differ"),
        "{}",
        all(&out)
    );
    assert!(!home.key_path("bob").exists());

    // At a terminal with POSTERN_PASSPHRASE: encrypted with it, no prompt.
    let out = on_terminal(
        &home,
        &["identity", "create", "--name", "carol"],
        &[],
        &[("POSTERN_PASSPHRASE", PASSPHRASE)],
    );
    assert!(out.status.success(), "{}", all(&out));
    assert!(!all(&out).contains("Passphrase for"), "{}", all(&out));
    assert_eq!(protection(&home, "carol"), Protection::Passphrase);
    opens_with(&home, "carol", PASSPHRASE);

    // The explicit opt-out: no prompt, unencrypted, and the output says so.
    let out = on_terminal(
        &home,
        &["identity", "create", "--name", "dave", "--encrypt", "none"],
        &[],
        &[],
    );
    assert!(out.status.success(), "{}", all(&out));
    assert!(!all(&out).contains("Passphrase for"), "{}", all(&out));
    assert!(all(&out).contains("not encrypted"), "{}", all(&out));
    assert_eq!(protection(&home, "dave"), Protection::Unencrypted);

    // `identity encrypt` at a terminal seals it in place; the identifier
    // stays.
    let dave = keyfile::load(&home.key_path("dave")).unwrap().identifier();
    let out = on_terminal(
        &home,
        &["identity", "encrypt", "--name", "dave"],
        &[
            ("Passphrase for identity \"dave\"", PASSPHRASE),
            ("The same passphrase again", PASSPHRASE),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", all(&out));
    assert!(!all(&out).contains(PASSPHRASE));
    assert_eq!(protection(&home, "dave"), Protection::Passphrase);
    assert_eq!(opens_with(&home, "dave", PASSPHRASE), dave);
}

#[test]
fn without_a_terminal_keys_stay_unencrypted_and_the_output_says_how_to_fix_it() {
    let home = PosternHome::new().unwrap();
    let out = run(&home, &["identity", "create", "--name", "svc"], &[]);
    assert!(out.status.success(), "{}", all(&out));
    let err = stderr(&out);
    assert!(
        err.contains("NOT encrypted") && err.contains("postern identity encrypt --name svc"),
        "{err}"
    );
    assert_eq!(protection(&home, "svc"), Protection::Unencrypted);
    let id = identifier_in(&stdout(&out));

    // The fix the warning names: without a passphrase it asks for one…
    let out = run(&home, &["identity", "encrypt", "--name", "svc"], &[]);
    assert!(
        !out.status.success() && stderr(&out).contains("POSTERN_PASSPHRASE"),
        "{}",
        all(&out)
    );
    assert_eq!(protection(&home, "svc"), Protection::Unencrypted);
    // …and with one it seals the key, which then opens with it only.
    let pass = [("POSTERN_PASSPHRASE", PASSPHRASE)];
    let out = run(&home, &["identity", "encrypt", "--name", "svc"], &pass);
    assert!(out.status.success(), "{}", all(&out));
    assert!(!all(&out).contains(PASSPHRASE));
    assert_eq!(protection(&home, "svc"), Protection::Passphrase);
    assert_eq!(opens_with(&home, "svc", PASSPHRASE), id);
    let out = run(&home, &["identity", "show", "--name", "svc"], &pass);
    assert!(out.status.success() && identifier_in(&stdout(&out)) == id);
    let out = run(&home, &["identity", "show", "--name", "svc"], &[]);
    assert!(!out.status.success(), "opened without its passphrase");
    // Once is enough.
    let out = run(&home, &["identity", "encrypt", "--name", "svc"], &pass);
    assert!(
        !out.status.success() && stderr(&out).contains("already encrypted"),
        "{}",
        all(&out)
    );
}

/// `postern identity create --name <name> --encrypt passphrase` with
/// `POSTERN_PASSPHRASE`, without a terminal; returns the identifier.
fn create_encrypted(home: &PosternHome, name: &str) -> Result<Identifier> {
    let out = run(
        home,
        &[
            "identity",
            "create",
            "--name",
            name,
            "--encrypt",
            "passphrase",
        ],
        &[("POSTERN_PASSPHRASE", PASSPHRASE)],
    );
    ensure!(out.status.success(), "{}", all(&out));
    Ok(identifier_in(&stdout(&out)))
}

/// The environment of process `pid`, as other processes of this user can
/// read it.
fn environ_of(pid: u32) -> String {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    String::from_utf8_lossy(&bytes).replace('\0', "\n")
}

fn cmdline_of(pid: u32) -> String {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    String::from_utf8_lossy(&bytes).replace('\0', " ")
}

/// A listener that accepts connections and never answers: a relay that
/// keeps whoever dials it waiting. Returns its address and a counter of the
/// connections it accepted.
fn silent_listener() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_variables_leave_the_process_and_its_children() -> Result<()> {
    let home = PosternHome::new()?;
    let svc = create_encrypted(&home, "svc")?;
    let (relay_addr, _) = silent_listener();

    // An outlet that opened its encrypted identity with POSTERN_PASSPHRASE
    // and now waits for its relay: another process of the same user reads
    // its environment and finds every variable but the secret ones.
    let ticket_value = "pstn-ticket:not-a-real-ticket-but-secret";
    let mut command = without_secrets(home.command(&[
        "outlet",
        "--identity",
        "svc",
        "--relay",
        &relay_addr,
        "--relay-identity",
        &svc.to_string(),
        "--service",
        "db",
        "--target",
        "127.0.0.1:9",
        "--allow",
        &svc.to_string(),
    ]));
    command
        .env("POSTERN_PASSPHRASE", PASSPHRASE)
        .env("POSTERN_KEY_FILE", "/nonexistent/postern-key-file")
        .env("POSTERN_TICKET", ticket_value)
        .env("POSTERN_TEST_CANARY", "still-here");
    let mut outlet = PosternProcess::from_command(command, "postern outlet".into())?;
    let started = outlet.wait_for_stderr("outlet starting", STARTUP).await?;
    ensure!(started.contains(&svc.to_string()), "{started}");
    let environ = environ_of(outlet.pid());
    ensure!(
        environ.contains("POSTERN_TEST_CANARY=still-here"),
        "the environment was not read:\n{environ}"
    );
    for secret in [
        PASSPHRASE,
        "POSTERN_PASSPHRASE",
        "POSTERN_KEY_FILE",
        "postern-key-file",
        "POSTERN_TICKET",
        ticket_value,
    ] {
        ensure!(
            !environ.contains(secret),
            "/proc/{}/environ still holds {secret:?}:\n{environ}",
            outlet.pid()
        );
    }
    drop(outlet);

    // `postern enroll` with POSTERN_TICKET, while it waits for the relay the
    // ticket names: the ticket is in neither its environment nor its
    // command line.
    let out = run(&home, &["identity", "create", "--name", "authority"], &[]);
    ensure!(out.status.success(), "{}", all(&out));
    let (silent_relay, accepted) = silent_listener();
    let out = run(
        &home,
        &[
            "authority",
            "ticket",
            "--relay",
            &silent_relay,
            "--relay-identity",
            &svc.to_string(),
        ],
        &[],
    );
    ensure!(out.status.success(), "ticket: {}", all(&out));
    let ticket = stdout(&out).trim().to_owned();
    let body = ticket.trim_start_matches("pstn-ticket:").to_owned();
    let mut command = without_secrets(home.command(&["enroll", "--identity", "laptop"]));
    command
        .env("POSTERN_TICKET", &ticket)
        .env("POSTERN_TEST_CANARY", "still-here");
    let enroll = PosternProcess::from_command(command, "postern enroll".into())?;
    let deadline = Instant::now() + STARTUP;
    while accepted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        ensure!(
            Instant::now() < deadline,
            "enroll never dialled the ticket's relay:\n{}",
            enroll.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let environ = environ_of(enroll.pid());
    ensure!(
        environ.contains("POSTERN_TEST_CANARY=still-here"),
        "{environ}"
    );
    ensure!(
        !environ.contains(&body) && !environ.contains("POSTERN_TICKET"),
        "the ticket is in the environment of enroll:\n{environ}"
    );
    ensure!(!cmdline_of(enroll.pid()).contains(&body));
    ensure!(!enroll.stderr().contains(&body), "{}", enroll.stderr());
    Ok(())
}

/// `postern authority ticket` for `uses` machines through the relay;
/// returns the ticket and its id.
fn issue_ticket(home: &PosternHome, relay: (&str, &str), uses: &str) -> Result<(String, String)> {
    let out = run(
        home,
        &[
            "authority",
            "ticket",
            "--attr",
            "role=analyst",
            "--uses",
            uses,
            "--relay",
            relay.0,
            "--relay-identity",
            relay.1,
        ],
        &[],
    );
    ensure!(out.status.success(), "ticket: {}", all(&out));
    let ticket = stdout(&out).trim().to_owned();
    let id = stderr(&out)
        .lines()
        .find_map(|l| l.strip_prefix("ticket "))
        .and_then(|rest| rest.split_whitespace().next())
        .context("no ticket id")?
        .to_owned();
    ensure!(
        ticket.starts_with("pstn-ticket:") && id.len() == 12,
        "{}",
        all(&out)
    );
    Ok((ticket, id))
}

/// The uses left of ticket `id`, as `postern authority list` shows them
/// (`None` once it is no longer listed).
fn uses_left(home: &PosternHome, id: &str) -> Result<Option<u32>> {
    let out = run(home, &["authority", "list"], &[]);
    ensure!(out.status.success(), "list: {}", all(&out));
    let listed = stdout(&out);
    let Some(line) = listed
        .lines()
        .find(|l| l.contains(id) && l.contains("uses left"))
    else {
        return Ok(None);
    };
    let left = line
        .split("uses left ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("no uses in {line:?}"))?;
    Ok(Some(left.parse()?))
}

fn enrolled(home: &PosternHome, name: &str) -> bool {
    home.path()
        .join("credentials")
        .join(format!("{name}.cred"))
        .exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_come_from_a_prompt_a_file_stdin_or_the_environment_never_argv() -> Result<()> {
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    home.create_identity("authority")?;
    let (_relay, _authority, relay_addr, relay_id) = relay_and_authority(&home, &[]).await?;
    let relay = (relay_addr.as_str(), relay_id.as_str());
    let (ticket, id) = issue_ticket(&home, relay, "5")?;
    let body = ticket.trim_start_matches("pstn-ticket:").to_owned();

    // On the command line: refused before anything happens, with the safe
    // ways and the ticket's id, never the ticket.
    let out = run(&home, &["enroll", &ticket, "--identity", "m0"], &[]);
    let err = stderr(&out);
    ensure!(out.status.code() == Some(1), "{err}");
    for needle in [
        "refusing",
        "--ticket-file",
        "postern enroll -",
        "POSTERN_TICKET",
        &id,
    ] {
        ensure!(err.contains(needle), "lacks {needle:?}:\n{err}");
    }
    ensure!(
        !all(&out).contains(&body),
        "the refusal shows the ticket:\n{err}"
    );
    ensure!(!home.key_path("m0").exists() && !enrolled(&home, "m0"));
    ensure!(
        uses_left(&home, &id)? == Some(5),
        "the refused run used the ticket"
    );

    // From a file only its owner reads.
    let file = home.path().join("ticket.txt");
    std::fs::write(&file, format!("{ticket}\n"))?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
    let file_arg = file.to_str().unwrap();
    let out = run(
        &home,
        &["enroll", "--ticket-file", file_arg, "--identity", "m1"],
        &[],
    );
    ensure!(out.status.success(), "--ticket-file: {}", all(&out));
    ensure!(enrolled(&home, "m1") && !all(&out).contains(&body));
    ensure!(!stderr(&out).contains("other users"), "{}", stderr(&out));
    // A file others can read still works, with a warning.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let out = run(
        &home,
        &["enroll", "--ticket-file", file_arg, "--identity", "m2"],
        &[],
    );
    ensure!(out.status.success(), "--ticket-file 0644: {}", all(&out));
    ensure!(
        stderr(&out).contains("can be read by other users"),
        "{}",
        all(&out)
    );

    // From standard input (`-`), as from a secret manager.
    let mut child = without_secrets(home.command(&["enroll", "-", "--identity", "m3"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(format!("{ticket}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "enroll -: {}", all(&out));
    ensure!(enrolled(&home, "m3") && !all(&out).contains(&body));

    // From POSTERN_TICKET; given two ways at once, refused.
    let out = run(
        &home,
        &["enroll", "--ticket-file", file_arg, "--identity", "m4"],
        &[("POSTERN_TICKET", &ticket)],
    );
    ensure!(
        !out.status.success() && stderr(&out).contains("more than one way"),
        "{}",
        all(&out)
    );
    let out = run(
        &home,
        &["enroll", "--identity", "m4"],
        &[("POSTERN_TICKET", &ticket)],
    );
    ensure!(out.status.success(), "POSTERN_TICKET: {}", all(&out));
    ensure!(enrolled(&home, "m4") && !all(&out).contains(&body));
    ensure!(
        uses_left(&home, &id)? == Some(1),
        "four enrollments, one use left"
    );

    // No ticket and no terminal: the error lists the ways.
    let out = run(&home, &["enroll", "--identity", "m5"], &[]);
    ensure!(
        !out.status.success() && stderr(&out).contains("--ticket-file"),
        "{}",
        all(&out)
    );
    // A damaged ticket: its shape, never its content.
    let cut = &ticket[..ticket.len() - 20];
    std::fs::write(&file, cut)?;
    let out = run(
        &home,
        &["enroll", "--ticket-file", file_arg, "--identity", "m5"],
        &[],
    );
    ensure!(!out.status.success(), "a damaged ticket enrolled");
    ensure!(
        !all(&out).contains(&cut["pstn-ticket:".len()..]),
        "the error shows the ticket:\n{}",
        all(&out)
    );

    // A person at a terminal: asked for the ticket (not shown) and for a
    // passphrase for the new identity, which ends up encrypted.
    let out = on_terminal(
        &home,
        &["enroll", "--identity", "laptop"],
        &[
            ("Enrollment ticket", &ticket),
            ("Passphrase for the new identity", PASSPHRASE),
            ("The same passphrase again", PASSPHRASE),
        ],
        &[],
    );
    let transcript = all(&out);
    ensure!(out.status.success(), "enroll at a terminal:\n{transcript}");
    ensure!(
        !transcript.contains(&body) && !transcript.contains(PASSPHRASE),
        "echoed a secret:\n{transcript}"
    );
    ensure!(enrolled(&home, "laptop"), "{transcript}");
    ensure!(protection(&home, "laptop") == Protection::Passphrase);
    opens_with(&home, "laptop", PASSPHRASE);
    ensure!(matches!(uses_left(&home, &id)?, None | Some(0)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_opened_for_a_login_never_sees_the_secret_variables() -> Result<()> {
    let provider = TestProvider::start()?;
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let authority_id = home.create_identity("authority")?.to_string();
    let config = home.path().join("oidc.toml");
    std::fs::write(
        &config,
        provider.config_toml(PUBLIC_CLIENT, "name_claim = \"email\""),
    )?;
    let (_relay, _authority, relay_addr, relay_id) =
        relay_and_authority(&home, &["--oidc-config", config.to_str().unwrap()]).await?;

    // The person's identity is encrypted; enroll opens it with
    // POSTERN_PASSPHRASE, which automation also gave a ticket and a key file.
    create_encrypted(&home, "erin")?;

    // A fake desktop: DISPLAY set, and an `xdg-open` first on PATH that
    // writes down its environment and the address it was asked to open.
    let bin = home.path().join("fake-desktop");
    std::fs::create_dir(&bin)?;
    let opener = bin.join("xdg-open");
    std::fs::write(
        &opener,
        "#!/bin/sh\nenv > \"$POSTERN_TEST_DUMP.tmp\"\nprintf '%s' \"$1\" > \"$POSTERN_TEST_DUMP.url\"\n\
         mv \"$POSTERN_TEST_DUMP.tmp\" \"$POSTERN_TEST_DUMP\"\n",
    )?;
    std::fs::set_permissions(&opener, std::fs::Permissions::from_mode(0o755))?;
    let dump = home.path().join("xdg-open.env");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ticket_value = "pstn-ticket:automation-left-this-here";
    let mut command = without_secrets(home.command(&[
        "enroll",
        "--oidc",
        "--identity",
        "erin",
        "--relay",
        &relay_addr,
        "--relay-identity",
        &relay_id,
        "--authority",
        &authority_id,
    ]));
    command
        .env("POSTERN_PASSPHRASE", PASSPHRASE)
        .env("POSTERN_KEY_FILE", "/nonexistent/postern-key-file")
        .env("POSTERN_TICKET", ticket_value)
        .env("DISPLAY", ":99")
        .env("PATH", path)
        .env("POSTERN_TEST_DUMP", &dump);
    let mut enroll = PosternProcess::from_command(command, "postern enroll --oidc".into())?;
    let deadline = Instant::now() + STARTUP;
    let url = loop {
        if let Some(url) = login_url_in(&enroll.stderr()) {
            break url;
        }
        ensure!(
            Instant::now() < deadline && enroll.is_running(),
            "no login address:\n{}",
            enroll.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    FakeUser::new("alice")?
        .authorize(&url)
        .await
        .with_context(|| format!("logging in; enroll stderr:\n{}", enroll.stderr()))?;
    let status = enroll.wait_exit(STARTUP).await?;
    ensure!(
        status.success(),
        "enroll --oidc failed:\n{}",
        enroll.stderr()
    );
    ensure!(enrolled(&home, "erin"), "{}", enroll.stderr());

    // The opener ran, for this login, with the rest of the environment…
    let deadline = Instant::now() + STARTUP;
    while !dump.exists() {
        ensure!(Instant::now() < deadline, "xdg-open was never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opened = std::fs::read_to_string(home.path().join("xdg-open.env.url"))?;
    ensure!(
        opened == url,
        "xdg-open was asked to open {opened:?}, not {url:?}"
    );
    let environment = std::fs::read_to_string(&dump)?;
    ensure!(
        environment.contains("DISPLAY=:99") && environment.contains("POSTERN_TEST_DUMP="),
        "{environment}"
    );
    // …and without a single secret.
    for secret in [
        "POSTERN_PASSPHRASE",
        PASSPHRASE,
        "POSTERN_KEY_FILE",
        "POSTERN_TICKET",
        ticket_value,
    ] {
        ensure!(
            !environment.contains(secret),
            "the browser's environment holds {secret:?}:\n{environment}"
        );
    }
    Ok(())
}
