//! Opening the SQLite backend: connection options, the one-connection pool and the
//! embedded migrations (`migrations/sqlite/`).
//!
//! This is the only SQLite-specific code besides the executor types; it must not hold
//! SQL statements of its own (those live in `sql`, shared with PostgreSQL).

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::{StoreResult, StoreSettings};

/// The SQLite schema, embedded at build time.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Opens the pool and runs the migrations. Settings explained:
/// - WAL journal: readers do not block the writer; a commit appends to the log.
/// - `synchronous = FULL`: in WAL mode, `NORMAL` may lose the last commits on power
///   loss; the gateway promises durability before it answers (DESIGN 6).
/// - `busy_timeout`: how long a statement waits on another process's lock (a backup
///   tool, an operator's `sqlite3`) before failing as unavailable.
/// - One connection: SQLite has one writer; in-process queueing on the pool is fair
///   and bounded by `acquire_timeout`, where competing for the file lock is not.
pub(super) async fn open(settings: &StoreSettings) -> StoreResult<sqlx::SqlitePool> {
    let options = SqliteConnectOptions::new()
        .filename(&settings.sqlite_path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(settings.acquire_timeout);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(settings.acquire_timeout)
        .connect_with(options)
        .await?;
    if let Err(err) = MIGRATOR.run(&pool).await {
        pool.close().await;
        return Err(err.into());
    }
    tracing::info!(path = %settings.sqlite_path.display(), "store opened (sqlite)");
    Ok(pool)
}
