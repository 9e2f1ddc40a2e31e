//! Revocation that fails closed, attacked with real processes and through
//! the library:
//!
//! - two authorities: a revocation by either closes the live tunnel of the
//!   identity it names within 5 s, even when the other authority's log is
//!   longer (one cursor per authority);
//! - an authority's feed down past the staleness bound: new tunnels are
//!   refused with a message naming the authority, and served again when it
//!   is back;
//! - squatting an authority's name while it is away is refused by the relay;
//! - a revoked outlet that reconnects without its credential is refused at
//!   the relay;
//! - an outlet embedded through the library alone (no binary) closes a
//!   revoked inlet's live tunnel;
//! - an inlet closes its live tunnel to an outlet that gets revoked (the
//!   relay never cuts a splice and a revoked outlet would not close its own
//!   tunnels), and opens no new one to it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use postern_identity::credential::Kind;
use postern_identity::time::unix_now;
use postern_identity::wire::{Control, Hello, RefusalCode, ServiceName};
use postern_identity::{keyfile, AttrValue, Identifier, Identity};
use postern_node::{InletConfig, OutletConfig, Trust};
use postern_policies::AllowList;
use support::authority::TestAuthority;
use support::net::{
    any_loopback, echo_round, relay_identifier_from, service, EchoServer, PosternHome,
    PosternProcess, TestNode, TestRelay,
};
use support::raw::RawHop;
use tokio::net::TcpStream;

const STARTUP: Duration = Duration::from_secs(20);

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A relay process trusting `authorities`, with `extra` flags.
async fn relay(
    home: &PosternHome,
    authorities: &[Identifier],
    extra: &[&str],
) -> Result<(PosternProcess, String, String)> {
    let trust: Vec<String> = authorities.iter().map(ToString::to_string).collect();
    let mut args = vec!["relay", "--identity", "relay", "--listen", "127.0.0.1:0"];
    for id in &trust {
        args.extend(["--trust-authority", id.as_str()]);
    }
    args.extend_from_slice(extra);
    let mut relay = home.spawn(&args)?;
    let addr = relay.wait_for_addr("listening on").await?.to_string();
    let id = relay_identifier_from(&relay.stderr())?.to_string();
    Ok((relay, addr, id))
}

/// `postern authority run` for identity `name` behind the relay.
async fn authority(
    home: &PosternHome,
    name: &str,
    relay: &(String, String),
) -> Result<PosternProcess> {
    let mut process = home.spawn(&[
        "authority",
        "run",
        "--identity",
        name,
        "--relay",
        &relay.0,
        "--relay-identity",
        &relay.1,
    ])?;
    process
        .wait_for_stderr("authority registered at relay", STARTUP)
        .await?;
    Ok(process)
}

/// Enrolls identity `who` with a one-use ticket from authority `name`.
fn enroll(home: &PosternHome, name: &str, who: &str, relay: &(String, String)) -> Result<()> {
    let out = home.run(&[
        "authority",
        "ticket",
        "--identity",
        name,
        "--attr",
        "role=analyst",
        "--relay",
        &relay.0,
        "--relay-identity",
        &relay.1,
    ])?;
    ensure!(out.status.success(), "ticket: {}", stderr_of(&out));
    let ticket = stdout_of(&out).trim().to_owned();
    let out = home.enroll_with_ticket(&ticket, &["--identity", who])?;
    ensure!(out.status.success(), "enroll {who}: {}", stderr_of(&out));
    Ok(())
}

fn revoke(home: &PosternHome, authority: &str, target: &Identifier) -> Result<()> {
    let out = home.run(&[
        "authority",
        "revoke",
        "--identity",
        authority,
        &target.to_string(),
    ])?;
    ensure!(out.status.success(), "revoke: {}", stderr_of(&out));
    Ok(())
}

/// Waits until an echo round through `stream` fails (the tunnel was
/// closed), up to `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if echo_round(stream, b"still there?").await.is_err() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn inlet_args<'a>(
    who: &'a str,
    relay: &'a (String, String),
    outlet: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "inlet",
        "--identity",
        who,
        "--relay",
        &relay.0,
        "--relay-identity",
        &relay.1,
        "--service",
        "db",
        "--outlet-identity",
        outlet,
    ];
    args.extend_from_slice(extra);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorities_each_revocation_closes_its_live_tunnel() -> Result<()> {
    let echo = EchoServer::start().await?;
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let a = home.create_identity("authority-a")?;
    let b = home.create_identity("authority-b")?;
    let outlet_id = home.create_identity("outlet")?.to_string();
    let (_relay, relay_addr, relay_id) = relay(&home, &[a, b], &[]).await?;
    let route = (relay_addr, relay_id);
    let _auth_a = authority(&home, "authority-a", &route).await?;
    let _auth_b = authority(&home, "authority-b", &route).await?;
    enroll(&home, "authority-a", "alice", &route)?;
    enroll(&home, "authority-b", "bob", &route)?;

    let (a_text, b_text) = (a.to_string(), b.to_string());
    let target = echo.target().to_string();
    let mut outlet = home.spawn(&[
        "outlet",
        "--identity",
        "outlet",
        "--relay",
        &route.0,
        "--relay-identity",
        &route.1,
        "--service",
        "db",
        "--target",
        &target,
        "--trust-authority",
        &a_text,
        "--trust-authority",
        &b_text,
        "--allow-attr",
        "role=analyst",
    ])?;
    outlet
        .wait_for_stderr("service registered at relay", STARTUP)
        .await?;
    let mut tunnels = Vec::new();
    for who in ["alice", "bob"] {
        let args = inlet_args(who, &route, &outlet_id, &["--listen", "127.0.0.1:0"]);
        let mut inlet = home.spawn(&args)?;
        let addr = inlet.wait_for_addr("listening on").await?;
        let mut stream = TcpStream::connect(addr).await?;
        echo_round(&mut stream, format!("{who} is in").as_bytes())
            .await
            .with_context(|| format!("{who} could not connect:\n{}", outlet.stderr()))?;
        tunnels.push((inlet, stream));
    }
    let id_of = |name: &str| -> Result<Identifier> {
        Ok(keyfile::load(&home.key_path(name))?.identifier())
    };
    let (alice, bob) = (id_of("alice")?, id_of("bob")?);

    // Authority A's log grows longer than B's before B revokes anything: a
    // single cursor for both would skip B's entry #1.
    for _ in 0..3 {
        revoke(&home, "authority-a", &Identity::generate().identifier())?;
    }
    revoke(&home, "authority-a", &alice)?;
    let closed = closed_within(&mut tunnels[0].1, Duration::from_secs(5))
        .await
        .context("A revoked alice, and her live tunnel stayed open for more than 5 s")?;
    println!("alice's tunnel closed {closed:?} after A's revocation");
    echo_round(&mut tunnels[1].1, b"bob unaffected").await?;

    revoke(&home, "authority-b", &bob)?;
    let closed = closed_within(&mut tunnels[1].1, Duration::from_secs(5))
        .await
        .context("B revoked bob, and his live tunnel stayed open for more than 5 s (B's feed not followed, or its entry skipped)")?;
    println!("bob's tunnel closed {closed:?} after B's revocation");

    // New tunnels are refused too, saying so.
    for who in ["alice", "bob"] {
        let out = home.run(&inlet_args(who, &route, &outlet_id, &["--check"]))?;
        ensure!(!out.status.success(), "{who} was admitted after revocation");
        let err = stderr_of(&out);
        ensure!(err.contains("revoked"), "unclear refusal for {who}: {err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_down_past_the_bound_refuses_new_tunnels_naming_the_authority() -> Result<()> {
    let echo = EchoServer::start().await?;
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let a = home.create_identity("authority")?;
    let outlet_id = home.create_identity("outlet")?.to_string();
    let (_relay, relay_addr, relay_id) = relay(&home, &[a], &[]).await?;
    let route = (relay_addr, relay_id);
    let mut auth = authority(&home, "authority", &route).await?;
    enroll(&home, "authority", "alice", &route)?;
    let a_text = a.to_string();
    let target = echo.target().to_string();
    let mut outlet = home.spawn(&[
        "outlet",
        "--identity",
        "outlet",
        "--relay",
        &route.0,
        "--relay-identity",
        &route.1,
        "--service",
        "db",
        "--target",
        &target,
        "--trust-authority",
        &a_text,
        "--allow-attr",
        "role=analyst",
        "--max-revocation-staleness",
        "3s",
    ])?;
    outlet
        .wait_for_stderr("service registered at relay", STARTUP)
        .await?;
    let check = inlet_args("alice", &route, &outlet_id, &["--check"]);
    let out = home.run(&check)?;
    ensure!(
        out.status.success(),
        "alice refused while all is well: {}",
        stderr_of(&out)
    );

    // The authority goes away (or a hostile relay stops its feed).
    auth.kill();
    outlet
        .wait_for_stderr("too stale", Duration::from_secs(10))
        .await
        .context("the outlet never said its revocations were too stale")?;
    let out = home.run(&check)?;
    ensure!(
        !out.status.success(),
        "a new tunnel was admitted with a dead feed"
    );
    let err = stderr_of(&out);
    ensure!(
        err.contains(&a_text) && err.contains("revocations"),
        "the refusal does not name the authority: {err}"
    );
    ensure!(
        outlet.stderr().contains("old (its feed is down)"),
        "no warning before refusing:\n{}",
        outlet.stderr()
    );

    // Back again: served again.
    let _auth = authority(&home, "authority", &route).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = home.run(&check)?;
        if out.status.success() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "still refused after the authority came back: {}",
                stderr_of(&out)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squatting_an_authority_name_is_refused() -> Result<()> {
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let a = home.create_identity("authority")?;
    let (_relay, relay_addr, relay_id) = relay(&home, &[a], &[]).await?;
    let addr: SocketAddr = relay_addr.parse()?;
    // While the authority is away, a stranger tries its names.
    let mut squatter = RawHop::connect(
        addr,
        relay_id.parse()?,
        Identity::generate(),
        Hello::default(),
    )
    .await?;
    for name in [
        ServiceName::of_authority(&a),
        postern_identity::ticket::DEFAULT_AUTHORITY_SERVICE.parse()?,
    ] {
        squatter
            .send(&Control::Register {
                service: name.clone(),
            })
            .await?;
        match squatter.recv().await {
            Some(Control::RegisterRefused { code, reason, .. }) => {
                ensure!(code == RefusalCode::Denied, "{code:?}: {reason}");
                ensure!(reason.contains("reserved"), "{reason}");
            }
            other => bail!("the stranger got {name}: {other:?}"),
        }
    }
    // The authority then registers its name.
    let route = (relay_addr, relay_id);
    let _auth = authority(&home, "authority", &route).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_outlet_without_its_credential_is_refused_at_the_relay() -> Result<()> {
    let echo = EchoServer::start().await?;
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let a = home.create_identity("authority")?;
    let (_relay, relay_addr, relay_id) = relay(&home, &[a], &[]).await?;
    let route = (relay_addr, relay_id);
    let _auth = authority(&home, "authority", &route).await?;
    home.create_identity("outlet")?;
    enroll(&home, "authority", "outlet", &route)?;
    let target = echo.target().to_string();
    let mut outlet = home.spawn(&[
        "outlet",
        "--identity",
        "outlet",
        "--relay",
        &route.0,
        "--relay-identity",
        &route.1,
        "--service",
        "db",
        "--target",
        &target,
    ])?;
    outlet
        .wait_for_stderr("service registered at relay", STARTUP)
        .await?;
    let outlet_key = keyfile::load(&home.key_path("outlet"))?;
    revoke(&home, "authority", &outlet_key.identifier())?;
    outlet
        .wait_for_stderr("the relay refused this outlet", Duration::from_secs(8))
        .await
        .context("the relay kept the revoked outlet")?;
    outlet.kill();

    // The same identity, presenting no credential at all (the review's
    // bypass), is refused at once and registers nothing.
    let mut again = RawHop::connect(
        route.0.parse()?,
        route.1.parse()?,
        outlet_key,
        Hello::default(),
    )
    .await?;
    match again.recv().await {
        Some(Control::Goodbye { code, reason }) => {
            ensure!(code == RefusalCode::Denied, "{code:?}");
            ensure!(reason.contains("revoked"), "{reason}");
        }
        other => bail!("the revoked outlet was not refused: {other:?}"),
    }
    ensure!(again.recv().await.is_none(), "the channel stayed open");
    // Someone else still registers.
    let mut other = RawHop::connect(
        route.0.parse()?,
        route.1.parse()?,
        Identity::generate(),
        Hello::default(),
    )
    .await?;
    other
        .send(&Control::Register {
            service: "db".parse()?,
        })
        .await?;
    ensure!(
        matches!(other.recv().await, Some(Control::Registered { .. })),
        "the name was not free after the revoked outlet was refused"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_outlet_closes_a_revoked_tunnel() -> Result<()> {
    // Everything through the library: relay, authority, outlet, inlets.
    let echo = EchoServer::start().await?;
    let relay = TestRelay::start().await?;
    let authority = TestAuthority::start(&relay, |s| s).await?;
    let trust = || Trust::new([authority.identifier()].into_iter().collect());
    let outlet_identity = Identity::generate();
    let outlet_id = outlet_identity.identifier();
    let mut config = OutletConfig::new(
        relay.endpoint(),
        service("db"),
        echo.target(),
        AllowList::default(),
    );
    config.allow_attributes = vec!["role=analyst".parse().map_err(anyhow::Error::msg)?];
    config.trust = Arc::new(trust());
    let mut outlet = TestNode::outlet(outlet_identity, config)?;
    outlet.wait_ready().await?;

    let mut inlets = Vec::new();
    for _ in 0..2 {
        let identity = Identity::generate();
        let who = identity.identifier();
        let attrs = [("role".to_owned(), AttrValue::One("analyst".into()))]
            .into_iter()
            .collect();
        authority.authority.add_member(
            who,
            Kind::Person,
            attrs,
            postern_authority::MemberSource::Admin,
            unix_now(),
        )?;
        let credential = authority.authority.issue_for_member(who, unix_now())?;
        let mut config =
            InletConfig::new(relay.endpoint(), service("db"), any_loopback(), outlet_id);
        config.trust = Arc::new(trust().with_credential(credential));
        let mut node = TestNode::inlet(identity, config).await?;
        node.wait_ready().await?;
        let mut stream = TcpStream::connect(node.addr()).await?;
        echo_round(&mut stream, b"hello").await?;
        inlets.push((node, who, stream));
    }
    authority.revoke(inlets[0].1)?;
    let closed = closed_within(&mut inlets[0].2, Duration::from_secs(5))
        .await
        .context("the embedded outlet kept a revoked inlet's tunnel open for more than 5 s")?;
    println!("the revoked tunnel closed after {closed:?}");
    echo_round(&mut inlets[1].2, b"the other inlet is unaffected").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inlet_closes_its_tunnel_to_a_revoked_outlet() -> Result<()> {
    // The outlet is the compromised party: its key leaked, the admin
    // revokes it. It keeps its end of every open tunnel (it is the
    // attacker's now); only the inlets can end them.
    let echo = EchoServer::start().await?;
    let relay = TestRelay::start().await?;
    let authority = TestAuthority::start(&relay, |s| s).await?;
    let trust = || Trust::new([authority.identifier()].into_iter().collect());

    let mut outlets = Vec::new();
    for name in ["db", "other"] {
        let identity = Identity::generate();
        let id = identity.identifier();
        let mut config = OutletConfig::new(
            relay.endpoint(),
            service(name),
            echo.target(),
            AllowList::default(),
        );
        // An outlet that ignores revocations (it trusts no authority), as
        // a compromised one would.
        let inlet_identity = Identity::generate();
        config.allow = AllowList::new([inlet_identity.identifier()]);
        let mut outlet = TestNode::outlet(identity, config)?;
        outlet.wait_ready().await?;
        let mut config = InletConfig::new(relay.endpoint(), service(name), any_loopback(), id);
        config.trust = Arc::new(trust());
        let mut inlet = TestNode::inlet(inlet_identity, config).await?;
        inlet.wait_ready().await?;
        let mut stream = TcpStream::connect(inlet.addr()).await?;
        echo_round(&mut stream, b"hello").await?;
        outlets.push((outlet, id, inlet, stream));
    }
    authority.revoke(outlets[0].1)?;
    let closed = closed_within(&mut outlets[0].3, Duration::from_secs(5))
        .await
        .context("the inlet kept its tunnel to a revoked outlet open for more than 5 s")?;
    println!("the tunnel to the revoked outlet closed after {closed:?}");
    // No new tunnel to it either (the relay may still hold its name: this
    // outlet presents no credential, and this relay trusts no authority).
    // (The inlet may reset the client before `connect` even returns.)
    if let Ok(mut again) = TcpStream::connect(outlets[0].2.addr()).await {
        ensure!(
            echo_round(&mut again, b"anyone?").await.is_err(),
            "a new tunnel to the revoked outlet carried data"
        );
    }
    echo_round(&mut outlets[1].3, b"the other outlet is unaffected")
        .await
        .context("the tunnel to the other outlet")?;
    Ok(())
}
