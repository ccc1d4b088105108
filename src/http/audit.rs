//! The audit layer (issue 4): one record per request that reached the gateway,
//! signed or refused (401, 403, 404, 409, 413, 422, 429, 503 included), made
//! durable before the response leaves. The operational GETs (`/healthz`,
//! `/readyz`, `/metrics`, `/openapi.json`) are not recorded: they change
//! nothing, carry no card data, and must answer while the trail is down.
//!
//! Fail closed: while the trail is known down a request is refused with 503
//! `audit_unavailable` before any handler runs, so nothing changes without a
//! record; if the record of a request that did run cannot be made durable, the
//! client gets the same 503, never the handler's response.
//!
//! Handlers add facts through the [`AuditNote`] extractor: masked PAN,
//! programme, channel, the key used and its KCV, a verification's result. What
//! reaches the record is only those facts and what this layer sees itself
//! (route template, status, error code, client, request id, peer, latency) —
//! never a body, a header value other than a configured apikey, a code value,
//! a secret or a signature.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::audit::RequestFacts;
use crate::audit::record::time_text;
use crate::domain::card::Pan;
use crate::domain::service::{CardContext, KeyUse, Reason};

use super::auth::ClientId;
use super::clients::Organization;
use super::error::{ApiError, ErrorCode};
use super::routes::Route;
use super::{AppState, RequestContext};

/// What a handler knows for the audit record.
#[derive(Debug, Default)]
struct Notes {
    masked_pan: Option<String>,
    programme: Option<String>,
    channel: Option<String>,
    organization: Option<String>,
    action: Option<&'static str>,
    key: Option<(String, String)>,
    result: Option<(bool, &'static str)>,
}

/// The handler's side of the audit record: an extractor that never fails (a
/// handler outside the audit layer writes into a note nobody reads).
#[derive(Debug, Clone, Default)]
pub struct AuditNote(Arc<Mutex<Notes>>);

impl AuditNote {
    fn with(&self, f: impl FnOnce(&mut Notes)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The card's PAN, kept masked only (first 6 and last 4 digits).
    pub fn pan(&self, pan: &Pan) {
        let masked = pan.masked();
        self.with(|n| n.masked_pan = Some(masked));
    }

    /// Card and programme, as the service resolved them.
    pub fn card(&self, card: &CardContext) {
        self.with(|n| {
            n.masked_pan = Some(card.masked_pan.clone());
            n.programme = Some(card.programme.clone());
        });
    }

    /// The organisation a dynamic-values request named.
    pub fn organization(&self, organization: Organization) {
        self.with(|n| n.organization = Some(organization.to_string()));
    }

    /// What a request did when its route alone does not say it
    /// (`unenroll` for dynamic values with `disableDCVV2 = "Y"`).
    pub fn action(&self, action: &'static str) {
        self.with(|n| n.action = Some(action));
    }

    /// The channel letter of a dynamic-values request.
    pub fn channel(&self, letter: &'static str) {
        self.with(|n| n.channel = Some(letter.to_owned()));
    }

    /// The key a result was computed under.
    pub fn key(&self, key: &KeyUse) {
        let entry = (key.label.to_string(), key.kcv.to_string());
        self.with(|n| n.key = Some(entry));
    }

    /// A verification's result.
    pub fn verdict(&self, reason: Reason) {
        let text = match reason {
            Reason::Match => "match",
            Reason::Mismatch => "mismatch",
            Reason::StaticCvv2Disabled => "static_cvv2_disabled",
            Reason::CodeAlreadyUsed => "code_already_used",
            Reason::TooManyFailures => "too_many_failures",
        };
        self.with(|n| n.result = Some((reason.approved(), text)));
    }

    fn take(&self) -> Notes {
        std::mem::take(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AuditNote {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<AuditNote>()
            .cloned()
            .unwrap_or_default())
    }
}

/// The middleware.
pub async fn record(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let operation = Route::label(request.uri().path());
    // The open routes are not recorded (see the module documentation); an
    // unmatched path is.
    if Route::of(operation).is_some_and(|r| !r.audited()) {
        return next.run(request).await;
    }
    let started = Instant::now();
    let time = time_text(state.clock().now_ms());
    let request_id = request
        .extensions()
        .get::<RequestContext>()
        .map(|c| c.id.clone())
        .unwrap_or_default();
    let trail = state.trail().clone();
    if trail.down_reason().is_some() {
        trail.refuse();
        return unavailable();
    }
    let method = request.method().as_str().to_owned();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    // Only an apikey that names a configured client: the header is the
    // caller's text and could hold anything.
    let claimed = request
        .headers()
        .get("apikey")
        .and_then(|v| v.to_str().ok())
        .filter(|k| state.clients().get(k).is_some())
        .map(str::to_owned);
    let note = AuditNote::default();
    request.extensions_mut().insert(note.clone());

    let response = next.run(request).await;

    let status = response.status();
    let authenticated = response.extensions().get::<ClientId>().map(|c| c.0.clone());
    let error_code = response
        .extensions()
        .get::<ErrorCode>()
        .map(|c| c.0.to_owned());
    let notes = note.take();
    let outcome = match (status.as_u16(), notes.result) {
        (200..=299, Some((true, _))) => "approved",
        (200..=299, Some((false, _))) => "declined",
        (200..=299, None) => "ok",
        (400..=499, _) => "refused",
        _ => "failed",
    };
    let (key_label, key_kcv) = notes.key.unzip();
    let facts = RequestFacts {
        time,
        request_id: request_id.clone(),
        client: authenticated.clone().or(claimed),
        authenticated: authenticated.is_some(),
        method,
        operation: operation.to_owned(),
        masked_pan: notes.masked_pan,
        programme: notes.programme,
        channel: notes.channel,
        organization: notes.organization,
        action: notes.action.map(str::to_owned),
        key_label,
        key_kcv,
        outcome: outcome.to_owned(),
        reason: notes.result.map(|(_, r)| r.to_owned()),
        error_code,
        status: status.as_u16(),
        latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        peer,
    };
    match trail.append(facts).await {
        Ok(_) => response,
        Err(e) => {
            tracing::error!(error = %e, request_id = %request_id, "audit record not durable; answering 503 instead of the response");
            unavailable()
        }
    }
}

fn unavailable() -> Response {
    ApiError::unavailable("audit_unavailable").into_response()
}
