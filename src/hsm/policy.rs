//! Key kinds, labels, check values, and the attribute policy of DESIGN 3.
//!
//! This module owns what a gateway key may be: its PKCS#11 key type, the single
//! usage it is allowed, and the mechanisms it may be used with; and what the
//! private half of an RSA wrapping key may be (unwrap only, issue 11). It is
//! pure: it reads attribute values handed to it and never calls the token.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::error::{HsmError, KeyInputError};
use super::types::{KeyType, Mechanism};

/// Prefix of `CKA_ID` on every object the gateway owns; the rest names the kind.
pub const ID_PREFIX: &str = "dcvvgw:";
/// Label suffix of the KA‖KA twin object of a CVK (DESIGN 2.1, step 2).
pub const SINGLE_DES_SUFFIX: &str = ":ka";
/// `CKA_ID` of both halves of an RSA wrapping key pair (wrapped key import).
/// No key kind has this name, so `keys list` and the key cache never take it
/// for a gateway secret key.
pub const WRAPPING_KEY_ID: &str = "dcvvgw:wrapping-key";
/// Modulus size of the RSA wrapping keys the gateway generates, and the
/// smallest it uses.
pub const WRAPPING_KEY_BITS: usize = 3072;

/// The kinds of key of DESIGN 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyKind {
    /// Card verification key (TR-31 C0): KA‖KB and KA‖KA, encrypt only.
    Cvk,
    /// Issuer master key for contactless dCVV (E6): derive only.
    ImkDcvv,
    /// Issuer master key for TDCVV2-v1 (E6): derive only.
    ImkTdcvv2,
    /// Issuer master key for EMV application cryptograms, ARQC / ARPC (E0): derive only.
    ImkAc,
    /// Issuer master key for Mastercard CVC3 (E6): derive only.
    ImkCvc3,
    /// Keyed hash of PANs for storage: HMAC sign only.
    PanIndex,
    /// Audit trail seal: HMAC sign and verify.
    AuditSeal,
}

impl KeyKind {
    /// Every kind, in listing order.
    pub const ALL: [KeyKind; 7] = [
        KeyKind::Cvk,
        KeyKind::ImkDcvv,
        KeyKind::ImkTdcvv2,
        KeyKind::ImkAc,
        KeyKind::ImkCvc3,
        KeyKind::PanIndex,
        KeyKind::AuditSeal,
    ];

    /// The name used on the command line and in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Cvk => "cvk",
            KeyKind::ImkDcvv => "imk-dcvv",
            KeyKind::ImkTdcvv2 => "imk-tdcvv2",
            KeyKind::ImkAc => "imk-ac",
            KeyKind::ImkCvc3 => "imk-cvc3",
            KeyKind::PanIndex => "pan-index",
            KeyKind::AuditSeal => "audit-seal",
        }
    }

    /// PKCS#11 key type of the kind's objects.
    pub fn key_type(self) -> KeyType {
        match self {
            KeyKind::Cvk
            | KeyKind::ImkDcvv
            | KeyKind::ImkTdcvv2
            | KeyKind::ImkAc
            | KeyKind::ImkCvc3 => KeyType::Des2,
            KeyKind::PanIndex | KeyKind::AuditSeal => KeyType::GenericSecret,
        }
    }

    /// Length in bytes of the key value (and so of each clear component).
    pub fn key_len(self) -> usize {
        match self {
            KeyKind::Cvk
            | KeyKind::ImkDcvv
            | KeyKind::ImkTdcvv2
            | KeyKind::ImkAc
            | KeyKind::ImkCvc3 => 16,
            KeyKind::PanIndex | KeyKind::AuditSeal => 32,
        }
    }

    /// Whether the kind is a double-length DES key.
    pub fn is_des(self) -> bool {
        self.key_type() == KeyType::Des2
    }

    /// The usage flags the kind needs; every other usage flag must be false.
    pub fn usage(self) -> Usage {
        let none = Usage::default();
        match self {
            KeyKind::Cvk => Usage {
                encrypt: true,
                ..none
            },
            KeyKind::ImkDcvv | KeyKind::ImkTdcvv2 | KeyKind::ImkAc | KeyKind::ImkCvc3 => Usage {
                derive: true,
                ..none
            },
            KeyKind::PanIndex => Usage { sign: true, ..none },
            KeyKind::AuditSeal => Usage {
                sign: true,
                verify: true,
                ..none
            },
        }
    }

    /// The mechanisms the kind may be used with (`CKA_ALLOWED_MECHANISMS`).
    pub fn mechanisms(self) -> &'static [Mechanism] {
        match self {
            KeyKind::Cvk => &[Mechanism::Des3Ecb],
            KeyKind::ImkDcvv | KeyKind::ImkTdcvv2 | KeyKind::ImkAc | KeyKind::ImkCvc3 => {
                &[Mechanism::Des3EcbEncryptData]
            }
            KeyKind::PanIndex | KeyKind::AuditSeal => &[Mechanism::Sha256Hmac],
        }
    }

    /// `CKA_ID` of the kind's main object.
    pub fn object_id(self) -> Vec<u8> {
        format!("{ID_PREFIX}{}", self.as_str()).into_bytes()
    }

    /// `CKA_ID` of a CVK's KA‖KA twin.
    pub fn single_des_object_id() -> Vec<u8> {
        format!("{ID_PREFIX}cvk{SINGLE_DES_SUFFIX}").into_bytes()
    }

    /// The kind named by a `CKA_ID`, and whether it is a CVK's KA‖KA twin.
    pub fn from_object_id(id: &[u8]) -> Option<(KeyKind, bool)> {
        let name = std::str::from_utf8(id).ok()?.strip_prefix(ID_PREFIX)?;
        if let Some(base) = name.strip_suffix(SINGLE_DES_SUFFIX) {
            return (base == "cvk").then_some((KeyKind::Cvk, true));
        }
        name.parse().ok().map(|k| (k, false))
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyKind {
    type Err = HsmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| HsmError::InvalidInput(KeyInputError::UnknownKind(s.to_owned())))
    }
}

/// A key label: 1–64 characters of `[A-Za-z0-9._-]`, so the `:ka` suffix of a
/// CVK twin can never collide with another label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct KeyLabel(String);

impl KeyLabel {
    /// The label text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Label of the KA‖KA twin of a CVK with this label.
    pub fn single_des_twin(&self) -> String {
        format!("{}{SINGLE_DES_SUFFIX}", self.0)
    }

    /// The rotation version: `N` of a trailing `-vN`, or 1 when the label has none.
    pub fn version(&self) -> u32 {
        self.0
            .rsplit_once("-v")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1)
    }
}

impl FromStr for KeyLabel {
    type Err = HsmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(KeyLabel(s.to_owned()))
        } else {
            Err(HsmError::InvalidInput(KeyInputError::BadLabel))
        }
    }
}

impl fmt::Display for KeyLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Key check value (DESIGN 2.5): 3 bytes, shown as 6 upper-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kcv(pub [u8; 3]);

impl Kcv {
    /// The first three bytes of an encryption or MAC of the check block.
    pub fn from_prefix(bytes: &[u8]) -> Option<Kcv> {
        bytes.get(..3)?.try_into().ok().map(Kcv)
    }
}

/// Parses a KCV as a sender states it: 6 hex digits, either case.
impl FromStr for Kcv {
    type Err = HsmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || HsmError::InvalidInput(KeyInputError::KcvFormat);
        let s = s.trim();
        if s.len() != 6 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let bytes = hex::decode(s).map_err(|_| bad())?;
        Kcv::from_prefix(&bytes).ok_or_else(bad)
    }
}

impl fmt::Display for Kcv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode_upper(self.0))
    }
}

impl fmt::Debug for Kcv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kcv({self})")
    }
}

impl Serialize for Kcv {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The usage flags of a secret key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// `CKA_ENCRYPT`
    pub encrypt: bool,
    /// `CKA_DECRYPT`
    pub decrypt: bool,
    /// `CKA_SIGN`
    pub sign: bool,
    /// `CKA_VERIFY`
    pub verify: bool,
    /// `CKA_WRAP`
    pub wrap: bool,
    /// `CKA_UNWRAP`
    pub unwrap: bool,
    /// `CKA_DERIVE`
    pub derive: bool,
}

/// The security attributes of a key object, as read from the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyAttributes {
    /// PKCS#11 key type (`CKK_DES2`, `CKK_GENERIC_SECRET`, ...).
    pub key_type: KeyType,
    /// `CKA_TOKEN`
    pub token: bool,
    /// `CKA_PRIVATE`
    pub private: bool,
    /// `CKA_SENSITIVE`
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`
    pub extractable: bool,
    /// `CKA_MODIFIABLE`
    pub modifiable: bool,
    /// Usage flags.
    #[serde(flatten)]
    pub usage: Usage,
    /// `CKA_ALLOWED_MECHANISMS`; empty when the token leaves it unset (any mechanism).
    pub allowed_mechanisms: Vec<Mechanism>,
    /// The token holds a `CKA_ALLOWED_MECHANISMS` list that cannot be read.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allowed_mechanisms_unreadable: bool,
}

impl KeyAttributes {
    /// Every way these attributes are wider than `kind` allows (DESIGN 3); empty
    /// when the key conforms. `CKA_ALLOWED_MECHANISMS` must be set and within the
    /// kind's mechanisms: every token the gateway supports honours it.
    pub fn violations(&self, kind: KeyKind) -> Vec<String> {
        let mut v = Vec::new();
        if self.key_type != kind.key_type() {
            v.push(format!(
                "key type is {} not {}",
                self.key_type,
                kind.key_type()
            ));
        }
        let mut require = |ok: bool, what: &str| {
            if !ok {
                v.push(what.to_owned());
            }
        };
        require(self.token, "CKA_TOKEN is false");
        require(self.private, "CKA_PRIVATE is false");
        require(self.sensitive, "CKA_SENSITIVE is false");
        require(!self.extractable, "CKA_EXTRACTABLE is true");
        require(!self.modifiable, "CKA_MODIFIABLE is true");
        let want = kind.usage();
        let have = self.usage;
        for (name, has, allowed) in [
            ("CKA_ENCRYPT", have.encrypt, want.encrypt),
            ("CKA_DECRYPT", have.decrypt, want.decrypt),
            ("CKA_SIGN", have.sign, want.sign),
            ("CKA_VERIFY", have.verify, want.verify),
            ("CKA_WRAP", have.wrap, want.wrap),
            ("CKA_UNWRAP", have.unwrap, want.unwrap),
            ("CKA_DERIVE", have.derive, want.derive),
        ] {
            if has && !allowed {
                v.push(format!("{name} is true"));
            }
        }
        if self.allowed_mechanisms_unreadable {
            v.push("CKA_ALLOWED_MECHANISMS cannot be read".into());
        } else if self.allowed_mechanisms.is_empty() {
            v.push("CKA_ALLOWED_MECHANISMS is unset (any mechanism)".into());
        }
        for m in &self.allowed_mechanisms {
            if !kind.mechanisms().contains(m) {
                v.push(format!("CKA_ALLOWED_MECHANISMS allows {m}"));
            }
        }
        v
    }
}

/// The security attributes of the private half of an RSA wrapping key, as
/// read from the token. What it may be: a token object, private, sensitive,
/// not extractable, not modifiable, at least [`WRAPPING_KEY_BITS`] bits, with
/// `CKA_UNWRAP` its only usage and `CKM_RSA_PKCS_OAEP` its only mechanism; so
/// even the PIN holder cannot decrypt with it, only unwrap into the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct WrappingKeyAttributes {
    pub(super) key_type: KeyType,
    pub(super) modulus_bits: usize,
    pub(super) token: bool,
    pub(super) private: bool,
    pub(super) sensitive: bool,
    pub(super) extractable: bool,
    pub(super) modifiable: bool,
    pub(super) decrypt: bool,
    pub(super) sign: bool,
    pub(super) sign_recover: bool,
    pub(super) derive: bool,
    pub(super) unwrap: bool,
    /// `CKA_ALLOWED_MECHANISMS`; empty when unset (any mechanism).
    pub(super) allowed_mechanisms: Vec<Mechanism>,
}

impl WrappingKeyAttributes {
    /// Every way these attributes are wider (or weaker) than a wrapping key's
    /// policy allows; empty when the key conforms.
    pub(super) fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.key_type != KeyType::Rsa {
            v.push(format!("key type is {} not CKK_RSA", self.key_type));
        }
        if self.modulus_bits < WRAPPING_KEY_BITS {
            v.push(format!(
                "the modulus has {} bits, fewer than {WRAPPING_KEY_BITS}",
                self.modulus_bits
            ));
        }
        for (ok, what) in [
            (self.token, "CKA_TOKEN is false"),
            (self.private, "CKA_PRIVATE is false"),
            (self.sensitive, "CKA_SENSITIVE is false"),
            (!self.extractable, "CKA_EXTRACTABLE is true"),
            (!self.modifiable, "CKA_MODIFIABLE is true"),
            (!self.decrypt, "CKA_DECRYPT is true"),
            (!self.sign, "CKA_SIGN is true"),
            (!self.sign_recover, "CKA_SIGN_RECOVER is true"),
            (!self.derive, "CKA_DERIVE is true"),
            (self.unwrap, "CKA_UNWRAP is false"),
        ] {
            if !ok {
                v.push(what.to_owned());
            }
        }
        if self.allowed_mechanisms.is_empty() {
            v.push("CKA_ALLOWED_MECHANISMS is unset (any mechanism)".into());
        }
        for m in &self.allowed_mechanisms {
            if *m != Mechanism::RsaPkcsOaep {
                v.push(format!("CKA_ALLOWED_MECHANISMS allows {m}"));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conforming(kind: KeyKind) -> KeyAttributes {
        KeyAttributes {
            key_type: kind.key_type(),
            token: true,
            private: true,
            sensitive: true,
            extractable: false,
            modifiable: false,
            usage: kind.usage(),
            allowed_mechanisms: kind.mechanisms().to_vec(),
            allowed_mechanisms_unreadable: false,
        }
    }

    #[test]
    fn conforming_keys_pass_for_every_kind() {
        for kind in KeyKind::ALL {
            assert_eq!(
                conforming(kind).violations(kind),
                Vec::<String>::new(),
                "{kind}"
            );
        }
    }

    #[test]
    fn each_widening_is_reported() {
        let kind = KeyKind::Cvk;
        type Widen = fn(&mut KeyAttributes);
        let cases: Vec<(Widen, &str)> = vec![
            (|a| a.extractable = true, "CKA_EXTRACTABLE is true"),
            (|a| a.sensitive = false, "CKA_SENSITIVE is false"),
            (|a| a.modifiable = true, "CKA_MODIFIABLE is true"),
            (|a| a.private = false, "CKA_PRIVATE is false"),
            (|a| a.token = false, "CKA_TOKEN is false"),
            (|a| a.usage.decrypt = true, "CKA_DECRYPT is true"),
            (|a| a.usage.derive = true, "CKA_DERIVE is true"),
            (|a| a.usage.wrap = true, "CKA_WRAP is true"),
            (
                |a| a.allowed_mechanisms.clear(),
                "CKA_ALLOWED_MECHANISMS is unset (any mechanism)",
            ),
            (
                |a| a.allowed_mechanisms.push(Mechanism::Sha256Hmac),
                "CKA_ALLOWED_MECHANISMS allows CKM_SHA256_HMAC",
            ),
            (
                |a| a.allowed_mechanisms_unreadable = true,
                "CKA_ALLOWED_MECHANISMS cannot be read",
            ),
            (
                |a| a.key_type = KeyType::from_cryptoki(cryptoki::object::KeyType::DES3),
                "key type is CKK_DES3 not CKK_DES2",
            ),
        ];
        for (widen, expected) in cases {
            let mut attrs = conforming(kind);
            widen(&mut attrs);
            assert_eq!(attrs.violations(kind), vec![expected.to_owned()]);
        }
    }

    #[test]
    fn an_imk_may_not_encrypt_and_a_cvk_may_not_derive() {
        assert!(
            !conforming(KeyKind::Cvk)
                .violations(KeyKind::ImkDcvv)
                .is_empty()
        );
        assert!(
            !conforming(KeyKind::ImkTdcvv2)
                .violations(KeyKind::Cvk)
                .is_empty()
        );
        assert!(
            !conforming(KeyKind::AuditSeal)
                .violations(KeyKind::PanIndex)
                .is_empty()
        );
    }

    #[test]
    fn object_ids_round_trip() {
        for kind in KeyKind::ALL {
            assert_eq!(
                KeyKind::from_object_id(&kind.object_id()),
                Some((kind, false))
            );
        }
        assert_eq!(
            KeyKind::from_object_id(&KeyKind::single_des_object_id()),
            Some((KeyKind::Cvk, true))
        );
        assert_eq!(KeyKind::from_object_id(b"other:cvk"), None);
        assert_eq!(KeyKind::from_object_id(b"dcvvgw:imk-dcvv:ka"), None);
    }

    #[test]
    fn labels_are_restricted_and_versioned() {
        let l: KeyLabel = "cvk-demo-v2".parse().unwrap();
        assert_eq!(l.version(), 2);
        assert_eq!(l.single_des_twin(), "cvk-demo-v2:ka");
        assert_eq!("pan-index".parse::<KeyLabel>().unwrap().version(), 1);
        for bad in ["", "a:ka", "with space", &"x".repeat(65)] {
            assert!(bad.parse::<KeyLabel>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kcv_is_upper_case_hex() {
        assert_eq!(Kcv([0x08, 0xd7, 0xb4]).to_string(), "08D7B4");
        assert_eq!(Kcv::from_prefix(&[1, 2]), None);
    }

    #[test]
    fn a_stated_kcv_is_six_hex_digits() {
        assert_eq!("08d7B4".parse::<Kcv>().unwrap(), Kcv([0x08, 0xd7, 0xb4]));
        assert_eq!(" 08D7B4\n".parse::<Kcv>().unwrap(), Kcv([0x08, 0xd7, 0xb4]));
        for bad in ["", "08D7B", "08D7B4A1", "08D7BG", "+8D7B4", "08 7B4"] {
            let err = bad.parse::<Kcv>().unwrap_err().to_string();
            assert_eq!(err, "a KCV is 6 hex digits", "{bad:?}");
        }
    }

    fn conforming_wrapping_key() -> WrappingKeyAttributes {
        WrappingKeyAttributes {
            key_type: KeyType::Rsa,
            modulus_bits: 3072,
            token: true,
            private: true,
            sensitive: true,
            extractable: false,
            modifiable: false,
            decrypt: false,
            sign: false,
            sign_recover: false,
            derive: false,
            unwrap: true,
            allowed_mechanisms: vec![Mechanism::RsaPkcsOaep],
        }
    }

    #[test]
    fn a_wrapping_key_may_only_unwrap_with_oaep() {
        assert_eq!(conforming_wrapping_key().violations(), Vec::<String>::new());
        type Widen = fn(&mut WrappingKeyAttributes);
        let cases: Vec<(Widen, &str)> = vec![
            (|a| a.decrypt = true, "CKA_DECRYPT is true"),
            (|a| a.sign = true, "CKA_SIGN is true"),
            (|a| a.sign_recover = true, "CKA_SIGN_RECOVER is true"),
            (|a| a.derive = true, "CKA_DERIVE is true"),
            (|a| a.unwrap = false, "CKA_UNWRAP is false"),
            (|a| a.extractable = true, "CKA_EXTRACTABLE is true"),
            (|a| a.sensitive = false, "CKA_SENSITIVE is false"),
            (|a| a.modifiable = true, "CKA_MODIFIABLE is true"),
            (|a| a.token = false, "CKA_TOKEN is false"),
            (|a| a.private = false, "CKA_PRIVATE is false"),
            (
                |a| a.modulus_bits = 2048,
                "the modulus has 2048 bits, fewer than 3072",
            ),
            (
                |a| a.allowed_mechanisms.clear(),
                "CKA_ALLOWED_MECHANISMS is unset (any mechanism)",
            ),
            (
                |a| a.allowed_mechanisms.push(Mechanism::Des3Ecb),
                "CKA_ALLOWED_MECHANISMS allows CKM_DES3_ECB",
            ),
            (
                |a| a.key_type = KeyType::Des2,
                "key type is CKK_DES2 not CKK_RSA",
            ),
        ];
        for (widen, expected) in cases {
            let mut attrs = conforming_wrapping_key();
            widen(&mut attrs);
            assert_eq!(attrs.violations(), vec![expected.to_owned()]);
        }
    }
}
