//! Handlers of the signed API (DESIGN 4): parse the body into domain types
//! once, call the card service, shape the answer. No business rule lives
//! here; every rule is in [`crate::domain::service`]. Each handler tells the
//! audit layer what it learnt ([`AuditNote`]): masked PAN, programme, key, result.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, FromRequest, FromRequestParts, Request, State};
use serde::de::DeserializeOwned;

use crate::domain::StaticCodeKind;
use crate::domain::service::Caller;

use super::AppState;
use super::audit::AuditNote;
use super::auth::Authenticated;
use super::dto::{
    ArqcVerificationRequest, ArqcVerificationResponse, CardRequest, Cvc3VerificationRequest,
    Cvv2VerificationRequest, DcvvVerificationRequest, DynamicValue, DynamicValuesCall,
    DynamicValuesRequest, DynamicValuesResponse, EnrollmentResponse, KeyEntry, KeyUsedBy,
    KeysResponse, SecurityCodeRequest, SecurityCodeResponse, VerificationResponse, rfc3339,
    rfc3339_ms,
};
use super::error::{ApiError, ErrorBody};
use super::routes::Route;

type ApiResult<T> = Result<Json<T>, ApiError>;

/// A signed request to one endpoint, as its handler takes it: the state, the
/// authenticated caller, the audit note and the body parsed into the
/// endpoint's wire type (400 `malformed_request` when it is not one).
pub struct Signed<T> {
    state: AppState,
    auth: Authenticated,
    note: AuditNote,
    request: T,
}

/// The client and the request id only: the body holds card data.
impl<T> std::fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("client", &self.auth.client.apikey)
            .field("request_id", &self.auth.request_id.as_str())
            .finish_non_exhaustive()
    }
}

impl<T> Signed<T> {
    fn caller(&self) -> Caller<'_> {
        caller(&self.auth)
    }
}

fn caller(auth: &Authenticated) -> Caller<'_> {
    Caller {
        client: &auth.client.apikey,
        request_id: auth.request_id.as_str(),
        access: &auth.client.access,
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for Signed<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let (mut parts, body) = request.into_parts();
        // Set by the signature layer in front of every signed route.
        let Extension(auth) = Extension::<Authenticated>::from_request_parts(&mut parts, state)
            .await
            .map_err(|_| ApiError::internal())?;
        let Ok(note) = AuditNote::from_request_parts(&mut parts, state).await;
        let body = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(|_| ApiError::malformed())?;
        let request = serde_json::from_slice(&body).map_err(|_| ApiError::malformed())?;
        Ok(Signed {
            state: state.clone(),
            auth,
            note,
            request,
        })
    }
}

/// Generate 1–24 TDCVV2-v1 values; enrols the card.
#[utoipa::path(
    post, path = Route::DYNAMIC_VALUES.path, tag = "dynamic CVV2",
    request_body = DynamicValuesRequest,
    responses(
        (status = 200, body = DynamicValuesResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("hmac" = []))
)]
pub async fn dynamic_values(
    call: Signed<DynamicValuesRequest>,
) -> ApiResult<DynamicValuesResponse> {
    let DynamicValuesCall {
        card,
        count,
        channel,
        organization,
        disable,
    } = call.request.parse()?;
    call.note.pan(&card.pan);
    if let Some(channel) = channel {
        call.note.channel(channel.letter());
    }
    if let Some(organization) = organization {
        call.note.organization(organization);
    }
    if !call.auth.client.organizations.allows(organization) {
        return Err(ApiError::forbidden_organization());
    }
    if disable {
        call.note.action("unenroll");
        let status = call
            .state
            .service()
            .set_enrollment(&call.caller(), &card, false)
            .await?;
        call.note.card(&status.card);
        return Ok(Json(DynamicValuesResponse {
            card_number: status.card.masked_pan.clone(),
            dcvv2: None,
            dcvv2_generation_time: None,
            dcvv2_expiry_minutes: None,
            values: Vec::new(),
            enrollment: "not_enrolled",
            changed: Some(status.changed),
            programme: status.card.programme.clone(),
            key_check_value: None,
        }));
    }
    let generated = call
        .state
        .service()
        .dynamic_values(&call.caller(), &card, count)
        .await?;
    call.note.card(&generated.card);
    call.note.key(&generated.key);
    let values: Vec<DynamicValue> = generated
        .values
        .iter()
        .map(|v| DynamicValue {
            dcvv2: v.code.expose().to_owned(),
            valid_from: seconds_text(v.valid_from),
            valid_until: seconds_text(v.valid_until),
        })
        .collect();
    let first_until_ms = generated
        .values
        .first()
        .map_or(0, |v| v.valid_until.saturating_mul(1000));
    Ok(Json(DynamicValuesResponse {
        card_number: generated.card.masked_pan.clone(),
        dcvv2: Some(values.first().map(|v| v.dcvv2.clone()).unwrap_or_default()),
        dcvv2_generation_time: Some(rfc3339_ms(generated.generated_at_ms).unwrap_or_default()),
        dcvv2_expiry_minutes: Some(
            first_until_ms
                .saturating_sub(generated.generated_at_ms)
                .div_ceil(60_000),
        ),
        values,
        enrollment: "enrolled",
        changed: None,
        programme: generated.card.programme.clone(),
        key_check_value: Some(generated.key.kcv.to_string()),
    }))
}

fn seconds_text(unix_seconds: u64) -> String {
    i64::try_from(unix_seconds)
        .ok()
        .and_then(rfc3339)
        .unwrap_or_default()
}

async fn set_enrollment(call: Signed<CardRequest>, enrol: bool) -> ApiResult<EnrollmentResponse> {
    let card = call.request.card()?;
    call.note.pan(&card.pan);
    let status = call
        .state
        .service()
        .set_enrollment(&call.caller(), &card, enrol)
        .await?;
    call.note.card(&status.card);
    Ok(Json(EnrollmentResponse::from_status(&status)))
}

/// Enrol a card in dynamic CVV2 (idempotent); its static CVV2 is declined from then on.
#[utoipa::path(
    post, path = Route::ENROLLMENT.path, tag = "dynamic CVV2",
    request_body = CardRequest,
    responses((status = 200, body = EnrollmentResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn enroll(call: Signed<CardRequest>) -> ApiResult<EnrollmentResponse> {
    set_enrollment(call, true).await
}

/// Unenrol a card (idempotent): its static CVV2 is accepted again.
#[utoipa::path(
    post, path = Route::UNENROLLMENT.path, tag = "dynamic CVV2",
    request_body = CardRequest,
    responses((status = 200, body = EnrollmentResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn unenroll(call: Signed<CardRequest>) -> ApiResult<EnrollmentResponse> {
    set_enrollment(call, false).await
}

/// Is the card enrolled in dynamic CVV2?
#[utoipa::path(
    post, path = Route::ENQUIRY.path, tag = "dynamic CVV2",
    request_body = CardRequest,
    responses((status = 200, body = EnrollmentResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn enquiry(call: Signed<CardRequest>) -> ApiResult<EnrollmentResponse> {
    let card = call.request.card()?;
    call.note.pan(&card.pan);
    let status = call.state.service().enquiry(&call.caller(), &card).await?;
    call.note.card(&status.card);
    Ok(Json(EnrollmentResponse::from_status(&status)))
}

/// Authorization-time CVV2 check: dynamic rules for an enrolled card, static CVV2 otherwise.
#[utoipa::path(
    post, path = Route::CVV2_VERIFICATION.path, tag = "verification",
    request_body = Cvv2VerificationRequest,
    responses((status = 200, body = VerificationResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn verify_cvv2(call: Signed<Cvv2VerificationRequest>) -> ApiResult<VerificationResponse> {
    let (card, cvv2) = call.request.parse()?;
    call.note.pan(&card.pan);
    let verification = call
        .state
        .service()
        .verify_cvv2(&call.caller(), &card, cvv2)
        .await?;
    call.note.card(&verification.card);
    call.note.key(&verification.key);
    call.note.verdict(verification.reason);
    Ok(Json(VerificationResponse::from_verification(&verification)))
}

/// Static CVV / CVV2 / iCVV, for card embossing.
#[utoipa::path(
    post, path = Route::SECURITY_CODES.path, tag = "static codes",
    request_body = SecurityCodeRequest,
    responses((status = 200, body = SecurityCodeResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn security_code(call: Signed<SecurityCodeRequest>) -> ApiResult<SecurityCodeResponse> {
    let (card, kind, digits) = call.request.parse()?;
    call.note.pan(&card.pan);
    let issued = call
        .state
        .service()
        .security_code(&call.caller(), &card, kind, digits)
        .await?;
    call.note.card(&issued.card);
    call.note.key(&issued.key);
    Ok(Json(SecurityCodeResponse {
        card_number: issued.card.masked_pan.clone(),
        kind: match kind {
            StaticCodeKind::Cvv(_) => "cvv",
            StaticCodeKind::Cvv2 => "cvv2",
            StaticCodeKind::Icvv => "icvv",
        },
        security_code: issued.code.expose().to_owned(),
        programme: issued.card.programme.clone(),
        key_check_value: issued.key.kcv.to_string(),
    }))
}

/// Contactless dCVV (ATC-based) check.
#[utoipa::path(
    post, path = Route::DCVV_VERIFICATION.path, tag = "verification",
    request_body = DcvvVerificationRequest,
    responses((status = 200, body = VerificationResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn verify_dcvv(call: Signed<DcvvVerificationRequest>) -> ApiResult<VerificationResponse> {
    let (card, service_code, atc, dcvv) = call.request.parse()?;
    call.note.pan(&card.pan);
    let verification = call
        .state
        .service()
        .verify_dcvv(&call.caller(), &card, service_code, atc, dcvv)
        .await?;
    call.note.card(&verification.card);
    call.note.key(&verification.key);
    call.note.verdict(verification.reason);
    Ok(Json(VerificationResponse::from_verification(&verification)))
}

/// Mastercard contactless CVC3 (dCVC3) check.
#[utoipa::path(
    post, path = Route::CVC3_VERIFICATION.path, tag = "verification",
    request_body = Cvc3VerificationRequest,
    responses((status = 200, body = VerificationResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn verify_cvc3(call: Signed<Cvc3VerificationRequest>) -> ApiResult<VerificationResponse> {
    let (card, input) = call.request.parse()?;
    call.note.pan(&card.pan);
    let verification = call
        .state
        .service()
        .verify_cvc3(&call.caller(), &card, input)
        .await?;
    call.note.card(&verification.card);
    call.note.key(&verification.key);
    call.note.verdict(verification.reason);
    Ok(Json(VerificationResponse::from_verification(&verification)))
}

/// EMV ARQC check; with `arc` or `csu`, the ARPC of a matching ARQC.
#[utoipa::path(
    post, path = Route::ARQC_VERIFICATION.path, tag = "verification",
    request_body = ArqcVerificationRequest,
    responses((status = 200, body = ArqcVerificationResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn verify_arqc(
    call: Signed<ArqcVerificationRequest>,
) -> ApiResult<ArqcVerificationResponse> {
    let (card, input) = call.request.parse()?;
    call.note.pan(&card.pan);
    let checked = call
        .state
        .service()
        .verify_arqc(&call.caller(), &card, input)
        .await?;
    let verification = &checked.verification;
    call.note.card(&verification.card);
    call.note.key(&verification.key);
    call.note.verdict(verification.reason);
    Ok(Json(ArqcVerificationResponse::from_verification(&checked)))
}

/// Key inventory (admin scope): label, kind, version, KCV, attribute compliance,
/// and which programmes use each key as `current` or `previous` (key rotation).
#[utoipa::path(
    get, path = Route::KEYS.path, tag = "keys",
    responses((status = 200, body = KeysResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn keys(
    State(state): State<AppState>,
    Extension(auth): Extension<Authenticated>,
) -> ApiResult<KeysResponse> {
    let inventory = state.service().key_inventory(&caller(&auth)).await?;
    let keys = inventory
        .keys
        .into_iter()
        .map(|entry| {
            let k = entry.key;
            KeyEntry {
                in_use: entry.in_use,
                used_by: entry
                    .used_by
                    .into_iter()
                    .map(|u| KeyUsedBy {
                        programme: u.programme,
                        role: u.role.as_str(),
                        accept_until: u.accept_until_ms.and_then(rfc3339_ms),
                    })
                    .collect(),
                kind: k.kind.as_str(),
                role: k.role,
                version: k.version,
                key_check_value: k.kcv.map(|kcv| kcv.to_string()),
                sensitive: k.attributes.sensitive,
                extractable: k.attributes.extractable,
                modifiable: k.attributes.modifiable,
                violations: k.violations,
                label: k.label,
            }
        })
        .collect();
    Ok(Json(KeysResponse {
        token: inventory.token,
        keys,
    }))
}
