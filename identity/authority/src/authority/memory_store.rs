//! [`AuthorityStore`] in memory, for tests and embedding.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{
    member_from_ticket, take_ticket_use, AuthorityError, AuthorityStore, IssuedRecord, Member,
    OidcSession, StoreError, TicketRecord,
};
use postern_identity::credential::{CredentialId, Revocation, RevocationEntry, RevocationTarget};
use postern_identity::ticket::CodeHash;
use postern_identity::Identifier;

/// An in-memory [`AuthorityStore`] (tests, embedding). Everything is lost
/// when it is dropped.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    members: BTreeMap<Identifier, Member>,
    tickets: BTreeMap<CodeHash, TicketRecord>,
    issued: Vec<IssuedRecord>,
    revocations: Vec<RevocationEntry>,
    oidc_sessions: BTreeMap<Identifier, OidcSession>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic while holding the lock cannot leave a half-applied change:
        // every method mutates with single map operations.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AuthorityStore for MemoryStore {
    fn member(&self, id: &Identifier) -> Result<Option<Member>, StoreError> {
        Ok(self.state().members.get(id).cloned())
    }
    fn members(&self) -> Result<Vec<Member>, StoreError> {
        Ok(self.state().members.values().cloned().collect())
    }
    fn put_member(&self, member: &Member) -> Result<(), StoreError> {
        self.state()
            .members
            .insert(member.identifier, member.clone());
        Ok(())
    }
    fn remove_member(&self, id: &Identifier) -> Result<bool, StoreError> {
        Ok(self.state().members.remove(id).is_some())
    }
    fn insert_ticket(&self, ticket: &TicketRecord) -> Result<(), StoreError> {
        self.state()
            .tickets
            .insert(ticket.code_hash, ticket.clone());
        Ok(())
    }
    fn tickets(&self) -> Result<Vec<TicketRecord>, StoreError> {
        Ok(self.state().tickets.values().cloned().collect())
    }
    fn remove_ticket(&self, hash: &CodeHash) -> Result<bool, StoreError> {
        Ok(self.state().tickets.remove(hash).is_some())
    }
    fn redeem_ticket(
        &self,
        hash: &CodeHash,
        subject: Identifier,
        now: u64,
    ) -> Result<Member, AuthorityError> {
        let mut state = self.state();
        let ticket = state
            .tickets
            .get_mut(hash)
            .ok_or(AuthorityError::TicketUnknown)?;
        take_ticket_use(ticket, now)?;
        let member = member_from_ticket(ticket, subject, now);
        state.members.insert(subject, member.clone());
        Ok(member)
    }
    fn record_issued(&self, record: &IssuedRecord) -> Result<(), StoreError> {
        self.state().issued.push(record.clone());
        Ok(())
    }
    fn issued_credential(&self, id: &CredentialId) -> Result<Option<IssuedRecord>, StoreError> {
        Ok(self.state().issued.iter().find(|r| &r.id == id).cloned())
    }
    fn issued(&self, subject: Option<&Identifier>) -> Result<Vec<IssuedRecord>, StoreError> {
        Ok(self
            .state()
            .issued
            .iter()
            .filter(|r| subject.is_none_or(|s| &r.subject == s))
            .cloned()
            .collect())
    }
    fn revoke(&self, revocation: Revocation) -> Result<RevocationEntry, StoreError> {
        let mut state = self.state();
        if let Some(existing) = state
            .revocations
            .iter()
            .find(|e| e.revocation.target == revocation.target)
        {
            return Ok(*existing);
        }
        let entry = RevocationEntry {
            seq: state.revocations.last().map_or(0, |e| e.seq) + 1,
            revocation,
        };
        state.revocations.push(entry);
        Ok(entry)
    }
    fn revocation(&self, target: &RevocationTarget) -> Result<Option<Revocation>, StoreError> {
        Ok(self
            .state()
            .revocations
            .iter()
            .find(|e| &e.revocation.target == target)
            .map(|e| e.revocation))
    }
    fn revocations_since(&self, after_seq: u64) -> Result<Vec<RevocationEntry>, StoreError> {
        Ok(self
            .state()
            .revocations
            .iter()
            .filter(|e| e.seq > after_seq)
            .copied()
            .collect())
    }
    fn prune_expired(&self, before: u64) -> Result<usize, StoreError> {
        let mut state = self.state();
        let (t, i) = (state.tickets.len(), state.issued.len());
        state.tickets.retain(|_, t| t.expires_at >= before);
        state.issued.retain(|r| r.expires_at >= before);
        Ok(t - state.tickets.len() + i - state.issued.len())
    }
    fn oidc_session(&self, id: &Identifier) -> Result<Option<OidcSession>, StoreError> {
        Ok(self.state().oidc_sessions.get(id).cloned())
    }
    fn put_oidc_session(&self, session: &OidcSession) -> Result<(), StoreError> {
        self.state()
            .oidc_sessions
            .insert(session.identifier, session.clone());
        Ok(())
    }
    fn oidc_sessions(&self) -> Result<Vec<OidcSession>, StoreError> {
        Ok(self.state().oidc_sessions.values().cloned().collect())
    }
    fn remove_oidc_session(&self, id: &Identifier) -> Result<bool, StoreError> {
        Ok(self.state().oidc_sessions.remove(id).is_some())
    }
}
