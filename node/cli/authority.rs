//! `postern authority …` and `postern enroll`: running an authority behind a
//! relay, administering it, and enrolling a machine with a ticket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use postern_identity::authority::{
    Authority, AuthorityConfig, AuthorityError, AuthorityStore, EnrollmentRoute, IssuedRecord,
    Member, RedbStore, StoreError, TicketRecord, TicketSpec,
};
use postern_identity::credential::{
    CredentialId, Kind, Revocation, RevocationEntry, RevocationTarget, SignedCredential,
};
use postern_identity::handshake::LocalParty;
use postern_identity::ticket::{CodeHash, Ticket, DEFAULT_AUTHORITY_SERVICE};
use postern_identity::time::unix_now;
use postern_identity::wire::ServiceName;
use postern_identity::{AttrValue, Attributes, Identifier, Identity};
use postern_node::authority;

use crate::args::parse_duration;
use postern_node::{RelayEndpoint, Timeouts};

/// `postern authority …`
#[derive(Debug, Subcommand)]
pub enum AuthorityCommand {
    /// Run the authority: registers it as a service at a relay (no open
    /// port) and serves enrollments, renewals and revocation feeds.
    Run(RunArgs),
    /// Issue a one-time enrollment ticket and print it. Give it to the new
    /// machine, which runs `postern enroll <ticket>`.
    Ticket(TicketArgs),
    /// Revoke an identity (P…) or one credential (32 hex digits). Relays and
    /// outlets following the authority close its tunnels within seconds.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        /// What to revoke.
        #[arg(value_name = "P…|CREDENTIAL-ID")]
        target: RevocationTarget,
    },
    /// List members, open tickets and revocations.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Where the authority keeps its state.
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
    /// Service name to register under.
    #[arg(long, default_value = DEFAULT_AUTHORITY_SERVICE, value_name = "NAME")]
    pub service: ServiceName,
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
    /// The authority's service name at the relay.
    #[arg(long, default_value = DEFAULT_AUTHORITY_SERVICE, value_name = "NAME")]
    pub service: ServiceName,
    /// A note for the admin listing tickets later.
    #[arg(long)]
    pub note: Option<String>,
}

/// `postern enroll`
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The ticket printed by `postern authority ticket` (pstn-ticket:…).
    #[arg(value_name = "TICKET")]
    pub ticket: String,
    /// Identity to enroll (created if it does not exist yet). [default: default]
    #[arg(
        long,
        env = "POSTERN_IDENTITY",
        default_value = "default",
        value_name = "NAME|PATH"
    )]
    pub identity: String,
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

/// The authority's database, opened for each operation so that admin
/// commands work while `postern authority run` serves (redb allows one
/// process at a time; a busy database is retried for a few seconds).
#[derive(Debug)]
struct SharedStore {
    path: PathBuf,
}

impl SharedStore {
    fn with<T, E: From<StoreError>>(
        &self,
        op: impl Fn(&RedbStore) -> Result<T, E>,
    ) -> Result<T, E> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match RedbStore::open(&self.path) {
                Ok(store) => return op(&store),
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AuthorityStore for SharedStore {
    fn member(&self, id: &Identifier) -> Result<Option<Member>, StoreError> {
        self.with(|s| s.member(id))
    }
    fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.with(|s| s.members())
    }
    fn put_member(&self, member: &Member) -> Result<(), StoreError> {
        self.with(|s| s.put_member(member))
    }
    fn remove_member(&self, id: &Identifier) -> Result<bool, StoreError> {
        self.with(|s| s.remove_member(id))
    }
    fn insert_ticket(&self, ticket: &TicketRecord) -> Result<(), StoreError> {
        self.with(|s| s.insert_ticket(ticket))
    }
    fn tickets(&self) -> Result<Vec<TicketRecord>, StoreError> {
        self.with(|s| s.tickets())
    }
    fn remove_ticket(&self, hash: &CodeHash) -> Result<bool, StoreError> {
        self.with(|s| s.remove_ticket(hash))
    }
    fn redeem_ticket(
        &self,
        hash: &CodeHash,
        subject: Identifier,
        now: u64,
    ) -> Result<Member, AuthorityError> {
        self.with(|s| s.redeem_ticket(hash, subject, now))
    }
    fn record_issued(&self, record: &IssuedRecord) -> Result<(), StoreError> {
        self.with(|s| s.record_issued(record))
    }
    fn issued_credential(&self, id: &CredentialId) -> Result<Option<IssuedRecord>, StoreError> {
        self.with(|s| s.issued_credential(id))
    }
    fn issued(&self, subject: Option<&Identifier>) -> Result<Vec<IssuedRecord>, StoreError> {
        self.with(|s| s.issued(subject))
    }
    fn revoke(&self, revocation: Revocation) -> Result<RevocationEntry, StoreError> {
        self.with(|s| s.revoke(revocation))
    }
    fn revocation(&self, target: &RevocationTarget) -> Result<Option<Revocation>, StoreError> {
        self.with(|s| s.revocation(target))
    }
    fn revocations_since(&self, after_seq: u64) -> Result<Vec<RevocationEntry>, StoreError> {
        self.with(|s| s.revocations_since(after_seq))
    }
    fn prune_expired(&self, before: u64) -> Result<usize, StoreError> {
        self.with(|s| s.prune_expired(before))
    }
}

fn open_authority(home: &Path, args: &StoreArgs, identity: Identity) -> Result<Authority> {
    let path = store_path(home, args);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let store = SharedStore { path };
    // Create the database now so that errors show up here, not at the first request.
    store.with(|_| Ok::<(), StoreError>(()))?;
    Ok(Authority::new(
        identity,
        Box::new(store),
        AuthorityConfig::default(),
    )?)
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
            let serving = load_identity(&args.store.identity)?;
            let authority = Arc::new(open_authority(home, &args.store, identity)?);
            let local = Arc::new(LocalParty::new(serving)?);
            eprintln!(
                "authority {} serving \"{}\" at relay {}",
                authority.identifier(),
                args.service,
                args.relay
            );
            let relay = RelayEndpoint::new(args.relay, args.relay_identity);
            authority::serve(
                local,
                authority,
                relay,
                args.service,
                Timeouts::default(),
                stop()?,
            )
            .await;
            Ok(())
        }
        AuthorityCommand::Ticket(args) => {
            let identity = load_identity(&args.store.identity)?;
            let authority = open_authority(home, &args.store, identity)?;
            let spec = TicketSpec {
                kind: if args.service_member {
                    Kind::Service
                } else {
                    Kind::Person
                },
                attributes: parse_attributes(&args.attrs)?,
                ttl: args.ttl,
                uses: args.uses,
                note: args.note,
            };
            let route = EnrollmentRoute {
                relay_addr: args.relay,
                relay: args.relay_identity,
                authority_service: args.service,
            };
            let (ticket, record) = authority.create_ticket(&spec, &route, unix_now())?;
            let token = ticket.to_token()?;
            println!("{}", token.as_str());
            eprintln!(
                "ticket {} for {} use(s), valid for {:?}; enroll with: postern enroll <ticket>",
                record.code_hash.short(),
                spec.uses,
                spec.ttl
            );
            Ok(())
        }
        AuthorityCommand::Revoke { store, target } => {
            let identity = load_identity(&store.identity)?;
            let authority = open_authority(home, &store, identity)?;
            let entry = authority.revoke(target, unix_now())?;
            println!(
                "revoked {} (revocation #{})",
                entry.revocation.target, entry.seq
            );
            Ok(())
        }
        AuthorityCommand::List { store } => {
            let identity = load_identity(&store.identity)?;
            let authority = open_authority(home, &store, identity)?;
            println!("authority {}", authority.identifier());
            println!("members:");
            for m in authority.members()? {
                println!("  {} {:?} {:?}", m.identifier, m.kind, m.attributes);
            }
            println!("tickets:");
            for t in authority.tickets()? {
                println!(
                    "  {} uses left {} expires {}",
                    t.code_hash.short(),
                    t.uses_left,
                    t.expires_at
                );
            }
            println!("revocations:");
            for r in authority.revocations_since(0)? {
                println!("  #{} {}", r.seq, r.revocation);
            }
            Ok(())
        }
    }
}

/// Runs `postern enroll`: creates the identity if needed, redeems the
/// ticket through the relay, stores the credential.
pub async fn enroll(home: &Path, args: EnrollArgs) -> Result<()> {
    let ticket = Ticket::parse(&args.ticket)?;
    ticket
        .check_not_expired(unix_now())
        .context("ask the authority's admin for a new ticket")?;
    let key_path = postern_identity::keyfile::resolve(home, &args.identity)?;
    let identity = if key_path.exists() {
        crate::keys::load(home, &args.identity, None)?.0
    } else {
        let identity = postern_identity::keyfile::create(&key_path)?;
        eprintln!(
            "created identity {} at {}",
            identity.identifier(),
            key_path.display()
        );
        identity
    };
    let subject = identity.identifier();
    let local = Arc::new(LocalParty::new(identity)?);
    let credential = authority::enroll(&local, &ticket, &Timeouts::default()).await?;
    let path = crate::config::credential_path(home, &args.identity);
    save_credential(&path, &credential)?;
    let body = credential.inspect_unverified()?;
    println!("enrolled {subject} with authority {}", ticket.authority);
    println!("credential {} stored at {}", body.id, path.display());
    println!("attributes: {:?}", body.attributes);
    println!(
        "use it with: --relay {} --relay-identity {} --trust-authority {}",
        ticket.relay_addr, ticket.relay, ticket.authority
    );
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
