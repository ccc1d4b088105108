//! The PKCS#11 port: the token, its sessions, key lookup and policy, and the
//! in-token primitives (encrypt blocks under a key, derive a per-card session
//! key, HMAC under a key, probe).
//!
//! Every DES/3DES operation and every key derivation of the gateway runs here,
//! inside the token. This module knows nothing about cards, HTTP or storage, and
//! nothing it returns or logs carries key material (DESIGN 3, 7.1).
//!
//! PKCS#11 calls block: async code reaches the token only through [`blocking`].

mod admin;
mod availability;
mod capability;
mod error;
mod mechanism;
mod policy;
mod pool;
mod sync;
mod token;
mod types;
mod wrapped;

pub use admin::{Component, CreatedKey, KeyListing};
pub use availability::{FIRST_BACKOFF, MAX_BACKOFF, RecoveryCounts, TokenState};
pub use capability::{KeyUse, Lack, MechanismFlag, MechanismTable, Need, Needs, Purpose};
pub use error::{
    CryptokiFault, HsmError, HsmResult, KeyInputError, Malfunction, PinSourceError, Pkcs11Failure,
    SessionLoss, WorkerFailure,
};
pub use policy::{Kcv, KeyAttributes, KeyKind, KeyLabel, Usage};
pub use token::{
    CvvCipher, CvvKeySource, EmvKeySource, HsmSettings, KeyDerivation, OpCounts, PinSource, Token,
};
pub use types::{ForeignKeyType, ForeignMechanism, KeyType, Mechanism, OaepHash};
pub use wrapped::WrappingKey;

use zeroize::Zeroizing;

/// The two keys of one CVV computation (DESIGN 2.1), usable inside
/// [`CardCrypto::with_cvv_keys`]. Both encrypt any number of 8-byte blocks in one call.
pub trait BlockCipher {
    /// `CKM_DES3_ECB` under KA‖KA (single DES under KA).
    ///
    /// # Errors
    /// The token's error.
    fn encrypt_single(&self, blocks: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>>;
    /// `CKM_DES3_ECB` under KA‖KB.
    ///
    /// # Errors
    /// The token's error.
    fn encrypt_double(&self, blocks: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>>;
    /// KCV of KA‖KB, computed in the token.
    ///
    /// # Errors
    /// The token's error.
    fn kcv(&self) -> HsmResult<Kcv>;
}

/// A double-length DES key of an EMV computation (a card master key or a session
/// key derived from it), usable inside [`CardCrypto::with_emv_key`].
pub trait MacKey {
    /// ISO/IEC 9797-1 MAC algorithm 3 (the EMV "retail MAC") of `padded`, a
    /// non-empty multiple of 8 bytes: single-DES CBC under the left half, the
    /// last block under the whole key. The 8-byte MAC.
    ///
    /// # Errors
    /// `InvalidInput` for a length that is not a multiple of 8, or the token's error.
    fn retail_mac(&self, padded: &[u8]) -> HsmResult<Zeroizing<[u8; 8]>>;
    /// `CKM_DES3_ECB` under the key (ARPC method 1, the CVC3 block).
    ///
    /// # Errors
    /// The token's error.
    fn encrypt(&self, blocks: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>>;
    /// KCV of the key, computed in the token.
    ///
    /// # Errors
    /// The token's error.
    fn kcv(&self) -> HsmResult<Kcv>;
}

/// The narrow port the card-code engine needs (STYLE 2): keyed primitives by label.
pub trait CardCrypto {
    /// Runs `f` with the two keys of a CVV computation; per-card keys are derived
    /// in the token for the call and destroyed before it returns.
    ///
    /// # Errors
    /// `KeyNotFound`, `WrongKeyKind`, `KeyPolicy`, `Busy`, or the token's error.
    fn with_cvv_keys<R>(
        &self,
        source: CvvKeySource<'_>,
        f: impl FnMut(&dyn BlockCipher) -> HsmResult<R>,
    ) -> HsmResult<R>;

    /// Runs `f` with the key of an EMV computation: the card master key derived
    /// in the token from an IMK, or a session key derived in the token from that;
    /// every derived key is destroyed before this returns.
    ///
    /// # Errors
    /// As [`CardCrypto::with_cvv_keys`].
    fn with_emv_key<R>(
        &self,
        source: EmvKeySource<'_>,
        f: impl FnMut(&dyn MacKey) -> HsmResult<R>,
    ) -> HsmResult<R>;

    /// KCV of a gateway key of the given kind.
    ///
    /// # Errors
    /// As [`CardCrypto::with_cvv_keys`].
    fn key_check_value(&self, label: &KeyLabel, kind: KeyKind) -> HsmResult<Kcv>;

    /// HMAC-SHA256 under a PAN-index or audit-seal key, in the token.
    ///
    /// # Errors
    /// As [`CardCrypto::with_cvv_keys`].
    fn hmac(&self, label: &KeyLabel, kind: KeyKind, data: &[u8]) -> HsmResult<Zeroizing<Vec<u8>>>;
}

/// The port behind a reference or a shared handle is the port itself.
macro_rules! forward_card_crypto {
    ($($holder:ty),+) => {$(
        impl<T: CardCrypto + ?Sized> CardCrypto for $holder {
            fn with_cvv_keys<R>(
                &self,
                source: CvvKeySource<'_>,
                f: impl FnMut(&dyn BlockCipher) -> HsmResult<R>,
            ) -> HsmResult<R> {
                (**self).with_cvv_keys(source, f)
            }

            fn with_emv_key<R>(
                &self,
                source: EmvKeySource<'_>,
                f: impl FnMut(&dyn MacKey) -> HsmResult<R>,
            ) -> HsmResult<R> {
                (**self).with_emv_key(source, f)
            }

            fn key_check_value(&self, label: &KeyLabel, kind: KeyKind) -> HsmResult<Kcv> {
                (**self).key_check_value(label, kind)
            }

            fn hmac(
                &self,
                label: &KeyLabel,
                kind: KeyKind,
                data: &[u8],
            ) -> HsmResult<Zeroizing<Vec<u8>>> {
                (**self).hmac(label, kind, data)
            }
        }
    )+};
}

forward_card_crypto!(&T, std::sync::Arc<T>);

/// Runs a token call on tokio's blocking pool, never on a runtime worker
/// (STYLE 2). The one way async code calls the HSM.
///
/// # Errors
/// The call's own error, or `Worker` if the blocking task panicked or was cancelled.
pub async fn blocking<F, R>(call: F) -> HsmResult<R>
where
    F: FnOnce() -> HsmResult<R> + Send + 'static,
    R: Send + 'static,
{
    tokio::task::spawn_blocking(call).await.map_err(|e| {
        HsmError::Worker(if e.is_panic() {
            WorkerFailure::Panicked
        } else {
            WorkerFailure::Cancelled
        })
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blocking_runs_off_the_runtime_and_passes_errors_through() {
        let runtime_thread = std::thread::current().id();
        let worker_thread = blocking(|| Ok(std::thread::current().id())).await.unwrap();
        assert_ne!(runtime_thread, worker_thread);
        let err = blocking(|| -> HsmResult<()> { Err(HsmError::WrongPin) })
            .await
            .unwrap_err();
        assert!(matches!(err, HsmError::WrongPin));
    }
}
