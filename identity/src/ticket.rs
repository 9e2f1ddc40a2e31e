//! Enrollment tickets: everything a new machine needs to join, in one line.
//!
//! An admin asks the authority for a ticket; the authority binds the
//! attributes, kind, expiry and usage count to the SHA-256 hash of a fresh
//! 256-bit one-time code ([`CodeHash`]) in its store, and hands out a
//! [`Ticket`]: the code, the authority's identifier and service name, and the
//! relay's address and identifier. `postern enroll <ticket>` reaches the
//! authority through that relay, proves the ticket by sending the code inside
//! the end-to-end Noise channel, and receives its first credential.
//!
//! A ticket prints as `pstn-ticket:` followed by the unpadded base64url
//! encoding of a CBOR map:
//!
//! ```text
//! {"v": 1, "code": bytes(32), "auth": "P…", "svc": "postern-authority",
//!  "relay": "host:port", "relay_id": "P…", "exp": unix-seconds}
//! ```
//!
//! The attributes are not in the ticket: they stay at the authority, so a
//! ticket reveals nothing about what it grants, and cannot be edited to grant
//! more. [`Ticket::parse`] is a plain function over text that never panics
//! and explains what is wrong with a damaged ticket.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::credential::{decode_exact, format_duration, format_timestamp, CborFail};
use crate::wire::ServiceName;
use crate::Identifier;

/// What every ticket starts with.
pub const TICKET_PREFIX: &str = "pstn-ticket:";
/// The ticket format version this code writes and reads.
pub const TICKET_VERSION: u8 = 1;
/// Longest ticket text accepted (a real one is about 250 characters).
pub const MAX_TICKET_LEN: usize = 2048;
/// The legacy fixed name authorities once registered under. Authorities now
/// register under their own name ([`crate::wire::ServiceName::of_authority`],
/// `authority-P…`); relays keep this name for the authorities they trust, so
/// nobody else can take it.
pub const DEFAULT_AUTHORITY_SERVICE: &str = "postern-authority";
const CODE_HASH_DOMAIN: &[u8] = b"postern ticket code v1\0";

/// Why a ticket could not be read or used. All are the user's input (a
/// damaged or stale ticket), never the network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TicketError {
    /// The text does not start with [`TICKET_PREFIX`].
    #[error("this is not a Postern enrollment ticket: a ticket starts with `{TICKET_PREFIX}`; copy the whole ticket your admin gave you")]
    NotATicket,
    /// The text is far longer than any ticket.
    #[error("this ticket is {len} characters long, far longer than a ticket can be: copy only the ticket")]
    TooLong {
        /// Length of what was given.
        len: usize,
    },
    /// The text has characters that base64url does not use.
    #[error("this ticket contains an invalid character at position {position}: copy it again, in one piece")]
    BadCharacter {
        /// Position after the prefix, counting from 0.
        position: usize,
    },
    /// The ticket was cut short.
    #[error("this ticket is incomplete (it was cut off when copied): copy the whole ticket again")]
    Truncated,
    /// The ticket comes from a different version of Postern.
    #[error("this ticket has format version {found}, but this Postern reads version {TICKET_VERSION}: use the same Postern version as the authority")]
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// The ticket decodes but its contents are wrong.
    #[error("this ticket is damaged ({0}): ask your admin for a new one")]
    Malformed(String),
    /// The ticket's expiry has passed.
    #[error("this enrollment ticket expired at {} ({} ago): ask your admin for a new one", format_timestamp(*.expires_at), format_duration(.now.saturating_sub(*.expires_at)))]
    Expired {
        /// When it expired.
        expires_at: u64,
        /// The local clock.
        now: u64,
    },
    /// Encoding failed (a bug).
    #[error("internal ticket error: {0}")]
    Internal(String),
}

/// The secret one-time code of a ticket: 256 random bits. Zeroized on drop,
/// `Debug` redacted. The authority keeps only its [`CodeHash`].
#[derive(Clone)]
pub struct TicketCode([u8; 32]);

impl TicketCode {
    /// A fresh random code.
    pub fn random() -> Self {
        use rand::RngCore;
        let mut code = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut code);
        TicketCode(code)
    }

    /// Wraps code bytes received from an enrolling node.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        TicketCode(bytes)
    }

    /// The secret bytes, to send inside an encrypted channel only.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The hash the authority stores and looks tickets up by.
    pub fn hash(&self) -> CodeHash {
        let digest = Sha256::new()
            .chain_update(CODE_HASH_DOMAIN)
            .chain_update(self.0)
            .finalize();
        CodeHash(digest.into())
    }
}

impl Drop for TicketCode {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for TicketCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketCode(<redacted>)")
    }
}

/// `SHA-256("postern ticket code v1\0" || code)`: how the authority names a
/// ticket. Not secret (the code cannot be recovered from it); printed as 64
/// hex digits, of which the first 12 ([`CodeHash::short`]) identify a ticket
/// to an admin.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CodeHash(#[serde(with = "serde_bytes")] [u8; 32]);

impl CodeHash {
    /// Wraps raw hash bytes (from a store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        CodeHash(bytes)
    }

    /// The raw hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 12 hex digits, to show and to select tickets by.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Display for CodeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CodeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CodeHash({})", self.short())
    }
}

/// A printable enrollment ticket. See the module documentation.
#[derive(Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The secret one-time code.
    pub code: TicketCode,
    /// The authority to enroll with.
    pub authority: Identifier,
    /// The service name the authority serves under at the relay.
    pub authority_service: ServiceName,
    /// The relay's address, `host:port`.
    pub relay_addr: String,
    /// The relay's identifier, pinned for the first connection.
    pub relay: Identifier,
    /// After this (unix seconds) the authority refuses the ticket.
    pub expires_at: u64,
}

impl PartialEq for TicketCode {
    /// Constant time.
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0).into()
    }
}
impl Eq for TicketCode {}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TicketWire {
    v: u8,
    #[serde(with = "serde_bytes")]
    code: [u8; 32],
    auth: Identifier,
    svc: ServiceName,
    relay: String,
    relay_id: Identifier,
    exp: u64,
}

impl Drop for TicketWire {
    fn drop(&mut self) {
        self.code.zeroize();
    }
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u8,
}

impl Ticket {
    /// The one-line form to hand to the new machine: `pstn-ticket:` +
    /// base64url(CBOR). It contains the secret code.
    pub fn to_token(&self) -> Result<Zeroizing<String>, TicketError> {
        let wire = TicketWire {
            v: TICKET_VERSION,
            code: self.code.0,
            auth: self.authority,
            svc: self.authority_service.clone(),
            relay: self.relay_addr.clone(),
            relay_id: self.relay,
            exp: self.expires_at,
        };
        let bytes = Zeroizing::new(
            cbor4ii::serde::to_vec(Vec::new(), &wire)
                .map_err(|e| TicketError::Internal(format!("CBOR encoding failed: {e}")))?,
        );
        let mut out = Zeroizing::new(String::with_capacity(
            TICKET_PREFIX.len() + bytes.len() * 4 / 3 + 4,
        ));
        out.push_str(TICKET_PREFIX);
        URL_SAFE_NO_PAD.encode_string(&*bytes, &mut out);
        Ok(out)
    }

    /// Parses a ticket as pasted by a person: surrounding and embedded
    /// whitespace (line breaks from a terminal) is ignored.
    pub fn parse(text: &str) -> Result<Ticket, TicketError> {
        if text.len() > MAX_TICKET_LEN {
            return Err(TicketError::TooLong { len: text.len() });
        }
        let compact: Zeroizing<String> =
            Zeroizing::new(text.chars().filter(|c| !c.is_whitespace()).collect());
        let body = compact
            .strip_prefix(TICKET_PREFIX)
            .ok_or(TicketError::NotATicket)?;
        if let Some(position) = body
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(TicketError::BadCharacter { position });
        }
        let bytes = Zeroizing::new(URL_SAFE_NO_PAD.decode(body).map_err(|e| match e {
            base64::DecodeError::InvalidByte(position, _) => TicketError::BadCharacter { position },
            base64::DecodeError::InvalidLength(_) | base64::DecodeError::InvalidLastSymbol(..) => {
                TicketError::Truncated
            }
            base64::DecodeError::InvalidPadding => TicketError::BadCharacter {
                position: body.len().saturating_sub(1),
            },
        })?);
        Self::from_cbor(&bytes)
    }

    /// Decodes the CBOR inside a ticket (after base64). Public for fuzzing.
    pub fn from_cbor(bytes: &[u8]) -> Result<Ticket, TicketError> {
        if bytes.is_empty() {
            return Err(TicketError::Truncated);
        }
        let probe: VersionProbe = decode_exact(bytes).map_err(cbor_error)?;
        if probe.v != TICKET_VERSION {
            return Err(TicketError::UnsupportedVersion { found: probe.v });
        }
        let wire: TicketWire = decode_exact(bytes).map_err(cbor_error)?;
        validate_relay_addr(&wire.relay).map_err(TicketError::Malformed)?;
        Ok(Ticket {
            code: TicketCode(wire.code),
            authority: wire.auth,
            authority_service: wire.svc.clone(),
            relay_addr: wire.relay.clone(),
            relay: wire.relay_id,
            expires_at: wire.exp,
        })
    }

    /// Refuses a ticket whose expiry has passed by more than the clock skew
    /// allowance, so `postern enroll` can say so before connecting. The
    /// authority checks again.
    pub fn check_not_expired(&self, now: u64) -> Result<(), TicketError> {
        if now
            > self
                .expires_at
                .saturating_add(crate::credential::CLOCK_SKEW_SECS)
        {
            return Err(TicketError::Expired {
                expires_at: self.expires_at,
                now,
            });
        }
        Ok(())
    }
}

impl FromStr for Ticket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ticket::parse(s)
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("code", &self.code)
            .field("authority", &self.authority)
            .field("authority_service", &self.authority_service)
            .field("relay_addr", &self.relay_addr)
            .field("relay", &self.relay)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

fn cbor_error(e: CborFail) -> TicketError {
    match e {
        CborFail::Truncated => TicketError::Truncated,
        CborFail::Invalid(reason) => TicketError::Malformed(reason),
    }
}

/// Checks a relay address of the form `host:port` or `[v6addr]:port`.
pub fn validate_relay_addr(addr: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("relay address {addr:?} {why}; expected host:port"));
    if addr.is_empty() || addr.len() > 261 {
        return bad("has the wrong length");
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("has no port");
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => {}
        _ => return bad("has an invalid port"),
    }
    let host = match host.strip_prefix('[') {
        Some(v6) => match v6.strip_suffix(']') {
            Some(inner) if inner.parse::<std::net::Ipv6Addr>().is_ok() => return Ok(()),
            _ => return bad("has an invalid IPv6 address"),
        },
        None => host,
    };
    let ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        bad("has an invalid host name")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    fn ticket() -> Ticket {
        Ticket {
            code: TicketCode::random(),
            authority: Identity::generate().identifier(),
            authority_service: DEFAULT_AUTHORITY_SERVICE.parse().unwrap(),
            relay_addr: "relay.example.com:7443".into(),
            relay: Identity::generate().identifier(),
            expires_at: 1_700_000_900,
        }
    }

    #[test]
    fn round_trip_and_whitespace() {
        let t = ticket();
        let token = t.to_token().unwrap();
        assert!(token.starts_with(TICKET_PREFIX));
        assert!(token.len() < 400, "{}", token.len());
        assert_eq!(Ticket::parse(&token).unwrap(), t);
        // Line-wrapped and indented, as copied from a terminal.
        let (a, b) = token.split_at(60);
        let wrapped = format!("  {a}\n   {b}\n");
        assert_eq!(Ticket::parse(&wrapped).unwrap(), t);
        // The code is secret: not in Debug.
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(&hex::encode(t.code.as_bytes())), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn each_kind_of_damage_has_its_own_error() {
        let t = ticket();
        let token = t.to_token().unwrap();
        assert_eq!(Ticket::parse("hello"), Err(TicketError::NotATicket));
        assert_eq!(Ticket::parse(""), Err(TicketError::NotATicket));
        assert_eq!(
            Ticket::parse(&"x".repeat(MAX_TICKET_LEN + 1)),
            Err(TicketError::TooLong {
                len: MAX_TICKET_LEN + 1
            })
        );
        let bad_char = format!("{}!{}", &token[..20], &token[21..]);
        assert_eq!(
            Ticket::parse(&bad_char),
            Err(TicketError::BadCharacter {
                position: 20 - TICKET_PREFIX.len()
            })
        );
        assert!(Ticket::parse(&format!("{}==", *token)).is_err());
        for cut in TICKET_PREFIX.len()..token.len() {
            let err = Ticket::parse(&token[..cut]).unwrap_err();
            assert!(
                matches!(err, TicketError::Truncated | TicketError::Malformed(_)),
                "{cut}: {err}"
            );
        }
        // Cutting off the last few characters is reported as truncation.
        assert_eq!(
            Ticket::parse(&token[..token.len() - 5]),
            Err(TicketError::Truncated)
        );
        assert!(TicketError::Truncated
            .to_string()
            .contains("copy the whole"));
    }

    #[test]
    fn versions_and_contents_are_checked() {
        #[derive(Serialize)]
        struct V2 {
            v: u8,
            other: String,
        }
        let bytes = cbor4ii::serde::to_vec(
            Vec::new(),
            &V2 {
                v: 2,
                other: "x".into(),
            },
        )
        .unwrap();
        let text = format!("{TICKET_PREFIX}{}", URL_SAFE_NO_PAD.encode(&bytes));
        assert_eq!(
            Ticket::parse(&text),
            Err(TicketError::UnsupportedVersion { found: 2 })
        );
        let mut t = ticket();
        t.relay_addr = "no-port".into();
        let err = Ticket::parse(&t.to_token().unwrap()).unwrap_err();
        assert!(matches!(err, TicketError::Malformed(_)), "{err}");
        // Valid CBOR that is not a ticket map.
        let text = format!("{TICKET_PREFIX}{}", URL_SAFE_NO_PAD.encode([0x01]));
        assert!(matches!(
            Ticket::parse(&text),
            Err(TicketError::Malformed(_))
        ));
    }

    #[test]
    fn expiry_and_hash() {
        let t = ticket();
        assert!(t.check_not_expired(t.expires_at + 60).is_ok());
        let err = t.check_not_expired(t.expires_at + 120).unwrap_err();
        assert!(err.to_string().contains("ask your admin"), "{err}");
        let h = t.code.hash();
        assert_eq!(h, TicketCode::from_bytes(*t.code.as_bytes()).hash());
        assert_ne!(h, TicketCode::random().hash());
        assert_eq!(h.short().len(), 12);
        assert_eq!(h.to_string().len(), 64);
    }

    #[test]
    fn relay_addresses() {
        for good in ["a:1", "relay.example.com:7443", "[::1]:7443", "10.0.0.1:80"] {
            assert!(validate_relay_addr(good).is_ok(), "{good}");
        }
        for bad in [
            "", "a", "a:", "a:0", "a:99999", ":80", "[::1:80", "[zz]:80", "a b:1",
        ] {
            assert!(validate_relay_addr(bad).is_err(), "{bad}");
        }
    }
}
