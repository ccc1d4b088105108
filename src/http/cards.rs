//! Handlers of the signed API (DESIGN 4): parse the body into domain types
//! once, call the card service, shape the answer. No business rule lives
//! here; every rule is in [`crate::domain::service`]. Each handler tells the
//! audit layer what it learnt ([`AuditNote`]): masked PAN, programme, key, result.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use serde::de::DeserializeOwned;

use crate::domain::StaticCodeKind;
use crate::domain::service::Caller;

use super::AppState;
use super::audit::AuditNote;
use super::auth::Authenticated;
use super::dto::{
    CardRequest, Cvv2VerificationRequest, DcvvVerificationRequest, DynamicValue,
    DynamicValuesRequest, DynamicValuesResponse, EnrollmentResponse, KeyEntry, KeyUsedBy,
    KeysResponse, SecurityCodeRequest, SecurityCodeResponse, VerificationResponse, rfc3339,
    rfc3339_ms,
};
use super::error::{ApiError, ErrorBody};
use super::routes::Route;

type ApiResult<T> = Result<Json<T>, ApiError>;

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|_| ApiError::malformed())
}

fn caller(auth: &Authenticated) -> Caller<'_> {
    Caller {
        client: &auth.client.apikey,
        request_id: auth.request_id.as_str(),
        access: &auth.client.access,
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
    State(state): State<AppState>,
    Extension(auth): Extension<Authenticated>,
    note: AuditNote,
    body: Bytes,
) -> ApiResult<DynamicValuesResponse> {
    let request: DynamicValuesRequest = parse(&body)?;
    let (card, count, channel) = request.parse()?;
    note.pan(&card.pan);
    if let Some(channel) = channel {
        note.channel(channel.letter());
    }
    let generated = state
        .service()
        .dynamic_values(&caller(&auth), &card, count)
        .await?;
    note.card(&generated.card);
    note.key(&generated.key);
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
        dcvv2: values.first().map(|v| v.dcvv2.clone()).unwrap_or_default(),
        dcvv2_generation_time: rfc3339_ms(generated.generated_at_ms).unwrap_or_default(),
        dcvv2_expiry_minutes: first_until_ms
            .saturating_sub(generated.generated_at_ms)
            .div_ceil(60_000),
        values,
        enrollment: "enrolled",
        programme: generated.card.programme.clone(),
        key_check_value: generated.key.kcv.to_string(),
    }))
}

fn seconds_text(unix_seconds: u64) -> String {
    i64::try_from(unix_seconds)
        .ok()
        .and_then(rfc3339)
        .unwrap_or_default()
}

async fn set_enrollment(
    state: AppState,
    auth: Authenticated,
    note: AuditNote,
    body: Bytes,
    enrol: bool,
) -> ApiResult<EnrollmentResponse> {
    let request: CardRequest = parse(&body)?;
    let card = request.card()?;
    note.pan(&card.pan);
    let status = state
        .service()
        .set_enrollment(&caller(&auth), &card, enrol)
        .await?;
    note.card(&status.card);
    Ok(Json(EnrollmentResponse::from_status(&status)))
}

/// Enrol a card in dynamic CVV2 (idempotent); its static CVV2 is declined from then on.
#[utoipa::path(
    post, path = Route::ENROLLMENT.path, tag = "dynamic CVV2",
    request_body = CardRequest,
    responses((status = 200, body = EnrollmentResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn enroll(
    State(state): State<AppState>,
    Extension(auth): Extension<Authenticated>,
    note: AuditNote,
    body: Bytes,
) -> ApiResult<EnrollmentResponse> {
    set_enrollment(state, auth, note, body, true).await
}

/// Unenrol a card (idempotent): its static CVV2 is accepted again.
#[utoipa::path(
    post, path = Route::UNENROLLMENT.path, tag = "dynamic CVV2",
    request_body = CardRequest,
    responses((status = 200, body = EnrollmentResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn unenroll(
    State(state): State<AppState>,
    Extension(auth): Extension<Authenticated>,
    note: AuditNote,
    body: Bytes,
) -> ApiResult<EnrollmentResponse> {
    set_enrollment(state, auth, note, body, false).await
}

/// Is the card enrolled in dynamic CVV2?
#[utoipa::path(
    post, path = Route::ENQUIRY.path, tag = "dynamic CVV2",
    request_body = CardRequest,
    responses((status = 200, body = EnrollmentResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn enquiry(
    State(state): State<AppState>,
    Extension(auth): Extension<Authenticated>,
    note: AuditNote,
    body: Bytes,
) -> ApiResult<EnrollmentResponse> {
    let request: CardRequest = parse(&body)?;
    let card = request.card()?;
    note.pan(&card.pan);
    let status = state.service().enquiry(&caller(&auth), &card).await?;
    note.card(&status.card);
    Ok(Json(EnrollmentResponse::from_status(&status)))
}

/// Authorization-time CVV2 check: dynamic rules for an enrolled card, static CVV2 otherwise.
#[utoipa::path(
    post, path = Route::CVV2_VERIFICATION.path, tag = "verification",
    request_body = Cvv2VerificationRequest,
    responses((status = 200, body = VerificationResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn verify_cvv2(
    State(state): State<AppState>,
    Extension(auth): Extension<Authenticated>,
    note: AuditNote,
    body: Bytes,
) -> ApiResult<VerificationResponse> {
    let request: Cvv2VerificationRequest = parse(&body)?;
    let (card, cvv2) = request.parse()?;
    note.pan(&card.pan);
    let verification = state
        .service()
        .verify_cvv2(&caller(&auth), &card, cvv2)
        .await?;
    note.card(&verification.card);
    note.key(&verification.key);
    note.verdict(verification.reason);
    Ok(Json(VerificationResponse::from_verification(&verification)))
}

/// Static CVV / CVV2 / iCVV, for card embossing.
#[utoipa::path(
    post, path = Route::SECURITY_CODES.path, tag = "static codes",
    request_body = SecurityCodeRequest,
    responses((status = 200, body = SecurityCodeResponse), (status = "4XX", body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("hmac" = []))
)]
pub async fn security_code(
    State(state): State<AppState>,
    Extension(auth): Extension<Authenticated>,
    note: AuditNote,
    body: Bytes,
) -> ApiResult<SecurityCodeResponse> {
    let request: SecurityCodeRequest = parse(&body)?;
    let (card, kind, digits) = request.parse()?;
    note.pan(&card.pan);
    let issued = state
        .service()
        .security_code(&caller(&auth), &card, kind, digits)
        .await?;
    note.card(&issued.card);
    note.key(&issued.key);
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
pub async fn verify_dcvv(
    State(state): State<AppState>,
    Extension(auth): Extension<Authenticated>,
    note: AuditNote,
    body: Bytes,
) -> ApiResult<VerificationResponse> {
    let request: DcvvVerificationRequest = parse(&body)?;
    let (card, service_code, atc, dcvv) = request.parse()?;
    note.pan(&card.pan);
    let verification = state
        .service()
        .verify_dcvv(&caller(&auth), &card, service_code, atc, dcvv)
        .await?;
    note.card(&verification.card);
    note.key(&verification.key);
    note.verdict(verification.reason);
    Ok(Json(VerificationResponse::from_verification(&verification)))
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
