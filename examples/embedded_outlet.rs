//! A service that embeds a Postern outlet in its own process.
//!
//! The "service" here is a tiny line-echo server on a loopback port that no
//! other machine can reach. A few lines start an outlet that publishes it as
//! the service `echo` at a relay; inlets whose identifiers are allowed can then
//! reach it from anywhere, and nothing else can.
//!
//! Run it against a relay:
//!
//! ```text
//! POSTERN_RELAY=127.0.0.1:4000 POSTERN_RELAY_IDENTITY=P… \
//! POSTERN_IDENTITY_FILE=~/.postern/identities/svc.key POSTERN_ALLOW=P… \
//!     cargo run --example embedded_outlet
//! ```
//!
//! It prints `ready` once the service is registered and stops cleanly on
//! Ctrl-C or SIGTERM.
//!
//! With an authority, set `POSTERN_TRUST_AUTHORITY=P…` (or `P…@SERVICE`;
//! comma-separated for several) and, if the service enrolled,
//! `POSTERN_CREDENTIAL_FILE=~/.postern/credentials/svc.cred`. The library
//! then does what `postern outlet --trust-authority` does, with no code
//! here: it follows each authority's revocations over its relay connection,
//! closes the tunnels of revoked identities, refuses new tunnels while it
//! cannot vouch for current revocations (`--max-revocation-staleness`,
//! default 2 minutes), presents the credential and renews it before it
//! expires, saving each new one to the file.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use std::sync::Arc;

use postern_identity::credential::SignedCredential;
use postern_node::{Outlet, OutletConfig, RelayEndpoint, Target, Trust, TrustAnchor};
use postern_policies::AllowList;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

fn env(name: &str) -> Result<String> {
    std::env::var(name)
        .with_context(|| format!("set {name} (see the comment at the top of this example)"))
}

// `pub(crate)`: tests/embedded_example.rs runs this very function.
#[tokio::main]
pub(crate) async fn main() -> Result<()> {
    // The service's own business: an echo server, on loopback only.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let internal = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("echo: {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });

    // The embedded outlet: an identity, a relay to pin, a name, a target, who may connect.
    let identity = postern_identity::keyfile::load(env("POSTERN_IDENTITY_FILE")?.as_ref())?;
    let relay = RelayEndpoint::new(
        env("POSTERN_RELAY")?,
        env("POSTERN_RELAY_IDENTITY")?.parse()?,
    );
    let allow = env("POSTERN_ALLOW")?
        .split(',')
        .map(|id| id.trim().parse())
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = OutletConfig::new(
        relay,
        "echo".parse()?,
        Target::Tcp(internal.to_string()),
        AllowList::new(allow),
    );
    // Optional: the authorities whose revocations (and credentials) count.
    if let Ok(anchors) = std::env::var("POSTERN_TRUST_AUTHORITY") {
        let anchors = anchors
            .split(',')
            .map(|a| a.trim().parse::<TrustAnchor>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("POSTERN_TRUST_AUTHORITY: {e}"))?;
        let mut trust = Trust::with_anchors(anchors);
        if let Ok(path) = std::env::var("POSTERN_CREDENTIAL_FILE") {
            let bytes = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
            let credential = SignedCredential::decode(&bytes)
                .with_context(|| format!("{path} is not a Postern credential"))?;
            trust = trust.with_credential(credential);
            config.credential_file = Some(path.into());
        }
        config.trust = Arc::new(trust);
    }
    let mut outlet = Outlet::start(identity, config)?;
    outlet
        .wait_ready(std::time::Duration::from_secs(30))
        .await?;
    println!("ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    outlet.shutdown().await;
    println!("stopped");
    Ok(())
}
