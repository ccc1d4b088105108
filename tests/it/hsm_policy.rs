//! Negative paths of the HSM layer against a real SoftHSM token: missing module,
//! missing token, wrong PIN, missing key, keys planted with attributes wider than
//! their kind allows (refused by the engine, reported by `hsm check`).

use std::path::PathBuf;

use cryptoki::object::Attribute;
use dcvv_gateway::domain::{CodeLength, DomainError, Engine, StaticCodeKind};
use dcvv_gateway::hsm::{CardCrypto, HsmError, KeyKind, KeyLabel, PinSource, Token};

use crate::support;

fn open_with(change: impl FnOnce(&mut dcvv_gateway::hsm::HsmSettings)) -> Result<Token, HsmError> {
    let mut settings = support::hsm_settings();
    change(&mut settings);
    Token::open(&settings)
}

#[test]
fn missing_module_is_named() {
    let err = open_with(|s| s.module = PathBuf::from("/nonexistent/libpkcs11.so")).unwrap_err();
    assert!(matches!(err, HsmError::ModuleNotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "PKCS#11 module not found or not loadable: /nonexistent/libpkcs11.so"
    );
}

#[test]
fn missing_token_is_named() {
    let err = open_with(|s| s.token_label = "no-such-token".into()).unwrap_err();
    assert!(matches!(err, HsmError::TokenNotFound { .. }), "{err:?}");
    assert_eq!(err.to_string(), "no token with label \"no-such-token\"");
}

#[test]
fn missing_pin_source_is_named() {
    let err =
        open_with(|s| s.pin = PinSource::Env("DCVV_TEST_UNSET_PIN_VARIABLE".into())).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot read the user PIN: environment variable DCVV_TEST_UNSET_PIN_VARIABLE is not set"
    );
}

#[test]
fn missing_key_and_wrong_kind_are_typed() {
    let engine = Engine::new(&**support::HSM);
    let missing: KeyLabel = "no-such-key-v1".parse().unwrap();
    let err = engine
        .static_code(
            &missing,
            &"4123456789012345".parse().unwrap(),
            "2812".parse().unwrap(),
            StaticCodeKind::Cvv2,
            CodeLength::THREE,
        )
        .unwrap_err();
    assert!(
        matches!(err, DomainError::KeyUnusable(HsmError::KeyNotFound { .. })),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "key not found: no-such-key-v1");

    // An IMK is never used as a CVK.
    let imk = support::import(
        "0123456789ABCDEFFEDCBA9876543210",
        KeyKind::ImkDcvv,
        "policy-imk",
    );
    let err = support::HSM
        .key_check_value(&imk, KeyKind::Cvk)
        .unwrap_err();
    assert!(
        matches!(
            err,
            HsmError::WrongKeyKind {
                found: KeyKind::ImkDcvv,
                wanted: KeyKind::Cvk,
                ..
            }
        ),
        "{err:?}"
    );
}

fn assert_refused(label: &KeyLabel, expected: &str) {
    let engine = Engine::new(&**support::HSM);
    let err = engine
        .static_code(
            label,
            &"4123456789012345".parse().unwrap(),
            "2812".parse().unwrap(),
            StaticCodeKind::Cvv2,
            CodeLength::THREE,
        )
        .unwrap_err();
    match err {
        DomainError::KeyUnusable(HsmError::KeyPolicy {
            label: l,
            violations,
        }) => {
            assert_eq!(l, label.as_str());
            assert!(violations.iter().any(|v| v == expected), "{violations:?}");
        }
        other => panic!("expected a policy refusal, got {other:?}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let config = support::config_file(dir.path());
    let (ok, stdout, stderr) = support::gateway(&config, &["hsm", "check"]);
    assert!(!ok, "hsm check must fail: {stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("TOO WIDE") && l.contains(&format!(" {label} ")))
        .unwrap_or_else(|| panic!("hsm check does not name {label}: {stdout}"));
    assert!(line.contains(expected), "{line}");
    assert!(stderr.contains("refused by policy"), "{stderr}");

    // DESIGN 3: the service refuses to start at all.
    let serve_config = dir.path().join("serve.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &serve_config,
        format!("{text}\n[server]\nlisten = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dcvv-gateway"))
        .arg("--config")
        .arg(&serve_config)
        .arg("serve")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("serve started despite a wide key");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to start") && stderr.contains(label.as_str()),
        "{stderr}"
    );
}

#[test]
fn extractable_key_is_refused_and_reported() {
    // The planted key stays in this process's token, where it would stop every
    // later gateway of the process from starting.
    if !support::in_own_process("hsm_policy::extractable_key_is_refused_and_reported") {
        return;
    }
    let label = support::unique_label("planted-extractable");
    support::plant_cvk(&label, &[Attribute::Extractable(true)]);
    assert_refused(&label, "CKA_EXTRACTABLE is true");
}

#[test]
fn non_sensitive_key_is_refused_and_reported() {
    // The planted key stays in this process's token, where it would stop every
    // later gateway of the process from starting.
    if !support::in_own_process("hsm_policy::non_sensitive_key_is_refused_and_reported") {
        return;
    }
    let label = support::unique_label("planted-clear");
    support::plant_cvk(&label, &[Attribute::Sensitive(false)]);
    assert_refused(&label, "CKA_SENSITIVE is false");
}

#[test]
fn key_with_a_second_usage_is_refused_and_reported() {
    // The planted key stays in this process's token, where it would stop every
    // later gateway of the process from starting.
    if !support::in_own_process("hsm_policy::key_with_a_second_usage_is_refused_and_reported") {
        return;
    }
    let label = support::unique_label("planted-decrypt");
    support::plant_cvk(&label, &[Attribute::Decrypt(true)]);
    assert_refused(&label, "CKA_DECRYPT is true");
}

#[test]
fn created_keys_cannot_be_read_or_wrapped_out() {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::AttributeType;

    let imported = support::import("0123456789ABCDEFFEDCBA9876543210", KeyKind::Cvk, "ro-cvk");
    let generated = support::unique_label("ro-imk");
    support::HSM
        .generate_key(KeyKind::ImkTdcvv2, &generated)
        .unwrap();
    let session = support::raw_session();
    // SoftHSM refuses every DES wrapping mechanism; AES key wrap is the way out it offers.
    let wrapping = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::Wrap(true),
                Attribute::ValueLen(32.into()),
            ],
        )
        .unwrap();
    for label in [
        imported.to_string(),
        imported.single_des_twin(),
        generated.to_string(),
    ] {
        let handle = session
            .find_objects(&[
                Attribute::Token(true),
                Attribute::Label(label.clone().into_bytes()),
            ])
            .unwrap()[0];
        let attrs = session
            .get_attributes(handle, &[AttributeType::Value])
            .unwrap();
        assert!(
            attrs
                .iter()
                .all(|a| !matches!(a, Attribute::Value(v) if !v.is_empty())),
            "{label}: the key value is readable"
        );
        let wrapped = session.wrap_key(&Mechanism::AesKeyWrap, wrapping, handle);
        assert!(
            matches!(
                wrapped,
                Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::KeyUnextractable,
                    _
                ))
            ),
            "{label}: {wrapped:?}"
        );
    }
}
