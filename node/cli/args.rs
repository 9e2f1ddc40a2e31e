//! Command-line syntax. Every role runs from flags alone; `--config FILE`
//! gives the same settings as TOML, and flags override the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use postern_identity::wire::ServiceName;
use postern_identity::Identifier;
use postern_node::{AttributeRule, RelayEndpoint, Target, TrustAnchor};

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
    /// Create, show or encrypt the identity (Ed25519 key pair) this machine
    /// uses.
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
    /// Run or administer an authority: it vouches for identities with signed
    /// credentials, issues enrollment tickets and publishes revocations.
    Authority {
        #[command(subcommand)]
        command: crate::authority::AuthorityCommand,
    },
    /// Enroll this machine: with a ticket from an authority's admin (pasted
    /// when asked, or --ticket-file, `-`, POSTERN_TICKET; never as an
    /// argument), or by logging in at the identity provider (--oidc,
    /// --device); --renew gets a fresh credential. Creates the identity if
    /// needed and stores the credential the authority issues.
    Enroll(crate::authority::EnrollArgs),
    /// Check, test and explain Cedar access policies (offline; nothing is
    /// contacted).
    ///
    /// Outlets decide `connect` and relays decide `register` with the *.cedar
    /// files of a directory (--policies DIR). A request has a principal (an
    /// Identity: its identifier, and the attributes its credentials vouch for,
    /// such as team, role and groups), an action (connect or register), a
    /// resource (a Service: its name and the attributes its outlet declares
    /// with --service-attr, such as env) and a context (time, hour_utc,
    /// weekday, and the relay-asserted source_ip). Everything is denied unless
    /// a permit applies, and a forbid beats every permit. `postern policy
    /// schema` prints the full schema.
    Policy {
        #[command(subcommand)]
        command: crate::policy::PolicyCommand,
    },
    /// Verify the tamper-evident audit log that nodes write with
    /// --audit-log FILE.
    ///
    /// Every record carries the SHA-256 of the one before it, so a changed,
    /// deleted, inserted or reordered line breaks the chain where it happened.
    Audit {
        #[command(subcommand)]
        command: crate::policy::AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Create a new identity and print its identifier. Never overwrites.
    ///
    /// At a terminal the secret key is encrypted with a passphrase (asked
    /// twice, or POSTERN_PASSPHRASE) unless --encrypt says otherwise. Without
    /// a terminal (scripts, services) it is stored unencrypted, protected
    /// only by the file's mode (0600), unless --encrypt is given; the output
    /// then says how to encrypt it (`postern identity encrypt`). Every role
    /// opens an encrypted identity with POSTERN_PASSPHRASE (else a prompt on
    /// the terminal) or POSTERN_KEY_FILE.
    Create {
        /// Name of the identity (stored as <home>/identities/<name>.key).
        #[arg(long, default_value = "default")]
        name: String,
        /// How to protect the secret key: a passphrase (POSTERN_PASSPHRASE,
        /// else asked twice on the terminal), a key file (--key-file, else
        /// POSTERN_KEY_FILE), or none (explicitly unencrypted).
        /// [default: passphrase at a terminal, otherwise none]
        #[arg(long, value_name = "HOW")]
        encrypt: Option<crate::keys::Encryption>,
        /// Key file (mode 0600) for --encrypt key-file, which it implies.
        /// [default: $POSTERN_KEY_FILE]
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
    /// Encrypt the secret key of an existing, unencrypted identity, in place
    /// (its identifier and credentials stay the same).
    Encrypt {
        /// Name of the identity, or a path to a key file.
        #[arg(long, default_value = "default")]
        name: String,
        /// With a passphrase (POSTERN_PASSPHRASE, else asked twice on the
        /// terminal) or a key file (--key-file, else POSTERN_KEY_FILE).
        /// [default: passphrase]
        #[arg(long, value_name = "HOW")]
        encrypt: Option<crate::keys::Encryption>,
        /// Key file (mode 0600) for --encrypt key-file, which it implies.
        /// [default: $POSTERN_KEY_FILE]
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
    /// Print an identity's identifier (the P… string others pin or allow).
    /// Opens the key, so it also checks the passphrase or key file; how the
    /// key is protected is printed to standard error.
    Show {
        /// Name of the identity, or a path to a key file.
        #[arg(long, default_value = "default")]
        name: String,
        /// Also print the key file's path.
        #[arg(long)]
        path: bool,
        /// Key file that opens an identity encrypted with a key.
        /// [default: $POSTERN_KEY_FILE]
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
    /// Write a new random 32-byte key to a new file (mode 0600), to encrypt
    /// the identities of unattended services (--encrypt key-file).
    Keygen {
        /// Where to write the key. Never overwrites.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
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
    #[command(flatten)]
    pub limits: RelayLimitFlags,
    /// Directory of Cedar policies (*.cedar) deciding which node may
    /// register which service name (action "register"; default deny).
    /// Re-read once a second; a broken change keeps the previous policies.
    /// [default: none: the first node to register a name holds it]
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// With --policies, also decide "connect" for every tunnel request
    /// before minting a token, so an identity the policies do not let reach
    /// a service cannot make its outlet dial for it. The relay does not know
    /// the service's attributes (only its outlet does): write these
    /// policies on principal attributes. The outlet still decides too.
    #[arg(long, requires = "policies")]
    pub precheck_connect: bool,
    /// An authority whose credentials nodes present on their hop channels
    /// (repeatable), as P… or P…@SERVICE: their attributes reach the
    /// register policies; the authority registers its own name (SERVICE, or
    /// its default authority-P…) without policies and feeds the relay its
    /// revocations on its hop channel, which close the hop channels of
    /// revoked nodes.
    #[arg(long, value_name = "P…[@SERVICE]")]
    pub trust_authority: Vec<TrustAnchor>,
    /// Refuse registrations by nodes other than the trusted authorities once
    /// an authority's revocations are older than this (it is not connected
    /// to this relay, or never was since start). [default: 2m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_revocation_staleness: Option<Duration>,
    /// Append every registration decision to this hash-chained audit log,
    /// with checkpoints signed by the relay's identity (check it with
    /// `postern audit verify FILE --signer P…`). One process per file;
    /// SIGHUP reopens it after rotation.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Refuse registrations while the audit log cannot be written (disk
    /// full, file gone). Default: keep admitting, log errors, and write the
    /// queued records when the disk recovers.
    #[arg(long)]
    pub audit_fail_closed: bool,
}

/// The relay's limits (defaults are safe for the open internet).
#[derive(Debug, Args)]
pub struct RelayLimitFlags {
    /// A connection not authenticated this long after connecting is cut
    /// (e.g. 10s, 500ms). [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// Most connections (hop and data) at once. [default: 20000]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most connections still authenticating at once. [default: 1024]
    #[arg(long, value_name = "N")]
    pub max_pending_handshakes: Option<usize>,
    /// Most connections still authenticating at once from one IPv4 address
    /// or IPv6 /64. [default: 256]
    #[arg(long, value_name = "N")]
    pub max_pending_per_source: Option<usize>,
    /// Most tunnels carried at once; further opens are refused. [default: 10000]
    #[arg(long, value_name = "N")]
    pub max_tunnels: Option<usize>,
    /// Most tunnels one node may be an end of at once (spliced, as inlet or
    /// outlet, plus those it asked for that are being set up), so that no
    /// single node takes the whole relay. [default: 1024]
    #[arg(long, value_name = "N")]
    pub max_tunnels_per_node: Option<usize>,
    /// Most connections of any kind (authenticating, hop channels, data
    /// connections, tunnels) from one IPv4 address or IPv6 /64.
    /// [default: 4096]
    #[arg(long, value_name = "N")]
    pub max_connections_per_source: Option<usize>,
    /// Most tunnels one node may have asked for that are still being set
    /// up; a token counts against the node that asked for it, never
    /// against the outlet. [default: 128]
    #[arg(long, value_name = "N")]
    pub max_pending_opens_per_node: Option<usize>,
    /// Most tunnels being set up that nodes from one address asked for.
    /// [default: 256]
    #[arg(long, value_name = "N")]
    pub max_pending_opens_per_source: Option<usize>,
    /// Tunnel opens per second one identity may make (bursts of as many).
    /// [default: 5000]
    #[arg(long, value_name = "N")]
    pub opens_per_second_per_node: Option<u32>,
    /// Most service names one hop channel may hold. [default: 64]
    #[arg(long, value_name = "N")]
    pub max_services_per_session: Option<usize>,
}

/// Failover, tunnel limits and lifecycle of an outlet or inlet.
#[derive(Debug, Args)]
pub struct NodeLifecycleFlags {
    /// Another relay to use when the first is unreachable or its session
    /// ends, as IDENTIFIER@HOST:PORT (repeatable; tried in order). Give
    /// outlets and inlets of a service the same relays in the same order.
    #[arg(long, value_name = "P…@HOST:PORT", value_parser = parse_relay_endpoint)]
    pub fallback_relay: Vec<RelayEndpoint>,
    /// Most tunnels at once; further ones are refused with a logged reason.
    /// [default: 1024]
    #[arg(long, value_name = "N")]
    pub max_tunnels: Option<usize>,
    /// Close a tunnel that carried no data either way for this long
    /// (e.g. 30m, 1h). [default: off; database sessions may idle for hours]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// On SIGTERM or Ctrl-C, stop taking new tunnels and let open ones run
    /// this long before closing them (a second signal closes them at once).
    /// [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drain_grace: Option<Duration>,
}

/// Parses `500ms`, `30s`, `5m`, `2h` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: use e.g. 500ms, 30s, 5m, 2h or 2d"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?}; use ms, s, m, h or d"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// Parses `IDENTIFIER@HOST:PORT` (a relay and the identity it must prove).
pub fn parse_relay_endpoint(text: &str) -> Result<RelayEndpoint, String> {
    let (identity, address) = text.split_once('@').ok_or_else(|| {
        format!("{text:?} is not IDENTIFIER@HOST:PORT (e.g. P1a2b…@relay2.example:4000)")
    })?;
    let identity: Identifier = identity
        .parse()
        .map_err(|e| format!("{text:?}: bad relay identifier: {e}"))?;
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
            Ok(RelayEndpoint::new(address, identity))
        }
        _ => Err(format!("{text:?}: {address:?} is not HOST:PORT")),
    }
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

/// Credentials: which authorities to trust, which credential to present.
#[derive(Debug, Args)]
pub struct TrustFlags {
    /// An authority whose credentials this node accepts (repeatable), and
    /// whose revocations it follows through the relay: as P… (reached under
    /// its default name, authority-P…) or P…@SERVICE. With none,
    /// credentials are not consulted and only identifiers count.
    #[arg(long, value_name = "P…[@SERVICE]")]
    pub trust_authority: Vec<TrustAnchor>,
    /// Refuse new tunnels once a trusted authority's revocations are older
    /// than this (its feed down, or never received since start), saying
    /// which authority; a warning comes at half of it. [default: 2m]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_revocation_staleness: Option<Duration>,
    /// Credential to present in every handshake (written by `postern enroll`).
    /// [default: <home>/credentials/<identity>.cred, if it exists]
    #[arg(long, value_name = "FILE")]
    pub credential: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct OutletArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub relay: RelayFlags,
    #[command(flatten)]
    pub trust: TrustFlags,
    #[command(flatten)]
    pub lifecycle: NodeLifecycleFlags,
    /// Name to register the target under.
    #[arg(long, value_name = "NAME")]
    pub service: Option<ServiceName>,
    /// Where tunnels lead: host:port, or unix:/path/to/socket.
    #[arg(long, value_name = "HOST:PORT|unix:PATH")]
    pub target: Option<Target>,
    /// An identifier allowed to connect (repeatable), whatever its credentials.
    /// With no --allow and no --allow-attr at all, nobody is admitted.
    #[arg(long, value_name = "P…")]
    pub allow: Vec<Identifier>,
    /// Admit inlets whose credential (from a --trust-authority) carries this
    /// attribute (repeatable: all must match), e.g. --allow-attr role=analyst.
    /// For list attributes such as groups, the value must be one of the elements.
    #[arg(long, value_name = "NAME=VALUE")]
    pub allow_attr: Vec<AttributeRule>,
    /// Directory of Cedar policies (*.cedar) deciding every tunnel (action
    /// "connect"; default deny), instead of --allow/--allow-attr. Re-read
    /// once a second: a change closes the live tunnels it no longer permits
    /// within seconds; a broken change keeps the previous policies. See
    /// `postern policy --help`.
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// An attribute of the service, as policies see it (repeatable), e.g.
    /// --service-attr env=prod --service-attr team=analytics.
    #[arg(long, value_name = "NAME=VALUE")]
    pub service_attr: Vec<AttributeRule>,
    /// Append every access decision and tunnel end to this hash-chained
    /// audit log, with checkpoints signed by the outlet's identity (check it
    /// with `postern audit verify FILE --signer P…`). One process per file;
    /// SIGHUP reopens it after rotation.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Refuse new tunnels while the audit log cannot be written (disk full,
    /// file gone). Default: keep admitting, log errors, and write the queued
    /// records when the disk recovers.
    #[arg(long)]
    pub audit_fail_closed: bool,
}

#[derive(Debug, Args)]
pub struct InletArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub relay: RelayFlags,
    #[command(flatten)]
    pub trust: TrustFlags,
    #[command(flatten)]
    pub lifecycle: NodeLifecycleFlags,
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
    /// An attribute the outlet's credential must carry (repeatable; needs
    /// --trust-authority), e.g. --require-outlet-attr service=db-prod: only
    /// an outlet your authority vouches for is accepted.
    #[arg(long, value_name = "NAME=VALUE")]
    pub require_outlet_attr: Vec<AttributeRule>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "s", "10x", "-1s", "ten seconds", "1e999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fallback_relays_parse() {
        let id = "P0000000000000000000000000000000000000001";
        let relay = parse_relay_endpoint(&format!("{id}@relay2.example:4000")).unwrap();
        assert_eq!(relay.address, "relay2.example:4000");
        assert_eq!(relay.identifier.to_string(), id);
        for bad in [
            "relay2.example:4000".to_owned(),
            format!("{id}@relay2.example"),
            format!("{id}@:4000"),
            format!("{id}@relay2.example:0"),
            "Pnot-an-id@relay2.example:4000".to_owned(),
        ] {
            assert!(parse_relay_endpoint(&bad).is_err(), "{bad:?}");
        }
    }
}
