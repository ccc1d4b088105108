//! Per-card keys are session objects destroyed after every call, also when the
//! call fails, and the token calls per operation stay constant however many
//! windows (issue 2). The test has a process of its own (`in_own_process`): it
//! counts process-wide objects and operations, which other tests running in the
//! same process would disturb.

use cryptoki::object::Attribute;
use dcvv_gateway::domain::{Engine, Pan, SecurityCode, Tdcvv2Profile};
use dcvv_gateway::hsm::{BlockCipher, CardCrypto, CvvKeySource, HsmError, KeyKind};

use crate::support;

const K: &str = "0123456789ABCDEFFEDCBA9876543210";

/// Session objects of this process, seen from a session of our own.
fn session_objects() -> usize {
    support::raw_session()
        .find_objects(&[Attribute::Token(false)])
        .unwrap()
        .len()
}

#[test]
fn card_keys_are_destroyed_after_every_call_and_calls_are_constant() {
    if !support::in_own_process(
        "card_keys::card_keys_are_destroyed_after_every_call_and_calls_are_constant",
    ) {
        return;
    }
    let imk = support::import(K, KeyKind::ImkTdcvv2, "eng-imk");
    let engine = Engine::new(&**support::HSM);
    let pan: Pan = "4123456789012345".parse().unwrap();
    let expiry = "2812".parse().unwrap();
    let profile = Tdcvv2Profile::new(300, 1, 0).unwrap();
    engine
        .tdcvv2_generate(&imk, &pan, expiry, profile, 1_767_225_600, 1)
        .unwrap();
    let baseline = session_objects();

    for n in [1, 2, 24] {
        let before = support::HSM.counters();
        engine
            .tdcvv2_generate(&imk, &pan, expiry, profile, 1_767_225_600, n)
            .unwrap();
        let used = support::HSM.counters().since(&before);
        assert_eq!(
            (used.derive, used.encrypt, used.destroy),
            (2, 2, 2),
            "{n} values"
        );
        assert_eq!(session_objects(), baseline, "{n} values left a session key");
    }
    let before = support::HSM.counters();
    let wrong = SecurityCode::parse("cvv2", "000").unwrap();
    engine
        .tdcvv2_verify(&imk, &pan, expiry, profile, 1_767_225_600, &wrong)
        .unwrap();
    let used = support::HSM.counters().since(&before);
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
    let err = support::HSM
        .with_cvv_keys(source, |keys: &dyn BlockCipher| -> Result<(), HsmError> {
            keys.encrypt_single(&[0u8; 8])?;
            // Any error of the caller's own: fail on purpose.
            Err(HsmError::InvalidInput(
                dcvv_gateway::hsm::KeyInputError::ZeroKey,
            ))
        })
        .unwrap_err();
    assert!(matches!(err, HsmError::InvalidInput(_)));
    assert_eq!(
        session_objects(),
        baseline,
        "the failed call left a session key"
    );
    // A token failure inside the call (a length that is not whole blocks).
    let err = support::HSM
        .with_cvv_keys(source, |keys: &dyn BlockCipher| {
            keys.encrypt_double(&[0u8; 5])
        })
        .unwrap_err();
    assert!(matches!(err, HsmError::Pkcs11 { .. }), "{err:?}");
    assert_eq!(session_objects(), baseline);
}
