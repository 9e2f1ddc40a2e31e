//! Command-line syntax. Every role runs from flags alone; `--config FILE`
//! gives the same settings as TOML, and flags override the file.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use postern_identity::wire::ServiceName;
use postern_identity::Identifier;
use postern_node::Target;

/// Postern: a zero-trust tunnel for databases.
///
/// An outlet beside the database dials out to a relay and registers the
/// database as a named service; an inlet on your machine listens on loopback
/// and opens an end-to-end encrypted tunnel to the outlet for every
/// connection. The relay only forwards ciphertext.
///
/// Typical set-up (each line on its own machine):
///
///   postern identity create
///   postern relay  --listen 0.0.0.0:4000
///   postern outlet --relay relay.example:4000 --relay-identity P… --service db-prod --target 127.0.0.1:5432 --allow P…
///   postern inlet  --relay relay.example:4000 --relay-identity P… --service db-prod --outlet-identity P…
///   psql -h 127.0.0.1 -p 15432 …
#[derive(Debug, Parser)]
#[command(name = "postern", version, verbatim_doc_comment, max_term_width = 100)]
pub struct Cli {
    /// Postern's home directory (identities live in <home>/identities).
    #[arg(long, global = true, env = "POSTERN_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// More log output (-v debug, -vv trace). POSTERN_LOG=<filter> overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or show the identity (Ed25519 key pair) this machine uses.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Run a relay: the only component with a port other machines reach.
    Relay(RelayArgs),
    /// Run an outlet beside a database: registers it as a service at a relay.
    Outlet(OutletArgs),
    /// Run an inlet on your machine: a loopback port leading to a service.
    Inlet(InletArgs),
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Create a new identity and print its identifier. Never overwrites.
    Create {
        /// Name of the identity (stored as <home>/identities/<name>.key).
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Print an identity's identifier (the P… string others pin or allow).
    Show {
        /// Name of the identity, or a path to a key file.
        #[arg(long, default_value = "default")]
        name: String,
        /// Also print the key file's path.
        #[arg(long)]
        path: bool,
    },
}

/// Settings every role shares.
#[derive(Debug, Args)]
pub struct Common {
    /// TOML file with the same settings as the flags (flags win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Identity to run as: a name under <home>/identities, or a key file path.
    /// [default: default]
    #[arg(long, env = "POSTERN_IDENTITY", value_name = "NAME|PATH")]
    pub identity: Option<String>,
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub common: Common,
    /// Address to listen on. [default: 0.0.0.0:4000]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

/// How to reach the relay.
#[derive(Debug, Args)]
pub struct RelayFlags {
    /// The relay's address, host:port.
    #[arg(long, value_name = "HOST:PORT")]
    pub relay: Option<String>,
    /// The relay's identifier (printed by `postern identity show` on the
    /// relay host). Any other identity is refused.
    #[arg(long, value_name = "P…")]
    pub relay_identity: Option<Identifier>,
}

#[derive(Debug, Args)]
pub struct OutletArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub relay: RelayFlags,
    /// Name to register the target under.
    #[arg(long, value_name = "NAME")]
    pub service: Option<ServiceName>,
    /// Where tunnels lead: host:port, or unix:/path/to/socket.
    #[arg(long, value_name = "HOST:PORT|unix:PATH")]
    pub target: Option<Target>,
    /// An identifier allowed to connect (repeatable). Nobody else is admitted;
    /// with no --allow at all, nobody is.
    #[arg(long, value_name = "P…")]
    pub allow: Vec<Identifier>,
}

#[derive(Debug, Args)]
pub struct InletArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub relay: RelayFlags,
    /// Service to reach.
    #[arg(long, value_name = "NAME")]
    pub service: Option<ServiceName>,
    /// Local address for clients. [default: 127.0.0.1:15432]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// The outlet's identifier. Any other identity answering is refused.
    #[arg(long, value_name = "P…")]
    pub outlet_identity: Option<Identifier>,
    /// Allow --listen on a non-loopback address. Anyone who can reach that
    /// address then uses the tunnel with your identity.
    #[arg(long)]
    pub dangerous_allow_non_loopback: bool,
    /// Open one tunnel, report whether the outlet admits you, and exit.
    #[arg(long)]
    pub check: bool,
}
