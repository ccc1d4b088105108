//! The card domain: card data types, the code algorithms of DESIGN 2 and the
//! engine that runs them on the HSM port.
//!
//! No HTTP, no SQL and no cryptoki types here: keyed operations go through
//! [`crate::hsm::CardCrypto`].

pub mod blocks;
pub mod card;
pub mod engine;

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
    /// The token failed or refused the key.
    #[error(transparent)]
    Hsm(#[from] HsmError),
}
