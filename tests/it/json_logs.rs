//! Issue 12, item 2: the log as JSON lines, from the real binary. A
//! `dcvv-gateway serve` process (this process's token, a SQLite file) is
//! configured with `[log] format = "json"`, or selects it with
//! `DCVV_GATEWAY__LOG__FORMAT` over a file that says `text`; it serves the HTTP
//! suite's kinds of traffic (successes, a decline, 400, 401 of three kinds,
//! 403, 404, 405, 409, 413, 422 and the 503 of a locked store) and is stopped
//! with SIGTERM. Every line of its stderr must be one JSON object with
//! `timestamp`, `level` and `target`; each request has exactly one line, whose
//! method, route, status, code, client, latency and request id are what the
//! client sent and got; and no PAN, code, secret or signature is in any value.

use std::path::PathBuf;
use std::process::Command;

use dcvv_gateway::http::signature::ClientSecret;
use serde_json::{Map, Value, json};

use crate::support::http::{Answer, EXPIRY, KEYS, PAN, TestClient, fresh_id, signed_headers};
use crate::support::instances::now_ms;
use crate::support::logs::{NUMERIC_FIELDS, json_lines, json_words};
use crate::support::routes::{CODES, ENQUIRY, ENROL, KEY_INVENTORY, VALUES, VERIFY};
use crate::support::serve::{self, ServeProcess, free_port};
use crate::support::{TOKEN, module};

/// A `dcvv-gateway serve` process on a SQLite file, its stderr in a file.
struct Served {
    process: ServeProcess,
    db: PathBuf,
    main: TestClient,
    verifier: TestClient,
    _dir: tempfile::TempDir,
}

/// How the process is told its log format.
struct LogChoice {
    /// The `[log]` section of the file, if any.
    section: &'static str,
    /// `DCVV_GATEWAY__LOG__FORMAT`, if set.
    env: Option<&'static str>,
    /// `RUST_LOG`.
    level: &'static str,
}

/// What one request must leave in the log.
struct Expected {
    request_id: String,
    /// The apikey the request was signed as.
    signer: Option<String>,
    method: &'static str,
    route: &'static str,
    answer: Answer,
}

fn client(apikey: &str) -> TestClient {
    TestClient {
        apikey: apikey.into(),
        secret: ClientSecret::generate().unwrap().expose().to_owned(),
    }
}

impl Served {
    /// Writes the config, starts `serve` and waits until `/readyz` answers 200.
    async fn start(choice: &LogChoice) -> Served {
        let _ = &*KEYS;
        let dir = tempfile::tempdir().unwrap();
        let (main, verifier) = (client("cms"), client("acquirer-switch"));
        for c in [&main, &verifier] {
            std::fs::write(dir.path().join(format!("{}.secret", c.apikey)), &c.secret).unwrap();
        }
        let port = free_port();
        let db = dir.path().join("gateway.db");
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[hsm]
module = {module:?}
token_label = {token:?}
pin_file = {pin:?}

[server]
listen = "127.0.0.1:{port}"
allow_insecure_http = true
body_limit_bytes = 4096
shutdown_grace_seconds = 5

[store]
sqlite_path = "gateway.db"
acquire_timeout_ms = 1000

[keys]
pan_index = {pan_index:?}

[audit]
directory = "audit"
seal_key = {audit_seal:?}

{log}

[[programmes]]
name = "test"
bin_prefixes = ["412345"]
cvk = {cvk:?}
imk_dcvv = {imk_dcvv:?}
imk_tdcvv2 = {imk_tdcvv2:?}
window_seconds = 300

[[clients]]
apikey = "cms"
secrets = [{{ file = "cms.secret" }}]
scopes = ["dynamic_values", "enrollment", "cvv2_verification", "security_codes", "dcvv_verification", "keys"]
programmes = ["test"]

[[clients]]
apikey = "acquirer-switch"
secrets = [{{ file = "acquirer-switch.secret" }}]
scopes = ["cvv2_verification"]
programmes = ["*"]
"#,
                module = module().display().to_string(),
                token = TOKEN.label,
                pin = TOKEN.pin_file.display().to_string(),
                pan_index = KEYS.pan_index.to_string(),
                audit_seal = KEYS.audit_seal.to_string(),
                cvk = KEYS.cvk.to_string(),
                imk_dcvv = KEYS.imk_dcvv.to_string(),
                imk_tdcvv2 = KEYS.imk_tdcvv2.to_string(),
                log = choice.section,
            ),
        )
        .unwrap();
        let mut command = serve::command(&config);
        command
            .env("RUST_LOG", choice.level)
            .env_remove("DCVV_GATEWAY__LOG__FORMAT");
        if let Some(format) = choice.env {
            command.env("DCVV_GATEWAY__LOG__FORMAT", format);
        }
        let process = ServeProcess::start(command, port, dir.path().join("gateway.log")).await;
        Served {
            process,
            db,
            main,
            verifier,
            _dir: dir,
        }
    }

    /// Exactly these headers and body; `None` while nothing answers.
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Option<Answer> {
        self.process.send(method, path, headers, body).await
    }

    /// A request signed by `client` with a fresh id, now: what the log must say of it.
    async fn signed(
        &self,
        client: &TestClient,
        method: &'static str,
        route: &'static str,
        body: Vec<u8>,
    ) -> Expected {
        let id = fresh_id();
        let headers = signed_headers(client, &id, now_ms(), method, route, &body);
        let mut expected = self.expect(id, method, route, &headers, body).await;
        expected.signer = Some(client.apikey.clone());
        expected
    }

    /// Sends the request; the request id of its log line is `id`, or the
    /// gateway's own (`x-request-id` of the response) when `id` is empty.
    async fn expect(
        &self,
        id: String,
        method: &'static str,
        route: &'static str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Expected {
        let answer = self.send(method, route, headers, body).await.unwrap();
        let request_id = if id.is_empty() {
            answer.headers["x-request-id"].to_str().unwrap().to_owned()
        } else {
            id
        };
        Expected {
            request_id,
            signer: None,
            method,
            route,
            answer,
        }
    }

    /// SIGTERM, the drain, a clean exit; the whole log.
    async fn stop(self) -> String {
        let (status, log) = self.process.stop().await;
        assert!(status.success(), "{status} after SIGTERM:\n{log}");
        log
    }
}

fn card(extra: Value) -> Vec<u8> {
    let mut body = json!({"cardNumber": PAN, "expiryDate": EXPIRY});
    if let (Value::Object(map), Value::Object(more)) = (&mut body, extra) {
        map.extend(more);
    }
    serde_json::to_vec(&body).unwrap()
}

/// The request line of `expected`: exactly one, with every request field of the
/// right type and value. Returns the line.
fn request_line<'a>(
    lines: &'a [Map<String, Value>],
    expected: &Expected,
) -> &'a Map<String, Value> {
    let id = expected.request_id.as_str();
    let found = request_lines(lines, id);
    assert_eq!(found.len(), 1, "one request line for {id}: {found:?}");
    let line = found[0];
    let answer = &expected.answer;
    let text = |key: &str| {
        line.get(key)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{key} is not a string: {line:?}"))
    };
    assert_eq!(text("target"), "dcvv_gateway::http", "{line:?}");
    assert_eq!(text("method"), expected.method, "{line:?}");
    assert_eq!(text("route"), expected.route, "{line:?}");
    assert_eq!(
        line["status"].as_u64(),
        Some(u64::from(answer.status)),
        "status is the response's, a number: {line:?}"
    );
    // A 2xx has no error code; an error's is its body's `code`.
    let code = if answer.status < 400 {
        String::new()
    } else {
        answer.code()
    };
    assert_eq!(text("code"), code, "{line:?}");
    // The client is named once its signature verified: then the response is signed.
    let client = match &expected.signer {
        Some(apikey) if answer.headers.contains_key("signature") => apikey.as_str(),
        _ => "-",
    };
    assert_eq!(text("client"), client, "{line:?}");
    assert!(
        line["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "latency_ms is a number: {line:?}"
    );
    let level = text("level");
    if answer.status >= 500 {
        assert!(["WARN", "ERROR"].contains(&level), "{line:?}");
    } else {
        assert_eq!(level, "INFO", "{line:?}");
    }
    line
}

impl Expected {
    /// Signed as `client`, by headers the test made itself.
    fn signed_by(mut self, client: &TestClient) -> Expected {
        self.signer = Some(client.apikey.clone());
        self
    }
}

/// The HTTP suite's kinds of traffic: what each request must leave in the
/// log, the codes the gateway returned and the signatures it sent.
async fn traffic(gw: &Served) -> Traffic {
    let (main, verifier) = (&gw.main, &gw.verifier);
    let mut sent = Vec::new();
    let mut codes = Vec::new();

    // Successes and a decline.
    let values = gw
        .signed(main, "POST", VALUES, card(json!({"numberOfValues": 3})))
        .await;
    let body = values.answer.ok_json();
    for v in body["values"].as_array().unwrap() {
        codes.push(v["dcvv2"].as_str().unwrap().to_owned());
    }
    sent.push(values);
    let first = codes[0].clone();
    sent.push(
        gw.signed(main, "POST", VERIFY, card(json!({"cvv2": first})))
            .await,
    );
    let guess = if codes.iter().any(|c| c == "111") {
        "222"
    } else {
        "111"
    };
    sent.push(
        gw.signed(main, "POST", VERIFY, card(json!({"cvv2": guess})))
            .await,
    );
    let issued = gw
        .signed(main, "POST", CODES, card(json!({"kind": "cvv2"})))
        .await;
    codes.push(
        issued.answer.ok_json()["securityCode"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    sent.push(issued);
    sent.push(gw.signed(main, "GET", KEY_INVENTORY, Vec::new()).await);

    // 422: a PAN that fails the Luhn check; 400: a body that is not JSON.
    let luhn = serde_json::to_vec(&json!({"cardNumber": "4123456789012345", "expiryDate": EXPIRY}))
        .unwrap();
    sent.push(gw.signed(main, "POST", VALUES, luhn).await);
    sent.push(
        gw.signed(main, "POST", ENQUIRY, b"{not json".to_vec())
            .await,
    );
    // 413: a body over body_limit_bytes.
    let big = card(json!({"padding": "x".repeat(8192)}));
    sent.push(gw.signed(main, "POST", ENQUIRY, big).await);
    // 403: a client without the scope.
    sent.push(gw.signed(verifier, "POST", VALUES, card(json!({}))).await);

    // 401: no signature headers; a wrong signature; a stale timestamp.
    sent.push(
        gw.expect(String::new(), "POST", VALUES, &[], card(json!({})))
            .await,
    );
    let id = fresh_id();
    let body = card(json!({}));
    let mut headers = signed_headers(main, &id, now_ms(), "POST", ENQUIRY, &body);
    for (k, v) in headers.iter_mut() {
        if k == "Signature" {
            // Another last character (one in 16 signatures ends in `A=` already).
            let last = if &v[42..43] == "A" { "E" } else { "A" };
            *v = format!("{}{last}=", &v[..42]);
        }
    }
    sent.push(gw.expect(id, "POST", ENQUIRY, &headers, body.clone()).await);
    let id = fresh_id();
    let stale = signed_headers(main, &id, now_ms() - 3_600_000, "POST", ENQUIRY, &body);
    sent.push(gw.expect(id, "POST", ENQUIRY, &stale, body.clone()).await);

    // 409: one request sent twice.
    let id = fresh_id();
    let headers = signed_headers(main, &id, now_ms(), "POST", ENQUIRY, &body);
    let once = gw
        .expect(id.clone(), "POST", ENQUIRY, &headers, body.clone())
        .await;
    assert_eq!(once.answer.status, 200);
    let again = gw
        .send("POST", ENQUIRY, &headers, body.clone())
        .await
        .unwrap();
    assert_eq!(
        (again.status, again.code()),
        (409, "duplicate_request".to_owned())
    );
    // The replay has the request id of the first: both lines are checked in `replayed`.
    let replayed = [
        once.signed_by(main),
        Expected {
            request_id: id,
            signer: Some(main.apikey.clone()),
            method: "POST",
            route: ENQUIRY,
            answer: again,
        },
    ];

    // 404 and 405, unsigned: the gateway's own request id.
    let mut unknown = gw
        .expect(String::new(), "POST", "/nothing-here", &[], Vec::new())
        .await;
    unknown.route = "unmatched";
    sent.push(unknown);
    sent.push(
        gw.expect(String::new(), "GET", VALUES, &[], Vec::new())
            .await,
    );

    // 503: the store is locked.
    let locker = crate::support::lock_sqlite(&gw.db).await;
    sent.push(gw.signed(main, "POST", ENROL, card(json!({}))).await);
    drop(locker);

    let mut statuses: Vec<u16> = sent.iter().map(|e| e.answer.status).collect();
    statuses.sort_unstable();
    statuses.dedup();
    assert_eq!(
        statuses,
        [200, 400, 401, 403, 404, 405, 413, 422, 503],
        "the traffic has every kind of answer"
    );
    Traffic {
        sent,
        replayed,
        codes,
    }
}

/// What [`traffic`] sent.
struct Traffic {
    /// One log line each.
    sent: Vec<Expected>,
    /// One request sent twice: 200, then 409 `duplicate_request`, one id.
    replayed: [Expected; 2],
    /// Every code value the gateway returned.
    codes: Vec<String>,
}

/// The request lines of `expected`'s request id: one per request, in order.
fn request_lines<'a>(lines: &'a [Map<String, Value>], id: &str) -> Vec<&'a Map<String, Value>> {
    lines
        .iter()
        .filter(|l| l.get("request_id").and_then(Value::as_str) == Some(id))
        .filter(|l| matches!(l["message"].as_str(), Some("request" | "request failed")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_log_format_json_writes_every_line_as_a_json_object() {
    let gw = Served::start(&LogChoice {
        section: "[log]\nformat = \"json\"",
        env: None,
        level: "info",
    })
    .await;
    let Traffic {
        sent,
        replayed,
        codes,
    } = traffic(&gw).await;
    let secrets = [gw.main.secret.clone(), gw.verifier.secret.clone()];
    let log = gw.stop().await;
    let lines = json_lines(&log);

    for expected in &sent {
        let line = request_line(&lines, expected);
        if line["level"] == "ERROR" {
            assert!(line["cause"].is_string(), "a 5xx's cause: {line:?}");
        }
    }
    let both = request_lines(&lines, &replayed[0].request_id);
    assert_eq!(both.len(), 2, "{both:?}");
    for (line, expected) in both.iter().zip(&replayed) {
        assert_eq!(line["status"], u64::from(expected.answer.status));
        assert_eq!(line["client"], "cms");
    }
    assert_eq!(both[1]["code"], "duplicate_request");
    let logged = lines
        .iter()
        .filter(|l| {
            l.get("request_id").is_some()
                && l["message"] != "audit record not durable; answering 503 instead of the response"
        })
        .count();
    assert_eq!(logged, sent.len() + 2, "one line per request, no other");

    // The lines of start-up and shutdown are JSON objects too.
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    for message in ["logged in to the token", "drained, stopping"] {
        assert!(messages.contains(&message), "{message}: {messages:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "WARN" && l["address"].is_string()),
        "the plain-HTTP warning, with its address: {log}"
    );

    // The same redaction as the text log.
    for needle in [PAN, &PAN[6..12], "4123456789012345"] {
        assert!(
            !log.contains(needle),
            "a PAN or its middle digits in the log"
        );
    }
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "a client secret in the log");
    }
    for answer in sent.iter().map(|e| &e.answer) {
        if let Some(sig) = answer.headers.get("signature") {
            assert!(
                !log.contains(&sig.to_str().unwrap()[..20]),
                "a signature in the log"
            );
        }
    }
    let words = json_words(&lines, NUMERIC_FIELDS);
    for code in &codes {
        assert!(!words.contains(code), "a code value in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_selects_json_over_the_file() {
    // The file says text; DCVV_GATEWAY__LOG__FORMAT=json wins. At debug, the
    // request lines are inside tower-http's request span.
    let gw = Served::start(&LogChoice {
        section: "[log]\nformat = \"text\"",
        env: Some("json"),
        level: "debug",
    })
    .await;
    let ok = gw
        .signed(&gw.main, "POST", VALUES, card(json!({"numberOfValues": 1})))
        .await;
    assert_eq!(ok.answer.status, 200);
    let refused = gw
        .expect(String::new(), "POST", VALUES, &[], card(json!({})))
        .await;
    assert_eq!(refused.answer.status, 401);
    let log = gw.stop().await;
    let lines = json_lines(&log);
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "RUST_LOG still sets the level"
    );
    for expected in [&ok, &refused] {
        let line = request_line(&lines, expected);
        let span = line["span"].as_object().expect("the request span's fields");
        assert_eq!(span["name"], "request", "{line:?}");
        assert_eq!(span["method"], "POST", "{line:?}");
        assert_eq!(span["uri"], VALUES, "{line:?}");
    }
}

#[test]
fn a_serve_that_cannot_start_ends_its_json_log_with_a_json_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::support::config_file(dir.path());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("{:?}", TOKEN.label), "\"absent-token\"");
    let serve = |log: &str| {
        std::fs::write(&config, format!("{text}[log]\nformat = {log:?}\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_dcvv-gateway"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("RUST_LOG", "debug")
            .env_remove("DCVV_GATEWAY__LOG__FORMAT")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };

    let log = serve("json");
    let lines = json_lines(&log);
    let last = lines.last().expect("at least the error");
    assert_eq!(last["level"], "ERROR", "{log}");
    assert_eq!(last["message"], "dcvv-gateway serve stopped", "{log}");
    assert_eq!(
        last["error"], "no token with label \"absent-token\"",
        "{log}"
    );

    // In text, the same error is the usual last line.
    let log = serve("text");
    assert_eq!(
        log.lines().last(),
        Some("error: no token with label \"absent-token\""),
        "{log}"
    );
    // A format the gateway does not know: refused before the log starts, naming the field.
    assert_eq!(
        serve("yaml"),
        "error: configuration: log.format: \"yaml\" is not a log format (expected \"text\" or \"json\")\n"
    );
}
