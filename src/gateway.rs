//! Start-up and shutdown, at the top of the house: open the token, refuse a
//! token that lacks a mechanism the configured keys need ([`mechanism_needs`],
//! which `hsm check` reports too), refuse a key wider than its policy, load the
//! clients' secrets, open and migrate the store, build the card service, check every configured key, open the audit
//! trail; then serve ([`crate::http::server`]) with the token watchdog and
//! the store cleanup beside it until the shutdown signal; then drain, close
//! the trail and the store, and finalize the token. The library's [`run`] and
//! the `serve` command ([`run_blocking`]) both go through here; tests build a
//! [`Gateway`] on a token of their own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::audit::{AuditError, AuditObserver, Sealer, TokenSealer, Trail};
use crate::config::Settings;
use crate::domain::DomainError;
use crate::domain::service::{CardService, Clock, ServiceParts, SystemClock};
use crate::hsm::{self, HsmError, KeyListing, KeyUse, Lack, Needs, Token};
use crate::http::clients::{ClientError, Clients};
use crate::http::metrics::Metrics;
use crate::http::server::{Front, ServeError};
use crate::http::{self, AppState, Live};
use crate::store::{Store, StoreError};

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The token could not be opened.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The token lacks a mechanism, or a mechanism's flag, that the configured
    /// keys need to serve (issue 11, item 4): one `token lacks ...` per lack.
    #[error("refusing to start: {}", lacks(.0))]
    TokenLacks(Vec<Lack>),
    /// A key in the token is wider than its kind allows (DESIGN 3).
    #[error("refusing to start: key(s) wider than their policy: {}", wide_keys(.0))]
    WideKeys(Vec<KeyListing>),
    /// A configured key is missing or refused.
    #[error("refusing to start: a configured key is unusable: {0}")]
    Keys(DomainError),
    /// A client secret could not be loaded.
    #[error(transparent)]
    Clients(#[from] ClientError),
    /// The config names no client or no programme.
    #[error("refusing to start: {0}")]
    Incomplete(&'static str),
    /// The store could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit trail could not be opened (lock, directory, seal key).
    #[error("refusing to start: {0}")]
    Audit(#[from] AuditError),
    /// Serving failed: no transport configured, the certificate or key, the socket.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Binding the address, or starting the runtime, failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Why a reload was refused; the configuration that serves is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not parse or a value is refused.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A client secret could not be loaded.
    #[error(transparent)]
    Clients(#[from] ClientError),
    /// The new file names no client or no programme.
    #[error("{0}")]
    Incomplete(&'static str),
    /// The new file changes how the server speaks TLS, which needs a restart.
    #[error(
        "[server] TLS settings (tls_cert_file, tls_key_file, client_ca_file, allow_insecure_http) changed; they apply at the next restart"
    )]
    TransportChanged,
    /// The token lacks a mechanism a new key needs.
    #[error("{}", lacks(.0))]
    TokenLacks(Vec<Lack>),
    /// A key the new programmes name is missing, of another kind or wider
    /// than its policy.
    #[error("a configured key is unusable: {0}")]
    Keys(DomainError),
    /// The token could not be asked.
    #[error(transparent)]
    Hsm(#[from] HsmError),
}

/// What a reload applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// Clients now configured.
    pub clients: usize,
    /// Programmes now configured.
    pub programmes: usize,
}

/// Re-reads `[[clients]]` and `[[programmes]]` from the configuration file
/// at `path` and, only when the whole new configuration is good (it parses,
/// every secret loads, the token has the mechanisms and keys the programmes
/// name, TLS is as running), puts them in place for the requests that begin
/// from then on; requests already running finish under theirs. Other
/// sections are not re-read: they apply at the next restart.
///
/// # Errors
/// Any [`ReloadError`]; then nothing changed.
pub async fn reload(
    state: &AppState,
    token: &Arc<Token>,
    path: &std::path::Path,
) -> Result<Reloaded, ReloadError> {
    let settings = Settings::load(path)?;
    if settings.clients.is_empty() {
        return Err(ReloadError::Incomplete("the config names no [[clients]]"));
    }
    if settings.programmes.iter().next().is_none() {
        return Err(ReloadError::Incomplete(
            "the config names no [[programmes]]",
        ));
    }
    if settings.server.transport != state.settings().transport {
        return Err(ReloadError::TransportChanged);
    }
    let clients = Clients::load(&settings.clients)?;
    let (checked, needs) = (Arc::clone(token), mechanism_needs(&settings));
    let lacking = hsm::blocking(move || {
        Ok(check_mechanisms(&checked, &needs)?
            .into_iter()
            .filter(Lack::stops_serving)
            .collect::<Vec<_>>())
    })
    .await?;
    if !lacking.is_empty() {
        return Err(ReloadError::TokenLacks(lacking));
    }
    state
        .service()
        .check_keys(&settings.programmes)
        .await
        .map_err(ReloadError::Keys)?;
    log_ended_grace_periods(&settings, state.clock().now_ms());
    let reloaded = Reloaded {
        clients: clients.len(),
        programmes: settings.programmes.iter().count(),
    };
    state.replace_live(Live {
        clients,
        programmes: settings.programmes,
    });
    Ok(reloaded)
}

/// Reloads on every SIGHUP (Unix) until the task is aborted; logs and counts
/// each outcome.
async fn reload_on_hangup(state: AppState, token: Arc<Token>, path: std::path::PathBuf) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload needs a restart");
            return;
        };
        while hangups.recv().await.is_some() {
            match reload(&state, &token, &path).await {
                Ok(done) => {
                    state.metrics().reload(true);
                    tracing::info!(
                        clients = done.clients,
                        programmes = done.programmes,
                        config = %path.display(),
                        "configuration reloaded: [[clients]] and [[programmes]] replaced for new requests"
                    );
                }
                Err(e) => {
                    state.metrics().reload(false);
                    tracing::error!(
                        error = %e,
                        config = %path.display(),
                        "configuration reload refused; the previous configuration keeps serving"
                    );
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (state, token, path);
    }
}

/// An assembled gateway, ready to serve.
#[derive(Debug)]
pub struct Gateway {
    state: AppState,
    front: Front,
    cleanup_interval: Duration,
    token: Arc<Token>,
}

impl Gateway {
    /// Reads the TLS files, loads clients' secrets, opens and migrates the
    /// store, builds the service and checks that every configured key is
    /// present and within policy.
    ///
    /// # Errors
    /// `Serve` (no transport, or a TLS file unusable), `Clients`, `Store`,
    /// `Keys`, `Incomplete`.
    pub async fn build(
        settings: &Settings,
        token: Arc<Token>,
        clock: Arc<dyn Clock>,
    ) -> Result<Gateway, StartError> {
        if settings.clients.is_empty() {
            return Err(StartError::Incomplete("the config names no [[clients]]"));
        }
        if settings.programmes.iter().next().is_none() {
            return Err(StartError::Incomplete("the config names no [[programmes]]"));
        }
        let front = Front::load(&settings.server.transport)?;
        log_ended_grace_periods(settings, clock.now_ms());
        let clients = Clients::load(&settings.clients)?;
        let store = Store::open(&settings.store).await?;
        let metrics = Arc::new(Metrics::new());
        let trail = open_trail(settings, &token, &metrics).await?;
        let service = CardService::new(
            Arc::clone(&token),
            ServiceParts {
                store,
                settings: settings.service.clone(),
                clock,
                observer: Arc::clone(&metrics) as Arc<dyn crate::domain::service::HsmObserver>,
                journal: Arc::new(trail.clone()),
            },
        );
        service
            .check_keys(&settings.programmes)
            .await
            .map_err(StartError::Keys)?;
        Ok(Gateway {
            state: AppState::new(
                service,
                Live {
                    clients,
                    programmes: settings.programmes.clone(),
                },
                metrics,
                settings.server.clone(),
                trail,
            ),
            front,
            cleanup_interval: settings.server.cleanup_interval,
            token,
        })
    }

    /// The handlers' state (tests drive `app(state)` directly).
    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves on `listener` until `shutdown` completes, drains in-flight
    /// requests within the configured grace, then closes the trail and the
    /// store.
    ///
    /// # Errors
    /// `Serve`: the socket.
    pub async fn serve(
        self,
        listener: std::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let cleaner = tokio::spawn(cleanup(self.state.clone(), self.cleanup_interval));
        let watchdog = tokio::spawn(watch_token(Arc::clone(&self.token)));
        let served = http::server::serve(self.state.clone(), self.front, listener, shutdown).await;
        cleaner.abort();
        watchdog.abort();
        self.state.trail().close().await;
        self.state.service().store().close().await;
        tracing::info!("drained, stopping");
        Ok(served?)
    }
}

/// Opens the token, assembles the gateway and serves on `listener` until
/// `shutdown` completes, then drains and finalizes the token (or leaves that
/// to its last holder, a token call still finishing on the blocking pool).
///
/// # Errors
/// Any [`StartError`].
pub async fn run(
    settings: Settings,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let hsm_settings = settings.hsm.clone();
    let token = Arc::new(hsm::blocking(move || Token::open(&hsm_settings)).await?);
    let (checked, needs) = (Arc::clone(&token), mechanism_needs(&settings));
    hsm::blocking(move || Ok(refuse_lacking_token(&checked, &needs))).await??;
    refuse_wide_keys(&token)?;
    let gateway = Gateway::build(&settings, Arc::clone(&token), Arc::new(SystemClock)).await?;
    let served = gateway.serve(listener, shutdown).await;
    if let Ok(token) = Arc::try_unwrap(token) {
        hsm::blocking(move || token.finalize()).await?;
    }
    served
}

/// The `serve` command: opens the token, starts the runtime, assembles the
/// gateway, binds the configured address (only once everything is checked)
/// and serves until SIGINT or SIGTERM; finalizes the token after the drain.
///
/// # Errors
/// Any [`StartError`].
pub fn run_blocking(settings: Settings, config: &std::path::Path) -> Result<(), StartError> {
    let token = Arc::new(Token::open(&settings.hsm)?);
    refuse_lacking_token(&token, &mechanism_needs(&settings))?;
    refuse_wide_keys(&token)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.server.worker_threads)
        .enable_all()
        .build()?;
    tracing::info!(
        worker_threads = settings.server.worker_threads,
        "async runtime started"
    );
    let served = runtime.block_on({
        let token = Arc::clone(&token);
        async move {
            let gateway =
                Gateway::build(&settings, Arc::clone(&token), Arc::new(SystemClock)).await?;
            let listener = std::net::TcpListener::bind(settings.server.listen)?;
            let reloader = tokio::spawn(reload_on_hangup(
                gateway.state(),
                token,
                config.to_path_buf(),
            ));
            let served = gateway.serve(listener, shutdown_signal()).await;
            reloader.abort();
            served
        }
    });
    // In-flight blocking token calls finish with the runtime; then the token is ours alone.
    drop(runtime);
    match Arc::try_unwrap(token) {
        Ok(token) => token.finalize()?,
        Err(shared) => tracing::warn!(
            holders = Arc::strong_count(&shared),
            "the token is still shared at exit; not finalized"
        ),
    }
    served
}

/// Key rotation: a previous key whose grace period has already ended is not
/// loaded (not checked in the token, never tried); say so once, at start.
fn log_ended_grace_periods(settings: &Settings, now_ms: u64) {
    for p in settings.programmes.iter() {
        for key in p.previous.iter().filter(|k| !k.accepts_at(now_ms)) {
            tracing::info!(
                programme = %p.name,
                kind = %key.kind,
                label = %key.label,
                "previous key not loaded: its grace period (accept_until) has ended; \
                 remove it from the programme's config"
            );
        }
    }
}

/// Loads the seal key (kind and policy checked) and opens the trail: its
/// directory lock, chain head and writer thread.
async fn open_trail(
    settings: &Settings,
    token: &Arc<Token>,
    metrics: &Arc<Metrics>,
) -> Result<Trail, StartError> {
    let audit = settings.audit.clone();
    let token = Arc::clone(token);
    let observer = Arc::clone(metrics) as Arc<dyn AuditObserver>;
    tokio::task::spawn_blocking(move || {
        let sealer = TokenSealer::new(token, audit.seal_key.clone()).map_err(AuditError::from)?;
        Trail::open(&audit, Arc::new(sealer) as Arc<dyn Sealer>, observer)
    })
    .await
    .map_err(|e| StartError::Io(std::io::Error::other(e)))?
    .map_err(StartError::Audit)
}

/// Deletes expired request ids, used windows and failures now and then.
async fn cleanup(state: AppState, every: std::time::Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        let now = i64::try_from(state.clock().now_ms() / 1000).unwrap_or(i64::MAX);
        match state.service().store().cleanup(now).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "store cleanup"),
            Err(e) => tracing::warn!(error = %e, "store cleanup failed"),
        }
    }
}

/// How often the watchdog checks the token (and, while it is down, whether a
/// re-initialization is due: the backoff of `hsm::FIRST_BACKOFF`..`MAX_BACKOFF`
/// decides how often one actually runs).
const TOKEN_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// DESIGN 7.6: notices a token that went away even without traffic, and brings
/// it back without a restart ([`Token::maintain`]).
async fn watch_token(token: Arc<Token>) {
    let mut ticker = tokio::time::interval(TOKEN_WATCH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let token = Arc::clone(&token);
        // `maintain` logs what it finds; a worker failure only skips a tick.
        let _ = crate::hsm::blocking(move || Ok(token.maintain())).await;
    }
}

/// What the configured keys need of the token: each programme's keys (current
/// and previous), the PAN-index key and the audit seal key, for serving, for
/// `keys generate` of their kinds, and for wrapped key import. The start-up and
/// `hsm check` both check the token against this ([`check_mechanisms`]).
pub fn mechanism_needs(settings: &Settings) -> Needs {
    let mut uses = Vec::new();
    for p in settings.programmes.iter() {
        let used_by = format!("programme {}", p.name);
        for (kind, _) in p.current_keys() {
            uses.push(KeyUse {
                kind,
                used_by: used_by.clone(),
            });
        }
        for prev in &p.previous {
            uses.push(KeyUse {
                kind: prev.kind,
                used_by: used_by.clone(),
            });
        }
    }
    uses.push(KeyUse {
        kind: hsm::KeyKind::PanIndex,
        used_by: "keys.pan_index".into(),
    });
    uses.push(KeyUse {
        kind: hsm::KeyKind::AuditSeal,
        used_by: "audit.seal_key".into(),
    });
    Needs::of(uses)
}

/// Every way the token falls short of `needs` ([`mechanism_needs`]), read from
/// the token (`C_GetMechanismInfo`); empty when it can do everything. The
/// start-up refuses the lacks that [stop serving](Lack::stops_serving); `hsm
/// check` prints them all.
///
/// # Errors
/// The token's error.
pub fn check_mechanisms(token: &Token, needs: &Needs) -> Result<Vec<Lack>, HsmError> {
    Ok(needs.lacks(&token.mechanism_table(&needs.mechanisms())?))
}

/// Issue 11, item 4: the gateway does not start on a token that cannot do what
/// the configured keys need to serve. What only key generation or wrapped key
/// import needs is `hsm check`'s to report.
fn refuse_lacking_token(token: &Token, needs: &Needs) -> Result<(), StartError> {
    let serving: Vec<Lack> = check_mechanisms(token, needs)?
        .into_iter()
        .filter(Lack::stops_serving)
        .collect();
    if serving.is_empty() {
        Ok(())
    } else {
        Err(StartError::TokenLacks(serving))
    }
}

/// `token lacks ...; token lacks ...`
fn lacks(lacks: &[Lack]) -> String {
    lacks
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// DESIGN 3: the gateway does not start while a gateway key in the token is
/// wider than its kind allows.
fn refuse_wide_keys(token: &Token) -> Result<(), StartError> {
    let wide: Vec<KeyListing> = token
        .list_keys()?
        .into_iter()
        .filter(|k| !k.violations.is_empty())
        .collect();
    if wide.is_empty() {
        Ok(())
    } else {
        Err(StartError::WideKeys(wide))
    }
}

/// `label (violation, ...); ...`: labels and attribute names only.
fn wide_keys(keys: &[KeyListing]) -> String {
    keys.iter()
        .map(|k| format!("{} ({})", k.label, k.violations.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::{Mechanism, MechanismFlag, MechanismTable};

    /// Two programmes, one with a previous key version.
    fn settings() -> Settings {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        let programme = |name: &str, prefix: &str, previous: &str| {
            format!(
                "[[programmes]]\nname = {name:?}\nbin_prefixes = [{prefix:?}]\n\
                 cvk = \"cvk-{name}-v1\"\nimk_dcvv = \"imk-dcvv-{name}-v1\"\n\
                 imk_tdcvv2 = \"imk-tdcvv2-{name}-v2\"\nwindow_seconds = 300\n{previous}"
            )
        };
        let text = format!(
            "[hsm]\nmodule = \"/nonexistent/libsofthsm2.so\"\ntoken_label = \"t\"\n\
             pin_file = \"pin\"\n{}{}",
            programme("visa-credit", "4", ""),
            programme(
                "mc-debit",
                "5",
                "[[programmes.previous]]\nkind = \"imk-tdcvv2\"\n\
                 label = \"imk-tdcvv2-mc-debit-v1\"\naccept_until = 2027-03-01T00:00:00Z\n"
            ),
        );
        std::fs::write(&path, text).unwrap();
        Settings::load(&path).unwrap()
    }

    #[test]
    fn every_configured_key_counts_and_each_user_is_named_once() {
        let needs = mechanism_needs(&settings());
        let derive = needs
            .iter()
            .find(|n| n.mechanism == Mechanism::Des3EcbEncryptData)
            .unwrap();
        assert_eq!(
            derive.to_string(),
            "CKM_DES3_ECB_ENCRYPT_DATA (derive), needed by \
             imk-dcvv (programme visa-credit, programme mc-debit), \
             imk-tdcvv2 (programme visa-credit, programme mc-debit)"
        );
        let verify = needs
            .iter()
            .find(|n| n.flag == MechanismFlag::Verify)
            .unwrap();
        assert_eq!(
            verify.to_string(),
            "CKM_SHA256_HMAC (verify), needed by audit-seal (audit.seal_key)"
        );
    }

    #[test]
    fn start_up_refuses_only_what_serving_needs_in_one_message() {
        // A token with DES3 ECB and HMAC but no derivation, no key generation, no RSA.
        let table = MechanismTable::new([
            (Mechanism::Des3Ecb, Some(vec![MechanismFlag::Encrypt])),
            (Mechanism::Des3EcbEncryptData, None),
            (
                Mechanism::Sha256Hmac,
                Some(vec![MechanismFlag::Sign, MechanismFlag::Verify]),
            ),
        ]);
        let all = mechanism_needs(&settings()).lacks(&table);
        assert_eq!(all.len(), 6, "{all:?}");
        let serving: Vec<Lack> = all.into_iter().filter(Lack::stops_serving).collect();
        assert_eq!(
            StartError::TokenLacks(serving).to_string(),
            "refusing to start: token lacks CKM_DES3_ECB_ENCRYPT_DATA (derive), needed by \
             imk-dcvv (programme visa-credit, programme mc-debit), \
             imk-tdcvv2 (programme visa-credit, programme mc-debit)"
        );
    }
}
