//! A wrong PIN is refused with a typed error and never echoed. In a process of
//! its own (`in_own_process`): login state is per process, and once any test of
//! a process has logged in, a second login answers "already logged in" whatever
//! the PIN.

use dcvv_gateway::hsm::{HsmError, PinSource, Token};

use crate::support;

#[test]
fn wrong_pin_is_refused_without_echo() {
    if !support::in_own_process("wrong_pin::wrong_pin_is_refused_without_echo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("wrong.pin");
    std::fs::write(&pin, "not-the-pin-4711\n").unwrap();
    let mut settings = support::hsm_settings();
    settings.pin = PinSource::File(pin.clone());
    let err = Token::open(&settings).unwrap_err();
    assert!(matches!(err, HsmError::WrongPin), "{err:?}");
    assert!(!err.to_string().contains("4711"));
}
