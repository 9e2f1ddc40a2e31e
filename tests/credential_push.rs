//! Credential refresh on live tunnels: an inlet whose credential is replaced
//! (as the node's renewal does before expiry) sends the new one through
//! every open tunnel, and the outlet keeps the tunnel open past the old
//! credential's expiry; a tunnel whose credential expires without renewal is
//! closed by the outlet within seconds, with the reason. A renewed
//! credential that is invalid (another subject) ends the tunnel too.

#![allow(clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use postern_identity::credential::{
    self, CredentialBody, CredentialId, Kind, SignedCredential, CLOCK_SKEW_SECS,
};
use postern_identity::{AttrValue, Identifier, Identity};
use postern_node::trust::unix_now;
use postern_node::{InletConfig, OutletConfig, Trust};
use postern_policies::AllowList;
use support::authority::TestAuthority;
use support::net::{any_loopback, echo_round, service, EchoServer, TestNode, TestRelay};
use tokio::net::TcpStream;

/// A credential for `subject` that expires (skew included) `left` seconds
/// from now.
fn credential(authority: &Identity, subject: Identifier, left: u64) -> SignedCredential {
    credential_as(authority, subject, left, "analyst")
}

/// Like [`credential`], with `role` as the role attribute.
fn credential_as(
    authority: &Identity,
    subject: Identifier,
    left: u64,
    role: &str,
) -> SignedCredential {
    let now = unix_now();
    let expires_at = (now + left).saturating_sub(CLOCK_SKEW_SECS);
    let body = CredentialBody {
        version: credential::CREDENTIAL_VERSION,
        id: CredentialId::random(),
        subject,
        issuer: authority.identifier(),
        kind: Kind::Person,
        attributes: [("role".to_owned(), AttrValue::One(role.into()))]
            .into_iter()
            .collect(),
        issued_at: expires_at.saturating_sub(3600),
        expires_at,
    };
    credential::issue(authority, &body).expect("issuing a test credential")
}

/// Waits until an echo round fails (the tunnel was closed), up to `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if echo_round(stream, b"still there?").await.is_err() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_credentials_keep_tunnels_and_expired_ones_close_them() -> Result<()> {
    let echo = EchoServer::start().await?;
    let relay = TestRelay::start().await?;
    let authority = Identity::generate();
    // Nodes that trust an authority follow its revocations: it runs.
    let _running = TestAuthority::start_as(authority.clone(), &relay, |s| s).await?;
    let trusted = || Trust::new([authority.identifier()].into_iter().collect());

    let outlet_identity = Identity::generate();
    let outlet_id = outlet_identity.identifier();
    let mut config = OutletConfig::new(
        relay.endpoint(),
        service("db"),
        echo.target(),
        AllowList::default(),
    );
    config.allow_attributes = vec!["role=analyst".parse().map_err(anyhow::Error::msg)?];
    config.trust = Arc::new(trusted());
    let mut outlet = TestNode::outlet(outlet_identity, config)?;
    outlet.wait_ready().await?;

    // Two analysts whose credentials run out in about four seconds.
    let mut inlets = Vec::new();
    for _ in 0..3 {
        let identity = Identity::generate();
        let subject = identity.identifier();
        let trust = Arc::new(trusted().with_credential(credential(&authority, subject, 4)));
        let mut config =
            InletConfig::new(relay.endpoint(), service("db"), any_loopback(), outlet_id);
        config.trust = Arc::clone(&trust);
        let mut node = TestNode::inlet(identity, config).await?;
        node.wait_ready().await?;
        let mut stream = TcpStream::connect(node.addr()).await?;
        echo_round(&mut stream, b"hello").await?;
        inlets.push((node, trust, subject, stream));
    }
    let [(_renewing_node, renewing_trust, renewing_id, renewing), (_expiring_node, _, _, expiring), (_demoted_node, demoted_trust, demoted_id, demoted)] =
        inlets.as_mut_slice()
    else {
        unreachable!()
    };
    // The third renews into a credential the outlet's rule does not admit.
    demoted_trust.set_credential(credential_as(&authority, *demoted_id, 3600, "intern"));
    let closed = closed_within(demoted, Duration::from_secs(5))
        .await
        .context("a renewal that no longer qualifies kept the tunnel open")?;
    println!("the demoted credential's tunnel closed after {closed:?}");

    // The first renews (a fresh credential, valid for an hour); the second
    // does not.
    renewing_trust.set_credential(credential(&authority, *renewing_id, 3600));
    let closed = closed_within(expiring, Duration::from_secs(9))
        .await
        .context("a tunnel outlived its expired credential by more than 9 s")?;
    println!("the tunnel of the expired credential closed after {closed:?}");
    echo_round(renewing, b"renewed and still open")
        .await
        .context("the renewed credential's tunnel was closed")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    echo_round(renewing, b"still open later").await?;

    // A "renewal" for somebody else is refused and ends the tunnel.
    let stranger = Identity::generate();
    renewing_trust.set_credential(credential(&authority, stranger.identifier(), 3600));
    let closed = closed_within(renewing, Duration::from_secs(5)).await;
    ensure!(
        closed.is_some(),
        "a credential for another subject was accepted as a renewal"
    );
    outlet.shutdown().await;
    Ok(())
}
