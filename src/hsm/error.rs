//! `HsmError`: the one error type of the PKCS#11 port, and the one place where
//! `cryptoki::error::Error` is classified: into an `HsmError` (`From`), or, for
//! the few answers some calls expect, into a [`Benign`] outcome ([`tolerate`]).
//! No other file of the port matches a PKCS#11 return value.
//!
//! Messages name labels, paths, positions and PKCS#11 return codes only: never a
//! PIN, a key value or data that went into an operation. cryptoki's own types
//! appear in no public signature: a failed call is carried as an opaque
//! [`Pkcs11Failure`].

use std::path::PathBuf;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

use super::availability::TokenState;
use super::policy::{Kcv, KeyKind};
use super::types::{Mechanism, OaepHash};

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
    PinUnavailable(PinSourceError),
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
        found: KeyKind,
        /// Kind the caller asked for.
        wanted: KeyKind,
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
    InvalidInput(KeyInputError),
    /// No session could be checked out within the configured time.
    #[error("no PKCS#11 session free within {millis} ms")]
    Busy {
        /// Configured checkout timeout.
        millis: u64,
    },
    /// The anchor session or its login is gone: re-opening and logging in
    /// again is worth trying once (STYLE 3).
    #[error("token session lost: {0}")]
    SessionLost(SessionLoss),
    /// The token or its sessions went away; retrying later may succeed.
    #[error("token unavailable: {0}")]
    Unavailable(Pkcs11Failure),
    /// The token is down (gone, PIN refused or locked, library failing): calls
    /// fail at once without touching it while recovery retries in the background.
    #[error("token unavailable ({state}); re-initialization is retried in the background")]
    TokenDown {
        /// Why.
        state: TokenState,
    },
    /// Any other PKCS#11 failure.
    #[error("PKCS#11 {} failed: {:?}", .0.function, .0.rv)]
    Pkcs11(Pkcs11Failure),
    /// A failure that is not a PKCS#11 return value: in the cryptoki wrapper,
    /// or output the token should not have given.
    #[error("PKCS#11 wrapper error: {0}")]
    Wrapper(Malfunction),
    /// The blocking worker running the token call died.
    #[error("token worker failed: {0}")]
    Worker(WorkerFailure),
}

/// A PKCS#11 function and the return value it failed with, as the token gave
/// them; shown as `Function::<name>: <return value>`.
#[derive(Clone, Copy, Debug)]
pub struct Pkcs11Failure {
    function: Function,
    rv: RvError,
}

impl std::fmt::Display for Pkcs11Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {:?}", self.function, self.rv)
    }
}

/// Why the PIN source gave no PIN. Never carries any part of the PIN.
#[derive(Debug, thiserror::Error)]
pub enum PinSourceError {
    /// The environment variable is not set (or not valid UTF-8).
    #[error("environment variable {0} is not set")]
    EnvNotSet(String),
    /// The file cannot be read.
    #[error("{}: {kind}", path.display())]
    File {
        /// The configured file.
        path: PathBuf,
        /// What reading it failed with.
        kind: std::io::ErrorKind,
    },
    /// The source holds nothing but line ends.
    #[error("the PIN is empty")]
    Empty,
}

/// What was wrong with the input of a key command, or with what the token made
/// of it; nothing is left in the token. Names positions and KCVs, never a value.
#[derive(Debug, thiserror::Error)]
pub enum KeyInputError {
    /// Not the name of a key kind.
    #[error(
        "unknown key kind {0:?} (expected one of cvk, imk-dcvv, imk-tdcvv2, imk-ac, imk-cvc3, pan-index, audit-seal)"
    )]
    UnknownKind(String),
    /// Not a valid key label.
    #[error("a key label is 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadLabel,
    /// A component is not the kind's length in hex digits.
    #[error("component {position} is not {digits} hex digits")]
    ComponentFormat {
        /// 1-based position of the component.
        position: usize,
        /// Hex digits the kind needs.
        digits: usize,
    },
    /// Not 2 or 3 components.
    #[error("a key is imported from 2 or 3 components, not {0}")]
    ComponentCount(usize),
    /// Two components are equal (1-based positions).
    #[error("components {0} and {1} are the same")]
    RepeatedComponents(usize, usize),
    /// The components XOR to zero.
    #[error("the components cancel out to a zero key")]
    ZeroKey,
    /// The stored key's KCV is not the combined value's.
    #[error(
        "the token reports KCV {stored} for the stored key but {combined} for the combined value; nothing kept"
    )]
    KcvMismatch {
        /// KCV of the created object.
        stored: Kcv,
        /// KCV of the combined clear value.
        combined: Kcv,
    },
    /// The two generated halves of a CVK are equal.
    #[error("generated halves are equal; run again")]
    EqualHalves,
    /// MAC input that is empty or not a whole number of 8-byte blocks.
    #[error("MAC input of {0} bytes is not a whole number of 8-byte blocks")]
    BlockLength(usize),
    /// Not 6 hex digits where a KCV is expected.
    #[error("a KCV is 6 hex digits")]
    KcvFormat,
    /// Not the name of an OAEP hash.
    #[error("unknown OAEP hash {0:?} (expected sha256 or sha1)")]
    UnknownOaepHash(String),
    /// A kind that cannot be imported wrapped under the token's RSA key.
    #[error("a {kind} key cannot be imported wrapped: {}", match kind {
        KeyKind::Cvk => "its KA||KA object cannot be made in the token without the clear key; \
                         import it from components or generate it",
        _ => "only double-length DES keys (imk-dcvv, imk-tdcvv2, imk-ac, imk-cvc3) are; \
              generate it in the token",
    })]
    NotWrappable {
        /// The kind asked for.
        kind: KeyKind,
    },
    /// No RSA wrapping key pair of the gateway with this label.
    #[error("no wrapping key with label {0}")]
    NoWrappingKey(String),
    /// The wrapped key is not one RSA block of the wrapping key's size.
    #[error("the wrapped key is {len} bytes; under this wrapping key it must be {expected}")]
    WrappedLength {
        /// Bytes given.
        len: usize,
        /// The wrapping key's modulus size in bytes.
        expected: usize,
    },
    /// The token refused the OAEP parameters (nothing was created).
    #[error(
        "the token does not accept RSA-OAEP with {0} (SoftHSM 2.6 accepts only sha1, \
         --oaep-hash sha1); nothing created"
    )]
    OaepRefused(OaepHash),
    /// The token could not unwrap the cryptogram (nothing was created).
    #[error(
        "the token could not unwrap the key (another wrapping key or OAEP hash, \
         or a damaged file); nothing created"
    )]
    UnwrapFailed,
    /// The unwrapped key's KCV is not the one the sender stated.
    #[error(
        "the KCV of the unwrapped key, computed in the token, is not the stated {stated}; nothing kept"
    )]
    WrappedKcvMismatch {
        /// The KCV the sender stated.
        stated: Kcv,
    },
}

/// Why a session is no longer usable, found by the port rather than returned
/// by the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionLoss {
    /// The anchor session is closed (a re-initialization tore it down).
    #[error("no anchor session")]
    NoAnchor,
    /// The session is open but no longer logged in as the user.
    #[error("the user is not logged in")]
    LoggedOut,
}

/// A failure that no PKCS#11 return value describes.
#[derive(Debug, thiserror::Error)]
pub enum Malfunction {
    /// The library was found but could not be loaded.
    #[error("module could not be loaded")]
    ModuleUnloadable,
    /// The cryptoki wrapper failed (conversion, unsupported value, ...).
    #[error("{0}")]
    Cryptoki(CryptokiFault),
    /// The token's RSA public key cannot be DER-encoded (a zero-length modulus or exponent).
    #[error("the RSA public key cannot be encoded: {0}")]
    PublicKeyEncoding(spki::der::Error),
    /// The token returned output of a length its mechanism does not give.
    #[error("unexpected {len}-byte {mechanism} output")]
    OutputLength {
        /// The mechanism used.
        mechanism: Mechanism,
        /// Length of what the token returned.
        len: usize,
    },
}

/// An error of the cryptoki wrapper itself, kept as the source for logs.
#[derive(Debug)]
pub struct CryptokiFault(CkError);

impl std::fmt::Display for CryptokiFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for CryptokiFault {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// How the blocking worker of a token call ended without an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WorkerFailure {
    /// The call panicked.
    #[error("panicked")]
    Panicked,
    /// The task was cancelled (the runtime is shutting down).
    #[error("cancelled")]
    Cancelled,
}

impl HsmError {
    /// Whether the error means the session or a cached handle is stale, so one
    /// re-open / re-resolve is worth trying (STYLE 3).
    pub fn is_stale_handle(&self) -> bool {
        matches!(
            self,
            HsmError::Unavailable(_)
                | HsmError::SessionLost(_)
                | HsmError::Pkcs11(Pkcs11Failure {
                    rv: RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid,
                    ..
                })
        )
    }

    /// Whether the failure could mean the token itself went away, so its
    /// presence is worth checking before blaming the request or the key: a
    /// vanished SoftHSM token answers with invalid handles and finds no keys.
    pub(super) fn may_mean_token_lost(&self) -> bool {
        matches!(
            self,
            HsmError::Unavailable(_)
                | HsmError::SessionLost(_)
                | HsmError::TokenNotFound { .. }
                | HsmError::KeyNotFound { .. }
                | HsmError::Pkcs11(Pkcs11Failure {
                    rv: RvError::ObjectHandleInvalid
                        | RvError::KeyHandleInvalid
                        | RvError::GeneralError
                        | RvError::FunctionFailed,
                    ..
                })
        )
    }

    /// What this failure of a re-login or re-initialization says about the token.
    pub(super) fn token_state(&self) -> TokenState {
        match self {
            HsmError::WrongPin => TokenState::PinRefused,
            HsmError::PinLocked => TokenState::PinLocked,
            HsmError::PinUnavailable(_) => TokenState::PinUnavailable,
            HsmError::TokenNotFound { .. }
            | HsmError::Unavailable(Pkcs11Failure {
                rv:
                    RvError::TokenNotPresent
                    | RvError::DeviceRemoved
                    | RvError::TokenNotRecognized
                    | RvError::SlotIdInvalid,
                ..
            }) => TokenState::Missing,
            HsmError::TokenDown { state } => *state,
            _ => TokenState::Failed,
        }
    }
}

impl From<CkError> for HsmError {
    fn from(err: CkError) -> Self {
        match err {
            CkError::LibraryLoading(_) => HsmError::Wrapper(Malfunction::ModuleUnloadable),
            CkError::Pkcs11(rv, function) => classify(rv, function),
            other => HsmError::Wrapper(Malfunction::Cryptoki(CryptokiFault(other))),
        }
    }
}

fn classify(rv: RvError, function: Function) -> HsmError {
    let failure = Pkcs11Failure { function, rv };
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
        | RvError::CryptokiNotInitialized => HsmError::Unavailable(failure),
        _ => HsmError::Pkcs11(failure),
    }
}

/// An answer that some calls expect and treat as an outcome, not a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Benign {
    /// `C_Initialize`: another user of the library in this process initialized
    /// it already (the library state is per process, issue 2).
    AlreadyInitialized,
    /// `C_Login`: the user is logged in already, by another session (STYLE 3).
    AlreadyLoggedIn,
    /// `C_CopyObject`: the token refuses to copy a non-modifiable key
    /// (SoftHSM 2.6 does).
    CopyRefused,
    /// `C_Verify`: the MAC does not match.
    SignatureMismatch,
    /// `C_GetAttributeValue`: cryptoki cannot parse the value (a
    /// `CKA_ALLOWED_MECHANISMS` list holding a mechanism it has no type for).
    Unparseable,
    /// `C_GetMechanismInfo`: the token does not have the mechanism.
    MechanismInvalid,
    /// `C_UnwrapKey`: the token does not accept the mechanism's parameters
    /// (SoftHSM 2.6 answers `CKR_ARGUMENTS_BAD` to RSA-OAEP with SHA-256).
    ParametersRefused,
    /// `C_UnwrapKey`: the cryptogram does not decrypt under the key with these
    /// parameters. SoftHSM 2.6 answers `CKR_GENERAL_ERROR` to a failed OAEP decoding,
    /// which a lost token could also give; the call comes after a successful lookup
    /// of the unwrapping key in the same session, so it is taken as the cryptogram's.
    CryptogramRefused,
}

impl Benign {
    fn matches(self, err: &CkError) -> bool {
        match self {
            Benign::AlreadyInitialized => {
                matches!(err, CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _))
            }
            Benign::AlreadyLoggedIn => {
                matches!(err, CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _))
            }
            Benign::CopyRefused => matches!(
                err,
                CkError::Pkcs11(RvError::AttributeReadOnly | RvError::ActionProhibited, _)
            ),
            Benign::SignatureMismatch => matches!(
                err,
                CkError::Pkcs11(RvError::SignatureInvalid | RvError::SignatureLenRange, _)
            ),
            Benign::Unparseable => matches!(err, CkError::NotSupported | CkError::InvalidValue),
            Benign::MechanismInvalid => {
                matches!(err, CkError::Pkcs11(RvError::MechanismInvalid, _))
            }
            Benign::ParametersRefused => matches!(
                err,
                CkError::Pkcs11(
                    RvError::ArgumentsBad
                        | RvError::MechanismParamInvalid
                        | RvError::MechanismInvalid,
                    _
                )
            ),
            Benign::CryptogramRefused => matches!(
                err,
                CkError::Pkcs11(
                    RvError::WrappedKeyInvalid
                        | RvError::WrappedKeyLenRange
                        | RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::GeneralError,
                    _
                )
            ),
        }
    }
}

/// A cryptoki result with the `benign` answer told apart: `Ok(Some(value))` on
/// success, `Ok(None)` when the call gave that answer, the classified error otherwise.
pub(super) fn tolerate<T>(
    result: cryptoki::error::Result<T>,
    benign: Benign,
) -> HsmResult<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if benign.matches(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A cryptoki result with any of the `benign` answers told apart: `Ok(Ok(value))`
/// on success, `Ok(Err(answer))` for the first of them the call gave, the
/// classified error otherwise.
pub(super) fn tolerate_any<T>(
    result: cryptoki::error::Result<T>,
    benign: &[Benign],
) -> HsmResult<Result<T, Benign>> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(e) => match benign.iter().find(|b| b.matches(&e)) {
            Some(b) => Ok(Err(*b)),
            None => Err(e.into()),
        },
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
    fn lost_sessions_are_retryable() {
        let e = HsmError::from(CkError::Pkcs11(
            RvError::SessionHandleInvalid,
            Function::Encrypt,
        ));
        assert!(e.is_stale_handle());
        let e = HsmError::from(CkError::Pkcs11(
            RvError::ObjectHandleInvalid,
            Function::Encrypt,
        ));
        assert!(e.is_stale_handle());
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
    fn a_lost_session_is_recovered_once_and_may_mean_the_token_is_gone() {
        for loss in [SessionLoss::NoAnchor, SessionLoss::LoggedOut] {
            let e = HsmError::SessionLost(loss);
            assert!(e.is_stale_handle());
            assert!(e.may_mean_token_lost());
            assert_eq!(e.token_state(), TokenState::Failed);
        }
    }

    #[test]
    fn expected_answers_are_outcomes_and_anything_else_stays_an_error() {
        let refused = || {
            Err::<u8, _>(CkError::Pkcs11(
                RvError::ActionProhibited,
                Function::CopyObject,
            ))
        };
        assert!(matches!(tolerate(Ok(5), Benign::CopyRefused), Ok(Some(5))));
        assert!(matches!(tolerate(refused(), Benign::CopyRefused), Ok(None)));
        assert!(matches!(
            tolerate(refused(), Benign::AlreadyLoggedIn),
            Err(HsmError::Pkcs11(_))
        ));
        let mismatch = Err::<(), _>(CkError::Pkcs11(RvError::SignatureInvalid, Function::Verify));
        assert!(matches!(
            tolerate(mismatch, Benign::SignatureMismatch),
            Ok(None)
        ));
        assert!(matches!(
            tolerate(Err::<(), _>(CkError::InvalidValue), Benign::Unparseable),
            Ok(None)
        ));
        let again = Err::<(), _>(CkError::Pkcs11(
            RvError::CryptokiAlreadyInitialized,
            Function::Initialize,
        ));
        assert!(matches!(
            tolerate(again, Benign::AlreadyInitialized),
            Ok(None)
        ));
        let missing = || {
            Err::<(), _>(CkError::Pkcs11(
                RvError::MechanismInvalid,
                Function::GetMechanismInfo,
            ))
        };
        assert!(matches!(
            tolerate(missing(), Benign::MechanismInvalid),
            Ok(None)
        ));
        assert!(matches!(
            tolerate(missing(), Benign::Unparseable),
            Err(HsmError::Pkcs11(_))
        ));
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
