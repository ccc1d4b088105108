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
use crate::hsm::error::{Benign, HsmError, HsmResult, KeyInputError, Malfunction, tolerate};
use crate::hsm::mechanism::{allowed_mechanisms, des3_ecb_encrypt_data};
use crate::hsm::policy::{Kcv, KeyKind, KeyLabel};
use crate::hsm::types::Mechanism;
use crate::hsm::{BlockCipher, CardCrypto, MacKey};

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

/// The derivation data of a double-length key and of its single-DES twin, for
/// `CKM_DES3_ECB_ENCRYPT_DATA`: `key` gives K = KL‖KR, `twin` gives KL‖KL.
#[derive(Clone, Copy)]
pub struct KeyDerivation<'a> {
    /// Derivation data of the key (16 bytes).
    pub key: &'a [u8; 16],
    /// Derivation data of its single-DES twin (16 bytes).
    pub twin: &'a [u8; 16],
}

/// Shows nothing: derivation data carries PAN digits and the ATC.
impl std::fmt::Debug for KeyDerivation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyDerivation").finish_non_exhaustive()
    }
}

/// Where the key of an EMV computation comes from: the card master key derived
/// from an IMK (DESIGN 2.2), and, when `session` is given, a session key derived
/// from that card key (EMV common session key, Mastercard SKD).
#[derive(Clone, Copy)]
pub struct EmvKeySource<'a> {
    /// The issuer master key.
    pub imk: &'a KeyLabel,
    /// Its kind (`ImkAc` or `ImkCvc3`): a key is only used as its kind.
    pub kind: KeyKind,
    /// Derivation of the card master key from the IMK.
    pub card: KeyDerivation<'a>,
    /// Derivation of a session key from the card master key.
    pub session: Option<KeyDerivation<'a>>,
}

/// Shows the label, the kind and whether a session key is derived: the
/// derivation data carries PAN digits and the ATC.
impl std::fmt::Debug for EmvKeySource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmvKeySource")
            .field("imk", self.imk)
            .field("kind", &self.kind)
            .field("session_key", &self.session.is_some())
            .finish_non_exhaustive()
    }
}

/// The key of an EMV computation and its single-DES twin, for one call.
#[derive(Debug)]
struct EmvKey<'s> {
    session: &'s Session,
    key: ObjectHandle,
    twin: ObjectHandle,
    counters: &'s OpCounters,
}

impl MacKey for EmvKey<'_> {
    fn retail_mac(&self, padded: &[u8]) -> HsmResult<Zeroizing<[u8; 8]>> {
        if padded.is_empty() || !padded.len().is_multiple_of(8) {
            return Err(HsmError::InvalidInput(KeyInputError::BlockLength(
                padded.len(),
            )));
        }
        let (head, last) = padded.split_at(padded.len() - 8);
        let mut x = Zeroizing::new([0u8; 8]);
        x.copy_from_slice(last);
        if !head.is_empty() {
            // H(n-1): single-DES CBC under KL (the twin KL‖KL), IV zero.
            self.counters.count_encrypt();
            let chain = Zeroizing::new(self.session.encrypt(
                &CkMechanism::Des3Cbc([0u8; 8]),
                self.twin,
                head,
            )?);
            let h = chain
                .len()
                .checked_sub(8)
                .and_then(|at| chain.get(at..))
                .filter(|_| chain.len() == head.len())
                .ok_or(HsmError::Wrapper(Malfunction::OutputLength {
                    mechanism: Mechanism::Des3Cbc,
                    len: chain.len(),
                }))?;
            x.iter_mut().zip(h).for_each(|(a, b)| *a ^= b);
        }
        // The last step DES(KL)·DES⁻¹(KR)·DES(KL) is TDES-EDE under K.
        let out = encrypt(self.session, self.key, &x[..], self.counters)?;
        let mut mac = Zeroizing::new([0u8; 8]);
        if out.len() != 8 {
            return Err(HsmError::Wrapper(Malfunction::OutputLength {
                mechanism: Mechanism::Des3Ecb,
                len: out.len(),
            }));
        }
        mac.copy_from_slice(&out);
        Ok(mac)
    }

    fn encrypt(&self, blocks: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>> {
        encrypt(self.session, self.key, blocks, self.counters)
    }

    fn kcv(&self) -> HsmResult<Kcv> {
        kcv_des(self.session, self.key, self.counters)
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

/// What a derived DES2 session key may do: its one usage flag and its mechanisms.
#[derive(Clone, Copy)]
enum SessionUse {
    /// `CKA_ENCRYPT` with these mechanisms.
    Encrypt(&'static [Mechanism]),
    /// `CKA_DERIVE` with `CKM_DES3_ECB_ENCRYPT_DATA`.
    Derive,
}

/// Template of a sensitive, non-extractable DES2 session key with one usage.
fn session_des_template(usage: SessionUse) -> Vec<Attribute> {
    let (encrypt, derive, mechanisms) = match usage {
        SessionUse::Encrypt(mechanisms) => (true, false, mechanisms),
        SessionUse::Derive => (false, true, &[Mechanism::Des3EcbEncryptData][..]),
    };
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::DES2),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(encrypt),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(derive),
        allowed_mechanisms(mechanisms),
    ]
}

/// Template of a session key that can only encrypt with `CKM_DES3_ECB`.
pub(in crate::hsm) fn session_des_encrypt_template() -> Vec<Attribute> {
    session_des_template(SessionUse::Encrypt(KeyKind::Cvk.mechanisms()))
}

/// Template of a session key that can only derive with `CKM_DES3_ECB_ENCRYPT_DATA`:
/// a card master key from which the session key of a cryptogram is derived.
fn session_des_derive_template() -> Vec<Attribute> {
    session_des_template(SessionUse::Derive)
}

/// Template of the single-DES twin KL‖KL of an EMV key: CBC encryption only
/// (the chain of ISO/IEC 9797-1 MAC algorithm 3).
fn session_des_chain_template() -> Vec<Attribute> {
    session_des_template(SessionUse::Encrypt(&[Mechanism::Des3Cbc]))
}

impl Token {
    fn emv_key<R>(
        &self,
        source: EmvKeySource<'_>,
        mut f: impl FnMut(&dyn MacKey) -> HsmResult<R>,
    ) -> HsmResult<R> {
        self.with_session(|session| {
            let imk = self.key(source.imk, source.kind)?;
            let derive = |base, data: &[u8; 16], template: &[Attribute]| {
                let params = KeyDerivationStringData::new(data);
                self.counters.count_derive();
                let handle = session.derive_key(&des3_ecb_encrypt_data(&params), base, template)?;
                Ok::<_, HsmError>(EphemeralKey::new(session, handle, &self.counters))
            };
            let encrypt_only = session_des_encrypt_template();
            let chain_only = session_des_chain_template();
            // Locals drop in reverse order: every derived key is destroyed on every path.
            let (key, twin, _card) = match source.session {
                None => (
                    derive(imk.main, source.card.key, &encrypt_only)?,
                    derive(imk.main, source.card.twin, &chain_only)?,
                    None,
                ),
                Some(sk) => {
                    let card = derive(imk.main, source.card.key, &session_des_derive_template())?;
                    (
                        derive(card.handle, sk.key, &encrypt_only)?,
                        derive(card.handle, sk.twin, &chain_only)?,
                        Some(card),
                    )
                }
            };
            f(&EmvKey {
                session,
                key: key.handle,
                twin: twin.handle,
                counters: &self.counters,
            })
        })
    }

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

    /// The card key (and the session key) are derived in the token as session
    /// objects of the call's session and destroyed before this returns, also on error.
    fn with_emv_key<R>(
        &self,
        source: EmvKeySource<'_>,
        f: impl FnMut(&dyn MacKey) -> HsmResult<R>,
    ) -> HsmResult<R> {
        self.emv_key(source, f)
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
