//! The audit log as operators run it:
//!
//! - one process per file: a second relay (or an outlet) started with the
//!   same `--audit-log` is refused with an error that says why and what to
//!   do, while the first keeps auditing; its log, closed on SIGTERM with a
//!   signed checkpoint, passes `postern audit verify --signer <relay>`, and
//!   a copy rewritten with recomputed hashes does not;
//! - rotation: after `mv`, SIGHUP makes the relay start a new file that
//!   begins where the old one ended, and `postern audit verify OLD NEW
//!   --signer` accepts the pair;
//! - fail-closed: while the log of an outlet (or relay) started fail-closed
//!   cannot be written, tunnels (registrations) are refused with a reason
//!   the user sees; once it can, the same user gets through and the chain
//!   continues.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use postern_identity::{Identifier, Identity};
use postern_node::{check, InletConfig, NodeError, NodeStatus, OutletConfig};
use postern_policies::audit::{self, AuditHealth, AuditLog, AuditOptions, VerifyOptions};
use postern_policies::{AllowList, LivePolicies, PolicyEngine};
use support::net::{
    any_loopback, relay_identifier_from, service, EchoServer, PosternHome, PosternProcess,
    TestNode, TestRelay,
};

const STARTUP: Duration = Duration::from_secs(20);

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A policy directory letting `outlet` register "db".
fn register_policies(outlet: Identifier) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("register.cedar"),
        format!(
            "@id(\"db-outlet\")\npermit(principal == Identity::\"{outlet}\", action == Action::\"register\", resource == Service::\"db\");\n"
        ),
    )?;
    Ok(dir)
}

fn relay_args<'a>(policies: &'a Path, log: &'a Path) -> Vec<&'a str> {
    vec![
        "relay",
        "--identity",
        "relay",
        "--listen",
        "127.0.0.1:0",
        "--policies",
        s(policies),
        "--audit-log",
        s(log),
    ]
}

/// Waits until the file at `path` contains `needle`.
async fn wait_for_record(path: &Path, needle: &str) -> Result<String> {
    let deadline = Instant::now() + STARTUP;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!(
                "no {needle} in {} within {STARTUP:?}:\n{text}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(process: &PosternProcess, name: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &process.pid().to_string()])
        .status()?;
    ensure!(status.success(), "kill -{name} failed");
    Ok(())
}

/// `postern audit verify ARGS…`: (success, stdout, stderr).
fn audit_verify(home: &PosternHome, args: &[&str]) -> Result<(bool, String, String)> {
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    let out = home.run(&all)?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

#[tokio::test]
async fn a_second_process_on_one_audit_log_is_refused_and_the_first_keeps_auditing() -> Result<()> {
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let outlet_id = home.create_identity("outlet")?;
    let policies = register_policies(outlet_id)?;
    let log = home.path().join("audit.jsonl");

    let mut first = home.spawn(&relay_args(policies.path(), &log))?;
    let addr = first.wait_for_addr("listening on").await?.to_string();
    let relay_id = relay_identifier_from(&first.stderr())?.to_string();

    // A second relay, and an outlet, pointed at the same file: refused
    // before they start, saying why and what to do.
    let mut second = home.spawn(&relay_args(policies.path(), &log))?;
    let outlet_shared = [
        "outlet",
        "--identity",
        "outlet",
        "--relay",
        &addr,
        "--relay-identity",
        &relay_id,
        "--service",
        "db",
        "--target",
        "127.0.0.1:9",
        "--audit-log",
        s(&log),
    ];
    let mut shared_outlet = home.spawn(&outlet_shared)?;
    for (what, process) in [("relay", &mut second), ("outlet", &mut shared_outlet)] {
        let status = process.wait_exit(STARTUP).await?;
        let err = process.stderr();
        ensure!(!status.success(), "the second {what} started:\n{err}");
        ensure!(
            err.contains("audit.jsonl is locked")
                && err.contains("another process")
                && err.contains("give each process its own audit log file"),
            "the {what}'s refusal does not say why:\n{err}"
        );
        ensure!(!err.contains("listening on"), "{err}");
    }

    // The first relay keeps auditing: an outlet with its own log registers.
    let outlet_log = home.path().join("outlet-audit.jsonl");
    let mut outlet_args = outlet_shared.to_vec();
    *outlet_args.last_mut().unwrap() = s(&outlet_log);
    let mut outlet = home.spawn(&outlet_args)?;
    outlet
        .wait_for_stderr("service registered at relay", STARTUP)
        .await?;
    wait_for_record(&log, r#""event":"register""#).await?;
    ensure!(first.is_running());

    // SIGTERM: the relay closes its log with a signed checkpoint.
    signal(&first, "TERM")?;
    ensure!(
        first.wait_exit(STARTUP).await?.success(),
        "{}",
        first.stderr()
    );
    let (ok, out, err) = audit_verify(&home, &[s(&log), "--signer", &relay_id])?;
    ensure!(ok, "verify --signer failed: {out}{err}");
    ensure!(
        out.contains(&format!("every checkpoint is signed by {relay_id}"))
            && out.contains("0 lines after the last checkpoint are not yet"),
        "{out}"
    );
    // Another identity is not the signer.
    let (ok, _, err) = audit_verify(&home, &[s(&log), "--signer", &outlet_id.to_string()])?;
    ensure!(!ok && err.contains("wrong signer"), "{err}");

    // The registration rewritten as a deny, every hash recomputed: the plain
    // chain would verify, the relay's signature does not.
    let text = std::fs::read_to_string(&log)?;
    let rewritten = rechain(&text.replace(r#""decision":"allow""#, r#""decision":"deny""#));
    ensure!(rewritten != text, "nothing to rewrite in:\n{text}");
    std::fs::write(&log, rewritten)?;
    let (ok, _, err) = audit_verify(&home, &[s(&log), "--signer", &relay_id])?;
    ensure!(
        !ok && err.contains("bad checkpoint signature") && err.contains(&relay_id),
        "{err}"
    );
    Ok(())
}

/// Re-chains log lines as an attacker would: every `prev` recomputed.
fn rechain(text: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut prev = "0".repeat(64);
    let mut out = String::new();
    for line in text.lines() {
        let start = line.find(r#""prev":""#).unwrap() + r#""prev":""#.len();
        let line = format!("{}{prev}{}", &line[..start], &line[start + 64..]);
        prev = hex::encode(Sha256::digest(line.as_bytes()));
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[tokio::test]
async fn sighup_starts_a_new_file_after_rotation_and_both_verify() -> Result<()> {
    let home = PosternHome::new()?;
    home.create_identity("relay")?;
    let policies = register_policies(Identity::generate().identifier())?;
    let log = home.path().join("audit.jsonl");
    let rotated = home.path().join("audit.jsonl.1");
    let mut relay = home.spawn(&relay_args(policies.path(), &log))?;
    relay.wait_for_addr("listening on").await?;
    let relay_id = relay_identifier_from(&relay.stderr())?.to_string();
    let reload = |n: u32| {
        std::fs::write(
            policies.path().join("extra.cedar"),
            format!(
                "@id(\"extra-{n}\")\nforbid(principal, action, resource == Service::\"x{n}\");\n"
            ),
        )
    };
    reload(1)?;
    wait_for_record(&log, r#""event":"policy_reload""#).await?;

    // logrotate: move the file, then SIGHUP.
    std::fs::rename(&log, &rotated)?;
    signal(&relay, "HUP")?;
    relay.wait_for_stderr("audit log reopened", STARTUP).await?;
    let first = wait_for_record(&log, r#""event":"continued""#).await?;
    ensure!(first.starts_with(r#"{"seq":1,"#), "{first}");
    reload(2)?;
    wait_for_record(&log, r#""event":"policy_reload""#).await?;
    ensure!(
        relay.is_running(),
        "SIGHUP ended the relay:\n{}",
        relay.stderr()
    );
    signal(&relay, "TERM")?;
    ensure!(relay.wait_exit(STARTUP).await?.success());

    // Each file verifies on its own and signed, and together they link.
    let (ok, out, err) = audit_verify(&home, &[s(&rotated), s(&log), "--signer", &relay_id])?;
    ensure!(ok, "{out}{err}");
    ensure!(
        out.contains("each of the 2 files continues the one before it"),
        "{out}"
    );
    let old = audit::verify(&rotated).map_err(|e| anyhow::anyhow!("{e}"))?;
    let new = audit::verify(&log).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(new.continues == Some(old.head));
    // The wrong order does not link.
    let (ok, _, err) = audit_verify(&home, &[s(&log), s(&rotated)])?;
    ensure!(!ok && err.contains("does not continue"), "{err}");
    Ok(())
}

/// A fail-closed log in `dir/logs/` that retries quickly.
fn fail_closed_log(dir: &Path) -> Result<(PathBuf, Arc<AuditLog>)> {
    let logs = dir.join("logs");
    std::fs::create_dir(&logs)?;
    let path = logs.join("audit.jsonl");
    let mut options = AuditOptions::default().with_fail_closed(true);
    options.retry_interval = Duration::from_millis(50);
    Ok((path.clone(), Arc::new(AuditLog::open_with(&path, options)?)))
}

/// Makes the log unwritable: its directory disappears and it is reopened.
fn break_log(dir: &Path, log: &AuditLog) -> Result<()> {
    std::fs::rename(dir.join("logs"), dir.join("gone"))?;
    ensure!(
        log.reopen().is_err(),
        "the log was reopened without its directory"
    );
    ensure!(matches!(log.health(), AuditHealth::Failing { .. }));
    Ok(())
}

/// Brings the directory back and waits for the writer's retry.
async fn repair_log(dir: &Path, log: &AuditLog) -> Result<()> {
    std::fs::rename(dir.join("gone"), dir.join("logs"))?;
    let deadline = Instant::now() + STARTUP;
    while log.health() != AuditHealth::Writable {
        ensure!(
            Instant::now() < deadline,
            "the log did not recover: {:?}",
            log.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_fail_closed_outlet_refuses_tunnels_while_its_log_cannot_be_written() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (path, log) = fail_closed_log(dir.path())?;
    let relay = TestRelay::start().await?;
    let echo = EchoServer::start().await?;
    let user = Identity::generate();
    let mut config = OutletConfig::new(
        relay.endpoint(),
        service("db"),
        echo.target(),
        AllowList::new([user.identifier()]),
    );
    config.audit = Some(Arc::clone(&log));
    let mut outlet = TestNode::outlet(Identity::generate(), config)?;
    outlet.wait_ready().await?;
    let inlet = InletConfig::new(
        relay.endpoint(),
        service("db"),
        any_loopback(),
        outlet.identifier,
    );

    check(user.clone(), &inlet)
        .await
        .context("before the failure")?;
    break_log(dir.path(), &log)?;
    let err = check(user.clone(), &inlet)
        .await
        .expect_err("a tunnel was admitted although it could not be audited");
    let text = err.to_string();
    ensure!(
        matches!(err, NodeError::ClosedByOutlet { .. })
            && text.contains("temporarily unavailable")
            && text.contains("cannot write its audit log")
            && text.contains("fail-closed")
            && !text.contains("logs/audit.jsonl"),
        "the user is not told why (or is told the file's path): {text}"
    );
    repair_log(dir.path(), &log).await?;
    check(user, &inlet).await.context("after the recovery")?;
    log.flush()?;
    let report = audit::verify(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let text = std::fs::read_to_string(&path)?;
    ensure!(
        text.matches(r#""decision":"allow""#).count() == 2 && report.continues.is_none(),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_fail_closed_relay_refuses_registrations_while_its_log_cannot_be_written() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (path, log) = fail_closed_log(dir.path())?;
    let outlet_identity = Identity::generate();
    let policies = PolicyEngine::from_text(
        "register.cedar",
        &format!(
            "permit(principal == Identity::\"{}\", action == Action::\"register\", resource == Service::\"db\");",
            outlet_identity.identifier()
        ),
    )?;
    let relay = TestRelay::start_with(Identity::generate(), |c| {
        c.policies = Some(Arc::new(LivePolicies::fixed(policies)));
        c.audit = Some(Arc::clone(&log));
    })
    .await?;
    break_log(dir.path(), &log)?;
    let echo = EchoServer::start().await?;
    let outlet =
        TestNode::simple_outlet(outlet_identity, relay.endpoint(), "db", echo.target(), &[])?;
    let deadline = Instant::now() + STARTUP;
    let reason = loop {
        // A refusal that passes by itself: the outlet keeps asking with
        // its usual back-off (Disconnected, not Refused).
        match outlet.handle().status() {
            NodeStatus::Disconnected(reason) if reason.contains("refused") => break reason,
            NodeStatus::Refused(reason) => bail!("a passing refusal was taken as final: {reason}"),
            NodeStatus::Ready => bail!("registered although the relay could not audit it"),
            _ if Instant::now() > deadline => bail!("no refusal: {}", outlet.status_text()),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    ensure!(
        reason.contains("cannot write its audit log") && reason.contains("fail-closed"),
        "{reason}"
    );
    repair_log(dir.path(), &log).await?;
    let deadline = Instant::now() + STARTUP;
    while outlet.handle().status() != NodeStatus::Ready {
        ensure!(
            Instant::now() < deadline,
            "not registered after the recovery: {}",
            outlet.status_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log.flush()?;
    audit::verify_with(&path, &VerifyOptions::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(std::fs::read_to_string(&path)?.contains(r#""event":"register""#));
    Ok(())
}
