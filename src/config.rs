//! Configuration: embedded defaults, then the TOML file named by `--config`, then
//! environment variables `DCVV_GATEWAY__SECTION__KEY` (e.g.
//! `DCVV_GATEWAY__HSM__TOKEN_LABEL`). Unknown keys are errors; values are parsed
//! into real types at load, so a bad file fails at start and names the field.
//!
//! Secrets never live here: the HSM PIN is read from the environment variable
//! or file the config names, by the HSM layer, when it logs in.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::audit::AuditSettings;
use crate::domain::Tdcvv2Profile;
use crate::domain::programme::{Programme, Programmes};
use crate::domain::rotation::{self, PreviousKey};
use crate::domain::service::{ProgrammeAccess, ServiceSettings};
use crate::hsm::{HsmSettings, KeyLabel, PinSource};
use crate::http::clients::{ClientSettings, Organization, OrganizationAccess, Scope, SecretSource};
use crate::http::settings::{ServerSettings, Transport};
use crate::store::{DatabaseUrl, PostgresLocation, StoreSettings};
use crate::telemetry::LogSettings;

const DEFAULTS: &str = r#"
[hsm]
max_sessions = 4
checkout_timeout_ms = 2000

[server]
listen = "127.0.0.1:8443"
allow_insecure_http = false
request_timeout_ms = 10000
body_limit_bytes = 16384
max_in_flight = 32
shutdown_grace_seconds = 30
header_read_timeout_ms = 5000
keep_alive_timeout_ms = 75000
body_read_timeout_ms = 5000
max_connections = 512
max_connections_per_peer = 64

[signatures]
max_skew_seconds = 300
replay_window_seconds = 900

[store]
acquire_timeout_ms = 2000
max_connections = 10
cleanup_interval_seconds = 60

[keys]
pan_index = "pan-index-v1"

[audit]
directory = "audit"
seal_key = "audit-seal-v1"
seal_every_records = 1000
seal_interval_seconds = 60
max_file_bytes = 67108864

[log]
format = "text"
"#;

/// The built-in defaults of every section as TOML, for `dcvv-gateway config
/// defaults`: the embedded `DEFAULTS`, the SQLite file of a store that names no
/// database, the runtime workers computed from the cores (a comment: the number
/// depends on the machine), and the serde defaults of each `[[programmes]]` table.
/// A key it does not name has no default.
#[must_use]
pub fn defaults_toml() -> String {
    let mut text = String::new();
    for line in DEFAULTS.trim().lines() {
        text.push_str(line);
        text.push('\n');
        match line {
            "[server]" => text.push_str(&format!(
                "# worker_threads: unset, half the cores, at least 1 (on this machine: {})\n",
                default_worker_threads()
            )),
            "[store]" => text.push_str(&format!(
                "# when neither database_url nor database_url_env is set\n\
                 sqlite_path = \"{DEFAULT_SQLITE_PATH}\"\n"
            )),
            _ => {}
        }
    }
    text.push_str(&format!(
        "\n# Each [[programmes]] table ([[programmes.previous]] tables: none unless given).\n\
         [[programmes]]\n\
         past_windows = {}\n\
         future_windows = {}\n\
         single_use = {}\n\
         failure_limit = {}\n\
         failure_period_seconds = {}\n",
        default_past(),
        u32::default(),
        default_true(),
        default_failure_limit(),
        default_failure_period(),
    ));
    text
}

/// A configuration that could not be loaded; the message names the file or field.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

fn err(text: impl Into<String>) -> ConfigError {
    ConfigError(text.into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hsm: RawHsm,
    server: RawServer,
    signatures: RawSignatures,
    store: RawStore,
    keys: RawKeys,
    audit: RawAudit,
    log: RawLog,
    #[serde(default)]
    programmes: Vec<RawProgramme>,
    #[serde(default)]
    clients: Vec<RawClient>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    module: PathBuf,
    token_label: String,
    pin_env: Option<String>,
    pin_file: Option<PathBuf>,
    max_sessions: usize,
    checkout_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: SocketAddr,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    allow_insecure_http: bool,
    request_timeout_ms: u64,
    body_limit_bytes: usize,
    max_in_flight: usize,
    shutdown_grace_seconds: u64,
    header_read_timeout_ms: u64,
    keep_alive_timeout_ms: u64,
    body_read_timeout_ms: u64,
    max_connections: usize,
    max_connections_per_peer: usize,
    worker_threads: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignatures {
    max_skew_seconds: u32,
    replay_window_seconds: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    sqlite_path: Option<PathBuf>,
    database_url: Option<String>,
    database_url_env: Option<String>,
    database_password_file: Option<PathBuf>,
    max_connections: u32,
    acquire_timeout_ms: u64,
    cleanup_interval_seconds: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    directory: PathBuf,
    seal_key: String,
    seal_every_records: u64,
    seal_interval_seconds: u64,
    max_file_bytes: u64,
}

/// `[log]`: the format is checked by name, so a typo names the field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    pan_index: String,
}

fn default_past() -> u32 {
    1
}
fn default_failure_limit() -> u32 {
    5
}
fn default_failure_period() -> u32 {
    86_400
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProgramme {
    name: String,
    bin_prefixes: Vec<String>,
    key_association: Option<String>,
    cvk: String,
    imk_dcvv: String,
    imk_tdcvv2: String,
    /// IMK of EMV cryptograms (ARQC / ARPC); without it the programme's ARQCs are not checked.
    #[serde(default)]
    imk_ac: Option<String>,
    /// IMK of Mastercard CVC3; without it the programme's CVC3s are not checked.
    #[serde(default)]
    imk_cvc3: Option<String>,
    window_seconds: u32,
    #[serde(default = "default_past")]
    past_windows: u32,
    #[serde(default)]
    future_windows: u32,
    #[serde(default = "default_true")]
    single_use: bool,
    /// 0 switches the limit off.
    #[serde(default = "default_failure_limit")]
    failure_limit: u32,
    #[serde(default = "default_failure_period")]
    failure_period_seconds: u32,
    /// Previous key versions in their grace period (key rotation).
    #[serde(default)]
    previous: Vec<RawPrevious>,
}

/// One `[[programmes.previous]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrevious {
    kind: String,
    label: String,
    /// RFC 3339 instant (a TOML datetime or a string), exclusive.
    accept_until: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    apikey: String,
    secrets: Vec<SecretSource>,
    scopes: Vec<Scope>,
    /// Programme names, or `["*"]` for all.
    programmes: Vec<String>,
    /// Organisation numbers it may name (absent: any).
    #[serde(default)]
    organizations: Option<Vec<String>>,
}

/// Everything the gateway needs to start, each layer's part in its own type.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The HSM layer.
    pub hsm: HsmSettings,
    /// The HTTP server.
    pub server: ServerSettings,
    /// The store.
    pub store: StoreSettings,
    /// The card service.
    pub service: ServiceSettings,
    /// Card programmes.
    pub programmes: Programmes,
    /// API clients (secrets not yet read).
    pub clients: Vec<ClientSettings>,
    /// The audit trail.
    pub audit: AuditSettings,
    /// The log's format.
    pub log: LogSettings,
}

fn relative_to(base: &Path, path: PathBuf) -> PathBuf {
    if path.is_relative() {
        base.join(path)
    } else {
        path
    }
}

fn label(field: &str, text: &str) -> Result<KeyLabel, ConfigError> {
    text.parse()
        .map_err(|_| err(format!("{field}: {text:?} is not a key label")))
}

fn optional_label(field: &str, text: Option<&str>) -> Result<Option<KeyLabel>, ConfigError> {
    text.map(|t| label(field, t)).transpose()
}

impl Settings {
    /// Loads defaults, the file at `path`, then the environment.
    ///
    /// # Errors
    /// `ConfigError` naming the file or the offending field.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        if !path.is_file() {
            return Err(err(format!("no config file at {}", path.display())));
        }
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("DCVV_GATEWAY")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Settings::from_raw(raw, base)
    }

    fn from_raw(raw: RawConfig, base: &Path) -> Result<Settings, ConfigError> {
        let hsm = hsm_settings(raw.hsm, base)?;
        let server = server_settings(raw.server, &raw.signatures, &raw.store, base)?;
        if raw.signatures.replay_window_seconds < 2 * raw.signatures.max_skew_seconds {
            return Err(err(
                "signatures.replay_window_seconds: at least twice max_skew_seconds, \
                 or a request could be replayed after its id is forgotten",
            ));
        }
        let store = store_settings(raw.store, base)?;
        let service = ServiceSettings {
            pan_index_key: label("keys.pan_index", &raw.keys.pan_index)?,
            replay_window_seconds: raw.signatures.replay_window_seconds,
        };
        let audit = audit_settings(raw.audit, base)?;
        let log = LogSettings {
            format: raw
                .log
                .format
                .parse()
                .map_err(|e| err(format!("log.format: {e}")))?,
        };
        let programmes = raw
            .programmes
            .into_iter()
            .map(programme)
            .collect::<Result<Vec<_>, _>>()?;
        let programmes =
            Programmes::new(programmes).map_err(|e| err(format!("programmes: {e}")))?;
        let names: HashSet<&str> = programmes.iter().map(|p| p.name.as_str()).collect();
        let clients = raw
            .clients
            .into_iter()
            .map(|c| client(c, &names, base))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Settings {
            hsm,
            server,
            store,
            service,
            programmes,
            clients,
            audit,
            log,
        })
    }
}

fn audit_settings(a: RawAudit, base: &Path) -> Result<AuditSettings, ConfigError> {
    if !(1..=1_000_000).contains(&a.seal_every_records) {
        return Err(err("audit.seal_every_records: 1 to 1000000"));
    }
    if !(1..=86_400).contains(&a.seal_interval_seconds) {
        return Err(err("audit.seal_interval_seconds: 1 to 86400"));
    }
    if !(4096..=1 << 40).contains(&a.max_file_bytes) {
        return Err(err("audit.max_file_bytes: 4096 to 2^40"));
    }
    Ok(AuditSettings {
        directory: relative_to(base, a.directory),
        seal_key: label("audit.seal_key", &a.seal_key)?,
        seal_every_records: a.seal_every_records,
        seal_interval: Duration::from_secs(a.seal_interval_seconds),
        max_file_bytes: a.max_file_bytes,
    })
}

fn hsm_settings(h: RawHsm, base: &Path) -> Result<HsmSettings, ConfigError> {
    let pin = match (h.pin_env, h.pin_file) {
        (Some(var), None) if !var.is_empty() => PinSource::Env(var),
        (None, Some(file)) => PinSource::File(relative_to(base, file)),
        _ => {
            return Err(err(
                "hsm: set exactly one of pin_env (an environment variable name) or pin_file",
            ));
        }
    };
    if h.token_label.is_empty() || h.token_label.len() > 32 {
        return Err(err("hsm.token_label: 1 to 32 characters"));
    }
    if !(1..=256).contains(&h.max_sessions) {
        return Err(err("hsm.max_sessions: 1 to 256"));
    }
    if !(1..=60_000).contains(&h.checkout_timeout_ms) {
        return Err(err("hsm.checkout_timeout_ms: 1 to 60000"));
    }
    Ok(HsmSettings {
        module: h.module,
        token_label: h.token_label,
        pin,
        max_sessions: h.max_sessions,
        checkout_timeout: Duration::from_millis(h.checkout_timeout_ms),
    })
}

/// Default SQLite file when the config names no database.
const DEFAULT_SQLITE_PATH: &str = "dcvv-gateway.db";

fn store_settings(s: RawStore, base: &Path) -> Result<StoreSettings, ConfigError> {
    if !(1..=600_000).contains(&s.acquire_timeout_ms) {
        return Err(err("store.acquire_timeout_ms: 1 to 600000"));
    }
    if !(1..=1000).contains(&s.max_connections) {
        return Err(err("store.max_connections: 1 to 1000"));
    }
    let acquire_timeout = Duration::from_millis(s.acquire_timeout_ms);
    let url = match (s.database_url, s.database_url_env) {
        (Some(_), Some(_)) => {
            return Err(err("store: set database_url or database_url_env, not both"));
        }
        (Some(url), None) => {
            if crate::store::url_has_password(&url) {
                return Err(err(
                    "store.database_url: holds a password; put the password in \
                     database_password_file, or the whole URL in the environment \
                     variable named by database_url_env",
                ));
            }
            crate::store::check_url(&url).map_err(|e| err(format!("store.database_url: {e}")))?;
            Some(DatabaseUrl::Value(url))
        }
        (None, Some(name)) if !name.is_empty() => Some(DatabaseUrl::Env(name)),
        (None, Some(_)) => return Err(err("store.database_url_env: a variable name")),
        (None, None) => None,
    };
    match (url, s.sqlite_path) {
        (Some(_), Some(_)) => Err(err(
            "store: set exactly one of sqlite_path (one gateway process) or \
             database_url / database_url_env (PostgreSQL, several instances)",
        )),
        (Some(url), None) => Ok(StoreSettings::postgres(
            PostgresLocation {
                url,
                password_file: s.database_password_file.map(|f| relative_to(base, f)),
            },
            acquire_timeout,
            s.max_connections,
        )),
        (None, path) => {
            if s.database_password_file.is_some() {
                return Err(err(
                    "store.database_password_file: only with database_url or database_url_env",
                ));
            }
            let path = path.unwrap_or_else(|| PathBuf::from(DEFAULT_SQLITE_PATH));
            Ok(StoreSettings::sqlite(
                relative_to(base, path),
                acquire_timeout,
            ))
        }
    }
}

fn server_settings(
    s: RawServer,
    signatures: &RawSignatures,
    store: &RawStore,
    base: &Path,
) -> Result<ServerSettings, ConfigError> {
    let transport = match (s.tls_cert_file, s.tls_key_file, s.allow_insecure_http) {
        (Some(cert), Some(key), false) => Transport::Tls {
            cert: relative_to(base, cert),
            key: relative_to(base, key),
        },
        (None, None, true) => Transport::InsecureHttp,
        (None, None, false) => Transport::Unconfigured,
        (_, _, true) => {
            return Err(err(
                "server: allow_insecure_http = true serves plain HTTP; remove tls_cert_file and \
                 tls_key_file, or set allow_insecure_http = false",
            ));
        }
        _ => {
            return Err(err(
                "server: set tls_cert_file and tls_key_file (HTTPS), or allow_insecure_http = true \
                 for plain HTTP in development",
            ));
        }
    };
    if !(100..=300_000).contains(&s.request_timeout_ms) {
        return Err(err("server.request_timeout_ms: 100 to 300000"));
    }
    if !(1024..=1_048_576).contains(&s.body_limit_bytes) {
        return Err(err("server.body_limit_bytes: 1024 to 1048576"));
    }
    if !(1..=10_000).contains(&s.max_in_flight) {
        return Err(err("server.max_in_flight: 1 to 10000"));
    }
    if !(100..=60_000).contains(&s.header_read_timeout_ms) {
        return Err(err("server.header_read_timeout_ms: 100 to 60000"));
    }
    if !(100..=3_600_000).contains(&s.keep_alive_timeout_ms) {
        return Err(err("server.keep_alive_timeout_ms: 100 to 3600000"));
    }
    if !(100..=60_000).contains(&s.body_read_timeout_ms) {
        return Err(err("server.body_read_timeout_ms: 100 to 60000"));
    }
    if !(1..=1_000_000).contains(&s.max_connections) {
        return Err(err("server.max_connections: 1 to 1000000"));
    }
    if !(1..=s.max_connections).contains(&s.max_connections_per_peer) {
        return Err(err(
            "server.max_connections_per_peer: 1 to server.max_connections",
        ));
    }
    if s.worker_threads.is_some_and(|n| !(1..=1024).contains(&n)) {
        return Err(err("server.worker_threads: 1 to 1024"));
    }
    if !(1..=86_400).contains(&signatures.max_skew_seconds) {
        return Err(err("signatures.max_skew_seconds: 1 to 86400"));
    }
    if !(1..=86_400).contains(&store.cleanup_interval_seconds) {
        return Err(err("store.cleanup_interval_seconds: 1 to 86400"));
    }
    Ok(ServerSettings {
        listen: s.listen,
        transport,
        request_timeout: Duration::from_millis(s.request_timeout_ms),
        body_limit: s.body_limit_bytes,
        max_in_flight: s.max_in_flight,
        shutdown_grace: Duration::from_secs(s.shutdown_grace_seconds),
        max_skew: Duration::from_secs(u64::from(signatures.max_skew_seconds)),
        cleanup_interval: Duration::from_secs(store.cleanup_interval_seconds),
        header_read_timeout: Duration::from_millis(s.header_read_timeout_ms),
        keep_alive_timeout: Duration::from_millis(s.keep_alive_timeout_ms),
        body_read_timeout: Duration::from_millis(s.body_read_timeout_ms),
        max_connections: s.max_connections,
        max_connections_per_peer: s.max_connections_per_peer,
        worker_threads: s.worker_threads.unwrap_or_else(default_worker_threads),
    })
}

/// Half the cores this process may use, at least one.
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

fn programme(p: RawProgramme) -> Result<Programme, ConfigError> {
    let at = |field: &str| format!("programmes.{}.{field}", p.name);
    let profile =
        Tdcvv2Profile::new(p.window_seconds, p.past_windows, p.future_windows).map_err(|e| {
            err(format!(
                "{}: {e}",
                at("window_seconds/past_windows/future_windows")
            ))
        })?;
    if !(60..=31 * 86_400).contains(&p.failure_period_seconds) {
        return Err(err(format!(
            "{}: 60 to 2678400",
            at("failure_period_seconds")
        )));
    }
    if p.name.is_empty() || p.name == "*" {
        return Err(err("programmes.name: a non-empty name other than \"*\""));
    }
    let previous = p
        .previous
        .iter()
        .enumerate()
        .map(|(i, raw)| previous_key(&at(&format!("previous[{i}]")), raw))
        .collect::<Result<Vec<_>, _>>()?;
    let programme = Programme {
        cvk: label(&at("cvk"), &p.cvk)?,
        imk_dcvv: label(&at("imk_dcvv"), &p.imk_dcvv)?,
        imk_tdcvv2: label(&at("imk_tdcvv2"), &p.imk_tdcvv2)?,
        imk_ac: optional_label(&at("imk_ac"), p.imk_ac.as_deref())?,
        imk_cvc3: optional_label(&at("imk_cvc3"), p.imk_cvc3.as_deref())?,
        previous,
        name: p.name.clone(),
        bin_prefixes: p.bin_prefixes,
        key_association: p.key_association,
        profile,
        single_use: p.single_use,
        failure_limit: NonZeroU32::new(p.failure_limit),
        failure_period_seconds: p.failure_period_seconds,
    };
    rotation::validate(&programme.current_keys(), &programme.previous).map_err(|(i, e)| {
        let field = if matches!(
            e,
            rotation::RotationError::KindNotUsed(_) | rotation::RotationError::NoCurrentKey(_)
        ) {
            "kind"
        } else {
            "label"
        };
        err(format!("{}: {e}", at(&format!("previous[{i}].{field}"))))
    })?;
    Ok(programme)
}

/// One previous key version (key rotation): a kind the programme uses, a label,
/// and the RFC 3339 instant its grace period ends (exclusive).
fn previous_key(at: &str, raw: &RawPrevious) -> Result<PreviousKey, ConfigError> {
    let kind = rotation::rotating_kind(&raw.kind).map_err(|e| err(format!("{at}.kind: {e}")))?;
    let label = label(&format!("{at}.label"), &raw.label)?;
    let instant = time::OffsetDateTime::parse(
        &raw.accept_until,
        &time::format_description::well_known::Rfc3339,
    )
    .map_err(|_| {
        err(format!(
            "{at}.accept_until: {:?} is not an RFC 3339 instant (e.g. 2027-03-01T00:00:00Z)",
            raw.accept_until
        ))
    })?;
    let accept_until_ms = u64::try_from(instant.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| err(format!("{at}.accept_until: before 1970")))?;
    Ok(PreviousKey {
        kind,
        label,
        accept_until_ms,
    })
}

fn client(
    c: RawClient,
    programmes: &HashSet<&str>,
    base: &Path,
) -> Result<ClientSettings, ConfigError> {
    let at = |field: &str| format!("clients.{}.{field}", c.apikey);
    let valid_id = crate::http::signature::is_valid_apikey(&c.apikey);
    if !valid_id {
        return Err(err("clients.apikey: 1 to 64 printable characters"));
    }
    if !(1..=2).contains(&c.secrets.len()) {
        return Err(err(format!(
            "{}: one or two secret sources (two during a rotation)",
            at("secrets")
        )));
    }
    if c.scopes.is_empty() {
        return Err(err(format!("{}: at least one scope", at("scopes"))));
    }
    let access = if c.programmes.iter().any(|p| p == "*") {
        ProgrammeAccess::All
    } else {
        if let Some(unknown) = c
            .programmes
            .iter()
            .find(|p| !programmes.contains(p.as_str()))
        {
            return Err(err(format!(
                "{}: no programme named {unknown:?}",
                at("programmes")
            )));
        }
        ProgrammeAccess::Only(c.programmes.iter().cloned().collect())
    };
    let organizations = match &c.organizations {
        None => OrganizationAccess::Any,
        Some(list) if list.is_empty() => {
            return Err(err(format!(
                "{}: at least one organisation number (leave the key out for any)",
                at("organizations")
            )));
        }
        Some(list) => OrganizationAccess::Only(
            list.iter()
                .map(|o| {
                    Organization::parse(o).ok_or_else(|| {
                        err(format!(
                            "{}: {o:?} is not 1 to 3 decimal digits",
                            at("organizations")
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(ClientSettings {
        secrets: c
            .secrets
            .into_iter()
            .map(|s| match s {
                SecretSource::File(path) => SecretSource::File(relative_to(base, path)),
                env => env,
            })
            .collect(),
        scopes: c.scopes.into_iter().collect(),
        access,
        organizations,
        apikey: c.apikey,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::KeyKind;
    use crate::http::clients::{Scope, SecretSource};

    fn load(text: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        Settings::load(&path)
    }

    const MINIMAL: &str = r#"
        [hsm]
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "dcvv-dev"
        pin_file = "pin"
        [server]
        allow_insecure_http = true
    "#;

    #[test]
    fn defaults_fill_in_and_relative_pin_files_follow_the_config() {
        let s = load(MINIMAL).unwrap();
        assert_eq!(s.hsm.max_sessions, 4);
        assert_eq!(s.hsm.checkout_timeout, Duration::from_millis(2000));
        assert_eq!(s.server.listen, "127.0.0.1:8443".parse().unwrap());
        let PinSource::File(pin) = s.hsm.pin else {
            panic!("pin file expected")
        };
        assert!(
            pin.is_absolute() && pin.ends_with("pin"),
            "{}",
            pin.display()
        );
    }

    #[test]
    fn unknown_fields_fail_and_name_the_field() {
        let err = load(&MINIMAL.replace("[server]", "slot = 0\n[server]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("slot"), "{err}");
    }

    #[test]
    fn exactly_one_pin_source() {
        let both = MINIMAL.replace("pin_file = \"pin\"", "pin_file = \"pin\"\npin_env = \"X\"");
        assert!(load(&both).unwrap_err().to_string().contains("exactly one"));
        let none = MINIMAL.replace("pin_file = \"pin\"", "");
        assert!(load(&none).unwrap_err().to_string().contains("exactly one"));
    }

    #[test]
    fn the_store_is_sqlite_by_default_and_postgres_by_url() {
        use crate::store::StoreLocation;
        let s = load(MINIMAL).unwrap();
        let StoreLocation::Sqlite(path) = &s.store.location else {
            panic!("SQLite by default")
        };
        assert!(path.is_absolute() && path.ends_with("dcvv-gateway.db"));

        let pg = MINIMAL.replace(
            "[server]",
            "[store]\ndatabase_url = \"postgres://gw@db.example:5432/dcvv?sslmode=require\"\n\
             database_password_file = \"db.pass\"\nmax_connections = 20\n[server]",
        );
        let s = load(&pg).unwrap();
        assert_eq!(s.store.max_connections, 20);
        let StoreLocation::Postgres(location) = &s.store.location else {
            panic!("PostgreSQL expected")
        };
        assert_eq!(
            location.url,
            DatabaseUrl::Value("postgres://gw@db.example:5432/dcvv?sslmode=require".into())
        );
        assert!(location.password_file.as_ref().unwrap().is_absolute());

        let env = MINIMAL.replace(
            "[server]",
            "[store]\ndatabase_url_env = \"DCVV_DATABASE_URL\"\n[server]",
        );
        let StoreLocation::Postgres(location) = load(&env).unwrap().store.location else {
            panic!("PostgreSQL expected")
        };
        assert_eq!(location.url, DatabaseUrl::Env("DCVV_DATABASE_URL".into()));
    }

    #[test]
    fn store_settings_are_refused_by_name() {
        let with =
            |store: &str| MINIMAL.replace("[server]", &format!("[store]\n{store}\n[server]"));
        let both = with("sqlite_path = \"a.db\"\ndatabase_url = \"postgres://gw@db/dcvv\"");
        assert!(load(&both).unwrap_err().to_string().contains("exactly one"));
        let both_urls = with("database_url = \"postgres://gw@db/dcvv\"\ndatabase_url_env = \"X\"");
        assert!(
            load(&both_urls)
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
        let secret = with("database_url = \"postgres://gw:hunter2@db/dcvv\"");
        let text = load(&secret).unwrap_err().to_string();
        assert!(text.contains("database_password_file"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        let secret = with("database_url = \"postgres://gw@db/dcvv?password=hunter2\"");
        assert!(load(&secret).is_err());
        let not_pg = with("database_url = \"mysql://gw@db/dcvv\"");
        assert!(
            load(&not_pg)
                .unwrap_err()
                .to_string()
                .contains("database_url")
        );
        let stray = with("database_password_file = \"db.pass\"");
        assert!(
            load(&stray)
                .unwrap_err()
                .to_string()
                .contains("database_password_file")
        );
        let pool = with("database_url = \"postgres://gw@db/dcvv\"\nmax_connections = 0");
        assert!(
            load(&pool)
                .unwrap_err()
                .to_string()
                .contains("max_connections")
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let bad = MINIMAL.replace("[server]", "[server]\nlisten = \"nowhere\"");
        assert!(load(&bad).is_err());
        let bad = MINIMAL.replace("[server]", "max_sessions = 0\n[server]");
        assert!(load(&bad).unwrap_err().to_string().contains("max_sessions"));
        assert!(Settings::load(Path::new("/nonexistent/gateway.toml")).is_err());
    }

    #[test]
    fn connection_limits_default_and_are_refused_by_name() {
        let s = load(MINIMAL).unwrap();
        assert_eq!(s.server.header_read_timeout, Duration::from_millis(5000));
        assert_eq!(s.server.keep_alive_timeout, Duration::from_millis(75000));
        assert_eq!(s.server.body_read_timeout, Duration::from_millis(5000));
        assert_eq!(s.server.max_connections, 512);
        assert_eq!(s.server.max_connections_per_peer, 64);
        for (line, field) in [
            (
                "header_read_timeout_ms = 0",
                "server.header_read_timeout_ms",
            ),
            ("keep_alive_timeout_ms = 50", "server.keep_alive_timeout_ms"),
            ("body_read_timeout_ms = 99", "server.body_read_timeout_ms"),
            ("max_connections = 0", "server.max_connections"),
            (
                "max_connections_per_peer = 0",
                "server.max_connections_per_peer",
            ),
            (
                "max_connections = 10\nmax_connections_per_peer = 11",
                "server.max_connections_per_peer",
            ),
        ] {
            let bad = MINIMAL.replace("[server]", &format!("[server]\n{line}"));
            let e = load(&bad).unwrap_err().to_string();
            assert!(e.contains(field), "{line}: {e}");
        }
        let typo = MINIMAL.replace("[server]", "[server]\nheader_timeout_ms = 5000");
        let e = load(&typo).unwrap_err().to_string();
        assert!(e.contains("header_timeout_ms"), "{e}");
    }

    #[test]
    fn the_log_is_text_by_default_json_by_choice_and_refused_by_name() {
        use crate::telemetry::LogFormat;
        assert_eq!(load(MINIMAL).unwrap().log.format, LogFormat::Text);
        let json = format!("{MINIMAL}\n[log]\nformat = \"json\"\n");
        assert_eq!(load(&json).unwrap().log.format, LogFormat::Json);
        let bad = format!("{MINIMAL}\n[log]\nformat = \"xml\"\n");
        let e = load(&bad).unwrap_err().to_string();
        assert!(e.contains("log.format") && e.contains("\"xml\""), "{e}");
        assert!(e.contains("\"text\" or \"json\""), "{e}");
        let typo = format!("{MINIMAL}\n[log]\nfromat = \"json\"\n");
        let e = load(&typo).unwrap_err().to_string();
        assert!(e.contains("fromat"), "{e}");
    }

    #[test]
    fn worker_threads_default_to_half_the_cores_and_are_refused_by_name() {
        let s = load(MINIMAL).unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(s.server.worker_threads, (cores / 2).max(1));
        let three = MINIMAL.replace("[server]", "[server]\nworker_threads = 3");
        assert_eq!(load(&three).unwrap().server.worker_threads, 3);
        for line in ["worker_threads = 0", "worker_threads = 1025"] {
            let bad = MINIMAL.replace("[server]", &format!("[server]\n{line}"));
            let e = load(&bad).unwrap_err().to_string();
            assert!(e.contains("server.worker_threads"), "{line}: {e}");
        }
    }

    const FULL: &str = r#"
        [hsm]
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "dcvv-dev"
        pin_env = "PIN"
        [server]
        tls_cert_file = "tls/server.pem"
        tls_key_file = "tls/server.key"
        [[programmes]]
        name = "demo"
        bin_prefixes = ["412345"]
        cvk = "cvk-demo-v1"
        imk_dcvv = "imk-dcvv-demo-v1"
        imk_tdcvv2 = "imk-tdcvv2-demo-v1"
        window_seconds = 300
        [[clients]]
        apikey = "cms"
        secrets = [{ file = "cms.secret" }, { env = "CMS_NEXT_SECRET" }]
        scopes = ["dynamic_values", "keys"]
        programmes = ["demo"]
    "#;

    #[test]
    fn programmes_clients_and_tls_parse_into_real_types() {
        let s = load(FULL).unwrap();
        let Transport::Tls { cert, .. } = &s.server.transport else {
            panic!("TLS expected")
        };
        assert!(cert.is_absolute() && cert.ends_with("tls/server.pem"));
        let demo = s.programmes.iter().next().unwrap();
        assert_eq!(demo.profile.window_seconds(), 300);
        assert_eq!(demo.profile.past_windows(), 1, "G defaults to 1");
        assert_eq!(demo.profile.future_windows(), 0, "F defaults to 0");
        assert!(demo.single_use);
        assert_eq!(demo.failure_limit.map(|n| n.get()), Some(5));
        let client = &s.clients[0];
        assert_eq!(client.secrets.len(), 2);
        assert!(matches!(&client.secrets[0], SecretSource::File(p) if p.is_absolute()));
        assert!(client.scopes.contains(&Scope::Keys));
        assert_eq!(s.service.replay_window_seconds, 900);
        assert!(s.audit.directory.is_absolute() && s.audit.directory.ends_with("audit"));
        assert_eq!(s.audit.seal_key.as_str(), "audit-seal-v1");
        assert_eq!(s.audit.seal_every_records, 1000);
    }

    #[test]
    fn client_organisations_are_any_by_default_and_checked_by_name() {
        assert_eq!(
            load(FULL).unwrap().clients[0].organizations,
            OrganizationAccess::Any
        );
        // FULL ends inside its [[clients]] table.
        let listed = format!("{FULL}\norganizations = [\"1\", \"001\", \"42\"]\n");
        let OrganizationAccess::Only(own) = &load(&listed).unwrap().clients[0].organizations else {
            panic!("a list expected")
        };
        let names: Vec<String> = own.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["001", "042"], "1 and 001 are one organisation");
        for (list, says) in [
            ("[]", "at least one"),
            ("[\"1000\"]", "\"1000\" is not 1 to 3 decimal digits"),
            ("[\"-1\"]", "is not 1 to 3"),
        ] {
            let bad = format!("{FULL}\norganizations = {list}\n");
            let err = load(&bad).unwrap_err().to_string();
            assert!(err.contains("organizations") && err.contains(says), "{err}");
        }
    }

    #[test]
    fn audit_settings_are_checked_by_name() {
        let bad = format!("{FULL}\n[audit]\nseal_every_records = 0\n");
        assert!(
            load(&bad)
                .unwrap_err()
                .to_string()
                .contains("seal_every_records")
        );
        let bad = format!("{FULL}\n[audit]\nmax_file_bytes = 10\n");
        assert!(
            load(&bad)
                .unwrap_err()
                .to_string()
                .contains("max_file_bytes")
        );
        let bad = format!("{FULL}\n[audit]\nseal_key = \"no spaces allowed\"\n");
        assert!(
            load(&bad)
                .unwrap_err()
                .to_string()
                .contains("audit.seal_key")
        );
        let ok = format!("{FULL}\n[audit]\ndirectory = \"/var/log/dcvv\"\n");
        assert_eq!(
            load(&ok).unwrap().audit.directory,
            Path::new("/var/log/dcvv")
        );
    }

    #[test]
    fn insecure_or_inconsistent_settings_are_refused_by_name() {
        let both = FULL.replace("[server]", "[server]\nallow_insecure_http = true");
        assert!(
            load(&both)
                .unwrap_err()
                .to_string()
                .contains("allow_insecure_http")
        );
        let half = FULL.replace("tls_key_file = \"tls/server.key\"", "");
        assert!(
            load(&half)
                .unwrap_err()
                .to_string()
                .contains("tls_cert_file")
        );
        let unknown = FULL.replace("programmes = [\"demo\"]", "programmes = [\"gold\"]");
        assert!(load(&unknown).unwrap_err().to_string().contains("gold"));
        let scope = FULL.replace("\"keys\"]", "\"everything\"]");
        assert!(load(&scope).is_err());
        let window = FULL.replace("window_seconds = 300", "window_seconds = 30");
        assert!(load(&window).unwrap_err().to_string().contains("window"));
        let three = FULL.replace(
            "{ env = \"CMS_NEXT_SECRET\" }]",
            "{ env = \"A\" }, { env = \"B\" }]",
        );
        assert!(load(&three).unwrap_err().to_string().contains("secrets"));
        let inline = FULL.replace(
            "{ file = \"cms.secret\" }",
            "{ value = \"sssssssssssssssssssssssssssssssss\" }",
        );
        assert!(
            load(&inline).is_err(),
            "a secret cannot be written into the TOML"
        );
        let replay = format!("{FULL}\n[signatures]\nmax_skew_seconds = 600\n");
        assert!(
            load(&replay)
                .unwrap_err()
                .to_string()
                .contains("replay_window_seconds")
        );
        let twice = FULL.replace(
            "bin_prefixes = [\"412345\"]",
            "bin_prefixes = [\"412345\", \"412345\"]",
        );
        assert!(load(&twice).unwrap_err().to_string().contains("412345"));
    }

    const ROTATED: &str = r#"
        [[programmes.previous]]
        kind = "imk-tdcvv2"
        label = "imk-tdcvv2-demo-v1"
        accept_until = 2027-03-01T00:00:00Z
        [[programmes.previous]]
        kind = "cvk"
        label = "cvk-demo-v0"
        accept_until = "2027-03-01T12:30:00.5+01:00"
    "#;

    fn rotated(previous: &str) -> String {
        FULL.replace(
            "imk_tdcvv2 = \"imk-tdcvv2-demo-v1\"",
            "imk_tdcvv2 = \"imk-tdcvv2-demo-v2\"",
        )
        .replace(
            "window_seconds = 300",
            &format!("window_seconds = 300\n{previous}"),
        )
    }

    #[test]
    fn previous_keys_parse_with_their_grace_period() {
        let s = load(&rotated(ROTATED)).unwrap();
        let demo = s.programmes.iter().next().unwrap();
        assert_eq!(demo.imk_tdcvv2.as_str(), "imk-tdcvv2-demo-v2");
        assert_eq!(demo.previous.len(), 2);
        let first = &demo.previous[0];
        assert_eq!(first.kind, KeyKind::ImkTdcvv2);
        assert_eq!(first.label.as_str(), "imk-tdcvv2-demo-v1");
        // 2027-03-01T00:00:00Z, from a TOML datetime.
        assert_eq!(first.accept_until_ms, 1_803_859_200_000);
        // From a string with an offset and a fraction: 11:30:00.5Z.
        assert_eq!(demo.previous[1].kind, KeyKind::Cvk);
        assert_eq!(
            demo.previous[1].accept_until_ms,
            1_803_859_200_000 + (11 * 3600 + 30 * 60) * 1000 + 500
        );
        // Without previous tables nothing rotates.
        assert!(
            load(FULL)
                .unwrap()
                .programmes
                .iter()
                .next()
                .unwrap()
                .previous
                .is_empty()
        );
    }

    #[test]
    fn bad_previous_keys_are_refused_naming_the_field() {
        let refused = |previous: &str| {
            let e = load(&rotated(previous)).unwrap_err().to_string();
            assert!(!e.contains('\n'), "one line: {e}");
            e
        };
        let same = refused(
            "[[programmes.previous]]\nkind = \"imk-tdcvv2\"\nlabel = \"imk-tdcvv2-demo-v2\"\naccept_until = 2027-03-01T00:00:00Z",
        );
        assert!(same.contains("programmes.demo.previous[0].label"), "{same}");
        assert!(same.contains("current"), "{same}");
        let kind = refused(
            "[[programmes.previous]]\nkind = \"pan-index\"\nlabel = \"pan-index-v0\"\naccept_until = 2027-03-01T00:00:00Z",
        );
        assert!(kind.contains("programmes.demo.previous[0].kind"), "{kind}");
        assert!(kind.contains("pan-index"), "{kind}");
        let time = refused(
            "[[programmes.previous]]\nkind = \"cvk\"\nlabel = \"cvk-demo-v0\"\naccept_until = \"next tuesday\"",
        );
        assert!(
            time.contains("programmes.demo.previous[0].accept_until"),
            "{time}"
        );
        assert!(time.contains("RFC 3339"), "{time}");
        let date_only = refused(
            "[[programmes.previous]]\nkind = \"cvk\"\nlabel = \"cvk-demo-v0\"\naccept_until = 2027-03-01",
        );
        assert!(date_only.contains("accept_until"), "{date_only}");
        let label = refused(
            "[[programmes.previous]]\nkind = \"cvk\"\nlabel = \"cvk demo\"\naccept_until = 2027-03-01T00:00:00Z",
        );
        assert!(
            label.contains("programmes.demo.previous[0].label"),
            "{label}"
        );
        let twice = refused(&format!(
            "{ROTATED}\n[[programmes.previous]]\nkind = \"cvk\"\nlabel = \"cvk-demo-v0\"\naccept_until = 2027-04-01T00:00:00Z"
        ));
        assert!(
            twice.contains("programmes.demo.previous[2].label"),
            "{twice}"
        );
        let unknown = refused(
            "[[programmes.previous]]\nkind = \"cvk\"\nlabel = \"cvk-demo-v0\"\naccept_until = 2027-03-01T00:00:00Z\nversion = 1",
        );
        assert!(unknown.contains("version"), "{unknown}");
        let missing = refused("[[programmes.previous]]\nkind = \"cvk\"\nlabel = \"cvk-demo-v0\"");
        assert!(missing.contains("accept_until"), "{missing}");
    }
}
