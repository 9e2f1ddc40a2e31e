//! Limits: reaching one refuses only the connection or tunnel beyond it,
//! says why, and leaves everything established alone.
//!
//! - Pending (unauthenticated) connections, in total and per source address,
//!   on a real `postern relay` process configured with small limits.
//! - A slowloris holding half-open handshakes (silence, a partial preamble,
//!   a handshake trickled a byte at a time) is cut at the handshake timeout,
//!   counted from the connection's arrival.
//! - Tunnels: at the relay (`--max-tunnels`), at an inlet and at an outlet
//!   (`max_tunnels`); the excess is refused promptly with a reason.
//! - A storm of garbage that `tests/bad_input.rs` does not already send
//!   (megabytes of noise, HTTP/2, a full TLS ClientHello with SNI, SSH,
//!   PostgreSQL's SSLRequest, valid preambles followed by noise), 120
//!   connections at once: each is closed, the relay stays up, an established
//!   tunnel keeps working.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use postern_identity::wire::{PREAMBLE_ATTACH, PREAMBLE_HOP};
use support::net::{echo_nodes as nodes, echo_round, relay_process, EchoServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A connection to `to` from source address `from` (any 127/8 address works
/// on Linux loopback).
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    Ok(socket.connect(to).await?)
}

/// Whether a connection from `from` to `to` is refused within a second: the
/// relay resets it at once (so fast that `connect` itself may report it).
async fn refused_from(from: Ipv4Addr, to: SocketAddr) -> bool {
    match connect_from(from, to).await {
        Err(_) => true,
        Ok(mut conn) => closed_within(&mut conn, Duration::from_secs(1)).await,
    }
}

/// Whether the peer ends `conn` (EOF or reset) within `limit`.
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_handshake_limits_refuse_only_the_excess() -> Result<()> {
    let (_home, mut relay, endpoint) = relay_process(&[
        "--max-pending-handshakes",
        "8",
        "--max-pending-per-source",
        "4",
    ])
    .await?;
    let relay_addr: SocketAddr = endpoint.address.parse()?;
    let echo = EchoServer::start().await?;
    let (_outlet, inlet) = nodes(&endpoint, &echo, |_| {}, |_| {}).await?;
    let mut established = TcpStream::connect(inlet.addr()).await?;
    echo_round(&mut established, b"before").await?;

    // Four silent connections from 127.0.0.2 are held (still authenticating)…
    let second = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(second, relay_addr).await?);
    }
    for conn in &mut held {
        ensure!(
            !closed_within(conn, Duration::from_millis(300)).await,
            "a connection within the per-source limit was closed"
        );
    }
    // …the fifth from the same source is refused at once…
    ensure!(
        refused_from(second, relay_addr).await,
        "the connection beyond the per-source limit was not refused"
    );
    relay
        .wait_for_stderr("max_pending_per_source", Duration::from_secs(2))
        .await?;
    // …while another source still gets in, up to the total of 8.
    let third = Ipv4Addr::new(127, 0, 0, 3);
    for _ in 0..4 {
        held.push(connect_from(third, relay_addr).await?);
    }
    for conn in held.iter_mut().skip(4) {
        ensure!(
            !closed_within(conn, Duration::from_millis(300)).await,
            "a connection within the total limit was closed"
        );
    }
    ensure!(
        refused_from(Ipv4Addr::new(127, 0, 0, 4), relay_addr).await,
        "the connection beyond the total limit was not refused"
    );
    relay
        .wait_for_stderr("max_pending_handshakes", Duration::from_secs(2))
        .await?;

    // The established tunnel never noticed.
    echo_round(&mut established, b"during")
        .await
        .context("the established tunnel while the limits were reached")?;
    // Once the holders leave, new tunnels open again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fresh = TcpStream::connect(inlet.addr()).await?;
    echo_round(&mut fresh, b"after")
        .await
        .with_context(|| format!("a new tunnel after the limits; relay:\n{}", relay.stderr()))?;
    echo_round(&mut established, b"after")
        .await
        .context("the established tunnel after the limits")?;
    ensure!(relay.is_running(), "{}", relay.stderr());
    Ok(())
}

/// One slowloris connection: `kind` says what it sends before stalling
/// (it keeps trickling a byte every 100 ms where the kind allows). Returns
/// how long after connecting the relay closed it.
async fn slowloris(relay: SocketAddr, kind: usize) -> Result<Duration> {
    let started = Instant::now();
    let conn = TcpStream::connect(relay).await?;
    let (mut rd, mut wr) = conn.into_split();
    let trickle = async move {
        let mut script: Vec<u8> = match kind {
            0 => Vec::new(),            // silence
            1 => b"PST".to_vec(),       // a partial preamble
            2 => b"PSTN\x01H".to_vec(), // the preamble, a byte at a time
            3 => {
                // A hop handshake announcing 32 bytes, trickled.
                let mut v = PREAMBLE_HOP.to_vec();
                v.extend_from_slice(&[0, 32]);
                v.extend_from_slice(&[0x42; 32]);
                v
            }
            _ => {
                // A data connection's IK message, trickled.
                let mut v = PREAMBLE_ATTACH.to_vec();
                v.extend_from_slice(&[0, 200]);
                v.extend_from_slice(&[0x42; 200]);
                v
            }
        };
        let whole_preamble_first = kind >= 3;
        if whole_preamble_first {
            let rest = script.split_off(6);
            wr.write_all(&script).await?;
            script = rest;
        }
        for byte in script {
            wr.write_all(&[byte]).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Then hold the connection open.
        std::future::pending::<()>().await;
        Ok::<_, std::io::Error>(())
    };
    let closed = async {
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        () = closed => Ok(started.elapsed()),
        r = trickle => match r {
            // A write failed: the relay closed the connection.
            Err(_) => Ok(started.elapsed()),
            Ok(()) => bail!("unreachable"),
        },
        () = tokio::time::sleep(Duration::from_secs(10)) => bail!("slowloris kind {kind} still open after 10 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_the_handshake_timeout() -> Result<()> {
    let timeout = Duration::from_secs(1);
    let (_home, mut relay, endpoint) = relay_process(&["--handshake-timeout", "1s"]).await?;
    let relay_addr: SocketAddr = endpoint.address.parse()?;
    let echo = EchoServer::start().await?;
    let (_outlet, inlet) = nodes(&endpoint, &echo, |_| {}, |_| {}).await?;
    let mut established = TcpStream::connect(inlet.addr()).await?;
    echo_round(&mut established, b"before").await?;

    let attacks: Vec<_> = (0..25)
        .map(|i| tokio::spawn(slowloris(relay_addr, i % 5)))
        .collect();
    let mut cut_after = Vec::new();
    for (i, attack) in attacks.into_iter().enumerate() {
        let took = attack.await??;
        ensure!(
            took >= timeout.mul_f64(0.9) && took < timeout + Duration::from_millis(800),
            "slowloris {i} (kind {}) was cut after {took:?}, not at the {timeout:?} handshake timeout",
            i % 5
        );
        cut_after.push(took);
    }
    cut_after.sort();
    println!(
        "25 slowloris connections cut after {:?} .. {:?} (handshake timeout {timeout:?})",
        cut_after[0],
        cut_after[cut_after.len() - 1]
    );
    relay
        .wait_for_stderr("not authenticated within 1s", Duration::from_secs(2))
        .await?;
    echo_round(&mut established, b"after").await?;
    let mut fresh = TcpStream::connect(inlet.addr()).await?;
    echo_round(&mut fresh, b"a new tunnel").await?;
    ensure!(relay.is_running(), "{}", relay.stderr());
    Ok(())
}

/// Expects a client connecting to the inlet at `addr` to be refused (its
/// connection ended before any echo) within two seconds.
async fn expect_refused(addr: SocketAddr, what: &str) -> Result<()> {
    let started = Instant::now();
    // A reset that arrives very fast may already fail the `connect`.
    let Ok(mut conn) = TcpStream::connect(addr).await else {
        println!("{what}: refused after {:?}", started.elapsed());
        return Ok(());
    };
    let _ = conn.write_all(b"one more?").await;
    ensure!(
        closed_within(&mut conn, Duration::from_secs(2)).await,
        "{what}: the client beyond the limit was not refused within 2 s"
    );
    println!("{what}: refused after {:?}", started.elapsed());
    Ok(())
}

/// Closes `conn` cleanly and waits for the target to see it end.
async fn close(mut conn: TcpStream, echo: &EchoServer) -> Result<()> {
    conn.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), conn.read_to_end(&mut rest)).await??;
    echo.next_end(Duration::from_secs(3))
        .await
        .context("the target did not see the tunnel end")?;
    Ok(())
}

/// Opens clients on fresh tunnels until one echoes, for up to 3 s.
async fn opens_again(addr: SocketAddr) -> Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        // A refused connection may be reset before `connect` even returns:
        // that is a refusal too, so try again.
        let attempt = async {
            let mut conn = TcpStream::connect(addr).await?;
            echo_round(&mut conn, b"room again").await?;
            anyhow::Ok(conn)
        };
        match attempt.await {
            Ok(conn) => return Ok(conn),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context("no tunnel opened within 3 s of one closing"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_limits_refuse_only_the_excess() -> Result<()> {
    // At the relay.
    let (_home, mut relay, endpoint) = relay_process(&["--max-tunnels", "2"]).await?;
    let echo = EchoServer::start().await?;
    {
        let (_outlet, inlet) = nodes(&endpoint, &echo, |_| {}, |_| {}).await?;
        let mut a = TcpStream::connect(inlet.addr()).await?;
        echo_round(&mut a, b"tunnel a").await?;
        let mut b = TcpStream::connect(inlet.addr()).await?;
        echo_round(&mut b, b"tunnel b").await?;
        expect_refused(inlet.addr(), "relay --max-tunnels 2").await?;
        relay
            .wait_for_stderr("maximum of 2 tunnels (max_tunnels)", Duration::from_secs(2))
            .await?;
        echo_round(&mut a, b"a is fine").await?;
        echo_round(&mut b, b"b is fine").await?;
        close(a, &echo).await?;
        let _c = opens_again(inlet.addr()).await?;
        echo_round(&mut b, b"b is still fine").await?;
    }
    ensure!(relay.is_running(), "{}", relay.stderr());
    while echo.next_end(Duration::from_millis(300)).await.is_some() {}

    // Per node at the relay: one inlet may hold two tunnels, and a second
    // inlet of the same outlet is not starved by it until the outlet itself
    // is an end of the maximum.
    let (_home, mut relay, endpoint) = relay_process(&["--max-tunnels-per-node", "2"]).await?;
    {
        let (_outlet, inlet) = nodes(&endpoint, &echo, |_| {}, |_| {}).await?;
        let mut a = TcpStream::connect(inlet.addr()).await?;
        echo_round(&mut a, b"tunnel a").await?;
        let mut b = TcpStream::connect(inlet.addr()).await?;
        echo_round(&mut b, b"tunnel b").await?;
        expect_refused(inlet.addr(), "relay --max-tunnels-per-node 2").await?;
        relay
            .wait_for_stderr("(max_tunnels_per_node)", Duration::from_secs(2))
            .await?;
        echo_round(&mut a, b"a is fine").await?;
        close(a, &echo).await?;
        let _c = opens_again(inlet.addr()).await?;
        echo_round(&mut b, b"b is still fine").await?;
    }
    ensure!(relay.is_running(), "{}", relay.stderr());
    while echo.next_end(Duration::from_millis(300)).await.is_some() {}

    // At an inlet.
    let (_home, _relay, endpoint) = relay_process(&[]).await?;
    {
        let (_outlet, inlet) = nodes(&endpoint, &echo, |_| {}, |i| i.max_tunnels = 1).await?;
        let mut a = TcpStream::connect(inlet.addr()).await?;
        echo_round(&mut a, b"the only one").await?;
        expect_refused(inlet.addr(), "inlet max_tunnels 1").await?;
        echo_round(&mut a, b"still the only one").await?;
        close(a, &echo).await?;
        let _b = opens_again(inlet.addr()).await?;
    }
    while echo.next_end(Duration::from_millis(300)).await.is_some() {}

    // At an outlet.
    {
        let (_outlet, inlet) = nodes(&endpoint, &echo, |o| o.max_tunnels = 1, |_| {}).await?;
        let mut a = TcpStream::connect(inlet.addr()).await?;
        echo_round(&mut a, b"the only one").await?;
        expect_refused(inlet.addr(), "outlet max_tunnels 1").await?;
        echo_round(&mut a, b"still the only one").await?;
        close(a, &echo).await?;
        let _b = opens_again(inlet.addr()).await?;
    }
    Ok(())
}

// ----- garbage ----------------------------------------------------------------

/// A TLS 1.3 ClientHello for `relay.example` with the usual extensions.
fn tls_client_hello() -> Vec<u8> {
    let sni = b"relay.example";
    let mut ext = Vec::new();
    // server_name
    let mut name = vec![0u8];
    name.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    name.extend_from_slice(sni);
    let mut list = (name.len() as u16).to_be_bytes().to_vec();
    list.extend_from_slice(&name);
    ext.extend_from_slice(&[0x00, 0x00]);
    ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
    ext.extend_from_slice(&list);
    // supported_versions: TLS 1.3, 1.2
    ext.extend_from_slice(&[0x00, 0x2b, 0x00, 0x05, 0x04, 0x03, 0x04, 0x03, 0x03]);
    // supported_groups: x25519
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
    // key_share: x25519 with a random key
    ext.extend_from_slice(&[0x00, 0x33, 0x00, 0x26, 0x00, 0x24, 0x00, 0x1d, 0x00, 0x20]);
    ext.extend_from_slice(&rand::random::<[u8; 32]>());
    // signature_algorithms
    ext.extend_from_slice(&[0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x08, 0x07]);
    // ALPN: h2, http/1.1
    ext.extend_from_slice(&[
        0x00, 0x10, 0x00, 0x0e, 0x00, 0x0c, 0x02, b'h', b'2', 0x08, b'h', b't', b't', b'p', b'/',
        b'1', b'.', b'1',
    ]);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&rand::random::<[u8; 32]>());
    body.push(32);
    body.extend_from_slice(&rand::random::<[u8; 32]>());
    body.extend_from_slice(&[0x00, 0x06, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    body.extend_from_slice(&[0x01, 0x00]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

fn noise(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

/// The payload of garbage connection `i`.
fn garbage(i: usize) -> (&'static str, Vec<u8>) {
    match i % 8 {
        0 => ("1 MiB of noise", noise(1 << 20)),
        1 => (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00".to_vec(),
        ),
        2 => ("TLS ClientHello with SNI", tls_client_hello()),
        3 => ("SSH banner", b"SSH-2.0-OpenSSH_9.6p1 Debian-3\r\n".to_vec()),
        4 => (
            "PostgreSQL SSLRequest",
            vec![0x00, 0x00, 0x00, 0x08, 0x04, 0xd2, 0x16, 0x2f],
        ),
        5 => {
            let mut v = PREAMBLE_HOP.to_vec();
            v.extend_from_slice(&noise(64 * 1024));
            ("hop preamble and 64 KiB of noise", v)
        }
        6 => {
            let mut v = PREAMBLE_ATTACH.to_vec();
            v.extend_from_slice(&noise(64 * 1024));
            ("attach preamble and 64 KiB of noise", v)
        }
        _ => (
            "HTTP CONNECT",
            b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n".to_vec(),
        ),
    }
}

/// Sends garbage connection `i` and expects the relay to close it.
async fn throw_garbage(relay: SocketAddr, i: usize) -> Result<()> {
    let (what, bytes) = garbage(i);
    let conn = TcpStream::connect(relay).await?;
    let (mut rd, mut wr) = conn.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        // Keep the write half open: the relay must close, not us.
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    writer.abort();
    ensure!(
        closed.is_ok(),
        "{what}: the relay kept the connection open for 5 s"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_garbage_disturbs_nothing() -> Result<()> {
    let (_home, mut relay, endpoint) = relay_process(&[]).await?;
    let relay_addr: SocketAddr = endpoint.address.parse()?;
    let echo = EchoServer::start().await?;
    let (_outlet, inlet) = nodes(&endpoint, &echo, |_| {}, |_| {}).await?;
    let mut established = TcpStream::connect(inlet.addr()).await?;
    echo_round(&mut established, b"before the storm").await?;
    let rss_before = support::procs::rss_kib(relay.pid())?;

    let started = Instant::now();
    let storm: Vec<_> = (0..120)
        .map(|i| tokio::spawn(throw_garbage(relay_addr, i)))
        .collect();
    // The established tunnel works during the storm.
    for i in 0..5 {
        echo_round(&mut established, format!("during the storm {i}").as_bytes()).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for throw in storm {
        throw.await??;
    }
    println!(
        "120 garbage connections closed within {:?}",
        started.elapsed()
    );
    echo_round(&mut established, b"after the storm").await?;
    let mut fresh = TcpStream::connect(inlet.addr()).await?;
    echo_round(&mut fresh, b"a new tunnel").await?;
    ensure!(relay.is_running(), "the relay exited:\n{}", relay.stderr());
    let log = relay.stderr();
    ensure!(!log.contains("panicked"), "{log}");
    // Each kind of refusal is logged, at most a few a second (the storm
    // cannot flood the log; which garbage got its own line is chance).
    relay
        .wait_for_stderr("not a Postern node", Duration::from_secs(1))
        .await?;
    let lines = support::procs::occurrences(&relay.stderr(), "not a Postern node");
    ensure!(
        lines < 60,
        "{lines} log lines for 120 garbage connections: refusal warnings are not rate-limited"
    );
    let rss_after = support::procs::rss_kib(relay.pid())?;
    println!("relay RSS {rss_before} KiB before, {rss_after} KiB after the storm");
    ensure!(
        rss_after < rss_before + 32 * 1024,
        "the relay grew from {rss_before} KiB to {rss_after} KiB"
    );
    Ok(())
}
