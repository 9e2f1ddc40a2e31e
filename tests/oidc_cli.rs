//! `postern enroll --oidc` through real processes: a relay, an authority
//! with `--oidc-config` and `--audit-log`, the real OpenID provider of
//! `support::oidc` (the npm package `oidc-provider`; run `scripts/setup.sh`
//! once), and `postern enroll` with the test playing the person at the
//! browser.
//!
//! Covered: the browser flow (`--no-browser`: the test opens the printed
//! address, logs in at the provider and is redirected to the enrolling
//! process's loopback listener) giving a credential with the mapped
//! attributes (the `groups` list, `team`, and the name from `name_claim`);
//! that credential admitted by an outlet with `--allow-attr groups=oncall`
//! and another user's refused; the device flow (`--device`); renewal
//! (`postern enroll --renew`) re-checking the person at the provider and
//! refused, clearly, once the user is disabled there; tickets beside OIDC;
//! and the authority's audit log (every enrollment attempt, renewal, issued
//! credential and revocation, including one made by `postern authority
//! revoke` from another process) passing `postern_policies::audit::verify`
//! and holding no authorization code. A second test covers configuration
//! mistakes: an unreadable file (without echoing its secret), an
//! unreachable provider, a client secret the provider refuses, and an
//! authority without OIDC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use postern_identity::credential::SignedCredential;
use postern_identity::{AttrValue, Identifier};
use serde_json::Value;
use support::net::{relay_identifier_from, PosternHome, PosternProcess};
use support::oidc::{
    device_prompt_in, login_url_in, FakeUser, TestProvider, OTHER_CLIENT, PUBLIC_CLIENT,
};

const STARTUP: Duration = Duration::from_secs(30);
/// Longest a whole login may take through `postern enroll`.
const LOGIN: Duration = Duration::from_secs(60);

/// A `postern` run whose stdout and stderr are both collected.
struct Run {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    what: String,
}

fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    text
}

impl Run {
    fn spawn(home: &PosternHome, args: &[&str]) -> Result<Self> {
        let mut child = home
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning postern {args:?}"))?;
        let stdout = collect(child.stdout.take().context("stdout")?);
        let stderr = collect(child.stderr.take().context("stderr")?);
        Ok(Run {
            child,
            stdout,
            stderr,
            what: format!("postern {}", args.join(" ")),
        })
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until `find` finds something in stderr.
    async fn wait_for<T>(&mut self, find: impl Fn(&str) -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(found) = find(&self.stderr()) {
                return Ok(found);
            }
            if Instant::now() > deadline || self.child.try_wait()?.is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some(found) = find(&self.stderr()) {
                    return Ok(found);
                }
                bail!(
                    "{} did not print what was expected; stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the exit; returns the status, stdout and stderr.
    async fn finish(mut self) -> Result<(ExitStatus, String, String)> {
        let deadline = Instant::now() + LOGIN;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Let the reader threads drain the pipes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok((status, self.stdout(), self.stderr()));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!(
                    "{} still running after {LOGIN:?}; stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A relay and the identities every test needs.
struct Lab {
    home: PosternHome,
    _relay: PosternProcess,
    relay_addr: String,
    relay_id: String,
    authority_id: Identifier,
}

impl Lab {
    async fn start() -> Result<Self> {
        let home = PosternHome::new()?;
        home.create_identity("relay")?;
        let authority_id = home.create_identity("authority")?;
        let mut relay = home.spawn(&["relay", "--identity", "relay", "--listen", "127.0.0.1:0"])?;
        let relay_addr = relay.wait_for_addr("listening on").await?.to_string();
        let relay_id = relay_identifier_from(&relay.stderr())?.to_string();
        Ok(Lab {
            home,
            _relay: relay,
            relay_addr,
            relay_id,
            authority_id,
        })
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.home.path().join(name)
    }

    /// `postern authority run` with `extra` flags, registered at the relay.
    async fn authority(&self, extra: &[&str]) -> Result<PosternProcess> {
        let mut args = vec![
            "authority",
            "run",
            "--relay",
            &self.relay_addr,
            "--relay-identity",
            &self.relay_id,
        ];
        args.extend_from_slice(extra);
        let mut authority = self.home.spawn(&args)?;
        authority
            .wait_for_stderr("authority registered at relay", STARTUP)
            .await?;
        Ok(authority)
    }

    /// `postern enroll --oidc` flags for identity `name`, plus `extra`.
    fn enroll_args<'a>(&'a self, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "enroll",
            "--oidc",
            "--identity",
            name,
            "--relay",
            &self.relay_addr,
            "--relay-identity",
            &self.relay_id,
        ];
        args.extend_from_slice(extra);
        args
    }

    /// Runs a browser enrollment as `user`, playing the browser; returns the
    /// run's status, stdout and stderr, and the URL the browser landed on.
    async fn browser_enroll(
        &self,
        name: &str,
        user: &str,
        extra: &[&str],
    ) -> Result<(ExitStatus, String, String, reqwest::Url)> {
        let authority = self.authority_id.to_string();
        let mut flags = vec!["--no-browser", "--authority", &authority];
        flags.extend_from_slice(extra);
        let mut run = Run::spawn(&self.home, &self.enroll_args(name, &flags))?;
        let url = run.wait_for(login_url_in).await?;
        let (landing, page) = FakeUser::new(user)?
            .authorize(&url)
            .await
            .with_context(|| format!("logging in; enroll stderr:\n{}", run.stderr()))?;
        ensure!(
            landing.host_str() == Some("127.0.0.1") && page.contains("Postern"),
            "the browser ended at {landing}: {page}"
        );
        let (status, out, err) = run.finish().await?;
        Ok((status, out, err, landing))
    }

    fn credential(&self, name: &str) -> Result<postern_identity::credential::CredentialBody> {
        let path = self.path("credentials").join(format!("{name}.cred"));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(SignedCredential::decode(&bytes)?.inspect_unverified()?)
    }
}

fn many(values: &[&str]) -> AttrValue {
    AttrValue::Many(values.iter().map(|s| s.to_string()).collect())
}

/// A TCP target that accepts and holds connections (the outlet's target).
async fn target() -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    Ok(addr)
}

/// The audit records, parsed.
fn records(path: &Path) -> Result<Vec<Value>> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow!("{l}: {e}")))
        .collect()
}

fn find(records: &[Value], pred: impl Fn(&Value) -> bool) -> Option<&Value> {
    records.iter().find(|r| pred(r))
}

fn is(r: &Value, event: &str, method: &str, decision: &str, subject: &str) -> bool {
    r["event"] == event
        && r["method"] == method
        && r["decision"] == decision
        && r["subject"] == subject
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_enrollment_admission_renewal_and_audit() -> Result<()> {
    let provider = TestProvider::start()?;
    let lab = Lab::start().await?;
    let config = lab.path("oidc.toml");
    std::fs::write(
        &config,
        provider.config_toml(
            PUBLIC_CLIENT,
            "name_claim = \"email\"\nallow_device_flow = true",
        ),
    )?;
    let audit = lab.path("authority-audit.jsonl");
    let mut authority = lab
        .authority(&[
            "--oidc-config",
            config.to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
        ])
        .await?;
    let started = authority.stderr();
    ensure!(
        started.contains(provider.issuer()) && started.contains("device flow (--device) allowed"),
        "{started}"
    );

    // Alice logs in with the browser flow; the test is her browser.
    let (status, out, err, landing) = lab.browser_enroll("alice", "alice", &[]).await?;
    ensure!(status.success(), "enroll --oidc failed:\n{err}");
    ensure!(
        out.contains("as alice@example.com (OpenID Connect login)")
            && out.contains("groups=[analysts, oncall]")
            && out.contains("name=alice@example.com")
            && out.contains("team=analytics"),
        "granted attributes not shown:\n{out}"
    );
    ensure!(
        err.contains("created identity") && err.contains("code_challenge="),
        "{err}"
    );
    let code = landing
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .context("no code in the redirect")?;
    let alice = lab.credential("alice")?;
    ensure!(alice.issuer == lab.authority_id);
    assert_eq!(
        alice.attributes.get("groups"),
        Some(&many(&["analysts", "oncall"]))
    );
    assert_eq!(
        alice.attributes.get("name"),
        Some(&AttrValue::One("alice@example.com".into()))
    );
    assert_eq!(
        alice.attributes.get("team"),
        Some(&AttrValue::One("analytics".into()))
    );
    assert_eq!(alice.attributes.len(), 3, "{:?}", alice.attributes);
    let alice_id = alice.subject.to_string();

    // Bob, on a machine without a browser: the device flow.
    let authority_id = lab.authority_id.to_string();
    let mut run = Run::spawn(
        &lab.home,
        &lab.enroll_args("bob", &["--device", "--authority", &authority_id]),
    )?;
    let (uri, user_code) = run.wait_for(device_prompt_in).await?;
    ensure!(uri.starts_with(provider.issuer()), "{uri}");
    // The person sees which identity they are about to enroll.
    let shown = run.stderr();
    let bob_key = lab.home.run(&["identity", "show", "--name", "bob"])?;
    let bob_key = text(&bob_key.stdout).trim().to_owned();
    ensure!(
        shown.contains(&format!("You are enrolling {bob_key}"))
            && shown.contains("only if you started"),
        "{shown}"
    );
    FakeUser::new("bob")?
        .approve_device(&uri, &user_code)
        .await
        .with_context(|| format!("approving; provider log:\n{}", provider.log()))?;
    let (status, out, err) = run.finish().await?;
    ensure!(status.success(), "enroll --oidc --device failed:\n{err}");
    ensure!(out.contains("groups=[engineers]"), "{out}");
    let bob = lab.credential("bob")?;
    assert_eq!(bob.attributes.get("groups"), Some(&many(&["engineers"])));
    assert_eq!(
        bob.attributes.get("name"),
        Some(&AttrValue::One("bob@example.org".into()))
    );
    let bob_id = bob.subject.to_string();

    // A ticket still works beside OIDC, once.
    let out = lab.home.run(&[
        "authority",
        "ticket",
        "--attr",
        "role=analyst",
        "--relay",
        &lab.relay_addr,
        "--relay-identity",
        &lab.relay_id,
    ])?;
    ensure!(out.status.success(), "ticket: {}", text(&out.stderr));
    let ticket = text(&out.stdout).trim().to_owned();
    let out = lab
        .home
        .enroll_with_ticket(&ticket, &["--identity", "carol"])?;
    ensure!(out.status.success(), "ticket enroll: {}", text(&out.stderr));
    ensure!(text(&out.stdout).contains("role=analyst"));
    let carol_id = lab.credential("carol")?.subject.to_string();
    let out = lab
        .home
        .enroll_with_ticket(&ticket, &["--identity", "dave"])?;
    ensure!(!out.status.success() && text(&out.stderr).contains("already been used"));

    // The outlet admits the groups=oncall credential and nobody else.
    let outlet_id = lab.home.create_identity("outlet")?.to_string();
    let target = target().await?.to_string();
    let mut outlet = lab.home.spawn(&[
        "outlet",
        "--identity",
        "outlet",
        "--relay",
        &lab.relay_addr,
        "--relay-identity",
        &lab.relay_id,
        "--service",
        "db",
        "--target",
        &target,
        "--trust-authority",
        &authority_id,
        "--allow-attr",
        "groups=oncall",
    ])?;
    outlet
        .wait_for_stderr("service registered at relay", STARTUP)
        .await?;
    let check = |identity: &str| {
        lab.home.run(&[
            "inlet",
            "--identity",
            identity,
            "--relay",
            &lab.relay_addr,
            "--relay-identity",
            &lab.relay_id,
            "--service",
            "db",
            "--outlet-identity",
            &outlet_id,
            "--trust-authority",
            &authority_id,
            "--check",
        ])
    };
    let out = check("alice")?;
    ensure!(
        out.status.success() && text(&out.stdout).contains("admits this identity"),
        "alice refused: {}\noutlet:\n{}",
        text(&out.stderr),
        outlet.stderr()
    );
    let out = check("bob")?;
    ensure!(!out.status.success(), "bob (groups=engineers) was admitted");
    ensure!(
        text(&out.stderr).contains("denied"),
        "{}",
        text(&out.stderr)
    );

    // Renewal asks the provider again: fine while alice is active there…
    let renew = |identity: &str| {
        lab.home.run(&[
            "enroll",
            "--renew",
            "--identity",
            identity,
            "--relay",
            &lab.relay_addr,
            "--relay-identity",
            &lab.relay_id,
        ])
    };
    let out = renew("alice")?;
    ensure!(
        out.status.success(),
        "renewal refused: {}",
        text(&out.stderr)
    );
    ensure!(
        text(&out.stdout).contains("renewed"),
        "{}",
        text(&out.stdout)
    );
    let renewed = lab.credential("alice")?;
    ensure!(renewed.id != alice.id && renewed.attributes == alice.attributes);

    // …and refused once she is disabled at the provider.
    provider.disable("alice").await?;
    let out = renew("alice")?;
    ensure!(
        !out.status.success(),
        "a disabled user's credential was renewed"
    );
    let err = text(&out.stderr);
    ensure!(
        err.contains("the authority refused")
            && err.contains("disabled")
            && err.contains("postern enroll --oidc"),
        "unclear refusal: {err}"
    );
    // The refused refresh token is forgotten: the next attempt is refused
    // without the provider, still clearly.
    let out = renew("alice")?;
    ensure!(!out.status.success());
    ensure!(
        text(&out.stderr).contains("log in again"),
        "{}",
        text(&out.stderr)
    );
    // A ticket member renews without any provider.
    let out = renew("carol")?;
    ensure!(out.status.success(), "carol: {}", text(&out.stderr));

    // Revoke bob from another process; the running authority audits it too.
    let admin_audit = lab.path("admin-audit.jsonl");
    let out = lab.home.run(&[
        "authority",
        "revoke",
        &bob_id,
        "--audit-log",
        admin_audit.to_str().unwrap(),
    ])?;
    ensure!(out.status.success(), "revoke: {}", text(&out.stderr));
    authority
        .wait_for_stderr("revocation recorded", Duration::from_secs(10))
        .await?;
    // Audit records are written off the async threads; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = records(&audit)?;
        if find(&log, |r| r["event"] == "revoke").is_some() || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let report =
        postern_policies::audit::verify(&audit).map_err(|e| anyhow!("authority audit log: {e}"))?;
    ensure!(report.records == log.len() as u64);
    let all = std::fs::read_to_string(&audit)?;
    ensure!(
        !all.contains(&code),
        "the authorization code is in the audit log"
    );
    ensure!(
        !authority.stderr().contains(&code),
        "the code is in the log"
    );

    let alice_login = find(&log, |r| is(r, "enroll", "oidc", "allow", &alice_id))
        .with_context(|| format!("no oidc enroll for alice in:\n{all}"))?;
    ensure!(alice_login["attrs"]["groups"] == serde_json::json!(["analysts", "oncall"]));
    ensure!(alice_login["reason"]
        .as_str()
        .is_some_and(|r| r.contains("alice@example.com")));
    let device = find(&log, |r| is(r, "enroll", "oidc-device", "allow", &bob_id))
        .with_context(|| format!("no device enroll for bob in:\n{all}"))?;
    ensure!(
        device["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&format!(
                "device login for {bob_id} approved by bob@example.org"
            ))),
        "{device}"
    );
    ensure!(find(&log, |r| is(r, "enroll", "ticket", "allow", &carol_id)).is_some());
    ensure!(
        find(&log, |r| r["event"] == "enroll"
            && r["method"] == "ticket"
            && r["decision"] == "deny"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("already been used")))
        .is_some(),
        "no refused ticket in:\n{all}"
    );
    ensure!(find(&log, |r| is(r, "enroll", "renew-oidc", "allow", &alice_id)).is_some());
    ensure!(find(&log, |r| is(r, "enroll", "renew", "allow", &carol_id)).is_some());
    let refused = find(&log, |r| is(r, "enroll", "renew-oidc", "deny", &alice_id))
        .with_context(|| format!("no refused renewal in:\n{all}"))?;
    ensure!(refused["reason"]
        .as_str()
        .is_some_and(|r| r.contains("disabled")));
    let issued = log.iter().filter(|r| r["event"] == "issue").count();
    ensure!(
        issued == 5,
        "{issued} issue records (alice twice, bob, carol twice):\n{all}"
    );
    ensure!(
        find(&log, |r| r["event"] == "issue"
            && r["subject"] == alice_id.as_str()
            && r["issuer"] == authority_id.as_str()
            && r["credential"] == alice.id.to_string().as_str())
        .is_some(),
        "{all}"
    );
    ensure!(
        find(&log, |r| r["event"] == "revoke"
            && r["subject"] == bob_id.as_str())
        .is_some(),
        "the running authority did not audit the revocation:\n{all}"
    );

    // `authority revoke --audit-log` closes its log with a checkpoint signed
    // by the authority.
    let admin = records(&admin_audit)?;
    ensure!(
        admin.len() == 2
            && admin[0]["event"] == "revoke"
            && admin[0]["subject"] == bob_id.as_str()
            && admin[1]["event"] == "checkpoint"
            && admin[1]["signer"] == authority_id.as_str(),
        "{admin:?}"
    );
    postern_policies::audit::verify_with(
        &admin_audit,
        &postern_policies::audit::VerifyOptions::default().with_signer(authority_id.parse()?),
    )
    .map_err(|e| anyhow!("admin audit log: {e}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_configuration_mistakes_are_explained() -> Result<()> {
    let provider = TestProvider::start()?;
    let lab = Lab::start().await?;
    let run_with = |config: &Path, extra: &[&str]| {
        let mut args = vec![
            "authority",
            "run",
            "--relay",
            &lab.relay_addr,
            "--relay-identity",
            &lab.relay_id,
            "--oidc-config",
            config.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        lab.home.run(&args)
    };

    // A file that does not parse: refused at start-up, naming the line but
    // never echoing it (it may hold the secret).
    let broken = lab.path("broken.toml");
    std::fs::write(
        &broken,
        format!(
            "issuer_url = \"{}\"\nclient_id = \"{OTHER_CLIENT}\"\nclient_secret = s3cr3t-value\n",
            provider.issuer()
        ),
    )?;
    let out = run_with(&broken, &[])?;
    let err = text(&out.stderr);
    ensure!(!out.status.success(), "started with a broken config");
    ensure!(
        err.contains("not valid TOML (line 3)") && !err.contains("s3cr3t-value"),
        "{err}"
    );

    // Settings the library refuses, under an [oidc] table.
    let insecure = lab.path("insecure.toml");
    std::fs::write(
        &insecure,
        "[oidc]\nissuer_url = \"http://id.example.com\"\nclient_id = \"postern\"\n",
    )?;
    let out = run_with(&insecure, &[])?;
    let err = text(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("invalid [oidc] configuration")
            && err.contains("https"),
        "{err}"
    );

    // A provider that is not there.
    let nowhere = lab.path("nowhere.toml");
    let port = support::procs::free_port()?;
    std::fs::write(
        &nowhere,
        format!("issuer_url = \"http://127.0.0.1:{port}\"\nclient_id = \"postern\"\n"),
    )?;
    let out = run_with(&nowhere, &[])?;
    let err = text(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("cannot use the OpenID provider")
            && err.contains("issuer_url"),
        "{err}"
    );

    // A client secret the provider does not accept: the authority starts
    // (discovery needs no secret), the person logs in, and the code exchange
    // is refused with a reason that names the configuration to fix.
    let wrong = lab.path("wrong-secret.toml");
    std::fs::write(
        &wrong,
        format!(
            "[oidc]\nissuer_url = \"{}\"\nclient_id = \"{OTHER_CLIENT}\"\nclient_secret = \"not-the-secret\"\n\
             [oidc.claims]\ngroups = \"groups\"\n",
            provider.issuer()
        ),
    )?;
    let audit = lab.path("audit.jsonl");
    let authority = lab
        .authority(&[
            "--oidc-config",
            wrong.to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
        ])
        .await?;
    let (status, _, err, _) = lab.browser_enroll("alice", "alice", &[]).await?;
    ensure!(!status.success(), "enrolled with a wrong client secret");
    ensure!(
        err.contains("invalid_client") && err.contains("client_secret"),
        "unclear error: {err}"
    );
    ensure!(!lab.path("credentials/alice.cred").exists());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = records(&audit)?;
    ensure!(
        find(&log, |r| r["event"] == "enroll"
            && r["method"] == "oidc"
            && r["decision"] == "deny")
        .is_some(),
        "{log:?}"
    );
    postern_policies::audit::verify(&audit).map_err(|e| anyhow!("{e}"))?;
    for text in [authority.stderr(), std::fs::read_to_string(&audit)?, err] {
        ensure!(
            !text.contains("not-the-secret"),
            "the client secret leaked: {text}"
        );
    }

    // An authority without --oidc-config says so.
    lab.home.create_identity("plain")?;
    let plain_id = lab.home.run(&["identity", "show", "--name", "plain"])?;
    let plain_id = text(&plain_id.stdout).trim().to_owned();
    let _plain = lab
        .authority(&["--identity", "plain", "--service", "plain-authority"])
        .await?;
    let out = lab.home.run(&lab.enroll_args(
        "bob",
        &[
            "--device",
            "--authority",
            &plain_id,
            "--authority-service",
            "plain-authority",
        ],
    ))?;
    let err = text(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("offers no OpenID Connect login")
            && err.contains("ticket"),
        "{err}"
    );
    Ok(())
}
