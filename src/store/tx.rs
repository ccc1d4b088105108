//! `StoreTx`: the statements of one request's transaction.
//!
//! A transaction is a closure handed to [`Store::transact`](super::Store::transact):
//! it runs as one unit on the store's side (on SQLite, on the store thread that
//! owns the connection; on PostgreSQL, on one blocking thread holding one pooled
//! connection), so a request crosses to the store once, not once per statement.
//! The closure's `Ok` commits, its `Err` rolls back: a request refused half-way
//! leaves nothing behind (DESIGN 7.3). `StoreTx` records what the domain decided
//! and decides nothing itself (no limits, no windows, no clocks).

use std::fmt;

use super::{CardId, Enrollment, StoreError, StoreResult, postgres, sqlite};

/// The statements of one transaction. See [`Store::transact`](super::Store::transact).
pub struct StoreTx<'a> {
    inner: TxInner<'a>,
}

/// One variant per backend.
pub(super) enum TxInner<'a> {
    Sqlite(sqlite::Statements<'a>),
    Postgres(postgres::Statements<'a>),
}

impl fmt::Debug for StoreTx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = match self.inner {
            TxInner::Sqlite(_) => "sqlite",
            TxInner::Postgres(_) => "postgres",
        };
        f.debug_struct("StoreTx")
            .field("backend", &backend)
            .finish()
    }
}

/// Runs the same method on whichever backend the transaction is on.
macro_rules! on_backend {
    ($tx:expr, |$s:ident| $body:expr) => {
        match &mut $tx.inner {
            TxInner::Sqlite($s) => $body,
            TxInner::Postgres($s) => $body,
        }
    };
}

impl<'a> StoreTx<'a> {
    pub(super) fn new(inner: TxInner<'a>) -> Self {
        Self { inner }
    }

    /// Serializes this transaction with every other transaction, in any gateway
    /// process, that locks the same card, until it ends. Call it before reading
    /// state that the transaction then writes on (count the card's failures, then
    /// record one): without it, two instances could both count 4 failures of a
    /// limit of 5 and both record a fifth.
    ///
    /// PostgreSQL: `pg_advisory_xact_lock` on the first 8 bytes of the card id (a
    /// keyed hash, so uniformly spread), waiting at most the acquire timeout (the
    /// connection's `lock_timeout`). SQLite: nothing to do, transactions run one
    /// after the other on the store thread, inside the batch that holds the file's
    /// one write lock.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the lock is not granted within the acquire
    /// timeout or the database is gone.
    pub fn lock_card(&mut self, card: &CardId) -> StoreResult<()> {
        match &mut self.inner {
            TxInner::Sqlite(_) => Ok(()),
            TxInner::Postgres(s) => s.lock_card(card),
        }
    }

    /// Claims a request id until `expires_at`. An earlier claim of the same
    /// (client, request id) that expired at or before `now` is replaced.
    ///
    /// # Errors
    /// [`StoreError::DuplicateRequest`] when the pair is claimed and its claim has not
    /// expired at `now`; otherwise [`StoreError::Unavailable`] or
    /// [`StoreError::Internal`].
    pub fn claim_request(
        &mut self,
        client: &str,
        request_id: &str,
        now: i64,
        expires_at: i64,
    ) -> StoreResult<()> {
        let claimed = on_backend!(self, |s| s
            .claim_request(client, request_id, now, expires_at))?;
        if claimed == 0 {
            return Err(StoreError::DuplicateRequest);
        }
        Ok(())
    }

    /// The card's enrolment, if any, as this transaction sees it.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub fn enrollment(&mut self, card: &CardId) -> StoreResult<Option<Enrollment>> {
        on_backend!(self, |s| s.enrollment(card))
    }

    /// Enrols the card if it is not enrolled. Returns `true` if it was enrolled now,
    /// `false` if it already was (the existing enrolment is left as it is).
    ///
    /// # Errors
    /// [`StoreError::Internal`] also when `masked_pan` is made of digits only (it
    /// looks like a clear PAN); otherwise [`StoreError::Unavailable`].
    pub fn enroll(&mut self, card: &CardId, enrollment: &Enrollment) -> StoreResult<bool> {
        Ok(on_backend!(self, |s| s.enroll(card, enrollment))? == 1)
    }

    /// Removes the card's enrolment and its failures. Returns `true` if it was
    /// enrolled. Used windows stay until they expire, so an unenrol/enrol cycle does
    /// not make an accepted code acceptable again.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub fn unenroll(&mut self, card: &CardId) -> StoreResult<bool> {
        self.clear_failures(card)?;
        Ok(on_backend!(self, |s| s.unenroll(card))? > 0)
    }

    /// Number of failures recorded for the card at or after `since` (saturating).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub fn failures_since(&mut self, card: &CardId, since: i64) -> StoreResult<u32> {
        let count = on_backend!(self, |s| s.failures_since(card, since))?;
        Ok(u32::try_from(count.max(0)).unwrap_or(u32::MAX))
    }

    /// Records a failed check of the card at `at`, kept until `expires_at`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub fn add_failure(&mut self, card: &CardId, at: i64, expires_at: i64) -> StoreResult<()> {
        on_backend!(self, |s| s.add_failure(card, at, expires_at)).map(drop)
    }

    /// Forgets every failure recorded for the card.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub fn clear_failures(&mut self, card: &CardId) -> StoreResult<()> {
        on_backend!(self, |s| s.clear_failures(card)).map(drop)
    }

    /// Single use of a time window: records (card, window) as used at `at`, kept until
    /// `expires_at`. Returns `true` if this call claimed it, `false` if it was already
    /// used.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub fn claim_window(
        &mut self,
        card: &CardId,
        window: i64,
        at: i64,
        expires_at: i64,
    ) -> StoreResult<bool> {
        Ok(on_backend!(self, |s| s.claim_window(card, window, at, expires_at))? == 1)
    }

    /// Rewrites the heartbeat row (readiness probe).
    pub(super) fn heartbeat(&mut self, now: i64) -> StoreResult<()> {
        on_backend!(self, |s| s.heartbeat(now)).map(drop)
    }

    /// Deletes every row with `expires_at <= now`; returns how many.
    pub(super) fn delete_expired(&mut self, now: i64) -> StoreResult<u64> {
        on_backend!(self, |s| s.delete_expired(now))
    }
}
