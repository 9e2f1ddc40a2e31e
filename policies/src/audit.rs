//! The tamper-evident audit log: one JSON object per line, each carrying the
//! SHA-256 of the line before it.
//!
//! ```text
//! {"seq":1,"time":"2025-01-01T12:00:00.000Z","prev":"000…000","event":"policy_reload","ok":true,…}
//! {"seq":2,"time":"2025-01-01T12:00:03.150Z","prev":"5f1c…","event":"connect","decision":"allow",…}
//! ```
//!
//! - `seq` counts from 1 (the line number in the file); `time` is UTC with
//!   milliseconds; `prev` is the lower-case hex SHA-256 of the previous line's
//!   bytes without its newline, 64 zeros on the first line; `event` names the
//!   [`AuditEvent`], whose fields follow.
//! - [`verify`] walks the chain and names the first line that was changed,
//!   deleted, inserted or moved. A chain cannot show that its **last** lines
//!   were removed or that the last line was rewritten: keep the
//!   [`ChainHead`] somewhere else (the node's log, a monitoring system) and
//!   pass it to [`verify_with_anchor`] to cover that too.
//! - Events are typed: identifiers, service names, attributes, counts, policy
//!   ids and reasons. There is no field for payload bytes, keys or tokens;
//!   tunnels and credentials appear only by a short public [`Label`].
//!
//! Durability: by default every record is written with one `write` call and
//! then `fdatasync`ed before [`AuditLog::record`] returns
//! ([`Durability::SyncEachRecord`]); [`Durability::OsBuffered`] leaves
//! flushing to the operating system, and a crash may then lose the last
//! records. One process must write a file at a time.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use postern_identity::wire::ServiceName;
use postern_identity::{Attributes, Identifier};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::PolicyDecision;
use crate::request::AccessRequest;
use crate::time;

/// `prev` of the first line: 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest audit line written or read, in bytes (newline excluded).
pub const MAX_AUDIT_LINE_BYTES: usize = 1024 * 1024;

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

/// When records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `fdatasync` after every record (the default).
    #[default]
    SyncEachRecord,
    /// Leave flushing to the operating system: faster, and a crash may lose
    /// the last records (never corrupt earlier ones).
    OsBuffered,
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

/// Why the audit log could not be written.
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
    /// An earlier write failed part-way; appending more would break the chain.
    #[error("audit log {} is unusable after an earlier write error; restart after `postern audit verify`", path.display())]
    Broken {
        /// The file.
        path: PathBuf,
    },
    /// The clock is before 1970 or after 9999, or serialization failed.
    #[error("audit record not written: {0}")]
    Internal(String),
}

struct Tail {
    file: File,
    seq: u64,
    hash: String,
    broken: bool,
}

/// An append-only, hash-chained audit log file. [`AuditLog::record`] may be
/// called from any thread.
pub struct AuditLog {
    path: PathBuf,
    durability: Durability,
    tail: Mutex<Tail>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The last line of `file` (without its newline), or `None` if it is empty.
fn last_line(file: &mut File, path: &Path) -> Result<Option<Vec<u8>>, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = file.seek(SeekFrom::End(0)).map_err(io)?;
    if len == 0 {
        return Ok(None);
    }
    // Read at most one line's worth from the end.
    let window = len.min(MAX_AUDIT_LINE_BYTES as u64 + 2);
    file.seek(SeekFrom::Start(len - window)).map_err(io)?;
    let mut buf = Vec::with_capacity(window as usize);
    Read::by_ref(file)
        .take(window)
        .read_to_end(&mut buf)
        .map_err(io)?;
    let Some(body) = buf.strip_suffix(b"\n") else {
        return Err(AuditError::TornTail {
            path: path.to_path_buf(),
        });
    };
    match body.iter().rposition(|&b| b == b'\n') {
        Some(nl) => Ok(Some(body[nl + 1..].to_vec())),
        None if window == len => Ok(Some(body.to_vec())),
        None => Err(AuditError::BadTail {
            path: path.to_path_buf(),
            detail: format!("longer than {MAX_AUDIT_LINE_BYTES} bytes"),
        }),
    }
}

impl AuditLog {
    /// Opens (creating if needed) the log at `path` for appending, syncing
    /// every record. On reopening, the chain continues from the last line,
    /// which is read but not re-verified (use [`verify`] for that).
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with(path, Durability::default())
    }

    /// Like [`AuditLog::open`], with a choice of [`Durability`].
    pub fn open_with(path: &Path, durability: Durability) -> Result<Self, AuditError> {
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o640);
        }
        let mut file = options.open(path).map_err(|source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (seq, hash) = match last_line(&mut file, path)? {
            None => (0, GENESIS_PREV.to_owned()),
            Some(line) => {
                let bad = |detail: String| AuditError::BadTail {
                    path: path.to_path_buf(),
                    detail,
                };
                let value: serde_json::Value =
                    serde_json::from_slice(&line).map_err(|e| bad(e.to_string()))?;
                let seq = value
                    .get("seq")
                    .and_then(serde_json::Value::as_u64)
                    .ok_or_else(|| bad("no seq".into()))?;
                (seq, sha256_hex(&line))
            }
        };
        Ok(AuditLog {
            path: path.to_path_buf(),
            durability,
            tail: Mutex::new(Tail {
                file,
                seq,
                hash,
                broken: false,
            }),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current end of the chain.
    pub fn head(&self) -> Result<ChainHead, AuditError> {
        let tail = self.lock()?;
        Ok(ChainHead {
            seq: tail.seq,
            hash: tail.hash.clone(),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Tail>, AuditError> {
        // A panic while holding the lock may have left a partial line.
        self.tail.lock().map_err(|_| AuditError::Broken {
            path: self.path.clone(),
        })
    }

    /// Appends `event`, stamped with the system clock. Returns the new head.
    pub fn record(&self, event: &AuditEvent) -> Result<ChainHead, AuditError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| AuditError::Internal("the system clock is before 1970".into()))?;
        let ms = u64::try_from(now.as_millis())
            .map_err(|_| AuditError::Internal("the system clock is out of range".into()))?;
        self.record_at(ms, event)
    }

    /// Appends `event` stamped `unix_ms` (milliseconds since 1970).
    pub fn record_at(&self, unix_ms: u64, event: &AuditEvent) -> Result<ChainHead, AuditError> {
        let time = time::rfc3339_millis(unix_ms)
            .ok_or_else(|| AuditError::Internal(format!("time {unix_ms} ms is out of range")))?;
        let body = serde_json::to_string(event).map_err(|e| AuditError::Internal(e.to_string()))?;
        let fields = body
            .strip_prefix('{')
            .ok_or_else(|| AuditError::Internal("event is not a JSON object".into()))?;
        let mut tail = self.lock()?;
        if tail.broken {
            return Err(AuditError::Broken {
                path: self.path.clone(),
            });
        }
        let seq = tail.seq + 1;
        let mut line = format!(
            "{{\"seq\":{seq},\"time\":\"{time}\",\"prev\":\"{}\",{fields}",
            tail.hash
        );
        if line.len() > MAX_AUDIT_LINE_BYTES {
            return Err(AuditError::TooLarge { size: line.len() });
        }
        let hash = sha256_hex(line.as_bytes());
        line.push('\n');
        let written = tail.file.write_all(line.as_bytes()).and_then(|()| {
            if self.durability == Durability::SyncEachRecord {
                tail.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(source) = written {
            tail.broken = true;
            return Err(AuditError::Io {
                path: self.path.clone(),
                source,
            });
        }
        tail.seq = seq;
        tail.hash = hash.clone();
        Ok(ChainHead { seq, hash })
    }
}

/// What kind of tampering [`verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Tamper {
    /// The line's content changed after the next line was written.
    Modified,
    /// One or more lines are missing before this line.
    Deleted,
    /// This line was not written by the log.
    Inserted,
    /// This line is out of order (swapped or moved).
    Reordered,
    /// This line is not an audit record (bad JSON, missing fields, too long,
    /// or incomplete).
    Malformed,
    /// The log ends before the anchor: its last lines were removed.
    Truncated,
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tamper::Modified => "modified",
            Tamper::Deleted => "deleted lines",
            Tamper::Inserted => "inserted",
            Tamper::Reordered => "reordered",
            Tamper::Malformed => "malformed",
            Tamper::Truncated => "truncated",
        })
    }
}

/// Why [`verify`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The file could not be read.
    #[error("cannot read audit log {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The chain is broken.
    #[error("audit log {} fails verification at line {line}: {kind}: {detail}", path.display())]
    Tampered {
        /// The file.
        path: PathBuf,
        /// The first line found wrong (from 1).
        line: u64,
        /// What happened there.
        kind: Tamper,
        /// Details.
        detail: String,
    },
}

/// A verified log ([`verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of records.
    pub records: u64,
    /// The end of the chain.
    pub head: ChainHead,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok: {} record{}, chain intact; head {} (compare it with a copy kept elsewhere to detect removal of the last lines)",
            self.records,
            if self.records == 1 { "" } else { "s" },
            self.head
        )
    }
}

/// Reads lines with their numbers, bounding their length.
struct Lines {
    reader: BufReader<File>,
    number: u64,
}

enum LineRead {
    Line(u64, Vec<u8>),
    Bad(u64, String),
    End,
}

impl Lines {
    fn next(&mut self) -> std::io::Result<LineRead> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_AUDIT_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(LineRead::End);
        }
        self.number += 1;
        match buf.strip_suffix(b"\n") {
            Some(line) => Ok(LineRead::Line(self.number, line.to_vec())),
            None if buf.len() > MAX_AUDIT_LINE_BYTES => Ok(LineRead::Bad(
                self.number,
                format!("longer than {MAX_AUDIT_LINE_BYTES} bytes"),
            )),
            None => Ok(LineRead::Bad(
                self.number,
                "incomplete last line (no newline): a write was cut short or the file truncated"
                    .into(),
            )),
        }
    }
}

/// `(seq, prev)` of a line, or what is wrong with it.
fn parse_line(line: &[u8]) -> Result<(u64, String), String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let seq = value
        .get("seq")
        .and_then(serde_json::Value::as_u64)
        .ok_or("no numeric seq")?;
    let prev = value
        .get("prev")
        .and_then(serde_json::Value::as_str)
        .filter(|p| {
            p.len() == 64
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .ok_or("no prev hash")?;
    value
        .get("time")
        .and_then(serde_json::Value::as_str)
        .ok_or("no time")?;
    value
        .get("event")
        .and_then(serde_json::Value::as_str)
        .ok_or("no event")?;
    Ok((seq, prev.to_owned()))
}

/// Verifies the hash chain of the log at `path` (`postern audit verify`).
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    verify_inner(path, None)
}

/// Like [`verify`], and also checks that the log still contains `anchor` (a
/// [`ChainHead`] kept elsewhere), which detects removal of the last lines
/// and changes to the line the anchor names.
pub fn verify_with_anchor(path: &Path, anchor: &ChainHead) -> Result<VerifyReport, VerifyError> {
    verify_inner(path, Some(anchor))
}

fn verify_inner(path: &Path, anchor: Option<&ChainHead>) -> Result<VerifyReport, VerifyError> {
    let io = |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tampered = |line: u64, kind: Tamper, detail: String| VerifyError::Tampered {
        path: path.to_path_buf(),
        line,
        kind,
        detail,
    };
    let mut lines = Lines {
        reader: BufReader::new(File::open(path).map_err(io)?),
        number: 0,
    };
    // Hashes of the previous line and the one before it.
    let mut h1 = GENESIS_PREV.to_owned();
    let mut h2 = GENESIS_PREV.to_owned();
    let mut records = 0u64;
    let mut current = lines.next().map_err(io)?;
    loop {
        let (n, bytes) = match current {
            LineRead::End => break,
            LineRead::Bad(n, detail) => return Err(tampered(n, Tamper::Malformed, detail)),
            LineRead::Line(n, bytes) => (n, bytes),
        };
        let (seq, prev) = parse_line(&bytes).map_err(|d| tampered(n, Tamper::Malformed, d))?;
        let next = lines.next().map_err(io)?;
        if seq == n {
            if prev != h1 {
                return Err(if n == 1 {
                    tampered(
                        1,
                        Tamper::Modified,
                        "the first line's prev is not the zero hash".into(),
                    )
                } else if prev == h2 {
                    tampered(
                        n - 1,
                        Tamper::Inserted,
                        format!("line {n} chains directly to line {}", n - 2),
                    )
                } else {
                    tampered(
                        n - 1,
                        Tamper::Modified,
                        format!("line {n} recorded a different hash for line {}", n - 1),
                    )
                });
            }
        } else if seq > n {
            let next_seq = match &next {
                LineRead::Line(_, b) => parse_line(b).ok().map(|(s, _)| s),
                _ => None,
            };
            return Err(if seq == n + 1 && next_seq == Some(n) {
                tampered(
                    n,
                    Tamper::Reordered,
                    format!("lines {n} and {} are swapped", n + 1),
                )
            } else {
                tampered(
                    n,
                    Tamper::Deleted,
                    format!(
                        "seq jumps from {} to {seq}: {} line{} missing before line {n}",
                        n - 1,
                        seq - n,
                        if seq - n == 1 { " is" } else { "s are" }
                    ),
                )
            });
        } else if seq + 1 == n {
            return Err(if prev == h2 && n > 1 {
                tampered(
                    n - 1,
                    Tamper::Inserted,
                    format!(
                        "line {n} repeats seq {seq} and chains to line {}",
                        n.saturating_sub(2)
                    ),
                )
            } else {
                tampered(n, Tamper::Inserted, format!("line {n} repeats seq {seq}"))
            });
        } else {
            return Err(tampered(
                n,
                Tamper::Reordered,
                format!("seq {seq} where {n} was expected"),
            ));
        }
        let hash = sha256_hex(&bytes);
        if let Some(anchor) = anchor {
            if anchor.seq == seq && anchor.hash != hash {
                return Err(tampered(
                    n,
                    Tamper::Modified,
                    "the line differs from the anchor's hash".into(),
                ));
            }
        }
        h2 = std::mem::replace(&mut h1, hash);
        records += 1;
        current = next;
    }
    if let Some(anchor) = anchor {
        if anchor.seq > records {
            return Err(tampered(
                records + 1,
                Tamper::Truncated,
                format!(
                    "the log ends at seq {records} but the anchor has seq {}: the last {} line{} were removed",
                    anchor.seq,
                    anchor.seq - records,
                    if anchor.seq - records == 1 { "" } else { "s" }
                ),
            ));
        }
    }
    Ok(VerifyReport {
        records,
        head: ChainHead {
            seq: records,
            hash: h1,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_identity::AttrValue;
    use std::fs;

    const T0: u64 = 1_735_732_800_000;

    fn who(n: u8) -> Identifier {
        Identifier::from_public_key(&[n; 32])
    }

    fn event(n: u64) -> AuditEvent {
        AuditEvent::TunnelClosed {
            tunnel: Label::new(&format!("t{n}")).unwrap(),
            principal: who(1),
            service: "db".parse().unwrap(),
            bytes_up: n,
            bytes_down: 2 * n,
            reason: "client closed".into(),
        }
    }

    /// A log of `n` records in a fresh directory.
    fn log_with(n: u64) -> (tempfile::TempDir, PathBuf, ChainHead) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let mut head = log.head().unwrap();
        for i in 1..=n {
            head = log.record_at(T0 + i, &event(i)).unwrap();
        }
        (dir, path, head)
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        fs::write(
            path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    fn failure(path: &Path) -> (u64, Tamper) {
        match verify(path) {
            Err(VerifyError::Tampered { line, kind, .. }) => (line, kind),
            other => panic!("expected tampering, got {other:?}"),
        }
    }

    #[test]
    fn lines_have_the_documented_shape() {
        let (_dir, path, head) = log_with(2);
        let lines = lines(&path);
        assert!(lines[0].starts_with(&format!(
            "{{\"seq\":1,\"time\":\"2025-01-01T12:00:00.001Z\",\"prev\":\"{GENESIS_PREV}\",\"event\":\"tunnel_closed\",\"tunnel\":\"t1\""
        )), "{}", lines[0]);
        let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["seq"], 2);
        assert_eq!(second["prev"], sha256_hex(lines[0].as_bytes()));
        assert_eq!(second["bytes_down"], 4);
        assert_eq!(head.seq, 2);
        assert_eq!(head.hash, sha256_hex(lines[1].as_bytes()));
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 2);
        assert_eq!(report.head, head);
        assert!(report
            .to_string()
            .starts_with("ok: 2 records, chain intact"));
    }

    #[test]
    fn every_event_round_trips() {
        let engine =
            crate::PolicyEngine::from_text("p.cedar", "permit(principal, action, resource);")
                .unwrap();
        let request = crate::AccessRequest {
            principal: crate::Principal::new(who(1)).with_attr("team", AttrValue::One("x".into())),
            service: crate::Service::new("db".parse().unwrap()),
            context: crate::RequestContext {
                source_ip: Some("10.0.0.1".parse().unwrap()),
                relay: Some(who(9)),
                ..crate::RequestContext::at(1_735_732_800)
            },
        };
        let decision = engine.decide(crate::Action::Connect, &request);
        let access =
            AccessRecord::new(&decision, &request).with_tunnel(Label::new("a1b2c3").unwrap());
        let attrs: Attributes = [("team".to_owned(), AttrValue::One("x".into()))].into();
        let events = vec![
            AuditEvent::Connect(access.clone()),
            AuditEvent::Register(AccessRecord {
                decision: Verdict::Deny,
                ..access
            }),
            AuditEvent::Enroll {
                subject: who(2),
                method: Label::new("oidc").unwrap(),
                decision: Verdict::Allow,
                attrs: attrs.clone(),
                reason: "id token verified".into(),
            },
            AuditEvent::Issue {
                credential: Label::new("c-0001").unwrap(),
                subject: who(2),
                issuer: who(3),
                attrs,
                expires: 1_735_736_400,
            },
            AuditEvent::Revoke {
                credential: Some(Label::new("c-0001").unwrap()),
                subject: None,
                by: Some(who(3)),
                reason: "laptop lost".into(),
            },
            AuditEvent::PolicyReload {
                ok: false,
                digest: engine.digest().to_owned(),
                policies: engine.len(),
                diagnostics: Some("error[syntax]: a.cedar:1:1: …".into()),
            },
            event(7),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let log = AuditLog::open(&path).unwrap();
        for e in &events {
            log.record(e).unwrap();
        }
        let names: Vec<String> = lines(&path)
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["event"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "connect",
                "register",
                "enroll",
                "issue",
                "revoke",
                "policy_reload",
                "tunnel_closed"
            ]
        );
        for (line, e) in lines(&path).iter().zip(&events) {
            let back: AuditEvent = serde_json::from_str(line).unwrap();
            assert_eq!(&back, e);
        }
        let first = &lines(&path)[0];
        assert!(
            first.contains("\"decision\":\"allow\"")
                && first.contains("\"source_ip\":\"10.0.0.1\"")
        );
        assert_eq!(verify(&path).unwrap().records, 7);
    }

    #[test]
    fn odd_text_stays_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let e = AuditEvent::Revoke {
            credential: None,
            subject: Some(who(1)),
            by: None,
            reason: "line\nbreak \"quoted\" \u{0} \u{2028} é".into(),
        };
        log.record(&e).unwrap();
        assert_eq!(lines(&path).len(), 1);
        assert_eq!(verify(&path).unwrap().records, 1);
        assert!(Label::new("has space").is_none() && Label::new("").is_none());
        assert!(Label::new(&"x".repeat(65)).is_none());
    }

    #[test]
    fn reopening_continues_the_chain() {
        let (_dir, path, head) = log_with(3);
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head().unwrap(), head);
        let next = log.record_at(T0 + 10, &event(4)).unwrap();
        assert_eq!(next.seq, 4);
        drop(log);
        let log = AuditLog::open_with(&path, Durability::OsBuffered).unwrap();
        log.record_at(T0 + 11, &event(5)).unwrap();
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 5);
        assert_eq!(verify_with_anchor(&path, &next).unwrap().records, 5);
    }

    #[test]
    fn concurrent_records_keep_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let log = std::sync::Arc::new(AuditLog::open_with(&path, Durability::OsBuffered).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        log.record(&event(t * 100 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(verify(&path).unwrap().records, 200);
        assert_eq!(log.head().unwrap().seq, 200);
    }

    #[test]
    fn an_edited_line_is_found() {
        let (_dir, path, _) = log_with(5);
        let mut l = lines(&path);
        l[2] = l[2].replace("\"bytes_up\":3", "\"bytes_up\":300");
        write_lines(&path, &l);
        assert_eq!(failure(&path), (3, Tamper::Modified));
        let err = verify(&path).unwrap_err().to_string();
        assert!(
            err.contains("at line 3: modified: line 4 recorded a different hash for line 3"),
            "{err}"
        );
    }

    #[test]
    fn an_edit_that_breaks_json_is_found() {
        let (_dir, path, _) = log_with(5);
        let mut l = lines(&path);
        l[1].truncate(20);
        write_lines(&path, &l);
        assert_eq!(failure(&path), (2, Tamper::Malformed));
    }

    #[test]
    fn an_edited_first_line_is_found() {
        let (_dir, path, _) = log_with(3);
        let mut l = lines(&path);
        l[0] = l[0].replace("client closed", "client closeD");
        write_lines(&path, &l);
        assert_eq!(failure(&path), (1, Tamper::Modified));
    }

    #[test]
    fn a_deleted_line_is_found() {
        for gone in [0, 2, 3] {
            let (_dir, path, _) = log_with(5);
            let mut l = lines(&path);
            l.remove(gone);
            write_lines(&path, &l);
            assert_eq!(
                failure(&path),
                (gone as u64 + 1, Tamper::Deleted),
                "removed line {}",
                gone + 1
            );
        }
        let (_dir, path, _) = log_with(6);
        let mut l = lines(&path);
        l.drain(1..3);
        write_lines(&path, &l);
        let err = verify(&path).unwrap_err().to_string();
        assert!(
            err.contains("at line 2: deleted lines: seq jumps from 1 to 4: 2 lines are missing"),
            "{err}"
        );
    }

    #[test]
    fn swapped_lines_are_found() {
        for first in [0, 2, 3] {
            let (_dir, path, _) = log_with(5);
            let mut l = lines(&path);
            l.swap(first, first + 1);
            write_lines(&path, &l);
            assert_eq!(
                failure(&path),
                (first as u64 + 1, Tamper::Reordered),
                "swapped {}",
                first + 1
            );
        }
        let (_dir, path, _) = log_with(5);
        let mut l = lines(&path);
        let moved = l.remove(0);
        l.insert(3, moved);
        write_lines(&path, &l);
        let (line, kind) = failure(&path);
        assert_eq!(line, 1, "{kind:?}");
    }

    #[test]
    fn inserted_lines_are_found() {
        // A forged line that copies the chain's format exactly: seq 3 and
        // prev = hash of line 2, placed as line 3.
        let (_dir, path, _) = log_with(5);
        let mut l = lines(&path);
        let forged = l[2].replace("\"bytes_up\":3", "\"bytes_up\":999");
        l.insert(2, forged);
        write_lines(&path, &l);
        let err = verify(&path).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Tampered {
                    line: 3,
                    kind: Tamper::Inserted,
                    ..
                }
            ),
            "{err}"
        );
        // A duplicated line.
        let (_dir, path, _) = log_with(5);
        let mut l = lines(&path);
        l.insert(2, l[1].clone());
        write_lines(&path, &l);
        assert_eq!(failure(&path).1, Tamper::Inserted);
        // Garbage.
        let (_dir, path, _) = log_with(5);
        let mut l = lines(&path);
        l.insert(4, "{\"hello\":1}".into());
        write_lines(&path, &l);
        assert_eq!(failure(&path), (5, Tamper::Malformed));
    }

    #[test]
    fn removing_the_tail_needs_an_anchor() {
        let (_dir, path, head) = log_with(5);
        let mut l = lines(&path);
        l.pop();
        write_lines(&path, &l);
        // The chain alone cannot tell…
        assert_eq!(verify(&path).unwrap().records, 4);
        // …the anchor can.
        let err = verify_with_anchor(&path, &head).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Tampered {
                    line: 5,
                    kind: Tamper::Truncated,
                    ..
                }
            ),
            "{err}"
        );
        // A rewritten last line, likewise.
        let (_dir, path, head) = log_with(5);
        let mut l = lines(&path);
        l[4] = l[4].replace("client closed", "timeout");
        write_lines(&path, &l);
        assert!(verify(&path).is_ok());
        assert!(matches!(
            verify_with_anchor(&path, &head),
            Err(VerifyError::Tampered {
                line: 5,
                kind: Tamper::Modified,
                ..
            })
        ));
    }

    #[test]
    fn a_torn_tail_is_refused_on_open_and_reported_by_verify() {
        let (_dir, path, _) = log_with(3);
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 10);
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::TornTail { .. })
        ));
        assert_eq!(failure(&path), (3, Tamper::Malformed));
        fs::write(&path, b"not json\n").unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::BadTail { .. })
        ));
    }

    #[test]
    fn empty_and_missing_logs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.jsonl");
        assert!(matches!(verify(&path), Err(VerifyError::Io { .. })));
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(
            log.head().unwrap(),
            ChainHead {
                seq: 0,
                hash: GENESIS_PREV.into()
            }
        );
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 0);
        assert!(matches!(
            AuditLog::open(&dir.path().join("no/such/dir.jsonl")),
            Err(AuditError::Io { .. })
        ));
    }

    #[test]
    fn oversized_records_are_refused_and_the_log_stays_valid() {
        let (_dir, path, _) = log_with(1);
        let log = AuditLog::open(&path).unwrap();
        let huge = AuditEvent::Revoke {
            credential: None,
            subject: None,
            by: None,
            reason: "x".repeat(MAX_AUDIT_LINE_BYTES),
        };
        assert!(matches!(
            log.record(&huge),
            Err(AuditError::TooLarge { .. })
        ));
        log.record(&event(2)).unwrap();
        assert_eq!(verify(&path).unwrap().records, 2);
    }
}
