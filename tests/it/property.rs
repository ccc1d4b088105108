//! The engine (every DES operation and derivation in a real SoftHSM token) against
//! an independent software reference of DESIGN 2 (`support::reference`, RustCrypto
//! `des` and `sha1`), on random inputs and on inputs picked to hit the rare paths.
//!
//! - `reference_matches_known_answers` proves the reference itself on the vectors of
//!   `vectors/card-codes.toml` (values copied inline), without the token.
//! - `engine_matches_reference` is the property test: at least 1,000 random cases of
//!   CVV, dCVV, EMV Option A / B card-key KCVs, TDCVV2-v1 generation and
//!   verification, PANs of 12–19 digits.
//! - `second_decimalization_pass_and_long_pans` searches deterministically for
//!   inputs whose final block has fewer than 3 decimal nibbles (the A–F pass of
//!   DESIGN 2.1 step 4), for PANs of 12 to 19 digits, and checks the engine on them:
//!   random inputs reach that path only about once in 18,000 codes.

use std::io::Read;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use dcvv_gateway::domain::{
    Atc, CardKeyMethod, CodeLength, Engine, Expiry, Pan, Psn, SecurityCode, ServiceCode,
    StaticCodeKind, Tdcvv2Profile,
};
use dcvv_gateway::hsm::{KeyKind, KeyLabel, Token};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

use crate::support;
use crate::support::reference;
use crate::support::reference::MkOption;

const K: &str = "0123456789ABCDEFFEDCBA9876543210";
const K4: &str = "12345678123456781234567812345678";

fn key(hex_key: &str) -> [u8; 16] {
    hex::decode(hex_key).unwrap().try_into().unwrap()
}

fn engine() -> Engine<&'static Token> {
    Engine::new(&**support::HSM)
}

// ------------------------------------------------------------ the reference itself

#[test]
fn reference_matches_known_answers() {
    let k = key(K);
    let k4 = key(K4);
    let (r3, code) = reference::cvv(&k, "4123456789012345", "8701", "101", 3);
    assert_eq!(
        (hex::encode_upper(r3).as_str(), code.as_str()),
        ("5B614982E03C97DD", "561")
    );
    let (r3, code) = reference::cvv(&k, "4123456789012345", "8701", "111", 3);
    assert_eq!(
        (hex::encode_upper(r3).as_str(), code.as_str()),
        ("8D5625FA78011A0C", "856")
    );
    assert_eq!(
        reference::cvv(&k, "4123456789012345", "8701", "000", 3).1,
        "636"
    );
    assert_eq!(
        reference::cvv(&k, "4123456789012345", "8701", "999", 3).1,
        "651"
    );
    assert_eq!(
        reference::cvv(&k, "4123456789012345", "8701", "101", 5).1,
        "56149"
    );
    assert_eq!(
        reference::cvv(&k, "1234567890123456", "9912", "220", 3).1,
        "170"
    );
    let (r3, code) = reference::cvv(&k4, "123456789012", "1108", "000", 3);
    assert_eq!(
        (hex::encode_upper(r3).as_str(), code.as_str()),
        ("2CDE044EEF0FA748", "204")
    );
    let (r3, code) = reference::cvv(
        &key("12345678123456788765432187654321"),
        "123456789012",
        "1108",
        "000",
        3,
    );
    assert_eq!(
        (hex::encode_upper(r3).as_str(), code.as_str()),
        ("4533D6DF5B702594", "453")
    );

    assert_eq!(hex::encode_upper(reference::kcv(&k)), "08D7B4");
    assert_eq!(hex::encode_upper(reference::kcv(&k4)), "6FB1C8");
    assert_eq!(
        hex::encode_upper(reference::kcv(&key("87654321876543218765432187654321"))),
        "AAB151"
    );

    let mk = reference::master_key(&k, "99012345678901234", "45", MkOption::A);
    assert_eq!(hex::encode_upper(mk), "67F8292358083E5EA7AB7FDA58D53B6B");
    assert_eq!(hex::encode_upper(reference::kcv(&mk)), "BA7CD9");
    let mk = reference::master_key(&k, "12345678901234567", "01", MkOption::A);
    assert_eq!(hex::encode_upper(mk), "73AD54688CEF2934B0979857E3C719F1");
    assert_eq!(hex::encode_upper(reference::kcv(&mk)), "C64DC2");
    let mk = reference::master_key(&k, "12345678901234567", "01", MkOption::B);
    assert_eq!(hex::encode_upper(mk), "AD406D7F6D7570916D75E5DCAB8CF737");
    assert_eq!(hex::encode_upper(reference::kcv(&mk)), "2CB087");

    let mk = reference::master_key(&k4, "1234567890123456", "00", MkOption::A);
    assert_eq!(hex::encode_upper(reference::kcv(&mk)), "50E877");
    assert_eq!(
        reference::dcvv(&k4, "1234567890123456", "1310", "226", "3210").1,
        "422"
    );
    let mk = reference::master_key(&k4, "123456789012", "00", MkOption::A);
    assert_eq!(hex::encode_upper(reference::kcv(&mk)), "744E4B");
    assert_eq!(
        reference::dcvv(&k4, "123456789012", "1310", "226", "3210").1,
        "719"
    );

    let pan = "4123456789012345";
    assert_eq!(
        hex::encode_upper(reference::kcv(&reference::tdcvv2_card_key(&k, pan))),
        "8C30F7"
    );
    for (t, w, counter, want) in [
        (1_767_225_600, 300, 5_890_752, "209"),
        (1_767_225_899, 300, 5_890_752, "209"),
        (1_767_225_900, 300, 5_890_753, "137"),
        (1_767_225_600, 120, 14_726_880, "809"),
        (1_767_225_600, 3600, 490_896, "463"),
    ] {
        assert_eq!(reference::window(t, w), counter);
        assert_eq!(
            reference::tdcvv2(&k, pan, "2812", counter).1,
            want,
            "t={t} W={w}"
        );
    }

    // The second decimalization pass (DESIGN 2.1 step 4).
    assert_eq!(
        reference::decimalize(&hex::decode("ABCDEF1FABCDEF2F").unwrap(), 3),
        "120"
    );
    assert_eq!(
        reference::decimalize(&hex::decode("FEDCBAFEDCBAFEDC").unwrap(), 3),
        "543"
    );
    assert_eq!(
        reference::decimal_nibbles(&hex::decode("ABCDEF1FABCDEF2F").unwrap()),
        2
    );
}

// ------------------------------------------------------------ the property test

/// Size of the key pool.
const POOL: usize = 32;

/// One random test key, imported once as each of the three kinds.
struct PoolKey {
    clear: [u8; 16],
    cvk: KeyLabel,
    imk_dcvv: KeyLabel,
    imk_tdcvv2: KeyLabel,
}

/// The key pool of this process. The API has no public delete, and every
/// imported key stays in the token (SoftHSM slows down as its object store grows
/// into the thousands), so instead of importing fresh keys for each of the 1,000+
/// cases, the process imports `POOL` random keys once per kind (32 × 4 objects:
/// a CVK is two) and each case picks one by index. Keys are fresh random bytes per
/// run, so failure persistence is off (a saved case would name a different key)
/// and every failure message carries the key in hex instead.
static KEYS: LazyLock<Vec<PoolKey>> = LazyLock::new(|| {
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    (0..POOL)
        .map(|_| {
            let mut clear = [0u8; 16];
            urandom.read_exact(&mut clear).unwrap();
            let hex_key = hex::encode_upper(clear);
            PoolKey {
                clear,
                cvk: support::import(&hex_key, KeyKind::Cvk, "prop-cvk"),
                imk_dcvv: support::import(&hex_key, KeyKind::ImkDcvv, "prop-imk-dcvv"),
                imk_tdcvv2: support::import(&hex_key, KeyKind::ImkTdcvv2, "prop-imk-tdcvv2"),
            }
        })
        .collect()
});

/// At least 1,000 cases; `PROPTEST_CASES` only when it asks for more.
fn config() -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: default.cases.max(1000),
        failure_persistence: None,
        ..default
    }
}

#[derive(Clone, Debug)]
struct Case {
    key: usize,
    pan: String,
    expiry: String,
    service_code: String,
    digits: u8,
    atc: String,
    psn: String,
    unix_time: u64,
    window_seconds: u32,
    values: u8,
}

/// 2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z.
const YEAR_2000: u64 = 946_684_800;
const YEAR_2100: u64 = 4_102_444_800;

fn cases() -> impl Strategy<Value = Case> {
    (
        0..POOL,
        "[0-9]{12,19}",
        (0u8..100, 1u8..=12).prop_map(|(yy, mm)| format!("{yy:02}{mm:02}")),
        "[0-9]{3}",
        3u8..=5,
        "[0-9A-F]{4}",
        "[0-9]{2}",
        YEAR_2000..YEAR_2100,
        60u32..=64_800,
        1u8..=24,
    )
        .prop_map(
            |(
                key,
                pan,
                expiry,
                service_code,
                digits,
                atc,
                psn,
                unix_time,
                window_seconds,
                values,
            )| Case {
                key,
                pan,
                expiry,
                service_code,
                digits,
                atc,
                psn,
                unix_time,
                window_seconds,
                values,
            },
        )
}

/// What the random cases reached, checked after the run.
#[derive(Debug, Default)]
struct Coverage {
    /// Cases by PAN length (index = digits).
    pan_lengths: [AtomicUsize; 20],
    /// Static codes whose R3 needed the second decimalization pass.
    static_second_pass: AtomicUsize,
    /// dCVV / TDCVV2 codes whose R3 needed it.
    dynamic_second_pass: AtomicUsize,
    /// TDCVV2 windows with T ≥ 10^7 (S = T mod 10^7 wraps).
    wrapped_windows: AtomicUsize,
}

fn bump(counter: &AtomicUsize) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn check_case(c: &Case, coverage: &Coverage) -> Result<(), TestCaseError> {
    let pool = &KEYS[c.key];
    let clear = &pool.clear;
    let key_hex = hex::encode_upper(clear);
    let engine = engine();
    let pan: Pan = c.pan.parse().unwrap();
    let expiry: Expiry = c.expiry.parse().unwrap();
    let service_code: ServiceCode = c.service_code.parse().unwrap();
    let atc: Atc = c.atc.parse().unwrap();
    let psn: Psn = c.psn.parse().unwrap();
    let key_kcv = reference::kcv(clear);
    bump(&coverage.pan_lengths[c.pan.len()]);

    // CVV (DESIGN 2.1).
    let length = CodeLength::try_from(c.digits).unwrap();
    let issued = engine
        .static_code(
            &pool.cvk,
            &pan,
            expiry,
            StaticCodeKind::Cvv(service_code),
            length,
        )
        .unwrap();
    let (r3, want) = reference::cvv(
        clear,
        &c.pan,
        &c.expiry,
        &c.service_code,
        usize::from(c.digits),
    );
    if reference::decimal_nibbles(&r3) < usize::from(c.digits) {
        bump(&coverage.static_second_pass);
    }
    prop_assert_eq!(issued.code.expose(), want.as_str(), "CVV, key {}", key_hex);
    prop_assert_eq!(issued.kcv.0, key_kcv, "CVK KCV, key {}", key_hex);

    // Contactless dCVV (DESIGN 2.3).
    let issued = engine
        .dcvv(&pool.imk_dcvv, &pan, expiry, service_code, atc)
        .unwrap();
    let (r3, want) = reference::dcvv(clear, &c.pan, &c.expiry, &c.service_code, &c.atc);
    if reference::decimal_nibbles(&r3) < 3 {
        bump(&coverage.dynamic_second_pass);
    }
    prop_assert_eq!(issued.code.expose(), want.as_str(), "dCVV, key {}", key_hex);
    prop_assert_eq!(issued.kcv.0, key_kcv, "IMK-dCVV KCV, key {}", key_hex);

    // EMV card master key, both options for every PAN length (DESIGN 2.2).
    for (method, option) in [
        (CardKeyMethod::OptionA, MkOption::A),
        (CardKeyMethod::OptionB, MkOption::B),
    ] {
        let kcv = engine
            .card_key_kcv(&pool.imk_dcvv, KeyKind::ImkDcvv, &pan, psn, method)
            .unwrap();
        let mk = reference::master_key(clear, &c.pan, &c.psn, option);
        prop_assert_eq!(
            kcv.0,
            reference::kcv(&mk),
            "MK {:?}, key {}",
            option,
            key_hex
        );
    }

    // TDCVV2-v1 generation (DESIGN 2.4).
    let w = u64::from(c.window_seconds);
    let strict = Tdcvv2Profile::new(c.window_seconds, 0, 0).unwrap();
    let lenient = Tdcvv2Profile::new(c.window_seconds, 1, 0).unwrap();
    let (values, kcv) = engine
        .tdcvv2_generate(
            &pool.imk_tdcvv2,
            &pan,
            expiry,
            strict,
            c.unix_time,
            c.values,
        )
        .unwrap();
    prop_assert_eq!(kcv.0, key_kcv, "IMK-TDCVV2 KCV, key {}", key_hex);
    prop_assert_eq!(values.len(), usize::from(c.values));
    let first = reference::window(c.unix_time, w);
    let offset = c.unix_time - first * w;
    let mk = reference::tdcvv2_card_key(clear, &c.pan);
    for (i, v) in values.iter().enumerate() {
        let t = first + i as u64;
        let (r3, want) = reference::tdcvv2_with_card_key(&mk, &c.pan, &c.expiry, t);
        if reference::decimal_nibbles(&r3) < 3 {
            bump(&coverage.dynamic_second_pass);
        }
        if t >= 10_000_000 {
            bump(&coverage.wrapped_windows);
        }
        prop_assert_eq!(v.window, t);
        prop_assert_eq!((v.valid_from, v.valid_until), (t * w, (t + 1) * w));
        prop_assert_eq!(
            v.code.expose(),
            want.as_str(),
            "TDCVV2 window {}, key {}",
            t,
            key_hex
        );

        // Every generated value verifies inside its own window with no tolerance.
        let found = engine
            .tdcvv2_verify(
                &pool.imk_tdcvv2,
                &pan,
                expiry,
                strict,
                t * w + offset,
                &v.code,
            )
            .unwrap();
        prop_assert_eq!(found, Some(t), "verify window {}, key {}", t, key_hex);
    }

    // A value of the previous window verifies with one past window accepted.
    let old = &values[0];
    let later = old.valid_until + offset;
    let found = engine
        .tdcvv2_verify(&pool.imk_tdcvv2, &pan, expiry, lenient, later, &old.code)
        .unwrap();
    prop_assert_eq!(found, Some(first), "past window {}, key {}", first, key_hex);
    Ok(())
}

#[test]
fn engine_matches_reference() {
    LazyLock::force(&KEYS);
    let coverage = Coverage::default();
    let config = config();
    assert!(config.cases >= 1000);
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&cases(), |c| check_case(&c, &coverage)) {
        panic!("engine and reference disagree: {e}");
    }

    let lengths: Vec<usize> = coverage
        .pan_lengths
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    eprintln!(
        "PAN lengths 12..=19: {:?}; second pass: {} static, {} dynamic; wrapped windows: {}",
        &lengths[12..],
        coverage.static_second_pass.load(Ordering::Relaxed),
        coverage.dynamic_second_pass.load(Ordering::Relaxed),
        coverage.wrapped_windows.load(Ordering::Relaxed),
    );
    for (len, n) in lengths.iter().enumerate().skip(12) {
        assert!(*n > 0, "no case with a {len}-digit PAN");
    }
}

// ------------------------------------------------------------ the rare paths, on purpose

/// The first PAN of `len` digits, counting up from 4 followed by zeros, whose CVV
/// final block holds fewer than 3 decimal nibbles.
fn pan_needing_second_pass(
    cvk: &[u8; 16],
    len: usize,
    expiry: &str,
    service_code: &str,
) -> (String, [u8; 8], String) {
    let start = 4 * 10u64.pow(u32::try_from(len).unwrap() - 1);
    (start..)
        .take(2_000_000)
        .map(|n| n.to_string())
        .find_map(|pan| {
            let (r3, code) = reference::cvv(cvk, &pan, expiry, service_code, 3);
            (reference::decimal_nibbles(&r3) < 3).then_some((pan, r3, code))
        })
        .unwrap_or_else(|| panic!("no {len}-digit PAN needs the second pass"))
}

#[test]
fn second_decimalization_pass_and_long_pans() {
    let k = key(K);
    let cvk = support::import(K, KeyKind::Cvk, "second-pass-cvk");
    let imk = support::import(K, KeyKind::ImkTdcvv2, "second-pass-imk");
    let engine = engine();
    let expiry = "2812";
    let service_code = "101";

    // CVV: one PAN of each length from 12 to 19 digits (including all three
    // lengths over 16) whose R3 needs the A–F pass.
    let mut found = Vec::new();
    for len in 12..=19 {
        let (pan, r3, want) = pan_needing_second_pass(&k, len, expiry, service_code);
        assert_eq!(pan.len(), len);
        assert!(
            reference::decimal_nibbles(&r3) < 3,
            "{}",
            hex::encode_upper(r3)
        );
        let issued = engine
            .static_code(
                &cvk,
                &pan.parse().unwrap(),
                expiry.parse().unwrap(),
                StaticCodeKind::Cvv(service_code.parse().unwrap()),
                CodeLength::THREE,
            )
            .unwrap();
        assert_eq!(
            issued.code.expose(),
            want,
            "PAN {pan}, R3 {}",
            hex::encode_upper(r3)
        );
        found.push(pan);
    }
    assert!(found.len() >= 3);
    assert!(found.iter().any(|p| p.len() == 17));
    assert!(found.iter().any(|p| p.len() == 18));
    assert!(found.iter().any(|p| p.len() == 19));

    // TDCVV2: a window of a 19-digit PAN (card key by Option B) whose R3 needs the
    // second pass, searched from 2026-01-01 on in 5-minute windows.
    let pan = "4123456789012345678";
    let w = 300u64;
    let mk = reference::tdcvv2_card_key(&k, pan);
    let start = reference::window(1_767_225_600, w);
    let (t, r3, want) = (start..start + 2_000_000)
        .find_map(|t| {
            let (r3, code) = reference::tdcvv2_with_card_key(&mk, pan, expiry, t);
            (reference::decimal_nibbles(&r3) < 3).then_some((t, r3, code))
        })
        .expect("a window whose R3 needs the second pass");
    let profile = Tdcvv2Profile::new(u32::try_from(w).unwrap(), 0, 0).unwrap();
    let card: Pan = pan.parse().unwrap();
    let (values, _) = engine
        .tdcvv2_generate(&imk, &card, expiry.parse().unwrap(), profile, t * w + 17, 1)
        .unwrap();
    assert_eq!(values[0].window, t);
    assert_eq!(
        values[0].code.expose(),
        want,
        "window {t}, R3 {}",
        hex::encode_upper(r3)
    );
    let typed = SecurityCode::parse("cvv2", &want).unwrap();
    let verified = engine
        .tdcvv2_verify(
            &imk,
            &card,
            expiry.parse().unwrap(),
            profile,
            t * w + 299,
            &typed,
        )
        .unwrap();
    assert_eq!(verified, Some(t));
}
