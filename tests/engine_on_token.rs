//! Engine behaviour that only a real token can show: per-card keys are session
//! objects destroyed after every call (also when the call fails), token calls per
//! operation stay constant however many windows, threads share the token safely,
//! and readiness answers over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::Attribute;
use dcvv_gateway::domain::{CodeLength, Engine, Pan, SecurityCode, StaticCodeKind, Tdcvv2Profile};
use dcvv_gateway::hsm::{BlockCipher, CardCrypto, CvvKeySource, HsmError, KeyKind};

const K: &str = "0123456789ABCDEFFEDCBA9876543210";

/// Session objects of this process, seen from a session of our own.
fn session_objects() -> usize {
    let token = &*common::TOKEN;
    let ctx = Pkcs11::new(common::module()).unwrap();
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == token.label)
        .unwrap();
    let session = ctx.open_ro_session(slot).unwrap();
    session
        .find_objects(&[Attribute::Token(false)])
        .unwrap()
        .len()
}

#[test]
fn card_keys_are_destroyed_after_every_call_and_calls_are_constant() {
    let imk = common::import(K, KeyKind::ImkTdcvv2, "eng-imk");
    let engine = Engine::new(&*common::HSM);
    let pan: Pan = "4123456789012345".parse().unwrap();
    let expiry = "2812".parse().unwrap();
    let profile = Tdcvv2Profile::new(300, 1, 0).unwrap();
    engine
        .tdcvv2_generate(&imk, &pan, expiry, profile, 1_767_225_600, 1)
        .unwrap();
    let baseline = session_objects();

    for n in [1, 2, 24] {
        let before = common::HSM.counters();
        engine
            .tdcvv2_generate(&imk, &pan, expiry, profile, 1_767_225_600, n)
            .unwrap();
        let used = common::HSM.counters().since(&before);
        assert_eq!(
            (used.derive, used.encrypt, used.destroy),
            (2, 2, 2),
            "{n} values"
        );
        assert_eq!(session_objects(), baseline, "{n} values left a session key");
    }
    let before = common::HSM.counters();
    let wrong = SecurityCode::parse("cvv2", "000").unwrap();
    engine
        .tdcvv2_verify(&imk, &pan, expiry, profile, 1_767_225_600, &wrong)
        .unwrap();
    let used = common::HSM.counters().since(&before);
    assert_eq!(
        (used.derive, used.encrypt, used.destroy),
        (2, 2, 2),
        "verification over 2 windows"
    );

    // The error path: the closure fails after both keys were derived.
    let data = ([1u8; 16], [2u8; 16]);
    let source = CvvKeySource::CardKey {
        imk: &imk,
        kind: KeyKind::ImkTdcvv2,
        mk_data: &data.0,
        twin_data: &data.1,
    };
    let err = common::HSM
        .with_cvv_keys(source, |keys: &dyn BlockCipher| -> Result<(), HsmError> {
            keys.encrypt_single(&[0u8; 8])?;
            Err(HsmError::InvalidInput("fail on purpose".into()))
        })
        .unwrap_err();
    assert!(matches!(err, HsmError::InvalidInput(_)));
    assert_eq!(
        session_objects(),
        baseline,
        "the failed call left a session key"
    );
    // A token failure inside the call (a length that is not whole blocks).
    let err = common::HSM
        .with_cvv_keys(source, |keys: &dyn BlockCipher| {
            keys.encrypt_double(&[0u8; 5])
        })
        .unwrap_err();
    assert!(matches!(err, HsmError::Pkcs11 { .. }), "{err:?}");
    assert_eq!(session_objects(), baseline);
}

#[test]
fn threads_share_the_token_and_agree() {
    let cvk = common::import(K, KeyKind::Cvk, "eng-cvk");
    let imk = common::import(K, KeyKind::ImkTdcvv2, "eng-imk-mt");
    let engine = Arc::new(Engine::new(&*common::HSM));
    let profile = Tdcvv2Profile::new(300, 0, 0).unwrap();
    let expected = engine
        .static_code(
            &cvk,
            &"4123456789012345".parse().unwrap(),
            "8701".parse().unwrap(),
            StaticCodeKind::Cvv2,
            CodeLength::THREE,
        )
        .unwrap()
        .code;
    assert_eq!(expected.expose(), "636");
    std::thread::scope(|s| {
        for t in 0..4 {
            let engine = Arc::clone(&engine);
            let (cvk, imk) = (&cvk, &imk);
            s.spawn(move || {
                for i in 0..50 {
                    let pan: Pan = "4123456789012345".parse().unwrap();
                    let code = engine
                        .static_code(
                            cvk,
                            &pan,
                            "8701".parse().unwrap(),
                            StaticCodeKind::Cvv2,
                            CodeLength::THREE,
                        )
                        .unwrap()
                        .code;
                    assert_eq!(code.expose(), "636");
                    let now = 1_767_225_600 + (t * 50 + i) * 300;
                    let (values, _) = engine
                        .tdcvv2_generate(imk, &pan, "2812".parse().unwrap(), profile, now, 1)
                        .unwrap();
                    let found = engine
                        .tdcvv2_verify(
                            imk,
                            &pan,
                            "2812".parse().unwrap(),
                            profile,
                            now,
                            &values[0].code,
                        )
                        .unwrap();
                    assert_eq!(found, Some(values[0].window));
                }
            });
        }
    });
}

#[tokio::test]
async fn readiness_probes_the_token() {
    use tower::ServiceExt;
    let token = Arc::new(dcvv_gateway::hsm::Token::open(&common::hsm_settings()).unwrap());
    let app = dcvv_gateway::http::app(dcvv_gateway::http::AppState { token });
    for path in ["/healthz", "/readyz"] {
        let response = app
            .clone()
            .oneshot(
                axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let response = app
        .oneshot(
            axum::http::Request::get("/nowhere")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}
