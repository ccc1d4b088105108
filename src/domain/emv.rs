//! EMV chip cryptography beyond the Visa CVV family (issue 11): Mastercard
//! CVC3 and the authorization cryptogram (ARQC verification, ARPC generation)
//! of the Visa and Mastercard cryptogram versions.
//!
//! The host's share is pure (padding, session-key derivation data, which key
//! and padding each cryptogram version uses, CVC3 digits); every DES step and
//! every derivation runs in the token through [`CardCrypto::with_emv_key`]:
//! - card master key MK from the IMK by EMV Option A/B (DESIGN 2.2), as for dCVV;
//! - session key SK from MK with `CKM_DES3_ECB_ENCRYPT_DATA`: EMV common session
//!   key (EMV 4.x Book 2 A1.3, R = ATC‖00…00) or Mastercard SKD (R = ATC‖00 00‖UN),
//!   SK = TDES(MK, R with `R[2] = F0`) ‖ TDES(MK, R with `R[2] = 0F`);
//! - the MAC is ISO/IEC 9797-1 algorithm 3 (single-DES CBC under SKL, the last
//!   block under SKL‖SKR), the ARPC method 1 block TDES under the key.
//!
//! Public references read: EMV 4.x Book 2 annex A1; pyemv (`kd`, `ac`, `cvn`,
//! `cvv.generate_cvc3`); jPOS `JCESecurityModule` (`calculateCVC3`, ARQC / ARPC).

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::hsm::{
    CardCrypto, EmvKeySource, HsmError, Kcv, KeyDerivation, KeyKind, KeyLabel, MacKey,
};

use super::DomainError;
use super::blocks::{CardKeyMethod, card_key_derivation_data, card_key_y};
use super::card::{Pan, Psn};
use super::engine::Engine;

/// ISO/IEC 9797-1 padding of MAC input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// Method 1: `00` bytes up to a whole block (none when already whole).
    Method1,
    /// Method 2: `80`, then `00` bytes up to a whole block (always at least one byte).
    Method2,
}

impl Padding {
    /// `data` padded to a whole number of 8-byte blocks (at least one).
    pub fn apply(self, data: &[u8]) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(data.len() + 8));
        out.extend_from_slice(data);
        if self == Padding::Method2 {
            out.push(0x80);
        }
        while out.is_empty() || !out.len().is_multiple_of(8) {
            out.push(0x00);
        }
        out
    }

    /// The wire name (`iso9797-1-method-1`, `iso9797-1-method-2`).
    pub fn as_str(self) -> &'static str {
        match self {
            Padding::Method1 => "iso9797-1-method-1",
            Padding::Method2 => "iso9797-1-method-2",
        }
    }
}

/// How the key an ARQC is MACed under comes from the card master key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionKeyDerivation {
    /// No session key: the card master key itself (Visa CVN 10).
    None,
    /// EMV common session key, R = ATC ‖ 00 00 00 00 00 00.
    Common,
    /// Mastercard SKD, R = ATC ‖ 00 00 ‖ UN.
    MastercardSkd,
}

/// Which key an ARPC is made under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArpcKey {
    /// The card master key (Visa CVN 10, Mastercard CVN 16 / 17).
    CardKey,
    /// The session key the ARQC was MACed under.
    SessionKey,
}

/// The cryptogram versions the gateway verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CryptogramVersion {
    /// Visa CVN 10: MK, padding method 1, ARPC method 1 under MK.
    VisaCvn10,
    /// Visa CVN 18: common session key, padding method 2 over CDOL1 data and the
    /// whole IAD, ARPC method 2.
    VisaCvn18,
    /// Visa CVN 22: as CVN 18 for the ARQC and the ARPC.
    VisaCvn22,
    /// Mastercard CVN 16 (M/Chip 4): SKD with the UN, ARPC method 1 under MK.
    MastercardCvn16,
    /// Mastercard CVN 17: as CVN 16, the counters in the MACed data.
    MastercardCvn17,
    /// Mastercard CVN 20 (M/Chip Advance, EMV CSK): ARPC method 1 under SK.
    MastercardCvn20,
    /// Mastercard CVN 21: as CVN 20, the counters in the MACed data.
    MastercardCvn21,
    /// EMV 4.x common session key, padding method 2, ARPC method 1 or 2 under SK.
    EmvCommonSessionKey,
}

impl CryptogramVersion {
    /// Every version, in documentation order.
    pub const ALL: [CryptogramVersion; 8] = [
        CryptogramVersion::VisaCvn10,
        CryptogramVersion::VisaCvn18,
        CryptogramVersion::VisaCvn22,
        CryptogramVersion::MastercardCvn16,
        CryptogramVersion::MastercardCvn17,
        CryptogramVersion::MastercardCvn20,
        CryptogramVersion::MastercardCvn21,
        CryptogramVersion::EmvCommonSessionKey,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            CryptogramVersion::VisaCvn10 => "visa-cvn10",
            CryptogramVersion::VisaCvn18 => "visa-cvn18",
            CryptogramVersion::VisaCvn22 => "visa-cvn22",
            CryptogramVersion::MastercardCvn16 => "mastercard-cvn16",
            CryptogramVersion::MastercardCvn17 => "mastercard-cvn17",
            CryptogramVersion::MastercardCvn20 => "mastercard-cvn20",
            CryptogramVersion::MastercardCvn21 => "mastercard-cvn21",
            CryptogramVersion::EmvCommonSessionKey => "emv-common-session-key",
        }
    }

    /// The version named `s`.
    ///
    /// # Errors
    /// `Invalid` for a name the gateway does not know.
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        CryptogramVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or(DomainError::Invalid {
                field: "cryptogramVersion",
                reason: "is not a supported cryptogram version",
            })
    }

    /// How the MAC key comes from the card master key.
    pub fn session_key(self) -> SessionKeyDerivation {
        match self {
            CryptogramVersion::VisaCvn10 => SessionKeyDerivation::None,
            CryptogramVersion::MastercardCvn16 | CryptogramVersion::MastercardCvn17 => {
                SessionKeyDerivation::MastercardSkd
            }
            _ => SessionKeyDerivation::Common,
        }
    }

    /// The padding the card applies to the transaction data.
    pub fn default_padding(self) -> Padding {
        match self {
            CryptogramVersion::VisaCvn10 => Padding::Method1,
            _ => Padding::Method2,
        }
    }

    /// Whether the version needs the unpredictable number (Mastercard SKD).
    pub fn needs_unpredictable_number(self) -> bool {
        self.session_key() == SessionKeyDerivation::MastercardSkd
    }

    /// The key of an ARPC by method 1, or `None` when the version has no method 1.
    pub fn arpc_method1_key(self) -> Option<ArpcKey> {
        match self {
            CryptogramVersion::VisaCvn10
            | CryptogramVersion::MastercardCvn16
            | CryptogramVersion::MastercardCvn17 => Some(ArpcKey::CardKey),
            CryptogramVersion::MastercardCvn20
            | CryptogramVersion::MastercardCvn21
            | CryptogramVersion::EmvCommonSessionKey => Some(ArpcKey::SessionKey),
            CryptogramVersion::VisaCvn18 | CryptogramVersion::VisaCvn22 => None,
        }
    }

    /// Whether the version makes ARPCs by method 2 (always under the session key).
    pub fn has_arpc_method2(self) -> bool {
        matches!(
            self,
            CryptogramVersion::VisaCvn18
                | CryptogramVersion::VisaCvn22
                | CryptogramVersion::EmvCommonSessionKey
        )
    }
}

/// The ARPC asked for, with its inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArpcRequest {
    /// Method 1: the 2-byte authorization response code.
    Method1 {
        /// ARC (e.g. `3030`, `0010`).
        arc: [u8; 2],
    },
    /// Method 2: the 4-byte card status update and 0–8 bytes of proprietary
    /// authentication data.
    Method2 {
        /// CSU.
        csu: [u8; 4],
        /// Proprietary authentication data.
        proprietary: Vec<u8>,
    },
}

/// An ARQC to verify, parsed.
pub struct ArqcInput {
    /// The cryptogram version.
    pub version: CryptogramVersion,
    /// The data the card MACed (CDOL1 data, the IAD where the version needs it), unpadded.
    pub transaction_data: Zeroizing<Vec<u8>>,
    /// The padding: the version's own unless the request names one.
    pub padding: Padding,
    /// ATC, 2 bytes.
    pub atc: [u8; 2],
    /// Unpredictable number, 4 bytes, where the version needs it.
    pub unpredictable_number: Option<[u8; 4]>,
    /// The cryptogram, 8 bytes.
    pub arqc: [u8; 8],
    /// The ARPC to make when the ARQC verifies.
    pub arpc: Option<ArpcRequest>,
}

/// Shows the version, the padding and whether an ARPC is asked: never the data,
/// the ATC, the UN or the cryptogram.
impl std::fmt::Debug for ArqcInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArqcInput")
            .field("version", &self.version)
            .field("padding", &self.padding)
            .field("arpc", &self.arpc.is_some())
            .finish_non_exhaustive()
    }
}

impl ArqcInput {
    /// Checks the combination of fields the version needs.
    ///
    /// # Errors
    /// `Invalid` naming the field: a UN the version needs and lacks, an ARPC
    /// method the version does not have.
    pub fn check(&self) -> Result<(), DomainError> {
        if self.version.needs_unpredictable_number() && self.unpredictable_number.is_none() {
            return Err(DomainError::Invalid {
                field: "unpredictableNumber",
                reason: "is required by this cryptogram version",
            });
        }
        match &self.arpc {
            Some(ArpcRequest::Method1 { .. }) if self.version.arpc_method1_key().is_none() => {
                Err(DomainError::Invalid {
                    field: "arc",
                    reason: "this cryptogram version makes ARPCs by method 2 (csu)",
                })
            }
            Some(ArpcRequest::Method2 { .. }) if !self.version.has_arpc_method2() => {
                Err(DomainError::Invalid {
                    field: "csu",
                    reason: "this cryptogram version makes ARPCs by method 1 (arc)",
                })
            }
            _ => Ok(()),
        }
    }

    /// R of the session key derivation, when the version has a session key.
    fn session_r(&self) -> Option<Zeroizing<[u8; 8]>> {
        let mut r = Zeroizing::new([0u8; 8]);
        r[..2].copy_from_slice(&self.atc);
        match self.version.session_key() {
            SessionKeyDerivation::None => None,
            SessionKeyDerivation::Common => Some(r),
            SessionKeyDerivation::MastercardSkd => {
                r[4..].copy_from_slice(&self.unpredictable_number.unwrap_or_default());
                Some(r)
            }
        }
    }
}

/// The outcome of an ARQC verification. `Debug` shows whether there is an
/// ARPC, never its value.
pub struct ArqcOutcome {
    /// Whether the ARQC is the one the card key gives.
    pub matched: bool,
    /// The ARPC (8 bytes by method 1, 4 by method 2), only when matched and asked.
    pub arpc: Option<Zeroizing<Vec<u8>>>,
    /// KCV of the IMK-AC.
    pub kcv: Kcv,
}

impl std::fmt::Debug for ArqcOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArqcOutcome")
            .field("matched", &self.matched)
            .field("arpc", &self.arpc.is_some())
            .field("kcv", &self.kcv)
            .finish()
    }
}

/// Derivation data of an EMV session key from R: SK = TDES(MK, R_F0) ‖
/// TDES(MK, R_0F), its single-DES twin SKL ‖ SKL from R_F0 ‖ R_F0.
pub fn session_key_derivation_data(r: &[u8; 8]) -> (Zeroizing<[u8; 16]>, Zeroizing<[u8; 16]>) {
    let mut key = Zeroizing::new([0u8; 16]);
    let mut twin = Zeroizing::new([0u8; 16]);
    key[..8].copy_from_slice(r);
    key[8..].copy_from_slice(r);
    key[2] = 0xF0;
    key[10] = 0x0F;
    twin[..8].copy_from_slice(&key[..8]);
    twin[8..].copy_from_slice(&key[..8]);
    (key, twin)
}

/// The 5 CVC3 digits of the last two bytes of the CVC3 block (zero-padded decimal).
pub fn cvc3_digits(block: &[u8]) -> Zeroizing<String> {
    let value = match block {
        [.., a, b] => u16::from_be_bytes([*a, *b]),
        _ => 0,
    };
    Zeroizing::new(format!("{value:05}"))
}

/// Whether a typed CVC3 of 3–5 digits is the rightmost digits of the computed
/// 5, in constant time.
pub fn cvc3_matches(computed: &str, candidate: &str) -> bool {
    let Some(tail) = computed
        .len()
        .checked_sub(candidate.len())
        .and_then(|at| computed.get(at..))
    else {
        return false;
    };
    (3..=5).contains(&candidate.len()) && bool::from(tail.as_bytes().ct_eq(candidate.as_bytes()))
}

fn wrong_length(len: usize) -> HsmError {
    HsmError::Wrapper(crate::hsm::Malfunction::OutputLength {
        mechanism: crate::hsm::Mechanism::Des3Ecb,
        len,
    })
}

/// ARPC method 1 (EMV Book 2 A1.2.1): TDES(K, ARQC ⊕ (ARC ‖ 00×6)).
fn arpc_method1(
    key: &dyn MacKey,
    arqc: &[u8; 8],
    arc: [u8; 2],
) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    let mut block = Zeroizing::new(*arqc);
    block[0] ^= arc[0];
    block[1] ^= arc[1];
    let out = key.encrypt(&block[..])?;
    if out.len() != 8 {
        return Err(wrong_length(out.len()));
    }
    Ok(out)
}

/// ARPC method 2 (EMV Book 2 A1.2.2): the first 4 bytes of the MAC (padding
/// method 2) of ARQC ‖ CSU ‖ proprietary authentication data under SK.
fn arpc_method2(
    key: &dyn MacKey,
    arqc: &[u8; 8],
    csu: [u8; 4],
    proprietary: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    let mut data = Zeroizing::new(Vec::with_capacity(20));
    data.extend_from_slice(arqc);
    data.extend_from_slice(&csu);
    data.extend_from_slice(proprietary);
    let mac = key.retail_mac(&Padding::Method2.apply(&data))?;
    Ok(Zeroizing::new(mac[..4].to_vec()))
}

impl<H: CardCrypto> Engine<H> {
    /// The card master key derivation from `imk` for a PAN and PSN (Option A,
    /// Option B for PANs over 16 digits).
    fn card_derivation(pan: &Pan, psn: Psn) -> (Zeroizing<[u8; 16]>, Zeroizing<[u8; 16]>) {
        card_key_derivation_data(&card_key_y(pan, psn, CardKeyMethod::for_pan(pan)))
    }

    /// Mastercard CVC3 (dCVC3) of a card for a track image, UN and ATC: the five
    /// digits, from which the card's track carries the rightmost 3–5.
    ///
    /// IVCVC3 = the last 2 bytes of the MAC (ISO/IEC 9797-1 algorithm 3, padding
    /// method 2) of the track data under MK-CVC3; CVC3 = the last 2 bytes of
    /// TDES(MK-CVC3, IVCVC3 ‖ UN ‖ ATC) as a decimal number.
    ///
    /// # Errors
    /// `KeyUnusable` when the key is missing or refused; `Unavailable` or
    /// `Internal` when the token fails.
    pub fn cvc3(
        &self,
        imk: &KeyLabel,
        pan: &Pan,
        psn: Psn,
        track_data: &[u8],
        unpredictable_number: [u8; 4],
        atc: [u8; 2],
    ) -> Result<(Zeroizing<String>, Kcv), DomainError> {
        let kcv = self.hsm().key_check_value(imk, KeyKind::ImkCvc3)?;
        let card = Self::card_derivation(pan, psn);
        let source = EmvKeySource {
            imk,
            kind: KeyKind::ImkCvc3,
            card: KeyDerivation {
                key: &card.0,
                twin: &card.1,
            },
            session: None,
        };
        let padded = Padding::Method2.apply(track_data);
        let block = self.hsm().with_emv_key(source, |key: &dyn MacKey| {
            let iv = key.retail_mac(&padded)?;
            let mut input = Zeroizing::new([0u8; 8]);
            input[..2].copy_from_slice(&iv[6..]);
            input[2..6].copy_from_slice(&unpredictable_number);
            input[6..].copy_from_slice(&atc);
            key.encrypt(&input[..])
        })?;
        if block.len() != 8 {
            return Err(wrong_length(block.len()).into());
        }
        Ok((cvc3_digits(&block), kcv))
    }

    /// Verifies an ARQC under `imk` (kind `imk-ac`) and, when it matches and an
    /// ARPC is asked, makes the ARPC. All in the token; the MAC comparison is in
    /// constant time.
    ///
    /// # Errors
    /// `Invalid` for a combination the version does not allow; otherwise as
    /// [`Engine::cvc3`].
    pub fn arqc(
        &self,
        imk: &KeyLabel,
        pan: &Pan,
        psn: Psn,
        input: &ArqcInput,
    ) -> Result<ArqcOutcome, DomainError> {
        input.check()?;
        let kcv = self.hsm().key_check_value(imk, KeyKind::ImkAc)?;
        let card = Self::card_derivation(pan, psn);
        let card_key = KeyDerivation {
            key: &card.0,
            twin: &card.1,
        };
        let session_data = input.session_r().map(|r| session_key_derivation_data(&r));
        let source = EmvKeySource {
            imk,
            kind: KeyKind::ImkAc,
            card: card_key,
            session: session_data
                .as_ref()
                .map(|(key, twin)| KeyDerivation { key, twin }),
        };
        let padded = input.padding.apply(&input.transaction_data);
        // The ARPC under the MAC key is made in the same call; under the card key
        // of a session-key version, in a second one.
        let same_key_arpc = match &input.arpc {
            Some(ArpcRequest::Method1 { .. }) => {
                input.version.arpc_method1_key() == Some(ArpcKey::SessionKey)
                    || input.version.session_key() == SessionKeyDerivation::None
            }
            Some(ArpcRequest::Method2 { .. }) => true,
            None => false,
        };
        let (matched, mut arpc) = self.hsm().with_emv_key(source, |key: &dyn MacKey| {
            let mac = key.retail_mac(&padded)?;
            let matched: bool = mac[..].ct_eq(&input.arqc[..]).into();
            let arpc = match (&input.arpc, matched && same_key_arpc) {
                (Some(ArpcRequest::Method1 { arc }), true) => {
                    Some(arpc_method1(key, &input.arqc, *arc)?)
                }
                (Some(ArpcRequest::Method2 { csu, proprietary }), true) => {
                    Some(arpc_method2(key, &input.arqc, *csu, proprietary)?)
                }
                _ => None,
            };
            Ok((matched, arpc))
        })?;
        if let (true, false, Some(ArpcRequest::Method1 { arc })) =
            (matched, same_key_arpc, &input.arpc)
        {
            let card_only = EmvKeySource {
                session: None,
                ..source
            };
            arpc = Some(self.hsm().with_emv_key(card_only, |key: &dyn MacKey| {
                arpc_method1(key, &input.arqc, *arc)
            })?);
        }
        Ok(ArqcOutcome { matched, arpc, kcv })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_methods() {
        assert_eq!(
            &Padding::Method1.apply(&[1, 2, 3])[..],
            &[1, 2, 3, 0, 0, 0, 0, 0]
        );
        assert_eq!(Padding::Method1.apply(&[7; 8]).len(), 8);
        assert_eq!(Padding::Method1.apply(&[]).len(), 8);
        assert_eq!(
            &Padding::Method2.apply(&[1, 2, 3])[..],
            &[1, 2, 3, 0x80, 0, 0, 0, 0]
        );
        let whole = Padding::Method2.apply(&[7; 8]);
        assert_eq!(whole.len(), 16);
        assert_eq!(whole[8], 0x80);
    }

    #[test]
    fn session_key_data_sets_byte_three() {
        let r = [0x00, 0x1C, 0x00, 0x00, 0xAB, 0xCD, 0xEF, 0x12];
        let (key, twin) = session_key_derivation_data(&r);
        assert_eq!(hex::encode_upper(*key), "001CF000ABCDEF12001C0F00ABCDEF12");
        assert_eq!(hex::encode_upper(*twin), "001CF000ABCDEF12001CF000ABCDEF12");
    }

    #[test]
    fn cvc3_takes_the_last_two_bytes_as_five_digits() {
        assert_eq!(&*cvc3_digits(&[0, 0, 0, 0, 0, 0, 0x73, 0x30]), "29488");
        assert_eq!(&*cvc3_digits(&[9, 9, 9, 9, 9, 9, 0x01, 0xD0]), "00464");
        assert!(cvc3_matches("29488", "488"));
        assert!(cvc3_matches("29488", "9488"));
        assert!(cvc3_matches("29488", "29488"));
        assert!(!cvc3_matches("29488", "487"));
        assert!(!cvc3_matches("29488", "88"));
        assert!(!cvc3_matches("29488", "129488"));
    }

    #[test]
    fn versions_round_trip_and_say_what_they_need() {
        for v in CryptogramVersion::ALL {
            assert_eq!(CryptogramVersion::parse(v.as_str()).unwrap(), v);
            // Every version can make some ARPC.
            assert!(v.arpc_method1_key().is_some() || v.has_arpc_method2());
        }
        assert!(CryptogramVersion::parse("visa-cvn11").is_err());
        assert!(CryptogramVersion::MastercardCvn16.needs_unpredictable_number());
        assert!(!CryptogramVersion::MastercardCvn20.needs_unpredictable_number());
        assert_eq!(
            CryptogramVersion::VisaCvn10.default_padding(),
            Padding::Method1
        );
        assert_eq!(
            CryptogramVersion::VisaCvn18.default_padding(),
            Padding::Method2
        );
    }

    fn input(version: CryptogramVersion) -> ArqcInput {
        ArqcInput {
            version,
            transaction_data: Zeroizing::new(vec![0; 30]),
            padding: version.default_padding(),
            atc: [0, 1],
            unpredictable_number: None,
            arqc: [0; 8],
            arpc: None,
        }
    }

    #[test]
    fn combinations_a_version_does_not_allow_are_refused() {
        let mc = input(CryptogramVersion::MastercardCvn16);
        assert!(matches!(
            mc.check(),
            Err(DomainError::Invalid {
                field: "unpredictableNumber",
                ..
            })
        ));
        let mut visa18 = input(CryptogramVersion::VisaCvn18);
        visa18.arpc = Some(ArpcRequest::Method1 { arc: [0x30, 0x30] });
        assert!(matches!(
            visa18.check(),
            Err(DomainError::Invalid { field: "arc", .. })
        ));
        let mut visa10 = input(CryptogramVersion::VisaCvn10);
        visa10.arpc = Some(ArpcRequest::Method2 {
            csu: [0; 4],
            proprietary: vec![],
        });
        assert!(matches!(
            visa10.check(),
            Err(DomainError::Invalid { field: "csu", .. })
        ));
        assert!(
            input(CryptogramVersion::EmvCommonSessionKey)
                .check()
                .is_ok()
        );
    }

    #[test]
    fn the_debug_form_hides_the_cryptogram_inputs() {
        let mut i = input(CryptogramVersion::MastercardCvn16);
        i.arqc = [0xAB; 8];
        i.transaction_data = Zeroizing::new(vec![0xCD; 10]);
        let shown = format!("{i:?}");
        assert!(!shown.contains("171") && !shown.contains("AB") && !shown.contains("205"));
    }
}
