//! [`AuditLog`]: the handle callers share, and the one thread per log that
//! drives the state machine (`machine.rs`) over the file (`file.rs`).

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postern_identity::Identity;
use tracing::warn;

use super::file::FileStorage;
use super::machine::{Config, Core, Item, Opened, Progress, Storage};
use super::{fields_of, AuditError, AuditEvent, ChainHead, LINE_PREFIX_MAX, MAX_AUDIT_LINE_BYTES};
use crate::time;

/// Default [`AuditOptions::checkpoint_records`].
pub const DEFAULT_CHECKPOINT_RECORDS: u64 = 1000;

/// Largest [`AuditOptions::checkpoint_records`] accepted.
pub const MAX_CHECKPOINT_RECORDS: u64 = 100_000;

/// Default [`AuditOptions::checkpoint_interval`].
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// Default [`AuditOptions::max_queued`].
pub const DEFAULT_MAX_QUEUED: usize = 10_000;

/// Default [`AuditOptions::retry_interval`].
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// In fail-open mode, admitting while the log cannot be written is logged
/// at most this often.
const WARN_FAIL_OPEN_EVERY_MS: u64 = 60_000;

/// When records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `fdatasync` after every batch, before the records in it count as
    /// written (the default).
    #[default]
    Synced,
    /// Leave flushing to the operating system: faster, and a crash may lose
    /// the last records (never corrupt earlier ones).
    OsBuffered,
}

/// How an [`AuditLog`] writes ([`AuditLog::open_with`]). Start from
/// `AuditOptions::default()`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AuditOptions {
    /// When records reach the disk.
    pub durability: Durability,
    /// Refuse new tunnels while the log cannot be written
    /// ([`AuditLog::admit`]). Default: admit, and log a warning.
    pub fail_closed: bool,
    /// Signs checkpoints. Default: none (no checkpoints).
    pub signer: Option<Identity>,
    /// At most this many lines between checkpoints (1 to
    /// [`MAX_CHECKPOINT_RECORDS`]).
    pub checkpoint_records: u64,
    /// A checkpoint at least this often while there are unsigned lines.
    pub checkpoint_interval: Duration,
    /// At most this many records wait while the log cannot be written;
    /// more are dropped and counted in a `records_lost` line.
    pub max_queued: usize,
    /// A failed write or open is retried after this long.
    pub retry_interval: Duration,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            durability: Durability::default(),
            fail_closed: false,
            signer: None,
            checkpoint_records: DEFAULT_CHECKPOINT_RECORDS,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            max_queued: DEFAULT_MAX_QUEUED,
            retry_interval: DEFAULT_RETRY_INTERVAL,
        }
    }
}

impl AuditOptions {
    /// Checkpoints signed by `identity`.
    pub fn with_signer(mut self, identity: Identity) -> Self {
        self.signer = Some(identity);
        self
    }

    /// Fail-closed (`true`) or fail-open.
    pub fn with_fail_closed(mut self, fail_closed: bool) -> Self {
        self.fail_closed = fail_closed;
        self
    }

    /// The given [`Durability`].
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    fn check(&self) -> Result<(), AuditError> {
        if !(1..=MAX_CHECKPOINT_RECORDS).contains(&self.checkpoint_records) {
            return Err(AuditError::BadOptions(format!(
                "checkpoint_records must be 1 to {MAX_CHECKPOINT_RECORDS}, not {}",
                self.checkpoint_records
            )));
        }
        if self.checkpoint_interval.is_zero() || self.retry_interval.is_zero() {
            return Err(AuditError::BadOptions(
                "checkpoint_interval and retry_interval must be longer than zero".into(),
            ));
        }
        if self.max_queued == 0 {
            return Err(AuditError::BadOptions(
                "max_queued must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Whether the log can be written ([`AuditLog::health`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditHealth {
    /// The last write (or open) succeeded.
    Writable,
    /// Writes (or opening the file) fail; records are queued and retried.
    Failing {
        /// The last error.
        error: String,
        /// Since when, Unix milliseconds.
        since_unix_ms: u64,
        /// Records waiting to be written.
        queued: usize,
        /// Records dropped since the log was opened (queue full).
        lost: u64,
    },
    /// The log was closed.
    Closed,
}

/// A fail-closed log cannot be written, so nothing new may be admitted
/// ([`AuditLog::admit`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the audit log {} cannot be written ({error}), and it is fail-closed: nothing new is admitted until it can be written again", path.display())]
pub struct AuditUnavailable {
    path: PathBuf,
    error: String,
}

impl AuditUnavailable {
    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The write or open error.
    pub fn error(&self) -> &str {
        &self.error
    }
}

/// A request to the writer thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Reopen,
    Close,
}

/// What callers and the writer thread share, under `Shared::state`.
#[derive(Debug)]
struct State {
    queue: VecDeque<Item>,
    /// Records handed over and not yet written (queued or in flight).
    waiting: usize,
    /// The last ticket handed out.
    tickets: u64,
    /// Every ticket up to this one is on disk.
    written: u64,
    /// The highest ticket of a failed attempt.
    failed_through: u64,
    /// Why the log cannot be written (error, since Unix ms), if it cannot.
    failure: Option<(String, u64)>,
    head: ChainHead,
    /// Records dropped since opening.
    lost: u64,
    request: Option<Request>,
    answer: Option<Result<(), AuditError>>,
    /// No more records are accepted.
    closing: bool,
    /// The writer thread has ended.
    stopped: bool,
}

struct Shared {
    path: PathBuf,
    fail_closed: bool,
    durability: Durability,
    max_queued: usize,
    state: Mutex<State>,
    /// The writer waits on it for work.
    work: Condvar,
    /// Callers wait on it for the writer's progress.
    progress: Condvar,
    /// When fail-open admission last warned (Unix ms).
    warned_ms: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is counters and a queue, consistent after any panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An append-only, hash-chained audit log file with one writer thread.
/// [`AuditLog::record`] may be called from any thread or task; see the
/// [module docs](super) for what it guarantees.
pub struct AuditLog {
    shared: Arc<Shared>,
    /// One reopen or close at a time.
    control: Mutex<()>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.shared.path)
            .field("durability", &self.shared.durability)
            .field("fail_closed", &self.shared.fail_closed)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> Result<u64, AuditError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| AuditError::Internal("the system clock is before 1970".into()))?;
    u64::try_from(now.as_millis())
        .map_err(|_| AuditError::Internal("the system clock is out of range".into()))
}

/// Whether this thread runs async tasks (a Tokio runtime's), where waiting
/// for the disk would stall other tasks.
fn on_async_runtime() -> bool {
    tokio::runtime::Handle::try_current().is_ok()
}

impl AuditLog {
    /// Opens (creating if needed) the log at `path` with the default
    /// [`AuditOptions`]: synced batches, fail-open, no checkpoints. The
    /// chain continues from the last line, which is read but not
    /// re-verified (use [`super::verify`] for that).
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with(path, AuditOptions::default())
    }

    /// Opens (creating if needed) the log at `path`, locks it and starts its
    /// writer thread. [`AuditError::Locked`] if another writer has it open.
    pub fn open_with(path: &Path, options: AuditOptions) -> Result<Self, AuditError> {
        options.check()?;
        let mut storage = FileStorage::new(path);
        let opened = storage.open()?.ok_or_else(|| {
            AuditError::Internal("a new file storage reported an open file".into())
        })?;
        Self::start(storage, opened, path, options)
    }

    /// The log over any [`Storage`] (the tests' failing stand-in).
    pub(crate) fn start<S: Storage>(
        storage: S,
        opened: Opened,
        path: &Path,
        options: AuditOptions,
    ) -> Result<Self, AuditError> {
        options.check()?;
        let config = Config {
            path: path.to_path_buf(),
            durability: options.durability,
            signer: options.signer,
            checkpoint_records: options.checkpoint_records,
            checkpoint_interval: options.checkpoint_interval,
            retry_interval: options.retry_interval,
        };
        let core = Core::new(storage, opened, config, Instant::now())?;
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            fail_closed: options.fail_closed,
            durability: options.durability,
            max_queued: options.max_queued,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                waiting: 0,
                tickets: 0,
                written: 0,
                failed_through: 0,
                failure: None,
                head: core.head().clone(),
                lost: 0,
                request: None,
                answer: None,
                closing: false,
                stopped: false,
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            warned_ms: AtomicU64::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || run(&shared, core)
            })
            .map_err(|source| AuditError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(AuditLog {
            shared,
            control: Mutex::new(()),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The last line on disk (records still queued are not in it).
    pub fn head(&self) -> ChainHead {
        self.shared.state().head.clone()
    }

    /// Appends `event`, stamped with the system clock. From async code it
    /// returns once the record is queued; from other threads once it is on
    /// disk (or with the error of the attempt that should have written it:
    /// the record then stays queued and is retried). Errors: the record
    /// does not fit, the queue is full (the record is dropped and counted),
    /// or the log is closed.
    pub fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        self.record_at(now_ms()?, event)
    }

    /// [`AuditLog::record`] with the time given: `unix_ms` milliseconds
    /// since 1970.
    pub fn record_at(&self, unix_ms: u64, event: &AuditEvent) -> Result<(), AuditError> {
        let time = time::rfc3339_millis(unix_ms)
            .ok_or_else(|| AuditError::Internal(format!("time {unix_ms} ms is out of range")))?;
        let fields = fields_of(event)?;
        let size = LINE_PREFIX_MAX + fields.len();
        if size > MAX_AUDIT_LINE_BYTES {
            return Err(AuditError::TooLarge { size });
        }
        let ticket = {
            let mut st = self.shared.state();
            if st.closing {
                return Err(self.closed());
            }
            if st.waiting >= self.shared.max_queued {
                st.lost += 1;
                match st.queue.back_mut() {
                    Some(Item::Lost { count, last, .. }) => {
                        *count += 1;
                        *last = time;
                    }
                    _ => st.queue.push_back(Item::Lost {
                        count: 1,
                        first: time.clone(),
                        last: time,
                    }),
                }
                return Err(AuditError::QueueFull {
                    path: self.shared.path.clone(),
                    queued: st.waiting,
                });
            }
            st.tickets += 1;
            st.waiting += 1;
            let ticket = st.tickets;
            st.queue.push_back(Item::Record {
                ticket,
                time,
                fields,
            });
            self.shared.work.notify_one();
            ticket
        };
        if on_async_runtime() {
            Ok(())
        } else {
            self.wait_for(ticket)
        }
    }

    /// Blocks until every record handed over so far is on disk, or returns
    /// the error of the attempt that should have written them (they stay
    /// queued). For one-shot commands and tests; async code should call it
    /// through `spawn_blocking`.
    pub fn flush(&self) -> Result<(), AuditError> {
        let ticket = self.shared.state().tickets;
        self.wait_for(ticket)
    }

    fn wait_for(&self, ticket: u64) -> Result<(), AuditError> {
        self.wait_until(self.shared.state(), |st| {
            if st.written >= ticket {
                return Some(Ok(()));
            }
            (st.failed_through >= ticket).then(|| {
                Err(AuditError::Unavailable {
                    path: self.shared.path.clone(),
                    error: st
                        .failure
                        .as_ref()
                        .map_or_else(|| "write failed".to_owned(), |(e, _)| e.clone()),
                })
            })
        })
    }

    /// Waits for the writer's progress until `done` has an outcome, or the
    /// writer stopped.
    fn wait_until(
        &self,
        mut st: MutexGuard<'_, State>,
        mut done: impl FnMut(&mut State) -> Option<Result<(), AuditError>>,
    ) -> Result<(), AuditError> {
        loop {
            if let Some(outcome) = done(&mut st) {
                return outcome;
            }
            if st.stopped {
                return Err(self.closed());
            }
            st = self
                .shared
                .progress
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn closed(&self) -> AuditError {
        AuditError::Closed {
            path: self.shared.path.clone(),
        }
    }

    /// Whether the log can be written now, with the queue's state.
    pub fn health(&self) -> AuditHealth {
        let st = self.shared.state();
        if st.stopped || st.closing {
            return AuditHealth::Closed;
        }
        match &st.failure {
            None => AuditHealth::Writable,
            Some((error, since)) => AuditHealth::Failing {
                error: error.clone(),
                since_unix_ms: *since,
                queued: st.waiting,
                lost: st.lost,
            },
        }
    }

    /// May something new (a tunnel, a registration) be admitted? Always in
    /// fail-open mode (with a warning, at most once a minute, while the log
    /// cannot be written); in fail-closed mode only while the log can be
    /// written.
    pub fn admit(&self) -> Result<(), AuditUnavailable> {
        let error = match self.health() {
            AuditHealth::Writable => return Ok(()),
            AuditHealth::Failing { error, .. } => error,
            AuditHealth::Closed => "the log is closed".to_owned(),
        };
        if self.shared.fail_closed {
            return Err(AuditUnavailable {
                path: self.shared.path.clone(),
                error,
            });
        }
        let now = now_ms().unwrap_or(0);
        let last = self.shared.warned_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARN_FAIL_OPEN_EVERY_MS
            && self
                .shared
                .warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(path = %self.shared.path.display(), %error, "admitting while the audit log cannot be written (fail-open); its records wait in memory. Use --audit-fail-closed to refuse instead");
        }
        Ok(())
    }

    /// Rotation: writes what is queued (and a checkpoint) to the file open
    /// now, then opens the path again. After `mv FILE FILE.1` the new file
    /// starts with a `continued` line naming the old file's last line; if
    /// the path still names the same file, nothing changes. If the path
    /// cannot be opened, the error is returned, records queue, and the open
    /// is retried every [`AuditOptions::retry_interval`].
    pub fn reopen(&self) -> Result<(), AuditError> {
        let _one = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        self.request(Request::Reopen)
    }

    /// Writes what is queued and a final checkpoint, closes the file
    /// (releasing its lock) and stops the writer. Later records fail with
    /// [`AuditError::Closed`]. Dropping the last handle does the same.
    pub fn close(&self) -> Result<(), AuditError> {
        let _one = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        if self.shared.state().stopped {
            return Ok(());
        }
        self.shared.state().closing = true;
        let answer = self.request(Request::Close);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                return Err(AuditError::Internal(
                    "the audit writer thread panicked".into(),
                ));
            }
        }
        answer
    }

    fn request(&self, request: Request) -> Result<(), AuditError> {
        let mut st = self.shared.state();
        if st.stopped {
            return Err(self.closed());
        }
        st.request = Some(request);
        st.answer = None;
        self.shared.work.notify_one();
        self.wait_until(st, |st| st.answer.take())
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // Errors were logged by the writer.
        let _ = self.close();
    }
}

/// Marks the writer stopped however it ends, so that nobody waits forever.
struct Stopped<'a>(&'a Shared);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.state().stopped = true;
        self.0.progress.notify_all();
    }
}

/// The writer thread: waits for records, requests or a due time, drives
/// the state machine, and tells the callers what it achieved.
fn run<S: Storage>(shared: &Shared, mut core: Core<S>) {
    let _stopped = Stopped(shared);
    loop {
        let (items, request) = {
            let mut st = shared.state();
            loop {
                if !st.queue.is_empty() || st.request.is_some() {
                    break;
                }
                let now = Instant::now();
                st = match core.next_wake(now) {
                    Some(at) if at <= now => break,
                    Some(at) => {
                        shared
                            .work
                            .wait_timeout(st, at - now)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                    None => shared.work.wait(st).unwrap_or_else(PoisonError::into_inner),
                };
            }
            (st.queue.drain(..).collect::<Vec<_>>(), st.request.take())
        };
        core.push(items);
        let now = Instant::now();
        // A clock before 1970 only stamps the writer's own lines wrong.
        let wall_ms = now_ms().unwrap_or(0);
        let (progress, answer) = match request {
            None => (core.poll(now, wall_ms), None),
            Some(Request::Reopen) => {
                let (progress, result) = core.rotate(now, wall_ms);
                (progress, Some(result))
            }
            Some(Request::Close) => {
                let (progress, result) = core.close(now, wall_ms);
                let result = result.map_err(|detail| AuditError::ClosedIncomplete {
                    path: shared.path.clone(),
                    detail,
                });
                (progress, Some(result))
            }
        };
        publish(shared, &core, progress, answer);
        if request == Some(Request::Close) {
            return;
        }
    }
}

fn publish<S: Storage>(
    shared: &Shared,
    core: &Core<S>,
    progress: Progress,
    answer: Option<Result<(), AuditError>>,
) {
    let mut st = shared.state();
    if let Some(ticket) = progress.written_through {
        st.written = st.written.max(ticket);
    }
    st.waiting = st.waiting.saturating_sub(progress.records_written);
    if let Some(ticket) = progress.failed_through {
        st.failed_through = st.failed_through.max(ticket);
    }
    st.failure = core.failure().map(|f| (f.error.clone(), f.since_ms));
    st.head = core.head().clone();
    if answer.is_some() {
        st.answer = answer;
    }
    shared.progress.notify_all();
}

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
