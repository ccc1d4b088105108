//! Several gateway instances on one PostgreSQL store (issue 4, part 3; DESIGN 6):
//! two real `dcvv-gateway serve` processes on this process's SoftHSM token and one
//! database of a throwaway PostgreSQL cluster, driven over HTTP with signed
//! requests. What one instance accepted, the other knows: a request id, an
//! enrolment, a used single-use window, the failure count. Codes come from the
//! gateways themselves or from the independent software reference of DESIGN 2.

use serde_json::{Value, json};

use crate::support;
use crate::support::http::{EXPIRY, K, key};
use crate::support::instances::{Fleet, Instance, fresh_id, luhn_digit, now_ms, pan};
use crate::support::reference;
use crate::support::routes::{CODES, ENQUIRY, ENROL, VALUES, VERIFY};

fn card(pan: &str, extra: Value) -> Value {
    let mut body = json!({"cardNumber": pan, "expiryDate": EXPIRY});
    if let (Value::Object(map), Value::Object(more)) = (&mut body, extra) {
        map.extend(more);
    }
    body
}

async fn two_instances() -> (Fleet, Instance, Instance) {
    let fleet = Fleet::new(2000).await;
    let a = fleet.start("a").await;
    let b = fleet.start("b").await;
    (fleet, a, b)
}

/// `n` verifications of `code` for the card, alternating between the two
/// instances, all signed first and released together; their reasons.
async fn verify_at_once(
    a: &std::sync::Arc<Instance>,
    b: &std::sync::Arc<Instance>,
    pan: &str,
    code: &str,
    n: usize,
) -> Vec<String> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let instance = if i % 2 == 0 { a.clone() } else { b.clone() };
            let barrier = barrier.clone();
            let body = serde_json::to_vec(&card(pan, json!({"cvv2": code}))).unwrap();
            tokio::spawn(async move {
                let headers = instance.headers(&fresh_id(), "POST", VERIFY, &body);
                barrier.wait().await;
                let answer = instance.send(VERIFY, &headers, body).await;
                assert_eq!(
                    answer.status,
                    200,
                    "{}",
                    String::from_utf8_lossy(&answer.body)
                );
                answer.json()["reason"].as_str().unwrap().to_owned()
            })
        })
        .collect();
    let mut reasons = Vec::new();
    for task in tasks {
        reasons.push(task.await.unwrap());
    }
    reasons
}

/// The current dynamic value of the card, generated through `instance` (this
/// enrols the card).
async fn current_value(instance: &Instance, pan: &str) -> String {
    let answer = instance.post(VALUES, &card(pan, json!({}))).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    answer.json()["dcvv2"].as_str().unwrap().to_owned()
}

/// `(result, reason, method)` of a CVV2 verification through `instance`.
async fn verify(instance: &Instance, pan: &str, cvv2: &str) -> (String, String, String) {
    let answer = instance
        .post(VERIFY, &card(pan, json!({"cvv2": cvv2})))
        .await;
    answer.verdict()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_id_used_on_one_instance_is_refused_on_the_other() {
    let (fleet, a, b) = two_instances().await;
    let pan = pan(1);
    let body = serde_json::to_vec(&card(&pan, json!({}))).unwrap();
    let id = fresh_id();
    let headers = a.headers(&id, "POST", ENQUIRY, &body);
    let first = a.send(ENQUIRY, &headers, body.clone()).await;
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );

    // The very same signed request, replayed on the other instance, and on the first.
    for instance in [&b, &a] {
        let replay = instance.send(ENQUIRY, &headers, body.clone()).await;
        assert_eq!(replay.status, 409, "{}", instance.name);
        assert_eq!(replay.code(), "duplicate_request");
    }
    // A fresh id for the same request goes through on either.
    assert_eq!(b.post(ENQUIRY, &card(&pan, json!({}))).await.status, 200);

    let mut db = fleet.db().await;
    let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seen_requests WHERE request_id = $1")
        .bind(&id)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(seen, 1);

    // The gateways name the database in their log, never its password.
    for instance in [&a, &b] {
        let log = instance.log_text();
        assert!(log.contains("store opened (postgres)"), "{log}");
        assert!(
            !log.contains(support::postgres::PG.password()),
            "{}",
            instance.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_enrolment_through_one_instance_is_seen_by_the_other() {
    let (_fleet, a, b) = two_instances().await;
    let pan = pan(2);
    let static_cvv2 = reference::cvv(&key(K), &pan, EXPIRY, "000", 3).1;

    // Not enrolled: the static CVV2 is approved on both, and it is the one the
    // gateway issues for embossing.
    let issued = b.post(CODES, &card(&pan, json!({"kind": "cvv2"}))).await;
    assert_eq!(issued.json()["securityCode"], static_cvv2.as_str());
    for instance in [&a, &b] {
        let (result, reason, method) = verify(instance, &pan, &static_cvv2).await;
        assert_eq!(
            (result.as_str(), reason.as_str(), method.as_str()),
            ("approved", "match", "static")
        );
    }

    let enrolled = a.post(ENROL, &card(&pan, json!({}))).await;
    assert_eq!(enrolled.status, 200);
    assert_eq!(enrolled.json()["changed"], true);

    // B knows at once: enquiry says enrolled, enrolling again changes nothing, and
    // the static CVV2 is declined there.
    let enquiry = b.post(ENQUIRY, &card(&pan, json!({}))).await;
    assert_eq!(enquiry.json()["enrollment"], "enrolled");
    let again = b.post(ENROL, &card(&pan, json!({}))).await;
    assert_eq!(again.json()["changed"], false);
    let (result, reason, method) = verify(&b, &pan, &static_cvv2).await;
    assert_eq!(
        (result.as_str(), reason.as_str(), method.as_str()),
        ("declined", "static_cvv2_disabled", "static")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_use_window_consumed_on_one_instance_is_refused_on_the_other() {
    let (_fleet, a, b) = two_instances().await;
    let pan = pan(3);
    let value = current_value(&b, &pan).await;
    let (result, reason, _) = verify(&a, &pan, &value).await;
    assert_eq!((result.as_str(), reason.as_str()), ("approved", "match"));
    for instance in [&b, &a] {
        let (result, reason, method) = verify(instance, &pan, &value).await;
        assert_eq!(
            (result.as_str(), reason.as_str(), method.as_str()),
            ("declined", "code_already_used", "dynamic"),
            "{}",
            instance.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_verifications_on_both_instances_approve_a_window_once() {
    let (fleet, a, b) = two_instances().await;
    let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
    let pan = pan(4);
    let value = current_value(&a, &pan).await;

    // 32 verifications of the same card and value, 16 through each instance, all
    // signed first and released together.
    let reasons = verify_at_once(&a, &b, &pan, &value, 32).await;
    let approved = reasons.iter().filter(|r| *r == "match").count();
    let used = reasons.iter().filter(|r| *r == "code_already_used").count();
    assert_eq!((approved, used), (1, 31), "{reasons:?}");

    let mut db = fleet.db().await;
    let windows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM used_windows")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(windows, 1);

    // Each instance's own audit trail tells the same story: between them, one
    // approval and 31 declines of this card, and each trail verifies.
    let verifications: Vec<Value> = ["a", "b"]
        .iter()
        .flat_map(|name| fleet.audit_records(name))
        .filter(|r| r["operation"] == VERIFY && r["status"] == 200)
        .collect();
    let outcome = |o: &str| verifications.iter().filter(|r| r["outcome"] == o).count();
    assert_eq!(
        (
            outcome("approved"),
            outcome("declined"),
            verifications.len()
        ),
        (1, 31, 32),
        "{verifications:?}"
    );
    for name in ["a", "b"] {
        let dir = fleet.audit_dir(name).display().to_string();
        let (ok, stdout, stderr) =
            support::gateway(&fleet.config_path(name), &["audit", "verify", &dir]);
        assert!(ok, "{name}: {stdout}{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_failure_limit_holds_exactly_across_both_instances() {
    let (fleet, a, b) = two_instances().await;
    let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
    let pan = pan(5);
    let value = current_value(&a, &pan).await;

    // A wrong code: not the value of this, the previous or the next window (a
    // window may turn during the test), not the static CVV2.
    let t = reference::window(now_ms() / 1000, 300);
    let mut taken: Vec<String> = (t - 1..=t + 1)
        .map(|w| reference::tdcvv2(&key(K), &pan, EXPIRY, w).1)
        .collect();
    taken.push(reference::cvv(&key(K), &pan, EXPIRY, "000", 3).1);
    let wrong = (0..1000)
        .map(|n| format!("{n:03}"))
        .find(|c| !taken.contains(c))
        .unwrap();

    // 24 wrong codes at once, 12 through each instance: with a limit of 5, exactly
    // 5 count as mismatches and the other 19 are declined for too many failures.
    let reasons = verify_at_once(&a, &b, &pan, &wrong, 24).await;
    let mismatches = reasons.iter().filter(|r| *r == "mismatch").count();
    let blocked = reasons.iter().filter(|r| *r == "too_many_failures").count();
    assert_eq!((mismatches, blocked), (5, 19), "{reasons:?}");

    let mut db = fleet.db().await;
    let failures: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM failures")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(failures, 5);

    // Blocked on both instances, even for the right value.
    for instance in [&a, &b] {
        let (result, reason, _) = verify(instance, &pan, &value).await;
        assert_eq!(
            (result.as_str(), reason.as_str()),
            ("declined", "too_many_failures")
        );
    }
}

#[test]
fn pans_are_luhn_valid_and_end_in_n() {
    for n in [0, 1, 42, 999, 1000, 4711, 9999] {
        let pan = pan(n);
        assert_eq!(pan.len(), 16);
        assert_eq!(&pan[12..], format!("{n:04}"));
        assert_eq!(luhn_digit(&pan[..15]), pan.chars().last().unwrap());
    }
}
