use std::path::PathBuf;

/// Errors about identities, identifiers and key files: the local user's
/// configuration, never the network.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// An identifier did not have the `P` + 40 hex digits form.
    #[error("{input:?} is not a Postern identifier: expected \"P\" followed by 40 hex digits (see `postern identity show`)")]
    MalformedIdentifier {
        /// What was given (identifiers are public, so it may be shown).
        input: String,
    },
    /// No key file where one was expected.
    #[error("no identity at {path}: create one with `postern identity create`{hint}")]
    NotFound {
        /// Where we looked.
        path: PathBuf,
        /// Extra hint (for example the `--name` flag to use).
        hint: String,
    },
    /// The key file exists and we refuse to overwrite it.
    #[error("an identity already exists at {path}; refusing to overwrite it (choose another --name, or delete the file yourself if you really mean to replace it)")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The key file can be read by other users.
    #[error("identity file {path} is readable by other users (mode {mode:o}); refusing to use it. Fix with: chmod 600 {path}")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The key file could not be parsed.
    #[error("identity file {path} is not a valid Postern identity file: {reason}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing the key file failed.
    #[error("cannot access identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// An identity name contained characters that are unsafe in a file name.
    #[error("identity name {0:?} may only contain letters, digits, '-', '_' and '.' and must not start with '.'")]
    BadName(String),
}

/// Why a secure channel failed. Every variant names who is at fault, so that a
/// peer-caused error can be reported to the peer as a close reason and a
/// local one to the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The peer sent a message Noise could not accept (tampered, truncated,
    /// replayed, reordered, wrong protocol).
    #[error("handshake message rejected: {0}")]
    BadHandshake(String),
    /// The peer's identity proof did not verify.
    #[error("peer's identity proof is invalid: {0}")]
    BadIdentityProof(String),
    /// The peer proved an identity, but not the one we expected.
    #[error("peer is {actual}, but {expected} was expected")]
    UnexpectedPeer {
        /// The identifier we pinned.
        expected: crate::Identifier,
        /// The identifier the peer proved.
        actual: crate::Identifier,
    },
    /// A transport frame failed authentication (tampering, replay, reordering
    /// or truncation on the way).
    #[error("frame failed authentication (tampered, replayed or reordered)")]
    Decrypt,
    /// The length prefix or contents of a frame were invalid.
    #[error("invalid frame: {0}")]
    BadFrame(String),
    /// A decrypted message could not be decoded.
    #[error("invalid message: {0}")]
    BadMessage(String),
    /// A message was too large to send.
    #[error("message of {0} bytes is too large for one frame")]
    TooLarge(usize),
    /// Internal misuse of the state machine (a bug, not the peer).
    #[error("internal channel error: {0}")]
    Internal(String),
}
