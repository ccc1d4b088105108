//! The service's port to the audit trail for state changes (issue 12): a
//! record made durable **before** a store transaction may commit, and a
//! compensating record when it did not, so the trail never misses a change.
//!
//! The request record the HTTP layer writes after the response is decided
//! still carries the result; this one only says that request `request_id`
//! of `client` is about to change (or did not change) the store. A trail
//! that cannot take it refuses the change: the transaction does not start.

use std::future::Future;
use std::pin::Pin;

/// Where a change stands when it is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangePhase {
    /// The transaction may commit after this record.
    BeforeCommit,
    /// Its work refused it (a replayed request id, a rule, a stale read), so
    /// it rolled back.
    RolledBack,
    /// The work was done but the commit failed: on SQLite that is a rollback;
    /// on PostgreSQL a connection lost during `COMMIT` leaves it unknown, so
    /// the record says only that the commit was not confirmed.
    CommitFailed,
}

impl ChangePhase {
    /// The name in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangePhase::BeforeCommit => "before_commit",
            ChangePhase::RolledBack => "rolled_back",
            ChangePhase::CommitFailed => "commit_failed",
        }
    }
}

/// One change record: who, which operation, which card (masked), where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// Service clock, Unix milliseconds.
    pub time_ms: u64,
    /// The client's request id.
    pub request_id: String,
    /// The client's apikey.
    pub client: String,
    /// The service operation (`dynamic_values`, `cvv2_verification`, ...).
    pub operation: &'static str,
    /// First 6 and last 4 digits, when the request names a card.
    pub masked_pan: Option<String>,
    /// The card's programme, when the request names a card.
    pub programme: Option<String>,
    /// Where the change stands.
    pub phase: ChangePhase,
}

/// Why a change record could not be made durable (the trail's own words,
/// without card data).
pub type JournalError = Box<dyn std::error::Error + Send + Sync>;

/// Resolves once a record is durable.
pub type JournalFuture = Pin<Box<dyn Future<Output = Result<(), JournalError>> + Send>>;

/// Makes change records durable.
pub trait ChangeJournal: Send + Sync + std::fmt::Debug {
    /// Submits `record` at once (the call does not wait) and returns a
    /// future that resolves when it is durable, so the wait can overlap other
    /// work. Dropping the future does not withdraw the record.
    fn record(&self, record: ChangeRecord) -> JournalFuture;
}

/// A journal that keeps nothing, for services without an audit trail (unit
/// tests of the service, benchmarks of the engine).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoJournal;

impl ChangeJournal for NoJournal {
    fn record(&self, _: ChangeRecord) -> JournalFuture {
        Box::pin(std::future::ready(Ok(())))
    }
}
