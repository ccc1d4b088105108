//! The error contract of DESIGN 4: `{"code", "message", "requestId"}` with a
//! stable snake_case code. 4xx bodies say what is wrong (naming fields, never
//! their values); 5xx bodies carry only the code. 429 and 503 carry
//! `Retry-After`.
//!
//! Turning an error into a response has no side effect: the request log and the
//! metrics read the code from the response's [`ErrorCode`] extension.

use std::borrow::Cow;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::{Dependency, DomainError};

/// Seconds a client should wait after a 429 or 503.
const RETRY_AFTER_SECONDS: &str = "1";

tokio::task_local! {
    /// The id of the request being served: set once by the request layer
    /// ([`super::observe`], via [`with_request_id`]) around everything below
    /// it, and read when an error body is written, so no handler or layer
    /// passes it along by hand.
    static REQUEST_ID: std::sync::Arc<str>;
}

/// Runs `serve` with `id` as the request id of every error body it writes.
pub(super) async fn with_request_id<F: std::future::Future>(id: &str, serve: F) -> F::Output {
    REQUEST_ID.scope(id.into(), serve).await
}

fn current_request_id() -> Option<String> {
    REQUEST_ID
        .try_with(|id| (!id.is_empty()).then(|| id.to_string()))
        .ok()
        .flatten()
}

/// The stable code of an error response, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: Cow<'static, str>,
    detail: Option<String>,
}

/// The internal cause of a 5xx, for the request log only (never the body).
/// Error texts of the lower layers carry no key, PAN, code or secret.
#[derive(Debug, Clone)]
pub struct ErrorDetail(pub String);

/// Wire shape of an error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Stable machine code, snake_case.
    #[schema(example = "invalid_card_number")]
    pub code: &'static str,
    /// Human text (absent on 5xx).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The request's `X-Client-Request-Id`, or the gateway's own id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl ApiError {
    /// An error with its status, code and message.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
        }
    }

    /// Keeps the cause of a server error for the request log.
    #[must_use]
    pub fn with_detail(mut self, cause: &dyn std::error::Error) -> Self {
        if self.status.is_server_error() {
            let mut text = cause.to_string();
            let mut source = cause.source();
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            self.detail = Some(text);
        }
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// 400: the body is not JSON of the endpoint's shape.
    pub fn malformed() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            "the body is not a JSON object of this endpoint's shape \
             (check field names and types; unknown fields are refused)",
        )
    }

    /// 403: the client may not name this organisation (or must name one of its own).
    pub fn forbidden_organization() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden_organization",
            "this client must name one of its organisations in organizationNumber",
        )
    }

    /// 401: unknown client or wrong signature; one body for both (DESIGN 5).
    pub fn bad_signature() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
            "the apikey is unknown or the signature does not verify",
        )
    }

    /// 404.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    /// 405.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {limit} bytes"),
        )
    }

    /// 429: shed under overload.
    pub fn overloaded() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            "too many requests in flight; retry after the delay in Retry-After",
        )
    }

    /// 503 with a code and no detail.
    pub fn unavailable(code: &'static str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, "")
    }

    /// 500 with no detail.
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "")
    }

    /// The body: the code, the message on a 4xx, and the id of the request
    /// being served.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: (!self.status.is_server_error() && !self.message.is_empty())
                .then(|| self.message.to_string()),
            request_id: current_request_id(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response.extensions_mut().insert(ErrorCode(self.code));
        if let Some(detail) = self.detail {
            response.extensions_mut().insert(ErrorDetail(detail));
        }
        response
    }
}

/// The 422 code of an invalid field, by its wire name.
fn invalid_field_code(field: &str) -> &'static str {
    match field {
        "cardNumber" => "invalid_card_number",
        "expiryDate" => "invalid_expiry_date",
        "panSequenceNumber" => "invalid_pan_sequence_number",
        "numberOfValues" => "invalid_number_of_values",
        "serviceCode" => "invalid_service_code",
        "digits" => "invalid_digits",
        "kind" => "invalid_kind",
        "channel" => "invalid_channel",
        "disableDCVV2" => "invalid_disable_dcvv2",
        "organizationNumber" => "invalid_organization_number",
        "atc" => "invalid_atc",
        "cvv2" => "invalid_cvv2",
        "dcvv" => "invalid_dcvv",
        "keyAssociation" => "invalid_key_association",
        "trackData" => "invalid_track_data",
        "unpredictableNumber" => "invalid_unpredictable_number",
        "cvc3" => "invalid_cvc3",
        "cryptogramVersion" => "invalid_cryptogram_version",
        "transactionData" => "invalid_transaction_data",
        "padding" => "invalid_padding",
        "arqc" => "invalid_arqc",
        "arc" => "invalid_arc",
        "csu" => "invalid_csu",
        "proprietaryAuthenticationData" => "invalid_proprietary_authentication_data",
        _ => "invalid_field",
    }
}

fn duplicate() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "duplicate_request",
        "this X-Client-Request-Id was already used by this client",
    )
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        ApiError::from(&e).with_detail(&e)
    }
}

impl From<&DomainError> for ApiError {
    fn from(e: &DomainError) -> Self {
        match e {
            DomainError::Invalid { field, .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                invalid_field_code(field),
                e.to_string(),
            ),
            DomainError::UnknownProgramme => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_card_programme",
                "no card programme covers this card number (or its keyAssociation)",
            ),
            DomainError::CardExpired => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "card_expired",
                "the card's expiry month has passed",
            ),
            DomainError::ProgrammeNotAllowed => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_programme",
                "this client may not use the card's programme",
            ),
            DomainError::DuplicateRequest => duplicate(),
            DomainError::NotConfigured(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "operation_not_configured",
                e.to_string(),
            ),
            DomainError::KeyUnusable(_) => ApiError::unavailable("key_unavailable"),
            DomainError::Unavailable(Dependency::Hsm, _) => {
                ApiError::unavailable("hsm_unavailable")
            }
            DomainError::Unavailable(Dependency::HsmSessions, _) => {
                ApiError::unavailable("hsm_busy")
            }
            DomainError::Unavailable(Dependency::Store, _) => {
                ApiError::unavailable("store_unavailable")
            }
            DomainError::Unavailable(Dependency::Audit, _) => {
                ApiError::unavailable("audit_unavailable")
            }
            DomainError::Internal(_) => ApiError::internal(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::HsmError;
    use crate::store::StoreError;

    #[test]
    fn server_errors_carry_only_the_code_and_retry_after() {
        let response = ApiError::unavailable("hsm_unavailable").into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let body = serde_json::to_value(ApiError::unavailable("hsm_unavailable").body()).unwrap();
        assert_eq!(body, serde_json::json!({"code": "hsm_unavailable"}));
        assert_eq!(
            response.extensions().get::<ErrorCode>(),
            Some(&ErrorCode("hsm_unavailable"))
        );
    }

    #[tokio::test]
    async fn the_body_carries_the_id_of_the_request_being_served() {
        let inside = with_request_id("req-7", async { ApiError::not_found().body() }).await;
        assert_eq!(inside.request_id.as_deref(), Some("req-7"));
        let outside = ApiError::not_found().body();
        assert_eq!(outside.request_id, None);
    }

    #[test]
    fn domain_errors_map_to_the_documented_statuses() {
        let cases = [
            (DomainError::UnknownProgramme, 422, "unknown_card_programme"),
            (DomainError::CardExpired, 422, "card_expired"),
            (DomainError::ProgrammeNotAllowed, 403, "forbidden_programme"),
            (DomainError::DuplicateRequest, 409, "duplicate_request"),
            (
                DomainError::Invalid {
                    field: "cardNumber",
                    reason: "fails the Luhn check",
                },
                422,
                "invalid_card_number",
            ),
            (
                DomainError::from(HsmError::Busy { millis: 1 }),
                503,
                "hsm_busy",
            ),
            (
                DomainError::from(HsmError::KeyNotFound { label: "k".into() }),
                503,
                "key_unavailable",
            ),
            (
                DomainError::from(HsmError::Worker(crate::hsm::WorkerFailure::Panicked)),
                500,
                "internal_error",
            ),
            (
                DomainError::from(StoreError::DuplicateRequest),
                409,
                "duplicate_request",
            ),
        ];
        for (error, status, code) in cases {
            let api = ApiError::from(&error);
            assert_eq!(
                (api.status().as_u16(), api.code()),
                (status, code),
                "{error:?}"
            );
        }
    }
}
