//! `postern authority …` and `postern enroll`: running an authority behind a
//! relay (with an OpenID provider and an audit log if configured),
//! administering it, and enrolling a machine with a ticket or by logging in
//! at the identity provider (`postern enroll --oidc`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use postern_authority::admin::{self, AdminEndpoint, AdminReply, AdminRequest};
use postern_authority::oidc::{OidcConfig, OidcVerifier};
use postern_authority::service::AuthorityService;
use postern_authority::{Authority, AuthorityConfig, RedbStore, NAME_ATTRIBUTE};
use postern_identity::credential::{format_timestamp, Kind, RevocationTarget, SignedCredential};
use postern_identity::handshake::LocalParty;
use postern_identity::secret_env::{SecretEnv, TICKET_VAR};
use postern_identity::ticket::Ticket;
use postern_identity::time::unix_now;
use postern_identity::wire::ServiceName;
use postern_identity::{AttrValue, Attributes, Identifier, Identity};
use postern_node::authority::{self, AuthorityRoute};
use postern_policies::audit::{AuditLog, AuditOptions};

use crate::args::parse_duration;
use postern_node::{RelayEndpoint, Timeouts};

/// `postern authority …`
#[derive(Debug, Subcommand)]
pub enum AuthorityCommand {
    /// Run the authority: registers it as a service at a relay (no open
    /// port) and serves enrollments, renewals and revocation feeds. It holds
    /// its store open, and the admin commands below reach it through a local
    /// admin endpoint beside the store (<store>.admin/socket).
    Run(RunArgs),
    /// Issue a one-time enrollment ticket and print it. Give it privately to
    /// the new machine's user, who runs `postern enroll` and pastes it.
    Ticket(TicketArgs),
    /// Revoke an identity (P…) or one credential (32 hex digits). A running
    /// authority sends it to every relay and outlet following it at once,
    /// and they close its tunnels within seconds.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        /// What to revoke.
        #[arg(value_name = "P…|CREDENTIAL-ID")]
        target: RevocationTarget,
        /// Also record the revocation in this audit log. A running
        /// `postern authority run --audit-log` records every revocation in
        /// its own log as it is made, so use this only while no authority
        /// runs. The file a running process writes is locked, and this
        /// command refuses it before revoking (one process per audit log).
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
    },
    /// List members, open tickets and revocations.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Add or remove members directly, without a ticket.
    ///
    /// An added member gets its credential with `postern enroll --renew
    /// --relay … --relay-identity … --authority …` on its own machine. A
    /// removed member gets no new credential; the one it holds stays valid
    /// until it expires (use `postern authority revoke` to end it at once).
    Member {
        #[command(subcommand)]
        command: MemberCommand,
    },
    /// Withdraw an enrollment ticket before it is used, by the id that
    /// `postern authority list` shows (at least 8 hex digits).
    TicketRemove {
        #[command(flatten)]
        store: StoreArgs,
        /// The ticket's id (or its first 8+ hex digits).
        #[arg(value_name = "ID")]
        id: String,
    },
}

/// `postern authority member …`
#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Vouch for an identity with these attributes (replaces an existing
    /// member's attributes), e.g.
    /// `postern authority member add P1a2b… --attr role=db-outlet --service-member`.
    Add {
        #[command(flatten)]
        store: StoreArgs,
        /// The identity (printed by `postern identity show` on its machine).
        #[arg(value_name = "P…")]
        identifier: Identifier,
        /// An attribute NAME=VALUE (repeatable; repeat a name for a list).
        #[arg(long = "attr", value_name = "NAME=VALUE")]
        attrs: Vec<String>,
        /// A service (credential life 24 h) rather than a person (8 h).
        #[arg(long)]
        service_member: bool,
    },
    /// Stop vouching for an identity.
    Remove {
        #[command(flatten)]
        store: StoreArgs,
        /// The identity.
        #[arg(value_name = "P…")]
        identifier: Identifier,
    },
}

/// Where the authority keeps its state. An admin command talks to the
/// authority running on that store, if one runs, else opens the store
/// itself.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The authority's database. [default: <home>/authority/<identity>.redb]
    #[arg(long, value_name = "FILE")]
    pub store: Option<PathBuf>,
    /// The authority's identity (name or key file path). [default: authority]
    #[arg(long, default_value = "authority", value_name = "NAME|PATH")]
    pub identity: String,
}

/// `postern authority run`
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The relay to register at, host:port.
    #[arg(long, value_name = "HOST:PORT")]
    pub relay: String,
    /// The relay's identifier (any other is refused).
    #[arg(long, value_name = "P…")]
    pub relay_identity: Identifier,
    /// Service name to register under. [default: authority-<its identifier>,
    /// a name relays keep for this authority alone]. With another name
    /// (such as the older default, postern-authority), the authority also
    /// registers its own, where nodes look for it to renew credentials and
    /// follow revocations.
    #[arg(long, value_name = "NAME")]
    pub service: Option<ServiceName>,
    /// Let people enroll by logging in at your OpenID Connect provider
    /// (`postern enroll --oidc`): a TOML file with issuer_url, client_id,
    /// scopes, [claims] and the other settings the README lists (top level
    /// or under [oidc]). The provider is contacted at start-up.
    #[arg(long, value_name = "FILE")]
    pub oidc_config: Option<PathBuf>,
    /// Append every enrollment attempt (allowed or refused, with the reason),
    /// renewal, issued credential and revocation to this hash-chained audit
    /// log, with checkpoints signed by the authority's identity; check it
    /// with `postern audit verify FILE --signer P…`. One process per file;
    /// SIGHUP reopens it after rotation.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// How long credentials issued to people are valid (e.g. 8h, 30m).
    /// Nodes renew at two thirds of it. [default: 8h]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub person_lifetime: Option<Duration>,
    /// How long credentials issued to services are valid. [default: 24h]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub service_lifetime: Option<Duration>,
}

/// `postern authority ticket`
#[derive(Debug, Args)]
pub struct TicketArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// An attribute bound to the ticket (repeatable), e.g. --attr team=analytics.
    /// Repeating a name makes a list: --attr groups=a --attr groups=b.
    #[arg(long = "attr", value_name = "NAME=VALUE")]
    pub attrs: Vec<String>,
    /// How long the ticket stays valid: 30s, 15m, 8h, 2d.
    #[arg(long, default_value = "15m", value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Duration,
    /// How many machines may enroll with it.
    #[arg(long, default_value_t = 1)]
    pub uses: u32,
    /// Enrolls a service (credential life 24 h) rather than a person (8 h).
    #[arg(long)]
    pub service_member: bool,
    /// The relay the new machine reaches the authority through, host:port.
    #[arg(long, value_name = "HOST:PORT")]
    pub relay: String,
    /// That relay's identifier.
    #[arg(long, value_name = "P…")]
    pub relay_identity: Identifier,
    /// The authority's service name at the relay, carried in the ticket.
    /// [default: authority-<its identifier>, as `authority run` registers]
    #[arg(long, value_name = "NAME")]
    pub service: Option<ServiceName>,
    /// A note for the admin listing tickets later.
    #[arg(long)]
    pub note: Option<String>,
}

/// Examples shown by `postern enroll --help`.
const ENROLL_HELP: &str = "\
Three ways to get a credential:

  With a ticket from your admin (pstn-ticket:…, it names the relay and the authority). A ticket
  is a secret: paste it when asked (it is not shown), or give it in a file or on standard input.
  A ticket given as an argument is refused, since other users see arguments in `ps` and your
  shell history keeps them:
    postern enroll                                  (at a terminal: asks for the ticket)
    postern enroll --ticket-file ticket.txt
    pass show postern/ticket | postern enroll -
    POSTERN_TICKET set by your automation: read once, then removed from the environment

  By logging in at your organisation's identity provider (OpenID Connect) in a browser.
  Postern listens on 127.0.0.1 for the provider's redirect and opens your browser (with
  --no-browser, or without a desktop, it prints the address to open on this machine):
    postern enroll --oidc --relay relay.example:4000 --relay-identity P3f2a… --authority P77c1…

  On a machine without a browser (a server, a container), the device flow, if the authority
  allows it: open the printed address on any device (your phone, your laptop) and type the
  printed code. Enter a code only for an enrollment you started yourself: whoever enters it
  gives the printed identity their access.
    postern enroll --oidc --device --relay relay.example:4000 --relay-identity P3f2a… \\
        --authority P77c1…

The identity (--identity, default \"default\") is created if it does not exist. At a terminal its
secret key is encrypted with a passphrase you choose (asked twice, or POSTERN_PASSPHRASE);
--encrypt key-file or --encrypt none choose otherwise. Without a terminal it is stored
unencrypted unless --encrypt is given (`postern identity encrypt` encrypts it later). The
credential is stored at <home>/credentials/<identity>.cred, where inlets and outlets find it.
The authority, not this machine, verifies the provider's ID token and keeps the provider's
refresh token, so the credential can be renewed without a browser for as long as the provider
still accepts you:
    postern enroll --renew --relay relay.example:4000 --relay-identity P3f2a…";

/// `postern enroll`
#[derive(Debug, Args)]
#[command(after_help = ENROLL_HELP)]
pub struct EnrollArgs {
    /// `-`: read the ticket from standard input (one line). A ticket given
    /// here is refused (see below); without a ticket source, postern asks
    /// for it on the terminal.
    #[arg(
        value_name = "-",
        conflicts_with_all = ["oidc", "renew", "ticket_file", "ticket_stdin"]
    )]
    pub ticket: Option<String>,
    /// Read the ticket (pstn-ticket:…) from this file; keep it private
    /// (mode 0600) and delete it once enrolled.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["oidc", "renew", "ticket_stdin"])]
    pub ticket_file: Option<PathBuf>,
    /// Read the ticket from standard input (the same as `-`).
    #[arg(long, conflicts_with_all = ["oidc", "renew"])]
    pub ticket_stdin: bool,
    /// Identity to enroll (created if it does not exist yet). [default: default]
    #[arg(
        long,
        env = "POSTERN_IDENTITY",
        default_value = "default",
        value_name = "NAME|PATH"
    )]
    pub identity: String,
    /// If the identity is created now: how to protect its secret key
    /// (passphrase, key-file or none; see `postern identity create`).
    /// [default: passphrase at a terminal, otherwise none]
    #[arg(long, value_name = "HOW", conflicts_with = "renew")]
    pub encrypt: Option<crate::keys::Encryption>,
    /// Key file for --encrypt key-file, or that opens an identity encrypted
    /// with a key. [default: $POSTERN_KEY_FILE]
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Log in at the authority's OpenID Connect identity provider instead of
    /// using a ticket (needs --relay, --relay-identity and --authority).
    #[arg(long, requires_all = ["relay", "relay_identity", "authority"])]
    pub oidc: bool,
    /// With --oidc: the device flow, for a machine without a browser (if the
    /// authority allows it). Prints the identity being enrolled, an address
    /// and a code to enter on any other device.
    #[arg(long, requires = "oidc")]
    pub device: bool,
    /// With --oidc: print the login address instead of opening a browser.
    #[arg(long, requires = "oidc", conflicts_with = "device")]
    pub no_browser: bool,
    /// With --oidc: how long to wait for the browser login (30s, 5m, …).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "oidc", conflicts_with = "device")]
    pub login_timeout: Option<Duration>,
    /// Get a fresh credential for an identity that is already enrolled (a
    /// member enrolled with --oidc must still be accepted by the provider).
    /// Needs --relay and --relay-identity; the authority defaults to the
    /// issuer of the stored credential.
    #[arg(long, requires_all = ["relay", "relay_identity"], conflicts_with = "oidc")]
    pub renew: bool,
    /// With --oidc or --renew: the relay the authority is registered at,
    /// host:port.
    #[arg(long, value_name = "HOST:PORT")]
    pub relay: Option<String>,
    /// With --oidc or --renew: that relay's identifier.
    #[arg(long, value_name = "P…")]
    pub relay_identity: Option<Identifier>,
    /// With --oidc or --renew: the authority's identifier (ask its admin).
    #[arg(long, value_name = "P…")]
    pub authority: Option<Identifier>,
    /// With --oidc or --renew: the authority's service name at the relay.
    /// [default: authority-<the authority's identifier>]
    #[arg(long, value_name = "NAME")]
    pub authority_service: Option<ServiceName>,
}

/// Parses repeated `NAME=VALUE` into attributes; a repeated name makes a list.
pub fn parse_attributes(pairs: &[String]) -> Result<Attributes> {
    let mut attrs = Attributes::new();
    for pair in pairs {
        let (name, value) = pair
            .split_once('=')
            .filter(|(n, v)| !n.trim().is_empty() && !v.is_empty())
            .ok_or_else(|| {
                anyhow!("--attr {pair:?}: expected NAME=VALUE, for example team=analytics")
            })?;
        let name = name.trim().to_owned();
        let merged = match attrs.remove(&name) {
            None => AttrValue::One(value.to_owned()),
            Some(AttrValue::One(first)) => AttrValue::Many(vec![first, value.to_owned()]),
            Some(AttrValue::Many(mut all)) => {
                all.push(value.to_owned());
                AttrValue::Many(all)
            }
        };
        attrs.insert(name, merged);
    }
    Ok(attrs)
}

fn store_path(home: &Path, args: &StoreArgs) -> PathBuf {
    args.store.clone().unwrap_or_else(|| {
        let stem = Path::new(&args.identity).file_stem().map_or_else(
            || args.identity.clone(),
            |s| s.to_string_lossy().into_owned(),
        );
        home.join("authority").join(format!("{stem}.redb"))
    })
}

/// Carries out an admin command: through the running authority's admin
/// endpoint when it runs, else on its store.
async fn admin_request(
    home: &Path,
    store: &StoreArgs,
    identity: &Identity,
    request: AdminRequest,
) -> Result<AdminReply> {
    let path = store_path(home, store);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match admin::request(&path, identity, request).await? {
        AdminReply::Failed { message } => Err(anyhow!(message)),
        reply => Ok(reply),
    }
}

/// An admin reply of another kind than the command asked for.
fn unexpected(reply: &AdminReply) -> anyhow::Error {
    anyhow!("the authority answered something unexpected: {reply:?}")
}

/// `postern authority run`.
async fn run_authority(
    home: &Path,
    args: RunArgs,
    identity: Identity,
    stop: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let mut config = AuthorityConfig::default();
    if let Some(life) = args.person_lifetime {
        config.person_lifetime = life;
    }
    if let Some(life) = args.service_lifetime {
        config.service_lifetime = life;
    }
    config
        .validate()
        .context("--person-lifetime / --service-lifetime")?;
    let path = store_path(home, &args.store);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // The store stays open for as long as the authority runs; admin
    // commands reach it through the admin endpoint.
    let (signing, store_at) = (identity.clone(), path.clone());
    let authority = tokio::task::spawn_blocking(move || {
        let store = RedbStore::open(&store_at)?;
        Authority::new(signing, Box::new(store), config)
    })
    .await??;
    let authority = Arc::new(authority);
    let endpoint = AdminEndpoint::bind(&path)?;
    let local = Arc::new(LocalParty::new(identity)?);
    let audit = match &args.audit_log {
        Some(path) => Some(Arc::new(open_audit(path, local.identity().clone())?)),
        None => None,
    };
    let mut service = AuthorityService::new(Arc::clone(&authority));
    if let Some(log) = &audit {
        service = service.with_audit(Arc::clone(log));
    }
    crate::reopen_on_hangup(audit.iter().cloned().collect())?;
    let oidc = match &args.oidc_config {
        Some(path) => {
            let config = read_oidc_config(path)?;
            let verifier = OidcVerifier::discover(config)
                .await
                .with_context(|| format!("--oidc-config {}", path.display()))?;
            Some(Arc::new(verifier))
        }
        None => None,
    };
    let name = args
        .service
        .unwrap_or_else(|| ServiceName::of_authority(&authority.identifier()));
    eprintln!(
        "authority {} serving \"{name}\" at relay {}",
        authority.identifier(),
        args.relay
    );
    eprintln!(
        "admin commands (postern authority ticket, revoke, member, list) reach it at {}",
        endpoint.path().display()
    );
    if let Some(verifier) = oidc {
        let config = verifier.config();
        let device = match (verifier.supports_device_flow(), config.allow_device_flow()) {
            (false, _) => "not offered by the provider",
            (true, false) => "not allowed (allow_device_flow = false)",
            (true, true) => "allowed",
        };
        eprintln!(
            "OpenID Connect login (postern enroll --oidc) at {} as client {:?} ({}); device flow (--device) {device}",
            verifier.issuer(),
            config.client_id(),
            if config.is_confidential() { "with a client secret" } else { "public client with PKCE" },
        );
        if let Some(why) = config.open_to_everyone() {
            eprintln!("WARNING: {why}");
        }
        service = service.with_oidc(verifier);
    }
    if let Some(path) = &args.audit_log {
        eprintln!(
            "auditing enrollments, credentials and revocations to {}",
            path.display()
        );
    }
    let admin = tokio::spawn(endpoint.serve(
        Arc::clone(&local),
        Arc::clone(&authority),
        stop.child_token(),
    ));
    let relay = RelayEndpoint::new(args.relay, args.relay_identity);
    postern_authority::service::serve(
        local,
        service,
        relay,
        name,
        Timeouts::default(),
        stop.clone(),
    )
    .await;
    stop.cancel();
    let _ = admin.await;
    crate::close_audit(audit).await;
    Ok(())
}

/// Opens the authority's audit log, its checkpoints signed by the
/// authority's identity.
fn open_audit(path: &Path, signer: Identity) -> Result<AuditLog> {
    AuditLog::open_with(path, AuditOptions::default().with_signer(signer))
        .map_err(|e| anyhow!("--audit-log: cannot open the audit log: {e}"))
}

/// Runs `postern authority …`.
pub async fn run(
    home: &Path,
    command: AuthorityCommand,
    load_identity: impl Fn(&str) -> Result<Identity>,
    stop: impl FnOnce() -> Result<tokio_util::sync::CancellationToken>,
) -> Result<()> {
    match command {
        AuthorityCommand::Run(args) => {
            let identity = load_identity(&args.store.identity)?;
            run_authority(home, args, identity, stop()?).await
        }
        AuthorityCommand::Ticket(args) => {
            let identity = load_identity(&args.store.identity)?;
            let service = args
                .service
                .unwrap_or_else(|| ServiceName::of_authority(&identity.identifier()));
            let request = AdminRequest::CreateTicket {
                kind: if args.service_member {
                    Kind::Service
                } else {
                    Kind::Person
                },
                attributes: parse_attributes(&args.attrs)?,
                ttl_secs: args.ttl.as_secs(),
                uses: args.uses,
                note: args.note,
                relay_addr: args.relay,
                relay: args.relay_identity,
                service,
            };
            let reply = admin_request(home, &args.store, &identity, request).await?;
            let AdminReply::Ticket { token, record } = reply else {
                return Err(unexpected(&reply));
            };
            println!("{}", token.expose());
            eprintln!(
                "ticket {} for {} use(s), valid for {:?}; enroll with `postern enroll` (paste it when asked) or `postern enroll --ticket-file FILE`",
                record.code_hash.short(),
                record.uses_total,
                args.ttl
            );
            Ok(())
        }
        AuthorityCommand::Revoke {
            store,
            target,
            audit_log,
        } => {
            let identity = load_identity(&store.identity)?;
            let audit = match &audit_log {
                Some(path) => Some(open_audit(path, identity.clone())?),
                None => None,
            };
            let reply =
                admin_request(home, &store, &identity, AdminRequest::Revoke { target }).await?;
            let AdminReply::Revoked {
                entry,
                already,
                subject,
            } = reply
            else {
                return Err(unexpected(&reply));
            };
            if already {
                println!(
                    "{} was already revoked (revocation #{})",
                    entry.revocation.target, entry.seq
                );
                return Ok(());
            }
            println!(
                "revoked {} (revocation #{})",
                entry.revocation.target, entry.seq
            );
            if let Some(log) = audit {
                let reason = format!(
                    "revoked with `postern authority revoke` (revocation #{})",
                    entry.seq
                );
                log.record(&postern_authority::service::revocation_event(
                    identity.identifier(),
                    &entry,
                    subject,
                    reason,
                ))
                .and_then(|()| log.close())
                .context("the revocation is in force, but the audit record failed")?;
            }
            Ok(())
        }
        AuthorityCommand::Member {
            command:
                MemberCommand::Add {
                    store,
                    identifier,
                    attrs,
                    service_member,
                },
        } => {
            let attributes = parse_attributes(&attrs)?;
            let identity = load_identity(&store.identity)?;
            let kind = if service_member {
                Kind::Service
            } else {
                Kind::Person
            };
            let request = AdminRequest::AddMember {
                identifier,
                kind,
                attributes,
            };
            let reply = admin_request(home, &store, &identity, request).await?;
            let AdminReply::Member { member } = reply else {
                return Err(unexpected(&reply));
            };
            println!(
                "member {} ({:?}): {}; it gets its credential with `postern enroll --renew`",
                member.identifier,
                member.kind,
                format_attributes(&member.attributes)
            );
            Ok(())
        }
        AuthorityCommand::Member {
            command: MemberCommand::Remove { store, identifier },
        } => {
            let identity = load_identity(&store.identity)?;
            let request = AdminRequest::RemoveMember { identifier };
            match admin_request(home, &store, &identity, request).await? {
                AdminReply::MemberRemoved { existed: true } => {
                    println!("removed member {identifier}: no new credentials; revoke it to end the current one at once");
                    Ok(())
                }
                AdminReply::MemberRemoved { existed: false } => Err(anyhow!(
                    "{identifier} is not a member of this authority (see `postern authority list`)"
                )),
                other => Err(unexpected(&other)),
            }
        }
        AuthorityCommand::TicketRemove { store, id } => {
            let identity = load_identity(&store.identity)?;
            let request = AdminRequest::RemoveTicket { selector: id };
            let reply = admin_request(home, &store, &identity, request).await?;
            let AdminReply::TicketRemoved { record } = reply else {
                return Err(unexpected(&reply));
            };
            println!(
                "removed ticket {} ({} use(s) left); it can no longer enroll anyone",
                record.code_hash.short(),
                record.uses_left
            );
            Ok(())
        }
        AuthorityCommand::List { store } => {
            let identity = load_identity(&store.identity)?;
            let reply = admin_request(home, &store, &identity, AdminRequest::List).await?;
            let AdminReply::Listing {
                authority,
                members,
                tickets,
                revocations,
            } = reply
            else {
                return Err(unexpected(&reply));
            };
            println!("authority {authority}");
            println!("members:");
            for m in members {
                println!(
                    "  {} {:?} {} (via {})",
                    m.identifier,
                    m.kind,
                    format_attributes(&m.attributes),
                    m.source
                );
            }
            println!("tickets:");
            for t in tickets {
                println!(
                    "  {} uses left {} expires {}",
                    t.code_hash.short(),
                    t.uses_left,
                    format_timestamp(t.expires_at)
                );
            }
            println!("revocations:");
            for r in revocations {
                println!("  #{} {}", r.seq, r.revocation);
            }
            Ok(())
        }
    }
}

/// Reads `--oidc-config`: the `[oidc]` settings at the top level of the
/// file or under an `[oidc]` table. Errors quote no line of the file, since
/// it may hold a client secret.
fn read_oidc_config(path: &Path) -> Result<OidcConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --oidc-config {}", path.display()))?;
    let where_ = |e: &toml::de::Error| {
        e.span().map_or_else(String::new, |span| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        })
    };
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        anyhow!(
            "--oidc-config {} is not valid TOML{}: {}",
            path.display(),
            where_(&e),
            e.message()
        )
    })?;
    let settings = match table.get("oidc") {
        Some(toml::Value::Table(inner)) if table.len() == 1 => inner.clone(),
        _ => table,
    };
    let config: OidcConfig = settings.try_into().map_err(|e: toml::de::Error| {
        let message = e.message();
        let message = if message.starts_with("invalid [oidc] configuration") {
            message.to_string()
        } else {
            format!("invalid [oidc] configuration: {message}")
        };
        anyhow!("--oidc-config {}: {message}", path.display())
    })?;
    if config.is_confidential() {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "--oidc-config {} holds a client_secret and is readable by other users (mode {mode:o}): fix with chmod 600 {}",
                    path.display(),
                    path.display()
                );
            }
        }
    }
    Ok(config)
}

/// `NAME=VALUE, NAME=[A, B]`, in name order.
fn format_attributes(attributes: &Attributes) -> String {
    if attributes.is_empty() {
        return "(no attributes)".into();
    }
    attributes
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The identity to enroll: loaded, or created (protected as `--encrypt`
/// and the terminal decide, see `keys`) when it does not exist.
fn identity_for_enrollment(
    home: &Path,
    args: &EnrollArgs,
    secrets: &SecretEnv,
) -> Result<Identity> {
    let name = &args.identity;
    let key_path = postern_identity::keyfile::resolve(home, name)?;
    if key_path.symlink_metadata().is_ok() {
        if args.encrypt.is_some() {
            eprintln!(
                "note: identity {name:?} exists already, so --encrypt does not apply (it is for \
                 a new identity; `postern identity encrypt` encrypts an existing one)"
            );
        }
        return Ok(crate::keys::load(home, name, args.key_file.as_deref(), secrets)?.0);
    }
    crate::keys::create(home, name, args.encrypt, args.key_file.as_deref(), secrets)
}

/// Stores a new credential where inlets and outlets look for it, and says
/// what it grants.
fn store_and_report(
    home: &Path,
    identity: &str,
    credential: &SignedCredential,
    headline: &str,
) -> Result<PathBuf> {
    let path = crate::config::credential_path(home, identity);
    save_credential(&path, credential)?;
    let body = credential.inspect_unverified()?;
    println!("{headline}");
    println!(
        "credential {} stored at {}, valid until {}",
        body.id,
        path.display(),
        format_timestamp(body.expires_at)
    );
    println!("attributes: {}", format_attributes(&body.attributes));
    Ok(path)
}

/// Runs `postern enroll`: with a ticket, by an OpenID Connect login
/// (`--oidc`), or renews (`--renew`); stores the credential.
pub async fn enroll(home: &Path, args: EnrollArgs, secrets: &SecretEnv) -> Result<()> {
    if (args.renew || args.oidc) && secrets.is_set(TICKET_VAR) {
        eprintln!(
            "note: {TICKET_VAR} is set but not used with --{}",
            if args.renew { "renew" } else { "oidc" }
        );
    }
    if args.renew {
        return renew(home, args, secrets).await;
    }
    if args.oidc {
        return enroll_oidc(home, args, secrets).await;
    }
    let ticket = {
        let text = crate::ticket_source::read(
            crate::ticket_source::TicketSources {
                positional: args.ticket.as_deref(),
                file: args.ticket_file.as_deref(),
                stdin: args.ticket_stdin,
            },
            secrets,
        )?;
        Ticket::parse(&text)?
    };
    ticket
        .check_not_expired(unix_now())
        .context("ask the authority's admin for a new ticket")?;
    let identity = identity_for_enrollment(home, &args, secrets)?;
    let subject = identity.identifier();
    let local = Arc::new(LocalParty::new(identity)?);
    let credential = authority::enroll(&local, &ticket, &Timeouts::default()).await?;
    store_and_report(
        home,
        &args.identity,
        &credential,
        &format!("enrolled {subject} with authority {}", ticket.authority),
    )?;
    let anchor =
        postern_node::TrustAnchor::with_service(ticket.authority, ticket.authority_service.clone());
    println!(
        "use it with: --relay {} --relay-identity {} --trust-authority {anchor}",
        ticket.relay_addr, ticket.relay
    );
    Ok(())
}

/// The relay and authority of `--oidc` and `--renew`.
fn route_from(args: &EnrollArgs, authority: Option<Identifier>) -> Result<AuthorityRoute> {
    let (Some(relay), Some(relay_identity)) = (&args.relay, args.relay_identity) else {
        return Err(anyhow!("give --relay HOST:PORT and --relay-identity P…"));
    };
    let authority = args.authority.or(authority).ok_or_else(|| {
        anyhow!("give --authority P… (the authority's identifier; ask its admin)")
    })?;
    Ok(AuthorityRoute {
        relay: RelayEndpoint::new(relay.clone(), relay_identity),
        authority,
        service: args
            .authority_service
            .clone()
            .unwrap_or_else(|| ServiceName::of_authority(&authority)),
    })
}

/// Whether a browser can be opened here: macOS, or a graphical session.
fn browser_available() -> bool {
    cfg!(target_os = "macos")
        || ["DISPLAY", "WAYLAND_DISPLAY"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

/// `postern enroll --oidc [--device]`.
async fn enroll_oidc(home: &Path, args: EnrollArgs, secrets: &SecretEnv) -> Result<()> {
    let route = route_from(&args, None)?;
    let identity = identity_for_enrollment(home, &args, secrets)?;
    let subject = identity.identifier();
    let local = Arc::new(LocalParty::new(identity)?);
    let timeouts = Timeouts::default();
    eprintln!(
        "enrolling {subject} with authority {} by logging in at its identity provider{}",
        route.authority,
        if args.device { " (device flow)" } else { "" }
    );
    let credential = if args.device {
        postern_authority::client::enroll_oidc_device(&local, &route, &timeouts, |prompt| {
            postern_authority::oidc::show_device_prompt(prompt)
        })
        .await
    } else {
        let open_browser = !args.no_browser && browser_available();
        let timeout = args
            .login_timeout
            .unwrap_or(postern_authority::oidc::LOGIN_PAGE_TIMEOUT);
        postern_authority::client::enroll_oidc_browser(&local, &route, &timeouts, timeout, |url| {
            postern_authority::oidc::show_login_url(url, open_browser);
            eprintln!(
                "Waiting up to {} for the login…",
                postern_identity::credential::format_duration(timeout.as_secs())
            );
        })
        .await
    }
    .context("OpenID Connect enrollment failed")?;
    let name = credential
        .inspect_unverified()
        .ok()
        .and_then(|b| match b.attributes.get(NAME_ATTRIBUTE) {
            Some(AttrValue::One(name)) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "(no name)".into());
    store_and_report(
        home,
        &args.identity,
        &credential,
        &format!(
            "enrolled {subject} with authority {} as {name} (OpenID Connect login)",
            route.authority
        ),
    )?;
    println!(
        "use it with: --relay {} --relay-identity {} --trust-authority {}",
        route.relay.address, route.relay.identifier, route.authority
    );
    println!(
        "renew it with: postern enroll --renew --relay {} --relay-identity {}",
        route.relay.address, route.relay.identifier
    );
    Ok(())
}

/// `postern enroll --renew`.
async fn renew(home: &Path, args: EnrollArgs, secrets: &SecretEnv) -> Result<()> {
    let (identity, _) = crate::keys::load(home, &args.identity, args.key_file.as_deref(), secrets)?;
    let subject = identity.identifier();
    let path = crate::config::credential_path(home, &args.identity);
    // The authority defaults to the issuer of the credential held now.
    let issuer = std::fs::read(&path)
        .ok()
        .and_then(|bytes| SignedCredential::decode(&bytes).ok())
        .map(|c| c.claimed_issuer());
    let route = route_from(&args, issuer)?;
    let local = Arc::new(LocalParty::new(identity)?);
    let credential = authority::renew(&local, &route, &Timeouts::default())
        .await
        .context("renewal failed")?;
    store_and_report(
        home,
        &args.identity,
        &credential,
        &format!(
            "renewed the credential of {subject} from authority {}",
            route.authority
        ),
    )?;
    Ok(())
}

/// Writes a credential file (mode 0600, replaced atomically).
pub fn save_credential(path: &Path, credential: &SignedCredential) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("bad credential path {}", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("cred.tmp");
    let bytes = credential.encode()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_attributes_parse() {
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("soon").is_err() && parse_duration("5y").is_err());
        let attrs =
            parse_attributes(&["team=x".into(), "groups=a".into(), "groups=b".into()]).unwrap();
        assert_eq!(attrs["team"], AttrValue::One("x".into()));
        assert_eq!(
            attrs["groups"],
            AttrValue::Many(vec!["a".into(), "b".into()])
        );
        assert!(parse_attributes(&["oops".into()]).is_err());
    }
}
