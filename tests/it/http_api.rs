//! The signed API end to end (issue 3): a real gateway on 127.0.0.1:0 over this
//! process's SoftHSM token and a SQLite file, driven over real sockets. Codes are
//! checked against the independent software reference of DESIGN 2
//! (`support::reference`, itself proven on the vectors), with keys imported from
//! the vectors' clear values; the injectable clock puts requests on exact
//! window boundaries.

use serde_json::{Value, json};

use crate::support;
use crate::support::http::{
    EXPIRY, K, K4, Options, PAN, T0, TestGateway, approved, card, declined, key,
};
use crate::support::reference;
use crate::support::routes::{
    CODES, DCVV, ENQUIRY, ENROL, HEALTHZ, KEY_INVENTORY, METRICS, OPENAPI, READYZ, UNENROL, VALUES,
    VERIFY,
};

fn dynamic(t: u64) -> String {
    reference::tdcvv2(&key(K), PAN, EXPIRY, t).1
}

fn static_cvv2() -> String {
    reference::cvv(&key(K), PAN, EXPIRY, "000", 3).1
}

async fn verify(gw: &TestGateway, cvv2: &str) -> (String, String, String) {
    gw.call("POST", VERIFY, &card(json!({"cvv2": cvv2})))
        .await
        .verdict()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_values_match_the_reference_and_enrol_the_card() {
    let gw = TestGateway::start(Options::default()).await;
    // 90 s into window T: the first value is valid for 210 s more, 4 minutes rounded up.
    gw.clock.set_seconds(T0 + 90);
    let answer = gw
        .call(
            "POST",
            VALUES,
            &card(json!({"numberOfValues": 3, "channel": "W"})),
        )
        .await;
    let v = answer.ok_json();
    let t = T0 / 300;
    assert_eq!(v["cardNumber"], "412345******2349");
    assert_eq!(v["dcvv2"], dynamic(t));
    assert_eq!(v["dcvv2GenerationTime"], "2026-01-01T00:01:30Z");
    assert_eq!(v["dcvv2ExpiryMinutes"], 4);
    assert_eq!(v["enrollment"], "enrolled");
    assert_eq!(v["programme"], "test");
    assert_eq!(v["keyCheckValue"], "08D7B4");
    let values = v["values"].as_array().unwrap();
    assert_eq!(values.len(), 3);
    let times = [
        ("2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"),
        ("2026-01-01T00:05:00Z", "2026-01-01T00:10:00Z"),
        ("2026-01-01T00:10:00Z", "2026-01-01T00:15:00Z"),
    ];
    for (i, (value, (from, until))) in values.iter().zip(times).enumerate() {
        assert_eq!(value["dcvv2"], dynamic(t + i as u64), "value {i}");
        assert_eq!(value["validFrom"], from);
        assert_eq!(value["validUntil"], until);
    }
    // The vector of DESIGN 2.4 for this window: the gateway agrees with it for
    // the vector's PAN through the engine (`vectors.rs`); here the PAN must
    // pass Luhn, so the reference stands in.
    let enquiry = gw.call("POST", ENQUIRY, &card(json!({}))).await;
    assert_eq!(enquiry.json()["enrollment"], "enrolled");

    let most = gw
        .call("POST", VALUES, &card(json!({"numberOfValues": 24})))
        .await;
    let values = most.json()["values"].as_array().unwrap().clone();
    assert_eq!(values.len(), 24);
    assert_eq!(values[23]["dcvv2"], dynamic(t + 23));
    let one = gw.call("POST", VALUES, &card(json!({}))).await.json();
    assert_eq!(
        one["values"].as_array().unwrap().len(),
        1,
        "numberOfValues defaults to 1"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_switches_the_static_cvv2_off_and_unenrolment_on() {
    let gw = TestGateway::start(Options::default()).await;
    assert_eq!(verify(&gw, &static_cvv2()).await, approved("static"));
    let wrong = if static_cvv2() == "000" { "001" } else { "000" };
    assert_eq!(verify(&gw, wrong).await, declined("mismatch", "static"));

    let enrol = gw.call("POST", ENROL, &card(json!({}))).await.json();
    assert_eq!(
        (enrol["enrollment"].clone(), enrol["changed"].clone()),
        (json!("enrolled"), json!(true))
    );
    let again = gw.call("POST", ENROL, &card(json!({}))).await.json();
    assert_eq!(again["changed"], false, "enrolment is idempotent");
    assert_eq!(
        verify(&gw, &static_cvv2()).await,
        declined("static_cvv2_disabled", "static")
    );
    assert_eq!(verify(&gw, &dynamic(T0 / 300)).await, approved("dynamic"));

    let unenrol = gw.call("POST", UNENROL, &card(json!({}))).await.json();
    assert_eq!(
        (unenrol["enrollment"].clone(), unenrol["changed"].clone()),
        (json!("not_enrolled"), json!(true))
    );
    let again = gw.call("POST", UNENROL, &card(json!({}))).await.json();
    assert_eq!(again["changed"], false, "unenrolment is idempotent");
    assert_eq!(
        gw.call("POST", ENQUIRY, &card(json!({}))).await.json()["enrollment"],
        "not_enrolled"
    );
    assert_eq!(verify(&gw, &static_cvv2()).await, approved("static"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_refuses_a_second_use_of_a_window() {
    let gw = TestGateway::start(Options::default()).await;
    let code = gw.call("POST", VALUES, &card(json!({}))).await.json()["dcvv2"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(verify(&gw, &code).await, approved("dynamic"));
    assert_eq!(
        verify(&gw, &code).await,
        declined("code_already_used", "dynamic")
    );
    // The next window's code is a different (card, window) pair.
    gw.clock.set_seconds(T0 + 300);
    assert_eq!(
        verify(&gw, &dynamic(T0 / 300 + 1)).await,
        approved("dynamic")
    );
    gw.stop().await;

    let reusable = TestGateway::start(Options {
        single_use: false,
        ..Options::default()
    })
    .await;
    reusable.call("POST", ENROL, &card(json!({}))).await;
    assert_eq!(verify(&reusable, &code).await, approved("dynamic"));
    assert_eq!(verify(&reusable, &code).await, approved("dynamic"));
    reusable.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_limit_declines_after_n_mismatches() {
    let gw = TestGateway::start(Options {
        failure_limit: 3,
        ..Options::default()
    })
    .await;
    gw.call("POST", ENROL, &card(json!({}))).await;
    let right = dynamic(T0 / 300);
    let wrong = if right == "999" { "998" } else { "999" };
    for _ in 0..3 {
        assert_eq!(verify(&gw, wrong).await, declined("mismatch", "dynamic"));
    }
    assert_eq!(
        verify(&gw, &right).await,
        declined("too_many_failures", "dynamic")
    );
    // An unenrol/enrol cycle clears the failures.
    gw.call("POST", UNENROL, &card(json!({}))).await;
    gw.call("POST", ENROL, &card(json!({}))).await;
    assert_eq!(verify(&gw, &right).await, approved("dynamic"));
    // So does the rolling period passing (24 h), for a card blocked again.
    for _ in 0..3 {
        verify(&gw, wrong).await;
    }
    gw.clock.set_seconds(T0 + 86_400 + 300);
    assert_eq!(
        verify(&gw, &dynamic((T0 + 86_400 + 300) / 300)).await,
        approved("dynamic")
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_boundaries() {
    let gw = TestGateway::start(Options {
        single_use: false,
        ..Options::default()
    })
    .await;
    gw.call("POST", ENROL, &card(json!({}))).await;
    let t = T0 / 300;
    // Last second of window T: T's code is current; T+1 is a future window, refused with F = 0.
    gw.clock.set_seconds(T0 + 299);
    assert_eq!(verify(&gw, &dynamic(t)).await, approved("dynamic"));
    assert_eq!(verify(&gw, &dynamic(t + 1)).await.1, "mismatch");
    // First second of T+1: its code is current, T's is accepted as the one past window.
    gw.clock.set_seconds(T0 + 300);
    assert_eq!(verify(&gw, &dynamic(t + 1)).await, approved("dynamic"));
    assert_eq!(verify(&gw, &dynamic(t)).await, approved("dynamic"));
    // Two windows later T is out of the past tolerance (G = 1).
    gw.clock.set_seconds(T0 + 600);
    assert_eq!(verify(&gw, &dynamic(t)).await.1, "mismatch");
    gw.stop().await;

    let strict = TestGateway::start(Options {
        single_use: false,
        past_windows: 0,
        future_windows: 1,
        ..Options::default()
    })
    .await;
    strict.call("POST", ENROL, &card(json!({}))).await;
    strict.clock.set_seconds(T0 + 300);
    assert_eq!(
        verify(&strict, &dynamic(t)).await.1,
        "mismatch",
        "G = 0 refuses the past window"
    );
    assert_eq!(
        verify(&strict, &dynamic(t + 2)).await,
        approved("dynamic"),
        "F = 1 accepts the next"
    );
    strict.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_codes_and_contactless_dcvv_match_the_reference() {
    let gw = TestGateway::start(Options::default()).await;
    let code = |body: Value| {
        let gw = &gw;
        async move {
            let answer = gw.call("POST", CODES, &card(body)).await;
            assert_eq!(
                answer.status,
                200,
                "{}",
                String::from_utf8_lossy(&answer.body)
            );
            answer.json()
        }
    };
    let cvv = code(json!({"kind": "cvv", "serviceCode": "101"})).await;
    assert_eq!(
        cvv["securityCode"],
        reference::cvv(&key(K), PAN, EXPIRY, "101", 3).1
    );
    assert_eq!(cvv["keyCheckValue"], "08D7B4");
    assert_eq!(cvv["kind"], "cvv");
    let five = code(json!({"kind": "cvv", "serviceCode": "101", "digits": 5})).await;
    assert_eq!(
        five["securityCode"],
        reference::cvv(&key(K), PAN, EXPIRY, "101", 5).1
    );
    let cvv2 = code(json!({"kind": "cvv2"})).await;
    assert_eq!(cvv2["securityCode"], static_cvv2());
    let icvv = code(json!({"kind": "icvv"})).await;
    assert_eq!(
        icvv["securityCode"],
        reference::cvv(&key(K), PAN, EXPIRY, "999", 3).1
    );

    let dcvv = reference::dcvv(&key(K4), PAN, EXPIRY, "226", "3210").1;
    let check = |value: String| {
        let gw = &gw;
        async move {
            gw.call(
                "POST",
                DCVV,
                &card(json!({"serviceCode": "226", "atc": "3210", "dcvv": value})),
            )
            .await
            .json()
        }
    };
    let ok = check(dcvv.clone()).await;
    assert_eq!(
        (ok["result"].clone(), ok["method"].clone()),
        (json!("approved"), json!("dcvv"))
    );
    let wrong = if dcvv == "000" { "001" } else { "000" };
    assert_eq!(check(wrong.into()).await["reason"], "mismatch");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_inventory_health_metrics_and_openapi() {
    let gw = TestGateway::start(Options::default()).await;
    let keys = gw.call("GET", KEY_INVENTORY, &Value::Null).await;
    assert_eq!(keys.status, 200);
    let keys = keys.json();
    let tdcvv2 = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"] == support::http::KEYS.imk_tdcvv2.as_str())
        .unwrap()
        .clone();
    assert_eq!(tdcvv2["keyCheckValue"], "08D7B4");
    assert_eq!(tdcvv2["kind"], "imk-tdcvv2");
    assert_eq!(tdcvv2["inUse"], true);
    assert_eq!(
        (tdcvv2["sensitive"].clone(), tdcvv2["extractable"].clone()),
        (json!(true), json!(false))
    );
    // The verifier client may verify but not list keys.
    let verifier = gw.clients.verifier.clone();
    let refused = gw
        .call_as(&verifier, "GET", KEY_INVENTORY, &Value::Null)
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (403, "forbidden_scope".into())
    );

    let health = gw.send_raw("GET", HEALTHZ, &[], vec![]).await;
    assert_eq!(health.status, 200);
    let ready = gw.send_raw("GET", READYZ, &[], vec![]).await;
    assert_eq!(ready.status, 200);
    assert_eq!(
        ready.json(),
        json!({"status": "ready", "hsm": "ok", "keys": "ok", "store": "ok", "audit": "ok"})
    );

    gw.call("POST", VALUES, &card(json!({}))).await;
    let metrics = gw.send_raw("GET", METRICS, &[], vec![]).await;
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(
        text.contains(&format!(
            r#"dcvv_http_requests_total{{route="{VALUES}",method="POST",status="200",code=""}} 1"#
        )),
        "{text}"
    );
    assert!(text.contains(&format!(r#"dcvv_http_requests_total{{route="{KEY_INVENTORY}",method="GET",status="403",code="forbidden_scope"}} 1"#)), "{text}");
    assert!(
        text.contains(
            r#"dcvv_hsm_call_duration_seconds_count{operation="tdcvv2_generate",outcome="ok"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("dcvv_hsm_sessions_max 4"), "{text}");
    // Card data could only reach a metric through a label (values are numbers,
    // and a number such as a resident memory size may hold any digits).
    assert!(!text.contains(PAN), "no PAN in metrics");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let labels = line
            .split_once('{')
            .and_then(|(_, rest)| rest.rsplit_once('}'))
            .map_or("", |(labels, _)| labels);
        assert!(
            !labels.contains("412345") && !labels.contains("2349"),
            "card data in a metric label: {line}"
        );
    }

    let doc = gw.send_raw("GET", OPENAPI, &[], vec![]).await.json();
    assert!(doc["paths"][VALUES]["post"].is_object());
    assert!(doc["components"]["securitySchemes"]["hmac"].is_object());

    let missing = gw.send_raw("GET", "/nowhere", &[], vec![]).await;
    assert_eq!((missing.status, missing.code()), (404, "not_found".into()));
    let wrong_method = gw.send_raw("GET", VALUES, &[], vec![]).await;
    assert_eq!(wrong_method.status, 405);
    gw.stop().await;
}

/// Issue 9: many verifications of one window at once, through the one SQLite
/// store thread and its group commit: single use stays exact (one approval,
/// every other `code_already_used`), and the store holds exactly one used window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_verifications_of_one_window_have_exactly_one_approval() {
    let gw = std::sync::Arc::new(TestGateway::start(Options::default()).await);
    gw.call("POST", ENROL, &card(json!({}))).await;
    let code = dynamic(T0 / 300);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (gw, code) = (std::sync::Arc::clone(&gw), code.clone());
        tasks.spawn(async move { verify(&gw, &code).await });
    }
    let mut outcomes = std::collections::BTreeMap::<(String, String), usize>::new();
    while let Some(outcome) = tasks.join_next().await {
        let (result, reason, method) = outcome.unwrap();
        assert_eq!(method, "dynamic");
        *outcomes.entry((result, reason)).or_default() += 1;
    }
    assert_eq!(
        outcomes,
        std::collections::BTreeMap::from([
            (("approved".to_owned(), "match".to_owned()), 1),
            (("declined".to_owned(), "code_already_used".to_owned()), 63),
        ])
    );
    let snapshot = gw.snapshot().await;
    assert_eq!(snapshot["used_windows"].len(), 1, "{snapshot:?}");
    std::sync::Arc::into_inner(gw).unwrap().stop().await;
}

/// Issue 9: 32 wrong codes at once for one card: exactly `failure_limit`
/// mismatches are counted, every later check is `too_many_failures`, and the
/// store holds exactly that many failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mismatches_stop_exactly_at_the_failure_limit() {
    let gw = std::sync::Arc::new(TestGateway::start(Options::default()).await);
    gw.call("POST", ENROL, &card(json!({}))).await;
    let right = dynamic(T0 / 300);
    let wrong = if right == "999" { "998" } else { "999" };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let gw = std::sync::Arc::clone(&gw);
        tasks.spawn(async move { verify(&gw, wrong).await });
    }
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    while let Some(outcome) = tasks.join_next().await {
        let (result, reason, _) = outcome.unwrap();
        assert_eq!(result, "declined");
        *outcomes.entry(reason).or_default() += 1;
    }
    assert_eq!(
        outcomes,
        std::collections::BTreeMap::from([
            ("mismatch".to_owned(), 5),
            ("too_many_failures".to_owned(), 27),
        ])
    );
    let snapshot = gw.snapshot().await;
    assert_eq!(snapshot["failures"].len(), 5, "{snapshot:?}");
    std::sync::Arc::into_inner(gw).unwrap().stop().await;
}
