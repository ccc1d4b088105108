//! Mechanisms and attributes that cryptoki 0.12 has no type for.
//!
//! `CKM_DES3_ECB_ENCRYPT_DATA` (the EMV card-key derivation, DESIGN 2.2) has no
//! `Mechanism` variant and `MechanismType::try_from` rejects it, so the one audited
//! `unsafe` of this crate builds its `MechanismType` (issue 2). `CKA_ALLOWED_MECHANISMS`
//! holding that value cannot be parsed by cryptoki either: see
//! [`read_allowed_mechanisms`].

use cryptoki::mechanism::misc::KeyDerivationStringData;
use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism as CkMechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::{CK_MECHANISM_TYPE, CK_ULONG, CKM_DES3_ECB_ENCRYPT_DATA};

use super::error::{Benign, HsmResult, tolerate};
use super::types::Mechanism;

/// The `MechanismType` of `CKM_DES3_ECB_ENCRYPT_DATA`.
#[allow(unsafe_code)] // The one audited exception of STYLE 12; see SAFETY below.
pub(super) fn des3_ecb_encrypt_data_type() -> MechanismType {
    // SAFETY: `MechanismType` is `#[repr(transparent)]` over `CK_MECHANISM_TYPE`
    // (cryptoki 0.12.1 src/mechanism/mod.rs, kept transparent so a `Vec<MechanismType>`
    // has the layout of a `CK_MECHANISM_TYPE` array), so every `CK_MECHANISM_TYPE`
    // value is a valid bit pattern for it. The value is a constant of the PKCS#11
    // standard; no pointer or lifetime is involved.
    unsafe { std::mem::transmute::<CK_MECHANISM_TYPE, MechanismType>(CKM_DES3_ECB_ENCRYPT_DATA) }
}

/// `CKM_DES3_ECB_ENCRYPT_DATA` over `data` (a multiple of 8 bytes), borrowing the
/// parameter for the lifetime of the mechanism.
pub(super) fn des3_ecb_encrypt_data<'a>(
    params: &'a KeyDerivationStringData<'a>,
) -> CkMechanism<'a> {
    CkMechanism::VendorDefined(VendorDefinedMechanism::new(
        des3_ecb_encrypt_data_type(),
        Some(params),
    ))
}

/// `CKA_ALLOWED_MECHANISMS` for a template.
pub(super) fn allowed_mechanisms(mechanisms: &[Mechanism]) -> Attribute {
    Attribute::AllowedMechanisms(mechanisms.iter().map(|m| m.to_cryptoki()).collect())
}

/// Reads `CKA_ALLOWED_MECHANISMS`: empty when unset (any mechanism allowed).
///
/// cryptoki 0.12 cannot parse a list holding `CKM_DES3_ECB_ENCRYPT_DATA`, and
/// without a second `unsafe` the raw value cannot be read. So when its parse
/// fails, the value's length is read instead: a list of exactly one mechanism
/// that cryptoki cannot name is taken to be `CKM_DES3_ECB_ENCRYPT_DATA`, the one
/// the gateway sets on derive-only keys. A longer unparseable list is reported
/// as unreadable, which the policy refuses. (Residual risk, docs/security/threat-model.md:
/// a planted derive-only key allowed one other mechanism unknown to cryptoki.)
pub(super) fn read_allowed_mechanisms(
    session: &Session,
    handle: ObjectHandle,
) -> HsmResult<AllowedMechanisms> {
    let read = session.get_attributes(handle, &[AttributeType::AllowedMechanisms]);
    if let Some(attrs) = tolerate(read, Benign::Unparseable)? {
        return Ok(AllowedMechanisms::Listed(
            attrs
                .into_iter()
                .find_map(|a| match a {
                    Attribute::AllowedMechanisms(list) => {
                        Some(list.into_iter().map(Mechanism::from_cryptoki).collect())
                    }
                    _ => None,
                })
                .unwrap_or_default(),
        ));
    }
    let info = session.get_attribute_info(handle, &[AttributeType::AllowedMechanisms])?;
    Ok(match info.first() {
        Some(AttributeInfo::Available(len)) if *len == size_of::<CK_ULONG>() => {
            AllowedMechanisms::Listed(vec![Mechanism::Des3EcbEncryptData])
        }
        _ => AllowedMechanisms::Unreadable,
    })
}

/// What `CKA_ALLOWED_MECHANISMS` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum AllowedMechanisms {
    /// The mechanisms listed; empty when the attribute is unset.
    Listed(Vec<Mechanism>),
    /// A list cryptoki cannot parse and longer than one entry.
    Unreadable,
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
    fn every_kind_sets_exactly_its_mechanisms() {
        for kind in crate::hsm::KeyKind::ALL {
            let Attribute::AllowedMechanisms(list) = allowed_mechanisms(kind.mechanisms()) else {
                panic!("CKA_ALLOWED_MECHANISMS expected");
            };
            let read: Vec<Mechanism> = list.into_iter().map(Mechanism::from_cryptoki).collect();
            assert_eq!(read, kind.mechanisms(), "{kind}");
        }
    }

    #[test]
    fn allowed_mechanisms_carry_the_shimmed_type() {
        let Attribute::AllowedMechanisms(list) =
            allowed_mechanisms(&[Mechanism::Des3Ecb, Mechanism::Des3EcbEncryptData])
        else {
            panic!("CKA_ALLOWED_MECHANISMS expected");
        };
        let raw: Vec<CK_MECHANISM_TYPE> = list.into_iter().map(CK_MECHANISM_TYPE::from).collect();
        assert_eq!(
            raw,
            vec![cryptoki_sys::CKM_DES3_ECB, CKM_DES3_ECB_ENCRYPT_DATA]
        );
    }
}
