//! The authority's logic over both stores: tickets (single use, expiry,
//! attributes in the credential), members, revocation, persistence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use postern_authority::{
    Authority, AuthorityConfig, AuthorityError, AuthorityStore, EnrollmentRoute, IssuedVia,
    MemberSource, MemoryStore, RedbStore, StoreError, TicketSpec, MAX_TICKET_TTL,
};
use postern_identity::credential::{
    self, CredentialError, Kind, NoRevocations, RevocationTarget, SignedCredential,
    TrustedAuthorities,
};
use postern_identity::ticket::{Ticket, DEFAULT_AUTHORITY_SERVICE};
use postern_identity::{AttrValue, Attributes, Identifier, Identity};

const NOW: u64 = 1_700_000_000;

fn route() -> EnrollmentRoute {
    EnrollmentRoute {
        relay_addr: "relay.example.com:7443".into(),
        relay: Identity::from_secret_bytes(&[3; 32]).identifier(),
        authority_service: DEFAULT_AUTHORITY_SERVICE.parse().unwrap(),
    }
}

fn attrs(pairs: &[(&str, &str)]) -> Attributes {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), AttrValue::One(v.to_string())))
        .collect()
}

fn spec(uses: u32, ttl_secs: u64) -> TicketSpec {
    TicketSpec {
        kind: Kind::Person,
        attributes: attrs(&[("team", "analytics"), ("role", "analyst")]),
        ttl: Duration::from_secs(ttl_secs),
        uses,
        note: Some("test".into()),
    }
}

/// Runs `f` against a memory store and a fresh redb store.
fn each_store(f: impl Fn(Authority)) {
    let memory = Authority::new(
        Identity::generate(),
        Box::new(MemoryStore::new()),
        AuthorityConfig::default(),
    )
    .unwrap();
    f(memory);
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("authority.redb")).unwrap();
    let redb = Authority::new(
        Identity::generate(),
        Box::new(store),
        AuthorityConfig::default(),
    )
    .unwrap();
    f(redb);
}

fn verify(
    a: &Authority,
    c: &SignedCredential,
    subject: Identifier,
    now: u64,
) -> Result<credential::VerifiedCredential, CredentialError> {
    let trusted: TrustedAuthorities = [a.identifier()].into_iter().collect();
    credential::verify(c, &trusted, subject, now, &a.revocation_list().unwrap())
}

#[test]
fn ticket_is_single_use_and_attributes_reach_the_credential() {
    each_store(|a| {
        let (ticket, record) = a.create_ticket(&spec(1, 900), &route(), NOW).unwrap();
        assert_eq!(record.uses_left, 1);
        assert_eq!(ticket.expires_at, NOW + 900);
        assert_eq!(ticket.authority, a.identifier());
        // Through its printed form, as `postern enroll` would get it.
        let token = ticket.to_token().unwrap();
        let parsed = Ticket::parse(&token).unwrap();
        assert_eq!(parsed, ticket);

        let alice = Identity::generate().identifier();
        let cred = a.redeem_ticket(&parsed.code, alice, NOW + 10).unwrap();
        let v = verify(&a, &cred, alice, NOW + 11).unwrap();
        assert_eq!(v.attributes(), &spec(1, 900).attributes);
        assert_eq!(v.kind(), Kind::Person);
        assert_eq!(v.issuer(), a.identifier());
        assert_eq!(v.expires_at(), NOW + 10 + 8 * 3600);
        let member = a.store().member(&alice).unwrap().unwrap();
        assert_eq!(member.source, MemberSource::Ticket(record.code_hash));

        // Second use: refused, by anyone, with a clear reason.
        let bob = Identity::generate().identifier();
        let err = a.redeem_ticket(&parsed.code, bob, NOW + 20).unwrap_err();
        assert!(
            matches!(err, AuthorityError::TicketUsedUp { uses: 1 }),
            "{err}"
        );
        assert!(err.to_string().contains("already been used"), "{err}");
        assert!(err.is_client_error());
        assert!(a.redeem_ticket(&parsed.code, alice, NOW + 20).is_err());
        assert!(a.store().member(&bob).unwrap().is_none());
        let t = &a.tickets().unwrap()[0];
        assert_eq!((t.uses_left, t.uses_total), (0, 1));

        // The issuance was logged.
        let log = a.issued(Some(&alice)).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].via, IssuedVia::Ticket(record.code_hash));
        assert_eq!(log[0].id, v.id());
    });
}

#[test]
fn multi_use_tickets_count_down() {
    each_store(|a| {
        let (ticket, _) = a.create_ticket(&spec(2, 900), &route(), NOW).unwrap();
        for _ in 0..2 {
            let who = Identity::generate().identifier();
            a.redeem_ticket(&ticket.code, who, NOW).unwrap();
        }
        let err = a
            .redeem_ticket(&ticket.code, Identity::generate().identifier(), NOW)
            .unwrap_err();
        assert!(err.to_string().contains("2 enrollments"), "{err}");
        assert_eq!(a.members().unwrap().len(), 2);
    });
}

#[test]
fn expired_and_unknown_tickets_are_refused() {
    each_store(|a| {
        let (ticket, _) = a.create_ticket(&spec(1, 900), &route(), NOW).unwrap();
        let who = Identity::generate().identifier();
        let err = a.redeem_ticket(&ticket.code, who, NOW + 901).unwrap_err();
        assert!(matches!(err, AuthorityError::TicketExpired { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("expired at") && text.contains("1s ago"),
            "{text}"
        );
        // The failed attempt did not use it up.
        assert_eq!(a.tickets().unwrap()[0].uses_left, 1);
        assert!(a.redeem_ticket(&ticket.code, who, NOW + 900).is_ok());

        let unknown = postern_identity::ticket::TicketCode::random();
        let err = a.redeem_ticket(&unknown, who, NOW).unwrap_err();
        assert!(matches!(err, AuthorityError::TicketUnknown), "{err}");
        assert!(err.to_string().contains("not known"), "{err}");
        // Removed tickets are unknown.
        let (t2, rec2) = a.create_ticket(&spec(1, 900), &route(), NOW).unwrap();
        a.remove_ticket(&rec2.code_hash.short()).unwrap();
        assert!(matches!(
            a.redeem_ticket(&t2.code, who, NOW),
            Err(AuthorityError::TicketUnknown)
        ));
    });
}

#[test]
fn single_use_holds_under_concurrency() {
    each_store(|a| {
        let a = Arc::new(a);
        let (ticket, _) = a.create_ticket(&spec(1, 900), &route(), NOW).unwrap();
        let ticket = Arc::new(ticket);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (a, ticket) = (a.clone(), ticket.clone());
                std::thread::spawn(move || {
                    a.redeem_ticket(&ticket.code, Identity::generate().identifier(), NOW)
                        .is_ok()
                })
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(wins, 1);
        assert_eq!(a.members().unwrap().len(), 1);
    });
}

#[test]
fn members_lifetimes_and_renewal() {
    each_store(|a| {
        let svc = Identity::generate().identifier();
        let err = a.issue_for_member(svc, NOW).unwrap_err();
        assert!(matches!(err, AuthorityError::NotAMember { .. }), "{err}");
        assert!(err.to_string().contains("not a member"), "{err}");
        a.add_member(
            svc,
            Kind::Service,
            attrs(&[("role", "db-outlet")]),
            MemberSource::Admin,
            NOW,
        )
        .unwrap();
        let c = a.issue_for_member(svc, NOW).unwrap();
        let v = verify(&a, &c, svc, NOW).unwrap();
        assert_eq!(v.expires_at(), NOW + 24 * 3600);
        assert_eq!(v.kind(), Kind::Service);
        assert_eq!(v.attributes()["role"], AttrValue::One("db-outlet".into()));
        // Renewal gives a new credential id.
        let c2 = a.issue_for_member(svc, NOW + 100).unwrap();
        assert_ne!(verify(&a, &c2, svc, NOW + 100).unwrap().id(), v.id());
        assert_eq!(a.issued(Some(&svc)).unwrap().len(), 2);
        assert!(a.remove_member(&svc).unwrap());
        assert!(!a.remove_member(&svc).unwrap());
        assert!(matches!(
            a.issue_for_member(svc, NOW),
            Err(AuthorityError::NotAMember { .. })
        ));
    });
}

#[test]
fn configured_lifetimes_apply() {
    let config = AuthorityConfig {
        person_lifetime: Duration::from_secs(5),
        service_lifetime: Duration::from_secs(60),
    };
    let a = Authority::new(Identity::generate(), Box::new(MemoryStore::new()), config).unwrap();
    let (ticket, _) = a.create_ticket(&spec(1, 900), &route(), NOW).unwrap();
    let who = Identity::generate().identifier();
    let c = a.redeem_ticket(&ticket.code, who, NOW).unwrap();
    assert_eq!(verify(&a, &c, who, NOW).unwrap().expires_at(), NOW + 5);
    let late = verify(&a, &c, who, NOW + 5 + 61).unwrap_err();
    assert!(matches!(late, CredentialError::Expired { .. }));

    let zero = AuthorityConfig {
        person_lifetime: Duration::ZERO,
        ..AuthorityConfig::default()
    };
    assert!(Authority::new(Identity::generate(), Box::new(MemoryStore::new()), zero).is_err());
}

#[test]
fn revocation_by_identity_and_by_credential() {
    each_store(|a| {
        let (ticket, _) = a.create_ticket(&spec(3, 900), &route(), NOW).unwrap();
        let alice = Identity::generate().identifier();
        let bob = Identity::generate().identifier();
        let c_alice = a.redeem_ticket(&ticket.code, alice, NOW).unwrap();
        let c_bob1 = a.redeem_ticket(&ticket.code, bob, NOW).unwrap();
        let c_bob2 = a.issue_for_member(bob, NOW + 1).unwrap();
        assert!(a.revocations_since(0).unwrap().is_empty());

        // Revoke Alice's identity: her credential fails, and she gets no new one.
        let e1 = a
            .revoke(RevocationTarget::Identity(alice), NOW + 5)
            .unwrap();
        assert_eq!(e1.seq, 1);
        let err = verify(&a, &c_alice, alice, NOW + 6).unwrap_err();
        assert!(matches!(err, CredentialError::Revoked { .. }), "{err}");
        assert!(err.to_string().contains(&alice.to_string()), "{err}");
        let err = a.issue_for_member(alice, NOW + 6).unwrap_err();
        assert!(matches!(err, AuthorityError::Revoked { .. }), "{err}");
        let err = a.redeem_ticket(&ticket.code, alice, NOW + 6).unwrap_err();
        assert!(matches!(err, AuthorityError::Revoked { .. }), "{err}");
        assert!(a
            .add_member(
                alice,
                Kind::Person,
                Attributes::new(),
                MemberSource::Admin,
                NOW
            )
            .is_err());

        // Revoke one of Bob's credentials only.
        let bob1_id = c_bob1.inspect_unverified().unwrap().id;
        let e2 = a
            .revoke(RevocationTarget::Credential(bob1_id), NOW + 7)
            .unwrap();
        assert_eq!(e2.seq, 2);
        assert!(verify(&a, &c_bob1, bob, NOW + 8).is_err());
        assert!(verify(&a, &c_bob2, bob, NOW + 8).is_ok());
        assert!(a.issue_for_member(bob, NOW + 8).is_ok());

        // Revoking again is idempotent; the log is incremental.
        let again = a
            .revoke(RevocationTarget::Identity(alice), NOW + 9)
            .unwrap();
        assert_eq!(again, e1);
        assert_eq!(a.revocations_since(0).unwrap(), vec![e1, e2]);
        assert_eq!(a.revocations_since(1).unwrap(), vec![e2]);
        assert!(a.revocations_since(2).unwrap().is_empty());
        assert!(a.revocations_since(u64::MAX).unwrap().is_empty());
        assert_eq!(a.revocation_list().unwrap().latest_seq(), 2);
        // Unrelated verifiers without revocations still accept (they must
        // receive the list to enforce it).
        let trusted: TrustedAuthorities = [a.identifier()].into_iter().collect();
        assert!(credential::verify(&c_alice, &trusted, alice, NOW, &NoRevocations).is_ok());
    });
}

#[test]
fn admin_input_is_checked() {
    each_store(|a| {
        let bad_specs = [
            spec(0, 900),
            spec(1, 0),
            spec(1, MAX_TICKET_TTL.as_secs() + 1),
            TicketSpec {
                attributes: attrs(&[("", "x")]),
                ..spec(1, 900)
            },
            TicketSpec {
                attributes: attrs(&[("a", "line\nbreak")]),
                ..spec(1, 900)
            },
            TicketSpec {
                attributes: (0..40)
                    .map(|i| (format!("k{i}"), AttrValue::One("v".repeat(300))))
                    .collect(),
                ..spec(1, 900)
            },
        ];
        for s in bad_specs {
            let err = a.create_ticket(&s, &route(), NOW).unwrap_err();
            assert!(matches!(err, AuthorityError::InvalidRequest(_)), "{err}");
        }
        let mut r = route();
        r.relay_addr = "no port".into();
        assert!(a.create_ticket(&spec(1, 900), &r, NOW).is_err());
        assert!(a.tickets().unwrap().is_empty());

        // Ticket selection by prefix.
        assert!(a.remove_ticket("abc").is_err());
        assert!(a.remove_ticket("zzzzzzzz").is_err());
        assert!(a.remove_ticket("00000000").is_err());
    });
}

#[test]
fn internal_errors_are_not_shown_to_clients() {
    let err = AuthorityError::Store(StoreError::Backend("disk /var/lib/x failed".into()));
    assert!(!err.is_client_error());
    assert!(!err.client_message().contains("/var/lib"));
    let err = AuthorityError::TicketUnknown;
    assert_eq!(err.client_message(), err.to_string());
}

#[test]
fn redb_store_persists_locks_and_prunes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/authority.redb");
    let identity = Identity::generate();
    let alice = Identity::generate().identifier();
    let code = {
        let store = RedbStore::open(&path).unwrap();
        // A second open of the same file is refused while the first lives.
        let err = RedbStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("admin endpoint"), "{err}");
        let a = Authority::new(
            identity.clone(),
            Box::new(store),
            AuthorityConfig::default(),
        )
        .unwrap();
        let (ticket, _) = a.create_ticket(&spec(2, 900), &route(), NOW).unwrap();
        a.redeem_ticket(&ticket.code, alice, NOW).unwrap();
        a.revoke(
            RevocationTarget::Identity(Identity::generate().identifier()),
            NOW,
        )
        .unwrap();
        ticket.code
    };
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.members().unwrap().len(), 1);
    assert_eq!(store.tickets().unwrap()[0].uses_left, 1);
    assert_eq!(store.revocations_since(0).unwrap().len(), 1);
    assert_eq!(store.issued(None).unwrap().len(), 1);
    let a = Authority::new(identity, Box::new(store), AuthorityConfig::default()).unwrap();
    assert!(a.redeem_ticket(&code, alice, NOW + 1).is_ok());
    assert!(a.redeem_ticket(&code, alice, NOW + 2).is_err());
    let second = a
        .revoke(
            RevocationTarget::Identity(Identity::generate().identifier()),
            NOW,
        )
        .unwrap();
    assert_eq!(second.seq, 2);

    // Pruning drops expired tickets and log entries, not members.
    let pruned = a.store().prune_expired(NOW + 24 * 3600).unwrap();
    assert_eq!(pruned, 1 + 2);
    assert!(a.tickets().unwrap().is_empty());
    assert!(a.issued(None).unwrap().is_empty());
    assert_eq!(a.members().unwrap().len(), 1);
}

#[test]
fn garbage_database_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authority.redb");
    std::fs::write(&path, b"this is not a database at all, not even close").unwrap();
    let err = RedbStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
}

fn oidc_login(subject: &str) -> postern_authority::oidc::VerifiedLogin {
    postern_authority::oidc::VerifiedLogin {
        issuer: "https://id.example.com".into(),
        subject: subject.into(),
        name: format!("{subject}@example.com"),
        attributes: Attributes::new(),
        issued_at: NOW,
        expires_at: NOW + 600,
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn refresh_tokens_never_reach_the_store_file_in_clear() {
    use postern_authority::oidc::SecretString;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authority.redb");
    let identity = Identity::generate();
    let node = Identity::generate().identifier();
    let (first, rotated) = (
        "rt-first-4f1d9c77-refresh-token-of-alice",
        "rt-rotated-9b2e01aa-refresh-token-of-alice",
    );
    {
        let a = Authority::new(
            identity.clone(),
            Box::new(RedbStore::open(&path).unwrap()),
            AuthorityConfig::default(),
        )
        .unwrap();
        a.enroll_oidc(
            node,
            &oidc_login("alice"),
            Some(SecretString::new(first)),
            NOW,
        )
        .unwrap();
        a.renew_oidc(
            node,
            &oidc_login("alice"),
            Some(SecretString::new(rotated)),
            NOW + 1,
        )
        .unwrap();
        let (_, token) = a.oidc_refresh_token(&node).unwrap().unwrap();
        assert_eq!(token.unwrap().expose(), rotated);
    }
    let bytes = std::fs::read(&path).unwrap();
    assert!(contains(&bytes, "alice@example.com"), "the check is blind");
    for token in [first, rotated] {
        assert!(!contains(&bytes, token), "{token} is in the store file");
    }
    // The authority's key opens it again; another authority's does not.
    let a = Authority::new(
        identity.clone(),
        Box::new(RedbStore::open(&path).unwrap()),
        AuthorityConfig::default(),
    )
    .unwrap();
    let (_, token) = a.oidc_refresh_token(&node).unwrap().unwrap();
    assert_eq!(token.unwrap().expose(), rotated);
    drop(a);
    let stranger = Authority::new(
        Identity::generate(),
        Box::new(RedbStore::open(&path).unwrap()),
        AuthorityConfig::default(),
    )
    .unwrap();
    let err = stranger.oidc_refresh_token(&node).unwrap_err();
    assert!(err.to_string().contains("does not open"), "{err}");
}

#[test]
fn tokens_an_older_postern_stored_in_clear_are_sealed_and_their_bytes_dropped() {
    use postern_authority::oidc::SecretString;
    use postern_authority::{OidcSession, StoredToken};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("authority.redb");
    let identity = Identity::generate();
    let node = Identity::generate().identifier();
    let member = Identity::generate().identifier();
    let legacy = "rt-legacy-0c5f37d2-stored-in-clear-by-an-older-postern";
    {
        // The record as an older Postern wrote it, beside other state.
        let store = RedbStore::open(&path).unwrap();
        store
            .put_oidc_session(&OidcSession {
                identifier: node,
                issuer: "https://id.example.com".into(),
                subject: "alice".into(),
                name: "alice@example.com".into(),
                refresh_token: Some(StoredToken::Plain(SecretString::new(legacy))),
                logged_in_at: NOW,
                checked_at: NOW,
                refresh_refused_at: None,
            })
            .unwrap();
        store
            .put_member(&postern_authority::Member {
                identifier: member,
                kind: Kind::Service,
                attributes: Attributes::new(),
                added_at: NOW,
                source: MemberSource::Admin,
            })
            .unwrap();
        store
            .revoke(postern_identity::credential::Revocation {
                target: RevocationTarget::Identity(Identity::generate().identifier()),
                revoked_at: NOW,
            })
            .unwrap();
    }
    assert!(
        contains(&std::fs::read(&path).unwrap(), legacy),
        "the check is blind: the legacy token is not in the file"
    );
    let a = Authority::new(
        identity.clone(),
        Box::new(RedbStore::open(&path).unwrap()),
        AuthorityConfig::default(),
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert!(
        !contains(&bytes, legacy),
        "the legacy token is still in the file"
    );
    let (session, token) = a.oidc_refresh_token(&node).unwrap().unwrap();
    assert_eq!(token.unwrap().expose(), legacy);
    assert!(matches!(
        session.refresh_token,
        Some(StoredToken::Sealed(_))
    ));
    // Everything else came along, and the rewritten file is the store.
    assert!(a.member(&member).unwrap().is_some());
    assert_eq!(a.revocations_since(0).unwrap().len(), 1);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        matches!(RedbStore::open(&path), Err(StoreError::Locked { .. })),
        "the rewritten store is not held"
    );
    drop(a);
    let again = Authority::new(
        identity,
        Box::new(RedbStore::open(&path).unwrap()),
        AuthorityConfig::default(),
    )
    .unwrap();
    assert_eq!(
        again
            .oidc_refresh_token(&node)
            .unwrap()
            .unwrap()
            .1
            .unwrap()
            .expose(),
        legacy
    );
    assert!(!dir.path().join("authority.redb.rewrite").exists());
}
