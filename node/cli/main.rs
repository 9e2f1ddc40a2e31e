//! The `postern` command: thin glue between the command line (or a TOML
//! file), the libraries, signals and exit codes.
#![forbid(unsafe_code)]

mod args;
mod config;

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

fn load_identity(home: &std::path::Path, name: &str) -> Result<Identity> {
    let path = keyfile::resolve(home, name)?;
    keyfile::load(&path).map_err(|e| match e {
        postern_identity::IdentityError::NotFound { path, .. } => anyhow::anyhow!(
            "no identity {name:?} at {}: create it first with `postern identity create{}`",
            path.display(),
            if name == keyfile::DEFAULT_NAME {
                String::new()
            } else {
                format!(" --name {name}")
            }
        ),
        other => other.into(),
    })
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

async fn dispatch(cli: Cli) -> Result<()> {
    let home = home(&cli.home);
    match cli.command {
        Command::Identity { command } => identity(&home, command),
        Command::Relay(args) => {
            let cfg = config::relay(args)?;
            let identity = load_identity(&home, &cfg.identity)?;
            let relay = Relay::bind(identity, cfg.relay).await?;
            let addr = relay
                .local_addr()
                .context("cannot read the bound address")?;
            eprintln!("relay {} listening on {addr}", relay.identifier());
            let stop = on_signal()?;
            relay.run(stop).await;
            Ok(())
        }
        Command::Outlet(args) => {
            let cfg = config::outlet(args)?;
            let identity = load_identity(&home, &cfg.identity)?;
            let node = Outlet::start(identity, cfg.outlet)?;
            let stop = on_signal()?;
            let node_stop = node.stop_token();
            tokio::spawn(async move {
                stop.cancelled().await;
                node_stop.cancel();
            });
            node.join().await;
            Ok(())
        }
        Command::Inlet(args) => {
            let check = args.check;
            let cfg = config::inlet(args)?;
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
            let stop = on_signal()?;
            let node_stop = node.stop_token();
            tokio::spawn(async move {
                stop.cancelled().await;
                node_stop.cancel();
            });
            node.join().await;
            Ok(())
        }
    }
}

fn identity(home: &std::path::Path, command: IdentityCommand) -> Result<()> {
    match command {
        IdentityCommand::Create { name } => {
            let path = keyfile::resolve(home, &name)?;
            let identity = keyfile::create(&path)?;
            println!("{}", identity.identifier());
            eprintln!(
                "created identity {name:?} in {} (keep this file private)",
                path.display()
            );
            Ok(())
        }
        IdentityCommand::Show {
            name,
            path: show_path,
        } => {
            let path = keyfile::resolve(home, &name)?;
            let identity = load_identity(home, &name)?;
            println!("{}", identity.identifier());
            if show_path {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}
