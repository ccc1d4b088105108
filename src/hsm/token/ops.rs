//! The keyed primitives the domain uses, run in the token: DES3-ECB under a
//! CVV key pair, per-card key derivation, HMAC-SHA256 and its verification,
//! and the KCVs computed the same way.
//!
//! Every operation runs on the session [`Token::with_session`] hands out and
//! uses keys through the cache (`keys`). Per-card keys are derived into the
//! session of the call as [`EphemeralKey`]s and destroyed before the call
//! returns, on every path. Nothing here knows about cards: callers pass
//! labels, blocks and derivation data, and nothing returned or logged carries
//! them.

use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::mechanism::misc::KeyDerivationStringData;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::Token;
use super::counters::OpCounters;
use crate::hsm::error::{Benign, HsmError, HsmResult, Malfunction, tolerate};
use crate::hsm::mechanism::{allowed_mechanisms, des3_ecb_encrypt_data};
use crate::hsm::policy::{Kcv, KeyKind, KeyLabel};
use crate::hsm::types::Mechanism;
use crate::hsm::{BlockCipher, CardCrypto};

/// Where the two keys of the CVV construction (DESIGN 2.1) come from.
#[derive(Clone, Copy)]
pub enum CvvKeySource<'a> {
    /// A CVK: KA‖KA and KA‖KB token objects.
    Cvk(&'a KeyLabel),
    /// A per-card master key derived in the token from an IMK with
    /// `CKM_DES3_ECB_ENCRYPT_DATA`: `mk_data` gives MK, `twin_data` its MKA‖MKA.
    CardKey {
        /// The issuer master key.
        imk: &'a KeyLabel,
        /// Its kind (`ImkDcvv` or `ImkTdcvv2`): a key is only used as its kind.
        kind: KeyKind,
        /// Derivation data of the card key (16 bytes).
        mk_data: &'a [u8; 16],
        /// Derivation data of the card key's single-DES twin (16 bytes).
        twin_data: &'a [u8; 16],
    },
}

/// Shows labels only: the derivation data carries PAN digits (Option A).
impl std::fmt::Debug for CvvKeySource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CvvKeySource::Cvk(label) => f.debug_tuple("Cvk").field(label).finish(),
            CvvKeySource::CardKey { imk, kind, .. } => f
                .debug_struct("CardKey")
                .field("imk", imk)
                .field("kind", kind)
                .finish_non_exhaustive(),
        }
    }
}

/// The two keys of one CVV computation, usable for the duration of a call.
#[derive(Debug)]
pub struct CvvCipher<'s> {
    session: &'s Session,
    single: ObjectHandle,
    double: ObjectHandle,
    counters: &'s OpCounters,
}

impl BlockCipher for CvvCipher<'_> {
    fn encrypt_single(&self, blocks: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>> {
        encrypt(self.session, self.single, blocks, self.counters)
    }

    fn encrypt_double(&self, blocks: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>> {
        encrypt(self.session, self.double, blocks, self.counters)
    }

    fn kcv(&self) -> HsmResult<Kcv> {
        kcv_des(self.session, self.double, self.counters)
    }
}

fn encrypt(
    session: &Session,
    key: ObjectHandle,
    blocks: &[u8],
    counters: &OpCounters,
) -> HsmResult<Zeroizing<Vec<u8>>> {
    counters.count_encrypt();
    Ok(Zeroizing::new(session.encrypt(
        &CkMechanism::Des3Ecb,
        key,
        blocks,
    )?))
}

/// KCV convention for DES keys: the first 3 bytes of DES3-ECB(K, 00×8).
pub(in crate::hsm) fn kcv_des(
    session: &Session,
    key: ObjectHandle,
    counters: &OpCounters,
) -> HsmResult<Kcv> {
    let out = encrypt(session, key, &[0u8; 8], counters)?;
    Kcv::from_prefix(&out).ok_or(HsmError::Wrapper(Malfunction::OutputLength {
        mechanism: Mechanism::Des3Ecb,
        len: out.len(),
    }))
}

/// HMAC-SHA256 of `data` under `key`.
fn hmac(
    session: &Session,
    key: ObjectHandle,
    data: &[u8],
    counters: &OpCounters,
) -> HsmResult<Zeroizing<Vec<u8>>> {
    counters.count_sign();
    Ok(Zeroizing::new(session.sign(
        &CkMechanism::Sha256Hmac,
        key,
        data,
    )?))
}

/// KCV convention for HMAC keys: the first 3 bytes of HMAC-SHA256(K, 00×8).
pub(in crate::hsm) fn hmac_kcv(
    session: &Session,
    key: ObjectHandle,
    counters: &OpCounters,
) -> HsmResult<Kcv> {
    let mac = hmac(session, key, &[0u8; 8], counters)?;
    Kcv::from_prefix(&mac).ok_or(HsmError::Wrapper(Malfunction::OutputLength {
        mechanism: Mechanism::Sha256Hmac,
        len: mac.len(),
    }))
}

/// A key object that is destroyed when dropped: per-card keys and temporary
/// component keys never outlive the call that made them.
#[derive(Debug)]
pub(in crate::hsm) struct EphemeralKey<'s> {
    session: &'s Session,
    pub(in crate::hsm) handle: ObjectHandle,
    counters: &'s OpCounters,
}

impl<'s> EphemeralKey<'s> {
    pub(in crate::hsm) fn new(
        session: &'s Session,
        handle: ObjectHandle,
        counters: &'s OpCounters,
    ) -> Self {
        EphemeralKey {
            session,
            handle,
            counters,
        }
    }
}

impl Drop for EphemeralKey<'_> {
    fn drop(&mut self) {
        self.counters.count_destroy();
        if let Err(e) = self.session.destroy_object(self.handle) {
            // The object is a session object: it dies with the session at the latest.
            tracing::warn!(error = %HsmError::from(e), "could not destroy a session key");
        }
    }
}

/// Template of a session key that can only encrypt with `CKM_DES3_ECB`.
pub(in crate::hsm) fn session_des_encrypt_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::DES2),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        allowed_mechanisms(KeyKind::Cvk.mechanisms()),
    ]
}

impl Token {
    fn cvv_keys<R>(
        &self,
        source: CvvKeySource<'_>,
        mut f: impl FnMut(&dyn BlockCipher) -> HsmResult<R>,
    ) -> HsmResult<R> {
        self.with_session(|session| match source {
            CvvKeySource::Cvk(label) => {
                let key = self.key(label, KeyKind::Cvk)?;
                let twin = key.twin.ok_or_else(|| HsmError::KeyNotFound {
                    label: label.single_des_twin(),
                })?;
                f(&CvvCipher {
                    session,
                    single: twin,
                    double: key.main,
                    counters: &self.counters,
                })
            }
            CvvKeySource::CardKey {
                imk,
                kind,
                mk_data,
                twin_data,
            } => {
                let key = self.key(imk, kind)?;
                let double = self.derive_session_key(session, key.main, mk_data)?;
                let single = self.derive_session_key(session, key.main, twin_data)?;
                f(&CvvCipher {
                    session,
                    single: single.handle,
                    double: double.handle,
                    counters: &self.counters,
                })
            }
        })
    }

    fn derive_session_key<'s>(
        &'s self,
        session: &'s Session,
        base: ObjectHandle,
        data: &[u8; 16],
    ) -> HsmResult<EphemeralKey<'s>> {
        let params = KeyDerivationStringData::new(data);
        self.counters.count_derive();
        let handle = session.derive_key(
            &des3_ecb_encrypt_data(&params),
            base,
            &session_des_encrypt_template(),
        )?;
        Ok(EphemeralKey::new(session, handle, &self.counters))
    }

    /// HMAC-SHA256 under a PAN-index or audit-seal key.
    ///
    /// # Errors
    /// `KeyNotFound`, `WrongKeyKind`, `KeyPolicy`, `Busy`, or the token's error.
    pub fn hmac(
        &self,
        label: &KeyLabel,
        kind: KeyKind,
        data: &[u8],
    ) -> HsmResult<Zeroizing<Vec<u8>>> {
        self.with_session(|session| {
            let key = self.key(label, kind)?;
            hmac(session, key.main, data, &self.counters)
        })
    }

    /// Checks an HMAC-SHA256 under an audit-seal key, in the token (`C_Verify`):
    /// `Ok(false)` when the token says the MAC does not match (audit seals, issue 4).
    ///
    /// # Errors
    /// `KeyNotFound`, `WrongKeyKind`, `KeyPolicy`, `Busy`, or the token's error.
    pub fn hmac_verify(
        &self,
        label: &KeyLabel,
        kind: KeyKind,
        data: &[u8],
        mac: &[u8],
    ) -> HsmResult<bool> {
        self.with_session(|session| {
            let key = self.key(label, kind)?;
            let verified = session.verify(&CkMechanism::Sha256Hmac, key.main, data, mac);
            Ok(tolerate(verified, Benign::SignatureMismatch)?.is_some())
        })
    }
}

impl CardCrypto for Token {
    /// For a card key, both keys are derived in the token as session objects of the
    /// call's session and destroyed before this returns, also on error.
    fn with_cvv_keys<R>(
        &self,
        source: CvvKeySource<'_>,
        f: impl FnMut(&dyn BlockCipher) -> HsmResult<R>,
    ) -> HsmResult<R> {
        self.cvv_keys(source, f)
    }

    fn key_check_value(&self, label: &KeyLabel, kind: KeyKind) -> HsmResult<Kcv> {
        self.load_key(label, kind)
    }

    fn hmac(&self, label: &KeyLabel, kind: KeyKind, data: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>> {
        Token::hmac(self, label, kind, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_key_source_debug_hides_the_derivation_data() {
        let imk: KeyLabel = "imk-v1".parse().unwrap();
        let data = [0x41u8; 16];
        let source = CvvKeySource::CardKey {
            imk: &imk,
            kind: KeyKind::ImkTdcvv2,
            mk_data: &data,
            twin_data: &data,
        };
        let shown = format!("{source:?}");
        assert_eq!(
            shown,
            "CardKey { imk: KeyLabel(\"imk-v1\"), kind: ImkTdcvv2, .. }"
        );
        assert!(!shown.contains("65"));
    }
}
