//! Bad input gets a clear error and loses nothing.
//!
//! - Hostile or confused peers of a real `postern relay` process (garbage,
//!   a truncated preamble, zero and oversized length prefixes, HTTP, a TLS
//!   ClientHello, a handshake abandoned half way) each lose only their own
//!   connection: the relay closes it and logs why, a tunnel established
//!   before keeps working, new tunnels still open, the process survives.
//! - Bad command lines and unusable identity files make `postern` exit
//!   non-zero with a message that says what to do, never with a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use postern_identity::handshake::{ChannelKind, LocalParty};
use postern_identity::link::{
    self, ControlReceiver, ControlSender, FramedReader, CONTROL_READ_BUFFER,
};
use postern_identity::wire::{Control, Hello, RefusalCode, PREAMBLE_ATTACH, PREAMBLE_HOP};
use postern_identity::{ChannelError, Identifier, Identity};
use postern_node::RelayEndpoint;
use support::net::{echo_round, relay_identifier_from, EchoServer, PosternHome, TestNode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the relay may take to close a connection it refuses.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Waits until the relay ends `conn`: EOF or a reset, ignoring whatever it
/// sent first. Fails if it stays open.
async fn expect_closed(what: &str, conn: &mut TcpStream) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + CLOSE_WITHIN;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => bail!("{what}: the relay kept the connection open for {CLOSE_WITHIN:?}"),
            Ok(Ok(0) | Err(_)) => return Ok(()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// Sends `bytes` on a fresh connection, optionally half-closes, and expects
/// the relay to close it.
async fn send_and_expect_close(
    relay: std::net::SocketAddr,
    what: &str,
    bytes: &[u8],
    half_close: bool,
) -> Result<()> {
    let mut conn = TcpStream::connect(relay).await?;
    conn.write_all(bytes).await?;
    if half_close {
        conn.shutdown().await?;
    }
    expect_closed(what, &mut conn).await
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 2);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_to_the_relay_ends_only_that_connection() -> Result<()> {
    let home = PosternHome::new()?;
    home.create_identity("default")?;
    // `-v`: a peer that hangs up inside the preamble is logged at debug level.
    let mut relay = home.spawn(&["relay", "-v", "--listen", "127.0.0.1:0"])?;
    let addr = relay.wait_for_addr("listening on").await?;
    let relay_id = relay_identifier_from(&relay.stderr())?;
    let endpoint = RelayEndpoint::new(addr.to_string(), relay_id);

    // An established tunnel through this relay, used before and after.
    let echo = EchoServer::start().await?;
    let inlet_identity = Identity::generate();
    let mut outlet = TestNode::simple_outlet(
        Identity::generate(),
        endpoint.clone(),
        "svc",
        echo.target(),
        &[inlet_identity.identifier()],
    )?;
    outlet.wait_ready().await?;
    let mut inlet =
        TestNode::simple_inlet(inlet_identity, endpoint.clone(), "svc", outlet.identifier).await?;
    inlet.wait_ready().await?;
    let mut established = TcpStream::connect(inlet.addr()).await?;
    echo_round(&mut established, b"before the garbage").await?;

    // 1. Garbage.
    let garbage: Vec<u8> = (0..256).map(|_| rand::random::<u8>() | 0x80).collect();
    send_and_expect_close(addr, "garbage", &garbage, false).await?;
    // 2. A truncated preamble, then EOF.
    send_and_expect_close(addr, "truncated preamble", b"PST", true).await?;
    // 3. A preamble of another protocol version.
    send_and_expect_close(addr, "future version", b"PSTN\x02H", false).await?;
    // 4. A hop preamble, then a zero length prefix.
    let mut zero = PREAMBLE_HOP.to_vec();
    zero.extend_from_slice(&[0, 0]);
    send_and_expect_close(addr, "zero-length frame", &zero, false).await?;
    // 5. A hop preamble, then the largest length prefix and too few bytes.
    let mut short = PREAMBLE_HOP.to_vec();
    short.extend_from_slice(&[0xff, 0xff]);
    short.extend_from_slice(&[7u8; 1000]);
    send_and_expect_close(addr, "truncated maximal frame", &short, true).await?;
    // 6. An attach preamble, then a maximal frame of junk (not a Noise IK message).
    let mut junk = PREAMBLE_ATTACH.to_vec();
    junk.extend_from_slice(&frame(&vec![0x41; 65_535]));
    send_and_expect_close(addr, "oversized attach message", &junk, false).await?;
    // 7. An attach preamble and a random 32-byte message 1 (too short for IK).
    let mut attach = PREAMBLE_ATTACH.to_vec();
    attach.extend_from_slice(&frame(&rand::random::<[u8; 32]>()));
    send_and_expect_close(addr, "short attach message", &attach, false).await?;
    // 8. HTTP.
    send_and_expect_close(
        addr,
        "HTTP request",
        b"GET / HTTP/1.1\r\nHost: relay.example\r\nUser-Agent: curl/8\r\n\r\n",
        false,
    )
    .await?;
    // 9. The start of a TLS ClientHello.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.extend_from_slice(&rand::random::<[u8; 32]>());
    send_and_expect_close(addr, "TLS ClientHello", &hello, false).await?;
    // 10. A hop preamble and a random 32-byte message 1: any 32 bytes are an
    // ephemeral key, so the relay answers with message 2; then we hang up
    // in the middle of the handshake.
    {
        let mut conn = TcpStream::connect(addr).await?;
        let mut msg1 = PREAMBLE_HOP.to_vec();
        msg1.extend_from_slice(&frame(&rand::random::<[u8; 32]>()));
        conn.write_all(&msg1).await?;
        let mut prefix = [0u8; 2];
        tokio::time::timeout(CLOSE_WITHIN, conn.read_exact(&mut prefix))
            .await
            .context("the relay did not answer message 1")??;
        ensure!(u16::from_be_bytes(prefix) > 32, "message 2 is too short");
        drop(conn);
    }
    // 11. A correctly authenticated hop channel that then sends a length
    // prefix beyond the control-frame limit.
    {
        let stream = TcpStream::connect(addr).await?;
        let (rd, mut wr) = stream.into_split();
        wr.write_all(&PREAMBLE_HOP).await?;
        let mut reader = FramedReader::new(rd, CONTROL_READ_BUFFER);
        let local = LocalParty::new(Identity::generate())?;
        let (_, transport) = link::initiate(
            &mut reader,
            &mut wr,
            &local,
            ChannelKind::Hop,
            &Hello::default(),
            |peer| {
                if peer.identity.identifier() == relay_id {
                    Ok(())
                } else {
                    Err(ChannelError::BadIdentityProof("not the relay".into()))
                }
            },
        )
        .await?;
        let (sealer, opener) = transport.split();
        let mut inbox = ControlReceiver::new(reader, opener);
        // The channel works…
        let mut outbox = ControlSender::new(&mut wr, sealer);
        outbox.send(&Control::Ping { seq: 7 }).await?;
        drop(outbox);
        let pong = tokio::time::timeout(CLOSE_WITHIN, inbox.recv()).await??;
        ensure!(matches!(pong, Control::Pong { seq: 7 }), "got {pong:?}");
        // …until a frame announces 65535 bytes.
        wr.write_all(&[0xff, 0xff]).await?;
        wr.write_all(&[0u8; 1024]).await?;
        // The relay says why (a protocol error, not worth retrying) and
        // closes the channel.
        let said = tokio::time::timeout(CLOSE_WITHIN, inbox.recv())
            .await
            .context("the relay kept a hop channel carrying an oversized frame")?;
        match said {
            Ok(Control::Goodbye { code, reason }) => {
                ensure!(code == RefusalCode::Invalid, "{code:?}: {reason}");
                ensure!(reason.contains("exceeds the limit"), "{reason}");
            }
            other => anyhow::bail!("expected the relay's goodbye, got {other:?}"),
        }
        let end = tokio::time::timeout(CLOSE_WITHIN, inbox.recv())
            .await
            .context("the relay kept a hop channel carrying an oversized frame")?;
        ensure!(
            end.is_err(),
            "the relay answered after its goodbye: {end:?}"
        );
    }

    // The tunnel established before is intact.
    echo_round(&mut established, b"after the garbage").await?;
    // New tunnels open.
    for i in 0..3 {
        let mut fresh = TcpStream::connect(inlet.addr()).await?;
        echo_round(&mut fresh, format!("new tunnel {i}").as_bytes()).await?;
    }
    // The relay is alive and said why it closed each connection.
    ensure!(relay.is_running(), "the relay exited:\n{}", relay.stderr());
    for reason in [
        "unknown preamble",
        "closed before sending a preamble",
        "(an HTTP request)",
        "(a TLS ClientHello)",
        "zero-length frame",
        "hop handshake failed",
        "data connection handshake failed",
        "exceeds the limit of 16384 bytes",
    ] {
        relay
            .wait_for_stderr(reason, CLOSE_WITHIN)
            .await
            .with_context(|| format!("the relay did not log {reason:?}"))?;
    }
    let log = relay.stderr();
    ensure!(!log.contains("panicked"), "{log}");
    Ok(())
}

// ----- the command line -----------------------------------------------------

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts a clean failure: a non-zero exit code (not a signal), no panic,
/// and a message containing every one of `expected`.
fn assert_fails_with(what: &str, out: &Output, expected: &[&str]) {
    let all = text(out);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "{what}: expected a non-zero exit, got {:?}\n{all}",
        out.status
    );
    assert!(!all.contains("panicked"), "{what}: panicked\n{all}");
    for needle in expected {
        assert!(
            all.contains(needle),
            "{what}: message lacks {needle:?}:\n{all}"
        );
    }
}

fn some_id() -> String {
    Identity::generate().identifier().to_string()
}

#[test]
fn bad_flags_get_clear_messages() -> Result<()> {
    let home = PosternHome::new()?;
    home.create_identity("default")?;
    let id = some_id();

    let out = home.run(&[
        "outlet",
        "--relay-identity",
        &id,
        "--service",
        "db",
        "--target",
        "127.0.0.1:5432",
        "--allow",
        &id,
    ])?;
    assert_fails_with("missing --relay", &out, &["missing --relay"]);

    let out = home.run(&[
        "inlet",
        "--relay-identity",
        &id,
        "--relay",
        "127.0.0.1:4000",
        "--service",
        "db",
    ])?;
    assert_fails_with(
        "missing --outlet-identity",
        &out,
        &["missing --outlet-identity"],
    );

    let out = home.run(&[
        "inlet",
        "--relay",
        "127.0.0.1:4000",
        "--relay-identity",
        "Pxyz",
        "--service",
        "db",
        "--outlet-identity",
        &id,
    ])?;
    assert_fails_with(
        "malformed identifier",
        &out,
        &["Pxyz", "is not a Postern identifier", "40 hex digits"],
    );

    let out = home.run(&[
        "outlet",
        "--relay",
        "127.0.0.1:4000",
        "--relay-identity",
        &id,
        "--service",
        "db",
        "--target",
        "5432",
        "--allow",
        &id,
    ])?;
    assert_fails_with(
        "bad target",
        &out,
        &["\"5432\" is not a target", "host:port"],
    );

    let out = home.run(&[
        "outlet",
        "--relay",
        "127.0.0.1:4000",
        "--relay-identity",
        &id,
        "--service",
        "bad name!",
        "--target",
        "127.0.0.1:5432",
    ])?;
    assert_fails_with("bad service name", &out, &["not a valid service name"]);

    let out = home.run(&["relay", "--listen", "not-an-address"])?;
    assert_fails_with("bad listen address", &out, &["not-an-address"]);

    let out = home.run(&["inlet", "--bogus-flag"])?;
    assert_fails_with("unknown flag", &out, &["--bogus-flag"]);

    let out = home.run(&[
        "inlet",
        "--relay",
        "127.0.0.1:4000",
        "--relay-identity",
        &id,
        "--service",
        "db",
        "--outlet-identity",
        &id,
        "--listen",
        "0.0.0.0:0",
    ])?;
    assert_fails_with(
        "non-loopback listen",
        &out,
        &["non-loopback", "--dangerous-allow-non-loopback"],
    );
    Ok(())
}

#[test]
fn unusable_identity_files_say_what_to_do() -> Result<()> {
    let id = some_id();
    let outlet_args = |identity: &str| -> Vec<String> {
        [
            "outlet",
            "--identity",
            identity,
            "--relay",
            "127.0.0.1:1",
            "--relay-identity",
            &id,
            "--service",
            "db",
            "--target",
            "127.0.0.1:5432",
            "--allow",
            &id,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let run = |home: &PosternHome, args: Vec<String>| -> Result<Output> {
        home.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // No identity at all: never created implicitly; the message says how.
    let home = PosternHome::new()?;
    let out = home.run(&["relay", "--listen", "127.0.0.1:0"])?;
    assert_fails_with("missing identity", &out, &["postern identity create"]);
    assert!(
        !home.key_path("default").exists(),
        "an identity was created implicitly"
    );
    let out = run(&home, outlet_args("db-outlet"))?;
    assert_fails_with(
        "missing named identity",
        &out,
        &["postern identity create --name db-outlet"],
    );

    // A key file others can read is refused, with the fix.
    let created = home.create_identity("default")?;
    let key = home.key_path("default");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    let out = run(&home, outlet_args("default"))?;
    assert_fails_with(
        "world-readable key",
        &out,
        &["chmod 600", &key.display().to_string()],
    );
    // Fixing the mode as told makes it loadable again.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let out = home.run(&["identity", "show"])?;
    assert!(out.status.success(), "{}", text(&out));
    let shown: Identifier = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    assert_eq!(shown, created);

    // A corrupted key file (right mode, wrong content).
    let broken = home.path().join("broken.key");
    std::fs::write(&broken, "this is not a key\n")?;
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o600))?;
    let out = run(&home, outlet_args(&broken.display().to_string()))?;
    assert_fails_with("corrupt key", &out, &["not a valid Postern identity file"]);

    // A key path that is a directory.
    let out = run(&home, outlet_args(&format!("{}/", home.path().display())))?;
    assert_fails_with("directory as key", &out, &["not a regular file"]);

    // `identity create` never overwrites.
    let out = home.run(&["identity", "create"])?;
    assert_fails_with("overwrite", &out, &["refusing to overwrite"]);
    Ok(())
}
