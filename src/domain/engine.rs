//! The card-code engine: CVV / CVV2 / iCVV, contactless dCVV and TDCVV2-v1
//! generation and verification (DESIGN 2), on top of the HSM port.
//!
//! Every code costs one checked-out session: for a card key, two derivations, two
//! multi-block encryptions (however many windows), and the destruction of the two
//! session keys. The host packs blocks, XORs R1 with B2 and decimalizes.

use zeroize::Zeroizing;

use crate::hsm::{BlockCipher, CardCrypto, CvvKeySource, HsmError, Kcv, KeyKind, KeyLabel};

use super::DomainError;
use super::blocks::{
    Block, CardKeyMethod, card_key_derivation_data, card_key_y, cvv_blocks, dcvv_blocks,
    decimalize, tdcvv2_blocks, window_of,
};
use super::card::{Atc, CodeLength, Expiry, Pan, Psn, SecurityCode, ServiceCode, Tdcvv2Profile};

/// Which static code to compute (DESIGN 2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaticCodeKind {
    /// CVV with the card's own service code (magnetic stripe).
    Cvv(ServiceCode),
    /// CVV2: service code `000` (printed on the card).
    Cvv2,
    /// iCVV: service code `999` (chip track-2 image).
    Icvv,
}

impl StaticCodeKind {
    fn service_code(self) -> ServiceCode {
        match self {
            StaticCodeKind::Cvv(sc) => sc,
            StaticCodeKind::Cvv2 => ServiceCode::CVV2,
            StaticCodeKind::Icvv => ServiceCode::ICVV,
        }
    }
}

/// A code and the KCV of the key it was computed under.
#[derive(Debug)]
pub struct IssuedCode {
    /// The code.
    pub code: SecurityCode,
    /// KCV of the CVK or IMK used.
    pub kcv: Kcv,
}

/// One TDCVV2-v1 value with its validity (DESIGN 2.4).
#[derive(Debug)]
pub struct WindowCode {
    /// Window counter T.
    pub window: u64,
    /// The dCVV2.
    pub code: SecurityCode,
    /// Start of validity, Unix seconds (T·W).
    pub valid_from: u64,
    /// End of validity, Unix seconds ((T+1)·W), exclusive.
    pub valid_until: u64,
}

/// Most values one generation call may return (DESIGN 4).
pub const MAX_VALUES: u8 = 24;

/// The card-code engine over an HSM port.
#[derive(Debug)]
pub struct Engine<H> {
    hsm: H,
}

impl<H: CardCrypto> Engine<H> {
    /// An engine using `hsm` for every keyed operation.
    pub fn new(hsm: H) -> Self {
        Engine { hsm }
    }

    /// The HSM port.
    pub fn hsm(&self) -> &H {
        &self.hsm
    }

    /// Runs DESIGN 2.1 steps 2–3 over a batch of (B1, B2) pairs in one session:
    /// R1 = DES(KA, B1), R3 = TDES(KA‖KB, R1 ⊕ B2). Returns the R3 blocks.
    fn cvv_transform(
        &self,
        source: CvvKeySource<'_>,
        inputs: &[(Block, Block)],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let mut b1 = Zeroizing::new(Vec::with_capacity(inputs.len() * 8));
        for (first, _) in inputs {
            b1.extend_from_slice(&first[..]);
        }
        self.hsm.with_cvv_keys(source, |keys: &dyn BlockCipher| {
            let mut x = keys.encrypt_single(&b1)?;
            if x.len() != b1.len() {
                return Err(HsmError::Wrapper(crate::hsm::Malfunction::OutputLength {
                    mechanism: crate::hsm::Mechanism::Des3Ecb,
                    len: x.len(),
                }));
            }
            for (chunk, (_, second)) in x.chunks_exact_mut(8).zip(inputs) {
                chunk
                    .iter_mut()
                    .zip(second.iter())
                    .for_each(|(r, b)| *r ^= b);
            }
            keys.encrypt_double(&x)
        })
    }

    fn card_key_source<'a>(
        imk: &'a KeyLabel,
        kind: KeyKind,
        data: &'a (Zeroizing<[u8; 16]>, Zeroizing<[u8; 16]>),
    ) -> CvvKeySource<'a> {
        CvvKeySource::CardKey {
            imk,
            kind,
            mk_data: &data.0,
            twin_data: &data.1,
        }
    }

    /// A static CVV, CVV2 or iCVV under a CVK (DESIGN 2.1).
    ///
    /// # Errors
    /// `DomainError::KeyUnusable` when the key is missing or refused;
    /// `Unavailable` or `Internal` when the token fails.
    pub fn static_code(
        &self,
        cvk: &KeyLabel,
        pan: &Pan,
        expiry: Expiry,
        kind: StaticCodeKind,
        length: CodeLength,
    ) -> Result<IssuedCode, DomainError> {
        let kcv = self.hsm.key_check_value(cvk, KeyKind::Cvk)?;
        let inputs = [cvv_blocks(
            pan.digits().as_bytes(),
            expiry,
            kind.service_code(),
        )];
        let r3 = self.cvv_transform(CvvKeySource::Cvk(cvk), &inputs)?;
        Ok(IssuedCode {
            code: decimalize(&r3, length),
            kcv,
        })
    }

    /// The KCV of a card master key derived in the token from `imk` (DESIGN 2.2),
    /// for checking derivations against known answers; the key itself never leaves.
    ///
    /// # Errors
    /// As [`Engine::static_code`].
    pub fn card_key_kcv(
        &self,
        imk: &KeyLabel,
        kind: KeyKind,
        pan: &Pan,
        psn: Psn,
        method: CardKeyMethod,
    ) -> Result<Kcv, DomainError> {
        let data = card_key_derivation_data(&card_key_y(pan, psn, method));
        Ok(self.hsm.with_cvv_keys(
            Self::card_key_source(imk, kind, &data),
            |keys: &dyn BlockCipher| keys.kcv(),
        )?)
    }

    /// Contactless dCVV for an ATC (DESIGN 2.3): card key from the IMK-dCVV by
    /// Option A with PSN `00`.
    ///
    /// # Errors
    /// As [`Engine::static_code`].
    pub fn dcvv(
        &self,
        imk: &KeyLabel,
        pan: &Pan,
        expiry: Expiry,
        service_code: ServiceCode,
        atc: Atc,
    ) -> Result<IssuedCode, DomainError> {
        let kcv = self.hsm.key_check_value(imk, KeyKind::ImkDcvv)?;
        let data = card_key_derivation_data(&card_key_y(pan, Psn::NONE, CardKeyMethod::OptionA));
        let inputs = [dcvv_blocks(pan, expiry, service_code, atc)];
        let r3 =
            self.cvv_transform(Self::card_key_source(imk, KeyKind::ImkDcvv, &data), &inputs)?;
        Ok(IssuedCode {
            code: decimalize(&r3, CodeLength::THREE),
            kcv,
        })
    }

    /// TDCVV2-v1 codes of the given windows, in one session.
    fn tdcvv2_codes(
        &self,
        imk: &KeyLabel,
        pan: &Pan,
        expiry: Expiry,
        windows: &[u64],
    ) -> Result<Vec<SecurityCode>, DomainError> {
        let y = card_key_y(pan, Psn::NONE, CardKeyMethod::for_pan(pan));
        let data = card_key_derivation_data(&y);
        let inputs: Vec<(Block, Block)> = windows
            .iter()
            .map(|t| tdcvv2_blocks(pan, expiry, *t))
            .collect();
        let r3 = self.cvv_transform(
            Self::card_key_source(imk, KeyKind::ImkTdcvv2, &data),
            &inputs,
        )?;
        Ok(r3
            .chunks_exact(8)
            .map(|block| decimalize(block, CodeLength::THREE))
            .collect())
    }

    /// `count` TDCVV2-v1 values from the window of `now` on (DESIGN 2.4).
    ///
    /// # Errors
    /// `Invalid` when `count` is outside 1–24; otherwise as [`Engine::static_code`].
    pub fn tdcvv2_generate(
        &self,
        imk: &KeyLabel,
        pan: &Pan,
        expiry: Expiry,
        profile: Tdcvv2Profile,
        now_unix: u64,
        count: u8,
    ) -> Result<(Vec<WindowCode>, Kcv), DomainError> {
        if !(1..=MAX_VALUES).contains(&count) {
            return Err(DomainError::Invalid {
                field: "numberOfValues",
                reason: "must be 1 to 24",
            });
        }
        let kcv = self.hsm.key_check_value(imk, KeyKind::ImkTdcvv2)?;
        let w = u64::from(profile.window_seconds());
        let first = window_of(now_unix, profile.window_seconds());
        let windows: Vec<u64> = (first..first + u64::from(count)).collect();
        let codes = self.tdcvv2_codes(imk, pan, expiry, &windows)?;
        let values = windows
            .into_iter()
            .zip(codes)
            .map(|(window, code)| WindowCode {
                window,
                code,
                valid_from: window * w,
                valid_until: (window + 1) * w,
            })
            .collect();
        Ok((values, kcv))
    }

    /// Checks a typed dCVV2 against windows T_now−G … T_now+F (DESIGN 2.4), all
    /// computed in one session and compared in constant time. Returns the first
    /// matching window, oldest first.
    ///
    /// # Errors
    /// As [`Engine::static_code`].
    pub fn tdcvv2_verify(
        &self,
        imk: &KeyLabel,
        pan: &Pan,
        expiry: Expiry,
        profile: Tdcvv2Profile,
        now_unix: u64,
        candidate: &SecurityCode,
    ) -> Result<Option<u64>, DomainError> {
        let now = window_of(now_unix, profile.window_seconds());
        let first = now.saturating_sub(u64::from(profile.past_windows()));
        let windows: Vec<u64> = (first..=now + u64::from(profile.future_windows())).collect();
        let codes = self.tdcvv2_codes(imk, pan, expiry, &windows)?;
        // Compare every window (no early exit), then report the first match.
        let matches: Vec<bool> = codes.iter().map(|c| c.matches(candidate)).collect();
        Ok(windows
            .into_iter()
            .zip(matches)
            .find_map(|(w, hit)| hit.then_some(w)))
    }
}

#[cfg(test)]
mod tests {
    //! Engine logic against a software stand-in for the token (unit tests only;
    //! the same behaviour is proven on a real SoftHSM token in tests/it/: vectors.rs,
    //! property.rs, card_keys.rs, engine_on_token.rs).

    use super::*;
    use crate::hsm::HsmResult;
    use des::TdesEde2;
    use des::cipher::{BlockEncrypt, KeyInit};
    use std::cell::Cell;

    const K: &str = "0123456789ABCDEFFEDCBA9876543210";

    struct SoftKeys {
        single: TdesEde2,
        double: TdesEde2,
    }

    fn ecb(cipher: &TdesEde2, data: &[u8]) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(data.to_vec());
        for chunk in out.chunks_exact_mut(8) {
            cipher.encrypt_block(chunk.into());
        }
        out
    }

    impl BlockCipher for SoftKeys {
        fn encrypt_single(&self, blocks: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>> {
            Ok(ecb(&self.single, blocks))
        }
        fn encrypt_double(&self, blocks: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>> {
            Ok(ecb(&self.double, blocks))
        }
        fn kcv(&self) -> HsmResult<Kcv> {
            Ok(Kcv::from_prefix(&ecb(&self.double, &[0; 8])).unwrap())
        }
    }

    /// Every key is K; counts scopes so tests can see one session per call.
    struct SoftHsm {
        scopes: Cell<u32>,
    }

    impl CardCrypto for SoftHsm {
        fn with_cvv_keys<R>(
            &self,
            source: CvvKeySource<'_>,
            mut f: impl FnMut(&dyn BlockCipher) -> HsmResult<R>,
        ) -> HsmResult<R> {
            self.scopes.set(self.scopes.get() + 1);
            let k = hex::decode(K).unwrap();
            let (pair, twin) = match source {
                CvvKeySource::Cvk(_) => (k.clone(), [&k[..8], &k[..8]].concat()),
                CvvKeySource::CardKey {
                    mk_data, twin_data, ..
                } => {
                    let imk = TdesEde2::new_from_slice(&k).unwrap();
                    (
                        ecb(&imk, &mk_data[..]).to_vec(),
                        ecb(&imk, &twin_data[..]).to_vec(),
                    )
                }
            };
            f(&SoftKeys {
                single: TdesEde2::new_from_slice(&twin).unwrap(),
                double: TdesEde2::new_from_slice(&pair).unwrap(),
            })
        }

        /// The EMV codes are checked on a real token only (tests/it/emv.rs).
        fn with_emv_key<R>(
            &self,
            _: crate::hsm::EmvKeySource<'_>,
            _: impl FnMut(&dyn crate::hsm::MacKey) -> HsmResult<R>,
        ) -> HsmResult<R> {
            Err(HsmError::WrongPin)
        }

        fn key_check_value(&self, _: &KeyLabel, _: KeyKind) -> HsmResult<Kcv> {
            Ok(Kcv([0x08, 0xD7, 0xB4]))
        }

        fn hmac(&self, _: &KeyLabel, _: KeyKind, data: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>> {
            use hmac::Mac;
            let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(K.as_bytes()).unwrap();
            mac.update(data);
            Ok(Zeroizing::new(mac.finalize().into_bytes().to_vec()))
        }
    }

    fn engine() -> Engine<SoftHsm> {
        Engine::new(SoftHsm {
            scopes: Cell::new(0),
        })
    }

    fn label() -> KeyLabel {
        "k".parse().unwrap()
    }

    #[test]
    fn static_codes_match_the_vectors() {
        let e = engine();
        let pan: Pan = "4123456789012345".parse().unwrap();
        let exp: Expiry = "8701".parse().unwrap();
        let cases = [
            (StaticCodeKind::Cvv("101".parse().unwrap()), "561"),
            (StaticCodeKind::Cvv2, "636"),
            (StaticCodeKind::Icvv, "651"),
        ];
        for (kind, want) in cases {
            let got = e
                .static_code(&label(), &pan, exp, kind, CodeLength::THREE)
                .unwrap();
            assert_eq!(got.code.expose(), want, "{kind:?}");
        }
    }

    #[test]
    fn generation_is_one_scope_and_every_value_verifies() {
        let e = engine();
        let pan: Pan = "4123456789012345".parse().unwrap();
        let exp: Expiry = "2812".parse().unwrap();
        let profile = Tdcvv2Profile::new(300, 1, 0).unwrap();
        let (values, _) = e
            .tdcvv2_generate(&label(), &pan, exp, profile, 1_767_225_600, 24)
            .unwrap();
        assert_eq!(e.hsm().scopes.get(), 1);
        assert_eq!(values.len(), 24);
        assert_eq!(values[0].code.expose(), "209");
        assert_eq!(values[1].code.expose(), "137");
        assert_eq!(
            (values[0].valid_from, values[0].valid_until),
            (1_767_225_600, 1_767_225_900)
        );
        for v in &values {
            let found = e
                .tdcvv2_verify(&label(), &pan, exp, profile, v.valid_from, &v.code)
                .unwrap();
            assert_eq!(found, Some(v.window));
        }
    }

    #[test]
    fn verification_honours_past_and_future_windows() {
        let e = engine();
        let pan: Pan = "4123456789012345".parse().unwrap();
        let exp: Expiry = "2812".parse().unwrap();
        let t0 = 1_767_225_600;
        let code = SecurityCode::parse("cvv2", "209").unwrap();
        let strict = Tdcvv2Profile::new(300, 0, 0).unwrap();
        let lenient = Tdcvv2Profile::new(300, 1, 0).unwrap();
        let ahead = Tdcvv2Profile::new(300, 0, 1).unwrap();
        assert_eq!(
            e.tdcvv2_verify(&label(), &pan, exp, strict, t0, &code)
                .unwrap(),
            Some(5_890_752)
        );
        assert_eq!(
            e.tdcvv2_verify(&label(), &pan, exp, strict, t0 + 300, &code)
                .unwrap(),
            None
        );
        assert_eq!(
            e.tdcvv2_verify(&label(), &pan, exp, lenient, t0 + 300, &code)
                .unwrap(),
            Some(5_890_752)
        );
        assert_eq!(
            e.tdcvv2_verify(&label(), &pan, exp, lenient, t0 + 600, &code)
                .unwrap(),
            None
        );
        assert_eq!(
            e.tdcvv2_verify(&label(), &pan, exp, strict, t0 - 1, &code)
                .unwrap(),
            None
        );
        assert_eq!(
            e.tdcvv2_verify(&label(), &pan, exp, ahead, t0 - 1, &code)
                .unwrap(),
            Some(5_890_752)
        );
    }

    #[test]
    fn counts_outside_one_to_twenty_four_are_refused_before_the_token() {
        let e = engine();
        let pan: Pan = "4123456789012345".parse().unwrap();
        let profile = Tdcvv2Profile::new(300, 1, 0).unwrap();
        for n in [0, 25] {
            let err = e
                .tdcvv2_generate(&label(), &pan, "2812".parse().unwrap(), profile, 0, n)
                .unwrap_err();
            assert!(matches!(
                err,
                DomainError::Invalid {
                    field: "numberOfValues",
                    ..
                }
            ));
        }
        assert_eq!(e.hsm().scopes.get(), 0);
    }
}
