//! The persistence port: card enrolment, used (card, window) pairs, failure counters
//! and seen request ids (DESIGN 6), on SQLite today and PostgreSQL later.
//!
//! The store owns the schema, its migrations and every SQL statement; it decides
//! nothing (no business rule lives here: the domain asks, the store answers and
//! records). It never sees a clear PAN or a code value: a card is a [`CardId`], the
//! 32-byte keyed hash the HSM computes, plus a masked PAN for humans. It imports
//! nothing from `http` or `domain`. All state changes of one request go through one
//! [`StoreTx`], and [`StoreTx::commit`] returns only once the change is durable.

mod error;
mod sql;
mod sqlite;
mod tx;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use error::{StoreError, StoreResult};
pub use tx::StoreTx;

/// Where and how to open the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// The SQLite database file. Created if missing; its parent directory must exist.
    pub sqlite_path: PathBuf,
    /// How long a request waits for the store's connection (and, on SQLite, for the
    /// file lock) before failing with [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
}

/// A card as the store knows it: the keyed hash (HMAC-SHA256 under the PAN-index key,
/// computed in the HSM) of its PAN. Not secret on its own, but its `Debug` shows only
/// a prefix so logs cannot be used to join records across systems.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CardId(pub [u8; 32]);

impl fmt::Debug for CardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, ..] = self.0;
        write!(f, "CardId({a:02x}{b:02x}{c:02x}{d:02x}…)")
    }
}

/// A card's enrolment in dynamic CVV2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    /// Card programme the card was enrolled under.
    pub programme: String,
    /// The masked PAN (first 6 and last 4 digits at most, DESIGN 7.1). The store
    /// refuses a value made of digits only, as a last guard against a clear PAN.
    pub masked_pan: String,
    /// When the card was enrolled, UTC Unix seconds.
    pub enrolled_at: i64,
}

/// Handle to the store. Cheap to clone: every clone shares one backend.
///
/// On SQLite the backend is one connection behind a fair queue, and transactions
/// are committed in groups (see the `sqlite` module): SQLite has one writer at a
/// time anyway, and one durable commit for the requests of a moment is what makes
/// the store keep up. Two gateway processes must not share one SQLite file: use
/// PostgreSQL for several instances (DESIGN 6).
///
/// While a task holds a [`StoreTx`] the connection is taken: it must use the
/// transaction's own methods, not this handle's, or it waits for itself until the
/// acquire timeout.
///
/// All times are UTC Unix seconds, chosen by the caller.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite {
        writer: Arc<sqlite::Writer>,
        path: Arc<Path>,
    },
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Backend::Sqlite { writer, path } => f
                .debug_struct("Store")
                .field("backend", &"sqlite")
                .field("path", path)
                .field("closed", &writer.is_closed())
                .finish(),
        }
    }
}

/// Runs `$body` with `$pool` bound to an executor outside any request's
/// transaction (on SQLite: the one connection, taken for the duration). The body
/// is expanded once per backend, so the same SQL text serves all of them.
macro_rules! with_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.backend {
            Backend::Sqlite { writer, .. } => {
                let mut guard = writer.lock().await?;
                let $pool = guard.executor()?;
                $body
            }
        }
    };
}

impl Store {
    /// Opens (creating if missing) the SQLite file and brings its schema up to date.
    ///
    /// The connection runs with WAL journal, `synchronous = FULL` (a commit is on disk
    /// before it returns), foreign keys on and `busy_timeout = acquire_timeout`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the file cannot be opened (missing directory,
    /// no permission, locked), [`StoreError::Migrate`] when the schema cannot be
    /// brought up to date (also for a file written by a newer gateway).
    pub async fn open_sqlite(settings: &StoreSettings) -> StoreResult<Store> {
        let writer = sqlite::open(settings).await?;
        Ok(Store {
            backend: Backend::Sqlite {
                writer,
                path: Arc::from(settings.sqlite_path.as_path()),
            },
        })
    }

    /// Readiness: proves the store can be written, by rewriting the one-row heartbeat
    /// table in a committed transaction.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot take writes now.
    pub async fn probe(&self, now: i64) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        tx.heartbeat(now).await?;
        tx.commit().await
    }

    /// Read-only: has this (client, request id) been claimed and not yet expired at
    /// `now`?
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub async fn is_request_seen(
        &self,
        client: &str,
        request_id: &str,
        now: i64,
    ) -> StoreResult<bool> {
        with_pool!(self, |pool| {
            let row = sqlx::query(sql::REQUEST_SEEN)
                .bind(client)
                .bind(request_id)
                .bind(now)
                .fetch_optional(pool)
                .await?;
            Ok(row.is_some())
        })
    }

    /// Read-only: the card's enrolment, if any.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub async fn enrollment(&self, card: &CardId) -> StoreResult<Option<Enrollment>> {
        with_pool!(self, |pool| {
            let row = sqlx::query_as::<_, (String, String, i64)>(sql::ENROLLMENT)
                .bind(card.0.as_slice())
                .fetch_optional(pool)
                .await?;
            Ok(row.map(enrollment_from_row))
        })
    }

    /// Begins a transaction: all state changes of one request happen in one.
    ///
    /// On SQLite the first transaction of a batch takes the file's write lock at once
    /// (`BEGIN IMMEDIATE`), so waiting for it happens here, under the timeout, and
    /// never half-way through; each request's transaction is a savepoint in the batch.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when no connection or lock is free within the
    /// acquire timeout, or the store is closed.
    pub async fn begin(&self) -> StoreResult<StoreTx> {
        match &self.backend {
            Backend::Sqlite { writer, .. } => Ok(StoreTx::sqlite(writer.begin().await?)),
        }
    }

    /// Deletes expired seen request ids, used windows and failures
    /// (`expires_at <= now`) in one transaction; returns the number of rows deleted.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`]; nothing is deleted then.
    pub async fn cleanup(&self, now: i64) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        let deleted = tx.delete_expired(now).await?;
        tx.commit().await?;
        tracing::debug!(deleted, "store cleanup");
        Ok(deleted)
    }

    /// Closes the pool (graceful shutdown): waits for the connection to come back,
    /// then closes it. Every later call fails with [`StoreError::Unavailable`].
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite { writer, .. } => writer.close().await,
        }
    }
}

fn enrollment_from_row((programme, masked_pan, enrolled_at): (String, String, i64)) -> Enrollment {
    Enrollment {
        programme,
        masked_pan,
        enrolled_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_id_debug_shows_only_a_prefix() {
        let mut bytes = [0xab_u8; 32];
        bytes[..4].copy_from_slice(&[0x01, 0x23, 0x45, 0x67]);
        let shown = format!("{:?}", CardId(bytes));
        assert_eq!(shown, "CardId(01234567…)");
        assert!(!shown.contains("ab"), "{shown}");
    }
}
