//! Unsigned operational routes: liveness, readiness (token session, login,
//! every configured key present and within policy, store writable, audit trail
//! writable) and the Prometheus exposition.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

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
    let checks = state.service().readiness(&state.live().programmes).await;
    let audit = match state.trail().down_reason() {
        None => "ok".to_owned(),
        Some(reason) => format!("down: {reason}"),
    };
    let ready = checks.ready() && audit == "ok";
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Readiness {
            status: if ready { "ready" } else { "unavailable" },
            hsm: checks.hsm,
            keys: checks.keys,
            store: checks.store,
            audit,
        }),
    )
}

/// Prometheus text exposition.
#[utoipa::path(get, path = Route::METRICS.path, tag = "operations", responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let hsm = state.service().hsm_status();
    state
        .metrics()
        .sessions(hsm.sessions_in_use, hsm.sessions_max);
    state.metrics().token(hsm.state, hsm.recovery);
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
