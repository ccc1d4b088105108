//! PostgreSQL stops under load (issue 4, part 5; DESIGN 7.6): a real
//! `dcvv-gateway serve` on a throwaway PostgreSQL cluster serves enrolments and
//! single-use verifications from several clients at once; the server is stopped
//! (`pg_ctl stop -m fast`) in the middle of it and started again a few seconds
//! later, without touching the gateway.
//!
//! What must hold: while the database is down, requests fail with 503
//! `store_unavailable` within the acquire timeout (no hangs) and `/readyz` says
//! the store is down; once it is back the same process serves again by itself;
//! and nothing accepted is lost or duplicated: every enrolment and every
//! approval answered 2xx before, during or after the outage is in the database
//! afterwards, and no (card, window) was approved twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Mutex;

use crate::support;
use crate::support::http::{EXPIRY, K, key};
use crate::support::instances::{Fleet, Instance, now_ms, pan};
use crate::support::postgres::PG;
use crate::support::reference;
use crate::support::routes::{ENROL, VERIFY};

const ACQUIRE_TIMEOUT_MS: u64 = 1000;
/// A request may take the acquire timeout once or twice (a read outside the
/// transaction, then the transaction) plus token work; anything near this is a hang.
const MAX_LATENCY: Duration = Duration::from_secs(6);

/// What the clients saw.
#[derive(Default)]
struct Outcomes {
    /// Masked PANs whose enrolment was answered 200.
    enrolled: BTreeSet<String>,
    /// (masked PAN, window) approvals answered 200 `match`, with their count.
    approvals: BTreeMap<(String, u64), u32>,
    /// Status (and error code) → how many.
    statuses: BTreeMap<String, u32>,
    /// The slowest answer of all.
    slowest: Duration,
    /// 2xx answers that started after the database was back.
    ok_after_recovery: u32,
}

fn masked(pan: &str) -> String {
    format!("{}******{}", &pan[..6], &pan[pan.len() - 4..])
}

/// One client: enrols a new card, then sends its current dynamic value twice at
/// once (a single-use window must be approved at most once), over and over.
async fn client(
    gateway: Arc<Instance>,
    worker: u32,
    stop: Arc<AtomicBool>,
    recovered: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Outcomes>>,
) {
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let pan = pan(worker * 1500 + n);
        n += 1;
        assert!(n < 1500, "worker {worker} ran out of cards");
        let body = json!({"cardNumber": pan, "expiryDate": EXPIRY});
        let after_recovery = recovered.load(Ordering::SeqCst);
        let started = Instant::now();
        let answer = gateway.post(ENROL, &body).await;
        record(&outcomes, &answer, started.elapsed(), after_recovery).await;
        if answer.status == 200 {
            outcomes.lock().await.enrolled.insert(masked(&pan));
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }

        let window = reference::window(now_ms() / 1000, 300);
        let code = |w: u64| reference::tdcvv2(&key(K), &pan, EXPIRY, w).1;
        let value = code(window);
        // The gateway claims the first accepted window whose code matches; where a
        // neighbouring window has the same code (1 in 1000), which window that is
        // depends on the gateway's clock: such a card is not verified.
        if code(window - 1) == value || code(window + 1) == value {
            continue;
        }
        let body = json!({"cardNumber": pan, "expiryDate": EXPIRY, "cvv2": value});
        let after_recovery = recovered.load(Ordering::SeqCst);
        let started = Instant::now();
        let (first, second) =
            tokio::join!(gateway.post(VERIFY, &body), gateway.post(VERIFY, &body));
        let elapsed = started.elapsed();
        for answer in [first, second] {
            record(&outcomes, &answer, elapsed, after_recovery).await;
            if answer.status == 200 && answer.json()["reason"] == "match" {
                *outcomes
                    .lock()
                    .await
                    .approvals
                    .entry((masked(&pan), window))
                    .or_default() += 1;
            }
        }
    }
}

async fn record(
    outcomes: &Mutex<Outcomes>,
    answer: &support::http::Answer,
    elapsed: Duration,
    after_recovery: bool,
) {
    let label = if answer.status == 200 {
        "200".to_owned()
    } else {
        format!("{} {}", answer.status, answer.code())
    };
    let mut o = outcomes.lock().await;
    *o.statuses.entry(label).or_default() += 1;
    o.slowest = o.slowest.max(elapsed);
    if answer.status == 200 && after_recovery {
        o.ok_after_recovery += 1;
    }
}

async fn wait_for_readyz(gateway: &Instance, want: u16, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = gateway.readyz().await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {status} {body} after {within:?}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_under_load_gives_fast_503_then_recovers_and_loses_nothing() {
    let fleet = Fleet::new(ACQUIRE_TIMEOUT_MS).await;
    let gateway = Arc::new(fleet.start("gw").await);
    let stop = Arc::new(AtomicBool::new(false));
    let recovered = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            tokio::spawn(client(
                gateway.clone(),
                w,
                stop.clone(),
                recovered.clone(),
                outcomes.clone(),
            ))
        })
        .collect();

    // Load on a healthy store.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = outcomes
        .lock()
        .await
        .statuses
        .get("200")
        .copied()
        .unwrap_or(0);
    assert!(before > 0, "nothing succeeded before the stop");

    // Stop the database under load.
    tokio::task::spawn_blocking(|| PG.stop_server())
        .await
        .unwrap();
    let ready = wait_for_readyz(&gateway, 503, Duration::from_secs(10)).await;
    assert_eq!(ready["store"], "unavailable", "{ready}");
    assert_eq!(ready["hsm"], "ok", "{ready}");
    assert_eq!(ready["status"], "unavailable", "{ready}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused = outcomes
        .lock()
        .await
        .statuses
        .get("503 store_unavailable")
        .copied()
        .unwrap_or(0);
    assert!(
        refused > 0,
        "no request was refused with 503 while the database was down"
    );

    // Start it again; the gateway is not restarted.
    tokio::task::spawn_blocking(|| PG.start_server())
        .await
        .unwrap();
    let ready = wait_for_readyz(&gateway, 200, Duration::from_secs(30)).await;
    assert_eq!(ready["store"], "ok");
    recovered.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }

    let outcomes = outcomes.lock().await;
    eprintln!("statuses: {:?}", outcomes.statuses);
    eprintln!(
        "enrolled: {}, approvals: {}, slowest: {:?}",
        outcomes.enrolled.len(),
        outcomes.approvals.len(),
        outcomes.slowest
    );
    assert!(
        outcomes.ok_after_recovery > 0,
        "nothing succeeded after recovery"
    );
    for status in outcomes.statuses.keys() {
        assert!(
            status == "200" || status == "503 store_unavailable",
            "unexpected answer {status}: {:?}\n{}",
            outcomes.statuses,
            gateway.log_text()
        );
    }
    assert!(
        outcomes.slowest < MAX_LATENCY,
        "an answer took {:?} (acquire timeout {ACQUIRE_TIMEOUT_MS} ms)",
        outcomes.slowest
    );
    // Each window was sent twice at once: approved exactly once, never twice.
    for (card_window, count) in &outcomes.approvals {
        assert_eq!(*count, 1, "{card_window:?} approved {count} times");
    }

    // Nothing accepted is lost: the database holds every enrolment and every
    // approved window the clients were told about.
    let mut db = fleet.db().await;
    let rows: Vec<(String,)> = sqlx::query_as("SELECT masked_pan FROM enrollments")
        .fetch_all(&mut db)
        .await
        .unwrap();
    let in_db: BTreeSet<String> = rows.into_iter().map(|(m,)| m).collect();
    let lost: Vec<_> = outcomes.enrolled.difference(&in_db).collect();
    assert!(
        lost.is_empty(),
        "enrolments answered 200 but not stored: {lost:?}"
    );
    let used: Vec<(String, i64)> = sqlx::query_as(
        "SELECT e.masked_pan, u.window_index FROM used_windows u \
         JOIN enrollments e ON e.card_id = u.card_id",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let used: BTreeSet<(String, u64)> = used
        .into_iter()
        .map(|(m, w)| (m, u64::try_from(w).unwrap()))
        .collect();
    for approval in outcomes.approvals.keys() {
        assert!(used.contains(approval), "approval {approval:?} not stored");
    }
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM used_windows")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(
        usize::try_from(rows).unwrap(),
        used.len(),
        "a used window belongs to no enrolled card"
    );
    // And through the gateway: an approved value is refused from now on.
    if let Some(((masked_pan, window), _)) = outcomes.approvals.iter().next() {
        let n = (0..10_000)
            .find(|&n| masked(&pan(n)) == *masked_pan)
            .unwrap();
        let value = reference::tdcvv2(&key(K), &pan(n), EXPIRY, *window).1;
        let answer = gateway
            .post(
                VERIFY,
                &json!({"cardNumber": pan(n), "expiryDate": EXPIRY, "cvv2": value}),
            )
            .await;
        assert_eq!(answer.status, 200);
        assert_ne!(answer.json()["result"], "approved");
    }
}
