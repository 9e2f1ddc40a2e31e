//! The tamper-evident audit log: one JSON object per line, each carrying the
//! SHA-256 of the line before it, written by one thread per log with group
//! commit, locked against a second writer, rotatable, optionally refusing
//! new tunnels while it cannot be written, and signed at checkpoints.
//!
//! ```text
//! {"seq":1,"time":"2025-01-01T12:00:00.000Z","prev":"000…000","event":"policy_reload","ok":true,…}
//! {"seq":2,"time":"2025-01-01T12:00:03.150Z","prev":"5f1c…","event":"connect","decision":"allow",…}
//! {"seq":3,"time":"2025-01-01T12:01:03.150Z","prev":"9a0e…","event":"checkpoint","covers":2,"next_within":1000,"signer":"P…","key":"…","signature":"…"}
//! ```
//!
//! # The format
//!
//! - `seq` counts from 1 (the line number in the file); `time` is UTC with
//!   milliseconds; `prev` is the lower-case hex SHA-256 of the previous line's
//!   bytes without its newline, 64 zeros on the first line; `event` names the
//!   [`AuditEvent`], whose fields follow.
//! - Events are typed: identifiers, service names, attributes, counts, policy
//!   ids and reasons. There is no field for payload bytes, keys or tokens;
//!   tunnels and credentials appear only by a short public [`Label`].
//! - The writer adds three kinds of lines of its own, which are not
//!   [`AuditEvent`]s: `checkpoint` (below), `continued` (the first line of a
//!   file after a rotation: `previous_seq` and `previous_hash` name the last
//!   line of the file before) and `records_lost` (`count` records, stamped
//!   from `first` to `last`, were dropped because more than
//!   [`AuditOptions::max_queued`] waited while the file could not be
//!   written).
//!
//! # Writing: [`AuditLog`]
//!
//! - **One writer thread per log, group commit.** [`AuditLog::record`] hands
//!   the record to the log's thread, which takes every record waiting, writes
//!   them with one `write` and `fdatasync`s once per batch
//!   ([`Durability::Synced`], the default). From async code (a Tokio runtime
//!   thread) `record` returns as soon as the record is queued; from any other
//!   thread it returns once the record is on disk, or with the error of the
//!   attempt that should have written it. [`AuditLog::flush`] waits for
//!   everything handed over so far; dropping the last handle (or
//!   [`AuditLog::close`]) writes what is queued and a final checkpoint.
//! - **One process per file.** The writer holds an exclusive advisory lock
//!   (`flock`) on the file while it has it open. A second opener, in another
//!   process or the same one, gets [`AuditError::Locked`]: give each process
//!   its own file.
//! - **Write failures do not break the chain.** A failed batch stays queued
//!   and is retried every [`AuditOptions::retry_interval`]; bytes a failed
//!   write may have left are cut off first, so the chain continues exactly
//!   where the last good batch ended. At most [`AuditOptions::max_queued`]
//!   records wait; further ones are counted and noted in a `records_lost`
//!   line once writing works again. Errors are logged, at most once a minute
//!   while the failure lasts. [`AuditLog::health`] says whether the log can
//!   currently be written.
//! - **Fail-closed or fail-open.** [`AuditLog::admit`] is the check nodes make
//!   before admitting a new tunnel or registration. With
//!   [`AuditOptions::fail_closed`] it refuses while the log cannot be
//!   written ([`AuditUnavailable`], naming the file and the error); by
//!   default (fail-open) it admits and logs a warning at most once a minute.
//!   A record of a tunnel admitted just before a failure stays queued and is
//!   written when the disk recovers.
//! - **Rotation.** [`AuditLog::reopen`] (the binary calls it on `SIGHUP`)
//!   writes what is queued and a checkpoint to the file it has open, then
//!   opens the path again: after `mv audit.jsonl audit.jsonl.1`, a new file.
//!   Each file verifies on its own (the new one starts at seq 1 with
//!   `prev` = zeros); its first line, `continued`, names the last line of the
//!   previous file, and [`verify_rotated`] checks that link. If the path
//!   cannot be opened, records queue and the open is retried.
//! - **Signed checkpoints.** With a signer ([`AuditOptions::signer`], the
//!   node's identity), the writer appends a `checkpoint` line after at most
//!   [`AuditOptions::checkpoint_records`] lines and at least every
//!   [`AuditOptions::checkpoint_interval`] while there are new lines, when a
//!   file is opened whose last line is not a checkpoint, and when the file is
//!   closed or rotated. It signs (label [`CHECKPOINT_LABEL`]) the line number
//!   it covers (`covers`, the line before it), that line's hash (its `prev`),
//!   its own `time` and `next_within` (the most lines that may follow before
//!   the next checkpoint), and carries the signer's identifier and public key.
//!
//! # Verifying: [`verify`], [`verify_with`]
//!
//! [`verify`] walks the chain and names the first line that was changed,
//! deleted, inserted or moved, and checks every checkpoint's signature. A
//! chain alone cannot show that it was rewritten from some line on with
//! every hash recomputed, nor that its **last** lines were removed; two
//! things cover that:
//!
//! - a [`ChainHead`] kept somewhere else ([`VerifyOptions::anchor`]): the log
//!   must still contain it;
//! - the signer's identifier ([`VerifyOptions::signer`], `postern audit
//!   verify --signer P…`): every checkpoint must be signed by that key, so a
//!   rewritten line before a checkpoint fails its signature, and removing the
//!   checkpoints after it leaves more unsigned lines than the last remaining
//!   checkpoint's `next_within` allows. The report says how many lines after
//!   the last checkpoint are not yet covered; only the last `next_within`
//!   lines of a log can be replaced unnoticed without an anchor.

mod checkpoint;
mod file;
mod machine;
mod verify;
mod writer;

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use postern_identity::wire::ServiceName;
use postern_identity::{Attributes, Identifier};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::PolicyDecision;
use crate::request::AccessRequest;

pub use checkpoint::CHECKPOINT_LABEL;
pub(crate) use verify::verify_bytes;
pub use verify::{
    verify, verify_rotated, verify_with, verify_with_anchor, Tamper, VerifyError, VerifyOptions,
    VerifyReport,
};
pub use writer::{
    AuditHealth, AuditLog, AuditOptions, AuditUnavailable, Durability, DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_CHECKPOINT_RECORDS, DEFAULT_MAX_QUEUED, DEFAULT_RETRY_INTERVAL, MAX_CHECKPOINT_RECORDS,
};

/// `prev` of the first line: 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest audit line written or read, in bytes (newline excluded).
pub const MAX_AUDIT_LINE_BYTES: usize = 1024 * 1024;

/// Longest `{"seq":…,"time":"…","prev":"…",` a line can start with: the
/// largest seq, a millisecond time, a hash.
const LINE_PREFIX_MAX: usize = r#"{"seq":,"time":"","prev":"","#.len()
    + 20 // u64::MAX
    + "2025-01-01T12:00:00.000Z".len()
    + 64;

/// A short public name for a tunnel or a credential: 1 to 64 characters from
/// `[A-Za-z0-9._:-]`. Not a place for secrets; use the non-secret label of a
/// token (`TunnelToken::label`) or a credential's serial.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Label(String);

impl Label {
    /// `text` as a label, if it is one.
    pub fn new(text: &str) -> Option<Self> {
        let ok = (1..=64).contains(&text.len())
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
        ok.then(|| Label(text.to_owned()))
    }

    /// The label text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Label::new(&s).ok_or_else(|| serde::de::Error::custom("not a label"))
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Allowed or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Granted.
    Allow,
    /// Refused.
    Deny,
}

/// An access decision (`connect` or `register`) as audited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRecord {
    /// The outcome.
    pub decision: Verdict,
    /// Who asked.
    pub principal: Identifier,
    /// For which service.
    pub service: ServiceName,
    /// The deciding policy ids.
    pub policies: Vec<String>,
    /// The full reason ([`PolicyDecision::audit_reason`]).
    pub reason: String,
    /// Evaluation errors, if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// The relay-asserted source address, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<IpAddr>,
    /// The relay, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<Identifier>,
    /// The tunnel, when one was opened or refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Label>,
}

impl AccessRecord {
    /// The record of `decision` about `request`.
    pub fn new(decision: &PolicyDecision, request: &AccessRequest) -> Self {
        AccessRecord {
            decision: if decision.allow {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            principal: request.principal.identifier,
            service: request.service.name.clone(),
            policies: decision.determining_policies.clone(),
            reason: decision.audit_reason.clone(),
            errors: decision.errors.clone(),
            source_ip: request.context.source_ip,
            relay: request.context.relay,
            tunnel: None,
        }
    }

    /// The same record naming its tunnel.
    pub fn with_tunnel(mut self, tunnel: Label) -> Self {
        self.tunnel = Some(tunnel);
        self
    }
}

/// One audited event. The variant becomes the `event` field (`connect`,
/// `register`, `enroll`, `issue`, `revoke`, `policy_reload`,
/// `tunnel_closed`); its fields follow in the same JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditEvent {
    /// A tunnel was allowed or refused.
    Connect(AccessRecord),
    /// A service registration was allowed or refused.
    Register(AccessRecord),
    /// An identity enrolled (or failed to) with an authority.
    Enroll {
        /// The identity enrolling.
        subject: Identifier,
        /// How: `token`, `oidc`, `admin`, ….
        method: Label,
        /// The outcome.
        decision: Verdict,
        /// The attributes granted (empty when refused).
        #[serde(default, skip_serializing_if = "Attributes::is_empty")]
        attrs: Attributes,
        /// Why, in words.
        reason: String,
    },
    /// A credential was issued.
    Issue {
        /// Its public serial.
        credential: Label,
        /// The identity it is for.
        subject: Identifier,
        /// The issuing authority.
        issuer: Identifier,
        /// The attributes it vouches for.
        attrs: Attributes,
        /// Its expiry, Unix seconds.
        expires: u64,
    },
    /// A credential or identity was revoked.
    Revoke {
        /// The credential revoked, if one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential: Option<Label>,
        /// The identity revoked (or whose credential it was), if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subject: Option<Identifier>,
        /// Who revoked it, if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<Identifier>,
        /// Why.
        reason: String,
    },
    /// Policies were (re)loaded, or a reload was refused.
    PolicyReload {
        /// Whether the new policies are in force.
        ok: bool,
        /// Digest of the policies in force afterwards
        /// ([`crate::PolicyEngine::digest`]).
        digest: String,
        /// Number of policies in force afterwards.
        policies: usize,
        /// Diagnostics of a refused reload.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        diagnostics: Option<String>,
    },
    /// A tunnel ended.
    TunnelClosed {
        /// The tunnel.
        tunnel: Label,
        /// Whose it was.
        principal: Identifier,
        /// To which service.
        service: ServiceName,
        /// Bytes from the inlet to the service.
        bytes_up: u64,
        /// Bytes from the service to the inlet.
        bytes_down: u64,
        /// Why it ended (`client closed`, `policy no longer allows`, …).
        reason: String,
    },
}

/// The end of the chain: the last `seq` and the hash of its line. Keep it
/// outside the log to detect removal of the last lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    /// Sequence number of the last line (0 for an empty log).
    pub seq: u64,
    /// Hex SHA-256 of the last line ([`GENESIS_PREV`] for an empty log).
    pub hash: String,
}

impl fmt::Display for ChainHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {} hash {}", self.seq, self.hash)
    }
}

/// Why the audit log could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The file could not be opened, read or written.
    #[error("audit log {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Another writer holds the file's lock.
    #[error("audit log {} is locked: another process (or another open of it in this process) writes this log; give each process its own audit log file", path.display())]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The file does not end with a complete line (a crash during a write,
    /// or tampering). Appending would hide it, so the log is not opened.
    #[error("audit log {}: the last line is incomplete; run `postern audit verify` and move the file aside before starting again", path.display())]
    TornTail {
        /// The file.
        path: PathBuf,
    },
    /// The last line is not an audit record, so the chain cannot continue.
    #[error("audit log {}: the last line is not a valid record ({detail}); run `postern audit verify`", path.display())]
    BadTail {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The event does not fit in [`MAX_AUDIT_LINE_BYTES`].
    #[error("audit record of {size} bytes exceeds the {MAX_AUDIT_LINE_BYTES}-byte limit")]
    TooLarge {
        /// Its size, bytes.
        size: usize,
    },
    /// The record was not written: the log cannot be written at the moment.
    /// It stays queued and is retried.
    #[error("audit log {} cannot be written ({error}); the record stays queued and is retried", path.display())]
    Unavailable {
        /// The file.
        path: PathBuf,
        /// The last write or open error.
        error: String,
    },
    /// Too many records wait to be written; this one was dropped and will be
    /// counted in a `records_lost` line.
    #[error("audit log {}: {queued} records wait to be written, so this one was dropped (a records_lost line will count it); fix the file system the log is on", path.display())]
    QueueFull {
        /// The file.
        path: PathBuf,
        /// Records waiting.
        queued: usize,
    },
    /// Closing could not write everything: the disk still failed.
    #[error("audit log {} was closed incomplete: {detail}", path.display())]
    ClosedIncomplete {
        /// The file.
        path: PathBuf,
        /// What was not written, and why.
        detail: String,
    },
    /// The log was closed ([`AuditLog::close`]).
    #[error("audit log {} is closed", path.display())]
    Closed {
        /// The file.
        path: PathBuf,
    },
    /// The [`AuditOptions`] are out of range.
    #[error("audit log options: {0}")]
    BadOptions(String),
    /// The clock is before 1970 or after 9999, serialization failed, or the
    /// writer thread could not start.
    #[error("audit record not written: {0}")]
    Internal(String),
}

/// Lower-case hex SHA-256.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The JSON fields of `value` (an object) without the opening brace, as they
/// follow `prev` in a line.
pub(crate) fn fields_of(value: &impl Serialize) -> Result<String, AuditError> {
    let body = serde_json::to_string(value).map_err(|e| AuditError::Internal(e.to_string()))?;
    body.strip_prefix('{')
        .filter(|rest| rest.len() > 1)
        .map(str::to_owned)
        .ok_or_else(|| AuditError::Internal("event is not a JSON object with fields".into()))
}

/// One line (without its newline): the chain fields, then `fields`.
pub(crate) fn format_line(seq: u64, time: &str, prev: &str, fields: &str) -> String {
    format!("{{\"seq\":{seq},\"time\":\"{time}\",\"prev\":\"{prev}\",{fields}")
}

#[cfg(test)]
mod tests;
