//! The persistence port: card enrolment, used (card, window) pairs, failure counters
//! and seen request ids (DESIGN 6), on SQLite (one gateway process) or PostgreSQL
//! (several gateway processes sharing one database).
//!
//! The store owns the schema, its migrations and every SQL statement; it decides
//! nothing (no business rule lives here: the domain asks, the store answers and
//! records). It never sees a clear PAN or a code value: a card is a [`CardId`], the
//! 32-byte keyed hash the HSM computes, plus a masked PAN for humans. It imports
//! nothing from `http` or `domain`. All state changes of one request happen in one
//! [`Store::transact`] closure over a [`StoreTx`], which returns only once the
//! change is durable.

mod error;
mod postgres;
mod sql;
mod sqlite;
mod tx;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use error::{Cause, StoreError, StoreResult};
pub use tx::StoreTx;

/// Does this PostgreSQL URL carry a password (the configuration refuses one)?
#[must_use]
pub fn url_has_password(url: &str) -> bool {
    postgres::url_has_password(url)
}

/// Checks that `url` is a PostgreSQL URL, without connecting.
///
/// # Errors
/// [`StoreError::Settings`] saying what is wrong, never repeating the URL.
pub fn check_url(url: &str) -> StoreResult<()> {
    postgres::connect_options(url).map(drop)
}

/// Where and how to open the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// Which database.
    pub location: StoreLocation,
    /// How long a request waits for the store's connection (on SQLite also for the
    /// file lock, on PostgreSQL also for a row or card lock) before failing with
    /// [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
    /// Connections to PostgreSQL this process keeps at most (SQLite: always one).
    pub max_connections: u32,
}

impl StoreSettings {
    /// A SQLite file, with the default pool size.
    #[must_use]
    pub fn sqlite(path: impl Into<PathBuf>, acquire_timeout: Duration) -> Self {
        Self {
            location: StoreLocation::Sqlite(path.into()),
            acquire_timeout,
            max_connections: 1,
        }
    }

    /// A PostgreSQL database.
    #[must_use]
    pub fn postgres(
        location: PostgresLocation,
        acquire_timeout: Duration,
        max_connections: u32,
    ) -> Self {
        Self {
            location: StoreLocation::Postgres(location),
            acquire_timeout,
            max_connections,
        }
    }
}

/// The database the store lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file, created if missing (its parent directory must exist). One
    /// gateway process per file.
    Sqlite(PathBuf),
    /// A PostgreSQL database, shared by any number of gateway processes.
    Postgres(PostgresLocation),
}

/// How to reach PostgreSQL. The password never sits in the settings: it is in the
/// URL read from an environment variable, or in a file read when the store opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresLocation {
    /// The connection URL (`postgres://user@host:port/database?sslmode=require`).
    pub url: DatabaseUrl,
    /// A file holding the password (a trailing newline is ignored).
    pub password_file: Option<PathBuf>,
}

/// Where the PostgreSQL URL comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// The URL itself (the configuration refuses one that holds a password).
    Value(String),
    /// The name of an environment variable holding the URL, read at open.
    Env(String),
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(url) => f
                .debug_tuple("Value")
                .field(&postgres::redact(url))
                .finish(),
            Self::Env(name) => f.debug_tuple("Env").field(name).finish(),
        }
    }
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
/// Every state change of a request happens in one [`Store::transact`] closure,
/// which runs as one unit on the store's side: on SQLite on the store thread
/// that owns the one write connection, committed in groups with the requests of
/// the same moment (see the `sqlite` module); on PostgreSQL on one pooled
/// connection, and the database keeps concurrent transactions of all gateway
/// processes correct (see the `postgres` module). Two gateway processes must
/// not share one SQLite file: use PostgreSQL for several instances (DESIGN 6).
///
/// All times are UTC Unix seconds, chosen by the caller.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite {
        store: Arc<sqlite::Sqlite>,
        path: Arc<Path>,
    },
    Postgres {
        pool: sqlx::PgPool,
        /// `host:port/database`, for humans (never the password).
        target: Arc<str>,
    },
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Backend::Sqlite { store, path } => f
                .debug_struct("Store")
                .field("backend", &"sqlite")
                .field("path", path)
                .field("closed", &store.is_closed())
                .finish(),
            Backend::Postgres { pool, target } => f
                .debug_struct("Store")
                .field("backend", &"postgres")
                .field("target", target)
                .field("closed", &pool.is_closed())
                .finish(),
        }
    }
}

impl Store {
    /// Opens the store the settings name and brings its schema up to date.
    ///
    /// SQLite: creates the file if missing; the connection runs with WAL journal,
    /// `synchronous = FULL` (a commit is on disk before it returns), foreign keys on
    /// and `busy_timeout = acquire_timeout`. PostgreSQL: see the `postgres` module;
    /// several gateways may open (and migrate) one database at the same time.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database cannot be reached within the
    /// acquire timeout (missing directory, no permission, locked; server down),
    /// [`StoreError::Migrate`] when the schema cannot be brought up to date (also
    /// for a database written by a newer gateway), [`StoreError::Settings`] when the
    /// URL's environment variable or the password file cannot be read, or the URL
    /// is not a PostgreSQL URL.
    pub async fn open(settings: &StoreSettings) -> StoreResult<Store> {
        let backend = match &settings.location {
            StoreLocation::Sqlite(path) => Backend::Sqlite {
                store: sqlite::open(path, settings).await?,
                path: Arc::from(path.as_path()),
            },
            StoreLocation::Postgres(location) => {
                let (pool, target) = postgres::open(location, settings).await?;
                Backend::Postgres {
                    pool,
                    target: Arc::from(target),
                }
            }
        };
        Ok(Store { backend })
    }

    /// The backend's name: `sqlite` or `postgres`.
    #[must_use]
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres { .. } => "postgres",
        }
    }

    /// Runs `work` as one transaction and returns its result once the
    /// transaction has ended: when `work` returns `Ok`, every change it made is
    /// durable; when it returns `Err`, nothing it did is kept and that error is
    /// returned. The error type is the caller's (a domain refusal mid-way rolls
    /// back like a store error), as long as a [`StoreError`] converts into it. `work` runs on the store's side, away from the async runtime,
    /// and must do nothing but store work (no token calls, no waiting).
    ///
    /// On SQLite the answer, success or refusal, comes only after the group the
    /// transaction was committed with is durable; if that group is lost, the
    /// answer is [`StoreError::Unavailable`] and nothing of it is kept.
    ///
    /// # Errors
    /// `work`'s own error; [`StoreError::Unavailable`] when the transaction could
    /// not start within the acquire timeout, could not be committed, or the store
    /// is closed; [`StoreError::Internal`] when `work` panicked (rolled back).
    pub async fn transact<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut StoreTx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        match &self.backend {
            Backend::Sqlite { store, .. } => store.transact(work).await,
            Backend::Postgres { pool, .. } => postgres::transact(pool, work).await,
        }
    }

    /// Readiness: proves the store can be written, by rewriting the one-row heartbeat
    /// table in a committed transaction.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot take writes now.
    pub async fn probe(&self, now: i64) -> StoreResult<()> {
        self.transact(move |tx| tx.heartbeat(now)).await
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
        match &self.backend {
            Backend::Sqlite { store, .. } => {
                let (store, client, request_id) =
                    (Arc::clone(store), client.to_owned(), request_id.to_owned());
                blocking(move || {
                    store.read(|conn| sqlite::read_request_seen(conn, &client, &request_id, now))
                })
                .await
            }
            Backend::Postgres { pool, .. } => {
                let row = sqlx::query(sql::REQUEST_SEEN)
                    .bind(client)
                    .bind(request_id)
                    .bind(now)
                    .fetch_optional(pool)
                    .await?;
                Ok(row.is_some())
            }
        }
    }

    /// Read-only: the card's enrolment, if any, as last committed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub async fn enrollment(&self, card: &CardId) -> StoreResult<Option<Enrollment>> {
        match &self.backend {
            Backend::Sqlite { store, .. } => {
                let (store, card) = (Arc::clone(store), *card);
                blocking(move || store.read(|conn| sqlite::read_enrollment(conn, &card))).await
            }
            Backend::Postgres { pool, .. } => postgres::enrollment(pool, card).await,
        }
    }

    /// Read-only: the card's enrolment, as last committed, for code that already
    /// runs on a blocking thread (the token work of a request), so the read costs
    /// no hand-off of its own: SQLite reads on a reader connection, PostgreSQL
    /// drives the query on this thread.
    ///
    /// Must be called from a blocking thread of the runtime (`spawn_blocking`),
    /// never from async code.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`].
    pub fn enrollment_blocking(&self, card: &CardId) -> StoreResult<Option<Enrollment>> {
        match &self.backend {
            Backend::Sqlite { store, .. } => store.read(|conn| sqlite::read_enrollment(conn, card)),
            Backend::Postgres { pool, .. } => postgres::enrollment_blocking(pool, card),
        }
    }

    /// Deletes expired seen request ids, used windows and failures
    /// (`expires_at <= now`) in one transaction; returns the number of rows deleted.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Internal`]; nothing is deleted then.
    pub async fn cleanup(&self, now: i64) -> StoreResult<u64> {
        let deleted = self.transact(move |tx| tx.delete_expired(now)).await?;
        tracing::debug!(deleted, "store cleanup");
        Ok(deleted)
    }

    /// Closes the store (graceful shutdown): finishes the transactions under way,
    /// then closes the connections. Every later call fails with
    /// [`StoreError::Unavailable`].
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite { store, .. } => store.close().await,
            Backend::Postgres { pool, .. } => pool.close().await,
        }
    }
}

/// Runs a blocking read off the runtime's workers.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(read)
        .await
        .unwrap_or(Err(StoreError::Unavailable(Cause::WorkerStopped)))
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
    fn settings_debug_never_shows_a_password() {
        let settings = StoreSettings::postgres(
            PostgresLocation {
                url: DatabaseUrl::Value("postgres://gw:hunter2@db:5432/dcvv?password=x2".into()),
                password_file: None,
            },
            Duration::from_secs(1),
            4,
        );
        let shown = format!("{settings:?}");
        assert!(shown.contains("postgres://gw:***@db:5432/dcvv"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("x2"),
            "{shown}"
        );
    }

    #[test]
    fn card_id_debug_shows_only_a_prefix() {
        let mut bytes = [0xab_u8; 32];
        bytes[..4].copy_from_slice(&[0x01, 0x23, 0x45, 0x67]);
        let shown = format!("{:?}", CardId(bytes));
        assert_eq!(shown, "CardId(01234567…)");
        assert!(!shown.contains("ab"), "{shown}");
    }
}
