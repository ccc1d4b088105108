//! Test harness: real `dcvv-gateway serve` processes (the binary cargo built for
//! this test) on this process's SoftHSM token and one store, each on its own
//! local port over plain HTTP. The store is one PostgreSQL database of the
//! throwaway cluster (`postgres.rs`, [`Fleet::new`]: several instances) or one
//! SQLite file ([`Fleet::sqlite`]: one instance at a time). Starting an instance
//! again under the same name (after [`Instance::kill`]) restarts it on the same
//! store and the same audit trail directory.
//!
//! Every instance gets the same configuration apart from its port: the test keys
//! (imported here from the vectors' clear values, so the software reference can
//! compute codes), one client with every scope, the `test` programme (BIN 412345,
//! 300 s windows, G = 1, single use, failure limit 5) and, on PostgreSQL, the
//! database password from a file. Instances use the system clock, as in production. A process is
//! killed when its handle drops, so a failed test leaves none behind; its stderr
//! (the gateway's log) is kept in a file and shown when it does not start.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dcvv_gateway::http::signature::ClientSecret;
use serde_json::Value;

use super::http::{Answer, KEYS, TestClient, signed_headers};
use super::postgres::PG;
use super::routes::READYZ;
use super::serve::free_port;
use super::{TOKEN, module};

/// What every instance of a fleet shares: the config pieces and the store.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub store: FleetStore,
    pub apikey: String,
    secret: String,
    secret_file: PathBuf,
    pub acquire_timeout_ms: u64,
    /// The `[audit]` settings besides the directory and the key.
    pub trail: TrailSettings,
}

/// Where a fleet keeps its state.
pub enum FleetStore {
    /// One database of the throwaway PostgreSQL cluster, its password in a file.
    Postgres {
        database: String,
        password_file: PathBuf,
    },
    /// One SQLite file.
    Sqlite(PathBuf),
}

/// `[audit]` seal and rotation settings (the built-in defaults unless a test
/// changes them before starting an instance).
#[derive(Debug, Clone, Copy)]
pub struct TrailSettings {
    pub seal_every_records: u64,
    pub seal_interval_seconds: u64,
    pub max_file_bytes: u64,
}

impl Default for TrailSettings {
    fn default() -> Self {
        TrailSettings {
            seal_every_records: 1000,
            seal_interval_seconds: 60,
            max_file_bytes: 64 << 20,
        }
    }
}

/// A running `dcvv-gateway serve`.
pub struct Instance {
    pub name: String,
    pub url: String,
    /// Behind a lock so a test can kill an instance its clients still hold.
    child: Mutex<Child>,
    log: PathBuf,
    apikey: String,
    secret: String,
    http: reqwest::Client,
}

pub use super::http::fresh_id;

/// Now, Unix epoch milliseconds.
pub fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

impl Fleet {
    /// A new PostgreSQL database and the shared config pieces.
    pub async fn new(acquire_timeout_ms: u64) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let store = FleetStore::Postgres {
            database: PG.fresh_database().await,
            password_file: PG.password_file(dir.path()),
        };
        Self::with_store(dir, store, acquire_timeout_ms)
    }

    /// A new SQLite file (`gateway.db` in the fleet's directory) and the shared
    /// config pieces: one instance at a time.
    pub fn sqlite(acquire_timeout_ms: u64) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let store = FleetStore::Sqlite(dir.path().join("gateway.db"));
        Self::with_store(dir, store, acquire_timeout_ms)
    }

    fn with_store(dir: tempfile::TempDir, store: FleetStore, acquire_timeout_ms: u64) -> Fleet {
        let secret = ClientSecret::generate().unwrap().expose().to_owned();
        let secret_file = dir.path().join("cms.secret");
        std::fs::write(&secret_file, &secret).unwrap();
        // Keys exist in the token before any instance opens it.
        let _ = &*KEYS;
        Fleet {
            dir,
            store,
            apikey: "cms".into(),
            secret,
            secret_file,
            acquire_timeout_ms,
            trail: TrailSettings::default(),
        }
    }

    /// The config file of instance `name` (written by `start`).
    pub fn config_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.toml"))
    }

    /// The audit records of instance `name`, in trail order.
    pub fn audit_records(&self, name: &str) -> Vec<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.audit_dir(name))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The audit trail directory of instance `name`.
    pub fn audit_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("audit-{name}"))
    }

    /// The `[store]` section.
    fn store_config(&self) -> String {
        match &self.store {
            FleetStore::Postgres {
                database,
                password_file,
            } => format!(
                "database_url = {url:?}\ndatabase_password_file = {password:?}\nmax_connections = 8\n",
                url = PG.url(database),
                password = password_file.display().to_string(),
            ),
            FleetStore::Sqlite(path) => {
                format!("sqlite_path = {:?}\n", path.display().to_string())
            }
        }
    }

    fn config(&self, name: &str, port: u16) -> PathBuf {
        let text = format!(
            r#"
[hsm]
module = {module:?}
token_label = {token:?}
pin_file = {pin:?}
max_sessions = 4

[server]
listen = "127.0.0.1:{port}"
allow_insecure_http = true
max_in_flight = 128
request_timeout_ms = 20000
shutdown_grace_seconds = 5

[store]
{store}acquire_timeout_ms = {acquire}

[keys]
pan_index = {pan_index:?}

# Each instance writes its own audit trail (one writer per directory).
[audit]
directory = {audit:?}
seal_key = {audit_seal:?}
seal_every_records = {seal_every}
seal_interval_seconds = {seal_interval}
max_file_bytes = {max_file_bytes}

[[programmes]]
name = "test"
bin_prefixes = ["412345"]
cvk = {cvk:?}
imk_dcvv = {imk_dcvv:?}
imk_tdcvv2 = {imk_tdcvv2:?}
window_seconds = 300
past_windows = 1
future_windows = 0
single_use = true
failure_limit = 5

[[clients]]
apikey = {apikey:?}
secrets = [{{ file = {secret:?} }}]
scopes = ["dynamic_values", "enrollment", "cvv2_verification", "security_codes", "dcvv_verification", "keys"]
programmes = ["*"]
"#,
            module = module().display().to_string(),
            token = TOKEN.label,
            pin = TOKEN.pin_file.display().to_string(),
            store = self.store_config(),
            acquire = self.acquire_timeout_ms,
            pan_index = KEYS.pan_index.to_string(),
            audit = self.audit_dir(name).display().to_string(),
            audit_seal = KEYS.audit_seal.to_string(),
            seal_every = self.trail.seal_every_records,
            seal_interval = self.trail.seal_interval_seconds,
            max_file_bytes = self.trail.max_file_bytes,
            cvk = KEYS.cvk.to_string(),
            imk_dcvv = KEYS.imk_dcvv.to_string(),
            imk_tdcvv2 = KEYS.imk_tdcvv2.to_string(),
            apikey = self.apikey,
            secret = self.secret_file.display().to_string(),
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts `dcvv-gateway serve` and waits until `/readyz` answers 200.
    pub async fn start(&self, name: &str) -> Instance {
        let port = free_port();
        let config = self.config(name, port);
        let log = self.dir.path().join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_dcvv-gateway"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let instance = Instance {
            name: name.into(),
            url: format!("http://127.0.0.1:{port}"),
            child: Mutex::new(child),
            log,
            apikey: self.apikey.clone(),
            secret: self.secret.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let exited = instance.child.lock().unwrap().try_wait();
            if let Ok(Some(status)) = exited {
                panic!(
                    "{name} exited ({status}) before it was ready:\n{}",
                    instance.log_text()
                );
            }
            if instance.readyz().await.0 == 200 {
                return instance;
            }
            assert!(
                Instant::now() < deadline,
                "{name} not ready within 60 s:\n{}",
                instance.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first column of `sql`'s rows, as text, read straight from the
    /// store (SQLite read-only, beside a running gateway).
    pub async fn strings(&self, sql: &str) -> Vec<String> {
        match &self.store {
            FleetStore::Postgres { .. } => sqlx::query_scalar(sql)
                .fetch_all(&mut self.db().await)
                .await
                .unwrap(),
            FleetStore::Sqlite(path) => {
                let url = format!("sqlite://{}?mode=ro", path.display());
                let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
                    .await
                    .unwrap();
                sqlx::query_scalar(sql).fetch_all(&mut conn).await.unwrap()
            }
        }
    }

    /// A raw connection to the fleet's PostgreSQL database.
    pub async fn db(&self) -> sqlx::PgConnection {
        match &self.store {
            FleetStore::Postgres { database, .. } => PG.connect(database).await,
            FleetStore::Sqlite(_) => panic!("this fleet's store is a SQLite file"),
        }
    }
}

impl Instance {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /readyz`: status and body (status 0 when nothing answers).
    pub async fn readyz(&self) -> (u16, Value) {
        match self.http.get(format!("{}{READYZ}", self.url)).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let bytes = response.bytes().await.unwrap_or_default();
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                (status, body)
            }
            Err(_) => (0, Value::Null),
        }
    }

    /// The signature headers of a request with this id, signed now.
    pub fn headers(
        &self,
        id: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Vec<(String, String)> {
        let client = TestClient {
            apikey: self.apikey.clone(),
            secret: self.secret.clone(),
        };
        signed_headers(&client, id, now_ms(), method, path, body)
    }

    /// Sends exactly these headers and body.
    pub async fn send(&self, path: &str, headers: &[(String, String)], body: Vec<u8>) -> Answer {
        self.try_send(path, headers, body).await.unwrap()
    }

    /// As [`Instance::send`], with the transport error when no whole answer
    /// came back (the process was killed, say).
    pub async fn try_send(
        &self,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<Answer, reqwest::Error> {
        let mut request = self.http.post(format!("{}{path}", self.url)).body(body);
        for (k, v) in headers {
            request = request.header(k.as_str(), v.as_str());
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await?.to_vec();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// A signed POST with a fresh request id.
    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        let bytes = serde_json::to_vec(body).unwrap();
        let headers = self.headers(&fresh_id(), "POST", path, &bytes);
        self.send(path, &headers, bytes).await
    }

    /// SIGKILL (`Child::kill` on Unix) and reap (also on drop).
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Luhn check digit of `digits`.
pub fn luhn_digit(digits: &str) -> char {
    let sum: u32 = digits
        .chars()
        .rev()
        .enumerate()
        .map(|(i, c)| {
            let d = c.to_digit(10).unwrap();
            if i % 2 == 0 {
                let d = d * 2;
                if d > 9 { d - 9 } else { d }
            } else {
                d
            }
        })
        .sum();
    char::from_digit((10 - sum % 10) % 10, 10).unwrap()
}

/// A Luhn-valid 16-digit PAN in BIN 412345 whose last four digits are `n`
/// (below 10000), so masked PANs tell cards apart in the database. The 12th
/// digit is chosen to make the last one the Luhn check digit.
pub fn pan(n: u32) -> String {
    assert!(n < 10_000);
    let last4 = format!("{n:04}");
    (0..10)
        .map(|y| format!("41234500000{y}{}", &last4[..3]))
        .find(|body| luhn_digit(body).to_digit(10) == last4[3..].parse().ok())
        .map(|body| format!("{body}{}", &last4[3..]))
        .unwrap()
}
