//! No port exposed, proven across a network. Three network namespaces stand
//! for three machines:
//!
//! ```text
//!   db (10.231.1.2)  ──veth──  relay (10.231.1.1 | 10.231.2.1)  ──veth──  laptop (10.231.2.2)
//!   PostgreSQL, outlet          postern relay, routes between links        inlet, psql
//!   nftables: drop every inbound new connection
//! ```
//!
//! PostgreSQL listens on the database's address (and its Unix socket, which
//! the outlet uses). The relay namespace forwards packets, so the laptop has
//! a route to the database: before the firewall goes up, the test shows a
//! direct `psql` from the laptop works, so that its failure afterwards is the
//! firewall's doing and not a missing route. Then `db` drops every inbound
//! new connection (loopback included); the outlet dials out to the relay,
//! the inlet too, and `psql` on the laptop queries PostgreSQL through the
//! tunnel, while a direct connection from the laptop to the database's
//! address and port fails, and the firewall counted the dropped attempt.
//!
//! Runs as root (CI is root); skips with a message when not root or when
//! `ip netns` is unavailable. Only the namespaces' own addresses are used.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use support::net::{relay_identifier_from, PosternHome, READY_TIMEOUT};
use support::netns::{Lab, DB_ADDR, RELAY_DB_SIDE, RELAY_LAPTOP_SIDE};
use support::pg::{pg_bin, TempPg};

const RELAY_PORT: u16 = 4000;
const INLET_PORT: u16 = 15432;

/// The ruleset of the `db` namespace: every inbound packet that would start
/// a new connection (TCP or anything else, on any interface) is dropped and
/// counted; replies to connections `db` opened itself pass.
const DB_FIREWALL: &str = "
table inet postern_lab {
    chain input {
        type filter hook input priority filter; policy accept;
        ct state new counter drop
    }
}
";

/// `psql` run in namespace `ns` against `host:port`, with a 3 s connect
/// timeout; returns its output.
fn psql(lab: &Lab, ns: &str, host: &str, port: u16, sql: &str) -> Result<std::process::Output> {
    let psql = pg_bin("psql").context("psql not found (scripts/setup.sh installs it)")?;
    let conn = format!(
        "host={host} port={port} user=postgres dbname=postgres connect_timeout=3 sslmode=disable"
    );
    Ok(lab
        .command(
            ns,
            &psql.to_string_lossy(),
            &["-X", "-At", "-d", &conn, "-c", sql],
        )
        .env("PGCONNECT_TIMEOUT", "3")
        .output()?)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `counter packets N` of the firewall rule.
fn dropped_packets(lab: &Lab) -> Result<u64> {
    let out = lab.exec(&lab.db, &["nft", "list", "table", "inet", "postern_lab"])?;
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    listing
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no packet counter in:\n{listing}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_port_exposed_across_a_network() -> Result<()> {
    if let Some(why) = Lab::unavailable() {
        eprintln!("SKIPPED no_port_exposed_across_a_network: {why}");
        return Ok(());
    }
    let lab = Lab::build().context("building the network namespaces")?;

    // db: PostgreSQL on the database's own address (and a Unix socket).
    let db_ns = lab.db.clone();
    let pg =
        tokio::task::spawn_blocking(move || TempPg::start_in_netns(&db_ns, &[IpAddr::V4(DB_ADDR)]))
            .await??;
    let pg_port = pg.port();

    // With no firewall yet, the laptop reaches the database directly: the
    // route through the relay namespace works.
    let direct = psql(
        &lab,
        &lab.laptop,
        &DB_ADDR.to_string(),
        pg_port,
        "select 'direct'",
    )?;
    ensure!(
        direct.status.success() && text(&direct).contains("direct"),
        "before the firewall, a direct connection from the laptop should work (the route is \
         the point of the comparison): {}",
        text(&direct)
    );

    // Now db drops every inbound new connection.
    lab.nft(&lab.db, DB_FIREWALL)?;
    let dropped_before = dropped_packets(&lab)?;

    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let outlet_id = home.create_identity("outlet")?;
    let inlet_id = home.create_identity("inlet")?;

    // relay: the only listening Postern port, in its own namespace.
    let listen = format!("0.0.0.0:{RELAY_PORT}");
    let mut relay = lab.spawn_postern(
        &lab.relay,
        &home,
        &["relay", "--identity", "relay", "--listen", &listen],
    )?;
    relay.wait_for_stderr("listening on", READY_TIMEOUT).await?;
    let relay_id = relay_identifier_from(&relay.stderr())?.to_string();

    // db: the outlet dials out to the relay and reaches PostgreSQL over its
    // Unix socket (the firewall drops even loopback connections).
    let target = format!("unix:{}", pg.socket_path().display());
    let relay_from_db = format!("{RELAY_DB_SIDE}:{RELAY_PORT}");
    let mut outlet = lab.spawn_postern(
        &lab.db,
        &home,
        &[
            "outlet",
            "--identity",
            "outlet",
            "--relay",
            &relay_from_db,
            "--relay-identity",
            &relay_id,
            "--service",
            "db",
            "--target",
            &target,
            "--allow",
            &inlet_id.to_string(),
        ],
    )?;
    outlet
        .wait_for_stderr("service registered at relay", READY_TIMEOUT)
        .await?;

    // laptop: the inlet on the laptop's loopback.
    let relay_from_laptop = format!("{RELAY_LAPTOP_SIDE}:{RELAY_PORT}");
    let inlet_listen = format!("127.0.0.1:{INLET_PORT}");
    let mut inlet = lab.spawn_postern(
        &lab.laptop,
        &home,
        &[
            "inlet",
            "--identity",
            "inlet",
            "--relay",
            &relay_from_laptop,
            "--relay-identity",
            &relay_id,
            "--service",
            "db",
            "--outlet-identity",
            &outlet_id.to_string(),
            "--listen",
            &inlet_listen,
        ],
    )?;
    inlet
        .wait_for_stderr("connected to relay", READY_TIMEOUT)
        .await?;

    // The client queries PostgreSQL through the tunnel.
    let through = psql(
        &lab,
        &lab.laptop,
        "127.0.0.1",
        INLET_PORT,
        "select 'through the tunnel', sum(x) from generate_series(1, 100000) x",
    )?;
    ensure!(
        through.status.success() && text(&through).contains("through the tunnel|5000050000"),
        "the query through the tunnel failed: {}\ninlet:\n{}\noutlet:\n{}\nrelay:\n{}",
        text(&through),
        inlet.stderr(),
        outlet.stderr(),
        relay.stderr()
    );

    // A direct connection from the laptop to the database fails, dropped by
    // the firewall (a timeout, not a refusal: nothing answers at all).
    let started = Instant::now();
    let direct = psql(
        &lab,
        &lab.laptop,
        &DB_ADDR.to_string(),
        pg_port,
        "select 'direct'",
    )?;
    let took = started.elapsed();
    if direct.status.success() {
        bail!(
            "a direct connection from the laptop to {DB_ADDR}:{pg_port} succeeded: {}",
            text(&direct)
        );
    }
    let dropped = dropped_packets(&lab)? - dropped_before;
    ensure!(
        dropped > 0,
        "the direct connection failed, but not because the firewall dropped it: {}",
        text(&direct)
    );
    ensure!(
        took >= Duration::from_secs(2),
        "the direct connection failed after {took:?}, too fast for dropped packets: {}",
        text(&direct)
    );
    println!(
        "through the tunnel: {}; direct to {DB_ADDR}:{pg_port}: failed after {took:.1?} \
         ({dropped} packets dropped by db's firewall): {}",
        String::from_utf8_lossy(&through.stdout).trim(),
        String::from_utf8_lossy(&direct.stderr).trim()
    );

    // The tunnel still works after the probe, and every process is alive.
    let again = psql(&lab, &lab.laptop, "127.0.0.1", INLET_PORT, "select 2")?;
    ensure!(again.status.success(), "{}", text(&again));
    ensure!(relay.is_running() && outlet.is_running() && inlet.is_running());
    // Processes first, then PostgreSQL, then the namespaces (`lab`, dropped
    // last because it was declared first).
    drop((inlet, outlet, relay));
    drop(pg);
    Ok(())
}
