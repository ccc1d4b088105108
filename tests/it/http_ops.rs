//! The gateway as operators see it: HTTPS with rustls, load shedding with 429 and
//! `Retry-After`, a locked store answered with a fast 503 (readiness says so)
//! and recovered from without a restart, and a graceful shutdown that lets
//! in-flight requests finish.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support;
use crate::support::http::{Options, TestGateway, card, self_signed_tls};
use crate::support::routes::{ENQUIRY, ENROL, HEALTHZ, READYZ, VALUES, VERIFY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_certificate_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, cert_path, key_path) = self_signed_tls(dir.path());
    let mut gw = TestGateway::start(Options {
        tls: Some((cert_path, key_path)),
        ..Options::default()
    })
    .await;
    assert!(gw.url.starts_with("https://"));
    // A client that does not trust the certificate cannot connect.
    let untrusting = reqwest::Client::new();
    assert!(
        untrusting
            .get(format!("{}{HEALTHZ}", gw.url))
            .send()
            .await
            .is_err()
    );
    gw.http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let answer = gw.call("POST", VERIFY, &card(json!({"cvv2": "123"}))).await;
    assert_eq!(answer.status, 200);
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(gw.url.replace("https://", "http://") + HEALTHZ)
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_429_and_retry_after() {
    let gw = TestGateway::start(Options {
        max_in_flight: 1,
        ..Options::default()
    })
    .await;
    let body = card(json!({"numberOfValues": 24}));
    let requests = (0..24)
        .map(|_| Box::pin(gw.call("POST", VALUES, &body)))
        .collect();
    let answers = join_all(requests).await;
    let shed: Vec<_> = answers.iter().filter(|a| a.status == 429).collect();
    let served = answers.iter().filter(|a| a.status == 200).count();
    assert!(
        !shed.is_empty(),
        "24 concurrent requests over a limit of 1 shed some"
    );
    assert!(served >= 1);
    assert_eq!(shed.len() + served, answers.len(), "nothing but 200 or 429");
    for a in &shed {
        assert_eq!(a.code(), "overloaded");
        assert_eq!(a.headers["retry-after"], "1");
    }
    // Health stays outside the limit.
    assert_eq!(gw.send_raw("GET", HEALTHZ, &[], vec![]).await.status, 200);
    gw.stop().await;
}

/// Polls every future together (all requests in flight at once) and collects
/// their outputs in order.
async fn join_all<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    let mut results: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futures.iter_mut().enumerate() {
            if results[i].is_none() {
                match std::pin::Pin::new(f).poll(cx) {
                    std::task::Poll::Ready(v) => results[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().map(Option::unwrap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_store_fails_fast_with_503_and_recovers() {
    let gw = TestGateway::start(Options::default()).await;
    let mut locker = crate::support::lock_sqlite(&gw.db).await;

    let started = Instant::now();
    let answer = gw.call("POST", ENROL, &card(json!({}))).await;
    assert_eq!(
        (answer.status, answer.code()),
        (503, "store_unavailable".into())
    );
    assert_eq!(answer.headers["retry-after"], "1");
    assert!(
        answer.json().get("message").is_none(),
        "a 5xx carries no detail"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails within the store's timeout"
    );
    let ready = gw.send_raw("GET", READYZ, &[], vec![]).await;
    assert_eq!(
        (ready.status, ready.json()["store"].clone()),
        (503, json!("unavailable"))
    );

    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    drop(locker);
    let ready = gw.send_raw("GET", READYZ, &[], vec![]).await;
    assert_eq!(ready.status, 200, "ready again without a restart");
    let answer = gw.call("POST", ENROL, &card(json!({}))).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.json()["changed"],
        true,
        "the failed request enrolled nothing"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let gw = TestGateway::start(Options::default()).await;
    // Hold the store so a request stays in flight, then ask the server to stop.
    let mut locker = crate::support::lock_sqlite(&gw.db).await;
    let url = gw.url.clone();
    let in_flight = tokio::spawn({
        let url = url.clone();
        let body = card(json!({}));
        let headers = gw.signed_headers(
            &gw.clients.main,
            "drain-1",
            support::http::T0 * 1000,
            "POST",
            ENROL,
            &serde_json::to_vec(&body).unwrap(),
        );
        async move {
            let mut request = reqwest::Client::new()
                .post(format!("{url}{ENROL}"))
                .body(serde_json::to_vec(&body).unwrap());
            for (k, v) in headers {
                request = request.header(k, v);
            }
            request.send().await.map(|r| r.status().as_u16())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(gw.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New connections are refused while draining; the in-flight request goes on.
    assert!(reqwest::get(format!("{url}{HEALTHZ}")).await.is_err());
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let status = in_flight.await.unwrap().unwrap();
    assert_eq!(
        status, 200,
        "the in-flight request finished during the drain"
    );
    stopping.await.unwrap();
}

/// The SQLite file's disk fills up under a running gateway: enrolments get a
/// fast 503 `store_unavailable`, `/readyz` says the store is unavailable, the
/// enrolments accepted before are kept and the refused ones left nothing; with
/// space again the gateway serves without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_store_fails_fast_with_503_and_recovers() {
    use support::disk::{Tmpfs, fill};
    use support::instances::pan;
    let mount = tempfile::tempdir().unwrap();
    let _tmpfs = Tmpfs::mount(mount.path(), "1m");
    let gw = TestGateway::start(Options {
        db_dir: Some(mount.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let body = |n: u32| json!({"cardNumber": pan(n), "expiryDate": support::http::EXPIRY});
    assert_eq!(gw.call("POST", ENROL, &body(0)).await.status, 200);
    let filler = fill(mount.path());

    // Enrol new cards until the full disk is noticed (a few may still fit in
    // pages the database already has).
    let mut accepted = vec![0];
    let failed = loop {
        let n = u32::try_from(accepted.len()).unwrap();
        assert!(n < 2000, "the full disk was never noticed");
        let started = Instant::now();
        let answer = gw.call("POST", ENROL, &body(n)).await;
        if answer.status == 200 {
            accepted.push(n);
            continue;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "fails within the store's timeout"
        );
        break (n, answer);
    };
    let (refused_card, answer) = failed;
    assert_eq!(
        (answer.status, answer.code()),
        (503, "store_unavailable".into()),
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.headers["retry-after"], "1");
    let ready = gw.send_raw("GET", READYZ, &[], vec![]).await;
    assert_eq!(
        (ready.status, ready.json()["store"].clone()),
        (503, json!("unavailable"))
    );

    // Space again: ready without a restart, nothing accepted lost, the refused
    // enrolment not half made.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.send_raw("GET", READYZ, &[], vec![]).await.status != 200 {
        assert!(Instant::now() < deadline, "not ready again within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in &accepted {
        let enquiry = gw.call("POST", ENQUIRY, &body(*n)).await;
        assert_eq!(
            (enquiry.status, enquiry.json()["enrollment"].clone()),
            (200, json!("enrolled")),
            "card {n} accepted before the disk filled"
        );
    }
    let enquiry = gw.call("POST", ENQUIRY, &body(refused_card)).await;
    assert_eq!(
        enquiry.json()["enrollment"],
        json!("not_enrolled"),
        "refused, yet enrolled"
    );
    let again = gw.call("POST", ENROL, &body(refused_card)).await;
    assert_eq!(
        (again.status, again.json()["changed"].clone()),
        (200, json!(true))
    );
    gw.stop().await;
}
