//! The portal's request shape on `POST /cards/pin/dynamic-values` (issue 12):
//! `disableDCVV2 = "Y"` resets the card to its static CVV2 and returns no
//! values, `"N"` or absent generates; `organizationNumber` is recorded in the
//! audit trail, and a client restricted to its organisations must name one of
//! them. Bad values are 422 with their own code and change nothing; a refused
//! organisation is 403 and changes nothing. A real gateway on this process's
//! SoftHSM token and a SQLite file, its trail read back from disk.

use std::collections::BTreeSet;
use std::path::Path;

use dcvv_gateway::audit::record::Fields;
use dcvv_gateway::domain::service::Clock;
use dcvv_gateway::http::clients::{Organization, OrganizationAccess};
use serde_json::{Value, json};

use crate::support::http::{
    Answer, EXPIRY, K, Options, PAN, TestGateway, approved, card, declined, fresh_id, key,
};
use crate::support::routes::{ENQUIRY, VALUES, VERIFY};
use crate::support::{reference, trail};

fn static_cvv2() -> String {
    reference::cvv(&key(K), PAN, EXPIRY, "000", 3).1
}

/// A signed dynamic-values request as the main client, with its request id.
async fn values(gw: &TestGateway, fields: Value) -> (String, Answer) {
    let id = fresh_id();
    let body = serde_json::to_vec(&card(fields)).unwrap();
    let headers = gw.signed_headers(
        &gw.clients.main,
        &id,
        gw.clock.now_ms(),
        "POST",
        VALUES,
        &body,
    );
    (
        id.clone(),
        gw.send_raw("POST", VALUES, &headers, body).await,
    )
}

/// The request record of `request_id` (records are durable before the response).
fn record_of(dir: &Path, request_id: &str) -> Fields {
    let mine: Vec<Fields> = trail::records(dir)
        .into_iter()
        .filter(|r| r["kind"] == "request" && r["request_id"] == request_id)
        .collect();
    assert_eq!(mine.len(), 1, "one record for {request_id}");
    mine.into_iter().next().unwrap()
}

async fn enrollment(gw: &TestGateway) -> Value {
    gw.call("POST", ENQUIRY, &card(json!({}))).await.json()["enrollment"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_dcvv2_y_unenrols_and_returns_no_values_n_generates() {
    let gw = TestGateway::start(Options::default()).await;
    let (_, generated) = values(&gw, json!({"disableDCVV2": "N", "numberOfValues": 2})).await;
    let v = generated.ok_json();
    assert_eq!(v["values"].as_array().unwrap().len(), 2, "N generates");
    assert_eq!(v["enrollment"], "enrolled");
    assert!(v.get("changed").is_none(), "{v}");
    assert_eq!(enrollment(&gw).await, "enrolled");
    let verdict = |cvv2: String| {
        let gw = &gw;
        async move {
            gw.call("POST", VERIFY, &card(json!({ "cvv2": cvv2 })))
                .await
                .verdict()
        }
    };
    assert_eq!(
        verdict(static_cvv2()).await,
        declined("static_cvv2_disabled", "static")
    );

    let (id, disabled) = values(&gw, json!({"disableDCVV2": "Y", "channel": "W"})).await;
    let d = disabled.ok_json();
    assert_eq!(d["values"], json!([]), "{d}");
    assert_eq!(d["enrollment"], "not_enrolled");
    assert_eq!(d["changed"], true);
    assert_eq!(d["cardNumber"], "412345******2349");
    assert_eq!(d["programme"], "test");
    for absent in [
        "dcvv2",
        "dcvv2GenerationTime",
        "dcvv2ExpiryMinutes",
        "keyCheckValue",
    ] {
        assert!(d.get(absent).is_none(), "{absent} in {d}");
    }
    assert_eq!(enrollment(&gw).await, "not_enrolled");
    assert_eq!(
        verdict(static_cvv2()).await,
        approved("static"),
        "the static CVV2 is accepted again"
    );
    let record = record_of(&gw.audit_dir, &id);
    assert_eq!(record["operation"], VALUES);
    assert_eq!(record["action"], "unenroll");
    assert_eq!(record["status"], 200);
    assert_eq!(record["key_label"], Value::Null, "no key was used");

    let (_, again) = values(&gw, json!({"disableDCVV2": "Y"})).await;
    assert_eq!(again.ok_json()["changed"], false, "idempotent");
    let (_, absent) = values(&gw, json!({})).await;
    assert_eq!(absent.ok_json()["values"].as_array().unwrap().len(), 1);
    assert_eq!(
        enrollment(&gw).await,
        "enrolled",
        "absent generates and enrols"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organization_number_is_recorded_and_bounds_a_restricted_client() {
    let own: BTreeSet<Organization> = ["001", "002"]
        .iter()
        .map(|o| Organization::parse(o).unwrap())
        .collect();
    let gw = TestGateway::start(Options {
        main_organizations: OrganizationAccess::Only(own),
        ..Options::default()
    })
    .await;
    let before = gw.snapshot().await;
    for fields in [
        json!({"organizationNumber": "003"}),
        json!({"organizationNumber": 3}),
        json!({}),
        json!({"organizationNumber": "003", "disableDCVV2": "Y"}),
    ] {
        let (id, answer) = values(&gw, fields.clone()).await;
        assert_eq!(
            (answer.status, answer.code()),
            (403, "forbidden_organization".into()),
            "{fields}"
        );
        let record = record_of(&gw.audit_dir, &id);
        assert_eq!(record["error_code"], "forbidden_organization");
    }
    for (fields, code) in [
        (
            json!({"organizationNumber": "1000"}),
            "invalid_organization_number",
        ),
        (
            json!({"organizationNumber": ""}),
            "invalid_organization_number",
        ),
        (
            json!({"organizationNumber": "0x1"}),
            "invalid_organization_number",
        ),
        (
            json!({"organizationNumber": 1000}),
            "invalid_organization_number",
        ),
        (json!({"disableDCVV2": "yes"}), "invalid_disable_dcvv2"),
        (
            json!({"disableDCVV2": "y", "organizationNumber": "1"}),
            "invalid_disable_dcvv2",
        ),
    ] {
        let (_, answer) = values(&gw, fields.clone()).await;
        assert_eq!(
            (answer.status, answer.code()),
            (422, code.into()),
            "{fields}"
        );
    }
    let (_, wrong_type) = values(&gw, json!({"disableDCVV2": true})).await;
    assert_eq!(
        (wrong_type.status, wrong_type.code()),
        (400, "malformed_request".into())
    );
    assert_eq!(
        gw.snapshot().await,
        before,
        "no refused request changed the store"
    );

    // Its own organisations, as a string or a number, with or without zeros.
    for (fields, recorded) in [
        (json!({"organizationNumber": "1"}), "001"),
        (json!({"organizationNumber": "002"}), "002"),
        (json!({"organizationNumber": 2}), "002"),
    ] {
        let (id, answer) = values(&gw, fields.clone()).await;
        assert_eq!(answer.status, 200, "{fields}");
        assert_eq!(record_of(&gw.audit_dir, &id)["organization"], recorded);
    }
    // A client without the restriction may name any organisation, or none.
    let other = gw.clients.other_programme.clone();
    let other_card = json!({"cardNumber": "5123456789012346", "expiryDate": "2812"});
    for organization in [json!("999"), Value::Null] {
        let mut body = other_card.clone();
        if !organization.is_null() {
            body["organizationNumber"] = organization.clone();
        }
        let answer = gw.call_as(&other, "POST", VALUES, &body).await;
        assert_eq!(answer.status, 200, "{organization}");
    }
    gw.stop().await;
}
