//! Wire types of DESIGN 4 (camelCase JSON) and their one-time conversion into
//! domain types (STYLE 7). Requests refuse unknown fields. A field that fails
//! to parse names itself, never its value. Request types hold raw text only
//! until conversion, and clear PAN and code text is zeroized on drop.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use zeroize::Zeroizing;

use super::clients::Organization;
use crate::domain::service::{
    ArqcVerification, CardData, Cvc3Input, EmvCard, EnrollmentStatus, Method, Reason, ValueCount,
    Verification,
};
use crate::domain::{
    ArpcRequest, ArqcInput, Atc, CodeLength, CryptogramVersion, DomainError, Padding, Pan, Psn,
    SecurityCode, ServiceCode, StaticCodeKind,
};

fn invalid(field: &'static str, reason: &'static str) -> DomainError {
    DomainError::Invalid { field, reason }
}

/// Whether a PAN must pass the Luhn check. The EMV checks (CVC3, ARQC) take
/// the PAN as card key derivation data, as payShield `KQ`/`PM` and AWS Payment
/// Cryptography do: a wrong PAN derives another key and declines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Luhn {
    Required,
    NotRequired,
}

/// Parses the card fields common to every `/cards/...` request.
fn parse_card_with(
    luhn: Luhn,
    card_number: &str,
    expiry_date: &str,
    key_association: Option<&String>,
    pan_sequence_number: Option<&String>,
) -> Result<CardData, DomainError> {
    let card = parse_emv_card(luhn, card_number, key_association, pan_sequence_number)?;
    Ok(CardData {
        pan: card.pan,
        expiry: expiry_date.parse()?,
        psn: card.psn,
        key_association: card.key_association,
    })
}

/// The card fields without the expiry.
fn parse_emv_card(
    luhn: Luhn,
    card_number: &str,
    key_association: Option<&String>,
    pan_sequence_number: Option<&String>,
) -> Result<EmvCard, DomainError> {
    let pan: Pan = card_number.parse()?;
    if luhn == Luhn::Required && !pan.is_luhn_valid() {
        return Err(invalid("cardNumber", "fails the Luhn check"));
    }
    let psn = match pan_sequence_number {
        Some(text) => text.parse::<Psn>()?,
        None => Psn::NONE,
    };
    if let Some(a) = key_association
        && (a.is_empty() || a.len() > 64)
    {
        return Err(invalid("keyAssociation", "must be 1 to 64 characters"));
    }
    Ok(EmvCard {
        pan,
        psn,
        key_association: key_association.cloned(),
    })
}

/// Hex text (either case) of `field`, `bytes` bytes long.
fn hex_bytes(
    field: &'static str,
    text: &str,
    bytes: std::ops::RangeInclusive<usize>,
    reason: &'static str,
) -> Result<Zeroizing<Vec<u8>>, DomainError> {
    let decoded = Zeroizing::new(hex::decode(text).map_err(|_| invalid(field, reason))?);
    if !bytes.contains(&decoded.len()) {
        return Err(invalid(field, reason));
    }
    Ok(decoded)
}

/// Hex text (either case) of exactly `N` bytes.
fn hex_array<const N: usize>(
    field: &'static str,
    text: &str,
    reason: &'static str,
) -> Result<[u8; N], DomainError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).map_err(|_| invalid(field, reason))?;
    Ok(out)
}

/// An unpredictable number: 8 hex characters, or 1–7 decimal digits (the
/// numeric UN a contactless card's track carries) left-padded with zeros to
/// 8 BCD digits. (8 decimal digits read as hex give the same bytes.)
fn unpredictable_number(text: &str) -> Result<[u8; 4], DomainError> {
    const REASON: &str = "must be 8 hex characters or 1 to 7 decimal digits";
    if (1..8).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit()) {
        return hex_array("unpredictableNumber", &format!("{text:0>8}"), REASON);
    }
    hex_array("unpredictableNumber", text, REASON)
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
                self.card_with(Luhn::Required)
            }

            #[allow(dead_code, reason = "only the EMV requests waive the Luhn check")]
            fn card_with(&self, luhn: Luhn) -> Result<CardData, DomainError> {
                parse_card_with(
                    luhn,
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
        /// The portal's switch: `Y` resets the card to its static CVV2
        /// (unenrols it) and returns no values; `N` or absent generates.
        #[serde(default, rename = "disableDCVV2")]
        #[schema(example = "N")]
        disable_dcvv2: Option<String>,
        /// The issuer organisation, 1 to 3 digits (a string, or a number as
        /// some portal integrations send it); recorded in the audit. A client
        /// restricted to organisations must name one of its own.
        #[serde(default)]
        #[schema(value_type = Option<String>, example = "001")]
        organization_number: Option<Digits>,
    }
);

/// A field of digits sent as a JSON string or as a JSON number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Digits {
    /// `"001"`.
    Text(String),
    /// `1`.
    Number(u64),
}

/// A dynamic-values request, parsed.
#[derive(Debug)]
pub struct DynamicValuesCall {
    /// The card.
    pub card: CardData,
    /// How many values.
    pub count: ValueCount,
    /// Where the request came from, when said.
    pub channel: Option<Channel>,
    /// The organisation, when named.
    pub organization: Option<Organization>,
    /// `disableDCVV2 = "Y"`: unenrol instead of generating.
    pub disable: bool,
}

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
    pub fn parse(&self) -> Result<DynamicValuesCall, DomainError> {
        let card = self.card()?;
        let count = ValueCount::try_from(self.number_of_values.unwrap_or(1))?;
        let channel = match self.channel.as_deref() {
            None => None,
            Some("I") => Some(Channel::Ivr),
            Some("A") => Some(Channel::Atm),
            Some("W") => Some(Channel::Web),
            Some(_) => return Err(invalid("channel", "must be I, A or W")),
        };
        let disable = match self.disable_dcvv2.as_deref() {
            None | Some("N") => false,
            Some("Y") => true,
            Some(_) => return Err(invalid("disableDCVV2", "must be Y or N")),
        };
        const DIGITS: &str = "must be 1 to 3 decimal digits";
        let organization = match &self.organization_number {
            None => None,
            Some(Digits::Text(text)) => {
                Some(Organization::parse(text).ok_or(invalid("organizationNumber", DIGITS))?)
            }
            Some(Digits::Number(n)) => Some(
                Organization::parse(&n.to_string()).ok_or(invalid("organizationNumber", DIGITS))?,
            ),
        };
        Ok(DynamicValuesCall {
            card,
            count,
            channel,
            organization,
            disable,
        })
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

card_request!(
    /// `POST /cards/cvc3/verification`: Mastercard contactless CVC3 (dCVC3).
    Cvc3VerificationRequest {
        /// The data the card MACs for IVCVC3, hex: the track 2 equivalent data
        /// (e.g. `5123…D3512…0F`) or the track 1 discretionary data, 1–128 bytes.
        #[schema(value_type = String, example = "5123456789012345D35121010000000000000F")]
        track_data: Zeroizing<String>,
        /// Unpredictable number: 8 hex characters, or the numeric UN of the
        /// track (1–7 decimal digits, left-padded with zeros).
        #[schema(value_type = String, example = "00000899")]
        unpredictable_number: Zeroizing<String>,
        /// Application transaction counter, 4 hex characters.
        #[schema(example = "005E")]
        atc: String,
        /// The CVC3 read from the track, 3–5 digits (its rightmost digits).
        #[schema(value_type = String, example = "29488")]
        cvc3: Zeroizing<String>,
    }
);

impl Cvc3VerificationRequest {
    /// Parses the request. The PAN is not Luhn-checked: it is card key derivation data.
    ///
    /// # Errors
    /// `Invalid` naming the first bad field.
    pub fn parse(&self) -> Result<(CardData, Cvc3Input), DomainError> {
        let card = self.card_with(Luhn::NotRequired)?;
        let track_data = hex_bytes(
            "trackData",
            &self.track_data,
            1..=128,
            "must be 1 to 128 bytes of hex",
        )?;
        let unpredictable_number = unpredictable_number(&self.unpredictable_number)?;
        let atc = self.atc.to_ascii_uppercase().parse::<Atc>()?.binary();
        if !(3..=5).contains(&self.cvc3.len()) || !self.cvc3.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("cvc3", "must be 3 to 5 digits"));
        }
        Ok((
            card,
            Cvc3Input {
                track_data,
                unpredictable_number,
                atc,
                cvc3: self.cvc3.clone(),
            },
        ))
    }
}

/// `POST /cards/arqc/verification`: an EMV authorization request cryptogram,
/// and optionally the ARPC. The card fields without an expiry.
/// `Debug` shows no field: they hold a PAN and card data.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArqcVerificationRequest {
    /// PAN, 12–19 digits (card key derivation data; no Luhn check).
    #[schema(value_type = String, example = "1234567890123456")]
    card_number: Zeroizing<String>,
    /// 2 digits, default `00`.
    #[serde(default)]
    pan_sequence_number: Option<String>,
    /// Selects the card programme; otherwise the longest matching BIN prefix does.
    #[serde(default)]
    key_association: Option<String>,
    /// `visa-cvn10`, `visa-cvn18`, `visa-cvn22`, `mastercard-cvn16`,
    /// `mastercard-cvn17`, `mastercard-cvn20`, `mastercard-cvn21` or
    /// `emv-common-session-key`.
    #[schema(example = "visa-cvn18")]
    cryptogram_version: String,
    /// The data the card MACed, hex, unpadded: the CDOL1 data in card order,
    /// with the issuer application data where the version MACs it
    /// (CVN 18 / 22: the whole IAD). 1–255 bytes.
    #[schema(value_type = String)]
    transaction_data: Zeroizing<String>,
    /// `iso9797-1-method-1` or `iso9797-1-method-2`; default: the version's
    /// (method 1 for Visa CVN 10, method 2 for the others).
    #[serde(default)]
    padding: Option<String>,
    /// Application transaction counter, 4 hex characters.
    #[schema(example = "001C")]
    atc: String,
    /// 8 hex characters; required by `mastercard-cvn16` / `mastercard-cvn17`
    /// (the session key derivation), ignored by the others.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    unpredictable_number: Option<Zeroizing<String>>,
    /// The ARQC, 16 hex characters.
    #[schema(value_type = String, example = "7A788EA6B8A3E733")]
    arqc: Zeroizing<String>,
    /// Authorization response code, 4 hex characters: asks for an ARPC by
    /// method 1 (versions 10, 16, 17, 20, 21 and the common session key).
    #[serde(default)]
    arc: Option<String>,
    /// Card status update, 8 hex characters: asks for an ARPC by method 2
    /// (versions 18, 22 and the common session key).
    #[serde(default)]
    csu: Option<String>,
    /// Proprietary authentication data for method 2, 0–8 bytes of hex.
    #[serde(default)]
    proprietary_authentication_data: Option<String>,
}

impl std::fmt::Debug for ArqcVerificationRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArqcVerificationRequest")
            .field("cryptogram_version", &self.cryptogram_version)
            .finish_non_exhaustive()
    }
}

impl ArqcVerificationRequest {
    /// Parses the request; the combination of fields the version needs is
    /// checked by the service ([`ArqcInput::check`]).
    ///
    /// # Errors
    /// `Invalid` naming the first bad field.
    pub fn parse(&self) -> Result<(EmvCard, ArqcInput), DomainError> {
        let card = parse_emv_card(
            Luhn::NotRequired,
            &self.card_number,
            self.key_association.as_ref(),
            self.pan_sequence_number.as_ref(),
        )?;
        let version = CryptogramVersion::parse(&self.cryptogram_version)?;
        let transaction_data = hex_bytes(
            "transactionData",
            &self.transaction_data,
            1..=255,
            "must be 1 to 255 bytes of hex",
        )?;
        let padding = match self.padding.as_deref() {
            None => version.default_padding(),
            Some(text) => [Padding::Method1, Padding::Method2]
                .into_iter()
                .find(|p| p.as_str() == text)
                .ok_or_else(|| {
                    invalid(
                        "padding",
                        "must be iso9797-1-method-1 or iso9797-1-method-2",
                    )
                })?,
        };
        let atc = self.atc.to_ascii_uppercase().parse::<Atc>()?.binary();
        let unpredictable_number = self
            .unpredictable_number
            .as_deref()
            .map(|text| hex_array("unpredictableNumber", text, "must be 8 hex characters"))
            .transpose()?;
        let arqc = hex_array("arqc", &self.arqc, "must be 16 hex characters")?;
        let arpc = match (&self.arc, &self.csu, &self.proprietary_authentication_data) {
            (None, None, None) => None,
            (Some(arc), None, None) => Some(ArpcRequest::Method1 {
                arc: hex_array("arc", arc, "must be 4 hex characters")?,
            }),
            (None, Some(csu), proprietary) => Some(ArpcRequest::Method2 {
                csu: hex_array("csu", csu, "must be 8 hex characters")?,
                proprietary: match proprietary {
                    Some(text) => hex_bytes(
                        "proprietaryAuthenticationData",
                        text,
                        0..=8,
                        "must be 0 to 8 bytes of hex",
                    )?
                    .to_vec(),
                    None => Vec::new(),
                },
            }),
            (Some(_), Some(_), _) => {
                return Err(invalid(
                    "csu",
                    "asks for method 2; arc asks for method 1: send one",
                ));
            }
            (Some(_) | None, None, Some(_)) => {
                return Err(invalid(
                    "proprietaryAuthenticationData",
                    "belongs to method 2: send it with csu",
                ));
            }
        };
        Ok((
            card,
            ArqcInput {
                version,
                transaction_data,
                padding,
                atc,
                unpredictable_number,
                arqc,
                arpc,
            },
        ))
    }
}

/// Answer of `POST /cards/arqc/verification`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArqcVerificationResponse {
    /// `approved` or `declined`.
    pub result: &'static str,
    /// `match` or `mismatch`.
    pub reason: &'static str,
    /// `arqc`.
    pub method: &'static str,
    /// The ARPC, hex (16 characters by method 1, 8 by method 2): only when
    /// `arc` or `csu` was sent and the ARQC matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arpc: Option<String>,
}

impl ArqcVerificationResponse {
    /// From the domain's verification.
    pub fn from_verification(v: &ArqcVerification) -> Self {
        let VerificationResponse {
            result,
            reason,
            method,
        } = VerificationResponse::from_verification(&v.verification);
        ArqcVerificationResponse {
            result,
            reason,
            method,
            arpc: v.arpc.as_ref().map(hex::encode_upper),
        }
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
    /// The current value (the first of `values`); absent with `disableDCVV2 = "Y"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dcvv2: Option<String>,
    /// When the values were computed, RFC 3339 UTC; absent with `disableDCVV2 = "Y"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dcvv2_generation_time: Option<String>,
    /// Whole minutes, rounded up, until the first value's `validUntil`;
    /// absent with `disableDCVV2 = "Y"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dcvv2_expiry_minutes: Option<u64>,
    /// The values, current window first; empty with `disableDCVV2 = "Y"`.
    pub values: Vec<DynamicValue>,
    /// `enrolled` after a generation, `not_enrolled` after `disableDCVV2 = "Y"`.
    pub enrollment: &'static str,
    /// With `disableDCVV2 = "Y"`: whether the card was enrolled until this request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// The card programme.
    pub programme: String,
    /// KCV of the IMK-TDCVV2 used; absent with `disableDCVV2 = "Y"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_check_value: Option<String>,
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
    /// `dynamic`, `static`, `dcvv` or `cvc3`.
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
                Method::Cvc3 => "cvc3",
                Method::Arqc => "arqc",
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
        let call = r.parse().unwrap();
        assert_eq!(call.count, ValueCount::try_from(24).unwrap());
        assert_eq!(call.channel, Some(Channel::Web));
        assert_eq!((call.organization, call.disable), (None, false));
        for (fields, organization, disable) in [
            (r#""disableDCVV2":"Y""#, None, true),
            (
                r#""disableDCVV2":"N","organizationNumber":"7""#,
                Organization::parse("007"),
                false,
            ),
            (
                r#""organizationNumber":"001""#,
                Organization::parse("1"),
                false,
            ),
            (
                r#""organizationNumber":999"#,
                Organization::parse("999"),
                false,
            ),
        ] {
            let r: DynamicValuesRequest = parse(&format!(
                r#"{{"cardNumber":"4123450000000001","expiryDate":"3012",{fields}}}"#
            ))
            .unwrap();
            let call = r.parse().unwrap();
            assert_eq!(
                (call.organization, call.disable),
                (organization, disable),
                "{fields}"
            );
        }
        for (fields, field) in [
            (r#""disableDCVV2":"y""#, "disableDCVV2"),
            (r#""disableDCVV2":"""#, "disableDCVV2"),
            (r#""organizationNumber":"""#, "organizationNumber"),
            (r#""organizationNumber":"1000""#, "organizationNumber"),
            (r#""organizationNumber":"12a""#, "organizationNumber"),
            (r#""organizationNumber":" 12""#, "organizationNumber"),
            (r#""organizationNumber":1000"#, "organizationNumber"),
        ] {
            let r: DynamicValuesRequest = parse(&format!(
                r#"{{"cardNumber":"4123450000000001","expiryDate":"3012",{fields}}}"#
            ))
            .unwrap();
            assert!(
                matches!(r.parse().unwrap_err(), DomainError::Invalid { field: f, .. } if f == field),
                "{fields}"
            );
        }
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
