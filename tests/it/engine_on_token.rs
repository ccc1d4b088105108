//! Engine behaviour that only a real token can show: threads share the token
//! safely, and readiness answers over HTTP.

use std::sync::Arc;

use dcvv_gateway::domain::{CodeLength, Engine, Pan, StaticCodeKind, Tdcvv2Profile};
use dcvv_gateway::hsm::KeyKind;

use crate::support;

const K: &str = "0123456789ABCDEFFEDCBA9876543210";

#[test]
fn threads_share_the_token_and_agree() {
    let cvk = support::import(K, KeyKind::Cvk, "eng-cvk");
    let imk = support::import(K, KeyKind::ImkTdcvv2, "eng-imk-mt");
    let engine = Arc::new(Engine::new(&**support::HSM));
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
