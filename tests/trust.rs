//! The trust lifecycle through real processes: an authority behind the
//! relay, an enrollment ticket, credentials presented in the end-to-end
//! handshake and checked by an outlet that admits by attribute, single-use
//! tickets, and a revocation that closes a live PostgreSQL session within
//! five seconds and refuses new ones.

mod support;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use support::net::{relay_and_authority, PosternHome};
use support::pg::TempPg;

const STARTUP: Duration = Duration::from_secs(20);

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_with_ticket_admit_by_attribute_and_revoke_live() -> Result<()> {
    let pg = TempPg::start_async().await?;
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let authority_id = home.create_identity("authority")?;
    let outlet_id = home.create_identity("outlet")?;

    let (_relay, _authority, relay_addr, relay_id) = relay_and_authority(&home, &[]).await?;

    // An admin issues a ticket for one analyst; the laptop enrolls with it.
    let ticket_args = |uses: &str| {
        vec![
            "authority".to_owned(),
            "ticket".into(),
            "--attr".into(),
            "role=analyst".into(),
            "--attr".into(),
            "team=data".into(),
            "--uses".into(),
            uses.into(),
            "--relay".into(),
            relay_addr.clone(),
            "--relay-identity".into(),
            relay_id.clone(),
        ]
    };
    let args = ticket_args("1");
    let out = home.run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    ensure!(out.status.success(), "ticket: {}", stderr_of(&out));
    let ticket = stdout_of(&out).trim().to_owned();
    ensure!(ticket.starts_with("pstn-ticket:"), "{ticket}");

    let out = home.enroll_with_ticket(&ticket, &["--identity", "analyst"])?;
    ensure!(out.status.success(), "enroll: {}", stderr_of(&out));
    let text = stdout_of(&out);
    ensure!(text.contains("enrolled") && text.contains("role"), "{text}");
    // Single use: a second machine with the same ticket is refused, clearly.
    let out = home.enroll_with_ticket(&ticket, &["--identity", "second"])?;
    ensure!(!out.status.success(), "a used ticket enrolled again");
    let err = stderr_of(&out);
    ensure!(
        err.to_lowercase().contains("used"),
        "unclear refusal: {err}"
    );

    // The outlet admits role=analyst credentials from this authority only.
    let mut outlet = home.spawn(&[
        "outlet",
        "--identity",
        "outlet",
        "--relay",
        &relay_addr,
        "--relay-identity",
        &relay_id,
        "--service",
        "db",
        "--target",
        &pg.addr().to_string(),
        "--trust-authority",
        &authority_id.to_string(),
        "--allow-attr",
        "role=analyst",
    ])?;
    outlet
        .wait_for_stderr("service registered at relay", STARTUP)
        .await?;
    let inlet_args = |identity: &'static str| {
        vec![
            "inlet".to_owned(),
            "--identity".into(),
            identity.into(),
            "--relay".into(),
            relay_addr.clone(),
            "--relay-identity".into(),
            relay_id.clone(),
            "--service".into(),
            "db".into(),
            "--outlet-identity".into(),
            outlet_id.to_string(),
            "--trust-authority".into(),
            authority_id.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ]
    };

    // Someone never enrolled is refused, and told why.
    home.create_identity("stranger")?;
    let mut check = inlet_args("stranger");
    check.truncate(check.len() - 2);
    check.push("--check".into());
    let out = home.run(&check.iter().map(String::as_str).collect::<Vec<_>>())?;
    ensure!(!out.status.success(), "a stranger was admitted");
    let err = stderr_of(&out);
    ensure!(err.contains("no credential"), "unclear denial: {err}");

    // The analyst's inlet presents its credential and gets through.
    let args = inlet_args("analyst");
    let mut inlet = home.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let inlet_addr = inlet.wait_for_addr("listening on").await?;
    inlet.wait_for_stderr("connected to relay", STARTUP).await?;
    let client = TempPg::connect_to("127.0.0.1", inlet_addr.port())
        .await
        .context("the enrolled analyst could not connect")?;
    let one: i32 = client.query_one("select 1", &[]).await?.get(0);
    ensure!(one == 1);

    // Revoke the analyst: the live session ends within 5 s, new ones fail.
    let analyst_id = home.run(&["identity", "show", "--name", "analyst"])?;
    let analyst_id = stdout_of(&analyst_id).trim().to_owned();
    let revoked_at = Instant::now();
    let out = home.run(&["authority", "revoke", &analyst_id])?;
    ensure!(out.status.success(), "revoke: {}", stderr_of(&out));
    let mut closed = false;
    while revoked_at.elapsed() < Duration::from_secs(5) {
        if client.query_one("select 1", &[]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        closed,
        "the revoked identity's session was still open 5 s later; outlet log:\n{}",
        outlet.stderr()
    );
    let again = TempPg::connect_to("127.0.0.1", inlet_addr.port()).await;
    ensure!(again.is_err(), "a revoked identity opened a new tunnel");
    outlet
        .wait_for_stderr("revoked", Duration::from_secs(5))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_add_and_remove_members_and_withdraw_tickets() -> Result<()> {
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let authority_id = home.create_identity("authority")?.to_string();
    let member_id = home.create_identity("svc")?.to_string();
    let (_relay, _authority, relay_addr, relay_id) = relay_and_authority(&home, &[]).await?;
    let renew = |home: &PosternHome| {
        home.run(&[
            "enroll",
            "--renew",
            "--identity",
            "svc",
            "--relay",
            &relay_addr,
            "--relay-identity",
            &relay_id,
            "--authority",
            &authority_id,
        ])
    };

    // Not a member yet: no credential.
    let out = renew(&home)?;
    ensure!(!out.status.success(), "a stranger got a credential");

    // An admin vouches for the service directly; it fetches its credential.
    let out = home.run(&[
        "authority",
        "member",
        "add",
        &member_id,
        "--attr",
        "role=db-outlet",
        "--service-member",
    ])?;
    ensure!(out.status.success(), "member add: {}", stderr_of(&out));
    let out = renew(&home)?;
    ensure!(out.status.success(), "renew: {}", stderr_of(&out));
    let text = format!("{}{}", stdout_of(&out), stderr_of(&out));
    ensure!(text.contains("role=db-outlet"), "{text}");
    let listed = stdout_of(&home.run(&["authority", "list"])?);
    ensure!(listed.contains(&member_id), "{listed}");

    // The running authority holds its store; a local user without the
    // authority's key gets nothing from its admin endpoint, nor the store.
    home.create_identity("intruder")?;
    let store = home.path().join("authority/authority.redb");
    let store = store.to_str().context("store path")?;
    for args in [
        &[
            "authority",
            "list",
            "--identity",
            "intruder",
            "--store",
            store,
        ][..],
        &[
            "authority",
            "revoke",
            &member_id,
            "--identity",
            "intruder",
            "--store",
            store,
        ],
    ] {
        let out = home.run(args)?;
        let err = stderr_of(&out);
        ensure!(
            !out.status.success() && err.contains("refused") && err.contains(&authority_id),
            "{args:?} by another identity: {err}"
        );
    }
    let listed = stdout_of(&home.run(&["authority", "list"])?);
    ensure!(
        listed.trim_end().ends_with("revocations:"),
        "the intruder's revocation was carried out:\n{listed}"
    );

    // Removed: no new credential, with a clear refusal.
    let out = home.run(&["authority", "member", "remove", &member_id])?;
    ensure!(out.status.success(), "member remove: {}", stderr_of(&out));
    let out = renew(&home)?;
    ensure!(!out.status.success(), "a removed member got a credential");
    let out = home.run(&["authority", "member", "remove", &member_id])?;
    ensure!(
        !out.status.success() && stderr_of(&out).contains("not a member"),
        "{}",
        stderr_of(&out)
    );

    // A withdrawn ticket enrolls nobody.
    let out = home.run(&[
        "authority",
        "ticket",
        "--attr",
        "role=analyst",
        "--relay",
        &relay_addr,
        "--relay-identity",
        &relay_id,
    ])?;
    ensure!(out.status.success(), "ticket: {}", stderr_of(&out));
    let ticket = stdout_of(&out).trim().to_owned();
    let id = stderr_of(&out)
        .split_whitespace()
        .skip_while(|w| *w != "ticket")
        .nth(1)
        .context("no ticket id in the ticket command's output")?
        .to_owned();
    let out = home.run(&["authority", "ticket-remove", &id])?;
    ensure!(
        out.status.success(),
        "ticket-remove {id}: {}",
        stderr_of(&out)
    );
    let out = home.enroll_with_ticket(&ticket, &["--identity", "laptop"])?;
    ensure!(
        !out.status.success(),
        "a withdrawn ticket enrolled a machine"
    );
    println!("withdrawn ticket refused: {}", stderr_of(&out).trim());
    Ok(())
}

/// The refresh case: credentials live 5 seconds; the inlet renews
/// its own at the authority and pushes it into the open tunnel while a long
/// query runs, and the outlet (which checks expiry every second) keeps the
/// tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_second_credentials_are_renewed_during_a_long_query() -> Result<()> {
    let pg = TempPg::start_async().await?;
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let authority_id = home.create_identity("authority")?.to_string();
    let outlet_id = home.create_identity("outlet")?.to_string();
    let (_relay, _authority, relay_addr, relay_id) =
        relay_and_authority(&home, &["--person-lifetime", "5s"]).await?;
    let out = home.run(&[
        "authority",
        "ticket",
        "--attr",
        "role=analyst",
        "--relay",
        &relay_addr,
        "--relay-identity",
        &relay_id,
    ])?;
    ensure!(out.status.success(), "ticket: {}", stderr_of(&out));
    let ticket = stdout_of(&out).trim().to_owned();
    let out = home.enroll_with_ticket(&ticket, &["--identity", "analyst"])?;
    ensure!(out.status.success(), "enroll: {}", stderr_of(&out));

    let mut outlet = home.spawn(&[
        "outlet",
        "--identity",
        "outlet",
        "--relay",
        &relay_addr,
        "--relay-identity",
        &relay_id,
        "--service",
        "db",
        "--target",
        &pg.addr().to_string(),
        "--trust-authority",
        &authority_id,
        "--allow-attr",
        "role=analyst",
    ])?;
    outlet
        .wait_for_stderr("service registered at relay", STARTUP)
        .await?;
    let mut inlet = home.spawn(&[
        "inlet",
        "--identity",
        "analyst",
        "--relay",
        &relay_addr,
        "--relay-identity",
        &relay_id,
        "--service",
        "db",
        "--outlet-identity",
        &outlet_id,
        "--trust-authority",
        &authority_id,
        "--listen",
        "127.0.0.1:0",
    ])?;
    let inlet_addr = inlet.wait_for_addr("listening on").await?;
    inlet
        .wait_for_stderr("INFO connected to relay", STARTUP)
        .await?;
    let client = TempPg::connect_to("127.0.0.1", inlet_addr.port()).await?;

    // Three lifetimes of the first credential (with the 60 s clock-skew
    // allowance the outlet grants, the first one alone would end at 65 s;
    // the renewals are what the test checks, in the logs of both ends).
    let started = Instant::now();
    let slept: i32 = client
        .query_one("select 7 from pg_sleep(15)", &[])
        .await
        .context("the long query failed while credentials were renewed")?
        .get(0);
    ensure!(slept == 7);
    println!("15 s query survived; took {:?}", started.elapsed());
    let renewals = inlet.stderr().matches("credential renewed").count();
    ensure!(
        renewals >= 3,
        "the inlet renewed only {renewals} times in 15 s of 5 s credentials:\n{}",
        inlet.stderr()
    );
    let pushed = outlet
        .stderr()
        .matches("inlet renewed its credential")
        .count();
    ensure!(
        pushed >= 3,
        "the outlet saw {pushed} renewals through the tunnel:\n{}",
        outlet.stderr()
    );
    let one: i32 = client.query_one("select 1", &[]).await?.get(0);
    ensure!(one == 1);
    Ok(())
}
