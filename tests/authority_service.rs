//! The authority service behind a real relay, in-process: bounded work
//! (a flood of revocation feeds from one identity is refused with a Limit
//! code while another identity enrolls), feeds that push a revocation made
//! through the admin endpoint at once, and heartbeats on a quiet feed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use postern_authority::admin::{AdminClient, AdminReply, AdminRequest};
use postern_authority::service::ServiceLimits;
use postern_authority::{EnrollmentRoute, TicketSpec};
use postern_identity::authority_wire::{AuthorityReply, AuthorityRequest};
use postern_identity::credential::{Kind, RevocationTarget};
use postern_identity::handshake::LocalParty;
use postern_identity::time::unix_now;
use postern_identity::wire::RefusalCode;
use postern_identity::{Attributes, Identity};
use postern_node::Timeouts;
use support::authority::{OpenChannel, TestAuthority};
use support::net::TestRelay;

const REPLY: Duration = Duration::from_secs(10);

/// The first reply of a feed: its backlog, or a refusal.
async fn first_reply(feed: &mut OpenChannel) -> Result<AuthorityReply> {
    feed.next(REPLY).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_feeds_is_refused_while_others_enroll() -> Result<()> {
    let relay = TestRelay::start().await?;
    let authority = TestAuthority::start(&relay, |s| s).await?;
    let cap = ServiceLimits::default().max_feeds_per_identity;
    let mallory = Identity::generate();

    // Mallory opens feeds and keeps them, 350 attempts, 16 at a time.
    let attempts = 350;
    let (mut held, mut limited) = (Vec::new(), 0usize);
    let started = Instant::now();
    let mut attempt = 0;
    let mut enrolled = None;
    while attempt < attempts {
        let wave: Vec<_> = (0..16.min(attempts - attempt))
            .map(|_| {
                let (mallory, route) = (mallory.clone(), authority.route.clone());
                tokio::spawn(async move {
                    let mut feed = OpenChannel::open(
                        &mallory,
                        &route,
                        AuthorityRequest::Revocations { after: 0 },
                    )
                    .await?;
                    let reply = first_reply(&mut feed).await?;
                    Ok::<_, anyhow::Error>((feed, reply))
                })
            })
            .collect();
        attempt += wave.len();
        for outcome in wave {
            let (feed, reply) = outcome.await??;
            match reply {
                AuthorityReply::Revocations { .. } => held.push(feed),
                AuthorityReply::Refused {
                    code: RefusalCode::Limit,
                    reason,
                } => {
                    ensure!(reason.contains("limit"), "{reason}");
                    limited += 1;
                }
                other => bail!("attempt answered with {other:?}"),
            }
        }
        // Halfway through the flood, someone else enrolls with a ticket.
        if enrolled.is_none() && attempt >= attempts / 2 {
            let (ticket, _) = authority.authority.create_ticket(
                &TicketSpec {
                    kind: Kind::Person,
                    attributes: Attributes::new(),
                    ttl: Duration::from_secs(900),
                    uses: 1,
                    note: None,
                },
                &EnrollmentRoute {
                    relay_addr: relay.addr.to_string(),
                    relay: relay.identifier,
                    authority_service: authority.route.service.clone(),
                },
                unix_now(),
            )?;
            let alice = Arc::new(LocalParty::new(Identity::generate())?);
            let timeouts = Timeouts::default();
            let took = Instant::now();
            let credential = postern_node::authority::enroll(&alice, &ticket, &timeouts)
                .await
                .context("enrollment during the flood")?;
            enrolled = Some((credential, took.elapsed()));
        }
    }
    println!(
        "{attempts} feed attempts in {:?}: {} held, {limited} refused with Limit; enrollment during the flood took {:?}",
        started.elapsed(),
        held.len(),
        enrolled.as_ref().map(|(_, t)| *t)
    );
    ensure!(
        held.len() == cap,
        "{} feeds held, the cap is {cap}",
        held.len()
    );
    ensure!(limited == attempts - cap, "{limited} refused with Limit");
    ensure!(enrolled.is_some(), "nobody enrolled during the flood");

    // The feeds Mallory holds are live feeds; closing one frees its place.
    for feed in held.drain(..1) {
        feed.close().await;
    }
    let deadline = Instant::now() + REPLY;
    loop {
        let mut feed = OpenChannel::open(
            &mallory,
            &authority.route,
            AuthorityRequest::Revocations { after: 0 },
        )
        .await?;
        match first_reply(&mut feed).await? {
            AuthorityReply::Revocations { .. } => break,
            // The authority may not have seen the hang-up yet.
            AuthorityReply::Refused { .. } if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => bail!("a freed place was not given back: {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_the_admin_endpoint_reaches_open_feeds_at_once() -> Result<()> {
    let relay = TestRelay::start().await?;
    let authority = TestAuthority::start(&relay, |s| s).await?;
    let outlet = Identity::generate();
    let mut feed = OpenChannel::open(
        &outlet,
        &authority.route,
        AuthorityRequest::Revocations { after: 0 },
    )
    .await?;
    match first_reply(&mut feed).await? {
        AuthorityReply::Revocations { entries } => ensure!(entries.is_empty()),
        other => bail!("{other:?}"),
    }
    let local = LocalParty::new(authority.identity.clone())?;
    let mut admin = AdminClient::connect(&authority.store, &local)
        .await?
        .context("the admin endpoint answers")?;
    // Three revocations a third of a second apart: a feed reading the store
    // once a second would deliver some of them hundreds of milliseconds
    // late.
    let mut slowest = Duration::ZERO;
    for n in 1..=3u64 {
        tokio::time::sleep(Duration::from_millis(330)).await;
        let victim = Identity::generate().identifier();
        let sent = Instant::now();
        let reply = admin
            .request(&AdminRequest::Revoke {
                target: RevocationTarget::Identity(victim),
            })
            .await?;
        ensure!(matches!(reply, AdminReply::Revoked { .. }), "{reply:?}");
        let entries = loop {
            match feed.next(Duration::from_secs(1)).await? {
                AuthorityReply::Revocations { entries } if entries.is_empty() => continue,
                AuthorityReply::Revocations { entries } => break entries,
                other => bail!("{other:?}"),
            }
        };
        let took = sent.elapsed();
        slowest = slowest.max(took);
        ensure!(
            entries.len() == 1
                && entries[0].seq == n
                && entries[0].revocation.target == RevocationTarget::Identity(victim),
            "{entries:?}"
        );
    }
    println!("slowest revocation from the admin command to the feed: {slowest:?}");
    ensure!(
        slowest < Duration::from_millis(300),
        "a revocation took {slowest:?} to reach the open feed"
    );
    feed.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_feed_sends_heartbeats() -> Result<()> {
    let relay = TestRelay::start().await?;
    let beat = Duration::from_millis(300);
    let authority = TestAuthority::start(&relay, |s| {
        s.with_limits(ServiceLimits {
            feed_heartbeat: beat,
            ..ServiceLimits::default()
        })
    })
    .await?;
    authority.authority.revoke(
        RevocationTarget::Identity(Identity::generate().identifier()),
        unix_now(),
    )?;
    let mut feed = OpenChannel::open(
        &Identity::generate(),
        &authority.route,
        AuthorityRequest::Revocations { after: 0 },
    )
    .await?;
    match first_reply(&mut feed).await? {
        AuthorityReply::Revocations { entries } => ensure!(entries.len() == 1),
        other => bail!("{other:?}"),
    }
    let start = Instant::now();
    for _ in 0..4 {
        match feed.next(beat * 3).await? {
            AuthorityReply::Revocations { entries } => ensure!(entries.is_empty(), "{entries:?}"),
            other => bail!("{other:?}"),
        }
    }
    let took = start.elapsed();
    ensure!(
        took >= beat * 3 && took < beat * 8,
        "4 heartbeats of {beat:?} took {took:?}"
    );
    feed.close().await;
    Ok(())
}
