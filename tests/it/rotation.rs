//! Key rotation end to end (issue 4, part 4): a real gateway over this
//! process's SoftHSM token and a SQLite file, restarted on the same store with a
//! new configuration as an operator would. Keys are imported from known clear
//! values, so every code is checked against the independent software reference
//! (`support::reference`); the injectable clock stands on the grace period's end.
//!
//! v1 = the harness keys (`support::http::KEYS`); v2 = keys imported here.

use std::sync::atomic::{AtomicU32, Ordering};

use dcvv_gateway::domain::programme::Programme;
use dcvv_gateway::domain::rotation::PreviousKey;
use dcvv_gateway::hsm::{KeyKind, KeyLabel};
use serde_json::{Value, json};

use crate::support;
use crate::support::http::{
    EXPIRY, K, K4, KEYS, Options, PAN, T0, TestGateway, approved, card, declined, key, programme,
};
use crate::support::reference;
use crate::support::routes::{CODES, DCVV, KEY_INVENTORY, METRICS, READYZ, VALUES, VERIFY};

/// Clear v2 keys (test values only).
const V2_CVK: &str = "89ABCDEF01234567FEDCBA9876543210";
const V2_IMK_DCVV: &str = "13579BDF02468ACEFDB97531ECA86420";
const V2_IMK_TDCVV2: &str = "0F1E2D3C4B5A69788796A5B4C3D2E1F0";

/// A second Luhn-valid card of the test programme, never enrolled: its CVV2
/// is checked by the static rules.
const PAN2: &str = "4123450000000001";

/// The end of the grace period: 2026-01-01T01:00:00Z, a window boundary.
const UNTIL: u64 = T0 + 3600;

/// The v2 keys in the token.
struct V2 {
    cvk: KeyLabel,
    imk_dcvv: KeyLabel,
    imk_tdcvv2: KeyLabel,
}

/// Imports a clear key under `<prefix>-<n>-v2` through the `keys import` path.
fn import_v2(key_hex: &str, kind: KeyKind, prefix: &str) -> KeyLabel {
    static N: AtomicU32 = AtomicU32::new(0);
    let label: KeyLabel = format!("{prefix}-{}-v2", N.fetch_add(1, Ordering::Relaxed))
        .parse()
        .unwrap();
    support::HSM
        .import_key(kind, &label, &support::components(key_hex, kind))
        .unwrap();
    label
}

/// The v2 ceremony: three new keys, each checked by its KCV.
fn ceremony() -> V2 {
    let v2 = V2 {
        cvk: import_v2(V2_CVK, KeyKind::Cvk, "cvk-rot"),
        imk_dcvv: import_v2(V2_IMK_DCVV, KeyKind::ImkDcvv, "imk-dcvv-rot"),
        imk_tdcvv2: import_v2(V2_IMK_TDCVV2, KeyKind::ImkTdcvv2, "imk-tdcvv2-rot"),
    };
    for (label, kind, clear) in [
        (&v2.cvk, KeyKind::Cvk, V2_CVK),
        (&v2.imk_dcvv, KeyKind::ImkDcvv, V2_IMK_DCVV),
        (&v2.imk_tdcvv2, KeyKind::ImkTdcvv2, V2_IMK_TDCVV2),
    ] {
        use dcvv_gateway::hsm::CardCrypto;
        let kcv = support::HSM.key_check_value(label, kind).unwrap();
        assert_eq!(kcv.to_string(), kcv_of(clear));
    }
    v2
}

fn kcv_of(clear: &str) -> String {
    hex::encode_upper(reference::kcv(&key(clear)))
}

/// The v1 keys as previous versions, accepted until `until` (Unix seconds).
fn v1_previous(until: u64) -> Vec<PreviousKey> {
    [
        (KeyKind::Cvk, &KEYS.cvk),
        (KeyKind::ImkDcvv, &KEYS.imk_dcvv),
        (KeyKind::ImkTdcvv2, &KEYS.imk_tdcvv2),
    ]
    .into_iter()
    .map(|(kind, label)| PreviousKey {
        kind,
        label: label.clone(),
        accept_until_ms: until * 1000,
    })
    .collect()
}

/// A harness programme switched to the v2 keys, with `previous` keys.
fn rotated(
    name: &str,
    prefix: &str,
    v2: &V2,
    previous: Vec<PreviousKey>,
    o: &Options,
) -> Programme {
    Programme {
        cvk: v2.cvk.clone(),
        imk_dcvv: v2.imk_dcvv.clone(),
        imk_tdcvv2: v2.imk_tdcvv2.clone(),
        previous,
        ..programme(name, &[prefix], o)
    }
}

/// Both harness programmes on v2, v1 previous until `until`.
fn rotation_config(v2: &V2, until: u64, o: &Options) -> Vec<Programme> {
    vec![
        rotated("test", "412345", v2, v1_previous(until), o),
        rotated("other", "5", v2, v1_previous(until), o),
    ]
}

fn window(unix_seconds: u64) -> u64 {
    unix_seconds / 300
}

fn dynamic(imk: &str, t: u64) -> String {
    reference::tdcvv2(&key(imk), PAN, EXPIRY, t).1
}

fn static_cvv2(cvk: &str) -> String {
    reference::cvv(&key(cvk), PAN2, EXPIRY, "000", 3).1
}

fn dcvv(imk: &str) -> String {
    reference::dcvv(&key(imk), PAN, EXPIRY, "226", "3210").1
}

/// (result, reason, method) of a CVV2 verification of `pan`.
async fn verify(gw: &TestGateway, pan: &str, cvv2: &str) -> (String, String, String) {
    let body = json!({"cardNumber": pan, "expiryDate": EXPIRY, "cvv2": cvv2});
    outcome(gw.call("POST", VERIFY, &body).await)
}

/// (result, reason, method) of a contactless dCVV verification.
async fn verify_dcvv(gw: &TestGateway, code: &str) -> (String, String, String) {
    let body = card(json!({"serviceCode": "226", "atc": "3210", "dcvv": code}));
    outcome(gw.call("POST", DCVV, &body).await)
}

fn outcome(answer: support::http::Answer) -> (String, String, String) {
    let v = answer.ok_json();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["method", "reason", "result"],
        "the response names no key"
    );
    answer.verdict()
}

/// `dcvv_previous_key_matches_total{programme="test"}`, 0 when absent.
async fn previous_matches(gw: &TestGateway) -> u64 {
    let text = String::from_utf8(gw.send_raw("GET", METRICS, &[], vec![]).await.body).unwrap();
    assert!(
        !text.contains("412345") && !text.contains(PAN2),
        "no card data in metrics"
    );
    text.lines()
        .find_map(|l| l.strip_prefix(r#"dcvv_previous_key_matches_total{programme="test"} "#))
        .map_or(0, |n| n.trim().parse().unwrap())
}

async fn security_code(gw: &TestGateway) -> Value {
    let body = json!({"cardNumber": PAN2, "expiryDate": EXPIRY, "kind": "cvv2"});
    let answer = gw.call("POST", CODES, &body).await;
    assert_eq!(answer.status, 200);
    answer.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_made_under_v1_verify_until_the_grace_period_ends_and_new_codes_come_from_v2() {
    // Codes are different under the two versions (else this test proves nothing).
    let t = window(T0);
    assert_ne!(dynamic(K, t), dynamic(V2_IMK_TDCVV2, t));
    assert_ne!(static_cvv2(K), static_cvv2(V2_CVK));
    assert_ne!(dcvv(K4), dcvv(V2_IMK_DCVV));

    let gw = TestGateway::start(Options::default()).await;
    gw.clock.set_seconds(T0 + 10);
    // Under v1: dynamic values (this enrols PAN) and PAN2's static CVV2.
    let v1 = gw.call("POST", VALUES, &card(json!({}))).await.json();
    assert_eq!(v1["dcvv2"], dynamic(K, t));
    assert_eq!(v1["keyCheckValue"], kcv_of(K));
    assert_eq!(security_code(&gw).await["securityCode"], static_cvv2(K));

    // The ceremony, the config change, the restart.
    let v2 = ceremony();
    let gw = gw
        .restart_with(rotation_config(&v2, UNTIL, &Options::default()))
        .await
        .unwrap();
    gw.clock.set_seconds(T0 + 20);

    // Generation uses v2 only.
    let fresh = gw
        .call("POST", VALUES, &card(json!({"numberOfValues": 2})))
        .await
        .json();
    assert_eq!(fresh["dcvv2"], dynamic(V2_IMK_TDCVV2, t));
    assert_eq!(fresh["values"][1]["dcvv2"], dynamic(V2_IMK_TDCVV2, t + 1));
    assert_eq!(fresh["keyCheckValue"], kcv_of(V2_IMK_TDCVV2));
    let code = security_code(&gw).await;
    assert_eq!(code["securityCode"], static_cvv2(V2_CVK));
    assert_eq!(code["keyCheckValue"], kcv_of(V2_CVK));

    // A v1 code still verifies, once: single use is per window whatever the key.
    assert_eq!(previous_matches(&gw).await, 0);
    assert_eq!(verify(&gw, PAN, &dynamic(K, t)).await, approved("dynamic"));
    assert_eq!(
        verify(&gw, PAN, &dynamic(V2_IMK_TDCVV2, t)).await,
        declined("code_already_used", "dynamic")
    );
    assert_eq!(verify(&gw, PAN2, &static_cvv2(K)).await, approved("static"));
    assert_eq!(
        verify(&gw, PAN2, &static_cvv2(V2_CVK)).await,
        approved("static")
    );
    assert_eq!(verify_dcvv(&gw, &dcvv(K4)).await, approved("dcvv"));
    assert_eq!(verify_dcvv(&gw, &dcvv(V2_IMK_DCVV)).await, approved("dcvv"));
    assert_eq!(previous_matches(&gw).await, 3, "one per v1 approval");
    // The enrolled card's static CVV2, v1 or v2, is still refused as such.
    for cvk in [K, V2_CVK] {
        let enrolled_static = reference::cvv(&key(cvk), PAN, EXPIRY, "000", 3).1;
        assert_eq!(
            verify(&gw, PAN, &enrolled_static).await,
            declined("static_cvv2_disabled", "static")
        );
    }

    // The last second of the grace period: v1 codes still verify.
    gw.clock.set_seconds(UNTIL - 1);
    let last = window(UNTIL - 1);
    assert_eq!(
        verify(&gw, PAN, &dynamic(K, last)).await,
        approved("dynamic")
    );
    assert_eq!(verify(&gw, PAN2, &static_cvv2(K)).await, approved("static"));
    assert_eq!(verify_dcvv(&gw, &dcvv(K4)).await, approved("dcvv"));
    assert_eq!(previous_matches(&gw).await, 6);

    // From accept_until on (exclusive), v1 is not tried at all: the window of
    // UNTIL - 1 is still acceptable, yet its v1 code is a mismatch, not "already used".
    gw.clock.set_seconds(UNTIL);
    assert_eq!(
        verify(&gw, PAN, &dynamic(K, window(UNTIL))).await,
        declined("mismatch", "dynamic")
    );
    assert_eq!(
        verify(&gw, PAN, &dynamic(K, last)).await,
        declined("mismatch", "dynamic")
    );
    assert_eq!(
        verify(&gw, PAN2, &static_cvv2(K)).await,
        declined("mismatch", "static")
    );
    assert_eq!(
        verify_dcvv(&gw, &dcvv(K4)).await,
        declined("mismatch", "dcvv")
    );
    // v2 goes on.
    assert_eq!(
        verify(&gw, PAN, &dynamic(V2_IMK_TDCVV2, window(UNTIL))).await,
        approved("dynamic")
    );
    assert_eq!(
        verify(&gw, PAN2, &static_cvv2(V2_CVK)).await,
        approved("static")
    );
    assert_eq!(verify_dcvv(&gw, &dcvv(V2_IMK_DCVV)).await, approved("dcvv"));
    assert_eq!(previous_matches(&gw).await, 6);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_is_one_attempt_however_many_keys_it_tries() {
    let options = Options {
        failure_limit: 2,
        ..Options::default()
    };
    let v2 = ceremony();
    let gw = TestGateway::start(options.clone())
        .await
        .restart_with(rotation_config(&v2, UNTIL, &options))
        .await
        .unwrap();
    gw.clock.set_seconds(T0 + 10);
    let t = window(T0);
    gw.call("POST", VALUES, &card(json!({}))).await;
    // A code no key makes for these windows, nor the card's static CVV2.
    let valid: Vec<String> = [K, V2_IMK_TDCVV2]
        .into_iter()
        .flat_map(|k| [dynamic(k, t - 1), dynamic(k, t), dynamic(k, t + 1)])
        .chain([K, V2_CVK].map(|k| reference::cvv(&key(k), PAN, EXPIRY, "000", 3).1))
        .collect();
    let wrong = (0..1000)
        .map(|n| format!("{n:03}"))
        .find(|c| !valid.contains(c))
        .unwrap();

    // Tried under v2 and v1: one failure, not two, so the limit of 2 is not reached.
    assert_eq!(
        verify(&gw, PAN, &wrong).await,
        declined("mismatch", "dynamic")
    );
    assert_eq!(verify(&gw, PAN, &dynamic(K, t)).await, approved("dynamic"));
    // The second failure reaches it.
    assert_eq!(
        verify(&gw, PAN, &wrong).await,
        declined("mismatch", "dynamic")
    );
    gw.clock.set_seconds(T0 + 310);
    assert_eq!(
        verify(&gw, PAN, &dynamic(V2_IMK_TDCVV2, t + 1)).await,
        declined("too_many_failures", "dynamic")
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_no_longer_in_the_config_is_declined() {
    let gw = TestGateway::start(Options::default()).await;
    gw.clock.set_seconds(T0 + 10);
    let t = window(T0);
    gw.call("POST", VALUES, &card(json!({}))).await;
    let v2 = ceremony();
    // v2 current and no previous key at all, well before any grace period would end.
    let gw = gw
        .restart_with(
            rotation_config(&v2, UNTIL, &Options::default())
                .into_iter()
                .map(|p| Programme {
                    previous: Vec::new(),
                    ..p
                })
                .collect(),
        )
        .await
        .unwrap();
    gw.clock.set_seconds(T0 + 20);
    assert_eq!(
        verify(&gw, PAN, &dynamic(K, t)).await,
        declined("mismatch", "dynamic")
    );
    assert_eq!(
        verify(&gw, PAN2, &static_cvv2(K)).await,
        declined("mismatch", "static")
    );
    assert_eq!(
        verify_dcvv(&gw, &dcvv(K4)).await,
        declined("mismatch", "dcvv")
    );
    assert_eq!(
        verify(&gw, PAN, &dynamic(V2_IMK_TDCVV2, t)).await,
        approved("dynamic")
    );
    assert_eq!(previous_matches(&gw).await, 0);
    // Putting v1 back as a previous key (grace still running) accepts it again.
    let gw = gw
        .restart_with(rotation_config(&v2, UNTIL, &Options::default()))
        .await
        .unwrap();
    assert_eq!(verify(&gw, PAN2, &static_cvv2(K)).await, approved("static"));
    assert_eq!(previous_matches(&gw).await, 1);
    gw.stop().await;
}

/// The `/keys` entry of a label.
fn entry<'a>(keys: &'a Value, label: &str) -> &'a Value {
    keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["label"] == label)
        .unwrap_or_else(|| panic!("{label} not listed: {keys}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_inventory_shows_current_and_previous_roles() {
    let v2 = ceremony();
    let mut config = rotation_config(&v2, UNTIL, &Options::default());
    // Programme `other` has finished its rotation: v1 is no longer named there.
    config[1].previous.clear();
    let gw = TestGateway::start(Options::default())
        .await
        .restart_with(config)
        .await
        .unwrap();
    gw.clock.set_seconds(T0 + 10);
    let keys = gw.call("GET", KEY_INVENTORY, &Value::Null).await;
    assert_eq!(keys.status, 200);
    let keys = keys.json();

    let current = entry(&keys, v2.imk_tdcvv2.as_str());
    assert_eq!(current["version"], 2);
    assert_eq!(current["inUse"], true);
    assert_eq!(current["keyCheckValue"], kcv_of(V2_IMK_TDCVV2));
    assert_eq!(
        current["usedBy"],
        json!([{"programme": "test", "role": "current"}, {"programme": "other", "role": "current"}])
    );
    let previous =
        json!([{"programme": "test", "role": "previous", "acceptUntil": "2026-01-01T01:00:00Z"}]);
    for label in [
        KEYS.cvk.to_string(),
        KEYS.cvk.single_des_twin(),
        KEYS.imk_dcvv.to_string(),
        KEYS.imk_tdcvv2.to_string(),
    ] {
        let old = entry(&keys, &label);
        assert_eq!(old["usedBy"], previous, "{old}");
        assert_eq!(old["inUse"], true, "{old}");
    }
    assert_eq!(entry(&keys, KEYS.pan_index.as_str())["usedBy"], json!([]));
    assert_eq!(entry(&keys, KEYS.pan_index.as_str())["inUse"], true);

    // Once the grace period has ended the configuration still names v1, but
    // the gateway no longer uses it.
    gw.clock.set_seconds(UNTIL);
    let keys = gw.call("GET", KEY_INVENTORY, &Value::Null).await.json();
    let old = entry(&keys, KEYS.imk_tdcvv2.as_str());
    assert_eq!(old["usedBy"], previous);
    assert_eq!(old["inUse"], false);
    assert_eq!(entry(&keys, v2.cvk.as_str())["inUse"], true);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_keys_are_checked_at_start_like_current_ones() {
    let v2 = ceremony();
    let with_previous = |kind, label: &str, until: u64| {
        vec![rotated(
            "test",
            "412345",
            &v2,
            vec![PreviousKey {
                kind,
                label: label.parse().unwrap(),
                accept_until_ms: until * 1000,
            }],
            &Options::default(),
        )]
    };
    let refused = |result: Result<TestGateway, _>| match result {
        Ok(_) => panic!("the gateway started"),
        Err(e) => {
            let text = format!("{e}");
            assert!(text.starts_with("refusing to start"), "{text}");
            assert!(!text.contains('\n'), "one line: {text}");
            text
        }
    };

    // Missing from the token.
    let gw = TestGateway::start(Options::default()).await;
    let text = refused(
        gw.restart_with(with_previous(KeyKind::Cvk, "cvk-gone-v1", UNTIL))
            .await,
    );
    assert!(text.contains("key not found: cvk-gone-v1"), "{text}");

    // Of another kind than the entry says.
    let gw = TestGateway::start(Options::default()).await;
    let text = refused(
        gw.restart_with(with_previous(KeyKind::Cvk, KEYS.imk_dcvv.as_str(), UNTIL))
            .await,
    );
    assert!(
        text.contains(&format!(
            "key {} is a imk-dcvv key, not a cvk key",
            KEYS.imk_dcvv
        )),
        "{text}"
    );

    // A previous key whose grace period has already ended is not loaded: the
    // gateway starts though the key does not exist, and is ready.
    let gw = TestGateway::start(Options::default()).await;
    gw.clock.set_seconds(UNTIL);
    let gw = gw
        .restart_with(with_previous(KeyKind::Cvk, "cvk-destroyed-v1", UNTIL))
        .await
        .unwrap();
    let ready = gw.send_raw("GET", READYZ, &[], vec![]).await;
    assert_eq!(ready.status, 200);
    assert_eq!(
        verify(&gw, PAN2, &static_cvv2(V2_CVK)).await,
        approved("static")
    );
    assert_eq!(
        verify(&gw, PAN2, &static_cvv2(K)).await,
        declined("mismatch", "static")
    );
    // ... but before accept_until the same configuration must find it.
    gw.clock.set_seconds(UNTIL - 1);
    let ready = gw.send_raw("GET", READYZ, &[], vec![]).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["keys"], "missing_or_refused");
    let text = refused(
        gw.restart_with(with_previous(KeyKind::Cvk, "cvk-destroyed-v1", UNTIL))
            .await,
    );
    assert!(text.contains("cvk-destroyed-v1"), "{text}");

    // Wider than its kind's policy.
    let wide: KeyLabel = "cvk-wide-v1".parse().unwrap();
    support::plant_cvk(&wide, &[cryptoki::object::Attribute::Extractable(true)]);
    let gw = TestGateway::start(Options::default()).await;
    let text = refused(
        gw.restart_with(with_previous(KeyKind::Cvk, wide.as_str(), UNTIL))
            .await,
    );
    assert!(
        text.contains("key cvk-wide-v1 refused by policy")
            && text.contains("CKA_EXTRACTABLE is true"),
        "{text}"
    );
    // Other tests of this process (under `cargo test`) serve from this token.
    destroy_objects(wide.as_str());
    destroy_objects(&wide.single_des_twin());
}

/// Destroys every token object labelled `label`, behind the gateway's back.
fn destroy_objects(label: &str) {
    use cryptoki::object::Attribute;
    let session = support::raw_session();
    let handles = session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .unwrap();
    assert!(!handles.is_empty(), "no object {label}");
    for handle in handles {
        session.destroy_object(handle).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_key_destroyed_during_its_grace_period_fails_closed() {
    let v2 = ceremony();
    // v1's CVK under a label of its own: destroying the shared test key would
    // break the other tests of this process (under `cargo test`).
    let v1_cvk = support::import(K, KeyKind::Cvk, "cvk-doomed");
    let o = Options::default();
    let previous = vec![PreviousKey {
        kind: KeyKind::Cvk,
        label: v1_cvk.clone(),
        accept_until_ms: UNTIL * 1000,
    }];
    let gw = TestGateway::start(Options::default())
        .await
        .restart_with(vec![
            rotated("test", "412345", &v2, previous.clone(), &o),
            rotated("other", "5", &v2, previous, &o),
        ])
        .await
        .unwrap();
    gw.clock.set_seconds(T0 + 10);
    assert_eq!(verify(&gw, PAN2, &static_cvv2(K)).await, approved("static"));
    destroy_objects(v1_cvk.as_str());
    destroy_objects(&v1_cvk.single_des_twin());
    // The current key matching needs no previous key.
    assert_eq!(
        verify(&gw, PAN2, &static_cvv2(V2_CVK)).await,
        approved("static")
    );
    // A code the current key does not make needs v1, which is gone: 503, not a decline.
    let body = json!({"cardNumber": PAN2, "expiryDate": EXPIRY, "cvv2": static_cvv2(K)});
    let answer = gw.call("POST", VERIFY, &body).await;
    assert_eq!(
        (answer.status, answer.code()),
        (503, "key_unavailable".into())
    );
    let ready = gw.send_raw("GET", READYZ, &[], vec![]).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["keys"], "missing_or_refused");
    // Once the grace period is over, nothing needs v1 any more.
    gw.clock.set_seconds(UNTIL);
    let ready = gw.send_raw("GET", READYZ, &[], vec![]).await;
    assert_eq!(ready.status, 200);
    assert_eq!(
        verify(&gw, PAN2, &static_cvv2(K)).await,
        declined("mismatch", "static")
    );
    gw.stop().await;
}

/// A config file for the CLI with the demo programme on v2 and v1 previous.
fn rotation_toml(dir: &std::path::Path, v2: &V2, previous_label: &str) -> std::path::PathBuf {
    let path = support::config_file(dir);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        r#"
[[programmes]]
name = "demo"
bin_prefixes = ["412345"]
cvk = "{}"
imk_dcvv = "{}"
imk_tdcvv2 = "{}"
window_seconds = 300

[[programmes.previous]]
kind = "imk-tdcvv2"
label = "{previous_label}"
accept_until = 2026-01-01T01:00:00Z
"#,
        v2.cvk, v2.imk_dcvv, v2.imk_tdcvv2
    ));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn keys_list_shows_roles_and_serve_refuses_a_bad_previous_key() {
    let v2 = ceremony();
    let dir = tempfile::tempdir().unwrap();
    let config = rotation_toml(dir.path(), &v2, KEYS.imk_tdcvv2.as_str());
    let (ok, stdout, stderr) = support::gateway(&config, &["keys", "list", "--json"]);
    assert!(ok, "{stderr}");
    let listing: Value = serde_json::from_str(&stdout).unwrap();
    let find = |label: &str| {
        listing
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["label"] == label)
            .unwrap_or_else(|| panic!("{label}: {listing}"))
            .clone()
    };
    assert_eq!(
        find(KEYS.imk_tdcvv2.as_str())["used_by"],
        json!([{"programme": "demo", "role": "previous", "accept_until": "2026-01-01T01:00:00Z"}])
    );
    assert_eq!(
        find(v2.imk_tdcvv2.as_str())["used_by"],
        json!([{"programme": "demo", "role": "current"}])
    );
    assert_eq!(find(KEYS.cvk.as_str())["used_by"], json!([]));
    let (ok, table, _) = support::gateway(&config, &["keys", "list"]);
    assert!(ok);
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("{} ", KEYS.imk_tdcvv2)))
        .unwrap();
    assert!(
        row.ends_with(" used-by=demo:previous(until=2026-01-01T01:00:00Z)"),
        "{row}"
    );

    // A previous label equal to the current one: one line naming the field,
    // before the token is even opened.
    let config = rotation_toml(dir.path(), &v2, v2.imk_tdcvv2.as_str());
    let (ok, _, stderr) = support::gateway(&config, &["serve"]);
    assert!(!ok);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: configuration: programmes.demo.previous[0].label: "),
        "{stderr}"
    );
}

#[test]
fn serve_logs_a_previous_key_whose_grace_period_has_ended_and_starts() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let config = support::config_file(dir.path());
    let secret = dir.path().join("client.secret");
    std::fs::write(&secret, "s".repeat(43)).unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        r#"
[server]
listen = "127.0.0.1:0"
allow_insecure_http = true

[store]
sqlite_path = "{db}"

[keys]
pan_index = "{pan_index}"

[audit]
directory = "{audit}"
seal_key = "{audit_seal}"

[[programmes]]
name = "demo"
bin_prefixes = ["412345"]
cvk = "{cvk}"
imk_dcvv = "{imk_dcvv}"
imk_tdcvv2 = "{imk_tdcvv2}"
window_seconds = 300

[[programmes.previous]]
kind = "cvk"
label = "cvk-long-gone-v0"
accept_until = 2020-01-01T00:00:00Z

[[clients]]
apikey = "cms"
secrets = [{{ file = "{secret}" }}]
scopes = ["keys"]
programmes = ["*"]
"#,
        db = dir.path().join("gateway.db").display(),
        pan_index = KEYS.pan_index,
        audit = dir.path().join("audit").display(),
        audit_seal = KEYS.audit_seal,
        cvk = KEYS.cvk,
        imk_dcvv = KEYS.imk_dcvv,
        imk_tdcvv2 = KEYS.imk_tdcvv2,
        secret = secret.display(),
    ));
    std::fs::write(&config, text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dcvv-gateway"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Plain HTTP: the gateway says so once it serves.
    while !lines.iter().any(|l| l.contains("serving plain HTTP")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the gateway did not start: {lines:#?}");
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let line = lines
        .iter()
        .find(|l| l.contains("previous key not loaded"))
        .unwrap_or_else(|| panic!("not logged: {lines:#?}"));
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        line.contains("programme=demo")
            && line.contains("kind=cvk")
            && line.contains("label=cvk-long-gone-v0"),
        "{line}"
    );
}
