//! Thin async I/O around the sans-IO pieces: reading frames from a stream,
//! driving a handshake over it, and sending typed control messages.
//!
//! Everything here is a loop around [`crate::frame`], [`crate::handshake`]
//! and [`crate::transport`]; protocol decisions are made there.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, MAX_NOISE_MESSAGE};
use crate::handshake::{AttachInitiator, ChannelKind, Initiator, LocalParty, Peer, Responder};
use crate::transport::{Opener, Sealer, Transport};
use crate::wire::{self, Attach, AttachReply, Control, Hello};
use crate::ChannelError;

/// Largest control message accepted on a hop channel.
pub const MAX_CONTROL_FRAME: usize = 16 * 1024;
/// Reader capacity that holds two maximal frames (data channels).
pub const DATA_READ_BUFFER: usize = 2 * (frame::LEN_PREFIX + MAX_NOISE_MESSAGE);
/// Reader capacity for hop channels: any handshake message and control frames.
pub const CONTROL_READ_BUFFER: usize = frame::LEN_PREFIX + MAX_NOISE_MESSAGE + MAX_CONTROL_FRAME;

/// Why a link (a stream carrying frames) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The peer closed the connection at a frame boundary.
    #[error("connection closed by the other side")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The peer sent something the protocol does not allow.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The operating system reported an error.
    #[error("network error: {0}")]
    Io(#[from] std::io::Error),
    /// A step did not finish in time.
    #[error("{what} did not complete within {after:?}")]
    Timeout {
        /// What we were waiting for.
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },
}

impl LinkError {
    /// Whether the peer (or the network) caused this error, as opposed to a
    /// local failure.
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            LinkError::Closed
                | LinkError::Truncated
                | LinkError::Channel(_)
                | LinkError::Timeout { .. }
        )
    }
}

/// Runs `fut`, failing with [`LinkError::Timeout`] after `after`.
pub async fn within<T>(
    after: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, LinkError>>,
) -> Result<T, LinkError> {
    tokio::time::timeout(after, fut)
        .await
        .unwrap_or(Err(LinkError::Timeout { what, after }))
}

/// First size of a [`FramedReader`]'s buffer. It grows, up to the capacity
/// given to [`FramedReader::new`], when a frame needs more room or a read
/// fills it, so a quiet connection holds 4 KiB rather than the capacity.
pub const INITIAL_READ_BUFFER: usize = 4 * 1024;

/// Reads length-prefixed frames from a stream through one reusable buffer.
///
/// [`FramedReader::next_frame`] is cancel-safe: bytes already read stay in
/// the buffer, so it may be used in `select!`.
#[derive(Debug)]
pub struct FramedReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The most the buffer grows to.
    max: usize,
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    /// Wraps a stream with a buffer of `capacity` bytes (at least one
    /// maximal frame; see [`DATA_READ_BUFFER`] and [`CONTROL_READ_BUFFER`]).
    pub fn new(inner: R, capacity: usize) -> Self {
        let max = capacity.max(frame::LEN_PREFIX + MAX_NOISE_MESSAGE);
        FramedReader {
            inner,
            buf: vec![0u8; INITIAL_READ_BUFFER.min(max)],
            start: 0,
            end: 0,
            max,
        }
    }

    /// Bytes the buffer holds now (it grows on demand up to its capacity).
    pub fn allocated(&self) -> usize {
        self.buf.len()
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The underlying stream and the bytes buffered beyond the last frame.
    pub fn into_parts(self) -> (R, Vec<u8>) {
        let rest = self.buf[self.start..self.end].to_vec();
        (self.inner, rest)
    }

    /// The next frame body, at most `max_body` bytes. A clean end of stream
    /// at a frame boundary is [`LinkError::Closed`].
    pub async fn next_frame(&mut self, max_body: usize) -> Result<&[u8], LinkError> {
        loop {
            if let Some((body, used)) = frame::decode(&self.buf[self.start..self.end], max_body)? {
                let (from, len) = (self.start + frame::LEN_PREFIX, body.len());
                self.start += used;
                return Ok(&self.buf[from..from + len]);
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            // Room the frame being received needs from where it starts (its
            // length is known once its prefix is here; `decode` above has
            // refused one longer than `max_body`).
            let needed = match self.buf.get(self.start..self.start + frame::LEN_PREFIX) {
                Some(p) if self.end - self.start >= frame::LEN_PREFIX => {
                    frame::LEN_PREFIX + usize::from(u16::from_be_bytes([p[0], p[1]]))
                }
                _ => frame::LEN_PREFIX,
            };
            if self.buf.len() - self.start < needed {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.len() < needed {
                    self.grow(needed);
                }
            }
            let n = self.inner.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(if self.start == self.end {
                    LinkError::Closed
                } else {
                    LinkError::Truncated
                });
            }
            self.end += n;
            // A read that filled the buffer: a bulk stream; read more at once.
            if self.end == self.buf.len() {
                self.grow(self.buf.len() * 2);
            }
        }
    }
}

impl<R> FramedReader<R> {
    /// Grows the buffer to at least `wanted` bytes (doubling), at most `max`.
    fn grow(&mut self, wanted: usize) {
        let size = wanted.max(self.buf.len() * 2).min(self.max);
        if size > self.buf.len() {
            self.buf.resize(size, 0);
        }
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Result<(), LinkError> {
    let mut out = Vec::with_capacity(body.len() + frame::LEN_PREFIX);
    frame::encode(body, &mut out)?;
    w.write_all(&out).await?;
    Ok(())
}

/// Runs the XX handshake as initiator. `accept` sees the responder's verified
/// identity before we reveal ours, and may refuse it.
pub async fn initiate<R, W>(
    reader: &mut FramedReader<R>,
    writer: &mut W,
    local: &LocalParty,
    kind: ChannelKind,
    hello: &Hello,
    accept: impl FnOnce(&Peer) -> Result<(), ChannelError>,
) -> Result<(Peer, Transport), LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (init, msg1) = Initiator::start(local, kind)?;
    write_frame(writer, &msg1).await?;
    let msg2 = reader.next_frame(MAX_NOISE_MESSAGE).await?;
    let (verified, peer) = init.handle_response(msg2)?;
    accept(&peer)?;
    let (msg3, transport) = verified.finish(local, hello)?;
    write_frame(writer, &msg3).await?;
    Ok((peer, transport))
}

/// Runs the XX handshake as responder.
pub async fn respond<R, W>(
    reader: &mut FramedReader<R>,
    writer: &mut W,
    local: &LocalParty,
    kind: ChannelKind,
    hello: &Hello,
) -> Result<(Peer, Transport), LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let responder = Responder::new(local, kind)?;
    let msg1 = reader.next_frame(MAX_NOISE_MESSAGE).await?;
    let (sent, msg2) = responder.handle_hello(msg1, local, hello)?;
    write_frame(writer, &msg2).await?;
    let msg3 = reader.next_frame(MAX_NOISE_MESSAGE).await?;
    Ok(sent.handle_finish(msg3)?)
}

/// Authenticates a fresh data connection with the relay (IK handshake).
/// Returns the established channel, or the relay's reason for refusing it.
pub async fn attach_handshake<R, W>(
    reader: &mut FramedReader<R>,
    writer: &mut W,
    local: &LocalParty,
    relay_static: &[u8; 32],
    spare: bool,
) -> Result<Result<Transport, crate::wire::Refusal>, LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (init, msg1) = AttachInitiator::start(local, relay_static, spare)?;
    write_frame(writer, &msg1).await?;
    let msg2 = reader.next_frame(MAX_NOISE_MESSAGE).await?;
    Ok(init.handle_reply(msg2)?)
}

/// Joins an authenticated data connection to the tunnel of `request.token`:
/// one frame each way over the attach channel. After an accepted reply the
/// connection carries the end-to-end channel, spliced by the relay.
pub async fn attach_request<R, W>(
    reader: &mut FramedReader<R>,
    writer: &mut W,
    transport: Transport,
    request: &Attach,
) -> Result<AttachReply, LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut sealer, mut opener) = transport.split();
    let mut out = Vec::new();
    sealer.seal(&wire::encode(request)?, &mut out)?;
    writer.write_all(&out).await?;
    let body = reader.next_frame(MAX_CONTROL_FRAME).await?;
    let mut plain = vec![0u8; body.len()];
    let n = opener.open(body, &mut plain)?;
    Ok(wire::decode(&plain[..n])?)
}

/// Writes a raw handshake message as one frame (for responders driving the
/// sans-IO state machines themselves).
pub async fn send_raw<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &[u8],
) -> Result<(), LinkError> {
    write_frame(writer, message).await
}

/// Receives control messages on an established hop channel.
#[derive(Debug)]
pub struct ControlReceiver<R> {
    reader: FramedReader<R>,
    opener: Opener,
    plain: Vec<u8>,
}

impl<R: AsyncRead + Unpin> ControlReceiver<R> {
    /// Wraps the reading half of an established channel.
    pub fn new(reader: FramedReader<R>, opener: Opener) -> Self {
        ControlReceiver {
            reader,
            opener,
            plain: vec![0u8; MAX_CONTROL_FRAME],
        }
    }

    /// The next message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Control, LinkError> {
        let body = self.reader.next_frame(MAX_CONTROL_FRAME).await?;
        let n = self.opener.open(body, &mut self.plain)?;
        Ok(wire::decode(&self.plain[..n])?)
    }
}

/// Sends control messages on an established hop channel.
#[derive(Debug)]
pub struct ControlSender<W> {
    writer: W,
    sealer: Sealer,
    out: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> ControlSender<W> {
    /// Wraps the writing half of an established channel.
    pub fn new(writer: W, sealer: Sealer) -> Self {
        ControlSender {
            writer,
            sealer,
            out: Vec::new(),
        }
    }

    /// Encrypts and sends one message.
    pub async fn send(&mut self, msg: &Control) -> Result<(), LinkError> {
        let plain = wire::encode(msg)?;
        if plain.len() > MAX_CONTROL_FRAME - frame::TAG_LEN {
            return Err(ChannelError::TooLarge(plain.len()).into());
        }
        self.out.clear();
        self.sealer.seal(&plain, &mut self.out)?;
        self.writer.write_all(&self.out).await?;
        Ok(())
    }

    /// Closes the writing direction.
    pub async fn shutdown(&mut self) -> Result<(), LinkError> {
        self.writer.shutdown().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode(body, &mut out).expect("a valid frame");
        out
    }

    #[tokio::test]
    async fn the_buffer_grows_only_as_frames_and_reads_need() {
        let (mut tx, rx) = tokio::io::duplex(256 * 1024);
        let mut reader = FramedReader::new(rx, DATA_READ_BUFFER);
        assert_eq!(reader.allocated(), INITIAL_READ_BUFFER);

        // Small frames: the buffer stays small.
        for i in 0..100u8 {
            tx.write_all(&framed(&[i; 100])).await.unwrap();
            assert_eq!(
                reader.next_frame(MAX_NOISE_MESSAGE).await.unwrap(),
                &[i; 100]
            );
        }
        assert_eq!(reader.allocated(), INITIAL_READ_BUFFER);

        // A maximal frame, written in pieces: it grows to hold it whole.
        let big: Vec<u8> = (0..MAX_NOISE_MESSAGE).map(|i| (i % 253) as u8).collect();
        let bytes = framed(&big);
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(1000) {
                tx.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            tx.write_all(&framed(b"after")).await.unwrap();
            tx
        });
        assert_eq!(
            reader.next_frame(MAX_NOISE_MESSAGE).await.unwrap(),
            &big[..]
        );
        assert_eq!(
            reader.next_frame(MAX_NOISE_MESSAGE).await.unwrap(),
            b"after"
        );
        assert!(reader.allocated() >= frame::LEN_PREFIX + MAX_NOISE_MESSAGE);
        assert!(reader.allocated() <= DATA_READ_BUFFER);
        drop(writer.await.unwrap());
        assert!(matches!(
            reader.next_frame(MAX_NOISE_MESSAGE).await,
            Err(LinkError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_frame_longer_than_allowed_is_refused_before_growing() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut reader = FramedReader::new(rx, DATA_READ_BUFFER);
        tx.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
        assert!(reader.next_frame(1024).await.is_err());
        assert_eq!(reader.allocated(), INITIAL_READ_BUFFER);
    }
}
