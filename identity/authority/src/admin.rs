//! Administering the authority: the requests `postern authority ticket`,
//! `revoke`, `member add|remove`, `ticket-remove` and `list` make, carried
//! out on the authority ([`execute`]), either directly on its store when no
//! authority runs, or through the running authority's local admin endpoint.
//!
//! # The admin endpoint
//!
//! A running authority holds its store open (one process at a time may), so
//! admin commands ask it instead: [`AdminEndpoint::bind`] listens on a Unix
//! socket beside the store ([`socket_path`]: `<store>.admin/socket`, in a
//! directory of mode `0700`, the socket `0600`), and [`AdminClient::connect`]
//! reaches it. Nothing on it is plaintext: both ends run a Noise XX handshake
//! ([`ChannelKind::AuthorityAdmin`], a prologue of its own), and **both must
//! prove the authority's own identity**: the admin command loads the
//! authority's key anyway (to sign tickets when no authority runs), the
//! client refuses an endpoint that is not the authority before revealing
//! itself, and the endpoint answers any other identity with a refusal and
//! closes. So the file permissions are a first fence, and the key the
//! second: a local process that cannot read the authority's key can
//! connect at most to be refused.
//!
//! Requests and replies are CBOR ([`AdminRequest`], [`AdminReply`]), each
//! split over as many transport frames as it needs (a listing can be
//! large). A revocation made here goes through [`Authority::revoke`], so
//! every open revocation feed sends it at once.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postern_identity::credential::{Kind, RevocationEntry, RevocationTarget};
use postern_identity::handshake::{ChannelKind, LocalParty};
use postern_identity::link::{self, FramedReader, LinkError};
use postern_identity::transport::{Opener, Sealer};
use postern_identity::wire::{self, Hello, ServiceName};
use postern_identity::{Attributes, ChannelError, Identifier, Identity};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::oidc::SecretString;
use crate::{
    Authority, AuthorityConfig, AuthorityError, EnrollmentRoute, Member, MemberSource, RedbStore,
    StoreError, TicketRecord, TicketSpec,
};

/// How long an admin command may take to connect and prove itself.
pub const ADMIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections served at once.
const MAX_ADMIN_CONNECTIONS: usize = 8;
/// Largest request or reply accepted (a listing of many members).
const MAX_ADMIN_MESSAGE: usize = 64 * 1024 * 1024;
/// Plaintext per transport frame: a flag byte and a piece of the message.
const PIECE: usize = postern_identity::frame::MAX_PLAINTEXT - 1;
/// Longest path a Unix socket address holds on Linux (108 bytes, with the
/// terminating zero).
const MAX_SOCKET_PATH: usize = 107;

/// An admin request: one of the `postern authority` admin commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AdminRequest {
    /// `postern authority ticket`: a new enrollment ticket.
    CreateTicket {
        /// Kind of member it enrolls.
        kind: Kind,
        /// Attributes bound to it.
        attributes: Attributes,
        /// How long it stays valid, in seconds.
        ttl_secs: u64,
        /// How many enrollments it allows.
        uses: u32,
        /// A note for the admin.
        note: Option<String>,
        /// The relay the new node reaches the authority through.
        relay_addr: String,
        /// That relay's identifier.
        relay: Identifier,
        /// The authority's service name at that relay.
        service: ServiceName,
    },
    /// `postern authority revoke`.
    Revoke {
        /// What to revoke.
        target: RevocationTarget,
    },
    /// `postern authority member add`.
    AddMember {
        /// The identity.
        identifier: Identifier,
        /// Person or service.
        kind: Kind,
        /// Its attributes.
        attributes: Attributes,
    },
    /// `postern authority member remove`.
    RemoveMember {
        /// The identity.
        identifier: Identifier,
    },
    /// `postern authority ticket-remove`.
    RemoveTicket {
        /// The ticket's id or its first 8+ hex digits.
        selector: String,
    },
    /// `postern authority list`.
    List,
}

/// The answer to an [`AdminRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AdminReply {
    /// The ticket made: its printable form (holding the one-time code) and
    /// what the store keeps of it.
    Ticket {
        /// `pstn-ticket:…`, to give to the new machine.
        token: SecretString,
        /// The stored record.
        record: TicketRecord,
    },
    /// The revocation in force.
    Revoked {
        /// Its log entry.
        entry: RevocationEntry,
        /// Whether it was already revoked before this request.
        already: bool,
        /// Whose identity or credential it is, when the authority knows
        /// (for the audit record).
        subject: Option<Identifier>,
    },
    /// The member added or replaced.
    Member {
        /// The member.
        member: Member,
    },
    /// Whether the member removed was one.
    MemberRemoved {
        /// Whether it was a member.
        existed: bool,
    },
    /// The ticket withdrawn.
    TicketRemoved {
        /// Its record.
        record: TicketRecord,
    },
    /// Everything the authority holds, for `list`.
    Listing {
        /// The authority's identifier.
        authority: Identifier,
        /// Members.
        members: Vec<Member>,
        /// Tickets, used and expired ones included.
        tickets: Vec<TicketRecord>,
        /// The revocation log.
        revocations: Vec<RevocationEntry>,
    },
    /// The request failed, and why (the full message: the admin is the
    /// authority's owner).
    Failed {
        /// What went wrong.
        message: String,
    },
}

/// Carries out `request` on `authority` at `now` (unix seconds). Blocking
/// (the store does file I/O).
pub fn execute(authority: &Authority, request: AdminRequest, now: u64) -> AdminReply {
    match run(authority, request, now) {
        Ok(reply) => reply,
        Err(e) => AdminReply::Failed {
            message: e.to_string(),
        },
    }
}

fn run(
    authority: &Authority,
    request: AdminRequest,
    now: u64,
) -> Result<AdminReply, AuthorityError> {
    Ok(match request {
        AdminRequest::CreateTicket {
            kind,
            attributes,
            ttl_secs,
            uses,
            note,
            relay_addr,
            relay,
            service,
        } => {
            let spec = TicketSpec {
                kind,
                attributes,
                ttl: Duration::from_secs(ttl_secs),
                uses,
                note,
            };
            let route = EnrollmentRoute {
                relay_addr,
                relay,
                authority_service: service,
            };
            let (ticket, record) = authority.create_ticket(&spec, &route, now)?;
            let token = ticket
                .to_token()
                .map_err(|e| AuthorityError::Internal(format!("cannot print the ticket: {e}")))?;
            AdminReply::Ticket {
                token: SecretString::new(token.as_str()),
                record,
            }
        }
        AdminRequest::Revoke { target } => {
            let already = authority.store().revocation(&target)?.is_some();
            let entry = authority.revoke(target, now)?;
            let subject = match target {
                RevocationTarget::Identity(id) => Some(id),
                RevocationTarget::Credential(id) => {
                    authority.store().issued_credential(&id)?.map(|r| r.subject)
                }
            };
            AdminReply::Revoked {
                entry,
                already,
                subject,
            }
        }
        AdminRequest::AddMember {
            identifier,
            kind,
            attributes,
        } => AdminReply::Member {
            member: authority.add_member(identifier, kind, attributes, MemberSource::Admin, now)?,
        },
        AdminRequest::RemoveMember { identifier } => AdminReply::MemberRemoved {
            existed: authority.remove_member(&identifier)?,
        },
        AdminRequest::RemoveTicket { selector } => AdminReply::TicketRemoved {
            record: authority.remove_ticket(&selector)?,
        },
        AdminRequest::List => AdminReply::Listing {
            authority: authority.identifier(),
            members: authority.members()?,
            tickets: authority.tickets()?,
            revocations: authority.revocations_since(0)?,
        },
    })
}

/// Why the admin endpoint could not be set up or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The endpoint's directory or socket could not be created, or is
    /// unsafe to use. Local.
    #[error("admin endpoint {path}: {reason}")]
    Setup {
        /// The directory or socket.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// The running authority could not be reached or did not answer as
    /// expected.
    #[error("the running authority's admin endpoint {path} failed: {source}")]
    Link {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: LinkError,
    },
    /// The authority's store could not be opened (when no authority runs),
    /// or the authority could not be set up on it.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// The endpoint is not the authority this command holds the key of, or
    /// the endpoint refused this command's identity.
    #[error("the admin endpoint {path} refused: {reason}")]
    Refused {
        /// The socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// How long an admin command waits for a store that another admin command
/// holds open (when no authority runs, each opens the store in turn).
const STORE_BUSY_WAIT: Duration = Duration::from_secs(5);

/// Carries out `request` for the authority `identity` whose store is at
/// `store`: through the admin endpoint when an authority runs there (its
/// feeds send a revocation at once), else on the store itself, opened for
/// this request (waiting a few seconds while another admin command holds
/// it).
pub async fn request(
    store: &Path,
    identity: &Identity,
    request: AdminRequest,
) -> Result<AdminReply, AdminError> {
    let local = LocalParty::new(identity.clone()).map_err(|e| AdminError::Link {
        path: socket_path(store),
        source: e.into(),
    })?;
    let deadline = tokio::time::Instant::now() + STORE_BUSY_WAIT;
    loop {
        if let Some(mut client) = AdminClient::connect(store, &local).await? {
            return client.request(&request).await;
        }
        let (path, identity, req) = (store.to_owned(), identity.clone(), request.clone());
        let opened = tokio::task::spawn_blocking(move || {
            let store = RedbStore::open(&path)?;
            let authority = Authority::new(identity, Box::new(store), AuthorityConfig::default())?;
            Ok::<_, AuthorityError>(execute(&authority, req, postern_identity::time::unix_now()))
        })
        .await
        .map_err(|e| AuthorityError::Internal(format!("the store task failed: {e}")))?;
        match opened {
            Err(AuthorityError::Store(StoreError::Locked { .. }))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// Where the admin endpoint of the authority whose store is `store` listens:
/// `<store>.admin/socket`.
pub fn socket_path(store: &Path) -> PathBuf {
    let mut dir = store.as_os_str().to_owned();
    dir.push(".admin");
    PathBuf::from(dir).join("socket")
}

/// The admin endpoint of a running authority, listening.
#[derive(Debug)]
pub struct AdminEndpoint {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminEndpoint {
    /// Listens beside the store at `store` (which the caller holds open, so
    /// no other authority can be using the endpoint): makes the directory
    /// (`0700`; an existing one must belong to the store's owner and be
    /// closed to others), removes a socket left by an authority that
    /// stopped, and binds the socket (`0600`).
    pub fn bind(store: &Path) -> Result<Self, AdminError> {
        let path = socket_path(store);
        let setup = |path: &Path, reason: String| AdminError::Setup {
            path: path.to_owned(),
            reason,
        };
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(setup(
                &path,
                format!("the path is longer than the {MAX_SOCKET_PATH} bytes a Unix socket address holds: give the store a shorter path (--store)"),
            ));
        }
        let Some(dir) = path.parent() else {
            return Err(setup(&path, "has no directory".into()));
        };
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(setup(dir, format!("cannot create it: {e}"))),
        }
        let meta = fs::symlink_metadata(dir).map_err(|e| setup(dir, e.to_string()))?;
        let owner = fs::metadata(store).map(|m| m.uid()).ok();
        if !meta.is_dir() {
            return Err(setup(
                dir,
                "exists and is not a directory: remove it".into(),
            ));
        }
        if owner.is_some_and(|uid| uid != meta.uid()) {
            return Err(setup(
                dir,
                "belongs to another user than the authority's store: remove it".into(),
            ));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(setup(
                dir,
                format!(
                    "is open to other users (mode {:o}): chmod 700 {}",
                    meta.permissions().mode() & 0o777,
                    dir.display()
                ),
            ));
        }
        match fs::remove_file(&path) {
            Ok(()) => {
                debug!(path = %path.display(), "removed the admin socket of an authority that stopped")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(setup(&path, format!("cannot remove the old socket: {e}"))),
        }
        let listener = UnixListener::bind(&path).map_err(|e| setup(&path, e.to_string()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .map_err(|e| setup(&path, e.to_string()))?;
        Ok(AdminEndpoint { listener, path })
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves admin commands for `authority` (whose identity `local` holds)
    /// until `stop`, then removes the socket.
    pub async fn serve(
        self,
        local: Arc<LocalParty>,
        authority: Arc<Authority>,
        stop: CancellationToken,
    ) {
        let tasks = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
        info!(path = %self.path.display(), "admin endpoint listening (admin commands reach this authority here)");
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "admin endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                debug!("admin endpoint: too many connections at once; one dropped");
                continue;
            };
            let (local, authority, stop) =
                (Arc::clone(&local), Arc::clone(&authority), stop.clone());
            tasks.spawn(async move {
                let _permit = permit;
                if let Err(e) = serve_connection(stream, &local, &authority, &stop).await {
                    debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
        tasks.close();
        tasks.wait().await;
        let _ = fs::remove_file(&self.path);
    }
}

/// One admin connection: the handshake, then requests until it closes.
async fn serve_connection(
    stream: UnixStream,
    local: &LocalParty,
    authority: &Arc<Authority>,
    stop: &CancellationToken,
) -> Result<(), LinkError> {
    let (rd, mut writer) = stream.into_split();
    let mut reader = FramedReader::new(rd, link::DATA_READ_BUFFER);
    let hello = Hello::default();
    let handshake = link::respond(
        &mut reader,
        &mut writer,
        local,
        ChannelKind::AuthorityAdmin,
        &hello,
    );
    let (peer, transport) =
        link::within(ADMIN_HANDSHAKE_TIMEOUT, "admin handshake", handshake).await?;
    let (mut sealer, mut opener) = transport.split();
    let own = authority.identifier();
    let who = peer.identity.identifier();
    if who != own {
        warn!(%who, "admin endpoint: refused a connection that proved another identity than the authority's");
        let reply = AdminReply::Failed {
            message: format!(
                "this endpoint serves only the authority's own identity {own}, and this command proved {who}: run it with the authority's key (--identity)"
            ),
        };
        send(&mut writer, &mut sealer, &reply).await?;
        let _ = writer.shutdown().await;
        return Ok(());
    }
    loop {
        let request = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            request = recv::<AdminRequest, _>(&mut reader, &mut opener) => request,
        };
        let request = match request {
            Ok(request) => request,
            Err(LinkError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        debug!(?request, "admin request");
        let reply = authority
            .blocking(move |a| Ok(execute(a, request, postern_identity::time::unix_now())))
            .await
            .unwrap_or_else(|e| AdminReply::Failed {
                message: e.to_string(),
            });
        send(&mut writer, &mut sealer, &reply).await?;
    }
}

/// An admin command's connection to its running authority.
#[derive(Debug)]
pub struct AdminClient {
    reader: FramedReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    sealer: Sealer,
    opener: Opener,
    path: PathBuf,
}

impl AdminClient {
    /// Connects to the admin endpoint of the authority running on `store`,
    /// proving `local`'s identity (the authority's) and requiring the
    /// endpoint to prove the same. `Ok(None)` when no authority is running
    /// there (no socket, or nobody listening on it): then open the store
    /// directly.
    pub async fn connect(store: &Path, local: &LocalParty) -> Result<Option<Self>, AdminError> {
        let path = socket_path(store);
        let stream = match UnixStream::connect(&path).await {
            Ok(stream) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(e) => {
                return Err(AdminError::Link {
                    path,
                    source: LinkError::Io(e),
                })
            }
        };
        let (rd, mut writer) = stream.into_split();
        let mut reader = FramedReader::new(rd, link::DATA_READ_BUFFER);
        let own = local.identity().identifier();
        let hello = Hello::default();
        let handshake = link::initiate(
            &mut reader,
            &mut writer,
            local,
            ChannelKind::AuthorityAdmin,
            &hello,
            |peer| {
                let found = peer.identity.identifier();
                if found == own {
                    Ok(())
                } else {
                    Err(ChannelError::UnexpectedPeer {
                        expected: own,
                        actual: found,
                    })
                }
            },
        );
        match link::within(ADMIN_HANDSHAKE_TIMEOUT, "admin handshake", handshake).await {
            Ok((_, transport)) => {
                let (sealer, opener) = transport.split();
                Ok(Some(AdminClient {
                    reader,
                    writer,
                    sealer,
                    opener,
                    path,
                }))
            }
            Err(LinkError::Channel(ChannelError::UnexpectedPeer { actual, .. })) => {
                Err(AdminError::Refused {
                    path,
                    reason: format!(
                        "it is authority {actual}, not {own} (the identity this command loaded): give the store of this authority (--store), or its identity (--identity)"
                    ),
                })
            }
            Err(source) => Err(AdminError::Link { path, source }),
        }
    }

    /// Sends `request` and returns the authority's reply ([`AdminReply::Failed`]
    /// when it failed there).
    pub async fn request(&mut self, request: &AdminRequest) -> Result<AdminReply, AdminError> {
        let path = &self.path;
        let link_error = |source| AdminError::Link {
            path: path.clone(),
            source,
        };
        send(&mut self.writer, &mut self.sealer, request)
            .await
            .map_err(link_error)?;
        recv(&mut self.reader, &mut self.opener)
            .await
            .map_err(link_error)
    }
}

/// Sends `msg` as CBOR over as many transport frames as it needs: each
/// frame's plaintext is a flag (1: the last piece) and a piece.
async fn send<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    sealer: &mut Sealer,
    msg: &T,
) -> Result<(), LinkError> {
    let bytes = wire::encode(msg)?;
    if bytes.len() > MAX_ADMIN_MESSAGE {
        return Err(ChannelError::TooLarge(bytes.len()).into());
    }
    let mut pieces = bytes.chunks(PIECE).peekable();
    let (mut plain, mut out) = (Vec::with_capacity(PIECE + 1), Vec::new());
    loop {
        let piece = pieces.next().unwrap_or_default();
        plain.clear();
        plain.push(u8::from(pieces.peek().is_none()));
        plain.extend_from_slice(piece);
        out.clear();
        sealer.seal(&plain, &mut out)?;
        writer.write_all(&out).await?;
        if pieces.peek().is_none() {
            return Ok(());
        }
    }
}

/// Receives one message sent by [`send`].
async fn recv<T: serde::de::DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut FramedReader<R>,
    opener: &mut Opener,
) -> Result<T, LinkError> {
    let mut plain = vec![0u8; postern_identity::frame::MAX_NOISE_MESSAGE];
    let mut message = Vec::new();
    loop {
        let body = reader
            .next_frame(postern_identity::frame::MAX_NOISE_MESSAGE)
            .await?;
        let n = opener.open(body, &mut plain)?;
        let Some((&last, piece)) = plain[..n].split_first() else {
            return Err(ChannelError::BadMessage("an empty admin frame".into()).into());
        };
        if message.len() + piece.len() > MAX_ADMIN_MESSAGE {
            return Err(ChannelError::TooLarge(message.len() + piece.len()).into());
        }
        message.extend_from_slice(piece);
        match last {
            1 => return Ok(wire::decode(&message)?),
            0 => {}
            _ => return Err(ChannelError::BadMessage("a bad admin frame flag".into()).into()),
        }
    }
}
