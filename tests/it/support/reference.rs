//! A plain software reference of DESIGN 2.1–2.5, for tests only.
//!
//! Written from the DESIGN text with RustCrypto's `des` and `sha1`, deliberately
//! without any code from `src/domain`, so that the engine (which runs every DES
//! operation in the token) can be compared with something independent. Keys are
//! clear byte arrays here; nothing is zeroized: this never runs in the gateway.
//! Inputs are plain `&str` and are assumed well formed (the callers generate them).

use des::cipher::{BlockEncrypt, KeyInit};
use des::{Des, TdesEde2};
use sha1::{Digest, Sha1};

/// How the card master key's derivation data Y is built (DESIGN 2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MkOption {
    A,
    B,
}

/// Packs hex digits ("0"–"9", "A"–"F") two per byte. `digits` has an even length.
pub fn pack(digits: &str) -> Vec<u8> {
    assert!(digits.len().is_multiple_of(2), "odd number of digits");
    hex::decode(digits).unwrap()
}

/// Two-key EDE TDES of one block under `key` = K1‖K2.
pub fn tdes(key: &[u8; 16], block: [u8; 8]) -> [u8; 8] {
    let cipher = TdesEde2::new_from_slice(key).unwrap();
    let mut b = block.into();
    cipher.encrypt_block(&mut b);
    b.into()
}

/// Single DES of one block under `key`.
pub fn des(key: &[u8; 8], block: [u8; 8]) -> [u8; 8] {
    let cipher = Des::new_from_slice(key).unwrap();
    let mut b = block.into();
    cipher.encrypt_block(&mut b);
    b.into()
}

fn xor(a: [u8; 8], b: [u8; 8]) -> [u8; 8] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

fn block(bytes: &[u8]) -> [u8; 8] {
    bytes[..8].try_into().unwrap()
}

/// KCV (DESIGN 2.5): first 3 bytes of TDES(K, 00…00).
pub fn kcv(key: &[u8; 16]) -> [u8; 3] {
    tdes(key, [0; 8])[..3].try_into().unwrap()
}

/// Visa decimalization (DESIGN 2.1 step 4) of the nibbles of `bytes`: decimal
/// nibbles left to right, then A–F minus 10 left to right; the first `n`.
pub fn decimalize(bytes: &[u8], n: usize) -> String {
    let hex = hex::encode_upper(bytes);
    let first = hex.chars().filter(char::is_ascii_digit);
    let second = hex
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .map(|c| char::from(b'0' + (c as u8 - b'A')));
    first.chain(second).take(n).collect()
}

/// How many nibbles of `bytes` are decimal (0–9). Fewer than `n` means a code of
/// `n` digits needs the second decimalization pass.
pub fn decimal_nibbles(bytes: &[u8]) -> usize {
    hex::encode(bytes)
        .chars()
        .filter(char::is_ascii_digit)
        .count()
}

/// The CVV algorithm (DESIGN 2.1) under CVK = KA‖KB. `pan` may hold hex digits
/// (the dCVV PAN'). Returns R3 and the code of `n` digits.
pub fn cvv(
    cvk: &[u8; 16],
    pan: &str,
    expiry: &str,
    service_code: &str,
    n: usize,
) -> ([u8; 8], String) {
    let mut d = format!("{pan}{expiry}{service_code}");
    assert!(d.len() <= 32);
    while d.len() < 32 {
        d.push('0');
    }
    let packed = pack(&d);
    let (b1, b2) = (block(&packed[..8]), block(&packed[8..]));
    let ka: [u8; 8] = block(&cvk[..8]);
    let r1 = des(&ka, b1);
    let r3 = tdes(cvk, xor(r1, b2));
    (r3, decimalize(&r3, n))
}

/// Sets odd parity on every byte (DESIGN 2.2: MK has odd parity).
fn odd_parity(key: &mut [u8]) {
    for b in key {
        let ones = (*b >> 1).count_ones();
        *b = (*b & 0xFE) | u8::from(ones % 2 == 0);
    }
}

/// Y of EMV Book 2 A1.4 (DESIGN 2.2), as 16 decimal digits.
pub fn derivation_y(pan: &str, psn: &str, option: MkOption) -> String {
    let x = format!("{pan}{psn}");
    match option {
        MkOption::A => {
            let right = &x[x.len().saturating_sub(16)..];
            format!("{right:0>16}")
        }
        MkOption::B => {
            let even = if x.len() % 2 == 1 { format!("0{x}") } else { x };
            let digest = Sha1::digest(pack(&even));
            decimalize(&digest, 16)
        }
    }
}

/// The card master key MK = TDES(IMK, Y) ‖ TDES(IMK, Y ⊕ FF…FF), odd parity (DESIGN 2.2).
pub fn master_key(imk: &[u8; 16], pan: &str, psn: &str, option: MkOption) -> [u8; 16] {
    let y = block(&pack(&derivation_y(pan, psn, option)));
    let left = tdes(imk, y);
    let right = tdes(imk, y.map(|b| !b));
    let mut mk = [0u8; 16];
    mk[..8].copy_from_slice(&left);
    mk[8..].copy_from_slice(&right);
    odd_parity(&mut mk);
    mk
}

/// Contactless dCVV (DESIGN 2.3) under the card key of `imk` (Option A, PSN 00):
/// PAN' = ATC ‖ PAN[4..]. Returns R3 and the 3-digit code.
pub fn dcvv(
    imk: &[u8; 16],
    pan: &str,
    expiry: &str,
    service_code: &str,
    atc: &str,
) -> ([u8; 8], String) {
    let mk = master_key(imk, pan, "00", MkOption::A);
    let pan_prime = format!("{atc}{}", &pan[4..]);
    cvv(&mk, &pan_prime, expiry, service_code, 3)
}

/// TDCVV2-v1 window counter T = floor(t / W) (DESIGN 2.4).
pub fn window(unix_seconds: u64, window_seconds: u64) -> u64 {
    unix_seconds / window_seconds
}

/// TDCVV2-v1 card key (DESIGN 2.4): MK from the IMK-TDCVV2 by Option A, or
/// Option B for PANs over 16 digits; PSN 00.
pub fn tdcvv2_card_key(imk: &[u8; 16], pan: &str) -> [u8; 16] {
    let option = if pan.len() > 16 {
        MkOption::B
    } else {
        MkOption::A
    };
    master_key(imk, pan, "00", option)
}

/// TDCVV2-v1 (DESIGN 2.4) under a card key `mk`, for window counter `t`:
/// S = T mod 10^7 as 7 digits, service code S[0..3], ATC S[3..7], then dCVV.
/// Returns R3 and the 3-digit code.
pub fn tdcvv2_with_card_key(mk: &[u8; 16], pan: &str, expiry: &str, t: u64) -> ([u8; 8], String) {
    let s = format!("{:07}", t % 10_000_000);
    let pan_prime = format!("{}{}", &s[3..7], &pan[4..]);
    cvv(mk, &pan_prime, expiry, &s[..3], 3)
}

/// TDCVV2-v1 code of window counter `t` under the IMK-TDCVV2 `imk`.
pub fn tdcvv2(imk: &[u8; 16], pan: &str, expiry: &str, t: u64) -> ([u8; 8], String) {
    tdcvv2_with_card_key(&tdcvv2_card_key(imk, pan), pan, expiry, t)
}

/// Single-DES decryption of one block under `key`.
fn des_decrypt(key: &[u8; 8], block: [u8; 8]) -> [u8; 8] {
    use des::cipher::BlockDecrypt;
    let cipher = Des::new_from_slice(key).unwrap();
    let mut b = block.into();
    cipher.decrypt_block(&mut b);
    b.into()
}

/// ISO/IEC 9797-1 MAC algorithm 3 (EMV Book 2 A1.2) under K = KL‖KR, padding
/// method 2 (`80 00…`) or method 1 (`00…`): single-DES CBC under KL over every
/// block, then DES(KL, DES⁻¹(KR, H)).
pub fn retail_mac(key: &[u8; 16], data: &[u8], method2: bool) -> [u8; 8] {
    let mut d = data.to_vec();
    if method2 {
        d.push(0x80);
    }
    while d.is_empty() || !d.len().is_multiple_of(8) {
        d.push(0);
    }
    let kl: [u8; 8] = key[..8].try_into().unwrap();
    let kr: [u8; 8] = key[8..].try_into().unwrap();
    let h = d
        .chunks(8)
        .fold([0u8; 8], |h, chunk| des(&kl, xor(h, block(chunk))));
    des(&kl, des_decrypt(&kr, h))
}

/// The card master key by Option A for PANs of up to 16 digits, B beyond.
pub fn emv_master_key(imk: &[u8; 16], pan: &str, psn: &str) -> [u8; 16] {
    let option = if pan.len() > 16 {
        MkOption::B
    } else {
        MkOption::A
    };
    master_key(imk, pan, psn, option)
}

/// EMV session key (Book 2 A1.3.1): TDES(MK, R with R[2] = F0) ‖ TDES(MK, R with R[2] = 0F).
pub fn session_key(mk: &[u8; 16], r: [u8; 8]) -> [u8; 16] {
    let (mut a, mut b) = (r, r);
    a[2] = 0xF0;
    b[2] = 0x0F;
    let mut sk = [0u8; 16];
    sk[..8].copy_from_slice(&tdes(mk, a));
    sk[8..].copy_from_slice(&tdes(mk, b));
    sk
}

/// Mastercard CVC3 (pyemv `generate_cvc3`, jPOS `calculateCVC3`): IVCVC3 = last 2
/// bytes of the padding-method-2 retail MAC of the track data under MK-CVC3; CVC3 =
/// last 2 bytes of TDES(MK-CVC3, IVCVC3 ‖ UN ‖ ATC), 5 decimal digits.
pub fn cvc3(
    imk: &[u8; 16],
    pan: &str,
    psn: &str,
    track: &[u8],
    un: [u8; 4],
    atc: [u8; 2],
) -> String {
    let mk = emv_master_key(imk, pan, psn);
    let iv = retail_mac(&mk, track, true);
    let mut b = [0u8; 8];
    b[..2].copy_from_slice(&iv[6..]);
    b[2..6].copy_from_slice(&un);
    b[6..].copy_from_slice(&atc);
    let c = tdes(&mk, b);
    format!("{:05}", u16::from_be_bytes([c[6], c[7]]))
}

/// The key an ARQC of `cvn` is MACed under, and the padding (method 2 or not) it uses.
pub fn arqc_key(
    imk: &[u8; 16],
    pan: &str,
    psn: &str,
    cvn: &str,
    atc: [u8; 2],
    un: [u8; 4],
) -> ([u8; 16], bool) {
    let mk = emv_master_key(imk, pan, psn);
    let common = [atc[0], atc[1], 0, 0, 0, 0, 0, 0];
    let skd = [atc[0], atc[1], 0, 0, un[0], un[1], un[2], un[3]];
    match cvn {
        "visa-cvn10" => (mk, false),
        "mastercard-cvn16" | "mastercard-cvn17" => (session_key(&mk, skd), true),
        _ => (session_key(&mk, common), true),
    }
}

/// ARPC method 1 (EMV Book 2 A1.2.1): TDES(K, ARQC ⊕ (ARC ‖ 00×6)).
pub fn arpc_method1(key: &[u8; 16], arqc: [u8; 8], arc: [u8; 2]) -> [u8; 8] {
    tdes(key, xor(arqc, [arc[0], arc[1], 0, 0, 0, 0, 0, 0]))
}

/// ARPC method 2 (EMV Book 2 A1.2.2): first 4 bytes of the retail MAC (method 2)
/// of ARQC ‖ CSU ‖ proprietary authentication data.
pub fn arpc_method2(sk: &[u8; 16], arqc: [u8; 8], csu: [u8; 4], prop: &[u8]) -> [u8; 4] {
    let data = [&arqc[..], &csu[..], prop].concat();
    retail_mac(sk, &data, true)[..4].try_into().unwrap()
}
