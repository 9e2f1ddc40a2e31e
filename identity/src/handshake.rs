//! Sans-IO Noise handshakes that bind each side's Noise static key to its
//! Postern identity.
//!
//! Two patterns are used, both standard Noise as `snow` implements them:
//!
//! - [`XX_PROTOCOL`] for every authenticated channel (node ↔ relay hop
//!   channels and inlet ↔ outlet end-to-end channels). Messages 2 and 3 carry
//!   an encrypted [`ProofPayload`]: the sender's Ed25519 public key, its
//!   signature over the sender's Noise static public key (label
//!   [`STATIC_KEY_LABEL`]) and a [`Hello`]. The receiver checks the signature
//!   against the static key that Noise itself authenticated, so a proof cannot
//!   be replayed by a party that does not hold the matching Noise key.
//! - [`IK_PROTOCOL`] for attaching a fresh data connection to a tunnel at the
//!   relay: the node already knows the relay's static key from its hop
//!   channel, so one round trip carries the encrypted, single-use token.
//!
//! Each state transition consumes `self`, so a failed or finished handshake
//! cannot be driven again. Messages in and out are raw Noise messages; the
//! caller frames them with [`crate::frame`].

use std::fmt;

use serde::{Deserialize, Serialize};
use snow::{Builder, HandshakeState};
use zeroize::Zeroizing;

use crate::transport::Transport;
#[cfg(doc)]
use crate::wire::Attach;
use crate::wire::{self, AttachHello, AttachReply, Hello, Refusal, RefusalCode, PROTOCOL_VERSION};
use crate::{ChannelError, Identity, PublicIdentity};

/// Noise protocol of every identity-bound channel.
pub const XX_PROTOCOL: &str = "Noise_XX_25519_AESGCM_SHA256";
/// Noise protocol of the data-connection attach handshake.
pub const IK_PROTOCOL: &str = "Noise_IK_25519_AESGCM_SHA256";
/// Domain-separation label of the identity's signature over its Noise static key.
pub const STATIC_KEY_LABEL: &[u8] = b"postern noise static key v1";
/// Largest decrypted handshake payload accepted.
pub const MAX_HANDSHAKE_PAYLOAD: usize = 16 * 1024;
const MAX_MESSAGE: usize = crate::frame::MAX_NOISE_MESSAGE;

/// Which kind of channel a handshake sets up. It is mixed into the Noise
/// prologue, so a handshake meant for one kind cannot complete as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// A node's channel to its relay.
    Hop,
    /// An inlet's channel to an outlet, carried through the relay.
    EndToEnd,
    /// A node attaching a data connection at the relay (IK).
    Attach,
    /// An admin command talking to its running authority over the local
    /// admin endpoint (both ends prove the authority's own identity).
    AuthorityAdmin,
}

impl ChannelKind {
    fn prologue(self) -> &'static [u8] {
        match self {
            ChannelKind::Hop => b"postern/1 hop",
            ChannelKind::EndToEnd => b"postern/1 end-to-end",
            ChannelKind::Attach => b"postern/1 attach",
            ChannelKind::AuthorityAdmin => b"postern/1 authority admin",
        }
    }
}

fn params(protocol: &str) -> Result<snow::params::NoiseParams, ChannelError> {
    protocol
        .parse()
        .map_err(|e| ChannelError::Internal(format!("bad Noise protocol name {protocol}: {e}")))
}

fn snow_err(e: snow::Error) -> ChannelError {
    ChannelError::BadHandshake(e.to_string())
}

/// The local side of every handshake: an identity, a Noise static key pair
/// generated for this process, and the identity's signature over the static
/// public key (computed once).
pub struct LocalParty {
    identity: Identity,
    private: Zeroizing<Vec<u8>>,
    public: [u8; 32],
    signature: [u8; 64],
}

impl LocalParty {
    /// Generates a Noise static key for `identity` and signs it.
    pub fn new(identity: Identity) -> Result<Self, ChannelError> {
        let keypair = Builder::new(params(XX_PROTOCOL)?)
            .generate_keypair()
            .map_err(|e| ChannelError::Internal(format!("Noise key generation failed: {e}")))?;
        let public: [u8; 32] = keypair
            .public
            .as_slice()
            .try_into()
            .map_err(|_| ChannelError::Internal("X25519 public key is not 32 bytes".into()))?;
        let signature = identity.sign(STATIC_KEY_LABEL, &public);
        Ok(LocalParty {
            identity,
            private: Zeroizing::new(keypair.private),
            public,
            signature,
        })
    }

    /// The identity this party proves.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The Noise static public key.
    pub fn static_public(&self) -> &[u8; 32] {
        &self.public
    }

    fn proof(&self, hello: &Hello) -> Result<Vec<u8>, ChannelError> {
        wire::encode(&ProofPayload {
            version: PROTOCOL_VERSION,
            identity_key: *self.identity.public().as_bytes(),
            signature: self.signature,
            hello: hello.clone(),
        })
    }

    fn builder(&self, protocol: &str, kind: ChannelKind) -> Result<Builder<'_>, ChannelError> {
        Builder::new(params(protocol)?)
            .local_private_key(&self.private)
            .and_then(|b| b.prologue(kind.prologue()))
            .map_err(|e| ChannelError::Internal(format!("Noise builder: {e}")))
    }
}

impl fmt::Debug for LocalParty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalParty")
            .field("identity", &self.identity.identifier())
            .field("static_public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

/// The encrypted payload of XX messages 2 and 3.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProofPayload {
    /// Protocol version of the sender.
    pub version: u16,
    /// The sender's Ed25519 public key.
    #[serde(with = "serde_bytes")]
    pub identity_key: [u8; 32],
    /// Signature over the sender's Noise static public key.
    #[serde(with = "serde_bytes")]
    pub signature: [u8; 64],
    /// What the sender says about itself.
    pub hello: Hello,
}

/// A peer whose identity proof verified.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The proven identity.
    pub identity: PublicIdentity,
    /// What the peer said about itself.
    pub hello: Hello,
    /// The peer's Noise static key, as Noise authenticated it.
    pub static_key: [u8; 32],
}

fn remote_static(hs: &HandshakeState) -> Result<[u8; 32], ChannelError> {
    hs.get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| {
            ChannelError::Internal("remote static key missing after it was received".into())
        })
}

/// Decodes and checks a proof payload against the static key Noise authenticated.
pub fn verify_proof(payload: &[u8], remote_static: &[u8; 32]) -> Result<Peer, ChannelError> {
    let proof: ProofPayload = wire::decode(payload)
        .map_err(|e| ChannelError::BadIdentityProof(format!("unreadable proof: {e}")))?;
    if proof.version != PROTOCOL_VERSION {
        return Err(ChannelError::BadIdentityProof(format!(
            "peer speaks protocol version {}, this node speaks {PROTOCOL_VERSION}; upgrade the older side",
            proof.version
        )));
    }
    let identity = PublicIdentity::from_bytes(&proof.identity_key).ok_or_else(|| {
        ChannelError::BadIdentityProof("identity key is not a valid Ed25519 key".into())
    })?;
    if !identity.verify(STATIC_KEY_LABEL, remote_static, &proof.signature) {
        return Err(ChannelError::BadIdentityProof(format!(
            "signature of {} does not cover the Noise static key the peer used",
            identity.identifier()
        )));
    }
    Ok(Peer {
        identity,
        hello: proof.hello,
        static_key: *remote_static,
    })
}

fn write(hs: &mut HandshakeState, payload: &[u8]) -> Result<Vec<u8>, ChannelError> {
    let mut out = vec![0u8; MAX_MESSAGE];
    let n = hs.write_message(payload, &mut out).map_err(snow_err)?;
    out.truncate(n);
    Ok(out)
}

fn read(hs: &mut HandshakeState, message: &[u8]) -> Result<Vec<u8>, ChannelError> {
    if message.len() > MAX_MESSAGE {
        return Err(ChannelError::BadFrame("handshake message too large".into()));
    }
    let mut out = vec![0u8; MAX_MESSAGE];
    let n = hs.read_message(message, &mut out).map_err(snow_err)?;
    if n > MAX_HANDSHAKE_PAYLOAD {
        return Err(ChannelError::BadHandshake(format!(
            "handshake payload of {n} bytes exceeds {MAX_HANDSHAKE_PAYLOAD}"
        )));
    }
    out.truncate(n);
    Ok(out)
}

/// XX initiator, before it has heard from the responder.
#[derive(Debug)]
pub struct Initiator {
    hs: HandshakeState,
}

impl Initiator {
    /// Starts a handshake; returns the state and message 1 (no payload).
    pub fn start(local: &LocalParty, kind: ChannelKind) -> Result<(Self, Vec<u8>), ChannelError> {
        let mut hs = local
            .builder(XX_PROTOCOL, kind)?
            .build_initiator()
            .map_err(|e| ChannelError::Internal(format!("Noise initiator: {e}")))?;
        let msg1 = write(&mut hs, &[])?;
        Ok((Initiator { hs }, msg1))
    }

    /// Reads message 2 and verifies the responder's identity proof. The caller
    /// decides whether this is the peer it wanted before calling
    /// [`InitiatorVerified::finish`], so an unexpected peer never learns who
    /// we are.
    pub fn handle_response(
        mut self,
        msg2: &[u8],
    ) -> Result<(InitiatorVerified, Peer), ChannelError> {
        let payload = read(&mut self.hs, msg2)?;
        let peer = verify_proof(&payload, &remote_static(&self.hs)?)?;
        Ok((InitiatorVerified { hs: self.hs }, peer))
    }
}

/// XX initiator that has verified the responder.
#[derive(Debug)]
pub struct InitiatorVerified {
    hs: HandshakeState,
}

impl InitiatorVerified {
    /// Writes message 3 with our proof and `hello`; the channel is established.
    pub fn finish(
        mut self,
        local: &LocalParty,
        hello: &Hello,
    ) -> Result<(Vec<u8>, Transport), ChannelError> {
        let msg3 = write(&mut self.hs, &local.proof(hello)?)?;
        Ok((msg3, Transport::from_handshake(self.hs)?))
    }
}

/// XX responder waiting for message 1.
#[derive(Debug)]
pub struct Responder {
    hs: HandshakeState,
}

impl Responder {
    /// Prepares to answer a handshake.
    pub fn new(local: &LocalParty, kind: ChannelKind) -> Result<Self, ChannelError> {
        let hs = local
            .builder(XX_PROTOCOL, kind)?
            .build_responder()
            .map_err(|e| ChannelError::Internal(format!("Noise responder: {e}")))?;
        Ok(Responder { hs })
    }

    /// Reads message 1 and writes message 2 carrying our proof and `hello`.
    pub fn handle_hello(
        mut self,
        msg1: &[u8],
        local: &LocalParty,
        hello: &Hello,
    ) -> Result<(ResponderSent, Vec<u8>), ChannelError> {
        let payload = read(&mut self.hs, msg1)?;
        if !payload.is_empty() {
            return Err(ChannelError::BadHandshake(
                "unexpected plaintext payload in message 1".into(),
            ));
        }
        let msg2 = write(&mut self.hs, &local.proof(hello)?)?;
        Ok((ResponderSent { hs: self.hs }, msg2))
    }
}

/// XX responder waiting for message 3.
#[derive(Debug)]
pub struct ResponderSent {
    hs: HandshakeState,
}

impl ResponderSent {
    /// Reads message 3, verifies the initiator's proof; the channel is established.
    pub fn handle_finish(mut self, msg3: &[u8]) -> Result<(Peer, Transport), ChannelError> {
        let payload = read(&mut self.hs, msg3)?;
        let peer = verify_proof(&payload, &remote_static(&self.hs)?)?;
        Ok((peer, Transport::from_handshake(self.hs)?))
    }
}

/// IK initiator opening a data connection at the relay.
///
/// The handshake authenticates both ends (the node knows the relay's static
/// key from its hop channel; the relay learns the node's). It carries no
/// tunnel yet: a node dials these connections ahead of need and keeps them
/// warm, then names the tunnel in one [`Attach`] frame sent over the
/// resulting [`Transport`] when a token arrives.
#[derive(Debug)]
pub struct AttachInitiator {
    hs: HandshakeState,
}

const ATTACH_PROLOGUE: ChannelKind = ChannelKind::Attach;

impl AttachInitiator {
    /// Writes message 1: our static key and the protocol version, to the
    /// relay whose static key the hop channel authenticated.
    pub fn start(
        local: &LocalParty,
        relay_static: &[u8; 32],
        spare: bool,
    ) -> Result<(Self, Vec<u8>), ChannelError> {
        let mut hs = local
            .builder(IK_PROTOCOL, ATTACH_PROLOGUE)?
            .remote_public_key(relay_static)
            .and_then(|b| b.build_initiator())
            .map_err(|e| ChannelError::Internal(format!("Noise IK initiator: {e}")))?;
        let hello = AttachHello {
            version: PROTOCOL_VERSION,
            spare,
        };
        let msg1 = write(&mut hs, &wire::encode(&hello)?)?;
        Ok((AttachInitiator { hs }, msg1))
    }

    /// Reads the relay's answer: the established channel, or the relay's
    /// reason for refusing it.
    pub fn handle_reply(mut self, msg2: &[u8]) -> Result<Result<Transport, Refusal>, ChannelError> {
        let payload = read(&mut self.hs, msg2)?;
        match wire::decode::<AttachReply>(&payload)? {
            AttachReply::Accepted => Ok(Ok(Transport::from_handshake(self.hs)?)),
            AttachReply::Refused { code, reason } => Ok(Err(Refusal { code, reason })),
        }
    }
}

/// IK responder (the relay) after reading message 1.
#[derive(Debug)]
pub struct AttachResponder {
    hs: HandshakeState,
}

impl AttachResponder {
    /// Reads message 1; returns the node's Noise static key, authenticated
    /// by the handshake, and its hello.
    pub fn handle_request(
        local: &LocalParty,
        msg1: &[u8],
    ) -> Result<(Self, [u8; 32], AttachHello), ChannelError> {
        let mut hs = local
            .builder(IK_PROTOCOL, ATTACH_PROLOGUE)?
            .build_responder()
            .map_err(|e| ChannelError::Internal(format!("Noise IK responder: {e}")))?;
        let payload = read(&mut hs, msg1)?;
        let node_static = remote_static(&hs)?;
        let hello: AttachHello = wire::decode(&payload)?;
        if hello.version != PROTOCOL_VERSION {
            return Err(ChannelError::BadMessage(format!(
                "data connection version {} is not {PROTOCOL_VERSION}",
                hello.version
            )));
        }
        Ok((AttachResponder { hs }, node_static, hello))
    }

    /// Accepts: writes message 2 and returns the established channel.
    pub fn accept(mut self) -> Result<(Vec<u8>, Transport), ChannelError> {
        let msg2 = write(&mut self.hs, &wire::encode(&AttachReply::Accepted)?)?;
        Ok((msg2, Transport::from_handshake(self.hs)?))
    }

    /// Refuses: writes message 2 carrying the kind of refusal and the reason.
    pub fn refuse(mut self, code: RefusalCode, reason: &str) -> Result<Vec<u8>, ChannelError> {
        write(
            &mut self.hs,
            &wire::encode(&AttachReply::Refused {
                code,
                reason: reason.to_owned(),
            })?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Attach, DataFrame, Side, TunnelToken};

    fn party() -> LocalParty {
        LocalParty::new(Identity::generate()).unwrap()
    }

    fn hello(service: &str) -> Hello {
        Hello {
            service: Some(service.parse().unwrap()),
            credential: None,
        }
    }

    /// Runs a whole XX handshake in memory.
    fn xx(
        a: &LocalParty,
        b: &LocalParty,
    ) -> Result<(Peer, Transport, Peer, Transport), ChannelError> {
        let (init, m1) = Initiator::start(a, ChannelKind::EndToEnd)?;
        let (resp, m2) =
            Responder::new(b, ChannelKind::EndToEnd)?.handle_hello(&m1, b, &hello("db"))?;
        let (verified, b_seen) = init.handle_response(&m2)?;
        let (m3, ta) = verified.finish(a, &hello("db"))?;
        let (a_seen, tb) = resp.handle_finish(&m3)?;
        Ok((b_seen, ta, a_seen, tb))
    }

    #[test]
    fn both_sides_learn_each_others_identity() {
        let (a, b) = (party(), party());
        let (b_seen, ta, a_seen, tb) = xx(&a, &b).unwrap();
        assert_eq!(b_seen.identity.identifier(), b.identity().identifier());
        assert_eq!(a_seen.identity.identifier(), a.identity().identifier());
        assert_eq!(b_seen.hello, hello("db"));
        // And the transport works both ways.
        let (mut a_tx, mut a_rx) = ta.split();
        let (mut b_tx, mut b_rx) = tb.split();
        let mut wire_bytes = Vec::new();
        a_tx.seal(b"ping", &mut wire_bytes).unwrap();
        let (body, used) = crate::frame::decode(&wire_bytes, 65535).unwrap().unwrap();
        assert_eq!(used, wire_bytes.len());
        let mut plain = vec![0u8; 65535];
        let n = b_rx.open(body, &mut plain).unwrap();
        assert_eq!(&plain[..n], b"ping");
        wire_bytes.clear();
        b_tx.seal(b"pong", &mut wire_bytes).unwrap();
        let n = a_rx.open(&wire_bytes[2..], &mut plain).unwrap();
        assert_eq!(&plain[..n], b"pong");
    }

    #[test]
    fn tampered_messages_fail() {
        let (a, b) = (party(), party());
        for target in 1..=3 {
            for flip in [0usize, 10, 40, 80] {
                let (init, m1) = Initiator::start(&a, ChannelKind::EndToEnd).unwrap();
                let mut m1 = m1;
                if target == 1 {
                    if flip >= m1.len() {
                        continue;
                    }
                    m1[flip] ^= 0x40;
                }
                let Ok((resp, mut m2)) = Responder::new(&b, ChannelKind::EndToEnd)
                    .unwrap()
                    .handle_hello(&m1, &b, &hello("db"))
                else {
                    // A flipped ephemeral key is not always detected at message 1
                    // (any 32 bytes are a valid X25519 key); if it is, fine.
                    continue;
                };
                if target == 2 {
                    let i = flip.min(m2.len() - 1);
                    m2[i] ^= 0x40;
                }
                let r = init.handle_response(&m2);
                if target == 1 || target == 2 {
                    assert!(r.is_err(), "tampered message {target} at {flip} accepted");
                    continue;
                }
                let (verified, _) = r.unwrap();
                let (mut m3, _) = verified.finish(&a, &hello("db")).unwrap();
                let i = flip.min(m3.len() - 1);
                m3[i] ^= 0x40;
                assert!(
                    resp.handle_finish(&m3).is_err(),
                    "tampered message 3 at {flip} accepted"
                );
            }
        }
    }

    #[test]
    fn truncated_and_garbage_messages_fail() {
        let (a, b) = (party(), party());
        let (init, m1) = Initiator::start(&a, ChannelKind::EndToEnd).unwrap();
        assert!(Responder::new(&b, ChannelKind::EndToEnd)
            .unwrap()
            .handle_hello(&m1[..20], &b, &Hello::default())
            .is_err());
        assert!(Responder::new(&b, ChannelKind::EndToEnd)
            .unwrap()
            .handle_hello(&[], &b, &Hello::default())
            .is_err());
        let (_resp, m2) = Responder::new(&b, ChannelKind::EndToEnd)
            .unwrap()
            .handle_hello(&m1, &b, &Hello::default())
            .unwrap();
        assert!(init.handle_response(&m2[..m2.len() - 1]).is_err());
        assert!(Responder::new(&b, ChannelKind::EndToEnd)
            .unwrap()
            .handle_hello(&vec![0xAB; 70_000], &b, &Hello::default())
            .is_err());
    }

    #[test]
    fn kinds_do_not_mix() {
        let kinds = [
            ChannelKind::Hop,
            ChannelKind::EndToEnd,
            ChannelKind::AuthorityAdmin,
        ];
        for ours in kinds {
            for theirs in kinds {
                let (a, b) = (party(), party());
                let (init, m1) = Initiator::start(&a, ours).unwrap();
                let (_resp, m2) = Responder::new(&b, theirs)
                    .unwrap()
                    .handle_hello(&m1, &b, &Hello::default())
                    .unwrap();
                assert_eq!(
                    init.handle_response(&m2).is_ok(),
                    ours == theirs,
                    "{ours:?} against {theirs:?}"
                );
            }
        }
    }

    #[test]
    fn replayed_message_from_another_session_fails() {
        let (a, b) = (party(), party());
        let (init1, m1a) = Initiator::start(&a, ChannelKind::EndToEnd).unwrap();
        let (_r1, m2a) = Responder::new(&b, ChannelKind::EndToEnd)
            .unwrap()
            .handle_hello(&m1a, &b, &Hello::default())
            .unwrap();
        let (init2, _m1b) = Initiator::start(&a, ChannelKind::EndToEnd).unwrap();
        // Message 2 of session 1 replayed into session 2.
        assert!(init2.handle_response(&m2a).is_err());
        // Message 3 of session 1 replayed into a new responder session 3.
        let (v1, _) = init1.handle_response(&m2a).unwrap();
        let (m3a, _) = v1.finish(&a, &Hello::default()).unwrap();
        let (init3, m1c) = Initiator::start(&a, ChannelKind::EndToEnd).unwrap();
        let (r3, _m2c) = Responder::new(&b, ChannelKind::EndToEnd)
            .unwrap()
            .handle_hello(&m1c, &b, &Hello::default())
            .unwrap();
        assert!(r3.handle_finish(&m3a).is_err());
        drop(init3);
    }

    /// A party that signs a *different* static key than the one it uses
    /// (e.g. a proof stolen from another session) is refused.
    #[test]
    fn proof_for_another_static_key_is_refused() {
        let honest = party();
        let mallory = party();
        let stolen = ProofPayload {
            version: PROTOCOL_VERSION,
            identity_key: *honest.identity().public().as_bytes(),
            signature: honest.signature,
            hello: Hello::default(),
        };
        let err =
            verify_proof(&wire::encode(&stolen).unwrap(), mallory.static_public()).unwrap_err();
        assert!(matches!(err, ChannelError::BadIdentityProof(_)), "{err}");
        // Same proof against the right key passes.
        assert!(verify_proof(&wire::encode(&stolen).unwrap(), honest.static_public()).is_ok());
        // Wrong version and garbage are refused with reasons.
        let mut v2 = stolen.clone();
        v2.version = 2;
        let err = verify_proof(&wire::encode(&v2).unwrap(), honest.static_public()).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
        assert!(verify_proof(b"\x01\x02", honest.static_public()).is_err());
    }

    /// End to end through snow: an impostor that presents someone else's
    /// identity key with its own (invalid) signature fails at message 2.
    #[test]
    fn wrong_identity_signature_in_handshake() {
        let a = party();
        let mut b = party();
        b.signature = Identity::generate().sign(STATIC_KEY_LABEL, &b.public);
        let (init, m1) = Initiator::start(&a, ChannelKind::EndToEnd).unwrap();
        let (_resp, m2) = Responder::new(&b, ChannelKind::EndToEnd)
            .unwrap()
            .handle_hello(&m1, &b, &Hello::default())
            .unwrap();
        let err = init.handle_response(&m2).unwrap_err();
        assert!(matches!(err, ChannelError::BadIdentityProof(_)), "{err}");
    }

    #[test]
    fn transport_rejects_tamper_replay_reorder() {
        let (a, b) = (party(), party());
        let (_, ta, _, tb) = xx(&a, &b).unwrap();
        let (mut tx, _) = ta.split();
        let (_, mut rx) = tb.split();
        let mut f1 = Vec::new();
        let mut f2 = Vec::new();
        tx.seal(b"one", &mut f1).unwrap();
        tx.seal(b"two", &mut f2).unwrap();
        let mut out = vec![0u8; 100];
        // Reordered: frame 2 first fails (nonce 0 expected).
        assert_eq!(
            rx.clone_for_test().open(&f2[2..], &mut out),
            Err(ChannelError::Decrypt)
        );
        // Tampered.
        let mut bad = f1.clone();
        bad[5] ^= 1;
        assert_eq!(
            rx.clone_for_test().open(&bad[2..], &mut out),
            Err(ChannelError::Decrypt)
        );
        // In order works; replay of frame 1 afterwards fails.
        assert_eq!(rx.open(&f1[2..], &mut out), Ok(3));
        assert_eq!(
            rx.clone_for_test().open(&f1[2..], &mut out),
            Err(ChannelError::Decrypt)
        );
        assert_eq!(rx.open(&f2[2..], &mut out), Ok(3));
        // Truncated.
        assert_eq!(rx.open(&f2[2..10], &mut out), Err(ChannelError::Decrypt));
        // Data frames survive the channel.
        let mut plain = Vec::new();
        DataFrame::Eof.encode_into(&mut plain).unwrap();
        assert!(plain.len() < 10);
    }

    #[test]
    fn attach_round_trip_refusal_and_wrong_relay_key() {
        let (node, relay) = (party(), party());
        let (init, m1) = AttachInitiator::start(&node, relay.static_public(), true).unwrap();
        let (resp, node_static, hello) = AttachResponder::handle_request(&relay, &m1).unwrap();
        assert!(hello.spare);
        assert_eq!(&node_static, node.static_public());
        let (m2, relay_side) = resp.accept().unwrap();
        let node_side = init.handle_reply(&m2).unwrap().unwrap();
        // The token travels in a transport frame, never in the clear.
        let attach = Attach {
            version: PROTOCOL_VERSION,
            side: Side::Inlet,
            token: TunnelToken::random(),
        };
        let (mut tx, _) = node_side.split();
        let (_, mut rx) = relay_side.split();
        let mut framed = Vec::new();
        tx.seal(&wire::encode(&attach).unwrap(), &mut framed)
            .unwrap();
        assert!(!framed.windows(32).any(|w| w == attach.token.secret));
        let mut out = vec![0u8; 1024];
        let n = rx.open(&framed[2..], &mut out).unwrap();
        let got: Attach = wire::decode(&out[..n]).unwrap();
        assert_eq!(got.token.id, attach.token.id);
        // A refusal carries its reason.
        let (init, m1) = AttachInitiator::start(&node, relay.static_public(), true).unwrap();
        let (resp, _, _) = AttachResponder::handle_request(&relay, &m1).unwrap();
        let m2 = resp.refuse(RefusalCode::Limit, "too many").unwrap();
        assert_eq!(
            init.handle_reply(&m2).unwrap().err(),
            Some(Refusal::new(RefusalCode::Limit, "too many"))
        );
        // Encrypted to another relay key: the real relay cannot read it.
        let impostor = party();
        let (_i, m1) = AttachInitiator::start(&node, impostor.static_public(), false).unwrap();
        assert!(AttachResponder::handle_request(&relay, &m1).is_err());
        // A tampered reply fails.
        let (init, m1) = AttachInitiator::start(&node, relay.static_public(), true).unwrap();
        let (resp, _, _) = AttachResponder::handle_request(&relay, &m1).unwrap();
        let (mut m2, _) = resp.accept().unwrap();
        let last = m2.len() - 1;
        m2[last] ^= 1;
        assert!(init.handle_reply(&m2).is_err());
    }
}
