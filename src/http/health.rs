//! Unsigned operational routes: liveness, readiness (token session, login,
//! every configured key present and within policy, store writable, audit trail
//! writable) and the Prometheus exposition.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::DomainError;
use crate::hsm::{self, TokenState};

use super::AppState;
use super::routes::Route;

/// Liveness.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: &'static str,
}

/// Readiness and what each check found.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    pub status: &'static str,
    /// Token: `ok`, or why not: `missing`, `pin_refused`, `pin_locked`,
    /// `pin_unavailable`, `unavailable`.
    pub hsm: &'static str,
    /// Keys: `ok`, or why not.
    pub keys: &'static str,
    /// Store: `ok`, or why not.
    pub store: &'static str,
    /// Audit trail: `ok`, or `down: <why>` (requests get 503 `audit_unavailable`).
    pub audit: String,
}

/// The process answers.
#[utoipa::path(get, path = Route::HEALTHZ.path, tag = "operations", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Ready to serve: the token answers with the user logged in, every key the
/// programmes use is present and within policy, and the store can be written.
#[utoipa::path(
    get, path = Route::READYZ.path, tag = "operations",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness))
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let token = Arc::clone(state.token());
    // A real token call while ready; while down, the recovery step if due.
    let hsm = match hsm::blocking(move || Ok(token.maintain())).await {
        Ok(TokenState::Ready) => "ok",
        Ok(down) => {
            tracing::warn!(state = %down, "readiness: token unavailable");
            down.as_str()
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness: token probe failed");
            "unavailable"
        }
    };
    let keys = if hsm == "ok" {
        match state.service().check_keys().await {
            Ok(()) => "ok",
            Err(DomainError::Unavailable(..) | DomainError::Internal(..)) => "unavailable",
            Err(e) => {
                tracing::warn!(error = %e, "readiness: a configured key is missing or refused");
                "missing_or_refused"
            }
        }
    } else {
        "unknown"
    };
    let now = state.clock().now_ms() / 1000;
    let store = match state
        .service()
        .store()
        .probe(i64::try_from(now).unwrap_or(i64::MAX))
        .await
    {
        Ok(()) => "ok",
        Err(e) => {
            tracing::warn!(error = %e, "readiness: store probe failed");
            "unavailable"
        }
    };
    let audit = match state.trail().down_reason() {
        None => "ok".to_owned(),
        Some(reason) => format!("down: {reason}"),
    };
    let ready = hsm == "ok" && keys == "ok" && store == "ok" && audit == "ok";
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Readiness {
            status: if ready { "ready" } else { "unavailable" },
            hsm,
            keys,
            store,
            audit,
        }),
    )
}

/// Prometheus text exposition.
#[utoipa::path(get, path = Route::METRICS.path, tag = "operations", responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let (in_use, max) = state.token().session_usage();
    state.metrics().sessions(in_use, max);
    state
        .metrics()
        .token(state.token().state(), state.token().recovery_counts());
    match state.metrics().encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
