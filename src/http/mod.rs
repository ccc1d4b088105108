//! The HTTP front. For now: liveness and readiness (DESIGN 4); the signed card
//! API of DESIGN 4–5 is the next milestone and lands here.
//!
//! Handlers never call the token on a runtime worker: readiness probes it
//! through [`crate::hsm::blocking`].

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::config::Settings;
use crate::hsm::{self, Token};

/// Shared state of the handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The logged-in token.
    pub token: Arc<Token>,
}

/// The router: what tests drive and `serve` runs.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let token = Arc::clone(&state.token);
    match hsm::blocking(move || token.probe()).await {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Err(e) => {
            tracing::warn!(error = %e, "readiness probe failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "code": "hsm_unavailable"})),
            )
        }
    }
}

/// Opens the token, binds the configured address and serves until SIGINT/SIGTERM,
/// draining in-flight requests.
///
/// # Errors
/// The token's error at start, or an I/O error binding or serving.
pub fn serve_blocking(settings: Settings) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let token = Arc::new(Token::open(&settings.hsm)?);
    refuse_wide_keys(&token)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served: Result<(), Box<dyn std::error::Error + Send + Sync>> = runtime.block_on({
        let token = Arc::clone(&token);
        async move {
            let listener = tokio::net::TcpListener::bind(settings.server.listen).await?;
            tracing::info!(address = %listener.local_addr()?, "dcvv-gateway listening");
            axum::serve(listener, app(AppState { token }))
                .with_graceful_shutdown(shutdown_signal())
                .await?;
            tracing::info!("drained, stopping");
            Ok(())
        }
    });
    // In-flight blocking token calls finish with the runtime; then the token is ours alone.
    drop(runtime);
    if let Ok(token) = Arc::try_unwrap(token) {
        token.finalize()?;
    }
    served
}

/// DESIGN 3: the gateway does not start while a gateway key in the token is
/// wider than its kind allows.
fn refuse_wide_keys(token: &Token) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let wide: Vec<String> = token
        .list_keys()?
        .into_iter()
        .filter(|k| !k.violations.is_empty())
        .map(|k| format!("{} ({})", k.label, k.violations.join(", ")))
        .collect();
    if wide.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "refusing to start: key(s) wider than their policy: {}",
            wide.join("; ")
        )
        .into())
    }
}

async fn shutdown_signal() {
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
