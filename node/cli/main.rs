//! The `postern` command: thin glue between the command line (or a TOML
//! file), the libraries, signals and exit codes.
#![forbid(unsafe_code)]

mod args;
mod authority;
mod config;
mod keys;
mod policy;
mod ticket_source;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use postern_identity::keyfile;
use postern_identity::secret_env::SecretEnv;
use postern_identity::Identity;
use postern_node::{Inlet, Outlet};
use postern_policies::audit::AuditLog;
use postern_relay::Relay;
use tokio_util::sync::CancellationToken;

use args::{Cli, Command, IdentityCommand};

fn main() -> ExitCode {
    // First, while this is the only thread and before any child process
    // exists: take POSTERN_PASSPHRASE, POSTERN_KEY_FILE and POSTERN_TICKET
    // out of the environment (and out of /proc/<pid>/environ).
    let (secrets, wiped) = SecretEnv::take_from_process();
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    if let Err(e) = wiped {
        tracing::warn!("{e}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli, &secrets)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_env("POSTERN_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn home(cli_home: &Option<PathBuf>) -> PathBuf {
    cli_home.clone().unwrap_or_else(keyfile::home_dir)
}

/// Loads identity `name` for any role. An encrypted key file is opened with
/// `$POSTERN_PASSPHRASE` (else a prompt on the terminal) or
/// `$POSTERN_KEY_FILE`, as `keys` explains.
fn load_identity(home: &std::path::Path, name: &str, secrets: &SecretEnv) -> Result<Identity> {
    keys::load(home, name, None, secrets).map(|(identity, _)| identity)
}

/// Cancels the returned token on Ctrl-C or SIGTERM.
fn on_signal() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down (signal received)");
        cancel.cancel();
    });
    Ok(token)
}

/// The first Ctrl-C or SIGTERM drains the node (no new tunnels; open ones
/// get `--drain-grace` to finish); a second one closes them at once.
fn drain_on_signals(node: &postern_node::NodeHandle) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let (drain, stop) = (node.drain_token(), node.stop_token());
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("draining (signal received; send another to close every tunnel now)");
        drain.cancel();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping now (second signal)");
        stop.cancel();
    });
    Ok(())
}

/// Reopens the audit logs on SIGHUP, after logrotate moved them (see
/// `AuditLog::reopen`). Without logs, SIGHUP keeps its default (it ends the
/// process).
pub(crate) fn reopen_on_hangup(logs: Vec<Arc<AuditLog>>) -> Result<()> {
    if logs.is_empty() {
        return Ok(());
    }
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            for log in &logs {
                let log = Arc::clone(log);
                let path = log.path().display().to_string();
                match tokio::task::spawn_blocking(move || log.reopen()).await {
                    Ok(Ok(())) => tracing::info!(%path, "audit log reopened (SIGHUP)"),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot reopen the audit log (SIGHUP); its records are kept in memory and the open is retried every second")
                    }
                    Err(e) => tracing::error!(%path, error = %e, "audit log reopen did not finish"),
                }
            }
        }
    });
    Ok(())
}

/// Before exiting: writes what is queued and a final signed checkpoint.
pub(crate) async fn close_audit(log: Option<Arc<AuditLog>>) {
    let Some(log) = log else { return };
    match tokio::task::spawn_blocking(move || log.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "audit log closed with records not written"),
        Err(e) => tracing::error!(error = %e, "closing the audit log did not finish"),
    }
}

async fn dispatch(cli: Cli, secrets: &SecretEnv) -> Result<()> {
    let home = home(&cli.home);
    let load_identity = |home: &std::path::Path, name: &str| load_identity(home, name, secrets);
    match cli.command {
        Command::Identity { command } => identity(&home, command, secrets),
        Command::Relay(args) => {
            let mut cfg = config::relay(args)?;
            let identity = load_identity(&home, &cfg.identity)?;
            cfg.relay.audit = config::AuditSettings::open(cfg.audit.as_ref(), identity.clone())?;
            let audit = cfg.relay.audit.clone();
            reopen_on_hangup(audit.iter().cloned().collect())?;
            // The relay follows the trusted authorities' revocations itself,
            // on their own hop channels.
            let relay = Relay::bind(identity, cfg.relay).await?;
            let addr = relay
                .local_addr()
                .context("cannot read the bound address")?;
            eprintln!("relay {} listening on {addr}", relay.identifier());
            relay.run(on_signal()?).await;
            close_audit(audit).await;
            Ok(())
        }
        Command::Outlet(args) => {
            let mut cfg = config::outlet(&home, args)?;
            let identity = load_identity(&home, &cfg.identity)?;
            cfg.outlet.audit = config::AuditSettings::open(cfg.audit.as_ref(), identity.clone())?;
            let audit = cfg.outlet.audit.clone();
            reopen_on_hangup(audit.iter().cloned().collect())?;
            // The outlet follows its trusted authorities' revocations and
            // renews its credential itself, over its hop channel.
            let node = Outlet::start(identity, cfg.outlet)?;
            drain_on_signals(&node)?;
            node.join().await;
            close_audit(audit).await;
            Ok(())
        }
        Command::Authority { command } => {
            authority::run(&home, command, |name| load_identity(&home, name), on_signal).await
        }
        Command::Enroll(args) => authority::enroll(&home, args, secrets).await,
        Command::Policy { command } => policy::run_policy(command),
        Command::Audit { command } => policy::run_audit(command),
        Command::Inlet(args) => {
            let check = args.check;
            let cfg = config::inlet(&home, args)?;
            let identity = load_identity(&home, &cfg.identity)?;
            if check {
                let report = postern_node::check(identity, &cfg.inlet).await?;
                println!(
                    "ok: outlet {} admits this identity to service \"{}\" ({:.1?})",
                    report.outlet, cfg.inlet.service, report.elapsed
                );
                return Ok(());
            }
            let node = Inlet::start(identity, cfg.inlet.clone()).await?;
            if let Some(addr) = node.local_addr() {
                eprintln!(
                    "inlet for service \"{}\" listening on {addr}",
                    cfg.inlet.service
                );
            }
            drain_on_signals(&node)?;
            node.join().await;
            Ok(())
        }
    }
}

fn identity(home: &std::path::Path, command: IdentityCommand, secrets: &SecretEnv) -> Result<()> {
    match command {
        IdentityCommand::Create {
            name,
            encrypt,
            key_file,
        } => {
            let identity = keys::create(home, &name, encrypt, key_file.as_deref(), secrets)?;
            println!("{}", identity.identifier());
            Ok(())
        }
        IdentityCommand::Encrypt {
            name,
            encrypt,
            key_file,
        } => {
            let (identity, protection) =
                keys::encrypt_existing(home, &name, encrypt, key_file.as_deref(), secrets)?;
            println!("{}", identity.identifier());
            let opened_with = match protection {
                postern_identity::sealed::Protection::Key => {
                    "every role opens it with POSTERN_KEY_FILE (or --key-file where a command has it)"
                }
                _ => "every role opens it with POSTERN_PASSPHRASE, else asks on the terminal",
            };
            eprintln!(
                "identity {name:?}: secret key now {protection}; {opened_with}. Copies of the old \
                 file (backups) still hold the key unencrypted."
            );
            Ok(())
        }
        IdentityCommand::Show {
            name,
            path: show_path,
            key_file,
        } => {
            let path = keyfile::resolve(home, &name)?;
            let (identity, protection) = keys::load(home, &name, key_file.as_deref(), secrets)?;
            println!("{}", identity.identifier());
            if show_path {
                println!("{}", path.display());
            }
            eprintln!("identity {name:?}: secret key {protection}");
            Ok(())
        }
        IdentityCommand::Keygen { out } => {
            keys::keygen(&out)?;
            let out = out.display();
            eprintln!(
                "wrote a new random key to {out} (mode 0600). Keep it private and back it up: an \
                 identity encrypted with it cannot be opened without it. Use it with \
                 `postern identity create --encrypt key-file --key-file {out}`, and run roles with \
                 POSTERN_KEY_FILE={out}"
            );
            Ok(())
        }
    }
}
