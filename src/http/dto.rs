//! Wire types of DESIGN 4 (camelCase JSON) and their one-time conversion into
//! domain types (STYLE 7). Requests refuse unknown fields. A field that fails
//! to parse names itself, never its value. Request types hold raw text only
//! until conversion, and clear PAN and code text is zeroized on drop.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zeroize::Zeroizing;

use crate::domain::service::{
    CardData, EnrollmentStatus, Method, Reason, ValueCount, Verification,
};
use crate::domain::{
    Atc, CodeLength, DomainError, Expiry, Pan, Psn, SecurityCode, ServiceCode, StaticCodeKind,
};

fn invalid(field: &'static str, reason: &'static str) -> DomainError {
    DomainError::Invalid { field, reason }
}

/// Parses the card fields common to every `/cards/...` request.
fn parse_card(
    card_number: &str,
    expiry_date: &str,
    key_association: Option<&String>,
    pan_sequence_number: Option<&String>,
) -> Result<CardData, DomainError> {
    let pan: Pan = card_number.parse()?;
    if !pan.is_luhn_valid() {
        return Err(invalid("cardNumber", "fails the Luhn check"));
    }
    let expiry: Expiry = expiry_date.parse()?;
    let psn = match pan_sequence_number {
        Some(text) => text.parse::<Psn>()?,
        None => Psn::NONE,
    };
    if let Some(a) = key_association
        && (a.is_empty() || a.len() > 64)
    {
        return Err(invalid("keyAssociation", "must be 1 to 64 characters"));
    }
    Ok(CardData {
        pan,
        expiry,
        psn,
        key_association: key_association.cloned(),
    })
}

/// Declares a `/cards/...` request: the common card fields plus its own.
/// (serde's `flatten` cannot be combined with `deny_unknown_fields`.)
/// `Debug` shows no field: they hold a PAN and possibly a code.
macro_rules! card_request {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Deserialize, ToSchema)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            /// PAN, 12–19 digits, Luhn-checked.
            #[schema(value_type = String, example = "4123450000000001")]
            card_number: Zeroizing<String>,
            /// Expiry `YYMM`.
            #[schema(example = "3012")]
            expiry_date: String,
            /// Selects the card programme; otherwise the longest matching BIN prefix does.
            #[serde(default)]
            key_association: Option<String>,
            /// 2 digits, default `00`.
            #[serde(default)]
            pan_sequence_number: Option<String>,
            $($(#[$fmeta])* $field: $ty,)*
        }

        impl $name {
            /// The card fields, parsed.
            ///
            /// # Errors
            /// `Invalid` naming the first bad field.
            pub fn card(&self) -> Result<CardData, DomainError> {
                parse_card(
                    &self.card_number,
                    &self.expiry_date,
                    self.key_association.as_ref(),
                    self.pan_sequence_number.as_ref(),
                )
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name)).finish_non_exhaustive()
            }
        }
    };
}

card_request!(
    /// `POST /cards/pin/dynamic-values`.
    DynamicValuesRequest {
        /// 1–24, default 1.
        #[serde(default)]
        number_of_values: Option<u32>,
        /// `I` IVR, `A` ATM, `W` web; recorded in the audit.
        #[serde(default)]
        channel: Option<String>,
    }
);

/// Where a dynamic-value request came from (DESIGN 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// IVR.
    Ivr,
    /// ATM.
    Atm,
    /// Web / app.
    Web,
}

impl Channel {
    /// The wire letter (recorded in the audit trail).
    pub fn letter(self) -> &'static str {
        match self {
            Channel::Ivr => "I",
            Channel::Atm => "A",
            Channel::Web => "W",
        }
    }
}

impl DynamicValuesRequest {
    /// Parses the request.
    ///
    /// # Errors
    /// `Invalid` naming the first bad field.
    pub fn parse(&self) -> Result<(CardData, ValueCount, Option<Channel>), DomainError> {
        let card = self.card()?;
        let count = ValueCount::try_from(self.number_of_values.unwrap_or(1))?;
        let channel = match self.channel.as_deref() {
            None => None,
            Some("I") => Some(Channel::Ivr),
            Some("A") => Some(Channel::Atm),
            Some("W") => Some(Channel::Web),
            Some(_) => return Err(invalid("channel", "must be I, A or W")),
        };
        Ok((card, count, channel))
    }
}

card_request!(
    /// Enrolment, unenrolment and enquiry: the card fields only.
    CardRequest {}
);

card_request!(
    /// `POST /cards/cvv2/verification`.
    Cvv2VerificationRequest {
        /// The 3 digits the cardholder typed.
        #[schema(value_type = String, example = "209")]
        cvv2: Zeroizing<String>,
    }
);

fn three_digits(field: &'static str, text: &str) -> Result<SecurityCode, DomainError> {
    if text.len() != 3 {
        return Err(invalid(field, "must be 3 digits"));
    }
    SecurityCode::parse(field, text)
}

impl Cvv2VerificationRequest {
    /// Parses the request.
    ///
    /// # Errors
    /// `Invalid` naming the first bad field.
    pub fn parse(&self) -> Result<(CardData, SecurityCode), DomainError> {
        Ok((self.card()?, three_digits("cvv2", &self.cvv2)?))
    }
}

card_request!(
    /// `POST /cards/security-codes`.
    SecurityCodeRequest {
        /// `cvv`, `cvv2` or `icvv`.
        #[schema(example = "cvv2")]
        kind: String,
        /// 3 digits; required for `cvv`, refused for the others.
        #[serde(default)]
        service_code: Option<String>,
        /// 3–5, default 3.
        #[serde(default)]
        digits: Option<u8>,
    }
);

impl SecurityCodeRequest {
    /// Parses the request.
    ///
    /// # Errors
    /// `Invalid` naming the first bad field.
    pub fn parse(&self) -> Result<(CardData, StaticCodeKind, CodeLength), DomainError> {
        let card = self.card()?;
        let kind = match (self.kind.as_str(), &self.service_code) {
            ("cvv", Some(sc)) => StaticCodeKind::Cvv(sc.parse::<ServiceCode>()?),
            ("cvv", None) => return Err(invalid("serviceCode", "is required for kind cvv")),
            ("cvv2", None) => StaticCodeKind::Cvv2,
            ("icvv", None) => StaticCodeKind::Icvv,
            ("cvv2" | "icvv", Some(_)) => {
                return Err(invalid(
                    "serviceCode",
                    "is fixed for cvv2 and icvv; leave it out",
                ));
            }
            _ => return Err(invalid("kind", "must be cvv, cvv2 or icvv")),
        };
        let digits = CodeLength::try_from(self.digits.unwrap_or(3))?;
        Ok((card, kind, digits))
    }
}

card_request!(
    /// `POST /cards/dcvv/verification`.
    DcvvVerificationRequest {
        /// The card's service code, 3 digits.
        service_code: String,
        /// Application transaction counter, 4 hex characters.
        #[schema(example = "005E")]
        atc: String,
        /// The dCVV read from the card, 3 digits.
        #[schema(value_type = String)]
        dcvv: Zeroizing<String>,
    }
);

impl DcvvVerificationRequest {
    /// Parses the request.
    ///
    /// # Errors
    /// `Invalid` naming the first bad field.
    pub fn parse(&self) -> Result<(CardData, ServiceCode, Atc, SecurityCode), DomainError> {
        Ok((
            self.card()?,
            self.service_code.parse()?,
            self.atc.to_ascii_uppercase().parse()?,
            three_digits("dcvv", &self.dcvv)?,
        ))
    }
}

/// One dynamic value.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DynamicValue {
    /// The dCVV2.
    pub dcvv2: String,
    /// Start of validity, RFC 3339 UTC.
    pub valid_from: String,
    /// End of validity (exclusive), RFC 3339 UTC.
    pub valid_until: String,
}

/// Answer of `POST /cards/pin/dynamic-values`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DynamicValuesResponse {
    /// Masked PAN (first 6, last 4).
    pub card_number: String,
    /// The current value (the first of `values`).
    pub dcvv2: String,
    /// When the values were computed, RFC 3339 UTC.
    pub dcvv2_generation_time: String,
    /// Whole minutes, rounded up, until the first value's `validUntil`.
    pub dcvv2_expiry_minutes: u64,
    /// The values, current window first.
    pub values: Vec<DynamicValue>,
    /// Always `enrolled` after a generation.
    pub enrollment: &'static str,
    /// The card programme.
    pub programme: String,
    /// KCV of the IMK-TDCVV2 used.
    pub key_check_value: String,
}

/// Answer of enrolment, unenrolment and enquiry.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentResponse {
    /// Masked PAN.
    pub card_number: String,
    /// `enrolled` or `not_enrolled`.
    pub enrollment: &'static str,
    /// Whether this request changed it.
    pub changed: bool,
    /// When the card was enrolled, RFC 3339 UTC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrolled_at: Option<String>,
    /// The card programme.
    pub programme: String,
}

impl EnrollmentResponse {
    /// From the domain's status.
    pub fn from_status(status: &EnrollmentStatus) -> Self {
        EnrollmentResponse {
            card_number: status.card.masked_pan.clone(),
            enrollment: if status.enrolled {
                "enrolled"
            } else {
                "not_enrolled"
            },
            changed: status.changed,
            enrolled_at: status.enrolled_at.and_then(rfc3339),
            programme: status.card.programme.clone(),
        }
    }
}

/// Answer of a verification: a business result, never the expected value.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerificationResponse {
    /// `approved` or `declined`.
    pub result: &'static str,
    /// `match`, `mismatch`, `static_cvv2_disabled`, `code_already_used` or `too_many_failures`.
    pub reason: &'static str,
    /// `dynamic`, `static` or `dcvv`.
    pub method: &'static str,
}

impl VerificationResponse {
    /// From the domain's verification.
    pub fn from_verification(v: &Verification) -> Self {
        VerificationResponse {
            result: if v.reason.approved() {
                "approved"
            } else {
                "declined"
            },
            reason: match v.reason {
                Reason::Match => "match",
                Reason::Mismatch => "mismatch",
                Reason::StaticCvv2Disabled => "static_cvv2_disabled",
                Reason::CodeAlreadyUsed => "code_already_used",
                Reason::TooManyFailures => "too_many_failures",
            },
            method: match v.method {
                Method::Dynamic => "dynamic",
                Method::Static => "static",
                Method::Dcvv => "dcvv",
            },
        }
    }
}

/// Answer of `POST /cards/security-codes`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityCodeResponse {
    /// Masked PAN.
    pub card_number: String,
    /// `cvv`, `cvv2` or `icvv`.
    pub kind: &'static str,
    /// The code.
    pub security_code: String,
    /// The card programme.
    pub programme: String,
    /// KCV of the CVK used.
    pub key_check_value: String,
}

/// One key of `GET /keys`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyEntry {
    /// Label.
    pub label: String,
    /// `cvk`, `imk-dcvv`, `imk-tdcvv2`, `pan-index`, `audit-seal`.
    pub kind: &'static str,
    /// `main` or `single-des` (a CVK's KA‖KA twin).
    pub role: &'static str,
    /// Version from the label's `-vN` suffix.
    pub version: u32,
    /// KCV, where the token lets it be computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_check_value: Option<String>,
    /// Whether the gateway uses this key now: the PAN-index key, a programme's
    /// current key, or a previous version still in its grace period (for a CVK's
    /// `single-des` twin, as its CVK).
    pub in_use: bool,
    /// Each programme that names this key, and as what (empty when none does).
    pub used_by: Vec<KeyUsedBy>,
    /// Attributes wider than the kind's policy (empty when compliant).
    pub violations: Vec<String>,
    /// CKA_SENSITIVE.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE.
    pub extractable: bool,
    /// CKA_MODIFIABLE.
    pub modifiable: bool,
}

/// How one programme uses a key (key rotation).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyUsedBy {
    /// The programme's name.
    pub programme: String,
    /// `current` (generation and verification) or `previous` (verification
    /// only, until `acceptUntil`).
    pub role: &'static str,
    /// For a previous key: the end of its grace period, RFC 3339 UTC,
    /// exclusive (a verification at or after it no longer tries this key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_until: Option<String>,
}

/// Answer of `GET /keys`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeysResponse {
    /// Token label.
    pub token: String,
    /// Every gateway key in the token.
    pub keys: Vec<KeyEntry>,
}

/// RFC 3339 UTC text of Unix seconds.
pub fn rfc3339(unix_seconds: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
}

/// RFC 3339 UTC text of Unix milliseconds (second precision).
pub fn rfc3339_ms(unix_ms: u64) -> Option<String> {
    rfc3339(i64::try_from(unix_ms / 1000).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn card_fields_parse_and_refuse_by_name() {
        let ok: CardRequest =
            parse(r#"{"cardNumber":"4123450000000001","expiryDate":"3012"}"#).unwrap();
        let card = ok.card().unwrap();
        assert_eq!(card.psn, Psn::NONE);
        let luhn: CardRequest =
            parse(r#"{"cardNumber":"4123450000000004","expiryDate":"3012"}"#).unwrap();
        let err = luhn.card().unwrap_err();
        assert!(matches!(
            err,
            DomainError::Invalid {
                field: "cardNumber",
                ..
            }
        ));
        assert!(!err.to_string().contains("4123"));
        let expiry: CardRequest =
            parse(r#"{"cardNumber":"4123450000000001","expiryDate":"3013"}"#).unwrap();
        assert!(matches!(
            expiry.card().unwrap_err(),
            DomainError::Invalid {
                field: "expiryDate",
                ..
            }
        ));
        assert!(
            parse::<CardRequest>(r#"{"cardNumber":"4123450000000001","expiryDate":"3012","x":1}"#)
                .is_err()
        );
        assert!(
            parse::<CardRequest>(r#"{"cardNumber":4123450000000001,"expiryDate":"3012"}"#).is_err()
        );
    }

    #[test]
    fn counts_channels_kinds() {
        let r: DynamicValuesRequest = parse(
            r#"{"cardNumber":"4123450000000001","expiryDate":"3012","numberOfValues":24,"channel":"W"}"#,
        )
        .unwrap();
        let (_, count, channel) = r.parse().unwrap();
        assert_eq!(count, ValueCount::try_from(24).unwrap());
        assert_eq!(channel, Some(Channel::Web));
        let r: DynamicValuesRequest =
            parse(r#"{"cardNumber":"4123450000000001","expiryDate":"3012","numberOfValues":25}"#)
                .unwrap();
        assert!(matches!(
            r.parse().unwrap_err(),
            DomainError::Invalid {
                field: "numberOfValues",
                ..
            }
        ));
        let s: SecurityCodeRequest =
            parse(r#"{"cardNumber":"4123450000000001","expiryDate":"3012","kind":"cvv"}"#).unwrap();
        assert!(matches!(
            s.parse().unwrap_err(),
            DomainError::Invalid {
                field: "serviceCode",
                ..
            }
        ));
        let s: SecurityCodeRequest =
            parse(r#"{"cardNumber":"4123450000000001","expiryDate":"3012","kind":"cvc3"}"#)
                .unwrap();
        assert!(matches!(
            s.parse().unwrap_err(),
            DomainError::Invalid { field: "kind", .. }
        ));
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(1_767_225_600).unwrap(), "2026-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_ms(1_767_225_600_999).unwrap(),
            "2026-01-01T00:00:00Z"
        );
    }
}
