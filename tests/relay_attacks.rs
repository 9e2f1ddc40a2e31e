//! Attacks on the relay's resources, each against a real `postern relay`
//! process while a legitimate outlet and inlet (the library) keep working:
//!
//! - anonymous data connections (IK handshakes with keys no hop channel
//!   authenticated) hold no slot: every one is refused in the handshake;
//!   an authenticated identity keeps at most its spare allowance;
//! - an identity nobody admits floods `Open`s for a service: its tokens
//!   count against it, not against the outlet, so the legitimate inlet still
//!   gets its tunnel;
//! - one hop session registering 100,000 service names holds only the
//!   per-session allowance, and the relay's log stays short.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use postern_identity::handshake::LocalParty;
use postern_identity::wire::{Control, Hello, RefusalCode, ServiceName};
use postern_identity::Identity;
use support::net::{echo_nodes, echo_round, relay_process, EchoServer, SERVICE};
use support::procs::occurrences;
use support::raw::{raw_attach, RawHop};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_data_connections_hold_no_slot() -> Result<()> {
    // The review's set-up: 300 connection slots, 300 anonymous "spares"
    // from one address.
    let (_home, relay, endpoint) = relay_process(&["--max-connections", "300"]).await?;
    let addr: SocketAddr = endpoint.address.parse()?;
    let echo = EchoServer::start().await?;

    // Learning the relay's Noise key takes nothing but a hop handshake.
    let probe = RawHop::connect(
        addr,
        endpoint.identifier,
        Identity::generate(),
        Hello::default(),
    )
    .await?;
    let relay_static = probe.relay_static;
    drop(probe);

    let mut held: Vec<TcpStream> = Vec::new();
    let mut refused = 0;
    for _ in 0..300 {
        let stranger = LocalParty::new(Identity::generate())?;
        let (answer, stream) = raw_attach(addr, &relay_static, &stranger, true).await?;
        match answer {
            Ok(_) => held.push(stream),
            Err(refusal) => {
                ensure!(refusal.code == RefusalCode::Denied, "{refusal:?}");
                ensure!(refusal.reason.contains("no hop channel"), "{refusal:?}");
                refused += 1;
                held.push(stream);
            }
        }
    }
    ensure!(
        refused == 300,
        "{refused} of 300 anonymous data connections refused"
    );

    // The legitimate pair connects and carries data while the attacker
    // still holds every socket it opened.
    let (_outlet, inlet) = echo_nodes(&endpoint, &echo, |_| {}, |_| {}).await?;
    let mut client = TcpStream::connect(inlet.addr()).await?;
    echo_round(&mut client, b"through the flood").await?;

    // An authenticated identity gets its spare allowance and no more.
    let mut attacker = RawHop::connect(
        addr,
        endpoint.identifier,
        Identity::generate(),
        Hello::default(),
    )
    .await?;
    let (mut accepted, mut limited) = (0, 0);
    let mut spares = Vec::new();
    for _ in 0..20 {
        let (answer, stream) =
            raw_attach(addr, &attacker.relay_static, &attacker.local, true).await?;
        match answer {
            Ok(_) => accepted += 1,
            Err(refusal) if refusal.code == RefusalCode::Limit => limited += 1,
            Err(other) => anyhow::bail!("unexpected refusal {other:?}"),
        }
        spares.push(stream);
    }
    ensure!(
        (accepted, limited) == (8, 12),
        "spares accepted {accepted}, refused at the limit {limited}"
    );
    attacker.send(&Control::Ping { seq: 1 }).await?;
    echo_round(&mut client, b"still fine").await?;
    let log = relay.stderr();
    ensure!(
        occurrences(&log, "data connection handshake failed") < 50,
        "refusals are not rate-limited in the log:\n{log}"
    );
    drop(held);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_flood_from_a_stranger_does_not_lock_out_the_service() -> Result<()> {
    let (_home, _relay, endpoint) = relay_process(&["--max-tunnels-per-node", "64"]).await?;
    let addr: SocketAddr = endpoint.address.parse()?;
    let echo = EchoServer::start().await?;
    let (_outlet, inlet) = echo_nodes(&endpoint, &echo, |_| {}, |_| {}).await?;

    // An identity on no allow list asks for 1,024 tunnels to the service
    // and never attaches to any of them.
    let mut attacker = RawHop::connect(
        addr,
        endpoint.identifier,
        Identity::generate(),
        Hello::default(),
    )
    .await?;
    let service: ServiceName = SERVICE.parse()?;
    for request in 0..1024 {
        attacker
            .send(&Control::Open {
                request,
                service: service.clone(),
            })
            .await?;
    }
    let (mut opened, mut limited) = (0, 0);
    while opened + limited < 1024 {
        match tokio::time::timeout(Duration::from_secs(10), attacker.recv())
            .await
            .context("the relay stopped answering the flood")?
        {
            Some(Control::Opened { .. }) => opened += 1,
            Some(Control::OpenRefused { code, reason, .. }) => {
                ensure!(code == RefusalCode::Limit, "{code:?}: {reason}");
                ensure!(reason.contains("this node"), "{reason}");
                limited += 1;
            }
            Some(_) => {}
            None => anyhow::bail!("the relay closed the attacker's channel"),
        }
    }
    ensure!(
        (1..=64).contains(&opened),
        "the stranger got {opened} tokens; at most 64 expected"
    );

    // While those tokens are pending, the legitimate inlet's tunnels open.
    for round in 0..3 {
        let mut client = TcpStream::connect(inlet.addr()).await?;
        echo_round(&mut client, format!("legitimate {round}").as_bytes()).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_registering_100000_names_is_bounded() -> Result<()> {
    let (_home, relay, endpoint) = relay_process(&[]).await?;
    let addr: SocketAddr = endpoint.address.parse()?;
    let RawHop {
        mut inbox,
        mut outbox,
        ..
    } = RawHop::connect(
        addr,
        endpoint.identifier,
        Identity::generate(),
        Hello::default(),
    )
    .await?;
    const NAMES: usize = 100_000;
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let (mut registered, mut limited) = (0usize, 0usize);
        while registered + limited < NAMES {
            match inbox.recv().await {
                Ok(Control::Registered { .. }) => registered += 1,
                Ok(Control::RegisterRefused {
                    code: RefusalCode::Limit,
                    ..
                }) => limited += 1,
                Ok(other) => anyhow::bail!("unexpected {other:?}"),
                Err(e) => anyhow::bail!("channel ended after {registered}+{limited}: {e}"),
            }
        }
        Ok((registered, limited))
    });
    for i in 0..NAMES {
        outbox
            .send(&Control::Register {
                service: format!("squat-{i}").parse()?,
            })
            .await?;
    }
    let (registered, limited) = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .context("the relay did not answer every registration")???;
    ensure!(
        (registered, limited) == (64, NAMES - 64),
        "registered {registered}, refused {limited}"
    );
    let took = started.elapsed();
    eprintln!("{NAMES} registrations answered in {took:?}");
    // A legitimate outlet still registers and serves.
    let echo = EchoServer::start().await?;
    let (_outlet, inlet) = echo_nodes(&endpoint, &echo, |_| {}, |_| {}).await?;
    let mut client = TcpStream::connect(inlet.addr()).await?;
    echo_round(&mut client, b"after the squat").await?;
    let log = relay.stderr();
    let lines = log.lines().count();
    let allowed = 200 + 2 * usize::try_from(took.as_secs()).unwrap_or(usize::MAX);
    ensure!(
        lines < allowed,
        "{lines} log lines for one flood over {took:?}: refusals must be rate-limited"
    );
    Ok(())
}
