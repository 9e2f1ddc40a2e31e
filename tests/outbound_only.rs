//! Outbound only: the real `postern` binaries (relay, outlet, inlet) run as
//! separate processes in front of a throwaway PostgreSQL. While tunnels are
//! serving queries, the sockets each process holds are read from
//! `/proc/<pid>/fd` and `/proc/<pid>/net/{tcp,tcp6,udp,udp6}`:
//!
//! - the outlet holds no listening TCP socket and no UDP socket, only
//!   established connections (to the relay and to PostgreSQL);
//! - the inlet listens on 127.0.0.1 only;
//! - the relay's listening socket is found (so the inspection can see one).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{ensure, Result};
use support::net::{
    process_sockets, relay_identifier_from, PosternHome, ProcSocket, TCP_ESTABLISHED, TCP_LISTEN,
};
use support::pg::TempPg;

fn describe(sockets: &[ProcSocket]) -> String {
    sockets
        .iter()
        .map(|s| {
            format!(
                "{} {} -> {} state {:02X}",
                s.table, s.local, s.remote, s.state
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_tcp(s: &ProcSocket) -> bool {
    s.table.starts_with("tcp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlet_process_never_listens() -> Result<()> {
    let pg = TempPg::start_async().await?;
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let outlet_id = home.create_identity("outlet")?;
    let inlet_id = home.create_identity("inlet")?;

    let mut relay = home.spawn(&["relay", "--identity", "relay", "--listen", "127.0.0.1:0"])?;
    let relay_addr = relay.wait_for_addr("listening on").await?;
    let relay_identity = relay_identifier_from(&relay.stderr())?.to_string();

    let mut outlet = home.spawn(&[
        "outlet",
        "--identity",
        "outlet",
        "--relay",
        &relay_addr.to_string(),
        "--relay-identity",
        &relay_identity,
        "--service",
        "db",
        "--target",
        &pg.addr().to_string(),
        "--allow",
        &inlet_id.to_string(),
    ])?;
    outlet
        .wait_for_stderr("service registered at relay", Duration::from_secs(15))
        .await?;

    let mut inlet = home.spawn(&[
        "inlet",
        "--identity",
        "inlet",
        "--relay",
        &relay_addr.to_string(),
        "--relay-identity",
        &relay_identity,
        "--service",
        "db",
        "--outlet-identity",
        &outlet_id.to_string(),
        "--listen",
        "127.0.0.1:0",
    ])?;
    let inlet_addr = inlet.wait_for_addr("listening on").await?;
    inlet
        .wait_for_stderr("connected to relay", Duration::from_secs(15))
        .await?;

    // Tunnels in use: three sessions, one of them busy in a query.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let client = TempPg::connect_to("127.0.0.1", inlet_addr.port()).await?;
        let one: i32 = client.query_one("select 1", &[]).await?.get(0);
        ensure!(one == 1);
        clients.push(client);
    }
    let busy = {
        let client = TempPg::connect_to("127.0.0.1", inlet_addr.port()).await?;
        tokio::spawn(async move { client.batch_execute("select pg_sleep(2)").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let outlet_sockets = process_sockets(outlet.pid())?;
    let inlet_sockets = process_sockets(inlet.pid())?;
    let relay_sockets = process_sockets(relay.pid())?;

    // The inspection works: it finds the relay's listening socket.
    ensure!(
        relay_sockets
            .iter()
            .any(|s| is_tcp(s) && s.state == TCP_LISTEN && s.local == relay_addr),
        "the relay's listening socket {relay_addr} was not found:\n{}",
        describe(&relay_sockets)
    );

    // The outlet: no listening socket of any kind, no UDP.
    let listening: Vec<_> = outlet_sockets
        .iter()
        .filter(|s| is_tcp(s) && s.state == TCP_LISTEN)
        .cloned()
        .collect();
    ensure!(
        listening.is_empty(),
        "the outlet listens:\n{}",
        describe(&listening)
    );
    ensure!(
        outlet_sockets.iter().all(is_tcp),
        "the outlet holds UDP sockets:\n{}",
        describe(&outlet_sockets)
    );
    // …but it does hold established outbound connections: to the relay
    // (hop channel and one data connection per tunnel) and to PostgreSQL.
    let established = |to_port: u16| {
        outlet_sockets
            .iter()
            .filter(|s| is_tcp(s) && s.state == TCP_ESTABLISHED && s.remote.port() == to_port)
            .count()
    };
    ensure!(
        established(relay_addr.port()) >= 5,
        "expected the hop channel and 4 data connections to the relay:\n{}",
        describe(&outlet_sockets)
    );
    ensure!(
        established(pg.port()) >= 4,
        "expected 4 connections to PostgreSQL:\n{}",
        describe(&outlet_sockets)
    );

    // The inlet listens, on loopback only.
    let inlet_listening: Vec<_> = inlet_sockets
        .iter()
        .filter(|s| is_tcp(s) && s.state == TCP_LISTEN)
        .cloned()
        .collect();
    ensure!(
        inlet_listening.len() == 1 && inlet_listening[0].local == inlet_addr,
        "the inlet should listen on {inlet_addr} only:\n{}",
        describe(&inlet_listening)
    );
    ensure!(
        inlet_listening
            .iter()
            .all(|s| s.local.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST)),
        "the inlet listens beyond 127.0.0.1:\n{}",
        describe(&inlet_listening)
    );

    busy.await??;
    for client in &clients {
        let two: i32 = client.query_one("select 2", &[]).await?.get(0);
        ensure!(two == 2);
    }
    ensure!(outlet.is_running() && inlet.is_running() && relay.is_running());
    Ok(())
}
