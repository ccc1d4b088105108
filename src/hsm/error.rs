//! `HsmError`: the one error type of the PKCS#11 port, and the one place where
//! `cryptoki::error::Error` is classified.
//!
//! Messages name labels, paths and PKCS#11 return codes only: never a PIN, a key
//! value or data that went into an operation.

use std::path::PathBuf;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

use super::availability::TokenState;

/// What went wrong in the token, classified so callers can decide without matching
/// PKCS#11 return codes themselves.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The PKCS#11 library could not be loaded.
    #[error("PKCS#11 module not found or not loadable: {}", path.display())]
    ModuleNotFound {
        /// Configured module path.
        path: PathBuf,
    },
    /// No initialized token carries the configured label.
    #[error("no token with label {label:?}")]
    TokenNotFound {
        /// Configured token label.
        label: String,
    },
    /// The token refused the user PIN.
    #[error("the token refused the user PIN (wrong PIN)")]
    WrongPin,
    /// The token locked the user PIN after too many failures.
    #[error("the token's user PIN is locked")]
    PinLocked,
    /// The configured PIN source could not be read.
    #[error("cannot read the user PIN: {0}")]
    PinUnavailable(String),
    /// No gateway key with this label.
    #[error("key not found: {label}")]
    KeyNotFound {
        /// Label looked up.
        label: String,
    },
    /// A key exists but is of another kind than the operation needs.
    #[error("key {label} is a {found} key, not a {wanted} key")]
    WrongKeyKind {
        /// Label looked up.
        label: String,
        /// Kind found in the token.
        found: &'static str,
        /// Kind the caller asked for.
        wanted: &'static str,
    },
    /// More than one object carries the label.
    #[error("more than one object with label {label}")]
    DuplicateLabel {
        /// The ambiguous label.
        label: String,
    },
    /// The key's attributes are wider than its kind allows (DESIGN 3).
    #[error("key {label} refused by policy: {}", violations.join(", "))]
    KeyPolicy {
        /// Offending key.
        label: String,
        /// Each attribute that is wider than allowed.
        violations: Vec<String>,
    },
    /// A key with this label already exists (creation refused, nothing created).
    #[error("a key with label {label} already exists")]
    LabelExists {
        /// The taken label.
        label: String,
    },
    /// Bad input to a key command (nothing was created).
    #[error("{0}")]
    InvalidInput(String),
    /// No session could be checked out within the configured time.
    #[error("no PKCS#11 session free within {millis} ms")]
    Busy {
        /// Configured checkout timeout.
        millis: u64,
    },
    /// The token or its sessions went away; retrying later may succeed.
    #[error("token unavailable: {function}: {rv:?}")]
    Unavailable {
        /// PKCS#11 function that failed.
        function: Function,
        /// Its return value.
        rv: RvError,
    },
    /// The token is down (gone, PIN refused or locked, library failing): calls
    /// fail at once without touching it while recovery retries in the background.
    #[error("token unavailable ({state}); re-initialization is retried in the background")]
    TokenDown {
        /// Why.
        state: TokenState,
    },
    /// Any other PKCS#11 failure.
    #[error("PKCS#11 {function} failed: {rv:?}")]
    Pkcs11 {
        /// PKCS#11 function that failed.
        function: Function,
        /// Its return value.
        rv: RvError,
    },
    /// A failure inside the cryptoki wrapper that is not a PKCS#11 return value.
    #[error("PKCS#11 wrapper error: {0}")]
    Wrapper(String),
    /// The blocking worker running the token call died.
    #[error("token worker failed: {0}")]
    Worker(String),
}

impl HsmError {
    /// Whether the error means the session or a cached handle is stale, so one
    /// re-open / re-resolve is worth trying (STYLE 3).
    pub fn is_stale_handle(&self) -> bool {
        matches!(
            self,
            HsmError::Unavailable { .. }
                | HsmError::Pkcs11 {
                    rv: RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid,
                    ..
                }
        )
    }

    /// Whether the failure is the token's availability rather than the request:
    /// the HTTP layer answers these with 503.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            HsmError::Unavailable { .. }
                | HsmError::TokenDown { .. }
                | HsmError::Busy { .. }
                | HsmError::Worker(_)
        )
    }

    /// Whether the failure could mean the token itself went away, so its
    /// presence is worth checking before blaming the request or the key: a
    /// vanished SoftHSM token answers with invalid handles and finds no keys.
    pub(crate) fn may_mean_token_lost(&self) -> bool {
        matches!(
            self,
            HsmError::Unavailable { .. }
                | HsmError::TokenNotFound { .. }
                | HsmError::KeyNotFound { .. }
                | HsmError::Pkcs11 {
                    rv: RvError::ObjectHandleInvalid
                        | RvError::KeyHandleInvalid
                        | RvError::GeneralError
                        | RvError::FunctionFailed,
                    ..
                }
        )
    }

    /// What this failure of a re-login or re-initialization says about the token.
    pub(crate) fn token_state(&self) -> TokenState {
        match self {
            HsmError::WrongPin => TokenState::PinRefused,
            HsmError::PinLocked => TokenState::PinLocked,
            HsmError::PinUnavailable(_) => TokenState::PinUnavailable,
            HsmError::TokenNotFound { .. }
            | HsmError::Unavailable {
                rv:
                    RvError::TokenNotPresent
                    | RvError::DeviceRemoved
                    | RvError::TokenNotRecognized
                    | RvError::SlotIdInvalid,
                ..
            } => TokenState::Missing,
            HsmError::TokenDown { state } => *state,
            _ => TokenState::Failed,
        }
    }
}

impl From<CkError> for HsmError {
    fn from(err: CkError) -> Self {
        match err {
            CkError::LibraryLoading(_) => HsmError::Wrapper("module could not be loaded".into()),
            CkError::Pkcs11(rv, function) => classify(rv, function),
            other => HsmError::Wrapper(other.to_string()),
        }
    }
}

fn classify(rv: RvError, function: Function) -> HsmError {
    match rv {
        RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange => HsmError::WrongPin,
        RvError::PinLocked => HsmError::PinLocked,
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::DeviceRemoved
        | RvError::DeviceError
        | RvError::DeviceMemory
        | RvError::SlotIdInvalid
        | RvError::UserNotLoggedIn
        | RvError::CryptokiNotInitialized => HsmError::Unavailable { function, rv },
        _ => HsmError::Pkcs11 { function, rv },
    }
}

/// Shorthand used across the port.
pub type HsmResult<T> = Result<T, HsmError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_errors_are_classified_without_detail() {
        let e = HsmError::from(CkError::Pkcs11(RvError::PinIncorrect, Function::Login));
        assert!(matches!(e, HsmError::WrongPin));
        assert_eq!(e.to_string(), "the token refused the user PIN (wrong PIN)");
    }

    #[test]
    fn lost_sessions_are_retryable_and_unavailable() {
        let e = HsmError::from(CkError::Pkcs11(
            RvError::SessionHandleInvalid,
            Function::Encrypt,
        ));
        assert!(e.is_stale_handle());
        assert!(e.is_unavailable());
        let e = HsmError::from(CkError::Pkcs11(
            RvError::ObjectHandleInvalid,
            Function::Encrypt,
        ));
        assert!(e.is_stale_handle());
        assert!(!e.is_unavailable());
        let e = HsmError::from(CkError::Pkcs11(
            RvError::MechanismInvalid,
            Function::Encrypt,
        ));
        assert!(!e.is_stale_handle());
    }

    #[test]
    fn failed_recoveries_say_why_the_token_is_down() {
        let state = |rv, function| HsmError::from(CkError::Pkcs11(rv, function)).token_state();
        assert_eq!(
            state(RvError::PinIncorrect, Function::Login),
            TokenState::PinRefused
        );
        assert_eq!(
            state(RvError::PinLocked, Function::Login),
            TokenState::PinLocked
        );
        for rv in [
            RvError::TokenNotPresent,
            RvError::DeviceRemoved,
            RvError::SlotIdInvalid,
        ] {
            assert_eq!(state(rv, Function::OpenSession), TokenState::Missing);
        }
        assert_eq!(
            state(RvError::GeneralError, Function::Initialize),
            TokenState::Failed
        );
        let missing = HsmError::TokenNotFound { label: "t".into() };
        assert_eq!(missing.token_state(), TokenState::Missing);
        let down = HsmError::TokenDown {
            state: TokenState::PinRefused,
        };
        assert!(down.is_unavailable());
        assert!(
            !down.is_stale_handle(),
            "a down token is not retried per call"
        );
        assert_eq!(
            down.to_string(),
            "token unavailable (pin_refused); re-initialization is retried in the background"
        );
    }

    #[test]
    fn what_a_vanished_token_looks_like_is_checked_not_blamed_on_the_request() {
        let lost = |rv| HsmError::from(CkError::Pkcs11(rv, Function::EncryptInit));
        assert!(lost(RvError::ObjectHandleInvalid).may_mean_token_lost());
        assert!(lost(RvError::DeviceRemoved).may_mean_token_lost());
        assert!(lost(RvError::GeneralError).may_mean_token_lost());
        assert!(HsmError::KeyNotFound { label: "k".into() }.may_mean_token_lost());
        assert!(!lost(RvError::MechanismInvalid).may_mean_token_lost());
        assert!(!HsmError::WrongPin.may_mean_token_lost());
    }
}
