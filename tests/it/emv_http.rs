//! CVC3 and ARQC / ARPC through the signed API (issue 11), on a real SoftHSM
//! token and SQLite: the published vectors of `emv.rs` (pyemv, jPOS; sources
//! cited there) answered over HTTP, bad input refused with a stable 422 that
//! changes nothing, a programme without the key, the scopes, and no ARQC,
//! track data, code or PAN in the audit trail or the log.

use serde_json::{Value, json};

use crate::emv::{jpos_data, pyemv_mastercard_data, pyemv_visa_data};
use crate::support;
use crate::support::http::{Options, TestGateway, approved, declined};
use crate::support::logs::Capture;
use crate::support::routes::{ARQC, CVC3};

const PYEMV_PAN: &str = "5123456789012345";
const TRACK2: &str = "5123456789012345D35121010000000000000F";
const EMV_PAN: &str = "1234567890123456";

async fn gateway() -> TestGateway {
    TestGateway::start(Options {
        emv: true,
        ..Options::default()
    })
    .await
}

fn cvc3_body(pan: &str, track: &str, un: &str, atc: &str, cvc3: &str) -> Value {
    json!({
        "cardNumber": pan, "expiryDate": "3512", "trackData": track,
        "unpredictableNumber": un, "atc": atc, "cvc3": cvc3,
    })
}

/// pyemv `test_visa_cvn10` as a request to programme `pyemv`.
fn cvn10_body() -> Value {
    json!({
        "cardNumber": EMV_PAN, "keyAssociation": "PYEMV",
        "cryptogramVersion": "visa-cvn10",
        "transactionData": pyemv_visa_data("03A06010"),
        "atc": "001C", "arqc": "29CCA15AE665FA2E", "arc": "3030",
    })
}

fn with(mut body: Value, field: &str, value: Value) -> Value {
    body[field] = value;
    body
}

fn without(mut body: Value, field: &str) -> Value {
    body.as_object_mut().unwrap().remove(field);
    body
}

#[tokio::test]
async fn cvc3_vectors_verify_over_http() {
    let gw = gateway().await;
    let other = gw.clients.other_programme.clone();
    let ask = |body: Value| {
        let (gw, other) = (&gw, other.clone());
        async move { gw.call_as(&other, "POST", CVC3, &body).await.verdict() }
    };
    // pyemv test_generate_cvc3_track2: 29488 in programme `other` (BIN 5).
    let body = cvc3_body(PYEMV_PAN, TRACK2, "00000899", "005E", "29488");
    assert_eq!(ask(body.clone()).await, approved("cvc3"));
    // The rightmost 3 digits, as a card with a 3-digit CVC3 carries them.
    assert_eq!(
        ask(with(body.clone(), "cvc3", json!("488"))).await,
        approved("cvc3")
    );
    // The numeric UN of the track, left-padded: the same UN.
    let numeric = with(body.clone(), "unpredictableNumber", json!("899"));
    assert_eq!(ask(numeric).await, approved("cvc3"));
    for wrong in [
        with(body.clone(), "cvc3", json!("29489")),
        with(body.clone(), "atc", json!("005F")),
        with(body.clone(), "unpredictableNumber", json!("00000898")),
        with(body.clone(), "panSequenceNumber", json!("01")),
    ] {
        assert_eq!(ask(wrong).await, declined("mismatch", "cvc3"));
    }
    // pyemv test_generate_cvc3_track1: the track 1 data, as its bytes.
    let track1 = hex::encode(b"B5123456789012345^KENOBI/OBIWAN^3512101000000000000000000000000");
    let body = cvc3_body(PYEMV_PAN, &track1, "00000899", "005E", "419");
    assert_eq!(ask(body).await, approved("cvc3"));

    // jPOS testVerifyCVC3Impl2, programme `jpos` (BIN 12) as the main client.
    let body = cvc3_body(
        EMV_PAN,
        "1234567890123456D12012061000110000000FFFFFFFFFFF",
        "00002710",
        "2710",
        "45423",
    );
    assert_eq!(
        gw.call("POST", CVC3, &body).await.verdict(),
        approved("cvc3")
    );
    let body = cvc3_body(
        EMV_PAN,
        "1234567890123456D12012061000110000000F",
        "2710",
        "2710",
        "464",
    );
    assert_eq!(
        gw.call("POST", CVC3, &body).await.verdict(),
        approved("cvc3")
    );
}

/// Sends `body` and returns (result, ARPC).
async fn arqc(gw: &TestGateway, body: &Value) -> (String, Option<String>) {
    let v = gw.call("POST", ARQC, body).await.ok_json();
    assert_eq!(v["method"], "arqc", "{v}");
    (
        v["result"].as_str().unwrap().to_owned(),
        v["arpc"].as_str().map(str::to_owned),
    )
}

#[tokio::test]
async fn arqc_vectors_verify_and_arpcs_come_back_over_http() {
    let gw = gateway().await;
    let approved_with = |arpc: &str| ("approved".to_owned(), Some(arpc.to_owned()));

    assert_eq!(
        arqc(&gw, &cvn10_body()).await,
        approved_with("28993816AFAE4AEB")
    );
    // Lower-case hex is the same cryptogram.
    let lower = with(cvn10_body(), "arqc", json!("29cca15ae665fa2e"));
    assert_eq!(arqc(&gw, &lower).await, approved_with("28993816AFAE4AEB"));
    // No arc: no ARPC. A wrong ARQC: declined, and no ARPC either.
    assert_eq!(
        arqc(&gw, &without(cvn10_body(), "arc")).await,
        ("approved".to_owned(), None)
    );
    let wrong = with(cvn10_body(), "arqc", json!("29CCA15AE665FA2F"));
    assert_eq!(arqc(&gw, &wrong).await, ("declined".to_owned(), None));
    // Without keyAssociation the longest prefix (12, the jPOS IMK) applies: declined.
    let jpos_key = without(cvn10_body(), "keyAssociation");
    assert_eq!(arqc(&gw, &jpos_key).await, ("declined".to_owned(), None));

    for version in ["visa-cvn18", "visa-cvn22"] {
        let body = json!({
            "cardNumber": EMV_PAN, "keyAssociation": "PYEMV", "cryptogramVersion": version,
            "transactionData": pyemv_visa_data("06011203A0B800"),
            "atc": "001C", "arqc": "7A788EA6B8A3E733", "csu": "00000000",
        });
        assert_eq!(
            arqc(&gw, &body).await,
            approved_with("9AF514C1"),
            "{version}"
        );
    }

    let mastercard = [
        (
            "mastercard-cvn16",
            "A00003220000",
            "24CCF3DEE3158C70",
            "73F6BBF389A6586C",
        ),
        (
            "mastercard-cvn17",
            "A0000322000000000000000322FF",
            "EAE8A620A75648D8",
            "29CF11FBDB9CA650",
        ),
        (
            "mastercard-cvn20",
            "A00003220000",
            "CD29615D6452E70E",
            "DFD0956606B68D64",
        ),
        (
            "mastercard-cvn21",
            "A0000322000000000000000322FF",
            "C30E54BE496CF5E5",
            "4F51F9CC63CE8B3C",
        ),
    ];
    for (version, tail, cryptogram, arpc) in mastercard {
        let body = json!({
            "cardNumber": EMV_PAN, "keyAssociation": "PYEMV", "cryptogramVersion": version,
            "transactionData": pyemv_mastercard_data(tail), "atc": "001C",
            "unpredictableNumber": "ABCDEF12", "arqc": cryptogram, "arc": "0010",
        });
        assert_eq!(arqc(&gw, &body).await, approved_with(arpc), "{version}");
    }

    // jPOS: the common session key, ARPC by method 1 and by method 2; VSDC.
    let jpos = |version: &str, cryptogram: &str| {
        json!({
            "cardNumber": EMV_PAN, "cryptogramVersion": version,
            "transactionData": jpos_data(), "atc": "3456",
            "unpredictableNumber": "11111111", "arqc": cryptogram,
        })
    };
    let cskd = jpos("emv-common-session-key", "55BE45DD2C9E0CBF");
    let by_arc = with(cskd.clone(), "arc", json!("0012"));
    assert_eq!(arqc(&gw, &by_arc).await, approved_with("01BAE8DE6A0DE9E0"));
    let by_csu = with(cskd, "csu", json!("00120000"));
    assert_eq!(arqc(&gw, &by_csu).await, approved_with("B4C698B6"));
    let cskd_method1 = with(
        jpos("emv-common-session-key", "36DBEE15F36B1E7F"),
        "padding",
        json!("iso9797-1-method-1"),
    );
    assert_eq!(
        arqc(&gw, &cskd_method1).await,
        ("approved".to_owned(), None)
    );
    let vsdc = with(jpos("visa-cvn10", "26C8A1042D1CAF3E"), "arc", json!("3030"));
    assert_eq!(arqc(&gw, &vsdc).await, approved_with("98DE7C7B3D80A831"));
    let mchip = with(
        jpos("mastercard-cvn16", "9FFD1D52AE0EC0F3"),
        "padding",
        json!("iso9797-1-method-1"),
    );
    assert_eq!(arqc(&gw, &mchip).await, ("approved".to_owned(), None));
}

#[tokio::test]
async fn bad_input_gets_422_with_a_stable_code_and_changes_nothing() {
    let gw = gateway().await;
    let cvc3 = cvc3_body(EMV_PAN, TRACK2, "00000899", "005E", "29488");
    let mc16 = json!({
        "cardNumber": EMV_PAN, "cryptogramVersion": "mastercard-cvn16",
        "transactionData": jpos_data(), "atc": "3456",
        "unpredictableNumber": "11111111", "arqc": "AC8074C9E62EE6EF",
    });
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            CVC3,
            with(cvc3.clone(), "trackData", json!("5123D")),
            "invalid_track_data",
        ),
        (
            CVC3,
            with(cvc3.clone(), "trackData", json!("")),
            "invalid_track_data",
        ),
        (
            CVC3,
            with(cvc3.clone(), "unpredictableNumber", json!("123456789")),
            "invalid_unpredictable_number",
        ),
        (
            CVC3,
            with(cvc3.clone(), "unpredictableNumber", json!("0000089G")),
            "invalid_unpredictable_number",
        ),
        (CVC3, with(cvc3.clone(), "atc", json!("05E")), "invalid_atc"),
        (
            CVC3,
            with(cvc3.clone(), "cvc3", json!("12")),
            "invalid_cvc3",
        ),
        (
            CVC3,
            with(cvc3.clone(), "cvc3", json!("123456")),
            "invalid_cvc3",
        ),
        (
            CVC3,
            with(cvc3.clone(), "cvc3", json!("12a")),
            "invalid_cvc3",
        ),
        (
            CVC3,
            with(cvc3.clone(), "expiryDate", json!("3513")),
            "invalid_expiry_date",
        ),
        (
            ARQC,
            with(mc16.clone(), "cryptogramVersion", json!("visa-cvn99")),
            "invalid_cryptogram_version",
        ),
        (
            ARQC,
            without(mc16.clone(), "unpredictableNumber"),
            "invalid_unpredictable_number",
        ),
        (
            ARQC,
            with(mc16.clone(), "unpredictableNumber", json!("1111111")),
            "invalid_unpredictable_number",
        ),
        (
            ARQC,
            with(mc16.clone(), "arqc", json!("AC8074C9E62EE6E")),
            "invalid_arqc",
        ),
        (
            ARQC,
            with(mc16.clone(), "transactionData", json!("ABC")),
            "invalid_transaction_data",
        ),
        (
            ARQC,
            with(mc16.clone(), "transactionData", json!("")),
            "invalid_transaction_data",
        ),
        (
            ARQC,
            with(mc16.clone(), "atc", json!("34567")),
            "invalid_atc",
        ),
        (
            ARQC,
            with(mc16.clone(), "padding", json!("zero")),
            "invalid_padding",
        ),
        (ARQC, with(mc16.clone(), "arc", json!("001")), "invalid_arc"),
        (
            ARQC,
            with(
                with(mc16.clone(), "arc", json!("0010")),
                "csu",
                json!("00000000"),
            ),
            "invalid_csu",
        ),
        // Mastercard CVN 16 makes ARPCs by method 1 only, CVN 18 by method 2 only.
        (
            ARQC,
            with(mc16.clone(), "csu", json!("00000000")),
            "invalid_csu",
        ),
        (
            ARQC,
            with(
                with(mc16.clone(), "cryptogramVersion", json!("visa-cvn18")),
                "arc",
                json!("0010"),
            ),
            "invalid_arc",
        ),
        (
            ARQC,
            with(mc16.clone(), "proprietaryAuthenticationData", json!("00")),
            "invalid_proprietary_authentication_data",
        ),
        (
            ARQC,
            with(
                with(mc16.clone(), "cryptogramVersion", json!("visa-cvn18")),
                "csu",
                json!("00000000"),
            )
            .as_object()
            .cloned()
            .map(|mut m| {
                m.insert(
                    "proprietaryAuthenticationData".into(),
                    json!("001122334455667788"),
                );
                Value::Object(m)
            })
            .unwrap(),
            "invalid_proprietary_authentication_data",
        ),
        (
            ARQC,
            with(mc16.clone(), "cardNumber", json!("12345678901")),
            "invalid_card_number",
        ),
        (
            ARQC,
            with(mc16.clone(), "panSequenceNumber", json!("1")),
            "invalid_pan_sequence_number",
        ),
        // The programme of BIN 412345 has no IMK-AC / IMK-CVC3.
        (
            ARQC,
            with(mc16.clone(), "cardNumber", json!(support::http::PAN)),
            "operation_not_configured",
        ),
        (
            CVC3,
            with(cvc3.clone(), "cardNumber", json!(support::http::PAN)),
            "operation_not_configured",
        ),
        (
            ARQC,
            with(mc16.clone(), "cardNumber", json!("9999999999999999")),
            "unknown_card_programme",
        ),
    ];
    let before = gw.snapshot().await;
    for (route, body, code) in cases {
        let answer = gw.call("POST", route, &body).await;
        assert_eq!(
            (answer.status, answer.code().as_str()),
            (422, code),
            "{route} {body}: {}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    // Unknown fields are malformed, as everywhere.
    let answer = gw.call("POST", ARQC, &with(mc16, "iad", json!("00"))).await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (400, "malformed_request")
    );
    assert_eq!(
        gw.snapshot().await,
        before,
        "a refused request changed the store"
    );
}

#[tokio::test]
async fn each_endpoint_needs_its_scope() {
    let gw = gateway().await;
    let verifier = gw.clients.verifier.clone();
    for (route, body) in [
        (ARQC, cvn10_body()),
        (
            CVC3,
            cvc3_body(PYEMV_PAN, TRACK2, "00000899", "005E", "29488"),
        ),
    ] {
        let answer = gw.call_as(&verifier, "POST", route, &body).await;
        assert_eq!(
            (answer.status, answer.code().as_str()),
            (403, "forbidden_scope"),
            "{route}"
        );
    }
}

/// Every value of the requests that is card data, as the trail or a log could hold it.
fn secrets() -> Vec<String> {
    let track1 =
        hex::encode_upper(b"B5123456789012345^KENOBI/OBIWAN^3512101000000000000000000000000");
    [
        PYEMV_PAN,
        EMV_PAN,
        TRACK2,
        &track1,
        "29488",
        "29CCA15AE665FA2E",
        "28993816AFAE4AEB",
        "7A788EA6B8A3E733",
        "9AF514C1",
        &pyemv_visa_data("03A06010"),
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

async fn exercise(gw: &TestGateway) {
    let other = gw.clients.other_programme.clone();
    let body = cvc3_body(PYEMV_PAN, TRACK2, "00000899", "005E", "29488");
    assert_eq!(gw.call_as(&other, "POST", CVC3, &body).await.status, 200);
    let track1 = hex::encode(b"B5123456789012345^KENOBI/OBIWAN^3512101000000000000000000000000");
    let body = cvc3_body(PYEMV_PAN, &track1, "00000899", "005E", "29489");
    assert_eq!(gw.call_as(&other, "POST", CVC3, &body).await.status, 200);
    assert_eq!(gw.call("POST", ARQC, &cvn10_body()).await.status, 200);
    let body = json!({
        "cardNumber": EMV_PAN, "keyAssociation": "PYEMV", "cryptogramVersion": "visa-cvn18",
        "transactionData": pyemv_visa_data("06011203A0B800"),
        "atc": "001C", "arqc": "7A788EA6B8A3E733", "csu": "00000000",
    });
    assert_eq!(gw.call("POST", ARQC, &body).await.status, 200);
    // A refused one too.
    let bad = with(cvn10_body(), "arc", json!("30"));
    assert_eq!(gw.call("POST", ARQC, &bad).await.status, 422);
}

/// Long values are searched as substrings; a code (5 digits) as a word, so a
/// hash or a number that happens to hold its digits is no finding.
fn assert_holds_none(what: &str, text: &str) {
    let upper = text.to_uppercase();
    let words: Vec<&str> = upper.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    for secret in secrets() {
        let secret = secret.to_uppercase();
        let found = if secret.len() < 8 {
            words.contains(&secret.as_str())
        } else {
            upper.contains(&secret)
        };
        assert!(
            !found,
            "{what} holds card data ({} characters)",
            secret.len()
        );
    }
}

#[tokio::test]
async fn the_audit_trail_holds_no_cryptogram_track_data_or_code() {
    // The trail outlives the gateway's own temporary directory.
    let keep = tempfile::tempdir().unwrap();
    let audit_dir = keep.path().join("audit");
    let gw = TestGateway::start(Options {
        emv: true,
        audit_dir: Some(audit_dir.clone()),
        ..Options::default()
    })
    .await;
    exercise(&gw).await;
    gw.stop().await;
    let mut trail = String::new();
    for entry in std::fs::read_dir(&audit_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            trail.push_str(&String::from_utf8_lossy(&std::fs::read(path).unwrap()));
        }
    }
    // The records are there: masked PANs, the programmes and the verdicts.
    assert!(trail.contains("512345******2345"), "{trail}");
    assert!(trail.contains("/cards/arqc/verification"), "{trail}");
    assert!(trail.contains("\"reason\":\"mismatch\""), "{trail}");
    assert_holds_none("the audit trail", &trail);
}

#[test]
fn no_log_line_holds_a_cryptogram_track_data_or_code() {
    // It installs the process-wide log subscriber, which only one test of a
    // process can.
    if !support::in_own_process("emv_http::no_log_line_holds_a_cryptogram_track_data_or_code") {
        return;
    }
    let capture = Capture::install(false);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let gw = gateway().await;
        exercise(&gw).await;
        gw.stop().await;
    });
    let log = capture.text();
    assert!(
        log.contains("/cards/cvc3/verification"),
        "the capture works: {log}"
    );
    assert_holds_none("the log", &log);
}
