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

/// An admin withdraws an outlet's right to register by editing the relay's
/// policies: the relay re-decides the names live sessions hold (within
/// seconds, without a restart), so the outlet's service disappears and new
/// tunnels are refused, while an outlet still permitted keeps its name.
/// Without the re-decision the withdrawn outlet would keep serving until it
/// reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_withdraws_a_registration() -> Result<()> {
    use postern_node::{InletConfig, NodeStatus};
    use postern_policies::LivePolicies;
    use support::net::{any_loopback, service, TestNode, TestRelay};

    let echo = EchoServer::start().await?;
    let (kept_id, withdrawn_id, inlet_id) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let permit = |who: &Identity, name: &str| {
        format!(
            "permit(principal == Identity::\"{}\", action == Action::\"register\", resource == Service::\"{name}\");\n",
            who.identifier()
        )
    };
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("register.cedar");
    std::fs::write(
        &file,
        permit(&kept_id, "kept") + &permit(&withdrawn_id, "withdrawn"),
    )?;
    let policies = std::sync::Arc::new(LivePolicies::load(dir.path())?);
    let relay =
        TestRelay::start_with(Identity::generate(), |c| c.policies = Some(policies)).await?;

    let mut outlets = Vec::new();
    for (id, name) in [(&kept_id, "kept"), (&withdrawn_id, "withdrawn")] {
        let mut outlet = TestNode::simple_outlet(
            id.clone(),
            relay.endpoint(),
            name,
            echo.target(),
            &[inlet_id.identifier()],
        )?;
        outlet.wait_ready().await?;
        outlets.push(outlet);
    }
    let check = |name: &str, outlet: &Identity| {
        let config = InletConfig::new(
            relay.endpoint(),
            service(name),
            any_loopback(),
            outlet.identifier(),
        );
        let inlet_id = inlet_id.clone();
        async move { postern_node::check(inlet_id, &config).await }
    };
    check("withdrawn", &withdrawn_id)
        .await
        .context("before the reload")?;

    // The admin keeps only the first permit; the relay reloads within a
    // second and re-decides.
    std::fs::write(&file, permit(&kept_id, "kept"))?;
    let started = Instant::now();
    loop {
        if check("withdrawn", &withdrawn_id).await.is_err() {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the withdrawn outlet still serves 10 s after the policy reload"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The outlet is told, and says it needs an admin.
    let withdrawn = &outlets[1];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(withdrawn.handle().status(), NodeStatus::Refused(_)) {
        ensure!(
            Instant::now() < deadline,
            "the withdrawn outlet's status is {}",
            withdrawn.status_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The legitimate outlet is untouched.
    check("kept", &kept_id)
        .await
        .context("the outlet still permitted lost its name")?;
    Ok(())
}

/// An attacker with valid identities (one per connection, as anyone can
/// make) opening authenticated hop sessions from one address holds at most
/// `--max-connections-per-source` of them: the rest are refused at accept,
/// and nodes from other addresses still connect and carry data. Without the
/// per-source cap the attacker's sessions would count against the global
/// limit only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_sessions_from_one_address_are_capped() -> Result<()> {
    let (_home, relay, endpoint) = relay_process(&[
        "--max-connections",
        "64",
        "--max-connections-per-source",
        "16",
    ])
    .await?;
    let addr: SocketAddr = endpoint.address.parse()?;
    let attacker_ip: std::net::IpAddr = "127.0.0.2".parse()?;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let attempt = RawHop::connect_from(
            Some(attacker_ip),
            addr,
            endpoint.identifier,
            Identity::generate(),
            Hello::default(),
        );
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(hop)) => held.push(hop),
            Ok(Err(_)) | Err(_) => refused += 1,
        }
    }
    // Sessions the relay accepted are live: each answers a ping.
    let mut live = 0;
    for hop in &mut held {
        if hop.send(&Control::Ping { seq: 7 }).await.is_ok()
            && matches!(
                tokio::time::timeout(Duration::from_secs(2), hop.recv()).await,
                Ok(Some(Control::Pong { .. }))
            )
        {
            live += 1;
        }
    }
    ensure!(
        live <= 16 && refused >= 24,
        "one address holds {live} live sessions ({refused} refused); the cap is 16"
    );

    // Another address is not affected: 64 slots, 16 taken.
    let echo = EchoServer::start().await?;
    let (_outlet, inlet) = echo_nodes(&endpoint, &echo, |_| {}, |_| {}).await?;
    let mut client = TcpStream::connect(inlet.addr()).await?;
    echo_round(&mut client, b"past the crowd").await?;
    ensure!(
        relay.stderr().contains("max_connections_per_source"),
        "the relay did not say why it refused"
    );
    Ok(())
}
