//! The signature layer (DESIGN 5), in front of every `/cards/...` and `/keys`
//! route: parse the four headers, check the timestamp window, read the body
//! under the size limit and the body deadline, verify the HMAC against each of the client's secrets
//! in constant time, check the route's scope, then pass the request on with
//! its [`Authenticated`] caller — and sign whatever response comes back. All
//! of it happens before the request competes for an in-flight slot.
//!
//! Unknown client and wrong signature give one and the same 401, and an unknown
//! client costs the same HMAC as a known one. Under mutual TLS, a client with
//! certificate pins whose request came over a connection whose certificate
//! does not meet them gets that same 401 too, once its signature has verified
//! (so the certificate check tells a caller nothing a bad signature would
//! not). The body is parsed only after all this, by the handler. Replay refusal (409) needs the store and lives in the
//! card service, where the request id is claimed in the same transaction as the
//! request's state changes.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use zeroize::Zeroizing;

use super::AppState;
use super::Live;
use super::client_cert::ClientCertificate;
use super::clients::{Client, Scope};
use super::error::ApiError;
use super::routes::Route;
use super::signature::{
    self, ClientSecret, HeaderError, RequestId, RequestToSign, ResponseToSign, SignatureHeaders,
};

/// The caller of a signed request, for handlers.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The client.
    pub client: Arc<Client>,
    /// Its request id.
    pub request_id: RequestId,
    /// The clients and programmes it runs under, to its end.
    pub live: Arc<Live>,
}

/// Set on a response whose request was authenticated (for the request log).
#[derive(Debug, Clone)]
pub struct ClientId(pub String);

/// Verified against when the apikey is unknown, so both failures cost the same.
static DECOY: LazyLock<Option<ClientSecret>> = LazyLock::new(|| {
    ClientSecret::new(Zeroizing::new(
        "decoy-secret-for-unknown-clients-0123456789".into(),
    ))
    .ok()
});

fn unauthenticated(code: &'static str, message: String) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message).into_response()
}

/// The middleware. See the module documentation for the order of checks.
pub async fn authenticate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let headers = match SignatureHeaders::from_headers(&parts.headers) {
        Ok(h) => h,
        Err(e @ HeaderError::Missing(_)) => {
            return unauthenticated("missing_header", e.to_string());
        }
        Err(e @ HeaderError::Malformed(_)) => {
            return unauthenticated("malformed_header", e.to_string());
        }
    };
    let now_ms = state.clock().now_ms();
    let max_skew_ms = u64::try_from(state.settings().max_skew.as_millis()).unwrap_or(u64::MAX);
    if !signature::is_fresh(headers.timestamp_ms, now_ms, max_skew_ms) {
        return unauthenticated(
            "timestamp_out_of_window",
            format!(
                "Timestamp is more than {} s from the gateway's clock",
                max_skew_ms / 1000
            ),
        );
    }

    let limit = state.settings().body_limit;
    let deadline = state.settings().body_read_timeout;
    let body = match read_body(body, limit, deadline).await {
        Ok(bytes) => bytes,
        Err(e) => return e.into_response(),
    };

    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    let message = RequestToSign {
        apikey: &headers.apikey,
        request_id: headers.request_id.as_str(),
        timestamp_ms: headers.timestamp_ms,
        method: parts.method.as_str(),
        path_and_query,
        body: &body,
    }
    .message();
    let live = state.live();
    let client = live.clients.get(&headers.apikey).cloned();
    let secret = match &client {
        Some(c) => c
            .secrets
            .iter()
            .position(|s| s.verify(&message, &headers.signature)),
        None => {
            if let Some(decoy) = DECOY.as_ref() {
                let _ = decoy.verify(&message, &headers.signature);
            }
            None
        }
    };
    let (Some(client), Some(secret)) = (client, secret) else {
        return ApiError::bad_signature().into_response();
    };
    if !client
        .certificate
        .accept(parts.extensions.get::<ClientCertificate>())
    {
        tracing::warn!(client = %client.apikey, "client certificate does not match the client's pins");
        return ApiError::bad_signature().into_response();
    }

    let route = parts
        .extensions
        .get::<MatchedPath>()
        .and_then(|m| Route::of(m.as_str()));
    let authenticated = Authenticated {
        client: Arc::clone(&client),
        request_id: headers.request_id.clone(),
        live,
    };
    let scope = route.and_then(Route::scope);
    let response = match scope {
        Some(scope) if client.scopes.contains(&scope) => {
            parts.extensions.insert(authenticated);
            next.run(Request::from_parts(parts, Body::from(body))).await
        }
        _ => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_scope",
            format!(
                "this client's scopes do not include {}",
                scope.map_or("this route", Scope::as_str)
            ),
        )
        .into_response(),
    };
    sign_response(response, &client, secret, &headers, state.clock().now_ms()).await
}

/// Reads the body, refusing more than `limit` bytes with 413 and a body still
/// incomplete after `deadline` with 408 `body_timeout` (issue 13: a slow body
/// must not hold anything the signed requests need).
async fn read_body(body: Body, limit: usize, deadline: Duration) -> Result<Bytes, ApiError> {
    let Ok(read) = tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} ms",
                deadline.as_millis()
            ),
        ));
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::too_large(limit)),
        Err(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            "the request body could not be read",
        )),
    }
}

/// Adds `Timestamp`, `X-Client-Request-Id` and `Signature` over the response
/// (DESIGN 5), with the secret that verified the request.
async fn sign_response(
    response: Response,
    client: &Client,
    secret: usize,
    headers: &SignatureHeaders,
    now_ms: u64,
) -> Response {
    let (mut parts, body) = response.into_parts();
    // Our own responses are small JSON documents; a body that cannot be read is
    // a gateway fault, answered unsigned.
    let Ok(collected) = body.collect().await else {
        return ApiError::internal().into_response();
    };
    let bytes = collected.to_bytes();
    let Some(key) = client.secrets.get(secret) else {
        return ApiError::internal().into_response();
    };
    let tag = key.sign(
        &ResponseToSign {
            apikey: &client.apikey,
            request_id: headers.request_id.as_str(),
            timestamp_ms: now_ms,
            status: parts.status.as_u16(),
            body: &bytes,
        }
        .message(),
    );
    let values = [
        (signature::TIMESTAMP, HeaderValue::from(now_ms)),
        (
            signature::REQUEST_ID,
            HeaderValue::from_str(headers.request_id.as_str())
                .unwrap_or(HeaderValue::from_static("")),
        ),
        (
            signature::SIGNATURE,
            HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("")),
        ),
    ];
    for (name, value) in values {
        parts.headers.insert(name, value);
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.extensions.insert(ClientId(client.apikey.clone()));
    Response::from_parts(parts, Body::from(bytes))
}
