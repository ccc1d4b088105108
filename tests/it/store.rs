//! The persistence port against real databases: every backend-neutral test runs
//! twice, on a fresh SQLite file and on a fresh PostgreSQL database (a throwaway
//! cluster of this test process, `support/postgres.rs`); each test below is a
//! module with a `sqlite` and a `postgres` test.
//!
//! What the store's callers rely on: schema creation and idempotent migrations,
//! replay refusal with expiry, all-or-nothing transactions (a closure that returns
//! `Err` or panics keeps nothing), idempotent enrolment, failure counting, single
//! use of windows and an exact failure limit under many concurrent transactions,
//! cleanup, durability of a commit when it returns and across close and reopen, a
//! refusal half-way through one transaction that leaves the others of its batch
//! alone, and `Unavailable` (never a bug report) when the database cannot be
//! written, is locked past the timeout, is stopped, or the store is closed. Rows
//! are counted through a separate raw connection, not through the store.
//! SQLite-only tests (read-only files, the file lock, the store thread: reads that
//! do not wait for it, a request queued past its timeout, a batch whose commit
//! fails on a full disk) and PostgreSQL-only tests (server stopped and started,
//! several stores on one database as several gateway processes would have) follow
//! the shared ones.
//!
//! Every transaction is a [`Store::transact`] closure; a test that needs one to
//! stay open (to race it, or to stop the server under it) stops it inside its
//! closure at a [`Paused`] point until the test releases it.

use std::fs::{self, OpenOptions, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::task::Poll;
use std::time::{Duration, Instant};

use dcvv_gateway::store::{
    CardId, Cause, DatabaseUrl, Enrollment, PostgresLocation, Store, StoreError, StoreResult,
    StoreSettings, StoreTx,
};
use proptest::prelude::*;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support;
use crate::support::postgres::PG;

const T0: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z
const TABLES: [&str; 5] = [
    "seen_requests",
    "enrollments",
    "used_windows",
    "failures",
    "heartbeat",
];

/// Which backend a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// Generates, for each named `async fn name(kind: Kind)`, a module `name` with the
/// tests `sqlite` and `postgres`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name(super::Kind::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name(super::Kind::Postgres).await;
            }
        }
    )*};
}

/// A store on a new SQLite file in its own directory, or a new PostgreSQL database.
struct TestStore {
    kind: Kind,
    dir: TempDir,
    /// The PostgreSQL database's name (unused on SQLite).
    database: String,
    store: Store,
}

impl TestStore {
    async fn new(kind: Kind) -> Self {
        Self::with_timeout(kind, Duration::from_secs(10)).await
    }

    async fn with_timeout(kind: Kind, acquire_timeout: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = match kind {
            Kind::Sqlite => String::new(),
            Kind::Postgres => PG.fresh_database().await,
        };
        let settings = settings(kind, dir.path(), &database, acquire_timeout);
        let store = Store::open(&settings).await.unwrap();
        assert_eq!(
            store.backend_name(),
            match kind {
                Kind::Sqlite => "sqlite",
                Kind::Postgres => "postgres",
            }
        );
        Self {
            kind,
            dir,
            database,
            store,
        }
    }

    fn path(&self) -> PathBuf {
        db_path(self.dir.path())
    }

    fn settings(&self) -> StoreSettings {
        settings(
            self.kind,
            self.dir.path(),
            &self.database,
            Duration::from_secs(10),
        )
    }

    async fn reopen(&self) -> Store {
        Store::open(&self.settings()).await.unwrap()
    }

    async fn raw(&self) -> Raw {
        match self.kind {
            Kind::Sqlite => Raw::Sqlite(raw(&self.path()).await),
            Kind::Postgres => Raw::Postgres(PG.connect(&self.database).await),
        }
    }

    async fn count(&self, table: &str) -> i64 {
        let mut conn = self.raw().await;
        let n = conn.scalar(&format!("SELECT COUNT(*) FROM {table}")).await;
        conn.close().await;
        n
    }

    async fn counts(&self) -> Vec<(&'static str, i64)> {
        let mut counts = Vec::new();
        for table in TABLES {
            counts.push((table, self.count(table).await));
        }
        counts
    }
}

/// A second, independent connection to the same database, as another process
/// would have.
enum Raw {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Raw {
    /// The one BIGINT an SQL statement returns.
    async fn scalar(&mut self, sql: &str) -> i64 {
        match self {
            Raw::Sqlite(conn) => sqlx::query_scalar(sql).fetch_one(conn).await.unwrap(),
            Raw::Postgres(conn) => sqlx::query_scalar(sql).fetch_one(conn).await.unwrap(),
        }
    }

    /// The number of rows of `table` (`enrollments`, `used_windows`, `failures`)
    /// that belong to `card`.
    async fn rows_of(&mut self, table: &str, card: &CardId) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE card_id = $1");
        match self {
            Raw::Sqlite(conn) => sqlx::query_scalar(&sql)
                .bind(card.0.as_slice())
                .fetch_one(conn)
                .await
                .unwrap(),
            Raw::Postgres(conn) => sqlx::query_scalar(&sql)
                .bind(card.0.as_slice())
                .fetch_one(conn)
                .await
                .unwrap(),
        }
    }

    /// The number of enrolments of `card`.
    async fn enrolled(&mut self, card: &CardId) -> i64 {
        self.rows_of("enrollments", card).await
    }

    async fn execute(&mut self, sql: &str) {
        match self {
            Raw::Sqlite(conn) => drop(sqlx::query(sql).execute(conn).await.unwrap()),
            Raw::Postgres(conn) => drop(sqlx::query(sql).execute(conn).await.unwrap()),
        }
    }

    async fn close(self) {
        match self {
            Raw::Sqlite(conn) => conn.close().await.unwrap(),
            Raw::Postgres(conn) => conn.close().await.unwrap(),
        }
    }
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join("store.db")
}

fn pg_settings(
    database: &str,
    password_dir: &Path,
    acquire_timeout: Duration,
    max_connections: u32,
) -> StoreSettings {
    StoreSettings::postgres(
        PostgresLocation {
            url: DatabaseUrl::Value(PG.url(database)),
            password_file: Some(PG.password_file(password_dir)),
        },
        acquire_timeout,
        max_connections,
    )
}

fn settings(kind: Kind, dir: &Path, database: &str, acquire_timeout: Duration) -> StoreSettings {
    match kind {
        Kind::Sqlite => StoreSettings::sqlite(db_path(dir), acquire_timeout),
        Kind::Postgres => pg_settings(database, dir, acquire_timeout, 8),
    }
}

/// A second, independent connection to the same file, as another process would have.
async fn raw(path: &Path) -> SqliteConnection {
    SqliteConnectOptions::new()
        .filename(path)
        .connect()
        .await
        .unwrap()
}

fn card(n: u8) -> CardId {
    CardId([n; 32])
}

/// One of many cards (distinct from every `card(n)`, and in its first 8 bytes,
/// PostgreSQL's card lock key).
fn card_of(n: u32) -> CardId {
    let mut id = [0xee; 32];
    id[..4].copy_from_slice(&n.to_be_bytes());
    CardId(id)
}

fn enrollment(programme: &str, at: i64) -> Enrollment {
    Enrollment {
        programme: programme.to_owned(),
        masked_pan: "412345******2345".to_owned(),
        enrolled_at: at,
    }
}

fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, StoreError>) -> StoreError {
    let err = result.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.is_unavailable());
    err
}

// ---- running transactions ----

/// Runs `work` as one transaction of `store`, with the store's own error type.
async fn transact<T: Send + 'static>(
    store: &Store,
    work: impl FnOnce(&mut StoreTx<'_>) -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    store.transact(work).await
}

/// Runs `work` on `store` in a task of its own, and counts `queued` up once the
/// store holds the transaction (on SQLite: it is in the store thread's queue; on
/// PostgreSQL: its blocking thread is started), so a test can wait until every
/// transaction of a batch is queued before it lets the store thread go on.
fn spawn_transaction<T: Send + 'static>(
    store: &Store,
    queued: &Arc<AtomicUsize>,
    work: impl FnOnce(&mut StoreTx<'_>) -> StoreResult<T> + Send + 'static,
) -> JoinHandle<StoreResult<T>> {
    let (store, queued) = (store.clone(), Arc::clone(queued));
    tokio::spawn(async move {
        let mut answer = std::pin::pin!(store.transact(work));
        // The first poll hands the closure to the store.
        let early = std::future::poll_fn(|cx| Poll::Ready(answer.as_mut().poll(cx))).await;
        queued.fetch_add(1, Ordering::SeqCst);
        match early {
            Poll::Ready(result) => result,
            Poll::Pending => answer.await,
        }
    })
}

/// Waits until `n` transactions are queued (see [`spawn_transaction`]).
async fn until_queued(queued: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while queued.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "the transactions were not queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The test's side of a point inside a transaction's closure where the closure
/// stops until the test releases it.
struct Pause {
    reached: oneshot::Receiver<()>,
    release: mpsc::Sender<()>,
}

/// The closure's side of a [`Pause`].
struct Paused {
    reached: oneshot::Sender<()>,
    release: mpsc::Receiver<()>,
}

fn pause() -> (Pause, Paused) {
    let (reached_tx, reached) = oneshot::channel();
    let (release, release_rx) = mpsc::channel();
    (
        Pause { reached, release },
        Paused {
            reached: reached_tx,
            release: release_rx,
        },
    )
}

impl Pause {
    /// Waits until the closure is at its pause.
    async fn reached(&mut self) {
        (&mut self.reached)
            .await
            .expect("the transaction reached its pause");
    }

    /// Lets the closure go on.
    fn release(&self) {
        let _ = self.release.send(());
    }
}

impl Paused {
    /// Inside the closure (on the store's side: it blocks that thread): says the
    /// closure got here and waits to be released, at most 30 s so a failed test
    /// cannot hang the store for ever.
    fn here(self) {
        let _ = self.reached.send(());
        let _ = self.release.recv_timeout(Duration::from_secs(30));
    }
}

/// A transaction that changes nothing and holds the store (on SQLite the store
/// thread, so every transaction sent meanwhile waits in its queue and the next
/// batch takes them all) until [`Held::release`].
struct Held {
    pause: Pause,
    answer: JoinHandle<StoreResult<()>>,
}

async fn hold(store: &Store) -> Held {
    let (mut pause, paused) = pause();
    let store = store.clone();
    let answer = tokio::spawn(async move {
        transact(&store, move |_tx| {
            paused.here();
            Ok(())
        })
        .await
    });
    pause.reached().await;
    Held { pause, answer }
}

impl Held {
    async fn release(self) -> StoreResult<()> {
        self.pause.release();
        self.answer.await.unwrap()
    }
}

/// A refusal of the caller's own, as the domain makes half-way through a request
/// (a wrong code after the failure count, say): the store only needs its own
/// errors to convert into it.
#[derive(Debug)]
enum Refusal {
    Refused,
    Store(StoreError),
}

impl From<StoreError> for Refusal {
    fn from(err: StoreError) -> Self {
        Self::Store(err)
    }
}

/// `true` for the caller's refusal, `false` for success; a store error fails.
fn refused(result: Result<(), Refusal>) -> bool {
    match result {
        Ok(()) => false,
        Err(Refusal::Refused) => true,
        Err(Refusal::Store(err)) => panic!("store error: {err:?}"),
    }
}

on_both_backends!(
    migrations_create_the_schema,
    reopening_runs_no_migration_twice,
    a_database_from_a_newer_schema_is_refused,
    claim_request_refuses_a_live_duplicate_and_accepts_it_after_expiry,
    request_ids_are_per_client,
    a_rolled_back_transaction_leaves_nothing,
    a_transaction_whose_closure_panics_leaves_nothing_and_the_store_keeps_working,
    committed_state_survives_close_and_reopen,
    enroll_is_idempotent_and_keeps_the_first_enrolment,
    unenroll_is_idempotent_and_clears_only_this_cards_failures,
    a_masked_pan_made_of_digits_only_is_refused,
    failures_since_counts_only_failures_at_or_after_since,
    claim_window_is_single_use_per_card_and_window,
    concurrent_claims_of_one_window_have_exactly_one_winner,
    many_concurrent_verifications_of_one_window_have_exactly_one_approval,
    concurrent_commits_are_each_durable_when_they_return,
    a_request_refused_mid_transaction_leaves_nothing_and_its_batch_is_kept,
    concurrent_failure_counts_under_the_card_lock_never_pass_the_limit,
    many_concurrent_failure_checks_never_pass_the_limit,
    cleanup_deletes_only_expired_rows_of_all_three_tables,
    probe_writes_the_heartbeat,
    every_call_after_close_is_unavailable,
);

// ---- schema and migrations ----

async fn migrations_create_the_schema(kind: Kind) {
    let t = TestStore::new(kind).await;
    let (tables_sql, indexes_sql) = match kind {
        Kind::Sqlite => {
            assert!(t.path().is_file());
            (
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL \
                 ORDER BY name",
            )
        }
        Kind::Postgres => (
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
        ),
    };
    let (tables, indexes): (Vec<String>, Vec<String>) = match t.raw().await {
        Raw::Sqlite(mut conn) => {
            let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&mut conn)
                .await
                .unwrap();
            assert_eq!(journal, "wal");
            (
                sqlx::query_scalar(tables_sql)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap(),
                sqlx::query_scalar(indexes_sql)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap(),
            )
        }
        Raw::Postgres(mut conn) => {
            let card_type: String = sqlx::query_scalar(
                "SELECT data_type::text FROM information_schema.columns \
                 WHERE table_name = 'enrollments' AND column_name = 'card_id'",
            )
            .fetch_one(&mut conn)
            .await
            .unwrap();
            assert_eq!(card_type, "bytea");
            (
                sqlx::query_scalar(tables_sql)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap(),
                sqlx::query_scalar(indexes_sql)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap(),
            )
        }
    };
    for table in TABLES {
        assert!(tables.iter().any(|t| t == table), "{table} in {tables:?}");
    }
    for index in ["seen_requests_expires_at", "failures_card_id_at"] {
        assert!(indexes.iter().any(|i| i == index), "{index} in {indexes:?}");
    }

    assert_eq!(t.count("heartbeat").await, 1);
    for table in ["seen_requests", "enrollments", "used_windows", "failures"] {
        assert_eq!(t.count(table).await, 0, "{table}");
    }
}

async fn reopening_runs_no_migration_twice(kind: Kind) {
    let t = TestStore::new(kind).await;
    let applied = t.count("_sqlx_migrations").await;
    assert!(applied >= 1);
    t.store.close().await;

    for _ in 0..2 {
        let store = t.reopen().await;
        store.probe(T0).await.unwrap();
        store.close().await;
    }
    assert_eq!(t.count("_sqlx_migrations").await, applied);
    assert_eq!(t.count("heartbeat").await, 1);
}

async fn a_database_from_a_newer_schema_is_refused(kind: Kind) {
    let t = TestStore::new(kind).await;
    t.store.close().await;
    let mut conn = t.raw().await;
    conn.execute(match kind {
        Kind::Sqlite => {
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES (99990101000000, 'from the future', 1, x'00', 0)"
        }
        Kind::Postgres => {
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES (99990101000000, 'from the future', true, '\\x00', 0)"
        }
    })
    .await;
    conn.close().await;

    let err = Store::open(&t.settings()).await.unwrap_err();
    assert!(matches!(err, StoreError::Migrate(_)), "{err:?}");
    assert!(!err.is_unavailable());
}

#[tokio::test]
async fn sqlite_open_is_unavailable_when_the_directory_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let result = Store::open(&StoreSettings::sqlite(
        db_path(&missing),
        Duration::from_secs(2),
    ))
    .await;
    assert_unavailable(result);
    assert!(!missing.exists());
}

// ---- request ids ----

async fn claim_request_refuses_a_live_duplicate_and_accepts_it_after_expiry(kind: Kind) {
    let t = TestStore::new(kind).await;
    let expires = T0 + 900;

    transact(&t.store, move |tx| {
        tx.claim_request("client-a", "req-1", T0, expires)
    })
    .await
    .unwrap();
    assert!(
        t.store
            .is_request_seen("client-a", "req-1", T0)
            .await
            .unwrap()
    );
    assert!(
        t.store
            .is_request_seen("client-a", "req-1", expires - 1)
            .await
            .unwrap()
    );

    // Within the window, also at its last second: refused.
    for now in [T0, expires - 1] {
        let err = transact(&t.store, move |tx| {
            tx.claim_request("client-a", "req-1", now, now + 900)
        })
        .await
        .unwrap_err();
        assert!(matches!(err, StoreError::DuplicateRequest), "{err:?}");
        assert!(!err.is_unavailable());
    }

    // Expired (expires_at <= now): no longer seen, and claimable again.
    assert!(
        !t.store
            .is_request_seen("client-a", "req-1", expires)
            .await
            .unwrap()
    );
    transact(&t.store, move |tx| {
        tx.claim_request("client-a", "req-1", expires, expires + 900)
    })
    .await
    .unwrap();
    assert!(
        t.store
            .is_request_seen("client-a", "req-1", expires + 899)
            .await
            .unwrap()
    );
    assert_eq!(t.count("seen_requests").await, 1);

    // The renewed claim is live again.
    let err = transact(&t.store, move |tx| {
        tx.claim_request("client-a", "req-1", expires + 1, expires + 901)
    })
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::DuplicateRequest), "{err:?}");
}

async fn request_ids_are_per_client(kind: Kind) {
    let t = TestStore::new(kind).await;
    transact(&t.store, |tx| {
        tx.claim_request("client-a", "req-1", T0, T0 + 900)?;
        tx.claim_request("client-b", "req-1", T0, T0 + 900)?;
        tx.claim_request("client-a", "req-2", T0, T0 + 900)
    })
    .await
    .unwrap();
    assert_eq!(t.count("seen_requests").await, 3);
    assert!(
        !t.store
            .is_request_seen("client-c", "req-1", T0)
            .await
            .unwrap()
    );
}

// ---- transactions ----

/// Makes one change of every kind in `tx`.
fn change_everything(tx: &mut StoreTx<'_>) -> StoreResult<()> {
    tx.claim_request("client-a", "req-1", T0, T0 + 900)?;
    assert!(tx.enroll(&card(1), &enrollment("visa", T0))?);
    tx.add_failure(&card(1), T0, T0 + 86_400)?;
    assert!(tx.claim_window(&card(1), 7, T0, T0 + 600)?);
    // The transaction sees its own writes.
    assert_eq!(tx.enrollment(&card(1))?, Some(enrollment("visa", T0)));
    assert_eq!(tx.failures_since(&card(1), T0)?, 1);
    Ok(())
}

/// A closure that returns its caller's own error after changing everything: the
/// store rolls it all back and hands that error back as it is.
async fn a_rolled_back_transaction_leaves_nothing(kind: Kind) {
    let t = TestStore::new(kind).await;
    let before = t.counts().await;

    let result = t
        .store
        .transact(|tx| {
            change_everything(tx)?;
            Err::<(), _>(Refusal::Refused)
        })
        .await;
    assert!(refused(result));

    assert_eq!(t.counts().await, before);
    assert_eq!(t.store.enrollment(&card(1)).await.unwrap(), None);
    assert!(
        !t.store
            .is_request_seen("client-a", "req-1", T0)
            .await
            .unwrap()
    );
}

/// A closure that panics half-way (a bug in a request) is rolled back: nothing of
/// it is kept, it is answered `Internal` (a bug, not "unavailable"), and the store
/// keeps working: the next transaction succeeds, and the transactions running
/// beside it (on SQLite: in its batch) are kept. Replaces the old API's "a
/// transaction dropped without commit leaves nothing": a closure cannot be left
/// half-done any other way.
async fn a_transaction_whose_closure_panics_leaves_nothing_and_the_store_keeps_working(kind: Kind) {
    let t = TestStore::new(kind).await;
    let before = t.counts().await;

    let err = transact(&t.store, |tx| -> StoreResult<()> {
        change_everything(tx)?;
        panic!("a bug half-way through a transaction");
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, StoreError::Internal(Cause::Panicked)),
        "{err:?}"
    );
    assert!(!err.is_unavailable());

    // Nothing was kept, and the store takes the next transaction at once.
    assert_eq!(t.store.enrollment(&card(1)).await.unwrap(), None);
    assert_eq!(t.counts().await, before);
    transact(&t.store, |tx| {
        tx.claim_request("client-a", "req-1", T0, T0 + 900)
    })
    .await
    .unwrap();
    assert!(
        t.store
            .is_request_seen("client-a", "req-1", T0)
            .await
            .unwrap()
    );

    // One panic among 16 transactions queued together (on SQLite: one batch, the
    // panic in the middle of it): only the panicking one is lost.
    let held = match kind {
        Kind::Sqlite => Some(hold(&t.store).await),
        Kind::Postgres => None,
    };
    let queued = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16_u32)
        .map(|i| {
            spawn_transaction(&t.store, &queued, move |tx| {
                tx.enroll(&card_of(i), &enrollment("visa", T0))?;
                assert!(i != 5, "a bug in request {i}");
                Ok(())
            })
        })
        .collect();
    until_queued(&queued, 16).await;
    if let Some(held) = held {
        held.release().await.unwrap();
    }
    for (i, task) in (0..16_u32).zip(tasks) {
        let result = task.await.unwrap();
        if i == 5 {
            let err = result.unwrap_err();
            assert!(
                matches!(err, StoreError::Internal(Cause::Panicked)),
                "{err:?}"
            );
        } else {
            result.unwrap();
        }
    }
    let mut conn = t.raw().await;
    for i in 0..16_u32 {
        assert_eq!(conn.enrolled(&card_of(i)).await, i64::from(i != 5), "{i}");
    }
    conn.close().await;
}

/// How long a read outside a transaction may take on a quiet store.
const PROMPT: Duration = Duration::from_secs(2);

/// `read`'s answer, or a failure if it takes as long as waiting for a writer would.
async fn promptly<T>(read: impl Future<Output = T>) -> T {
    tokio::time::timeout(PROMPT, read)
        .await
        .expect("a read waited for the open transaction")
}

/// Reads outside a transaction use their own connections (WAL readers): they do
/// not wait for a transaction under way, and see only what is committed. (With the
/// old one-connection store, a read waited for an open transaction, up to the
/// acquire timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_reads_do_not_wait_for_an_open_transaction_and_see_only_committed_state() {
    // Acquire timeout 10 s: a read that waited for the writer would wait that long.
    let t = TestStore::new(Kind::Sqlite).await;
    transact(&t.store, |tx| {
        tx.enroll(&card(1), &enrollment("visa", T0))?;
        tx.claim_request("client-a", "req-0", T0, T0 + 900)
    })
    .await
    .unwrap();

    // A transaction that has changed things stops on the store thread (which holds
    // the file's write lock) until released.
    let (mut pause, paused) = pause();
    let open = tokio::spawn({
        let store = t.store.clone();
        async move {
            transact(&store, move |tx| {
                assert!(tx.unenroll(&card(1))?);
                assert!(tx.enroll(&card(2), &enrollment("mc", T0 + 1))?);
                tx.claim_request("client-a", "req-1", T0 + 1, T0 + 901)?;
                paused.here();
                Ok(())
            })
            .await
        }
    });
    pause.reached().await;

    let started = Instant::now();
    let first = promptly(t.store.enrollment(&card(1))).await;
    assert_eq!(first.unwrap(), Some(enrollment("visa", T0)));
    assert_eq!(promptly(t.store.enrollment(&card(2))).await.unwrap(), None);
    let seen = promptly(t.store.is_request_seen("client-a", "req-1", T0 + 1)).await;
    assert!(!seen.unwrap());
    let seen = promptly(t.store.is_request_seen("client-a", "req-0", T0)).await;
    assert!(seen.unwrap());
    assert!(started.elapsed() < PROMPT, "{:?}", started.elapsed());
    assert!(!open.is_finished(), "the transaction is still open");

    pause.release();
    open.await.unwrap().unwrap();
    // Committed now: the readers see it.
    assert_eq!(t.store.enrollment(&card(1)).await.unwrap(), None);
    assert_eq!(
        t.store.enrollment(&card(2)).await.unwrap(),
        Some(enrollment("mc", T0 + 1))
    );
    assert!(
        t.store
            .is_request_seen("client-a", "req-1", T0 + 1)
            .await
            .unwrap()
    );
}

/// A request waits at most the acquire timeout for its turn: a transaction queued
/// behind one that holds the store thread longer than that is answered
/// `Unavailable` without being run (its change is not kept); the one that held the
/// thread started in time and is committed; the store then takes new work.
/// (Replaces "store calls wait for an open transaction and give up after the
/// acquire timeout" of the one-connection store.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_transaction_queued_past_the_acquire_timeout_is_answered_unavailable_unrun() {
    let acquire = Duration::from_millis(300);
    let t = TestStore::with_timeout(Kind::Sqlite, acquire).await;

    let (mut pause, paused) = pause();
    let slow = tokio::spawn({
        let store = t.store.clone();
        async move {
            transact(&store, move |tx| {
                tx.enroll(&card(1), &enrollment("visa", T0))?;
                let _ = paused.reached.send(());
                std::thread::sleep(acquire * 3);
                Ok(())
            })
            .await
        }
    });
    pause.reached().await;

    let ran = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let err = transact(&t.store, {
        let ran = Arc::clone(&ran);
        move |tx| {
            ran.store(true, Ordering::SeqCst);
            tx.enroll(&card(2), &enrollment("visa", T0)).map(drop)
        }
    })
    .await
    .unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(err, StoreError::Unavailable(Cause::Timeout(d)) if d == acquire),
        "{err:?}"
    );
    assert!(err.is_unavailable());
    assert!(!ran.load(Ordering::SeqCst), "a timed-out transaction ran");
    assert!(waited >= acquire, "answered after {waited:?}");

    slow.await.unwrap().unwrap();
    assert_eq!(
        t.store.enrollment(&card(1)).await.unwrap(),
        Some(enrollment("visa", T0))
    );
    assert_eq!(t.store.enrollment(&card(2)).await.unwrap(), None);
    assert_eq!(t.count("enrollments").await, 1);

    transact(&t.store, |tx| tx.enroll(&card(3), &enrollment("visa", T0)))
        .await
        .unwrap();
    assert_eq!(t.count("enrollments").await, 2);
}

async fn committed_state_survives_close_and_reopen(kind: Kind) {
    let t = TestStore::new(kind).await;
    transact(&t.store, change_everything).await.unwrap();
    t.store.close().await;

    let store = t.reopen().await;
    assert!(
        store
            .is_request_seen("client-a", "req-1", T0)
            .await
            .unwrap()
    );
    assert_eq!(
        store.enrollment(&card(1)).await.unwrap(),
        Some(enrollment("visa", T0))
    );
    let (failures, won, replay) = transact(&store, |tx| {
        Ok((
            tx.failures_since(&card(1), T0)?,
            tx.claim_window(&card(1), 7, T0, T0 + 600)?,
            tx.claim_request("client-a", "req-1", T0 + 1, T0 + 901),
        ))
    })
    .await
    .unwrap();
    assert_eq!(failures, 1);
    assert!(!won);
    assert!(
        matches!(replay, Err(StoreError::DuplicateRequest)),
        "{replay:?}"
    );
    store.close().await;
}

// ---- enrolment and failures ----

async fn enroll_is_idempotent_and_keeps_the_first_enrolment(kind: Kind) {
    let t = TestStore::new(kind).await;
    transact(&t.store, |tx| {
        assert_eq!(tx.enrollment(&card(1))?, None);
        assert!(tx.enroll(&card(1), &enrollment("visa", T0))?);
        assert!(!tx.enroll(&card(1), &enrollment("other", T0 + 60))?);
        assert!(tx.enroll(&card(2), &enrollment("mc", T0 + 5))?);
        Ok(())
    })
    .await
    .unwrap();

    assert_eq!(
        t.store.enrollment(&card(1)).await.unwrap(),
        Some(enrollment("visa", T0))
    );
    assert_eq!(
        t.store.enrollment(&card(2)).await.unwrap(),
        Some(enrollment("mc", T0 + 5))
    );
    assert_eq!(t.store.enrollment(&card(3)).await.unwrap(), None);
    assert_eq!(t.count("enrollments").await, 2);
}

async fn unenroll_is_idempotent_and_clears_only_this_cards_failures(kind: Kind) {
    let t = TestStore::new(kind).await;
    transact(&t.store, |tx| {
        tx.enroll(&card(1), &enrollment("visa", T0))?;
        tx.enroll(&card(2), &enrollment("visa", T0))?;
        for i in 0..3 {
            tx.add_failure(&card(1), T0 + i, T0 + 86_400)?;
        }
        tx.add_failure(&card(2), T0, T0 + 86_400)?;
        assert!(tx.claim_window(&card(1), 7, T0, T0 + 600)?);
        Ok(())
    })
    .await
    .unwrap();

    transact(&t.store, |tx| {
        assert!(tx.unenroll(&card(1))?);
        assert!(!tx.unenroll(&card(1))?);
        assert!(!tx.unenroll(&card(3))?);
        assert_eq!(tx.enrollment(&card(1))?, None);
        assert_eq!(tx.failures_since(&card(1), 0)?, 0);
        assert_eq!(tx.failures_since(&card(2), 0)?, 1);
        // A used window stays used across an unenrol/enrol cycle.
        assert!(tx.enroll(&card(1), &enrollment("visa", T0 + 10))?);
        assert!(!tx.claim_window(&card(1), 7, T0 + 10, T0 + 600)?);
        Ok(())
    })
    .await
    .unwrap();

    assert_eq!(t.count("failures").await, 1);
    assert_eq!(
        t.store.enrollment(&card(2)).await.unwrap(),
        Some(enrollment("visa", T0))
    );
}

async fn a_masked_pan_made_of_digits_only_is_refused(kind: Kind) {
    let t = TestStore::new(kind).await;
    let clear = Enrollment {
        masked_pan: "4123456789012345".to_owned(),
        ..enrollment("visa", T0)
    };
    let err = transact(&t.store, move |tx| tx.enroll(&card(1), &clear))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
    // The message names the constraint, never the value.
    assert!(!err.to_string().contains("4123456789012345"), "{err}");
    assert_eq!(t.count("enrollments").await, 0);
}

async fn failures_since_counts_only_failures_at_or_after_since(kind: Kind) {
    let t = TestStore::new(kind).await;
    transact(&t.store, |tx| {
        for at in [T0 - 100, T0 - 1, T0, T0 + 1, T0 + 100] {
            tx.add_failure(&card(1), at, at + 86_400)?;
        }
        tx.add_failure(&card(2), T0, T0 + 86_400)?;
        assert_eq!(tx.failures_since(&card(1), T0 - 100)?, 5);
        assert_eq!(tx.failures_since(&card(1), T0)?, 3);
        assert_eq!(tx.failures_since(&card(1), T0 + 101)?, 0);
        assert_eq!(tx.failures_since(&card(3), 0)?, 0);

        tx.clear_failures(&card(1))?;
        assert_eq!(tx.failures_since(&card(1), 0)?, 0);
        assert_eq!(tx.failures_since(&card(2), 0)?, 1);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(t.count("failures").await, 1);
}

// ---- windows ----

async fn claim_window_is_single_use_per_card_and_window(kind: Kind) {
    let t = TestStore::new(kind).await;
    transact(&t.store, |tx| {
        assert!(tx.claim_window(&card(1), 100, T0, T0 + 600)?);
        assert!(!tx.claim_window(&card(1), 100, T0 + 1, T0 + 601)?);
        assert!(tx.claim_window(&card(1), 101, T0, T0 + 600)?);
        assert!(tx.claim_window(&card(2), 100, T0, T0 + 600)?);
        Ok(())
    })
    .await
    .unwrap();

    transact(&t.store, |tx| {
        assert!(!tx.claim_window(&card(1), 100, T0 + 2, T0 + 602)?);
        assert!(!tx.claim_window(&card(2), 100, T0 + 2, T0 + 602)?);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(t.count("used_windows").await, 3);
}

async fn concurrent_claims_of_one_window_have_exactly_one_winner(kind: Kind) {
    let t = TestStore::new(kind).await;
    let store = t.store.clone();
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                transact(&store, move |tx| {
                    tx.claim_window(&card(9), 42, T0 + i, T0 + 600)
                })
                .await
                .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        if task.await.unwrap() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(t.count("used_windows").await, 1);
}

/// Issue 9: many concurrent requests on one store keep single use exact. 64
/// verifications of one enrolled card's window race, each the whole transaction
/// of a request (its request id, the enrolment, the card lock, the failure count,
/// the window claim): exactly one approves, and every request id is kept.
async fn many_concurrent_verifications_of_one_window_have_exactly_one_approval(kind: Kind) {
    const N: usize = 64;
    const LIMIT: u32 = 5;
    let t = TestStore::new(kind).await;
    transact(&t.store, |tx| tx.enroll(&card(9), &enrollment("visa", T0)))
        .await
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = t.store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                transact(&store, move |tx| {
                    tx.claim_request("client-a", &format!("verify-{i}"), T0, T0 + 900)?;
                    assert!(tx.enrollment(&card(9))?.is_some());
                    tx.lock_card(&card(9))?;
                    assert!(tx.failures_since(&card(9), T0 - 86_400)? < LIMIT);
                    tx.claim_window(&card(9), 42, T0, T0 + 600)
                })
                .await
                .unwrap()
            })
        })
        .collect();
    let mut approvals = 0;
    for task in tasks {
        if task.await.unwrap() {
            approvals += 1;
        }
    }
    assert_eq!(approvals, 1);
    assert_eq!(t.count("used_windows").await, 1);
    assert_eq!(t.count("seen_requests").await, N as i64);
}

async fn concurrent_commits_are_each_durable_when_they_return(kind: Kind) {
    // Group commit: many requests share one durable commit, yet each transaction
    // returns only once its change can be read from another connection, and a
    // transaction refused in the middle of the group keeps nothing of its own.
    let t = Arc::new(TestStore::new(kind).await);
    let tasks: Vec<_> = (0..64_u8)
        .map(|i| {
            let store = t.store.clone();
            let t = Arc::clone(&t);
            tokio::spawn(async move {
                let result = store
                    .transact(move |tx| {
                        tx.claim_request("client-a", &format!("req-{i}"), T0, T0 + 900)?;
                        tx.enroll(&card(i), &enrollment("visa", T0))?;
                        if i % 8 == 7 {
                            return Err(Refusal::Refused);
                        }
                        Ok(())
                    })
                    .await;
                assert_eq!(refused(result), i % 8 == 7, "{i}");
                if i % 8 == 7 {
                    return;
                }
                let mut conn = t.raw().await;
                let seen = conn.enrolled(&card(i)).await;
                assert_eq!(
                    seen, 1,
                    "request {i} returned before its change was durable"
                );
                conn.close().await;
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(t.count("enrollments").await, 56);
    assert_eq!(t.count("seen_requests").await, 56);
    for i in (7..64).step_by(8) {
        assert_eq!(t.store.enrollment(&card(i)).await.unwrap(), None, "{i}");
    }
}

/// Issue 9: a request refused mid-transaction leaves nothing behind, and the other
/// requests of its batch are kept and durable. 128 transactions each claim a
/// request id, enrol a card, claim a window and record a failure; every 8th then
/// replays a request id already claimed, so the store refuses it
/// (`DuplicateRequest`) after its writes. On SQLite the store thread is held
/// while all 128 are queued, so they run as one batch (each in its savepoint of
/// one `BEGIN IMMEDIATE … COMMIT`); on PostgreSQL each is its own transaction.
async fn a_request_refused_mid_transaction_leaves_nothing_and_its_batch_is_kept(kind: Kind) {
    const N: u32 = 128;
    let t = TestStore::new(kind).await;
    transact(&t.store, |tx| {
        tx.claim_request("client-a", "replayed", T0, T0 + 900)
    })
    .await
    .unwrap();

    let held = match kind {
        Kind::Sqlite => Some(hold(&t.store).await),
        Kind::Postgres => None,
    };
    let queued = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            spawn_transaction(&t.store, &queued, move |tx| {
                let card = card_of(i);
                tx.claim_request("client-a", &format!("req-{i}"), T0, T0 + 900)?;
                assert!(tx.enroll(&card, &enrollment("visa", T0))?);
                assert!(tx.claim_window(&card, 7, T0, T0 + 600)?);
                tx.add_failure(&card, T0, T0 + 86_400)?;
                if i % 8 == 7 {
                    return tx.claim_request("client-a", "replayed", T0 + 1, T0 + 901);
                }
                Ok(())
            })
        })
        .collect();
    until_queued(&queued, N as usize).await;
    if let Some(held) = held {
        held.release().await.unwrap();
    }
    for (i, task) in (0..N).zip(tasks) {
        let result = task.await.unwrap();
        if i % 8 == 7 {
            assert!(
                matches!(result, Err(StoreError::DuplicateRequest)),
                "{i}: {result:?}"
            );
        } else {
            result.unwrap();
        }
    }

    // Durable: checked after the store is closed and opened again.
    t.store.close().await;
    let store = t.reopen().await;
    let kept = i64::from(N - N / 8);
    for table in ["enrollments", "used_windows", "failures"] {
        assert_eq!(t.count(table).await, kept, "{table}");
    }
    assert_eq!(t.count("seen_requests").await, kept + 1);
    let mut conn = t.raw().await;
    for i in 0..N {
        let expected = i64::from(i % 8 != 7);
        for table in ["enrollments", "used_windows", "failures"] {
            assert_eq!(
                conn.rows_of(table, &card_of(i)).await,
                expected,
                "{table} {i}"
            );
        }
        assert_eq!(
            store
                .is_request_seen("client-a", &format!("req-{i}"), T0)
                .await
                .unwrap(),
            i % 8 != 7,
            "req-{i}"
        );
    }
    conn.close().await;
    store.close().await;
}

/// The service's failure limit: lock the card, count its failures, record one if
/// under the limit, `tasks` checks racing on one card through two store handles
/// (on PostgreSQL two pools, as two gateway processes would have). The gap
/// between count and record is widened by `gap` (the closure blocks the store's
/// side, as a slow request would): without the lock, or on SQLite without one
/// transaction at a time, racing checks would all count fewer than `limit`.
/// Returns how many recorded a failure.
async fn race_failure_checks(stores: [&Store; 2], tasks: usize, limit: u32, gap: Duration) -> u32 {
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks));
    let tasks: Vec<_> = (0..tasks)
        .map(|i| {
            let store = stores[i % 2].clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                transact(&store, move |tx| {
                    tx.lock_card(&card(3))?;
                    let blocked = tx.failures_since(&card(3), T0 - 86_400)? >= limit;
                    std::thread::sleep(gap);
                    if !blocked {
                        tx.add_failure(&card(3), T0, T0 + 86_400)?;
                    }
                    Ok(!blocked)
                })
                .await
                .unwrap()
            })
        })
        .collect();
    let mut recorded = 0;
    for task in tasks {
        if task.await.unwrap() {
            recorded += 1;
        }
    }
    recorded
}

/// 24 checks with a 20 ms gap: exactly `LIMIT` are recorded, however they
/// interleave. On PostgreSQL the card lock is per card.
async fn concurrent_failure_counts_under_the_card_lock_never_pass_the_limit(kind: Kind) {
    const LIMIT: u32 = 5;
    let t = TestStore::new(kind).await;
    let second = match kind {
        // Two handles on one SQLite file would be two writers: SQLite has one.
        Kind::Sqlite => t.store.clone(),
        Kind::Postgres => t.reopen().await,
    };
    let recorded =
        race_failure_checks([&t.store, &second], 24, LIMIT, Duration::from_millis(20)).await;
    assert_eq!(recorded, LIMIT);
    assert_eq!(t.count("failures").await, i64::from(LIMIT));
    if kind == Kind::Sqlite {
        return; // one store thread: a second transaction waits for the first anyway
    }
    // While card 3's lock is held, another card's lock is granted, and card 3's
    // is not.
    let (mut pause, paused) = pause();
    let holder = tokio::spawn({
        let store = t.store.clone();
        async move {
            transact(&store, move |tx| {
                tx.lock_card(&card(3))?;
                paused.here();
                Ok(())
            })
            .await
        }
    });
    pause.reached().await;
    tokio::time::timeout(
        Duration::from_secs(5),
        transact(&second, |tx| tx.lock_card(&card(4))),
    )
    .await
    .expect("a different card's lock is not blocked")
    .unwrap();
    let same = tokio::spawn({
        let second = second.clone();
        async move { transact(&second, |tx| tx.lock_card(&card(3))).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!same.is_finished(), "card 3's lock waits for its holder");
    pause.release();
    holder.await.unwrap().unwrap();
    same.await.unwrap().unwrap();
}

/// Issue 9: the failure limit stays exact under 64 concurrent count-then-record
/// transactions on one store.
async fn many_concurrent_failure_checks_never_pass_the_limit(kind: Kind) {
    const LIMIT: u32 = 5;
    let t = TestStore::new(kind).await;
    let recorded =
        race_failure_checks([&t.store, &t.store], 64, LIMIT, Duration::from_millis(5)).await;
    assert_eq!(recorded, LIMIT);
    assert_eq!(t.count("failures").await, i64::from(LIMIT));
}

// ---- cleanup ----

async fn cleanup_deletes_only_expired_rows_of_all_three_tables(kind: Kind) {
    let t = TestStore::new(kind).await;
    let now = T0 + 1000;
    transact(&t.store, move |tx| {
        tx.enroll(&card(1), &enrollment("visa", T0))?;
        // Expired: expires_at < now and == now. Live: now + 1.
        for (i, expires_at) in (0_i64..).zip([now - 1, now, now + 1]) {
            tx.claim_request("c", &format!("req-{i}"), T0, expires_at)?;
            tx.claim_window(&card(1), i, T0, expires_at)?;
            tx.add_failure(&card(1), T0, expires_at)?;
        }
        Ok(())
    })
    .await
    .unwrap();

    assert_eq!(t.store.cleanup(now).await.unwrap(), 6);
    assert_eq!(t.count("seen_requests").await, 1);
    assert_eq!(t.count("used_windows").await, 1);
    assert_eq!(t.count("failures").await, 1);
    assert_eq!(t.count("enrollments").await, 1);
    assert_eq!(t.count("heartbeat").await, 1);
    assert!(t.store.is_request_seen("c", "req-2", now).await.unwrap());

    assert_eq!(t.store.cleanup(now).await.unwrap(), 0);
    assert_eq!(t.store.cleanup(now + 1).await.unwrap(), 3);
    assert_eq!(
        t.store.enrollment(&card(1)).await.unwrap(),
        Some(enrollment("visa", T0))
    );
}

// ---- readiness and unavailability ----

async fn probe_writes_the_heartbeat(kind: Kind) {
    let t = TestStore::new(kind).await;
    t.store.probe(T0 + 5).await.unwrap();
    let mut conn = t.raw().await;
    let at = conn.scalar("SELECT at FROM heartbeat WHERE id = 1").await;
    assert_eq!(at, T0 + 5);
    conn.close().await;
}

/// Makes a directory and the database files in it read-only for this process, and
/// undoes it on drop. `chmod` does not stop root (or CAP_DAC_OVERRIDE); then the
/// files and the directory are made immutable with `chattr +i`, which does.
struct ReadOnly {
    paths: Vec<PathBuf>,
    immutable: bool,
}

impl ReadOnly {
    fn apply(dir: &Path) -> Self {
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        paths.push(dir.to_owned());
        let db = db_path(dir);

        for path in &paths {
            let mode = if path.is_dir() { 0o555 } else { 0o444 };
            fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
        }
        if !writable(&db) {
            return Self {
                paths,
                immutable: false,
            };
        }
        // Privileged: chmod is not enough.
        let out = Command::new("chattr").arg("+i").args(&paths).output();
        let guard = Self {
            paths,
            immutable: true,
        };
        match out {
            Ok(out) if out.status.success() && !writable(&db) => guard,
            other => panic!(
                "cannot make the store read-only for this user: chmod does not stop it \
                 (root?) and `chattr +i` failed ({other:?}); run the tests as a non-root \
                 user or with CAP_LINUX_IMMUTABLE on a filesystem with immutable files"
            ),
        }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.immutable {
            let _ = Command::new("chattr").arg("-i").args(&self.paths).status();
        }
        for path in &self.paths {
            let mode = if path.is_dir() { 0o755 } else { 0o644 };
            let _ = fs::set_permissions(path, Permissions::from_mode(mode));
        }
    }
}

fn writable(path: &Path) -> bool {
    OpenOptions::new().append(true).open(path).is_ok()
}

/// A store with one committed enrolment, closed.
async fn closed_store_with_data() -> TestStore {
    let t = TestStore::new(Kind::Sqlite).await;
    transact(&t.store, |tx| tx.enroll(&card(1), &enrollment("visa", T0)))
        .await
        .unwrap();
    t.store.probe(T0).await.unwrap();
    t.store.close().await;
    t
}

#[tokio::test]
async fn sqlite_probe_is_unavailable_on_a_read_only_store() {
    let t = closed_store_with_data().await;
    // Another reader keeps the -wal and -shm files in place, so SQLite can open the
    // read-only database for reading (it falls back to read-only by itself).
    let mut reader = raw(&t.path()).await;
    let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM enrollments")
        .fetch_one(&mut reader)
        .await
        .unwrap();

    {
        let _read_only = ReadOnly::apply(t.dir.path());
        let store = Store::open(&t.settings()).await.unwrap();
        assert_eq!(
            store.enrollment(&card(1)).await.unwrap(),
            Some(enrollment("visa", T0))
        );
        let err = assert_unavailable(store.probe(T0 + 1).await);
        assert!(err.to_string().contains("readonly"), "{err}");
        assert_unavailable(transact(&store, |tx| tx.claim_request("c", "r", T0, T0 + 900)).await);
        store.close().await;
    }
    reader.close().await.unwrap();

    // Writable again: the same file takes writes; the refused claim was not kept.
    let store = t.reopen().await;
    store.probe(T0 + 2).await.unwrap();
    assert!(!store.is_request_seen("c", "r", T0).await.unwrap());
    store.close().await;
}

#[tokio::test]
async fn sqlite_opening_a_read_only_store_is_unavailable_and_recovers() {
    let t = closed_store_with_data().await;
    assert!(
        !t.path().with_extension("db-wal").exists(),
        "a clean close removes the WAL"
    );

    {
        let _read_only = ReadOnly::apply(t.dir.path());
        // Read-only, SQLite cannot create the -wal and -shm files a WAL database
        // needs: the store refuses to start, as unavailable rather than as a bug.
        assert_unavailable(Store::open(&t.settings()).await);
    }

    // Writable again: the same file opens and takes writes, nothing was lost.
    let store = t.reopen().await;
    store.probe(T0 + 2).await.unwrap();
    assert_eq!(
        store.enrollment(&card(1)).await.unwrap(),
        Some(enrollment("visa", T0))
    );
    store.close().await;
}

#[tokio::test]
async fn sqlite_probe_is_unavailable_while_another_process_holds_the_write_lock() {
    let t = TestStore::with_timeout(Kind::Sqlite, Duration::from_millis(300)).await;
    t.store.probe(T0).await.unwrap();

    let mut other = raw(&t.path()).await;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let started = Instant::now();
    assert_unavailable(t.store.probe(T0 + 1).await);
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Reads are not blocked by a writer in WAL mode.
    assert_eq!(t.store.enrollment(&card(1)).await.unwrap(), None);

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    other.close().await.unwrap();
    t.store.probe(T0 + 2).await.unwrap();
}

/// `err` says its batch could not be committed because the disk is full.
fn assert_batch_lost_to_a_full_disk(err: &StoreError) {
    assert!(
        matches!(&err, StoreError::Unavailable(Cause::BatchLost(cause)) if cause.to_string().contains("full")),
        "{err:?}"
    );
    assert!(err.is_unavailable());
}

/// Issue 9: a batch whose commit fails answers none of its requests with success
/// and leaves nothing. The file sits on a small tmpfs (mounting needs root, as in
/// `http_ops.rs`), which is filled while the store thread is held, so the
/// transactions queued meanwhile form one batch: 32 that enrol 8 cards each, one
/// that only reads, one that writes and is then refused. A batch's statements and
/// savepoints work in SQLite's page cache and its pages reach the WAL only at
/// `COMMIT` (checked by hand with SQLite 3.40 on a full tmpfs: the inserts and the
/// `RELEASE`s succeed, `COMMIT` fails with SQLITE_FULL), so it is the batch's
/// commit that fails here. Every request of it, the reading and the refused one
/// too, is answered `Unavailable`; nothing of it is on disk after the store is
/// closed and opened again; and with space again the same handle takes writes
/// without being reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_batch_whose_commit_fails_answers_nobody_with_success_and_leaves_nothing() {
    use support::disk::{Tmpfs, fill};
    const N: u32 = 32;
    let mount = tempfile::tempdir().unwrap();
    let _tmpfs = Tmpfs::mount(mount.path(), "1m");
    let settings = StoreSettings::sqlite(db_path(mount.path()), Duration::from_secs(10));
    let store = Store::open(&settings).await.unwrap();
    transact(&store, |tx| {
        tx.enroll(&card(1), &enrollment("visa", T0))?;
        tx.claim_request("client-a", "before", T0, T0 + 900)
    })
    .await
    .unwrap();

    let held = hold(&store).await;
    let filler = fill(mount.path());
    let queued = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..N)
        .map(|i| {
            spawn_transaction(&store, &queued, move |tx| {
                tx.claim_request("client-a", &format!("req-{i}"), T0, T0 + 900)?;
                for j in 0..8 {
                    assert!(tx.enroll(&card_of(i * 8 + j), &enrollment("visa", T0))?);
                }
                Ok(())
            })
        })
        .collect();
    let reader = spawn_transaction(&store, &queued, |tx| tx.enrollment(&card(1)));
    let refused = spawn_transaction(&store, &queued, |tx| {
        tx.enroll(&card(2), &enrollment("visa", T0))?;
        tx.claim_request("client-a", "before", T0 + 1, T0 + 901)
    });
    until_queued(&queued, N as usize + 2).await;
    // The held transaction wrote nothing: its batch commits even on a full disk.
    held.release().await.unwrap();

    for (i, writer) in writers.into_iter().enumerate() {
        let err = writer.await.unwrap().unwrap_err();
        assert_batch_lost_to_a_full_disk(&err);
        assert!(
            !store
                .is_request_seen("client-a", &format!("req-{i}"), T0)
                .await
                .unwrap()
        );
    }
    assert_batch_lost_to_a_full_disk(&reader.await.unwrap().unwrap_err());
    assert_batch_lost_to_a_full_disk(&refused.await.unwrap().unwrap_err());
    assert_eq!(store.enrollment(&card_of(0)).await.unwrap(), None);
    assert_eq!(
        store.enrollment(&card(1)).await.unwrap(),
        Some(enrollment("visa", T0))
    );

    // Space again: the same handle takes writes at once.
    fs::remove_file(&filler).unwrap();
    transact(&store, |tx| {
        tx.enroll(&card(3), &enrollment("visa", T0))?;
        tx.claim_request("client-a", "after", T0, T0 + 900)
    })
    .await
    .unwrap();
    store.close().await;

    // Opened again: what was committed is there, nothing of the lost batch is.
    let store = Store::open(&settings).await.unwrap();
    let mut conn = raw(&db_path(mount.path())).await;
    let enrolled: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM enrollments")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seen_requests")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert_eq!((enrolled, seen), (2, 2));
    for card in [card(1), card(3)] {
        assert!(store.enrollment(&card).await.unwrap().is_some());
    }
    assert_eq!(store.enrollment(&card(2)).await.unwrap(), None);
    for i in [0, N * 8 / 2, N * 8 - 1] {
        assert_eq!(store.enrollment(&card_of(i)).await.unwrap(), None, "{i}");
    }
    assert!(
        store
            .is_request_seen("client-a", "after", T0)
            .await
            .unwrap()
    );
    assert!(
        !store
            .is_request_seen("client-a", "req-0", T0)
            .await
            .unwrap()
    );
    store.close().await;
}

async fn every_call_after_close_is_unavailable(kind: Kind) {
    let t = TestStore::new(kind).await;
    t.store.probe(T0).await.unwrap();
    let clone = t.store.clone();
    t.store.close().await;

    assert_unavailable(clone.probe(T0 + 1).await);
    let ran = Arc::new(AtomicBool::new(false));
    assert_unavailable(
        transact(&clone, {
            let ran = Arc::clone(&ran);
            move |tx| {
                ran.store(true, Ordering::SeqCst);
                tx.claim_request("c", "r", T0, T0 + 900)
            }
        })
        .await,
    );
    assert!(
        !ran.load(Ordering::SeqCst),
        "a closed store ran a transaction"
    );
    assert_unavailable(clone.is_request_seen("c", "r", T0).await);
    assert_unavailable(clone.enrollment(&card(1)).await);
    assert_unavailable(clone.cleanup(T0).await);
}

// ---- a model check of request-id claims ----

/// Claims of request ids against a map model: the store refuses exactly the claims
/// the model says are live duplicates, and `is_request_seen` agrees with the model.
fn check_claims(kind: Kind, ops: &[(u8, u8, i64, i64)]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t = TestStore::new(kind).await;
        let mut model = std::collections::HashMap::new();
        let mut now = T0;
        for &(client, id, step, ttl) in ops {
            now += step;
            let (client, id) = (format!("c{client}"), format!("r{id}"));
            let live = model
                .get(&(client.clone(), id.clone()))
                .is_some_and(|&expires_at| expires_at > now);
            assert_eq!(
                t.store.is_request_seen(&client, &id, now).await.unwrap(),
                live
            );
            let result = transact(&t.store, {
                let (client, id) = (client.clone(), id.clone());
                move |tx| Ok(tx.claim_request(&client, &id, now, now + ttl))
            })
            .await
            .unwrap();
            if live {
                assert!(matches!(result, Err(StoreError::DuplicateRequest)));
            } else {
                result.unwrap();
                model.insert((client, id), now + ttl);
            }
        }
        t.store.close().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn request_claims_match_a_model_sqlite(
        ops in proptest::collection::vec((0..2u8, 0..3u8, 0..20i64, 1..30i64), 1..40)
    ) {
        check_claims(Kind::Sqlite, &ops);
    }

    #[test]
    fn request_claims_match_a_model_postgres(
        ops in proptest::collection::vec((0..2u8, 0..3u8, 0..20i64, 1..30i64), 1..40)
    ) {
        check_claims(Kind::Postgres, &ops);
    }
}

// ---- PostgreSQL only: the server stops and starts, several processes share it ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_server_is_unavailable_fast_and_the_store_recovers() {
    let acquire = Duration::from_millis(800);
    let t = TestStore::with_timeout(Kind::Postgres, acquire).await;
    transact(&t.store, |tx| {
        tx.claim_request("client-a", "before", T0, T0 + 900)?;
        tx.enroll(&card(1), &enrollment("visa", T0))?;
        assert!(tx.claim_window(&card(1), 7, T0, T0 + 600)?);
        Ok(())
    })
    .await
    .unwrap();
    // A transaction under way while the server stops: its work is lost, not
    // half-kept.
    let (mut pause, paused) = pause();
    let open = tokio::spawn({
        let store = t.store.clone();
        async move {
            transact(&store, move |tx| {
                tx.enroll(&card(2), &enrollment("visa", T0))?;
                paused.here();
                Ok(())
            })
            .await
        }
    });
    pause.reached().await;

    PG.stop_server();

    // Every call fails as Unavailable, within the acquire timeout (plus slack for a
    // loaded machine), never as a bug and never by hanging.
    let started = Instant::now();
    pause.release();
    assert_unavailable(open.await.unwrap());
    assert_unavailable(t.store.probe(T0 + 1).await);
    assert_unavailable(transact(&t.store, |tx| tx.enrollment(&card(1))).await);
    assert_unavailable(t.store.enrollment(&card(1)).await);
    assert_unavailable(t.store.is_request_seen("client-a", "before", T0).await);
    let each = started.elapsed() / 5;
    assert!(
        each < acquire + Duration::from_secs(2),
        "calls took {each:?} each with the server down"
    );

    PG.start_server();

    // The same handle recovers by itself: nothing accepted before the stop is lost,
    // nothing of the interrupted transaction was kept.
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.store.probe(T0 + 2).await.is_err() {
        assert!(Instant::now() < deadline, "the store did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        t.store.enrollment(&card(1)).await.unwrap(),
        Some(enrollment("visa", T0))
    );
    assert_eq!(t.store.enrollment(&card(2)).await.unwrap(), None);
    let (won, replay) = transact(&t.store, |tx| {
        Ok((
            tx.claim_window(&card(1), 7, T0 + 1, T0 + 600)?,
            tx.claim_request("client-a", "before", T0 + 1, T0 + 901),
        ))
    })
    .await
    .unwrap();
    assert!(!won);
    assert!(
        matches!(replay, Err(StoreError::DuplicateRequest)),
        "{replay:?}"
    );
    transact(&t.store, |tx| {
        tx.claim_request("client-a", "after", T0 + 2, T0 + 902)
    })
    .await
    .unwrap();
    assert_eq!(t.count("seen_requests").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_over_tls_with_a_verified_certificate() {
    // `sslmode=verify-full` against the cluster's certificate: the store works, and
    // the server sees its connections encrypted. A certificate from another CA is
    // refused, so the check is real.
    let database = PG.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let with_ca = |ca: &Path| {
        StoreSettings::postgres(
            PostgresLocation {
                url: DatabaseUrl::Value(format!(
                    "{}?sslmode=verify-full&sslrootcert={}",
                    PG.url(&database).replace("127.0.0.1", "localhost"),
                    ca.display()
                )),
                password_file: Some(PG.password_file(dir.path())),
            },
            Duration::from_secs(2),
            2,
        )
    };
    let store = Store::open(&with_ca(&PG.ca_file())).await.unwrap();
    store.probe(T0).await.unwrap();
    let mut admin = PG.connect("postgres").await;
    let encrypted: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'dcvv-gateway' AND a.datname = $1 AND s.ssl",
    )
    .bind(&database)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(encrypted >= 1, "no TLS connection of the store");
    store.close().await;

    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    fs::write(&other_ca, stranger.cert.pem()).unwrap();
    assert!(Store::open(&with_ca(&other_ca)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_open_is_unavailable_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = StoreSettings::postgres(
        PostgresLocation {
            url: DatabaseUrl::Value(format!("postgres://postgres@127.0.0.1:{port}/none")),
            password_file: Some(PG.password_file(dir.path())),
        },
        Duration::from_millis(500),
        2,
    );
    let started = Instant::now();
    assert_unavailable(Store::open(&settings).await);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_wrong_password_or_settings_are_not_unavailable_and_never_shown() {
    let database = PG.fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.pw");
    fs::write(&wrong, "not-the-password-4711\n").unwrap();
    let settings = StoreSettings::postgres(
        PostgresLocation {
            url: DatabaseUrl::Value(PG.url(&database)),
            password_file: Some(wrong),
        },
        Duration::from_secs(2),
        2,
    );
    let err = Store::open(&settings).await.unwrap_err();
    assert!(!err.is_unavailable(), "{err:?}");
    assert!(
        !format!("{err:?}").contains("not-the-password-4711"),
        "{err:?}"
    );
    assert!(!format!("{settings:?}").contains(PG.password()));

    // The URL from an environment variable that is not set; a missing password file.
    let unset = StoreSettings::postgres(
        PostgresLocation {
            url: DatabaseUrl::Env("DCVV_TEST_NO_SUCH_VARIABLE".into()),
            password_file: None,
        },
        Duration::from_secs(2),
        2,
    );
    let err = Store::open(&unset).await.unwrap_err();
    assert!(matches!(err, StoreError::Settings(_)), "{err:?}");
    assert!(
        err.to_string().contains("DCVV_TEST_NO_SUCH_VARIABLE"),
        "{err}"
    );
    let no_file = StoreSettings::postgres(
        PostgresLocation {
            url: DatabaseUrl::Value(PG.url(&database)),
            password_file: Some(dir.path().join("missing.pw")),
        },
        Duration::from_secs(2),
        2,
    );
    let err = Store::open(&no_file).await.unwrap_err();
    assert!(matches!(err, StoreError::Settings(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_refused_row_error_does_not_carry_its_values() {
    // PostgreSQL's DETAIL of a check violation repeats the row: a clear PAN that the
    // guard refused must not reach the error (and so the log) that way.
    let t = TestStore::new(Kind::Postgres).await;
    let clear = Enrollment {
        masked_pan: "4123456789012345".to_owned(),
        ..enrollment("visa", T0)
    };
    let err = transact(&t.store, move |tx| tx.enroll(&card(0xab), &clear))
        .await
        .unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("23514"), "{shown}");
    assert!(shown.contains("enrollments_masked_pan_check"), "{shown}");
    assert!(!shown.contains("4123456789012345"), "{shown}");
    assert!(!shown.contains("abababab"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_stores_on_one_database_see_each_others_claims() {
    // Two pools on one database, as two gateway processes have: a claim committed
    // through one is refused through the other, and racing claims have one winner.
    let t = TestStore::new(Kind::Postgres).await;
    let other = t.reopen().await;
    transact(&t.store, |tx| {
        tx.claim_request("client-a", "req-1", T0, T0 + 900)?;
        tx.enroll(&card(1), &enrollment("visa", T0)).map(drop)
    })
    .await
    .unwrap();

    assert_eq!(
        other.enrollment(&card(1)).await.unwrap(),
        Some(enrollment("visa", T0))
    );
    let err = transact(&other, |tx| {
        tx.claim_request("client-a", "req-1", T0 + 1, T0 + 901)
    })
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::DuplicateRequest), "{err:?}");

    // A claim waits for a racing transaction that holds the same key, then sees it.
    let (mut pause, paused) = pause();
    let first = tokio::spawn({
        let store = t.store.clone();
        async move {
            transact(&store, move |tx| {
                let won = tx.claim_window(&card(1), 9, T0, T0 + 600)?;
                paused.here();
                Ok(won)
            })
            .await
        }
    });
    pause.reached().await;
    let second = tokio::spawn({
        let other = other.clone();
        async move { transact(&other, |tx| tx.claim_window(&card(1), 9, T0, T0 + 600)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "the second claim waits for the first"
    );
    pause.release();
    assert!(first.await.unwrap().unwrap());
    assert!(!second.await.unwrap().unwrap());
    assert_eq!(t.count("used_windows").await, 1);
}
