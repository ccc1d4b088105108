//! The SQLite backend: connection settings, embedded migrations
//! (`migrations/sqlite/`), the store thread with its group commit, and the
//! readers.
//!
//! # One hop per request, one fsync per moment
//!
//! A durable SQLite commit costs an `fsync` of the WAL (0.3–0.8 ms on the
//! development VM), a statement about 5–10 µs. So the store does two things:
//!
//! - **The whole transaction of a request runs as one closure on the store
//!   thread**, which owns the one write connection (`rusqlite`, the library
//!   sqlx-sqlite wraps, used directly so a statement is a function call, not a
//!   round trip to a worker thread). A request crosses to the store once: it
//!   sends its closure and waits for the answer.
//! - **Group commit.** The thread takes every closure waiting when it wakes (up
//!   to [`MAX_BATCH`]), opens `BEGIN IMMEDIATE`, runs each closure inside its own
//!   `SAVEPOINT` (released when the closure returns `Ok`, rolled back to when it
//!   returns `Err` or panics), then commits the batch: one `fsync` for all of
//!   them. Only then is any of them answered.
//!
//! What that guarantees:
//! - An answer (success or refusal) is sent only after the batch it ran in is
//!   durable; if the batch cannot be committed, every request of it gets
//!   [`StoreError::Unavailable`] and nothing of the batch is kept. A request sees
//!   the changes of earlier requests of its batch, exactly as if they had
//!   committed one after the other, and cannot answer before they are durable.
//! - A request refused half-way (its closure returned `Err`) leaves nothing: its
//!   savepoint is rolled back, the rest of the batch is unaffected.
//! - Transactions run one at a time, so a read-then-write inside one closure
//!   (count the failures, then record one) is exact without any further lock.
//! - A request waits at most `acquire_timeout` for its turn: a closure still
//!   queued past its deadline is not run and is answered `Unavailable`.
//! - A failed batch is rolled back and the connection kept: SQLite uses a disk
//!   that was full or a file that was read-only again once it is fixed. (Closing
//!   the last connection would checkpoint and shrink the WAL, which frees space
//!   by chance and hides the fault from readiness.) Only a connection that could
//!   not be opened is tried again, at the next batch.
//!
//! Reads outside a transaction (readiness aside, the enrolment lookup of a
//! verification) use separate reader connections: in WAL mode they see the
//! last committed state and never wait for the writer.
//!
//! Migrations run through sqlx's migrator at open (the same `_sqlx_migrations`
//! bookkeeping as PostgreSQL); the SQL text lives in `sql`, shared with
//! PostgreSQL.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension as _, params};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::oneshot;

use super::error::Cause;
use super::tx::{StoreTx, TxInner};
use super::{CardId, Enrollment, StoreError, StoreResult, StoreSettings, sql};

/// The SQLite schema, embedded at build time.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Most transactions committed together.
const MAX_BATCH: usize = 512;
/// Reader connections kept open at most (more are opened when needed and closed
/// after use).
const MAX_IDLE_READERS: usize = 8;

const SAVEPOINT: &str = "SAVEPOINT request";
const RELEASE: &str = "RELEASE request";
const ROLLBACK_TO: &str = "ROLLBACK TO request; RELEASE request";

/// Opens the file, brings its schema up to date, and starts the store thread.
/// Settings explained:
/// - WAL journal: readers do not block the writer; a commit appends to the log.
/// - `synchronous = FULL`: in WAL mode, `NORMAL` may lose the last commits on power
///   loss; the gateway promises durability before it answers (DESIGN 6).
/// - `busy_timeout`: how long a statement waits on another process's lock (a backup
///   tool, an operator's `sqlite3`) before failing as unavailable.
pub(super) async fn open(path: &Path, settings: &StoreSettings) -> StoreResult<Arc<Sqlite>> {
    migrate(path, settings).await?;
    let path = path.to_path_buf();
    let timeout = settings.acquire_timeout;
    let writer = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || connect(&path, timeout))
            .await
            .map_err(|_| StoreError::Unavailable(Cause::WorkerStopped))??
    };
    let (jobs, queue) = mpsc::channel();
    let store = Arc::new(Sqlite {
        jobs,
        readers: Mutex::new(Vec::new()),
        path: path.clone(),
        acquire_timeout: timeout,
        closed: AtomicBool::new(false),
    });
    let thread = StoreThread {
        path: path.clone(),
        acquire_timeout: timeout,
        conn: Some(writer),
    };
    std::thread::Builder::new()
        .name("store-sqlite".into())
        .spawn(move || thread.run(&queue))
        .map_err(|e| StoreError::Unavailable(Cause::Io(e)))?;
    tracing::info!(path = %path.display(), "store opened (sqlite)");
    Ok(store)
}

/// Runs the migrations through sqlx (creating the file if missing).
async fn migrate(path: &Path, settings: &StoreSettings) -> StoreResult<()> {
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
    let migrated = MIGRATOR.run(&pool).await;
    pool.close().await;
    migrated.map_err(StoreError::from)
}

/// A connection with the store's settings (the journal mode is the file's own,
/// set to WAL by [`migrate`]).
fn connect(path: &Path, busy_timeout: Duration) -> StoreResult<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    Ok(conn)
}

/// Handle to the SQLite backend: the store thread's queue and the readers.
pub(super) struct Sqlite {
    jobs: mpsc::Sender<Job>,
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
    acquire_timeout: Duration,
    closed: AtomicBool,
}

impl Sqlite {
    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Runs `work` as one transaction on the store thread; see the module
    /// documentation for what the answer means.
    pub(super) async fn transact<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: FnOnce(&mut StoreTx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        if self.is_closed() {
            return Err(StoreError::Unavailable(Cause::Closed).into());
        }
        let (reply, answer) = oneshot::channel();
        let job = Job::Work(Box::new(Request {
            work: Some(work),
            result: None,
            reply: Some(reply),
            deadline: Instant::now() + self.acquire_timeout,
            timeout: self.acquire_timeout,
        }));
        if self.jobs.send(job).is_err() {
            return Err(StoreError::Unavailable(Cause::Closed).into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable(Cause::WorkerStopped).into()))
    }

    /// Runs `read` on a reader connection. Blocking: call it from a blocking
    /// thread.
    pub(super) fn read<T>(
        &self,
        read: impl FnOnce(&Connection) -> StoreResult<T>,
    ) -> StoreResult<T> {
        if self.is_closed() {
            return Err(StoreError::Unavailable(Cause::Closed));
        }
        let idle = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = connect(&self.path, self.acquire_timeout)?;
                conn.execute_batch("PRAGMA query_only = ON;")?;
                conn
            }
        };
        let result = read(&conn);
        // A reader that failed may be broken (file replaced, I/O error): drop it.
        if result.is_ok() {
            let mut idle = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
        }
        result
    }

    /// Finishes the batch under way, closes the write connection and the
    /// readers; later calls are unavailable.
    pub(super) async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (done, closed) = oneshot::channel();
        if self.jobs.send(Job::Close(done)).is_ok() {
            let _ = closed.await;
        }
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// A read of the card's enrolment on `conn`.
pub(super) fn read_enrollment(conn: &Connection, card: &CardId) -> StoreResult<Option<Enrollment>> {
    Ok(conn
        .prepare_cached(sql::ENROLLMENT)?
        .query_row(params![card.0.as_slice()], |row| {
            Ok(Enrollment {
                programme: row.get(0)?,
                masked_pan: row.get(1)?,
                enrolled_at: row.get(2)?,
            })
        })
        .optional()?)
}

/// Is the request id claimed and live at `now`, on `conn`?
pub(super) fn read_request_seen(
    conn: &Connection,
    client: &str,
    request_id: &str,
    now: i64,
) -> StoreResult<bool> {
    Ok(conn
        .prepare_cached(sql::REQUEST_SEEN)?
        .query_row(params![client, request_id, now], |_| Ok(()))
        .optional()?
        .is_some())
}

/// What the store thread is asked to do.
enum Job {
    Work(Box<dyn Pending>),
    Close(oneshot::Sender<()>),
}

/// A request's transaction, type-erased for the queue.
trait Pending: Send {
    /// Past its deadline: answered unavailable, not run.
    fn expired(&mut self, now: Instant) -> bool;
    /// Runs the closure; `true` when it returned `Ok` (its savepoint is kept).
    fn run(&mut self, tx: &mut StoreTx<'_>) -> bool;
    /// Answers the request once its batch has ended.
    fn finish(self: Box<Self>, batch: &Result<(), Arc<StoreError>>);
}

struct Request<F, T, E> {
    work: Option<F>,
    result: Option<Result<T, E>>,
    reply: Option<oneshot::Sender<Result<T, E>>>,
    deadline: Instant,
    timeout: Duration,
}

impl<F, T, E> Pending for Request<F, T, E>
where
    F: FnOnce(&mut StoreTx<'_>) -> Result<T, E> + Send,
    T: Send,
    E: From<StoreError> + Send,
{
    fn expired(&mut self, now: Instant) -> bool {
        if now <= self.deadline {
            return false;
        }
        self.work = None;
        self.result = Some(Err(
            StoreError::Unavailable(Cause::Timeout(self.timeout)).into()
        ));
        true
    }

    fn run(&mut self, tx: &mut StoreTx<'_>) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        // A panic in a closure must not take the store thread down: it counts as
        // a failed transaction (rolled back), answered as a bug.
        let result = catch_unwind(AssertUnwindSafe(|| work(tx)))
            .unwrap_or_else(|_| Err(StoreError::Internal(Cause::Panicked).into()));
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(mut self: Box<Self>, batch: &Result<(), Arc<StoreError>>) {
        let answer = match (batch, self.result.take()) {
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::Unavailable(Cause::WorkerStopped).into()),
            (Err(reason), _) => {
                Err(StoreError::Unavailable(Cause::BatchLost(Arc::clone(reason))).into())
            }
        };
        if let Some(reply) = self.reply.take() {
            // The request may have gone (client disconnected): nobody to tell.
            let _ = reply.send(answer);
        }
    }
}

/// The store thread: owns the write connection.
struct StoreThread {
    path: PathBuf,
    acquire_timeout: Duration,
    /// `None` when it could not be opened (again): tried at the next batch.
    conn: Option<Connection>,
}

impl StoreThread {
    fn run(mut self, queue: &mpsc::Receiver<Job>) {
        while let Ok(job) = queue.recv() {
            let mut batch = Vec::new();
            let mut close = None;
            match job {
                Job::Work(pending) => batch.push(pending),
                Job::Close(done) => close = Some(done),
            }
            while close.is_none() && batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(Job::Work(pending)) => batch.push(pending),
                    Ok(Job::Close(done)) => close = Some(done),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit(batch);
            }
            if let Some(done) = close {
                // Requests queued behind the close are answered unavailable.
                while let Ok(Job::Work(pending)) = queue.try_recv() {
                    pending.finish(&Err(Arc::new(StoreError::Unavailable(Cause::Closed))));
                }
                self.conn = None;
                let _ = done.send(());
                return;
            }
        }
    }

    /// Runs one batch and answers every request of it.
    fn commit(&mut self, batch: Vec<Box<dyn Pending>>) {
        let outcome = match self.connection() {
            Ok(conn) => run_batch(conn, batch),
            Err(e) => (Err(e), batch),
        };
        let (result, batch) = outcome;
        let result = result.map_err(|e| {
            tracing::warn!(error = %e, requests = batch.len(), "store batch lost; its requests get 503");
            Arc::new(e)
        });
        for pending in batch {
            pending.finish(&result);
        }
    }

    fn connection(&mut self) -> StoreResult<&Connection> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.path, self.acquire_timeout)?);
        }
        self.conn
            .as_ref()
            .ok_or(StoreError::Unavailable(Cause::Closed))
    }
}

/// `BEGIN IMMEDIATE`, each request in its savepoint, `COMMIT`. Returns the
/// batch's outcome (a reason when nothing of it is kept) and its requests.
fn run_batch(
    conn: &Connection,
    mut batch: Vec<Box<dyn Pending>>,
) -> (StoreResult<()>, Vec<Box<dyn Pending>>) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        return (Err(StoreError::from(e)), batch);
    }
    let now = Instant::now();
    let mut lost = None;
    for pending in &mut batch {
        if pending.expired(now) {
            continue;
        }
        if let Err(e) = conn.execute_batch(SAVEPOINT) {
            lost = Some(StoreError::from(e));
            break;
        }
        let mut tx = StoreTx::new(TxInner::Sqlite(Statements { conn }));
        let end = if pending.run(&mut tx) {
            RELEASE
        } else {
            ROLLBACK_TO
        };
        if let Err(e) = conn.execute_batch(end) {
            lost = Some(StoreError::from(e));
            break;
        }
    }
    let committed = match lost {
        Some(reason) => Err(reason),
        None => conn.execute_batch("COMMIT").map_err(StoreError::from),
    };
    if committed.is_err() && !conn.is_autocommit() {
        // SQLite rolls some failures back by itself; otherwise end it here.
        let _ = conn.execute_batch("ROLLBACK");
    }
    (committed, batch)
}

/// The statements of a transaction on the store thread's connection.
pub(super) struct Statements<'a> {
    conn: &'a Connection,
}

impl Statements<'_> {
    fn execute(&self, statement: &str, values: impl rusqlite::Params) -> StoreResult<u64> {
        let changed = self.conn.prepare_cached(statement)?.execute(values)?;
        Ok(u64::try_from(changed).unwrap_or(u64::MAX))
    }

    pub(super) fn claim_request(
        &mut self,
        client: &str,
        request_id: &str,
        now: i64,
        expires_at: i64,
    ) -> StoreResult<u64> {
        self.execute(
            sql::CLAIM_REQUEST,
            params![client, request_id, expires_at, now],
        )
    }

    pub(super) fn enrollment(&mut self, card: &CardId) -> StoreResult<Option<Enrollment>> {
        read_enrollment(self.conn, card)
    }

    pub(super) fn enroll(&mut self, card: &CardId, e: &Enrollment) -> StoreResult<u64> {
        self.execute(
            sql::ENROLL,
            params![card.0.as_slice(), e.programme, e.masked_pan, e.enrolled_at],
        )
    }

    pub(super) fn unenroll(&mut self, card: &CardId) -> StoreResult<u64> {
        self.execute(sql::UNENROLL, params![card.0.as_slice()])
    }

    pub(super) fn failures_since(&mut self, card: &CardId, since: i64) -> StoreResult<i64> {
        Ok(self
            .conn
            .prepare_cached(sql::FAILURES_SINCE)?
            .query_row(params![card.0.as_slice(), since], |row| row.get(0))?)
    }

    pub(super) fn add_failure(&mut self, card: &CardId, at: i64, expires: i64) -> StoreResult<u64> {
        self.execute(sql::ADD_FAILURE, params![card.0.as_slice(), at, expires])
    }

    pub(super) fn clear_failures(&mut self, card: &CardId) -> StoreResult<u64> {
        self.execute(sql::CLEAR_FAILURES, params![card.0.as_slice()])
    }

    pub(super) fn claim_window(
        &mut self,
        card: &CardId,
        window: i64,
        at: i64,
        expires: i64,
    ) -> StoreResult<u64> {
        self.execute(
            sql::CLAIM_WINDOW,
            params![card.0.as_slice(), window, at, expires],
        )
    }

    pub(super) fn heartbeat(&mut self, now: i64) -> StoreResult<u64> {
        self.execute(sql::HEARTBEAT, params![now])
    }

    pub(super) fn delete_expired(&mut self, now: i64) -> StoreResult<u64> {
        let mut deleted = 0;
        for statement in sql::CLEANUP {
            deleted += self.execute(statement, params![now])?;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values are bound by position: each statement's `$n` must be its n-th
    /// parameter, or a value would land in the wrong column.
    #[test]
    fn placeholders_are_numbered_in_order() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE seen_requests (client, request_id, expires_at, PRIMARY KEY (client, request_id));
             CREATE TABLE enrollments (card_id PRIMARY KEY, programme, masked_pan, enrolled_at);
             CREATE TABLE used_windows (card_id, window_index, used_at, expires_at, PRIMARY KEY (card_id, window_index));
             CREATE TABLE failures (id INTEGER PRIMARY KEY, card_id, at, expires_at);
             CREATE TABLE heartbeat (id PRIMARY KEY, at);",
        )
        .unwrap();
        let mut statements = vec![
            sql::CLAIM_REQUEST,
            sql::REQUEST_SEEN,
            sql::ENROLLMENT,
            sql::ENROLL,
            sql::UNENROLL,
            sql::FAILURES_SINCE,
            sql::ADD_FAILURE,
            sql::CLEAR_FAILURES,
            sql::CLAIM_WINDOW,
            sql::HEARTBEAT,
        ];
        statements.extend(sql::CLEANUP);
        for text in statements {
            let statement = conn.prepare(text).unwrap();
            for i in 1..=statement.parameter_count() {
                assert_eq!(
                    statement.parameter_name(i),
                    Some(format!("${i}").as_str()),
                    "{text}"
                );
            }
        }
    }
}
