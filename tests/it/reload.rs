//! Issue 12, item 3: reload without restart. A real `dcvv-gateway serve`
//! process (this process's token, a SQLite file) re-reads `[[clients]]` and
//! `[[programmes]]` on SIGHUP. A client's secret is rotated under steady
//! signed load (second secret added, clients move over, first removed) with
//! no failed request; a broken or incomplete new file (bad TOML, a missing
//! key, an unreadable secret) is refused whole with a log line while the old
//! configuration keeps serving; a good one adds a client and a programme and
//! changes a programme's window for the requests after it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dcvv_gateway::http::signature::ClientSecret;
use serde_json::{Value, json};

use crate::support::http::{Answer, EXPIRY, KEYS, PAN, TestClient, fresh_id, signed_headers};
use crate::support::instances::now_ms;
use crate::support::routes::{ENQUIRY, METRICS, VALUES};
use crate::support::serve::{self, ServeProcess, free_port};
use crate::support::{TOKEN, module};

fn secret() -> String {
    ClientSecret::generate().unwrap().expose().to_owned()
}

/// What the configuration file says, beyond what every version shares.
#[derive(Clone)]
struct Version {
    /// The secret files of client `cms`.
    cms_secrets: Vec<&'static str>,
    /// Window of programme `test`.
    window_seconds: u32,
    /// More TOML at the end (programmes, clients), or a broken tail.
    more: String,
}

/// A `dcvv-gateway serve` process whose config file the test rewrites.
struct Served {
    process: ServeProcess,
    config: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn start(version: &Version, secrets: &[(&str, &str)]) -> Served {
        let _ = &*KEYS;
        let dir = tempfile::tempdir().unwrap();
        for (file, text) in secrets {
            std::fs::write(dir.path().join(file), text).unwrap();
        }
        let port = free_port();
        let config = dir.path().join("gateway.toml");
        write_config(&config, port, version);
        let mut command = serve::command(&config);
        command.env("RUST_LOG", "info");
        let process = ServeProcess::start(command, port, dir.path().join("gateway.log")).await;
        Served {
            process,
            config,
            port,
            _dir: dir,
        }
    }

    /// Rewrites the config file with `version`.
    fn write(&self, version: &Version) {
        write_config(&self.config, self.port, version);
    }

    fn log_text(&self) -> String {
        self.process.log_text()
    }
}
/// Writes the config file of `version` (atomically: a reader never sees half).
fn write_config(config: &Path, port: u16, version: &Version) {
    let secrets: Vec<String> = version
        .cms_secrets
        .iter()
        .map(|f| format!("{{ file = {f:?} }}"))
        .collect();
    let text = format!(
        r#"
[hsm]
module = {module:?}
token_label = {token:?}
pin_file = {pin:?}

[server]
listen = "127.0.0.1:{port}"
allow_insecure_http = true
shutdown_grace_seconds = 5

[store]
sqlite_path = "gateway.db"

[keys]
pan_index = {pan_index:?}

[audit]
directory = "audit"
seal_key = {audit_seal:?}

[[programmes]]
name = "test"
bin_prefixes = ["412345"]
cvk = {cvk:?}
imk_dcvv = {imk_dcvv:?}
imk_tdcvv2 = {imk_tdcvv2:?}
window_seconds = {window}

[[clients]]
apikey = "cms"
secrets = [{secrets}]
scopes = ["dynamic_values", "enrollment", "cvv2_verification"]
programmes = ["*"]
{more}
"#,
        module = module().display().to_string(),
        token = TOKEN.label,
        pin = TOKEN.pin_file.display().to_string(),
        port = port,
        pan_index = KEYS.pan_index.to_string(),
        audit_seal = KEYS.audit_seal.to_string(),
        cvk = KEYS.cvk.to_string(),
        imk_dcvv = KEYS.imk_dcvv.to_string(),
        imk_tdcvv2 = KEYS.imk_tdcvv2.to_string(),
        window = version.window_seconds,
        secrets = secrets.join(", "),
        more = version.more,
    );
    let next = config.with_extension("toml.next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, config).unwrap();
}

impl Served {
    /// Rewrites the file, sends SIGHUP and waits for the gateway's verdict:
    /// `true` when it logged a reload, `false` when it logged a refusal.
    async fn reload(&self, version: &Version) -> bool {
        let (applied, refused) = self.verdicts();
        self.write(version);
        self.process.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.verdicts();
            if now != (applied, refused) {
                assert_eq!(
                    (now.0 - applied) + (now.1 - refused),
                    1,
                    "one verdict per SIGHUP"
                );
                return now.0 > applied;
            }
            assert!(
                Instant::now() < deadline,
                "no verdict:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many reloads were logged as applied and as refused.
    fn verdicts(&self) -> (usize, usize) {
        let text = self.log_text();
        (
            text.matches("configuration reloaded").count(),
            text.matches("configuration reload refused").count(),
        )
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Option<Answer> {
        self.process.send(method, path, headers, body).await
    }

    async fn call(&self, client: &TestClient, path: &str, body: &Value) -> Answer {
        let bytes = serde_json::to_vec(body).unwrap();
        let headers = signed_headers(client, &fresh_id(), now_ms(), "POST", path, &bytes);
        self.send("POST", path, &headers, bytes).await.unwrap()
    }

    async fn metric(&self, line: &str) -> bool {
        let metrics = self.send("GET", METRICS, &[], Vec::new()).await.unwrap();
        String::from_utf8(metrics.body).unwrap().contains(line)
    }
}

fn cms(secret: &str) -> TestClient {
    TestClient {
        apikey: "cms".into(),
        secret: secret.into(),
    }
}

fn a_card() -> Value {
    json!({"cardNumber": PAN, "expiryDate": EXPIRY})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_rotated_by_sighup_under_load_fails_no_request() {
    let (old, new) = (secret(), secret());
    let v1 = Version {
        cms_secrets: vec!["cms-old.secret"],
        window_seconds: 300,
        more: String::new(),
    };
    let served =
        Arc::new(Served::start(&v1, &[("cms-old.secret", &old), ("cms-new.secret", &new)]).await);
    // Four clients of `cms` sign with whichever secret `current` holds.
    let current = Arc::new(RwLock::new(old.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (served, current, stop) =
            (Arc::clone(&served), Arc::clone(&current), Arc::clone(&stop));
        load.spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let signer = cms(&current.read().unwrap().clone());
                let answer = served.call(&signer, ENQUIRY, &a_card()).await;
                statuses.push((answer.status, answer.body));
            }
            statuses
        });
    }
    let pause = || tokio::time::sleep(Duration::from_millis(300));
    pause().await;
    // 1. The new secret as the second source: both verify.
    let both = Version {
        cms_secrets: vec!["cms-old.secret", "cms-new.secret"],
        ..v1.clone()
    };
    assert!(served.reload(&both).await, "{}", served.log_text());
    assert_eq!(
        served.call(&cms(&new), ENQUIRY, &a_card()).await.status,
        200
    );
    pause().await;
    // 2. The clients move to the new secret at their pace.
    *current.write().unwrap() = new.clone();
    pause().await;
    // 3. The old source removed: the old secret is refused from now on.
    let only_new = Version {
        cms_secrets: vec!["cms-new.secret"],
        ..v1.clone()
    };
    assert!(served.reload(&only_new).await, "{}", served.log_text());
    let refused = served.call(&cms(&old), ENQUIRY, &a_card()).await;
    assert_eq!(
        (refused.status, refused.code()),
        (401, "invalid_signature".into())
    );
    pause().await;
    stop.store(true, Ordering::SeqCst);
    let mut statuses = Vec::new();
    while let Some(done) = load.join_next().await {
        statuses.extend(done.unwrap());
    }
    assert!(statuses.len() >= 20, "too little load: {}", statuses.len());
    for (status, body) in &statuses {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
    }
    assert!(
        served
            .metric("dcvv_config_reloads_total{outcome=\"applied\"} 2")
            .await
    );
    eprintln!("{} requests under two reloads, all 200", statuses.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_is_refused_whole_and_a_good_one_applies_to_new_requests() {
    let (main, added) = (secret(), secret());
    let v1 = Version {
        cms_secrets: vec!["cms.secret"],
        window_seconds: 300,
        more: String::new(),
    };
    let served = Served::start(&v1, &[("cms.secret", &main), ("partner.secret", &added)]).await;
    let cms = cms(&main);
    let partner = TestClient {
        apikey: "partner".into(),
        secret: added.clone(),
    };
    let other_card = json!({"cardNumber": "5123456789012346", "expiryDate": EXPIRY});
    let partner_client = r#"
[[clients]]
apikey = "partner"
secrets = [{ file = "partner.secret" }]
scopes = ["enrollment"]
programmes = ["other"]
"#;
    let other_programme = |imk: &str| {
        format!(
            "\n[[programmes]]\nname = \"other\"\nbin_prefixes = [\"512345\"]\ncvk = {cvk:?}\n\
             imk_dcvv = {dcvv:?}\nimk_tdcvv2 = {imk:?}\nwindow_seconds = 300\n",
            cvk = KEYS.cvk.to_string(),
            dcvv = KEYS.imk_dcvv.to_string(),
        )
    };
    let unchanged = async |served: &Served| {
        assert_eq!(served.call(&cms, ENQUIRY, &a_card()).await.status, 200);
        let stranger = served.call(&partner, ENQUIRY, &other_card).await;
        assert_eq!(stranger.status, 401, "the partner was not added");
        let unknown = served.call(&cms, ENQUIRY, &other_card).await;
        assert_eq!(
            unknown.code(),
            "unknown_card_programme",
            "no programme was added"
        );
    };
    unchanged(&served).await;

    // Each broken file is refused whole; the old configuration keeps serving.
    let broken = [
        ("[[clients]\napikey = ".to_owned(), "configuration"),
        (
            format!(
                "{}{partner_client}",
                other_programme("imk-tdcvv2-not-in-the-token")
            ),
            "a configured key is unusable",
        ),
        (
            format!(
                "{}{}",
                other_programme(&KEYS.imk_tdcvv2.to_string()),
                partner_client.replace("partner.secret", "missing.secret")
            ),
            "missing.secret",
        ),
        (
            "\n[[programmes]]\nname = \"test\"\nbin_prefixes = [\"9\"]\n".to_owned(),
            "configuration",
        ),
    ];
    for (i, (more, says)) in broken.iter().enumerate() {
        let version = Version {
            more: more.clone(),
            ..v1.clone()
        };
        assert!(
            !served.reload(&version).await,
            "broken file {i} was applied"
        );
        let text = served.log_text();
        let line = text
            .lines()
            .rfind(|l| l.contains("configuration reload refused"))
            .unwrap();
        assert!(line.contains(says), "file {i}: {line}");
        unchanged(&served).await;
    }
    assert!(
        served
            .metric("dcvv_config_reloads_total{outcome=\"refused\"} 4")
            .await
    );

    // A good file: a new programme and client, and a new window for `test`.
    let before = served.call(&cms, VALUES, &a_card()).await.json()["values"][0].clone();
    let good = Version {
        window_seconds: 600,
        more: format!(
            "{}{partner_client}",
            other_programme(&KEYS.imk_tdcvv2.to_string())
        ),
        ..v1.clone()
    };
    assert!(served.reload(&good).await, "{}", served.log_text());
    assert_eq!(
        served.call(&partner, ENQUIRY, &other_card).await.status,
        200
    );
    assert_eq!(served.call(&cms, ENQUIRY, &other_card).await.status, 200);
    let after = served.call(&cms, VALUES, &a_card()).await.json()["values"][0].clone();
    let span = |v: &Value| {
        let t = |k: &str| {
            time::OffsetDateTime::parse(
                v[k].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
            .unix_timestamp()
        };
        t("validUntil") - t("validFrom")
    };
    assert_eq!(
        (span(&before), span(&after)),
        (300, 600),
        "{before} {after}"
    );
    assert!(
        served
            .metric("dcvv_config_reloads_total{outcome=\"applied\"} 1")
            .await
    );
}

/// A request already authenticated when its client is removed finishes under
/// the clients and programmes it began with (and its response is signed with
/// its secret); the next request of that client is refused. In process: the
/// request is held in the store by a second connection's write lock while the
/// gateway's clients are replaced, as a reload replaces them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_under_the_configuration_it_began_with() {
    use crate::support::http::{Options, TestGateway, card, verify_response};
    use dcvv_gateway::domain::service::Clock;
    use dcvv_gateway::http::Live;
    use dcvv_gateway::http::clients::Clients;

    let gw = Arc::new(TestGateway::start(Options::default()).await);
    let main = gw.clients.main.clone();
    let locker = crate::support::lock_sqlite(&gw.db).await;
    let id = fresh_id();
    let body = serde_json::to_vec(&card(json!({}))).unwrap();
    let headers = signed_headers(&main, &id, gw.clock.now_ms(), "POST", ENQUIRY, &body);
    let in_flight = tokio::spawn({
        let gw = Arc::clone(&gw);
        async move { gw.send_raw("POST", ENQUIRY, &headers, body).await }
    });
    // Authenticated and waiting for the store: it holds an in-flight slot.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = gw.send_raw("GET", METRICS, &[], Vec::new()).await;
        if String::from_utf8(metrics.body)
            .unwrap()
            .contains("dcvv_http_in_flight 1")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the request never got in flight");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let programmes = gw.state.live().programmes.clone();
    gw.state.replace_live(Live {
        clients: Clients::default(),
        programmes,
    });
    drop(locker);
    let answer = in_flight.await.unwrap();
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(
        verify_response(&main, &id, &answer),
        "signed with its secret"
    );
    let after = gw.call("POST", ENQUIRY, &card(json!({}))).await;
    assert_eq!(
        (after.status, after.code()),
        (401, "invalid_signature".into())
    );
    Arc::into_inner(gw).unwrap().stop().await;
}
