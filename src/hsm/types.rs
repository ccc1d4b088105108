//! The port's own names for the PKCS#11 key types and mechanisms it shows its
//! callers ([`KeyType`], [`Mechanism`]), and their conversions to and from
//! cryptoki's.
//!
//! cryptoki's types stay inside `hsm`: a value the gateway has no name for
//! (a planted key of another type, a mechanism it never uses) is carried
//! opaquely, shown by its PKCS#11 name or number, and can only be made here.
//! This module makes no PKCS#11 call.

use std::fmt;

use cryptoki::mechanism::MechanismType;
use cryptoki::object::KeyType as CkKeyType;
use cryptoki_sys::{
    CK_MECHANISM_TYPE, CKM_DES2_KEY_GEN, CKM_DES3_CBC, CKM_DES3_ECB, CKM_DES3_ECB_ENCRYPT_DATA,
    CKM_GENERIC_SECRET_KEY_GEN, CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_RSA_PKCS_OAEP, CKM_SHA256_HMAC,
};
use serde::Serialize;

use super::mechanism::des3_ecb_encrypt_data_type;

/// A PKCS#11 key type (`CKA_KEY_TYPE`), shown by its `CKK_` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    /// `CKK_DES2`: double-length DES (CVKs, IMKs).
    Des2,
    /// `CKK_GENERIC_SECRET`: HMAC keys (PAN index, audit seal).
    GenericSecret,
    /// `CKK_RSA`: the wrapping key pair of wrapped key import.
    Rsa,
    /// Any other type, as the token reported it.
    Other(ForeignKeyType),
}

/// A key type the gateway has no use for, as the token reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForeignKeyType(CkKeyType);

impl KeyType {
    pub(in crate::hsm) fn from_cryptoki(t: CkKeyType) -> KeyType {
        match t {
            CkKeyType::DES2 => KeyType::Des2,
            CkKeyType::GENERIC_SECRET => KeyType::GenericSecret,
            CkKeyType::RSA => KeyType::Rsa,
            other => KeyType::Other(ForeignKeyType(other)),
        }
    }

    pub(in crate::hsm) fn to_cryptoki(self) -> CkKeyType {
        match self {
            KeyType::Des2 => CkKeyType::DES2,
            KeyType::GenericSecret => CkKeyType::GENERIC_SECRET,
            KeyType::Rsa => CkKeyType::RSA,
            KeyType::Other(ForeignKeyType(t)) => t,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_cryptoki(), f)
    }
}

impl Serialize for KeyType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A PKCS#11 mechanism, as `CKA_ALLOWED_MECHANISMS` lists it, shown by its
/// `CKM_` name (or number, for one the gateway does not use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// `CKM_DES3_ECB`: CVV blocks under a CVK or a card key.
    Des3Ecb,
    /// `CKM_DES3_ECB_ENCRYPT_DATA`: card keys derived from an IMK (DESIGN 2.2).
    Des3EcbEncryptData,
    /// `CKM_SHA256_HMAC`: PAN index and audit seal.
    Sha256Hmac,
    /// `CKM_DES3_CBC`: the CBC chain of an ISO 9797-1 MAC under a session key's
    /// single-DES twin (ARQC, CVC3).
    Des3Cbc,
    /// `CKM_DES2_KEY_GEN`: double-length DES keys generated in the token.
    Des2KeyGen,
    /// `CKM_GENERIC_SECRET_KEY_GEN`: HMAC keys generated in the token.
    GenericSecretKeyGen,
    /// `CKM_RSA_PKCS_KEY_PAIR_GEN`: the RSA key pair of wrapped key import.
    RsaPkcsKeyPairGen,
    /// `CKM_RSA_PKCS_OAEP`: unwraps a key sent wrapped under the token's RSA key.
    RsaPkcsOaep,
    /// Any other mechanism, as the token listed it.
    Other(ForeignMechanism),
}

/// A mechanism the gateway has no use for, as the token listed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForeignMechanism(MechanismType);

impl Mechanism {
    pub(in crate::hsm) fn from_cryptoki(m: MechanismType) -> Mechanism {
        match CK_MECHANISM_TYPE::from(m) {
            CKM_DES3_ECB => Mechanism::Des3Ecb,
            CKM_DES3_ECB_ENCRYPT_DATA => Mechanism::Des3EcbEncryptData,
            CKM_SHA256_HMAC => Mechanism::Sha256Hmac,
            CKM_DES3_CBC => Mechanism::Des3Cbc,
            CKM_DES2_KEY_GEN => Mechanism::Des2KeyGen,
            CKM_GENERIC_SECRET_KEY_GEN => Mechanism::GenericSecretKeyGen,
            CKM_RSA_PKCS_KEY_PAIR_GEN => Mechanism::RsaPkcsKeyPairGen,
            CKM_RSA_PKCS_OAEP => Mechanism::RsaPkcsOaep,
            _ => Mechanism::Other(ForeignMechanism(m)),
        }
    }

    pub(in crate::hsm) fn to_cryptoki(self) -> MechanismType {
        match self {
            Mechanism::Des3Ecb => MechanismType::DES3_ECB,
            Mechanism::Des3EcbEncryptData => des3_ecb_encrypt_data_type(),
            Mechanism::Sha256Hmac => MechanismType::SHA256_HMAC,
            Mechanism::Des3Cbc => MechanismType::DES3_CBC,
            Mechanism::Des2KeyGen => MechanismType::DES2_KEY_GEN,
            Mechanism::GenericSecretKeyGen => MechanismType::GENERIC_SECRET_KEY_GEN,
            Mechanism::RsaPkcsKeyPairGen => MechanismType::RSA_PKCS_KEY_PAIR_GEN,
            Mechanism::RsaPkcsOaep => MechanismType::RSA_PKCS_OAEP,
            Mechanism::Other(ForeignMechanism(m)) => m,
        }
    }
}

/// The hash of RSA-OAEP (PKCS#1 v2.2, 7.1) in wrapped key import: the OAEP hash and
/// the MGF1 hash are the same, and the label (`CKZ_DATA_SPECIFIED` source data) is empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OaepHash {
    /// SHA-256 with MGF1-SHA-256: what senders such as AWS Payment Cryptography use.
    #[default]
    Sha256,
    /// SHA-1 with MGF1-SHA-1: the only OAEP SoftHSM 2.6 accepts.
    Sha1,
}

impl OaepHash {
    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            OaepHash::Sha256 => "sha256",
            OaepHash::Sha1 => "sha1",
        }
    }

    /// `CKM_RSA_PKCS_OAEP` with this hash, MGF1 of the same hash and no label.
    pub(in crate::hsm) fn mechanism(self) -> cryptoki::mechanism::Mechanism<'static> {
        use cryptoki::mechanism::rsa::{PkcsOaepParams, PkcsOaepSource};
        let (hash, mgf) = self.digests();
        cryptoki::mechanism::Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
            hash,
            mgf,
            PkcsOaepSource::empty(),
        ))
    }

    /// The OAEP hash and the MGF1 function of the same hash.
    fn digests(self) -> (MechanismType, cryptoki::mechanism::rsa::PkcsMgfType) {
        use cryptoki::mechanism::rsa::PkcsMgfType;
        match self {
            OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
            OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        }
    }
}

impl fmt::Display for OaepHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for OaepHash {
    type Err = super::error::HsmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [OaepHash::Sha256, OaepHash::Sha1]
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| {
                super::error::HsmError::InvalidInput(super::error::KeyInputError::UnknownOaepHash(
                    s.to_owned(),
                ))
            })
    }
}

/// The names of the mechanisms the gateway uses; the number of any other.
impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mechanism::Des3Ecb => f.write_str("CKM_DES3_ECB"),
            Mechanism::Des3EcbEncryptData => f.write_str("CKM_DES3_ECB_ENCRYPT_DATA"),
            Mechanism::Sha256Hmac => f.write_str("CKM_SHA256_HMAC"),
            Mechanism::Des3Cbc => f.write_str("CKM_DES3_CBC"),
            Mechanism::Des2KeyGen => f.write_str("CKM_DES2_KEY_GEN"),
            Mechanism::GenericSecretKeyGen => f.write_str("CKM_GENERIC_SECRET_KEY_GEN"),
            Mechanism::RsaPkcsKeyPairGen => f.write_str("CKM_RSA_PKCS_KEY_PAIR_GEN"),
            Mechanism::RsaPkcsOaep => f.write_str("CKM_RSA_PKCS_OAEP"),
            Mechanism::Other(ForeignMechanism(m)) => {
                write!(f, "0x{:x}", CK_MECHANISM_TYPE::from(*m))
            }
        }
    }
}

impl Serialize for Mechanism {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_types_round_trip_and_keep_their_pkcs11_names() {
        for (ck, ours, name) in [
            (CkKeyType::DES2, KeyType::Des2, "CKK_DES2"),
            (
                CkKeyType::GENERIC_SECRET,
                KeyType::GenericSecret,
                "CKK_GENERIC_SECRET",
            ),
            (CkKeyType::RSA, KeyType::Rsa, "CKK_RSA"),
        ] {
            assert_eq!(KeyType::from_cryptoki(ck), ours);
            assert_eq!(ours.to_cryptoki(), ck);
            assert_eq!(ours.to_string(), name);
        }
        let des3 = KeyType::from_cryptoki(CkKeyType::DES3);
        assert!(matches!(des3, KeyType::Other(_)));
        assert_eq!(des3.to_cryptoki(), CkKeyType::DES3);
        assert_eq!(des3.to_string(), "CKK_DES3");
    }

    #[test]
    fn oaep_names_its_hash_for_both_the_digest_and_mgf1() {
        use cryptoki::mechanism::rsa::PkcsMgfType;
        for (hash, name, digest, mgf) in [
            (
                OaepHash::Sha256,
                "sha256",
                MechanismType::SHA256,
                PkcsMgfType::MGF1_SHA256,
            ),
            (
                OaepHash::Sha1,
                "sha1",
                MechanismType::SHA1,
                PkcsMgfType::MGF1_SHA1,
            ),
        ] {
            assert_eq!(hash.to_string(), name);
            assert_eq!(name.parse::<OaepHash>().unwrap(), hash);
            assert_eq!(hash.digests(), (digest, mgf));
            let cryptoki::mechanism::Mechanism::RsaPkcsOaep(params) = hash.mechanism() else {
                panic!("CKM_RSA_PKCS_OAEP expected");
            };
            assert_eq!(params.hash_alg(), digest);
        }
        assert_eq!(
            "SHA256".parse::<OaepHash>().unwrap_err().to_string(),
            "unknown OAEP hash \"SHA256\" (expected sha256 or sha1)"
        );
    }

    #[test]
    fn mechanisms_round_trip_and_keep_their_pkcs11_values() {
        for (ours, raw, name) in [
            (Mechanism::Des3Ecb, CKM_DES3_ECB, "CKM_DES3_ECB"),
            (
                Mechanism::Des3EcbEncryptData,
                CKM_DES3_ECB_ENCRYPT_DATA,
                "CKM_DES3_ECB_ENCRYPT_DATA",
            ),
            (Mechanism::Sha256Hmac, CKM_SHA256_HMAC, "CKM_SHA256_HMAC"),
            (Mechanism::Des3Cbc, CKM_DES3_CBC, "CKM_DES3_CBC"),
            (Mechanism::Des2KeyGen, CKM_DES2_KEY_GEN, "CKM_DES2_KEY_GEN"),
            (
                Mechanism::GenericSecretKeyGen,
                CKM_GENERIC_SECRET_KEY_GEN,
                "CKM_GENERIC_SECRET_KEY_GEN",
            ),
            (
                Mechanism::RsaPkcsKeyPairGen,
                CKM_RSA_PKCS_KEY_PAIR_GEN,
                "CKM_RSA_PKCS_KEY_PAIR_GEN",
            ),
            (
                Mechanism::RsaPkcsOaep,
                CKM_RSA_PKCS_OAEP,
                "CKM_RSA_PKCS_OAEP",
            ),
        ] {
            assert_eq!(CK_MECHANISM_TYPE::from(ours.to_cryptoki()), raw);
            assert_eq!(Mechanism::from_cryptoki(ours.to_cryptoki()), ours);
            assert_eq!(ours.to_string(), name);
        }
        let aes = Mechanism::from_cryptoki(MechanismType::AES_ECB);
        assert!(matches!(aes, Mechanism::Other(_)));
        assert_eq!(aes.to_cryptoki(), MechanismType::AES_ECB);
        assert_eq!(aes.to_string(), "0x1081");
    }
}
