//! Keys imported wrapped under the token's RSA key (issue 11), as AWS Payment
//! Cryptography's RSA-wrap import: an RSA-3072 wrapping key pair generated in the
//! token, its public key exported as PEM for the sending party, and the import of
//! a double-length DES key the sender wrapped under it with RSA-OAEP.
//!
//! The token unwraps the cryptogram straight into objects of its own: a temporary
//! encrypt-only session key for the KCV, then the key with its kind's template
//! (the one generation and component import use), copied into a token object; so
//! the clear key never enters the gateway's memory. The KCV the sender states is compared, in
//! constant time, with the one the token computes; on a mismatch or any failure
//! after the unwrap the object is destroyed and nothing is kept. The private key
//! may only unwrap, with `CKM_RSA_PKCS_OAEP`: it is checked before every use.
//! This module never reads a secret key value.

use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use spki::der::asn1::{BitStringRef, UintRef};
use spki::der::pem::LineEnding;
use spki::der::{Encode, EncodePem};
use subtle::ConstantTimeEq;

use super::admin::{CreatedKey, secret_key_template};
use super::error::{Benign, HsmError, HsmResult, KeyInputError, Malfunction, tolerate_any};
use super::mechanism::{AllowedMechanisms, allowed_mechanisms, read_allowed_mechanisms};
use super::policy::{
    Kcv, KeyKind, KeyLabel, WRAPPING_KEY_BITS, WRAPPING_KEY_ID, WrappingKeyAttributes,
};
use super::token::{EphemeralKey, Token, inspect, kcv_des, session_des_encrypt_template};
use super::types::{KeyType, Mechanism, OaepHash};

/// An RSA wrapping key pair in the token, with its public key for the sender.
#[derive(Debug)]
pub struct WrappingKey {
    /// Label of both halves of the pair.
    pub label: KeyLabel,
    /// Modulus size in bits.
    pub modulus_bits: usize,
    /// The public key as a PEM `PUBLIC KEY` (X.509 SubjectPublicKeyInfo, RFC 5280 4.1.2.7).
    pub public_key_pem: String,
}

/// Whether the kind can be imported wrapped: a double-length DES key of one object.
/// A CVK's KA‖KA twin cannot be made in the token from an unwrapped KA‖KB.
fn wrappable(kind: KeyKind) -> bool {
    kind.is_des() && kind != KeyKind::Cvk
}

/// The public key (modulus and exponent, big-endian) as a PEM SubjectPublicKeyInfo
/// with the `rsaEncryption` algorithm (RFC 8017 A.1.1, RFC 3279 2.3.1).
fn public_key_pem(modulus: &[u8], exponent: &[u8]) -> HsmResult<String> {
    let encoding = |e: spki::der::Error| HsmError::Wrapper(Malfunction::PublicKeyEncoding(e));
    let key = pkcs1::RsaPublicKey {
        modulus: UintRef::new(modulus).map_err(encoding)?,
        public_exponent: UintRef::new(exponent).map_err(encoding)?,
    }
    .to_der()
    .map_err(encoding)?;
    spki::SubjectPublicKeyInfoRef {
        algorithm: pkcs1::ALGORITHM_ID,
        subject_public_key: BitStringRef::from_bytes(&key).map_err(encoding)?,
    }
    .to_pem(LineEnding::LF)
    .map_err(encoding)
}

/// Bits of a big-endian modulus.
fn bit_len(modulus: &[u8]) -> usize {
    let digits: &[u8] = match modulus.iter().position(|b| *b != 0) {
        Some(first) => &modulus[first..],
        None => &[],
    };
    digits.first().map_or(0, |top| {
        (digits.len() - 1) * 8 + (8 - top.leading_zeros() as usize)
    })
}

/// Finds the one half of class `class` of the gateway's wrapping key `label`.
fn find_half(
    session: &Session,
    class: ObjectClass,
    label: &KeyLabel,
) -> HsmResult<Option<ObjectHandle>> {
    let found = session.find_objects(&[
        Attribute::Class(class),
        Attribute::Token(true),
        Attribute::Label(label.as_str().as_bytes().to_vec()),
        Attribute::Id(WRAPPING_KEY_ID.as_bytes().to_vec()),
    ])?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(HsmError::DuplicateLabel {
            label: label.to_string(),
        }),
    }
}

/// Reads what the wrapping key policy needs of a private key; an attribute the
/// token does not report stays at its widest reading.
fn inspect_private(session: &Session, handle: ObjectHandle) -> HsmResult<WrappingKeyAttributes> {
    let mut attrs = WrappingKeyAttributes {
        key_type: KeyType::GenericSecret,
        modulus_bits: 0,
        token: false,
        private: false,
        sensitive: false,
        extractable: true,
        modifiable: true,
        decrypt: true,
        sign: true,
        sign_recover: true,
        derive: true,
        unwrap: false,
        allowed_mechanisms: Vec::new(),
    };
    let wanted = [
        AttributeType::KeyType,
        AttributeType::Modulus,
        AttributeType::Token,
        AttributeType::Private,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::Modifiable,
        AttributeType::Decrypt,
        AttributeType::Sign,
        AttributeType::SignRecover,
        AttributeType::Derive,
        AttributeType::Unwrap,
    ];
    for attribute in session.get_attributes(handle, &wanted)? {
        match attribute {
            Attribute::KeyType(t) => attrs.key_type = KeyType::from_cryptoki(t),
            Attribute::Modulus(n) => attrs.modulus_bits = bit_len(&n),
            Attribute::Token(b) => attrs.token = b,
            Attribute::Private(b) => attrs.private = b,
            Attribute::Sensitive(b) => attrs.sensitive = b,
            Attribute::Extractable(b) => attrs.extractable = b,
            Attribute::Modifiable(b) => attrs.modifiable = b,
            Attribute::Decrypt(b) => attrs.decrypt = b,
            Attribute::Sign(b) => attrs.sign = b,
            Attribute::SignRecover(b) => attrs.sign_recover = b,
            Attribute::Derive(b) => attrs.derive = b,
            Attribute::Unwrap(b) => attrs.unwrap = b,
            _ => {}
        }
    }
    match read_allowed_mechanisms(session, handle)? {
        AllowedMechanisms::Listed(list) => attrs.allowed_mechanisms = list,
        // Unreadable is at least one mechanism the gateway does not set.
        AllowedMechanisms::Unreadable => {
            attrs.allowed_mechanisms = vec![Mechanism::Des3EcbEncryptData];
        }
    }
    Ok(attrs)
}

/// The private key `label` if it is within the wrapping key policy.
fn checked_private(session: &Session, label: &KeyLabel) -> HsmResult<ObjectHandle> {
    let handle = find_half(session, ObjectClass::PRIVATE_KEY, label)?
        .ok_or_else(|| HsmError::InvalidInput(KeyInputError::NoWrappingKey(label.to_string())))?;
    let violations = inspect_private(session, handle)?.violations();
    if violations.is_empty() {
        Ok(handle)
    } else {
        Err(HsmError::KeyPolicy {
            label: label.to_string(),
            violations,
        })
    }
}

/// The public half of `label`, exported.
fn export(session: &Session, label: &KeyLabel, public: ObjectHandle) -> HsmResult<WrappingKey> {
    let mut modulus = Vec::new();
    let mut exponent = Vec::new();
    for attribute in session.get_attributes(
        public,
        &[AttributeType::Modulus, AttributeType::PublicExponent],
    )? {
        match attribute {
            Attribute::Modulus(n) => modulus = n,
            Attribute::PublicExponent(e) => exponent = e,
            _ => {}
        }
    }
    Ok(WrappingKey {
        label: label.clone(),
        modulus_bits: bit_len(&modulus),
        public_key_pem: public_key_pem(&modulus, &exponent)?,
    })
}

impl Token {
    /// Generates an RSA-3072 wrapping key pair in the token and exports its public
    /// key. The private key is a sensitive, non-extractable token object whose only
    /// usage is `CKA_UNWRAP` with `CKM_RSA_PKCS_OAEP`; the public key may only
    /// encrypt and wrap, with the same mechanism.
    ///
    /// # Errors
    /// `LabelExists` if a private or public key has the label, `KeyPolicy` if the
    /// token made the private key wider than asked, or the token's error; nothing
    /// is left in the token on any error.
    pub fn generate_wrapping_key(&self, label: &KeyLabel) -> HsmResult<WrappingKey> {
        let _serial = self.admin_lock();
        let session = self.admin_session()?;
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            let taken = session.find_objects(&[
                Attribute::Class(class),
                Attribute::Token(true),
                Attribute::Label(label.as_str().as_bytes().to_vec()),
            ])?;
            if !taken.is_empty() {
                return Err(HsmError::LabelExists {
                    label: label.to_string(),
                });
            }
        }
        let oaep_only = || allowed_mechanisms(&[Mechanism::RsaPkcsOaep]);
        let named = |mut template: Vec<Attribute>| {
            template.push(Attribute::Label(label.as_str().as_bytes().to_vec()));
            template.push(Attribute::Id(WRAPPING_KEY_ID.as_bytes().to_vec()));
            template
        };
        let public = named(vec![
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Modifiable(false),
            Attribute::ModulusBits((WRAPPING_KEY_BITS as u64).into()),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            Attribute::Encrypt(true),
            Attribute::Wrap(true),
            Attribute::Verify(false),
            Attribute::VerifyRecover(false),
            Attribute::Derive(false),
            oaep_only(),
        ]);
        let private = named(vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(false),
            Attribute::Unwrap(true),
            Attribute::Decrypt(false),
            Attribute::Sign(false),
            Attribute::SignRecover(false),
            Attribute::Derive(false),
            oaep_only(),
        ]);
        let (public, private) =
            session.generate_key_pair(&CkMechanism::RsaPkcsKeyPairGen, &public, &private)?;
        let created = super::admin::Created {
            session: &session,
            handles: vec![private, public],
        };
        checked_private(&session, label)?;
        let key = export(&session, label, public)?;
        created.keep();
        tracing::info!(key = %label, bits = key.modulus_bits, "RSA wrapping key generated in the token");
        Ok(key)
    }

    /// The public key of the wrapping key pair `label`, exported again.
    ///
    /// # Errors
    /// `NoWrappingKey`, or the token's error.
    pub fn wrapping_key(&self, label: &KeyLabel) -> HsmResult<WrappingKey> {
        let session = self.admin_session()?;
        let public = find_half(&session, ObjectClass::PUBLIC_KEY, label)?.ok_or_else(|| {
            HsmError::InvalidInput(KeyInputError::NoWrappingKey(label.to_string()))
        })?;
        export(&session, label, public)
    }

    /// Imports a double-length DES key sent wrapped under the wrapping key
    /// `wrapping` with RSA-OAEP (`hash` for both OAEP and MGF1, no label): the
    /// token unwraps `cryptogram` into an object with `kind`'s template, computes
    /// its KCV and compares it, in constant time, with `stated`.
    ///
    /// # Errors
    /// `InvalidInput` for a kind that cannot be imported wrapped, a missing wrapping
    /// key, a cryptogram of the wrong length, OAEP parameters the token refuses, a
    /// cryptogram it cannot unwrap, or a KCV that is not the stated one;
    /// `LabelExists`; `KeyPolicy` for a wrapping key wider than its policy or an
    /// unwrapped key wider than its kind's; or the token's error. Nothing is left
    /// in the token on any error.
    pub fn import_wrapped_key(
        &self,
        kind: KeyKind,
        label: &KeyLabel,
        wrapping: &KeyLabel,
        cryptogram: &[u8],
        stated: Kcv,
        hash: OaepHash,
    ) -> HsmResult<CreatedKey> {
        if !wrappable(kind) {
            return Err(HsmError::InvalidInput(KeyInputError::NotWrappable { kind }));
        }
        let _serial = self.admin_lock();
        let session = self.admin_session()?;
        self.refuse_taken_label(&session, label)?;
        let private = checked_private(&session, wrapping)?;
        let public = find_half(&session, ObjectClass::PUBLIC_KEY, wrapping)?.ok_or_else(|| {
            HsmError::InvalidInput(KeyInputError::NoWrappingKey(wrapping.to_string()))
        })?;
        let expected = export(&session, wrapping, public)?.modulus_bits.div_ceil(8);
        if cryptogram.len() != expected {
            return Err(HsmError::InvalidInput(KeyInputError::WrappedLength {
                len: cryptogram.len(),
                expected,
            }));
        }

        let mechanism = hash.mechanism();
        let counters = self.op_counters();
        let unwrap = |template: &[Attribute]| -> HsmResult<ObjectHandle> {
            match tolerate_any(
                session.unwrap_key(&mechanism, private, cryptogram, template),
                &[Benign::ParametersRefused, Benign::CryptogramRefused],
            )? {
                Ok(handle) => Ok(handle),
                Err(Benign::ParametersRefused) => {
                    Err(HsmError::InvalidInput(KeyInputError::OaepRefused(hash)))
                }
                Err(_) => Err(HsmError::InvalidInput(KeyInputError::UnwrapFailed)),
            }
        };
        // The KCV first, from a temporary encrypt-only session copy: a derive-only
        // key cannot encrypt, and SoftHSM 2.6 sets no CKA_CHECK_VALUE on unwrap.
        // It also takes a value of any length for a DES2 key (24 bytes become
        // three-key TDES) and reports no length, not even a generic secret's
        // CKA_VALUE_LEN: only the KCV ties the value to the key the sender states
        // (docs/operations/wrapped-key-import.md).
        let kcv = {
            let probe =
                EphemeralKey::new(&session, unwrap(&session_des_encrypt_template())?, counters);
            kcv_des(&session, probe.handle, counters)?
        };
        if !bool::from(kcv.0.ct_eq(&stated.0)) {
            return Err(HsmError::InvalidInput(KeyInputError::WrappedKcvMismatch {
                stated,
            }));
        }

        // The key itself: unwrapped again into a session object with its kind's
        // template, then copied into a token object that carries the check value
        // just computed from the same cryptogram (the engine reads an IMK's KCV
        // from it). SoftHSM 2.6 refuses CKA_CHECK_VALUE in an unwrap template, and
        // refuses any copy attribute after CKA_MODIFIABLE=false: it comes last.
        let mut template = secret_key_template(kind, false);
        template.retain(|a| !matches!(a, Attribute::Modifiable(_)));
        let working = EphemeralKey::new(&session, unwrap(&template)?, counters);
        let created = super::admin::Created {
            session: &session,
            handles: vec![session.copy_object(
                working.handle,
                &[
                    Attribute::Token(true),
                    Attribute::Label(label.as_str().as_bytes().to_vec()),
                    Attribute::Id(kind.object_id()),
                    Attribute::CheckValue(kcv.0.to_vec()),
                    Attribute::Modifiable(false),
                ],
            )?],
        };
        let violations = inspect(&session, created.handles[0])?
            .attrs
            .violations(kind);
        if !violations.is_empty() {
            return Err(HsmError::KeyPolicy {
                label: label.to_string(),
                violations,
            });
        }
        if self.created_kcv(&session, kind, &created.handles, label)? != kcv {
            return Err(HsmError::InvalidInput(KeyInputError::WrappedKcvMismatch {
                stated,
            }));
        }
        created.keep();
        tracing::info!(
            key = %label, kind = %kind, kcv = %kcv, wrapping_key = %wrapping, oaep = %hash,
            "key imported wrapped under the token's RSA key"
        );
        Ok(CreatedKey {
            label: label.clone(),
            kind,
            component_kcvs: Vec::new(),
            kcv,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_single_object_des_kinds_are_wrappable() {
        let wrappable: Vec<KeyKind> = KeyKind::ALL.into_iter().filter(|k| wrappable(*k)).collect();
        assert_eq!(
            wrappable,
            [
                KeyKind::ImkDcvv,
                KeyKind::ImkTdcvv2,
                KeyKind::ImkAc,
                KeyKind::ImkCvc3
            ]
        );
        let cvk = KeyInputError::NotWrappable { kind: KeyKind::Cvk }.to_string();
        assert!(cvk.starts_with("a cvk key cannot be imported wrapped: its KA||KA object"));
        let hmac = KeyInputError::NotWrappable {
            kind: KeyKind::PanIndex,
        }
        .to_string();
        assert!(hmac.contains("only double-length DES keys"), "{hmac}");
    }

    #[test]
    fn modulus_bits_ignore_leading_zero_bytes() {
        assert_eq!(bit_len(&[]), 0);
        assert_eq!(bit_len(&[0, 0]), 0);
        assert_eq!(bit_len(&[0x01]), 1);
        assert_eq!(bit_len(&[0x00, 0x80, 0x00]), 16);
        let mut n = vec![0u8; 385];
        n[1] = 0xC1;
        assert_eq!(bit_len(&n), 3072);
    }

    #[test]
    fn the_public_key_is_a_subject_public_key_info() {
        // A 16-bit "modulus" with its top bit set (DER adds a zero byte) and e = 65537.
        let pem = public_key_pem(&[0xC3, 0x5B], &[0x01, 0x00, 0x01]).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
        assert!(
            pem.trim_end().ends_with("-----END PUBLIC KEY-----"),
            "{pem}"
        );
        use base64::Engine as _;
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        // SEQUENCE { SEQUENCE { rsaEncryption, NULL }, BIT STRING { SEQUENCE { n, e } } }
        let expected = [
            "301e",
            "300d06092a864886f70d0101010500",
            "030d00",
            "300a",
            "020300c35b",
            "0203010001",
        ]
        .concat();
        assert_eq!(hex::encode(der), expected);
    }
}
