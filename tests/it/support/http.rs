//! A real gateway for HTTP tests: this process's SoftHSM token, keys imported
//! from known clear values (so codes can be checked against the independent
//! reference), a SQLite file in a temporary directory, an injectable clock, and
//! a listener on 127.0.0.1:0. Requests go over real sockets with reqwest and
//! are signed with the gateway's own `signature` module.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use base64::Engine as _;
use dcvv_gateway::Gateway;
use dcvv_gateway::audit::AuditSettings;
use dcvv_gateway::config::Settings;
use dcvv_gateway::domain::Tdcvv2Profile;
use dcvv_gateway::domain::programme::{Programme, Programmes};
use dcvv_gateway::domain::service::{Clock, ProgrammeAccess, ServiceSettings};
use dcvv_gateway::hsm::{KeyKind, KeyLabel};
use dcvv_gateway::http::clients::{ClientSettings, OrganizationAccess, Scope, SecretSource};
use dcvv_gateway::http::settings::{ServerSettings, Transport};
use dcvv_gateway::http::signature::{ClientSecret, RequestToSign, ResponseToSign};
use dcvv_gateway::store::StoreSettings;
use dcvv_gateway::telemetry::LogSettings;
use serde_json::Value;
use zeroize::Zeroizing;

use super::{HSM, hsm_settings, import};

/// Clear test keys (the vectors' K and K4).
pub const K: &str = "0123456789ABCDEFFEDCBA9876543210";
pub const K4: &str = "12345678123456781234567812345678";
/// A Luhn-valid PAN in the test programme's BIN.
pub const PAN: &str = "4123456789012349";
pub const EXPIRY: &str = "2812";
/// 2026-01-01T00:00:00Z, the start of a 300 s window.
pub const T0: u64 = 1_767_225_600;

/// The clear key as bytes.
pub fn key(hex_text: &str) -> [u8; 16] {
    hex::decode(hex_text).unwrap().try_into().unwrap()
}

/// Keys in this process's token.
pub struct TestKeys {
    pub cvk: KeyLabel,
    pub imk_dcvv: KeyLabel,
    pub imk_tdcvv2: KeyLabel,
    pub pan_index: KeyLabel,
    pub audit_seal: KeyLabel,
}

/// The EMV test IMKs (issue 11), imported only by gateways started with `Options::emv`.
pub struct EmvKeys {
    /// pyemv's IMK of the ARQC tests (K).
    pub pyemv_ac: KeyLabel,
    /// pyemv's IMK of the CVC3 tests.
    pub pyemv_cvc3: KeyLabel,
    /// jPOS's IMK (K4), as IMK-AC and as IMK-CVC3.
    pub jpos_ac: KeyLabel,
    pub jpos_cvc3: KeyLabel,
}

pub static EMV_KEYS: LazyLock<EmvKeys> = LazyLock::new(|| EmvKeys {
    pyemv_ac: import(K, KeyKind::ImkAc, "imk-ac"),
    pyemv_cvc3: import(
        "01234567899876543210012345678998",
        KeyKind::ImkCvc3,
        "imk-cvc3",
    ),
    jpos_ac: import(K4, KeyKind::ImkAc, "imk-ac"),
    jpos_cvc3: import(K4, KeyKind::ImkCvc3, "imk-cvc3"),
});

pub static KEYS: LazyLock<TestKeys> = LazyLock::new(|| TestKeys {
    cvk: import(K, KeyKind::Cvk, "cvk"),
    imk_dcvv: import(K4, KeyKind::ImkDcvv, "imk-dcvv"),
    imk_tdcvv2: import(K, KeyKind::ImkTdcvv2, "imk-tdcvv2"),
    pan_index: {
        let label = super::unique_label("pan-index");
        HSM.generate_key(KeyKind::PanIndex, &label).unwrap();
        label
    },
    audit_seal: {
        let label = super::unique_label("audit-seal");
        HSM.generate_key(KeyKind::AuditSeal, &label).unwrap();
        label
    },
});

/// A clock tests set by hand.
#[derive(Debug)]
pub struct TestClock(AtomicU64);

impl TestClock {
    pub fn set_seconds(&self, unix_seconds: u64) {
        self.0.store(unix_seconds * 1000, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a test may change about the gateway.
#[derive(Clone)]
pub struct Options {
    pub window_seconds: u32,
    pub past_windows: u32,
    pub future_windows: u32,
    pub single_use: bool,
    pub failure_limit: u32,
    pub max_in_flight: usize,
    pub body_limit: usize,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The audit trail's directory (default: `audit/` in the gateway's temporary directory).
    pub audit_dir: Option<PathBuf>,
    /// The directory of the SQLite file (default: the gateway's temporary directory).
    pub db_dir: Option<PathBuf>,
    pub seal_every_records: u64,
    pub seal_interval: Duration,
    pub max_file_bytes: u64,
    /// `[server]` header-read deadline.
    pub header_read_timeout: Duration,
    /// `[server]` keep-alive idle timeout.
    pub keep_alive_timeout: Duration,
    /// `[server]` body deadline of signed requests.
    pub body_read_timeout: Duration,
    /// `[server]` connection caps.
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// Adds the EMV programmes of the published vectors (PANs fail the Luhn
    /// check there): `pyemv` (BIN 1, IMK-AC of pyemv), `jpos` (BIN 12, the
    /// jPOS IMK as IMK-AC and IMK-CVC3), both allowed to the main client; and
    /// pyemv's IMK-CVC3 in programme `other` (BIN 5).
    pub emv: bool,
    /// The organisations the main client may name (default: any).
    pub main_organizations: OrganizationAccess,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            window_seconds: 300,
            past_windows: 1,
            future_windows: 0,
            single_use: true,
            failure_limit: 5,
            max_in_flight: 64,
            body_limit: 16 * 1024,
            tls: None,
            audit_dir: None,
            db_dir: None,
            seal_every_records: 1000,
            seal_interval: Duration::from_secs(60),
            max_file_bytes: 64 << 20,
            header_read_timeout: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(75),
            body_read_timeout: Duration::from_secs(5),
            max_connections: 1024,
            max_connections_per_peer: 1024,
            emv: false,
            main_organizations: OrganizationAccess::Any,
        }
    }
}

/// A client the tests sign as.
#[derive(Clone)]
pub struct TestClient {
    pub apikey: String,
    pub secret: String,
}

/// Every client of the test gateway.
pub struct Clients {
    /// All scopes, programme `test`.
    pub main: TestClient,
    /// The main client's second (rotation) secret.
    pub main_second: String,
    /// Only `cvv2_verification`.
    pub verifier: TestClient,
    /// All scopes, but only programme `other`.
    pub other_programme: TestClient,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    /// Reads a whole response.
    pub async fn of(response: reqwest::Response) -> Answer {
        Answer {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.bytes().await.unwrap().to_vec(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }

    /// `(result, reason, method)` of a 200 verification answer.
    pub fn verdict(&self) -> Verdict {
        let v = self.ok_json();
        let field = |name: &str| v[name].as_str().unwrap().to_owned();
        (field("result"), field("reason"), field("method"))
    }

    /// The JSON of a 200 answer; any other status fails the test, showing the body.
    pub fn ok_json(&self) -> Value {
        assert_eq!(self.status, 200, "{}", String::from_utf8_lossy(&self.body));
        self.json()
    }
}

/// `(result, reason, method)` of a verification.
pub type Verdict = (String, String, String);

/// An approval by the `method` (`dynamic` or `static`) check.
pub fn approved(method: &str) -> Verdict {
    ("approved".into(), "match".into(), method.into())
}

/// A decline for `reason` by the `method` check.
pub fn declined(reason: &str, method: &str) -> Verdict {
    ("declined".into(), reason.into(), method.into())
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, written as PEM
/// into `dir`: the certificate and the paths of its PEM and key files.
pub fn self_signed_tls(dir: &Path) -> (rcgen::CertifiedKey, PathBuf, PathBuf) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    (cert, cert_path, key_path)
}

/// A running gateway.
pub struct TestGateway {
    pub url: String,
    pub clock: Arc<TestClock>,
    pub clients: Clients,
    pub db: PathBuf,
    pub audit_dir: PathBuf,
    pub http: reqwest::Client,
    pub state: dcvv_gateway::http::AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

fn random_secret() -> String {
    ClientSecret::generate().unwrap().expose().to_owned()
}

/// Every scope: the main client may call every route.
fn all_scopes() -> HashSet<Scope> {
    [
        Scope::DynamicValues,
        Scope::Enrollment,
        Scope::Cvv2Verification,
        Scope::SecurityCodes,
        Scope::DcvvVerification,
        Scope::Cvc3Verification,
        Scope::ArqcVerification,
        Scope::Keys,
    ]
    .into()
}

static REQUEST_IDS: AtomicU32 = AtomicU32::new(0);

/// A request id no other request of this process used.
pub fn fresh_id() -> String {
    format!(
        "t{}x{}",
        std::process::id(),
        REQUEST_IDS.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn programme(name: &str, prefixes: &[&str], o: &Options) -> Programme {
    Programme {
        name: name.into(),
        bin_prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
        key_association: Some(name.to_uppercase()),
        cvk: KEYS.cvk.clone(),
        imk_dcvv: KEYS.imk_dcvv.clone(),
        imk_tdcvv2: KEYS.imk_tdcvv2.clone(),
        imk_ac: None,
        imk_cvc3: None,
        profile: Tdcvv2Profile::new(o.window_seconds, o.past_windows, o.future_windows).unwrap(),
        single_use: o.single_use,
        failure_limit: NonZeroU32::new(o.failure_limit),
        failure_period_seconds: 86_400,
        previous: Vec::new(),
    }
}

/// The harness's programmes: `test` (BIN 412345) and `other` (BIN 5), and
/// with `Options::emv` those of the EMV vectors.
fn programmes(o: &Options) -> Vec<Programme> {
    let mut list = vec![
        programme("test", &["412345"], o),
        programme("other", &["5"], o),
    ];
    if o.emv {
        let keys = &*EMV_KEYS;
        list[1].imk_cvc3 = Some(keys.pyemv_cvc3.clone());
        list.push(Programme {
            imk_ac: Some(keys.pyemv_ac.clone()),
            ..programme("pyemv", &["1"], o)
        });
        list.push(Programme {
            imk_ac: Some(keys.jpos_ac.clone()),
            imk_cvc3: Some(keys.jpos_cvc3.clone()),
            ..programme("jpos", &["12"], o)
        });
    }
    list
}

impl TestGateway {
    pub async fn start(options: Options) -> TestGateway {
        Self::try_start(options).await.unwrap()
    }

    /// As [`TestGateway::start`], returning the gateway's refusal to start.
    pub async fn try_start(options: Options) -> Result<TestGateway, dcvv_gateway::StartError> {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = |name: &str, value: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, value).unwrap();
            SecretSource::File(path)
        };
        let clients = Clients {
            main: TestClient {
                apikey: "cms".into(),
                secret: random_secret(),
            },
            main_second: random_secret(),
            verifier: TestClient {
                apikey: "acquirer-switch".into(),
                secret: random_secret(),
            },
            other_programme: TestClient {
                apikey: "other-bank".into(),
                secret: random_secret(),
            },
        };
        let all_scopes = all_scopes();
        let client_settings = vec![
            ClientSettings {
                apikey: clients.main.apikey.clone(),
                secrets: vec![
                    secret_file("main", &clients.main.secret),
                    secret_file("main-2", &clients.main_second),
                ],
                scopes: all_scopes.clone(),
                access: ProgrammeAccess::Only(if options.emv {
                    ["test", "pyemv", "jpos"].map(str::to_owned).into()
                } else {
                    ["test".to_owned()].into()
                }),
                organizations: options.main_organizations.clone(),
            },
            ClientSettings {
                apikey: clients.verifier.apikey.clone(),
                secrets: vec![secret_file("verifier", &clients.verifier.secret)],
                scopes: [Scope::Cvv2Verification].into(),
                access: ProgrammeAccess::All,
                organizations: OrganizationAccess::Any,
            },
            ClientSettings {
                apikey: clients.other_programme.apikey.clone(),
                secrets: vec![secret_file("other", &clients.other_programme.secret)],
                scopes: all_scopes,
                access: ProgrammeAccess::Only(["other".to_owned()].into()),
                organizations: OrganizationAccess::Any,
            },
        ];
        let db = options
            .db_dir
            .as_deref()
            .unwrap_or(dir.path())
            .join("gateway.db");
        let audit_dir = options
            .audit_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("audit"));
        let settings = Settings {
            hsm: hsm_settings(),
            server: ServerSettings {
                listen: "127.0.0.1:0".parse().unwrap(),
                transport: match &options.tls {
                    Some((cert, key)) => Transport::Tls {
                        cert: cert.clone(),
                        key: key.clone(),
                    },
                    None => Transport::InsecureHttp,
                },
                request_timeout: Duration::from_secs(10),
                body_limit: options.body_limit,
                max_in_flight: options.max_in_flight,
                shutdown_grace: Duration::from_secs(5),
                max_skew: Duration::from_secs(300),
                cleanup_interval: Duration::from_secs(3600),
                header_read_timeout: options.header_read_timeout,
                keep_alive_timeout: options.keep_alive_timeout,
                body_read_timeout: options.body_read_timeout,
                max_connections: options.max_connections,
                max_connections_per_peer: options.max_connections_per_peer,
                worker_threads: 1,
            },
            store: StoreSettings::sqlite(db.clone(), Duration::from_secs(2)),
            service: ServiceSettings {
                pan_index_key: KEYS.pan_index.clone(),
                replay_window_seconds: 900,
            },
            programmes: Programmes::new(programmes(&options)).unwrap(),
            clients: client_settings,
            audit: AuditSettings {
                directory: audit_dir.clone(),
                seal_key: KEYS.audit_seal.clone(),
                seal_every_records: options.seal_every_records,
                seal_interval: options.seal_interval,
                max_file_bytes: options.max_file_bytes,
            },
            log: LogSettings::default(),
        };
        let clock = Arc::new(TestClock(AtomicU64::new(T0 * 1000)));
        let gateway = Gateway::build(
            &settings,
            Arc::clone(&*HSM),
            clock.clone() as Arc<dyn Clock>,
        )
        .await?;
        let state = gateway.state();
        let (port, tx, served) = serve_on_a_free_port(gateway);
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        Ok(TestGateway {
            url: format!("{scheme}://127.0.0.1:{port}"),
            clock,
            clients,
            db,
            audit_dir,
            http: reqwest::Client::new(),
            state,
            shutdown: Some(tx),
            served: Some(served),
            _dir: dir,
        })
    }

    /// Sends raw bytes with exactly these headers (no signing).
    pub async fn send_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Answer {
        let mut request = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.url))
            .body(body);
        for (k, v) in headers {
            request = request.header(k.as_str(), v.as_str());
        }
        Answer::of(request.send().await.unwrap()).await
    }

    /// The four signature headers for a request.
    pub fn signed_headers(
        &self,
        client: &TestClient,
        request_id: &str,
        timestamp_ms: u64,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Vec<(String, String)> {
        signed_headers(client, request_id, timestamp_ms, method, path, body)
    }

    /// A correctly signed request as `client`, at the gateway's clock; checks the
    /// response signature whenever the gateway signed.
    pub async fn call_as(
        &self,
        client: &TestClient,
        method: &str,
        path: &str,
        body: &Value,
    ) -> Answer {
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).unwrap()
        };
        let id = fresh_id();
        let headers = self.signed_headers(client, &id, self.clock.now_ms(), method, path, &bytes);
        let answer = self.send_raw(method, path, &headers, bytes).await;
        if answer.headers.contains_key("signature") {
            assert!(
                verify_response(client, &id, &answer),
                "response signature must verify"
            );
        }
        answer
    }

    /// A correctly signed request as the main client.
    pub async fn call(&self, method: &str, path: &str, body: &Value) -> Answer {
        let client = self.clients.main.clone();
        self.call_as(&client, method, path, body).await
    }

    /// Every row of every table, as text (to prove a request changed nothing).
    pub async fn snapshot(&self) -> BTreeMap<String, Vec<String>> {
        use sqlx::Row;
        let url = format!("sqlite://{}?mode=ro", self.db.display());
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_sqlx%' ESCAPE '\\' AND name <> 'heartbeat'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let mut out = BTreeMap::new();
        for table in tables {
            let rows = sqlx::query(&format!("SELECT * FROM {table}"))
                .fetch_all(&mut conn)
                .await
                .unwrap();
            let mut texts: Vec<String> = rows
                .iter()
                .map(|row| {
                    (0..row.columns().len())
                        .map(|i| {
                            row.try_get::<i64, _>(i)
                                .map(|v| v.to_string())
                                .or_else(|_| row.try_get::<String, _>(i))
                                .or_else(|_| row.try_get::<Vec<u8>, _>(i).map(hex::encode))
                                .unwrap_or_else(|_| "NULL".into())
                        })
                        .collect::<Vec<_>>()
                        .join("|")
                })
                .collect();
            texts.sort();
            out.insert(table, texts);
        }
        out
    }

    /// Stops the server and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.unwrap();
        }
    }
}

/// Checks a response's signature as a client would.
pub fn verify_response(client: &TestClient, request_id: &str, answer: &Answer) -> bool {
    let header = |name: &str| answer.headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(ts), Some(id), Some(sig)) = (
        header("timestamp"),
        header("x-client-request-id"),
        header("signature"),
    ) else {
        return false;
    };
    if id != request_id {
        return false;
    }
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(sig) else {
        return false;
    };
    let Ok(tag) = <[u8; 32]>::try_from(raw.as_slice()) else {
        return false;
    };
    let message = ResponseToSign {
        apikey: &client.apikey,
        request_id,
        timestamp_ms: ts.parse().unwrap(),
        status: answer.status,
        body: &answer.body,
    }
    .message();
    let secret = ClientSecret::new(Zeroizing::new(client.secret.clone())).unwrap();
    secret.verify(&message, &tag)
}

/// A card body for the test PAN.
pub fn card(extra: Value) -> Value {
    let mut body = serde_json::json!({"cardNumber": PAN, "expiryDate": EXPIRY});
    if let (Value::Object(map), Value::Object(more)) = (&mut body, extra) {
        map.extend(more);
    }
    body
}

/// Restarting a gateway on the same store with another configuration (key
/// rotation tests): what an operator does after editing `[[programmes]]`.
impl TestGateway {
    /// Stops this gateway (drains it) and builds a new one over the same token,
    /// SQLite file, clients, clock and temporary directory, with `programmes` in
    /// place of the configured ones. `Err` is the start-up refusal, e.g. a
    /// previous key missing from the token.
    pub async fn restart_with(
        mut self,
        programmes: Vec<Programme>,
    ) -> Result<TestGateway, dcvv_gateway::StartError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.unwrap();
        }
        let all_scopes = all_scopes();
        // The secret files `start` wrote.
        let file = |name: &str| SecretSource::File(self._dir.path().join(name));
        let client_settings = vec![
            ClientSettings {
                apikey: self.clients.main.apikey.clone(),
                secrets: vec![file("main"), file("main-2")],
                scopes: all_scopes.clone(),
                access: ProgrammeAccess::Only(["test".to_owned()].into()),
                organizations: OrganizationAccess::Any,
            },
            ClientSettings {
                apikey: self.clients.verifier.apikey.clone(),
                secrets: vec![file("verifier")],
                scopes: [Scope::Cvv2Verification].into(),
                access: ProgrammeAccess::All,
                organizations: OrganizationAccess::Any,
            },
            ClientSettings {
                apikey: self.clients.other_programme.apikey.clone(),
                secrets: vec![file("other")],
                scopes: all_scopes,
                access: ProgrammeAccess::Only(["other".to_owned()].into()),
                organizations: OrganizationAccess::Any,
            },
        ];
        let defaults = Options::default();
        let settings = Settings {
            hsm: hsm_settings(),
            server: ServerSettings {
                listen: "127.0.0.1:0".parse().unwrap(),
                transport: Transport::InsecureHttp,
                request_timeout: Duration::from_secs(10),
                body_limit: defaults.body_limit,
                max_in_flight: defaults.max_in_flight,
                shutdown_grace: Duration::from_secs(5),
                max_skew: Duration::from_secs(300),
                cleanup_interval: Duration::from_secs(3600),
                header_read_timeout: defaults.header_read_timeout,
                keep_alive_timeout: defaults.keep_alive_timeout,
                body_read_timeout: defaults.body_read_timeout,
                max_connections: defaults.max_connections,
                max_connections_per_peer: defaults.max_connections_per_peer,
                worker_threads: 1,
            },
            store: StoreSettings::sqlite(self.db.clone(), Duration::from_secs(2)),
            service: ServiceSettings {
                pan_index_key: KEYS.pan_index.clone(),
                replay_window_seconds: 900,
            },
            programmes: Programmes::new(programmes).unwrap(),
            clients: client_settings,
            // The same trail: the restarted gateway continues its chain.
            audit: AuditSettings {
                directory: self.audit_dir.clone(),
                seal_key: KEYS.audit_seal.clone(),
                seal_every_records: defaults.seal_every_records,
                seal_interval: defaults.seal_interval,
                max_file_bytes: defaults.max_file_bytes,
            },
            log: LogSettings::default(),
        };
        let gateway = Gateway::build(
            &settings,
            Arc::clone(&*HSM),
            self.clock.clone() as Arc<dyn Clock>,
        )
        .await?;
        let state = gateway.state();
        let (port, tx, served) = serve_on_a_free_port(gateway);
        self.url = format!("http://127.0.0.1:{port}");
        self.state = state;
        self.shutdown = Some(tx);
        self.served = Some(served);
        Ok(self)
    }
}

/// Serves `gateway` on a free local port until the sender is used or dropped.
fn serve_on_a_free_port(
    gateway: Gateway,
) -> (
    u16,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        gateway
            .serve(listener, async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (port, tx, served)
}

/// The four signature headers (and the content type) of a request signed by
/// `client`, as a card-management system sends them.
pub fn signed_headers(
    client: &TestClient,
    request_id: &str,
    timestamp_ms: u64,
    method: &str,
    path: &str,
    body: &[u8],
) -> Vec<(String, String)> {
    let secret = ClientSecret::new(Zeroizing::new(client.secret.clone())).unwrap();
    let tag = secret.sign(
        &RequestToSign {
            apikey: &client.apikey,
            request_id,
            timestamp_ms,
            method,
            path_and_query: path,
            body,
        }
        .message(),
    );
    vec![
        ("apikey".into(), client.apikey.clone()),
        ("Timestamp".into(), timestamp_ms.to_string()),
        ("X-Client-Request-Id".into(), request_id.into()),
        ("Signature".into(), tag),
        ("Content-Type".into(), "application/json".into()),
    ]
}
