//! The writer's state machine, without threads, files or clocks: it turns
//! queued records into batches of chained lines, decides when to sign a
//! checkpoint, retries a failed batch after cutting off what it may have
//! left, and links a new file to the previous one after a rotation. The
//! caller passes the time in (`now` for scheduling, `wall_ms` for the lines'
//! `time`) and supplies the [`Storage`]; `writer.rs` drives it from a thread
//! over the real file, the tests below drive it over memory on a made-up
//! clock.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use postern_identity::Identity;
use tracing::{error, info};

use super::checkpoint::{self, Note};
use super::{fields_of, format_line, sha256_hex, AuditError, ChainHead, Durability, GENESIS_PREV};
use crate::time;

/// While the log cannot be written, the error is logged again this often.
const LOG_FAILURE_EVERY: Duration = Duration::from_secs(60);

/// Where the lines go: the file ([`super::file::FileStorage`]) or a stand-in.
pub(crate) trait Storage: Send + 'static {
    /// Opens the log (again, after a rotation). `Ok(None)` when the path
    /// still names the file already open, which stays open. On an error
    /// nothing stays open.
    fn open(&mut self) -> Result<Option<Opened>, AuditError>;
    /// Appends `bytes` at the end (one `write` where the system allows).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes everything appended so far durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the log back to `len` bytes.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// Closes the log (releasing its lock).
    fn close(&mut self);
}

/// A log just opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Opened {
    /// Its last line, without the newline (`None` when empty).
    pub last_line: Option<Vec<u8>>,
    /// Its length, bytes.
    pub len: u64,
}

/// Something to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    /// A record handed over by a caller.
    Record {
        /// Its number among the records handed over (from 1).
        ticket: u64,
        /// Its `time` field.
        time: String,
        /// Its event's fields ([`fields_of`]).
        fields: String,
    },
    /// Records dropped while the queue was full.
    Lost {
        /// How many.
        count: u64,
        /// Time of the first.
        first: String,
        /// Time of the last.
        last: String,
    },
}

/// What the state machine needs to know.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The file, for errors and logs.
    pub path: PathBuf,
    /// When a batch is synced.
    pub durability: Durability,
    /// Who signs checkpoints, if anyone.
    pub signer: Option<Identity>,
    /// At most this many lines between checkpoints.
    pub checkpoint_records: u64,
    /// A checkpoint at least this often while there are new lines.
    pub checkpoint_interval: Duration,
    /// A failed write or open is retried after this long.
    pub retry_interval: Duration,
}

/// The log cannot be written at the moment.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// The last error.
    pub error: String,
    /// Since when (Unix ms).
    pub since_ms: u64,
    since: Instant,
    next_retry: Instant,
    logged: Instant,
}

/// What one step achieved, for the callers waiting on records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// The highest ticket now on disk.
    pub written_through: Option<u64>,
    /// Records written.
    pub records_written: usize,
    /// The highest ticket of an attempt that failed.
    pub failed_through: Option<u64>,
}

impl Progress {
    fn merge(self, later: Progress) -> Progress {
        Progress {
            written_through: later.written_through.max(self.written_through),
            records_written: self.records_written + later.records_written,
            failed_through: later.failed_through.max(self.failed_through),
        }
    }
}

/// Lines about to be written, and the state after them.
struct Batch {
    bytes: Vec<u8>,
    seq: u64,
    prev: String,
    since: u64,
    checkpointed: bool,
}

impl Batch {
    fn line(&mut self, time: &str, fields: &str) {
        self.seq += 1;
        let line = format_line(self.seq, time, &self.prev, fields);
        self.prev = sha256_hex(line.as_bytes());
        self.bytes.extend_from_slice(line.as_bytes());
        self.bytes.push(b'\n');
        self.since += 1;
    }

    fn checkpoint(&mut self, signer: &Identity, time: &str, every: u64) -> Result<(), AuditError> {
        let note = checkpoint::sign(signer, self.seq, &self.prev, time, every);
        self.line(time, &fields_of(&note)?);
        self.since = 0;
        self.checkpointed = true;
        Ok(())
    }
}

/// The chain head and `event` of a log's last line.
fn parse_tail(line: &[u8]) -> Result<(ChainHead, bool), String> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let seq = value
        .get("seq")
        .and_then(serde_json::Value::as_u64)
        .ok_or("no seq")?;
    let checkpoint = value.get("event").and_then(serde_json::Value::as_str) == Some("checkpoint");
    Ok((
        ChainHead {
            seq,
            hash: sha256_hex(line),
        },
        checkpoint,
    ))
}

/// The writer's state.
pub(crate) struct Core<S> {
    storage: S,
    config: Config,
    /// Whether `storage` has the log open.
    open: bool,
    /// The last line on disk.
    head: ChainHead,
    /// Bytes on disk up to and including `head`.
    len: u64,
    /// A write failed part-way: bytes past `len` may be in the file.
    torn: bool,
    /// Lines since the last checkpoint.
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// The log was opened with an unsigned last line: sign it first.
    owe_checkpoint: bool,
    /// A `continued` line naming this head is owed at the top of the file.
    link: Option<ChainHead>,
    /// Items taken from the queue, not yet on disk, in order.
    inflight: Vec<Item>,
    failure: Option<Failure>,
}

impl<S: Storage> Core<S> {
    /// The state machine over `storage`, which was just opened as `opened`.
    pub(crate) fn new(
        storage: S,
        opened: Opened,
        config: Config,
        now: Instant,
    ) -> Result<Self, AuditError> {
        let mut core = Core {
            storage,
            config,
            open: false,
            head: ChainHead {
                seq: 0,
                hash: GENESIS_PREV.to_owned(),
            },
            len: 0,
            torn: false,
            since_checkpoint: 0,
            last_checkpoint: now,
            owe_checkpoint: false,
            link: None,
            inflight: Vec::new(),
            failure: None,
        };
        core.adopt(opened, now)?;
        Ok(core)
    }

    /// The last line on disk.
    pub(crate) fn head(&self) -> &ChainHead {
        &self.head
    }

    /// Why the log cannot be written, if it cannot.
    pub(crate) fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// Records not yet on disk.
    pub(crate) fn queued(&self) -> usize {
        self.inflight
            .iter()
            .filter(|i| matches!(i, Item::Record { .. }))
            .count()
    }

    /// Takes `items` (in order) to be written. Losses with no record between
    /// them are one gap, noted in one line.
    pub(crate) fn push(&mut self, items: impl IntoIterator<Item = Item>) {
        for item in items {
            match (self.inflight.last_mut(), item) {
                (
                    Some(Item::Lost { count, last, .. }),
                    Item::Lost {
                        count: more,
                        last: later,
                        ..
                    },
                ) => {
                    *count += more;
                    *last = later;
                }
                (_, item) => self.inflight.push(item),
            }
        }
    }

    /// When [`Core::poll`] next has something to do: at once, at a retry or
    /// checkpoint time, or (`None`) not until more items arrive.
    pub(crate) fn next_wake(&self, now: Instant) -> Option<Instant> {
        if let Some(failure) = &self.failure {
            return Some(failure.next_retry);
        }
        let signing = self.config.signer.is_some();
        if !self.open
            || self.torn
            || !self.inflight.is_empty()
            || self.link.is_some()
            || (signing && self.owe_checkpoint)
        {
            return Some(now);
        }
        (signing && self.since_checkpoint > 0)
            .then(|| self.last_checkpoint + self.config.checkpoint_interval)
    }

    /// Writes what is due at `now`, unless a failed attempt waits for its
    /// retry time.
    pub(crate) fn poll(&mut self, now: Instant, wall_ms: u64) -> Progress {
        if self.failure.as_ref().is_some_and(|f| now < f.next_retry) {
            return Progress::default();
        }
        self.attempt(now, wall_ms, false)
    }

    /// Rotation: writes what is queued and a checkpoint to the file open now,
    /// then opens the path again and starts the new file with a `continued`
    /// line. An error leaves nothing open; the open is then retried.
    pub(crate) fn rotate(
        &mut self,
        now: Instant,
        wall_ms: u64,
    ) -> (Progress, Result<(), AuditError>) {
        let mut progress = Progress::default();
        if self.open {
            progress = self.attempt(now, wall_ms, true);
            self.cut_torn_bytes();
        }
        let previous = self.link.take().unwrap_or_else(|| self.head.clone());
        match self.storage.open() {
            Ok(None) => {
                // The path still names this file: nothing to rotate.
                self.open = true;
                (progress, Ok(()))
            }
            Ok(Some(opened)) => {
                self.link = Some(previous);
                if let Err(e) = self.adopt(opened, now) {
                    let failed = self.fail(now, wall_ms, e.to_string());
                    return (progress.merge(failed), Err(e));
                }
                let written = self.attempt(now, wall_ms, false);
                let result = match &self.failure {
                    Some(f) => Err(AuditError::Unavailable {
                        path: self.config.path.clone(),
                        error: f.error.clone(),
                    }),
                    None => Ok(()),
                };
                (progress.merge(written), result)
            }
            Err(e) => {
                self.open = false;
                self.link = Some(previous);
                let failed = self.fail(now, wall_ms, e.to_string());
                (progress.merge(failed), Err(e))
            }
        }
    }

    /// Writes what is queued and a final checkpoint, and closes the log.
    /// `Err` says what could not be written.
    pub(crate) fn close(&mut self, now: Instant, wall_ms: u64) -> (Progress, Result<(), String>) {
        let progress = self.attempt(now, wall_ms, true);
        let result = match (&self.failure, self.queued()) {
            (None, _) => Ok(()),
            (Some(f), 0) => {
                error!(path = %self.config.path.display(), error = %f.error, "closing the audit log without its final lines (checkpoint or rotation link)");
                Err(format!("its final lines could not be written: {}", f.error))
            }
            (Some(f), n) => {
                error!(path = %self.config.path.display(), error = %f.error, records = n, "closing the audit log with records that could not be written");
                Err(format!(
                    "{n} record{} could not be written: {}",
                    if n == 1 { "" } else { "s" },
                    f.error
                ))
            }
        };
        self.cut_torn_bytes();
        self.storage.close();
        self.open = false;
        (progress, result)
    }

    /// Takes over a newly opened log.
    fn adopt(&mut self, opened: Opened, now: Instant) -> Result<(), AuditError> {
        let (head, signed) = match &opened.last_line {
            None => (
                ChainHead {
                    seq: 0,
                    hash: GENESIS_PREV.to_owned(),
                },
                false,
            ),
            Some(line) => match parse_tail(line) {
                Ok(tail) => tail,
                Err(detail) => {
                    self.storage.close();
                    self.open = false;
                    return Err(AuditError::BadTail {
                        path: self.config.path.clone(),
                        detail,
                    });
                }
            },
        };
        // The same chain goes on (the file came back): nothing to link.
        if self.link.as_ref() == Some(&head) {
            self.link = None;
        }
        self.owe_checkpoint = head.seq > 0 && !signed;
        self.head = head;
        self.len = opened.len;
        self.torn = false;
        self.since_checkpoint = 0;
        self.last_checkpoint = now;
        self.open = true;
        Ok(())
    }

    /// One attempt: open if needed, then write what is due (everything when
    /// `closing`, with a checkpoint if anything is unsigned).
    fn attempt(&mut self, now: Instant, wall_ms: u64, closing: bool) -> Progress {
        if !self.open {
            match self.storage.open() {
                Ok(Some(opened)) => {
                    if let Err(e) = self.adopt(opened, now) {
                        return self.fail(now, wall_ms, e.to_string());
                    }
                }
                Ok(None) => self.open = true,
                Err(e) => return self.fail(now, wall_ms, e.to_string()),
            }
        }
        let batch = match self.batch(now, wall_ms, closing) {
            Ok(batch) => batch,
            Err(e) => return self.fail(now, wall_ms, e.to_string()),
        };
        match self.write(&batch.bytes) {
            Ok(()) => self.commit(batch, now),
            Err(e) => self.fail(now, wall_ms, e.to_string()),
        }
    }

    /// The lines due now: a checkpoint owed for an unsigned tail, the link
    /// to a previous file, the items (with a checkpoint after every
    /// `checkpoint_records` lines), and a checkpoint if the interval passed
    /// (or `closing`) with unsigned lines.
    fn batch(&self, now: Instant, wall_ms: u64, closing: bool) -> Result<Batch, AuditError> {
        let time = time::rfc3339_millis(wall_ms)
            .ok_or_else(|| AuditError::Internal(format!("time {wall_ms} ms is out of range")))?;
        let mut batch = Batch {
            bytes: Vec::new(),
            seq: self.head.seq,
            prev: self.head.hash.clone(),
            since: self.since_checkpoint,
            checkpointed: false,
        };
        let signer = self.config.signer.as_ref();
        let every = self.config.checkpoint_records;
        if let Some(signer) = signer.filter(|_| self.owe_checkpoint) {
            batch.checkpoint(signer, &time, every)?;
        }
        if let Some(link) = &self.link {
            let note = Note::Continued {
                previous_seq: link.seq,
                previous_hash: link.hash.clone(),
            };
            batch.line(&time, &fields_of(&note)?);
        }
        for item in &self.inflight {
            match item {
                Item::Record { time, fields, .. } => batch.line(time, fields),
                Item::Lost { count, first, last } => {
                    let note = Note::RecordsLost {
                        count: *count,
                        first: first.clone(),
                        last: last.clone(),
                    };
                    batch.line(&time, &fields_of(&note)?);
                }
            }
            if let Some(signer) = signer.filter(|_| batch.since >= every) {
                batch.checkpoint(signer, &time, every)?;
            }
        }
        let due = closing || now >= self.last_checkpoint + self.config.checkpoint_interval;
        if let Some(signer) = signer.filter(|_| batch.since > 0 && due) {
            batch.checkpoint(signer, &time, every)?;
        }
        Ok(batch)
    }

    /// Cuts off what a failed write left, then appends `bytes` and syncs.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.torn {
            self.storage.truncate(self.len)?;
            self.torn = false;
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.torn = true;
        self.storage.append(bytes)?;
        if self.config.durability == Durability::Synced {
            self.storage.sync()?;
        }
        self.torn = false;
        Ok(())
    }

    /// Best effort before closing a file: leave no partial line behind.
    fn cut_torn_bytes(&mut self) {
        if self.torn && self.storage.truncate(self.len).is_ok() {
            self.torn = false;
        }
    }

    fn inflight_through(&self) -> Option<u64> {
        self.inflight.iter().rev().find_map(|i| match i {
            Item::Record { ticket, .. } => Some(*ticket),
            Item::Lost { .. } => None,
        })
    }

    fn commit(&mut self, batch: Batch, now: Instant) -> Progress {
        let progress = Progress {
            written_through: self.inflight_through(),
            records_written: self.queued(),
            failed_through: None,
        };
        self.len += batch.bytes.len() as u64;
        self.head = ChainHead {
            seq: batch.seq,
            hash: batch.prev,
        };
        self.since_checkpoint = batch.since;
        if batch.checkpointed {
            self.last_checkpoint = now;
        }
        self.owe_checkpoint = false;
        self.link = None;
        self.inflight.clear();
        if let Some(failure) = self.failure.take() {
            info!(path = %self.config.path.display(), after = ?now.saturating_duration_since(failure.since), records = progress.records_written, "the audit log can be written again; the queued records are written");
        }
        progress
    }

    fn fail(&mut self, now: Instant, wall_ms: u64, error: String) -> Progress {
        let queued = self.queued();
        let retry = self.config.retry_interval;
        let path = self.config.path.display();
        match &mut self.failure {
            Some(failure) => {
                if now.saturating_duration_since(failure.logged) >= LOG_FAILURE_EVERY {
                    failure.logged = now;
                    error!(path = %path, %error, queued, since = ?now.saturating_duration_since(failure.since), "the audit log still cannot be written; records are kept in memory and retried");
                }
                failure.error = error;
                failure.next_retry = now + retry;
            }
            None => {
                error!(path = %path, %error, queued, retry = ?retry, "cannot write the audit log; records are kept in memory and retried");
                self.failure = Some(Failure {
                    error,
                    since_ms: wall_ms,
                    since: now,
                    next_retry: now + retry,
                    logged: now,
                });
            }
        }
        Progress {
            failed_through: self.inflight_through(),
            ..Progress::default()
        }
    }
}

/// A stand-in [`Storage`] in memory that fails on demand.
#[cfg(test)]
pub(crate) mod memory {
    use std::io;
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};

    use super::{Opened, Storage};
    use crate::audit::AuditError;

    /// What the files look like, and what to fail.
    #[derive(Debug, Default)]
    pub(crate) struct Disk {
        /// Every file written, oldest first; the last is the open one.
        pub files: Vec<Vec<u8>>,
        /// Whether a file is open.
        pub open: bool,
        /// `mv` happened: the next open creates a new file.
        pub rotated: bool,
        /// Appends fail (after writing this many bytes, if `Some`).
        pub fail_append: Option<usize>,
        /// Syncs fail.
        pub fail_sync: bool,
        /// Opens fail.
        pub fail_open: bool,
        /// Counts.
        pub appends: usize,
        /// Successful syncs.
        pub syncs: usize,
        /// Truncations.
        pub truncations: usize,
        /// Syncs wait while this is set.
        pub hold_sync: bool,
    }

    /// Shared with the test, which changes and inspects the disk.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct MemStorage {
        pub disk: Arc<(Mutex<Disk>, Condvar)>,
    }

    impl MemStorage {
        /// A storage with one empty file, opened.
        pub(crate) fn new() -> (Self, Opened) {
            let storage = MemStorage::default();
            storage.disk().files.push(Vec::new());
            storage.disk().open = true;
            (
                storage,
                Opened {
                    last_line: None,
                    len: 0,
                },
            )
        }

        pub(crate) fn disk(&self) -> MutexGuard<'_, Disk> {
            self.disk.0.lock().unwrap()
        }

        /// Releases syncs held by `hold_sync`.
        pub(crate) fn release(&self) {
            self.disk().hold_sync = false;
            self.disk.1.notify_all();
        }

        /// The text of file `i`.
        pub(crate) fn text(&self, i: usize) -> String {
            String::from_utf8(self.disk().files[i].clone()).unwrap()
        }
    }

    fn failed() -> io::Error {
        io::Error::new(io::ErrorKind::StorageFull, "no space left on device")
    }

    impl Storage for MemStorage {
        fn open(&mut self) -> Result<Option<Opened>, AuditError> {
            let mut disk = self.disk();
            if disk.fail_open {
                disk.open = false;
                return Err(AuditError::Io {
                    path: "mem".into(),
                    source: io::Error::new(io::ErrorKind::NotFound, "no such directory"),
                });
            }
            if disk.open && !disk.rotated {
                return Ok(None);
            }
            if disk.rotated || disk.files.is_empty() {
                disk.files.push(Vec::new());
                disk.rotated = false;
            }
            disk.open = true;
            let file = disk.files.last().cloned().unwrap_or_default();
            let last_line = file
                .strip_suffix(b"\n")
                .map(|body| body.rsplit(|&b| b == b'\n').next().unwrap_or(body).to_vec());
            Ok(Some(Opened {
                last_line,
                len: file.len() as u64,
            }))
        }

        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            let mut disk = self.disk();
            assert!(disk.open, "append to a closed file");
            disk.appends += 1;
            let cut = disk.fail_append;
            let file = disk.files.last_mut().unwrap();
            match cut {
                Some(n) => {
                    file.extend_from_slice(&bytes[..n.min(bytes.len())]);
                    Err(failed())
                }
                None => {
                    file.extend_from_slice(bytes);
                    Ok(())
                }
            }
        }

        fn sync(&mut self) -> io::Result<()> {
            let mut disk = self.disk();
            while disk.hold_sync {
                disk = self.disk.1.wait(disk).unwrap();
            }
            if disk.fail_sync {
                return Err(io::Error::other("I/O error"));
            }
            disk.syncs += 1;
            Ok(())
        }

        fn truncate(&mut self, len: u64) -> io::Result<()> {
            let mut disk = self.disk();
            disk.truncations += 1;
            disk.files.last_mut().unwrap().truncate(len as usize);
            Ok(())
        }

        fn close(&mut self) {
            self.disk().open = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemStorage;
    use super::*;
    use crate::audit::tests::rechain;
    use crate::audit::{verify_bytes, Tamper, VerifyError, VerifyOptions};

    const T0: u64 = 1_735_732_800_000;
    const SECOND: Duration = Duration::from_secs(1);

    fn config(signer: Option<Identity>) -> Config {
        Config {
            path: "mem".into(),
            durability: Durability::Synced,
            signer,
            checkpoint_records: 4,
            checkpoint_interval: Duration::from_secs(60),
            retry_interval: SECOND,
        }
    }

    fn signer() -> Identity {
        Identity::from_secret_bytes(&[8; 32])
    }

    fn record(ticket: u64) -> Item {
        Item::Record {
            ticket,
            time: time::rfc3339_millis(T0 + ticket).unwrap(),
            fields: format!("\"event\":\"revoke\",\"reason\":\"r{ticket}\"}}"),
        }
    }

    fn core(signer: Option<Identity>) -> (Core<MemStorage>, MemStorage, Instant) {
        let (storage, opened) = MemStorage::new();
        let now = Instant::now();
        let core = Core::new(storage.clone(), opened, config(signer), now).unwrap();
        (core, storage, now)
    }

    fn lines(text: &str) -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn events(text: &str) -> Vec<String> {
        lines(text)
            .iter()
            .map(|v| v["event"].as_str().unwrap().to_owned())
            .collect()
    }

    fn signed_by(id: &Identity) -> VerifyOptions {
        VerifyOptions::default().with_signer(id.identifier())
    }

    #[test]
    fn one_write_and_one_sync_per_batch() {
        let (mut core, disk, now) = core(None);
        assert_eq!(core.next_wake(now), None);
        core.push((1..=5).map(record));
        assert_eq!(core.next_wake(now), Some(now));
        let progress = core.poll(now, T0);
        assert_eq!(
            progress,
            Progress {
                written_through: Some(5),
                records_written: 5,
                failed_through: None
            }
        );
        let d = disk.disk();
        assert_eq!((d.appends, d.syncs), (1, 1));
        drop(d);
        let report = verify_bytes(disk.text(0).as_bytes(), &VerifyOptions::default()).unwrap();
        assert_eq!(report.records, 5);
        assert_eq!(&report.head, core.head());
        assert_eq!(core.next_wake(now), None);
        // Nothing queued: nothing written.
        assert_eq!(core.poll(now, T0), Progress::default());
        assert_eq!(disk.disk().appends, 1);
    }

    #[test]
    fn a_failed_write_is_cut_off_and_retried_on_time_and_the_chain_continues() {
        let (mut core, disk, t) = core(None);
        core.push([record(1)]);
        core.poll(t, T0);
        // The disk fills up half-way through the next batch.
        disk.disk().fail_append = Some(30);
        core.push([record(2), record(3)]);
        let progress = core.poll(t, T0);
        assert_eq!(progress.failed_through, Some(3));
        assert_eq!(progress.written_through, None);
        assert!(core.failure().is_some_and(|f| f.error.contains("no space")));
        assert_eq!(core.queued(), 2);
        assert_eq!(core.next_wake(t), Some(t + SECOND));
        // Not before the retry time, whatever arrives.
        core.push([record(4)]);
        assert_eq!(core.poll(t + SECOND / 2, T0), Progress::default());
        assert_eq!(disk.disk().appends, 2);
        // Still failing at the retry: another attempt, another partial line.
        let progress = core.poll(t + SECOND, T0);
        assert_eq!(progress.failed_through, Some(4));
        assert_eq!(disk.disk().appends, 3);
        assert!(verify_bytes(disk.text(0).as_bytes(), &VerifyOptions::default()).is_err());
        // The disk recovers: the partial line is cut off, all three follow.
        disk.disk().fail_append = None;
        let progress = core.poll(t + 2 * SECOND, T0);
        assert_eq!(progress.written_through, Some(4));
        assert_eq!(progress.records_written, 3);
        assert!(core.failure().is_none());
        assert!(disk.disk().truncations >= 1);
        let text = disk.text(0);
        let report = verify_bytes(text.as_bytes(), &VerifyOptions::default()).unwrap();
        assert_eq!(report.records, 4);
        let reasons: Vec<_> = lines(&text)
            .iter()
            .map(|v| v["reason"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(reasons, ["r1", "r2", "r3", "r4"]);
    }

    #[test]
    fn a_failed_sync_rewrites_the_batch_once() {
        let (mut core, disk, t) = core(None);
        disk.disk().fail_sync = true;
        core.push([record(1), record(2)]);
        assert_eq!(core.poll(t, T0).failed_through, Some(2));
        // The bytes reached the file but were not synced: they are written
        // again, not appended twice.
        disk.disk().fail_sync = false;
        assert_eq!(core.poll(t + SECOND, T0).written_through, Some(2));
        let report = verify_bytes(disk.text(0).as_bytes(), &VerifyOptions::default()).unwrap();
        assert_eq!(report.records, 2);
    }

    #[test]
    fn lost_records_are_noted_in_their_place() {
        let (mut core, disk, t) = core(None);
        let lost = |count, ms: u64| Item::Lost {
            count,
            first: time::rfc3339_millis(T0 + ms).unwrap(),
            last: time::rfc3339_millis(T0 + ms + 5).unwrap(),
        };
        // The writer took the queue between two losses: still one gap.
        core.push([record(1), lost(3, 10)]);
        core.push([lost(2, 20), record(2)]);
        let progress = core.poll(t, T0);
        assert_eq!(progress.records_written, 2);
        let text = disk.text(0);
        assert_eq!(events(&text), ["revoke", "records_lost", "revoke"]);
        let gap = &lines(&text)[1];
        assert_eq!(gap["count"], 5);
        assert_eq!(gap["first"], "2025-01-01T12:00:00.010Z");
        assert_eq!(gap["last"], "2025-01-01T12:00:00.025Z");
        verify_bytes(text.as_bytes(), &VerifyOptions::default()).unwrap();
    }

    #[test]
    fn checkpoints_follow_every_n_lines_and_sign_the_head() {
        let id = signer();
        let (mut core, disk, t) = core(Some(id.clone()));
        core.push((1..=9).map(record));
        core.poll(t, T0);
        let text = disk.text(0);
        // Every fourth line is followed by a checkpoint; the last line is
        // not signed yet (the interval has not passed).
        let kinds = events(&text);
        assert_eq!(kinds.len(), 11);
        assert_eq!(kinds[4], "checkpoint");
        assert_eq!(kinds[9], "checkpoint");
        assert_eq!(kinds[10], "revoke");
        let cp = &lines(&text)[4];
        assert_eq!(cp["covers"], 4);
        assert_eq!(cp["next_within"], 4);
        assert_eq!(cp["signer"], id.identifier().to_string());
        let report = verify_bytes(text.as_bytes(), &signed_by(&id)).unwrap();
        assert_eq!(
            (report.checkpoints, report.covered, report.uncovered()),
            (2, 10, 1)
        );
        assert_eq!(report.signers, [id.identifier()]);
        // Once the interval has passed, the last line is signed too, with no
        // new record needed.
        assert_eq!(core.next_wake(t), Some(t + Duration::from_secs(60)));
        assert_eq!(
            core.poll(t + Duration::from_secs(59), T0),
            Progress::default()
        );
        core.poll(t + Duration::from_secs(60), T0 + 60_000);
        let report = verify_bytes(disk.text(0).as_bytes(), &signed_by(&id)).unwrap();
        assert_eq!((report.checkpoints, report.uncovered()), (3, 0));
        assert_eq!(core.next_wake(t + Duration::from_secs(60)), None);
        // Closing signs what is new.
        core.push([record(10)]);
        core.poll(t + Duration::from_secs(61), T0 + 61_000);
        core.close(t + Duration::from_secs(62), T0 + 62_000)
            .1
            .unwrap();
        let text = disk.text(0);
        assert_eq!(events(&text).last().unwrap(), "checkpoint");
        assert_eq!(
            verify_bytes(text.as_bytes(), &signed_by(&id))
                .unwrap()
                .uncovered(),
            0
        );
    }

    #[test]
    fn an_unsigned_tail_found_at_open_is_signed_first() {
        let id = signer();
        let (mut core, disk, t) = core(None);
        core.push((1..=2).map(record));
        core.poll(t, T0);
        core.close(t, T0).1.unwrap();
        // Reopened with a signer: the two unsigned lines get a checkpoint
        // before anything else.
        let mut storage = disk.clone();
        let opened = storage.open().unwrap().unwrap();
        let mut core = Core::new(storage, opened, config(Some(id.clone())), t).unwrap();
        assert_eq!(core.next_wake(t), Some(t));
        core.push([record(3)]);
        core.poll(t, T0);
        let text = disk.text(0);
        assert_eq!(events(&text), ["revoke", "revoke", "checkpoint", "revoke"]);
        let report = verify_bytes(text.as_bytes(), &signed_by(&id)).unwrap();
        assert_eq!((report.covered, report.uncovered()), (3, 1));
    }

    #[test]
    fn rotation_signs_the_old_file_and_links_the_new_one() {
        let id = signer();
        let (mut core, disk, t) = core(Some(id.clone()));
        core.push((1..=2).map(record));
        core.poll(t, T0);
        let old_head = core.head().clone();
        disk.disk().rotated = true;
        core.push([record(3)]);
        let (progress, result) = core.rotate(t, T0);
        result.unwrap();
        assert_eq!(progress.written_through, Some(3));
        // The old file got the queued record and a checkpoint.
        let old = disk.text(0);
        assert_eq!(events(&old), ["revoke", "revoke", "revoke", "checkpoint"]);
        let old_report = verify_bytes(old.as_bytes(), &signed_by(&id)).unwrap();
        assert_eq!(old_report.uncovered(), 0);
        assert_ne!(old_report.head, old_head);
        // The new one starts at seq 1, prev zeros, naming the old head.
        let new = disk.text(1);
        let first = &lines(&new)[0];
        assert_eq!(first["event"], "continued");
        assert_eq!(first["seq"], 1);
        assert_eq!(first["prev"], GENESIS_PREV);
        assert_eq!(first["previous_seq"], old_report.head.seq);
        assert_eq!(first["previous_hash"], old_report.head.hash.as_str());
        let new_report = verify_bytes(new.as_bytes(), &VerifyOptions::default()).unwrap();
        assert_eq!(new_report.continues, Some(old_report.head));
        // Rotating when the path still names the same file does nothing.
        let before = disk.disk().files.len();
        core.rotate(t, T0).1.unwrap();
        assert_eq!(disk.disk().files.len(), before);
    }

    #[test]
    fn a_rotation_whose_open_fails_queues_and_retries() {
        let (mut core, disk, t) = core(None);
        core.push([record(1)]);
        core.poll(t, T0);
        {
            let mut d = disk.disk();
            d.rotated = true;
            d.fail_open = true;
        }
        let (_, result) = core.rotate(t, T0);
        assert!(matches!(result, Err(AuditError::Io { .. })));
        assert!(core.failure().is_some());
        core.push([record(2)]);
        assert_eq!(core.poll(t + SECOND, T0).failed_through, Some(2));
        disk.disk().fail_open = false;
        assert_eq!(core.poll(t + 2 * SECOND, T0).written_through, Some(2));
        assert!(core.failure().is_none());
        assert_eq!(events(&disk.text(1)), ["continued", "revoke"]);
    }

    #[test]
    fn a_rewritten_chain_fails_the_signature_that_covered_it() {
        let id = signer();
        let (mut core, disk, t) = core(Some(id.clone()));
        core.push((1..=6).map(record));
        core.close(t, T0).1.unwrap();
        let text = disk.text(0);
        assert!(verify_bytes(text.as_bytes(), &signed_by(&id)).is_ok());
        // Rewrite line 2 and recompute every hash after it.
        let mut rewritten: Vec<String> = text.lines().map(str::to_owned).collect();
        rewritten[1] = rewritten[1].replace("\"r2\"", "\"nothing to see\"");
        let bytes = rechain(&rewritten);
        // Every line chains to the one before again, but the checkpoint at
        // line 5 no longer matches what it signed.
        assert!(
            verify_bytes(&bytes, &VerifyOptions::default()).is_err_and(|e| matches!(
                e,
                VerifyError::Tampered {
                    line: 5,
                    kind: Tamper::BadSignature,
                    ..
                }
            ))
        );
    }
}
