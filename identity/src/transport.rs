//! An established Noise channel: frames sealed and opened with explicit,
//! strictly sequential nonces.
//!
//! The two directions are independent ([`Transport::split`]), so one task can
//! encrypt while another decrypts without a lock. Each direction counts its own
//! nonce; because the stream below is ordered, any dropped, replayed or
//! reordered frame makes authentication fail, and the channel is closed.

use std::fmt;
use std::sync::Arc;

use snow::{HandshakeState, StatelessTransportState};

use crate::frame::{self, MAX_PLAINTEXT, TAG_LEN};
use crate::ChannelError;

/// An established channel, both directions.
pub struct Transport {
    state: Arc<StatelessTransportState>,
}

impl Transport {
    pub(crate) fn from_handshake(hs: HandshakeState) -> Result<Self, ChannelError> {
        let state = hs
            .into_stateless_transport_mode()
            .map_err(|e| ChannelError::Internal(format!("handshake not finished: {e}")))?;
        Ok(Transport {
            state: Arc::new(state),
        })
    }

    /// Splits into the sending and receiving halves.
    pub fn split(self) -> (Sealer, Opener) {
        (
            Sealer {
                state: Arc::clone(&self.state),
                nonce: 0,
            },
            Opener {
                state: self.state,
                nonce: 0,
            },
        )
    }
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Transport(<keys redacted>)")
    }
}

/// The sending half of a channel.
pub struct Sealer {
    state: Arc<StatelessTransportState>,
    nonce: u64,
}

impl Sealer {
    /// Encrypts `plaintext` (at most [`MAX_PLAINTEXT`] bytes) and appends it
    /// to `out` as one length-prefixed frame.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), ChannelError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(ChannelError::TooLarge(plaintext.len()));
        }
        if self.nonce == u64::MAX {
            return Err(ChannelError::Internal(
                "nonce space exhausted; reconnect".into(),
            ));
        }
        let start = out.len();
        let body_len = plaintext.len() + TAG_LEN;
        frame::encode_prefix(body_len, out)?;
        out.resize(start + frame::LEN_PREFIX + body_len, 0);
        let n = self
            .state
            .write_message(self.nonce, plaintext, &mut out[start + frame::LEN_PREFIX..])
            .map_err(|e| ChannelError::Internal(format!("encryption failed: {e}")))?;
        if n != body_len {
            return Err(ChannelError::Internal(
                "unexpected ciphertext length".into(),
            ));
        }
        self.nonce += 1;
        Ok(())
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealer(nonce {})", self.nonce)
    }
}

/// The receiving half of a channel.
pub struct Opener {
    state: Arc<StatelessTransportState>,
    nonce: u64,
}

impl Opener {
    /// Authenticates and decrypts one frame body (without its length prefix)
    /// into `out`, returning the plaintext length. Any failure is final for
    /// the channel.
    pub fn open(&mut self, body: &[u8], out: &mut [u8]) -> Result<usize, ChannelError> {
        if body.len() < TAG_LEN {
            return Err(ChannelError::Decrypt);
        }
        if out.len() < body.len() - TAG_LEN {
            return Err(ChannelError::Internal("output buffer too small".into()));
        }
        let n = self
            .state
            .read_message(self.nonce, body, out)
            .map_err(|_| ChannelError::Decrypt)?;
        self.nonce += 1;
        Ok(n)
    }

    #[cfg(test)]
    pub(crate) fn clone_for_test(&self) -> Opener {
        Opener {
            state: Arc::clone(&self.state),
            nonce: self.nonce,
        }
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Opener(nonce {})", self.nonce)
    }
}
