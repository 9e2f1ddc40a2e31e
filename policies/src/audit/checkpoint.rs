//! The writer's own lines (`checkpoint`, `continued`, `records_lost`), what a
//! checkpoint signs, and how a verifier checks it.

use postern_identity::{Identifier, Identity, PublicIdentity};
use serde::{Deserialize, Serialize};

/// Domain-separation label of checkpoint signatures ([`Identity::sign`]).
pub const CHECKPOINT_LABEL: &[u8] = b"postern audit checkpoint v1";

/// A line the writer adds by itself. Not an `AuditEvent`: callers cannot
/// record one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum Note {
    /// A signature over the chain up to the line before it.
    Checkpoint {
        /// The line covered: the one before the checkpoint (its hash is the
        /// checkpoint's `prev`).
        covers: u64,
        /// At most this many lines follow before the next checkpoint.
        next_within: u64,
        /// The signer's identifier.
        signer: Identifier,
        /// The signer's Ed25519 public key, hex.
        key: String,
        /// The signature, hex.
        signature: String,
    },
    /// First line of a file after a rotation: the previous file's head.
    Continued {
        /// The previous file's last seq.
        previous_seq: u64,
        /// The hash of the previous file's last line.
        previous_hash: String,
    },
    /// Records dropped while the queue was full.
    RecordsLost {
        /// How many.
        count: u64,
        /// Time of the first one dropped.
        first: String,
        /// Time of the last one dropped.
        last: String,
    },
}

/// The bytes a checkpoint signs (after [`CHECKPOINT_LABEL`]).
fn message(covers: u64, covered_hash: &str, time: &str, next_within: u64) -> Vec<u8> {
    format!("covers {covers}\nhash {covered_hash}\ntime {time}\nnext_within {next_within}")
        .into_bytes()
}

/// The checkpoint line that follows line `covers` (whose hash is
/// `covered_hash`), stamped `time`.
pub(crate) fn sign(
    signer: &Identity,
    covers: u64,
    covered_hash: &str,
    time: &str,
    next_within: u64,
) -> Note {
    let signature = signer.sign(
        CHECKPOINT_LABEL,
        &message(covers, covered_hash, time, next_within),
    );
    let public = signer.public();
    Note::Checkpoint {
        covers,
        next_within,
        signer: public.identifier(),
        key: hex::encode(public.as_bytes()),
        signature: hex::encode(signature),
    }
}

/// What a valid checkpoint says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checked {
    /// Who signed it.
    pub signer: Identifier,
    /// Lines that may follow before the next checkpoint.
    pub next_within: u64,
}

/// Why a checkpoint line is not valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Its fields are missing or of the wrong shape.
    Malformed(String),
    /// Its fields are well formed, but the signature does not verify over
    /// them (the chain before it was rewritten, or it was forged).
    BadSignature(String),
}

/// Checks the checkpoint at `seq`, stamped `time`, whose `prev` is `prev`
/// (already checked to be the previous line's hash), with its JSON `value`.
pub(crate) fn check(
    seq: u64,
    time: &str,
    prev: &str,
    value: &serde_json::Value,
) -> Result<Checked, Fault> {
    let malformed = |what: &str| Fault::Malformed(format!("checkpoint {what}"));
    let Ok(Note::Checkpoint {
        covers,
        next_within,
        signer,
        key,
        signature,
    }) = serde_json::from_value::<Note>(value.clone())
    else {
        return Err(malformed(
            "lacks covers, next_within, signer, key or signature",
        ));
    };
    if covers.checked_add(1) != Some(seq) {
        return Err(Fault::BadSignature(format!(
            "the checkpoint at line {seq} claims to cover line {covers}, not the line before it"
        )));
    }
    if next_within == 0 {
        return Err(malformed("has next_within 0"));
    }
    let key: [u8; 32] = hex::decode(&key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| malformed("key is not 64 hex digits"))?;
    let signature: [u8; 64] = hex::decode(&signature)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| malformed("signature is not 128 hex digits"))?;
    let public = PublicIdentity::from_bytes(&key)
        .ok_or_else(|| malformed("key is not a valid public key"))?;
    if public.identifier() != signer {
        return Err(Fault::BadSignature(format!(
            "the checkpoint at line {seq} names signer {signer} but carries the key of {}",
            public.identifier()
        )));
    }
    if !public.verify(
        CHECKPOINT_LABEL,
        &message(covers, prev, time, next_within),
        &signature,
    ) {
        return Err(Fault::BadSignature(format!(
            "the signature of {signer} on the checkpoint at line {seq} does not match lines 1 to {covers}: they were changed after it was signed, or the checkpoint is forged"
        )));
    }
    Ok(Checked {
        signer,
        next_within,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_checkpoint_checks_and_any_change_breaks_it() {
        let id = Identity::from_secret_bytes(&[4; 32]);
        let hash = "ab".repeat(32);
        let time = "2025-01-01T12:00:00.000Z";
        let note = sign(&id, 7, &hash, time, 100);
        let value = serde_json::to_value(&note).unwrap();
        assert_eq!(
            check(8, time, &hash, &value),
            Ok(Checked {
                signer: id.identifier(),
                next_within: 100
            })
        );
        assert!(matches!(
            check(8, time, &"cd".repeat(32), &value),
            Err(Fault::BadSignature(_))
        ));
        assert!(matches!(
            check(8, "2025-01-01T12:00:00.001Z", &hash, &value),
            Err(Fault::BadSignature(_))
        ));
        assert!(matches!(
            check(9, time, &hash, &value),
            Err(Fault::BadSignature(_))
        ));
        let mut more = value.clone();
        more["next_within"] = 1000.into();
        assert!(matches!(
            check(8, time, &hash, &more),
            Err(Fault::BadSignature(_))
        ));
        // Another key cannot pass as this signer.
        let other = Identity::from_secret_bytes(&[5; 32]);
        let mut swapped = value.clone();
        swapped["key"] = hex::encode(other.public().as_bytes()).into();
        assert!(matches!(
            check(8, time, &hash, &swapped),
            Err(Fault::BadSignature(_))
        ));
        let mut short = value;
        short["signature"] = "00".into();
        assert!(matches!(
            check(8, time, &hash, &short),
            Err(Fault::Malformed(_))
        ));
    }
}
