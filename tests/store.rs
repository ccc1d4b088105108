//! The persistence port against real databases: every backend-neutral test runs
//! twice, on a fresh SQLite file and on a fresh PostgreSQL database (a throwaway
//! cluster of this test process, `tests/common/postgres.rs`); each test below is a
//! module with a `sqlite` and a `postgres` test.
//!
//! What the store's callers rely on: schema creation and idempotent migrations,
//! replay refusal with expiry, all-or-nothing transactions, idempotent enrolment,
//! failure counting, single use of windows under concurrency, cleanup, durability of
//! a commit across close and reopen, and `Unavailable` (never a bug report) when the
//! database cannot be written, is locked past the timeout, is stopped, or the store
//! is closed. Rows are counted through a separate raw connection, not through the
//! store. SQLite-only tests (read-only files, the file lock, the one connection)
//! and PostgreSQL-only tests (server stopped and started, several stores on one
//! database as several gateway processes would have) follow the shared ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs::{self, OpenOptions, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::postgres::PG;
use dcvv_gateway::store::{
    CardId, DatabaseUrl, Enrollment, PostgresLocation, Store, StoreError, StoreSettings,
};
use proptest::prelude::*;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};
use tempfile::TempDir;

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

    /// The number of enrolments of `card`.
    async fn enrolled(&mut self, card: &CardId) -> i64 {
        let sql = "SELECT COUNT(*) FROM enrollments WHERE card_id = $1";
        match self {
            Raw::Sqlite(conn) => sqlx::query_scalar(sql)
                .bind(card.0.as_slice())
                .fetch_one(conn)
                .await
                .unwrap(),
            Raw::Postgres(conn) => sqlx::query_scalar(sql)
                .bind(card.0.as_slice())
                .fetch_one(conn)
                .await
                .unwrap(),
        }
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

on_both_backends!(
    migrations_create_the_schema,
    reopening_runs_no_migration_twice,
    a_database_from_a_newer_schema_is_refused,
    claim_request_refuses_a_live_duplicate_and_accepts_it_after_expiry,
    request_ids_are_per_client,
    a_rolled_back_transaction_leaves_nothing,
    a_transaction_dropped_without_commit_leaves_nothing,
    committed_state_survives_close_and_reopen,
    enroll_is_idempotent_and_keeps_the_first_enrolment,
    unenroll_is_idempotent_and_clears_only_this_cards_failures,
    a_masked_pan_made_of_digits_only_is_refused,
    failures_since_counts_only_failures_at_or_after_since,
    claim_window_is_single_use_per_card_and_window,
    concurrent_claims_of_one_window_have_exactly_one_winner,
    concurrent_commits_are_each_durable_when_they_return,
    concurrent_failure_counts_under_the_card_lock_never_pass_the_limit,
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

    let mut tx = t.store.begin().await.unwrap();
    tx.claim_request("client-a", "req-1", T0, expires)
        .await
        .unwrap();
    tx.commit().await.unwrap();
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
        let mut tx = t.store.begin().await.unwrap();
        let err = tx
            .claim_request("client-a", "req-1", now, now + 900)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::DuplicateRequest), "{err:?}");
        assert!(!err.is_unavailable());
        tx.rollback().await.unwrap();
    }

    // Expired (expires_at <= now): no longer seen, and claimable again.
    assert!(
        !t.store
            .is_request_seen("client-a", "req-1", expires)
            .await
            .unwrap()
    );
    let mut tx = t.store.begin().await.unwrap();
    tx.claim_request("client-a", "req-1", expires, expires + 900)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(
        t.store
            .is_request_seen("client-a", "req-1", expires + 899)
            .await
            .unwrap()
    );
    assert_eq!(t.count("seen_requests").await, 1);

    // The renewed claim is live again.
    let mut tx = t.store.begin().await.unwrap();
    let err = tx
        .claim_request("client-a", "req-1", expires + 1, expires + 901)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DuplicateRequest), "{err:?}");
}

async fn request_ids_are_per_client(kind: Kind) {
    let t = TestStore::new(kind).await;
    let mut tx = t.store.begin().await.unwrap();
    tx.claim_request("client-a", "req-1", T0, T0 + 900)
        .await
        .unwrap();
    tx.claim_request("client-b", "req-1", T0, T0 + 900)
        .await
        .unwrap();
    tx.claim_request("client-a", "req-2", T0, T0 + 900)
        .await
        .unwrap();
    tx.commit().await.unwrap();
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
async fn change_everything(tx: &mut dcvv_gateway::store::StoreTx) {
    tx.claim_request("client-a", "req-1", T0, T0 + 900)
        .await
        .unwrap();
    assert!(tx.enroll(&card(1), &enrollment("visa", T0)).await.unwrap());
    tx.add_failure(&card(1), T0, T0 + 86_400).await.unwrap();
    assert!(tx.claim_window(&card(1), 7, T0, T0 + 600).await.unwrap());
    // The transaction sees its own writes.
    assert_eq!(
        tx.enrollment(&card(1)).await.unwrap(),
        Some(enrollment("visa", T0))
    );
    assert_eq!(tx.failures_since(&card(1), T0).await.unwrap(), 1);
}

async fn a_rolled_back_transaction_leaves_nothing(kind: Kind) {
    let t = TestStore::new(kind).await;
    let before = t.counts().await;

    let mut tx = t.store.begin().await.unwrap();
    change_everything(&mut tx).await;
    tx.rollback().await.unwrap();

    assert_eq!(t.counts().await, before);
    assert_eq!(t.store.enrollment(&card(1)).await.unwrap(), None);
    assert!(
        !t.store
            .is_request_seen("client-a", "req-1", T0)
            .await
            .unwrap()
    );
}

async fn a_transaction_dropped_without_commit_leaves_nothing(kind: Kind) {
    let t = TestStore::new(kind).await;
    let before = t.counts().await;

    let mut tx = t.store.begin().await.unwrap();
    change_everything(&mut tx).await;
    drop(tx);

    // The connection is usable again at once, and nothing was kept.
    assert_eq!(t.store.enrollment(&card(1)).await.unwrap(), None);
    assert_eq!(t.counts().await, before);
    let mut tx = t.store.begin().await.unwrap();
    tx.claim_request("client-a", "req-1", T0, T0 + 900)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn sqlite_store_calls_wait_for_an_open_transaction() {
    // One connection: a read on the handle while a transaction is held waits for it,
    // and gives up as Unavailable after the acquire timeout.
    let t = TestStore::with_timeout(Kind::Sqlite, Duration::from_millis(200)).await;
    let tx = t.store.begin().await.unwrap();
    let started = Instant::now();
    assert_unavailable(t.store.enrollment(&card(1)).await);
    assert!(started.elapsed() >= Duration::from_millis(150));
    tx.commit().await.unwrap();
    assert_eq!(t.store.enrollment(&card(1)).await.unwrap(), None);
}

async fn committed_state_survives_close_and_reopen(kind: Kind) {
    let t = TestStore::new(kind).await;
    let mut tx = t.store.begin().await.unwrap();
    change_everything(&mut tx).await;
    tx.commit().await.unwrap();
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
    let mut tx = store.begin().await.unwrap();
    assert_eq!(tx.failures_since(&card(1), T0).await.unwrap(), 1);
    assert!(!tx.claim_window(&card(1), 7, T0, T0 + 600).await.unwrap());
    let err = tx
        .claim_request("client-a", "req-1", T0 + 1, T0 + 901)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DuplicateRequest), "{err:?}");
    tx.rollback().await.unwrap();
    store.close().await;
}

// ---- enrolment and failures ----

async fn enroll_is_idempotent_and_keeps_the_first_enrolment(kind: Kind) {
    let t = TestStore::new(kind).await;
    let mut tx = t.store.begin().await.unwrap();
    assert_eq!(tx.enrollment(&card(1)).await.unwrap(), None);
    assert!(tx.enroll(&card(1), &enrollment("visa", T0)).await.unwrap());
    assert!(
        !tx.enroll(&card(1), &enrollment("other", T0 + 60))
            .await
            .unwrap()
    );
    assert!(
        tx.enroll(&card(2), &enrollment("mc", T0 + 5))
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();

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
    let mut tx = t.store.begin().await.unwrap();
    tx.enroll(&card(1), &enrollment("visa", T0)).await.unwrap();
    tx.enroll(&card(2), &enrollment("visa", T0)).await.unwrap();
    for i in 0..3 {
        tx.add_failure(&card(1), T0 + i, T0 + 86_400).await.unwrap();
    }
    tx.add_failure(&card(2), T0, T0 + 86_400).await.unwrap();
    assert!(tx.claim_window(&card(1), 7, T0, T0 + 600).await.unwrap());
    tx.commit().await.unwrap();

    let mut tx = t.store.begin().await.unwrap();
    assert!(tx.unenroll(&card(1)).await.unwrap());
    assert!(!tx.unenroll(&card(1)).await.unwrap());
    assert!(!tx.unenroll(&card(3)).await.unwrap());
    assert_eq!(tx.enrollment(&card(1)).await.unwrap(), None);
    assert_eq!(tx.failures_since(&card(1), 0).await.unwrap(), 0);
    assert_eq!(tx.failures_since(&card(2), 0).await.unwrap(), 1);
    // A used window stays used across an unenrol/enrol cycle.
    assert!(
        tx.enroll(&card(1), &enrollment("visa", T0 + 10))
            .await
            .unwrap()
    );
    assert!(
        !tx.claim_window(&card(1), 7, T0 + 10, T0 + 600)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();

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
    let mut tx = t.store.begin().await.unwrap();
    let err = tx.enroll(&card(1), &clear).await.unwrap_err();
    assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
    // The message names the constraint, never the value.
    assert!(!err.to_string().contains("4123456789012345"), "{err}");
    tx.rollback().await.unwrap();
    assert_eq!(t.count("enrollments").await, 0);
}

async fn failures_since_counts_only_failures_at_or_after_since(kind: Kind) {
    let t = TestStore::new(kind).await;
    let mut tx = t.store.begin().await.unwrap();
    for at in [T0 - 100, T0 - 1, T0, T0 + 1, T0 + 100] {
        tx.add_failure(&card(1), at, at + 86_400).await.unwrap();
    }
    tx.add_failure(&card(2), T0, T0 + 86_400).await.unwrap();
    assert_eq!(tx.failures_since(&card(1), T0 - 100).await.unwrap(), 5);
    assert_eq!(tx.failures_since(&card(1), T0).await.unwrap(), 3);
    assert_eq!(tx.failures_since(&card(1), T0 + 101).await.unwrap(), 0);
    assert_eq!(tx.failures_since(&card(3), 0).await.unwrap(), 0);

    tx.clear_failures(&card(1)).await.unwrap();
    assert_eq!(tx.failures_since(&card(1), 0).await.unwrap(), 0);
    assert_eq!(tx.failures_since(&card(2), 0).await.unwrap(), 1);
    tx.commit().await.unwrap();
}

// ---- windows ----

async fn claim_window_is_single_use_per_card_and_window(kind: Kind) {
    let t = TestStore::new(kind).await;
    let mut tx = t.store.begin().await.unwrap();
    assert!(tx.claim_window(&card(1), 100, T0, T0 + 600).await.unwrap());
    assert!(
        !tx.claim_window(&card(1), 100, T0 + 1, T0 + 601)
            .await
            .unwrap()
    );
    assert!(tx.claim_window(&card(1), 101, T0, T0 + 600).await.unwrap());
    assert!(tx.claim_window(&card(2), 100, T0, T0 + 600).await.unwrap());
    tx.commit().await.unwrap();

    let mut tx = t.store.begin().await.unwrap();
    assert!(
        !tx.claim_window(&card(1), 100, T0 + 2, T0 + 602)
            .await
            .unwrap()
    );
    assert!(
        !tx.claim_window(&card(2), 100, T0 + 2, T0 + 602)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
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
                let mut tx = store.begin().await.unwrap();
                let won = tx
                    .claim_window(&card(9), 42, T0 + i, T0 + 600)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                won
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

async fn concurrent_commits_are_each_durable_when_they_return(kind: Kind) {
    // Group commit: many requests share one durable commit, yet each commit returns
    // only once its change can be read from another connection, and a rolled-back
    // transaction in the middle of the group keeps nothing of its own.
    let t = Arc::new(TestStore::new(kind).await);
    let tasks: Vec<_> = (0..64_u8)
        .map(|i| {
            let store = t.store.clone();
            let t = Arc::clone(&t);
            tokio::spawn(async move {
                let mut tx = store.begin().await.unwrap();
                tx.claim_request("client-a", &format!("req-{i}"), T0, T0 + 900)
                    .await
                    .unwrap();
                tx.enroll(&card(i), &enrollment("visa", T0)).await.unwrap();
                if i % 8 == 7 {
                    tx.rollback().await.unwrap();
                    return;
                }
                tx.commit().await.unwrap();
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

/// The service's failure limit: lock the card, count its failures, record one if
/// under the limit. 24 checks race on one card, through two store handles (on
/// PostgreSQL two pools, as two gateway processes would have): exactly `LIMIT`
/// are recorded, however they interleave.
async fn concurrent_failure_counts_under_the_card_lock_never_pass_the_limit(kind: Kind) {
    const LIMIT: u32 = 5;
    let t = TestStore::new(kind).await;
    let second = match kind {
        // Two handles on one SQLite file would be two writers: SQLite has one.
        Kind::Sqlite => t.store.clone(),
        Kind::Postgres => t.reopen().await,
    };
    let barrier = Arc::new(tokio::sync::Barrier::new(24));
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let store = if i % 2 == 0 {
                t.store.clone()
            } else {
                second.clone()
            };
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let mut tx = store.begin().await.unwrap();
                tx.lock_card(&card(3)).await.unwrap();
                let blocked = tx.failures_since(&card(3), T0 - 86_400).await.unwrap() >= LIMIT;
                // Widen the gap between count and record, as a slow request would:
                // without the lock, racing checks would all count fewer than LIMIT.
                tokio::time::sleep(Duration::from_millis(20)).await;
                if !blocked {
                    tx.add_failure(&card(3), T0, T0 + 86_400).await.unwrap();
                }
                tx.commit().await.unwrap();
                !blocked
            })
        })
        .collect();
    let mut recorded = 0;
    for task in tasks {
        if task.await.unwrap() {
            recorded += 1;
        }
    }
    assert_eq!(recorded, LIMIT);
    assert_eq!(t.count("failures").await, i64::from(LIMIT));
    if kind == Kind::Sqlite {
        return; // one connection: a second transaction waits for the first anyway
    }
    // Another card's lock is another lock: it is granted while card 3's is held.
    let mut holder = t.store.begin().await.unwrap();
    holder.lock_card(&card(3)).await.unwrap();
    let mut other = second.begin().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), other.lock_card(&card(4)))
        .await
        .expect("a different card's lock is not blocked")
        .unwrap();
    other.commit().await.unwrap();
    holder.commit().await.unwrap();
}

// ---- cleanup ----

async fn cleanup_deletes_only_expired_rows_of_all_three_tables(kind: Kind) {
    let t = TestStore::new(kind).await;
    let now = T0 + 1000;
    let mut tx = t.store.begin().await.unwrap();
    tx.enroll(&card(1), &enrollment("visa", T0)).await.unwrap();
    // Expired: expires_at < now and == now. Live: now + 1.
    for (i, expires_at) in [now - 1, now, now + 1].into_iter().enumerate() {
        tx.claim_request("c", &format!("req-{i}"), T0, expires_at)
            .await
            .unwrap();
        tx.claim_window(&card(1), i as i64, T0, expires_at)
            .await
            .unwrap();
        tx.add_failure(&card(1), T0, expires_at).await.unwrap();
    }
    tx.commit().await.unwrap();

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
    let mut tx = t.store.begin().await.unwrap();
    tx.enroll(&card(1), &enrollment("visa", T0)).await.unwrap();
    tx.commit().await.unwrap();
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
        let mut tx = store.begin().await.unwrap();
        assert_unavailable(tx.claim_request("c", "r", T0, T0 + 900).await);
        drop(tx);
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

async fn every_call_after_close_is_unavailable(kind: Kind) {
    let t = TestStore::new(kind).await;
    t.store.probe(T0).await.unwrap();
    let clone = t.store.clone();
    t.store.close().await;

    assert_unavailable(clone.probe(T0 + 1).await);
    assert_unavailable(clone.begin().await);
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
            let mut tx = t.store.begin().await.unwrap();
            let result = tx.claim_request(&client, &id, now, now + ttl).await;
            if live {
                assert!(matches!(result, Err(StoreError::DuplicateRequest)));
            } else {
                result.unwrap();
                model.insert((client, id), now + ttl);
            }
            tx.commit().await.unwrap();
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
    let mut tx = t.store.begin().await.unwrap();
    tx.claim_request("client-a", "before", T0, T0 + 900)
        .await
        .unwrap();
    tx.enroll(&card(1), &enrollment("visa", T0)).await.unwrap();
    assert!(tx.claim_window(&card(1), 7, T0, T0 + 600).await.unwrap());
    tx.commit().await.unwrap();
    // A transaction open while the server stops: its work is lost, not half-kept.
    let mut open = t.store.begin().await.unwrap();
    open.enroll(&card(2), &enrollment("visa", T0))
        .await
        .unwrap();

    PG.stop_server();

    // Every call fails as Unavailable, within the acquire timeout (plus slack for a
    // loaded machine), never as a bug and never by hanging.
    let started = Instant::now();
    assert_unavailable(open.commit().await);
    assert_unavailable(t.store.probe(T0 + 1).await);
    assert_unavailable(t.store.begin().await);
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
    let mut tx = t.store.begin().await.unwrap();
    assert!(
        !tx.claim_window(&card(1), 7, T0 + 1, T0 + 600)
            .await
            .unwrap()
    );
    let err = tx
        .claim_request("client-a", "before", T0 + 1, T0 + 901)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DuplicateRequest), "{err:?}");
    drop(tx);
    let mut tx = t.store.begin().await.unwrap();
    tx.claim_request("client-a", "after", T0 + 2, T0 + 902)
        .await
        .unwrap();
    tx.commit().await.unwrap();
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
    let mut tx = t.store.begin().await.unwrap();
    let err = tx.enroll(&card(0xab), &clear).await.unwrap_err();
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
    let mut tx = t.store.begin().await.unwrap();
    tx.claim_request("client-a", "req-1", T0, T0 + 900)
        .await
        .unwrap();
    tx.enroll(&card(1), &enrollment("visa", T0)).await.unwrap();
    tx.commit().await.unwrap();

    assert_eq!(
        other.enrollment(&card(1)).await.unwrap(),
        Some(enrollment("visa", T0))
    );
    let mut tx = other.begin().await.unwrap();
    let err = tx
        .claim_request("client-a", "req-1", T0 + 1, T0 + 901)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DuplicateRequest), "{err:?}");
    drop(tx);

    // A claim waits for a racing transaction that holds the same key, then sees it.
    let mut first = t.store.begin().await.unwrap();
    assert!(first.claim_window(&card(1), 9, T0, T0 + 600).await.unwrap());
    let second = tokio::spawn({
        let other = other.clone();
        async move {
            let mut tx = other.begin().await.unwrap();
            let won = tx.claim_window(&card(1), 9, T0, T0 + 600).await.unwrap();
            tx.commit().await.unwrap();
            won
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "the second claim waits for the first"
    );
    first.commit().await.unwrap();
    assert!(!second.await.unwrap());
    assert_eq!(t.count("used_windows").await, 1);
}
