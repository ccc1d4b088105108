//! The HTTP front (DESIGN 4–5): the router, one tower stack, the signature
//! layer, handlers, wire types, the error contract, metrics and the OpenAPI
//! document.
//!
//! The stack, outside in: request id (`x-request-id`), trace span, the request
//! log and metrics (`observe`, the one place that logs requests), then — on
//! the signed routes only — a timeout (503), the signature layer ([`auth`])
//! that reads the body under its deadline (408) and size limit (413) and
//! verifies it, and only then load shedding beyond a global in-flight limit
//! sized to the HSM pool (429): an unsigned, badly signed or slow request
//! never holds one of those slots (issue 13). Health, metrics and the OpenAPI
//! document stay outside the limit so they answer under load. Below the
//! router, [`connections`] bounds connections and their header-read time.
//! Between the log and the limit sits the audit layer ([`audit`]): every
//! request but the operational GETs gets its durable audit record before its
//! response leaves, or a 503 `audit_unavailable` instead.

pub mod audit;
pub mod auth;
pub mod cards;
pub mod client_cert;
pub mod clients;
pub mod connections;
pub mod dto;
pub mod error;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod process;
pub mod routes;
pub mod server;
pub mod settings;
pub mod signature;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::Response;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId as ServerRequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use arc_swap::ArcSwap;

use crate::audit::Trail;
use crate::domain::Service;
use crate::domain::programme::Programmes;
use crate::domain::service::Clock;

use clients::Clients;
use error::{ApiError, ErrorCode, ErrorDetail};
use metrics::Metrics;
use routes::Route;
use settings::ServerSettings;

/// The request's id for error bodies and the log: the client's
/// `X-Client-Request-Id` when it is well formed, else the gateway's own.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// The id.
    pub id: String,
}

/// What a reload replaces (issue 12): the clients and the card programmes.
/// A request takes both, whole, when its signature is checked and keeps them
/// to its end, so a reload never changes a request already running.
#[derive(Debug)]
pub struct Live {
    /// The API clients, with their secrets loaded.
    pub clients: Clients,
    /// The card programmes.
    pub programmes: Programmes,
}

#[derive(Debug)]
struct Shared {
    service: Service,
    live: ArcSwap<Live>,
    metrics: Arc<Metrics>,
    settings: ServerSettings,
    trail: Trail,
}

/// Shared state of the handlers.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// State over a built service.
    pub fn new(
        service: Service,
        live: Live,
        metrics: Arc<Metrics>,
        settings: ServerSettings,
        trail: Trail,
    ) -> Self {
        AppState(Arc::new(Shared {
            service,
            live: ArcSwap::from_pointee(live),
            metrics,
            settings,
            trail,
        }))
    }

    /// The audit trail.
    pub fn trail(&self) -> &Trail {
        &self.0.trail
    }

    /// The card service.
    pub fn service(&self) -> &Service {
        &self.0.service
    }

    /// The clients and programmes now (a request keeps the ones it began with).
    pub fn live(&self) -> Arc<Live> {
        self.0.live.load_full()
    }

    /// Replaces the clients and programmes for every request that begins
    /// from now on; requests already running keep theirs.
    pub fn replace_live(&self, live: Live) {
        self.0.live.store(Arc::new(live));
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The metrics, for a part that keeps its own handle (connection admission).
    pub(crate) fn shared_metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.0.metrics)
    }

    /// The server settings.
    pub fn settings(&self) -> &ServerSettings {
        &self.0.settings
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        self.0.service.clock()
    }
}

/// Server request ids: a per-process random prefix and a counter.
#[derive(Clone, Debug)]
struct ServerIds {
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl ServerIds {
    fn new() -> Self {
        let mut bytes = [0u8; 4];
        // A fixed prefix only makes ids less unique across restarts; never fatal.
        let _ = getrandom::fill(&mut bytes);
        ServerIds {
            prefix: format!("gw-{}", hex::encode(bytes)).into(),
            next: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl MakeRequestId for ServerIds {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<ServerRequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n}", self.prefix))
            .ok()
            .map(ServerRequestId::new)
    }
}

/// The router with its whole stack: what tests drive and `serve` runs.
pub fn app(state: AppState) -> Router {
    let signed = Router::new()
        .route(
            Route::DYNAMIC_VALUES.path,
            Route::DYNAMIC_VALUES.to(cards::dynamic_values),
        )
        .route(Route::ENROLLMENT.path, Route::ENROLLMENT.to(cards::enroll))
        .route(
            Route::UNENROLLMENT.path,
            Route::UNENROLLMENT.to(cards::unenroll),
        )
        .route(Route::ENQUIRY.path, Route::ENQUIRY.to(cards::enquiry))
        .route(
            Route::CVV2_VERIFICATION.path,
            Route::CVV2_VERIFICATION.to(cards::verify_cvv2),
        )
        .route(
            Route::SECURITY_CODES.path,
            Route::SECURITY_CODES.to(cards::security_code),
        )
        .route(
            Route::DCVV_VERIFICATION.path,
            Route::DCVV_VERIFICATION.to(cards::verify_dcvv),
        )
        .route(
            Route::CVC3_VERIFICATION.path,
            Route::CVC3_VERIFICATION.to(cards::verify_cvc3),
        )
        .route(
            Route::ARQC_VERIFICATION.path,
            Route::ARQC_VERIFICATION.to(cards::verify_arqc),
        )
        .route(Route::KEYS.path, Route::KEYS.to(cards::keys))
        // Innermost: an in-flight slot is taken only by a request the signature
        // layer has read whole and verified (issue 13).
        .route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overload_or_timeout))
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::new(
                    state.settings().max_in_flight,
                )),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overload_or_timeout))
                .timeout(state.settings().request_timeout),
        );
    let open = Router::new()
        .route(Route::HEALTHZ.path, Route::HEALTHZ.to(health::healthz))
        .route(Route::READYZ.path, Route::READYZ.to(health::readyz))
        .route(Route::METRICS.path, Route::METRICS.to(health::metrics))
        .route(Route::OPENAPI.path, Route::OPENAPI.to(openapi::document));
    Router::new()
        .merge(signed)
        .merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(ServerIds::new()))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(TraceLayer::new_for_http())
                .layer(middleware::from_fn_with_state(state.clone(), observe))
                .layer(middleware::from_fn_with_state(state.clone(), audit::record)),
        )
        .with_state(state)
}

async fn overload_or_timeout(error: tower::BoxError) -> ApiError {
    if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::unavailable("request_timeout")
    } else if error.is::<tower::load_shed::error::Overloaded>() {
        ApiError::overloaded()
    } else {
        ApiError::internal()
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found()
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// Request context, the request log and the metrics: one line per request with
/// method, route, status, error code, client, latency and request id; for a
/// 5xx, also the internal cause. Nothing from the body or the signature headers.
async fn observe(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let client_id = request
        .headers()
        .get(signature::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(signature::RequestId::parse);
    let id = match client_id {
        Some(id) => id.as_str().to_owned(),
        None => request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    };
    request
        .extensions_mut()
        .insert(RequestContext { id: id.clone() });
    let route = Route::label(request.uri().path());
    let method = request.method().clone();
    let api = Route::of(route).is_some_and(|r| r.scope().is_some());
    if api {
        state.metrics().in_flight(1);
    }
    let response = error::with_request_id(&id, next.run(request)).await;
    if api {
        state.metrics().in_flight(-1);
    }
    let elapsed = started.elapsed();
    let status = response.status();
    let code = response.extensions().get::<ErrorCode>().map_or("", |c| c.0);
    state
        .metrics()
        .request(route, method.as_str(), status.as_u16(), code, elapsed);
    let client = response
        .extensions()
        .get::<auth::ClientId>()
        .map_or("-", |c| c.0.as_str());
    // Whole microseconds, so the log shows 1.431 rather than 1.4312140000000002.
    let latency_ms = elapsed.as_micros() as f64 / 1000.0;
    if let Some(ErrorDetail(detail)) = response.extensions().get::<ErrorDetail>() {
        tracing::error!(%method, route, status = status.as_u16(), code, client, latency_ms, request_id = %id, cause = %detail, "request failed");
    } else if status.is_server_error() {
        tracing::warn!(%method, route, status = status.as_u16(), code, client, latency_ms, request_id = %id, "request failed");
    } else if api || method != Method::GET {
        tracing::info!(%method, route, status = status.as_u16(), code, client, latency_ms, request_id = %id, "request");
    } else {
        tracing::debug!(%method, route, status = status.as_u16(), latency_ms, "request");
    }
    response
}
