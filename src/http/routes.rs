//! The API, declared once (issue 10): every route with its method, path, who
//! may call it and whether it is audited. The router ([`super::app`]), the
//! scope check ([`super::auth`]), the audit layer, the metrics labels, the
//! OpenAPI document (its `path = ...` attributes name these constants, and a
//! test checks it lists exactly this table) and the tests all read it; no
//! route string is written anywhere else.

use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter};

use super::AppState;
use super::clients::Scope;

/// The method of a route (the API uses two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `POST`.
    Post,
}

impl Method {
    /// The method's name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }

    const fn filter(self) -> MethodFilter {
        match self {
            Method::Get => MethodFilter::GET,
            Method::Post => MethodFilter::POST,
        }
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A signed request of a client holding this scope (DESIGN 5); behind the
    /// signature layer, the in-flight limit and the audit trail.
    Signed(Scope),
    /// Unsigned operational route: health, readiness, metrics, the OpenAPI
    /// document. Outside the in-flight limit (they answer under load) and not
    /// audited (they change nothing, carry no card data, and must answer while
    /// the trail is down).
    Open,
}

/// One route of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Its method.
    pub method: Method,
    /// Its path: also its label in metrics, logs and audit records.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
}

impl Route {
    /// `POST /cards/pin/dynamic-values`: 1–24 TDCVV2-v1 values; enrols the card.
    pub const DYNAMIC_VALUES: Route = Route::signed(
        Method::Post,
        "/cards/pin/dynamic-values",
        Scope::DynamicValues,
    );
    /// `POST /cards/dynamic-cvv2/enrollment`.
    pub const ENROLLMENT: Route = Route::signed(
        Method::Post,
        "/cards/dynamic-cvv2/enrollment",
        Scope::Enrollment,
    );
    /// `POST /cards/dynamic-cvv2/unenrollment`.
    pub const UNENROLLMENT: Route = Route::signed(
        Method::Post,
        "/cards/dynamic-cvv2/unenrollment",
        Scope::Enrollment,
    );
    /// `POST /cards/dynamic-cvv2/enquiry`.
    pub const ENQUIRY: Route = Route::signed(
        Method::Post,
        "/cards/dynamic-cvv2/enquiry",
        Scope::Enrollment,
    );
    /// `POST /cards/cvv2/verification`: authorization-time CVV2 check.
    pub const CVV2_VERIFICATION: Route = Route::signed(
        Method::Post,
        "/cards/cvv2/verification",
        Scope::Cvv2Verification,
    );
    /// `POST /cards/security-codes`: static CVV, CVV2, iCVV for embossing.
    pub const SECURITY_CODES: Route =
        Route::signed(Method::Post, "/cards/security-codes", Scope::SecurityCodes);
    /// `POST /cards/dcvv/verification`: contactless dCVV.
    pub const DCVV_VERIFICATION: Route = Route::signed(
        Method::Post,
        "/cards/dcvv/verification",
        Scope::DcvvVerification,
    );
    /// `POST /cards/cvc3/verification`: Mastercard contactless CVC3.
    pub const CVC3_VERIFICATION: Route = Route::signed(
        Method::Post,
        "/cards/cvc3/verification",
        Scope::Cvc3Verification,
    );
    /// `POST /cards/arqc/verification`: EMV ARQC, and the ARPC when asked.
    pub const ARQC_VERIFICATION: Route = Route::signed(
        Method::Post,
        "/cards/arqc/verification",
        Scope::ArqcVerification,
    );
    /// `GET /keys`: the key inventory (admin).
    pub const KEYS: Route = Route::signed(Method::Get, "/keys", Scope::Keys);
    /// `GET /healthz`: liveness.
    pub const HEALTHZ: Route = Route::open("/healthz");
    /// `GET /readyz`: readiness.
    pub const READYZ: Route = Route::open("/readyz");
    /// `GET /metrics`: Prometheus exposition.
    pub const METRICS: Route = Route::open("/metrics");
    /// `GET /openapi.json`: the OpenAPI document.
    pub const OPENAPI: Route = Route::open("/openapi.json");

    const fn signed(method: Method, path: &'static str, scope: Scope) -> Route {
        Route {
            method,
            path,
            access: Access::Signed(scope),
        }
    }

    const fn open(path: &'static str) -> Route {
        Route {
            method: Method::Get,
            path,
            access: Access::Open,
        }
    }

    /// The route of a matched path template, if it is one of the API's.
    pub fn of(path: &str) -> Option<&'static Route> {
        ROUTES.iter().find(|r| r.path == path)
    }

    /// The metrics and log label of a path: its template, or `unmatched`
    /// (labels never carry arbitrary paths).
    pub fn label(path: &str) -> &'static str {
        Route::of(path).map_or("unmatched", |r| r.path)
    }

    /// The scope a signed route needs.
    pub const fn scope(&self) -> Option<Scope> {
        match self.access {
            Access::Signed(scope) => Some(scope),
            Access::Open => None,
        }
    }

    /// Whether each request to it leaves an audit record.
    pub const fn audited(&self) -> bool {
        matches!(self.access, Access::Signed(_))
    }

    /// The handler of this route under its method, for the router.
    pub(super) fn to<H, T>(&self, handler: H) -> MethodRouter<AppState>
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        axum::routing::on(self.method.filter(), handler)
    }
}

/// Every route of the API.
pub const ROUTES: &[Route] = &[
    Route::DYNAMIC_VALUES,
    Route::ENROLLMENT,
    Route::UNENROLLMENT,
    Route::ENQUIRY,
    Route::CVV2_VERIFICATION,
    Route::SECURITY_CODES,
    Route::DCVV_VERIFICATION,
    Route::CVC3_VERIFICATION,
    Route::ARQC_VERIFICATION,
    Route::KEYS,
    Route::HEALTHZ,
    Route::READYZ,
    Route::METRICS,
    Route::OPENAPI,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_unique_and_labels_never_carry_other_paths() {
        let mut paths: Vec<_> = ROUTES.iter().map(|r| r.path).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), ROUTES.len());
        assert_eq!(
            Route::label("/cards/cvv2/verification"),
            "/cards/cvv2/verification"
        );
        assert_eq!(Route::label("/cards/4123450000000001"), "unmatched");
    }

    #[test]
    fn signed_routes_are_audited_and_open_ones_are_not() {
        for route in ROUTES {
            assert_eq!(route.audited(), route.scope().is_some(), "{}", route.path);
        }
        assert_eq!(Route::KEYS.scope(), Some(Scope::Keys));
        assert_eq!(Route::METRICS.scope(), None);
    }
}
