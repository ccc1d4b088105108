//! The SQLite backend: connection options, embedded migrations (`migrations/sqlite/`)
//! and the group-commit writer.
//!
//! # Group commit
//!
//! A durable SQLite commit costs an `fsync` of the WAL (0.6–0.8 ms on the
//! development VM), while a statement costs about 10 µs. One commit per request
//! would cap the gateway near 1,300 requests/s whatever the cores, so the requests
//! of a moment share one commit:
//!
//! - The one connection lives behind a fair (FIFO) async mutex. The first
//!   transaction of a batch opens `BEGIN IMMEDIATE`; every request's transaction is
//!   a `SAVEPOINT` inside it, released on commit or rolled back to on rollback.
//! - A transaction that committed its savepoint gives the connection back and waits
//!   for its batch to be durable. A background committer queues for the mutex behind
//!   the requests already waiting, so they join the batch; then it commits the batch
//!   (one `fsync`) and tells every waiter at once.
//! - A commit returns `Ok` only once its batch is durable. If the batch cannot be
//!   committed, every transaction of it gets [`StoreError::Unavailable`]: none of
//!   them was answered, none is kept.
//! - A request sees the released (not yet durable) changes of earlier requests of
//!   its batch, exactly as if they had committed one after the other; it cannot
//!   answer before they are durable, because its own commit waits for the same batch.
//!   A rollback waits for the batch too when the batch holds changes, so a refusal
//!   (a replayed request id, say) never rests on a change that is then lost.
//! - A transaction dropped without commit or rollback leaves its savepoint open; the
//!   next holder of the connection rolls it back before anything else.
//!
//! This is the only SQLite-specific code besides the executor types; SQL text lives
//! in `sql`, shared with PostgreSQL.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Executor as _, Sqlite, SqlitePool};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard, watch};

use super::{StoreError, StoreResult, StoreSettings};

/// The SQLite schema, embedded at build time.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Name of the savepoint of a request's transaction.
const SAVEPOINT: &str = "SAVEPOINT request";
const RELEASE: &str = "RELEASE request";
const ROLLBACK_TO: &str = "ROLLBACK TO request";

/// Opens the pool and runs the migrations. Settings explained:
/// - WAL journal: readers do not block the writer; a commit appends to the log.
/// - `synchronous = FULL`: in WAL mode, `NORMAL` may lose the last commits on power
///   loss; the gateway promises durability before it answers (DESIGN 6).
/// - `busy_timeout`: how long a statement waits on another process's lock (a backup
///   tool, an operator's `sqlite3`) before failing as unavailable.
/// - One connection: SQLite has one writer; the writer below queues requests fairly
///   in-process, bounded by `acquire_timeout`, and commits them in batches.
pub(super) async fn open(path: &Path, settings: &StoreSettings) -> StoreResult<Arc<Writer>> {
    let options = SqliteConnectOptions::new()
        .filename(path)
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
    tracing::info!(path = %path.display(), "store opened (sqlite)");
    let writer = Arc::new(Writer {
        state: Arc::new(Mutex::new(State {
            conn: None,
            in_batch: false,
            savepoint_open: false,
            batch: Batch::new(),
        })),
        pool,
        commit_wanted: Notify::new(),
        closed: AtomicBool::new(false),
        acquire_timeout: settings.acquire_timeout,
    });
    tokio::spawn(Arc::clone(&writer).run_committer());
    Ok(writer)
}

/// The outcome of a batch, shared by all its transactions.
type BatchOutcome = Option<Result<(), Arc<str>>>;

/// The batch being filled: released transactions wait on `done`.
struct Batch {
    done: watch::Sender<BatchOutcome>,
    /// Some transaction released changes into this batch.
    dirty: bool,
}

impl Batch {
    fn new() -> Self {
        Self {
            done: watch::Sender::new(None),
            dirty: false,
        }
    }
}

/// What the mutex guards: the connection and where it stands.
pub(super) struct State {
    /// Taken from the pool on first use; dropped after an I/O failure so the next
    /// use opens a fresh one.
    conn: Option<PoolConnection<Sqlite>>,
    /// `BEGIN IMMEDIATE` of the current batch has been run and not yet ended.
    in_batch: bool,
    /// A request's savepoint is open (its transaction is running, or was dropped).
    savepoint_open: bool,
    batch: Batch,
}

/// The SQLite writer: one connection, fair queueing, group commit.
pub(super) struct Writer {
    state: Arc<Mutex<State>>,
    pool: SqlitePool,
    commit_wanted: Notify,
    closed: AtomicBool,
    acquire_timeout: Duration,
}

impl Writer {
    /// Takes the connection (waiting at most the acquire timeout), cleans up after a
    /// dropped transaction, and returns it ready for statements.
    pub(super) async fn lock(&self) -> StoreResult<OwnedMutexGuard<State>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(sqlx::Error::PoolClosed));
        }
        let mut guard = tokio::time::timeout(self.acquire_timeout, self.state.clone().lock_owned())
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolTimedOut))?;
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(sqlx::Error::PoolClosed));
        }
        if guard.conn.is_none() {
            if guard.in_batch || guard.savepoint_open {
                guard.fail_batch("the connection was lost").await;
            }
            guard.conn = Some(self.pool.acquire().await?);
        }
        guard.abandon_savepoint().await;
        Ok(guard)
    }

    /// Begins a request's transaction: joins (or opens) the current batch and sets
    /// the request's savepoint.
    pub(super) async fn begin(self: &Arc<Self>) -> StoreResult<SqliteTx> {
        let mut guard = self.lock().await?;
        if !guard.in_batch {
            guard.run("BEGIN IMMEDIATE").await?;
            guard.in_batch = true;
        }
        if let Err(err) = guard.run(SAVEPOINT).await {
            drop(guard);
            self.commit_wanted.notify_one();
            return Err(err);
        }
        guard.savepoint_open = true;
        Ok(SqliteTx {
            guard: Some(guard),
            writer: Arc::clone(self),
        })
    }

    /// Ends the batch for good and closes the pool; later calls are unavailable.
    pub(super) async fn close(&self) {
        let mut guard = self.state.clone().lock_owned().await;
        self.closed.store(true, Ordering::Release);
        guard.abandon_savepoint().await;
        guard.end_batch().await;
        guard.conn = None;
        drop(guard);
        self.commit_wanted.notify_one();
        self.pool.close().await;
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The committer: whenever a transaction ends, queue for the connection behind
    /// the requests already waiting (they join the batch), then end the batch.
    async fn run_committer(self: Arc<Self>) {
        loop {
            self.commit_wanted.notified().await;
            let mut guard = self.state.clone().lock_owned().await;
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            guard.abandon_savepoint().await;
            guard.end_batch().await;
        }
    }
}

impl State {
    fn conn(&mut self) -> StoreResult<&mut SqliteConnection> {
        match self.conn.as_mut() {
            Some(conn) => Ok(&mut **conn),
            None => Err(StoreError::Unavailable(sqlx::Error::PoolClosed)),
        }
    }

    /// The executor for a statement of the holder of the lock.
    pub(super) fn executor(&mut self) -> StoreResult<&mut SqliteConnection> {
        self.conn()
    }

    async fn run(&mut self, statement: &'static str) -> StoreResult<()> {
        let result = self.conn()?.execute(statement).await;
        result.map(drop).map_err(|err| {
            if matches!(err, sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed) {
                // The connection is broken; the next holder opens a fresh one.
                self.conn = None;
            }
            err.into()
        })
    }

    /// Rolls back the savepoint of a transaction dropped without commit or rollback.
    /// If that fails, SQLite has already rolled the whole batch back (it does on some
    /// I/O errors) or the connection is gone: the batch has failed.
    async fn abandon_savepoint(&mut self) {
        if !self.savepoint_open {
            return;
        }
        self.savepoint_open = false;
        let rolled_back = self.run(ROLLBACK_TO).await.is_ok() && self.run(RELEASE).await.is_ok();
        if !rolled_back {
            self.fail_batch("the transaction was lost").await;
        }
    }

    /// Commits the current batch (one durable write for all its transactions) and
    /// tells its waiters; a new batch starts.
    async fn end_batch(&mut self) {
        if !self.in_batch {
            return;
        }
        match self.run("COMMIT").await {
            Ok(()) => {
                self.in_batch = false;
                let batch = std::mem::replace(&mut self.batch, Batch::new());
                batch.done.send_replace(Some(Ok(())));
            }
            Err(err) => self.fail_batch(&err.to_string()).await,
        }
    }

    /// Ends the current batch without keeping anything of it and tells its waiters
    /// (each of them answers 503); a new batch starts.
    async fn fail_batch(&mut self, reason: &str) {
        tracing::warn!(reason, "store batch lost; its requests get 503");
        if self.conn.is_some() && self.in_batch {
            let _ = self.run("ROLLBACK").await;
        }
        self.in_batch = false;
        self.savepoint_open = false;
        let batch = std::mem::replace(&mut self.batch, Batch::new());
        batch.done.send_replace(Some(Err(Arc::from(reason))));
    }
}

/// A request's transaction on SQLite: holds the connection until it ends.
pub(super) struct SqliteTx {
    guard: Option<OwnedMutexGuard<State>>,
    writer: Arc<Writer>,
}

impl SqliteTx {
    /// The connection, for the transaction's statements.
    pub(super) fn executor(&mut self) -> StoreResult<&mut SqliteConnection> {
        match self.guard.as_mut() {
            Some(guard) => guard.executor(),
            None => Err(StoreError::Unavailable(sqlx::Error::PoolClosed)),
        }
    }

    /// Releases the savepoint into the batch and waits until the batch is durable.
    pub(super) async fn commit(mut self) -> StoreResult<()> {
        let Some(mut guard) = self.guard.take() else {
            return Err(StoreError::Unavailable(sqlx::Error::PoolClosed));
        };
        if let Err(err) = guard.run(RELEASE).await {
            // Left open: the next holder rolls it back.
            drop(guard);
            self.writer.commit_wanted.notify_one();
            return Err(err);
        }
        guard.savepoint_open = false;
        guard.batch.dirty = true;
        self.wait_for_batch(guard).await
    }

    /// Rolls back to the savepoint; waits for the batch when it holds changes this
    /// transaction may have read.
    pub(super) async fn rollback(mut self) -> StoreResult<()> {
        let Some(mut guard) = self.guard.take() else {
            return Ok(());
        };
        guard.abandon_savepoint().await;
        if guard.batch.dirty {
            self.wait_for_batch(guard).await
        } else {
            drop(guard);
            self.writer.commit_wanted.notify_one();
            Ok(())
        }
    }

    async fn wait_for_batch(&self, guard: OwnedMutexGuard<State>) -> StoreResult<()> {
        let mut done = guard.batch.done.subscribe();
        drop(guard);
        self.writer.commit_wanted.notify_one();
        let outcome = done
            .wait_for(Option::is_some)
            .await
            .map(|outcome| outcome.clone())
            .unwrap_or_else(|_| Some(Err(Arc::from("store writer stopped"))));
        match outcome {
            Some(Ok(())) => Ok(()),
            Some(Err(reason)) => Err(StoreError::Unavailable(sqlx::Error::Io(
                std::io::Error::other(format!("group commit failed: {reason}")),
            ))),
            None => Err(StoreError::Unavailable(sqlx::Error::PoolClosed)),
        }
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        // Dropped while running: the savepoint stays open for the next holder to roll
        // back, and the committer ends the batch so the file lock is not kept.
        if self.guard.take().is_some() {
            self.writer.commit_wanted.notify_one();
        }
    }
}
