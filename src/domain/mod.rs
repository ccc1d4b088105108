//! The card domain: card data types, the code algorithms of DESIGN 2 and the
//! engine that runs them on the HSM port.
//!
//! No HTTP, no SQL and no cryptoki types here: keyed operations go through
//! [`crate::hsm::CardCrypto`].

pub mod blocks;
pub mod card;
pub mod engine;
pub mod programme;
pub mod rotation;
pub mod service;

pub use blocks::CardKeyMethod;
pub use card::{Atc, CodeLength, Expiry, Pan, Psn, SecurityCode, ServiceCode, Tdcvv2Profile};
pub use engine::{Engine, IssuedCode, StaticCodeKind, WindowCode};

use crate::hsm::HsmError;

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
    /// The token failed or refused the key.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The store failed.
    #[error(transparent)]
    Store(crate::store::StoreError),
}
