//! The audit trail (DESIGN 6, issue 4): one JSON-lines record per request that
//! reached the gateway, hash-chained, sealed now and then with an HMAC computed
//! in the token under the `audit-seal` key, rotated by size without breaking the
//! chain, and verified offline by `dcvv-gateway audit verify`.
//!
//! - [`record`]: the record format, its canonical bytes and hash, the genesis value.
//! - [`writer`]: the one writer thread: group commit (one write and one fsync per
//!   batch, every submitter woken after it), seals, rotation, the directory lock,
//!   fail closed and recover.
//! - [`verify`]: chain and seal verification across rotated files.
//!
//! What this module must not do: put card data in a record. Records carry a
//! masked PAN at most (first 6 and last 4 digits), never a clear PAN, a code
//! value, a secret, a signature or key material (DESIGN 7.1). It knows nothing
//! about HTTP; the HTTP layer hands it [`RequestFacts`].

pub mod record;
pub mod verify;
pub mod writer;

use std::path::PathBuf;
use std::time::Duration;

use crate::hsm::{HsmError, KeyKind, KeyLabel, Token};

pub use record::{GENESIS, RequestFacts};
pub use verify::{VerifyError, VerifyOptions, VerifySummary, verify_paths};
pub use writer::{AuditObserver, DownReason, NoAuditObserver, Trail};

/// The `[audit]` settings.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// Directory of the trail files (created if missing).
    pub directory: PathBuf,
    /// The audit-seal key (kind `audit-seal`).
    pub seal_key: KeyLabel,
    /// A seal after this many records.
    pub seal_every_records: u64,
    /// A seal at least this often while records arrive.
    pub seal_interval: Duration,
    /// A file is rotated once it reaches this size.
    pub max_file_bytes: u64,
}

/// Why the trail could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Another process holds the trail directory's lock.
    #[error("audit trail {0}: another gateway process is writing this directory")]
    Locked(PathBuf),
    /// The directory or a file could not be opened, read or written.
    #[error("audit trail {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The last record of the trail cannot be read back.
    #[error("audit trail {0}: the last record is unreadable; run `audit verify` on the directory")]
    Corrupt(PathBuf),
    /// The seal key is missing or refused.
    #[error("audit seal key: {0}")]
    SealKey(#[from] HsmError),
    /// The trail is down (a write failed); requests are refused until it recovers.
    #[error("audit trail down: {0}")]
    Down(DownReason),
    /// The record was not made durable in time.
    #[error("audit record not durable within {0:?}")]
    Timeout(Duration),
    /// Too many records wait for the writer already.
    #[error("audit writer queue is full")]
    QueueFull,
    /// The writer has stopped.
    #[error("audit writer stopped")]
    Stopped,
}

/// Computes and checks seals: HMAC-SHA256 in the token under an audit-seal key.
pub trait Sealer: Send + Sync + std::fmt::Debug {
    /// The label and KCV of the key seals are made with.
    fn key(&self) -> (&KeyLabel, String);
    /// The seal of `message`.
    ///
    /// # Errors
    /// The token's error.
    fn seal(&self, message: &[u8]) -> Result<Vec<u8>, HsmError>;
}

/// Checks seals (the verifier's side; the key label comes from the seal record).
pub trait SealChecker: std::fmt::Debug {
    /// Whether `mac` is the seal of `message` under `label`.
    ///
    /// # Errors
    /// The token's error (key missing, wrong kind, token unavailable).
    fn check(&self, label: &KeyLabel, message: &[u8], mac: &[u8]) -> Result<bool, HsmError>;
}

/// The token's audit-seal key.
#[derive(Debug)]
pub struct TokenSealer {
    token: std::sync::Arc<Token>,
    label: KeyLabel,
    kcv: String,
}

impl TokenSealer {
    /// Loads the key (policy and kind checked) and its KCV. Blocking.
    ///
    /// # Errors
    /// `KeyNotFound`, `WrongKeyKind`, `KeyPolicy`, or the token's error.
    pub fn new(token: std::sync::Arc<Token>, label: KeyLabel) -> Result<Self, HsmError> {
        let kcv = token.load_key(&label, KeyKind::AuditSeal)?.to_string();
        Ok(TokenSealer { token, label, kcv })
    }
}

impl Sealer for TokenSealer {
    fn key(&self) -> (&KeyLabel, String) {
        (&self.label, self.kcv.clone())
    }

    fn seal(&self, message: &[u8]) -> Result<Vec<u8>, HsmError> {
        Ok(self
            .token
            .hmac(&self.label, KeyKind::AuditSeal, message)?
            .to_vec())
    }
}

impl SealChecker for Token {
    fn check(&self, label: &KeyLabel, message: &[u8], mac: &[u8]) -> Result<bool, HsmError> {
        self.hmac_verify(label, KeyKind::AuditSeal, message, mac)
    }
}
