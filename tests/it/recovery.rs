//! DESIGN 7.6 at the token level: when the token drops the login (as after a
//! token restart), the next call re-opens, logs in again, re-resolves its keys
//! and succeeds, without the caller doing anything.

use dcvv_gateway::domain::{CodeLength, Engine, StaticCodeKind, Tdcvv2Profile};
use dcvv_gateway::hsm::KeyKind;

use crate::support;

const K: &str = "0123456789ABCDEFFEDCBA9876543210";

/// Logs the whole process out of the token, as a token restart would.
fn drop_login() {
    let session = support::raw_session();
    session.logout().unwrap();
    assert!(matches!(
        session.get_session_info().unwrap().session_state(),
        cryptoki::session::SessionState::RwPublic
    ));
}

#[test]
fn calls_recover_after_the_login_is_lost() {
    let cvk = support::import(K, KeyKind::Cvk, "rec-cvk");
    let imk = support::import(K, KeyKind::ImkTdcvv2, "rec-imk");
    let engine = Engine::new(&**support::HSM);
    let pan = "4123456789012345".parse().unwrap();
    let cvv2 = |e: &Engine<_>| {
        e.static_code(
            &cvk,
            &pan,
            "8701".parse().unwrap(),
            StaticCodeKind::Cvv2,
            CodeLength::THREE,
        )
        .unwrap()
        .code
        .expose()
        .to_owned()
    };
    let dcvv2 = |e: &Engine<_>| {
        let profile = Tdcvv2Profile::new(300, 0, 0).unwrap();
        let (values, _) = e
            .tdcvv2_generate(
                &imk,
                &pan,
                "2812".parse().unwrap(),
                profile,
                1_767_225_600,
                1,
            )
            .unwrap();
        values[0].code.expose().to_owned()
    };
    assert_eq!(cvv2(&engine), "636");
    assert_eq!(dcvv2(&engine), "209");
    support::HSM.probe().unwrap();

    drop_login();
    assert_eq!(cvv2(&engine), "636", "CVK path after the login was lost");
    drop_login();
    assert_eq!(dcvv2(&engine), "209", "IMK path after the login was lost");
    drop_login();
    support::HSM.probe().unwrap();
}
