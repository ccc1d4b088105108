//! Card data as domain types: parsed once at the edge, never raw strings inside.
//!
//! `Pan` and `SecurityCode` hold secrets: they zeroize on drop and their `Debug`
//! and `Display` show a masked PAN (first 6, last 4) or `***` (STYLE 6).

use std::fmt;
use std::str::FromStr;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::DomainError;

fn invalid(field: &'static str, reason: &'static str) -> DomainError {
    DomainError::Invalid { field, reason }
}

fn all_digits(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit())
}

/// A primary account number: 12–19 decimal digits.
#[derive(Clone)]
pub struct Pan(Zeroizing<String>);

impl Pan {
    /// The digits. Only the engine's block packing should need them.
    pub fn digits(&self) -> &str {
        &self.0
    }

    /// Number of digits.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a PAN has at least 12 digits.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the last digit is the Luhn check digit of the others (the HTTP API
    /// requires it; the engine does not, DESIGN 4 and vectors).
    pub fn is_luhn_valid(&self) -> bool {
        let sum: u32 = self
            .0
            .bytes()
            .rev()
            .enumerate()
            .map(|(i, b)| {
                let d = u32::from(b - b'0');
                if i % 2 == 1 {
                    let d2 = d * 2;
                    if d2 > 9 { d2 - 9 } else { d2 }
                } else {
                    d
                }
            })
            .sum();
        sum.is_multiple_of(10)
    }

    /// First 6 and last 4 digits, the rest as `*` (DESIGN 7.1).
    pub fn masked(&self) -> String {
        let d = self.0.as_str();
        let stars = "*".repeat(d.len().saturating_sub(10));
        format!("{}{stars}{}", &d[..6], &d[d.len() - 4..])
    }
}

impl FromStr for Pan {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if (12..=19).contains(&s.len()) && all_digits(s) {
            Ok(Pan(Zeroizing::new(s.to_owned())))
        } else {
            Err(invalid("cardNumber", "must be 12 to 19 digits"))
        }
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pan({})", self.masked())
    }
}

impl fmt::Display for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

macro_rules! digit_field {
    ($(#[$doc:meta])* $name:ident, $len:expr, $field:literal, $reason:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $name([u8; $len]);

        impl $name {
            /// The digits as text.
            pub fn as_str(&self) -> &str {
                // Constructed only from ASCII digits.
                std::str::from_utf8(&self.0).unwrap_or_default()
            }

            /// The digits as ASCII bytes.
            pub fn bytes(&self) -> [u8; $len] {
                self.0
            }
        }

        impl FromStr for $name {
            type Err = DomainError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let check: fn(&str) -> bool = $check;
                match <[u8; $len]>::try_from(s.as_bytes()) {
                    Ok(bytes) if check(s) => Ok($name(bytes)),
                    _ => Err(invalid($field, $reason)),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

digit_field!(
    /// Card expiry, `YYMM`.
    Expiry, 4, "expiryDate", "must be YYMM",
    |s| all_digits(s) && matches!(&s[2..], "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12")
);
digit_field!(
    /// Service code: 3 digits (CVV2 uses `000`, iCVV `999`).
    ServiceCode, 3, "serviceCode", "must be 3 digits", all_digits
);
digit_field!(
    /// PAN sequence number: 2 digits, `00` when the card has none.
    Psn, 2, "panSequenceNumber", "must be 2 digits", all_digits
);
digit_field!(
    /// Application transaction counter of a contactless dCVV: 4 hex characters.
    Atc, 4, "atc", "must be 4 hex characters",
    |s| s.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
);

impl Atc {
    /// The counter as its 2 bytes (tag 9F36).
    pub fn binary(self) -> [u8; 2] {
        let b = self.bytes();
        let nibble = |c: u8| {
            if c.is_ascii_digit() {
                c - b'0'
            } else {
                c - b'A' + 10
            }
        };
        [
            (nibble(b[0]) << 4) | nibble(b[1]),
            (nibble(b[2]) << 4) | nibble(b[3]),
        ]
    }
}

impl ServiceCode {
    /// The service code of CVV2 (DESIGN 2.1).
    pub const CVV2: ServiceCode = ServiceCode(*b"000");
    /// The service code of iCVV (DESIGN 2.1).
    pub const ICVV: ServiceCode = ServiceCode(*b"999");
}

impl Psn {
    /// `00`: no PAN sequence number.
    pub const NONE: Psn = Psn(*b"00");
}

impl Default for Psn {
    fn default() -> Self {
        Psn::NONE
    }
}

/// Number of digits of a code: 3 to 5 (DESIGN 2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLength(u8);

impl CodeLength {
    /// Three digits, the usual length.
    pub const THREE: CodeLength = CodeLength(3);

    /// The length.
    pub fn get(self) -> usize {
        usize::from(self.0)
    }
}

impl TryFrom<u8> for CodeLength {
    type Error = DomainError;

    fn try_from(n: u8) -> Result<Self, Self::Error> {
        if (3..=5).contains(&n) {
            Ok(CodeLength(n))
        } else {
            Err(invalid("digits", "must be 3 to 5"))
        }
    }
}

/// A card security code (CVV, CVV2, iCVV, dCVV, dCVV2). Compared in constant
/// time; never printed.
#[derive(Clone)]
pub struct SecurityCode(Zeroizing<String>);

impl SecurityCode {
    /// Wraps decimal digits produced by the engine or typed by a cardholder.
    ///
    /// # Errors
    /// `Invalid` unless 3 to 5 digits.
    pub fn parse(field: &'static str, s: &str) -> Result<Self, DomainError> {
        if (3..=5).contains(&s.len()) && all_digits(s) {
            Ok(SecurityCode(Zeroizing::new(s.to_owned())))
        } else {
            Err(invalid(field, "must be 3 to 5 digits"))
        }
    }

    pub(crate) fn from_digits(digits: Zeroizing<String>) -> Self {
        SecurityCode(digits)
    }

    /// The digits, for the response that hands the code to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison (STYLE 9).
    pub fn matches(&self, other: &SecurityCode) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl fmt::Debug for SecurityCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecurityCode(***)")
    }
}

/// A card programme's TDCVV2-v1 parameters (DESIGN 2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tdcvv2Profile {
    window_seconds: u32,
    past_windows: u32,
    future_windows: u32,
}

impl Tdcvv2Profile {
    /// Most past or future windows a verification may accept.
    pub const MAX_TOLERANCE: u32 = 24;

    /// A profile with window W (60–64 800 s), G past and F future windows accepted.
    ///
    /// # Errors
    /// `Invalid` when a parameter is out of range.
    pub fn new(
        window_seconds: u32,
        past_windows: u32,
        future_windows: u32,
    ) -> Result<Self, DomainError> {
        if !(60..=64_800).contains(&window_seconds) {
            return Err(invalid("windowSeconds", "must be 60 to 64800"));
        }
        if past_windows > Self::MAX_TOLERANCE || future_windows > Self::MAX_TOLERANCE {
            return Err(invalid("windows", "at most 24 past and 24 future windows"));
        }
        Ok(Tdcvv2Profile {
            window_seconds,
            past_windows,
            future_windows,
        })
    }

    /// W in seconds.
    pub fn window_seconds(&self) -> u32 {
        self.window_seconds
    }

    /// G.
    pub fn past_windows(&self) -> u32 {
        self.past_windows
    }

    /// F.
    pub fn future_windows(&self) -> u32 {
        self.future_windows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pan_is_masked_everywhere() {
        let pan: Pan = "4123456789012345".parse().unwrap();
        assert_eq!(pan.masked(), "412345******2345");
        assert_eq!(format!("{pan:?}"), "Pan(412345******2345)");
        assert_eq!(pan.to_string(), "412345******2345");
        let short: Pan = "123456789012".parse().unwrap();
        assert_eq!(short.masked(), "123456**9012");
    }

    #[test]
    fn pan_rejects_bad_input() {
        for bad in [
            "12345678901",
            "12345678901234567890",
            "41234567890123a5",
            "",
        ] {
            assert!(bad.parse::<Pan>().is_err(), "{bad}");
        }
    }

    #[test]
    fn luhn() {
        assert!("4111111111111111".parse::<Pan>().unwrap().is_luhn_valid());
        assert!(!"4111111111111112".parse::<Pan>().unwrap().is_luhn_valid());
        assert!("4000056655665556".parse::<Pan>().unwrap().is_luhn_valid());
    }

    #[test]
    fn fields_parse_strictly() {
        assert!("2812".parse::<Expiry>().is_ok());
        assert!("2813".parse::<Expiry>().is_err());
        assert!("281".parse::<Expiry>().is_err());
        assert!("3210".parse::<Atc>().is_ok());
        assert!("0AFF".parse::<Atc>().is_ok());
        assert!("0aff".parse::<Atc>().is_err());
        assert_eq!("101".parse::<ServiceCode>().unwrap().as_str(), "101");
        assert!("1a1".parse::<ServiceCode>().is_err());
        assert!(CodeLength::try_from(6).is_err());
        assert!(CodeLength::try_from(2).is_err());
    }

    #[test]
    fn codes_compare_in_constant_time_and_hide() {
        let a = SecurityCode::parse("cvv2", "209").unwrap();
        let b = SecurityCode::parse("cvv2", "209").unwrap();
        let c = SecurityCode::parse("cvv2", "208").unwrap();
        assert!(a.matches(&b));
        assert!(!a.matches(&c));
        assert!(!a.matches(&SecurityCode::parse("cvv2", "2090").unwrap()));
        assert_eq!(format!("{a:?}"), "SecurityCode(***)");
    }

    #[test]
    fn profile_bounds() {
        assert!(Tdcvv2Profile::new(59, 1, 0).is_err());
        assert!(Tdcvv2Profile::new(64_801, 1, 0).is_err());
        assert!(Tdcvv2Profile::new(300, 25, 0).is_err());
        assert!(Tdcvv2Profile::new(300, 1, 0).is_ok());
    }
}
