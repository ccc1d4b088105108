//! The PostgreSQL backend: connection options, the pool, embedded migrations
//! (`migrations/postgres/`), and the few statements only PostgreSQL has.
//!
//! Several gateway processes share one database (DESIGN 6). What keeps them
//! correct is the database, not the processes:
//!
//! - Every request's transaction is a plain READ COMMITTED transaction on its own
//!   pooled connection, run as one closure on one blocking thread
//!   ([`transact`]): its statements are driven there one after the other, so a
//!   request crosses to the store once whatever the number of statements. The claims (request id, single-use window, enrolment) are
//!   single `INSERT … ON CONFLICT` statements on a primary key: when two
//!   transactions race for one key, the second waits for the first to end and then
//!   sees its row, so exactly one of them claims it, and neither gets a unique
//!   violation (the "already used" answer is a result, not an error).
//! - The one read-then-write of the service, the failure limit (count the card's
//!   failures, then record one), is serialized per card by
//!   [`StoreTx::lock_card`](super::StoreTx::lock_card), a transaction-scoped
//!   advisory lock: in READ COMMITTED each statement sees what committed before it
//!   started, so once the lock is granted the count includes every earlier
//!   transaction's failure.
//! - Every connection runs with `synchronous_commit = on` (a commit returns once it
//!   is durable, also on a server configured otherwise), `lock_timeout` equal to
//!   the acquire timeout (a request never waits longer than that for a lock) and
//!   `idle_in_transaction_session_timeout`, so a gateway that hangs with an open
//!   transaction cannot hold locks for ever.
//! - When the server goes away, pooled connections fail (`Io`, SQLSTATE 57P01 …)
//!   and are dropped; new ones are attempted until the acquire timeout, so requests
//!   fail with `Unavailable` within it, and the pool reconnects by itself when the
//!   server is back (each connection is checked before it is handed out).
//!
//! The password is never logged: the URL is shown only redacted, and the options
//! (which hold the password) are never formatted.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};
use tokio::runtime::Handle;

use super::error::Cause;
use super::tx::{StoreTx, TxInner};
use super::{
    CardId, DatabaseUrl, Enrollment, PostgresLocation, StoreError, StoreResult, StoreSettings,
    enrollment_from_row, sql,
};

/// The PostgreSQL schema, embedded at build time.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// `$1` the card's lock key ([`card_lock_key`]).
pub(super) const LOCK_CARD: &str = "SELECT pg_advisory_xact_lock($1)";

/// How long PostgreSQL lets a connection sit idle inside a transaction before it
/// ends the session (and releases its locks). Requests hold a transaction for a
/// few milliseconds; this only catches a gateway that hangs.
const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// The advisory-lock key of a card: its id's first 8 bytes. The id is an HMAC, so
/// keys are spread uniformly and two cards share a lock with probability 2^-64.
pub(super) fn card_lock_key(card: &CardId) -> i64 {
    let [a, b, c, d, e, f, g, h, ..] = card.0;
    i64::from_be_bytes([a, b, c, d, e, f, g, h])
}

/// Opens the pool, checks that the server answers, and runs the migrations
/// (sqlx holds an advisory lock while it migrates, so gateways that start
/// together do not migrate twice). Returns the pool and `host:port/database`.
pub(super) async fn open(
    location: &PostgresLocation,
    settings: &StoreSettings,
) -> StoreResult<(PgPool, String)> {
    let url = match &location.url {
        DatabaseUrl::Value(url) => url.clone(),
        DatabaseUrl::Env(name) => std::env::var(name).map_err(|_| {
            StoreError::Settings(format!(
                "the environment variable {name} (store.database_url_env) is not set"
            ))
        })?,
    };
    let mut options = connect_options(&url)?;
    if let Some(file) = &location.password_file {
        options = options.password(&read_password(file)?);
    }
    let lock_timeout = settings.acquire_timeout.as_millis().to_string();
    let idle_timeout = IDLE_IN_TRANSACTION_TIMEOUT.as_millis().to_string();
    let options = options.application_name("dcvv-gateway").options([
        ("synchronous_commit", "on"),
        ("lock_timeout", lock_timeout.as_str()),
        ("idle_in_transaction_session_timeout", idle_timeout.as_str()),
    ]);
    let target = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    );
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections.max(1))
        .min_connections(0)
        .acquire_timeout(settings.acquire_timeout)
        .test_before_acquire(true)
        .connect_with(options)
        .await?;
    if let Err(err) = MIGRATOR.run(&pool).await {
        pool.close().await;
        return Err(err.into());
    }
    tracing::info!(
        target_db = %target,
        max_connections = settings.max_connections,
        "store opened (postgres)"
    );
    Ok((pool, target))
}

/// Runs `work` as one transaction: on one blocking thread, which takes a pooled
/// connection, begins, drives each statement of the closure to completion,
/// and commits when the closure returns `Ok` (rolls back on `Err`).
pub(super) async fn transact<T, E, F>(pool: &PgPool, work: F) -> Result<T, E>
where
    F: FnOnce(&mut StoreTx<'_>) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let handle = Handle::current();
        let mut tx = handle
            .block_on(pool.begin())
            .map_err(|e| E::from(e.into()))?;
        let result = work(&mut StoreTx::new(TxInner::Postgres(Statements {
            tx: &mut tx,
            handle: &handle,
        })));
        match result {
            Ok(value) => {
                handle
                    .block_on(tx.commit())
                    .map_err(|e| E::from(e.into()))?;
                Ok(value)
            }
            Err(e) => {
                // Dropped without commit, sqlx rolls back anyway; this says so at once.
                let _ = handle.block_on(tx.rollback());
                Err(e)
            }
        }
    })
    .await
    .unwrap_or_else(|e| {
        Err(if e.is_panic() {
            StoreError::Internal(Cause::Panicked)
        } else {
            StoreError::Unavailable(Cause::WorkerStopped)
        }
        .into())
    })
}

/// The card's enrolment, read outside any transaction. Blocking: call it from a
/// blocking thread inside the runtime.
pub(super) fn enrollment_blocking(pool: &PgPool, card: &CardId) -> StoreResult<Option<Enrollment>> {
    let handle =
        Handle::try_current().map_err(|_| StoreError::Unavailable(Cause::WorkerStopped))?;
    handle.block_on(enrollment(pool, card))
}

/// The card's enrolment, read outside any transaction.
pub(super) async fn enrollment(pool: &PgPool, card: &CardId) -> StoreResult<Option<Enrollment>> {
    let row = sqlx::query_as::<_, (String, String, i64)>(sql::ENROLLMENT)
        .bind(card.0.as_slice())
        .fetch_optional(pool)
        .await?;
    Ok(row.map(enrollment_from_row))
}

/// The statements of a transaction, each driven to completion on the
/// transaction's blocking thread.
pub(super) struct Statements<'a> {
    tx: &'a mut sqlx::Transaction<'static, Postgres>,
    handle: &'a Handle,
}

impl Statements<'_> {
    fn execute(
        &mut self,
        query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> StoreResult<u64> {
        Ok(self
            .handle
            .block_on(query.execute(&mut **self.tx))?
            .rows_affected())
    }

    pub(super) fn lock_card(&mut self, card: &CardId) -> StoreResult<()> {
        self.execute(sqlx::query(LOCK_CARD).bind(card_lock_key(card)))
            .map(drop)
    }

    pub(super) fn claim_request(
        &mut self,
        client: &str,
        request_id: &str,
        now: i64,
        expires_at: i64,
    ) -> StoreResult<u64> {
        self.execute(
            sqlx::query(sql::CLAIM_REQUEST)
                .bind(client.to_owned())
                .bind(request_id.to_owned())
                .bind(expires_at)
                .bind(now),
        )
    }

    pub(super) fn enrollment(&mut self, card: &CardId) -> StoreResult<Option<Enrollment>> {
        let query = sqlx::query_as::<_, (String, String, i64)>(sql::ENROLLMENT)
            .bind(card.0.to_vec())
            .fetch_optional(&mut **self.tx);
        Ok(self.handle.block_on(query)?.map(enrollment_from_row))
    }

    pub(super) fn enroll(&mut self, card: &CardId, e: &Enrollment) -> StoreResult<u64> {
        self.execute(
            sqlx::query(sql::ENROLL)
                .bind(card.0.to_vec())
                .bind(e.programme.clone())
                .bind(e.masked_pan.clone())
                .bind(e.enrolled_at),
        )
    }

    pub(super) fn unenroll(&mut self, card: &CardId) -> StoreResult<u64> {
        self.execute(sqlx::query(sql::UNENROLL).bind(card.0.to_vec()))
    }

    pub(super) fn failures_since(&mut self, card: &CardId, since: i64) -> StoreResult<i64> {
        let query = sqlx::query_scalar::<_, i64>(sql::FAILURES_SINCE)
            .bind(card.0.to_vec())
            .bind(since)
            .fetch_one(&mut **self.tx);
        Ok(self.handle.block_on(query)?)
    }

    pub(super) fn add_failure(&mut self, card: &CardId, at: i64, expires: i64) -> StoreResult<u64> {
        self.execute(
            sqlx::query(sql::ADD_FAILURE)
                .bind(card.0.to_vec())
                .bind(at)
                .bind(expires),
        )
    }

    pub(super) fn clear_failures(&mut self, card: &CardId) -> StoreResult<u64> {
        self.execute(sqlx::query(sql::CLEAR_FAILURES).bind(card.0.to_vec()))
    }

    pub(super) fn claim_window(
        &mut self,
        card: &CardId,
        window: i64,
        at: i64,
        expires: i64,
    ) -> StoreResult<u64> {
        self.execute(
            sqlx::query(sql::CLAIM_WINDOW)
                .bind(card.0.to_vec())
                .bind(window)
                .bind(at)
                .bind(expires),
        )
    }

    pub(super) fn heartbeat(&mut self, now: i64) -> StoreResult<u64> {
        self.execute(sqlx::query(sql::HEARTBEAT).bind(now))
    }

    pub(super) fn delete_expired(&mut self, now: i64) -> StoreResult<u64> {
        let mut deleted = 0;
        for statement in sql::CLEANUP {
            deleted += self.execute(sqlx::query(statement).bind(now))?;
        }
        Ok(deleted)
    }
}

/// Parses a `postgres://` URL. The error never repeats the URL.
///
/// # Errors
/// [`StoreError::Settings`] when it is not a PostgreSQL URL.
pub(crate) fn connect_options(url: &str) -> StoreResult<PgConnectOptions> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::Settings(
            "the database URL must start with postgres:// or postgresql://".into(),
        ));
    }
    PgConnectOptions::from_str(url).map_err(|e| {
        // sqlx's message names the part that failed, not the URL's text.
        StoreError::Settings(format!("the database URL is not valid: {e}"))
    })
}

/// Does the URL carry a password (`postgres://user:password@host/…` or
/// `?password=…`)?
pub(crate) fn url_has_password(url: &str) -> bool {
    let userinfo_password = authority(url)
        .and_then(|authority| authority.rsplit_once('@'))
        .is_some_and(|(userinfo, _)| userinfo.contains(':'));
    let query_password = url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|pair| pair.split('=').next() == Some("password"))
    });
    userinfo_password || query_password
}

/// The URL with any password replaced by `***`, for logs and `Debug`.
pub(crate) fn redact(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(authority) = authority(url)
        && let Some((userinfo, _)) = authority.rsplit_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        let start = url.find("://").map_or(0, |i| i + 3);
        out = format!(
            "{}{user}:***{}",
            &url[..start],
            &url[start + userinfo.len()..]
        );
    }
    match out.split_once('?') {
        Some((head, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{head}?{}", query.join("&"))
        }
        None => out,
    }
}

/// `user:password@host:port` of `scheme://user:password@host:port/path?query`.
fn authority(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn read_password(file: &Path) -> StoreResult<String> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        StoreError::Settings(format!(
            "cannot read store.database_password_file {}: {e}",
            file.display()
        ))
    })?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(StoreError::Settings(format!(
            "store.database_password_file {} is empty",
            file.display()
        )));
    }
    Ok(password.to_owned())
}

/// SQLSTATEs that mean "the database cannot serve this now, try again later"
/// (<https://www.postgresql.org/docs/current/errcodes-appendix.html>).
pub(super) fn code_is_unavailable(code: &str) -> bool {
    const CLASSES: [&str; 3] = [
        "08", // connection exception
        "53", // insufficient resources: disk full, out of memory, too many connections
        "58", // system error: I/O error
    ];
    const CODES: [&str; 9] = [
        "57P01", // admin_shutdown: the server is stopping (pg_ctl stop -m fast)
        "57P02", // crash_shutdown
        "57P03", // cannot_connect_now: starting up or in recovery
        "57014", // query_canceled: statement_timeout, or cancelled by an operator
        "40001", // serialization_failure
        "40P01", // deadlock_detected
        "55P03", // lock_not_available: lock_timeout (a card or row lock held too long)
        "25006", // read_only_sql_transaction: connected to a standby after a failover
        "25P03", // idle_in_transaction_session_timeout
    ];
    CODES.contains(&code) || CLASSES.iter().any(|class| code.starts_with(class))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_codes() {
        for code in [
            "08006", "08001", "57P01", "57P03", "40001", "40P01", "53100", "53300", "55P03",
            "25006", "58030",
        ] {
            assert!(code_is_unavailable(code), "{code}");
        }
        // unique_violation, check_violation, undefined_table, syntax error,
        // insufficient_privilege, invalid_password, data_corrupted
        for code in [
            "23505", "23514", "42P01", "42601", "42501", "28P01", "XX001",
        ] {
            assert!(!code_is_unavailable(code), "{code}");
        }
    }

    #[test]
    fn passwords_are_found_and_redacted() {
        let url = "postgres://gw:s3cr:et@db.example:5432/dcvv?sslmode=require";
        assert!(url_has_password(url));
        let shown = redact(url);
        assert_eq!(
            shown,
            "postgres://gw:***@db.example:5432/dcvv?sslmode=require"
        );
        assert!(!shown.contains("s3cr"));

        let url = "postgresql://gw@db/dcvv?sslmode=require&password=hunter2";
        assert!(url_has_password(url));
        let shown = redact(url);
        assert_eq!(
            shown,
            "postgresql://gw@db/dcvv?sslmode=require&password=***"
        );

        for url in [
            "postgres://gw@db.example:5432/dcvv",
            "postgres://db/dcvv?sslmode=require",
            "postgres://gw@[::1]:5432/dcvv",
        ] {
            assert!(!url_has_password(url), "{url}");
            assert_eq!(redact(url), url);
        }
    }

    #[test]
    fn urls_are_checked_without_repeating_them() {
        assert!(connect_options("postgres://gw@db.example:5432/dcvv?sslmode=require").is_ok());
        let err = connect_options("mysql://gw:topsecret@db/dcvv").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
        let err = connect_options("postgres://gw:topsecret@db:notaport/dcvv").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
    }

    #[test]
    fn card_lock_keys_use_the_ids_first_bytes() {
        let mut id = [0u8; 32];
        id[7] = 1;
        assert_eq!(card_lock_key(&CardId(id)), 1);
        assert_ne!(
            card_lock_key(&CardId([0xff; 32])),
            card_lock_key(&CardId(id))
        );
    }
}
