//! Resilience: relays that die, come back, or were never there; nodes that
//! vanish; tunnels that idle; nodes that stop gracefully.
//!
//! - The relay (a real `postern` process) is killed mid-session: the query
//!   in flight fails at once with an error, the inlet logs why, new clients
//!   are refused promptly; the relay restarts on the same port, the outlet
//!   re-registers within 3 s, and a new query through the same inlet port
//!   succeeds.
//! - An inlet started while its relay is unreachable listens, reports it,
//!   refuses clients at once, and serves once the relay appears.
//! - Nodes configured with two relays fail over to the second when the first
//!   dies, or when it is unreachable from the start.
//! - Killing the outlet or the inlet process mid-tunnel ends the tunnel at
//!   the other end within seconds.
//! - An idle timeout closes a quiet tunnel and spares a busy one; it is off
//!   by default.
//! - A graceful stop refuses new clients at once, lets open tunnels finish,
//!   closes the rest after the grace period, and says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use postern_identity::Identity;
use postern_node::{Inlet, InletConfig, Outlet, OutletConfig, RelayEndpoint, Timeouts};
use postern_policies::AllowList;
use support::net::{echo_round, service, EchoServer, TestRelay, READY_TIMEOUT};
use support::pg::TempPg;
use support::procs::{free_port, relay_args, wait_for_count, ProcStack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `signal` (e.g. `-KILL`, `-TERM`) to `pid`.
fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill {signal} {pid} failed");
    Ok(())
}

/// Waits until `conn` ends (EOF or error); returns how long that took.
/// Bytes that arrive first are ignored.
async fn ended_within(conn: &mut TcpStream, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), conn.read(&mut buf)).await {
            Err(_) => bail!("the connection was still open after {limit:?}"),
            Ok(Ok(0) | Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Whether a client connecting to the inlet at `addr` is refused within
/// `limit` (the connection is reset or closed before any echo).
async fn refused_within(addr: SocketAddr, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut conn = match TcpStream::connect(addr).await {
        Ok(conn) => conn,
        Err(_) => return Ok(started.elapsed()),
    };
    let _ = conn.write_all(b"anyone there?").await;
    ended_within(&mut conn, limit).await
}

/// Retries `echo_round` on fresh connections until one succeeds.
async fn echo_eventually(addr: SocketAddr, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let attempt = async {
            let mut conn = TcpStream::connect(addr).await?;
            echo_round(&mut conn, b"are we back?").await
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(())) => return Ok(started.elapsed()),
            Ok(Err(_)) | Err(_) if started.elapsed() < limit => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(e)) => return Err(e.context(format!("no echo within {limit:?}"))),
            Err(_) => bail!("no echo within {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_and_restarted_mid_session() -> Result<()> {
    let pg = TempPg::start_async().await?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut stack = ProcStack::start(&listen, &pg.addr().to_string(), &[], &[], &[]).await?;
    let port = stack.inlet_addr.port();

    let client = TempPg::connect_to("127.0.0.1", port).await?;
    let one: i32 = client.query_one("select 1", &[]).await?.get(0);
    ensure!(one == 1);
    // A query in flight when the relay dies.
    let busy = tokio::spawn(async move {
        let started = Instant::now();
        let result = client.batch_execute("select pg_sleep(60)").await;
        (result, started)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    signal(stack.relay.pid(), "-KILL")?;
    stack.relay.wait_exit(Duration::from_secs(5)).await?;
    let killed = Instant::now();

    // The tunnel in use ends with an error, not a hang.
    let (result, _) = tokio::time::timeout(Duration::from_secs(5), busy)
        .await
        .context("the query in flight still hangs 5 s after the relay died")??;
    let error = match result {
        Ok(()) => bail!("the query in flight succeeded although the relay died"),
        Err(e) => e,
    };
    let failed_after = killed.elapsed();
    ensure!(
        failed_after < Duration::from_secs(2),
        "the client learned of the dead relay only after {failed_after:?}"
    );
    let log = stack
        .inlet
        .wait_for_stderr("tunnel aborted", Duration::from_secs(5))
        .await?;
    let aborted = log
        .lines()
        .find(|l| l.contains("tunnel aborted"))
        .unwrap_or_default()
        .to_owned();
    ensure!(
        aborted.contains("relay"),
        "the inlet's log line does not say the relay connection failed: {aborted}"
    );
    println!(
        "query in flight failed {failed_after:?} after the relay died: {error}; inlet: {aborted}"
    );

    // While the relay is down the inlet keeps its port and refuses promptly.
    stack
        .inlet
        .wait_for_stderr("no relay connection", Duration::from_secs(5))
        .await?;
    let refused = refused_within(stack.inlet_addr, Duration::from_secs(2)).await?;
    println!("new client refused after {refused:?} while the relay was down");
    stack
        .inlet
        .wait_for_stderr("refusing client connection", Duration::from_secs(2))
        .await?;

    // The relay comes back on the same port.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let args = relay_args(&listen);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    stack.relay = stack.home.spawn(&args)?;
    stack.relay.wait_for_addr("listening on").await?;
    let back = Instant::now();
    wait_for_count(
        &mut stack.outlet,
        "service registered at relay",
        2,
        Duration::from_secs(3),
    )
    .await
    .context("the outlet did not re-register within 3 s of the relay's return")?;
    let reregistered = back.elapsed();
    wait_for_count(
        &mut stack.inlet,
        "connected to relay",
        2,
        Duration::from_secs(3),
    )
    .await?;
    println!("outlet re-registered {reregistered:?} after the relay came back");

    // A new query through the same inlet port.
    let query = async {
        let client = TempPg::connect_to("127.0.0.1", port).await?;
        let two: i32 = client.query_one("select 2", &[]).await?.get(0);
        ensure!(two == 2);
        anyhow::Ok(())
    };
    if let Err(e) = query.await {
        bail!(
            "a new query after the relay's return failed: {e:#}\ninlet:\n{}\noutlet:\n{}\nrelay:\n{}",
            stack.inlet.stderr(),
            stack.outlet.stderr(),
            stack.relay.stderr()
        );
    }
    stack.ensure_running()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inlet_started_before_its_relay_serves_once_it_appears() -> Result<()> {
    let echo = EchoServer::start().await?;
    let home = support::net::PosternHome::new()?;
    let relay_id = home.create_identity("relay")?;
    let outlet_id = home.create_identity("outlet")?;
    let inlet_id = home.create_identity("inlet")?;
    let listen = format!("127.0.0.1:{}", free_port()?);

    let mut inlet =
        ProcStack::spawn_inlet_with(&home, &listen, relay_id, outlet_id, "127.0.0.1:0", &[])?;
    let inlet_addr = inlet.wait_for_addr("listening on").await?;
    // It reports the problem…
    inlet
        .wait_for_stderr("no relay connection", Duration::from_secs(5))
        .await?;
    // …and refuses clients at once instead of leaving them hanging.
    for _ in 0..3 {
        let took = refused_within(inlet_addr, Duration::from_secs(1)).await?;
        ensure!(took < Duration::from_secs(1), "refusal took {took:?}");
    }
    inlet
        .wait_for_stderr("refusing client connection", Duration::from_secs(2))
        .await?;

    // The relay and the outlet appear.
    let args = relay_args(&listen);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut relay = home.spawn(&args)?;
    relay.wait_for_addr("listening on").await?;
    let appeared = Instant::now();
    let mut outlet = ProcStack::spawn_outlet_with(
        &home,
        &listen,
        relay_id,
        inlet_id,
        &echo.addr.to_string(),
        &[],
    )?;
    inlet
        .wait_for_stderr("connected to relay", Duration::from_secs(3))
        .await
        .context("the inlet did not connect within 3 s of the relay appearing")?;
    outlet
        .wait_for_stderr("service registered at relay", READY_TIMEOUT)
        .await?;
    echo_eventually(inlet_addr, Duration::from_secs(5)).await?;
    println!(
        "inlet connected and served {:?} after the relay appeared",
        appeared.elapsed()
    );
    ensure!(inlet.is_running() && relay.is_running() && outlet.is_running());
    Ok(())
}

fn outlet_config(
    primary: RelayEndpoint,
    fallback: RelayEndpoint,
    echo: &EchoServer,
    inlet: &Identity,
) -> OutletConfig {
    OutletConfig::new(
        primary,
        service("failover"),
        echo.target(),
        AllowList::new([inlet.identifier()]),
    )
    .with_fallback_relays([fallback])
}

fn inlet_config(primary: RelayEndpoint, fallback: RelayEndpoint, outlet: &Identity) -> InletConfig {
    InletConfig::new(
        primary,
        service("failover"),
        support::net::any_loopback(),
        outlet.identifier(),
    )
    .with_fallback_relays([fallback])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_fail_over_to_the_next_relay() -> Result<()> {
    let echo = EchoServer::start().await?;
    let first = TestRelay::start().await?;
    let second = TestRelay::start().await?;
    let (outlet_id, inlet_id) = (Identity::generate(), Identity::generate());
    let outlet_cfg = outlet_config(first.endpoint(), second.endpoint(), &echo, &inlet_id);
    let inlet_cfg = inlet_config(first.endpoint(), second.endpoint(), &outlet_id);
    let mut outlet = Outlet::start(outlet_id.clone(), outlet_cfg)?;
    outlet.wait_ready(READY_TIMEOUT).await?;
    let mut inlet = Inlet::start(inlet_id.clone(), inlet_cfg).await?;
    inlet.wait_ready(READY_TIMEOUT).await?;
    let addr = inlet.local_addr().unwrap();
    let mut before = TcpStream::connect(addr).await?;
    echo_round(&mut before, b"through the first relay").await?;

    // The first relay goes away: its tunnel ends, both nodes move on.
    first.shutdown().await;
    let ended = ended_within(&mut before, Duration::from_secs(3)).await?;
    let took = echo_eventually(addr, Duration::from_secs(5)).await?;
    println!("tunnel through the dead relay ended after {ended:?}; served through the second relay after {took:?}");
    ensure!(took < Duration::from_secs(3), "failover took {took:?}");
    inlet.shutdown().await;
    outlet.shutdown().await;

    // Nodes whose first relay is unreachable from the start use the next.
    let dead = RelayEndpoint::new(format!("127.0.0.1:{}", free_port()?), second.identifier);
    let outlet_cfg = outlet_config(dead.clone(), second.endpoint(), &echo, &inlet_id);
    let inlet_cfg = inlet_config(dead, second.endpoint(), &outlet_id);
    let started = Instant::now();
    let mut outlet = Outlet::start(outlet_id, outlet_cfg)?;
    let mut inlet = Inlet::start(inlet_id, inlet_cfg).await?;
    outlet.wait_ready(Duration::from_secs(3)).await?;
    inlet.wait_ready(Duration::from_secs(3)).await?;
    echo_eventually(inlet.local_addr().unwrap(), Duration::from_secs(3)).await?;
    println!(
        "with the first relay unreachable, served after {:?}",
        started.elapsed()
    );
    inlet.shutdown().await;
    outlet.shutdown().await;
    second.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_far_end_ends_the_tunnel_at_both_ends() -> Result<()> {
    let echo = EchoServer::start().await?;
    let mut stack = ProcStack::start("127.0.0.1:0", &echo.addr.to_string(), &[], &[], &[]).await?;

    // The outlet process dies: the client's tunnel ends.
    let mut client = TcpStream::connect(stack.inlet_addr).await?;
    echo_round(&mut client, b"before the outlet dies").await?;
    signal(stack.outlet.pid(), "-KILL")?;
    let took = ended_within(&mut client, Duration::from_secs(3)).await?;
    println!("client saw the dead outlet after {took:?}");
    stack
        .relay
        .wait_for_stderr("tunnel closed", Duration::from_secs(3))
        .await
        .or(stack
            .relay
            .wait_for_stderr("tunnel aborted", Duration::from_secs(1))
            .await)?;

    // A new outlet takes over; then the inlet process dies: the target's
    // connection ends.
    stack.outlet = ProcStack::spawn_outlet_with(
        &stack.home,
        &stack.relay_addr.to_string(),
        stack.relay_id,
        stack.inlet_id,
        &echo.addr.to_string(),
        &[],
    )?;
    stack
        .outlet
        .wait_for_stderr("service registered at relay", READY_TIMEOUT)
        .await?;
    while echo.next_end(Duration::from_millis(200)).await.is_some() {}
    let mut client = TcpStream::connect(stack.inlet_addr).await?;
    echo_round(&mut client, b"before the inlet dies").await?;
    signal(stack.inlet.pid(), "-KILL")?;
    let killed = Instant::now();
    let (end, _, _) = echo
        .next_end(Duration::from_secs(3))
        .await
        .context("the target's connection was still open 3 s after the inlet died")?;
    println!(
        "target saw the dead inlet after {:?} ({end:?})",
        killed.elapsed()
    );
    ensure!(stack.relay.is_running() && stack.outlet.is_running());
    Ok(())
}

async fn idle_tunnel(
    idle: Option<Duration>,
) -> Result<(
    TestRelay,
    EchoServer,
    Vec<postern_node::NodeHandle>,
    SocketAddr,
)> {
    let relay = TestRelay::start().await?;
    let echo = EchoServer::start().await?;
    let (outlet_id, inlet_id) = (Identity::generate(), Identity::generate());
    let outlet_cfg = OutletConfig::new(
        relay.endpoint(),
        service("idle"),
        echo.target(),
        AllowList::new([inlet_id.identifier()]),
    );
    let mut inlet_cfg = InletConfig::new(
        relay.endpoint(),
        service("idle"),
        support::net::any_loopback(),
        outlet_id.identifier(),
    );
    inlet_cfg.timeouts.tunnel_idle = idle;
    let mut outlet = Outlet::start(outlet_id, outlet_cfg)?;
    outlet.wait_ready(READY_TIMEOUT).await?;
    let mut inlet = Inlet::start(inlet_id, inlet_cfg).await?;
    inlet.wait_ready(READY_TIMEOUT).await?;
    let addr = inlet.local_addr().unwrap();
    Ok((relay, echo, vec![inlet, outlet], addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_quiet_tunnels_only() -> Result<()> {
    assert_eq!(
        Timeouts::default().tunnel_idle,
        None,
        "the idle timeout must be off by default"
    );
    let idle = Duration::from_secs(1);
    let (_relay, echo, nodes, addr) = idle_tunnel(Some(idle)).await?;

    let mut quiet = TcpStream::connect(addr).await?;
    echo_round(&mut quiet, b"then silence").await?;
    let last_byte = Instant::now();
    let mut busy = TcpStream::connect(addr).await?;
    let busy_task = tokio::spawn(async move {
        // A byte every 300 ms for 2.5 s: never idle for a whole second.
        for i in 0..8 {
            echo_round(&mut busy, format!("ping {i}").as_bytes()).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok::<_, anyhow::Error>(busy)
    });
    ended_within(&mut quiet, Duration::from_secs(4)).await?;
    let since_last = last_byte.elapsed();
    ensure!(
        since_last >= idle.mul_f64(0.9) && since_last < idle * 3,
        "the quiet tunnel ended {since_last:?} after its last byte (idle timeout {idle:?})"
    );
    // The target's side of the quiet tunnel was closed too.
    echo.next_end(Duration::from_secs(2))
        .await
        .context("the target's connection of the idle tunnel stayed open")?;
    let mut busy = busy_task.await??;
    echo_round(&mut busy, b"still here").await?;
    println!("quiet tunnel closed {since_last:?} after its last byte; the busy one survived");
    for node in nodes {
        node.shutdown().await;
    }

    // Without an idle timeout a quiet tunnel stays.
    let (_relay, _echo, nodes, addr) = idle_tunnel(None).await?;
    let mut quiet = TcpStream::connect(addr).await?;
    echo_round(&mut quiet, b"then silence").await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    echo_round(&mut quiet, b"still open").await?;
    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_drains_then_closes() -> Result<()> {
    // In-process: an inlet drains, the open tunnel finishes by itself, the
    // node stops long before the grace period.
    let (_relay, _echo, mut nodes, addr) = idle_tunnel(None).await?;
    let outlet = nodes.pop().unwrap();
    let inlet = nodes.pop().unwrap();
    let mut open = TcpStream::connect(addr).await?;
    echo_round(&mut open, b"before the drain").await?;
    let started = Instant::now();
    let draining = tokio::spawn(inlet.shutdown_gracefully(Duration::from_secs(20)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(
        TcpStream::connect(addr).await.is_err(),
        "a draining inlet still accepts new clients"
    );
    echo_round(&mut open, b"during the drain").await?;
    open.shutdown().await?;
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await?;
    tokio::time::timeout(Duration::from_secs(3), draining)
        .await
        .context("the inlet kept draining after its last tunnel ended")??;
    println!(
        "drained inlet stopped {:?} after the drain began",
        started.elapsed()
    );

    // In-process: an outlet drains: it leaves the relay at once, and its
    // open tunnel is closed when the grace period ends.
    let relay = TestRelay::start().await?;
    let echo = EchoServer::start().await?;
    let (outlet_id, inlet_id) = (Identity::generate(), Identity::generate());
    let mut o = Outlet::start(
        outlet_id.clone(),
        OutletConfig::new(
            relay.endpoint(),
            service("drain"),
            echo.target(),
            AllowList::new([inlet_id.identifier()]),
        ),
    )?;
    o.wait_ready(READY_TIMEOUT).await?;
    let mut i = Inlet::start(
        inlet_id,
        InletConfig::new(
            relay.endpoint(),
            service("drain"),
            support::net::any_loopback(),
            outlet_id.identifier(),
        ),
    )
    .await?;
    i.wait_ready(READY_TIMEOUT).await?;
    let iaddr = i.local_addr().unwrap();
    let mut held = TcpStream::connect(iaddr).await?;
    echo_round(&mut held, b"held across the drain").await?;
    let grace = Duration::from_secs(1);
    let started = Instant::now();
    let draining = tokio::spawn(o.shutdown_gracefully(grace));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The open one still works until the grace period ends…
    echo_round(&mut held, b"within the grace period").await?;
    // No new tunnels: the service left the relay (the inlet asks the relay
    // again for about 1.5 s in case the outlet comes back, then refuses).
    let refusal = tokio::spawn(refused_within(iaddr, Duration::from_secs(4)));
    // …and is then closed.
    let ended = ended_within(&mut held, Duration::from_secs(4)).await?;
    let at = started.elapsed();
    ensure!(
        at >= grace && at < grace + Duration::from_secs(2),
        "the held tunnel ended {at:?} after the drain began (grace {grace:?}, waited {ended:?})"
    );
    let refused = refusal.await??;
    ensure!(
        refused < Duration::from_secs(3),
        "a new client waited {refused:?}"
    );
    tokio::time::timeout(Duration::from_secs(3), draining).await??;
    i.shutdown().await;
    outlet.shutdown().await;

    // The binary: SIGTERM drains with --drain-grace, says so, and exits.
    let echo = EchoServer::start().await?;
    let mut stack = ProcStack::start(
        "127.0.0.1:0",
        &echo.addr.to_string(),
        &[],
        &[],
        &["--drain-grace", "1s"],
    )
    .await?;
    let mut held = TcpStream::connect(stack.inlet_addr).await?;
    echo_round(&mut held, b"held").await?;
    signal(stack.inlet.pid(), "-TERM")?;
    let started = Instant::now();
    stack
        .inlet
        .wait_for_stderr("draining", Duration::from_secs(2))
        .await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    ensure!(
        TcpStream::connect(stack.inlet_addr).await.is_err(),
        "the draining inlet process still accepts clients"
    );
    echo_round(&mut held, b"still served while draining").await?;
    ended_within(&mut held, Duration::from_secs(4)).await?;
    let status = stack.inlet.wait_exit(Duration::from_secs(4)).await?;
    let log = stack.inlet.stderr();
    ensure!(status.success(), "the inlet exited with {status}:\n{log}");
    ensure!(
        log.contains("grace period of 1s over: closing 1 tunnel(s)"),
        "the inlet did not say it closed the remaining tunnel:\n{log}"
    );
    println!(
        "inlet process drained and exited {:?} after SIGTERM",
        started.elapsed()
    );
    Ok(())
}

/// A client that connects while the outlet is still registering (a relay
/// just restarted, an outlet just started) is not turned away: the inlet
/// asks the relay again while the refusal is one that passes by itself
/// ("unknown service"), and the tunnel opens once the outlet is there. A
/// service that never appears is still refused, within the handshake
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_arriving_before_the_outlet_registers_gets_through() -> Result<()> {
    let relay = TestRelay::start().await?;
    let echo = EchoServer::start().await?;
    let outlet_id = Identity::generate();
    let inlet_id = Identity::generate();
    let mut inlet = support::net::TestNode::simple_inlet(
        inlet_id.clone(),
        relay.endpoint(),
        "late",
        outlet_id.identifier(),
    )
    .await?;
    inlet.wait_ready().await?;

    // The client connects first; the outlet registers 300 ms later.
    let addr = inlet.addr();
    let client = tokio::spawn(async move {
        let mut conn = TcpStream::connect(addr).await?;
        echo_round(&mut conn, b"early bird").await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut outlet = support::net::TestNode::simple_outlet(
        outlet_id,
        relay.endpoint(),
        "late",
        echo.target(),
        &[inlet_id.identifier()],
    )?;
    outlet.wait_ready().await?;
    tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .context("the early client hung")??
        .context("the early client was turned away instead of waiting for the outlet")?;

    // A service nobody serves is still refused, and not forever.
    let mut config = InletConfig::new(
        relay.endpoint(),
        service("nobody-serves-this"),
        support::net::any_loopback(),
        Identity::generate().identifier(),
    );
    config.timeouts.handshake = Duration::from_secs(3);
    let started = Instant::now();
    let err = postern_node::check(Identity::generate(), &config)
        .await
        .err()
        .context("a check of a service nobody serves succeeded")?;
    ensure!(
        err.to_string().contains("nobody-serves-this"),
        "unclear refusal: {err}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "the refusal took {:?}",
        started.elapsed()
    );
    Ok(())
}
