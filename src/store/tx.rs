//! `StoreTx`: one transaction, holding every state change of one request.
//!
//! It owns the store's connection until [`StoreTx::commit`] or
//! [`StoreTx::rollback`]; dropping it without either rolls back, so a request that
//! fails half-way leaves nothing behind (DESIGN 7.3). It records what the domain
//! decided and must not decide anything itself (no limits, no windows, no clocks).

use std::fmt;

use super::sqlite::SqliteTx;
use super::{CardId, Enrollment, StoreError, StoreResult, enrollment_from_row, postgres, sql};

/// A transaction on the store. See [`Store::begin`](super::Store::begin).
pub struct StoreTx {
    inner: TxInner,
}

/// One variant per backend (and one arm per backend in `with_conn!`).
enum TxInner {
    Sqlite(SqliteTx),
    /// A pooled connection with an open transaction; dropped without commit, sqlx
    /// rolls it back before the connection is used again.
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

impl fmt::Debug for StoreTx {
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

/// Runs `$body` with `$conn` bound to the transaction's connection (an executor).
/// The body is expanded once per backend, so the same SQL text serves all of them.
macro_rules! with_conn {
    ($tx:expr, |$conn:ident| $body:expr) => {
        match &mut $tx.inner {
            TxInner::Sqlite(tx) => {
                let $conn = tx.executor()?;
                $body
            }
            TxInner::Postgres(tx) => {
                let $conn = &mut **tx;
                $body
            }
        }
    };
}

impl StoreTx {
    pub(super) fn sqlite(tx: SqliteTx) -> Self {
        Self {
            inner: TxInner::Sqlite(tx),
        }
    }

    pub(super) fn postgres(tx: sqlx::Transaction<'static, sqlx::Postgres>) -> Self {
        Self {
            inner: TxInner::Postgres(tx),
        }
    }

    /// Serializes this transaction with every other transaction, in any gateway
    /// process, that locks the same card, until it commits or rolls back. Call it
    /// before reading state that the transaction then writes on (count the card's
    /// failures, then record one): without it, two instances could both count 4
    /// failures of a limit of 5 and both record a fifth.
    ///
    /// PostgreSQL: `pg_advisory_xact_lock` on the first 8 bytes of the card id (a
    /// keyed hash, so uniformly spread), waiting at most the acquire timeout (the
    /// connection's `lock_timeout`). SQLite: nothing to do, the transaction is
    /// already inside the batch that holds the file's one write lock.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the lock is not granted within the acquire
    /// timeout or the database is gone.
    pub async fn lock_card(&mut self, card: &CardId) -> StoreResult<()> {
        match &mut self.inner {
            TxInner::Sqlite(_) => Ok(()),
            TxInner::Postgres(tx) => {
                sqlx::query(postgres::LOCK_CARD)
                    .bind(postgres::card_lock_key(card))
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }
        }
    }

    /// Claims a request id until `expires_at`. An earlier claim of the same
    /// (client, request id) that expired at or before `now` is replaced.
    ///
    /// # Errors
    /// [`StoreError::DuplicateRequest`] when the pair is claimed and its claim has not
    /// expired at `now`; otherwise [`StoreError::Unavailable`] or
    /// [`StoreError::Internal`].
    pub async fn claim_request(
        &mut self,
        client: &str,
        request_id: &str,
        now: i64,
        expires_at: i64,
    ) -> StoreResult<()> {
        let claimed = with_conn!(self, |conn| {
            sqlx::query(sql::CLAIM_REQUEST)
                .bind(client)
                .bind(request_id)
                .bind(expires_at)
                .bind(now)
                .execute(conn)
                .await?
                .rows_affected()
        });
        if claimed == 0 {
            return Err(StoreError::DuplicateRequest);
        }
        Ok(())
    }

    /// The card's enrolment, if any, as this transaction sees it.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub async fn enrollment(&mut self, card: &CardId) -> StoreResult<Option<Enrollment>> {
        with_conn!(self, |conn| {
            let row = sqlx::query_as::<_, (String, String, i64)>(sql::ENROLLMENT)
                .bind(card.0.as_slice())
                .fetch_optional(conn)
                .await?;
            Ok(row.map(enrollment_from_row))
        })
    }

    /// Enrols the card if it is not enrolled. Returns `true` if it was enrolled now,
    /// `false` if it already was (the existing enrolment is left as it is).
    ///
    /// # Errors
    /// [`StoreError::Internal`] also when `masked_pan` is made of digits only (it
    /// looks like a clear PAN); otherwise [`StoreError::Unavailable`].
    pub async fn enroll(&mut self, card: &CardId, enrollment: &Enrollment) -> StoreResult<bool> {
        with_conn!(self, |conn| {
            let done = sqlx::query(sql::ENROLL)
                .bind(card.0.as_slice())
                .bind(enrollment.programme.as_str())
                .bind(enrollment.masked_pan.as_str())
                .bind(enrollment.enrolled_at)
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Removes the card's enrolment and its failures. Returns `true` if it was
    /// enrolled. Used windows stay until they expire, so an unenrol/enrol cycle does
    /// not make an accepted code acceptable again.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub async fn unenroll(&mut self, card: &CardId) -> StoreResult<bool> {
        self.clear_failures(card).await?;
        with_conn!(self, |conn| {
            let done = sqlx::query(sql::UNENROLL)
                .bind(card.0.as_slice())
                .execute(conn)
                .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    /// Number of failures recorded for the card at or after `since` (saturating).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub async fn failures_since(&mut self, card: &CardId, since: i64) -> StoreResult<u32> {
        with_conn!(self, |conn| {
            let count: i64 = sqlx::query_scalar(sql::FAILURES_SINCE)
                .bind(card.0.as_slice())
                .bind(since)
                .fetch_one(conn)
                .await?;
            Ok(u32::try_from(count.max(0)).unwrap_or(u32::MAX))
        })
    }

    /// Records a failed check of the card at `at`, kept until `expires_at`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub async fn add_failure(
        &mut self,
        card: &CardId,
        at: i64,
        expires_at: i64,
    ) -> StoreResult<()> {
        with_conn!(self, |conn| {
            sqlx::query(sql::ADD_FAILURE)
                .bind(card.0.as_slice())
                .bind(at)
                .bind(expires_at)
                .execute(conn)
                .await?;
            Ok(())
        })
    }

    /// Forgets every failure recorded for the card.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub async fn clear_failures(&mut self, card: &CardId) -> StoreResult<()> {
        with_conn!(self, |conn| {
            sqlx::query(sql::CLEAR_FAILURES)
                .bind(card.0.as_slice())
                .execute(conn)
                .await?;
            Ok(())
        })
    }

    /// Single use of a time window: records (card, window) as used at `at`, kept until
    /// `expires_at`. Returns `true` if this call claimed it, `false` if it was already
    /// used.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub async fn claim_window(
        &mut self,
        card: &CardId,
        window: i64,
        at: i64,
        expires_at: i64,
    ) -> StoreResult<bool> {
        with_conn!(self, |conn| {
            let done = sqlx::query(sql::CLAIM_WINDOW)
                .bind(card.0.as_slice())
                .bind(window)
                .bind(at)
                .bind(expires_at)
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Commits: when this returns `Ok`, every change of the transaction is durable.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the commit could not be written; nothing of
    /// the transaction is kept then.
    pub async fn commit(self) -> StoreResult<()> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.commit().await?,
            TxInner::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// Rolls back every change of the transaction.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`]; the changes are not
    /// kept either way.
    pub async fn rollback(self) -> StoreResult<()> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.rollback().await?,
            TxInner::Postgres(tx) => tx.rollback().await?,
        }
        Ok(())
    }

    /// Rewrites the heartbeat row (readiness probe).
    pub(super) async fn heartbeat(&mut self, now: i64) -> StoreResult<()> {
        with_conn!(self, |conn| {
            sqlx::query(sql::HEARTBEAT).bind(now).execute(conn).await?;
            Ok(())
        })
    }

    /// Deletes every row with `expires_at <= now`; returns how many.
    pub(super) async fn delete_expired(&mut self, now: i64) -> StoreResult<u64> {
        let mut deleted = 0;
        for statement in sql::CLEANUP {
            deleted += with_conn!(self, |conn| {
                sqlx::query(statement)
                    .bind(now)
                    .execute(conn)
                    .await?
                    .rows_affected()
            });
        }
        Ok(deleted)
    }
}
