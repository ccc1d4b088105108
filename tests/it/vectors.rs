//! Every known-answer vector of `vectors/card-codes.toml` (DESIGN 7.4) against a
//! real SoftHSM token, with the vector keys entered through the same import
//! path as `keys import` and derived-key KCVs checked in the token.
//!
//! The file is vendored in `tests/vectors/`; `vendored_vectors_match_shared`
//! fails when it drifts from `../shared/vectors/`.

use std::collections::HashMap;

use dcvv_gateway::domain::{
    CardKeyMethod, CodeLength, Engine, Expiry, Pan, Psn, SecurityCode, StaticCodeKind,
    Tdcvv2Profile,
};
use dcvv_gateway::hsm::{CardCrypto, KeyKind, KeyLabel};
use serde::Deserialize;

use crate::support;

const VENDORED: &str = include_str!("../vectors/card-codes.toml");

#[derive(Deserialize)]
struct Vectors {
    keys: HashMap<String, String>,
    cvv: Vec<CvvVector>,
    kcv: Vec<KcvVector>,
    emv_mk: Vec<MkVector>,
    dcvv: Vec<DcvvVector>,
    tdcvv2: Vec<TdcvvVector>,
}

#[derive(Deserialize)]
struct CvvVector {
    key: Option<String>,
    key_a: Option<String>,
    key_b: Option<String>,
    pan: String,
    expiry: String,
    service_code: String,
    digits: u8,
    expected: String,
}

#[derive(Deserialize)]
struct KcvVector {
    key: String,
    expected: String,
}

#[derive(Deserialize)]
struct MkVector {
    imk: String,
    pan: String,
    psn: String,
    option: String,
    mk_kcv: String,
}

#[derive(Deserialize)]
struct DcvvVector {
    imk: String,
    pan: String,
    expiry: String,
    service_code: String,
    atc: String,
    mk_kcv: String,
    expected: String,
}

#[derive(Deserialize)]
struct TdcvvVector {
    /// Always `K`; `tdcvv2_imk` imports it once per test.
    #[allow(dead_code)]
    imk: String,
    pan: String,
    expiry: String,
    unix_time: u64,
    window_seconds: u32,
    counter: u64,
    expected: String,
}

fn vectors() -> Vectors {
    toml::from_str(VENDORED).unwrap()
}

fn key_hex(v: &Vectors, name: &str) -> String {
    v.keys.get(name).cloned().unwrap_or_else(|| name.to_owned())
}

fn engine() -> Engine<&'static dcvv_gateway::hsm::Token> {
    Engine::new(&**support::HSM)
}

#[test]
fn vendored_vectors_match_shared() {
    let shared =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors/card-codes.toml");
    match std::fs::read_to_string(&shared) {
        Ok(text) => assert_eq!(
            text,
            VENDORED,
            "tests/vectors/card-codes.toml differs from {}",
            shared.display()
        ),
        // A clone without the steering repo beside it: the vendored copy is the reference.
        Err(_) => eprintln!(
            "note: {} not present; using the vendored copy",
            shared.display()
        ),
    }
}

#[test]
fn cvv_cvv2_icvv_vectors() {
    let v = vectors();
    assert_eq!(v.cvv.len(), 8);
    for (i, c) in v.cvv.iter().enumerate() {
        let key = match (&c.key, &c.key_a, &c.key_b) {
            (Some(k), _, _) => key_hex(&v, k),
            (None, Some(a), Some(b)) => format!("{a}{b}"),
            _ => panic!("vector {i} has no key"),
        };
        let cvk = support::import(&key, KeyKind::Cvk, "vec-cvk");
        let pan: Pan = c.pan.parse().unwrap();
        let expiry: Expiry = c.expiry.parse().unwrap();
        let kind = match c.service_code.as_str() {
            "000" => StaticCodeKind::Cvv2,
            "999" => StaticCodeKind::Icvv,
            sc => StaticCodeKind::Cvv(sc.parse().unwrap()),
        };
        let length = CodeLength::try_from(c.digits).unwrap();
        let got = engine()
            .static_code(&cvk, &pan, expiry, kind, length)
            .unwrap();
        assert_eq!(got.code.expose(), c.expected, "cvv vector {i} ({})", c.pan);
    }
}

#[test]
fn kcv_vectors_for_every_des_kind() {
    let v = vectors();
    for k in &v.kcv {
        for kind in [KeyKind::Cvk, KeyKind::ImkDcvv, KeyKind::ImkTdcvv2] {
            let label = support::import(&k.key, kind, "vec-kcv");
            let kcv = support::HSM.key_check_value(&label, kind).unwrap();
            assert_eq!(kcv.to_string(), k.expected, "{kind} {}", k.key);
        }
    }
}

#[test]
fn emv_master_key_vectors_by_kcv_in_the_token() {
    let v = vectors();
    for m in &v.emv_mk {
        let imk = support::import(&key_hex(&v, &m.imk), KeyKind::ImkDcvv, "vec-mk");
        let method = match m.option.as_str() {
            "A" => CardKeyMethod::OptionA,
            "B" => CardKeyMethod::OptionB,
            other => panic!("option {other}"),
        };
        let psn: Psn = m.psn.parse().unwrap();
        let kcv = engine()
            .card_key_kcv(&imk, KeyKind::ImkDcvv, &m.pan.parse().unwrap(), psn, method)
            .unwrap();
        assert_eq!(kcv.to_string(), m.mk_kcv, "{} option {}", m.pan, m.option);
    }
}

#[test]
fn contactless_dcvv_vectors() {
    let v = vectors();
    for d in &v.dcvv {
        let imk = support::import(&key_hex(&v, &d.imk), KeyKind::ImkDcvv, "vec-dcvv");
        let pan: Pan = d.pan.parse().unwrap();
        let mk_kcv = engine()
            .card_key_kcv(
                &imk,
                KeyKind::ImkDcvv,
                &pan,
                Psn::NONE,
                CardKeyMethod::OptionA,
            )
            .unwrap();
        assert_eq!(mk_kcv.to_string(), d.mk_kcv, "{}", d.pan);
        let got = engine()
            .dcvv(
                &imk,
                &pan,
                d.expiry.parse().unwrap(),
                d.service_code.parse().unwrap(),
                d.atc.parse().unwrap(),
            )
            .unwrap();
        assert_eq!(got.code.expose(), d.expected, "{}", d.pan);
    }
}

fn tdcvv2_imk(v: &Vectors, name: &str) -> KeyLabel {
    support::import(&key_hex(v, name), KeyKind::ImkTdcvv2, "vec-tdcvv2")
}

#[test]
fn tdcvv2_vectors_generate_and_verify() {
    let v = vectors();
    let imk = tdcvv2_imk(&v, "K");
    // vectors/card-codes.toml: card master key KCV 8C30F7 for this PAN.
    let kcv = engine()
        .card_key_kcv(
            &imk,
            KeyKind::ImkTdcvv2,
            &"4123456789012345".parse().unwrap(),
            Psn::NONE,
            CardKeyMethod::OptionA,
        )
        .unwrap();
    assert_eq!(kcv.to_string(), "8C30F7");
    for t in &v.tdcvv2 {
        let pan: Pan = t.pan.parse().unwrap();
        let expiry: Expiry = t.expiry.parse().unwrap();
        let profile = Tdcvv2Profile::new(t.window_seconds, 0, 0).unwrap();
        let (values, _) = engine()
            .tdcvv2_generate(&imk, &pan, expiry, profile, t.unix_time, 1)
            .unwrap();
        assert_eq!(values[0].window, t.counter);
        assert_eq!(
            values[0].code.expose(),
            t.expected,
            "t={} W={}",
            t.unix_time,
            t.window_seconds
        );
        let typed = SecurityCode::parse("cvv2", &t.expected).unwrap();
        let found = engine()
            .tdcvv2_verify(&imk, &pan, expiry, profile, t.unix_time, &typed)
            .unwrap();
        assert_eq!(found, Some(t.counter));
    }
}

#[test]
fn tdcvv2_window_boundaries_and_tolerance() {
    let v = vectors();
    let imk = tdcvv2_imk(&v, "K");
    let pan: Pan = "4123456789012345".parse().unwrap();
    let expiry: Expiry = "2812".parse().unwrap();
    let code = SecurityCode::parse("cvv2", "209").unwrap();
    let strict = Tdcvv2Profile::new(300, 0, 0).unwrap();
    let one_back = Tdcvv2Profile::new(300, 1, 0).unwrap();
    let e = engine();
    // 209 is valid in [1767225600, 1767225900).
    assert_eq!(
        e.tdcvv2_verify(&imk, &pan, expiry, strict, 1_767_225_899, &code)
            .unwrap(),
        Some(5_890_752)
    );
    assert_eq!(
        e.tdcvv2_verify(&imk, &pan, expiry, strict, 1_767_225_900, &code)
            .unwrap(),
        None
    );
    assert_eq!(
        e.tdcvv2_verify(&imk, &pan, expiry, one_back, 1_767_226_199, &code)
            .unwrap(),
        Some(5_890_752)
    );
    assert_eq!(
        e.tdcvv2_verify(&imk, &pan, expiry, one_back, 1_767_226_200, &code)
            .unwrap(),
        None
    );
    assert_eq!(
        e.tdcvv2_verify(&imk, &pan, expiry, strict, 1_767_225_599, &code)
            .unwrap(),
        None
    );
    // 24 values: the first two are the vectors' 209 and 137, validity chains without gaps.
    let (values, _) = e
        .tdcvv2_generate(&imk, &pan, expiry, strict, 1_767_225_700, 24)
        .unwrap();
    assert_eq!(values.len(), 24);
    assert_eq!(values[0].code.expose(), "209");
    assert_eq!(values[1].code.expose(), "137");
    assert_eq!(values[0].valid_from, 1_767_225_600);
    for pair in values.windows(2) {
        assert_eq!(pair[0].valid_until, pair[1].valid_from);
    }
}
