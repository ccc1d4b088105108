//! The OpenAPI 3 document (`GET /openapi.json`), generated from the handlers'
//! and wire types' annotations, so it follows the code. A test checks that it
//! documents exactly the routes the router serves.

use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::routes::Route;
use super::{cards, dto, error, health};

struct SignatureScheme;

impl Modify for SignatureScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "hmac",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Signature",
                "Base64 HMAC-SHA256 under the client's secret of: apikey, X-Client-Request-Id, \
                 Timestamp (epoch ms), the method, the path with its query, and the hex SHA-256 \
                 of the body, joined by newlines. Also send the headers apikey, Timestamp and \
                 X-Client-Request-Id. Responses carry Timestamp, X-Client-Request-Id and a \
                 Signature over apikey, request id, Timestamp, status and the body's SHA-256.",
            ))),
        );
    }
}

/// The API's OpenAPI description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "dcvv-gateway",
        description = "Card security codes (TDCVV2-v1 dynamic CVV2, CVV, CVV2, iCVV, contactless dCVV, Mastercard CVC3) and EMV ARQC / ARPC, computed in a PKCS#11 HSM."
    ),
    paths(
        cards::dynamic_values,
        cards::enroll,
        cards::unenroll,
        cards::enquiry,
        cards::verify_cvv2,
        cards::security_code,
        cards::verify_dcvv,
        cards::verify_cvc3,
        cards::verify_arqc,
        cards::keys,
        health::healthz,
        health::readyz,
        health::metrics,
        document,
    ),
    components(schemas(
        dto::DynamicValuesRequest,
        dto::CardRequest,
        dto::Cvv2VerificationRequest,
        dto::SecurityCodeRequest,
        dto::DcvvVerificationRequest,
        dto::Cvc3VerificationRequest,
        dto::ArqcVerificationRequest,
        dto::ArqcVerificationResponse,
        dto::DynamicValuesResponse,
        dto::DynamicValue,
        dto::EnrollmentResponse,
        dto::VerificationResponse,
        dto::SecurityCodeResponse,
        dto::KeysResponse,
        dto::KeyEntry,
        dto::KeyUsedBy,
        error::ErrorBody,
        health::Health,
        health::Readiness,
    )),
    modifiers(&SignatureScheme)
)]
#[derive(Debug)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = Route::OPENAPI.path, tag = "operations", responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json")))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::routes::ROUTES;
    use std::collections::BTreeSet;

    #[test]
    fn the_document_lists_exactly_the_served_routes() {
        let doc = ApiDoc::openapi();
        let documented: BTreeSet<(String, String)> = doc
            .paths
            .paths
            .iter()
            .flat_map(|(path, item)| {
                let mut methods = Vec::new();
                if item.get.is_some() {
                    methods.push(("GET".to_owned(), path.clone()));
                }
                if item.post.is_some() {
                    methods.push(("POST".to_owned(), path.clone()));
                }
                methods
            })
            .collect();
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.as_str().to_owned(), r.path.to_owned()))
            .collect();
        assert_eq!(documented, served);
        let json = serde_json::to_value(&doc).unwrap();
        assert!(json["openapi"].as_str().unwrap().starts_with("3."));
        let schema = &json["components"]["schemas"]["DynamicValuesRequest"];
        assert_eq!(
            schema["additionalProperties"],
            serde_json::json!(false),
            "{schema}"
        );
        assert!(schema["properties"]["cardNumber"].is_object(), "{schema}");
        // Key rotation: the inventory says which programme uses a key, and as what.
        let entry = &json["components"]["schemas"]["KeyEntry"];
        assert!(entry["properties"]["usedBy"].is_object(), "{entry}");
        let used_by = &json["components"]["schemas"]["KeyUsedBy"];
        for field in ["programme", "role", "acceptUntil"] {
            assert!(used_by["properties"][field].is_object(), "{used_by}");
        }
    }
}
