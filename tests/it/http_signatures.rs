//! Every way a request signature can fail (DESIGN 5), against a real gateway:
//! each gets its 401 / 403 / 409 with a stable code, and none changes the store.

use serde_json::json;

use crate::support::http::{Answer, Options, T0, TestClient, TestGateway, card, fresh_id};
use crate::support::routes::{ENQUIRY, ENROL, UNENROL, VALUES, VERIFY};

fn body() -> Vec<u8> {
    serde_json::to_vec(&card(json!({}))).unwrap()
}

fn now_ms() -> u64 {
    T0 * 1000
}

async fn send(gw: &TestGateway, headers: Vec<(String, String)>, body: Vec<u8>) -> Answer {
    gw.send_raw("POST", ENROL, &headers, body).await
}

fn replace(headers: &mut [(String, String)], name: &str, value: &str) {
    for (k, v) in headers.iter_mut() {
        if k.eq_ignore_ascii_case(name) {
            *v = value.to_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_signature_failure_is_refused_and_changes_nothing() {
    let gw = TestGateway::start(Options::default()).await;
    let main = gw.clients.main.clone();
    let before = gw.snapshot().await;
    let signed = |id: &str| gw.signed_headers(&main, id, now_ms(), "POST", ENROL, &body());

    // Each of the four headers missing.
    for name in ["apikey", "Timestamp", "X-Client-Request-Id", "Signature"] {
        let mut headers = signed(&fresh_id());
        headers.retain(|(k, _)| k != name);
        let answer = send(&gw, headers, body()).await;
        assert_eq!(
            (answer.status, answer.code()),
            (401, "missing_header".into()),
            "{name}"
        );
        assert!(
            answer.json()["message"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains(&name.to_lowercase())
        );
        assert!(
            !answer.headers.contains_key("signature"),
            "a 401 is not signed"
        );
    }
    // Malformed values.
    for (name, value) in [
        ("Signature", "not base64 at all!"),
        ("Signature", "AAAA"),
        ("Timestamp", "yesterday"),
        ("X-Client-Request-Id", "has spaces in it"),
        ("X-Client-Request-Id", &"x".repeat(41)),
    ] {
        let mut headers = signed(&fresh_id());
        replace(&mut headers, name, value);
        let answer = send(&gw, headers, body()).await;
        assert_eq!(
            (answer.status, answer.code()),
            (401, "malformed_header".into()),
            "{name}: {value}"
        );
    }
    // Stale and future timestamps (300 s either side is the limit).
    for offset in [-301_000i64, 301_000] {
        let ts = now_ms().checked_add_signed(offset).unwrap();
        let headers = gw.signed_headers(&main, &fresh_id(), ts, "POST", ENROL, &body());
        let answer = send(&gw, headers, body()).await;
        assert_eq!(
            (answer.status, answer.code()),
            (401, "timestamp_out_of_window".into()),
            "{offset}"
        );
    }

    // A wrong secret, and tampering with each signed field: one and the same 401.
    let reference_401 = {
        let wrong = TestClient {
            apikey: main.apikey.clone(),
            secret: "w".repeat(43),
        };
        let headers = gw.signed_headers(&wrong, &fresh_id(), now_ms(), "POST", ENROL, &body());
        send(&gw, headers, body()).await
    };
    assert_eq!(
        (reference_401.status, reference_401.code()),
        (401, "invalid_signature".into())
    );
    let same_as_reference = |answer: &Answer| {
        let mut a = answer.json();
        let mut b = reference_401.json();
        a.as_object_mut().unwrap().remove("requestId");
        b.as_object_mut().unwrap().remove("requestId");
        answer.status == 401 && a == b
    };
    let mut tampered_body = body();
    let last = tampered_body.len() - 3;
    tampered_body[last] ^= 1;
    let cases: Vec<(&str, Answer)> = vec![
        ("body", send(&gw, signed(&fresh_id()), tampered_body).await),
        ("path", {
            let headers = signed(&fresh_id());
            gw.send_raw("POST", UNENROL, &headers, body()).await
        }),
        ("query", {
            let headers = signed(&fresh_id());
            gw.send_raw("POST", &format!("{ENROL}?x=1"), &headers, body())
                .await
        }),
        ("method", {
            let headers = gw.signed_headers(&main, &fresh_id(), now_ms(), "GET", ENROL, &body());
            send(&gw, headers, body()).await
        }),
        ("timestamp", {
            let mut headers = signed(&fresh_id());
            replace(&mut headers, "Timestamp", &(now_ms() + 1).to_string());
            send(&gw, headers, body()).await
        }),
        ("request id", {
            let mut headers = signed(&fresh_id());
            replace(&mut headers, "X-Client-Request-Id", &fresh_id());
            send(&gw, headers, body()).await
        }),
        ("unknown apikey", {
            let stranger = TestClient {
                apikey: "stranger".into(),
                secret: main.secret.clone(),
            };
            let headers =
                gw.signed_headers(&stranger, &fresh_id(), now_ms(), "POST", ENROL, &body());
            send(&gw, headers, body()).await
        }),
    ];
    for (what, answer) in &cases {
        assert!(
            same_as_reference(answer),
            "{what}: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
    }
    assert_eq!(
        gw.snapshot().await,
        before,
        "no refused request changed the store"
    );
    for offset in [-300_000i64, 300_000] {
        let ts = now_ms().checked_add_signed(offset).unwrap();
        let headers = gw.signed_headers(&main, &fresh_id(), ts, "POST", ENQUIRY, &body());
        let answer = gw.send_raw("POST", ENQUIRY, &headers, body()).await;
        assert_eq!(
            answer.status, 200,
            "exactly 300 s off is still accepted ({offset})"
        );
    }

    // The second (rotation) secret is accepted, and the response is signed with it.
    let rotated = TestClient {
        apikey: main.apikey.clone(),
        secret: gw.clients.main_second.clone(),
    };
    let answer = gw.call_as(&rotated, "POST", ENROL, &card(json!({}))).await;
    assert_eq!(answer.status, 200);
    assert!(answer.headers.contains_key("signature"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_header_sent_twice_is_refused_in_either_order_and_changes_nothing() {
    let gw = TestGateway::start(Options::default()).await;
    let main = gw.clients.main.clone();
    let before = gw.snapshot().await;
    let id = fresh_id();
    let headers = gw.signed_headers(&main, &id, now_ms(), "POST", ENROL, &body());
    let other_signature = gw
        .signed_headers(&main, &id, now_ms(), "POST", UNENROL, &body())
        .into_iter()
        .find(|(k, _)| k == "Signature")
        .unwrap()
        .1;
    for (name, other) in [
        ("apikey", gw.clients.other_programme.apikey.clone()),
        ("Timestamp", (now_ms() + 1).to_string()),
        ("X-Client-Request-Id", fresh_id()),
        ("Signature", other_signature),
    ] {
        let signed = headers.iter().find(|(k, _)| k == name).unwrap().1.clone();
        for (first, second) in [
            (signed.clone(), other.clone()),
            (other.clone(), signed.clone()),
            (signed.clone(), signed.clone()),
        ] {
            let mut twice: Vec<(String, String)> =
                headers.iter().filter(|(k, _)| k != name).cloned().collect();
            twice.push((name.to_owned(), first.clone()));
            twice.push((name.to_owned(), second.clone()));
            let answer = send(&gw, twice, body()).await;
            assert_eq!(
                (answer.status, answer.code()),
                (401, "malformed_header".into()),
                "{name}: {first} then {second}"
            );
            assert!(
                answer.json()["message"]
                    .as_str()
                    .unwrap()
                    .to_lowercase()
                    .contains(&name.to_lowercase()),
                "the message names the header"
            );
        }
    }
    assert_eq!(
        gw.snapshot().await,
        before,
        "no refused request changed the store"
    );
    // The request id was not consumed: the request sent once is served.
    assert_eq!(send(&gw, headers, body()).await.status, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_id_is_refused_with_409() {
    let gw = TestGateway::start(Options::default()).await;
    let main = gw.clients.main.clone();
    let id = fresh_id();
    let headers = gw.signed_headers(&main, &id, now_ms(), "POST", ENROL, &body());
    let first = send(&gw, headers.clone(), body()).await;
    assert_eq!(first.status, 200);
    let after_first = gw.snapshot().await;
    let replay = send(&gw, headers, body()).await;
    assert_eq!(
        (replay.status, replay.code()),
        (409, "duplicate_request".into())
    );
    assert_eq!(replay.json()["requestId"], id.as_str());
    assert_eq!(gw.snapshot().await, after_first, "a replay changes nothing");
    // Another client may use the same id: ids are per client.
    let other = gw.clients.other_programme.clone();
    let other_card = json!({"cardNumber": "5123456789012346", "expiryDate": "2812"});
    let bytes = serde_json::to_vec(&other_card).unwrap();
    let headers = gw.signed_headers(&other, &id, now_ms(), "POST", ENROL, &bytes);
    assert_eq!(send(&gw, headers, bytes).await.status, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_and_programmes_bound_each_client() {
    let gw = TestGateway::start(Options::default()).await;
    let before = gw.snapshot().await;
    let verifier = gw.clients.verifier.clone();
    let refused = gw
        .call_as(&verifier, "POST", VALUES, &card(json!({})))
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (403, "forbidden_scope".into())
    );
    assert!(
        refused.headers.contains_key("signature"),
        "a 403 to a known client is signed"
    );
    // The other bank's client has every scope but not the `test` programme.
    let other = gw.clients.other_programme.clone();
    let refused = gw.call_as(&other, "POST", ENROL, &card(json!({}))).await;
    assert_eq!(
        (refused.status, refused.code()),
        (403, "forbidden_programme".into())
    );
    assert_eq!(gw.snapshot().await, before);
    // The verifier's own scope works.
    let ok = gw
        .call_as(&verifier, "POST", VERIFY, &card(json!({"cvv2": "123"})))
        .await;
    assert_eq!(ok.status, 200);
    gw.stop().await;
}
