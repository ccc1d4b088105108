//! `StoreError`: the one error type of the persistence port, and the one place where
//! `sqlx::Error` is classified (STYLE 4).
//!
//! `rusqlite::Error` (the SQLite store thread) is classified here too, by the
//! same SQLite result codes.
//!
//! The classification answers one question for the layers above: is the store
//! unavailable (answer 503 and retry later: disk full, read-only, locked past the
//! timeout, gone, a PostgreSQL server shutting down or a serialization failure) or
//! is this a bug or a corrupt store? Messages carry what sqlx and the database say:
//! table, column and constraint names, never bound values, so no card identifier or
//! request id reaches them through this type. PostgreSQL's error DETAIL repeats
//! the values of a refused row, so a PostgreSQL error is kept as its SQLSTATE,
//! message, table and constraint only.

use std::sync::Arc;
use std::time::Duration;

use sqlx::error::DatabaseError as _;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The (client, request id) pair was already used within its replay window.
    #[error("duplicate request id")]
    DuplicateRequest,
    /// The database cannot be reached or written (disk full, read-only, locked past the
    /// timeout, gone).
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// Anything else from the database (schema, decode): a bug or a corrupt store.
    #[error("store error: {0}")]
    Internal(#[source] Cause),
    /// Opening / migrating failed.
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The store's settings cannot be used (URL, its environment variable, the
    /// password file); the message names the setting, never a secret.
    #[error("store settings: {0}")]
    Settings(String),
}

/// What lies under an [`StoreError::Unavailable`] or [`StoreError::Internal`].
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// From sqlx (PostgreSQL, and SQLite while migrating).
    #[error(transparent)]
    Sqlx(sqlx::Error),
    /// From SQLite on the store thread or a reader.
    #[error(transparent)]
    Sqlite(rusqlite::Error),
    /// The request's transaction did not get its turn within the acquire timeout.
    #[error("no turn on the store within {0:?}")]
    Timeout(Duration),
    /// The store is closed (shutdown).
    #[error("the store is closed")]
    Closed,
    /// The batch the transaction ran in could not be committed: nothing of it is kept.
    #[error("group commit failed")]
    BatchLost(#[source] Arc<StoreError>),
    /// The thread or task running the transaction stopped before answering.
    #[error("the store's worker stopped")]
    WorkerStopped,
    /// The transaction's closure panicked; it was rolled back.
    #[error("the transaction panicked and was rolled back")]
    Panicked,
    /// The store thread could not be started.
    #[error("store thread: {0}")]
    Io(std::io::Error),
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// True when the store could not be reached or written: the caller should fail
    /// the request with 503 and expect the store to come back (DESIGN 7.6).
    ///
    /// A migration that failed because the database could not be written counts too,
    /// so a gateway started on a read-only volume reports "unavailable", not "bug".
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Migrate(
                sqlx::migrate::MigrateError::Execute(err)
                | sqlx::migrate::MigrateError::ExecuteMigration(err, _),
            ) => is_unavailable(err),
            Self::DuplicateRequest | Self::Internal(_) | Self::Migrate(_) | Self::Settings(_) => {
                false
            }
        }
    }
}

/// The single classification of database errors.
impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        let unavailable = is_unavailable(&err);
        let err = Cause::Sqlx(without_row_values(err));
        if unavailable {
            Self::Unavailable(err)
        } else {
            Self::Internal(err)
        }
    }
}

/// The classification of SQLite errors from the store thread and the readers:
/// the same result codes as through sqlx. SQLite's messages name tables and
/// columns, never bound values.
impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        let unavailable = match &err {
            rusqlite::Error::SqliteFailure(e, _) => sqlite_code_is_unavailable(e.extended_code),
            _ => false,
        };
        if unavailable {
            Self::Unavailable(Cause::Sqlite(err))
        } else {
            Self::Internal(Cause::Sqlite(err))
        }
    }
}

/// A PostgreSQL error reduced to what names things: SQLSTATE, message, table,
/// constraint. Its DETAIL (`Failing row contains (…)`, `Key (card_id)=(…)`) and
/// WHERE would put bound values into logs. Other errors are kept as they are.
fn without_row_values(err: sqlx::Error) -> sqlx::Error {
    let sqlx::Error::Database(db) = &err else {
        return err;
    };
    let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() else {
        return err;
    };
    let mut text = format!("postgres {}: {}", pg.code(), pg.message());
    if let Some(table) = pg.table() {
        text.push_str(&format!(" (table {table})"));
    }
    if let Some(constraint) = pg.constraint() {
        text.push_str(&format!(" (constraint {constraint})"));
    }
    sqlx::Error::Protocol(text)
}

/// Does this error mean "the database cannot be reached or written right now"?
fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        // No connection within the acquire timeout, pool shut down, the connection's
        // worker thread or socket is gone.
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                return super::postgres::code_is_unavailable(pg.code());
            }
            db.try_downcast_ref::<sqlx::sqlite::SqliteError>()
                .and_then(|e| e.code())
                .and_then(|code| code.parse::<i32>().ok())
                .is_some_and(sqlite_code_is_unavailable)
        }
        // Schema, decode, constraint and protocol errors are bugs or corruption.
        _ => false,
    }
}

/// SQLite result codes that mean the file cannot be used right now; `code` may be an
/// extended code, whose low byte is the primary code
/// (<https://www.sqlite.org/rescode.html#primary_result_codes_versus_extended_result_codes>).
fn sqlite_code_is_unavailable(code: i32) -> bool {
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_LOCKED: i32 = 6;
    const SQLITE_READONLY: i32 = 8;
    const SQLITE_IOERR: i32 = 10;
    const SQLITE_FULL: i32 = 13;
    const SQLITE_CANTOPEN: i32 = 14;
    matches!(
        code & 0xff,
        SQLITE_BUSY
            | SQLITE_LOCKED
            | SQLITE_READONLY
            | SQLITE_IOERR
            | SQLITE_FULL
            | SQLITE_CANTOPEN
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_and_extended_unavailable_codes() {
        // BUSY, BUSY_RECOVERY, BUSY_SNAPSHOT, BUSY_TIMEOUT
        for code in [5, 261, 517, 773] {
            assert!(sqlite_code_is_unavailable(code), "{code}");
        }
        // LOCKED, READONLY, READONLY_DBMOVED, IOERR, IOERR_WRITE, IOERR_FSYNC, FULL,
        // CANTOPEN, CANTOPEN_ISDIR
        for code in [6, 8, 1032, 10, 778, 1034, 13, 14, 526] {
            assert!(sqlite_code_is_unavailable(code), "{code}");
        }
    }

    #[test]
    fn bug_and_corruption_codes_are_not_unavailable() {
        // ERROR, INTERNAL, CORRUPT, CONSTRAINT, CONSTRAINT_CHECK, CONSTRAINT_PRIMARYKEY,
        // MISMATCH, NOTADB, CORRUPT_INDEX
        for code in [1, 2, 11, 19, 275, 1555, 20, 26, 779] {
            assert!(!sqlite_code_is_unavailable(code), "{code}");
        }
    }

    #[test]
    fn pool_and_io_errors_are_unavailable() {
        for err in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
            sqlx::Error::Io(std::io::Error::other("gone")),
        ] {
            let err = StoreError::from(err);
            assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
            assert!(err.is_unavailable());
        }
    }

    #[test]
    fn decode_and_schema_errors_are_internal() {
        for err in [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("n".into()),
            sqlx::Error::Protocol("bad".into()),
        ] {
            let err = StoreError::from(err);
            assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
            assert!(!err.is_unavailable());
        }
        assert!(!StoreError::DuplicateRequest.is_unavailable());
    }

    #[test]
    fn migration_that_cannot_write_is_unavailable() {
        let err = StoreError::from(sqlx::migrate::MigrateError::Execute(
            sqlx::Error::PoolTimedOut,
        ));
        assert!(err.is_unavailable());
        let err = StoreError::from(sqlx::migrate::MigrateError::VersionMissing(1));
        assert!(!err.is_unavailable());
    }
}
