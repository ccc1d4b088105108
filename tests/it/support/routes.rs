//! The gateway's route paths, for every test that calls one (or looks for one
//! in a metric label, a log line or the OpenAPI document): taken from the
//! gateway's own route table ([`dcvv_gateway::http::routes::Route`]), so no
//! test writes a route string.

use dcvv_gateway::http::routes::Route;

/// `POST`: 1 to 24 dynamic CVV2 (TDCVV2) values of a card; enrols it.
pub const VALUES: &str = Route::DYNAMIC_VALUES.path;
/// `POST`: enrols a card for dynamic CVV2.
pub const ENROL: &str = Route::ENROLLMENT.path;
/// `POST`: takes a card out of dynamic CVV2.
pub const UNENROL: &str = Route::UNENROLLMENT.path;
/// `POST`: whether a card is enrolled.
pub const ENQUIRY: &str = Route::ENQUIRY.path;
/// `POST`: the authorization-time CVV2 check (dynamic for an enrolled card,
/// static otherwise).
pub const VERIFY: &str = Route::CVV2_VERIFICATION.path;
/// `POST`: computes a static code (CVV, CVV2, iCVV).
pub const CODES: &str = Route::SECURITY_CODES.path;
/// `POST`: verifies a contactless dCVV.
pub const DCVV: &str = Route::DCVV_VERIFICATION.path;
/// `POST`: verifies a Mastercard contactless CVC3.
pub const CVC3: &str = Route::CVC3_VERIFICATION.path;
/// `POST`: verifies an EMV ARQC, and makes the ARPC when asked.
pub const ARQC: &str = Route::ARQC_VERIFICATION.path;
/// `GET`: the key inventory.
pub const KEY_INVENTORY: &str = Route::KEYS.path;
/// `GET`: liveness.
pub const HEALTHZ: &str = Route::HEALTHZ.path;
/// `GET`: readiness (token, keys, store).
pub const READYZ: &str = Route::READYZ.path;
/// `GET`: Prometheus metrics.
pub const METRICS: &str = Route::METRICS.path;
/// `GET`: the OpenAPI document.
pub const OPENAPI: &str = Route::OPENAPI.path;
