//! Runs `examples/embedded_outlet.rs` as a real process against an
//! in-process relay, and reaches the embedded service through an inlet; with
//! an authority, the embedded outlet applies its revocations by itself.
//!
//! The example's source is compiled into this test binary, which re-runs
//! itself as the example's process (the ignored `example_process` entry):
//! no second `cargo build` with another feature set, and always the source
//! as it is now.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "../examples/embedded_outlet.rs"]
mod example;

use std::process::Stdio;
use std::time::Duration;

use postern_identity::{keyfile, Identity};
use postern_node::{Inlet, InletConfig, RelayEndpoint};
use postern_relay::{Relay, RelayConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Set in the environment of this binary re-run as the example.
const CHILD: &str = "POSTERN_TEST_RUN_EXAMPLE";

/// Not a test of its own: the example's `main`, when this binary is started
/// by [`example_command`].
#[test]
#[ignore = "runs as the example's process, started by the tests below"]
fn example_process() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    if let Err(e) = example::main() {
        eprintln!("example failed: {e:#}");
        std::process::exit(1);
    }
}

/// This test binary, re-run as the example's process.
fn example_command() -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "example_process",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(CHILD, "1");
    cmd
}

type ExampleOutput = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// Starts the example with `env` and waits until it says `ready`.
async fn start_example(env: &[(&str, String)]) -> (tokio::process::Child, ExampleOutput) {
    let mut child = example_command()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the example");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), next_example_line(&mut stdout))
        .await
        .expect("example ready in time");
    assert_eq!(first.as_deref(), Some("ready"));
    (child, stdout)
}

/// The next word the example prints, `ready` or `stopped` (the test
/// harness's own output skipped: it may start the same line, as in
/// `test example_process ... ready`).
async fn next_example_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
) -> Option<String> {
    while let Ok(Some(line)) = lines.next_line().await {
        for word in ["ready", "stopped"] {
            if line.trim_end().ends_with(word) {
                return Some(word.to_owned());
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_outlet_example_serves_through_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("svc.key");
    let service_identity = keyfile::create(&key_path).unwrap();
    let inlet_identity = Identity::generate();
    let relay_identity = Identity::generate();
    let relay_id = relay_identity.identifier();

    let relay = Relay::bind(
        relay_identity,
        RelayConfig::new("127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(relay.run(stop.clone()));

    let (mut child, mut stdout) = start_example(&[
        ("POSTERN_RELAY", relay_addr.to_string()),
        ("POSTERN_RELAY_IDENTITY", relay_id.to_string()),
        ("POSTERN_IDENTITY_FILE", key_path.display().to_string()),
        ("POSTERN_ALLOW", inlet_identity.identifier().to_string()),
    ])
    .await;

    let config = InletConfig::new(
        RelayEndpoint::new(relay_addr.to_string(), relay_id),
        "echo".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        service_identity.identifier(),
    );
    let mut inlet = Inlet::start(inlet_identity, config).await.unwrap();
    inlet.wait_ready(Duration::from_secs(10)).await.unwrap();
    let mut conn = TcpStream::connect(inlet.local_addr().unwrap())
        .await
        .unwrap();
    conn.write_all(b"hello from afar\n").await.unwrap();
    let mut lines = BufReader::new(conn).lines();
    let reply = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.as_deref(), Some("echo: hello from afar"));

    // Graceful stop on SIGTERM.
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let last = tokio::time::timeout(Duration::from_secs(10), next_example_line(&mut stdout))
        .await
        .expect("example stops in time");
    assert_eq!(last.as_deref(), Some("stopped"));
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    inlet.shutdown().await;
    stop.cancel();
}

/// The embedded outlet trusting an authority (one environment variable, no
/// code of its own) follows its revocations: an inlet it admitted is
/// refused once the authority revokes it, while the service runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_outlet_example_applies_its_authoritys_revocations() {
    use support::authority::TestAuthority;
    use support::net::TestRelay;

    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("svc.key");
    let service_identity = keyfile::create(&key_path).unwrap();
    let (revoked, kept) = (Identity::generate(), Identity::generate());
    let relay = TestRelay::start().await.unwrap();
    let authority = TestAuthority::start(&relay, |s| s).await.unwrap();

    let (_child, _stdout) = start_example(&[
        ("POSTERN_RELAY", relay.endpoint().address),
        ("POSTERN_RELAY_IDENTITY", relay.identifier.to_string()),
        ("POSTERN_IDENTITY_FILE", key_path.display().to_string()),
        (
            "POSTERN_ALLOW",
            format!("{},{}", revoked.identifier(), kept.identifier()),
        ),
        (
            "POSTERN_TRUST_AUTHORITY",
            authority.identifier().to_string(),
        ),
    ])
    .await;

    let check = |who: &Identity| {
        let config = InletConfig::new(
            relay.endpoint(),
            "echo".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            service_identity.identifier(),
        );
        let who = who.clone();
        async move { postern_node::check(who, &config).await }
    };
    check(&revoked).await.expect("admitted before revocation");

    authority.revoke(revoked.identifier()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        match check(&revoked).await {
            Err(e) => break e.to_string(),
            Ok(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the embedded outlet still admits a revoked identity after 10 s"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(refusal.contains("revoked"), "unclear refusal: {refusal}");
    check(&kept)
        .await
        .expect("an identity nobody revoked is still admitted");
}
