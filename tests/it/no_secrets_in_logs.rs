//! DESIGN 7.1: no key, component, PAN, PIN or code value in any log line. Every
//! log event of a full key ceremony and of every engine operation (including
//! failures) is captured at TRACE level, cryptoki's own included, and searched:
//! in the text format, and in JSON lines (`[log] format = "json"`).

use dcvv_gateway::domain::{
    CardKeyMethod, CodeLength, Engine, Pan, Psn, SecurityCode, StaticCodeKind, Tdcvv2Profile,
};
use dcvv_gateway::hsm::{Component, KeyKind};

use crate::support;
use crate::support::logs::{Capture, json_lines, json_words};

const K: &str = "0123456789ABCDEFFEDCBA9876543210";
const C1: &str = "5A5A5A5A5A5A5A5AA5A5A5A5A5A5A5A5";
const PAN: &str = "4123456789012345";
const LONG_PAN: &str = "4123456789012345678";

fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect()
}

#[test]
fn nothing_secret_reaches_a_log_line() {
    // It installs the process-wide log subscriber, which only one test of a
    // process can.
    if !support::in_own_process("no_secrets_in_logs::nothing_secret_reaches_a_log_line") {
        return;
    }
    let capture = Capture::install(false);
    let (c2, codes) = ceremony_and_every_operation();
    let log = capture.text();
    assert_nothing_secret(&log, &c2, &codes, &words(&log));
}

#[test]
fn nothing_secret_reaches_a_json_log_line() {
    if !support::in_own_process("no_secrets_in_logs::nothing_secret_reaches_a_json_log_line") {
        return;
    }
    let capture = Capture::install_json();
    let (c2, codes) = ceremony_and_every_operation();
    let log = capture.text();
    let lines = json_lines(&log);
    let words = json_words(&lines, &[]);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    assert_nothing_secret(&log, &c2, &codes, &words);
}

/// Imports keys from components (a refused import too) and runs every engine
/// operation on two PANs, failures included: the second component and every
/// code computed.
fn ceremony_and_every_operation() -> (String, Vec<SecurityCode>) {
    let c2: String = hex::encode_upper(
        hex::decode(K)
            .unwrap()
            .iter()
            .zip(hex::decode(C1).unwrap())
            .map(|(a, b)| a ^ b)
            .collect::<Vec<u8>>(),
    );
    let import = |kind: KeyKind, label: &str| {
        let label = label.parse().unwrap();
        let parts = vec![
            Component::parse(C1, kind, 1).unwrap(),
            Component::parse(&c2, kind, 2).unwrap(),
        ];
        support::HSM.import_key(kind, &label, &parts).unwrap();
        label
    };
    let cvk = import(KeyKind::Cvk, "log-cvk");
    let imk = import(KeyKind::ImkTdcvv2, "log-imk");
    let imk_dcvv = import(KeyKind::ImkDcvv, "log-imk-dcvv");
    // A refused import is logged too, if at all, without its components.
    let _ = support::HSM.import_key(
        KeyKind::Cvk,
        &"log-cvk".parse().unwrap(),
        &[
            Component::parse(C1, KeyKind::Cvk, 1).unwrap(),
            Component::parse(&c2, KeyKind::Cvk, 2).unwrap(),
        ],
    );

    let engine = Engine::new(&**support::HSM);
    let mut codes = Vec::new();
    for pan in [PAN, LONG_PAN] {
        let pan: Pan = pan.parse().unwrap();
        let expiry = "2812".parse().unwrap();
        for kind in [
            StaticCodeKind::Cvv2,
            StaticCodeKind::Icvv,
            StaticCodeKind::Cvv("101".parse().unwrap()),
        ] {
            codes.push(
                engine
                    .static_code(&cvk, &pan, expiry, kind, CodeLength::try_from(5).unwrap())
                    .unwrap()
                    .code,
            );
        }
        let profile = Tdcvv2Profile::new(300, 1, 0).unwrap();
        let (values, _) = engine
            .tdcvv2_generate(&imk, &pan, expiry, profile, 1_767_225_600, 24)
            .unwrap();
        for v in &values {
            assert!(
                engine
                    .tdcvv2_verify(&imk, &pan, expiry, profile, v.valid_from, &v.code)
                    .unwrap()
                    .is_some()
            );
        }
        codes.extend(values.into_iter().map(|v| v.code));
        codes.push(
            engine
                .dcvv(
                    &imk_dcvv,
                    &pan,
                    expiry,
                    "226".parse().unwrap(),
                    "3210".parse().unwrap(),
                )
                .unwrap()
                .code,
        );
        engine
            .card_key_kcv(
                &imk,
                KeyKind::ImkTdcvv2,
                &pan,
                Psn::NONE,
                CardKeyMethod::OptionB,
            )
            .unwrap();
        // Failures: a missing key and a wrong kind.
        let _ = engine.static_code(
            &"log-missing".parse().unwrap(),
            &pan,
            expiry,
            StaticCodeKind::Cvv2,
            CodeLength::THREE,
        );
        let _ = engine.static_code(&imk, &pan, expiry, StaticCodeKind::Cvv2, CodeLength::THREE);
        let wrong = SecurityCode::parse("cvv2", "000").unwrap();
        let _ = engine.tdcvv2_verify(&imk, &pan, expiry, profile, 1_767_225_600, &wrong);
    }
    (c2, codes)
}

/// No key, component, PAN or PIN in `log`, and no code among its `logged` words.
fn assert_nothing_secret(log: &str, c2: &str, codes: &[SecurityCode], logged: &[&str]) {
    assert!(
        log.contains("key imported from components"),
        "the capture works: {log}"
    );
    assert!(log.contains("key loaded"), "{log}");
    let pin = std::fs::read_to_string(&support::TOKEN.pin_file).unwrap();
    let upper = log.to_uppercase();
    for secret in [
        K,
        C1,
        c2,
        &K[..16],
        &K[16..],
        PAN,
        LONG_PAN,
        &PAN[6..],
        pin.trim(),
    ] {
        assert!(
            !upper.contains(&secret.to_uppercase()),
            "{secret} appears in the log"
        );
    }
    for code in codes {
        // 5-digit CVVs and every dCVV2: no whole word of the log equals one.
        assert!(
            !logged.contains(&code.expose()),
            "a code appears in the log"
        );
    }
}
