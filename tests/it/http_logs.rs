//! DESIGN 7.1 over the whole HTTP surface: every log event, at TRACE level and
//! from every crate (axum, tower-http, sqlx, cryptoki, the gateway), is captured
//! while every endpoint runs — successes, declines, refusals and faults — and
//! searched for the PAN (and its middle digits), every code value the gateway
//! returned or was sent, every client secret and every signature: once in the
//! text format, once in JSON lines (`[log] format = "json"`), where every line
//! must also be a JSON object.

use serde_json::{Value, json};

use crate::support;
use crate::support::http::{Options, PAN, TestGateway, card};
use crate::support::logs::{Capture, NUMERIC_FIELDS, json_lines, json_words};
use crate::support::routes::{CODES, DCVV, ENQUIRY, METRICS, UNENROL, VALUES, VERIFY};

/// Whole words of the log, after removing fields whose numbers are legitimate
/// (latencies, statuses, addresses, sqlx timings and row counts), so a 3-digit
/// code is only "found" where it could really be a leak.
fn words(log: &str) -> Vec<String> {
    let noise = regex_lite(log);
    noise
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Blanks `key=value` tokens of numeric telemetry and dotted addresses.
fn regex_lite(log: &str) -> String {
    const NUMERIC_KEYS: &[&str] = &[
        "latency_ms=",
        "status=",
        "elapsed=",
        "elapsed_secs=",
        "rows_affected=",
        "rows_returned=",
        "slow_threshold=",
        "address=",
        "rows=",
        "latency=",
    ];
    log.split(' ')
        .map(|token| {
            let bare = token.trim_start_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_');
            if NUMERIC_KEYS.iter().any(|k| bare.starts_with(k))
                || bare
                    .split(['.', ':'])
                    .filter(|p| !p.is_empty())
                    .all(|p| p.bytes().all(|b| b.is_ascii_digit()))
                    && bare.contains('.')
            {
                ""
            } else {
                token
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the traffic of [`run_every_endpoint`] must never leave in a log.
struct Secrets {
    codes: Vec<String>,
    secrets: Vec<String>,
    signatures: Vec<String>,
}

#[test]
fn no_pan_code_secret_or_signature_reaches_a_log_line() {
    // It installs the process-wide log subscriber, which only one test of a
    // process can.
    if !support::in_own_process("http_logs::no_pan_code_secret_or_signature_reaches_a_log_line") {
        return;
    }
    let capture = Capture::install(false);
    let secrets = run_every_endpoint();
    let log = capture.text();
    assert_nothing_secret(&log, &secrets, &words(&log));
}

#[test]
fn no_pan_code_secret_or_signature_reaches_a_json_log_line() {
    if !support::in_own_process(
        "http_logs::no_pan_code_secret_or_signature_reaches_a_json_log_line",
    ) {
        return;
    }
    let capture = Capture::install_json();
    let secrets = run_every_endpoint();
    let log = capture.text();
    let lines = json_lines(&log);
    assert!(
        lines.iter().any(|l| l["target"] == "sqlx::query"),
        "every crate's events are JSON lines too"
    );
    let words = json_words(&lines, NUMERIC_FIELDS);
    assert_nothing_secret(&log, &secrets, &words);
}

/// Every endpoint once or more, successes, declines and refusals, on a gateway
/// of this process; what it must not log.
fn run_every_endpoint() -> Secrets {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let gw = TestGateway::start(Options {
            failure_limit: 2,
            ..Options::default()
        })
        .await;
        let mut codes: Vec<String> = Vec::new();
        let mut signatures: Vec<String> = Vec::new();
        let mut call = async |path: &str, body: Value| {
            let answer = gw.call("POST", path, &body).await;
            if let Some(sig) = answer.headers.get("signature") {
                signatures.push(sig.to_str().unwrap().to_owned());
            }
            answer.json()
        };
        let generated = call(VALUES, card(json!({"numberOfValues": 24}))).await;
        for v in generated["values"].as_array().unwrap() {
            codes.push(v["dcvv2"].as_str().unwrap().to_owned());
        }
        let first = codes[0].clone();
        call(VERIFY, card(json!({"cvv2": first}))).await;
        call(VERIFY, card(json!({"cvv2": first}))).await;
        for kind in [
            json!({"kind": "cvv2"}),
            json!({"kind": "icvv"}),
            json!({"kind": "cvv", "serviceCode": "101", "digits": 5}),
        ] {
            let issued = call(CODES, card(kind)).await;
            codes.push(issued["securityCode"].as_str().unwrap().to_owned());
        }
        let static_cvv2 = codes[24].clone();
        call(VERIFY, card(json!({"cvv2": static_cvv2}))).await;
        for guess in ["111", "222", "333"] {
            call(VERIFY, card(json!({"cvv2": guess}))).await;
        }
        call(
            DCVV,
            card(json!({"serviceCode": "226", "atc": "3210", "dcvv": "444"})),
        )
        .await;
        call(UNENROL, card(json!({}))).await;
        call(ENQUIRY, card(json!({}))).await;
        // Refusals: bad Luhn, bad expiry, a wrong signature, a replay.
        call(
            VALUES,
            json!({"cardNumber": "4123456789012345", "expiryDate": "2812"}),
        )
        .await;
        call(VALUES, card(json!({"expiryDate": "9999"}))).await;
        let bytes = serde_json::to_vec(&card(json!({}))).unwrap();
        let mut headers = gw.signed_headers(
            &gw.clients.main,
            "replayed1",
            support::http::T0 * 1000,
            "POST",
            ENQUIRY,
            &bytes,
        );
        gw.send_raw("POST", ENQUIRY, &headers, bytes.clone()).await;
        gw.send_raw("POST", ENQUIRY, &headers, bytes.clone()).await;
        for (k, v) in headers.iter_mut() {
            if k == "Signature" {
                signatures.push(v.clone());
                // Another last character (one in 16 signatures ends in `A=` already).
                let last = if &v[42..43] == "A" { "E" } else { "A" };
                *v = format!("{}{last}=", &v[..42]);
            }
        }
        gw.send_raw("POST", ENQUIRY, &headers, bytes).await;
        gw.send_raw("GET", METRICS, &[], vec![]).await;
        let secrets = vec![
            gw.clients.main.secret.clone(),
            gw.clients.main_second.clone(),
            gw.clients.verifier.secret.clone(),
            gw.clients.other_programme.secret.clone(),
        ];
        gw.stop().await;
        Secrets {
            codes,
            secrets,
            signatures,
        }
    })
}

/// No PAN (but masked ones), client secret or signature in `log`, and no code
/// among its `logged` words.
fn assert_nothing_secret(log: &str, found: &Secrets, logged: &[String]) {
    let Secrets {
        codes,
        secrets,
        signatures,
    } = found;
    assert!(log.contains("request"), "the request log ran: {log}");
    assert!(
        log.contains("412345******2349") || !log.contains("412345"),
        "only masked PANs"
    );
    for needle in [PAN, &PAN[6..12], "4123456789012345"] {
        assert!(
            !log.contains(needle),
            "a PAN or its middle digits appear in the log"
        );
    }
    for secret in secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a client secret appears in the log"
        );
    }
    for sig in signatures {
        assert!(!log.contains(&sig[..20]), "a signature appears in the log");
    }
    for code in codes {
        if let Some(line) = logged.iter().position(|w| w == code) {
            let context = &logged[line.saturating_sub(8)..(line + 8).min(logged.len())];
            panic!("a code value appears in the log, near: {context:?}");
        }
    }
}
