//! The persistence port against real SQLite files, one fresh file per test.
//!
//! What the store's callers rely on: schema creation and idempotent migrations,
//! replay refusal with expiry, all-or-nothing transactions, idempotent enrolment,
//! failure counting, single use of windows under concurrency, cleanup, durability of
//! a commit across close and reopen, and `Unavailable` (never a bug report) when the
//! file cannot be written, is locked past the timeout, or the store is closed.
//! Rows are counted through a separate raw connection, not through the store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::{self, OpenOptions, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dcvv_gateway::store::{CardId, Enrollment, Store, StoreError, StoreSettings};
use proptest::prelude::*;
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

/// A store on a new file in its own directory.
struct TestStore {
    dir: TempDir,
    store: Store,
}

impl TestStore {
    async fn new() -> Self {
        Self::with_timeout(Duration::from_secs(10)).await
    }

    async fn with_timeout(acquire_timeout: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&settings(dir.path(), acquire_timeout))
            .await
            .unwrap();
        Self { dir, store }
    }

    fn path(&self) -> PathBuf {
        db_path(self.dir.path())
    }

    fn settings(&self) -> StoreSettings {
        settings(self.dir.path(), Duration::from_secs(10))
    }

    async fn reopen(&self) -> Store {
        Store::open_sqlite(&self.settings()).await.unwrap()
    }

    async fn count(&self, table: &str) -> i64 {
        let mut conn = raw(&self.path()).await;
        let n = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
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

fn db_path(dir: &Path) -> PathBuf {
    dir.join("store.db")
}

fn settings(dir: &Path, acquire_timeout: Duration) -> StoreSettings {
    StoreSettings {
        sqlite_path: db_path(dir),
        acquire_timeout,
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

// ---- schema and migrations ----

#[tokio::test]
async fn migrations_create_the_schema_on_a_new_file() {
    let t = TestStore::new().await;
    assert!(t.path().is_file());

    let mut conn = raw(&t.path()).await;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    for table in TABLES {
        assert!(tables.iter().any(|t| t == table), "{table} in {tables:?}");
    }
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    for index in ["seen_requests_expires_at", "failures_card_id_at"] {
        assert!(indexes.iter().any(|i| i == index), "{index} in {indexes:?}");
    }
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(journal, "wal");
    conn.close().await.unwrap();

    assert_eq!(t.count("heartbeat").await, 1);
    for table in ["seen_requests", "enrollments", "used_windows", "failures"] {
        assert_eq!(t.count(table).await, 0, "{table}");
    }
}

#[tokio::test]
async fn reopening_an_existing_file_runs_no_migration_twice() {
    let t = TestStore::new().await;
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

#[tokio::test]
async fn a_file_from_a_newer_schema_is_refused() {
    let t = TestStore::new().await;
    t.store.close().await;
    let mut conn = raw(&t.path()).await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99990101000000, 'from the future', 1, x'00', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let err = Store::open_sqlite(&t.settings()).await.unwrap_err();
    assert!(matches!(err, StoreError::Migrate(_)), "{err:?}");
    assert!(!err.is_unavailable());
}

#[tokio::test]
async fn open_is_unavailable_when_the_directory_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let result = Store::open_sqlite(&settings(&missing, Duration::from_secs(2))).await;
    assert_unavailable(result);
    assert!(!missing.exists());
}

// ---- request ids ----

#[tokio::test]
async fn claim_request_refuses_a_live_duplicate_and_accepts_it_after_expiry() {
    let t = TestStore::new().await;
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

#[tokio::test]
async fn request_ids_are_per_client() {
    let t = TestStore::new().await;
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

#[tokio::test]
async fn a_rolled_back_transaction_leaves_nothing() {
    let t = TestStore::new().await;
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

#[tokio::test]
async fn a_transaction_dropped_without_commit_leaves_nothing() {
    let t = TestStore::new().await;
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
async fn store_calls_wait_for_an_open_transaction() {
    // One connection: a read on the handle while a transaction is held waits for it,
    // and gives up as Unavailable after the acquire timeout.
    let t = TestStore::with_timeout(Duration::from_millis(200)).await;
    let tx = t.store.begin().await.unwrap();
    let started = Instant::now();
    assert_unavailable(t.store.enrollment(&card(1)).await);
    assert!(started.elapsed() >= Duration::from_millis(150));
    tx.commit().await.unwrap();
    assert_eq!(t.store.enrollment(&card(1)).await.unwrap(), None);
}

#[tokio::test]
async fn committed_state_survives_close_and_reopen() {
    let t = TestStore::new().await;
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

#[tokio::test]
async fn enroll_is_idempotent_and_keeps_the_first_enrolment() {
    let t = TestStore::new().await;
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

#[tokio::test]
async fn unenroll_is_idempotent_and_clears_only_this_cards_failures() {
    let t = TestStore::new().await;
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

#[tokio::test]
async fn a_masked_pan_made_of_digits_only_is_refused() {
    let t = TestStore::new().await;
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

#[tokio::test]
async fn failures_since_counts_only_failures_at_or_after_since() {
    let t = TestStore::new().await;
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

#[tokio::test]
async fn claim_window_is_single_use_per_card_and_window() {
    let t = TestStore::new().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_of_one_window_have_exactly_one_winner() {
    let t = TestStore::new().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_are_each_durable_when_they_return() {
    // Group commit: many requests share one durable commit, yet each commit returns
    // only once its change can be read from another connection, and a rolled-back
    // transaction in the middle of the group keeps nothing of its own.
    let t = TestStore::new().await;
    let path = t.path();
    let tasks: Vec<_> = (0..64_u8)
        .map(|i| {
            let store = t.store.clone();
            let path = path.clone();
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
                let mut conn = raw(&path).await;
                let seen: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM enrollments WHERE card_id = $1")
                        .bind(card(i).0.as_slice())
                        .fetch_one(&mut conn)
                        .await
                        .unwrap();
                assert_eq!(
                    seen, 1,
                    "request {i} returned before its change was durable"
                );
                conn.close().await.unwrap();
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

// ---- cleanup ----

#[tokio::test]
async fn cleanup_deletes_only_expired_rows_of_all_three_tables() {
    let t = TestStore::new().await;
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

#[tokio::test]
async fn probe_writes_the_heartbeat() {
    let t = TestStore::new().await;
    t.store.probe(T0 + 5).await.unwrap();
    let mut conn = raw(&t.path()).await;
    let at: i64 = sqlx::query_scalar("SELECT at FROM heartbeat WHERE id = 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(at, T0 + 5);
    conn.close().await.unwrap();
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
    let t = TestStore::new().await;
    let mut tx = t.store.begin().await.unwrap();
    tx.enroll(&card(1), &enrollment("visa", T0)).await.unwrap();
    tx.commit().await.unwrap();
    t.store.probe(T0).await.unwrap();
    t.store.close().await;
    t
}

#[tokio::test]
async fn probe_is_unavailable_on_a_read_only_store() {
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
        let store = Store::open_sqlite(&t.settings()).await.unwrap();
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
async fn opening_a_read_only_store_is_unavailable_and_recovers() {
    let t = closed_store_with_data().await;
    assert!(
        !t.path().with_extension("db-wal").exists(),
        "a clean close removes the WAL"
    );

    {
        let _read_only = ReadOnly::apply(t.dir.path());
        // Read-only, SQLite cannot create the -wal and -shm files a WAL database
        // needs: the store refuses to start, as unavailable rather than as a bug.
        assert_unavailable(Store::open_sqlite(&t.settings()).await);
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
async fn probe_is_unavailable_while_another_process_holds_the_write_lock() {
    let t = TestStore::with_timeout(Duration::from_millis(300)).await;
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

#[tokio::test]
async fn every_call_after_close_is_unavailable() {
    let t = TestStore::new().await;
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
fn check_claims(ops: &[(u8, u8, i64, i64)]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t = TestStore::new().await;
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
    fn request_claims_match_a_model(
        ops in proptest::collection::vec((0..2u8, 0..3u8, 0..20i64, 1..30i64), 1..40)
    ) {
        check_claims(&ops);
    }
}
