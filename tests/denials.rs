//! Denials, and that the person refused learns why:
//!
//! - an inlet identity not on the outlet's allow list is refused: by
//!   `postern_node::check`, by `postern inlet --check`, and for a real
//!   client of a running `postern inlet` (whose log says why);
//! - an inlet pinned to another outlet identifier refuses the outlet;
//! - a relay impersonator (another identity at the relay's address) is
//!   refused by outlets and inlets;
//! - an unknown service is reported as such, quickly.
//!
//! Each refusal sits next to the matching success, so that a test cannot
//! pass just because nothing works.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use postern_identity::{keyfile, Identity};
use postern_node::{check, InletConfig, NodeError, NodeStatus, Target};
use support::net::{any_loopback, service, PosternHome, TestNode, TestRelay};
use support::pg::TempPg;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest a refusal may take to reach the user.
const PROMPT: Duration = Duration::from_secs(5);

fn inlet_config(
    relay: &TestRelay,
    service_name: &str,
    outlet: postern_identity::Identifier,
) -> InletConfig {
    InletConfig::new(
        relay.endpoint(),
        service(service_name),
        any_loopback(),
        outlet,
    )
}

/// Flags of `postern inlet` for `service` at `relay`, expecting `outlet`.
fn inlet_flags(relay: &TestRelay, service: &str, outlet: &str) -> Vec<String> {
    [
        "inlet",
        "--relay",
        &relay.addr.to_string(),
        "--relay-identity",
        &relay.identifier.to_string(),
        "--service",
        service,
        "--outlet-identity",
        outlet,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A client connection to an inlet that is refused ends promptly (it is
/// reset or closed, never left hanging).
async fn assert_connection_refused_promptly(addr: std::net::SocketAddr) -> Result<()> {
    let mut conn = match TcpStream::connect(addr).await {
        Ok(conn) => conn,
        // Reset so promptly that the connect call itself saw it.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(PROMPT, conn.read(&mut buf))
        .await
        .context("a refused client connection was left hanging")?;
    ensure!(
        matches!(read, Ok(0) | Err(_)),
        "a refused connection returned data: {read:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_not_on_allow_list_is_refused_and_told_why() -> Result<()> {
    let pg = TempPg::start_async().await?;
    let home = PosternHome::new()?;
    let allowed_id = home.create_identity("allowed")?;
    let stranger_id = home.create_identity("stranger")?;
    let allowed = keyfile::load(&home.key_path("allowed"))?;
    let stranger = keyfile::load(&home.key_path("stranger"))?;

    let relay = TestRelay::start().await?;
    let mut outlet = TestNode::simple_outlet(
        Identity::generate(),
        relay.endpoint(),
        "db",
        Target::Tcp(pg.addr().to_string()),
        &[allowed_id],
    )?;
    outlet.wait_ready().await?;
    let config = inlet_config(&relay, "db", outlet.identifier);

    // The library: allowed passes, the stranger is denied with the reason.
    let report = check(allowed, &config).await?;
    ensure!(report.outlet == outlet.identifier);
    let err = check(stranger, &config)
        .await
        .expect_err("an identity not on the allow list must be refused");
    ensure!(
        matches!(err, NodeError::Denied { .. }),
        "wrong error: {err:?}"
    );
    let text = err.to_string();
    ensure!(
        text.contains("denied")
            && text.contains("not on the allow list")
            && text.contains(&stranger_id.to_string())
            && text.contains(&outlet.identifier.to_string()),
        "the denial does not say why: {text}"
    );

    // The binary, `--check`: exit status and message.
    let mut flags = inlet_flags(&relay, "db", &outlet.identifier.to_string());
    flags.push("--check".into());
    let mut ok_flags = flags.clone();
    ok_flags.extend(["--identity".into(), "allowed".into()]);
    let out = home.run(&strs(&ok_flags))?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ok:"),
        "the allowed identity failed its check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    flags.extend(["--identity".into(), "stranger".into()]);
    let out = home.run(&strs(&flags))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "--check succeeded for a stranger");
    ensure!(
        stderr.contains("denied")
            && stderr.contains("not on the allow list")
            && stderr.contains(&format!("--allow {stranger_id}")),
        "--check does not say why it was refused:\n{stderr}"
    );
    ensure!(!stderr.contains("panicked"), "{stderr}");

    // A running inlet process: the client fails, the log says why. The
    // allowed identity's inlet works, so the failure is the denial.
    let mut serve = inlet_flags(&relay, "db", &outlet.identifier.to_string());
    serve.extend(["--listen".into(), "127.0.0.1:0".into()]);
    let mut good_flags = serve.clone();
    good_flags.extend(["--identity".into(), "allowed".into()]);
    let mut good = home.spawn(&strs(&good_flags))?;
    let good_addr = good.wait_for_addr("listening on").await?;
    good.wait_for_stderr("connected to relay", PROMPT).await?;
    let client = TempPg::connect_to("127.0.0.1", good_addr.port()).await?;
    let one: i32 = client.query_one("select 1", &[]).await?.get(0);
    ensure!(one == 1);

    serve.extend(["--identity".into(), "stranger".into()]);
    let mut bad = home.spawn(&strs(&serve))?;
    let bad_addr = bad.wait_for_addr("listening on").await?;
    bad.wait_for_stderr("connected to relay", PROMPT).await?;
    let started = Instant::now();
    let attempt = tokio::time::timeout(PROMPT, TempPg::connect_to("127.0.0.1", bad_addr.port()))
        .await
        .context("a denied client was left hanging")?;
    ensure!(attempt.is_err(), "a denied client got a database session");
    ensure!(started.elapsed() < PROMPT);
    let log = bad.wait_for_stderr("denied", PROMPT).await?;
    ensure!(
        log.contains("not on the allow list"),
        "the inlet's log does not say why:\n{log}"
    );
    ensure!(bad.is_running(), "the inlet exited after one denied client");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inlet_refuses_an_unexpected_outlet() -> Result<()> {
    let relay = TestRelay::start().await?;
    let echo = support::net::EchoServer::start().await?;
    let inlet_identity = Identity::generate();
    let mut outlet = TestNode::simple_outlet(
        Identity::generate(),
        relay.endpoint(),
        "svc",
        echo.target(),
        &[inlet_identity.identifier()],
    )?;
    outlet.wait_ready().await?;

    // Pinned correctly: admitted, and the outlet connects to its target.
    check(
        inlet_identity.clone(),
        &inlet_config(&relay, "svc", outlet.identifier),
    )
    .await?;
    echo.next_end(PROMPT)
        .await
        .context("the admitted check never reached the target")?;

    // Pinned to someone else: the real outlet is refused.
    let expected = Identity::generate().identifier();
    let err = check(
        inlet_identity.clone(),
        &inlet_config(&relay, "svc", expected),
    )
    .await
    .expect_err("an unexpected outlet must be refused");
    match &err {
        NodeError::WrongOutlet {
            expected: e,
            actual,
            ..
        } => ensure!(*e == expected && *actual == outlet.identifier, "{err}"),
        other => anyhow::bail!("wrong error: {other:?}"),
    }
    ensure!(err.to_string().contains("--outlet-identity"), "{err}");

    // A running inlet pinned wrongly refuses its clients promptly and never
    // lets a byte reach the target.
    let mut inlet = TestNode::inlet(inlet_identity, inlet_config(&relay, "svc", expected)).await?;
    inlet.wait_ready().await?;
    assert_connection_refused_promptly(inlet.addr()).await?;
    ensure!(
        echo.next_end(Duration::from_millis(300)).await.is_none(),
        "the target was reached through an outlet the inlet refused"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_impersonator_is_refused_by_outlets_and_inlets() -> Result<()> {
    let real = TestRelay::start().await?;
    let impostor = TestRelay::start().await?;
    ensure!(real.identifier != impostor.identifier);
    // Nodes pin the real relay's identifier but dial the impostor.
    let spoofed = real.endpoint_via(impostor.addr);
    let echo = support::net::EchoServer::start().await?;
    let inlet_identity = Identity::generate();
    let outlet_identity = Identity::generate();

    let outlet = TestNode::simple_outlet(
        outlet_identity.clone(),
        spoofed.clone(),
        "svc",
        echo.target(),
        &[inlet_identity.identifier()],
    )?;
    let mut status = outlet.handle().watch_status();
    // Reduced to a bool at once: a held `watch::Ref` would block the node's
    // next status update (a write lock) and with it a runtime thread.
    let became_ready = tokio::time::timeout(
        Duration::from_secs(2),
        status.wait_for(|s| *s == NodeStatus::Ready),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    ensure!(!became_ready, "the outlet registered at an impostor relay");
    let text = outlet.status_text();
    ensure!(
        text.contains(&format!("proved identity {}", impostor.identifier))
            && text.contains(&format!("but {} was expected", real.identifier)),
        "the outlet's status does not say the relay identity mismatched: {text}"
    );
    // The impostor never learnt the service: nothing was registered there.
    let err = check(
        Identity::generate(),
        &InletConfig::new(
            impostor.endpoint(),
            service("svc"),
            any_loopback(),
            outlet.identifier,
        ),
    )
    .await
    .expect_err("the service must not be registered at the impostor");
    ensure!(err.to_string().contains("is not registered"), "{err}");

    // The same outlet identity, at the real relay, does become ready.
    let mut genuine = TestNode::simple_outlet(
        outlet_identity,
        real.endpoint(),
        "svc",
        echo.target(),
        &[inlet_identity.identifier()],
    )?;
    genuine.wait_ready().await?;

    // Inlets: `check` and a running inlet both refuse the impostor.
    let mut config = InletConfig::new(
        spoofed.clone(),
        service("svc"),
        any_loopback(),
        genuine.identifier,
    );
    let err = check(inlet_identity.clone(), &config)
        .await
        .expect_err("an inlet must refuse an impostor relay");
    match &err {
        NodeError::WrongRelay {
            expected, actual, ..
        } => ensure!(
            *expected == real.identifier && *actual == impostor.identifier,
            "{err}"
        ),
        other => anyhow::bail!("wrong error: {other:?}"),
    }
    ensure!(err.to_string().contains("--relay-identity"), "{err}");
    let inlet = TestNode::inlet(inlet_identity.clone(), config.clone()).await?;
    let mut status = inlet.handle().watch_status();
    let refused = tokio::time::timeout(
        PROMPT,
        status.wait_for(|s| matches!(s, NodeStatus::Disconnected(r) if r.contains("was expected"))),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    ensure!(
        refused,
        "the inlet's status never reported the mismatch: {}",
        inlet.status_text()
    );
    assert_connection_refused_promptly(inlet.addr()).await?;

    // …while the genuine relay works for the same inlet identity.
    config.relay = real.endpoint();
    let allow = inlet_identity.identifier().to_string();
    check(inlet_identity, &config).await?;

    // The real binary says so in its log.
    let home = PosternHome::new()?;
    home.create_identity("default")?;
    let mut process = home.spawn(&[
        "outlet",
        "--relay",
        &impostor.addr.to_string(),
        "--relay-identity",
        &real.identifier.to_string(),
        "--service",
        "svc",
        "--target",
        &echo.addr.to_string(),
        "--allow",
        &allow,
    ])?;
    let log = process.wait_for_stderr("was expected", PROMPT).await?;
    ensure!(
        log.contains(&impostor.identifier.to_string()) && !log.contains("service registered"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_is_reported_without_hanging() -> Result<()> {
    let relay = TestRelay::start().await?;
    let inlet_identity = Identity::generate();
    let outlet_id = Identity::generate().identifier();
    let config = inlet_config(&relay, "no-such-db", outlet_id);

    let started = Instant::now();
    let err = tokio::time::timeout(PROMPT, check(inlet_identity.clone(), &config))
        .await
        .context("check hung on an unknown service")?
        .expect_err("an unknown service must be refused");
    let text = err.to_string();
    ensure!(
        text.contains(&format!(
            "service \"no-such-db\" is not registered at relay {}",
            relay.identifier
        )),
        "{text}"
    );
    ensure!(started.elapsed() < PROMPT);

    // A running inlet closes its client promptly instead of hanging.
    let mut inlet = TestNode::inlet(inlet_identity, config).await?;
    inlet.wait_ready().await?;
    assert_connection_refused_promptly(inlet.addr()).await?;

    // The binary's message.
    let home = PosternHome::new()?;
    home.create_identity("default")?;
    let mut flags = inlet_flags(&relay, "no-such-db", &outlet_id.to_string());
    flags.push("--check".into());
    let started = Instant::now();
    let out = home.run(&strs(&flags))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success());
    ensure!(
        stderr.contains("\"no-such-db\" is not registered at relay"),
        "{stderr}"
    );
    ensure!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    Ok(())
}
