//! [`AuthorityStore`] on an embedded `redb` database.
//!
//! Tables (keys raw bytes, values CBOR records):
//!
//! | table         | key                                   | value              |
//! |---------------|---------------------------------------|--------------------|
//! | `meta`        | `"schema"`                            | `u64` (= 1)        |
//! | `members`     | identifier (20 bytes)                 | [`Member`]         |
//! | `tickets`     | code hash (32 bytes)                  | [`TicketRecord`]   |
//! | `issued`      | credential id (16 bytes)              | [`IssuedRecord`]   |
//! | `revocations` | sequence number (`u64`)               | [`Revocation`]     |
//! | `revoked`     | `c` + credential id, or `i` + identifier | sequence number |
//! | `oidc_sessions` | identifier (20 bytes)               | [`OidcSession`] (holds the provider's refresh token, sealed: [`super::StoredToken`]) |
//!
//! `oidc_sessions` came after the first release of schema 1; it is created
//! when a database without it is opened, and older versions ignore it.
//!
//! redb serializes write transactions, so the read-check-write of
//! [`AuthorityStore::redeem_ticket`] and [`AuthorityStore::revoke`] is
//! atomic, across threads of this process; the file is locked against other
//! processes.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    member_from_ticket, take_ticket_use, AuthorityError, AuthorityStore, IssuedRecord, Member,
    OidcSession, StoreError, TicketRecord,
};
use postern_identity::credential::{CredentialId, Revocation, RevocationEntry, RevocationTarget};
use postern_identity::ticket::CodeHash;
use postern_identity::Identifier;

const SCHEMA_VERSION: u64 = 1;
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const MEMBERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("members");
const TICKETS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tickets");
const ISSUED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("issued");
const REVOCATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("revocations");
const REVOKED: TableDefinition<&[u8], u64> = TableDefinition::new("revoked");
const OIDC_SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("oidc_sessions");

/// The embedded authority store: one `redb` file, mode `0600`.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn backend<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Backend(e.into().to_string())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    cbor4ii::serde::to_vec(Vec::new(), value)
        .map_err(|e| StoreError::Backend(format!("CBOR encoding failed: {e}")))
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    cbor4ii::serde::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn target_key(target: &RevocationTarget) -> Vec<u8> {
    match target {
        RevocationTarget::Credential(id) => [b"c".as_slice(), id.as_bytes()].concat(),
        RevocationTarget::Identity(id) => [b"i".as_slice(), id.as_bytes()].concat(),
    }
}

impl RedbStore {
    /// Opens the database at `path`, creating it (mode `0600`, parent
    /// directories `0700`) if missing. Fails if another process has it open
    /// or it was written by a newer schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.to_owned(),
            reason,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.exists() {
                fs::create_dir_all(parent).map_err(|e| open_err(e.to_string()))?;
                let _ = fs::set_permissions(parent, fs::Permissions::from_mode(0o700));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| open_err(e.to_string()))?;
        let db = Database::builder().create_file(file).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.to_owned(),
            },
            other => open_err(other.to_string()),
        })?;
        let store = RedbStore {
            db,
            path: path.to_owned(),
        };
        store.initialise()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn initialise(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut meta = txn.open_table(META).map_err(backend)?;
            let found = meta.get("schema").map_err(backend)?.map(|g| g.value());
            match found {
                None => {
                    meta.insert("schema", SCHEMA_VERSION).map_err(backend)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(StoreError::Open {
                        path: self.path.clone(),
                        reason: format!(
                            "schema version {other} is newer than this Postern's ({SCHEMA_VERSION}): upgrade Postern"
                        ),
                    })
                }
            }
            txn.open_table(MEMBERS).map_err(backend)?;
            txn.open_table(TICKETS).map_err(backend)?;
            txn.open_table(ISSUED).map_err(backend)?;
            txn.open_table(REVOCATIONS).map_err(backend)?;
            txn.open_table(REVOKED).map_err(backend)?;
            txn.open_table(OIDC_SESSIONS).map_err(backend)?;
        }
        txn.commit().map_err(backend)
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&[u8], &[u8]>,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(table).map_err(backend)?;
        let value = t.get(key).map_err(backend)?;
        value.map(|v| decode(table.name(), v.value())).transpose()
    }

    fn all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&[u8], &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(table).map_err(backend)?;
        let mut out = Vec::with_capacity(usize::try_from(t.len().map_err(backend)?).unwrap_or(0));
        for item in t.iter().map_err(backend)? {
            let (_, v) = item.map_err(backend)?;
            out.push(decode(table.name(), v.value())?);
        }
        Ok(out)
    }

    fn put(
        &self,
        table: TableDefinition<&[u8], &[u8]>,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        txn.open_table(table)
            .map_err(backend)?
            .insert(key, value)
            .map_err(backend)?;
        txn.commit().map_err(backend)
    }

    fn delete(&self, table: TableDefinition<&[u8], &[u8]>, key: &[u8]) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let existed = txn
            .open_table(table)
            .map_err(backend)?
            .remove(key)
            .map_err(backend)?
            .is_some();
        txn.commit().map_err(backend)?;
        Ok(existed)
    }
}

impl AuthorityStore for RedbStore {
    fn member(&self, id: &Identifier) -> Result<Option<Member>, StoreError> {
        self.get(MEMBERS, id.as_bytes())
    }

    fn members(&self) -> Result<Vec<Member>, StoreError> {
        self.all(MEMBERS)
    }

    fn put_member(&self, member: &Member) -> Result<(), StoreError> {
        self.put(MEMBERS, member.identifier.as_bytes(), &encode(member)?)
    }

    fn remove_member(&self, id: &Identifier) -> Result<bool, StoreError> {
        self.delete(MEMBERS, id.as_bytes())
    }

    fn insert_ticket(&self, ticket: &TicketRecord) -> Result<(), StoreError> {
        self.put(TICKETS, ticket.code_hash.as_bytes(), &encode(ticket)?)
    }

    fn tickets(&self) -> Result<Vec<TicketRecord>, StoreError> {
        self.all(TICKETS)
    }

    fn remove_ticket(&self, hash: &CodeHash) -> Result<bool, StoreError> {
        self.delete(TICKETS, hash.as_bytes())
    }

    fn redeem_ticket(
        &self,
        hash: &CodeHash,
        subject: Identifier,
        now: u64,
    ) -> Result<Member, AuthorityError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let member = {
            let mut tickets = txn.open_table(TICKETS).map_err(backend)?;
            let found: Option<TicketRecord> =
                match tickets.get(hash.as_bytes().as_slice()).map_err(backend)? {
                    Some(v) => Some(decode("tickets", v.value())?),
                    None => None,
                };
            let mut ticket = found.ok_or(AuthorityError::TicketUnknown)?;
            // Dropping the transaction without commit aborts it.
            take_ticket_use(&mut ticket, now)?;
            tickets
                .insert(hash.as_bytes().as_slice(), encode(&ticket)?.as_slice())
                .map_err(backend)?;
            let member = member_from_ticket(&ticket, subject, now);
            txn.open_table(MEMBERS)
                .map_err(backend)?
                .insert(subject.as_bytes().as_slice(), encode(&member)?.as_slice())
                .map_err(backend)?;
            member
        };
        txn.commit().map_err(backend)?;
        Ok(member)
    }

    fn record_issued(&self, record: &IssuedRecord) -> Result<(), StoreError> {
        self.put(ISSUED, record.id.as_bytes(), &encode(record)?)
    }

    fn issued_credential(&self, id: &CredentialId) -> Result<Option<IssuedRecord>, StoreError> {
        self.get(ISSUED, id.as_bytes())
    }

    fn issued(&self, subject: Option<&Identifier>) -> Result<Vec<IssuedRecord>, StoreError> {
        let mut all: Vec<IssuedRecord> = self.all(ISSUED)?;
        all.retain(|r| subject.is_none_or(|s| &r.subject == s));
        // Keys are random ids; order by time for people.
        all.sort_by_key(|r| (r.issued_at, r.id));
        Ok(all)
    }

    fn revoke(&self, revocation: Revocation) -> Result<RevocationEntry, StoreError> {
        let key = target_key(&revocation.target);
        let txn = self.db.begin_write().map_err(backend)?;
        let entry = {
            let mut revoked = txn.open_table(REVOKED).map_err(backend)?;
            let mut log = txn.open_table(REVOCATIONS).map_err(backend)?;
            let existing = revoked
                .get(key.as_slice())
                .map_err(backend)?
                .map(|g| g.value());
            if let Some(seq) = existing {
                let stored = log
                    .get(seq)
                    .map_err(backend)?
                    .ok_or_else(|| StoreError::Corrupt(format!("revocation {seq} missing")))?;
                let revocation: Revocation = decode("revocations", stored.value())?;
                return Ok(RevocationEntry { seq, revocation });
            }
            let last = log.last().map_err(backend)?.map(|(k, _)| k.value());
            let seq = last.unwrap_or(0) + 1;
            log.insert(seq, encode(&revocation)?.as_slice())
                .map_err(backend)?;
            revoked.insert(key.as_slice(), seq).map_err(backend)?;
            RevocationEntry { seq, revocation }
        };
        txn.commit().map_err(backend)?;
        Ok(entry)
    }

    fn revocation(&self, target: &RevocationTarget) -> Result<Option<Revocation>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let revoked = txn.open_table(REVOKED).map_err(backend)?;
        let Some(seq) = revoked
            .get(target_key(target).as_slice())
            .map_err(backend)?
            .map(|g| g.value())
        else {
            return Ok(None);
        };
        let log = txn.open_table(REVOCATIONS).map_err(backend)?;
        let stored = log.get(seq).map_err(backend)?;
        stored.map(|v| decode("revocations", v.value())).transpose()
    }

    fn revocations_since(&self, after_seq: u64) -> Result<Vec<RevocationEntry>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let log = txn.open_table(REVOCATIONS).map_err(backend)?;
        let mut out = Vec::new();
        let Some(start) = after_seq.checked_add(1) else {
            return Ok(out);
        };
        for item in log.range(start..).map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            out.push(RevocationEntry {
                seq: k.value(),
                revocation: decode("revocations", v.value())?,
            });
        }
        Ok(out)
    }

    fn latest_revocation_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let log = txn.open_table(REVOCATIONS).map_err(backend)?;
        let last = log.last().map_err(backend)?.map_or(0, |(k, _)| k.value());
        Ok(last)
    }

    fn prune_expired(&self, before: u64) -> Result<usize, StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        let mut removed = 0;
        {
            let mut tickets = txn.open_table(TICKETS).map_err(backend)?;
            let mut stale = Vec::new();
            for item in tickets.iter().map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                let t: TicketRecord = decode("tickets", v.value())?;
                if t.expires_at < before {
                    stale.push(k.value().to_vec());
                }
            }
            for k in &stale {
                tickets.remove(k.as_slice()).map_err(backend)?;
            }
            removed += stale.len();

            let mut issued = txn.open_table(ISSUED).map_err(backend)?;
            let mut stale = Vec::new();
            for item in issued.iter().map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                let r: IssuedRecord = decode("issued", v.value())?;
                if r.expires_at < before {
                    stale.push(k.value().to_vec());
                }
            }
            for k in &stale {
                issued.remove(k.as_slice()).map_err(backend)?;
            }
            removed += stale.len();
        }
        txn.commit().map_err(backend)?;
        Ok(removed)
    }

    fn oidc_session(&self, id: &Identifier) -> Result<Option<OidcSession>, StoreError> {
        self.get(OIDC_SESSIONS, id.as_bytes())
    }

    fn put_oidc_session(&self, session: &OidcSession) -> Result<(), StoreError> {
        self.put(
            OIDC_SESSIONS,
            session.identifier.as_bytes(),
            &encode(session)?,
        )
    }

    fn oidc_sessions(&self) -> Result<Vec<OidcSession>, StoreError> {
        self.all(OIDC_SESSIONS)
    }

    fn remove_oidc_session(&self, id: &Identifier) -> Result<bool, StoreError> {
        self.delete(OIDC_SESSIONS, id.as_bytes())
    }

    /// Copies every record into a fresh file beside this one (mode `0600`,
    /// synced), and renames it over this one while both are held open, so
    /// that no other process can open the store in between. The old file's
    /// pages, with whatever they held, go with it.
    fn rewrite(&mut self) -> Result<(), StoreError> {
        let mut fresh_path = self.path.clone().into_os_string();
        fresh_path.push(".rewrite");
        let fresh_path = PathBuf::from(fresh_path);
        let open_err = |reason: String| StoreError::Open {
            path: fresh_path.clone(),
            reason,
        };
        let _ = fs::remove_file(&fresh_path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&fresh_path)
            .map_err(|e| open_err(e.to_string()))?;
        let fresh = Database::builder()
            .create_file(file)
            .map_err(|e| open_err(e.to_string()))?;
        let copied = (|| {
            let from = self.db.begin_read().map_err(backend)?;
            let to = fresh.begin_write().map_err(backend)?;
            copy_table(&from, &to, META)?;
            for table in [MEMBERS, TICKETS, ISSUED, OIDC_SESSIONS] {
                copy_table(&from, &to, table)?;
            }
            copy_table(&from, &to, REVOCATIONS)?;
            copy_table(&from, &to, REVOKED)?;
            to.commit().map_err(backend)
        })();
        if let Err(e) = copied {
            drop(fresh);
            let _ = fs::remove_file(&fresh_path);
            return Err(e);
        }
        fs::rename(&fresh_path, &self.path).map_err(|e| StoreError::Open {
            path: self.path.clone(),
            reason: format!("cannot replace it with its rewritten copy: {e}"),
        })?;
        // The old database (and its lock on the old, now unlinked, file)
        // goes; the fresh one, under the store's name, stays open.
        self.db = fresh;
        Ok(())
    }
}

/// Copies every record of `table` from a read transaction into a write
/// transaction of another database.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &redb::ReadTransaction,
    to: &redb::WriteTransaction,
    table: TableDefinition<K, V>,
) -> Result<(), StoreError> {
    let source = from.open_table(table).map_err(backend)?;
    let mut target = to.open_table(table).map_err(backend)?;
    for item in source.iter().map_err(backend)? {
        let (k, v) = item.map_err(backend)?;
        target.insert(k.value(), v.value()).map_err(backend)?;
    }
    Ok(())
}
