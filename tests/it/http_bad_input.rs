//! DESIGN 7.3: bad card data and malformed bodies, correctly signed, get the
//! documented 4xx with a stable code and leave every table of the store as it
//! was. A property test throws random and mutated bodies and headers at the
//! gateway: it never answers 5xx and keeps serving.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::support::http::{Options, PAN, T0, TestGateway, card, fresh_id};
use crate::support::routes::{CODES, DCVV, ENQUIRY, ENROL, READYZ, UNENROL, VALUES, VERIFY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_card_data_gets_its_code_and_changes_nothing() {
    let gw = TestGateway::start(Options::default()).await;
    // Some state to protect: an enrolled card with a used window and a failure.
    let enrolled = gw.call("POST", VALUES, &card(json!({}))).await.json();
    let code = enrolled["dcvv2"].as_str().unwrap().to_owned();
    gw.call("POST", VERIFY, &card(json!({"cvv2": code}))).await;
    let before = gw.snapshot().await;
    assert_eq!(before["enrollments"].len(), 1);
    assert_eq!(before["used_windows"].len(), 1);

    let other_pan = |pan: &str| json!({"cardNumber": pan, "expiryDate": "2812"});
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            VALUES,
            other_pan("4123456789012345"),
            422,
            "invalid_card_number",
        ), // bad Luhn
        (VALUES, other_pan("41234567890"), 422, "invalid_card_number"), // 11 digits
        (
            VALUES,
            other_pan("41234567890123456789"),
            422,
            "invalid_card_number",
        ), // 20 digits
        (
            VALUES,
            other_pan("4123-4567-8901-2349"),
            422,
            "invalid_card_number",
        ),
        (
            VALUES,
            json!({"cardNumber": PAN, "expiryDate": "2813"}),
            422,
            "invalid_expiry_date",
        ),
        (
            VALUES,
            json!({"cardNumber": PAN, "expiryDate": "28"}),
            422,
            "invalid_expiry_date",
        ),
        (
            VALUES,
            json!({"cardNumber": PAN, "expiryDate": "2512"}),
            422,
            "card_expired",
        ),
        (
            VALUES,
            card(json!({"numberOfValues": 0})),
            422,
            "invalid_number_of_values",
        ),
        (
            VALUES,
            card(json!({"numberOfValues": 25})),
            422,
            "invalid_number_of_values",
        ),
        (
            VALUES,
            card(json!({"channel": "X"})),
            422,
            "invalid_channel",
        ),
        (
            VALUES,
            card(json!({"panSequenceNumber": "1"})),
            422,
            "invalid_pan_sequence_number",
        ),
        (
            VALUES,
            other_pan("6011000000000004"),
            422,
            "unknown_card_programme",
        ),
        (
            VALUES,
            card(json!({"keyAssociation": "NOPE"})),
            422,
            "unknown_card_programme",
        ),
        (
            VALUES,
            card(json!({"numberOfValues": "3"})),
            400,
            "malformed_request",
        ), // wrong type
        (
            VALUES,
            card(json!({"numberOfValues": -1})),
            400,
            "malformed_request",
        ),
        (
            VALUES,
            json!({"cardNumber": 4123456789012349u64, "expiryDate": "2812"}),
            400,
            "malformed_request",
        ),
        (
            VALUES,
            card(json!({"surprise": true})),
            400,
            "malformed_request",
        ), // unknown field
        (
            VALUES,
            json!({"expiryDate": "2812"}),
            400,
            "malformed_request",
        ), // missing field
        (VALUES, json!([1, 2, 3]), 400, "malformed_request"),
        (VERIFY, card(json!({"cvv2": "12"})), 422, "invalid_cvv2"),
        (VERIFY, card(json!({"cvv2": "1234"})), 422, "invalid_cvv2"),
        (VERIFY, card(json!({})), 400, "malformed_request"),
        (
            CODES,
            card(json!({"kind": "cvv"})),
            422,
            "invalid_service_code",
        ),
        (CODES, card(json!({"kind": "pin"})), 422, "invalid_kind"),
        (
            CODES,
            card(json!({"kind": "cvv2", "digits": 6})),
            422,
            "invalid_digits",
        ),
        (
            DCVV,
            card(json!({"serviceCode": "226", "atc": "XYZ1", "dcvv": "123"})),
            422,
            "invalid_atc",
        ),
        (
            DCVV,
            card(json!({"serviceCode": "22", "atc": "0001", "dcvv": "123"})),
            422,
            "invalid_service_code",
        ),
        (
            ENROL,
            other_pan("4123456789012345"),
            422,
            "invalid_card_number",
        ),
        (
            UNENROL,
            other_pan("4123456789012345"),
            422,
            "invalid_card_number",
        ),
    ];
    for (path, body, status, code) in cases {
        let answer = gw.call("POST", path, &body).await;
        assert_eq!(
            (answer.status, answer.code()),
            (status, code.to_owned()),
            "{path} {body}"
        );
        let text = String::from_utf8_lossy(&answer.body);
        assert!(
            !text.contains("41234567") && !text.contains("6011000"),
            "no card number echoed: {text}"
        );
    }
    // A body that is not JSON at all, and an empty one.
    for raw in [b"cardNumber=4123456789012349".to_vec(), Vec::new()] {
        let headers = gw.signed_headers(
            &gw.clients.main,
            &fresh_id(),
            T0 * 1000,
            "POST",
            VALUES,
            &raw,
        );
        let answer = gw.send_raw("POST", VALUES, &headers, raw).await;
        assert_eq!(
            (answer.status, answer.code()),
            (400, "malformed_request".into())
        );
    }
    assert_eq!(
        gw.snapshot().await,
        before,
        "no bad request changed the store"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_413_and_changes_nothing() {
    let gw = TestGateway::start(Options {
        body_limit: 1024,
        ..Options::default()
    })
    .await;
    let before = gw.snapshot().await;
    let big = card(json!({"channel": "W".repeat(2000)}));
    let answer = gw.call("POST", VALUES, &big).await;
    assert_eq!(
        (answer.status, answer.code()),
        (413, "payload_too_large".into())
    );
    assert_eq!(gw.snapshot().await, before);
    gw.stop().await;
}

/// One random request: a mutated valid body, random bytes, or random headers.
#[derive(Debug, Clone)]
enum Fuzz {
    /// A valid body with one byte changed, correctly signed.
    Mutated { path: usize, index: usize, byte: u8 },
    /// Arbitrary bytes, correctly signed.
    Bytes { path: usize, bytes: Vec<u8> },
    /// A valid body with random header values (unsigned or wrongly signed).
    Headers { path: usize, values: Vec<String> },
    /// Random JSON values in the card fields.
    Fields {
        path: usize,
        pan: String,
        expiry: String,
        count: i64,
    },
}

const PATHS: &[&str] = &[VALUES, ENROL, ENQUIRY, VERIFY, CODES, DCVV];

fn fuzz() -> impl Strategy<Value = Fuzz> {
    let path = 0..PATHS.len();
    prop_oneof![
        (path.clone(), any::<usize>(), any::<u8>()).prop_map(|(path, index, byte)| Fuzz::Mutated {
            path,
            index,
            byte
        }),
        (path.clone(), proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(path, bytes)| Fuzz::Bytes { path, bytes }),
        (path.clone(), proptest::collection::vec("[ -~]{0,60}", 4))
            .prop_map(|(path, values)| Fuzz::Headers { path, values }),
        (path, "[0-9a-z-]{0,24}", "[0-9]{0,6}", any::<i64>()).prop_map(
            |(path, pan, expiry, count)| Fuzz::Fields {
                path,
                pan,
                expiry,
                count
            }
        ),
    ]
}

#[test]
fn random_and_mutated_requests_never_get_a_5xx() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gw = runtime.block_on(TestGateway::start(Options::default()));
    let valid = serde_json::to_vec(&card(json!({"cvv2": "123", "kind": "cvv2"}))).unwrap();
    let config = ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(case in fuzz())| {
        let answer = runtime.block_on(async {
            match &case {
                Fuzz::Mutated { path, index, byte } => {
                    let mut body = valid.clone();
                    let i = index % body.len();
                    body[i] = *byte;
                    let headers = gw.signed_headers(&gw.clients.main, &fresh_id(), gw_now(&gw), "POST", PATHS[*path], &body);
                    gw.send_raw("POST", PATHS[*path], &headers, body).await
                }
                Fuzz::Bytes { path, bytes } => {
                    let headers = gw.signed_headers(&gw.clients.main, &fresh_id(), gw_now(&gw), "POST", PATHS[*path], bytes);
                    gw.send_raw("POST", PATHS[*path], &headers, bytes.clone()).await
                }
                Fuzz::Headers { path, values } => {
                    let names = ["apikey", "Timestamp", "X-Client-Request-Id", "Signature"];
                    let headers: Vec<(String, String)> = names.iter().zip(values).map(|(n, v)| (n.to_string(), v.clone())).collect();
                    gw.send_raw("POST", PATHS[*path], &headers, valid.clone()).await
                }
                Fuzz::Fields { path, pan, expiry, count } => {
                    let body = serde_json::to_vec(&json!({"cardNumber": pan, "expiryDate": expiry, "numberOfValues": count})).unwrap();
                    let headers = gw.signed_headers(&gw.clients.main, &fresh_id(), gw_now(&gw), "POST", PATHS[*path], &body);
                    gw.send_raw("POST", PATHS[*path], &headers, body).await
                }
            }
        });
        prop_assert!(answer.status < 500, "{case:?} -> {} {}", answer.status, String::from_utf8_lossy(&answer.body));
        if answer.status >= 400 {
            prop_assert!(!answer.code().is_empty(), "every error has a code: {case:?}");
        }
    });
    // Still serving.
    let health = runtime.block_on(gw.send_raw("GET", READYZ, &[], vec![]));
    assert_eq!(health.status, 200);
    runtime.block_on(gw.stop());
}

fn gw_now(gw: &TestGateway) -> u64 {
    use dcvv_gateway::domain::service::Clock;
    gw.clock.now_ms()
}

/// Every error body names the request it answers, whichever layer refused it
/// (the request id is added by one layer, not by each handler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_body_carries_the_request_id() {
    let gw = TestGateway::start(Options::default()).await;
    let id = fresh_id();
    // 422 from a handler, on a signed request.
    let body = serde_json::to_vec(&json!({"cardNumber": "4123450000000002", "expiryDate": "3012"}))
        .unwrap();
    let headers = gw.signed_headers(&gw.clients.main, &id, T0 * 1000, "POST", ENQUIRY, &body);
    let refused = gw.send_raw("POST", ENQUIRY, &headers, body).await;
    assert_eq!(
        (refused.status, refused.code()),
        (422, "invalid_card_number".into())
    );
    assert_eq!(refused.json()["requestId"], id.as_str());
    // 401 from the signature layer, and 404 from the router: the client's id
    // when it sent a well-formed one.
    let only_id = vec![("X-Client-Request-Id".to_owned(), id.clone())];
    let unsigned = gw.send_raw("POST", ENQUIRY, &only_id, b"{}".to_vec()).await;
    assert_eq!(
        (unsigned.status, unsigned.code()),
        (401, "missing_header".into())
    );
    assert_eq!(unsigned.json()["requestId"], id.as_str());
    let nowhere = gw.send_raw("GET", "/cards", &only_id, Vec::new()).await;
    assert_eq!((nowhere.status, nowhere.code()), (404, "not_found".into()));
    assert_eq!(nowhere.json()["requestId"], id.as_str());
    // Without one, the gateway's own id, also in `x-request-id`.
    let anonymous = gw.send_raw("GET", "/cards", &[], Vec::new()).await;
    let own = anonymous.json()["requestId"].as_str().unwrap().to_owned();
    assert!(own.starts_with("gw-"), "{own}");
    assert_eq!(anonymous.headers["x-request-id"], own.as_str());
}
