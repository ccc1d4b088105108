//! The gateway's route paths, for every test that calls one (or looks for one
//! in a metric label, a log line or the OpenAPI document). Defined here once and
//! nowhere else in the tests, so that taking them from the gateway's own route
//! table (`dcvv_gateway::http::ROUTES`) is a change to this file alone.

/// `POST`: 1 to 24 dynamic CVV2 (TDCVV2) values of a card; enrols it.
pub const VALUES: &str = "/cards/pin/dynamic-values";
/// `POST`: enrols a card for dynamic CVV2.
pub const ENROL: &str = "/cards/dynamic-cvv2/enrollment";
/// `POST`: takes a card out of dynamic CVV2.
pub const UNENROL: &str = "/cards/dynamic-cvv2/unenrollment";
/// `POST`: whether a card is enrolled.
pub const ENQUIRY: &str = "/cards/dynamic-cvv2/enquiry";
/// `POST`: the authorization-time CVV2 check (dynamic for an enrolled card,
/// static otherwise).
pub const VERIFY: &str = "/cards/cvv2/verification";
/// `POST`: computes a static code (CVV, CVV2, iCVV).
pub const CODES: &str = "/cards/security-codes";
/// `POST`: verifies a contactless dCVV.
pub const DCVV: &str = "/cards/dcvv/verification";
/// `GET`: the key inventory.
pub const KEY_INVENTORY: &str = "/keys";
/// `GET`: liveness.
pub const HEALTHZ: &str = "/healthz";
/// `GET`: readiness (token, keys, store).
pub const READYZ: &str = "/readyz";
/// `GET`: Prometheus metrics.
pub const METRICS: &str = "/metrics";
/// `GET`: the OpenAPI document.
pub const OPENAPI: &str = "/openapi.json";
