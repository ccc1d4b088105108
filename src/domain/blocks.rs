//! The host's share of the algorithms of DESIGN 2, as pure functions: packing
//! digits into blocks, Visa decimalization, EMV derivation data, the dCVV PAN
//! substitution and the TDCVV2-v1 window counter. No key is ever involved here.
//!
//! Every buffer that holds card data or an intermediate block is `Zeroizing`.

use sha1::{Digest, Sha1};
use zeroize::Zeroizing;

use super::card::{Atc, CodeLength, Expiry, Pan, Psn, SecurityCode, ServiceCode};

/// One 8-byte DES block, zeroized on drop.
pub type Block = Zeroizing<[u8; 8]>;

/// Packs a string of hex digits (0–9, A–F), 2 per byte. The caller guarantees an
/// even count of valid digits.
fn pack(digits: &[u8]) -> Zeroizing<Vec<u8>> {
    let nibble = |c: u8| match c {
        b'0'..=b'9' => c - b'0',
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    };
    Zeroizing::new(
        digits
            .chunks(2)
            .map(|p| (nibble(p[0]) << 4) | p.get(1).map_or(0, |c| nibble(*c)))
            .collect(),
    )
}

fn block_of(bytes: &[u8]) -> Block {
    let mut b = Zeroizing::new([0u8; 8]);
    b.copy_from_slice(&bytes[..8]);
    b
}

/// DESIGN 2.1 step 1: D = PAN ‖ expiry ‖ service code, right-padded with `0` to 32
/// digits, split into B1 and B2. `pan` may carry hex digits (the dCVV PAN').
pub fn cvv_blocks(pan: &[u8], expiry: Expiry, service_code: ServiceCode) -> (Block, Block) {
    pack_cvv_input(pan, expiry, &service_code.bytes())
}

/// [`cvv_blocks`] with the service-code field as digits: TDCVV2-v1 fills it from
/// its window counter.
fn pack_cvv_input(pan: &[u8], expiry: Expiry, service_field: &[u8; 3]) -> (Block, Block) {
    let mut d = Zeroizing::new([b'0'; 32]);
    let expiry = expiry.bytes();
    let fields = [pan, &expiry[..], &service_field[..]];
    let mut at = 0;
    for field in fields {
        let end = (at + field.len()).min(32);
        d[at..end].copy_from_slice(&field[..end - at]);
        at = end;
    }
    let packed = pack(&d[..]);
    (block_of(&packed[..8]), block_of(&packed[8..]))
}

/// Visa decimalization (DESIGN 2.1 step 4): the decimal digits of the hex string
/// left to right, then its digits A–F minus 10, left to right; the first `n`.
fn decimalize_digits(bytes: &[u8], n: usize) -> Zeroizing<String> {
    let nibbles = Zeroizing::new(
        bytes
            .iter()
            .flat_map(|b| [b >> 4, b & 0x0F])
            .collect::<Vec<u8>>(),
    );
    let mut out = Zeroizing::new(String::with_capacity(nibbles.len()));
    let first = nibbles.iter().filter(|d| **d < 10).copied();
    let second = nibbles.iter().filter(|d| **d >= 10).map(|d| *d - 10);
    for d in first.chain(second).take(n) {
        out.push(char::from(b'0' + d));
    }
    out
}

/// Decimalizes a final block into a code of `length` digits.
pub fn decimalize(block: &[u8], length: CodeLength) -> SecurityCode {
    SecurityCode::from_digits(decimalize_digits(block, length.get()))
}

/// How the card master key's derivation data Y is built (DESIGN 2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CardKeyMethod {
    /// EMV Option A: rightmost 16 digits of PAN ‖ PSN.
    OptionA,
    /// EMV Option B: SHA-1 based, for PANs over 16 digits.
    OptionB,
}

impl CardKeyMethod {
    /// Option B for PANs over 16 digits, Option A otherwise (DESIGN 2.2, 2.4).
    pub fn for_pan(pan: &Pan) -> Self {
        if pan.len() > 16 {
            CardKeyMethod::OptionB
        } else {
            CardKeyMethod::OptionA
        }
    }
}

/// Y of DESIGN 2.2 for a PAN and PSN by the given method.
pub fn card_key_y(pan: &Pan, psn: Psn, method: CardKeyMethod) -> Block {
    let mut pan_psn = Zeroizing::new(Vec::with_capacity(22));
    pan_psn.extend_from_slice(pan.digits().as_bytes());
    pan_psn.extend_from_slice(psn.as_str().as_bytes());
    match method {
        CardKeyMethod::OptionA => {
            let mut y = Zeroizing::new([b'0'; 16]);
            let take = pan_psn.len().min(16);
            y[16 - take..].copy_from_slice(&pan_psn[pan_psn.len() - take..]);
            block_of(&pack(&y[..]))
        }
        CardKeyMethod::OptionB => {
            if pan_psn.len() % 2 == 1 {
                pan_psn.insert(0, b'0');
            }
            let digest = Zeroizing::new(<[u8; 20]>::from(Sha1::digest(&*pack(&pan_psn))));
            let y = decimalize_digits(&digest[..], 16);
            block_of(&pack(y.as_bytes()))
        }
    }
}

/// Derivation data for `CKM_DES3_ECB_ENCRYPT_DATA`: Y ‖ (Y ⊕ FF…FF) gives the card
/// master key MK; Y ‖ Y gives MKA ‖ MKA, its single-DES twin for DESIGN 2.1 step 2.
pub fn card_key_derivation_data(y: &[u8; 8]) -> (Zeroizing<[u8; 16]>, Zeroizing<[u8; 16]>) {
    let mut mk = Zeroizing::new([0u8; 16]);
    let mut twin = Zeroizing::new([0u8; 16]);
    for i in 0..8 {
        mk[i] = y[i];
        mk[8 + i] = !y[i];
        twin[i] = y[i];
        twin[8 + i] = y[i];
    }
    (mk, twin)
}

/// PAN' of DESIGN 2.3: the ATC (4 hex characters) replaces the first 4 PAN digits.
pub fn dcvv_pan(atc_field: &[u8; 4], pan: &Pan) -> Zeroizing<Vec<u8>> {
    let mut p = Zeroizing::new(pan.digits().as_bytes().to_vec());
    p[..4].copy_from_slice(atc_field);
    p
}

/// The dCVV inputs for an ATC: PAN' and the card's own service code.
pub fn dcvv_blocks(
    pan: &Pan,
    expiry: Expiry,
    service_code: ServiceCode,
    atc: Atc,
) -> (Block, Block) {
    cvv_blocks(&dcvv_pan(&atc.bytes(), pan), expiry, service_code)
}

/// The TDCVV2-v1 window counter T = floor(t / W) (DESIGN 2.4).
pub fn window_of(unix_seconds: u64, window_seconds: u32) -> u64 {
    unix_seconds / u64::from(window_seconds)
}

/// The TDCVV2-v1 inputs of window T: S = T mod 10^7 as 7 digits; service-code
/// field S[0..3], ATC field S[3..7], then the dCVV construction.
pub fn tdcvv2_blocks(pan: &Pan, expiry: Expiry, window: u64) -> (Block, Block) {
    let s = format!("{:07}", window % 10_000_000);
    let b = s.as_bytes();
    let service_field = [b[0], b[1], b[2]];
    let atc_field = [b[3], b[4], b[5], b[6]];
    pack_cvv_input(&dcvv_pan(&atc_field, pan), expiry, &service_field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pan(s: &str) -> Pan {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_of_the_classic_example() {
        let (b1, b2) = cvv_blocks(
            b"4123456789012345",
            "8701".parse().unwrap(),
            "101".parse().unwrap(),
        );
        assert_eq!(hex::encode_upper(*b1), "4123456789012345");
        assert_eq!(hex::encode_upper(*b2), "8701101000000000");
        let (b1, b2) = cvv_blocks(b"123456789012", "1108".parse().unwrap(), ServiceCode::CVV2);
        assert_eq!(hex::encode_upper(*b1), "1234567890121108");
        assert_eq!(hex::encode_upper(*b2), "0000000000000000");
    }

    #[test]
    fn nineteen_digit_pan_fills_the_second_block() {
        let (b1, b2) = cvv_blocks(
            b"1234567890123456789",
            "2812".parse().unwrap(),
            "201".parse().unwrap(),
        );
        assert_eq!(hex::encode_upper(*b1), "1234567890123456");
        assert_eq!(hex::encode_upper(*b2), "7892812201000000");
    }

    #[test]
    fn decimalization_uses_the_second_pass() {
        let three = CodeLength::THREE;
        assert_eq!(
            decimalize(&hex::decode("5B614982E03C97DD").unwrap(), three).expose(),
            "561"
        );
        assert_eq!(
            decimalize(&hex::decode("2CDE044EEF0FA748").unwrap(), three).expose(),
            "204"
        );
        // Only two decimal digits: the third comes from A-F minus 10.
        assert_eq!(
            decimalize(&hex::decode("ABCDEF1FABCDEF2F").unwrap(), three).expose(),
            "120"
        );
        // No decimal digit at all.
        assert_eq!(
            decimalize(&hex::decode("FEDCBAFEDCBAFEDC").unwrap(), three).expose(),
            "543"
        );
        let five = CodeLength::try_from(5).unwrap();
        assert_eq!(
            decimalize(&hex::decode("5B614982E03C97DD").unwrap(), five).expose(),
            "56149"
        );
    }

    #[test]
    fn option_a_takes_the_rightmost_sixteen_digits() {
        let y = card_key_y(
            &pan("99012345678901234"),
            "45".parse().unwrap(),
            CardKeyMethod::OptionA,
        );
        assert_eq!(hex::encode_upper(*y), "1234567890123445");
    }

    #[test]
    fn option_a_left_pads_short_pans() {
        let y = card_key_y(&pan("123456789012"), Psn::NONE, CardKeyMethod::OptionA);
        assert_eq!(hex::encode_upper(*y), "0012345678901200");
    }

    #[test]
    fn derivation_data_is_y_and_its_complement() {
        let y = [0x12, 0x34, 0x56, 0x78, 0x90, 0xAB, 0xCD, 0xEF];
        let (mk, twin) = card_key_derivation_data(&y);
        assert_eq!(hex::encode_upper(*mk), "1234567890ABCDEFEDCBA9876F543210");
        assert_eq!(hex::encode_upper(*twin), "1234567890ABCDEF1234567890ABCDEF");
    }

    #[test]
    fn dcvv_pan_substitutes_the_atc() {
        let p = dcvv_pan(b"3210", &pan("1234567890123456"));
        assert_eq!(&p[..], b"3210567890123456");
    }

    #[test]
    fn tdcvv2_fields_follow_the_vector() {
        // vectors/card-codes.toml: t = 1767225600, W = 300 -> T = 5890752, fields 589 / 0752.
        let t = window_of(1_767_225_600, 300);
        assert_eq!(t, 5_890_752);
        let (b1, b2) = tdcvv2_blocks(&pan("4123456789012345"), "2812".parse().unwrap(), t);
        assert_eq!(hex::encode_upper(*b1), "0752456789012345");
        assert_eq!(hex::encode_upper(*b2), "2812589000000000");
        assert_eq!(window_of(1_767_225_899, 300), t);
        assert_eq!(window_of(1_767_225_900, 300), t + 1);
        // Counters of 8 digits keep their last 7.
        let (_, b2) = tdcvv2_blocks(
            &pan("4123456789012345"),
            "2812".parse().unwrap(),
            14_726_880,
        );
        assert_eq!(hex::encode_upper(*b2), "2812472000000000");
    }

    proptest! {
        #[test]
        fn decimalization_always_yields_n_decimal_digits(bytes in proptest::array::uniform8(any::<u8>()), n in 3u8..=5) {
            let code = decimalize(&bytes, CodeLength::try_from(n).unwrap());
            prop_assert_eq!(code.expose().len(), usize::from(n));
            prop_assert!(code.expose().bytes().all(|b| b.is_ascii_digit()));
        }

        #[test]
        fn option_b_y_is_sixteen_decimal_digits(digits in "[0-9]{17,19}", psn in "[0-9]{2}") {
            let y = card_key_y(&pan(&digits), psn.parse().unwrap(), CardKeyMethod::OptionB);
            prop_assert!(hex::encode_upper(*y).bytes().all(|b| b.is_ascii_digit()));
        }
    }
}
