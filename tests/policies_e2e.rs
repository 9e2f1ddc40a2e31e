//! Cedar policies enforced by real processes, through real PostgreSQL: the
//! relay decides `register` from the credential an outlet presents on its
//! hop channel, the outlet decides `connect` for every tunnel, a policy
//! change closes the live tunnels it no longer permits within 5 s and leaves
//! the others alone, a broken change keeps the old policies, every decision
//! lands in a hash-chained audit log that verifies, and an outlet refuses to
//! start on broken policies and warns when it has none.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use support::net::{relay_identifier_from, PosternHome, PosternProcess};
use support::pg::TempPg;

const STARTUP: Duration = Duration::from_secs(20);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(home: &PosternHome, args: &[&str]) -> Result<String> {
    let out = home.run(args)?;
    ensure!(
        out.status.success(),
        "postern {args:?} failed: {}",
        text(&out.stderr)
    );
    Ok(text(&out.stdout))
}

/// Issues a single-use ticket with `attrs` and enrolls identity `name` with it.
fn enroll(home: &PosternHome, relay: (&str, &str), name: &str, attrs: &[&str]) -> Result<String> {
    let mut args = vec![
        "authority",
        "ticket",
        "--relay",
        relay.0,
        "--relay-identity",
        relay.1,
    ];
    for attr in attrs {
        args.extend(["--attr", attr]);
    }
    let ticket = run(home, &args)?.trim().to_owned();
    let out = home.enroll_with_ticket(&ticket, &["--identity", name])?;
    ensure!(
        out.status.success(),
        "postern enroll --identity {name} failed: {}",
        text(&out.stderr)
    );
    Ok(run(home, &["identity", "show", "--name", name])?
        .trim()
        .to_owned())
}

fn write(dir: &Path, file: &str, policy: &str) -> Result<()> {
    // Write then rename, as editors and configuration managers do, so the
    // outlet never reads half a file.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, policy)?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(())
}

struct Stack {
    home: PosternHome,
    relay: (String, String),
    authority_id: String,
    _relay: PosternProcess,
    _authority: PosternProcess,
    relay_policies: tempfile::TempDir,
    relay_audit: std::path::PathBuf,
}

impl Stack {
    async fn start() -> Result<Self> {
        let home = PosternHome::new()?;
        home.create_identity("relay")?;
        let authority_id = home.create_identity("authority")?.to_string();
        // The relay lets the authority serve its own service, and only
        // credentials saying role=db-outlet register "db".
        let relay_policies = tempfile::tempdir()?;
        write(
            relay_policies.path(),
            "register.cedar",
            &format!(
                r#"@id("authority-serves-itself")
permit(principal == Identity::"{authority_id}", action == Action::"register", resource == Service::"authority-{authority_id}");
@id("db-outlets")
permit(principal, action == Action::"register", resource == Service::"db")
when {{ principal has role && principal.role == "db-outlet" }};
"#
            ),
        )?;
        let relay_audit = home.path().join("relay-audit.jsonl");
        let mut relay = home.spawn(&[
            "relay",
            "--identity",
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--policies",
            &relay_policies.path().display().to_string(),
            "--trust-authority",
            &authority_id,
            "--audit-log",
            &relay_audit.display().to_string(),
        ])?;
        let relay_addr = relay.wait_for_addr("listening on").await?.to_string();
        let relay_id = relay_identifier_from(&relay.stderr())?.to_string();
        let mut authority = home.spawn(&[
            "authority",
            "run",
            "--relay",
            &relay_addr,
            "--relay-identity",
            &relay_id,
        ])?;
        authority
            .wait_for_stderr("authority registered at relay", STARTUP)
            .await?;
        Ok(Stack {
            home,
            relay: (relay_addr, relay_id),
            authority_id,
            _relay: relay,
            _authority: authority,
            relay_policies,
            relay_audit,
        })
    }

    fn relay(&self) -> (&str, &str) {
        (&self.relay.0, &self.relay.1)
    }

    fn outlet(&self, identity: &str, target: &str, extra: &[&str]) -> Result<PosternProcess> {
        let mut args = vec![
            "outlet",
            "--identity",
            identity,
            "--relay",
            &self.relay.0,
            "--relay-identity",
            &self.relay.1,
            "--service",
            "db",
            "--target",
            target,
            "--trust-authority",
            &self.authority_id,
        ];
        args.extend_from_slice(extra);
        self.home.spawn(&args)
    }

    fn inlet_args(&self, identity: &str, outlet: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "inlet",
            "--identity",
            identity,
            "--relay",
            &self.relay.0,
            "--relay-identity",
            &self.relay.1,
            "--service",
            "db",
            "--outlet-identity",
            outlet,
            "--trust-authority",
            &self.authority_id,
            "--listen",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    async fn inlet(&self, identity: &str, outlet: &str) -> Result<(PosternProcess, u16)> {
        let args = self.inlet_args(identity, outlet, &[]);
        let mut inlet = self
            .home
            .spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let addr = inlet.wait_for_addr("listening on").await?;
        inlet
            .wait_for_stderr("INFO connected to relay", STARTUP)
            .await?;
        Ok((inlet, addr.port()))
    }

    /// `postern inlet --check`: Ok(stdout) if admitted, Err(stderr) if not.
    fn check(
        &self,
        identity: &str,
        outlet: &str,
        extra: &[&str],
    ) -> Result<Result<String, String>> {
        let mut args = self.inlet_args(identity, outlet, extra);
        args.push("--check".into());
        let out = self
            .home
            .run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        Ok(if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            Err(text(&out.stderr))
        })
    }
}

const ANALYSTS: &str = r#"@id("analysts-of-the-team")
permit(principal, action == Action::"connect", resource)
when { principal has role && principal.role == "analyst"
       && principal has team && resource has team && principal.team == resource.team };
"#;

const LEADS: &str = r#"@id("leads")
permit(principal, action == Action::"connect", resource == Service::"db")
when { principal has role && principal.role == "lead" };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_register_connect_and_live_tunnels() -> Result<()> {
    let pg = TempPg::start_async().await?;
    let stack = Stack::start().await?;
    let relay = stack.relay();
    let outlet_id = enroll(&stack.home, relay, "outlet", &["role=db-outlet"])?;
    enroll(
        &stack.home,
        relay,
        "impostor",
        &["role=analyst", "team=data"],
    )?;
    enroll(
        &stack.home,
        relay,
        "analyst",
        &["role=analyst", "team=data"],
    )?;
    enroll(&stack.home, relay, "intern", &["role=intern", "team=data"])?;
    enroll(&stack.home, relay, "lead", &["role=lead"])?;

    // An identity the register policy does not name cannot claim "db", even
    // though it is first; the relay says why.
    let target = pg.addr().to_string();
    let mut impostor = stack.outlet("impostor", &target, &["--allow-attr", "role=analyst"])?;
    impostor
        .wait_for_stderr("relay refused the registration", STARTUP)
        .await?;
    let log = impostor.stderr();
    ensure!(
        log.contains("denied by relay") && log.contains("register"),
        "unclear refusal: {log}"
    );

    let policies = tempfile::tempdir()?;
    write(policies.path(), "analysts.cedar", ANALYSTS)?;
    write(policies.path(), "leads.cedar", LEADS)?;
    let audit = stack.home.path().join("outlet-audit.jsonl");
    let mut outlet = stack.outlet(
        "outlet",
        &target,
        &[
            "--policies",
            &policies.path().display().to_string(),
            "--service-attr",
            "team=data",
            "--audit-log",
            &audit.display().to_string(),
        ],
    )?;
    outlet
        .wait_for_stderr("service registered at relay", STARTUP)
        .await?;
    ensure!(outlet.stderr().contains("policies loaded"));
    // The impostor keeps being refused; the legitimate outlet keeps the name.
    drop(impostor);

    // The intern's credential lacks the attribute: denied, with an
    // explanation naming no attribute values.
    let denied = stack
        .check("intern", &outlet_id, &[])?
        .err()
        .context("the intern was admitted")?;
    ensure!(
        denied.contains("access to service \"db\" denied by outlet")
            && denied.contains("no policy permits connect to db"),
        "unclear denial: {denied}"
    );
    ensure!(
        !denied.contains("\"intern\""),
        "denial leaks a value: {denied}"
    );

    // The inlet checks the outlet too: it must be vouched for as a db outlet.
    stack
        .check(
            "analyst",
            &outlet_id,
            &["--require-outlet-attr", "role=db-outlet"],
        )?
        .map_err(|e| anyhow::anyhow!("the analyst was refused: {e}"))?;
    let refused = stack
        .check(
            "analyst",
            &outlet_id,
            &["--require-outlet-attr", "role=authority"],
        )?
        .err()
        .context("an outlet without the required attribute was accepted")?;
    ensure!(
        refused.contains("outlet refused") && refused.contains("\"role\""),
        "unclear refusal: {refused}"
    );

    // The analyst and the lead both get through.
    let (_analyst_inlet, analyst_port) = stack.inlet("analyst", &outlet_id).await?;
    let (_lead_inlet, lead_port) = stack.inlet("lead", &outlet_id).await?;
    let analyst = TempPg::connect_to("127.0.0.1", analyst_port).await?;
    let lead = TempPg::connect_to("127.0.0.1", lead_port).await?;
    for client in [&analyst, &lead] {
        let one: i32 = client.query_one("select 1", &[]).await?.get(0);
        ensure!(one == 1);
    }

    // Analysts lose access: the analyst's live session ends within 5 s, the
    // lead's is not disturbed.
    let changed = Instant::now();
    std::fs::remove_file(policies.path().join("analysts.cedar"))?;
    let mut closed = None;
    while changed.elapsed() < Duration::from_secs(6) {
        if analyst.query_one("select 1", &[]).await.is_err() {
            closed = Some(changed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = closed.with_context(|| {
        format!(
            "the analyst's session outlived the policy change; outlet log:\n{}",
            outlet.stderr()
        )
    })?;
    ensure!(
        closed <= Duration::from_secs(5),
        "closed only after {closed:?}"
    );
    println!("policy change closed the analyst's tunnel after {closed:?}");
    let two: i32 = lead.query_one("select 2", &[]).await?.get(0);
    ensure!(two == 2, "the lead's session was disturbed");
    outlet
        .wait_for_stderr(
            "policy no longer permits a live tunnel",
            Duration::from_secs(2),
        )
        .await?;

    // A broken change is refused with diagnostics and changes nothing.
    write(
        policies.path(),
        "leads.cedar",
        "permit(principal, action, resource) when {",
    )?;
    outlet
        .wait_for_stderr("policy reload refused", Duration::from_secs(5))
        .await?;
    ensure!(outlet.stderr().contains("leads.cedar"));
    let three: i32 = lead.query_one("select 3", &[]).await?.get(0);
    ensure!(three == 3);
    stack
        .check("lead", &outlet_id, &[])?
        .map_err(|e| anyhow::anyhow!("a broken reload dropped the working policies: {e}"))?;

    // Every decision is in the audit log, whose chain verifies.
    drop(analyst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = postern_policies::audit::verify(&audit)
        .map_err(|e| anyhow::anyhow!("outlet audit log: {e}"))?;
    let records = std::fs::read_to_string(&audit)?;
    for needle in [
        r#""event":"connect""#,
        r#""decision":"deny""#,
        r#""decision":"allow""#,
        r#""event":"policy_reload""#,
        r#""ok":false"#,
        r#""event":"tunnel_closed""#,
        "access withdrawn",
    ] {
        ensure!(
            records.contains(needle),
            "no {needle} in the audit log:\n{records}"
        );
    }
    println!("outlet audit log: {report:?}");
    let records = std::fs::read_to_string(&stack.relay_audit)?;
    ensure!(
        records.contains(r#""event":"register""#) && records.contains(r#""decision":"deny""#),
        "relay audit log:\n{records}"
    );
    postern_policies::audit::verify(&stack.relay_audit)
        .map_err(|e| anyhow::anyhow!("relay audit log: {e}"))?;

    // Revoking the outlet reaches the relay too: it drops the outlet's hop
    // channel (and so the registration) within seconds, telling it why, and
    // refuses the revoked identity when the outlet comes back.
    run(&stack.home, &["authority", "revoke", &outlet_id])?;
    outlet
        .wait_for_stderr("the relay refused this outlet", Duration::from_secs(8))
        .await
        .context("the relay kept the revoked outlet's hop channel")?;
    let log = outlet.stderr();
    ensure!(log.contains("revoked"), "unclear refusal: {log}");
    drop(stack.relay_policies);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_policies_admit_nobody_and_broken_ones_stop_the_outlet() -> Result<()> {
    let home = PosternHome::new()?;
    home.create_identity("outlet")?;
    let relay_id = home.create_identity("relay")?.to_string();
    let dir = tempfile::tempdir()?;
    let policies = dir.path().display().to_string();
    let outlet = |home: &PosternHome| {
        home.spawn(&[
            "outlet",
            "--identity",
            "outlet",
            "--relay",
            "127.0.0.1:9",
            "--relay-identity",
            &relay_id,
            "--service",
            "db",
            "--target",
            "127.0.0.1:5432",
            "--policies",
            &policies,
        ])
    };
    // An empty directory: default deny, said at start-up.
    let mut empty = outlet(&home)?;
    empty
        .wait_for_stderr("admits nobody (default deny)", STARTUP)
        .await?;
    drop(empty);

    // A syntax error: the outlet does not start, and says where.
    write(
        dir.path(),
        "broken.cedar",
        "permit(principal, action == Action::\"connect\", resource)\nwhen { principal.role == };\n",
    )?;
    let mut broken = outlet(&home)?;
    let status = broken.wait_exit(STARTUP).await?;
    let err = broken.stderr();
    ensure!(!status.success(), "started on broken policies: {err}");
    ensure!(
        err.contains("broken.cedar:2:") && err.contains("postern policy validate"),
        "diagnostics without a location: {err}"
    );

    // A schema error (an attribute Postern does not define) is caught too.
    write(
        dir.path(),
        "broken.cedar",
        "permit(principal, action == Action::\"connect\", resource) when { principal.shoe_size == 9 };\n",
    )?;
    let mut schema = outlet(&home)?;
    let status = schema.wait_exit(STARTUP).await?;
    ensure!(!status.success(), "started on a schema error");
    ensure!(schema.stderr().contains("shoe_size"), "{}", schema.stderr());

    // --policies with --allow is refused with a way out.
    std::fs::remove_file(dir.path().join("broken.cedar"))?;
    let out = home.run(&[
        "outlet",
        "--identity",
        "outlet",
        "--relay",
        "127.0.0.1:9",
        "--relay-identity",
        &relay_id,
        "--service",
        "db",
        "--target",
        "127.0.0.1:5432",
        "--policies",
        &policies,
        "--allow",
        &relay_id,
    ])?;
    let err = text(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("--policies replaces --allow"),
        "{err}"
    );
    Ok(())
}
