//! Length-prefixed framing of Noise messages on a byte stream.
//!
//! Every Noise message (handshake or transport) travels as a 2-byte
//! big-endian length followed by that many bytes, as the Noise specification
//! suggests for stream transports. The decoder separates "need more bytes"
//! (`Ok(None)`) from "invalid" (`Err`), and bounds the length before anyone
//! allocates for it.

use crate::ChannelError;

/// Size of the length prefix.
pub const LEN_PREFIX: usize = 2;
/// Largest Noise message (and so largest frame body), from the Noise spec.
pub const MAX_NOISE_MESSAGE: usize = 65_535;
/// Authentication tag added by the AEAD to every encrypted payload.
pub const TAG_LEN: usize = 16;
/// Largest plaintext one transport frame can carry.
pub const MAX_PLAINTEXT: usize = MAX_NOISE_MESSAGE - TAG_LEN;

/// Looks for one complete frame at the start of `buf`.
///
/// Returns `Ok(Some((body, consumed)))` when a whole frame is present,
/// `Ok(None)` when more bytes are needed, and `Err` when the length prefix is
/// invalid: zero, or larger than `max_body` (the caller's bound, at most
/// [`MAX_NOISE_MESSAGE`]).
pub fn decode(buf: &[u8], max_body: usize) -> Result<Option<(&[u8], usize)>, ChannelError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
    if len == 0 {
        return Err(ChannelError::BadFrame("zero-length frame".into()));
    }
    if len > max_body.min(MAX_NOISE_MESSAGE) {
        return Err(ChannelError::BadFrame(format!(
            "frame of {len} bytes exceeds the limit of {} bytes",
            max_body.min(MAX_NOISE_MESSAGE)
        )));
    }
    match buf.get(LEN_PREFIX..LEN_PREFIX + len) {
        Some(body) => Ok(Some((body, LEN_PREFIX + len))),
        None => Ok(None),
    }
}

/// Appends the length prefix for a body of `len` bytes.
pub fn encode_prefix(len: usize, out: &mut Vec<u8>) -> Result<(), ChannelError> {
    let len16 = u16::try_from(len).map_err(|_| ChannelError::TooLarge(len))?;
    if len16 == 0 {
        return Err(ChannelError::Internal("empty frame".into()));
    }
    out.extend_from_slice(&len16.to_be_bytes());
    Ok(())
}

/// Appends `body` as one frame.
pub fn encode(body: &[u8], out: &mut Vec<u8>) -> Result<(), ChannelError> {
    encode_prefix(body.len(), out)?;
    out.extend_from_slice(body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_more_versus_invalid() {
        assert_eq!(decode(&[], 100), Ok(None));
        assert_eq!(decode(&[0], 100), Ok(None));
        assert_eq!(decode(&[0, 3, 1, 2], 100), Ok(None));
        assert_eq!(
            decode(&[0, 3, 1, 2, 3, 9], 100),
            Ok(Some((&[1u8, 2, 3][..], 5)))
        );
        assert!(decode(&[0, 0], 100).is_err());
        assert!(decode(&[0, 101], 100).is_err());
        assert!(decode(&[0xff, 0xff], usize::MAX).is_ok());
    }

    #[test]
    fn encode_round_trip_and_bounds() {
        let mut out = Vec::new();
        encode(b"hello", &mut out).unwrap();
        assert_eq!(decode(&out, 10).unwrap(), Some((&b"hello"[..], 7)));
        assert!(encode(&vec![0u8; 65_536], &mut out).is_err());
        assert!(encode(&[], &mut out).is_err());
    }
}
