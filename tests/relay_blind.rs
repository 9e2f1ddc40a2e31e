//! The relay cannot read: every byte between the nodes and the relay passes
//! through a recording proxy while a PostgreSQL client sends and receives a
//! marker string through the tunnel. The marker reaches the client, but
//! never appears in the recording, in either direction; nor do the query
//! text, the database user name or the service name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use anyhow::{ensure, Result};
use postern_node::Target;
use support::net::{contains_ignore_case, RecordingProxy, TestRelay, Tunnel};
use support::pg::TempPg;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_and_network_see_only_ciphertext() -> Result<()> {
    let pg = TempPg::start_async().await?;
    let relay = TestRelay::start().await?;
    let proxy = RecordingProxy::start(relay.addr).await?;
    let service = "blind-db-service";
    let tunnel = Tunnel::start_at(
        relay,
        Some(proxy.addr),
        service,
        Target::Tcp(pg.addr().to_string()),
    )
    .await?;

    let marker = format!("MARKER-{}", hex::encode(rand::random::<[u8; 16]>()));
    let client = TempPg::connect_to("127.0.0.1", tunnel.addr().port()).await?;
    // Client → server: the marker in the query text.
    let echoed: String = client
        .query_one(&format!("select '{marker}'::text"), &[])
        .await?
        .get(0);
    ensure!(echoed == marker, "the marker did not come back: {echoed:?}");
    // Client → server as a parameter, stored, then server → client.
    client
        .batch_execute("create table secrets (v text)")
        .await?;
    client
        .execute("insert into secrets (v) values ($1)", &[&marker])
        .await?;
    let stored: String = client.query_one("select v from secrets", &[]).await?.get(0);
    ensure!(stored == marker, "read back {stored:?}");
    // The server really stored it: it crossed the tunnel as a parameter.
    let direct: String = pg
        .connect_direct()
        .await?
        .query_one("select v from secrets", &[])
        .await?
        .get(0);
    ensure!(direct == marker);
    drop(client);
    tunnel.shutdown().await;

    let (up, down, connections) = proxy.snapshot();
    // The proxy really was in the path: hop channels and data connections
    // of both nodes, carrying at least the queries and answers.
    ensure!(
        connections >= 3,
        "only {connections} connections went through the proxy"
    );
    ensure!(
        up.len() > 1000 && down.len() > 1000,
        "suspiciously little traffic recorded: {} up, {} down",
        up.len(),
        down.len()
    );
    for (direction, bytes) in [("node → relay", &up), ("relay → node", &down)] {
        for needle in [
            marker.as_str(),
            "MARKER-",
            "select",
            "secrets",
            "postgres",
            service,
        ] {
            ensure!(
                !contains_ignore_case(bytes, needle.as_bytes()),
                "{needle:?} appears in the bytes {direction}"
            );
        }
    }
    Ok(())
}

/// The check above would be blind if the proxy recorded nothing useful: a
/// plain TCP conversation through the same kind of proxy must show up.
#[tokio::test]
async fn the_recording_proxy_does_see_plaintext() -> Result<()> {
    let echo = support::net::EchoServer::start().await?;
    let proxy = RecordingProxy::start(echo.addr).await?;
    let mut conn = TcpStream::connect(proxy.addr).await?;
    conn.write_all(b"hello MARKER-plain").await?;
    conn.shutdown().await?;
    let mut back = Vec::new();
    conn.read_to_end(&mut back).await?;
    ensure!(back == b"hello MARKER-plain");
    let (up, down, connections) = proxy.snapshot();
    ensure!(connections == 1);
    ensure!(contains_ignore_case(&up, b"marker-PLAIN"));
    ensure!(contains_ignore_case(&down, b"MARKER-plain"));
    Ok(())
}
