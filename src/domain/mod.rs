//! The card domain: card data types, the code algorithms of DESIGN 2 and the
//! engine that runs them on the HSM port.
//!
//! No HTTP, no SQL and no cryptoki types here: keyed operations go through
//! [`crate::hsm::CardCrypto`].

pub mod blocks;
pub mod card;
pub mod emv;
pub mod engine;
pub mod journal;
pub mod operations;
pub mod programme;
pub mod rotation;
pub mod service;

pub use blocks::CardKeyMethod;
pub use card::{Atc, CodeLength, Expiry, Pan, Psn, SecurityCode, ServiceCode, Tdcvv2Profile};
pub use emv::{ArpcRequest, ArqcInput, ArqcOutcome, CryptogramVersion, Padding};
pub use engine::{Engine, IssuedCode, StaticCodeKind, WindowCode};

/// The card service over the PKCS#11 token, as the gateway runs it.
pub type Service = service::CardService<std::sync::Arc<crate::hsm::Token>>;

use crate::hsm::{HsmError, KeyKind};
use crate::store::StoreError;

/// What the domain reports: invalid card data, or a token failure underneath.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// A field of the card data is invalid; names the field, never its value.
    #[error("{field} {reason}")]
    Invalid {
        /// Wire name of the field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No card programme covers the card (or its `keyAssociation`).
    #[error("no card programme matches the card")]
    UnknownProgramme,
    /// The client may not touch the card's programme.
    #[error("the client may not use this card programme")]
    ProgrammeNotAllowed,
    /// The card's expiry month has passed.
    #[error("the card has expired")]
    CardExpired,
    /// The client's request id was already used within the replay window.
    #[error("duplicate request id")]
    DuplicateRequest,
    /// The card's programme has no key of this kind (e.g. no `imk_ac`), so it
    /// does not offer the operation.
    #[error("the card programme has no {} key configured", .0.as_str())]
    NotConfigured(KeyKind),
    /// A configured key is missing from the token, of another kind, ambiguous
    /// or wider than its policy (DESIGN 3): nothing a retry mends.
    #[error(transparent)]
    KeyUnusable(HsmError),
    /// A dependency cannot serve now; a retry later may succeed.
    #[error("{0} unavailable")]
    Unavailable(Dependency, #[source] Cause),
    /// A fault of the gateway itself.
    #[error("internal error")]
    Internal(#[source] Cause),
}

/// What a request depends on, for [`DomainError::Unavailable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// The token: gone, down, refusing the PIN, or failing.
    Hsm,
    /// The token answers, but every session stayed busy for the checkout timeout.
    HsmSessions,
    /// The store.
    Store,
    /// The audit trail (a change record could not be made durable first).
    Audit,
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dependency::Hsm => "HSM",
            Dependency::HsmSessions => "HSM session",
            Dependency::Store => "store",
            Dependency::Audit => "audit trail",
        })
    }
}

/// The lower layer's error under a [`DomainError`], kept for the log.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// From the token.
    #[error(transparent)]
    Hsm(HsmError),
    /// From the store.
    #[error(transparent)]
    Store(StoreError),
    /// From the audit trail.
    #[error(transparent)]
    Audit(journal::JournalError),
}

impl DomainError {
    /// Whether the token is what failed (for the HSM call metrics).
    pub fn is_token_failure(&self) -> bool {
        matches!(
            self,
            DomainError::KeyUnusable(_)
                | DomainError::Unavailable(Dependency::Hsm | Dependency::HsmSessions, _)
                | DomainError::Internal(Cause::Hsm(_))
        )
    }
}

/// The one place a token failure is classified for the layers above.
impl From<HsmError> for DomainError {
    fn from(e: HsmError) -> Self {
        match e {
            HsmError::KeyNotFound { .. }
            | HsmError::WrongKeyKind { .. }
            | HsmError::KeyPolicy { .. }
            | HsmError::DuplicateLabel { .. } => DomainError::KeyUnusable(e),
            HsmError::Busy { .. } => {
                DomainError::Unavailable(Dependency::HsmSessions, Cause::Hsm(e))
            }
            HsmError::InvalidInput(_) | HsmError::Wrapper(_) | HsmError::Worker(_) => {
                DomainError::Internal(Cause::Hsm(e))
            }
            _ => DomainError::Unavailable(Dependency::Hsm, Cause::Hsm(e)),
        }
    }
}

/// The one place a store failure is classified for the layers above.
impl From<StoreError> for DomainError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DuplicateRequest => DomainError::DuplicateRequest,
            StoreError::Internal(_) => DomainError::Internal(Cause::Store(e)),
            _ => DomainError::Unavailable(Dependency::Store, Cause::Store(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::{SessionLoss, TokenState, WorkerFailure};

    /// The one classification of token and store failures (what `http`
    /// answers 503, 500 or 409 follows from it).
    #[test]
    fn failures_below_are_classified_once_here() {
        for e in [
            HsmError::SessionLost(SessionLoss::NoAnchor),
            HsmError::SessionLost(SessionLoss::LoggedOut),
            HsmError::TokenDown {
                state: TokenState::PinRefused,
            },
        ] {
            assert!(
                matches!(
                    DomainError::from(e),
                    DomainError::Unavailable(Dependency::Hsm, Cause::Hsm(_))
                ),
                "token down or session lost is the token unavailable"
            );
        }
        assert!(matches!(
            DomainError::from(HsmError::Busy { millis: 5 }),
            DomainError::Unavailable(Dependency::HsmSessions, _)
        ));
        assert!(matches!(
            DomainError::from(HsmError::KeyNotFound { label: "k".into() }),
            DomainError::KeyUnusable(HsmError::KeyNotFound { .. })
        ));
        let worker = DomainError::from(HsmError::Worker(WorkerFailure::Panicked));
        assert!(matches!(worker, DomainError::Internal(Cause::Hsm(_))));
        assert!(worker.is_token_failure());
        assert!(matches!(
            DomainError::from(StoreError::DuplicateRequest),
            DomainError::DuplicateRequest
        ));
        let store_down = DomainError::from(StoreError::Unavailable(crate::store::Cause::Closed));
        assert!(matches!(
            store_down,
            DomainError::Unavailable(Dependency::Store, Cause::Store(_))
        ));
        assert!(!store_down.is_token_failure());
    }
}
