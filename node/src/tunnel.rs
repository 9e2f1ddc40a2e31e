//! The data path of one established tunnel: local stream ⇄ end-to-end Noise
//! frames on the spliced relay connection.
//!
//! Two directions run side by side in one task:
//! - *up*: read the local stream, seal each chunk as a `Data` frame, write it
//!   to the relay connection; on local EOF send `Eof`.
//! - *down*: read frames, open them, write `Data` to the local stream; on
//!   `Eof` half-close the local stream; on `Close` end the tunnel with the
//!   peer's reason.
//!
//! The relay connection is half-closed (FIN) only once both `Eof`s have been
//! exchanged, so a `Close` can still be delivered until then. A tunnel that
//! ends any other way is an abort: the caller resets the local stream.
//!
//! Memory per tunnel is fixed: one read buffer per direction (64 KiB each)
//! and the framed reader's buffer (128 KiB). Nothing is queued beyond them: a
//! slow reader at one end stops this pump from reading the other end, so TCP
//! flow control pushes back all the way to the sender.
//!
//! An optional idle timeout ([`PumpOptions::idle_timeout`]) closes a tunnel
//! that carried no bytes either way for that long; it is off by default,
//! since database sessions often sit idle for hours.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use postern_identity::credential::SignedCredential;
use postern_identity::frame::MAX_NOISE_MESSAGE;
use postern_identity::frame::MAX_PLAINTEXT;
use postern_identity::link::{FramedReader, LinkError};
use postern_identity::transport::{Opener, Sealer};
use postern_identity::wire::{CloseReason, DataFrame, FRAME_DATA};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

/// Largest chunk of local data carried in one frame (one byte is the kind).
const MAX_CHUNK: usize = MAX_PLAINTEXT - 1;

/// How a tunnel ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum TunnelEnd {
    /// Both directions finished with `Eof`.
    Clean,
    /// The local stream failed (for example reset by the client or target).
    LocalFailed(io::Error),
    /// The peer closed the tunnel and said why.
    PeerClosed(CloseReason),
    /// The relay connection broke or carried invalid frames.
    LinkFailed(LinkError),
    /// Stopped by our own shutdown.
    Cancelled,
    /// No bytes moved either way for this long; the peer was told why.
    IdleTimeout(Duration),
}

impl TunnelEnd {
    /// Whether the local stream should be reset rather than closed.
    pub fn is_abort(&self) -> bool {
        !matches!(self, TunnelEnd::Clean)
    }

    /// In words, for logs and audit records.
    pub fn describe(&self) -> String {
        match self {
            TunnelEnd::Clean => "closed by its ends".to_owned(),
            TunnelEnd::LocalFailed(e) => format!("local connection failed: {e}"),
            TunnelEnd::PeerClosed(reason) => format!("closed by peer: {reason}"),
            TunnelEnd::LinkFailed(e) => format!("connection through the relay failed: {e}"),
            TunnelEnd::Cancelled => "closed by shutdown".to_owned(),
            TunnelEnd::IdleTimeout(after) => format!("idle for {after:?}"),
        }
    }
}

/// Byte counts and outcome of a tunnel.
#[derive(Debug)]
pub struct TunnelOutcome {
    /// Bytes read from the local stream and sent into the tunnel.
    pub sent: u64,
    /// Bytes received from the tunnel and written to the local stream.
    pub received: u64,
    /// How it ended.
    pub end: TunnelEnd,
}

/// Relay-side halves of an established end-to-end channel.
#[derive(Debug)]
pub struct ChannelHalves<TR, TW> {
    /// Frames from the peer.
    pub reader: FramedReader<TR>,
    /// Frames to the peer.
    pub writer: TW,
    /// Encrypts our frames.
    pub sealer: Sealer,
    /// Decrypts the peer's frames.
    pub opener: Opener,
}

/// Seals one data-channel frame and writes it.
pub async fn send_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    sealer: &mut Sealer,
    frame: &DataFrame<'_>,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(), LinkError> {
    frame.encode_into(scratch)?;
    out.clear();
    sealer.seal(scratch, out)?;
    writer.write_all(out).await?;
    Ok(())
}

/// Reads and opens the next data-channel frame into `plain`, returning its length.
pub async fn recv_frame<R: AsyncRead + Unpin>(
    reader: &mut FramedReader<R>,
    opener: &mut Opener,
    plain: &mut [u8],
) -> Result<usize, LinkError> {
    let body = reader.next_frame(MAX_NOISE_MESSAGE).await?;
    Ok(opener.open(body, plain)?)
}

/// [`recv_frame`] into a buffer grown to the frame's size when needed.
async fn recv_frame_growing<R: AsyncRead + Unpin>(
    reader: &mut FramedReader<R>,
    opener: &mut Opener,
    plain: &mut Vec<u8>,
) -> Result<usize, LinkError> {
    let body = reader.next_frame(MAX_NOISE_MESSAGE).await?;
    if plain.len() < body.len() {
        plain.resize(body.len(), 0);
    }
    Ok(opener.open(body, plain)?)
}

/// First size of a tunnel's read buffer towards the relay; it doubles on
/// each read that fills it, up to [`MAX_CHUNK`].
const INITIAL_CHUNK: usize = 4 * 1024;

enum UpEnd {
    Done,
    Failed(TunnelEnd),
}

/// When a tunnel last moved a byte, shared by its two directions (a plain
/// `Cell` would make the pump's future `!Send`). Without an idle timeout it
/// records nothing, so the data path pays no clock read per chunk.
struct Activity {
    start: tokio::time::Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
    enabled: bool,
}

impl Activity {
    fn new(enabled: bool) -> Self {
        Activity {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            enabled,
        }
    }

    fn touch(&self) {
        if !self.enabled {
            return;
        }
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// `write_all` that records the time of every partial write, so a slow but
/// steady reader does not look idle.
async fn write_all_noting_progress<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut data: &[u8],
    activity: &Activity,
) -> io::Result<()> {
    while !data.is_empty() {
        let n = w.write(data).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        activity.touch();
        data = &data[n..];
    }
    Ok(())
}

/// Settings of one tunnel's data pump.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PumpOptions {
    /// Close the tunnel after this long without a byte in either direction.
    /// `None` (the default) never closes an idle tunnel.
    pub idle_timeout: Option<Duration>,
    /// What the peer is told when `stop` ends the tunnel (default:
    /// `Close(Shutdown)`).
    pub stop_reason: StopReason,
    /// This node's credential: each renewal is sent to the peer
    /// (`DataFrame::Credential`) so the tunnel outlives the old one.
    pub own_credential: Option<watch::Receiver<Option<SignedCredential>>>,
    /// Where the peer's renewed credentials go (unverified: the receiver
    /// verifies them). `None`: they are ignored.
    pub peer_credentials: Option<mpsc::Sender<SignedCredential>>,
}

impl PumpOptions {
    /// Options with the given idle timeout (`None`: off).
    pub fn with_idle_timeout(idle_timeout: Option<Duration>) -> Self {
        PumpOptions {
            idle_timeout,
            ..PumpOptions::default()
        }
    }

    /// The same options sending renewals of this node's credential to the peer.
    pub fn with_own_credential(
        mut self,
        credential: watch::Receiver<Option<SignedCredential>>,
    ) -> Self {
        self.own_credential = Some(credential);
        self
    }

    /// The same options handing the peer's renewed credentials to `sink`.
    pub fn with_peer_credentials(mut self, sink: mpsc::Sender<SignedCredential>) -> Self {
        self.peer_credentials = Some(sink);
        self
    }

    /// The same options telling the peer what `reason` holds when stopped.
    pub fn with_stop_reason(mut self, reason: StopReason) -> Self {
        self.stop_reason = reason;
        self
    }
}

/// Why a tunnel is being stopped, set by whoever cancels its `stop` token
/// (an access check that no longer passes) and sent to the peer in the
/// `Close` frame. Unset, the peer hears `Shutdown`.
#[derive(Debug, Clone, Default)]
pub struct StopReason(Arc<std::sync::Mutex<Option<CloseReason>>>);

impl StopReason {
    /// Sets the reason (before cancelling the tunnel's `stop` token).
    pub fn set(&self, reason: CloseReason) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    /// The reason set, if any.
    pub fn get(&self) -> Option<CloseReason> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl PartialEq for StopReason {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for StopReason {}

/// A far-future deadline for a disabled timer (a year is as good as never
/// and cannot overflow an `Instant`).
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Waits for the next change of a credential watch; hands the receiver back
/// with the new value. `None` once it can change no more.
async fn next_credential(
    mut rx: watch::Receiver<Option<SignedCredential>>,
) -> Option<(
    watch::Receiver<Option<SignedCredential>>,
    Option<SignedCredential>,
)> {
    rx.changed().await.ok()?;
    let credential = rx.borrow_and_update().clone();
    Some((rx, credential))
}

/// A credential-change wait that lives across loop iterations, so the data
/// path re-polls one registered waiter instead of building a new one per
/// chunk. Without a watch it never completes.
type CredentialWait = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Option<(
                    watch::Receiver<Option<SignedCredential>>,
                    Option<SignedCredential>,
                )>,
            > + Send,
    >,
>;

fn credential_wait(rx: Option<watch::Receiver<Option<SignedCredential>>>) -> CredentialWait {
    match rx {
        Some(rx) => Box::pin(next_credential(rx)),
        None => Box::pin(std::future::pending()),
    }
}

/// Moves bytes both ways until the tunnel ends. `stop` ends it early (node
/// shutdown): the peer is told with a `Close(Shutdown)` frame.
pub async fn pump<LR, LW, TR, TW>(
    local_r: LR,
    local_w: LW,
    channel: ChannelHalves<TR, TW>,
    stop: CancellationToken,
) -> TunnelOutcome
where
    LR: AsyncRead + Unpin,
    LW: AsyncWrite + Unpin,
    TR: AsyncRead + Unpin,
    TW: AsyncWrite + Unpin,
{
    pump_with(local_r, local_w, channel, stop, &PumpOptions::default()).await
}

/// [`pump`] with options (an idle timeout). An idle tunnel is closed with
/// `Close(Aborted)` naming the timeout, so the peer logs why.
pub async fn pump_with<LR, LW, TR, TW>(
    mut local_r: LR,
    mut local_w: LW,
    channel: ChannelHalves<TR, TW>,
    stop: CancellationToken,
    options: &PumpOptions,
) -> TunnelOutcome
where
    LR: AsyncRead + Unpin,
    LW: AsyncWrite + Unpin,
    TR: AsyncRead + Unpin,
    TW: AsyncWrite + Unpin,
{
    let ChannelHalves {
        mut reader,
        mut writer,
        mut sealer,
        mut opener,
    } = channel;
    // Down tells up: "I received Eof" / "send this Close and stop".
    let peer_eof = Notify::new();
    let (close_tx, mut close_rx) = oneshot::channel::<CloseReason>();
    // Either direction failing ends the other.
    let abort = stop.child_token();
    let mut sent = 0u64;
    let mut received = 0u64;
    let idle_timeout = options.idle_timeout;
    let activity = Activity::new(idle_timeout.is_some());

    let up = async {
        // Small while the tunnel is quiet; a read that fills it doubles it,
        // up to one maximal frame (an idle tunnel holds little memory).
        let mut plain = vec![0u8; 1 + INITIAL_CHUNK.min(MAX_CHUNK)];
        plain[0] = FRAME_DATA;
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        let mut eof_sent = false;
        let mut close_open = true;
        let idle_timer = tokio::time::sleep(idle_timeout.unwrap_or(NEVER));
        tokio::pin!(idle_timer);
        let mut credential_change = credential_wait(options.own_credential.clone());
        loop {
            tokio::select! {
                biased;
                changed = &mut credential_change => {
                    let Some((rx, credential)) = changed else {
                        credential_change = credential_wait(None);
                        continue;
                    };
                    credential_change = credential_wait(Some(rx));
                    if let Some(credential) = credential {
                        if let Err(e) = send_frame(&mut writer, &mut sealer, &DataFrame::Credential(credential), &mut scratch, &mut out).await {
                            abort.cancel();
                            return UpEnd::Failed(TunnelEnd::LinkFailed(e));
                        }
                    }
                }
                reason = &mut close_rx, if close_open => match reason {
                    Ok(reason) => {
                        let _ = send_frame(&mut writer, &mut sealer, &DataFrame::Close(reason), &mut scratch, &mut out).await;
                        return UpEnd::Done;
                    }
                    // The down direction finished without asking for a Close.
                    Err(_) => close_open = false,
                },
                () = abort.cancelled() => {
                    let reason = options.stop_reason.get().unwrap_or(CloseReason::Shutdown);
                    if stop.is_cancelled() {
                        let _ = send_frame(&mut writer, &mut sealer, &DataFrame::Close(reason), &mut scratch, &mut out).await;
                        return UpEnd::Failed(TunnelEnd::Cancelled);
                    }
                    return UpEnd::Done;
                }
                () = peer_eof.notified(), if eof_sent => {
                    // Both directions are finished: FIN the relay connection.
                    let _ = writer.shutdown().await;
                    return UpEnd::Done;
                }
                read = local_r.read(&mut plain[1..]), if !eof_sent => match read {
                    Ok(0) => {
                        if let Err(e) = send_frame(&mut writer, &mut sealer, &DataFrame::Eof, &mut scratch, &mut out).await {
                            abort.cancel();
                            return UpEnd::Failed(TunnelEnd::LinkFailed(e));
                        }
                        eof_sent = true;
                    }
                    Ok(n) => {
                        activity.touch();
                        out.clear();
                        let sealed = sealer.seal(&plain[..=n], &mut out);
                        if n + 1 == plain.len() && plain.len() < 1 + MAX_CHUNK {
                            plain.resize((plain.len() * 2).min(1 + MAX_CHUNK), 0);
                        }
                        let written = match sealed {
                            Ok(()) => writer.write_all(&out).await.map_err(LinkError::from),
                            Err(e) => Err(e.into()),
                        };
                        if let Err(e) = written {
                            abort.cancel();
                            return UpEnd::Failed(TunnelEnd::LinkFailed(e));
                        }
                        sent += n as u64;
                    }
                    Err(e) => {
                        let reason = CloseReason::Aborted { reason: format!("connection reset at the other end ({})", e.kind()) };
                        let _ = send_frame(&mut writer, &mut sealer, &DataFrame::Close(reason), &mut scratch, &mut out).await;
                        abort.cancel();
                        return UpEnd::Failed(TunnelEnd::LocalFailed(e));
                    }
                },
                () = &mut idle_timer, if idle_timeout.is_some() => {
                    let limit = idle_timeout.unwrap_or(NEVER);
                    let quiet_until = activity.last() + limit;
                    if quiet_until > tokio::time::Instant::now() {
                        // Bytes moved since the timer was set: wait again.
                        idle_timer.as_mut().reset(quiet_until);
                        continue;
                    }
                    let reason = CloseReason::Aborted {
                        reason: format!("tunnel idle for {limit:?} (no data either way): closed by the idle timeout"),
                    };
                    let _ = send_frame(&mut writer, &mut sealer, &DataFrame::Close(reason), &mut scratch, &mut out).await;
                    abort.cancel();
                    return UpEnd::Failed(TunnelEnd::IdleTimeout(limit));
                }
            }
        }
    };

    let down = async {
        // Grows to the largest frame received (at most one maximal frame).
        let mut plain = Vec::new();
        let mut eof_received = false;
        let mut close_tx = Some(close_tx);
        loop {
            let next = tokio::select! {
                biased;
                () = abort.cancelled() => return None,
                next = recv_frame_growing(&mut reader, &mut opener, &mut plain) => next,
            };
            let n = match next {
                Ok(n) => {
                    activity.touch();
                    n
                }
                Err(LinkError::Closed) if eof_received => return None,
                Err(e) => {
                    abort.cancel();
                    return Some(TunnelEnd::LinkFailed(e));
                }
            };
            let frame = match DataFrame::decode(&plain[..n]) {
                Ok(frame) => frame,
                Err(e) => {
                    abort.cancel();
                    return Some(TunnelEnd::LinkFailed(e.into()));
                }
            };
            match frame {
                DataFrame::Data(_) if eof_received => {
                    abort.cancel();
                    return Some(TunnelEnd::LinkFailed(LinkError::Channel(
                        postern_identity::ChannelError::BadMessage(
                            "data after end of stream".into(),
                        ),
                    )));
                }
                DataFrame::Data(data) => {
                    let written = tokio::select! {
                        biased;
                        () = abort.cancelled() => return None,
                        w = write_all_noting_progress(&mut local_w, data, &activity) => w,
                    };
                    if let Err(e) = written {
                        if let Some(tx) = close_tx.take() {
                            let _ = tx.send(CloseReason::Aborted {
                                reason: format!("connection reset at the other end ({})", e.kind()),
                            });
                        }
                        return Some(TunnelEnd::LocalFailed(e));
                    }
                    received += data.len() as u64;
                }
                DataFrame::Eof => {
                    let _ = local_w.shutdown().await;
                    eof_received = true;
                    peer_eof.notify_one();
                }
                DataFrame::Ready => {}
                DataFrame::Close(reason) => {
                    abort.cancel();
                    return Some(TunnelEnd::PeerClosed(reason));
                }
                DataFrame::Credential(credential) => {
                    if let Some(sink) = &options.peer_credentials {
                        // A full queue means renewals faster than anyone
                        // needs; the newest one that fits is enough.
                        let _ = sink.try_send(credential);
                    }
                }
            }
        }
    };

    let (up_end, down_end) = tokio::join!(up, down);
    let end = match (up_end, down_end) {
        (UpEnd::Failed(end), _) => end,
        (UpEnd::Done, Some(end)) => end,
        (UpEnd::Done, None) if stop.is_cancelled() => TunnelEnd::Cancelled,
        (UpEnd::Done, None) => TunnelEnd::Clean,
    };
    TunnelOutcome {
        sent,
        received,
        end,
    }
}
