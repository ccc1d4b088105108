//! Mechanisms and attributes that cryptoki 0.12 has no type for.
//!
//! `CKM_DES3_ECB_ENCRYPT_DATA` (the EMV card-key derivation, DESIGN 2.2) has no
//! `Mechanism` variant and `MechanismType::try_from` rejects it, so the one audited
//! `unsafe` of this crate builds its `MechanismType` (issue 2). `CKA_ALLOWED_MECHANISMS`
//! holding that value cannot be parsed by cryptoki either, so it is read and written
//! as raw bytes through `AttributeType::VendorDefined`, which carries any attribute
//! number: no `unsafe` needed there.

use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::misc::KeyDerivationStringData;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType};
use cryptoki_sys::{CK_MECHANISM_TYPE, CK_ULONG, CKA_ALLOWED_MECHANISMS};

pub use cryptoki_sys::{
    CKM_DES3_ECB, CKM_DES3_ECB_ENCRYPT_DATA, CKM_SHA256_HMAC,
};

/// The `MechanismType` of `CKM_DES3_ECB_ENCRYPT_DATA`.
#[allow(unsafe_code)] // The one audited exception of STYLE 12; see SAFETY below.
pub fn des3_ecb_encrypt_data_type() -> MechanismType {
    // SAFETY: `MechanismType` is `#[repr(transparent)]` over `CK_MECHANISM_TYPE`
    // (cryptoki 0.12.1 src/mechanism/mod.rs, kept transparent so a `Vec<MechanismType>`
    // has the layout of a `CK_MECHANISM_TYPE` array), so every `CK_MECHANISM_TYPE`
    // value is a valid bit pattern for it. The value is a constant of the PKCS#11
    // standard; no pointer or lifetime is involved.
    unsafe { std::mem::transmute::<CK_MECHANISM_TYPE, MechanismType>(CKM_DES3_ECB_ENCRYPT_DATA) }
}

/// `CKM_DES3_ECB_ENCRYPT_DATA` over `data` (a multiple of 8 bytes), borrowing the
/// parameter for the lifetime of the mechanism.
pub fn des3_ecb_encrypt_data<'a>(params: &'a KeyDerivationStringData<'a>) -> Mechanism<'a> {
    Mechanism::VendorDefined(VendorDefinedMechanism::new(
        des3_ecb_encrypt_data_type(),
        Some(params),
    ))
}

/// `CKA_ALLOWED_MECHANISMS` as a raw attribute: an array of `CK_MECHANISM_TYPE`
/// in native byte order.
pub fn allowed_mechanisms(mechanisms: &[CK_MECHANISM_TYPE]) -> Attribute {
    let bytes = mechanisms
        .iter()
        .flat_map(|m| m.to_ne_bytes())
        .collect::<Vec<u8>>();
    Attribute::VendorDefined((allowed_mechanisms_type(), bytes))
}

/// The attribute type used to read `CKA_ALLOWED_MECHANISMS` without cryptoki parsing it.
pub fn allowed_mechanisms_type() -> AttributeType {
    AttributeType::VendorDefined(CKA_ALLOWED_MECHANISMS)
}

/// Decodes a raw `CKA_ALLOWED_MECHANISMS` value. `None` if its length is not a
/// whole number of `CK_ULONG`s.
pub fn parse_allowed_mechanisms(bytes: &[u8]) -> Option<Vec<CK_MECHANISM_TYPE>> {
    const WIDTH: usize = size_of::<CK_ULONG>();
    if bytes.len() % WIDTH != 0 {
        return None;
    }
    bytes
        .chunks_exact(WIDTH)
        .map(|c| c.try_into().ok().map(CK_ULONG::from_ne_bytes))
        .collect()
}

/// Human name of the mechanisms the gateway uses, for listings and policy messages.
pub fn mechanism_name(m: CK_MECHANISM_TYPE) -> String {
    match m {
        CKM_DES3_ECB => "CKM_DES3_ECB".into(),
        CKM_DES3_ECB_ENCRYPT_DATA => "CKM_DES3_ECB_ENCRYPT_DATA".into(),
        CKM_SHA256_HMAC => "CKM_SHA256_HMAC".into(),
        other => format!("0x{other:x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki_sys::CK_MECHANISM;

    #[test]
    fn shim_builds_the_standard_mechanism_value() {
        let data = [0u8; 16];
        let params = KeyDerivationStringData::new(&data);
        let mechanism = des3_ecb_encrypt_data(&params);
        assert_eq!(mechanism.mechanism_type(), des3_ecb_encrypt_data_type());
        let raw: CK_MECHANISM = (&mechanism).into();
        assert_eq!(raw.mechanism, 0x1102);
        assert_eq!(
            raw.ulParameterLen as usize,
            size_of::<cryptoki_sys::CK_KEY_DERIVATION_STRING_DATA>()
        );
    }

    #[test]
    fn allowed_mechanisms_round_trip() {
        let attr = allowed_mechanisms(&[CKM_DES3_ECB, CKM_DES3_ECB_ENCRYPT_DATA]);
        let Attribute::VendorDefined((_, bytes)) = attr else {
            panic!("raw attribute expected");
        };
        assert_eq!(
            parse_allowed_mechanisms(&bytes),
            Some(vec![CKM_DES3_ECB, CKM_DES3_ECB_ENCRYPT_DATA])
        );
        assert_eq!(parse_allowed_mechanisms(&bytes[..3]), None);
    }
}
