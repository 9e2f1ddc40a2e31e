//! The `postern` command: thin glue between the command line (or a TOML
//! file), the libraries, signals and exit codes.
#![forbid(unsafe_code)]

mod args;
mod authority;
mod config;
mod keys;
mod policy;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use postern_identity::keyfile;
use postern_identity::Identity;
use postern_node::{Inlet, Outlet};
use postern_relay::Relay;
use tokio_util::sync::CancellationToken;

use args::{Cli, Command, IdentityCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
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
    match runtime.block_on(dispatch(cli)) {
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
fn load_identity(home: &std::path::Path, name: &str) -> Result<Identity> {
    keys::load(home, name, None).map(|(identity, _)| identity)
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

/// The address to dial this machine's own listener at: a wildcard bind
/// (`0.0.0.0`, `::`) is reached through loopback.
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, addr.port())
}

/// Renews the node's credential (if it has one) before it expires, through
/// `relay`, saving each new one to `file`; see `postern_node::renewal`.
fn renew_in_background(
    home: &std::path::Path,
    identity: &str,
    relay: &postern_node::RelayEndpoint,
    trust: &std::sync::Arc<postern_node::Trust>,
    timeouts: &postern_node::Timeouts,
    file: Option<PathBuf>,
    stop: CancellationToken,
) -> Result<()> {
    if trust.credential().is_none() {
        return Ok(());
    }
    let local = std::sync::Arc::new(postern_identity::handshake::LocalParty::new(
        load_identity(home, identity)?,
    )?);
    tokio::spawn(postern_node::renewal::keep_renewed(
        local,
        relay.clone(),
        std::sync::Arc::clone(trust),
        timeouts.clone(),
        file,
        stop,
    ));
    Ok(())
}

async fn dispatch(cli: Cli) -> Result<()> {
    let home = home(&cli.home);
    match cli.command {
        Command::Identity { command } => identity(&home, command),
        Command::Relay(args) => {
            let mut cfg = config::relay(args)?;
            let identity = load_identity(&home, &cfg.identity)?;
            // Revocations from the trusted authorities, heard through this
            // relay itself (the authorities are services behind it).
            let revocations = std::sync::Arc::new(postern_node::Trust::new(
                cfg.relay.authorities.iter().copied().collect(),
            ));
            if !cfg.relay.authorities.is_empty() {
                cfg.relay.revocations = Some(postern_relay::Revocations(revocations.clone()));
            }
            let authorities: Vec<_> = cfg.relay.authorities.iter().copied().collect();
            let relay = Relay::bind(identity, cfg.relay).await?;
            let addr = relay
                .local_addr()
                .context("cannot read the bound address")?;
            eprintln!("relay {} listening on {addr}", relay.identifier());
            let stop = on_signal()?;
            let own =
                postern_node::RelayEndpoint::new(reachable(addr).to_string(), relay.identifier());
            for authority in authorities {
                let local = std::sync::Arc::new(postern_identity::handshake::LocalParty::new(
                    load_identity(&home, &cfg.identity)?,
                )?);
                let route = postern_node::authority::AuthorityRoute {
                    relay: own.clone(),
                    authority,
                    service: postern_identity::wire::ServiceName::of_authority(&authority),
                };
                tokio::spawn(postern_node::authority::follow_revocations(
                    local,
                    route,
                    std::sync::Arc::clone(&revocations),
                    postern_node::Timeouts::default(),
                    stop.child_token(),
                ));
            }
            relay.run(stop).await;
            Ok(())
        }
        Command::Outlet(args) => {
            let cfg = config::outlet(&home, args)?;
            let identity = load_identity(&home, &cfg.identity)?;
            // Revocations from each trusted authority, reached through the
            // outlet's relay, close the tunnels they no longer allow.
            let feeds = tokio_util::sync::CancellationToken::new();
            for &authority_id in cfg.outlet.trust.authorities().iter() {
                let local = std::sync::Arc::new(postern_identity::handshake::LocalParty::new(
                    load_identity(&home, &cfg.identity)?,
                )?);
                let route = postern_node::authority::AuthorityRoute {
                    relay: cfg.outlet.relay.clone(),
                    authority: authority_id,
                    service: postern_identity::wire::ServiceName::of_authority(&authority_id),
                };
                tokio::spawn(postern_node::authority::follow_revocations(
                    local,
                    route,
                    std::sync::Arc::clone(&cfg.outlet.trust),
                    cfg.outlet.timeouts.clone(),
                    feeds.child_token(),
                ));
            }
            renew_in_background(
                &home,
                &cfg.identity,
                &cfg.outlet.relay,
                &cfg.outlet.trust,
                &cfg.outlet.timeouts,
                cfg.credential_file.clone(),
                feeds.child_token(),
            )?;
            let _feeds = feeds.drop_guard();
            let node = Outlet::start(identity, cfg.outlet)?;
            drain_on_signals(&node)?;
            node.join().await;
            Ok(())
        }
        Command::Authority { command } => {
            authority::run(&home, command, |name| load_identity(&home, name), on_signal).await
        }
        Command::Enroll(args) => authority::enroll(&home, args).await,
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
            let renewal = CancellationToken::new();
            renew_in_background(
                &home,
                &cfg.identity,
                &cfg.inlet.relay,
                &cfg.inlet.trust,
                &cfg.inlet.timeouts,
                cfg.credential_file.clone(),
                renewal.child_token(),
            )?;
            let _renewal = renewal.drop_guard();
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

fn identity(home: &std::path::Path, command: IdentityCommand) -> Result<()> {
    match command {
        IdentityCommand::Create {
            name,
            encrypt,
            key_file,
        } => {
            let path = keyfile::resolve(home, &name)?;
            // Refuse before asking for a passphrase that would be wasted.
            if path.symlink_metadata().is_ok() {
                return Err(postern_identity::IdentityError::AlreadyExists { path }.into());
            }
            let source = keys::source_for_create(&name, encrypt, key_file.as_deref())?;
            let identity = keyfile::create_with(&path, &source)?;
            println!("{}", identity.identifier());
            eprintln!(
                "created identity {name:?} in {} (keep this file private; its secret key is {})",
                path.display(),
                source.protection()
            );
            if source.protection() == postern_identity::sealed::Protection::Unencrypted {
                if let Some(var) = keys::secret_in_env() {
                    eprintln!(
                        "note: {var} is set but was not used, because --encrypt was not given"
                    );
                }
                eprintln!(
                    "hint: for a service or a shared machine, encrypt the key: `--encrypt passphrase` \
                     (POSTERN_PASSPHRASE or a prompt), or `--encrypt key-file --key-file PATH` \
                     (see `postern identity keygen`)"
                );
            }
            Ok(())
        }
        IdentityCommand::Show {
            name,
            path: show_path,
            key_file,
        } => {
            let path = keyfile::resolve(home, &name)?;
            let (identity, protection) = keys::load(home, &name, key_file.as_deref())?;
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
