//! The admin endpoint of a running authority: admin requests through it,
//! its file permissions, and a local process without the authority's key
//! trying to use it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use postern_authority::admin::{self, AdminClient, AdminEndpoint, AdminReply, AdminRequest};
use postern_authority::{Authority, AuthorityConfig, MemoryStore};
use postern_identity::credential::{Kind, RevocationTarget};
use postern_identity::handshake::{ChannelKind, LocalParty};
use postern_identity::link::{self, FramedReader};
use postern_identity::ticket::Ticket;
use postern_identity::wire::{self, Hello, ServiceName};
use postern_identity::{AttrValue, Attributes, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

/// An authority (in memory) serving its admin endpoint beside `store`.
struct Running {
    identity: Identity,
    authority: Arc<Authority>,
    stop: CancellationToken,
    served: tokio::task::JoinHandle<()>,
}

async fn run_authority(store: &Path) -> Running {
    let identity = Identity::generate();
    let authority = Arc::new(
        Authority::new(
            identity.clone(),
            Box::new(MemoryStore::new()),
            AuthorityConfig::default(),
        )
        .unwrap(),
    );
    let endpoint = AdminEndpoint::bind(store).unwrap();
    let local = Arc::new(LocalParty::new(identity.clone()).unwrap());
    let stop = CancellationToken::new();
    let served = tokio::spawn(endpoint.serve(local, Arc::clone(&authority), stop.clone()));
    Running {
        identity,
        authority,
        stop,
        served,
    }
}

fn party(identity: &Identity) -> LocalParty {
    LocalParty::new(identity.clone()).unwrap()
}

fn attrs(pairs: &[(&str, &str)]) -> Attributes {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), AttrValue::One(v.to_string())))
        .collect()
}

#[tokio::test]
async fn admin_commands_reach_the_running_authority() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("authority.redb");
    let running = run_authority(&store).await;
    let path = admin::socket_path(&store);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(mode(&path), 0o600);

    let mut admin = AdminClient::connect(&store, &party(&running.identity))
        .await
        .unwrap()
        .expect("the endpoint answers");

    // A ticket, signed by the running authority, naming its route.
    let relay = Identity::generate().identifier();
    let service = ServiceName::of_authority(&running.identity.identifier());
    let reply = admin
        .request(&AdminRequest::CreateTicket {
            kind: Kind::Person,
            attributes: attrs(&[("team", "data")]),
            ttl_secs: 900,
            uses: 1,
            note: None,
            relay_addr: "relay.example:4000".into(),
            relay,
            service: service.clone(),
        })
        .await
        .unwrap();
    let AdminReply::Ticket { token, record } = reply else {
        panic!("{reply:?}")
    };
    let ticket = Ticket::parse(token.expose()).unwrap();
    assert_eq!(ticket.authority, running.identity.identifier());
    assert_eq!(ticket.authority_service, service);
    assert_eq!(record.code_hash, ticket.code.hash());

    // A member; a revocation, which wakes whoever watches at once.
    let member = Identity::generate().identifier();
    let reply = admin
        .request(&AdminRequest::AddMember {
            identifier: member,
            kind: Kind::Service,
            attributes: attrs(&[("role", "db-outlet")]),
        })
        .await
        .unwrap();
    assert!(matches!(reply, AdminReply::Member { member: m } if m.identifier == member));
    let mut newest = running.authority.watch_revocations();
    assert_eq!(*newest.borrow_and_update(), 0);
    let revoked = Identity::generate().identifier();
    let reply = admin
        .request(&AdminRequest::Revoke {
            target: RevocationTarget::Identity(revoked),
        })
        .await
        .unwrap();
    assert!(
        matches!(reply, AdminReply::Revoked { entry, already: false, subject } if entry.seq == 1 && subject == Some(revoked))
    );
    tokio::time::timeout(Duration::from_secs(1), newest.changed())
        .await
        .expect("the revocation reached the watchers within a second")
        .unwrap();
    assert_eq!(*newest.borrow(), 1);
    let again = admin
        .request(&AdminRequest::Revoke {
            target: RevocationTarget::Identity(revoked),
        })
        .await
        .unwrap();
    assert!(matches!(again, AdminReply::Revoked { already: true, .. }));

    // The listing holds all of it, even when it spans many frames.
    for i in 0..300 {
        running
            .authority
            .add_member(
                Identity::generate().identifier(),
                Kind::Person,
                attrs(&[("note", &format!("{i:0>300}"))]),
                postern_authority::MemberSource::Admin,
                0,
            )
            .unwrap();
    }
    let AdminReply::Listing {
        authority,
        members,
        tickets,
        revocations,
    } = admin.request(&AdminRequest::List).await.unwrap()
    else {
        panic!("no listing")
    };
    assert_eq!(authority, running.identity.identifier());
    assert_eq!(
        (members.len(), tickets.len(), revocations.len()),
        (301, 1, 1)
    );

    // A failure at the authority comes back as one, with its reason.
    let reply = admin
        .request(&AdminRequest::RemoveTicket {
            selector: "zz".into(),
        })
        .await
        .unwrap();
    assert!(
        matches!(&reply, AdminReply::Failed { message } if message.contains("8 hex digits")),
        "{reply:?}"
    );

    running.stop.cancel();
    running.served.await.unwrap();
    assert!(!path.exists(), "the socket is removed on stop");
    assert!(AdminClient::connect(&store, &party(&running.identity))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn only_the_authoritys_own_key_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("authority.redb");
    let running = run_authority(&store).await;
    let path = admin::socket_path(&store);
    let victim = Identity::generate().identifier();
    let revoke = AdminRequest::Revoke {
        target: RevocationTarget::Identity(victim),
    };

    // Mallory's own key: the honest client refuses an endpoint that is not
    // the authority it holds the key of, naming both.
    let mallory = Identity::generate();
    let err = AdminClient::connect(&store, &party(&mallory))
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains(&running.identity.identifier().to_string())
            && text.contains(&mallory.identifier().to_string()),
        "{text}"
    );

    // Mallory's own client, accepting any endpoint: the handshake completes
    // (the authority's identity is public), and the request is refused
    // without being carried out.
    let stream = UnixStream::connect(&path).await.unwrap();
    let (rd, mut writer) = stream.into_split();
    let mut reader = FramedReader::new(rd, link::DATA_READ_BUFFER);
    let local = party(&mallory);
    let hello = Hello::default();
    let (_, transport) = link::initiate(
        &mut reader,
        &mut writer,
        &local,
        ChannelKind::AuthorityAdmin,
        &hello,
        |_| Ok(()),
    )
    .await
    .unwrap();
    let (mut sealer, mut opener) = transport.split();
    let mut plain = vec![1u8];
    plain.extend(wire::encode(&revoke).unwrap());
    let mut out = Vec::new();
    sealer.seal(&plain, &mut out).unwrap();
    let _ = writer.write_all(&out).await;
    let body = reader.next_frame(65_535).await.unwrap();
    let mut plain = vec![0u8; 65_535];
    let n = opener.open(body, &mut plain).unwrap();
    let reply: AdminReply = wire::decode(&plain[1..n]).unwrap();
    assert!(
        matches!(&reply, AdminReply::Failed { message } if message.contains("only the authority's own identity")),
        "{reply:?}"
    );
    assert!(matches!(
        reader.next_frame(65_535).await,
        Err(link::LinkError::Closed)
    ));

    // Plaintext gets nothing but a closed connection.
    let mut raw = UnixStream::connect(&path).await.unwrap();
    raw.write_all(&wire::encode(&revoke).unwrap())
        .await
        .unwrap();
    raw.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer))
        .await
        .expect("closed at once")
        .unwrap();
    assert!(answer.is_empty(), "plaintext got an answer: {answer:?}");

    // A handshake of another channel kind does not complete.
    let stream = UnixStream::connect(&path).await.unwrap();
    let (rd, mut writer) = stream.into_split();
    let mut reader = FramedReader::new(rd, link::DATA_READ_BUFFER);
    let own = party(&running.identity);
    assert!(link::initiate(
        &mut reader,
        &mut writer,
        &own,
        ChannelKind::Hop,
        &hello,
        |_| Ok(()),
    )
    .await
    .is_err());

    assert!(
        running.authority.revocations_since(0).unwrap().is_empty(),
        "a request from outside was carried out"
    );

    // The authority's own key still works (the canary: the same request
    // is carried out when it comes from the right party).
    let mut admin = AdminClient::connect(&store, &party(&running.identity))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        admin.request(&revoke).await.unwrap(),
        AdminReply::Revoked { already: false, .. }
    ));
    assert_eq!(running.authority.revocations_since(0).unwrap().len(), 1);
    running.stop.cancel();
}

#[tokio::test]
async fn an_endpoint_directory_open_to_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("authority.redb");
    let admin_dir = admin::socket_path(&store).parent().unwrap().to_owned();
    std::fs::create_dir(&admin_dir).unwrap();
    std::fs::set_permissions(&admin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = AdminEndpoint::bind(&store).expect_err("refused");
    assert!(err.to_string().contains("chmod 700"), "{err}");

    // A socket left by an authority that died is replaced.
    std::fs::set_permissions(&admin_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let stale = std::os::unix::net::UnixListener::bind(admin::socket_path(&store)).unwrap();
    drop(stale);
    assert!(AdminClient::connect(&store, &party(&Identity::generate()))
        .await
        .unwrap()
        .is_none());
    let running = run_authority(&store).await;
    assert!(AdminClient::connect(&store, &party(&running.identity))
        .await
        .unwrap()
        .is_some());
    running.stop.cancel();
}
