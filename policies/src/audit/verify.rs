//! Verification: the hash chain, checkpoint signatures, an optional anchor
//! and required signer, and the links between rotated files.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use postern_identity::Identifier;

use super::checkpoint::{self, Fault, Note};
use super::{sha256_hex, ChainHead, GENESIS_PREV, MAX_AUDIT_LINE_BYTES};

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
    /// A checkpoint's signature does not match the chain it covers: the
    /// lines before it were rewritten, or the checkpoint is forged.
    BadSignature,
    /// A checkpoint is signed by another key than the required signer.
    WrongSigner,
    /// More lines follow the last checkpoint than it allows, or there is no
    /// checkpoint at all, while a signer is required: checkpoints were
    /// removed, so the lines after the last one may have been rewritten.
    Unsigned,
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
            Tamper::BadSignature => "bad checkpoint signature",
            Tamper::WrongSigner => "wrong signer",
            Tamper::Unsigned => "not signed",
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
    /// A file of a rotated series does not continue the file before it
    /// ([`verify_rotated`]).
    #[error("audit log {} does not continue {}: {detail}", path.display(), previous.display())]
    Unlinked {
        /// The later file.
        path: PathBuf,
        /// The file before it.
        previous: PathBuf,
        /// What its first line says instead.
        detail: String,
    },
}

/// What [`verify_with`] requires beyond an intact chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyOptions {
    /// A [`ChainHead`] kept elsewhere: the log must still contain it.
    pub anchor: Option<ChainHead>,
    /// Every checkpoint must be signed by this identity, and at most as many
    /// lines as the last checkpoint allows may follow it.
    pub signer: Option<Identifier>,
}

impl VerifyOptions {
    /// Requires `anchor`.
    pub fn with_anchor(mut self, anchor: ChainHead) -> Self {
        self.anchor = Some(anchor);
        self
    }

    /// Requires checkpoints signed by `signer`.
    pub fn with_signer(mut self, signer: Identifier) -> Self {
        self.signer = Some(signer);
        self
    }
}

/// A verified log ([`verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Number of records (lines, checkpoints included).
    pub records: u64,
    /// The end of the chain.
    pub head: ChainHead,
    /// Valid signed checkpoints.
    pub checkpoints: u64,
    /// Lines 1 to `covered` are covered by the last checkpoint's signature
    /// (0 without checkpoints).
    pub covered: u64,
    /// Who signed the checkpoints.
    pub signers: Vec<Identifier>,
    /// The head of the previous file, when this one starts with a
    /// `continued` line (it was opened after a rotation).
    pub continues: Option<ChainHead>,
}

impl VerifyReport {
    /// Lines after the last checkpoint, not yet covered by a signature.
    pub fn uncovered(&self) -> u64 {
        self.records - self.covered
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ok: {}, chain intact; head {} (compare it with a copy kept elsewhere to detect removal of the last lines)",
            plural(self.records, "record", "records"),
            self.head
        )?;
        if self.checkpoints > 0 {
            let signers: Vec<String> = self.signers.iter().map(ToString::to_string).collect();
            write!(
                f,
                "\nsigned: {} by {} cover lines 1 to {}; {} after the last one not yet covered",
                plural(self.checkpoints, "checkpoint", "checkpoints"),
                signers.join(", "),
                self.covered,
                plural(self.uncovered(), "line", "lines"),
            )?;
        } else if self.records > 0 {
            write!(f, "\nsigned: no checkpoints")?;
        }
        if let Some(previous) = &self.continues {
            write!(f, "\ncontinues a previous file that ended at {previous}")?;
        }
        Ok(())
    }
}

/// Reads lines with their numbers, bounding their length.
struct Lines<R> {
    reader: R,
    number: u64,
}

enum LineRead {
    Line(u64, Vec<u8>),
    Bad(u64, String),
    End,
}

impl<R: BufRead> Lines<R> {
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

/// A line's chain fields.
struct Parsed {
    seq: u64,
    prev: String,
    time: String,
    event: String,
    value: serde_json::Value,
}

/// The chain fields of a line, or what is wrong with it.
fn parse_line(line: &[u8]) -> Result<Parsed, String> {
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
        .ok_or("no prev hash")?
        .to_owned();
    let time = value
        .get("time")
        .and_then(serde_json::Value::as_str)
        .ok_or("no time")?
        .to_owned();
    let event = value
        .get("event")
        .and_then(serde_json::Value::as_str)
        .ok_or("no event")?
        .to_owned();
    Ok(Parsed {
        seq,
        prev,
        time,
        event,
        value,
    })
}

/// Verifies the hash chain and the checkpoint signatures of the log at
/// `path` (`postern audit verify`).
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    verify_with(path, &VerifyOptions::default())
}

/// Like [`verify`], and also checks that the log still contains `anchor` (a
/// [`ChainHead`] kept elsewhere), which detects removal of the last lines
/// and changes to the line the anchor names.
pub fn verify_with_anchor(path: &Path, anchor: &ChainHead) -> Result<VerifyReport, VerifyError> {
    verify_with(path, &VerifyOptions::default().with_anchor(anchor.clone()))
}

/// Like [`verify`], with what `options` require: an anchor, a signer.
pub fn verify_with(path: &Path, options: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    let file = File::open(path).map_err(|source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    verify_reader(BufReader::new(file), path, options)
}

/// Verifies the files of a rotated log, oldest first: each on its own (the
/// anchor applies to the last one, the signer to all), and each after the
/// first must start with a `continued` line naming the head of the one
/// before it.
pub fn verify_rotated(
    paths: &[PathBuf],
    options: &VerifyOptions,
) -> Result<Vec<VerifyReport>, VerifyError> {
    let mut reports: Vec<VerifyReport> = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        let mut own = options.clone();
        if i + 1 < paths.len() {
            own.anchor = None;
        }
        let report = verify_with(path, &own)?;
        if let (Some(before), Some(previous)) = (reports.last(), i.checked_sub(1)) {
            if report.continues.as_ref() != Some(&before.head) {
                let detail = match &report.continues {
                    Some(named) => format!(
                        "its first line names a previous file that ended at {named}, but that one ends at {}",
                        before.head
                    ),
                    None => format!(
                        "its first line is not a `continued` line (the previous file ends at {})",
                        before.head
                    ),
                };
                return Err(VerifyError::Unlinked {
                    path: path.clone(),
                    previous: paths[previous].clone(),
                    detail,
                });
            }
        }
        reports.push(report);
    }
    Ok(reports)
}

/// Verifies a log held in memory (fuzzing, tests).
pub(crate) fn verify_bytes(
    bytes: &[u8],
    options: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    verify_reader(bytes, Path::new("(in memory)"), options)
}

/// The checkpoints seen so far.
#[derive(Default)]
struct Signatures {
    count: u64,
    /// The line of the last one.
    last: u64,
    /// What the last one allows to follow it.
    next_within: u64,
    signers: BTreeSet<Identifier>,
}

fn verify_reader(
    reader: impl BufRead,
    path: &Path,
    options: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
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
    let mut lines = Lines { reader, number: 0 };
    // Hashes of the previous line and the one before it.
    let mut h1 = GENESIS_PREV.to_owned();
    let mut h2 = GENESIS_PREV.to_owned();
    let mut records = 0u64;
    let mut signatures = Signatures::default();
    let mut continues = None;
    let mut current = lines.next().map_err(io)?;
    loop {
        let (n, bytes) = match current {
            LineRead::End => break,
            LineRead::Bad(n, detail) => return Err(tampered(n, Tamper::Malformed, detail)),
            LineRead::Line(n, bytes) => (n, bytes),
        };
        let line = parse_line(&bytes).map_err(|d| tampered(n, Tamper::Malformed, d))?;
        let (seq, prev) = (line.seq, line.prev.as_str());
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
                LineRead::Line(_, b) => parse_line(b).ok().map(|p| p.seq),
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
        match line.event.as_str() {
            "checkpoint" => {
                let checked =
                    checkpoint::check(seq, &line.time, prev, &line.value).map_err(|fault| {
                        match fault {
                            Fault::Malformed(d) => tampered(n, Tamper::Malformed, d),
                            Fault::BadSignature(d) => tampered(n, Tamper::BadSignature, d),
                        }
                    })?;
                if let Some(required) = options.signer.filter(|s| *s != checked.signer) {
                    return Err(tampered(
                        n,
                        Tamper::WrongSigner,
                        format!(
                            "the checkpoint is signed by {}, not by {required}",
                            checked.signer
                        ),
                    ));
                }
                signatures.count += 1;
                signatures.last = n;
                signatures.next_within = checked.next_within;
                signatures.signers.insert(checked.signer);
            }
            "continued" if n == 1 => {
                let Ok(Note::Continued {
                    previous_seq,
                    previous_hash,
                }) = serde_json::from_value::<Note>(line.value.clone())
                else {
                    return Err(tampered(
                        n,
                        Tamper::Malformed,
                        "a continued line without previous_seq and previous_hash".into(),
                    ));
                };
                continues = Some(ChainHead {
                    seq: previous_seq,
                    hash: previous_hash,
                });
            }
            _ => {}
        }
        let hash = sha256_hex(&bytes);
        if let Some(anchor) = &options.anchor {
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
    if let Some(anchor) = &options.anchor {
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
    if let Some(required) = options.signer {
        let after = records - signatures.last;
        if signatures.count == 0 && records > 0 {
            return Err(tampered(
                1,
                Tamper::Unsigned,
                format!(
                    "no checkpoint signed by {required} in {}: nothing here is covered by a signature (a writer with a signer signs within its checkpoint interval and when it closes; if it has just started, try again later)",
                    plural(records, "line", "lines")
                ),
            ));
        }
        if after > signatures.next_within {
            return Err(tampered(
                signatures.last + signatures.next_within + 1,
                Tamper::Unsigned,
                format!(
                    "{after} lines follow the last checkpoint (line {}), which allows at most {}: later checkpoints were removed, so every line after line {} may have been rewritten",
                    signatures.last, signatures.next_within, signatures.last
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
        checkpoints: signatures.count,
        covered: signatures.last,
        signers: signatures.signers.into_iter().collect(),
        continues,
    })
}
