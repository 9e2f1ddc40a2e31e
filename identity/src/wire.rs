//! The typed messages Postern parties exchange inside their Noise channels.
//!
//! - [`Control`]: messages on a node's hop channel to the relay.
//! - [`Hello`]: what each side of a handshake says about itself (inside the
//!   encrypted handshake payload, next to its identity proof).
//! - [`AttachHello`]/[`Attach`]/[`AttachReply`]: a data connection's `IK`
//!   handshake with the relay, and the frame naming the tunnel it joins.
//! - [`DataFrame`]: the plaintext of each end-to-end transport frame.
//!
//! All structured messages are CBOR (`cbor4ii` + serde). Decoders are plain
//! functions over bytes, bounded by the frame size, and never panic.

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::ChannelError;

/// Version of the messages in this module. A peer speaking another version is
/// refused with a clear reason.
pub const PROTOCOL_VERSION: u16 = 1;

/// Length of the preamble that opens every connection to a relay.
pub const PREAMBLE_LEN: usize = 6;
/// Preamble of a hop channel (followed by a Noise XX handshake).
pub const PREAMBLE_HOP: [u8; PREAMBLE_LEN] = *b"PSTN\x01H";
/// Preamble of a data connection (followed by a Noise IK attach handshake).
pub const PREAMBLE_ATTACH: [u8; PREAMBLE_LEN] = *b"PSTN\x01A";

/// Encodes a message as CBOR.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ChannelError> {
    cbor4ii::serde::to_vec(Vec::new(), value)
        .map_err(|e| ChannelError::Internal(format!("CBOR encoding failed: {e}")))
}

/// Decodes a CBOR message, mapping every failure to [`ChannelError::BadMessage`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ChannelError> {
    cbor4ii::serde::from_slice(bytes).map_err(|e| ChannelError::BadMessage(e.to_string()))
}

/// A validated service name: 1 to 63 characters from `[A-Za-z0-9._-]`,
/// starting with a letter or digit.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ServiceName(String);

/// Why a service name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid service name: use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit")]
pub struct BadServiceName(pub String);

impl ServiceName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name authority `authority` registers under unless configured
    /// otherwise: `authority-P…`. It contains the identifier, so relays keep
    /// it for that identity alone (no one else can squat it while the
    /// authority reconnects), and several authorities never collide.
    pub fn of_authority(authority: &crate::Identifier) -> ServiceName {
        ServiceName(format!("authority-{authority}"))
    }
}

impl FromStr for ServiceName {
    type Err = BadServiceName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=63).contains(&s.len())
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(ServiceName(s.to_owned()))
        } else {
            Err(BadServiceName(s.chars().take(80).collect()))
        }
    }
}

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A single-use tunnel token minted by the relay: a public lookup id and a
/// secret compared in constant time. Its `Debug` is redacted and it is
/// zeroized on drop.
#[derive(Clone, Serialize, Deserialize)]
pub struct TunnelToken {
    /// Lookup key at the relay (not secret).
    #[serde(with = "serde_bytes")]
    pub id: [u8; 16],
    /// Proof of possession (secret).
    #[serde(with = "serde_bytes")]
    pub secret: [u8; 32],
}

impl TunnelToken {
    /// A fresh random token.
    pub fn random() -> Self {
        use rand::RngCore;
        let mut token = TunnelToken {
            id: [0; 16],
            secret: [0; 32],
        };
        rand::rngs::OsRng.fill_bytes(&mut token.id);
        rand::rngs::OsRng.fill_bytes(&mut token.secret);
        token
    }

    /// Whether `other` carries the same secret (constant time).
    pub fn secret_matches(&self, other: &TunnelToken) -> bool {
        self.secret.ct_eq(&other.secret).into()
    }

    /// A short, non-secret label for logs.
    pub fn label(&self) -> String {
        hex::encode(&self.id[..6])
    }
}

impl Drop for TunnelToken {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl fmt::Debug for TunnelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TunnelToken({}, <redacted>)", self.label())
    }
}

/// Messages on a node's hop channel to its relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Control {
    /// Outlet → relay: serve this service name from me.
    Register {
        /// The name.
        service: ServiceName,
    },
    /// Relay → outlet: the name is yours.
    Registered {
        /// The name.
        service: ServiceName,
    },
    /// Relay → outlet: the name is not yours (or no longer: a policy reload
    /// withdrew it), and why.
    RegisterRefused {
        /// The name.
        service: ServiceName,
        /// What kind of refusal: whether registering again may succeed.
        code: RefusalCode,
        /// Human-readable reason.
        reason: String,
    },
    /// Inlet → relay: I want a tunnel to this service.
    Open {
        /// Correlates the answer.
        request: u64,
        /// The service.
        service: ServiceName,
    },
    /// Relay → inlet: attach a data connection with this token.
    Opened {
        /// The request answered.
        request: u64,
        /// Single-use token.
        token: TunnelToken,
    },
    /// Relay → inlet: no tunnel, and why.
    OpenRefused {
        /// The request answered.
        request: u64,
        /// What kind of refusal: whether asking again may succeed.
        code: RefusalCode,
        /// Human-readable reason.
        reason: String,
    },
    /// Relay → outlet: an inlet wants this service; attach with this token.
    Incoming {
        /// The service.
        service: ServiceName,
        /// Single-use token.
        token: TunnelToken,
        /// The address the relay saw the inlet's hop connection come from
        /// (relay-asserted: policies may read it as `context.source_ip`).
        #[serde(default)]
        source: Option<std::net::IpAddr>,
    },
    /// Either direction: liveness probe.
    Ping {
        /// Echoed in the answer.
        seq: u64,
    },
    /// Either direction: answer to [`Control::Ping`].
    Pong {
        /// The probe answered.
        seq: u64,
    },
    /// Relay → node: the relay ends this hop channel, and why (a revoked
    /// identity, a refused credential, a limit, an idle channel, shutdown).
    /// The relay closes the connection right after sending it.
    Goodbye {
        /// What kind of ending: whether reconnecting may succeed.
        code: RefusalCode,
        /// Human-readable reason.
        reason: String,
    },
    /// Relay → authority: send the revocations numbered above `after`, then
    /// every new one, on this hop channel. Sent only to a hop session that
    /// proved the identity of an authority the relay trusts.
    FollowRevocations {
        /// The newest sequence number the relay already holds from this
        /// authority.
        after: u64,
    },
    /// Authority → relay: revocations (oldest first) in answer to
    /// [`Control::FollowRevocations`]; an empty list says "nothing new, and
    /// the feed is alive" (sent periodically, so the relay can bound how
    /// stale its view of this authority's revocations is).
    Revocations {
        /// The entries, at most [`MAX_REVOCATIONS_PER_MESSAGE`].
        entries: Vec<crate::credential::RevocationEntry>,
    },
}

/// Most revocation entries in one [`Control::Revocations`] message (keeps it
/// well inside the 16 KiB control frame).
pub const MAX_REVOCATIONS_PER_MESSAGE: usize = 128;

/// What kind of refusal a relay or a peer sent, beside its human-readable
/// text, so that a node retries only what may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RefusalCode {
    /// Not allowed: a policy, a revocation, a refused credential, a name
    /// reserved for another identity. Asking again will not help until an
    /// admin changes something.
    Denied,
    /// The named service is not registered here (its outlet may not be
    /// connected yet).
    UnknownService,
    /// A limit was reached (connections, tunnels, pending opens, names, a
    /// rate). Retry later, after a back-off.
    Limit,
    /// Temporarily impossible (a peer not answering, revocations too stale
    /// to decide, shutting down). Retry later.
    RetryLater,
    /// The request itself is malformed or unsupported: a bug or a version
    /// mismatch; retrying the same request will not help.
    Invalid,
}

impl RefusalCode {
    /// Whether the same request may succeed later without an admin's help.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            RefusalCode::UnknownService | RefusalCode::Limit | RefusalCode::RetryLater
        )
    }
}

/// A refusal as a node receives it: its kind and its human-readable text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What kind of refusal.
    pub code: RefusalCode,
    /// What the node's user is told.
    pub reason: String,
}

impl Refusal {
    /// A refusal of kind `code` saying `reason`.
    pub fn new(code: RefusalCode, reason: impl Into<String>) -> Self {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefusalCode::Denied => "denied",
            RefusalCode::UnknownService => "unknown service",
            RefusalCode::Limit => "limit reached",
            RefusalCode::RetryLater => "retry later",
            RefusalCode::Invalid => "invalid request",
        })
    }
}

/// What a party says about itself inside its encrypted handshake payload,
/// beside the identity proof.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// End-to-end channels: the service this tunnel is for (the inlet's
    /// request; the outlet's claim). `None` on hop channels.
    #[serde(default)]
    pub service: Option<ServiceName>,
    /// The party's credential from an authority, if it has one. The receiver
    /// verifies it against the authorities it trusts and the identity this
    /// handshake authenticated; an invalid one ends the handshake.
    #[serde(default)]
    pub credential: Option<crate::credential::SignedCredential>,
}

/// Which end of a tunnel is attaching a data connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    /// The end with the client.
    Inlet,
    /// The end with the target.
    Outlet,
}

/// Payload of the `IK` handshake's first message on a data connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachHello {
    /// Protocol version.
    pub version: u16,
    /// Dialled ahead of need (may wait long for its tunnel; the relay limits
    /// how many each node keeps) rather than for a tunnel at hand (must
    /// join within the handshake timeout).
    pub spare: bool,
}

/// First transport frame on a data connection: which tunnel it joins. Sent
/// when the token arrives, possibly long after the connection was dialled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attach {
    /// Message version.
    pub version: u16,
    /// Which end is attaching.
    pub side: Side,
    /// The token the relay handed out on the hop channel.
    pub token: TunnelToken,
}

/// Payload of the `IK` handshake's second message (is the data connection
/// accepted?) and the relay's answer to an [`Attach`] frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttachReply {
    /// Attached: the stream is now spliced to the other end (or will be when
    /// it arrives).
    Accepted,
    /// Not attached, and why.
    Refused {
        /// What kind of refusal: whether dialling again may succeed.
        code: RefusalCode,
        /// Human-readable reason.
        reason: String,
    },
}

/// Why an end-to-end channel is being closed, sent to the other end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CloseReason {
    /// The outlet's access check refused the inlet.
    Denied {
        /// What the inlet's user is told.
        reason: String,
    },
    /// The peer is not serving or requesting the expected service.
    ServiceMismatch {
        /// Details.
        reason: String,
    },
    /// The outlet could not reach its target.
    TargetUnavailable {
        /// Details (address and OS error; no secrets).
        reason: String,
    },
    /// The local end of the tunnel was reset or failed.
    Aborted {
        /// Details.
        reason: String,
    },
    /// The node is shutting down.
    Shutdown,
    /// The outlet cannot serve right now (for example, it cannot vouch for
    /// current revocations of an authority it trusts); try again later.
    Unavailable {
        /// Why, naming what is missing.
        reason: String,
    },
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Denied { reason } => write!(f, "access denied: {reason}"),
            CloseReason::ServiceMismatch { reason } => write!(f, "service mismatch: {reason}"),
            CloseReason::TargetUnavailable { reason } => write!(f, "target unavailable: {reason}"),
            CloseReason::Aborted { reason } => write!(f, "aborted by peer: {reason}"),
            CloseReason::Shutdown => f.write_str("peer is shutting down"),
            CloseReason::Unavailable { reason } => write!(f, "temporarily unavailable: {reason}"),
        }
    }
}

/// Plaintext of one end-to-end transport frame. The first byte is the kind;
/// data follows without further encoding so that payload is never copied
/// into an intermediate structure.
#[derive(Debug, PartialEq, Eq)]
pub enum DataFrame<'a> {
    /// Bytes of the tunnelled stream.
    Data(&'a [u8]),
    /// The sender will send no more data (TCP half-close).
    Eof,
    /// Outlet → inlet: access granted and target connected.
    Ready,
    /// The sender is closing the tunnel, and why.
    Close(CloseReason),
    /// The sender renewed its credential: the receiver verifies it against
    /// the identity the handshake proved and uses it from now on, so the
    /// tunnel outlives the credential it was opened with.
    Credential(crate::credential::SignedCredential),
}

/// Kind byte of [`DataFrame::Data`].
pub const FRAME_DATA: u8 = 0;
const FRAME_EOF: u8 = 1;
const FRAME_READY: u8 = 2;
const FRAME_CLOSE: u8 = 3;
const FRAME_CREDENTIAL: u8 = 4;

impl DataFrame<'_> {
    /// Encodes the frame's plaintext into `out` (cleared first).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ChannelError> {
        out.clear();
        match self {
            DataFrame::Data(bytes) => {
                out.push(FRAME_DATA);
                out.extend_from_slice(bytes);
            }
            DataFrame::Eof => out.push(FRAME_EOF),
            DataFrame::Ready => out.push(FRAME_READY),
            DataFrame::Close(reason) => {
                out.push(FRAME_CLOSE);
                out.extend_from_slice(&encode(reason)?);
            }
            DataFrame::Credential(credential) => {
                out.push(FRAME_CREDENTIAL);
                let bytes = credential
                    .encode()
                    .map_err(|e| ChannelError::BadMessage(format!("credential: {e}")))?;
                out.extend_from_slice(&bytes);
            }
        }
        Ok(())
    }

    /// Decodes a frame's plaintext.
    pub fn decode(plain: &[u8]) -> Result<DataFrame<'_>, ChannelError> {
        match plain.split_first() {
            Some((&FRAME_DATA, rest)) => Ok(DataFrame::Data(rest)),
            Some((&FRAME_EOF, [])) => Ok(DataFrame::Eof),
            Some((&FRAME_READY, [])) => Ok(DataFrame::Ready),
            Some((&FRAME_CLOSE, rest)) => Ok(DataFrame::Close(decode(rest)?)),
            Some((&FRAME_CREDENTIAL, rest)) => crate::credential::SignedCredential::decode(rest)
                .map(DataFrame::Credential)
                .map_err(|e| ChannelError::BadMessage(format!("credential frame: {e}"))),
            Some((kind, _)) => Err(ChannelError::BadMessage(format!(
                "unknown frame kind {kind} or unexpected body"
            ))),
            None => Err(ChannelError::BadMessage("empty frame".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_names_are_valid_and_distinct() {
        let (a, b) = (
            crate::Identity::generate().identifier(),
            crate::Identity::generate().identifier(),
        );
        let name = ServiceName::of_authority(&a);
        assert_eq!(name.as_str().parse::<ServiceName>().unwrap(), name);
        assert!(name.as_str().contains(&a.to_string()));
        assert_ne!(name, ServiceName::of_authority(&b));
    }

    #[test]
    fn service_names() {
        for good in ["db-prod", "a", "x.y_z-1", &"a".repeat(63)] {
            assert!(good.parse::<ServiceName>().is_ok(), "{good}");
        }
        for bad in ["", "-a", ".a", "a b", "ä", &"a".repeat(64), "a/b"] {
            assert!(bad.parse::<ServiceName>().is_err(), "{bad}");
        }
        // Deserialisation validates too.
        let raw = encode(&"a b").unwrap();
        assert!(decode::<ServiceName>(&raw).is_err());
    }

    #[test]
    fn control_round_trip() {
        let msgs = vec![
            Control::Register {
                service: "db".parse().unwrap(),
            },
            Control::Open {
                request: 7,
                service: "db".parse().unwrap(),
            },
            Control::Opened {
                request: 7,
                token: TunnelToken::random(),
            },
            Control::Ping { seq: u64::MAX },
        ];
        for msg in msgs {
            let bytes = encode(&msg).unwrap();
            let back: Control = decode(&bytes).unwrap();
            assert_eq!(format!("{msg:?}"), format!("{back:?}"));
        }
    }

    #[test]
    fn token_debug_is_redacted_and_compare_works() {
        let t = TunnelToken::random();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(&hex::encode(t.secret)));
        let mut u = t.clone();
        assert!(t.secret_matches(&u));
        u.secret[0] ^= 1;
        assert!(!t.secret_matches(&u));
    }

    #[test]
    fn data_frames_round_trip_and_reject_garbage() {
        let mut buf = Vec::new();
        let frames = [
            DataFrame::Data(b"abc"),
            DataFrame::Data(b""),
            DataFrame::Eof,
            DataFrame::Ready,
            DataFrame::Close(CloseReason::Denied {
                reason: "no".into(),
            }),
        ];
        for f in frames {
            f.encode_into(&mut buf).unwrap();
            assert_eq!(DataFrame::decode(&buf).unwrap(), f);
        }
        assert!(DataFrame::decode(&[]).is_err());
        assert!(DataFrame::decode(&[9]).is_err());
        assert!(DataFrame::decode(&[FRAME_EOF, 0]).is_err());
        assert!(DataFrame::decode(&[FRAME_CLOSE, 0xff, 0xff]).is_err());
    }

    #[test]
    fn hostile_cbor_is_an_error_not_a_panic() {
        let inputs: [&[u8]; 5] = [
            &[],
            &[0xff],
            &[0x9f; 4096],
            &[0xbf, 0x61],
            &[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ];
        for input in inputs {
            assert!(decode::<Control>(input).is_err());
            assert!(decode::<Attach>(input).is_err());
        }
    }
}
