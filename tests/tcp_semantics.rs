//! TCP semantics through a tunnel (client → inlet → relay → outlet → target),
//! all in-process on random loopback ports, with a small TCP server as the
//! target instead of a database:
//!
//! - a half-close by the client reaches the target as EOF, the target can
//!   still answer, and its close reaches the client as EOF;
//! - a reset at either end ends the other end within a second;
//! - 50 tunnels opened and closed one after another leave no file
//!   descriptors or tasks behind.
//!
//! The tests in this file share one lock because the leak check counts the
//! whole process's file descriptors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use anyhow::Result;
use support::net::{echo_round, open_fds, ConnEnd, EchoServer, Tunnel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How quickly a reset must cross the tunnel.
const RESET_LIMIT: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_propagates_both_ways() -> Result<()> {
    let _serial = SERIAL.lock().await;
    // A target that reads until EOF, then answers and closes.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let target = listener.local_addr()?;
    let (seen_tx, seen_rx) = oneshot::channel::<Vec<u8>>();
    let server = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await?;
        let mut got = Vec::new();
        // read_to_end only returns once the client's FIN arrived.
        conn.read_to_end(&mut got).await?;
        let _ = seen_tx.send(got);
        // Writing after the peer's half-close must still work.
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.write_all(b"reply after your EOF").await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.write_all(b" and more").await?;
        conn.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });

    let tunnel = Tunnel::start("half-close", postern_node::Target::Tcp(target.to_string())).await?;
    let mut client = TcpStream::connect(tunnel.addr()).await?;
    client.write_all(b"request").await?;
    client.shutdown().await?; // shutdown(Write): FIN towards the target.

    let seen = tokio::time::timeout(Duration::from_secs(5), seen_rx)
        .await
        .expect("the target never saw EOF after the client's shutdown(Write)")?;
    assert_eq!(seen, b"request");

    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut reply))
        .await
        .expect("the target's close never reached the client as EOF")?;
    assert_eq!(reply, b"reply after your EOF and more");
    server.await??;
    tunnel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_reaches_target_within_a_second() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let echo = EchoServer::start().await?;
    let tunnel = Tunnel::start("client-reset", echo.target()).await?;
    let mut client = TcpStream::connect(tunnel.addr()).await?;
    // The whole path is up once an echo came back.
    echo_round(&mut client, b"ping").await?;

    client.set_zero_linger()?;
    let reset_at = Instant::now();
    drop(client); // RST, not FIN.

    let (end, seen, ended_at) = echo
        .next_end(Duration::from_secs(5))
        .await
        .expect("the target's connection did not end after the client reset");
    let took = ended_at.duration_since(reset_at);
    assert_eq!(seen, b"ping");
    assert!(
        took < RESET_LIMIT,
        "the target saw the end of the connection only after {took:?}"
    );
    // The reset arrives as a reset (or at least as an end), never as a clean
    // half-close that would let the server believe the request was complete.
    assert!(
        matches!(end, ConnEnd::Error(_)),
        "a client reset reached the target as {end:?}, not as a reset"
    );
    tunnel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_reset_reaches_client_within_a_second() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let target = listener.local_addr()?;
    let (reset_tx, reset_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel::<Instant>();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await?;
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await?;
        conn.write_all(&buf).await?;
        let _ = reset_rx.await;
        conn.set_zero_linger()?;
        let _ = done_tx.send(Instant::now());
        drop(conn); // RST.
        Ok::<_, std::io::Error>(())
    });

    let tunnel = Tunnel::start(
        "target-reset",
        postern_node::Target::Tcp(target.to_string()),
    )
    .await?;
    let mut client = TcpStream::connect(tunnel.addr()).await?;
    echo_round(&mut client, b"ping").await?;
    reset_tx.send(()).unwrap();
    let reset_at = done_rx.await?;

    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .expect("the client's connection stayed open after the target reset");
    let took = reset_at.elapsed();
    // A reset arrives as a reset, not as a clean end of stream that would
    // make the client believe the server finished its answer.
    assert!(
        read.is_err(),
        "expected the target's reset to arrive as an error, read {read:?}"
    );
    assert!(
        took < RESET_LIMIT,
        "the client saw the target's reset only after {took:?}"
    );
    tunnel.shutdown().await;
    Ok(())
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Polls until `f() <= limit` or two seconds pass; returns the last value.
async fn settle(limit: usize, f: impl Fn() -> usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let now = f();
        if now <= limit || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sequential_tunnels_leak_no_fds_or_tasks() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let echo = EchoServer::start().await?;
    let tunnel = Tunnel::start("leaks", echo.target()).await?;

    let one = |i: usize| {
        let addr = tunnel.addr();
        async move {
            let mut client = TcpStream::connect(addr).await?;
            echo_round(&mut client, format!("tunnel {i}").as_bytes()).await?;
            if i % 5 == 4 {
                // Every fifth tunnel ends with a reset instead of a close.
                client.set_zero_linger()?;
                drop(client);
            } else {
                client.shutdown().await?;
                let mut rest = Vec::new();
                tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
                    .await??;
                assert!(rest.is_empty());
            }
            Ok::<_, anyhow::Error>(())
        }
    };
    // Warm up (lazily created runtime resources), then take the baseline.
    for i in 0..3 {
        one(i).await?;
        echo.next_end(Duration::from_secs(5)).await.expect("end");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_before = open_fds();
    let tasks_before = alive_tasks();

    let during = {
        let mut client = TcpStream::connect(tunnel.addr()).await?;
        echo_round(&mut client, b"held open").await?;
        let n = open_fds();
        drop(client);
        echo.next_end(Duration::from_secs(5)).await.expect("end");
        n
    };
    // Sanity: an open tunnel does show up in the count (client, inlet, two
    // relay sides, outlet's two connections, target: 7 or more).
    assert!(
        during >= fds_before + 5,
        "an open tunnel added only {} fds; the leak check would be blind",
        during as isize - fds_before as isize
    );

    for i in 0..50 {
        one(i).await?;
        echo.next_end(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("tunnel {i} did not end at the target"));
    }
    let slack = 3;
    let fds_after = settle(fds_before + slack, open_fds).await;
    let tasks_after = settle(tasks_before + slack, alive_tasks).await;
    assert!(
        fds_after <= fds_before + slack,
        "open fds grew from {fds_before} to {fds_after} over 50 tunnels"
    );
    assert!(
        tasks_after <= tasks_before + slack,
        "alive tasks grew from {tasks_before} to {tasks_after} over 50 tunnels"
    );
    tunnel.shutdown().await;
    Ok(())
}
