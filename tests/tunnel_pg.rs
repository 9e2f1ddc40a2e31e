//! A real PostgreSQL through the tunnel: tokio-postgres → inlet → relay →
//! outlet → a throwaway cluster, everything on random loopback ports.
//!
//! - DDL, parameterised queries, transactions and a server error that leaves
//!   the connection usable;
//! - a `COPY … FROM STDIN` of more than 100 MB whose SHA-256, computed while
//!   sending, matches `COPY … TO STDOUT` read back directly and through the
//!   tunnel;
//! - 50 concurrent tunnelled connections, each running several queries;
//! - an outlet whose target is the server's Unix socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Cursor;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use postern_node::Target;
use sha2::{Digest, Sha256};
use support::net::Tunnel;
use support::pg::TempPg;

/// Bytes sent by the COPY test (a little over 100 MiB).
const COPY_BYTES: usize = 101 * 1024 * 1024;
/// Characters of payload per COPY row (under the TOAST threshold, so the
/// server stores them as they are).
const ROW_PAYLOAD: usize = 1000;

async fn connect(tunnel: &Tunnel) -> Result<tokio_postgres::Client> {
    TempPg::connect_to("127.0.0.1", tunnel.addr().port())
        .await
        .context("connecting through the tunnel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_queries_and_errors_through_the_tunnel() -> Result<()> {
    let pg = TempPg::start_async().await?;
    let tunnel = Tunnel::start("db-ddl", Target::Tcp(pg.addr().to_string())).await?;
    let client = connect(&tunnel).await?;

    client
        .batch_execute(
            "create table accounts (id int primary key, owner text not null, balance numeric not null);
             create index accounts_owner on accounts (owner);",
        )
        .await?;
    let insert = client
        .prepare("insert into accounts (id, owner, balance) values ($1, $2, $3::text::numeric)")
        .await?;
    for (id, owner, balance) in [(1, "ada", "10.50"), (2, "grace", "99"), (3, "ada", "0.25")] {
        let n = client
            .execute(&insert, &[&id, &owner, &balance.to_owned()])
            .await?;
        ensure!(n == 1, "insert affected {n} rows");
    }
    let rows = client
        .query(
            "select owner, sum(balance)::text from accounts group by owner order by owner",
            &[],
        )
        .await?;
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    ensure!(
        got == vec![
            ("ada".to_owned(), "10.75".to_owned()),
            ("grace".to_owned(), "99".to_owned())
        ],
        "aggregate returned {got:?}"
    );

    // A transaction that is rolled back leaves nothing behind.
    client
        .batch_execute("begin; delete from accounts; rollback;")
        .await?;
    let n: i64 = client
        .query_one("select count(*) from accounts", &[])
        .await?
        .get(0);
    ensure!(n == 3, "rollback lost rows: {n} left");

    // A server-side error comes back as an error, and the connection lives on.
    let err = client
        .execute("insert into accounts values (1, 'dup', 0)", &[])
        .await
        .expect_err("duplicate key must fail");
    ensure!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("duplicate key")),
        "unexpected error: {err}"
    );
    let err = client.simple_query("selec 1").await.expect_err("syntax");
    ensure!(err.as_db_error().is_some(), "unexpected error: {err}");

    // A large result (several frames) arrives whole.
    let big: String = client
        .query_one("select repeat('xyz', 300000)", &[])
        .await?
        .get(0);
    ensure!(big.len() == 900_000 && big.starts_with("xyzxyz"));

    // The tunnelled session really is a TCP client of this server.
    let addr: String = client
        .query_one("select host(inet_client_addr())", &[])
        .await?
        .get(0);
    ensure!(addr == "127.0.0.1", "client address {addr}");
    drop(client);
    tunnel.shutdown().await;
    Ok(())
}

/// Deterministic COPY text rows: `id<TAB><1000 hex digits>\n`, exactly as
/// the server prints them back in text format.
fn copy_row(id: u64, state: &mut u64, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(id.to_string().as_bytes());
    out.push(b'\t');
    for _ in 0..ROW_PAYLOAD / 16 {
        // xorshift64*: fast, and different on every row.
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        for i in 0..16 {
            out.push(HEX[((v >> (i * 4)) & 0xf) as usize]);
        }
    }
    for i in 0..ROW_PAYLOAD % 16 {
        out.push(HEX[(id as usize + i) % 16]);
    }
    out.push(b'\n');
}

async fn copy_out_digest(client: &tokio_postgres::Client) -> Result<(String, usize)> {
    client
        .batch_execute("set synchronize_seqscans = off")
        .await?;
    let stream = client.copy_out("copy bulk to stdout").await?;
    futures_util::pin_mut!(stream);
    let mut hasher = Sha256::new();
    let mut total = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        total += chunk.len();
        hasher.update(&chunk);
    }
    Ok((hex::encode(hasher.finalize()), total))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_100_mb_round_trips_with_matching_checksum() -> Result<()> {
    let pg = TempPg::start_async().await?;
    let tunnel = Tunnel::start("db-copy", Target::Tcp(pg.addr().to_string())).await?;
    let client = connect(&tunnel).await?;
    client
        .batch_execute("create unlogged table bulk (id bigint not null, payload text not null)")
        .await?;

    let started = Instant::now();
    let sink = client.copy_in("copy bulk (id, payload) from stdin").await?;
    futures_util::pin_mut!(sink);
    let mut hasher = Sha256::new();
    let (mut sent, mut rows, mut state) = (0usize, 0u64, 0x9e37_79b9_7f4a_7c15u64);
    while sent < COPY_BYTES {
        let mut chunk = Vec::with_capacity(256 * 1024 + 2 * ROW_PAYLOAD);
        while chunk.len() < 256 * 1024 {
            rows += 1;
            copy_row(rows, &mut state, &mut chunk);
        }
        hasher.update(&chunk);
        sent += chunk.len();
        sink.send(Cursor::new(chunk)).await?;
    }
    let copied = sink.finish().await?;
    let sent_digest = hex::encode(hasher.finalize());
    let copy_in_took = started.elapsed();
    ensure!(copied == rows, "COPY reported {copied} rows, sent {rows}");
    ensure!(sent >= 100 * 1024 * 1024, "only {sent} bytes sent");

    // Read back straight from the server, then through the tunnel.
    let direct = pg.connect_direct().await?;
    let (direct_digest, direct_len) = copy_out_digest(&direct).await?;
    let started = Instant::now();
    let (tunnel_digest, tunnel_len) = copy_out_digest(&client).await?;
    let copy_out_took = started.elapsed();
    eprintln!(
        "COPY: {sent} bytes in {copy_in_took:.2?}, read back through the tunnel in {copy_out_took:.2?}"
    );
    ensure!(
        direct_len == sent,
        "server holds {direct_len} bytes, sent {sent}"
    );
    ensure!(
        direct_digest == sent_digest,
        "what the server stored differs from what was sent"
    );
    ensure!(tunnel_len == sent, "tunnel returned {tunnel_len} bytes");
    ensure!(
        tunnel_digest == sent_digest,
        "COPY TO through the tunnel differs from what was sent"
    );
    drop(client);
    tunnel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_connections() -> Result<()> {
    const CLIENTS: i32 = 50;
    const ROWS_EACH: i32 = 4;
    let pg = TempPg::start_async().await?;
    let tunnel = Tunnel::start("db-many", Target::Tcp(pg.addr().to_string())).await?;
    {
        let setup = connect(&tunnel).await?;
        setup
            .batch_execute("create table hits (client int not null, n int not null)")
            .await?;
    }
    let port = tunnel.addr().port();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(async move {
                let client = TempPg::connect_to("127.0.0.1", port).await?;
                let pid: i32 = client
                    .query_one("select pg_backend_pid()", &[])
                    .await?
                    .get(0);
                for n in 0..ROWS_EACH {
                    client
                        .execute("insert into hits (client, n) values ($1, $2)", &[&c, &n])
                        .await?;
                }
                let echoed: String = client
                    .query_one("select $1::text || '-' || $2::int", &[&"client", &c])
                    .await?
                    .get(0);
                ensure!(echoed == format!("client-{c}"), "client {c} got {echoed:?}");
                let mine: i64 = client
                    .query_one("select count(*) from hits where client = $1", &[&c])
                    .await?
                    .get(0);
                ensure!(mine == i64::from(ROWS_EACH), "client {c} sees {mine} rows");
                client.batch_execute("select pg_sleep(0.05)").await?;
                Ok::<_, anyhow::Error>(pid)
            })
        })
        .collect();
    let mut pids = std::collections::HashSet::new();
    for (c, task) in tasks.into_iter().enumerate() {
        let pid = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .with_context(|| format!("client {c} timed out"))???;
        pids.insert(pid);
    }
    ensure!(
        pids.len() == CLIENTS as usize,
        "only {} distinct server sessions for {CLIENTS} clients",
        pids.len()
    );
    let direct = pg.connect_direct().await?;
    let (total, clients): (i64, i64) = {
        let row = direct
            .query_one("select count(*), count(distinct client) from hits", &[])
            .await?;
        (row.get(0), row.get(1))
    };
    ensure!(
        total == i64::from(CLIENTS * ROWS_EACH),
        "{total} rows in total"
    );
    ensure!(clients == i64::from(CLIENTS), "{clients} distinct clients");
    tunnel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlet_targets_a_unix_socket() -> Result<()> {
    let pg = TempPg::start_async().await?;
    let tunnel = Tunnel::start("db-unix", Target::Unix(pg.socket_path())).await?;
    let client = connect(&tunnel).await?;
    client
        .batch_execute(
            "create table via_socket (v text); insert into via_socket values ('unix ok')",
        )
        .await?;
    let v: String = client
        .query_one("select v from via_socket", &[])
        .await?
        .get(0);
    ensure!(v == "unix ok");
    // The server sees a Unix-socket client: no client address at all.
    let is_unix: bool = client
        .query_one("select inet_client_addr() is null", &[])
        .await?
        .get(0);
    ensure!(is_unix, "the outlet did not use the Unix socket");
    // And the data is the server's own.
    let direct = pg.connect_direct().await?;
    let v: String = direct
        .query_one("select v from via_socket", &[])
        .await?
        .get(0);
    ensure!(v == "unix ok");
    drop(client);
    tunnel.shutdown().await;
    Ok(())
}
